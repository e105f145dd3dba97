"""The simulator's discrete-event engine: each policy's deployment, its dispatch, GPUs shared in
virtual time, and the outcome of a run (`PolicyResult`).

The model it carries out is told in simulator.py's notes; the workload comes from sim_scenario.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass

from .baselines import BaselineChild, DamoclesDispatch
from .policy import CancelRunning, ChildSlots, Fail, Job, Scheduler, Start
from .sim_scenario import (
    DEFAULT_POLICIES,
    POLICIES,
    POLICY_ALIASES,
    SNARK,
    VANILLA,
    VANILLA_SLOTS_PER_GPU,
    WINDOW_POST,
    WINNING_POST,
    Scenario,
    SimJob,
    Workload,
    capacity_bound,
    generate,
    highest_passing,
    rng_for,
)

#: Scheduler job id of a WindowPoSt partition's SNARK step in split mode (its vanilla step uses
#: the partition's own job id).
_SNARK_ID = 1 << 40


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


# The engine's events, by what happens then. A job's events carry the job's token as it was when
# they were queued: an abort bumps the token, which voids them.


@dataclass(frozen=True, slots=True)
class _Arrive:
    job: SimJob


@dataclass(frozen=True, slots=True)
class _VanillaDone:
    job: SimJob
    token: int


@dataclass(frozen=True, slots=True)
class _GpuCompletion:
    """The next SNARK on a GPU ends, unless the GPU's jobs changed since (`version`)."""

    gpu: int
    version: int


@dataclass(frozen=True, slots=True)
class _ProgressDue:
    job: SimJob
    token: int


@dataclass(frozen=True, slots=True)
class _WindowClose:
    """A deadline's challenge window closes: damocles-manager aborts its requests."""

    jobs: list[SimJob]


@dataclass(frozen=True, slots=True)
class _Fill:
    """The reference's idle GPUs take ready SNARKs, once an instant's events are all in."""


@dataclass(frozen=True, slots=True)
class _Wake:
    """The scheduler asked to decide again now (a deadline passes)."""


_Event = _Arrive | _VanillaDone | _GpuCompletion | _ProgressDue | _WindowClose | _Fill | _Wake


class _Engine:
    def __init__(
        self, scenario: Scenario, workload: Workload, policy: str, *, refuse_doomed: bool = True
    ) -> None:
        self.scenario = scenario
        self.policy = policy
        self.jobs = {j.job_id: j for j in workload.jobs}
        self.horizon = scenario.horizon()
        self.gpus = [_Gpu(g, self.horizon, speed) for g, speed in enumerate(scenario.gpu_speeds())]
        self.slots = {s.child_id: s for s in _deployment(policy, scenario.gpus)}
        # The sequence number orders events of one instant as they were pushed (and is unique:
        # events themselves are never compared).
        self.heap: list[tuple[float, int, _Event]] = []
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
        self.scheduler: Scheduler | None = None
        self.baseline: DamoclesDispatch | None = None
        if self.reference:
            pass
        elif policy in (
            "damocles-ext",
            "damocles-ext-gpulock",
            "damocles-ext-nophase",
            "damocles-ext-split",
        ):
            self.scheduler = Scheduler(refuse_doomed=refuse_doomed)
            gpulock = policy == "damocles-ext-gpulock"
            for s in self.slots.values():
                # Else GpuLock = false on WinningPoSt: no lock shared with the WindowPoSt child.
                locks = frozenset({f"gpu:{s.gpu}"}) if gpulock and s.gpu >= 0 else frozenset()
                self.scheduler.add_child(ChildSlots(s.child_id, s.stage, s.capacity, 1, locks))
                self.scheduler.child_ready(s.child_id, 0.0)
        else:
            self.baseline = DamoclesDispatch(
                [BaselineChild(s.child_id, s.stage, s.capacity) for s in self.slots.values()],
                rng_for(scenario.seed, "dispatch", policy),
            )

    def push(self, t: float, event: _Event) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), event))

    def run(self) -> None:
        for job in self.jobs.values():
            self.push(job.release, _Arrive(job))
        if self.baseline is not None:
            # damocles-manager aborts a deadline's runner when its window closes.
            windows: dict[tuple[int, int], list[SimJob]] = {}
            for job in self.jobs.values():
                if job.stage == WINDOW_POST:
                    windows.setdefault((job.miner, job.deadline_index), []).append(job)
            for jobs in windows.values():
                self.push(jobs[0].due + self.scenario.submit_margin, _WindowClose(jobs))
        while self.heap:
            t, _, event = heapq.heappop(self.heap)
            self.now = t
            match event:
                case _Arrive(job):
                    self.arrived(job)
                case _VanillaDone(job, token):
                    if job.state == "vanilla" and job.token == token:
                        self.to_gpu(job)
                case _GpuCompletion(g, version):
                    gpu = self.gpus[g]
                    if gpu.version == version:
                        nxt = gpu.next_completion(gpu.last)
                        assert nxt is not None
                        job = nxt[1]
                        gpu.remove(job, t)
                        self.reschedule(gpu)
                        job.state, job.finish = "done", t
                        self.ended(job)
                case _ProgressDue(job, token):
                    if job.state == "gpu" and job.token == token:
                        self.report_snark(job)
                case _WindowClose(jobs):
                    assert self.baseline is not None
                    for job_id in self.baseline.expire(self, [job.job_id for job in jobs]):
                        self.jobs[job_id].state = "failed"  # dropped while waiting for its slot
                case _Fill():
                    self.fill_pending = False
                    self.fill_gpus()
                case _Wake():
                    if self.wake_at == t:  # else superseded by an earlier wake
                        self.wake_at = None
                        self.decide()

    # dispatch plumbing

    def arrived(self, job: SimJob) -> None:
        if self.reference:
            if job.stage == WINDOW_POST:
                job.state, job.start = "vanilla", self.now
                self.push(self.now + job.vanilla, _VanillaDone(job, job.token))
            else:
                gpu = min(self.gpus, key=lambda g: (len(g.active()), g.index))
                job.child = f"win{gpu.index}"
                self.to_gpu(job)
        elif self.scheduler is not None:
            stage = VANILLA if self.split and job.stage == WINDOW_POST else job.stage
            size = 1 if stage == WINDOW_POST else 0  # one partition each (doomed.py)
            job_ = Job(job.job_id, stage, self.now, deadline=job.due, size=size, kind="sim")
            self.scheduler.submit(job_, self.now)
            self.decide()
        else:
            assert self.baseline is not None
            self.baseline.arrived(self, job.job_id, job.stage)

    def ended(self, job: SimJob) -> None:
        if self.reference:
            self.fill_gpus()
        elif self.scheduler is not None:
            self.scheduler.finished(self._sched_id(job), self.now, failed=False)  # a proof
            self.decide()
        else:
            assert self.baseline is not None
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
                elif isinstance(d, Fail):  # before its due time: refused as doomed
                    job.state = "refused" if self.now < job.due else "failed"
                elif isinstance(d, CancelRunning):
                    self.abort(job)
                    job.state = "cancelled"
                    sched.finished(d.request_id, self.now)
        wake = sched.next_wakeup()
        if wake is not None and (self.wake_at is None or wake < self.wake_at):
            self.wake_at = wake
            self.push(wake, _Wake())

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
            self.push(self.now + job.vanilla, _VanillaDone(job, job.token))
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
                self.push(self.now, _Fill())
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
        gpu = self._gpu_of(job)
        gpu.advance(self.now)
        work = gpu.work(job)
        fraction = 1.0 - gpu.remaining[job.job_id] / work if work > 0 else 0.0
        done = max(0, min(self._STEPS, math.floor(fraction * self._STEPS)))
        self.scheduler.progress(job.job_id, "snark", done, self._STEPS, self.now)
        self.decide()
        if self.scenario.progress_interval > 0:
            self.push(self.now + self.scenario.progress_interval, _ProgressDue(job, job.token))

    def abort(self, job: SimJob) -> None:
        if job.state == "gpu":
            gpu = self._gpu_of(job)
            gpu.remove(job, self.now)
            self.reschedule(gpu)
        job.token += 1  # a pending vanilla completion is void

    def reschedule(self, gpu: _Gpu) -> None:
        gpu.version += 1
        nxt = gpu.next_completion(gpu.last)
        if nxt is not None:
            self.push(nxt[0], _GpuCompletion(gpu.index, gpu.version))

    def _gpu_of(self, job: SimJob) -> _Gpu:
        """The GPU of the child `job` runs on (asked only of a job on a GPU)."""
        assert job.child is not None, f"job {job.job_id} is on no child"
        return self.gpus[self.slots[job.child].gpu]

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
    wdpost_partitions_in_time: int  # proved by their due time
    wdpost_partitions_cancelled: int  # cancelled at their deadline while running
    wdpost_partitions_refused: int  # answered before their deadline, not started: doomed
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
    wd = [job for jobs in per_deadline.values() for job in jobs]
    slacks = []
    missed = late = abandoned = 0
    for jobs in per_deadline.values():
        finished = [(j, j.finish) for j in jobs if j.finish is not None]
        late += sum(finish > j.due for j, finish in finished)
        if len(finished) < len(jobs):
            abandoned += len(jobs) - len(finished)
            missed += 1
            slacks.append(-math.inf)
            continue
        slack = jobs[0].due - max(finish for _, finish in finished)
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
        wdpost_partitions_in_time=sum(j.finish is not None and j.finish <= j.due for j in wd),
        wdpost_partitions_cancelled=sum(j.state == "cancelled" for j in wd),
        wdpost_partitions_refused=sum(j.state == "refused" for j in wd),
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
            known = ", ".join([f"{k} ({v})" for k, v in POLICY_ALIASES.items()] + ["clairvoyant"])
            raise ValueError(f"unknown policy {name!r}; choose from {known}")
        out.append(full)
    return out


def simulate(
    scenario: Scenario, policies: list[str] | tuple[str, ...] = DEFAULT_POLICIES
) -> dict[str, PolicyResult]:
    """Run each policy on the same generated workload (same seed, same draws)."""
    return {p: run_workload(scenario, generate(scenario), p) for p in resolve_policies(policies)}


def run_workload(
    scenario: Scenario, workload: Workload, policy: str, *, refuse_doomed: bool = True
) -> PolicyResult:
    """Run one policy on a given workload (its jobs are updated in place with their outcome);
    `refuse_doomed=False`: damocles-ext's scheduler starts doomed jobs all the same (doomed.py),
    to compare."""
    [policy] = resolve_policies([policy])
    engine = _Engine(scenario, workload, policy, refuse_doomed=refuse_doomed)
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
    return highest_passing(ok, guess)
