"""One log line when something starts failing, one when it works again (`Outage`): the worker's
view of its manager and of its heartbeats and allocations, the coordinator's of its sweeps, a
producer's of its job store.

Sans-IO: no clock (times come in as arguments), no socket, no file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Outage:
    """One log line when something starts failing, one when it works again: a manager (or a
    job store) that is down for an hour must not fill the log with a line per call. `begins`
    and `ends` are the lines, formatted with `why` (the first failure's), and with `lasted`
    (seconds) and `failures` (how many in a row).

    `unconnected`: a call could not connect during the outage (refused, unreachable, a proxy's
    502 or 503 for the server behind it), so the server is down, not merely slow or stuck: then
    an answer to a call that alone would not end the outage (the worker's heartbeats and pings,
    which a stuck manager may answer while its allocations hang) ends it too (`heard`). It is
    the outage's own, and ends with it.

    `idle`: nothing is tried for now (a worker that holds no job sends no heartbeat); the time
    from then to the next failure or answer is not counted in the outage's length."""

    down_since: float | None = None
    failures: int = 0
    unconnected: bool = False
    idle_since: float | None = None
    idle_for: float = 0.0
    begins: str = (
        "the manager is unreachable ({why}); running proofs go on, no job is asked for, and"
        " results are kept and sent again until it answers"
    )
    ends: str = "the manager answers again (unreachable for {lasted:.1f} s)"

    def failed(self, now: float, what: str, *, connect: bool = False) -> str | None:
        """The line to log for this failure (`connect`: the call could not connect), or None
        when the outage was already logged."""
        self.failures += 1
        if self.down_since is not None:
            self.unconnected = self.unconnected or connect
            self._tried(now)
            return None
        self.down_since, self.unconnected = now, connect
        return self.begins.format(why=what)

    def idle(self, now: float) -> None:
        """Nothing is tried from `now` on, until the next failure or answer: that time is not
        counted in the outage's length (nothing failed in it)."""
        if self.down_since is not None and self.idle_since is None:
            self.idle_since = now

    def _tried(self, now: float) -> None:
        if self.idle_since is not None:
            self.idle_for += now - self.idle_since
            self.idle_since = None

    def answered(self, now: float) -> str | None:
        """The line to log when a call got an answer, or None when there was no outage."""
        if self.down_since is None:
            return None
        self._tried(now)
        lasted, self.down_since = now - self.down_since - self.idle_for, None
        failures, self.failures, self.unconnected = self.failures, 0, False
        self.idle_for = 0.0
        return self.ends.format(lasted=lasted, failures=failures)

    def heard(self, now: float) -> str | None:
        """A whole answer to a call that ends the outage only if it is `unconnected` (a
        heartbeat's, a ping's): the line to log, or None when the outage goes on or there is
        none."""
        return self.answered(now) if self.unconnected else None


def heartbeats_outage() -> Outage:
    """Heartbeats that fail while the manager answers other calls (a coordinator whose job store
    is down, say): one line when they begin to, one when they are answered again."""
    return Outage(
        begins="the heartbeats of the jobs held here fail ({why}): their proofs go on and their"
        " results are sent when done, but past its heartbeat timeout the manager may give them"
        " to another worker; a line says when heartbeats are answered again",
        ends="heartbeats are answered again, after {failures} failed in {lasted:.0f} s",
    )


def allocations_outage() -> Outage:
    """Allocations the manager refuses while it answers (a coordinator whose job store is down):
    one line when they begin to be refused, one when it allocates again."""
    return Outage(
        begins="the manager refuses the allocation ({why}); it is asked again with a backoff,"
        " never later than --idle-poll, and a line says when it allocates again",
        ends="the manager allocates again, after {failures} refused in {lasted:.0f} s",
    )
