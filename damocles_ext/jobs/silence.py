"""When a running job counts as silent, for a coordinator's sweeps (sans-IO: times passed in).

A worker's heartbeat reaches the store through a coordinator, stamped with its wall clock. A job
is taken back once its worker was silent for HeartbeatTimeout; but a heartbeat cannot land while
the coordinator is not serving yet, while its store is unavailable to it (refused or not
answering), nor in the wall-clock time a step of the clock skipped. `Hearing` keeps those
stretches of wall time and counts only the rest: a job is silent when the time it could have
been heard since its last heartbeat reaches the timeout (`silent_before`). A store that fails
now and then delays a dead worker's job by the failures' length only; an outage longer than the
timeout costs no job a try. A store that refuses writes (its disk full) still answers reads: a
heartbeat cannot land until a write does, so such an outage ends at the first write answered.
"""

from __future__ import annotations

import math

#: Stretches kept (merged, oldest dropped first): far more than a timeout's walk needs.
MAX_STRETCHES = 1000
#: Seconds of wall time a store call may take before what it waited through counts as unheard:
#: a heartbeat sent then waited too, and was stamped with the time it began.
SLOW_CALL = 5.0


class Hearing:
    """The wall-clock stretches in which a coordinator could not hear heartbeats."""

    def __init__(self, since: float) -> None:
        #: Nothing was heard before this (the coordinator started serving).
        self.since = since
        self._deaf: list[tuple[float, float]] = []  # (start, end), sorted, not overlapping
        self._down_since: float | None = None  # the store unavailable since, until answered
        #: The outage began with (or met) a write refused: only an answered write ends it.
        self.writes_down = False

    def call_failed(self, started: float, *, write_refused: bool = False) -> None:
        """A call begun at `started` found the store unavailable (refused, or no answer);
        `write_refused`: it refused a write (a full disk) and may answer reads meanwhile."""
        if self._down_since is None or started < self._down_since:
            self._down_since = started
        self.writes_down = self.writes_down or write_refused

    def call_answered(
        self, started: float, ended: float, took: float | None = None, *, wrote: bool = True
    ) -> None:
        """A call begun at `started` was answered at `ended`: the store was available again by
        then, unless writes were refused and this call `wrote` nothing (a read); a slow answer
        (a stalled store) was unheard time. `took`: how long it took on a clock that does not
        step (a step of the wall clock is not a slow call; the clock's watch tells of it), else
        `ended - started`."""
        back = wrote or not self.writes_down
        if self._down_since is not None and started >= self._down_since and back:
            self.deaf(self._down_since, started)
            self._down_since, self.writes_down = None, False
        if (ended - started if took is None else took) > SLOW_CALL:
            self.deaf(started, ended)

    def deaf(self, start: float, end: float) -> None:
        """Nothing could be heard from `start` to `end` (a stalled call, a step of the clock)."""
        if end > start:
            self._deaf = _merged([*self._deaf, (start, end)])[-MAX_STRETCHES:]

    def stepped_back(self, seconds: float) -> None:
        """The wall clock stepped back by `seconds`: what was kept was read on the clock before
        the step, and is moved onto the clock after it. Else the coordinator's start would lie
        ahead of the clock, and no job, not even one given out after the step, would be silent
        until the clock had regained the step."""
        self.since -= seconds
        self._deaf = [(start - seconds, end - seconds) for start, end in self._deaf]
        if self._down_since is not None:
            self._down_since -= seconds

    def silent_before(self, now: float, timeout: float) -> float:
        """A running job whose last heartbeat is before this time has been silent for `timeout`
        of the time it could have been heard (-inf: none has yet)."""
        spans = self._deaf
        if self._down_since is not None:
            spans = _merged([*spans, (self._down_since, now)])
        cursor, need = now, timeout
        for start, end in reversed(spans):
            if start >= cursor:
                continue
            gap = cursor - min(end, cursor)
            if gap >= need:
                return cursor - need
            need -= gap
            cursor = start
        if cursor - self.since >= need:
            return cursor - need
        return -math.inf


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """`spans` sorted, overlapping ones joined."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
