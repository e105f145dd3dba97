"""A coordinator's clock: the one its store calls stamp heartbeats and sweep with.

On PostgreSQL, every coordinator on the store keeps to the server's clock: it reads the server's
clock before each sweep pass (`TrioJobStore.read_server_clock`), and between readings advances
it by this machine's monotonic clock, never by its wall clock. Coordinators whose machines'
clocks disagree, or whose machine's clock NTP steps, still stamp and sweep on one clock: each
stamped heartbeats with its own wall clock, and one 40 s behind another had every job it gave
out taken back by the other's sweep within seconds, its workers heartbeating all along; one
whose clock stepped back 300 s stamped the next heartbeat 300 s back, and its next sweep took
the job back. SQLite is one machine: its clock is kept.

Its sweeps see a step of the store's clock (this machine's wall clock stepped, on SQLite; the
server's clock moved at a reading, or this machine was suspended, on PostgreSQL) by comparing it
with a clock that only moves forward (and stops while suspended), and count the step in the
`Hearing`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..jobs.silence import SLOW_CALL, Hearing
from ..jobs.trio_store import OFFSET_TOLERANCE, SkewNotice, TrioJobStore

log = logging.getLogger("damocles_ext.coordinator")

# Seconds the store's clock may gain on the monotonic clock between two sweeps before it counts
# as a step (NTP setting it, a suspended machine resuming): heartbeats are stamped with it.
CLOCK_STEP = 5.0

_KEEPS_TO_IT = (
    "this coordinator keeps to the server's clock, as every coordinator on the store does (it"
    " stamps heartbeats and sweeps on it), so no job is taken back early for it"
)
_UNREAD = (
    "this coordinator stamps heartbeats and sweeps on this machine's clock, which may be off the"
    " server's, which the other coordinators keep to: a job heartbeated through them may be taken"
    " back early, a silent one late; it is read again at each sweep, and a line says when that"
    " works"
)
_UNANSWERED = (
    "the job store's PostgreSQL server (%s) did not answer within %g s when its clock was read:"
    " this process serves on a clock that may be off the server's, which the other coordinators"
    " keep to, until a sweep reads it (at each one until that works; a line says when)"
)


class ServerClockReader:
    """Readings of a job store's PostgreSQL server's clock (`TrioJobStore.read_server_clock`),
    which keep the store on it, for a coordinator's sweeps (`ServerClock`) and a producer's polls
    alike: a failed one is warned of once while the store is on this machine's clock (no reading
    worked yet), else said at DEBUG (the last reading holds); the first to work after a warning
    is said. `notice` says this machine's clock when it is CLOCK_SKEW or more off the server's."""

    def __init__(self, store: TrioJobStore, logger: logging.Logger, who: str, *,
                 keeps_to_it: str, unread: str, unanswered: str | None = None) -> None:  # fmt: skip
        self.store = store
        self.notice = SkewNotice(logger, keeps_to_it)
        self._log = logger
        self._who = who  # "coordinator", "producer"
        self._unread = unread  # what the store's clock is meanwhile, after "cannot read ...: why; "
        self._unanswered = unanswered  # its own warning of a first reading unanswered in time
        self._warned = False

    async def read(self, within: float | None = None) -> float | None:
        """The server's clock's move since the last reading (s), or None: SQLite, or the reading
        failed (said), or it was not answered `within` s."""
        if within is None:
            return await self._read()
        with trio.move_on_after(within) as waited:
            return await self._read()
        assert waited.cancelled_caught
        if self._unanswered is None:
            self._failed(f"no answer within {within:g} s")
        else:
            self._warned = True
            self._log.warning(self._unanswered, self.store.store.where, within)
        return None

    async def _read(self) -> float | None:
        try:
            moved = await self.store.read_server_clock()
        except Exception as exc:  # noqa: BLE001 (a reading: never a reason to stop serving)
            self._failed(str(exc))
            return None
        if moved is not None and self._warned:
            self._warned = False
            self._log.info("the clock of the job store's server is read again: this %s keeps"
                           " to it", self._who)  # fmt: skip
        return moved

    def _failed(self, why: str) -> None:
        where = self.store.store.where
        if self._warned or self.store.server_offset is not None:
            self._log.debug("cannot read the clock of the store %s: %s", where, why)
            return
        self._warned = True
        self._log.warning("cannot read the clock of the job store's PostgreSQL server (%s): %s;"
                          " %s", where, why, self._unread)  # fmt: skip


class ServerClock:
    """Keeps its store's clock on the PostgreSQL server's (`read_server`) and tells `hearing`
    of the steps of the store's clock (`watch`)."""

    def __init__(self, store: TrioJobStore, hearing: Hearing,
                 monotonic: Callable[[], float], watch_clocks: bool = True) -> None:  # fmt: skip
        self.store = store
        self.hearing = hearing
        self._monotonic = monotonic
        self._watch_clocks = watch_clocks
        self.reading = ServerClockReader(store, log, "coordinator", keeps_to_it=_KEEPS_TO_IT,
                                    unread=_UNREAD, unanswered=_UNANSWERED)  # fmt: skip
        # Seconds the store's clock moved at the readings since the last `watch`: a step.
        self._moved = 0.0
        # Whether the store's clock followed this machine's wall clock since the last `watch`
        # (unread, or SQLite): then a step of the wall clock is one of the store's.
        self._on_wall = True

    async def read_server(self, within: float | None = None) -> None:
        """Read the server's clock and keep to it (before each sweep pass): a move of it
        against this machine's monotonic clock (NTP on its host, or this machine suspended)
        is said and counted as a step (`watch`), and this machine's wall clock is said when it
        is CLOCK_SKEW or more off it (`SkewNotice`). Never raises: a failed reading is tried
        again at the next pass; warned of once while the store is on this machine's clock (no
        reading yet), else the last reading holds. Without `watch_clocks` (a test's clock,
        which jumps, stands for the server's too), it is not read. `within`: waited for that
        long at most (serve --listen reads it before it serves, its requests and signals unread
        meanwhile): a server that does not answer by then is said, and read at each sweep."""
        store = self.store
        if not self._watch_clocks:
            return
        first = store.server_offset is None
        moved = await self.reading.read(within)
        if moved is None:  # SQLite, or not read
            return
        self._moved += moved
        if not first and abs(moved) >= OFFSET_TOLERANCE:
            way = "forward" if moved > 0 else "back"
            log.log(
                logging.WARNING if abs(moved) > CLOCK_STEP else logging.INFO,
                "the clock of the job store's PostgreSQL server (%s) moved %s by %.1f s against"
                " this machine's monotonic clock since it was last read (NTP set it, or this"
                " machine was suspended?): this coordinator keeps to it, as every coordinator on"
                " the store does at its next sweep; no running job is taken back for the step",
                store.store.where, way, abs(moved),
            )  # fmt: skip
        skew = store.wall_skew()
        if first and abs(skew) < OFFSET_TOLERANCE:
            log.debug("keeping to the job store's server's clock (this one is %.3f s %s it)",
                      abs(skew), "ahead of" if skew > 0 else "behind")  # fmt: skip
        self.reading.notice.read(skew, store.store.where)

    def watch(
        self, last: tuple[float, float, float] | None, every: float, paused_at: float | None = None
    ) -> tuple[float, float, float]:
        """A store's clock that stepped forward since the last pass (`last`: when it began, on
        the monotonic clock, this machine's wall clock and the store's) would make every running
        job look silent for the step, and so would a stretch in which this process did not run
        (SIGSTOP, a paused VM, swapping): the heartbeats sent then wait unread, and this pass
        comes first. Either stretch counts as unheard. The latter is measured over the pause of
        `every` seconds since `paused_at` (the last pass's end): time the pass spent waiting for
        the store is the store's (`Hearing` counts it). The step is what the store's clock gained
        on the monotonic clock: the server's moved at a reading, or this machine was suspended
        (the store's clock counts it, the monotonic clock does not), or, while it follows this
        machine's (SQLite, or no reading yet), this machine's stepped."""
        on_wall, self._on_wall = self._on_wall, self.store.server_offset is None
        now = (self._monotonic(), self.store.local_clock(), self.store.clock())
        moved, self._moved = self._moved, 0.0
        # Before the first pass: the readings moved the clock the hearing began on.
        step, wall, late = moved, 0.0, 0.0
        if last is not None and self._watch_clocks:
            step = (now[2] - last[2]) - (now[0] - last[0])
            wall = (now[1] - last[1]) - (now[0] - last[0])
            late = (now[0] - (last[0] if paused_at is None else paused_at)) - every
        # A move of the server's clock was said as it was read (read_server): the rest of the
        # step is said here, a step of this machine's wall clock the store's does not follow too.
        own = step - moved
        said = on_wall and abs(own) > CLOCK_STEP  # the wall clock's step, the store's too
        suspended = not on_wall and own > CLOCK_STEP
        if not on_wall and abs(wall - own) > CLOCK_STEP:
            log.info(
                "the wall clock stepped %s by %.0f s since the last sweep: this coordinator"
                " keeps to the job store's server's clock, which does not follow it, so no job"
                " is affected",
                "forward" if wall > own else "back", abs(wall - own),
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
            what = ""
            if said:
                why = "set by NTP, or the machine was suspended?"
                what = f"the wall clock stepped forward by {step:.0f} s ({why})"
            elif suspended:
                what = (f"this machine was suspended for {own:.0f} s (its boot clock, which the"
                        " store's clock follows between readings of the server's, counted it)")  # fmt: skip
            self._unheard(step, what)
        return now

    def _unheard(self, seconds: float, what: str) -> None:
        """The last `seconds` could not be heard; `what` made it so, said ("": said already)."""
        if what:
            log.warning("%s: no running job is taken back for that time", what)
        now = self.store.clock()
        self.hearing.deaf(now - seconds, now)
