"""The supervisor: keeps a pool of prover children per stage alive and routes requests to them.

This is the I/O shell around three pure parts: `scheduling.policy.Scheduler` decides which child
gets which request, `restart.RestartTracker` decides when a stopped child starts again, and
`connection.ChildConnection` speaks the protocols. Everything here runs on one trio thread.

Shape:
* one task per child (`_child_loop`): spawn, handshake, serve, tear down, back off, again;
  inside it, per process, a reader (stdout), a writer (stdin: requests are written directly while
  the pipe takes them, the rest goes through an unbounded channel to a writer task, so dispatch
  never blocks), a stderr relay and an exit watcher;
* dispatch is synchronous (`_dispatch`): after every event (submit, answer, child ready or down)
  the scheduler's decisions are acted on at once; a driver task runs the timers (request timeouts,
  cancel grace, heartbeats, scheduler deadlines) and calls `_dispatch` at `next_wakeup()`;
* scheduler jobs are *attempts*, not requests: each dispatch of a request gets a fresh attempt
  id, so a request can be retried on a sibling while the slot of its timed-out attempt stays
  taken until the old child answers the Cancel or is killed.

Every request is answered exactly once: every answer goes through `Supervisor._finish`, which
does nothing for a request already answered.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psutil
import trio

from ..config import describe_argv, effective_timeouts
from ..errors import ProverError, UsageError
from ..logs import report_bad_output
from ..protocol import dext
from ..scheduling.policy import Cancel, ChildInfo, Fail, Job, Scheduler, Start
from ..tasks import (
    WINDOW_POST_SPLIT,
    Output,
    Task,
    WindowPoSt,
    WindowPoStOutput,
    WindowPoStSnarkOutput,
    WindowPoStVanillaOutput,
    deadline_problem,
    join_window_post,
    snark_task,
    split_window_post,
    stage_of,
)
from .connection import (
    Answer,
    ChildConnection,
    ChildProtocolError,
    ProgressEvent,
    Ready,
    Skipped,
    preview,
)
from .process import (
    ChildProcess,
    ExitInfo,
    GroupGuardian,
    OrphanAdopter,
    SpawnError,
    build_env,
    prepare_spawn,
    relay_stderr,
    spawn,
)
from .restart import BackoffPolicy, GiveUp, RestartTracker

log = logging.getLogger("damocles_ext.supervisor")
child_log = logging.getLogger("damocles_ext.child")

Progress = dext.Progress

_READ_SIZE = 1 << 16
_ORPHAN_SWEEP_INTERVAL = 10.0  # seconds between sweeps for orphans that exit on their own
_REAP_TIMEOUT = 5.0  # after SIGKILL; longer means uninterruptible sleep (a stuck driver)
_GROUP_TERM_WAIT = 1.0  # grandchildren's time to leave after SIGTERM once their parent exited
# The longest request a child accepts: a dext frame's payload limit (a JSON line's is the same).
_MAX_REQUEST_BYTES = dext.HEADER_SIZE + dext.DEFAULT_MAX_FRAME_SIZE
_PIPE_DRAIN_TIMEOUT = 0.5  # after the reap: what the child wrote is read within a few ticks
_STDERR_TAIL_LINES = 2  # a child's last stderr lines quoted in its exit reason (failed starts)
_STDERR_LINE_CHARS = 300
_OBSERVER_TIMEOUT = 10.0  # one observer hook call
_OBSERVER_BACKLOG = 10_000  # events waiting for slow observers; more are dropped (logged)

CHILD_STATES = ("starting", "ready", "busy", "backoff", "fatal", "stopping", "stopped")


class ChildStats(msgspec.Struct, frozen=True):
    """One child as `statistics()` sees it (times: unix seconds; durations: seconds)."""

    name: str
    stage: str
    index: int
    pid: int | None
    gpu: str | None
    state: str  # one of CHILD_STATES
    next_start_in: float | None  # seconds until the restart, in "backoff"
    in_flight: int
    capacity: int
    done: int  # requests answered with an output
    failed: int  # requests answered with an error, or lost with the child
    restarts: int
    last_exit: str | None  # e.g. "killed by SIGKILL (request 7 timed out)"
    started_at: float | None  # when the current (or last) process was spawned
    protocol: str | None
    locks: tuple[str, ...] = ()  # the locks it needs to run a request (config: Locks, GpuLock)
    locks_held: tuple[str, ...] = ()  # those the scheduler holds for its running requests now
    tmpdir: str | None = None  # TMPDIR from its Envs (where bellperson keeps its lock files)


class StageStats(msgspec.Struct, frozen=True):
    """One stage's queue."""

    stage: str
    queued: int
    nearest_deadline: float | None  # unix seconds
    waiting_for_lock: tuple[str, ...] = ()  # locks its queue head waits for


class SupervisorStats(msgspec.Struct, frozen=True):
    """A snapshot of the whole supervisor."""

    children: list[ChildStats]
    stages: dict[str, StageStats]
    requests: int  # submitted and not yet answered
    shutting_down: bool


@dataclass(eq=False)
class _Request:
    rid: int
    task: Task
    stage: str
    arrival: float
    deadline: float | None  # trio clock
    deadline_unix: float | None
    priority: int
    on_progress: Callable[[Progress], None] | None
    attempts: int = 0  # times sent to a child
    attempt_id: int | None = None  # current scheduler job (queued or running)
    child: str | None = None  # child of the current or last attempt
    history: list[str] = field(default_factory=list)
    done: bool = False
    output: Output | None = None
    error: ProverError | None = None
    event: trio.Event = field(default_factory=trio.Event)
    running_on: tuple[_Child, _Process] | None = None  # where the current attempt runs


@dataclass(eq=False)
class _Slot:
    """One attempt in flight on one child process."""

    attempt_id: int
    child_rid: int
    request: _Request
    started: float
    abandoned: bool = False  # its request was answered or moved on; we wait for the child
    timeout: list[Any] | None = None  # its RequestTimeoutSecs timer (cancelled on the answer)


class _Process:
    """One process of a child: from spawn to reaping."""

    def __init__(self, proc: ChildProcess, conn: ChildConnection) -> None:
        self.proc = proc
        self.conn = conn
        self.send_channel, self.receive_channel = trio.open_memory_channel[bytes](math.inf)
        self.slots: dict[int, _Slot] = {}
        self.next_rid = 1  # damocles numbers requests per child from 1
        self.wake = trio.Event()  # something for the child task to look at
        self.down_reason: str | None = None
        self.charge_all = True  # a crash costs every in-flight request an attempt
        self.last_activity = 0.0
        self.heartbeat_armed = False
        self.handshake_scope = trio.CancelScope()
        self.reader_done: trio.Event | None = None
        self.read_ended = False  # EOF or a protocol error: nothing more is read
        self.read_owner: _Request | None = None  # its caller reads the pipe (see _read_for)
        self.reader_waiting = False  # the reader task is in wait_readable
        self.owner_waiting = False  # so is the read_owner
        self.reader_resume = trio.Event()
        self.stderr_done = trio.Event()
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self.stdin_fd = proc.stdin.fileno()
        self.tree_mark: str | None = None  # its OrphanAdopter mark
        self.queued_writes = 0  # chunks handed to the writer task and not yet written
        # When the child last took bytes from its stdin pipe while we had more for it; the
        # StdinTimeoutSecs watch (armed while writes wait) compares with it.
        self.stdin_progress_at = 0.0
        self.stdin_watch_armed = False

    def interrupt(self) -> None:
        """Make the child task look at this process now (it went down, or we stop)."""
        self.wake.set()
        self.handshake_scope.cancel()
        self.release_reader()

    def release_reader(self) -> None:
        """A submitter reading this pipe stops; the reader task takes over (see _read_for)."""
        if self.read_owner is not None:
            self.read_owner = None
            if self.owner_waiting:
                trio.lowlevel.notify_closing(self.proc.stdout.fileno())


class _Child:
    def __init__(self, spec: Any, tracker: RestartTracker) -> None:
        self.spec = spec
        self.name: str = spec.name
        self.tracker = tracker
        self.state = "starting"
        self.p: _Process | None = None
        self.pid: int | None = None
        self.protocol: str | None = None
        self.next_start_at: float | None = None
        self.started_at: float | None = None
        self.last_exit: str | None = None
        self.done = 0
        self.failed = 0
        self.stop = trio.Event()
        self.launched = False
        self.capacity = max(1, spec.concurrent)
        self.answered = False  # the current (or last) process answered a request


class _Timers:
    """A heap of [when, seq, fn]; each fn checks on its own that it is still relevant.

    A timer can also be cancelled (fn set to None): the request timeout of an answered request
    would otherwise keep its closure, and the request's task with it, until it expires, which
    with a long RequestTimeoutSecs is a lot of memory. Cancelled entries are dropped when they
    reach the top, and the heap is rebuilt once they are most of it.
    """

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self.armed = math.inf
        self.wake = trio.Event()

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def add(self, when: float, fn: Callable[[float], None]) -> list[Any]:
        entry = [when, next(self._seq), fn]
        heapq.heappush(self._heap, entry)
        if when < self.armed:
            self.wake.set()
        return entry

    def cancel(self, entry: list[Any] | None) -> None:
        if entry is None or entry[2] is None:
            return
        entry[2] = None
        self._cancelled += 1
        if self._cancelled > 64 and 2 * self._cancelled > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def pop_due(self, now: float) -> list[Callable[[float], None]]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            fn = heapq.heappop(self._heap)[2]
            if fn is None:
                self._cancelled -= 1
            else:
                due.append(fn)
        return due

    def next(self) -> float:
        while self._heap and self._heap[0][2] is None:
            heapq.heappop(self._heap)
            self._cancelled -= 1
        return self._heap[0][0] if self._heap else math.inf


def _coerce_children(config: Any) -> list[Any]:
    if isinstance(config, (list, tuple)):
        return list(config)
    children = getattr(config, "children", None)
    if children is None:
        raise TypeError(f"expected a Config or a list of ChildSpec, got {type(config).__name__}")
    return list(children)


class Supervisor:
    """A pool of prover children per stage, and the requests routed to them."""

    def __init__(
        self,
        config: Any,
        *,
        plugin_manager: Any = None,
        stages: Iterable[str] | None = None,
        shutdown_grace: float = 30.0,
        clock_jitter: random.Random | None = None,
        stop_timeout: float = 5.0,
        backoff: BackoffPolicy | None = None,
        adopt_orphans: bool = False,
    ) -> None:
        specs = _coerce_children(config)
        if stages is not None:
            wanted = set(stages)
            if "window_post" in wanted:
                wanted.update(WINDOW_POST_SPLIT)
            specs = [s for s in specs if s.stage in wanted]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique, got {names}")
        self._pm = plugin_manager
        self.shutdown_grace = shutdown_grace
        self.stop_timeout = stop_timeout
        rng = clock_jitter or random.Random()
        policy = backoff or BackoffPolicy()
        self._scheduler = Scheduler()
        self._children: dict[str, _Child] = {}
        for spec in specs:
            tracker = RestartTracker(policy, auto_restart=spec.auto_restart, rng=rng)
            child = _Child(spec, tracker)
            self._children[spec.name] = child
            self._scheduler.add_child(
                ChildInfo(
                    child_id=spec.name,
                    stage=spec.stage,
                    capacity=child.capacity,
                    weight=max(1, spec.weight),
                    locks=frozenset(spec.locks),
                )
            )
        self._rids = itertools.count(1)
        self._attempt_ids = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._attempts: dict[int, _Request] = {}  # attempt id -> request, queued or running
        self._queued = 0  # attempts waiting in the scheduler's queues
        self._slots: dict[int, tuple[_Child, _Slot]] = {}  # attempt id -> where it runs
        self._timers = _Timers()
        self._dispatching = False
        self._dispatch_again = False
        self._shutting_down = False
        self._shutdown_requested = trio.Event()
        self._state_changed = trio.Event()  # readiness, request completion
        self._started = False
        self._finished = False
        self._observer_send: trio.MemorySendChannel[tuple[str, dict[str, Any]]] | None = None
        self._unreaped: list[ChildProcess] = []
        self._observer_dropped = 0
        self._guardian: GroupGuardian | None = None
        # adopt_orphans: become a child subreaper and kill what children leave behind outside
        # their process group (process.OrphanAdopter); for a process of our own (serve, run).
        # Every child is marked (OrphanAdopter.mark) for the guardian, subreaper or not.
        self._adopt_orphans = adopt_orphans
        self._adopter = OrphanAdopter()
        self._sweep_wanted = trio.Event()
        self._split_in_flight = 0  # split WindowPoSts not yet answered (see submit)
        served = {s.stage for s in specs}
        # window_post requests run split (a vanilla step, then a SNARK step on another child)
        # when the config has the two split tables instead of [[WdPost]] (config.py checks it).
        self._split_window_post = "window_post" not in served and served.issuperset(
            WINDOW_POST_SPLIT
        )

    # -- public API -------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children and serve until `request_shutdown()`; returns once all is stopped.

        `task_status.started()` is called once every child has been launched (not necessarily
        ready).
        """
        if self._started:
            raise RuntimeError("Supervisor.run() may be called only once")
        self._started = True
        observer_receive = None
        if self._pm is not None:
            self._observer_send, observer_receive = trio.open_memory_channel(_OBSERVER_BACKLOG)
        try:
            self._guardian = GroupGuardian(self._adopter.token)
        except OSError as exc:
            log.error(
                "cannot start the process-group guardian (%s): if the supervisor is killed, its"
                " children's own children may outlive it",
                exc,
            )
        try:
            async with trio.open_nursery() as nursery:
                if self._guardian is not None:
                    if self._adopt_orphans:
                        # The guardian must be init's child, not ours: wait for its double fork
                        # before we become a subreaper.
                        await self._guardian.started()
                    else:
                        nursery.start_soon(self._guardian.started)
                driver_scope = trio.CancelScope()
                nursery.start_soon(self._driver, driver_scope)
                sweeper_scope = trio.CancelScope()
                if self._adopt_orphans and self._adopter.enable():
                    nursery.start_soon(self._orphan_sweeper, sweeper_scope)
                if observer_receive is not None:
                    nursery.start_soon(self._observer_loop, observer_receive)
                async with trio.open_nursery() as children_nursery:
                    for child in self._children.values():
                        await children_nursery.start(self._child_loop, child)
                    task_status.started()
                    await self._shutdown_requested.wait()
                    await self._drain()
                    for child in self._children.values():
                        child.stop.set()
                        if child.p is not None:
                            child.p.interrupt()
                self._fail_all("the supervisor stopped before it was answered")
                driver_scope.cancel()
                sweeper_scope.cancel()
                if self._observer_send is not None:
                    self._observer_send.close()
        finally:
            self._finished = True
            self._shutting_down = True
            with trio.CancelScope(shield=True):
                await self._kill_everything()
            if self._guardian is not None:
                self._guardian.close()
            self._fail_all("the supervisor stopped before it was answered")

    async def submit(
        self,
        task: Task,
        *,
        deadline: float | None = None,
        priority: int = 0,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Output:
        """Prove `task` on a child of its stage; `deadline` is a unix time. Raises ProverError.

        A deadline that is not a time (NaN, inf, beyond the year 9999) is a UsageError at once.

        With the split WindowPoSt tables, a WindowPoSt runs as two requests: its vanilla step on a
        [[WdPostVanilla]] child, then its SNARK step on a [[WdPostSnark]] child, both with the
        same deadline and priority; the answer is one WindowPoStOutput, or the step's error. A
        vanilla step that reports faulty sectors is the answer (faults, no proofs): no SNARK.
        """
        how = (deadline, priority, on_progress)
        if not (self._split_window_post and isinstance(task, WindowPoSt)):
            return await self._submit_one(task, *how)
        # To the caller a split WindowPoSt is one request: one in flight when shutdown begins may
        # still take its SNARK step within the shutdown grace, and _drain waits for it between
        # the two steps too.
        self._split_in_flight += 1
        try:
            vanilla = await self._submit_one(split_window_post(task), *how)
            assert isinstance(vanilla, WindowPoStVanillaOutput)  # _on_answer checks the stage
            if vanilla.faults:  # no proofs to make: prove again without them, as a whole one
                return WindowPoStOutput(proofs=[], faults=vanilla.faults)
            snark = await self._submit_one(snark_task(task, vanilla), *how, in_flight=True)
            assert isinstance(snark, WindowPoStSnarkOutput)
            return join_window_post(vanilla, snark)
        finally:
            self._split_in_flight -= 1
            self._notify()

    async def _submit_one(
        self,
        task: Task,
        deadline: float | None,
        priority: int,
        on_progress: Callable[[Progress], None] | None,
        *,
        in_flight: bool = False,
    ) -> Output:
        # A caller already cancelled gets Cancelled before anything reaches a child (trio's
        # rule that an async call is a cancel point even when it would not need to block).
        await trio.lowlevel.checkpoint_if_cancelled()
        stage = stage_of(task)
        rid = next(self._rids)
        problem = deadline_problem(deadline)
        if problem is not None:
            # A NaN deadline would sort before every other one and never expire; inf never expires.
            raise UsageError(
                f"request {rid} ({stage}) refused: its deadline {deadline!r} {problem}; give a unix"
                " time in seconds (e.g. time.time() + 600), or no deadline"
            )
        if self._shutting_down and not (in_flight and not self._finished):
            raise ProverError(f"request {rid} ({stage}) refused: the supervisor is shutting down")
        now = trio.current_time()
        deadline_t = None if deadline is None else now + (deadline - time.time())
        req = _Request(rid, task, stage, now, deadline_t, deadline, priority, on_progress)
        self._requests[rid] = req
        self._enqueue(req, now, retry=False)
        self._dispatch()
        try:
            while not req.done:
                where = req.running_on
                if where is not None and where[1].read_owner is None and not where[1].read_ended:
                    await self._read_for(where[0], where[1], req)
                else:
                    await req.event.wait()
        finally:
            if not req.done:
                self._abandon(req)
        if req.error is not None:
            raise req.error
        assert req.output is not None
        return req.output

    async def wait_ready(self, stage: str | None = None, count: int = 1) -> None:
        """Wait until `count` children (of `stage`, or of any stage) are ready.

        Raises ProverError when that can no longer happen (too many children FATAL or stopped).
        """
        if stage == "window_post" and self._split_window_post:
            for step in WINDOW_POST_SPLIT:
                await self.wait_ready(step, count)
            return
        while True:
            pool = [c for c in self._children.values() if stage is None or c.spec.stage == stage]
            if sum(c.state in ("ready", "busy") for c in pool) >= count:
                return
            alive = [c for c in pool if c.state not in ("fatal", "stopped")]
            if len(alive) < count or self._finished:
                what = f"{stage} children" if stage else "children"
                raise ProverError(
                    f"cannot wait for {count} ready {what}: only {len(alive)} of {len(pool)}"
                    " can still start ("
                    + (
                        "; ".join(
                            f"{c.name} is {c.state.upper() if c.state == 'fatal' else c.state},"
                            f" last: {c.last_exit}"
                            for c in pool
                            if c not in alive
                        )
                        or "none configured"
                    )
                    + ")"
                )
            event = self._state_changed
            await event.wait()

    def request_shutdown(self) -> None:
        """Stop taking requests, let in-flight ones finish (shutdown_grace), stop the children."""
        self._shutting_down = True
        self._shutdown_requested.set()
        self._notify()

    @property
    def shutting_down(self) -> bool:
        """True once `request_shutdown()` was called (or run() ended)."""
        return self._shutting_down

    def statistics(self) -> SupervisorStats:
        """A snapshot: every child's state and counters, every stage's queue."""
        now = trio.current_time()
        to_unix = time.time() - now
        sched = self._scheduler.statistics()
        held_by: dict[str, list[str]] = {}
        for lock, holders in sched.locks_held.items():
            for holder in holders.split(","):
                held_by.setdefault(holder, []).append(lock)
        children = []
        for c in self._children.values():
            p = c.p
            in_flight = len(p.slots) if p is not None else 0
            state = c.state
            if state == "ready" and in_flight:
                state = "busy"
            children.append(
                ChildStats(
                    name=c.name,
                    stage=c.spec.stage,
                    index=c.spec.index,
                    pid=c.pid if p is not None else None,
                    gpu=c.spec.gpu,
                    state=state,
                    next_start_in=(
                        max(0.0, c.next_start_at - now)
                        if state == "backoff" and c.next_start_at is not None
                        else None
                    ),
                    in_flight=in_flight,
                    capacity=c.capacity,
                    done=c.done,
                    failed=c.failed,
                    restarts=c.tracker.restarts,
                    last_exit=c.last_exit,
                    started_at=c.started_at,
                    protocol=c.protocol,
                    locks=tuple(c.spec.locks),
                    locks_held=tuple(sorted(held_by.get(c.name, ()))),
                    tmpdir=c.spec.envs.get("TMPDIR"),
                )
            )
        stage_names = sorted({c.spec.stage for c in self._children.values()} | set(sched.queued))
        stages = {}
        for stage in stage_names:
            nearest = sched.nearest_deadline.get(stage)
            stages[stage] = StageStats(
                stage=stage,
                queued=sched.queued.get(stage, 0),
                nearest_deadline=None if nearest is None else nearest + to_unix,
                waiting_for_lock=tuple(sched.waiting_for_lock.get(stage, ())),
            )
        return SupervisorStats(
            children=children,
            stages=stages,
            requests=sum(1 for r in self._requests.values() if not r.done),
            shutting_down=self._shutting_down,
        )

    # -- requests ---------------------------------------------------------------------------

    def _enqueue(self, req: _Request, now: float, *, retry: bool) -> None:
        aid = next(self._attempt_ids)
        req.attempt_id = aid
        req.running_on = None
        self._attempts[aid] = req
        job = Job(aid, req.stage, req.arrival, req.deadline, req.priority)
        self._queued += 1
        if retry:
            self._scheduler.requeue(job, now)
        else:
            self._scheduler.submit(job, now)

    def _finish(
        self,
        req: _Request,
        *,
        output: Output | None = None,
        error: str | None = None,
        outcome: str | None = None,
    ) -> None:
        if req.done:
            return
        req.done = True
        if req.attempt_id is not None:
            self._attempts.pop(req.attempt_id, None)
            if self._scheduler.is_queued(req.attempt_id):
                self._scheduler.remove(req.attempt_id)
                self._queued -= 1
        req.attempt_id = None
        self._requests.pop(req.rid, None)
        if error is not None:
            req.error = ProverError(error)
            outcome = outcome or "error"
        else:
            req.output = output
            if outcome is None:
                faulty = (
                    isinstance(output, WindowPoStOutput | WindowPoStVanillaOutput)
                    and output.faults
                )
                outcome = "fault" if faulty else "ok"
        req.event.set()
        where = req.running_on
        if where is not None:
            req.running_on = None
            if where[1].read_owner is req:
                where[1].release_reader()
        self._notify()
        if self._observer_send is not None:
            now = trio.current_time()
            self._observe(
                "dext_request_finished",
                request=self._request_info(req),
                outcome=outcome,
                duration=now - req.arrival,
                slack=None if req.deadline is None else req.deadline - now,
            )

    def _fail_all(self, why: str) -> None:
        for req in list(self._requests.values()):
            where = f" (last on {req.child})" if req.child else " (still queued)"
            self._finish(req, error=f"request {req.rid} ({req.stage}): {why}{where}")

    def _abandon(self, req: _Request) -> None:
        """The caller went away (cancelled): forget the request, stop its work if we can."""
        self._finish(req, error=f"request {req.rid} abandoned by its caller", outcome="cancelled")
        for aid, (child, slot) in list(self._slots.items()):
            if slot.request is req and not slot.abandoned:
                slot.abandoned = True
                p = child.p
                if p is not None and p.conn.protocol == "dext":
                    # A JSON-lines child cannot be told; its answer will be dropped. A dext child
                    # that ignores Cancel is treated as hung, as for a timeout.
                    self._send_cancel(child, slot, kill_after_grace=True)
        self._dispatch()

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Act on the scheduler's decisions until it has nothing more to say."""
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            while True:
                self._dispatch_again = False
                for decision in self._scheduler.decide(trio.current_time()):
                    if isinstance(decision, Start):
                        self._queued -= 1
                        self._start(decision.request_id, decision.child_id)
                    elif isinstance(decision, Fail):
                        self._queued -= 1
                        self._on_fail(decision.request_id, decision.reason)
                    elif isinstance(decision, Cancel):
                        self._on_deadline(decision.request_id, decision.reason)
                if not self._dispatch_again:
                    break
        finally:
            self._dispatching = False
        # Deadlines and pipelined children make decide() worth calling again at a later time;
        # if that is sooner than the driver's next timer, have the driver re-arm.
        wakeup = self._scheduler.next_wakeup()
        if wakeup is not None and wakeup < self._timers.armed:
            self._timers.wake.set()

    def _start(self, aid: int, child_id: str) -> None:
        child = self._children[child_id]
        req = self._attempts.get(aid)
        p = child.p
        now = trio.current_time()
        if req is None or req.done or req.attempt_id != aid:
            self._scheduler.finished(aid, now)  # stale; free the slot it was given
            return
        if p is None or child.state != "ready":
            # The scheduler saw it ready; the process is going away. Put the job back.
            self._scheduler.finished(aid, now)
            self._attempts.pop(aid, None)
            self._enqueue(req, now, retry=True)
            self._dispatch_again = True
            return
        rid = p.next_rid
        try:
            data = p.conn.encode_request(rid, req.task, req.deadline_unix, req.priority)
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as exc:
            # E.g. an id over 2**64 - 1 from an API caller: no child can be sent this task, and
            # raising here would leave the slot the scheduler gave it taken for ever.
            self._scheduler.finished(aid, now)
            self._finish(
                req,
                error=f"request {req.rid} ({req.stage}): its task cannot be sent to a prover"
                f" child: {exc}",
            )
            self._dispatch_again = True
            return
        if len(data) > _MAX_REQUEST_BYTES:
            # A child refuses a frame (or line) this long, and dies of it: every sibling would
            # in turn. The task is the problem, not the child.
            self._scheduler.finished(aid, now)
            self._finish(
                req,
                error=f"request {req.rid} ({req.stage}): its task is {len(data) / 2**20:.1f} MiB"
                f" on the wire ({len(req.task.replicas)} replicas), over the"
                f" {_MAX_REQUEST_BYTES / 2**20:.0f} MiB a prover child takes in one message;"
                " split it into smaller tasks",
            )
            self._dispatch_again = True
            return
        p.next_rid += 1
        slot = _Slot(aid, rid, req, now)
        if not p.slots:
            p.last_activity = now
        p.slots[rid] = slot
        self._slots[aid] = (child, slot)
        req.attempts += 1
        req.child = child.name
        req.running_on = (child, p)
        self._send(child, p, data)
        timeout = child.spec.request_timeout
        if timeout:
            slot.timeout = self._timers.add(
                now + timeout, lambda t: self._on_request_timeout(child, p, slot, t)
            )
        hb = effective_timeouts(child.spec)[0]
        if hb and p.conn.protocol == "dext" and not p.heartbeat_armed:
            p.heartbeat_armed = True
            self._timers.add(p.last_activity + hb, lambda t: self._on_heartbeat(child, p, t))
        if self._observer_send is not None:
            self._observe("dext_request_started", request=self._request_info(req))

    def _on_fail(self, aid: int, reason: str) -> None:
        req = self._attempts.pop(aid, None)
        if req is None or req.attempt_id != aid:
            return
        expired = req.deadline is not None and trio.current_time() >= req.deadline
        pool = [c for c in self._children.values() if c.spec.stage == req.stage]
        if pool and all(c.state == "fatal" for c in pool):
            # Say why no child can serve: the caller may not see the supervisor's log.
            reason += " (" + "; ".join(f"{c.name}: {c.last_exit}" for c in pool) + ")"
        self._finish(
            req,
            error=self._describe_failure(req, reason),
            outcome="timeout" if expired else "error",
        )

    def _on_deadline(self, aid: int, reason: str) -> None:
        entry = self._slots.get(aid)
        if entry is None:
            return
        child, slot = entry
        if slot.abandoned:
            return
        slot.abandoned = True
        req = slot.request
        child.failed += 1
        self._finish(
            req,
            error=f"request {req.rid} ({req.stage}): {reason}; cancelled (attempt {req.attempts})",
            outcome="timeout",
        )
        self._send_cancel(child, slot, kill_after_grace=True)

    def _describe_failure(self, req: _Request, reason: str) -> str:
        text = f"request {req.rid} ({req.stage}): {reason}"
        if req.attempts:
            text += f"; {req.attempts} attempt{'s' if req.attempts != 1 else ''} made"
        if req.history:
            text += " (" + "; ".join(req.history) + ")"
        return text

    # -- answers from children --------------------------------------------------------------

    def _on_events(self, child: _Child, p: _Process, events: list[Any]) -> None:
        now = trio.current_time()
        for ev in events:
            p.last_activity = now
            if isinstance(ev, Answer):
                self._on_answer(child, p, ev, now)
            elif isinstance(ev, ProgressEvent):
                slot = p.slots.get(ev.child_rid)
                if slot is not None:
                    # Phase changes (e.g. into the GPU's SNARK) let the policy pipeline the child.
                    self._scheduler.progress(slot.attempt_id, ev.phase, ev.done, ev.total, now)
                else:
                    log.debug(
                        "%s: progress for unknown request %d dropped", child.name, ev.child_rid
                    )
                    continue
                req = slot.request
                if not slot.abandoned and req.on_progress is not None:
                    try:
                        req.on_progress(Progress(req.rid, ev.phase, ev.done, ev.total))
                    except Exception:
                        log.exception("progress callback of request %d raised; ignored", req.rid)
            elif isinstance(ev, Skipped):
                if ev.raw:
                    report_bad_output(child.name, child.pid, ev.raw, ev.what, level=logging.WARNING)
                else:
                    log.warning("%s (pid %s): %s", child.name, child.pid, ev.what)
                slot = p.slots.get(ev.child_rid) if ev.child_rid is not None else None
                if slot is not None:
                    # The child answered this request, badly: it will not answer it again.
                    self._on_answer(
                        child, p, Answer(ev.child_rid, None, f"invalid response: {ev.what}"), now
                    )
            elif isinstance(ev, Ready):
                log.warning("%s: a second ready message ignored", child.name)
        if self._queued:
            # A freed slot or a phase change matters only to queued work; deadlines of running
            # work are the driver's (next_wakeup), and an answer never makes one come sooner.
            self._dispatch()

    def _on_answer(self, child: _Child, p: _Process, ev: Answer, now: float) -> None:
        slot = p.slots.pop(ev.child_rid, None)
        if slot is None:
            if 0 < ev.child_rid < p.next_rid:
                log.warning(
                    "%s (pid %s): a second response to its request %d dropped",
                    child.name,
                    child.pid,
                    ev.child_rid,
                )
            else:
                log.warning(
                    "%s (pid %s): response with unknown id %d dropped (ids sent so far: 1..%d)",
                    child.name,
                    child.pid,
                    ev.child_rid,
                    p.next_rid - 1,
                )
            return
        self._slots.pop(slot.attempt_id, None)
        self._timers.cancel(slot.timeout)
        child.answered = True
        self._scheduler.finished(slot.attempt_id, now)
        req = slot.request
        if slot.abandoned:
            return
        self._attempts.pop(slot.attempt_id, None)
        if ev.error is not None:
            child.failed += 1
            self._finish(
                req,
                error=f"request {req.rid} ({req.stage}) failed on {child.name}"
                f" (pid {child.pid}): {ev.error}",
            )
        elif ev.output is None or stage_of(ev.output) != req.stage:
            child.failed += 1
            got = "no output" if ev.output is None else f"a {stage_of(ev.output)} output"
            self._finish(
                req,
                error=f"request {req.rid} ({req.stage}): {child.name} (pid {child.pid})"
                f" answered with {got}",
            )
        else:
            child.done += 1
            self._finish(req, output=ev.output)

    # -- timeouts ---------------------------------------------------------------------------

    def _send_cancel(self, child: _Child, slot: _Slot, *, kill_after_grace: bool) -> None:
        p = child.p
        if p is None or p.slots.get(slot.child_rid) is not slot:
            return
        data = p.conn.encode_cancel(slot.child_rid)
        if data is not None:
            self._send(child, p, data)
        if kill_after_grace:
            grace = child.spec.cancel_grace
            self._timers.add(
                trio.current_time() + grace,
                lambda t: self._on_cancel_grace(child, p, slot, grace),
            )

    def _on_cancel_grace(self, child: _Child, p: _Process, slot: _Slot, grace: float) -> None:
        if p.slots.get(slot.child_rid) is not slot or p.down_reason is not None:
            return
        how = "a Cancel" if p.conn.protocol == "dext" else "its timeout (JSON lines: no Cancel)"
        # The request that hung was dealt with already; the others on this child did nothing
        # wrong, so their retry is free.
        self._kill(
            child,
            p,
            f"request {slot.request.rid} (child id {slot.child_rid}) still running"
            f" {grace:g}s after {how}",
            charge_all=False,
        )

    def _on_request_timeout(self, child: _Child, p: _Process, slot: _Slot, now: float) -> None:
        if p.slots.get(slot.child_rid) is not slot or slot.abandoned or p.down_reason is not None:
            return
        slot.abandoned = True
        req = slot.request
        child.failed += 1
        timeout = child.spec.request_timeout
        what = f"timed out after {timeout:g}s on {child.name} (pid {child.pid})"
        req.history.append(f"attempt {req.attempts} {what}")
        self._retry_or_fail(req, child, slot.attempt_id, what, outcome="timeout")
        self._send_cancel(child, slot, kill_after_grace=True)
        self._dispatch()

    def _on_heartbeat(self, child: _Child, p: _Process, now: float) -> None:
        hb = effective_timeouts(child.spec)[0]
        if p.down_reason is not None or not hb:
            return
        if not p.slots:
            p.heartbeat_armed = False
            return
        due = p.last_activity + hb
        if now < due:
            self._timers.add(due, lambda t: self._on_heartbeat(child, p, t))
            return
        self._kill(
            child,
            p,
            f"hung: no Progress or Response for {now - p.last_activity:.1f}s while working"
            f" (HeartbeatTimeoutSecs = {hb:g})",
            charge_all=True,
        )

    def _watch_stdin(self, child: _Child, p: _Process, now: float) -> None:
        """Writes to the child wait for room in its stdin pipe: make sure it keeps reading."""
        timeout = effective_timeouts(child.spec)[1]
        if timeout and not p.stdin_watch_armed:
            p.stdin_watch_armed = True
            self._timers.add(now + timeout, lambda t: self._on_stdin_watch(child, p, t))

    def _on_stdin_watch(self, child: _Child, p: _Process, now: float) -> None:
        p.stdin_watch_armed = False
        if p.down_reason is not None or p.queued_writes == 0:
            return
        timeout = effective_timeouts(child.spec)[1]
        due = p.stdin_progress_at + timeout
        if now < due:
            p.stdin_watch_armed = True
            self._timers.add(due, lambda t: self._on_stdin_watch(child, p, t))
            return
        self._kill(
            child,
            p,
            f"hung: read nothing from its stdin for {now - p.stdin_progress_at:.1f}s while"
            f" messages for it waited in a full pipe (StdinTimeoutSecs = {timeout:g})",
            charge_all=True,
        )

    def _retry_or_fail(
        self,
        req: _Request,
        child: _Child,
        aid: int,
        what: str,
        *,
        charge: bool = True,
        outcome: str = "error",
    ) -> None:
        """An attempt of `req` was lost (`what`): queue it again if it may, else answer it."""
        self._attempts.pop(aid, None)
        if req.done or req.attempt_id != aid:
            return
        if not charge:
            req.attempts -= 1
        now = trio.current_time()
        max_attempts = max(1, child.spec.max_attempts)
        if self._shutting_down:
            self._finish(
                req,
                error=self._describe_failure(
                    req, f"{what}, and the supervisor is shutting down, so it was not retried"
                ),
                outcome=outcome,
            )
        elif req.deadline is not None and now >= req.deadline:
            self._finish(
                req,
                error=self._describe_failure(req, f"{what}; its deadline has passed"),
                outcome="timeout",
            )
        elif req.attempts < max_attempts:
            log.warning(
                "request %d: %s; retrying (attempt %d of %d)",
                req.rid,
                what,
                req.attempts + 1,
                max_attempts,
            )
            self._enqueue(req, now, retry=True)
        else:
            self._finish(
                req,
                error=self._describe_failure(
                    req, f"{what}; giving up (MaxAttempts = {max_attempts} on {child.name})"
                ),
                outcome=outcome,
            )

    def _kill(self, child: _Child, p: _Process, reason: str, *, charge_all: bool) -> None:
        """Take a child down now: SIGKILL its process group; its task does the rest."""
        if p.down_reason is None:
            log.error("%s (pid %s): %s; killing its process group", child.name, child.pid, reason)
        self._mark_down(child, p, reason, charge_all=charge_all)
        p.proc.kill_tree()

    def _mark_down(
        self, child: _Child, p: _Process, reason: str, *, charge_all: bool = True
    ) -> None:
        """The process is going away: no more dispatch to it; its task tears it down."""
        if p.down_reason is None:
            p.down_reason = reason
            p.charge_all = charge_all
        if child.p is p and child.state in ("ready", "starting"):
            child.state = "stopping"
            self._scheduler.child_down(child.name, trio.current_time())
            self._notify()
        p.interrupt()

    # -- the driver -------------------------------------------------------------------------

    async def _driver(self, scope: trio.CancelScope) -> None:
        with scope:
            timers = self._timers
            while True:
                timers.wake = trio.Event()
                now = trio.current_time()
                for fn in timers.pop_due(now):
                    fn(now)
                wakeup = self._scheduler.next_wakeup()
                if wakeup is not None and wakeup <= now:
                    self._dispatch()
                    wakeup = self._scheduler.next_wakeup()
                    if wakeup is not None and wakeup <= now:
                        wakeup = None  # nothing more to do at this time: wait for an event
                nxt = min(timers.next(), wakeup if wakeup is not None else math.inf)
                if nxt <= trio.current_time():
                    await trio.lowlevel.checkpoint()
                    continue
                timers.armed = nxt
                with trio.move_on_at(nxt):
                    await timers.wake.wait()
                timers.armed = math.inf

    def _notify(self) -> None:
        if self._state_changed.statistics().tasks_waiting:
            self._state_changed.set()
            self._state_changed = trio.Event()

    # -- children ---------------------------------------------------------------------------

    async def _child_loop(
        self, child: _Child, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            while not child.stop.is_set():
                try:
                    was_ready, reason = await self._run_process(child, task_status)
                except Exception as exc:
                    # The same wall as in _run_process, for a bug outside its process's nursery.
                    reason = f"internal error in damocles-ext: {_describe_error(exc)}"
                    log.exception("%s: %s", child.name, reason)
                    was_ready = False
                    self._launched(child, task_status)
                    self._child_task_failed(child, reason)
                if child.stop.is_set():
                    break
                now = trio.current_time()
                decision = (
                    child.tracker.exited(now, reason, served=child.answered)
                    if was_ready
                    else child.tracker.start_failed(reason)
                )
                if isinstance(decision, GiveUp):
                    child.state = "fatal" if decision.fatal else "stopped"
                    child.next_start_at = None
                    log.error("%s: %s", child.name, decision.reason)
                    self._scheduler.child_fatal(child.name, now)
                    self._notify()
                    self._dispatch()
                    break
                child.state = "backoff"
                child.next_start_at = now + decision.delay
                log.warning("%s: restarting in %.2fs", child.name, decision.delay)
                self._notify()
                with trio.move_on_at(child.next_start_at):
                    await child.stop.wait()
                child.next_start_at = None
        finally:
            self._launched(child, task_status)
            if child.state != "fatal":
                child.state = "stopped"
            self._notify()

    def _child_task_failed(self, child: _Child, reason: str, p: _Process | None = None) -> None:
        """The task serving `child` raised: take its process `p` down (if there is one) and
        retry or fail what was running on the child."""
        child.last_exit = reason
        if p is not None:
            p.read_ended = True
            self._mark_down(child, p, reason)
        elif child.state in ("ready", "starting", "stopping"):
            child.state = "stopping"
            self._scheduler.child_down(child.name, trio.current_time())
        for aid, (owner, slot) in list(self._slots.items()):
            if owner is child:
                del self._slots[aid]
                self._timers.cancel(slot.timeout)
                if not slot.abandoned:
                    self._retry_or_fail(slot.request, child, aid, f"{child.name}: {reason}")
        self._notify()
        self._dispatch()

    def _launched(self, child: _Child, task_status: Any) -> None:
        if not child.launched:
            child.launched = True
            task_status.started()

    async def _run_process(self, child: _Child, task_status: Any) -> tuple[bool, str]:
        """One process of `child`, from spawn to reaping; returns (was it ready, why it ended)."""
        spec = child.spec
        child.state = "starting"
        self._notify()
        env = build_env(spec.inherit_envs, spec.envs)
        mark = self._adopter.mark(env)
        try:
            prepare_spawn(
                spec.name,
                spec.stage,
                spec.block,
                spec.argv,
                spec.kind,
                env,
                spec.cpuset,
                tmpdir=spec.envs.get("TMPDIR"),
                private_tmpdir=spec.private_tmpdir,
            )
            proc = spawn(spec.name, spec.argv, env, spec.cpuset)
        except (SpawnError, OSError, ValueError) as exc:
            # OSError and ValueError: a check in prepare_spawn that met what it did not expect
            # (a NUL in a path, an fd limit): still this child's failed start, not our crash.
            why = str(exc) if isinstance(exc, SpawnError) else f"{spec.name}: cannot start: {exc}"
            self._launched(child, task_status)
            child.last_exit = f"failed to start: {why}"
            log.error("%s", why)
            return False, why
        if self._guardian is not None:
            self._guardian.add(proc.pid)  # its process group, for if we are killed
        child.pid = proc.pid
        child.started_at = time.time()
        child.protocol = None
        child.answered = False
        p = _Process(proc, ChildConnection(spec.stage, spec.protocol, spec.name))
        p.tree_mark = mark
        child.p = p
        self._launched(child, task_status)
        log.info("%s: started pid %d: %s", child.name, proc.pid, _short_argv(spec))
        self._observe("dext_child_started", child=self._child_info(child))
        prefix = f"[{spec.stage}#{spec.index} pid={proc.pid}]"
        ready = False
        reason = "?"
        try:
            async with trio.open_nursery() as nursery:
                fields = {"child": spec.name, "stage": spec.stage, "index": spec.index}
                nursery.start_soon(self._relay_stderr, p, prefix, {**fields, "pid": proc.pid})
                nursery.start_soon(self._watch_exit, child, p)
                ready = await self._handshake(child, p)
                if ready:
                    p.reader_done = trio.Event()
                    nursery.start_soon(self._writer, child, p)
                    nursery.start_soon(self._reader, child, p)
                    while p.down_reason is None and not child.stop.is_set():
                        p.wake = trio.Event()
                        await p.wake.wait()
                    if p.down_reason is None:
                        await self._stop_gracefully(child, p)
                reason = await self._tear_down(child, p, ready)
                nursery.cancel_scope.cancel()
        except Exception as exc:
            # A bug of ours while serving this process ends it (killed and reaped just below),
            # never the supervisor; marked down first, so no submitter reads its closed pipe.
            reason = f"internal error in damocles-ext: {_describe_error(exc)}"
            log.exception("%s (pid %d): %s; killing it", child.name, proc.pid, reason)
            self._child_task_failed(child, reason, p)
        finally:
            with trio.CancelScope(shield=True):
                if proc.exit is None:
                    proc.kill_tree()
                    with trio.move_on_after(_REAP_TIMEOUT):
                        await proc.wait()
                    if proc.exit is None:
                        self._unreaped.append(proc)
                if proc.exit is not None and self._guardian is not None:
                    self._guardian.remove(proc.pid)
                await proc.aclose()
            child.p = None
        return ready, reason

    async def _relay_stderr(self, p: _Process, prefix: str, fields: dict[str, Any]) -> None:
        try:
            await relay_stderr(p.proc.stderr, prefix, child_log, fields, p.stderr_tail)
        finally:
            p.stderr_done.set()

    async def _handshake(self, child: _Child, p: _Process) -> bool:
        """Wait ReadyTimeoutSecs for the ready message; False (p.down_reason says why) if none."""
        spec = child.spec
        timeout = spec.ready_timeout or 5.0
        events: list[Any] = []
        data = b""
        exited = False
        try:
            with p.handshake_scope:
                p.handshake_scope.deadline = trio.current_time() + timeout
                while not p.conn.ready:
                    data = await _receive(p.proc.stdout)
                    events = p.conn.receive_data(data)
            exited = not child.stop.is_set() and (p.down_reason or "").startswith("exited")
            if exited:
                # The exit can be seen before what the child wrote just before it. It is reaped,
                # so all it wrote is in the pipe: read what is there, without waiting for more.
                fd = p.proc.stdout.fileno()
                while not p.conn.ready and (data := _read_now(fd)):
                    events = p.conn.receive_data(data)
        except ChildProtocolError as exc:
            if data:
                what = f"undecodable output at start: {exc}"
                report_bad_output(child.name, p.proc.pid, data, what)
            self._mark_down(child, p, "failed start")
            p.down_reason = f"failed start: {exc}"  # says more than an exit seen first
            return False
        if not p.conn.ready:
            wrote = f"it wrote {preview(p.conn.head)}" if p.conn.head else "it wrote nothing"
            if p.down_reason is None:
                self._mark_down(
                    child, p, f"failed start: no ready message within {timeout:g}s ({wrote})"
                )
            elif p.down_reason.startswith("exited"):
                p.down_reason = f"failed start: {p.down_reason} before its ready message ({wrote})"
            return False
        if exited:
            # It wrote its ready message and exited before it was acted on: its start succeeded
            # and the run after it failed, which the restart rules count as an exit after ready
            # (not as a failed start). It never takes a request: not ready for the scheduler,
            # status or observers (no dext_child_ready).
            child.tracker.ready(trio.current_time())
            log.info("%s (pid %d): ready, and exited at once", child.name, p.proc.pid)
            return True
        if child.stop.is_set() or p.down_reason is not None:
            self._mark_down(child, p, "stopped before it was ready")
            return False
        ready = next(ev for ev in events if isinstance(ev, Ready))
        child.protocol = ready.protocol
        if ready.hello is not None and ready.hello.capacity < child.capacity:
            log.warning(
                "%s: its Hello says capacity %d, but Concurrent is %d; sending up to %d at once",
                child.name,
                ready.hello.capacity,
                child.capacity,
                child.capacity,
            )
        now = trio.current_time()
        child.state = "ready"
        child.tracker.ready(now)
        log.info("%s (pid %d): ready (%s)", child.name, p.proc.pid, ready.protocol)
        self._scheduler.child_ready(child.name, now)
        self._notify()
        self._observe("dext_child_ready", child=self._child_info(child))
        rest = [ev for ev in events if not isinstance(ev, Ready)]
        if rest:
            self._on_events(child, p, rest)
        self._dispatch()
        return True

    async def _reader(self, child: _Child, p: _Process) -> None:
        assert p.reader_done is not None
        # Plain os.read on the non-blocking pipe: FdStream.receive_some yields to the scheduler
        # after every successful read, which puts a whole loop iteration on each answer's path.
        fd = p.proc.stdout.fileno()
        unyielded = 0
        try:
            while not p.read_ended:
                if p.read_owner is not None:
                    # A submitter reads the pipe while it waits for its answer (see submit()).
                    p.reader_resume = trio.Event()
                    await p.reader_resume.wait()
                    continue
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    unyielded = 0
                    p.reader_waiting = True
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:
                        pass  # kicked out by _read_for: a submitter reads now
                    finally:
                        p.reader_waiting = False
                    continue
                except OSError:
                    data = b""
                unyielded += 1
                if unyielded >= 16:  # a child that floods us must not starve everything else
                    unyielded = 0
                    await trio.lowlevel.checkpoint()
                self._on_data(child, p, data)
        finally:
            p.reader_done.set()

    def _on_data(self, child: _Child, p: _Process, data: bytes) -> None:
        """Act on what the child wrote (b"" at EOF); sets p.read_ended when reading must stop."""
        try:
            events = p.conn.receive_data(data)
            if events:
                self._on_events(child, p, events)
        except ChildProtocolError as exc:
            p.read_ended = True
            report_bad_output(child.name, p.proc.pid, data, f"undecodable output: {exc}")
            self._kill(child, p, f"broke the protocol: {exc}", charge_all=True)
            return
        except Exception as exc:
            # A bug of ours on what this child wrote (read here by the reader task or by a
            # submitter, see _read_for) ends this child, not the supervisor or the submitter.
            p.read_ended = True
            log.exception("%s (pid %s): internal error on its output", child.name, child.pid)
            self._kill(
                child,
                p,
                f"internal error in damocles-ext on its output: {type(exc).__name__}: {exc}",
                charge_all=True,
            )
            return
        if not data:
            p.read_ended = True
            self._mark_down(child, p, "closed its stdout")

    async def _read_for(self, child: _Child, p: _Process, req: _Request) -> None:
        """Read `p`'s pipe in the submitting task until `req` is answered (or we must stop).

        Answers then wake their caller directly instead of through the reader task, which
        saves a pass of trio's scheduler on every request's path. The reader task takes over
        again when this returns. Waiters are woken with notify_closing (the fd stays open), as
        a CancelScope per request would cost more than the pass it saves.
        """
        fd = p.proc.stdout.fileno()
        p.read_owner = req
        if p.reader_waiting:
            trio.lowlevel.notify_closing(fd)  # the reader task leaves wait_readable at once
        unyielded = 0
        try:
            while p.read_owner is req and not req.done and not p.read_ended:
                if unyielded >= 16:  # a child that floods us must not starve everything else
                    unyielded = 0
                    await trio.lowlevel.checkpoint()
                    continue
                try:
                    data = os.read(fd, _READ_SIZE)
                    unyielded += 1
                except BlockingIOError:
                    unyielded = 0
                    p.owner_waiting = True
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:
                        pass  # see release_reader
                    finally:
                        p.owner_waiting = False
                    continue
                except OSError:
                    data = b""
                self._on_data(child, p, data)
        finally:
            if p.read_owner is req:
                p.read_owner = None
            p.reader_resume.set()

    def _send(self, child: _Child, p: _Process, data: bytes) -> None:
        """Write to the child's stdin without blocking dispatch."""
        if p.queued_writes == 0 and p.down_reason is None:
            # The writer task is idle: write directly (the pipe is non-blocking), which saves a
            # task switch per request; whatever does not fit goes through the writer, in order.
            try:
                n = os.write(p.stdin_fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._mark_down(child, p, "its stdin pipe broke")
                return
            if n == len(data):
                return
            data = data[n:]
        if p.queued_writes == 0:
            # The pipe is full from now on; the writer notes each byte the child takes.
            now = trio.current_time()
            p.stdin_progress_at = now
            self._watch_stdin(child, p, now)
        p.queued_writes += 1
        try:
            p.send_channel.send_nowait(data)
        except trio.ClosedResourceError:
            p.queued_writes -= 1

    async def _writer(self, child: _Child, p: _Process) -> None:
        stdin = p.proc.stdin
        try:
            async with p.receive_channel:
                async for data in p.receive_channel:
                    # Batch whatever else is waiting into one write.
                    parts = [data]
                    while True:
                        try:
                            parts.append(p.receive_channel.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await self._write_all(p, b"".join(parts) if len(parts) > 1 else data)
                    p.queued_writes -= len(parts)
            await stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if not child.stop.is_set():
                self._mark_down(child, p, "its stdin pipe broke")

    @staticmethod
    async def _write_all(p: _Process, data: bytes) -> None:
        """FdStream.send_all, noting when the child takes bytes (the StdinTimeoutSecs watch)."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(p.stdin_fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(p.stdin_fd)
                continue
            view = view[n:]
            p.stdin_progress_at = trio.current_time()
        await trio.lowlevel.checkpoint()

    async def _watch_exit(self, child: _Child, p: _Process) -> None:
        info = await p.proc.wait()
        self._mark_down(child, p, f"exited ({info.describe()})")

    async def _stop_gracefully(self, child: _Child, p: _Process) -> None:
        """Shutdown frame or stdin close, SIGTERM to the group, SIGKILL after stop_timeout."""
        self._mark_down(child, p, "stopped (shutdown)")
        p.proc.remember_descendants()
        data = p.conn.encode_shutdown()
        if data is not None:
            self._send(child, p, data)
        p.send_channel.close()  # the writer sends what is queued, then closes stdin
        with trio.move_on_after(self.stop_timeout):
            await p.proc.wait()
        if p.proc.exit is None:
            log.warning(
                "%s (pid %d): still running %gs after it was asked to stop; SIGTERM",
                child.name,
                p.proc.pid,
                self.stop_timeout,
            )
            p.proc.signal_group(signal.SIGTERM)
            with trio.move_on_after(self.stop_timeout):
                await p.proc.wait()
        elif p.proc.signal_group(signal.SIGTERM):
            # The child left something behind in its group: a polite signal first.
            with trio.move_on_after(_GROUP_TERM_WAIT):
                while p.proc.signal_group(0):
                    await trio.sleep(0.02)

    async def _tear_down(self, child: _Child, p: _Process, was_ready: bool) -> str:
        """Kill what is left of the process tree, reap it, requeue or fail its requests."""
        self._mark_down(child, p, p.down_reason or "exited")
        p.proc.kill_tree()
        with trio.move_on_after(_REAP_TIMEOUT):
            await p.proc.wait()
        self._sweep_wanted.set()  # what it left outside its group is ours now (subreaper)
        # Answers written just before the exit may still sit in the pipe: take them first. And
        # the last stderr lines (a traceback, typically) are the ones an operator needs. Once the
        # process is reaped all it wrote is in the pipes, so EOF is waited for only briefly: a
        # grandchild that left the process group (setsid) may hold the pipes open for ever,
        # and the lost requests must not wait for it.
        drain = _PIPE_DRAIN_TIMEOUT if p.proc.exit is not None else _REAP_TIMEOUT
        with trio.move_on_after(drain) as drain_scope:
            if p.reader_done is not None:
                await p.reader_done.wait()
            await p.stderr_done.wait()
        if drain_scope.cancelled_caught and p.proc.exit is not None:
            log.warning(
                "%s (pid %d): exited, but its stdout/stderr are still open: a process it started"
                " outside its process group (setsid) holds them and may outlive it",
                child.name,
                p.proc.pid,
            )
        exit_info = p.proc.exit
        status = exit_info.describe() if exit_info else "did not die after SIGKILL"
        reason = p.down_reason or "exited"
        what = reason if exit_info and status in reason else f"{reason}; {status}"
        if p.stderr_tail and (not was_ready or (exit_info and exit_info.returncode)):
            # A child that could not start (or gave up) says why on stderr, e.g. "unknown
            # prover"; the operator should not have to dig that out of the log.
            what += f"; its last stderr: {_stderr_summary(p.stderr_tail)}"
        child.last_exit = what
        slots = list(p.slots.values())
        p.slots.clear()
        for slot in slots:
            self._slots.pop(slot.attempt_id, None)
            self._timers.cancel(slot.timeout)
            if slot.abandoned:
                continue
            req = slot.request
            child.failed += 1
            lost = f"{child.name} (pid {p.proc.pid}) went down while running it: {what}"
            req.history.append(f"attempt {req.attempts} on {child.name}: {what}")
            self._retry_or_fail(req, child, slot.attempt_id, lost, charge=p.charge_all)
        if child.stop.is_set():
            log.info("%s (pid %d): %s", child.name, p.proc.pid, what)
        else:
            log.error("%s (pid %d): %s", child.name, p.proc.pid, what)
        self._notify()
        self._dispatch()
        self._observe(
            "dext_child_exited",
            child=self._child_info(child),
            status=_exit_status(exit_info, reason),
        )
        return what

    async def _orphan_sweeper(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                # At each child's end, and now and then for orphans that exit on their own.
                with trio.move_on_after(_ORPHAN_SWEEP_INTERVAL):
                    await self._sweep_wanted.wait()
                self._sweep_wanted = trio.Event()
                with trio.move_on_after(_REAP_TIMEOUT):  # an unkillable orphan (D state)
                    await self._sweep_orphans()

    async def _sweep_orphans(self) -> None:
        """Kill and reap the orphans of our tree (process.OrphanAdopter), until none are left:
        an orphan's own setsid'd children become ours when it dies."""
        while True:
            running = [c.p for c in self._children.values() if c.p and c.p.proc.exit is None]
            spawned = {p.proc.pid for p in running}
            spawned |= {proc.pid for proc in self._unreaped if proc.exit is None}
            live = {p.tree_mark for p in running if p.tree_mark is not None}
            orphans, zombies = self._adopter.find(spawned, live)
            for pid in zombies:
                self._adopter.reap(pid)
            if not orphans:
                return
            for proc in orphans:
                try:
                    what = " ".join(proc.cmdline())[:120]
                except psutil.Error:
                    what = "?"
                log.warning(
                    "killing pid %d (%s): a child started it outside its process group (setsid)"
                    " and exited, leaving it behind",
                    proc.pid,
                    what,
                )
            async with trio.open_nursery() as nursery:
                for proc in orphans:
                    nursery.start_soon(OrphanAdopter.kill_and_reap, proc)

    async def _drain(self) -> None:
        """Shutdown, step 1: queued requests fail now, running ones get shutdown_grace."""
        for req in list(self._requests.values()):
            if req.attempt_id is not None and self._scheduler.is_queued(req.attempt_id):
                self._finish(
                    req,
                    error=f"request {req.rid} ({req.stage}) was still queued when the"
                    " supervisor began to shut down; it was not sent to a prover",
                )
        with trio.move_on_after(self.shutdown_grace):
            while self._split_in_flight or any(not r.done for r in self._requests.values()):
                await self._state_changed.wait()
        for req in list(self._requests.values()):
            where = f"on {req.child}" if req.child else "(it was still queued)"
            self._finish(
                req,
                error=f"request {req.rid} ({req.stage}) did not finish {where} within the"
                f" shutdown grace period ({self.shutdown_grace:g}s)",
            )

    async def _kill_everything(self) -> None:
        procs = [c.p.proc for c in self._children.values() if c.p is not None]
        procs += self._unreaped
        for proc in procs:
            proc.kill_tree()
        with trio.move_on_after(_REAP_TIMEOUT):
            for proc in procs:
                await proc.wait()
            if self._adopter.enabled:
                await self._sweep_orphans()

    # -- observers --------------------------------------------------------------------------

    def _observe(self, hook: str, **kwargs: Any) -> None:
        if self._observer_send is not None:
            try:
                self._observer_send.send_nowait((hook, kwargs))
            except trio.ClosedResourceError:
                pass
            except trio.WouldBlock:
                # Slow observers must not make the supervisor's memory grow without bound.
                self._observer_dropped += 1
                if self._observer_dropped % 1000 == 1:
                    log.warning(
                        "observers are too slow: %d events dropped so far (%s)",
                        self._observer_dropped,
                        hook,
                    )

    async def _observer_loop(self, receive: trio.MemoryReceiveChannel) -> None:
        from ..plugins import call_observers

        async with receive:
            async for hook, kwargs in receive:
                # An async observer that never returns would otherwise hold every later event
                # and keep run() from returning.
                with trio.move_on_after(_OBSERVER_TIMEOUT) as scope:
                    await call_observers(self._pm, hook, **kwargs)
                if scope.cancelled_caught:
                    log.error(
                        "observer hook %s did not return within %gs; cancelled it (observers"
                        " must return quickly)",
                        hook,
                        _OBSERVER_TIMEOUT,
                    )

    def _child_info(self, child: _Child) -> Any:
        from ..hookspecs import ChildInfo as HookChildInfo

        return HookChildInfo(
            stage=child.spec.stage,
            index=child.spec.index,
            name=child.name,
            pid=child.pid,
            gpu=child.spec.gpu,
        )

    def _request_info(self, req: _Request) -> Any:
        from ..hookspecs import RequestInfo

        return RequestInfo(
            id=req.rid,
            stage=req.stage,
            child=req.child,
            deadline=req.deadline_unix,
            attempt=max(1, req.attempts),
        )


def _exit_status(info: ExitInfo | None, reason: str) -> Any:
    from ..hookspecs import ExitStatus

    if info is None:
        return ExitStatus(returncode=None, signal=None, reason=reason)
    return ExitStatus(returncode=info.returncode, signal=info.signal, reason=reason)


def _stderr_summary(lines: Iterable[str]) -> str:
    cut = _STDERR_LINE_CHARS
    return " | ".join(
        repr(line if len(line) <= cut else line[:cut] + "...") for line in map(str.strip, lines)
    )


def _short_argv(spec: Any) -> str:
    text = describe_argv(spec) if hasattr(spec, "plugin_options") else " ".join(spec.argv)
    return text if len(text) <= 200 else text[:200] + "..."


def _read_now(fd: int) -> bytes:
    """What a non-blocking pipe holds now: b"" when it is empty, at EOF, or broken."""
    try:
        return os.read(fd, _READ_SIZE)
    except OSError:  # BlockingIOError (empty) among them
        return b""


def _describe_error(exc: BaseException) -> str:
    """`Type: message` of an exception, of each one in a (nursery's) exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe_error(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def _receive(stream: trio.lowlevel.FdStream) -> bytes:
    try:
        return await stream.receive_some(65536)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


__all__ = [
    "CHILD_STATES",
    "ChildStats",
    "Progress",
    "StageStats",
    "Supervisor",
    "SupervisorStats",
]
