"""A discrete-event simulation of PoSt proving on Filecoin's chain timing, in virtual time.

It compares ways of running the same work with the same random draws:

* ``damocles`` (a): damocles-manager's ext-prover as it is. One WindowPoSt child and one
  WinningPoSt child per GPU, ``Concurrent = 1``, each with its own TMPDIR (the seed's deployment),
  so bellperson's lock files do not serialize them: two proofs on one GPU at once share it.
  Dispatch: `baselines.DamoclesDispatch` (random; a request binds to a child on arrival).
* ``damocles-c2`` (b): the same with ``Concurrent = 2`` on the WindowPoSt children (the seed's
  two-jobs-per-GPU advice) and one TMPDIR per GPU shared by both stages, so bellperson's
  ``bellman.gpu.lock`` serializes every SNARK on that GPU in arrival order: a WinningPoSt waits
  behind a running WindowPoSt SNARK (a known bellperson problem).
* ``damocles-ext`` (c): the real `policy.Scheduler` (the code the supervisor runs) fed these events.
  Deployment: per GPU one WindowPoSt child with ``Concurrent = 2`` and a private TMPDIR (its two
  proofs serialize their SNARKs on the child's own bellperson lock, so one proof's vanilla phase
  overlaps the other's SNARK), and one WinningPoSt child with a private TMPDIR and
  ``GpuLock = false`` (it time-shares the GPU with a running WindowPoSt SNARK rather than wait
  minutes for it). Requests carry their deadline (proof due time; WinningPoSt: its budget). Its
  dext children report progress: phase "snark" when a SNARK starts (also while it waits for the
  child's bellperson lock) and done/total every ``progress_interval`` seconds while it runs
  (0: the phase change only), which the scheduler's pipelining uses (see policy.py).
* ``damocles-ext-gpulock`` (cl): (c) with the implicit per-GPU lock left on, as `Gpus` on both a
  [[WdPost]] and a [[WinPost]] table gives by default (``GpuLock = true``: "gpu:<i>" shared by the
  GPU's WindowPoSt and WinningPoSt children). A WinningPoSt then waits until no WindowPoSt request
  runs on its GPU (vanilla phases included, since the lock is held per request); a waiting one
  keeps new WindowPoSt requests off that GPU's lock (policy.py), and it goes to a GPU whose lock is
  free when there is one. What the lock costs WinningPoSt is what this row shows.
* ``damocles-ext-nophase`` (c0): the same without progress reports, as with JSON-lines children
  or provers that report no phases: the scheduler's plain slot rule.
* ``damocles-ext-split`` (cs): the same scheduler with WindowPoSt split in two steps (config
  tables [[WdPostVanilla]] and [[WdPostSnark]]): a vanilla pool of
  ``VANILLA_SLOTS_PER_GPU`` slots per GPU (CPU and disk, no GPU), and per GPU one SNARK child
  (``Concurrent = 1``) and the WinningPoSt child of (c). A partition's vanilla step is queued on
  arrival; when it ends, its SNARK step joins the SNARK queue, deadline first, and goes to the
  first GPU that frees. The vanilla steps of the next partitions run while the GPUs are busy, and
  no SNARK is bound to a GPU before that GPU is free.
* ``reference``: not a deployable policy but a yardstick for (c). Every partition's vanilla phase
  starts the moment its randomness is known (unlimited CPU), and each GPU that falls idle takes the
  ready SNARK with the earliest deadline from one global queue: what a non-preemptive scheduler
  that cannot foresee durations could do if vanilla proving were split from the SNARK.
  WinningPoSt time-shares the least busy GPU.
* ``clairvoyant``: a second yardstick, the reference with foresight no scheduler has: it knows every
  SNARK's duration before it runs, and among ready SNARKs due at the same time it starts the
  longest first (LPT, the classic packing rule). Some schedule does at least this well; none beats
  the realized bound below. Between ``reference`` and ``clairvoyant`` lies what knowing the
  durations is worth: the part of the capacity bound no real scheduler can reach.

The model, stated plainly so its limits are clear:

* Chain: 48 deadlines a day, a 30-minute challenge window each, randomness known 10 minutes
  before the window opens (proving may start then), proofs due ``submit_margin`` before the window
  closes. Miner m's deadlines open at ``lookback + offset_m + i * 30 min``.
* One request per partition. Its vanilla phase (CPU and disk) needs no GPU and is not contended:
  the machine is assumed to have CPU and disk enough for every proof in flight. Its SNARK phase
  needs the GPU. WinningPoSt is GPU time only (its vanilla part is one sector: negligible).
* A GPU is a processor-sharing server: proofs whose SNARKs are on it at once each run at 1/n
  speed (CUDA time-slicing; GPU memory is assumed to suffice for both). Proofs that share a
  bellperson lock domain (one TMPDIR) take the GPU one at a time, first come first served.
* The baselines cancel as damocles-manager does (`baselines`): when a deadline's challenge window
  closes (``submit_margin`` after its proofs are due), its requests still waiting for a slot are
  dropped, and those running go on to their end on their child (holding the GPU) but give their
  slot back. The scheduler's policy fails a request whose deadline passes in the queue and cancels
  a running one at its deadline (the cancel takes effect at once here; the real grace period is
  ignored).
* SNARK times (`SNARK_MODELS`). A WindowPoSt partition's SNARK is one fixed circuit (~125M
  constraints), so how long it takes is mostly a property of the GPU; we read the public 3-9
  minutes as a spread across GPUs (an assumption: no source says so). The default "machine" model draws one SNARK time from `snark` per run (per
  seed: each seed is another machine, all its GPUs of one model) and each partition takes it
  within +-`snark_jitter` (assumed 5%, not measured). "gpu" draws one per GPU (a machine of mixed
  GPUs). "partition" draws each partition's time on its own, whatever GPU runs it: the stress case
  for packing (an unforeseeable 3-9 min job can end a deadline's work). A job's `gpu_work` is its
  time on a GPU of the mean SNARK time; a GPU of speed v runs it in gpu_work / v.
* Duration draws are keyed by (seed, miner, deadline, partition), and GPU speeds by (seed, GPU),
  so a run with more partitions keeps every draw of a run with fewer: loads are comparable and
  bisection sees nested workloads.

The capacity bound: with the mean SNARK time s, a total load T partitions per deadline split
evenly across miners, and GPUs doing C seconds of mean-speed work per second (C = G GPUs at speed
1; the sum of the speeds), every set of deadlines whose work is released at or after a and due by
d needs T/K * s per miner-deadline within C * (d - a) of GPU time. The bound is the largest
T for which that holds for every (a, d); no schedule can stay miss-free on average above it.
It uses the chain timing the jobs use (work released when the randomness is known, due at the
window's close minus the submit margin). It is generous to every policy in three ways: it ignores
that a SNARK cannot start before its vanilla phase (the GPU idles at least the shortest vanilla
phase after an idle spell), that partitions cannot be split across GPUs, and WinningPoSt's GPU time.
`realized_capacity_bound` applies the same interval test to the drawn durations instead of the
mean: the largest whole load whose draws pass it. Loads are whole partitions, so the fractions of
the bound a policy can show are steps of 1/bound (5% of it with 4 GPUs and the defaults).
"""

from __future__ import annotations

# The simulator lives in three modules along its seams; this one keeps every public name
# importable from `damocles_ext.scheduling.simulator`, where the CLI, bench/ and tests use them.
from .policy import Scheduler
from .sim_engine import (
    PolicyResult,
    max_missfree_load,
    resolve_policies,
    run_workload,
    simulate,
)
from .sim_report import bisect_report, describe, format_bisect, format_table, report
from .sim_scenario import (
    DEFAULT_POLICIES,
    POLICIES,
    POLICY_ALIASES,
    SNARK_MODELS,
    VANILLA_SLOTS_PER_GPU,
    Scenario,
    SimJob,
    Uniform,
    Workload,
    capacity_bound,
    generate,
    realized_capacity_bound,
    realized_overload,
)

__all__ = [
    "DEFAULT_POLICIES",
    "POLICIES",
    "POLICY_ALIASES",
    "SNARK_MODELS",
    "VANILLA_SLOTS_PER_GPU",
    "PolicyResult",
    "Scenario",
    "Scheduler",
    "SimJob",
    "Uniform",
    "Workload",
    "bisect_report",
    "capacity_bound",
    "describe",
    "format_bisect",
    "format_table",
    "generate",
    "max_missfree_load",
    "realized_capacity_bound",
    "realized_overload",
    "report",
    "resolve_policies",
    "run_workload",
    "simulate",
]
