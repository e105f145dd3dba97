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
  sibling frees, a child's proof, a bench ends), at its deadline, and once time alone has
  doomed it on every such sibling (`HeldBack.until`, in `next_wakeup`): then it is started on a
  doomed child, or refused as above if it is doomed on every child not FATAL. A stage of one
  child, a job of no deadline or of unknown size cost nothing more. `refuse_doomed=False`
  turns off both rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from .children import RUNS_KNOWN, _Child
from .decisions import Job

__all__ = ["RUNS_KNOWN", "HeldBack", "doomed", "doomed_from", "estimate", "judge"]

#: Each child of a stage not FATAL, and the estimate of a job's run on it (None: none yet).
Estimates = list[tuple[_Child, float | None]]


class HeldBack(NamedTuple):
    """A job kept off the children it cannot finish on (`skip`), for a sibling that may still
    finish it; time alone ends that at `until` (inf: never), when every such sibling is doomed
    too."""

    skip: frozenset[str]
    skipped: list[_Child]
    until: float

    def blocks(self) -> bool:
        """Whether a child it skips has a free slot: without the hold, it might start there."""
        return any(c.ready and len(c.running) < c.slots for c in self.skipped)


def estimate(job: Job, child: _Child) -> float | None:
    """The fastest of `child`'s last RUNS_KNOWN proofs like `job` (its proof type, as many
    replicas or fewer), or None while it has made fewer."""
    known, fastest = 0, math.inf
    for kind, size, seconds in reversed(child.run_times):  # a GPU that slowed down is followed
        if kind == job.kind and size <= job.size:
            if seconds < fastest:
                fastest = seconds
            known += 1
            if known == RUNS_KNOWN:
                return fastest
    return None


def judge(
    job: Job, children: list[_Child], now: float, can_serve: Callable[[str, float], bool]
) -> tuple[Estimates, HeldBack | None]:
    """`job`'s estimates on its stage's `children` (not FATAL ones), and its `HeldBack` when it is
    doomed on some of them but not on another that may serve it (`can_serve`, not one it
    avoids). Only for a job with a deadline and a size."""
    assert job.deadline is not None
    ests: Estimates = [(c, estimate(job, c)) for c in children if not c.fatal]
    if len(ests) < 2:
        return ests, None
    left = job.deadline - now
    skipped = [c for c, run in ests if run is not None and run > left]
    if not skipped:
        return ests, None
    until = -math.inf  # when the last sibling it may still make it on no longer is one
    for c, run in ests:
        cid = c.info.child_id
        if (run is not None and run > left) or (job.avoid and cid in job.avoid):
            continue
        if can_serve(cid, now):
            until = max(until, math.inf if run is None else doomed_from(job.deadline, run))
    if until == -math.inf:
        return ests, None
    return ests, HeldBack(frozenset(c.info.child_id for c in skipped), skipped, until)


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
    return (
        f"it cannot finish before its deadline: a {job.stage} run of {job.size}"
        f" replica{'s' if job.size != 1 else ''} or fewer ({job.kind}) took at least {run:.1f}s"
        f" (the fastest of the last {RUNS_KNOWN} such proofs of each child, on {where}) and"
        f" {left:.1f}s were left: its GPU was kept for requests that can still make their"
        f" deadline{not_sent}"
    )


def doomed(
    job: Job, children: list[_Child], now: float, not_sent: str, ests: Estimates | None = None
) -> str | None:
    """Why `job` is not to be started now (its stage's `children`, a deadline it cannot make
    on any, ending with `not_sent`), or None: it may start. `ests`: `judge`'s, if known."""
    if job.deadline is None or job.size <= 0:
        return None
    if ests is None:
        ests = [(c, estimate(job, c)) for c in children if not c.fatal]
    return refusal(job, ests, now, not_sent)
