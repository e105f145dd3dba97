"""A coordinator's clock: the one its store calls stamp heartbeats and sweep with.

On PostgreSQL, every coordinator on the store keeps to the server's clock: it reads the server's
clock as it starts, then every SKEW_CHECK_EVERY s (and at once after this machine's clock
stepped: such a reading, as the first, is tried again at each sweep until one works), and sets
its store's `offset` to the server's minus this machine's. Coordinators whose machines' clocks
disagree then still stamp and sweep on one clock: each stamped heartbeats with its own, and one
40 s behind another had every job it gave out taken back by the other's sweep within seconds,
its workers heartbeating all along. SQLite is one machine: its clock is kept.

Its sweeps see a step of the store's clock (this machine's stepped, or the offset changed) by
comparing it with a clock that only moves forward, and count the step in the `Hearing`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from ..jobs.database import clock_skew
from ..jobs.silence import SLOW_CALL, Hearing
from ..jobs.trio_store import CLOCK_SKEW, SKEW_CHECK_EVERY, TrioJobStore

log = logging.getLogger("damocles_ext.coordinator")

# Seconds the wall clock may gain on the monotonic clock between two sweeps before it counts as
# a step (NTP setting it, a suspended machine resuming): heartbeats are stamped with wall time.
CLOCK_STEP = 5.0
#: Seconds by which the server's clock, read again, may move against this machine's and be left
#: as it was: the reading's own jitter (half a round trip) is no step of the store's clock.
OFFSET_TOLERANCE = 0.25


class ServerClock:
    """Keeps `store.offset` on the PostgreSQL server's clock (`read_server`) and tells `hearing`
    of the steps of the store's clock (`watch`)."""

    def __init__(self, store: TrioJobStore, hearing: Hearing,
                 monotonic: Callable[[], float], watch_clocks: bool = True) -> None:  # fmt: skip
        self.store = store
        self.hearing = hearing
        self._monotonic = monotonic
        self._watch_clocks = watch_clocks
        #: Seconds this machine's clock ran ahead of the PostgreSQL server's at the last reading,
        #: when that was CLOCK_SKEW or more (None: in step, unread, or SQLite).
        self.skew: float | None = None
        #: When (trio's clock) the server's clock is read next: at once until it was read.
        self.next_read = -math.inf
        self._read = False
        # A reading is wanted (the first, or one after this machine's clock stepped): tried
        # again at each pass until one works, not SKEW_CHECK_EVERY s later; and whether its
        # failure was warned of (once while they fail).
        self._wanted = True
        self._warned = False
        # The offset the hearing's times were read with: a change of it is a step of the clock.
        self._heard_offset = store.offset

    def read_at_once(self) -> None:
        """This machine's clock stepped: the server's is read at the next pass, and at each
        one after until a reading works (a passing failure left this coordinator stamping and
        sweeping the step off the server's clock for SKEW_CHECK_EVERY s: once the step's
        HeartbeatTimeout of protection was over, it took back live jobs heartbeated through
        other coordinators)."""
        self._wanted = True
        self.next_read = -math.inf

    async def read_server(self) -> None:
        """Read the server's clock and keep to it: `store.offset` set when it moved by
        OFFSET_TOLERANCE or more, said when this machine's is CLOCK_SKEW or more off it, when
        that changes much and when they agree again. Never raises (a failed reading that was
        wanted, the first or one after a step, is tried again at each sweep until one works,
        and warned of once; another, SKEW_CHECK_EVERY s later)."""
        store = self.store
        if not store.store.is_postgresql:
            self.next_read = math.inf
            return
        try:
            skew = await store.in_thread(clock_skew, store.store.engine, store.local_clock)
        except Exception as exc:  # noqa: BLE001 (a reading: never a reason for a sweep to stop)
            self._failed(exc)
            return
        self.next_read = trio.current_time() + SKEW_CHECK_EVERY
        self._wanted = False
        if self._warned:
            self._warned = False
            log.info("the clock of the job store's server is read again: this coordinator"
                     " keeps to it")  # fmt: skip
        if skew is None:
            return
        first, self._read = not self._read, True
        change = -skew - store.offset
        if not first and abs(change) < OFFSET_TOLERANCE:
            return
        store.offset = -skew
        way = "ahead of" if skew > 0 else "behind"
        if abs(skew) >= CLOCK_SKEW:
            if first or self.skew is None or abs(change) >= CLOCK_SKEW:
                log.warning(
                    "this machine's clock is %.1f s %s the clock of the job store's PostgreSQL"
                    " server (%s): this coordinator keeps to the server's clock, as every"
                    " coordinator on the store does (it stamps heartbeats and sweeps on it), so"
                    " no job is taken back early for it; set this machine's clock right all the"
                    " same, for the workers and producers that read it (NTP: `timedatectl`,"
                    " `chronyc tracking`)",
                    abs(skew), way, store.store.where,
                )  # fmt: skip
            else:
                log.info(
                    "this machine's clock is now %.1f s %s the job store's server's: this"
                    " coordinator keeps to the server's",
                    abs(skew), way,
                )  # fmt: skip
            self.skew = skew
            return
        if self.skew is not None:
            log.info("this machine's clock agrees with the job store's server again")
        elif not first:
            log.info(
                "the job store's server's clock moved %.1f s against this machine's: this"
                " coordinator keeps to the server's",
                change,
            )
        else:
            log.debug("keeping to the job store's server's clock (this one is %.3f s %s it)",
                      abs(skew), way)  # fmt: skip
        self.skew = None

    async def read_before_serving(self, within: float) -> None:
        """`read_server`, waited for `within` s at most (serve --listen reads it before it
        serves, its requests and signals unread meanwhile): a server that does not answer by
        then is said, and read at each sweep until a reading works."""
        with trio.move_on_after(within) as waited:
            await self.read_server()
        if waited.cancelled_caught:
            self._warned = True
            log.warning(
                "the job store's PostgreSQL server (%s) did not answer within %g s when its"
                " clock was read: this process serves on a clock that may be off the server's,"
                " which the other coordinators keep to, until a sweep reads it (at each one"
                " until that works; a line says when)",
                self.store.store.where, within,
            )  # fmt: skip

    def _failed(self, exc: Exception) -> None:
        """A reading failed: tried again at the next pass when it was wanted (this coordinator
        stamps on a clock that may be off the server's until one works: said once), else
        SKEW_CHECK_EVERY s later (the offset read before still holds)."""
        where = self.store.store.where
        if not self._wanted:
            log.debug("cannot read the clock of the store %s: %s", where, exc)
            self.next_read = trio.current_time() + SKEW_CHECK_EVERY
            return
        self.next_read = -math.inf
        if self._warned:
            log.debug("cannot read the clock of the store %s yet: %s", where, exc)
            return
        self._warned = True
        why = (
            "this machine's clock stepped since the last reading"
            if self._read
            else "it was never read"
        )
        log.warning(
            "cannot read the clock of the job store's PostgreSQL server (%s): %s; this"
            " coordinator stamps heartbeats and sweeps on a clock that may be off the server's,"
            " which the other coordinators keep to (%s): a job heartbeated through them may be"
            " taken back early, a silent one late; it is read again at each sweep, and a line"
            " says when that works",
            where, exc, why,
        )  # fmt: skip

    def stepped(self, last: tuple[float, float] | None) -> bool:
        """Whether this machine's wall clock stepped since `last` (as `watch` returned it)."""
        if last is None or not self._watch_clocks:
            return False
        step = (self._wall() - last[1]) - (self._monotonic() - last[0])
        return abs(step) > CLOCK_STEP

    def watch(
        self, last: tuple[float, float] | None, every: float, paused_at: float | None = None
    ) -> tuple[float, float]:
        """A store's clock that stepped forward since the last pass (`last`: when it began, on
        the monotonic and this machine's wall clock) would make every running job look silent
        for the step, and so would a stretch in which this process did not run (SIGSTOP, a
        paused VM, swapping): the heartbeats sent then wait unread, and this pass comes first.
        Either stretch counts as unheard. The latter is measured over the pause of `every`
        seconds since `paused_at` (the last pass's end): time the pass spent waiting for the
        store is the store's (`Hearing` counts it). The store's clock steps when this
        machine's does, or when its offset to the server's changes."""
        now = (self._monotonic(), self._wall())
        moved, self._heard_offset = self.store.offset - self._heard_offset, self.store.offset
        wall = late = 0.0
        if last is not None and self._watch_clocks:
            wall = (now[1] - last[1]) - (now[0] - last[0])
            late = (now[0] - (last[0] if paused_at is None else paused_at)) - every
        step = wall + moved
        # A change of the offset was said as it was read (read_server): only this machine's
        # step is said here.
        said = abs(wall) > CLOCK_STEP
        if said and abs(step) <= CLOCK_STEP:
            log.info(
                "the wall clock stepped %s by %.0f s since the last sweep: this coordinator"
                " keeps to the job store's server's clock, read again, so no job is affected",
                "forward" if wall > 0 else "back", abs(wall),
            )  # fmt: skip
        if step < -CLOCK_STEP:
            if said:
                log.warning(
                    "the wall clock stepped back by %.0f s since the last sweep: a job whose"
                    " worker falls silent before its next heartbeat is taken back up to that"
                    " much late (its last heartbeat was stamped on the clock before the step;"
                    " the next one replaces that stamp)",
                    -step,
                )
            # First: what is marked below is on the clock after the step already.
            self.hearing.stepped_back(-step)
        if late > SLOW_CALL:
            why = "the machine paused or overloaded?"
            self._unheard(late, f"this coordinator did not run for {late:.0f} s ({why})")
        if step > CLOCK_STEP:
            why = "set by NTP, or the machine was suspended?"
            what = f"the wall clock stepped forward by {step:.0f} s ({why})" if said else ""
            self._unheard(step, what)
        return now

    def _wall(self) -> float:
        """This machine's clock: the store's without its offset (a test may set the store's)."""
        return self.store.clock() - self.store.offset

    def _unheard(self, seconds: float, what: str) -> None:
        """The last `seconds` could not be heard; `what` made it so, said ("": said already)."""
        if what:
            log.warning("%s: no running job is taken back for that time", what)
        now = self.store.clock()
        self.hearing.deaf(now - seconds, now)
