"""The simulated PoSt days: the scenario, its drawn workload, and the capacity bounds.

What the numbers mean (the chain timing, the SNARK models, the bound) is told in simulator.py's
notes; this module turns a `Scenario` into the `SimJob`s every policy runs (`generate`) and into
the bounds no schedule can beat (`capacity_bound`, `realized_capacity_bound`).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..stages import POST_STAGES, WINDOW_POST_SPLIT

WINDOW_POST, WINNING_POST = POST_STAGES
VANILLA, SNARK = WINDOW_POST_SPLIT  # the split WindowPoSt stages
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
    "ref": "reference",  # as the tables name it
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
            return (self.snark.mean / self.snark.draw(rng_for(self.seed, "machine")),) * self.gpus
        return tuple(
            self.snark.mean / self.snark.draw(rng_for(self.seed, "gpu", g))
            for g in range(self.gpus)
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
    state: str = "new"  # new, vanilla, gpu, done, failed, cancelled, refused
    child: str | None = None
    start: float | None = None
    finish: float | None = None
    token: int = 0


@dataclass(frozen=True, slots=True)
class Workload:
    """Every request of a run, sorted by release time."""

    jobs: tuple[SimJob, ...]


def rng_for(*key: object) -> random.Random:
    """A random generator of its own for `key`: one draw never shifts another's."""
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
                rng = rng_for(s.seed, "wd", m, i, p)
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
            rng = rng_for(s.seed, "win", m)
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

    return highest_passing(fits, max(1, math.ceil(capacity_bound(scenario))))


def highest_passing(ok: Callable[[int], bool], guess: int) -> int:
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
