"""Failing children: the policy's breaker, sans-IO (see "Failing children" in policy.py).

A child whose GPU broke under it (a CUDA error on every call, a driver gone) often does not crash:
it answers every request with an error, at once. Always idle, it is the least loaded child, so
without a breaker it would take most of its stage's requests and fail them. A child that answers
`BREAKER_ERRORS` requests in a row with an error, while a sibling of its stage proved a job of
the same key (the book's key: the task's miner; for a split WindowPoSt's SNARK step, the step
itself) as one of them since the first of them, is *benched* for `BENCH_FIRST` seconds,
doubling with each bench in a row up to `BENCH_MAX`. The rule asks for that proof so that tasks
every child fails (a miner whose proofs cannot be made) bench nobody: the sibling must have
done, for that key, what this child could not. Errors that came before any such proof bench the
child at the sibling's first one.

A benched child is not chosen while a sibling that is neither benched nor FATAL can serve the
stage (restarting counts): its jobs wait for that sibling, and its locks reserve nothing. Its
bench over (or, for a first bench, a fresh process of it ready), it is *on probation*: it takes
one job at a time until it answers one with a proof, which ends its streak; an error benches it
again at once, for longer (the sibling's proof that benched it still counts, unless that sibling
has proved for more than 256 miners since and forgot it), and that bench outlasts restarts: a
prover that fails and exits each time is restarted a second later. Errors in a row count across
processes (a proof ends them), but a sibling's later proof for a key only its predecessor failed
does not bench a fresh process (its own next error, with the old ones, does). A child
alone in its stage, or whose siblings are all benched or FATAL, is chosen as before: a proof
that may fail beats none.

Answers count in the order they were made, also when one is judged late (a split WindowPoSt's
vanilla step, once its SNARK step is: an error when two SNARK children refused its proofs, or
a lone one that then proved a sibling's: supervisor/split.py): a proof judged late ends the
errors made before it, not those made after.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .children import _Child

#: Errors in a row that bench a child; its first bench (seconds) and the longest one.
BREAKER_ERRORS = 3
BENCH_FIRST = 30.0
BENCH_MAX = 600.0
#: Keys remembered per child: its last proof of each (the first proved forgotten past this), and
#: those its streak failed (none added past this).
_KEYS = 256


@dataclass(slots=True)
class Streak:
    """A child's answers as the breaker counts them."""

    errors: int = 0  # answers in a row that were errors
    since: float = 0.0  # when the first of them came
    failed_keys: set[Hashable] = field(default_factory=set)  # the keys of those errors
    made: list[tuple[float, Hashable]] = field(default_factory=list)  # (made at, key) of each
    proved: dict[Hashable, float] = field(default_factory=dict)  # key -> its last proof here
    benched_until: float = -math.inf
    benches: int = 0  # benches since its last proof: > 0 is benched or on probation
    last_error: float = -math.inf  # when the last error counted was answered
    last_proof: float = -math.inf  # ... and the last proof


@dataclass(slots=True)
class ChildBreaker:
    """The children benched or on probation, for the policy's choice of child; `errors`,
    `first` and `longest`: BREAKER_ERRORS, BENCH_FIRST and BENCH_MAX unless said. The
    Scheduler attaches its children (`attach`); the request book reads `streak`, `can_serve`
    and `news` (the children benched since it last cleared it)."""

    errors: int = BREAKER_ERRORS
    first: float = BENCH_FIRST
    longest: float = BENCH_MAX
    suspects: set[str] = field(default_factory=set)  # child ids benched or on probation
    benches: dict[str, float] = field(default_factory=dict)  # child id -> end of its bench
    news: list[str] = field(default_factory=list)
    unproven: set[str] = field(default_factory=set)  # past their errors, no sibling proof yet
    erring: set[str] = field(default_factory=set)  # children with errors in a row
    _children: dict[str, _Child] = field(default_factory=dict)
    _by_stage: dict[str, list[_Child]] = field(default_factory=dict)
    _touch: Callable[[str], None] = lambda stage: None

    def attach(
        self,
        children: dict[str, _Child],
        by_stage: dict[str, list[_Child]],
        touch: Callable[[str], None],
    ) -> None:
        """The scheduler's children (shared, not copied), and what to call when a stage's
        choices may change."""
        self._children, self._by_stage, self._touch = children, by_stage, touch

    def children_of(self, stage: str) -> list[_Child]:
        """The scheduler's children of `stage` (read only)."""
        return self._by_stage.get(stage, [])

    def streak(self, child_id: str) -> Streak:
        """The child's answers as counted here (read only)."""
        return self._children[child_id].streak

    def count(
        self, child: _Child, key: Hashable, failed: bool, now: float, at: float | None = None
    ) -> None:
        """`child` answered a job of `key` with an error or a proof, at `at` (default: now; a
        split WindowPoSt's vanilla step is judged when its SNARK step is, after the child may
        have answered more). Answers count in the order they were made: a proof ends only the
        errors made before it (a bench by more than those made after it ends), an error made
        before the last proof counts for nothing, and a proof made before a sibling's errors is
        no evidence against them. (A proof is counted also while no child has an error streak:
        an error judged later, a SNARK step's refusal, may have been made before it.)"""
        streak, cid = child.streak, child.info.child_id
        at = now if at is None else at
        if not failed:
            # Kept while no child errs too: an error judged later may have been made before it.
            proved = streak.proved
            proved[key] = max(at, proved.get(key, at))
            if len(proved) > _KEYS:  # the key first proved here goes
                del proved[next(iter(proved))]
            streak.last_proof = max(streak.last_proof, at)
            if not self.erring:
                return
            if at >= streak.last_error:  # made after every error counted: it ends them
                if streak.errors or streak.benches:
                    self._end_streak(child)
            else:
                # Made among its errors (each made-at is known: none past _KEYS): only those
                # made after it are in a row; fewer than a bench takes, the bench ends. Made
                # before them all, or with enough after it: no change.
                after = [e for e in streak.made if e[0] > at]
                known = len(streak.made) == streak.errors
                if known and len(after) < streak.errors and len(after) < self.errors:
                    self._end_streak(child)
                    for made_at, k in after:
                        self.count(child, k, True, now, made_at)
            if self.unproven:  # siblings past their errors, waiting for a proof like this one
                for s in self._by_stage[child.info.stage]:
                    if s.info.child_id not in self.unproven or at < s.streak.since:
                        continue  # (one made before their errors is no evidence)
                    if key in s.streak.failed_keys:
                        self._bench(s, now)
            return
        if at < streak.last_proof:
            return  # a proof made after it ended any streak it was part of
        streak.last_error = max(streak.last_error, at)
        if streak.errors == 0:
            streak.since = at
            self.erring.add(cid)
        streak.since = min(streak.since, at)
        streak.errors += 1
        if len(streak.failed_keys) < _KEYS:
            streak.failed_keys.add(key)
        if len(streak.made) < _KEYS:
            streak.made.append((at, key))
        if streak.errors < self.errors or streak.benched_until > now:
            return
        if any(
            s is not child and s.streak.proved.get(k, -math.inf) >= streak.since
            for s in self._by_stage[child.info.stage]
            for k in streak.failed_keys
        ):
            self._bench(child, now)
        elif not streak.benches:  # (one on probation is benched by its own errors only)
            self.unproven.add(cid)

    def count_late(
        self,
        child_id: str,
        key: Hashable,
        failed: bool,
        now: float,
        at: float | None = None,
        *,
        restarted: bool = False,
    ) -> None:
        """`count` for an answer the scheduler no longer has a job for: one read after its child
        began to go down (a prover that answers an error and exits is often seen exiting first),
        or a split WindowPoSt's vanilla step, judged with its SNARK step; `restarted`: a newer
        process of the child said hello since it was made (a bench it brings is as if counted
        before that hello: a first one ends)."""
        child = self._children[child_id]
        benches = child.streak.benches
        self.count(child, key, failed, now, at)
        if restarted and child.streak.benches > benches:
            self.fresh_process(child)
            if child_id not in self.benches and child_id in self.news:
                self.news.remove(child_id)  # it takes requests: no warning that it does not

    def _end_streak(self, child: _Child) -> None:
        """A proof ends `child`'s errors in a row, its bench or its probation."""
        streak, cid = child.streak, child.info.child_id
        streak.errors = streak.benches = 0
        streak.failed_keys.clear()
        streak.made.clear()
        streak.benched_until = -math.inf
        self.suspects.discard(cid)
        self.benches.pop(cid, None)
        self.unproven.discard(cid)
        self.erring.discard(cid)
        self._touch(child.info.stage)

    def _bench(self, child: _Child, now: float) -> None:
        streak, cid = child.streak, child.info.child_id
        # (The doubling stops at 2**64: a child benched a thousand times, a week of errors on
        # probation, would otherwise make a number no float holds.)
        doubled = self.first * 2.0 ** min(streak.benches, 64)
        until = streak.benched_until = now + min(self.longest, doubled)
        streak.benches += 1
        self.suspects.add(cid)
        self.unproven.discard(cid)
        self.benches[cid] = until
        self.news.append(cid)
        self._touch(child.info.stage)

    def left_out(self, child: _Child, now: float) -> bool:
        """Whether `child` is left out of a choice now: benched, or on probation with a job
        already, while a sibling neither benched nor FATAL can serve the stage."""
        cid = child.info.child_id
        if cid not in self.suspects or not (child.running or now < child.streak.benched_until):
            return False
        return any(s is not child and _serves(s, now) for s in self._by_stage[child.info.stage])

    def leaves_out(self, child_id: str, now: float) -> bool:
        """`left_out` by the child's id."""
        return child_id in self.suspects and self.left_out(self._children[child_id], now)

    def can_serve(self, child_id: str, now: float) -> bool:
        """Neither FATAL nor benched now: a child a request may wait for."""
        return _serves(self._children[child_id], now)

    def able(self, children: list[_Child], now: float) -> int:
        """How many of `children` may take a job now: neither FATAL nor left out."""
        suspects = self.suspects
        return sum(
            not c.fatal and not (c.info.child_id in suspects and self.left_out(c, now))
            for c in children
        )

    def end_benches(self, now: float) -> None:
        """The benches over by `now` end: those children are on probation."""
        for cid in [cid for cid, until in self.benches.items() if until <= now]:
            del self.benches[cid]
            self._touch(self._children[cid].info.stage)

    def fresh_process(self, child: _Child) -> None:
        """A new process of `child` said hello. A first bench ends (a restart may clear a GPU
        error: its next answer decides); a bench after an error on probation runs its course,
        or a prover that fails and exits each time takes a request at each restart. Its errors
        in a row still count, but no sibling's proof benches it for the old ones alone."""
        streak, cid = child.streak, child.info.child_id
        self.unproven.discard(cid)
        if streak.benches <= 1:
            streak.benched_until = -math.inf
            self.benches.pop(cid, None)


def _serves(child: _Child, now: float) -> bool:
    return not child.fatal and now >= child.streak.benched_until
