"""Which child gets which request, and when: the whole dispatch rule, sans-IO.

The supervisor (real time, real children) and the simulator (virtual time) drive the very same
`Scheduler` with events and act on the decisions it returns. Nothing here reads a clock or does
I/O: every method that depends on time takes `now`, a float in seconds on the caller's clock.

The rules, in one place:

* Queues. One queue per stage, ordered by deadline (earliest first, no deadline last), then
  priority (higher first), then arrival (first in, first out). A retried job (`requeue`) goes
  before every fresh job with the same deadline and priority; retries keep their original order
  among themselves. Deadline beats "retry first" on purpose: a retry is no more urgent than a job
  that is due sooner.
* Eligibility. A child can take a job when it is ready, has a free slot (running < capacity), and
  none of its locks is held by a job running on *another* child (jobs on the same child share its
  locks; that is what `Concurrent` means). Locks are shared across stages.
* Stage priority. `winning_post` is served before `window_post` (then any other stage, by name) at
  every decision. A waiting WinningPoSt reserves the locks that block it, so no lower-priority
  job can take or extend them: when such a lock frees, the WinningPoSt goes first.
* Choice of child. Among eligible children, the least loaded (running / capacity) first, so a job
  goes to a child that is idle now rather than queueing behind work in a busy one; among equally
  loaded children, smooth weighted round robin over `Weight` (nginx's algorithm, deterministic).
* Deadlines. A queued job whose deadline has passed fails without reaching a prover. A running job
  past its deadline gets one `Cancel`; the supervisor handles the grace period and the kill.
* No server. When a stage has no child that can ever serve (none configured, or all FATAL), its
  jobs fail at once. A child that is down but restarting still counts: jobs wait for it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

#: Stages served first at every decision; other stages follow in name order.
STAGE_PRIORITY: tuple[str, ...] = ("winning_post", "window_post")


@dataclass(frozen=True, slots=True)
class ChildInfo:
    """What the policy needs to know about one child (from its ChildSpec)."""

    child_id: str
    stage: str
    capacity: int = 1
    weight: int = 1
    locks: frozenset[str] = frozenset()


@dataclass(slots=True)
class Job:
    """A request waiting for or running on a child; `deadline` is on the caller's clock."""

    request_id: int
    stage: str
    arrival: float
    deadline: float | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Start:
    """Send request `request_id` to child `child_id` now."""

    request_id: int
    child_id: str


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer request `request_id` with an error; it was never (or is no longer) on a child."""

    request_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel running request `request_id` on child `child_id` (it passed its deadline)."""

    request_id: int
    child_id: str
    reason: str


Decision = Start | Fail | Cancel


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    """A snapshot for `status`: queues, children, locks."""

    queued: dict[str, int]
    nearest_deadline: dict[str, float | None]
    running: dict[str, int]
    children: dict[str, str]
    locks_held: dict[str, str]
    waiting_for_lock: dict[str, tuple[str, ...]]


@dataclass(slots=True)
class _Child:
    info: ChildInfo
    order: int
    ready: bool = False
    fatal: bool = False
    running: set[int] = field(default_factory=set)
    current_weight: int = 0  # smooth weighted round robin state

    @property
    def state(self) -> str:
        if self.fatal:
            return "fatal"
        return "ready" if self.ready else "down"


@dataclass(slots=True)
class _Running:
    job: Job
    child_id: str
    cancelled: bool = False


_FRESH, _RETRY = 1, 0  # retries sort first among equal deadline and priority


class Scheduler:
    """The dispatch policy: feed it events, call `decide(now)`, act on what it returns."""

    def __init__(self) -> None:
        self._children: dict[str, _Child] = {}
        self._by_stage: dict[str, list[_Child]] = {}
        # Per stage: a heap of (key, token, request_id); an entry is live while
        # self._queued[request_id] carries the same token (lazy deletion).
        self._heaps: dict[str, list[tuple[tuple[float, int, int, int], int, int]]] = {}
        self._queued: dict[int, tuple[int, Job]] = {}
        self._seq: dict[int, int] = {}  # arrival order, kept across retries
        self._running: dict[int, _Running] = {}
        self._lock_holders: dict[str, dict[str, int]] = {}  # lock -> child_id -> jobs running
        self._tokens = itertools.count()
        self._arrivals = itertools.count()

    # -- children ---------------------------------------------------------------------------

    def add_child(self, info: ChildInfo) -> None:
        """Register a child; it is not eligible until `child_ready`."""
        if info.child_id in self._children:
            raise ValueError(f"child {info.child_id!r} is already registered with the scheduler")
        if info.capacity < 1 or info.weight < 1:
            raise ValueError(
                f"child {info.child_id!r}: capacity and weight must be >= 1 "
                f"(got capacity={info.capacity}, weight={info.weight})"
            )
        child = _Child(info=info, order=len(self._children))
        self._children[info.child_id] = child
        self._by_stage.setdefault(info.stage, []).append(child)

    def child_ready(self, child_id: str, now: float) -> None:
        """The child said hello: it may take requests (this also clears FATAL)."""
        child = self._child(child_id)
        child.ready = True
        child.fatal = False

    def child_down(self, child_id: str, now: float) -> list[Job]:
        """The child exited or broke: it takes nothing more; returns the jobs it was running.

        Their slots and locks are freed; the caller retries them with `requeue` or fails them.
        """
        child = self._child(child_id)
        child.ready = False
        return self._drop_running(child)

    def child_fatal(self, child_id: str, now: float) -> list[Job]:
        """The child will not be restarted; it no longer counts as able to serve its stage.

        Normally `child_down` came first; any jobs still running on it are returned as there.
        """
        child = self._child(child_id)
        child.ready = False
        child.fatal = True
        return self._drop_running(child)

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, job: Job, now: float) -> None:
        """A new request: queue it (decide() starts or fails it)."""
        self._check_new(job)
        self._seq[job.request_id] = next(self._arrivals)
        self._enqueue(job, _FRESH)

    def requeue(self, job: Job, now: float) -> None:
        """Put a retried job back at the head of its queue (see the ordering rule above)."""
        self._check_new(job)
        self._seq.setdefault(job.request_id, next(self._arrivals))
        self._enqueue(job, _RETRY)

    def finished(self, request_id: int, now: float) -> bool:
        """The child answered `request_id`: free its slot and locks. False if it was not running."""
        run = self._running.pop(request_id, None)
        if run is None:
            return False
        self._release(run)
        self._seq.pop(request_id, None)
        return True

    def remove(self, request_id: int) -> bool:
        """Forget a request (e.g. its caller went away): drop it from its queue, or, if it is
        running, free its slot and locks as `finished` does. False if it was unknown."""
        if self._queued.pop(request_id, None) is not None:
            self._seq.pop(request_id, None)
            return True
        return self.finished(request_id, 0.0)

    # -- decisions --------------------------------------------------------------------------

    def decide(self, now: float) -> list[Decision]:
        """Everything to do now: starts, failures of expired or unservable jobs, cancels."""
        out: list[Decision] = []
        for run in self._running.values():
            if not run.cancelled and run.job.deadline is not None and now >= run.job.deadline:
                run.cancelled = True
                out.append(
                    Cancel(
                        run.job.request_id,
                        run.child_id,
                        f"request {run.job.request_id} passed its deadline "
                        f"{now - run.job.deadline:.1f}s ago while running on {run.child_id}",
                    )
                )
        reserved: set[str] = set()
        for stage in self._stage_order():
            heap = self._heaps[stage]
            reason = self._cannot_serve(stage)
            while (entry := self._peek(heap)) is not None:
                job = entry
                if reason is not None:
                    self._pop(heap)
                    out.append(Fail(job.request_id, reason))
                    continue
                if job.deadline is not None and now >= job.deadline:
                    self._pop(heap)
                    out.append(
                        Fail(
                            job.request_id,
                            f"deadline passed {now - job.deadline:.1f}s ago before the request "
                            "could start; it was not sent to a prover",
                        )
                    )
                    continue
                child = self._pick(stage, reserved)
                if child is None:
                    break
                self._pop(heap)
                self._start(job, child)
                out.append(Start(job.request_id, child.info.child_id))
            if self._peek(heap) is not None:
                reserved |= self._blocking_locks(stage)
        return out

    def next_wakeup(self) -> float | None:
        """The earliest time at which decide() has a deadline to act on, or None."""
        times = [
            run.job.deadline
            for run in self._running.values()
            if not run.cancelled and run.job.deadline is not None
        ]
        for heap in self._heaps.values():
            head = self._peek(heap)
            if head is not None and head.deadline is not None:
                times.append(head.deadline)
        return min(times, default=None)

    def statistics(self) -> SchedulerStatistics:
        """Queue lengths and nearest deadline per stage, running jobs per child, locks held."""
        queued: dict[str, int] = {stage: 0 for stage in self._heaps}
        for _, job in self._queued.values():
            queued[job.stage] = queued.get(job.stage, 0) + 1
        nearest: dict[str, float | None] = {}
        for stage, heap in self._heaps.items():
            head = self._peek(heap)
            nearest[stage] = head.deadline if head is not None else None
        return SchedulerStatistics(
            queued=queued,
            nearest_deadline=nearest,
            running={cid: len(c.running) for cid, c in self._children.items()},
            children={cid: c.state for cid, c in self._children.items()},
            locks_held={
                lock: ",".join(sorted(holders)) for lock, holders in self._lock_holders.items()
            },
            waiting_for_lock={
                stage: tuple(sorted(self._blocking_locks(stage)))
                for stage, heap in self._heaps.items()
                if self._peek(heap) is not None and self._blocking_locks(stage)
            },
        )

    def running_on(self, child_id: str) -> list[int]:
        """Request ids running on `child_id`, in start order."""
        return [rid for rid, run in self._running.items() if run.child_id == child_id]

    def is_queued(self, request_id: int) -> bool:
        """True while `request_id` waits in a queue."""
        return request_id in self._queued

    # -- internals --------------------------------------------------------------------------

    def _child(self, child_id: str) -> _Child:
        try:
            return self._children[child_id]
        except KeyError:
            raise KeyError(f"unknown child {child_id!r}: add_child() it first") from None

    def _check_new(self, job: Job) -> None:
        if job.request_id in self._queued or job.request_id in self._running:
            raise ValueError(f"request {job.request_id} is already queued or running")

    def _enqueue(self, job: Job, tier: int) -> None:
        token = next(self._tokens)
        deadline = math.inf if job.deadline is None else job.deadline
        key = (deadline, -job.priority, tier, self._seq[job.request_id])
        self._queued[job.request_id] = (token, job)
        heapq.heappush(self._heaps.setdefault(job.stage, []), (key, token, job.request_id))

    def _peek(self, heap: list) -> Job | None:
        while heap:
            _, token, rid = heap[0]
            live = self._queued.get(rid)
            if live is not None and live[0] == token:
                return live[1]
            heapq.heappop(heap)
        return None

    def _pop(self, heap: list) -> Job:
        _, _, rid = heapq.heappop(heap)
        return self._queued.pop(rid)[1]

    def _stage_order(self) -> list[str]:
        first = [s for s in STAGE_PRIORITY if s in self._heaps]
        return first + sorted(s for s in self._heaps if s not in STAGE_PRIORITY)

    def _cannot_serve(self, stage: str) -> str | None:
        children = self._by_stage.get(stage, [])
        if not children:
            return f"no {stage} children are configured"
        if all(c.fatal for c in children):
            n = len(children)
            which = "the only child is" if n == 1 else f"all {n} children are"
            return f"no {stage} child can serve: {which} FATAL"
        return None

    def _held_elsewhere(self, child: _Child) -> set[str]:
        cid = child.info.child_id
        return {
            lock
            for lock in child.info.locks
            if any(holder != cid for holder in self._lock_holders.get(lock, ()))
        }

    def _blocking_locks(self, stage: str) -> set[str]:
        # Locks that alone keep a ready child with a free slot from taking this stage's work.
        out: set[str] = set()
        for child in self._by_stage.get(stage, []):
            if child.ready and len(child.running) < child.info.capacity:
                out |= self._held_elsewhere(child)
        return out

    def _pick(self, stage: str, reserved: set[str]) -> _Child | None:
        eligible = [
            c
            for c in self._by_stage.get(stage, [])
            if c.ready
            and len(c.running) < c.info.capacity
            and not (c.info.locks & reserved)
            and not self._held_elsewhere(c)
        ]
        if not eligible:
            return None
        least = min(len(c.running) / c.info.capacity for c in eligible)
        candidates = [c for c in eligible if len(c.running) / c.info.capacity == least]
        # Smooth weighted round robin (nginx): ties go to the child registered first.
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

    def _start(self, job: Job, child: _Child) -> None:
        cid = child.info.child_id
        child.running.add(job.request_id)
        self._running[job.request_id] = _Running(job=job, child_id=cid)
        for lock in child.info.locks:
            holders = self._lock_holders.setdefault(lock, {})
            holders[cid] = holders.get(cid, 0) + 1

    def _release(self, run: _Running) -> None:
        child = self._children[run.child_id]
        child.running.discard(run.job.request_id)
        for lock in child.info.locks:
            holders = self._lock_holders[lock]
            holders[run.child_id] -= 1
            if holders[run.child_id] == 0:
                del holders[run.child_id]
            if not holders:
                del self._lock_holders[lock]

    def _drop_running(self, child: _Child) -> list[Job]:
        jobs = []
        for rid in sorted(child.running, key=lambda r: self._seq.get(r, 0)):
            run = self._running.pop(rid)
            self._release(run)
            jobs.append(run.job)
        return jobs
