"""Failing children: the policy's breaker, sans-IO (see "Failing children" in policy.py).

A child whose GPU broke under it (a CUDA error on every call, a driver gone) often does not crash:
it answers every request with an error, at once. Always idle, it is the least loaded child, so
without a breaker it would take most of its stage's requests and fail them. A child answers
`BREAKER_ERRORS` requests in a row with an error while a sibling of its stage made a proof since
the first of them: it is *benched* for `BENCH_FIRST` seconds, doubling with each bench in a row
up to `BENCH_MAX`. The rule asks for a sibling's proof so that a task every child fails (a
miner's sector files gone) benches nobody. A benched child is not chosen while a sibling that is
neither benched nor FATAL can serve the stage: its jobs wait for that sibling. Its bench over (or
its process started again), it is *on probation*: it takes one job at a time until it answers one
with a proof, which ends its streak; an error benches it again at once, for longer. A child
alone in its stage, or whose siblings are all benched or FATAL, is chosen as before: a proof
that may fail beats none.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .children import _Child

#: Errors in a row that bench a child; its first bench (seconds) and the longest one.
BREAKER_ERRORS = 3
BENCH_FIRST = 30.0
BENCH_MAX = 600.0


@dataclass(slots=True)
class Streak:
    """A child's answers as the breaker counts them."""

    errors: int = 0  # answers in a row that were errors
    since: float = 0.0  # when the first of them came
    last_proof: float = -math.inf  # when it last answered with a proof
    benched_until: float = -math.inf
    benches: int = 0  # benches since its last proof

    @property
    def suspect(self) -> bool:
        """Benched, or on probation after a bench (see the module's docstring)."""
        return self.benches > 0

    def proof(self, now: float) -> None:
        self.errors = self.benches = 0
        self.benched_until = -math.inf
        self.last_proof = now


@dataclass(slots=True)
class ChildBreaker:
    """The children benched or on probation, for the policy's choice of child; `errors`,
    `first` and `longest`: BREAKER_ERRORS, BENCH_FIRST and BENCH_MAX unless said."""

    errors: int = BREAKER_ERRORS
    first: float = BENCH_FIRST
    longest: float = BENCH_MAX
    suspects: set[str] = field(default_factory=set)  # child ids benched or on probation
    benches: dict[str, float] = field(default_factory=dict)  # child id -> end of its bench
    news: list[str] = field(default_factory=list)  # benched since the caller last cleared it
    unproven: set[str] = field(default_factory=set)  # past their errors before a sibling proved

    def count(self, child: _Child, stage: Sequence[_Child], failed: bool, now: float) -> bool:
        """`child` (one of `stage`'s children) answered with an error or a proof; True if its
        stage's choices may change. Children it benches are added to `news`."""
        streak, cid = child.streak, child.info.child_id
        if not failed:
            changed = bool(streak.errors or streak.suspect)
            if changed:
                streak.proof(now)
                self.suspects.discard(cid)
                self.benches.pop(cid, None)
                self.unproven.discard(cid)
            else:
                streak.last_proof = now
            if self.unproven:  # siblings past their errors, not benched for want of a proof
                for s in stage:
                    if s.info.child_id in self.unproven and s is not child:
                        changed = self._bench(s, now) or changed
            return changed
        if streak.errors == 0:
            streak.since = now
        streak.errors += 1
        if streak.errors < self.errors or streak.benched_until > now:
            return False
        if not any(s is not child and s.streak.last_proof >= streak.since for s in stage):
            if not streak.suspect:  # (one on probation is benched by its own errors only)
                self.unproven.add(cid)
            return False  # no sibling proved since the streak began: the tasks may be at fault
        return self._bench(child, now)

    def _bench(self, child: _Child, now: float) -> bool:
        streak, cid = child.streak, child.info.child_id
        until = streak.benched_until = now + min(self.longest, self.first * 2**streak.benches)
        streak.benches += 1
        self.suspects.add(cid)
        self.unproven.discard(cid)
        self.benches[cid] = until
        self.news.append(cid)
        return True

    def left_out(self, child: _Child, stage: Sequence[_Child], now: float) -> bool:
        """Whether `child` is left out of a choice now: benched, or on probation with a job
        already, while a sibling neither suspect nor FATAL can serve the stage."""
        cid = child.info.child_id
        if cid not in self.suspects or not (child.running or now < child.streak.benched_until):
            return False
        return any(
            s is not child and not s.fatal and s.info.child_id not in self.suspects for s in stage
        )

    def ended(self, now: float) -> Iterator[str]:
        """The children whose bench ended by `now` (on probation from now on)."""
        for cid in [cid for cid, until in self.benches.items() if until <= now]:
            del self.benches[cid]
            yield cid

    def fresh_process(self, child: _Child) -> None:
        """A new process of `child` said hello: a bench ends, its next answer decides."""
        child.streak.benched_until = -math.inf
        self.benches.pop(child.info.child_id, None)
