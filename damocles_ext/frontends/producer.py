"""The producer: `serve window_post --jobs URL` (and `prove --jobs`, and the Python API) turn each
WindowPoSt task into a job of the store, wait for it, and answer exactly once.

A request becomes the job damocles-manager's worker-prover mode would make (jobs/paths.py: paths
to store names); its id is the hash of that input, so creating it is idempotent: a serve that was
killed and started again, given the same request line by damocles-manager, finds the job it made
before (finished or not) and answers from it. Nothing is kept in memory that a restart needs.

Waiting is polling `get` every `poll_interval` (damocles' 3 s), woken earlier by `wake(job_id)`
(LISTEN/NOTIFY on PostgreSQL, jobs/notify.py). A job that is gone while waited for (an operator
removed it) is created again, as damocles does. A store that fails (the database down) is retried
with a backoff and logged, never answered as a failed proof, until the job's deadline if it has
one. A job whose deadline passed is swept here too, so its cancellation does not wait for a
coordinator's next pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import trio

from ..errors import ProverError, UsageError
from ..jobs import model, rules
from ..jobs.log_lines import job_fields
from ..jobs.manager_config import ManagerConfig, read_settings
from ..jobs.outage import Outage
from ..jobs.paths import StoreMap, job_input
from ..jobs.store import JobStore, StoreError, StoreLost, StoreTakesNoWrites, TrioJobStore
from ..jobs.trio_store import CLOCK_SKEW
from ..tasks import (
    Output,
    Task,
    WindowPoSt,
    WindowPoStOutput,
    WinningPoSt,
    deadline_problem,
    result_problem,
    task_problem,
)
from ..threads import NoThreadError, run_in_thread
from .coordinator_clock import ServerClockReader
from .serve import SERVE_CONNECT_TIMEOUT, replay_held_signals
from .serve_jsonl import InFlight, StopReasons, log_stopped, serve_draining
from .signals import stop_signals

if TYPE_CHECKING:
    from ..jobs.notify import JobListener
    from .coordinator import Coordinator, CoordinatorServer

log = logging.getLogger("damocles_ext.producer")

#: The first pause after a store failure; it doubles up to MAX_BACKOFF.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: How long past the job's deadline (or past its start, when begun after it) a look at the store
#: may take before the request is answered without it (a store that hangs).
LATE_LOOK = 5.0

#: How often (trio's clock) serve --jobs and the API's producer look whether their SQLite store's
#: file is still the one at its path, with no request to notice it: a file deleted or replaced is
#: said, and the old file's write-ahead log emptied, within this, not at the next request
#: (jobs/sqlite_file.py). The default of `serve --jobs --store-file-check`.
FILE_CHECK_EVERY = 10.0

_PRODUCER_KEEPS_TO_IT = (
    "this producer keeps to the server's clock, as the coordinators do: the deadlines it gives"
    " (deadline_after, serve's --deadline-after, prove's --deadline SECONDS) are on it, so no"
    " job is cancelled early for it; but a deadline given as a unix time (a request's, submit's"
    " `deadline`, prove's --deadline ISO-TIME) is read on the server's clock as it is"
)
_PRODUCER_UNREAD = (
    "this producer gives deadlines on this machine's clock, which may be off the server's, which"
    " the coordinators keep to, until a reading works (tried at each poll; a line says when)"
)

#: The effects after which a job may be done: a producer's wait looks at it again.
_MAY_BE_DONE = (rules.Finished, rules.JobCancelled, rules.TimedOut, rules.Removed)

WINNING_REFUSED = (
    "WinningPoSt must stay local: a block's proof has about 20 s, too little to wait for a job"
    " store and a remote worker; serve winning_post with children of its own (-c or --conf-dir"
    " with an ext-prover.cfg) or --connect"
)


def producer_settings(
    conf_dir: str | None, stores: list[tuple[str, str]], poll_interval: float | None
) -> ManagerConfig:
    """damocles-manager's settings for a producer (jobs/manager_config.read_settings), with
    `poll_interval` in their limits when given; their warnings are logged."""
    settings = read_settings(conf_dir, stores)
    for warning in settings.warnings:
        log.warning("%s", warning)
    if poll_interval is None:
        return settings
    limits = dataclasses.replace(settings.limits, poll_interval=poll_interval)
    return dataclasses.replace(settings, limits=limits)


class JobProducer:
    """`submit(task)` for WindowPoSt tasks through the job store; `wake(job_id)` when the store
    says a job changed; `abandon(reason)` on shutdown."""

    def __init__(
        self,
        store: TrioJobStore,
        stores: StoreMap,
        *,
        deadline_after: float | None = None,
        file_check_every: float = FILE_CHECK_EVERY,
    ) -> None:
        self.store = store
        self.stores = stores
        self.deadline_after = deadline_after
        self.file_check_every = file_check_every  # how often watch_store_file looks
        self.in_flight = InFlight()
        # One event per job id waited for, set (and dropped) by wake(); several requests for one
        # job share it, and the last of them to stop waiting drops it (`_waiting` counts them).
        self._wakers: dict[str, trio.Event] = {}
        self._waiting: dict[str, int] = {}
        self._found: set[str] = set()  # jobs waited for that a look found in the store
        # The jobs of requests in a backoff the end of an outage may cut short (by count).
        self._backing_off: dict[str, int] = {}
        # A store that is down is said once for all the requests waiting, not once per look of
        # each (a line a second and more with a few dozen in flight), and once when it answers.
        self._store_outage = Outage(
            begins="the job store failed ({why}); the waiting requests look again with a backoff"
            f" ({FIRST_BACKOFF:g} s doubling to {MAX_BACKOFF:g} s), none is answered as a failed"
            " proof before its job's deadline; a line says when the store answers again",
            ends="the job store answers again, after {failures} failed looks in {lasted:.0f} s",
        )
        # The outage met a write refused (a full disk): only a look that wrote ends it, as the
        # reads of the other requests are still answered.
        self._writes_refused = False

    @classmethod
    def on(
        cls,
        store: JobStore,
        settings: ManagerConfig,
        *,
        deadline_after: float | None,
        file_check_every: float | None = None,
    ) -> JobProducer:
        """The producer on `store` with the stores of `settings` (producer_settings);
        `file_check_every` None: FILE_CHECK_EVERY."""
        stores = StoreMap(settings.stores)
        every = FILE_CHECK_EVERY if file_check_every is None else file_check_every
        return cls(
            TrioJobStore(store), stores, deadline_after=deadline_after, file_check_every=every
        )

    @property
    def limits(self) -> rules.JobLimits:
        """The store's limits; their poll_interval is how often a waited job is looked at."""
        return self.store.store.limits

    def job_input(self, task: Task) -> model.WdPoStInput:
        """The job input of `task`; UsageError (answered to that request) when it cannot be one."""
        if isinstance(task, WinningPoSt):
            raise UsageError(WINNING_REFUSED)
        if not isinstance(task, WindowPoSt):
            raise UsageError(
                f"request refused: {type(task).__name__} is not a task of a job; give a"
                " WindowPoSt (damocles_ext.tasks)"
            )
        if (problem := task_problem(task)) is not None:
            # A Struct the caller built is not checked: a proof type no prover knows, say,
            # became a job that waited until its deadline.
            raise UsageError(f"request {problem}")
        try:
            return job_input(task, self.stores)
        except ValueError as exc:  # SectorPathError too
            raise UsageError(f"bad request: {exc}; not proved") from None

    async def submit(self, task: Task, *, deadline: float | None = None) -> Output:
        """Make (or find) the job of `task`, wait until it is done, and return its output;
        ProverError naming the job, the worker, the tries and why when there is no proof.

        The job's deadline (`not_after`, unix seconds) is `deadline` when given, else
        `deadline_after` seconds from now, else none. A job that exists keeps its own.
        UsageError for a task that cannot be a job or a deadline that is no unix time."""
        if deadline is not None and (problem := deadline_problem(deadline)) is not None:
            # In milliseconds, it was a job of the year 58000; a datetime raised TypeError.
            raise UsageError(
                f"request refused: its deadline {deadline!r} {problem}; give a unix time in"
                " seconds (e.g. time.time() + 600), or no deadline"
            )
        job_input = self.job_input(task)
        job_id = model.job_id(job_input)
        not_after = deadline
        if not_after is None and self.deadline_after is not None:
            not_after = self.clock() + self.deadline_after
        where = self.store.store.where

        def detail() -> str:  # (said when the wait is abandoned: a stop)
            if job_id in self._found:
                return (
                    f"; job {job_id} stays in the job store {where}, and a restarted serve given"
                    " the same request re-attaches to it"
                )
            return (
                f"; no look at the job store {where} had answered yet: job {job_id} may not have"
                " been made (a restarted serve given the same request re-attaches to it if it was)"
            )

        try:
            return await self.in_flight.run(
                lambda: self._wait(job_id, job_input, not_after), detail
            )
        finally:  # (after `detail`, which a stop's answer reads)
            if job_id not in self._waiting:
                self._found.discard(job_id)

    def wake(self, job_id: str) -> None:
        """The store says `job_id` changed: its waiters look at it now."""
        event = self._wakers.pop(job_id, None)
        if event is not None:
            event.set()

    def observe(self, effects: Iterable[rules.Effect]) -> None:
        """A coordinator in this process changed jobs: wake the waits of those that may be done
        now, so that they are answered at once rather than at their next poll (serve --listen:
        SQLite has no notifications)."""
        for effect in effects:
            if isinstance(effect, _MAY_BE_DONE):
                self.wake(effect.job_id)

    def wake_all(self) -> None:
        """Every waiter looks at its job now (the listener reconnected: it may have missed
        notifications)."""
        for job_id in list(self._wakers):
            self.wake(job_id)

    def listener(self) -> JobListener | None:
        """The LISTEN/NOTIFY listener that wakes this producer (None on SQLite): run it beside."""
        # Imported here: psycopg is not needed before serve's ready line, nor on SQLite.
        from ..jobs.notify import JobListener

        return JobListener.of_store(self.store.store, self.wake, self.wake_all)

    @property
    def clock(self) -> Callable[[], float]:
        """The clock of the deadlines given here: its store's (its PostgreSQL server's once
        `watch_clock` read it, or a coordinator's in this process)."""
        return self.store.clock

    def start_watches(self, nursery: trio.Nursery) -> None:
        """Start in `nursery` what tells this producer of its store with no request in flight:
        the LISTEN/NOTIFY listener (PostgreSQL) and the check of its file (SQLite), every
        `file_check_every` seconds."""
        listener = self.listener()
        if listener is not None:
            nursery.start_soon(listener.run)
        nursery.start_soon(self.watch_store_file)

    async def watch_clock(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:  # fmt: skip
        """Keep the store's clock on its PostgreSQL server's, as the coordinators' is: the
        deadlines given here (`deadline_after`), the jobs' stamps and this producer's sweeps of
        them at their deadline. Read before `task_status.started()` (waited for
        SERVE_CONNECT_TIMEOUT s at most), then every poll_interval until cancelled; this
        machine's clock is said when CLOCK_SKEW or more off it. Given deadlines from this
        machine's clock 60 s behind the server's, a job of `deadline_after=30` was cancelled
        at the coordinator's next sweep, and nothing said why. Not with a coordinator in this
        process: the store's clock is the coordinator's, which its sweeps read."""
        if not self.store.store.is_postgresql:
            task_status.started()
            return
        reading = ServerClockReader(self.store, log, "producer", keeps_to_it=_PRODUCER_KEEPS_TO_IT,
                               unread=_PRODUCER_UNREAD)  # fmt: skip
        await self._read_clock(reading, SERVE_CONNECT_TIMEOUT)
        task_status.started()
        while True:
            await trio.sleep(self.limits.poll_interval)
            await self._read_clock(reading)

    async def _read_clock(self, reading: ServerClockReader, within: float | None = None) -> None:
        first = self.store.server_offset is None
        if (moved := await reading.read(within)) is None:
            return
        where = self.store.store.where
        if not first and abs(moved) >= CLOCK_SKEW:
            log.info("the clock of the job store's server (%s) moved %.1f s since it was last"
                     " read: this producer keeps to it", where, moved)  # fmt: skip
        reading.notice.read(self.store.wall_skew(), where)

    async def watch_store_file(self) -> None:
        """Until cancelled, or its SQLite store is lost: whether the store's file is still the
        one at its path, every `file_check_every` seconds (nothing on PostgreSQL, nor before the
        store's first connection); one found deleted or replaced is said at ERROR by the check."""
        watch, engine = self.store.store.file_watch, self.store.store.engine
        one_at_a_time = trio.CapacityLimiter(1)  # a stat that hangs (NFS) holds one thread
        while watch is not None and watch.lost is None:
            await trio.sleep(self.file_check_every)
            # StoreLost: said by the check itself; no thread for it (at the limit of tasks):
            # the next one looks, and the store's own calls say what ran out.
            with contextlib.suppress(StoreError, NoThreadError):
                await run_in_thread(
                    watch.check, engine, limiter=one_at_a_time, abandon_on_cancel=True
                )

    def abandon(self, reason: str) -> None:
        self.in_flight.abandon(reason)

    async def _wait(
        self, job_id: str, job_input: model.WdPoStInput, not_after: float | None
    ) -> WindowPoStOutput:
        self._waiting[job_id] = self._waiting.get(job_id, 0) + 1
        try:
            return await self._poll(job_id, job_input, not_after)
        finally:
            self._waiting[job_id] -= 1
            if not self._waiting[job_id]:
                del self._waiting[job_id]
                self._wakers.pop(job_id, None)

    async def _poll(
        self, job_id: str, job_input: model.WdPoStInput, not_after: float | None
    ) -> WindowPoStOutput:
        job: model.JobRecord | None = None
        create = True
        backoff = FIRST_BACKOFF
        swept = False
        # The failed try this wait retried: its number, with what tells it from the same number
        # after an operator's reset (which counts tries from 0 again): the job's CreatedAt, which
        # a reset stamps anew, and the try's lease, which each allocation makes anew.
        retried: tuple[float, int, str | None] | None = None
        # Woken from its backoff since its looks began to fail: once only, so that a job whose
        # looks alone fail (a damaged row) is not looked at each time another's look works.
        cut_short = False
        while True:
            # Taken before the look, so that a wake-up during it is not lost.
            woken = self._wakers.setdefault(job_id, trio.Event())
            due = not_after if job is None else job.not_after
            try:
                # A store that hangs is given up on LATE_LOOK after the job's deadline (the calls
                # return when cancelled): the request is answered then, not when it comes back.
                with trio.move_on_at(self._give_up_at(due)) as bounded:
                    found, wrote = await self._look(job_id, job_input, not_after, create)
                if bounded.cancelled_caught:
                    raise self._no_answer(job_id)
                back = wrote or not self._writes_refused
                if back and (line := self._store_outage.answered(self.clock())) is not None:
                    self._writes_refused = False
                    log.info("%s", line)
                    for waited in list(self._backing_off):  # they look now too
                        self.wake(waited)
                if found is None:  # gone: made again on the next look, its tries from 0
                    create, retried = True, None
                    continue
                job, create = found, False
                self._found.add(job_id)
                if rules.is_done(job, self.limits):
                    return self._answer(job)
                if rules.retryable(job, self.limits) and retried != _try_of(job):
                    # Its tries are counted by this process's JobMaxTry (damocles-manager's
                    # config), as damocles' manager retries the jobs it waits for: a
                    # coordinator with a lower one (another --conf-dir, or none) leaves the job
                    # failed, which would be waited for until its deadline. Only the retry:
                    # no heartbeat timeout by this process's clock and limits.
                    with trio.move_on_at(self._give_up_at(job.not_after)) as bounded:
                        outcome = await self.store.sweep([job_id], heard_since=math.inf)
                    if bounded.cancelled_caught:
                        raise self._no_answer(job_id)
                    # Only once the sweep was made: one the store failed is made again, and
                    # so, after the pause, is one that did nothing: it passed over the row
                    # while another session held it (SKIP LOCKED: a heartbeat or a finish of
                    # the job being stored).
                    if outcome.effects:
                        retried = _try_of(job)
                        if any(isinstance(e, rules.Retried) for e in outcome.effects):
                            log.info("job %s: try %d of JobMaxTry %d failed; given to the"
                                     " workers again", job_id, job.TryNum,
                                     self.limits.max_try, extra=job_fields(job_id))  # fmt: skip
                        continue
                if rules.deadline_passed(job, self.clock()) and not swept:
                    # Cancel it now rather than at a coordinator's next sweep (or never, with
                    # none running): a sweep of this job alone, safe beside the others. Made
                    # again after the pause when it did nothing, as the retry's sweep is.
                    with trio.move_on_at(self._give_up_at(job.not_after)) as bounded:
                        outcome = await self.store.sweep([job_id])
                    if bounded.cancelled_caught:
                        raise self._no_answer(job_id)
                    if outcome.effects:
                        swept = True
                        continue
            except StoreLost as exc:
                # Its file was deleted or replaced: no look will ever find the job again, and
                # a wait would only hold the request until its deadline.
                raise ProverError(f"job {job_id}: not proved: {exc}") from None
            except StoreError as exc:
                if due is not None and self.clock() >= due:
                    raise ProverError(
                        f"job {job_id}: the job store failed until the job's deadline passed: {exc}"
                    ) from None
                if line := self._store_outage.failed(self.clock(), f"job {job_id}: {exc}"):
                    log.warning("%s", line)
                self._writes_refused |= isinstance(exc, StoreTakesNoWrites)
                # Not past the deadline: the last try is at it.
                pause = backoff if due is None else min(backoff, max(0.0, due - self.clock()))
                with self._in_backoff(job_id, wakeable=not cut_short):
                    with trio.move_on_after(pause) as slept:  # or woken
                        await woken.wait()
                cut_short = cut_short or not slept.cancelled_caught
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff, cut_short = FIRST_BACKOFF, False
            pause = self.limits.poll_interval
            now = self.clock()
            if job.not_after is not None and not rules.deadline_passed(job, now):
                pause = min(pause, job.not_after - now)  # the sweep is made at the deadline
            with trio.move_on_after(pause):
                await woken.wait()

    @contextlib.contextmanager
    def _in_backoff(self, job_id: str, *, wakeable: bool) -> Iterator[None]:
        """A request of `job_id` in its backoff, which the store answering another look ends
        when `wakeable`."""
        if not wakeable:
            yield
            return
        self._backing_off[job_id] = self._backing_off.get(job_id, 0) + 1
        try:
            yield
        finally:
            self._backing_off[job_id] -= 1
            if not self._backing_off[job_id]:
                del self._backing_off[job_id]

    async def _look(
        self,
        job_id: str,
        job_input: model.WdPoStInput,
        not_after: float | None,
        create: bool,
    ) -> tuple[model.JobRecord | None, bool]:
        """The job as stored now, made first when `create` (None when it is gone), and whether
        this look wrote (made it)."""
        if create:
            job, made = await self.store.create(job_input, not_after=not_after)
            if made:
                sectors = len(job.Input.Sectors or ())
                log.info("job %s: created (%d sectors)", job_id, sectors, extra=job_fields(job_id))
            else:
                log.info(
                    "job %s: re-attached to the existing job (%s, try %d)",
                    job_id, model.display_state(job), job.TryNum, extra=job_fields(job_id),
                )  # fmt: skip
            return job, made
        stored = await self.store.get(job_id)
        if stored is None:
            # damocles' producer does the same: the request still wants its proof.
            log.warning(
                "job %s was removed from the store while waited for; creating it again",
                job_id,
                extra=job_fields(job_id),
            )
        return stored, False

    def _give_up_at(self, due: float | None) -> float:
        """When (trio's clock) a look at the store begun now is given up on: LATE_LOOK after the
        job's deadline `due` (unix seconds; None: never), or after now once it passed (the
        sweep that cancels the job, the look that finds it cancelled). Not at the deadline
        itself: a job finished just before it, read a little after, is still its proof."""
        if due is None:
            return math.inf
        return trio.current_time() + max(0.0, due - self.clock()) + LATE_LOOK

    def _no_answer(self, job_id: str) -> ProverError:
        return ProverError(
            f"job {job_id}: the job store {self.store.store.where} did not answer by the job's"
            f" deadline, nor {LATE_LOOK:g} s after it (it hangs: its host frozen or the network"
            " stalled?); not proved in time"
        )

    def _answer(self, job: model.JobRecord) -> WindowPoStOutput:
        try:
            return self._output_of(job)
        except ProverError as exc:  # its record in JSON logs names the job and its worker
            exc.job_id, exc.worker = job.Id, job.WorkerName or None
            raise

    def _output_of(self, job: model.JobRecord) -> WindowPoStOutput:
        worker = repr(job.WorkerName) if job.WorkerName else "none"
        if job.succeeded:
            if job.Output is None:
                raise ProverError(
                    f"job {job.Id} finished without an error but with no output (worker"
                    f" {worker}): not a proof; {_again(job.Id, 'reset')}"
                )
            output = WindowPoStOutput(
                proofs=list(job.Output.proofs or ()), faults=list(job.Output.faults or ())
            )
            sectors = (s.SectorId for s in job.Input.Sectors or ())
            if (problem := result_problem(output.proofs, output.faults, sectors)) is not None:
                # A worker's result as our children's are held to: an empty proof would be
                # submitted to the chain, faults not in the job declared.
                raise ProverError(
                    f"job {job.Id} finished without an error but with {problem} (worker"
                    f" {worker}): not a proof; {_again(job.Id, 'reset')}"
                )
            fields = job_fields(job.Id, job.WorkerName or None)
            log.info("job %s: done on worker %s", job.Id, worker, extra=fields)
            return output
        if job.cancelled:  # a reset job keeps its deadline, which has passed: only a new one
            raise ProverError(
                f"job {job.Id} was {job.ErrorReason}; last worker: {worker};"
                f" {_again(job.Id, 'remove')}"
            )
        raise ProverError(
            f"job {job.Id} failed on worker {worker} (try {job.TryNum} of JobMaxTry"
            f" {self.limits.max_try}): {job.ErrorReason}; {_again(job.Id, 'reset')}"
        )


def _again(job_id: str, how: str) -> str:
    """What to do to prove a task whose job answered with an error: the same task is the same
    job (its id is its input's hash), which gives the same answer until it is reset or removed."""
    done = "reset" if how == "reset" else "removed"
    return (
        f"the same task gets this answer until its job is {done}"
        f" (`damocles-ext wdpost {how} --jobs URL {job_id}`)"
    )


async def run_producer(
    stage: str,
    producer: JobProducer,
    protocol_in: int,
    protocol_out: int,
    shutdown_grace: float,
    coordinator: tuple[Coordinator, CoordinatorServer] | None = None,
) -> int:
    """Serve requests of `stage` on the pipes through `producer` (the ready line is out), with the
    coordinator's RPC and its sweeps beside it when given; stops on stdin EOF or a signal."""
    where = producer.store.store.where
    with trio.open_signal_receiver(*stop_signals()) as signals:
        replay_held_signals()  # those that came since the ready line
        receive = trio.lowlevel.FdStream(protocol_in)
        send = trio.lowlevel.FdStream(protocol_out)
        try:
            async with trio.open_nursery() as nursery:
                if coordinator is not None:
                    # On the server's clock before a job is made, given out or heartbeated
                    # here: its sweeps, begun after it serves, were the only reading.
                    await coordinator[0].server_clock.read_server(SERVE_CONNECT_TIMEOUT)
                producer.start_watches(nursery)
                if coordinator is None:  # on the server's clock before a job is made
                    await nursery.start(producer.watch_clock)
                else:
                    rpc, server = coordinator
                    await nursery.start(server.serve)
                    # Not waited for: a store stalled at its first pass held the requests and
                    # the signals unread (the ready line is out), up to a minute a store call.
                    nursery.start_soon(rpc.sweep_forever)
                    log.info("serving the worker-prover RPC at %s", server.url)
                log.info("serving %s through the job store %s (pid %d)", stage, where, os.getpid())
                # JobProducer.submit adds the job id, and that the job stays in the store.
                reasons = StopReasons(
                    reader_gone="damocles-ext serve stopped: its reader is gone",
                    grace_over="damocles-ext serve stopped before the job was done (shutdown"
                    f" grace {shutdown_grace:g} s)",
                    at_once="damocles-ext serve stopped at once (second signal) before the job"
                    " was done",
                    refused="damocles-ext serve is shutting down (signal): no job was"
                    " made for it; send it again to the processor that replaces this one",
                )
                server_done = await serve_draining(
                    stage, producer.submit, producer.in_flight, receive, send, signals,
                    shutdown_grace, reasons, ready_line_sent=True,
                )  # fmt: skip
                if coordinator is not None:
                    # As the coordinator command stops: a worker's call being answered gets its
                    # answer (a finish stored and acknowledged, not cut), nothing new is taken.
                    from .coordinator import STOP_GRACE

                    coordinator[1].stop()
                    with trio.move_on_after(STOP_GRACE):
                        await coordinator[1].stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await receive.aclose()
                await send.aclose()
            if coordinator is not None:
                coordinator[1].close()
    log_stopped(server_done)
    return 0


def _try_of(job: model.JobRecord) -> tuple[float, int, str | None]:
    """What tells a failed try of `job` from another (see `_poll`'s `retried`)."""
    return (job.CreatedAt, job.TryNum, job.lease)
