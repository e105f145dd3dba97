"""A child and a running job as the dispatch policy (`policy.Scheduler`) keeps them, and what it
works out from them alone: when a pipelined child's GPU frees, how many jobs a child may hold.

Quick requests queue in their child. A child whose Hello offers a `queue` (the built-in runtime
offers 16) may take that many jobs beyond its capacity while its answers are quick: its last
QUICK_RUN answers each came within QUICK_ANSWER of its turn (the moment it got a slot of the
child's capacity), and it has no locks and is not pipelined. A job queued there waits in the child
instead of a pipe round trip through the supervisor, so short requests stream; a child with a
free slot is still chosen first (least loaded, among children not pipelined). No job is sent
behind work that has held every slot for TAKE_BACK_AFTER, and a job queued behind such work is
taken back (`TakeBack`: the supervisor cancels it there and queues it again, at no cost to its
attempts); the child then takes no extra job until it is quick again. A long proof holds back
no other request for longer than that.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ..wording import some_and_more
from .breaker import Streak
from .decisions import ChildSlots, Decision, Job, TakeBack
from .queues import JobQueues

#: Queued jobs in a child (see "Quick requests"): an answer within QUICK_ANSWER seconds of its
#: turn is quick; QUICK_RUN of them in a row let the child take its queue; a job queued behind
#: work running TAKE_BACK_AFTER seconds is taken back.
QUICK_ANSWER = 0.01
QUICK_RUN = 16
TAKE_BACK_AFTER = 0.05

#: How many recent phase durations the estimates remember (per stage for vanilla, per child for
#: the GPU phase): enough to smooth noise, few enough to follow a GPU that slows down.
_HISTORY = 16
#: How many recent proofs of a child's stage, of a job's kind and no bigger than it, judge its
#: start doomed (doomed.py): the fastest of the last that many, and only once that many are
#: known, among the last RUNS_KEPT proofs (of any size) a child remembers.
RUNS_KNOWN = 4
RUNS_KEPT = 32


@dataclass(slots=True)
class _Child:
    info: ChildSlots
    order: int
    ready: bool = False
    fatal: bool = False
    running: set[int] = field(default_factory=set)
    current_weight: int = 0  # smooth weighted round robin state
    pipelined: bool = False  # a job here reported a GPU phase: see "Pipelining"
    reports_fraction: bool = False  # ... and how far it got within it
    gpu_times: deque[float] = field(default_factory=lambda: deque(maxlen=_HISTORY))
    #: Its last proofs of sized jobs: (kind, size, seconds from its slot to its proof); and a
    #: WinningPoSt's cancel at its deadline: the seconds it had run, at least (doomed.in_time).
    run_times: deque[tuple[str, int, float]] = field(
        default_factory=lambda: deque(maxlen=RUNS_KEPT)
    )
    run_max: float = -math.inf  # the longest of them (doomed.py's bound on every estimate)
    queue: int = 0  # jobs it takes beyond capacity while quick (its Hello's offer)
    quick: int = 0  # its quick answers in a row
    ahead_turn: float = 0.0  # the last time one of its jobs got a slot of its capacity
    slots: int = 0  # jobs it may hold now: its capacity, and its queue while quick (_set_slots)
    behind: deque[_Running] = field(default_factory=deque)  # its jobs behind, in start order
    streak: Streak = field(default_factory=Streak)  # its answers, for the breaker

    @property
    def state(self) -> str:
        if self.fatal:
            return "fatal"
        return "ready" if self.ready else "down"


class _Running(msgspec.Struct):
    job: Job
    child_id: str
    started: float = 0.0
    cancelled: bool = False
    gpu_since: float | None = None  # reported a GPU phase at this time
    gpu_turn: float | None = None  # when its GPU work really began (after the one before it)
    gpu_done: bool = False  # reported a non-GPU phase after its GPU phase
    fraction: float = 0.0  # of the GPU phase, from done/total
    fraction_at: float = 0.0
    seq: int = 0  # start order (the order decide() reports passed deadlines in)
    behind: bool = False  # queued in its child behind the jobs that fill its capacity
    turn: float = 0.0  # when it got a slot of its child's capacity (its start, unless behind)


def gpu_free_at(child: _Child, runs: list[_Running]) -> float | None:
    """When the GPU work of the child's running jobs is estimated to end: +inf while one is
    still before its GPU phase, None when there is nothing to estimate from yet."""
    # A child that reports done/total within its GPU phase will soon tell how fast this one
    # goes: until then assume a typical one. A child that only reports the phase change never
    # will: assume the shortest seen, since holding a job back too long idles the GPU.
    times = child.gpu_times
    if not times:
        shortest = None
    elif child.reports_fraction:
        shortest = sum(times) / len(times)
    else:
        shortest = min(times)
    if any(run.gpu_since is None and not run.gpu_done for run in runs):
        return math.inf  # whatever the order of the runs (a child's are kept in a set)
    end = -math.inf
    queued_gpu_work = 0.0
    for run in runs:
        if run.gpu_done:
            continue
        if run.gpu_turn is None:  # waiting behind another GPU phase of this child
            if shortest is None:
                return None
            queued_gpu_work += shortest
        elif run.fraction > 0:
            end = max(end, run.gpu_turn + (run.fraction_at - run.gpu_turn) / run.fraction)
        elif shortest is not None:
            end = max(end, run.gpu_turn + shortest)
        else:
            return None
    if queued_gpu_work and end == -math.inf:
        return None  # jobs wait for a GPU phase that no longer runs here: no estimate
    return end + queued_gpu_work


def round_robin(eligible: list[tuple[float, float, _Child]]) -> _Child:
    """The child to take a job among `eligible` ones (when its GPU frees, its load, the child):
    of those that free first and are the least loaded, by smooth weighted round robin over
    their weights (nginx's algorithm; ties go to the child registered first)."""
    best_key = min([(free_at, load) for free_at, load, _ in eligible])  # (a list: one call)
    candidates = [c for free_at, load, c in eligible if (free_at, load) == best_key]
    total = 0
    best: _Child | None = None
    for c in candidates:
        c.current_weight += c.info.weight
        total += c.info.weight
        if best is None or c.current_weight > best.current_weight:
            best = c
    assert best is not None
    best.current_weight -= total
    return best


def set_slots(c: _Child, quick_run: int) -> None:
    """How many jobs `c` may hold now: its capacity, and its queue while it is quick (its last
    `quick_run` answers were; see the policy's "Quick requests"). Not with locks or pipelining:
    a job queued there would hold a lock, or wait for a GPU, that another child could use."""
    quick = c.queue and c.quick >= quick_run and not (c.pipelined or c.info.locks)
    c.slots = c.info.capacity + (c.queue if quick else 0)


def promote(child: _Child, now: float) -> bool:
    """A slot of `child` freed (the job that held it is no longer in `child.running`): the
    earliest jobs behind take the free slots (the child runs them in order). True if none is
    left behind."""
    behind = child.behind
    free = child.info.capacity - (len(child.running) - len(behind))
    while free > 0 and behind:
        run = behind.popleft()
        run.behind = False
        run.turn = child.ahead_turn = now
        free -= 1
    return not behind


def take_back(child: _Child, why: str) -> list[TakeBack]:
    """Take back every job behind on `child`, in start order; each stays on it, cancelled, until
    the child answers (its Cancel), and counts as none of its quick answers."""
    out = []
    for run in child.behind:
        run.behind = False
        run.cancelled = True
        out.append(TakeBack(run.job.request_id, child.info.child_id, why))
    child.behind.clear()
    return out


def gpu_phase_ended(
    child: _Child,
    run: _Running,
    runs_on: Callable[[_Child], list[_Running]],
    now: float,
    *,
    learn: bool,
) -> None:
    """`run`'s GPU phase is over (it finished, or reported a later phase): learn its length, and
    the next job of `child` waiting for the GPU gets it now."""
    if run.gpu_since is None or run.gpu_done:
        return
    if learn and run.gpu_turn is not None:
        child.gpu_times.append(now - run.gpu_turn)
    waiting = [
        (r.gpu_since, r)
        for r in runs_on(child)
        if r is not run and r.gpu_since is not None and r.gpu_turn is None and not r.gpu_done
    ]
    if waiting:
        min(waiting, key=lambda pair: pair[0])[1].gpu_turn = now


def note_run(child: _Child, kind: str, size: int, seconds: float) -> None:
    """`child` proved a job of `kind` and `size` in `seconds`: kept among its run times, and
    its `run_max` the longest of them again."""
    times = child.run_times
    evicted = times[0][2] if len(times) == times.maxlen else -math.inf
    times.append((kind, size, seconds))
    if seconds >= child.run_max:
        child.run_max = seconds
    elif evicted >= child.run_max:  # the longest went: the next longest (RUNS_KEPT at most)
        child.run_max = max(run for _, _, run in times)


def beyond_any_run(job: Job, children: list[_Child], now: float) -> bool:
    """Whether `job`'s deadline is further than any run its stage's children remember: no
    estimate of it (the fastest of some of them) can doom it, and `judge` need not look (its
    verdict: no hold, no refusal; only when time would change that is left unsaid)."""
    assert job.deadline is not None
    left = job.deadline - now
    for c in children:  # noqa: SIM110  (a plain loop: per request, two or three children)
        if c.run_max >= left:
            return False
    return True


def live_deadline(entry: tuple[float, int, int], running: dict[int, _Running]) -> bool:
    """Whether a deadline heap's entry (deadline, start seq, request id) is of a job still running
    and not cancelled."""
    run = running.get(entry[2])
    return run is not None and run.seq == entry[1] and not run.cancelled


def passed_deadlines(
    heap: list[tuple[float, int, int]], running: dict[int, _Running], now: float, by_heap: bool
) -> list[tuple[_Running, float]]:
    """Pop the heap's entries due by `now`: the running jobs not cancelled among them, with their
    deadline, in start order (`by_heap` False: found by looking at every running job, the heap
    left alone, as the full recomputation does)."""
    if not by_heap:
        runs = running.values()
        return [(r, d) for r in runs if not r.cancelled and (d := r.job.deadline) is not None and now >= d]  # fmt: skip
    if not heap or heap[0][0] > now:
        return []
    due = []
    while heap and heap[0][0] <= now:
        entry = heapq.heappop(heap)
        if live_deadline(entry, running):
            due.append((running[entry[2]], entry[0]))
    due.sort(key=lambda pair: pair[0].seq)
    return due


def timed_due(
    heap: list[tuple[float, int, int]], held_until: dict[str, float], queues: JobQueues, now: float
) -> bool:
    """Whether a deadline (of the deadline `heap` of running jobs, or of a queued job) or a hold
    (doomed.py's, per stage `held_until`) may be due by `now` (the heaps drop entries lazily: an
    entry of a job gone may say so sooner)."""
    if (heap and heap[0][0] <= now) or (held_until and now >= min(held_until.values())):
        return True
    return bool(queues.with_deadline) and queues.deadline_due(now)


def take_back_due(
    children: dict[str, _Child],
    queueing: set[str],
    now: float,
    after: float,
    quick_run: int,
    out: list[Decision],
) -> list[_Child]:
    """Take back the jobs behind on every child of `queueing` whose latest job ahead has had its
    slot for `after` seconds (into `out`, children in order); those children, no longer
    queueing nor quick."""
    due = [child for cid in queueing if now >= (child := children[cid]).ahead_turn + after]
    due.sort(key=lambda c: c.order)
    for child in due:
        queueing.discard(child.info.child_id)
        child.quick = 0
        set_slots(child, quick_run)
        out += take_back(child, f"queued behind work running over {after:g}s")
    return due


def take_back_at(children: dict[str, _Child], queueing: set[str], after: float) -> float:
    """When jobs behind are next taken back: once the latest job to get a slot ahead of them on
    their child (one of `queueing`) has had it for `after` seconds (inf: no such child)."""
    first = math.inf
    for cid in queueing:  # a loop, not min(): once or twice per request
        turn = children[cid].ahead_turn
        if turn < first:
            first = turn
    return first + after


def drop_running(
    child: _Child, running: dict[int, _Running], release: Callable[[_Running], None]
) -> list[Job]:
    """Forget the jobs running on `child` (`release` frees each one's slot and locks); they are
    returned by arrival."""
    child.behind.clear()
    jobs = []
    for rid in sorted(child.running, key=lambda r: (running[r].job.arrival, r)):
        run = running.pop(rid)
        release(run)
        jobs.append(run.job)
    return jobs


#: What `cannot_serve` says of a stage without children (a front end may put advice in its place).
NO_CHILDREN = "no {stage} children are configured"


def cannot_serve(stage: str, children: list[_Child]) -> str | None:
    """Why no child of `stage` (its `children`) can serve it, or None."""
    if not children:
        return NO_CHILDREN.format(stage=stage)
    for c in children:
        if not c.fatal:
            return None
    n = len(children)
    which = "the only child is" if n == 1 else f"all {n} children are"
    return f"no {stage} child can serve: {which} FATAL"


def what_kept(
    job: Job,
    children: list[_Child],
    lock_holders: dict[str, dict[str, int]],
    reserved: set[str],
    left_out: Callable[[_Child], bool],
) -> str:
    """What kept `job` from starting on each child of its stage (the first few), for the
    answer of a job whose deadline passed in its queue: " (waiting for: window_post#0: busy (2
    running); winning_post#0: lock gpu:0 held by window_post#0)"; "" with no child."""
    said = []
    for c in children:
        cid, held = c.info.child_id, held_elsewhere(c, lock_holders)
        if c.fatal or not c.ready:
            what = "FATAL (it will not start)" if c.fatal else "not ready (starting or restarting)"
        elif held:
            by = {lock: sorted(h for h in lock_holders[lock] if h != cid) for lock in held}
            what = "; ".join(f"lock {lock} held by {', '.join(by[lock])}" for lock in sorted(by))
        elif job.avoid and cid in job.avoid:
            what = "it failed this request before"
        elif left_out(c):
            what = "benched after errors in a row"
        elif len(c.running) >= c.info.capacity:
            what = f"busy ({len(c.running)} running)"
        elif c.info.locks & reserved:
            what = "its locks kept for a request ahead of this one"
        else:
            what = "free now: what held it ended too late"
        said.append(f"{cid}: {what}")
    return f" (waiting for: {some_and_more(said[:4], len(said), '; ')})" if said else ""


def held_elsewhere(child: _Child, lock_holders: dict[str, dict[str, int]]) -> set[str]:
    """The locks of `child` that another child holds (`lock_holders`: lock -> holders)."""
    cid = child.info.child_id
    return {
        lock
        for lock in child.info.locks
        if any(holder != cid for holder in lock_holders.get(lock, ()))
    }
