"""Starts that can no longer finish before their deadline, refused at once (sans-IO).

A request that starts on a child when even the fastest recent proof of its stage took longer
than the time left to its deadline will be cancelled at its deadline, having held a GPU that
could have proved a request that would make it, and its caller learns of the failure only then.
So the scheduler refuses such a start, conservatively:

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
  proofs are judged later and whose SNARKs are short) is never refused. One fast outlier among them makes the estimate optimistic, and the
  request is started: refusing is the rule's only risk, starting the status quo.
* Refusal. A job with a deadline, whose stage is not URGENT (a WinningPoSt is always worth a
  try: its few seconds vary more than its budget does), that the scheduler would start on a
  child now but whose estimate exceeds the time left to its deadline, is not started: it is
  answered (`Fail`) at once with what its run would have taken at least, how long was left,
  and that it was not sent so that the GPU proves others. A retry that became doomed while
  it waited is refused the same way (the request book says it was "not sent again").
"""

from __future__ import annotations

from .children import RUNS_KNOWN, _Child
from .decisions import Job

__all__ = ["RUNS_KNOWN", "doomed"]


def doomed(job: Job, children: list[_Child], now: float, not_sent: str) -> str | None:
    """Why `job` is not to be started now (its stage's `children`, a deadline it cannot make,
    ending with `not_sent`), or None: it may start."""
    if job.deadline is None or job.size <= 0:
        return None
    fastest: tuple[float, str] | None = None
    for c in children:
        if c.fatal:
            continue
        like = []  # the last ones like it: a GPU that slowed down is followed
        for kind, size, seconds in reversed(c.run_times):
            if kind == job.kind and size <= job.size:
                like.append(seconds)
                if len(like) == RUNS_KNOWN:
                    break
        else:
            return None  # no estimate for a child that may still serve it
        run = min(like)
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
