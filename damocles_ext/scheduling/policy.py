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
* Eligibility. A child can take a job when it is ready, has a free slot (running < capacity, or
  its queue: see "Quick requests"), and none of its locks is held by a job running on *another*
  child (jobs on the same child share its locks; that is what `Concurrent` means). Locks are
  shared across stages.
* Stage priority. `winning_post` is served before `window_post` (then any other stage, by name) at
  every decision. A waiting WinningPoSt reserves the locks that block it, so no lower-priority
  job can take or extend them: when such a lock frees, the WinningPoSt goes first.
* Choice of child. Among eligible children, the least loaded (running / capacity) first, so a job
  goes to a child that is idle now rather than queueing behind work in a busy one; among equally
  loaded children, smooth weighted round robin over `Weight` (nginx's algorithm, deterministic);
  but a WinningPoSt not to a child whose recent runs say it cannot make the deadline: `doomed.py`.
* Deadlines. A queued job whose deadline has passed fails without reaching a prover. A running job
  past its deadline gets one `CancelRunning`; the supervisor handles the grace period and the kill.
* Pipelining (only for children that report phases; call `progress` with the dext Progress
  frames): a child whose jobs report their GPU phase takes a job only when it keeps its GPU busy
  without binding work another GPU could start sooner; the rule and its estimates are in
  `pipelining.py`.
* Doomed starts. A job with a deadline (not a WinningPoSt) that even the fastest recent proofs
  of its stage's children could not finish in the time left is answered at once instead of
  started, so that its GPU proves others; one that only a child's own recent proofs doom goes
  to a sibling that may make it, keeping its place, while that child takes the jobs behind it:
  `doomed.py`.
* Quick requests. A child whose Hello offers a queue takes that many jobs beyond its capacity
  while quick; a job left behind long work is taken back (`TakeBack`): see `children.py`.
* Errors. A job whose `avoid` names children (the book: those that answered it with an error)
  goes to none of them while another of its stage is neither FATAL nor benched: it waits for one
  (reserving only its locks), keeping its place, while the jobs behind it go on. A WinningPoSt
  (`URGENT`: its block has about 20 s) waits for none: when no other child can start it now, it
  goes to one it avoids that can, and reserves the locks of all; but once one failed it twice
  (`Job.back` False), it waits as any other.
* Failing children. A child erring request after request while a sibling proves for the same
  key (Job.key: the miner, or a SNARK step itself) is benched, then on probation: `breaker.py`.
* No server. When a stage has no child that can ever serve (none configured, or all FATAL), its
  jobs fail at once. A child that is down but restarting still counts: jobs wait for it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable
from typing import Any

from mypy_extensions import mypyc_attr

from . import doomed
from .breaker import ChildBreaker
from .children import (
    QUICK_ANSWER,
    QUICK_RUN,
    TAKE_BACK_AFTER,
    _Child,
    _Running,
    beyond_any_run,
    cannot_serve,
    drop_running,
    gpu_free_at,
    gpu_phase_ended,
    held_elsewhere,
    live_deadline,
    note_run,
    passed_deadlines,
    promote,
    round_robin,
    set_slots,
    take_back_at,
    take_back_due,
    timed_due,
    what_kept,
)
from .decisions import (
    CancelRunning,
    ChildSlots,
    Decision,
    Fail,
    Job,
    SchedulerStatistics,
    Start,
    TakeBack,
    statistics_of,
)
from .doomed import Aside, HeldBack, Known, estimates, free_slot, judge, kept_off, refusal, settle
from .holds import LockHolds
from .pipelining import (
    GPU_PHASES,
    gpu_idle,
    gpu_phase_reported,
    other_phase_reported,
    takes_next_at,
)
from .queues import FRESH, RETRY, JobQueues

#: Stages served first at every decision; other stages follow in name order.
STAGE_PRIORITY: tuple[str, ...] = ("winning_post", "window_post")

#: The stage whose jobs that avoid children go back to one of them rather than wait (see "Errors").
URGENT = "winning_post"
#: How a deadline's Fail ends (the book says "not sent again" of a retry).
NOT_SENT = "; it was not sent to a prover"


@mypyc_attr(allow_interpreted_subclasses=True)  # (tests derive from it)
class Scheduler:
    """The dispatch policy: feed it events, call `decide(now)`, act on what it returns.

    Decisions are incremental: `decide` looks again only at the stages an event touched (a job
    queued, a slot or a lock freed, a child ready, down or pipelined, a queue's head due) and at
    the running jobs whose deadline passed (a heap), and `next_wakeup` is cached until the next
    event. A job queued behind a queue its stage's last decision left (no child could take the
    head then, so none can take it) does not touch its stage, unless the stage is pipelined or
    the job's deadline has passed. With nothing touched, no lock, no pipelined child, no job
    behind others in a child and no deadline, `decide` returns at once, `next_wakeup` is None.
    `incremental=False` recomputes everything, with the same results (the property tests say so).
    """

    # Slots: CPython 3.11 keeps over 29 attributes in a dict of their own, slower to read.
    # fmt: off
    __slots__ = (
        "_all_dirty", "_any_locks", "_by_stage", "_children", "_deadlines", "_decided_at", "_dirty",
        "_gen", "_gpu_phases", "_held_until", "_incremental", "_last_reserved", "_lock_holders", "_order",
        "_pipelined_stages", "_queue_len", "_queued", "_queueing", "_queues", "_quick_answer",
        "_quick_run", "_refuse_doomed", "_reserving", "_running", "_seq", "_set_aside", "_take_back_after",
        "_take_back_cache", "_vanilla_times", "_wakeup_cache", "breaker", "holds",
    )
    # fmt: on

    def __init__(
        self,
        *,
        gpu_phases: Iterable[str] = GPU_PHASES,
        incremental: bool = True,
        quick_answer: float = QUICK_ANSWER,
        quick_run: int = QUICK_RUN,
        take_back_after: float = TAKE_BACK_AFTER,
        breaker: ChildBreaker | None = None,
        refuse_doomed: bool = True,
    ) -> None:
        self._gpu_phases = frozenset(gpu_phases)
        self._incremental = incremental
        self._refuse_doomed = refuse_doomed  # False: start doomed jobs all the same (doomed.py)
        self._held_until: dict[str, float] = {}  # per stage: when time changes a doomed.py verdict
        self._quick_answer, self._quick_run = quick_answer, quick_run
        self._take_back_after = take_back_after
        self._queueing: set[str] = set()  # children with jobs behind (see "Quick requests")
        self._take_back_cache: float | None = None  # _next_take_back, until _queueing changes
        self._dirty: set[str] = set()  # stages to look at again (see _touch)
        self._all_dirty = True  # ... or every stage
        self._any_locks = False  # some child holds locks: reservations cross stages
        self._last_reserved: dict[str, frozenset[str]] = {}  # per stage, at its last decision
        self._pipelined_stages: set[str] = set()  # time alone may let their children take work
        self._order: list[str] | None = None  # _stage_order, until a stage is added
        self._deadlines: list[tuple[float, int, int]] = []  # running: (deadline, seq, rid)
        self._seq = itertools.count()
        self._gen = 0  # bumped by every change: next_wakeup's cache key
        self._wakeup_cache: tuple[int, float, float | None] | None = None
        self._vanilla_times: dict[str, deque[float]] = {}  # per stage
        self._decided_at = -math.inf
        self._children: dict[str, _Child] = {}
        self._by_stage: dict[str, list[_Child]] = {}
        # The stages' queues (queues.py). A job's order ends with its arrival, which a retry
        # keeps: no per-request state outlives the request (nor a job lost with its child).
        self._queues = JobQueues()
        self._queued = self._queues.queued  # request id -> (token, job)
        self._queue_len = self._queues.length  # live jobs per stage
        self._running: dict[int, _Running] = {}
        self._lock_holders: dict[str, dict[str, int]] = {}  # lock -> child_id -> jobs running
        self.holds = LockHolds(self._lock_holders)  # ... or a process gone down: holds.py
        self._set_aside: dict[str, bool] = {}  # per stage: its last decision set retries aside
        self._reserving: dict[str, list[frozenset[str] | None]] = {}  # stage: avoid of each waiting
        self.breaker = breaker or ChildBreaker()  # failing children (breaker.py)
        self.breaker.attach(self._children, self._by_stage, self._touch)

    # -- children ---------------------------------------------------------------------------

    def add_child(self, info: ChildSlots) -> None:
        """Register a child; it is not eligible until `child_ready`."""
        if info.child_id in self._children:
            raise ValueError(f"child {info.child_id!r} is already registered with the scheduler")
        if info.capacity < 1 or info.weight < 1:
            got = f"capacity={info.capacity}, weight={info.weight}"
            raise ValueError(f"child {info.child_id!r}: capacity and weight must be >= 1 ({got})")
        child = _Child(info=info, order=len(self._children), slots=info.capacity)
        self._children[info.child_id] = child
        self._by_stage.setdefault(info.stage, []).append(child)
        self._any_locks |= bool(info.locks)
        self._touch(info.stage)

    def child_ready(self, child_id: str, now: float, *, queue: int = 0) -> None:
        """The child said hello: it may take requests (this also clears FATAL); it takes `queue`
        jobs beyond its capacity while its answers are quick (see "Quick requests")."""
        child = self._child(child_id)
        child.ready = True
        child.fatal = False
        child.queue = max(0, queue)
        child.quick = 0
        set_slots(child, self._quick_run)
        self.breaker.fresh_process(child)  # its next answer decides
        self._touch(child.info.stage)

    def child_down(self, child_id: str, now: float, *, hold: str | None = None) -> list[Job]:
        """The child exited or broke: it takes nothing more. Returns its running jobs, to
        `requeue` or fail, their slots and locks freed; but `hold` (its process) keeps the locks."""
        child = self._child(child_id)
        child.ready = False
        child.quick = 0
        set_slots(child, self._quick_run)
        self._touch(child.info.stage)
        self.holds.take(hold, child_id, child.info.locks, now)  # (None: nothing is kept)
        return self._drop_running(child)

    def exited(self, hold: str, now: float) -> bool:
        """The process `child_down` named `hold` exited: its locks are free (False: it had none)."""
        freed = self.holds.release(hold) is not None
        self._all_dirty |= freed  # a lock freed: a child of any stage may take work now
        self._gen += freed
        return freed

    def child_fatal(self, child_id: str, now: float) -> list[Job]:
        """The child will not be restarted: it no longer counts as able to serve its stage.
        Normally `child_down` came first; jobs still running on it are returned as there."""
        child = self._child(child_id)
        child.ready = False
        child.fatal = True
        self._touch(child.info.stage)
        return self._drop_running(child)

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, job: Job, now: float) -> bool:
        """A new request: queue it (decide() starts or fails it). False when decide() has
        nothing new to act on: the job joined the back of a queue that no child could take
        from at the last decision, and nothing else changed since (what time brings is left,
        as ever, to next_wakeup)."""
        self._check_new(job)
        stage = job.stage
        # Behind a queue left by its stage's last decision (no child could take its head): idem.
        behind = self._incremental and self._queue_len.get(stage, 0) > 0 and not self._all_dirty
        behind = behind and stage not in self._dirty and stage not in self._pipelined_stages
        behind = behind and not self._set_aside.get(stage)  # a free child may take the new job
        behind = behind and (job.deadline is None or job.deadline > now)
        if behind and job.deadline is not None and job.size > 0 and self._refuse_doomed:
            behind = not free_slot(self._by_stage.get(stage, []))  # it is judged (doomed.py)
        behind = behind and stage not in self._held_until  # it may go ahead of one judged
        cached, deadline = self._wakeup_cache, job.deadline
        self._enqueue(job, FRESH)  # (a queued job's deadline is a wakeup, if the earliest)
        if cached and cached[0] == self._gen - 1 and stage not in self._pipelined_stages:
            at = cached[2]
            self._wakeup_cache = (self._gen, cached[1], deadline if deadline is not None and (at is None or deadline < at) else at)  # fmt: skip
        if behind:
            self._dirty.discard(stage)
            return bool(self._dirty or self._all_dirty or self._any_locks)
        return True

    def requeue(self, job: Job, now: float) -> None:
        """Put a retried job back at the head of its queue (see the ordering rule above)."""
        self._check_new(job)
        self._enqueue(job, RETRY)

    def finished(self, request_id: int, now: float, *, failed: bool | None = None) -> bool:
        """The child answered `request_id`: free its slot and locks (False if it was not running).
        `failed`: an error (True) or a proof (False) for "Failing children"; None: neither."""
        run = self._running.get(request_id)  # (a proof too while none errs: see breaker.count)
        if failed is not None and run and not run.cancelled:
            self.breaker.count(self._children[run.child_id], run.job.key, failed, now)
            if not failed and run.job.size > 0:  # how long a proof takes there (doomed.py)
                note_run(self._children[run.child_id], run.job.kind, run.job.size, now - run.turn)
        return self._finish(request_id, now, learn=True)

    def _finish(self, request_id: int, now: float, *, learn: bool) -> bool:
        run = self._running.get(request_id)
        if run is None:
            return False
        child = self._children[run.child_id]
        if run.gpu_since is not None:  # only a job that reported a GPU phase has one to end
            gpu_phase_ended(child, run, self._runs_on, now, learn=learn and not run.cancelled)
        del self._running[request_id]
        if run.behind:  # answered or forgotten before its turn
            run.behind = False
            child.behind.remove(run)
        if child.queue:
            quick = learn and not run.cancelled and now - run.turn < self._quick_answer
            child.quick = child.quick + 1 if quick else 0
            if child.quick <= self._quick_run:  # it may have just become quick, or stopped
                set_slots(child, self._quick_run)
        self._release(run)
        if run.child_id in self._queueing:  # a slot freed: the job(s) behind move up
            self._take_back_cache = None
            turn = now if learn else child.ahead_turn  # remove() has no clock
            if promote(child, turn):
                self._queueing.discard(run.child_id)
        return True

    def progress(self, request_id: int, phase: str, done: int, total: int, now: float) -> bool:
        """A running request reported progress (dext `Progress`); False if it is not running.
        Only phases in `gpu_phases` and the change away from them matter (see "Pipelining");
        call decide() afterwards, since a child may have become able to take its next job."""
        run = self._running.get(request_id)
        if run is None:
            return False
        self._touch(run.job.stage)
        child = self._children[run.child_id]
        if phase not in self._gpu_phases:
            other_phase_reported(child, run, self._runs_on, now)
        elif gpu_phase_reported(child, run, done, total, now, self._runs_on, self._vanilla_times):
            set_slots(child, self._quick_run)
            self._pipelined_stages.add(child.info.stage)
        return True

    def remove(self, request_id: int) -> bool:
        """Forget a request (e.g. its caller went away): drop it from its queue, or, if it is
        running, free its slot and locks as `finished` does. False if it was unknown."""
        if (job := self._queues.remove(request_id)) is not None:
            self._touch(job.stage)
            return True
        return self._finish(request_id, 0.0, learn=False)

    # -- decisions --------------------------------------------------------------------------

    def decide(self, now: float) -> list[Decision]:
        """Everything to do now: starts, failures of expired or unservable jobs, cancels."""
        self._decided_at = now
        self._gen += 1
        if self.breaker.benches:
            self.breaker.end_benches(now)  # on probation now: they may take a job
        take_back_due = bool(self._queueing) and now >= self._next_take_back()
        if self._incremental and not (
            self._all_dirty
            or self._dirty
            or self._pipelined_stages
            or self._any_locks
            or take_back_due
            or timed_due(self._deadlines, self._held_until, self._queues, now)
        ):
            return []  # nothing changed, no deadline has passed, nothing to take back
        out: list[Decision] = []
        if take_back_due:
            self._take_back(now, out)
        for run, deadline in passed_deadlines(
            self._deadlines, self._running, now, self._incremental
        ):
            run.cancelled = True
            rid, cid = run.job.request_id, run.child_id
            if run.job.stage == URGENT and run.job.size and not run.behind:  # (doomed.in_time)
                note_run(self._children[cid], run.job.kind, run.job.size, now - run.turn)
            late = f"{now - deadline:.1f}s ago while running on {cid}"
            # The book names the request (its own number is the caller's, not this one).
            out.append(CancelRunning(rid, cid, f"passed its deadline {late}"))
        reserved: set[str] = set()
        everything, hold_at = self._all_dirty or not self._incremental, self._held_until
        for stage in self._stage_order():
            queue = self._queues.stages[stage]
            job = self._queues.peek(queue)
            if not (
                everything
                or stage in self._dirty
                or stage in self._pipelined_stages
                or (job is not None and job.deadline is not None and now >= job.deadline)
                or (hold_at and now >= hold_at.get(stage, math.inf))
                or (self._any_locks and self._last_reserved.get(stage) != frozenset(reserved))
            ):
                # Nothing it depends on changed since it was last decided: nothing to do.
                for avoid in self._reserving.get(stage, ()) if self._any_locks else ():
                    reserved |= self._blocking_locks(stage, avoid)
                continue
            if self._any_locks:
                self._last_reserved[stage] = frozenset(reserved)
            children = self._by_stage.get(stage, [])
            reason = cannot_serve(stage, children) if job is not None else None
            # Set once a start left no child of the stage able to take more: nothing in this loop
            # frees a slot, so the next _pick would find none (a job due or unservable still fails).
            full, judging, changes = False, stage != URGENT and self._refuse_doomed, math.inf
            # Holding back needs a sibling, and judging a free slot (doomed.py; None: not looked).
            free: bool | None = None if judging and len(children) > 1 else False
            aside: list[Any] = []  # retries only avoided children could take: the jobs behind go on
            verdicts: list[Aside] = []  # each one's hold (doomed.py), and till when it holds
            known: Known = {}  # estimates by proof type and size, for this decision
            while job is not None:
                changes = math.inf
                if reason is not None:
                    self._queues.pop(queue, job)
                    out.append(Fail(job.request_id, reason))
                elif job.deadline is not None and now >= job.deadline:
                    self._queues.pop(queue, job)
                    late = f"{now - job.deadline:.1f}s ago before the request could start"
                    waited = what_kept(job, children, self._lock_holders, reserved, lambda c: self.breaker.left_out(c, now))  # fmt: skip
                    out.append(Fail(job.request_id, f"deadline passed {late}{waited}{NOT_SENT}"))
                else:
                    hold: HeldBack | None = None  # kept off the children it is doomed on
                    ests, sized = None, job.deadline is not None and job.size > 0  # (judged)
                    # No run known dooms it (most deadlines): judged only if it cannot start.
                    later = sized and judging and self._incremental and beyond_any_run(job, children, now)  # fmt: skip
                    if (free is not False and sized and not later) and (free := free or free_slot(children)):  # fmt: skip
                        ests, hold, changes = judge(job, children, now, self.breaker.can_serve, known)  # fmt: skip
                    skip = hold.skip if hold else None
                    pick = (None, 0) if full else self._pick(stage, reserved, now, job, skip)
                    child, others = pick
                    if child is None and later and (free is not False) and (free := free or free_slot(children)):  # fmt: skip
                        ests, hold, changes = judge(job, children, now, self.breaker.can_serve, known)  # fmt: skip
                    if child is None and (job.avoid or (hold and hold.blocks())):
                        verdicts.append((hold, bool(job.avoid), changes))
                        aside.append(self._queues.set_aside(queue))
                        job = self._queues.peek(queue)
                        continue
                    if child is None:
                        break
                    self._queues.pop(queue, job)
                    if judging and not hold and sized and not later and (why := refusal(job, estimates(job, children, known) if ests is None else ests, now, NOT_SENT)):  # fmt: skip
                        out.append(Fail(job.request_id, why, late=True))  # (doomed.py)
                        job = self._queues.peek(queue)
                        continue
                    self._start(job, child, now)
                    out.append(Start(job.request_id, child.info.child_id))
                    # (Incremental only: full recomputation stays the property test's oracle.)
                    full = not (others or job.avoid or hold) and len(child.running) >= child.slots
                    full, free = full and self._incremental, None if free else free
                job = self._queues.peek(queue)
            # As deciding again now would leave it: set aside up to a hold no longer blocking.
            kept, until = (0, math.inf) if not verdicts and (changes == math.inf or not job) else settle(verdicts, changes if job else math.inf, children)  # fmt: skip
            if until < math.inf:
                hold_at[stage] = until
            elif hold_at:
                hold_at.pop(stage, None)
            waits: list[frozenset[str] | None] = [None] if job or kept < len(aside) else []
            if aside or self._set_aside.get(stage):
                for entry in aside:
                    self._queues.put_back(queue, entry)
                for entry, (hold, _, _) in zip(aside[:kept], verdicts, strict=False):
                    held = self._queues.queued[entry[2]][1]  # an URGENT one going back: all
                    waits.append(None if stage == URGENT and held.back else kept_off(hold, held.avoid))  # fmt: skip
                self._set_aside[stage] = kept > 0
            if self._any_locks:  # what waits reserves the locks blocking it (aside: its own)
                self._reserving[stage] = waits
                for avoid in waits:
                    reserved |= self._blocking_locks(stage, avoid)
        self._dirty.clear()
        self._all_dirty = False
        return out

    def next_wakeup(self) -> float | None:
        """The earliest time at which decide() has a deadline to act on, a pipelined child
        becomes able to take the next queued job, or time dooms a job judged on one more child
        (doomed.py's judge: a HeldBack may end); None if there is no such time."""
        timed = self._deadlines or self._queues.with_deadline or self.breaker.benches
        if self._incremental and not (timed or self._held_until or self._pipelined_stages):
            # No deadline, no pipelined child, no bench: only jobs behind long work can be due.
            if not self._queueing:
                return None
            at = self._take_back_cache  # (_next_take_back's, read here: per request)
            return self._next_take_back() if at is None else at
        cached = self._wakeup_cache
        if cached is not None and cached[0] == self._gen and cached[1] == self._decided_at:
            return cached[2]
        if self._incremental:
            heap = self._deadlines
            while heap and not live_deadline(heap[0], self._running):
                heapq.heappop(heap)
            times = [heap[0][0]] if heap else []  # the earliest of a running job not cancelled
        else:
            runs = self._running.values()
            times = [d for r in runs if not r.cancelled and (d := r.job.deadline) is not None]
        if self._queueing:
            times.append(self._next_take_back())
        times += self.breaker.benches.values()  # a benched child may take a job then
        times += self._held_until.values()  # a job judged may be doomed on one more child then
        for stage, queue in self._queues.stages.items():
            head = self._queues.peek(queue)
            if head is None:
                continue
            if head.deadline is not None:
                times.append(head.deadline)
            if stage not in self._pipelined_stages and self._incremental:
                continue
            for child in self._by_stage.get(stage, []):
                if child.ready and child.pipelined and len(child.running) < child.info.capacity:
                    when = self._takes_next_at(child)
                    if when is not None and self._decided_at < when < math.inf:
                        times.append(when)
        wakeup = min(times, default=None)
        if self._incremental:
            self._wakeup_cache = (self._gen, self._decided_at, wakeup)
        return wakeup

    def statistics(self) -> SchedulerStatistics:
        """Queue lengths and nearest deadline per stage, running jobs per child, locks held."""
        return statistics_of(self._queues, self._children, self._lock_holders, self._waits_for)

    def _waits_for(self, stage: str) -> set[str]:  # the locks what waits there waits for
        waits = self._reserving.get(stage) or [None]
        return set().union(*(self._blocking_locks(stage, avoid) for avoid in waits))

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

    def _touch(self, stage: str) -> None:
        """Something `stage`'s decisions depend on changed."""
        self._dirty.add(stage)
        self._gen += 1

    def _enqueue(self, job: Job, tier: int) -> None:
        self._dirty.add(job.stage)  # _touch(job.stage), per request: a call fewer
        self._gen += 1
        if self._queues.push(job, tier):
            self._order = None

    def _stage_order(self) -> list[str]:
        if self._order is None:
            stages = self._queues.stages
            first = [s for s in STAGE_PRIORITY if s in stages]
            self._order = first + sorted(s for s in stages if s not in STAGE_PRIORITY)
        return self._order

    def _blocking_locks(self, stage: str, avoid: frozenset[str] | None = None) -> set[str]:
        # Locks that alone keep a ready child with a free slot from taking this stage's work
        # (not one the breaker leaves out, nor one the job avoids: it would not take the work).
        out, breaker = set[str](), self.breaker
        for child in self._by_stage.get(stage, []):
            if child.ready and len(child.running) < child.info.capacity:
                if avoid and child.info.child_id in avoid:
                    continue
                if breaker.suspects and breaker.left_out(child, self._decided_at):
                    continue
                out |= held_elsewhere(child, self._lock_holders)
        return out

    def _pick(
        self, stage: str, reserved: set[str], now: float, job: Job | None = None,
        skip: frozenset[str] | None = None,
    ) -> tuple[_Child | None, int]:  # fmt: skip
        """The child of `stage` to start `job` on (None: none can take it now), and how many
        other children could have taken it (not one it avoids: see "Errors"; nor one in `skip`)."""
        avoid = job.avoid if job is not None else None
        eligible: list[tuple[float, float, _Child]] = []
        children, holders = self._by_stage.get(stage, []), self._lock_holders
        if avoid and not any(
            c.info.child_id not in avoid and self.breaker.can_serve(c.info.child_id, now)
            for c in children
        ):
            avoid = None
        if skip:  # (doomed.py's HeldBack: never in URGENT, so no going back below)
            avoid = skip | avoid if avoid else skip
        for c in children:
            if avoid and c.info.child_id in avoid:
                continue
            if not (
                c.ready
                and (
                    len(c.running) < c.info.capacity  # or its queue, unless overdue already:
                    or (len(c.running) < c.slots and now < c.ahead_turn + self._take_back_after)
                )
                and not (c.info.locks and (c.info.locks & reserved or held_elsewhere(c, holders)))
            ):
                continue
            if self.breaker.suspects and self.breaker.left_out(c, now):
                continue
            free_at = now
            if (
                c.pipelined
                and c.running
                and not (gpu_idle(self._runs_on(c)) and self._covers(stage, now))
            ):
                takes_at = self._takes_next_at(c)
                if takes_at is not None and takes_at > now:
                    continue  # its GPU is busy for longer than a vanilla phase takes
                free_at = max(now, gpu_free_at(c, self._runs_on(c)) or now)
            eligible.append((free_at, len(c.running) / c.info.capacity, c))
        if not eligible:
            # A block does not wait for another child (see "Errors").
            back = avoid and stage == URGENT and job is not None and job.back
            return self._pick(stage, reserved, now) if back else (None, 0)
        if len(eligible) == 1:
            return eligible[0][2], 0  # round robin among one: its weight goes up and back down
        best = round_robin(eligible)
        if stage == URGENT and job is not None and job.deadline is not None and best.run_times:
            best = doomed.in_time(best, eligible, job)  # not one too slow for its block
        return best, len(eligible) - 1

    def _covers(self, stage: str, now: float) -> bool:
        # One more job here leaves one for each other child that may take one (see Pipelining).
        queued, children = self._queue_len.get(stage, 0), self._by_stage.get(stage, [])
        return queued >= len(children) or queued >= self.breaker.able(children, now)

    def _runs_on(self, child: _Child) -> list[_Running]:
        return [self._running[rid] for rid in child.running]

    def _takes_next_at(self, child: _Child) -> float | None:
        return takes_next_at(child, self._runs_on(child), self._vanilla_times)

    def _start(self, job: Job, child: _Child, now: float) -> None:
        cid = child.info.child_id
        behind = len(child.running) >= child.info.capacity
        child.running.add(job.request_id)
        seq = next(self._seq)
        run = self._running[job.request_id] = _Running(
            job=job, child_id=cid, started=now, seq=seq, behind=behind, turn=now
        )
        if behind:
            child.behind.append(run)
            if cid not in self._queueing:
                self._queueing.add(cid)
                self._take_back_cache = None
        else:
            child.ahead_turn = now
            if cid in self._queueing:
                self._take_back_cache = None
        if job.deadline is not None:
            heap = self._deadlines
            heapq.heappush(heap, (job.deadline, seq, job.request_id))
            if len(heap) > 64 + 2 * len(self._running):  # mostly finished ones: drop them
                self._deadlines = [e for e in heap if live_deadline(e, self._running)]
                heapq.heapify(self._deadlines)
        for lock in child.info.locks:
            holders = self._lock_holders.setdefault(lock, {})
            holders[cid] = holders.get(cid, 0) + 1

    def _release(self, run: _Running) -> None:
        child = self._children[run.child_id]
        child.running.discard(run.job.request_id)
        self._dirty.add(child.info.stage)  # _touch(child.info.stage), per request: a call fewer
        self._gen += 1
        if child.info.locks:
            self._all_dirty = True  # a lock freed: a child of any stage may take work now
        for lock in child.info.locks:
            holders = self._lock_holders[lock]
            holders[run.child_id] -= 1
            if holders[run.child_id] == 0:
                del holders[run.child_id]
            if not holders:
                del self._lock_holders[lock]

    # -- quick requests queued in their child ------------------------------------------------

    def _next_take_back(self) -> float:
        """When jobs behind are next taken back (children.take_back_at), cached."""
        if self._take_back_cache is None:
            self._take_back_cache = take_back_at(
                self._children, self._queueing, self._take_back_after
            )
        return self._take_back_cache

    def _take_back(self, now: float, out: list[Decision]) -> None:
        after, run = self._take_back_after, self._quick_run
        for child in take_back_due(self._children, self._queueing, now, after, run, out):
            self._take_back_cache = None
            self._touch(child.info.stage)

    def _drop_running(self, child: _Child) -> list[Job]:
        self._queueing.discard(child.info.child_id)
        self._take_back_cache = None
        return drop_running(child, self._running, self._release)


__all__ = [
    "GPU_PHASES",
    "NOT_SENT",
    "QUICK_ANSWER",
    "QUICK_RUN",
    "STAGE_PRIORITY",
    "TAKE_BACK_AFTER",
    "CancelRunning",
    "ChildSlots",
    "Decision",
    "Fail",
    "Job",
    "Scheduler",
    "SchedulerStatistics",
    "Start",
    "TakeBack",
]
