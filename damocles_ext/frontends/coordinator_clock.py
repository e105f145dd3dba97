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


class ServerClock:
    """Keeps its store's clock on the PostgreSQL server's (`read_server`) and tells `hearing`
    of the steps of the store's clock (`watch`)."""

    def __init__(self, store: TrioJobStore, hearing: Hearing,
                 monotonic: Callable[[], float], watch_clocks: bool = True) -> None:  # fmt: skip
        self.store = store
        self.hearing = hearing
        self._monotonic = monotonic
        self._watch_clocks = watch_clocks
        self._notice = SkewNotice(log, _KEEPS_TO_IT)
        self._read = False  # a reading worked
        self._warned = False  # a failed reading was warned of (once while they fail)
        # Seconds the store's clock moved at the readings since the last `watch`: a step.
        self._moved = 0.0
        # Whether the store's clock followed this machine's wall clock since the last `watch`
        # (unread, or SQLite): then a step of the wall clock is one of the store's.
        self._on_wall = True

    @property
    def skew(self) -> float | None:
        """Seconds this machine's clock is ahead of the server's, when CLOCK_SKEW or more at
        the last warning (None: in step since, unread, or SQLite)."""
        return self._notice.skew

    async def read_server(self) -> None:
        """Read the server's clock and keep to it (before each sweep pass): a move of it
        against this machine's monotonic clock (NTP on its host, or this machine suspended)
        is said and counted as a step (`watch`), and this machine's wall clock is said when it
        is CLOCK_SKEW or more off it (`SkewNotice`). Never raises: a failed reading is tried
        again at the next pass; warned of once while the store is on this machine's clock (no
        reading yet), else the last reading holds. Without `watch_clocks` (a test's clock,
        which jumps, stands for the server's too), it is not read."""
        store = self.store
        if not self._watch_clocks:
            return
        try:
            moved = await store.read_server_clock()
        except Exception as exc:  # noqa: BLE001 (a reading: never a reason for a sweep to stop)
            self._failed(exc)
            return
        if moved is None:  # SQLite
            return
        first, self._read = not self._read, True
        if self._warned:
            self._warned = False
            log.info("the clock of the job store's server is read again: this coordinator"
                     " keeps to it")  # fmt: skip
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
        self._notice.read(skew, store.store.where)

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
        """A reading failed: tried again at the next pass. Before any worked, this coordinator
        stamps on this machine's clock, which may be off the server's (said once); after, on
        the last reading, advanced by the monotonic clock."""
        where = self.store.store.where
        if self._read or self._warned:
            log.debug("cannot read the clock of the store %s: %s", where, exc)
            return
        self._warned = True
        log.warning(
            "cannot read the clock of the job store's PostgreSQL server (%s): %s; this"
            " coordinator stamps heartbeats and sweeps on this machine's clock, which may be off"
            " the server's, which the other coordinators keep to: a job heartbeated through them"
            " may be taken back early, a silent one late; it is read again at each sweep, and a"
            " line says when that works",
            where, exc,
        )  # fmt: skip

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
