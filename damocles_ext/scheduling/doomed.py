"""Starts that can no longer finish before their deadline, refused at once (sans-IO).

A request that starts on a child when even the fastest recent proof of its stage took longer
than the time left to its deadline will be cancelled at its deadline, having held a GPU that
could have proved a request that would make it, and its caller learns of the failure only then.
So the scheduler refuses such a start, conservatively; and a request that only a slow child
could not finish waits for a faster one rather than hold the slow one until its deadline:

* Estimate. Each child keeps how long its last `RUNS_KEPT` proofs of sized jobs took (a whole
  WindowPoSt: its replicas and proof type), from the moment a job got a slot of its capacity to
  its proof (errors, cancelled jobs and jobs taken back teach nothing: an error is no proof's
  time, and a timed-out run is no run's time). A job is judged by the proofs of its proof type
  and of as many replicas or fewer (a batch of one partition is not judged by the time of ten;
  a bigger job takes at least as long as a smaller one), the estimate of its run being the
  fastest of the last `RUNS_KNOWN` of those, on the child of the stage that has the fastest: a
  start is refused only when it is doomed on every child of its stage that is not FATAL, so a
  child that could still make it (a faster GPU) keeps the request alive. There is no estimate,
  and no refusal, while any such child has made fewer than `RUNS_KNOWN` such proofs: no data,
  or too little, never refuses. A job of unknown size (a split WindowPoSt's steps, whose vanilla
  proofs are judged later and whose SNARKs are short) is never refused. One fast outlier among
  them makes the estimate optimistic, and the request is started: refusing is the rule's only
  risk, starting the status quo.
* Refusal. A job with a deadline, whose stage is not URGENT (a WinningPoSt is always worth a
  try: its few seconds vary more than its budget does), that the scheduler would start on a
  child now but whose estimate exceeds the time left to its deadline, is not started: it is
  answered (`Fail`) at once with what its run would have taken at least, how long was left,
  and that it was not sent so that the GPU proves others. A retry that became doomed while
  it waited is refused the same way (the request book says it was "not sent again").
* Held back. A job doomed only on some children of its stage, by each one's own estimate (the
  fastest of its last `RUNS_KNOWN` proofs like the job, all slower than the time left), while
  another child that may serve it (not FATAL, not benched, not one it avoids) is not (its
  estimate fits, or it has none: too little data never dooms a child), is started on none of
  the doomed ones: on such a sibling if one is free now, else it keeps its place in the queue
  (`HeldBack`) and the doomed children take the jobs behind it, as a job that avoids children
  waits (policy.py's "Errors"). It is looked at again when anything of its stage changes (a
  sibling frees, a child's proof, a bench ends), at its deadline, and whenever time alone dooms
  it on one more child (`judge`'s third answer, in `next_wakeup`): once on every such sibling,
  it is started on a doomed child, or refused as above if it is doomed on every child not
  FATAL. A decision's books (which jobs stay set aside, that time) are what the same decision
  made again at once would leave (`settle`), so that incremental decisions keep the books of a
  full recomputation. Nothing is judged while no child of the stage has a free slot; a stage of
  one child, a job of no deadline or of unknown size cost nothing more, nor does one whose
  deadline is further than every run its stage's children remember (`beyond_any_run`: no
  estimate can doom it; it is judged only if it cannot start, for when time would change that,
  as a full recomputation says). `refuse_doomed=False`
  turns off both rules.
* A WinningPoSt's child (`in_time`). A WinningPoSt is never refused nor held back (its block
  does not wait), but among the children free to take it, the one round robin chose does not
  get it when its last runs like it (up to `RUNS_KNOWN`; one is enough) all took as long as the
  time left to its deadline or longer: a free sibling whose runs fit does, the one that would end
  first, else one with none known, else the one that would end first of all (none makes it).
  A WinningPoSt cancelled at its deadline teaches its child a run of at least the time it had
  (such a child often never proves one in time), kept among its run times (no WinningPoSt is
  judged by `estimate`'s rules, so the bound misleads none of them). With no run known of round
  robin's choice, or when it is the only free child, nothing is looked at: the choice is today's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from .children import RUNS_KNOWN, _Child
from .decisions import Job

__all__ = [
    "RUNS_KNOWN",
    "HeldBack",
    "doomed_from",
    "estimate",
    "estimates",
    "free_slot",
    "in_time",
    "judge",
    "kept_off",
    "refusal",
    "settle",
]

#: Each child of a stage not FATAL, and the estimate of a job's run on it (None: none yet).
Estimates = list[tuple[_Child, float | None]]
#: The estimates of one decision of a stage, by proof type and size (`estimates`).
Known = dict[tuple[str, int], Estimates]


class HeldBack(NamedTuple):
    """A job kept off the children it cannot finish on (`skip`), for a sibling that may still
    finish it (until time alone dooms it there too: `judge`'s `changes` says when to look)."""

    skip: frozenset[str]
    skipped: list[_Child]

    def blocks(self) -> bool:
        """Whether a child it skips has a free slot: without the hold, it might start there."""
        return free_slot(self.skipped)


def estimate(job: Job, child: _Child, need: int = RUNS_KNOWN) -> float | None:
    """The fastest of `child`'s last RUNS_KNOWN proofs like `job` (its proof type, as many
    replicas or fewer), or None while it has made fewer than `need`."""
    known, fastest = 0, math.inf
    for kind, size, seconds in reversed(child.run_times):  # a GPU that slowed down is followed
        if kind == job.kind and size <= job.size:
            if seconds < fastest:
                fastest = seconds
            known += 1
            if known == RUNS_KNOWN:
                break
    return fastest if known >= need else None


def in_time(best: _Child, eligible: list[tuple[float, float, _Child]], job: Job) -> _Child:
    """The child to start WinningPoSt `job` on among the `eligible` ones (when its GPU frees,
    its load, the child), round robin having chosen `best`: `best`, unless its recent runs like
    the job (one is enough) all took as long as the time left to its deadline or longer; then
    the one that would end first of those whose runs fit, else the first of none known, else
    the one that would end first (none makes it: the block is still worth the try)."""
    assert job.deadline is not None
    kept, pick, first = 0, best, (3, 0.0)
    for free_at, _, c in eligible:
        run = estimate(job, c, 1)
        if run is None:
            rank = (1, 0.0)
        else:  # a run that ends at its deadline is cancelled there
            rank = (0 if free_at + run < job.deadline else 2, free_at + run)
        if c is best:
            kept = rank[0]
        if rank < first:
            pick, first = c, rank
    return best if kept < 2 else pick


def estimates(job: Job, children: list[_Child], known: Known | None = None) -> Estimates:
    """`job`'s estimate on each child of its stage not FATAL; `known`: those of one decision,
    by proof type and size (a child's proof times do not change while a decision is made)."""
    ests = None if known is None else known.get((job.kind, job.size))
    if ests is None:
        ests = [(c, estimate(job, c)) for c in children if not c.fatal]
        if known is not None:
            known[job.kind, job.size] = ests
    return ests


def judge(
    job: Job,
    children: list[_Child],
    now: float,
    can_serve: Callable[[str, float], bool],
    known: Known | None = None,
) -> tuple[Estimates, HeldBack | None, float]:
    """`job`'s estimates on its stage's `children` (not FATAL ones), its `HeldBack` when it is
    doomed on some of them but not on another that may serve it (`can_serve`, not one it
    avoids), and the time from which on time alone dooms it on one more child (inf: never), up
    to which this verdict holds. Only for a job with a deadline and a size."""
    assert job.deadline is not None
    ests = estimates(job, children, known)
    if len(ests) < 2:
        return ests, None, math.inf
    left = job.deadline - now
    skipped: list[_Child] = []
    slowest = -math.inf  # the slowest run that still fits: time dooms its child first
    for c, run in ests:
        if run is not None:
            if run > left:
                skipped.append(c)
            elif run > slowest:
                slowest = run
    changes = math.inf if slowest == -math.inf else doomed_from(job.deadline, slowest)
    if not skipped:
        return ests, None, changes
    for c, run in ests:  # a sibling it may still make it on, that may serve it
        cid = c.info.child_id
        if (
            (run is None or run <= left)
            and not (job.avoid and cid in job.avoid)
            and can_serve(cid, now)
        ):
            return ests, HeldBack(frozenset(s.info.child_id for s in skipped), skipped), changes
    return ests, None, changes


def free_slot(children: list[_Child]) -> bool:
    """Whether a child of the stage has a free slot: without one, no job of it can start, nor
    can a hold keep it off one (`HeldBack.blocks`), and nothing is judged."""
    for c in children:  # noqa: SIM110  (a plain loop: no generator to resume per child)
        if c.ready and len(c.running) < c.slots:
            return True
    return False


#: A job a decision set aside (policy.py): its hold (None: none), whether its `avoid` alone
#: sets it aside, and when time alone next changes its verdict (`judge`).
Aside = tuple["HeldBack | None", bool, float]


def settle(aside: list[Aside], head: float, children: list[_Child]) -> tuple[int, float]:
    """What a decision of a stage leaves, as the same decision made again at once would see it
    (the bookkeeping of both ways of deciding, incremental or not, the same): of the jobs it
    set aside (`aside`, in queue order), how many stay so, up to the first held back only for
    children that got no free slot left meanwhile (deciding again, one would stop there, as at
    a head no child can take); and when time alone next changes a verdict on those or on the
    head it stopped at (`head`: when that job's changes, inf: none), the time for next_wakeup."""
    if not free_slot(children):  # nothing would be judged: no verdict to change
        kept = next((i for i, (_, avoids, _) in enumerate(aside) if not avoids), len(aside))
        return kept, math.inf
    until = math.inf
    for i, (hold, avoids, changes) in enumerate(aside):
        until = min(until, changes)
        if not avoids and hold is not None and not hold.blocks():
            return i, until
    return len(aside), min(until, head)


def kept_off(hold: HeldBack | None, avoid: frozenset[str] | None) -> frozenset[str] | None:
    """The children a job set aside goes to none of: what it avoids, and those its hold skips.
    It reserves the locks of none of them (policy.py: a lower stage may take them meanwhile)."""
    if hold is None:
        return avoid
    return hold.skip | avoid if avoid else hold.skip


def doomed_from(deadline: float, run: float) -> float:
    """A time from which on a run of `run` seconds exceeds the time left to `deadline`, as
    `refusal` and `judge` compare them: the first, or a rounding step after (never before, so
    that a wakeup then finds the run doomed, and none comes again at the same time)."""
    at = deadline - run
    step = math.ulp(max(abs(deadline), abs(run), abs(at)))
    while not run > deadline - at:  # (rounding): a few steps at most
        at += step
    return at


def refusal(job: Job, ests: Estimates, now: float, not_sent: str) -> str | None:
    """Why `job` is not to be started now, given its estimates on every child of its stage not
    FATAL (a deadline it cannot make on any, ending with `not_sent`), or None: it may start."""
    assert job.deadline is not None
    fastest: tuple[float, str] | None = None
    for c, run in ests:
        if run is None:
            return None  # no estimate for a child that may still serve it
        if fastest is None or run < fastest[0]:
            fastest = (run, c.info.child_id)
    if fastest is None:
        return None
    left = job.deadline - now
    run, where = fastest
    if run <= left:
        return None
    # Both rounded down (at least so long; so much left, or more): 59.99 left is no "60.0".
    took, had = math.floor(run * 10) / 10, math.floor(left * 10) / 10
    was_left = f"{had:.1f}s were left" if took > had else "less than that was left"
    return (
        f"it cannot finish before its deadline: a {job.stage} run of {job.size}"
        f" replica{'s' if job.size != 1 else ''} or fewer ({job.kind}) took at least {took:.1f}s"
        f" (the fastest of the last {RUNS_KNOWN} such proofs of each child, on {where}) and"
        f" {was_left}: its GPU was kept for requests that can still make their"
        f" deadline{not_sent}"
    )
