"""The coordinator's warnings of job rows another session holds (jobs/held_rows.py decides which
holds to warn of), given off the heartbeats' answer path.

A heartbeat's method only records what was passed over (`HeldWarnings.heard`: no I/O, never
raises) and, when a hold is to be warned of, hands its jobs to `run`, a task of the coordinator
beside its sweeps, through a queue of QUEUED batches: a full queue drops the batch (counted,
and handed again at the jobs' next heartbeats), never waits. So a heartbeat's answer neither
waits for the look at the holders nor fails with it. `run` looks the holders of all the jobs
of one batch up with one transaction of three statements (lock_waits.py `row_holders`), on a
thread of its own (a limiter of 1: a look that never ends holds that thread, never one of the
store's), given up after look_timeout; while a look given up still runs on it, a batch is put
off to the jobs' next heartbeats (it would wait for that thread and be given up without the
holders' names for good); it says nothing of a row found free by then, and logs one warning
per holder, naming its jobs; a hold is marked said only once its warning is logged. A holder
warned of (by pid) is not warned of again for a HeartbeatTimeout: its holds meanwhile (other
workers' jobs: 60 workers held by one psql) are summed up in one line once that time passed
(`_sum_up`, asked for by the next heartbeat then)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio
from sqlalchemy import exc

from ..jobs import held_rows, lock_waits
from ..jobs.database import first_line
from ..jobs.log_lines import job_fields
from ..threads import NoThreadError, run_in_thread
from ..wording import some_and_more
from .listeners import ThrottledLog

if TYPE_CHECKING:
    from ..jobs.store import Outcome, TrioJobStore

log = logging.getLogger("damocles_ext.coordinator")

#: Batches (one heartbeat's holds to warn of) waiting for their look at most.
QUEUED: Final = 16


@dataclass(slots=True)
class _Told:
    """When a holder was last warned of (on the monotonic clock), and the holds of it said since
    in no warning of their own: jobs by worker."""

    at: float
    held: dict[str, int] = field(default_factory=dict)


class HeldWarnings:
    """The holds a coordinator's heartbeats saw (`rows`), and the task that warns of them."""

    def __init__(
        self,
        store: TrioJobStore,
        *,
        look_timeout: float = lock_waits.LOOK_TIMEOUT,
        queued: int = QUEUED,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.store = store
        #: The clock of the holds' own times (the coordinator's, trio's by default): a step of
        #: the wall clock (the store's, the jobs' heartbeat times) does not move it.
        self.monotonic = monotonic or trio.current_time
        self.rows = held_rows.HeldRows()
        self.look_timeout = look_timeout
        self._send, self._receive = trio.open_memory_channel[list[held_rows.HeldTooLong]](queued)
        self._limiter = trio.CapacityLimiter(1)  # the looks' own thread
        #: Batches dropped, the queue full.
        self.dropped = 0
        self._dropped_log = ThrottledLog(log)
        self._busy_log = ThrottledLog(log)
        #: The jobs table qualified by its schema, once read (at `run`'s start, or by a look),
        #: for the query a warning gives when its look failed.
        self._table: str | None = None
        #: Holder pid -> its last warning, and the holds of it said since in no warning of their
        #: own (summed up once a HeartbeatTimeout passed: `_sum_up`).
        self._told: dict[int, _Told] = {}
        self._sum_up_asked = False
        # The batches handed to `run` and not dealt with yet, for `settled` (the tests' only).
        self._unfinished = 0
        self._settled = trio.Event()
        self._settled.set()

    def heard(self, outcome: Outcome, worker: str, leases: Mapping[str, str] | None = None) -> None:
        """A heartbeat of `worker` (Dext's, with the `leases` it sent, or Venus') answered with
        `outcome`: the holds to warn of are handed to `run`. Never raises, never waits."""
        try:
            now, timeout = self.monotonic(), self.store.store.limits.heartbeat_timeout
            warn = self.rows.heard(
                worker, outcome.jobs, outcome.skipped, outcome.effects, self.store.clock(), now,
                timeout, leases,
            )  # fmt: skip
            if not warn:
                if self._sum_up_asked or not any(
                    told.held and now - told.at >= timeout for told in self._told.values()
                ):
                    return
                self._sum_up_asked = True  # an empty batch: only the holders to sum up
            try:
                self._send.send_nowait(warn)
            except trio.WouldBlock:
                if not warn:
                    self._sum_up_asked = False
                    return
                self.rows.not_said(warn)
                self.dropped += 1
                self._dropped_log(
                    "the warning of %d job row%s held elsewhere is put off: %d warnings wait"
                    " already for their holders to be looked up (%d put off in all); it is"
                    " given at one of the jobs' next heartbeats",
                    len(warn), "s" if len(warn) > 1 else "",
                    self._send.statistics().current_buffer_used, self.dropped,
                )  # fmt: skip
                return
            if self._unfinished == 0:
                self._settled = trio.Event()
            self._unfinished += 1
        except Exception:  # a warning must never cost a worker its answer
            log.exception("the warning of a job row held elsewhere failed")

    async def settled(self) -> None:
        """Return once every batch handed to `run` so far was dealt with (for tests: they wait
        for the warnings of a heartbeat without a sleep)."""
        await self._settled.wait()

    async def run(self) -> None:
        """Warn of the batches handed out, one after another, until cancelled."""
        await self._read_table()
        async for batch in self._receive:
            try:
                await self._warn(batch)
            finally:
                self._unfinished -= 1
                if self._unfinished == 0:
                    self._settled.set()

    async def _warn(self, batch: list[held_rows.HeldTooLong]) -> None:
        left = list(batch)
        try:
            now = self.monotonic()
            self._sum_up(now)
            if not batch:
                return
            if self._limiter.available_tokens == 0:  # a look given up is still on its thread
                self._busy_log(
                    "the warning of %d job row%s held elsewhere is put off: an earlier look at"
                    " the holders, given up after %g s, has not ended yet (the job store is slow"
                    " to answer); it is given at one of the jobs' next heartbeats",
                    len(batch), "s" if len(batch) > 1 else "", self.look_timeout,
                )  # fmt: skip
                return
            looked, failed = await self._look([h.job_id for h in batch])
            groups: dict[lock_waits.Session | None, list[held_rows.HeldTooLong]] = {}
            for held in batch:
                if looked is not None and held.job_id in looked.free:
                    self.rows.ended([held])  # freed since: said nothing
                    left.remove(held)
                    continue
                holder = None if looked is None else looked.holders.get(held.job_id)
                groups.setdefault(holder, []).append(held)
            if looked is not None and looked.table is not None:
                self._table = looked.table
            blind = None if looked is None else looked.blind
            for holder, held_by in groups.items():
                if holder is not None and (told := self._told.get(holder.pid)) is not None:
                    for held in held_by:  # warned of lately: summed up later
                        told.held[held.worker] = told.held.get(held.worker, 0) + 1
                    self.rows.said(held_by)
                    left = [h for h in left if h not in held_by]
                    continue
                advice = lock_waits.row_advice(holder, len(held_by), blind, self._table)
                if failed is not None:
                    advice = f"Its holder could not be looked up ({failed}). {advice}"
                worker = held_by[0].worker
                fields = job_fields(held_by[0].job_id, worker) if len(held_by) == 1 else {
                    "worker": worker
                }  # fmt: skip
                log.warning("%s", held_rows.said_of(held_by, advice), extra=fields)
                if holder is not None:
                    self._told[holder.pid] = _Told(now)
                self.rows.said(held_by)
                left = [h for h in left if h not in held_by]
        except Exception:  # a warning's failure must not end the task
            log.exception("the warning of a job row held elsewhere failed")
        finally:
            self.rows.not_said(left)  # a later heartbeat of theirs hands them again

    def _sum_up(self, now: float) -> None:
        """One line for each holder warned of a HeartbeatTimeout ago or more, of the holds of it
        said in no warning of their own since; it is warned of again at its next hold."""
        self._sum_up_asked = False
        timeout = self.store.store.limits.heartbeat_timeout
        for pid, told in list(self._told.items()):
            if now - told.at < timeout:
                continue
            del self._told[pid]
            if not told.held:
                continue
            workers = sorted(told.held)
            named = some_and_more([repr(w) for w in workers[: held_rows.NAMED]], len(workers))
            jobs = sum(told.held.values())
            log.warning(
                "the session of pid %d, warned of %.0f s ago as the holder of job rows in the"
                " job store, held the rows of %d more job%s since, of worker%s %s: their"
                " heartbeats are not stored either; not warned of one by one (what its warning"
                " said to do holds for them)",
                pid, now - told.at, jobs, "s" if jobs > 1 else "", "s" if len(workers) > 1 else "",
                named, extra={"worker": workers[0]} if len(workers) == 1 else {},
            )  # fmt: skip

    async def _read_table(self) -> None:
        """The jobs table's name qualified by its schema, read once; a failure leaves it to the
        looks."""
        if not self.store.store.is_postgresql:
            return
        with trio.move_on_after(self.look_timeout):
            try:
                self._table = await run_in_thread(
                    lock_waits.jobs_table, self.store.store.engine,
                    limiter=self._limiter, abandon_on_cancel=True,
                )  # fmt: skip
            except (NoThreadError, exc.SQLAlchemyError) as e:
                log.debug("the jobs table's schema could not be read: %s", e)
            except Exception:  # a warning's failure must not end the task, nor the sweeps
                log.exception("the jobs table's schema could not be read")

    async def _look(
        self, job_ids: Iterable[str]
    ) -> tuple[lock_waits.RowHolders | None, str | None]:
        """The holders of the rows of `job_ids`, or None and why not."""
        store = self.store.store
        if not store.is_postgresql:  # (SQLite passes over no row)
            return None, "not a PostgreSQL store"
        with trio.move_on_after(self.look_timeout):
            try:
                found = await run_in_thread(
                    lock_waits.row_holders, store.engine, sorted(job_ids),
                    limiter=self._limiter, abandon_on_cancel=True,
                )  # fmt: skip
            except NoThreadError as e:
                return None, str(e)
            except exc.SQLAlchemyError as e:
                return None, f"the look failed: {first_line(e)}"
            return found, None
        return None, f"no answer within {self.look_timeout:g} s"
