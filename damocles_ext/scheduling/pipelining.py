"""Pipelining: a child's GPU phases as the dispatch policy (`policy.Scheduler`) follows them,
sans-IO (only for children that report phases; the scheduler's `progress` takes the dext
Progress frames).

A prover that reports a phase named in `GPU_PHASES` ("snark") when its GPU work starts tells the
scheduler that its request left the vanilla phase (CPU, disk) for the GPU; a later phase not in
`GPU_PHASES` means its GPU work is over. Once a child has reported a GPU phase it is *pipelined*,
and a free slot on it is used only:

- when none of its jobs is on the GPU (all still in vanilla) and the stage's queue holds at least
  one job per child of the stage that may take one (neither benched nor FATAL): the first vanilla
  to finish takes the GPU, and no other GPU is left without work by committing one more here; or
- when all its jobs are in their GPU phase and that GPU work is estimated to end within the time
  a vanilla phase takes (the longest of the stage's last 16), so the new job's vanilla overlaps
  the running SNARK and its SNARK starts as the GPU frees. Until then the job stays queued, free
  to go to whichever GPU frees first, instead of waiting behind a SNARK on a busy one.

Estimates: a GPU phase that reported done/total runs at the rate shown so far; before its first
done > 0 it takes the child's recent mean GPU phase (or, for a child that never reports done/total
within the phase, the shortest recent one: holding a job back too long idles the GPU). Jobs
waiting for the child's GPU (reported the phase but not yet on it) add the same per job. Among
children that can take a job, the one whose GPU is free soonest wins (one that is idle now
first), then the least loaded, then weights. `next_wakeup` includes the moment a held-back child
may take the next job. Children that never report a GPU phase (JSON-lines children, provers
without phases) keep the plain slot rule.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .children import _HISTORY, _Child, _Running, gpu_free_at, gpu_phase_ended

#: Progress phases that mean "the request is now using the GPU" (its SNARK).
GPU_PHASES: frozenset[str] = frozenset({"snark"})


def gpu_phase_reported(
    child: _Child,
    run: _Running,
    done: int,
    total: int,
    now: float,
    runs_on: Callable[[_Child], list[_Running]],
    vanilla_times: dict[str, deque[float]],
) -> bool:
    """`run` on `child` (whose running jobs `runs_on` gives) reported a GPU phase, `done` of `total`:
    True if that was its first report of it (its vanilla phase, learnt in `vanilla_times`, is
    over, and `child` is pipelined now)."""
    if run.gpu_done:
        return False  # a second GPU phase: keep the first estimate, it is conservative
    first = run.gpu_since is None
    if first:
        run.gpu_since = now
        child.pipelined = True
        vanilla = vanilla_times.setdefault(run.job.stage, deque(maxlen=_HISTORY))
        vanilla.append(now - run.started)
        runs = runs_on(child)  # (a first report only: not each heartbeat's frame)
        if not any(r.gpu_turn is not None and not r.gpu_done for r in runs if r is not run):
            run.gpu_turn = now
    # Only a step forward counts: the child runtime re-sends the last frame as a heartbeat, and
    # a repeat says nothing about the rate.
    if total > 0 and done > 0 and done / total > run.fraction:
        if run.gpu_turn is None:
            run.gpu_turn = run.gpu_since  # moving, so not waiting for the GPU after all
        run.fraction = min(1.0, done / total)
        run.fraction_at = now
        child.reports_fraction = True
    return first


def other_phase_reported(
    child: _Child, run: _Running, runs_on: Callable[[_Child], list[_Running]], now: float
) -> None:
    """`run` reported a phase not in GPU_PHASES: its GPU phase, if it had one, is over."""
    if run.gpu_since is not None and not run.gpu_done:
        gpu_phase_ended(child, run, runs_on, now, learn=True)
        run.gpu_done = True


def gpu_idle(runs: list[_Running]) -> bool:
    """None of `runs` (a child's) is on its GPU."""
    return all(r.gpu_since is None or r.gpu_done for r in runs)


def takes_next_at(
    child: _Child, runs: list[_Running], vanilla_times: dict[str, deque[float]]
) -> float | None:
    """When pipelined `child` (whose running jobs are `runs`) may take its next job: a vanilla
    phase (the longest of its stage's recent ones) before its GPU frees; None: no estimate."""
    free_at = gpu_free_at(child, runs)
    vanilla = vanilla_times.get(child.info.stage)
    if free_at is None or not vanilla:
        return None
    return free_at - max(vanilla)
