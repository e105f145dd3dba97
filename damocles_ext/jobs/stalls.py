"""The job store's calls in flight, and the lines that say when one has waited SLOW_CALL seconds
for the store (a stall) and when the store answers again (sans-IO: times passed in).

A stalled database (its host frozen, its disk or the network stalled, a lock held) answers
nothing and refuses nothing: a coordinator's calls wait on it, up to the store's call timeout
(a minute), while its workers' calls time out on their side in seconds. Without a line of its
own the coordinator looks stuck itself. `Stalls` keeps each call's start, what waits on it and
which call of the store it is (a dict entry per call: the cost of a call stays a few hundred
nanoseconds), and `look` (a watcher task's, every LOOK_EVERY seconds, not a timer per call) says
one warning per stall, and one line when the store answers again with how long it lasted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .silence import SLOW_CALL

#: Seconds between two looks at the calls in flight: a stall is said SLOW_CALL to SLOW_CALL +
#: LOOK_EVERY seconds after its first call began.
LOOK_EVERY = 1.0


@dataclass(slots=True)
class Stalls:
    """The store calls in flight (`begin`, `end`) and what is said of them (`look`); `where`
    names the store (its URL without the password: JobStore.where)."""

    where: str
    slow: float = SLOW_CALL
    #: When the last call was answered (an answer, or a refusal or error of the database's).
    answered_at: float = float("-inf")
    #: The stall said: (when its oldest call began, when it was said); None: none.
    stalled: tuple[float, float] | None = None
    _calls: dict[int, tuple[float, str, Callable[..., Any]]] = field(default_factory=dict)
    _next: int = 0

    def begin(self, began: float, caller: str, call: Callable[..., Any]) -> int:
        """A call of the store (`call`: the method called, named only if it stalls) begun at
        `began` for `caller` (an RPC method, the sweep; "": unnamed): its token for `end`."""
        self._next += 1
        self._calls[self._next] = (began, caller, call)
        return self._next

    def end(self, token: int) -> None:
        """The call `token` is over (answered, failed, given up on or cancelled)."""
        self._calls.pop(token, None)

    def look(self, now: float) -> tuple[bool, str] | None:
        """(True, the warning) when a call in flight began `slow` seconds ago or more and no
        stall is said yet; (False, the line) when a stall was said and the store answered since,
        no call waiting that long any more; else None."""
        due = now - self.slow
        oldest: tuple[float, str, Callable[..., Any]] | None = None
        for entry in self._calls.values():
            if entry[0] <= due and (oldest is None or entry[0] < oldest[0]):
                oldest = entry
        if self.stalled is None:
            if oldest is None:
                return None
            began, caller, call = oldest
            name = name_of(call)
            self.stalled = (began, now)
            waiting = sum(1 for entry in self._calls.values() if entry[0] <= due)
            others = f"; {waiting - 1} more calls wait on it too" if waiting > 1 else ""
            who = f"{caller} (its {name} call)" if caller else f"its {name} call"
            return True, (
                f"the job store {self.where} has not answered {who} for {now - began:.0f} s"
                f"{others}: its database is stalled or very slow (its host frozen, its disk or the"
                " network stalled, a lock held?); calls wait on it up to the store's call timeout,"
                " and the workers' own calls time out meanwhile; check the database; a line says"
                " when it answers again"
            )
        began, said = self.stalled
        if oldest is not None or self.answered_at < said:
            return None  # a call still waits, or none was answered since (given up on only)
        self.stalled = None
        return False, (
            f"the job store {self.where} answers again, after a stall of"
            f" {self.answered_at - began:.0f} s"
        )


def name_of(fn: Callable[..., Any]) -> str:
    """The name of the method `fn` calls (a functools.partial has none of its own)."""
    name = getattr(fn, "__name__", None)
    if isinstance(name, str):
        return name
    inner = getattr(fn, "func", None)
    return name_of(inner) if callable(inner) else type(fn).__name__
