"""The supervisor: keeps a pool of prover children per stage alive and routes requests to them.

This is the trio driver around pure parts and the modules that carry out one job each:
`scheduling.policy.Scheduler` decides which child gets which request, `restart.RestartTracker`
decides when a stopped child starts again, `connection.ChildConnection` speaks the protocols;
`child_loop` runs each child (spawn, handshake, pipes, tear down), `reaper` kills and reaps what
is left, `observers` fans events out to the plugins, `stats` builds `statistics()`, `timers`
keeps the timer heap. Everything runs on one trio thread.

Shape:
* one task per child (`child_loop.child_loop`): spawn, handshake, serve, tear down, back off,
  again; requests are written with `child_loop.send` (directly while the pipe takes them, the
  rest through the child's writer task, so dispatch never blocks);
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

import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ..errors import ProverError, UsageError
from ..logs import report_bad_output
from ..protocol import dext
from ..scheduling.policy import CancelRunning, ChildSlots, Fail, Job, Scheduler, Start
from ..stages import WINDOW_POST_SPLIT, child_stages, runs_split
from ..tasks import (
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
from . import child_loop, timeouts
from .child_loop import Child, ChildState, Process, mark_down
from .connection import Answer, ProgressEvent, Ready, Skipped
from .observers import Observers, request_info
from .orphans import GroupGuardian
from .reaper import Reaper
from .request import Request, Slot
from .restart import BackoffPolicy, RestartTracker
from .stats import CHILD_STATES, ChildStats, StageStats, SupervisorStats, build_statistics
from .timers import Timers

if TYPE_CHECKING:
    import pluggy

    from ..config import ChildSpec, Config

log = logging.getLogger("damocles_ext.supervisor")

Progress = dext.Progress

# The longest request a child accepts: a dext frame's payload limit (a JSON line's is the same).
_MAX_REQUEST_BYTES = dext.HEADER_SIZE + dext.DEFAULT_MAX_FRAME_SIZE


def _state_word(state: ChildState) -> str:
    return state.value.upper() if state is ChildState.FATAL else state.value


def _coerce_children(config: Config | Sequence[ChildSpec]) -> list[ChildSpec]:
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
        config: Config | Sequence[ChildSpec],
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        stages: Iterable[str] | None = None,
        shutdown_grace: float = 30.0,
        clock_jitter: random.Random | None = None,
        stop_timeout: float = 5.0,
        backoff: BackoffPolicy | None = None,
        adopt_orphans: bool = False,
    ) -> None:
        specs = _coerce_children(config)
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
        self._scheduler = Scheduler()
        self._children: dict[str, Child] = {}
        for spec in specs:
            tracker = RestartTracker(policy, auto_restart=spec.auto_restart, rng=rng)
            child = Child(spec, tracker)
            self._children[spec.name] = child
            self._scheduler.add_child(
                ChildSlots(
                    child_id=spec.name,
                    stage=spec.stage,
                    capacity=child.capacity,
                    weight=max(1, spec.weight),
                    locks=frozenset(spec.locks),
                )
            )
        self._rids = itertools.count(1)
        self._attempt_ids = itertools.count(1)
        self._requests: dict[int, Request] = {}
        self._attempts: dict[int, Request] = {}  # attempt id -> request, queued or running
        self._queued = 0  # attempts waiting in the scheduler's queues
        self._slots: dict[int, tuple[Child, Slot]] = {}  # attempt id -> where it runs
        self._timers = Timers()
        self._dispatching = False
        self._dispatch_again = False
        self._shutting_down = False
        self._shutdown_requested = trio.Event()
        self._state_changed = trio.Event()  # readiness, request completion
        self._started = False
        self._finished = False
        self._observers = Observers(plugin_manager)
        self._guardian: GroupGuardian | None = None
        # adopt_orphans: become a child subreaper and kill what children leave behind outside
        # their process group (orphans.OrphanAdopter); for a process of our own (serve, run).
        # Every child is marked (OrphanAdopter.mark) for the guardian, subreaper or not.
        self._adopt_orphans = adopt_orphans
        self._reaper = Reaper(
            lambda: [(c.p.proc, c.p.tree_mark) for c in self._children.values() if c.p is not None]
        )
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
        if self._started:
            raise RuntimeError("Supervisor.run() may be called only once")
        self._started = True
        observing = self._observers.open()
        try:
            self._guardian = GroupGuardian(self._reaper.adopter.token)
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
                if self._adopt_orphans and self._reaper.adopter.enable():
                    nursery.start_soon(self._reaper.sweeper, sweeper_scope)
                if observing:
                    nursery.start_soon(self._observers.run)
                async with trio.open_nursery() as children_nursery:
                    for child in self._children.values():
                        await children_nursery.start(child_loop.child_loop, self, child)
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
                self._observers.close()
        finally:
            self._finished = True
            self._shutting_down = True
            with trio.CancelScope(shield=True):
                await self._reaper.kill_everything()
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
        req = Request(rid, task, stage, now, deadline_t, deadline, priority, on_progress)
        self._requests[rid] = req
        self._enqueue(req, now, retry=False)
        self._dispatch()
        try:
            while not req.done:
                where = req.running_on
                if where is not None and where[1].read_owner is None and not where[1].read_ended:
                    await child_loop.read(self, where[0], where[1], owner=req)
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
            if sum(c.state is ChildState.READY for c in pool) >= count:
                return
            alive = [c for c in pool if c.state not in (ChildState.FATAL, ChildState.STOPPED)]
            if len(alive) < count or self._finished:
                what = f"{stage} children" if stage else "children"
                raise ProverError(
                    f"cannot wait for {count} ready {what}: only {len(alive)} of {len(pool)}"
                    " can still start ("
                    + (
                        "; ".join(
                            f"{c.name} is {_state_word(c.state)}, last: {c.last_exit}"
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
        return build_statistics(
            self._children.values(),
            self._scheduler,
            sum(1 for r in self._requests.values() if not r.done),
            self._shutting_down,
        )

    @property
    def _observer_dropped(self) -> int:
        return self._observers.dropped

    # -- requests ---------------------------------------------------------------------------

    def _enqueue(self, req: Request, now: float, *, retry: bool) -> None:
        aid = next(self._attempt_ids)
        req.attempt_id = aid
        where = req.running_on
        req.running_on = None
        if where is not None and where[1].read_owner is req:
            # Its submitter reads the pipe of the attempt it leaves: it must follow the request
            # (or wait for its answer), not wait on that child until it is killed.
            where[1].release_reader()
        self._attempts[aid] = req
        job = Job(aid, req.stage, req.arrival, req.deadline, req.priority)
        self._queued += 1
        if retry:
            self._scheduler.requeue(job, now)
        else:
            self._scheduler.submit(job, now)

    def _finish(
        self,
        req: Request,
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
                    isinstance(output, WindowPoStOutput | WindowPoStVanillaOutput) and output.faults
                )
                outcome = "fault" if faulty else "ok"
        req.event.set()
        where = req.running_on
        if where is not None:
            req.running_on = None
            if where[1].read_owner is req:
                where[1].release_reader()
        self._notify()
        if self._observers.active:
            now = trio.current_time()
            self._observers.observe(
                "dext_request_finished",
                request=request_info(req),
                outcome=outcome,
                duration=now - req.arrival,
                slack=None if req.deadline is None else req.deadline - now,
            )

    def _fail_all(self, why: str) -> None:
        for req in list(self._requests.values()):
            where = f" (last on {req.child})" if req.child else " (still queued)"
            self._finish(req, error=f"request {req.rid} ({req.stage}): {why}{where}")

    def _abandon(self, req: Request) -> None:
        """The caller went away (cancelled): forget the request, stop its work if we can."""
        self._finish(req, error=f"request {req.rid} abandoned by its caller", outcome="cancelled")
        for aid, (child, slot) in list(self._slots.items()):
            if slot.request is req and not slot.abandoned:
                slot.abandoned = True
                p = child.p
                if p is not None and p.conn.protocol == "dext":
                    # A JSON-lines child cannot be told; its answer will be dropped. A dext child
                    # that ignores Cancel is treated as hung, as for a timeout.
                    timeouts.send_cancel(self, child, slot, kill_after_grace=True)
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
                    elif isinstance(decision, CancelRunning):
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
        if p is None or child.state is not ChildState.READY:
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
        slot = Slot(aid, rid, req, now)
        if not p.slots:
            p.last_activity = now
        p.slots[rid] = slot
        self._slots[aid] = (child, slot)
        req.attempts += 1
        req.child = child.name
        req.running_on = (child, p)
        child_loop.send(self, child, p, data)
        slot.timeout = timeouts.arm_request_timeout(self, child, p, slot)
        timeouts.arm_heartbeat(self, child, p)
        if self._observers.active:
            self._observers.observe("dext_request_started", request=request_info(req))

    def _on_fail(self, aid: int, reason: str) -> None:
        req = self._attempts.pop(aid, None)
        if req is None or req.attempt_id != aid:
            return
        expired = req.deadline is not None and trio.current_time() >= req.deadline
        pool = [c for c in self._children.values() if c.spec.stage == req.stage]
        if pool and all(c.state is ChildState.FATAL for c in pool):
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
        timeouts.send_cancel(self, child, slot, kill_after_grace=True)

    def _describe_failure(self, req: Request, reason: str) -> str:
        text = f"request {req.rid} ({req.stage}): {reason}"
        if req.attempts:
            text += f"; {req.attempts} attempt{'s' if req.attempts != 1 else ''} made"
        if req.history:
            text += " (" + "; ".join(req.history) + ")"
        return text

    # -- answers from children --------------------------------------------------------------

    def _on_events(self, child: Child, p: Process, events: list[Any]) -> None:
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
                if ev.child_rid is not None and ev.child_rid in p.slots:
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

    def _on_answer(self, child: Child, p: Process, ev: Answer, now: float) -> None:
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

    def _retry_or_fail(
        self,
        req: Request,
        child: Child,
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

    # -- the driver -------------------------------------------------------------------------

    async def _driver(self, scope: trio.CancelScope) -> None:
        with scope:
            timers = self._timers
            while True:
                timers.wake = trio.Event()
                now = trio.current_time()
                for fn in timers.pop_due(now):
                    try:
                        fn(now)
                    except Exception:  # a bug of ours in one rule must not end the supervisor
                        log.exception("a timer of the supervisor failed; going on")
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

    def _child_task_failed(self, child: Child, reason: str, p: Process | None = None) -> None:
        """The task serving `child` raised: take its process `p` down (if there is one) and
        retry or fail what was running on the child."""
        child.last_exit = reason
        if p is not None:
            p.read_ended = True
            mark_down(self, child, p, reason)
        elif child.state in (ChildState.READY, ChildState.STARTING, ChildState.STOPPING):
            if child.state is not ChildState.STOPPING:
                child.change_state(ChildState.STOPPING)
            self._scheduler.child_down(child.name, trio.current_time())
        for aid, (owner, slot) in list(self._slots.items()):
            if owner is child:
                del self._slots[aid]
                self._timers.cancel(slot.timeout)
                if not slot.abandoned:
                    self._retry_or_fail(slot.request, child, aid, f"{child.name}: {reason}")
        self._notify()
        self._dispatch()

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


__all__ = [
    "CHILD_STATES",
    "ChildStats",
    "Progress",
    "StageStats",
    "Supervisor",
    "SupervisorStats",
]
