"""The job store for trio code: `TrioJobStore` runs each blocking call of a `store.JobStore` in
a worker thread under a small limiter, within a timeout, and tells a coordinator's
`silence.Hearing` when the store was unavailable to a call; `watch_stalls` says when a call has
waited SLOW_CALL seconds for it, and when it answers again (`stalls.Stalls`). Importable from
`damocles_ext.jobs.store` as well."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..threads import NoThreadError, run_in_thread
from . import rules
from . import summary as jobs_summary
from .database import (
    DEFAULT_PASS_LIMIT,
    StoreError,
    StoreTakesNoWrites,
    StoreUnavailable,
)
from .model import JobOutput, JobRecord, WdPoStInput
from .silence import Hearing
from .stalls import LOOK_EVERY, Stalls, name_of
from .store_clock import clock_skew

if TYPE_CHECKING:
    from .store import JobStore, Outcome

R = TypeVar("R")


#: How long a call of TrioJobStore waits for the database (beyond SQLite's busy timeout).
DEFAULT_CALL_TIMEOUT = 60.0

#: What the store calls of this task are made for (an RPC method, "the sweep"), for the warning of
#: a call that waits on a stalled store (`TrioJobStore.watch_stalls`); "": not said.
calling: ContextVar[str] = ContextVar("damocles_ext_store_calling", default="")

log = logging.getLogger("damocles_ext.jobs")

#: Seconds a reading of the server's clock (one tiny query) is waited for: a stalled database
#: holds a sweep no longer than that before it goes on, on the last reading.
READ_CLOCK_TIMEOUT = 3.0

#: A reading of the server's clock whose round trip took longer (seconds) is not kept when one is
#: known: it may be off by half of that (a retransmitted packet, a server starved of CPU).
SLOW_READING = 0.5


def boot_clock() -> float:
    """Seconds since boot, counting the time suspended (Linux's CLOCK_BOOTTIME; a system call,
    safe from any thread); time.monotonic where there is none (it stops while suspended)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


if not hasattr(time, "CLOCK_BOOTTIME"):  # not Linux
    boot_clock = time.monotonic


class TrioJobStore:
    """The store for trio code: each call runs in a worker thread under a small limiter, with
    `now` read from `clock`: `local_clock` (this machine's wall clock, unix seconds, by default)
    until the PostgreSQL server's clock is read (`read_server_clock`: a coordinator's sweeps, a
    producer's watch), then the server's clock as read, advanced by `steady` (a clock that only
    moves forward): every coordinator and producer on one store stamps, sweeps and gives
    deadlines on one clock, and a step of this machine's wall clock (NTP) moves none of them.

    A call no thread can be started for (at the limit of tasks), that gets no answer within
    `call_timeout` seconds (a database that hangs rather than refuses: its host frozen, the
    network stalled) or waits that long for the limiter raises StoreUnavailable; a cancelled
    call (a deadline, a shutdown) returns at once. Its thread is left to finish or fail on its
    own, holding its limiter slot until then, so a stuck database holds a few threads, never the
    caller. Every write is guarded (see the module's docstring), so one that lands after it was
    given up on breaks no rule; but it may still land: an allocation then leaves a job running
    on a worker that never heard of it, taken back after HeartbeatTimeout at the cost of a try
    (as when a worker's own call times out); a late heartbeat moves HeartbeatAt back only from
    a stamp over rules.STAMP_AHEAD_MAX ahead of its own (one made before the clock stepped back)."""

    def __init__(self, store: JobStore, *, threads: int = 4,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = trio.current_time,
                 steady: Callable[[], float] | None = None,
                 call_timeout: float = DEFAULT_CALL_TIMEOUT) -> None:  # fmt: skip
        self.store = store
        self.local_clock = clock
        #: What the store's clock advances by between readings of the server's: `boot_clock`
        #: (read from worker threads too: the metrics' collection), which counts a suspend of
        #: this machine as time.monotonic does not, or a test's `clock`.
        self.steady = steady or (boot_clock if clock is time.time else clock)
        #: The PostgreSQL server's clock minus `steady`, as last read (None: unread, SQLite),
        #: and that reading's round trip (its error is up to half of it).
        self.server_offset: float | None = None
        self._offset_round_trip = 0.0
        #: The store's clock, the `now` of every call (a test may set its own in its place).
        self.clock: Callable[[], float] = self._clock
        self.monotonic = monotonic  # how long a call took (a step of `clock` is not a slow call)
        self.call_timeout = call_timeout
        self._limiter = trio.CapacityLimiter(threads)
        #: Told when the store is unavailable to a call, answers again, or answers slowly (a
        #: coordinator's sweeps count a job's silence by it); None: nothing is told.
        self.hearing: Hearing | None = None
        #: The calls in flight, and the stall said of them (`watch_stalls`).
        self.stalls = Stalls(store.where)

    def _clock(self) -> float:
        if self.server_offset is None:
            return self.local_clock()
        return self.steady() + self.server_offset

    async def read_server_clock(self) -> float | None:
        """Read the PostgreSQL server's clock and keep to it (`clock`): the seconds that moved
        the store's clock; 0.0 when the reading is within its error of the last one (half of
        both round trips, and OFFSET_TOLERANCE at least), or is not kept: a reading slower than
        SLOW_READING when one is known (said at debug level). None on SQLite (one machine: its
        clock is kept). Waited for READ_CLOCK_TIMEOUT seconds at most, tracked as a call of the
        store (shorter than SLOW_CALL: the stall warning comes from the sweep's calls); raises what the reading raised, StoreUnavailable when it timed
        out: the last reading holds."""
        if not self.store.is_postgresql:
            return None
        token = self.stalls.begin(self.monotonic(), calling.get(), clock_skew)
        try:
            reading = await self._in_thread(
                functools.partial(clock_skew, self.store.engine, self.steady), READ_CLOCK_TIMEOUT
            )
        finally:
            self.stalls.end(token)
        self.stalls.answered_at = self.monotonic()
        if reading is None:
            return None
        known = self.server_offset
        if known is not None:
            if reading.round_trip > SLOW_READING:
                log.debug("a reading of the clock of the store %s took %.3f s (over %g s): not"
                          " kept, the last one holds", self.store.where, reading.round_trip,
                          SLOW_READING)  # fmt: skip
                return 0.0
            error = (reading.round_trip + self._offset_round_trip) / 2
            if abs(-reading.skew - known) < max(OFFSET_TOLERANCE, error):
                return 0.0
        before = self._clock()
        self.server_offset = -reading.skew
        self._offset_round_trip = reading.round_trip
        return self._clock() - before

    def wall_skew(self) -> float:
        """Seconds this machine's wall clock is ahead of the store's (negative: behind)."""
        return self.local_clock() - self._clock()

    async def _run(self, fn: Callable[..., R], *args: Any,
                   wrote: Callable[[R], bool] = lambda _: True, **kwargs: Any) -> R:  # fmt: skip
        """`fn(*args, **kwargs)` in a thread, told to the hearing; `wrote(result)`: whether the
        call's answer shows a write landed (a read's does not: a full disk still answers it)."""
        started, began = self.clock(), self.monotonic()
        token = self.stalls.begin(began, calling.get(), fn)
        try:
            result = await self.in_thread(fn, *args, **kwargs)
        except StoreUnavailable as exc:
            if self.hearing is not None:
                refused = isinstance(exc, StoreTakesNoWrites)
                self.hearing.call_failed(started, write_refused=refused)
            raise
        except StoreError:  # answered, with a refusal or an error of the statement
            self._answered(started, began, wrote=False)
            raise
        finally:
            self.stalls.end(token)
        self._answered(started, began, wrote=wrote(result))
        return result

    def _answered(self, started: float, began: float, *, wrote: bool) -> None:
        ended = self.stalls.answered_at = self.monotonic()
        if self.hearing is not None:
            self.hearing.call_answered(started, self.clock(), ended - began, wrote=wrote)

    async def watch_stalls(self, logger: logging.Logger, every: float = LOOK_EVERY) -> None:
        """Until cancelled, every `every` seconds: a warning when a call has waited SLOW_CALL
        seconds for the store (once per stall), a line when the store answers again."""
        while True:
            await trio.sleep(every)
            said = self.stalls.look(self.monotonic())
            if said is not None:
                logger.log(logging.WARNING if said[0] else logging.INFO, "%s", said[1])

    async def in_thread(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """`fn(*args, **kwargs)` in a worker thread of the store's, within call_timeout."""
        return await self._in_thread(functools.partial(fn, *args, **kwargs), self.call_timeout)

    async def _in_thread(self, call: Callable[[], R], within: float) -> R:
        with trio.move_on_after(within):
            try:
                return await run_in_thread(call, limiter=self._limiter, abandon_on_cancel=True)
            except NoThreadError as exc:  # the store was not asked
                raise StoreUnavailable(f"job store {self.store.where}: {exc}") from None
        raise StoreUnavailable(
            f"job store {self.store.where}: no answer to {name_of(call)} within {within:g}"
            " s; the database hangs (its host frozen or the network stalled?): check it; the call"
            " is not waited for"
        )

    async def create(self, job_input: WdPoStInput, **kwargs: Any) -> tuple[JobRecord, bool]:
        return await self._run(
            self.store.create, job_input, self.clock(), wrote=lambda r: r[1], **kwargs
        )

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._run(self.store.get, job_id, wrote=_read)

    async def get_many(self, job_ids: Iterable[str]) -> dict[str, JobRecord]:
        return await self._run(self.store.get_many, list(job_ids), wrote=_read)

    async def list_jobs(self) -> list[JobRecord]:
        return await self._run(self.store.list_jobs, wrote=_read)

    async def allocate(self, spec: rules.AllocationSpec, n: int, worker: str, *,
                       sent_back: bool = False) -> list[JobRecord]:  # fmt: skip
        allocate = functools.partial(self.store.allocate, sent_back=sent_back)
        return await self._run(allocate, spec, n, worker, self.clock(), wrote=bool)

    async def heartbeat(self, job_ids: Sequence[str], worker: str, **kwargs: Any) -> Outcome:
        return await self._run(
            self.store.heartbeat, list(job_ids), worker, self.clock(), wrote=_stored, **kwargs
        )

    async def finish(self, job_id: str, output: JobOutput | None, error_reason: str,
                     **kwargs: Any) -> Outcome:  # fmt: skip
        return await self._run(
            self.store.finish, job_id, output, error_reason, self.clock(), wrote=_stored, **kwargs
        )

    async def reset(self, job_id: str) -> JobRecord:
        return await self._run(self.store.reset, job_id, self.clock())

    async def remove(self, job_id: str) -> bool:
        return await self._run(self.store.remove, job_id, self.clock(), wrote=bool)

    async def worker_seen(self, worker: str, paused: tuple[int, int] | None = None) -> None:
        await self._run(self.store.worker_seen, worker, self.clock(), paused, wrote=_read)

    async def summary(self, **kwargs: Any) -> jobs_summary.JobsSummary:
        return await self._run(self.store.summary, self.clock(), wrote=_read, **kwargs)

    async def sweep(
        self,
        job_ids: Sequence[str] | None = None,
        *,
        heard_since: float = 0.0,
        silent_before: float | None = None,
        probe_write: bool = False,
    ) -> Outcome:
        return await self._run(
            self.store.sweep,
            self.clock(),
            job_ids=job_ids,
            heard_since=heard_since,
            silent_before=silent_before,
            probe_write=probe_write,
            wrote=lambda outcome: probe_write or _stored(outcome),
        )

    async def cleanup(self, limit: int = DEFAULT_PASS_LIMIT) -> Outcome:
        return await self._run(self.store.cleanup, self.clock(), limit=limit, wrote=_stored)


def _read(_result: object) -> bool:
    """A call that writes nothing, or may not (a worker seen within TOUCH_EVERY is not)."""
    return False


def _stored(outcome: Outcome) -> bool:
    """Whether a write stored a row (a heartbeat, a finish, a sweep that changed a job): a
    refused or repeated one writes none, and a full disk answers it all the same."""
    return outcome.wrote


# Coordinators and producers on one PostgreSQL keep to the server's clock (read at each sweep, or
# each poll), but workers read the deadlines on theirs (on their coordinator's, once answered),
# and an operator's own times: a machine whose clock is this far from the server's is warned.
CLOCK_SKEW = 2.0
#: Seconds by which the server's clock, read again, may move against `steady` and be left as it
#: was: the reading's own jitter (half a round trip) is no step of the store's clock.
OFFSET_TOLERANCE = 0.25


class SkewNotice:
    """Says how far this machine's clock is from the store's PostgreSQL server's, read again and
    again (at each sweep, each poll): a warning saying `effect` when they are CLOCK_SKEW or more
    apart, again only when that changes by CLOCK_SKEW or more; one line when they agree again."""

    def __init__(self, logger: logging.Logger, effect: str) -> None:
        self.logger = logger
        self.effect = effect
        #: Seconds this machine's clock was ahead of the server's when last warned of (None: in
        #: step since, unread, or SQLite).
        self.skew: float | None = None

    def read(self, skew: float, where: str) -> None:
        """This machine's clock is `skew` s ahead of the server's (of the store at `where`)."""
        way = "ahead of" if skew > 0 else "behind"
        if abs(skew) >= CLOCK_SKEW:
            if self.skew is None or abs(skew - self.skew) >= CLOCK_SKEW:
                self.logger.warning(
                    "this machine's clock is %.1f s %s the clock of the job store's PostgreSQL"
                    " server (%s): %s; set this machine's clock right all the same (NTP:"
                    " `timedatectl`, `chronyc tracking`)",
                    abs(skew), way, where, self.effect,
                )  # fmt: skip
                self.skew = skew
            return
        if self.skew is not None:
            self.logger.info("this machine's clock agrees with the job store's server again")
        self.skew = None
