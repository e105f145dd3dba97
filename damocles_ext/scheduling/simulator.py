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

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..stages import POST_STAGES, WINDOW_POST_SPLIT
from .baselines import BaselineChild, DamoclesDispatch
from .policy import CancelRunning, ChildSlots, Fail, Job, Scheduler, Start

WINDOW_POST, WINNING_POST = POST_STAGES
VANILLA, SNARK = WINDOW_POST_SPLIT  # the split WindowPoSt stages
#: Scheduler job id of a WindowPoSt partition's SNARK step in split mode (its vanilla step uses
#: the partition's own job id).
_SNARK_ID = 1 << 40
#: (cs) Vanilla steps at once per GPU of the machine. The simulator does not model disk
#: contention: with more slots, more vanilla steps run at full speed side by side.
VANILLA_SLOTS_PER_GPU = 4

POLICIES: dict[str, str] = {
    "damocles": "a: damocles ext-prover, Concurrent=1, random dispatch",
    "damocles-c2": "b: damocles, Concurrent=2, shared TMPDIR (bellperson lock)",
    "damocles-ext": "c: damocles-ext Scheduler (EDF, late binding, Concurrent=2, SNARK phase "
    "reported: pipelined)",
    "damocles-ext-gpulock": "c with the implicit GPU lock shared by each GPU's WindowPoSt and "
    "WinningPoSt children (GpuLock = true)",
    "damocles-ext-nophase": "c without phase reports (JSON-lines children): EDF, late binding, "
    "Concurrent=2",
    "damocles-ext-split": "c with WindowPoSt split: a vanilla pool of 2 slots per "
    "GPU, SNARK children per GPU, EDF on both",
    "reference": "not deployable: vanilla split from SNARK, unlimited CPU, one global EDF queue",
    "clairvoyant": "not deployable: the reference knowing every SNARK's duration in advance "
    "(longest first among equal deadlines)",
}
#: Where the spread of SNARK times comes from (see the module notes: the default reads the public
#: 3-9 min as a spread across GPUs, since a partition's SNARK is one fixed circuit).
SNARK_MODELS: dict[str, str] = {
    "machine": "one GPU model per machine: its SNARK time is drawn from --snark once per run "
    "(per seed), and each partition takes it within +-jitter",
    "gpu": "mixed GPUs: each GPU's SNARK time is drawn from --snark, each partition within "
    "+-jitter of its GPU's",
    "partition": "each partition's SNARK time drawn from --snark independently (whatever GPU): "
    "the stress case for packing",
}
DEFAULT_POLICIES = ("damocles", "damocles-c2", "damocles-ext")
POLICY_ALIASES = {
    "a": "damocles",
    "b": "damocles-c2",
    "c": "damocles-ext",
    "cl": "damocles-ext-gpulock",
    "c0": "damocles-ext-nophase",
    "cs": "damocles-ext-split",
}


@dataclass(frozen=True, slots=True)
class Uniform:
    """A duration drawn uniformly from [low, high] seconds; low == high is a fixed time."""

    low: float
    high: float

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def draw(self, rng: random.Random) -> float:
        return self.low if self.low == self.high else rng.uniform(self.low, self.high)


@dataclass(frozen=True)
class Scenario:
    """What is simulated. `partitions[m]` is miner m's partitions per deadline."""

    gpus: int = 4
    partitions: tuple[int, ...] = (3, 3, 3, 3)
    hours: float = 24.0
    offsets: str | tuple[float, ...] = "colliding"  # "colliding", "spread", or seconds per miner
    seed: int = 1
    epoch: float = 30.0
    deadline_period: float = 1800.0  # 48 deadlines a day
    challenge_window: float = 1800.0  # 60 epochs
    lookback: float = 600.0  # randomness known 20 epochs before the window opens
    submit_margin: float = 300.0
    vanilla: Uniform = Uniform(60.0, 180.0)
    snark: Uniform = Uniform(180.0, 540.0)  # one 2349-sector partition on a modern GPU
    #: Where the spread of `snark` comes from (see SNARK_MODELS).
    snark_model: str = "machine"
    snark_jitter: float = 0.05
    winning_gpu: Uniform = Uniform(2.0, 6.0)
    winning_budget: float = 20.0
    winning_rate: float = 2.0  # WinningPoSt arrivals per hour per miner (Poisson)
    progress_interval: float = 30.0  # (c): seconds between SNARK progress reports; 0: phase only

    def __post_init__(self) -> None:
        if self.snark_model not in SNARK_MODELS:
            raise ValueError(
                f"snark_model must be one of {', '.join(SNARK_MODELS)}, not {self.snark_model!r}"
            )
        if not self.snark.low > 0:
            raise ValueError(
                f"a SNARK takes time: snark's low end must be above 0, not {self.snark.low:g}"
            )
        if not 0 <= self.snark_jitter < 1:
            raise ValueError(
                f"snark_jitter must be at least 0 and below 1, not {self.snark_jitter:g}"
            )

    @property
    def miners(self) -> int:
        return len(self.partitions)

    @property
    def total_partitions(self) -> int:
        return sum(self.partitions)

    @property
    def deadlines_per_miner(self) -> int:
        return max(1, round(self.hours * 3600.0 / self.deadline_period))

    def miner_offsets(self) -> tuple[float, ...]:
        """Seconds by which each miner's deadlines are shifted."""
        if self.offsets == "colliding":
            return (0.0,) * self.miners
        if self.offsets == "spread":
            return tuple(m * self.deadline_period / self.miners for m in range(self.miners))
        if isinstance(self.offsets, str):
            raise ValueError(  # noqa: TRY004 - a bad value of the right type
                f"offsets must be 'colliding', 'spread' or seconds per miner, not {self.offsets!r}"
            )
        if len(self.offsets) != self.miners:
            raise ValueError(f"{len(self.offsets)} offsets given for {self.miners} miners")
        return tuple(float(o) for o in self.offsets)

    def gpu_speeds(self) -> tuple[float, ...]:
        """Each GPU's speed relative to one with the mean SNARK time of `snark`: 1.0 for every
        GPU in the "partition" model, else the mean over the GPU's drawn SNARK time."""
        if self.snark_model == "partition":
            return (1.0,) * self.gpus
        if self.snark_model == "machine":
            return (self.snark.mean / self.snark.draw(_rng(self.seed, "machine")),) * self.gpus
        return tuple(
            self.snark.mean / self.snark.draw(_rng(self.seed, "gpu", g)) for g in range(self.gpus)
        )

    def gpu_capacity(self) -> float:
        """GPU-seconds of mean-speed SNARK work the GPUs do per second: the sum of the speeds."""
        return sum(self.gpu_speeds())

    def with_total_partitions(self, total: int) -> Scenario:
        """The same scenario with `total` partitions per deadline, split evenly across miners."""
        k = self.miners
        return replace(self, partitions=tuple(total // k + (m < total % k) for m in range(k)))

    def horizon(self) -> float:
        """End of the last challenge window: GPU busy time is measured over [0, horizon]."""
        last_open = (
            self.lookback
            + max(self.miner_offsets())
            + (self.deadlines_per_miner - 1) * self.deadline_period
        )
        return last_open + self.challenge_window


@dataclass(slots=True, eq=False)
class SimJob:
    """One request in the simulation, with its draws and (after a run) its outcome."""

    job_id: int
    stage: str
    miner: int
    deadline_index: int  # -1 for WinningPoSt
    release: float
    due: float
    vanilla: float
    gpu_work: float  # seconds on a GPU of speed 1.0 (see Scenario.gpu_speeds)
    state: str = "new"  # new, vanilla, gpu, done, failed, cancelled
    child: str | None = None
    start: float | None = None
    finish: float | None = None
    token: int = 0


@dataclass(frozen=True, slots=True)
class Workload:
    """Every request of a run, sorted by release time."""

    jobs: tuple[SimJob, ...]


def _rng(*key: object) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and Python versions.
    return random.Random("/".join(str(k) for k in key))


def generate(scenario: Scenario) -> Workload:
    """All requests of the scenario with their draws (fresh objects on every call)."""
    jobs: list[SimJob] = []
    ids = itertools.count()
    s = scenario
    for m, offset in enumerate(s.miner_offsets()):
        for i in range(s.deadlines_per_miner):
            opens = s.lookback + offset + i * s.deadline_period
            due = opens + s.challenge_window - s.submit_margin
            for p in range(s.partitions[m]):
                rng = _rng(s.seed, "wd", m, i, p)
                vanilla = s.vanilla.draw(rng)
                if s.snark_model != "partition":
                    snark = s.snark.mean * rng.uniform(1 - s.snark_jitter, 1 + s.snark_jitter)
                else:
                    snark = s.snark.draw(rng)
                jobs.append(
                    SimJob(next(ids), WINDOW_POST, m, i, opens - s.lookback, due, vanilla, snark)
                )
    horizon = s.horizon()
    if s.winning_rate > 0:
        for m in range(s.miners):
            rng = _rng(s.seed, "win", m)
            t = rng.expovariate(s.winning_rate / 3600.0)
            while t < horizon:
                jobs.append(
                    SimJob(
                        next(ids),
                        WINNING_POST,
                        m,
                        -1,
                        t,
                        t + s.winning_budget,
                        0.0,
                        s.winning_gpu.draw(rng),
                    )
                )
                t += rng.expovariate(s.winning_rate / 3600.0)
    jobs.sort(key=lambda j: (j.release, j.job_id))
    return Workload(tuple(jobs))


# -- the capacity bound -------------------------------------------------------------------------


def _intervals_max_ratio(items: list[tuple[float, float, float]], capacity: float) -> float:
    """max over (a, d) of (work released >= a and due <= d) / (capacity * (d - a))."""
    releases = sorted({r for r, _, _ in items}, reverse=True)
    dues = sorted({d for _, d, _ in items})
    by_release: dict[float, list[tuple[float, float]]] = {}
    for r, d, w in items:
        by_release.setdefault(r, []).append((d, w))
    work_by_due = dict.fromkeys(dues, 0.0)
    worst = 0.0
    for a in releases:  # add jobs released at a or later, then scan dues in order
        for d, w in by_release[a]:
            work_by_due[d] += w
        acc = 0.0
        for d in dues:
            acc += work_by_due[d]
            if d > a and acc > 0:
                worst = max(worst, acc / (capacity * (d - a)))
    return worst


def capacity_bound(scenario: Scenario) -> float:
    """The load (total partitions per deadline, split evenly) at which the mean GPU work due by
    some deadline equals the GPU time available before it."""
    s = scenario
    items = []
    for offset in s.miner_offsets():
        for i in range(s.deadlines_per_miner):
            opens = s.lookback + offset + i * s.deadline_period
            # one partition's mean work per miner-deadline, for a load of one partition per miner
            items.append(
                (opens - s.lookback, opens + s.challenge_window - s.submit_margin, s.snark.mean)
            )
    # at one partition per miner per deadline
    ratio = _intervals_max_ratio(items, s.gpu_capacity())
    return s.miners / ratio


def realized_capacity_bound(scenario: Scenario) -> int:
    """The largest whole load (total partitions per deadline) whose drawn SNARK work passes the
    capacity bound's interval test (`realized_overload` <= 1): above it, no schedule of these
    very draws meets every WindowPoSt deadline. Draws are nested, so the test is monotone."""

    def fits(total: int) -> bool:
        return (
            realized_overload(
                generate(scenario.with_total_partitions(total)), scenario.gpu_capacity()
            )
            <= 1
        )

    return _highest(fits, max(1, math.ceil(capacity_bound(scenario))))


def _highest(ok: Callable[[int], bool], guess: int) -> int:
    """The largest whole load n >= 0 with ok(n), by doubling `guess` while ok, then bisection
    (0 if ok holds for no positive load). Assumes ok is monotone: true, then false."""
    lo, hi = 0, guess
    while ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def realized_overload(workload: Workload, capacity: float) -> float:
    """For these very draws: the largest work/time ratio over all (release, due) intervals of
    WindowPoSt SNARK work, on GPUs doing `capacity` seconds of work per second (the number of
    GPUs when all have speed 1; `Scenario.gpu_capacity`). Above 1.0 no schedule can meet every
    deadline."""
    items = [(j.release, j.due, j.gpu_work) for j in workload.jobs if j.stage == WINDOW_POST]
    return _intervals_max_ratio(items, capacity) if items else 0.0


# -- the engine ---------------------------------------------------------------------------------


class _Gpu:
    """A processor-sharing GPU; each lock domain (a TMPDIR) puts one proof at a time on it."""

    def __init__(self, index: int, horizon: float, speed: float = 1.0) -> None:
        self.index = index
        self.horizon = horizon
        self.speed = speed  # WindowPoSt SNARKs take gpu_work / speed seconds alone on it
        self.domains: dict[str, deque[SimJob]] = {}
        self.remaining: dict[int, float] = {}
        self.last = 0.0
        self.version = 0
        self.busy = 0.0

    def active(self) -> list[SimJob]:
        return [q[0] for q in self.domains.values() if q]

    def advance(self, now: float) -> None:
        active = self.active()
        if active and now > self.last:
            share = (now - self.last) / len(active)
            for job in active:
                self.remaining[job.job_id] -= share
            self.busy += max(0.0, min(now, self.horizon) - min(self.last, self.horizon))
        self.last = now

    def add(self, job: SimJob, domain: str, now: float) -> None:
        self.advance(now)
        self.domains.setdefault(domain, deque()).append(job)
        self.remaining[job.job_id] = self.work(job)

    def work(self, job: SimJob) -> float:
        """Seconds `job` takes alone on this GPU (WinningPoSt's few seconds are not scaled)."""
        return job.gpu_work / self.speed if job.stage == WINDOW_POST else job.gpu_work

    def remove(self, job: SimJob, now: float) -> None:
        self.advance(now)
        for q in self.domains.values():
            if job in q:
                q.remove(job)
        self.remaining.pop(job.job_id, None)

    def next_completion(self, now: float) -> tuple[float, SimJob] | None:
        active = self.active()
        if not active:
            return None
        job = min(active, key=lambda j: (self.remaining[j.job_id], j.job_id))
        return now + max(0.0, self.remaining[job.job_id]) * len(active), job


@dataclass(frozen=True, slots=True)
class _Slot:
    child_id: str
    stage: str
    gpu: int
    capacity: int
    domain: str  # bellperson lock domain (TMPDIR)


def _deployment(policy: str, gpus: int) -> list[_Slot]:
    out = []
    for g in range(gpus):
        if policy == "damocles":
            out.append(_Slot(f"wd{g}", WINDOW_POST, g, 1, f"tmp-wd{g}"))
            out.append(_Slot(f"win{g}", WINNING_POST, g, 1, f"tmp-win{g}"))
        elif policy == "damocles-c2":
            out.append(_Slot(f"wd{g}", WINDOW_POST, g, 2, f"tmp-gpu{g}"))
            out.append(_Slot(f"win{g}", WINNING_POST, g, 1, f"tmp-gpu{g}"))
        elif policy in (
            "damocles-ext",
            "damocles-ext-gpulock",
            "damocles-ext-nophase",
            "reference",
            "clairvoyant",
        ):
            out.append(_Slot(f"wd{g}", WINDOW_POST, g, 2, f"tmp-wd{g}"))
            out.append(_Slot(f"win{g}", WINNING_POST, g, 1, f"tmp-win{g}"))
        elif policy == "damocles-ext-split":
            out.append(_Slot(f"wd{g}", SNARK, g, 1, f"tmp-wd{g}"))
            out.append(_Slot(f"win{g}", WINNING_POST, g, 1, f"tmp-win{g}"))
        else:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    if policy == "damocles-ext-split":  # CPU only: vanilla proving needs no GPU
        out.append(_Slot("vanilla", VANILLA, -1, VANILLA_SLOTS_PER_GPU * gpus, "-"))
    return out


class _Engine:
    def __init__(self, scenario: Scenario, workload: Workload, policy: str) -> None:
        self.scenario = scenario
        self.policy = policy
        self.jobs = {j.job_id: j for j in workload.jobs}
        self.horizon = scenario.horizon()
        self.gpus = [_Gpu(g, self.horizon, speed) for g, speed in enumerate(scenario.gpu_speeds())]
        self.slots = {s.child_id: s for s in _deployment(policy, scenario.gpus)}
        self.heap: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.wake_at: float | None = None
        self.deciding = False
        self.reference = policy in ("reference", "clairvoyant")
        self.foresight = policy == "clairvoyant"  # orders ready SNARKs by their drawn duration
        # Its children report vanilla/SNARK progress.
        self.phases = policy in ("damocles-ext", "damocles-ext-gpulock")
        self.split = policy == "damocles-ext-split"
        # reference: (due, -duration if clairvoyant else 0, job id)
        self.ready_snarks: list[tuple[float, float, int]] = []
        self.fill_pending = False
        if self.reference:
            self.scheduler: Scheduler | None = None
            self.baseline = None
        elif policy in (
            "damocles-ext",
            "damocles-ext-gpulock",
            "damocles-ext-nophase",
            "damocles-ext-split",
        ):
            self.scheduler = Scheduler()
            gpulock = policy == "damocles-ext-gpulock"
            for s in self.slots.values():
                # Else GpuLock = false on WinningPoSt: no lock shared with the WindowPoSt child.
                locks = frozenset({f"gpu:{s.gpu}"}) if gpulock and s.gpu >= 0 else frozenset()
                self.scheduler.add_child(ChildSlots(s.child_id, s.stage, s.capacity, 1, locks))
                self.scheduler.child_ready(s.child_id, 0.0)
            self.baseline = None
        else:
            self.scheduler = None
            self.baseline = DamoclesDispatch(
                [BaselineChild(s.child_id, s.stage, s.capacity) for s in self.slots.values()],
                _rng(scenario.seed, "dispatch", policy),
            )

    def push(self, t: float, kind: str, data: Any) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, data))

    def run(self) -> None:
        for job in self.jobs.values():
            self.push(job.release, "arrive", job)
        if self.baseline is not None:
            # damocles-manager aborts a deadline's runner when its window closes.
            windows: dict[tuple[int, int], list[SimJob]] = {}
            for job in self.jobs.values():
                if job.stage == WINDOW_POST:
                    windows.setdefault((job.miner, job.deadline_index), []).append(job)
            for jobs in windows.values():
                self.push(jobs[0].due + self.scenario.submit_margin, "close", jobs)
        while self.heap:
            t, _, kind, data = heapq.heappop(self.heap)
            self.now = t
            if kind == "arrive":
                self.arrived(data)
            elif kind == "vanilla":
                job, token = data
                if job.state == "vanilla" and job.token == token:
                    self.to_gpu(job)
            elif kind == "gpu":
                g, version = data
                gpu = self.gpus[g]
                if gpu.version == version:
                    nxt = gpu.next_completion(gpu.last)
                    assert nxt is not None
                    job = nxt[1]
                    gpu.remove(job, t)
                    self.reschedule(gpu)
                    job.state, job.finish = "done", t
                    self.ended(job)
            elif kind == "progress":
                job, token = data
                if job.state == "gpu" and job.token == token:
                    self.report_snark(job)
            elif kind == "close":
                assert self.baseline is not None
                for job_id in self.baseline.expire(self, [job.job_id for job in data]):
                    self.jobs[job_id].state = "failed"  # dropped while waiting for its slot
            elif kind == "fill":
                self.fill_pending = False
                self.fill_gpus()
            elif kind == "wake" and self.wake_at == t:  # else superseded by an earlier wake
                self.wake_at = None
                self.decide()

    # dispatch plumbing

    def arrived(self, job: SimJob) -> None:
        if self.reference:
            if job.stage == WINDOW_POST:
                job.state, job.start = "vanilla", self.now
                self.push(self.now + job.vanilla, "vanilla", (job, job.token))
            else:
                gpu = min(self.gpus, key=lambda g: (len(g.active()), g.index))
                job.child = f"win{gpu.index}"
                self.to_gpu(job)
        elif self.scheduler is not None:
            stage = VANILLA if self.split and job.stage == WINDOW_POST else job.stage
            self.scheduler.submit(Job(job.job_id, stage, self.now, deadline=job.due), self.now)
            self.decide()
        else:
            self.baseline.arrived(self, job.job_id, job.stage)

    def ended(self, job: SimJob) -> None:
        if self.reference:
            self.fill_gpus()
        elif self.scheduler is not None:
            self.scheduler.finished(self._sched_id(job), self.now)
            self.decide()
        else:
            self.baseline.finished(self, job.job_id)

    def decide(self) -> None:
        sched = self.scheduler
        assert sched is not None
        if self.deciding:  # an event raised while acting on decisions: the loop below re-decides
            return
        self.deciding = True
        try:
            self._decide(sched)
        finally:
            self.deciding = False

    def _decide(self, sched: Scheduler) -> None:
        while decisions := sched.decide(self.now):
            for d in decisions:
                job = self.jobs[d.request_id % _SNARK_ID]
                if isinstance(d, Start):
                    if d.request_id >= _SNARK_ID:  # split: the SNARK step of a vanilla done
                        job.child = d.child_id
                        self.to_gpu(job)
                    else:
                        self.start_job(job.job_id, d.child_id)
                elif isinstance(d, Fail):
                    job.state = "failed"
                elif isinstance(d, CancelRunning):
                    self.abort(job)
                    job.state = "cancelled"
                    sched.finished(d.request_id, self.now)
        wake = sched.next_wakeup()
        if wake is not None and (self.wake_at is None or wake < self.wake_at):
            self.wake_at = wake
            self.push(wake, "wake", None)

    # what a child does with a request

    def _sched_id(self, job: SimJob) -> int:
        """The scheduler's id for the step of `job` that is running now."""
        split_snark = self.split and job.stage == WINDOW_POST and job.state != "vanilla"
        return job.job_id + _SNARK_ID if split_snark else job.job_id

    def start_job(self, job_id: int, child_id: str) -> None:
        job = self.jobs[job_id]
        job.child, job.start, job.state = child_id, self.now, "vanilla"
        job.token += 1
        if job.vanilla > 0:
            self.push(self.now + job.vanilla, "vanilla", (job, job.token))
        else:
            self.to_gpu(job)

    def fill_gpus(self) -> None:
        # The fastest idle GPU first: the yardsticks know each GPU's speed (a scheduler learns it
        # from the SNARK times it sees).
        for gpu in sorted(self.gpus, key=lambda g: (-g.speed, g.index)):
            if not gpu.domains.get(f"tmp-wd{gpu.index}") and self.ready_snarks:
                *_, job_id = heapq.heappop(self.ready_snarks)
                job = self.jobs[job_id]
                job.child = f"wd{gpu.index}"
                self.to_gpu(job)

    def to_gpu(self, job: SimJob) -> None:
        if self.split and job.stage == WINDOW_POST and job.state == "vanilla":  # vanilla step done
            assert self.scheduler is not None
            self.scheduler.finished(job.job_id, self.now)
            job.state, job.child = "ready", None
            self.scheduler.submit(
                Job(job.job_id + _SNARK_ID, SNARK, self.now, deadline=job.due), self.now
            )
            self.decide()
            return
        if job.child is None:  # reference: vanilla done, wait for any GPU
            job.state = "ready"
            longest_first = -job.gpu_work if self.foresight else 0.0
            heapq.heappush(self.ready_snarks, (job.due, longest_first, job.job_id))
            # Fill idle GPUs once every event of this instant is in, so that SNARKs made ready at
            # the same moment are chosen among together (the clairvoyant's longest first).
            if not self.fill_pending:
                self.fill_pending = True
                self.push(self.now, "fill", None)
            return
        slot = self.slots[job.child]
        gpu = self.gpus[slot.gpu]
        job.state = "gpu"
        gpu.add(job, slot.domain, self.now)
        self.reschedule(gpu)
        if self.phases and job.stage == WINDOW_POST:
            self.report_snark(job)

    _STEPS = 1000  # progress resolution of a simulated SNARK: done/total with total = 1000

    def report_snark(self, job: SimJob) -> None:
        """What a dext child says while a SNARK runs: phase "snark", done/total so far."""
        assert self.scheduler is not None
        gpu = self.gpus[self.slots[job.child].gpu]
        gpu.advance(self.now)
        work = gpu.work(job)
        fraction = 1.0 - gpu.remaining[job.job_id] / work if work > 0 else 0.0
        done = max(0, min(self._STEPS, math.floor(fraction * self._STEPS)))
        self.scheduler.progress(job.job_id, "snark", done, self._STEPS, self.now)
        self.decide()
        if self.scenario.progress_interval > 0:
            self.push(self.now + self.scenario.progress_interval, "progress", (job, job.token))

    def abort(self, job: SimJob) -> None:
        if job.state == "gpu":
            gpu = self.gpus[self.slots[job.child].gpu]
            gpu.remove(job, self.now)
            self.reschedule(gpu)
        job.token += 1  # a pending vanilla completion is void

    def reschedule(self, gpu: _Gpu) -> None:
        gpu.version += 1
        nxt = gpu.next_completion(gpu.last)
        if nxt is not None:
            self.push(nxt[0], "gpu", (gpu.index, gpu.version))

    def finish_accounting(self) -> None:
        for gpu in self.gpus:
            gpu.advance(max(self.now, self.horizon))


# -- results ------------------------------------------------------------------------------------


@dataclass
class PolicyResult:
    """Outcome of one policy on one workload. Slacks are in seconds (negative: late)."""

    policy: str
    wdpost_deadlines: int
    wdpost_deadlines_missed: int
    wdpost_partitions: int
    wdpost_partitions_late: int
    wdpost_partitions_abandoned: int  # failed in the queue or cancelled at the deadline
    winning: int
    winning_missed: int
    gpu_busy_fraction: float
    min_slack: float | None  # None when some deadline was abandoned (no completion time)
    p1_slack: float | None
    winning_p99_latency: float | None

    @property
    def missed(self) -> int:
        return self.wdpost_deadlines_missed + self.winning_missed


def _percentile(sorted_values: list[float], q: float) -> float:
    rank = max(1, math.ceil(q * len(sorted_values)))  # nearest rank
    return sorted_values[rank - 1]


def _result(policy: str, engine: _Engine) -> PolicyResult:
    per_deadline: dict[tuple[int, int], list[SimJob]] = {}
    winning = []
    for job in engine.jobs.values():
        if job.stage == WINDOW_POST:
            per_deadline.setdefault((job.miner, job.deadline_index), []).append(job)
        else:
            winning.append(job)
    slacks = []
    missed = late = abandoned = 0
    for jobs in per_deadline.values():
        if any(j.finish is None for j in jobs):
            abandoned += sum(j.finish is None for j in jobs)
            late += sum(j.finish is not None and j.finish > j.due for j in jobs)
            missed += 1
            slacks.append(-math.inf)
            continue
        late += sum(j.finish > j.due for j in jobs)
        slack = jobs[0].due - max(j.finish for j in jobs)
        missed += slack < 0
        slacks.append(slack)
    slacks.sort()
    latencies = sorted(
        (j.finish - j.release) if j.finish is not None else math.inf for j in winning
    )
    win_missed = sum(j.finish is None or j.finish > j.due for j in winning)
    busy = sum(g.busy for g in engine.gpus) / (engine.scenario.gpus * engine.horizon)

    def finite(x: float | None) -> float | None:
        return None if x is None or math.isinf(x) else round(x, 3)

    return PolicyResult(
        policy=policy,
        wdpost_deadlines=len(per_deadline),
        wdpost_deadlines_missed=missed,
        wdpost_partitions=sum(len(v) for v in per_deadline.values()),
        wdpost_partitions_late=late,
        wdpost_partitions_abandoned=abandoned,
        winning=len(winning),
        winning_missed=win_missed,
        gpu_busy_fraction=round(busy, 4),
        min_slack=finite(slacks[0]) if slacks else None,
        p1_slack=finite(_percentile(slacks, 0.01)) if slacks else None,
        winning_p99_latency=finite(_percentile(latencies, 0.99)) if latencies else None,
    )


def resolve_policies(names: list[str] | tuple[str, ...]) -> list[str]:
    """Map 'a'/'b'/'c' or full names to policy names; ValueError names the unknown one."""
    out = []
    for name in names:
        full = POLICY_ALIASES.get(name, name)
        if full not in POLICIES:
            known = ", ".join(
                [f"{k} ({v})" for k, v in POLICY_ALIASES.items()] + ["reference", "clairvoyant"]
            )
            raise ValueError(f"unknown policy {name!r}; choose from {known}")
        out.append(full)
    return out


def simulate(
    scenario: Scenario, policies: list[str] | tuple[str, ...] = DEFAULT_POLICIES
) -> dict[str, PolicyResult]:
    """Run each policy on the same generated workload (same seed, same draws)."""
    return {p: run_workload(scenario, generate(scenario), p) for p in resolve_policies(policies)}


def run_workload(scenario: Scenario, workload: Workload, policy: str) -> PolicyResult:
    """Run one policy on a given workload (its jobs are updated in place with their outcome)."""
    [policy] = resolve_policies([policy])
    engine = _Engine(scenario, workload, policy)
    engine.run()
    engine.finish_accounting()
    return _result(policy, engine)


def max_missfree_load(
    scenario: Scenario,
    policy: str,
    *,
    winning: bool = True,
    upper: int | None = None,
    _cache: dict[int, PolicyResult] | None = None,
) -> int:
    """Highest total partitions per deadline with no miss, by bisection with the scenario's seed.

    `winning=False` counts only WindowPoSt misses. Bisection assumes misses are monotone in the
    load; the nested draws (see module notes) make that nearly, not strictly, true.
    """
    [policy] = resolve_policies([policy])
    cache = {} if _cache is None else _cache

    def ok(total: int) -> bool:
        if total not in cache:
            cache[total] = simulate(scenario.with_total_partitions(total), [policy])[policy]
        r = cache[total]
        return (r.missed if winning else r.wdpost_deadlines_missed) == 0

    guess = upper if upper is not None else max(2, math.ceil(capacity_bound(scenario) * 1.25))
    return _highest(ok, guess)


def bisect_report(scenario: Scenario, policies: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Each policy's highest miss-free load (all misses; WindowPoSt only) and its fraction of
    the capacity bound and of the realized bound (the same test on the drawn durations)."""
    bound = capacity_bound(scenario)
    realized = realized_capacity_bound(scenario)
    out: dict[str, Any] = {
        "capacity_bound_partitions": round(bound, 3),
        "realized_bound_partitions": realized,
        "policies": {},
    }
    for policy in resolve_policies(policies):
        cache: dict[int, PolicyResult] = {}
        every = max_missfree_load(scenario, policy, _cache=cache)
        wdpost = max_missfree_load(scenario, policy, winning=False, _cache=cache)
        out["policies"][policy] = {
            "max_missfree_partitions": every,
            "fraction_of_bound": round(every / bound, 4),
            "fraction_of_realized_bound": round(every / realized, 4) if realized else None,
            "max_missfree_partitions_wdpost_only": wdpost,
            "fraction_of_bound_wdpost_only": round(wdpost / bound, 4),
        }
    return out


def format_bisect(doc: dict[str, Any]) -> str:
    """The bisection results as a plain-text table."""
    head = ("policy", "miss-free load", "of bound", "of realized", "WdPoSt-only load", "of bound")
    rows = [head]
    for name, r in doc["policies"].items():
        of_realized = r["fraction_of_realized_bound"]
        rows.append(
            (
                name,
                str(r["max_missfree_partitions"]),
                f"{r['fraction_of_bound']:.1%}",
                "-" if of_realized is None else f"{of_realized:.1%}",
                str(r["max_missfree_partitions_wdpost_only"]),
                f"{r['fraction_of_bound_wdpost_only']:.1%}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = (
        f"highest miss-free load (partitions per deadline, all miners; capacity bound "
        f"{doc['capacity_bound_partitions']:.2f}, realized bound "
        f"{doc['realized_bound_partitions']} for these draws)"
    )
    return title + "\n" + "\n".join(lines)


def describe(scenario: Scenario, doc: dict[str, Any]) -> str:
    """One paragraph: what was simulated, the bound and how loaded it is."""
    s = scenario
    offsets = (
        s.offsets
        if isinstance(s.offsets, str)
        else "offsets " + ",".join(f"{o:g}s" for o in s.offsets)
    )
    jitter = ""
    if s.snark_model != "partition":
        speeds = s.gpu_speeds()[:1] if s.snark_model == "machine" else s.gpu_speeds()
        times = "/".join(f"{s.snark.mean / v:.0f}s" for v in speeds)
        jitter = f": {times}, +-{s.snark_jitter:.0%}"
    return (
        f"{s.miners} miners ({offsets}), {s.gpus} GPUs, {s.total_partitions} partitions per "
        f"deadline ({','.join(map(str, s.partitions))} per miner), {s.hours:g} h, seed {s.seed}; "
        f"SNARK {s.snark.low:g}-{s.snark.high:g}s ({s.snark_model} model{jitter}; "
        f"progress every {s.progress_interval:g}s), "
        f"vanilla {s.vanilla.low:g}-{s.vanilla.high:g}s, "
        f"WinningPoSt {s.winning_gpu.low:g}-{s.winning_gpu.high:g}s at "
        f"{s.winning_rate:g}/h/miner, submit margin {s.submit_margin:g}s.\n"
        f"capacity bound {doc['capacity_bound_partitions']:.2f} partitions per deadline; "
        f"load {doc['load_fraction_of_bound']:.1%} of it; realized work/time peak "
        f"{doc['realized_overload']:.3f} (above 1: no schedule meets every deadline)"
    )


def report(scenario: Scenario, results: dict[str, PolicyResult]) -> dict[str, Any]:
    """The JSON form of a run: scenario, bound, per-policy results."""
    sc = asdict(scenario)
    sc["miners"] = scenario.miners
    sc["total_partitions"] = scenario.total_partitions
    bound = capacity_bound(scenario)
    return {
        "scenario": sc,
        "capacity_bound_partitions": round(bound, 3),
        "load_fraction_of_bound": round(scenario.total_partitions / bound, 4),
        "realized_overload": round(
            realized_overload(generate(scenario), scenario.gpu_capacity()), 4
        ),
        "results": {name: asdict(r) for name, r in results.items()},
    }


def format_table(results: dict[str, PolicyResult]) -> str:
    """A plain-text table of the results, one row per policy."""
    head = (
        "policy",
        "WdPoSt missed",
        "late parts",
        "WinPoSt missed",
        "GPU busy",
        "min slack",
        "p1 slack",
        "WinPoSt p99",
    )
    rows = [head]

    def secs(x: float | None) -> str:
        return "abandoned" if x is None else f"{x:.0f}s"

    for name, r in results.items():
        rows.append(
            (
                name,
                f"{r.wdpost_deadlines_missed}/{r.wdpost_deadlines}",
                f"{r.wdpost_partitions_late + r.wdpost_partitions_abandoned}/{r.wdpost_partitions}",
                f"{r.winning_missed}/{r.winning}",
                f"{r.gpu_busy_fraction:.1%}",
                secs(r.min_slack),
                secs(r.p1_slack),
                "-" if r.winning_p99_latency is None else f"{r.winning_p99_latency:.1f}s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = [
    "POLICIES",
    "PolicyResult",
    "Scenario",
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
