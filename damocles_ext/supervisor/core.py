"""The supervisor: keeps a pool of prover children per stage alive and routes requests to them.

This is the trio driver around pure parts and the modules that carry out one job each: the
request book (`lifecycle.RequestBook`, sans-IO) holds every request and its rules (dispatch
through `scheduling.policy.Scheduler`, retries, timeouts, heartbeats, cancels, deadlines);
`restart.RestartTracker` decides when a stopped child starts again; `connection.ChildConnection`
speaks the protocols; `child_loop` runs each child (spawn, handshake, pipes, tear down); `reaper`
kills and reaps what is left; `observers` fans events out to the plugins; `stats` builds
`statistics()`. Everything runs on one trio thread.

Shape:
* every event (a submit, a child ready, an answer, a child down or lost, a caller gone) is told
  to the book at once, with `trio.current_time()`, and the effects it returns are carried out in
  order (`_apply`): tasks and Cancels written with `child_loop.send` once the effects are carried
  out, one write per child (directly while the pipe takes them, the rest through the child's
  writer task, so nothing blocks), kills, answers;
* a driver task tells the book when time passes, at the book's `next_wakeup()` (woken sooner
  when an event brings it forward);
* one task per child (`child_loop.child_loop`): spawn, handshake, serve, tear down, back off,
  again; it reaches the supervisor only through its `SupervisorHost` (host.py).

Every request is answered exactly once: the book emits one `Resolve` per request.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from ..config import effective_timeouts
from ..config.machine import per_run_tmp_root
from ..errors import (
    ProverError,
    UnsendableTask,
    UsageError,
    check_trio_run,
    numbered,
    prover_error,
)
from ..lifecycle import (
    ChildLimits,
    Effect,
    Kill,
    Note,
    ReportProgress,
    RequestBook,
    Resolve,
    Retry,
    Send,
    SendCancel,
)
from ..logs import report_bad_output
from ..protocol import dext
from ..stages import WINDOW_POST_SPLIT, child_stages, runs_split
from ..tasks import (
    UNSENDABLE,
    Output,
    Task,
    WindowPoSt,
    replicas_refusal,
    request_problem,
    stage_of,
    task_check,
)
from . import child_loop
from .arguments import check_arguments, coerce_children
from .child_loop import Child, ChildState, Process, mark_down
from .connection import Answer, ProgressEvent, Ready, Skipped
from .effect_log import log_note, log_retry
from .host import SupervisorHost
from .observers import Observers, request_info
from .orphans import GroupGuardian
from .pipe_turns import claim, read_own, wake_reader
from .readiness import check_wait_arguments, enough_ready, no_run, run_begun, run_going
from .reaper import Reaper
from .request import Batch, Started, Waiter, WallClock
from .restart import BackoffPolicy, RestartTracker
from .split import prove_split
from .stats import CHILD_STATES, ChildStats, StageStats, SupervisorStats, build_statistics
from .unheard import tell_unheard

if TYPE_CHECKING:
    import pluggy

    from ..config import ChildSpec, Config

log = logging.getLogger("damocles_ext.supervisor")

Progress = dext.Progress

_STOPPED = "the supervisor stopped before it was answered"


class Supervisor:
    """A pool of prover children per stage, and the requests routed to them."""

    #: Seconds submit and wait_ready wait for a run() not begun yet (nursery.start_soon begins
    #: it at the next checkpoint) before they say none is going.
    RUN_WAIT = 1.0

    def __init__(
        self,
        config: Config | Sequence[ChildSpec],
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        stages: Iterable[str] | None = None,
        shutdown_grace: float = 30.0,
        clock_jitter: random.Random | None = None,
        stop_timeout: float = 5.0,
        backoff: BackoffPolicy | None = None,
        adopt_orphans: bool = False,
        inline_observers: Sequence[object] = (),  # called as events happen (Observers)
        faults_said_elsewhere: bool = False,
    ) -> None:
        specs = coerce_children(config)
        stages = check_arguments(stages, shutdown_grace=shutdown_grace, stop_timeout=stop_timeout)
        if stages is not None:
            wanted = {s for stage in stages for s in child_stages(stage)}
            specs = [s for s in specs if s.stage in wanted]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique, got {names}")
        self._pm = plugin_manager
        self.shutdown_grace = shutdown_grace
        self.stop_timeout = stop_timeout
        rng = clock_jitter or random.Random()
        policy = backoff or BackoffPolicy()
        self._book = book = RequestBook()
        book.before_alarms = lambda now: tell_unheard(book, self._children.values(), now)
        self._children: dict[str, Child] = {}
        for spec in specs:
            tracker = RestartTracker(policy, auto_restart=spec.auto_restart, rng=rng)
            child = Child(spec, tracker)
            self._children[spec.name] = child
            heartbeat, stdin = effective_timeouts(spec)
            self._book.add_child(
                spec.name,
                spec.stage,
                capacity=child.capacity,
                weight=spec.weight,
                locks=spec.locks,
                limits=ChildLimits(
                    max_attempts=spec.max_attempts,
                    request_timeout=spec.request_timeout or 0.0,
                    cancel_grace=spec.cancel_grace,
                    heartbeat_timeout=heartbeat,
                    stdin_timeout=stdin,
                ),
            )
        self._rids = itertools.count(1)
        self._waiters: dict[int, Waiter] = {}  # callers waiting, by request id
        self._applying = 0  # _apply calls under way (they nest)
        self._pending: dict[str, tuple[Child, Process, list[bytes | bytearray]]] = {}  # _write
        self._claiming = 0  # the request _begin books whose caller may read its pipe (claim)
        self._wake = trio.Event()  # the driver looks at the book's next_wakeup again
        self._armed = math.inf  # when the driver wakes up next
        # trio.current_time, or the run's clock read directly once run() began (calls fewer).
        self._now: Callable[[], float] = trio.current_time
        self._wall = WallClock()
        self._shutting_down = False
        self._shutdown_requested = trio.Event()
        self._grace_left: float | None = None  # request_shutdown's, when given
        self._state_changed = trio.Event()  # readiness, request completion
        self._changed_waiting = 0  # tasks in _wait_changed (only then is it set)
        self._token: trio.lowlevel.TrioToken | None = None  # of the trio run of run()
        self._run_began = trio.Event()
        self._finished = False
        self._observers = Observers(plugin_manager, inline_observers)
        # A front end that says a request's faults on a line of its own (a worker's job,
        # prove's output): the book's note of them is not logged (log_note), only its others.
        self._faults_said_elsewhere = faults_said_elsewhere
        self._guardian: GroupGuardian | None = None
        # adopt_orphans: become a child subreaper and kill what children leave behind outside
        # their process group (orphans.OrphanAdopter); for a process of our own (serve, run).
        # Every child is marked (OrphanAdopter.mark) for the guardian, subreaper or not.
        self._adopt_orphans = adopt_orphans
        self._reaper = Reaper(
            lambda: [(c.p.proc, c.p.tree_mark) for c in self._children.values() if c.p is not None]
        )
        self._host = SupervisorHost(self)
        self._batch = Batch(self)
        self._split_in_flight = 0  # split WindowPoSts not yet answered (see submit)
        served = {s.stage for s in specs}
        # window_post requests run split (a vanilla step, then a SNARK step on another child)
        # when the config has the two split tables instead of [[WdPost]] (config.py checks it).
        self._split_window_post = runs_split(served)

    # -- public API -------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children and serve until `request_shutdown()`; returns once all is stopped.

        `task_status.started()` is called once every child has been launched (not necessarily
        ready).
        """
        if self._token is not None:
            raise RuntimeError("Supervisor.run() may be called only once")
        self._token = trio.lowlevel.current_trio_token()
        self._run_began.set()
        self._now = trio.lowlevel.current_clock().current_time
        observing = self._observers.open()
        try:
            self._guardian = GroupGuardian(self._reaper.adopter.token)
            if (root := per_run_tmp_root()) is not None:  # its atexit does not run on SIGKILL
                self._guardian.remove_when_gone(root)
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
                sweep = self._adopt_orphans and self._reaper.adopter.enable()
                nursery.start_soon(self._reaper.run, sweeper_scope, sweep)  # (and late exits)
                if observing:
                    nursery.start_soon(self._observers.run)
                async with trio.open_nursery() as children_nursery:
                    for child in self._children.values():
                        await children_nursery.start(child_loop.child_loop, self._host, child)
                    task_status.started()
                    await self._shutdown_requested.wait()
                    # Queued requests fail now; running ones get shutdown_grace.
                    self._tell(self._book.shutdown, trio.current_time())
                    await self._drain()
                    for child in self._children.values():
                        child.stop.set()
                        if child.p is not None:
                            child.p.interrupt()
                self._tell(self._book.fail_all, trio.current_time(), _STOPPED)
                driver_scope.cancel()
                sweeper_scope.cancel()
                self._observers.close()
        finally:
            self._finished = True
            self._shutting_down = True
            with trio.CancelScope(shield=True):
                await self._reaper.kill_everything()
            if self._guardian is not None:
                self._guardian.close()
            self._tell(self._book.fail_all, trio.current_time(), _STOPPED)

    async def submit(
        self,
        task: Task,
        *,
        deadline: float | None = None,
        priority: int = 0,
        on_progress: Callable[[Progress], None] | None = None,
        on_dispatch: Callable[[str | None], None] | None = None,
    ) -> Output:
        """Prove `task` on a child of its stage; `deadline` is a unix time. Raises ProverError.

        `on_dispatch(name)` is called with a child's name each time the request is sent to a
        child (again after a retry), and with None when an attempt ended and the request waits
        for another child; the `dext_request_started` observers see the same dispatches.

        A deadline that is not a time (NaN, inf, beyond the year 9999), a priority that is not a
        signed 64-bit whole number, or a task that is none, has a field its child could not read
        or that no prover can prove (tasks.task_check), is a UsageError at once.

        With the split WindowPoSt tables, a WindowPoSt runs as two requests, its vanilla step
        and then its SNARK step, both with its deadline and priority (`split.prove_split`).
        """
        encoded = task_check(task) if isinstance(task, Task) else None
        if isinstance(encoded, str):
            rid = next(self._rids)
            kind = UnsendableTask if encoded.startswith(UNSENDABLE) else UsageError
            raise numbered(kind(f"request {rid} {encoded}"), rid)
        how = (deadline, priority, on_progress, on_dispatch)
        if not (self._split_window_post and isinstance(task, WindowPoSt)):
            # All in this coroutine (as split._step does for each step of a split one): each
            # coroutine more is a frame more to make and to resume as the caller wakes, per
            # request (bench_supervisor_ab: 2-5%).
            if not run_going(self, "Supervisor.submit()"):
                await run_begun(self, "Supervisor.submit()")
            await trio.lowlevel.checkpoint_if_cancelled()
            waiter = self._begin(task, *how, None, False, None, encoded, claim=True)
            try:
                if (turn := claim(self._children, waiter)) is not None:  # (pipe_turns)
                    await read_own(self._host, *turn, waiter, child_loop.on_data)
                if not waiter.tracked.done:
                    await waiter.wait()
            finally:
                if not waiter.tracked.done:  # the caller went away (cancelled): _abandon
                    self._abandon(waiter)
            return waiter.result()
        # To the caller a split WindowPoSt is one request: one in flight as shutdown begins may
        # take its SNARK step within the grace, and _drain waits for it between the two steps.
        self._split_in_flight += 1
        try:
            return await prove_split(self, task, how)
        finally:
            self._split_in_flight -= 1
            self._notify()

    def start_nowait(
        self,
        task: Task,
        *,
        deadline: float | None = None,
        priority: int = 0,
        on_progress: Callable[[Progress], None] | None = None,
        on_done: Callable[[Output | None, ProverError | None], None],
    ) -> Started | None:
        """`submit` without a task per request, for front ends: `on_done(output, error)` is
        called once, maybe before this returns, from within the supervisor (it must neither
        block nor call the supervisor), with what `submit` would return or raise; its refusals
        are raised here (the task is a typed decoder's, its fields checked: its replicas are
        here). `Started.cancel()`: a cancelled `submit`. None for a split WindowPoSt: submit it."""
        if self._split_window_post and isinstance(task, WindowPoSt):
            return None
        check_trio_run("Supervisor.start_nowait()", None if self._finished else self._token)
        if self._token is None and not self._finished:  # (synchronous: it cannot wait for one)
            raise no_run("Supervisor.start_nowait()")
        if (problem := replicas_refusal(task)) is not None:
            rid = next(self._rids)
            raise numbered(UsageError(f"request {rid} {problem}"), rid)
        waiter = self._begin(task, deadline, priority, on_progress, None, on_done, False, None)
        return Started(self, waiter)

    def batch(self) -> Batch:
        """A context within which what the requests started send their children goes out at
        its end, in one write per child (a front end starting the requests of one read)."""
        return self._batch

    def _abandon(self, waiter: Waiter) -> None:
        """The caller of `waiter` went away: answer its request (cancelled), stop its work."""
        if not waiter.done:
            self._tell(self._book.caller_gone, waiter.rid, trio.current_time())

    def _begin(
        self,
        task: Task,
        deadline: float | None,
        priority: int,
        on_progress: Callable[[Progress], None] | None,
        on_dispatch: Callable[[str | None], None] | None,
        on_done: Callable[[Output | None, ProverError | None], None] | None,
        in_flight: bool,
        avoid: frozenset[str] | None,
        encoded: bytes | None = None,
        claim: bool = False,
    ) -> Waiter:
        """Book a new request and dispatch what follows; its waiter (it may be answered).
        `claim`: its caller may read its child's pipe itself (pipe_turns.claim): its dispatch
        does not wake the reader of that child."""
        rid = next(self._rids)
        if (problem := request_problem(task, deadline, priority)) is not None:
            raise numbered(UsageError(f"request {rid} {problem}"), rid)
        if self._shutting_down and not (in_flight and not self._finished and self._grace_left != 0):
            state = "has stopped" if self._finished else "is shutting down"
            why = f"request {rid} ({stage_of(task)}) refused: the supervisor {state}"
            raise prover_error(why, late=False, request_id=rid)
        now = self._now()
        deadline_t = None if deadline is None else self._wall.on_clock(deadline, now)
        out: list[Effect] = []
        self._claiming = rid if claim else 0
        try:
            tracked, _ = self._book.submit(
                rid,
                task,
                now,
                deadline=deadline_t,
                deadline_unix=deadline,
                priority=priority,
                second_step=in_flight,
                avoid=avoid,
                out=out,
            )
            tracked.task_msgpack = encoded  # (before the effects: a Send among them reads it)
            waiter = self._waiters[rid] = Waiter(tracked, on_progress, on_dispatch, on_done=on_done)
        finally:  # even after a bug of ours: what the book answered reaches its callers
            try:
                self._apply(out)
            finally:
                self._claiming = 0
        return waiter

    async def wait_ready(self, stage: str | None = None, count: int = 1) -> None:
        """Wait until `count` children (of `stage`, or of any stage) are ready.

        Raises ProverError when that can no longer happen (too many children FATAL or stopped),
        UsageError for a stage that is none or a count that is no whole number >= 1."""
        check_wait_arguments(stage, count)
        if stage == "window_post" and self._split_window_post:
            for step in WINDOW_POST_SPLIT:
                await self.wait_ready(step, count)
            return
        while not enough_ready(self._children.values(), stage, count, self._finished):
            await self._wait_changed()

    async def wait_changed(self) -> None:
        """Wait until a child becomes ready or stops, or a request is answered: what may change
        how many requests the children can take (a caller pulling work waits on it)."""
        await self._wait_changed("Supervisor.wait_changed()")

    async def _wait_changed(self, what: str = "Supervisor.wait_ready()") -> None:
        if self._token is None:
            return await run_begun(self, what)  # (then the caller looks again)
        check_trio_run(what, None if self._finished else self._token)
        self._changed_waiting += 1
        try:
            await self._state_changed.wait()
        finally:
            self._changed_waiting -= 1

    def request_shutdown(self, grace_left: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish (shutdown_grace, or `grace_left` of
        it when the caller waited the rest already), stop the children."""
        if self._token is not None and not self._finished:  # else no task waits on its events
            check_trio_run("Supervisor.request_shutdown()", self._token)
        if grace_left is not None:
            self._grace_left = max(0.0, grace_left)
        self._book.shutting_down = True  # nothing lost from now on is retried
        self._shutting_down = True
        self._shutdown_requested.set()
        self._notify()

    def stop_at_once(self, why: str) -> None:
        """Stop without the grace (a second signal): every request still open is answered with
        `why` now, and no split WindowPoSt takes its SNARK step (no grace is left for it)."""
        self.request_shutdown(grace_left=0.0)
        self._tell(self._book.fail_all, trio.current_time(), why)

    @property
    def shutting_down(self) -> bool:
        """True once `request_shutdown()` was called (or run() ended)."""
        return self._shutting_down

    def statistics(self) -> SupervisorStats:
        """A snapshot: every child's state and counters, every stage's queue."""
        check_trio_run("Supervisor.statistics()", None if self._finished else self._token)
        return build_statistics(self._children.values(), self._book, self._shutting_down)

    # -- the request book -------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        """Carry out what the request book asked, in order; what goes to one child's stdin is
        written at the end, in one write (several requests on a child with Concurrent > 1)."""
        if effects:
            self._applying += 1
            try:
                self._carry_out(effects)
            finally:
                self._applying -= 1
        if not self._applying:
            self._settle()

    def _settle(self) -> None:
        """Once per outermost apply, batch or read: the writes kept go out; a new alarm due
        before the driver's has it look again."""
        if self._pending:
            self._flush()
        wakeup = self._book.next_wakeup()
        if wakeup is not None and wakeup < self._armed:
            self._wake.set()

    def _tell(self, event: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Tell the book `event(*args, **kwargs)` (a bound method of it) and carry out its
        effects, even after a bug of ours: what the book answered before it raised, it counts
        as answered, and it reaches its callers."""
        out: list[Effect] = []
        try:
            event(*args, out=out, **kwargs)
        finally:
            self._apply(out)

    def _write(self, child: Child, p: Process, data: bytes | bytearray) -> None:
        pending = self._pending.get(child.name)
        if pending is None or pending[1] is not p:
            if pending is not None:
                self._flush()
            self._pending[child.name] = (child, p, [data])
        else:
            pending[2].append(data)

    def _flush(self) -> None:
        """Write what `_write` kept, each child's in one write, in order."""
        pending = self._pending
        while pending:
            child, p, chunks = pending.pop(next(iter(pending)))
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            child_loop.send(self._host, child, p, data)

    def _carry_out(self, effects: list[Effect]) -> None:
        for effect in effects:
            try:
                if type(effect) is Send:  # the effects are final classes: the common two first
                    self._send(effect)
                elif type(effect) is Resolve:
                    self._resolved(effect)
                elif isinstance(effect, SendCancel):
                    child = self._children[effect.child]
                    if (p := child.p) and (data := p.conn.encode_cancel(effect.child_rid)):
                        self._write(child, p, data)
                elif isinstance(effect, Kill):
                    self._flush()
                    child = self._children[effect.child]
                    if child.p is not None:
                        child_loop.kill(
                            self._host, child, child.p, effect.reason, request_id=effect.request_id
                        )
                elif isinstance(effect, Retry):
                    log_retry(effect, self._children)
                    if (waiter := self._waiters.get(effect.request.rid)) is not None:
                        waiter.dispatched(None)
                elif isinstance(effect, ReportProgress):
                    if (waiter := self._waiters.get(effect.request.rid)) is not None:
                        waiter.progress(effect.phase, effect.done, effect.total)
                elif isinstance(effect, Note) and not (
                    effect.faults is not None and self._faults_said_elsewhere
                ):
                    log_note(effect, self._children)
            except Exception:  # a bug of ours: the effects after it (answers too) still go
                log.exception("internal error carrying out %s; going on", type(effect).__name__)

    def _send(self, effect: Send) -> None:
        req = effect.request
        child = self._children[effect.child]
        p = child.p
        if p is None:  # the book and the child's task disagree: a bug of ours; retry elsewhere
            child.log.error("%s: no process to send request %d to", child.name, req.rid)
            now = trio.current_time()
            self._tell(self._book.child_lost, child.name, now, "its process was gone")
            return
        data = p.conn.request_or_why(
            effect.child_rid, req.task, req.deadline_unix, req.priority, req.rid, req.task_msgpack
        )
        if isinstance(data, str):  # no child can be sent this task
            now = trio.current_time()
            self._tell(self._book.unsendable, child.name, effect.child_rid, now, data)
            return
        self._write(child, p, data)
        p.turn.wanted = claimable = req.rid == self._claiming
        if p.turn.off and not claimable:
            wake_reader(p)  # its reader is off the pipe and no caller reads this (pipe_turns)
        waiter = self._waiters.get(req.rid)
        if waiter is not None and waiter.on_dispatch is not None:
            waiter.dispatched(child.name)
        if self._observers.opened and self._observers.wants("dext_request_started"):
            self._observers.observe("dext_request_started", request=request_info(req))

    def _resolved(self, effect: Resolve) -> None:
        req = effect.request
        waiter = self._waiters.pop(req.rid, None)
        if waiter is not None:
            if effect.error is not None:
                waiter.error = prover_error(effect.error, late=effect.late, request_id=req.rid)
            else:
                waiter.output = effect.output
            waiter.answer()
        if self._changed_waiting:  # (_notify's own test, here: per request, most have none)
            self._notify()
        if self._observers.opened and self._observers.wants("dext_request_finished"):
            now = trio.current_time()
            self._observers.observe(
                "dext_request_finished",
                request=request_info(req),
                outcome=effect.outcome,
                duration=now - req.arrival,
                slack=None if req.deadline is None else req.deadline - now,
            )

    # -- what children say ------------------------------------------------------------------

    def _on_events(self, child: Child, p: Process, events: list[Any]) -> None:
        # The common read, answers only: the book takes them together, fills the slots they
        # free in one dispatch, and what that sends goes out in one write per child.
        for ev in events:
            if type(ev) is not Answer:
                break
        else:
            answers = [(e.child_rid, e.output, e.error) for e in events]
            self._tell(self._book.answers, child.name, answers, self._now())
            return
        self._applying += 1
        try:
            self._on_each_event(child, p, events)
        finally:
            self._applying -= 1
        if not self._applying:
            self._settle()

    def _on_each_event(self, child: Child, p: Process, events: list[Any]) -> None:
        now = self._now()
        book = self._book
        # What a mangled answer read here may be: not what an answer before it frees a slot for.
        sent = book.attempt_ids(child.name) if len(events) > 1 else None
        for ev in events:
            if isinstance(ev, Answer):
                self._tell(
                    book.answered, child.name, ev.child_rid, now, output=ev.output, error=ev.error
                )
            elif isinstance(ev, ProgressEvent):
                self._tell(
                    book.progress,
                    child.name,
                    ev.child_rid,
                    now,
                    phase=ev.phase,
                    done=ev.done,
                    total=ev.total,
                )
            elif isinstance(ev, Skipped):
                if ev.raw:
                    report_bad_output(child.name, child.pid, ev.raw, ev.what, level=logging.WARNING)
                else:
                    child.log.warning("%s (pid %s): %s", child.name, child.pid, ev.what)
                rid = ev.child_rid
                if rid is None and ev.response_like:  # its id mangled: the only one it can be
                    rid = book.only_attempt(child.name, sent)
                if rid is not None and book.is_running(child.name, rid):
                    # The child answered this request, badly: it will not answer it again.
                    error = f"invalid response: {ev.what}"
                    self._tell(book.answered, child.name, rid, now, error=error)
                else:
                    self._tell(book.heard_from, child.name, now)
            elif isinstance(ev, Ready):
                child.log.warning("%s: a second ready message ignored", child.name)
                self._tell(book.heard_from, child.name, now)

    # -- the driver -------------------------------------------------------------------------

    async def _driver(self, scope: trio.CancelScope) -> None:
        """Tell the book when time passes: at its next_wakeup, or when it has a sooner one."""
        with scope:
            while True:
                try:
                    self._tell(self._book.advance, trio.current_time())
                except Exception:  # a bug of ours in one rule must not end the supervisor
                    log.exception("the request book failed on time passing; going on")
                # After _apply (which sets the old one): nothing else runs until the wait below.
                self._wake = trio.Event()
                wakeup = self._book.next_wakeup()
                nxt = math.inf if wakeup is None else wakeup
                if nxt <= trio.current_time():
                    await trio.lowlevel.checkpoint()
                    continue
                self._armed = nxt
                with trio.move_on_at(nxt):
                    await self._wake.wait()
                self._armed = math.inf

    def _notify(self) -> None:
        if self._changed_waiting:
            self._state_changed.set()
            self._state_changed = trio.Event()

    # -- children ---------------------------------------------------------------------------

    def _child_task_failed(self, child: Child, reason: str, p: Process | None = None) -> None:
        """The task serving `child` raised: take its process `p` down (if there is one) and
        retry or fail what was running on the child."""
        child.last_exit = reason
        if p is not None:
            p.read_ended = True
            mark_down(self._host, child, p, reason)
        elif child.state in (ChildState.READY, ChildState.STARTING):
            child.change_state(ChildState.STOPPING)
        self._tell(self._book.child_lost, child.name, trio.current_time(), reason)
        self._notify()

    async def _drain(self) -> None:
        """Shutdown: running requests get shutdown_grace (queued ones failed at the request)."""
        left = self._grace_left
        with trio.move_on_after(self.shutdown_grace if left is None else left):
            while self._split_in_flight or self._book.unanswered:
                await self._wait_changed()
        self._tell(self._book.grace_over, trio.current_time(), self.shutdown_grace)


__all__ = [
    "CHILD_STATES",
    "ChildStats",
    "Progress",
    "StageStats",
    "Supervisor",
    "SupervisorStats",
]
