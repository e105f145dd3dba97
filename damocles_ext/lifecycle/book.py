"""The request book: every request from submission to its one answer, sans-IO.

The supervisor tells the book what happened (a request submitted, a child ready, an answer, a
child gone, the caller gone, time passed) with `now` on its clock, and carries out the effects
the book returns (`effects`: send a task or a Cancel, kill a child, answer a request, report
progress, log). The book wraps the dispatch policy (`scheduling.policy.Scheduler`) and owns the
rules around it:

* Attempts. Each dispatch of a request is an *attempt* with a fresh id (the scheduler's job id),
  so a request can be retried on a sibling while the slot of an abandoned attempt stays taken
  until its child answers the Cancel or is killed. Each process numbers the attempts it is sent
  from 1 (its `child_rid`, damocles' request id on the wire).
* Retries. An attempt lost with its child, or timed out, is queued again while the request has
  attempts left (MaxAttempts of the child it was lost on), its deadline is ahead and the
  supervisor is not shutting down; otherwise the request is answered with why. A child killed
  for one request (it ignored a Cancel) costs its other requests nothing.
* Times. Request timeouts (RequestTimeoutSecs), cancel graces (CancelGraceSecs), the heartbeat
  of dext children (HeartbeatTimeoutSecs) and the stdin watch (StdinTimeoutSecs) are alarms;
  deadlines and pipelining are the scheduler's. `next_wakeup()` is the earliest of them all;
  every event first catches up with what fell due before `now` (an answer that arrives after its
  request's deadline finds the request already answered with the timeout), except that a child
  that speaks is alive: its activity counts before its heartbeat is judged.
* Answers. A request is answered exactly once (`Resolve`); whatever comes for it later (a late
  answer, a second answer, a loss) only frees the slot it held.

Nothing here reads a clock or does I/O; the property tests drive it with random event sequences.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..scheduling.policy import Cancel, ChildInfo, Fail, Job, Scheduler, Start
from ..tasks import Output, Task, WindowPoStOutput, WindowPoStVanillaOutput, stage_of
from .deadlines import Alarm, Alarms
from .effects import Effect, Kill, Note, ReportProgress, Resolve, Retry, Send, SendCancel

#: The protocol whose children can be sent a Cancel and must report progress while they work.
DEXT = "dext"


@dataclass(frozen=True, slots=True)
class ChildLimits:
    """A child's request rules, in seconds; 0 turns a timeout off."""

    max_attempts: int = 1
    request_timeout: float = 0.0
    cancel_grace: float = 10.0
    heartbeat_timeout: float = 0.0  # dext children only
    stdin_timeout: float = 0.0


@dataclass(eq=False)
class TrackedRequest:
    """A request from submission until it is answered, across all its attempts."""

    rid: int
    task: Task
    stage: str
    arrival: float
    deadline: float | None  # on the book's clock
    deadline_unix: float | None  # as the caller gave it, for the wire
    priority: int
    attempts: int = 0  # times sent to a child
    attempt_id: int | None = None  # its current scheduler job (queued or running)
    child: str | None = None  # child of the current or last attempt
    history: list[str] = field(default_factory=list)
    done: bool = False
    current: Attempt | None = None  # the attempt running for it, not abandoned


@dataclass(eq=False)
class Attempt:
    """One attempt of a request, sent to one process."""

    attempt_id: int
    child_rid: int
    request: TrackedRequest
    started: float
    process: _Process
    abandoned: bool = False  # its request was answered or moved on; the child still runs it
    timeout: Alarm[_Due] | None = None
    grace: Alarm[_Due] | None = None


@dataclass(eq=False)
class _Process:
    """The book's view of one process of a child, from its ready message until it is lost."""

    child: _Child
    protocol: str
    pid: int | None
    attempts: dict[int, Attempt] = field(default_factory=dict)  # by child_rid
    next_rid: int = 1
    last_activity: float = 0.0
    down: bool = False
    charge_all: bool = True  # its loss costs every request on it an attempt
    heartbeat: Alarm[_Due] | None = None
    stdin_waiting: bool = False  # messages for it wait for room in its stdin pipe
    stdin_progress_at: float = 0.0
    stdin_watch: Alarm[_Due] | None = None

    @property
    def who(self) -> str:
        return f"{self.child.name} (pid {self.pid})"


@dataclass(eq=False)
class _Child:
    name: str
    stage: str
    limits: ChildLimits
    process: _Process | None = None
    gave_up: bool = False  # FATAL: will not start again
    last_exit: str | None = None
    done: int = 0  # requests answered with an output
    failed: int = 0  # requests answered with an error, or lost with the child
    served: bool = False  # its current (or last) process answered something


# What an alarm is for; each is checked, when due, against what happened since.
@dataclass(frozen=True, slots=True)
class _RequestTimeout:
    attempt: Attempt


@dataclass(frozen=True, slots=True)
class _CancelGrace:
    attempt: Attempt


@dataclass(frozen=True, slots=True)
class _Heartbeat:
    process: _Process


@dataclass(frozen=True, slots=True)
class _StdinWatch:
    process: _Process


_Due = _RequestTimeout | _CancelGrace | _Heartbeat | _StdinWatch


class UnknownChild(KeyError):
    """An event named a child the book was not given (`add_child`): a bug of the caller."""


class RequestBook:
    """Requests, their attempts and the children they run on; see the module's docstring."""

    def __init__(self, scheduler: Scheduler | None = None) -> None:
        self.scheduler = scheduler or Scheduler()
        self._children: dict[str, _Child] = {}
        self._by_stage: dict[str, list[_Child]] = {}
        self._requests: dict[int, TrackedRequest] = {}  # not yet answered
        self._attempts: dict[int, TrackedRequest] = {}  # attempt id -> request, queued or running
        self._running: dict[int, Attempt] = {}  # attempt id -> where it runs (abandoned too)
        self._queued = 0  # attempts waiting in the scheduler's queues
        self._attempt_ids = itertools.count(1)
        self._alarms: Alarms[_Due] = Alarms()
        self._decided_at = -float("inf")
        #: Once set (`shutdown`, or by the driver as soon as it is asked to stop), nothing lost
        #: is retried.
        self.shutting_down = False

    # -- what the driver asks -------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        """When the book must be told that time passed (`advance`), or None: nothing is timed."""
        when = self._alarms.next()
        sched = self.scheduler.next_wakeup()
        if sched is not None and sched > self._decided_at:
            when = min(when, sched)
        return None if when == float("inf") else when

    @property
    def unanswered(self) -> int:
        """Requests submitted and not yet answered."""
        return len(self._requests)

    def in_flight(self, child: str) -> int:
        """Attempts on `child`'s current process, abandoned ones included (they hold a slot)."""
        process = self._child(child).process
        return len(process.attempts) if process is not None else 0

    def is_running(self, child: str, child_rid: int) -> bool:
        """Whether `child`'s current process runs an attempt under `child_rid`."""
        process = self._child(child).process
        return process is not None and child_rid in process.attempts

    def counters(self, child: str) -> tuple[int, int]:
        """(done, failed) requests of `child` over its whole life."""
        c = self._child(child)
        return c.done, c.failed

    def served(self, child: str) -> bool:
        """Whether `child`'s current (or last) process answered anything (the restart rules)."""
        return self._child(child).served

    def sizes(self) -> dict[str, int]:
        """How much the book holds (for leak checks): everything is 0 when it is idle."""
        return {
            "requests": len(self._requests),
            "attempts": len(self._attempts),
            "running": len(self._running),
            "queued": self._queued,
            "alarms": len(self._alarms),
        }

    # -- children -------------------------------------------------------------------------

    def add_child(
        self,
        name: str,
        stage: str,
        *,
        capacity: int = 1,
        weight: int = 1,
        locks: Iterable[str] = (),
        limits: ChildLimits | None = None,
    ) -> None:
        """A configured child (before any event about it)."""
        if name in self._children:
            raise ValueError(f"child {name!r} added twice")
        child = _Child(name, stage, limits or ChildLimits())
        self._children[name] = child
        self._by_stage.setdefault(stage, []).append(child)
        self.scheduler.add_child(
            ChildInfo(
                child_id=name,
                stage=stage,
                capacity=max(1, capacity),
                weight=max(1, weight),
                locks=frozenset(locks),
            )
        )

    def child_ready(
        self, child: str, now: float, *, protocol: str, pid: int | None
    ) -> list[Effect]:
        """A new process of `child` said it is ready (speaking `protocol`): it takes requests."""
        out = self._catch_up(now)
        c = self._child(child)
        if c.process is not None:  # the last one was never reported lost: it is now
            out += self.child_lost(child, now, "replaced by a new process")
        c.process = _Process(c, protocol, pid, last_activity=now)
        c.served = False
        c.gave_up = False
        self.scheduler.child_ready(child, now)
        self._dispatch(now, out)
        return out

    def child_down(self, child: str, now: float, *, charge_all: bool = True) -> list[Effect]:
        """`child`'s process is going away (exited, broke, killed, stopping): no more requests go
        to it. Its requests stay on it until `child_lost`: answers it wrote before it went are
        still taken. `charge_all`: its loss costs each of its requests an attempt."""
        c = self._child(child)
        out = self._catch_up(now)
        if c.process is not None and not c.process.down:
            self._take_down(c.process, now, charge_all)
            self._dispatch(now, out)
        return out

    def child_lost(self, child: str, now: float, what: str) -> list[Effect]:
        """`child`'s process is gone (`what`: how it ended): retry or answer what ran on it."""
        c = self._child(child)
        out = self._catch_up(now)
        process = c.process
        if process is None:
            return out
        if not process.down:
            self._take_down(process, now, True)
        c.process = None
        self._alarms.cancel(process.heartbeat)
        self._alarms.cancel(process.stdin_watch)
        attempts = list(process.attempts.values())
        process.attempts.clear()
        for attempt in attempts:
            self._forget(attempt)
            if attempt.abandoned:
                continue
            req = attempt.request
            c.failed += 1
            req.current = None
            req.history.append(f"attempt {req.attempts} on {c.name}: {what}")
            self._retry_or_fail(
                req,
                c,
                attempt.attempt_id,
                f"{process.who} went down while running it: {what}",
                now,
                out,
                charge=process.charge_all,
            )
        self._dispatch(now, out)
        return out

    def child_gave_up(
        self, child: str, now: float, *, fatal: bool, last_exit: str | None
    ) -> list[Effect]:
        """`child` will not start again (`fatal`: it kept failing; else AutoRestart is off or
        we stop). When every child of a stage gave up fatally, its requests fail with why."""
        c = self._child(child)
        out = self._catch_up(now)
        c.gave_up = fatal
        c.last_exit = last_exit
        self.scheduler.child_fatal(child, now)
        self._dispatch(now, out)
        return out

    # -- what children say ----------------------------------------------------------------

    def answered(
        self,
        child: str,
        child_rid: int,
        now: float,
        *,
        output: Output | None = None,
        error: str | None = None,
    ) -> list[Effect]:
        """`child` answered its request `child_rid` with `output`, or with `error`."""
        c = self._child(child)
        process = c.process
        if process is None:
            return self._catch_up(now)
        process.last_activity = now
        out = self._catch_up(now)
        attempt = process.attempts.pop(child_rid, None)
        if attempt is None:
            if 0 < child_rid < process.next_rid:
                text = f"a second response to its request {child_rid} dropped"
            else:
                text = (
                    f"response with unknown id {child_rid} dropped (ids sent so far:"
                    f" 1..{process.next_rid - 1})"
                )
            out.append(Note("warning", f"{process.who}: {text}"))
            return out
        self._forget(attempt)
        c.served = True
        self.scheduler.finished(attempt.attempt_id, now)
        if not attempt.abandoned:
            req = attempt.request
            req.current = None
            self._attempts.pop(attempt.attempt_id, None)
            if error is not None:
                c.failed += 1
                self._resolve(
                    req,
                    out,
                    now,
                    error=f"request {req.rid} ({req.stage}) failed on {process.who}: {error}",
                )
            elif output is None or stage_of(output) != req.stage:
                c.failed += 1
                got = "no output" if output is None else f"a {stage_of(output)} output"
                self._resolve(
                    req,
                    out,
                    now,
                    error=f"request {req.rid} ({req.stage}): {process.who} answered with {got}",
                )
            else:
                c.done += 1
                self._resolve(req, out, now, output=output)
        if self._queued:
            self._dispatch(now, out)
        return out

    def progress(
        self, child: str, child_rid: int, now: float, *, phase: str, done: int, total: int
    ) -> list[Effect]:
        """`child` reports progress on its request `child_rid` (dext Progress)."""
        process = self._child(child).process
        if process is None:
            return self._catch_up(now)
        process.last_activity = now
        out = self._catch_up(now)
        attempt = process.attempts.get(child_rid)
        if attempt is None:
            out.append(Note("debug", f"{process.who}: progress for unknown request {child_rid}"))
            return out
        # Phase changes (e.g. into the GPU's SNARK) let the policy pipeline the child.
        self.scheduler.progress(attempt.attempt_id, phase, done, total, now)
        if not attempt.abandoned:
            out.append(ReportProgress(attempt.request, phase, done, total))
        if self._queued:
            self._dispatch(now, out)
        return out

    def heard_from(self, child: str, now: float) -> list[Effect]:
        """`child` wrote something that is about no request: it is alive (the heartbeat)."""
        process = self._child(child).process
        if process is not None:
            process.last_activity = now
        return self._catch_up(now)

    def stdin_blocked(self, child: str, now: float) -> None:
        """Messages for `child` wait for room in its stdin pipe, from `now`."""
        process = self._child(child).process
        if process is None or process.down:
            return
        process.stdin_waiting = True
        process.stdin_progress_at = now
        timeout = process.child.limits.stdin_timeout
        if timeout and process.stdin_watch is None:
            process.stdin_watch = self._alarms.add(now + timeout, _StdinWatch(process))

    def stdin_progress(self, child: str, now: float) -> None:
        """`child` took bytes from its stdin pipe while more waited."""
        process = self._child(child).process
        if process is not None:
            process.stdin_progress_at = now

    def stdin_drained(self, child: str) -> None:
        """Nothing waits for `child`'s stdin pipe any more."""
        process = self._child(child).process
        if process is not None:
            process.stdin_waiting = False

    # -- requests ---------------------------------------------------------------------------

    def submit(
        self,
        rid: int,
        task: Task,
        now: float,
        *,
        deadline: float | None = None,
        deadline_unix: float | None = None,
        priority: int = 0,
    ) -> tuple[TrackedRequest, list[Effect]]:
        """A new request `rid` (unique) for `task`'s stage; `deadline` on the book's clock."""
        if rid in self._requests:
            raise ValueError(f"request id {rid} is already in the book")
        out = self._catch_up(now)
        req = TrackedRequest(rid, task, stage_of(task), now, deadline, deadline_unix, priority)
        self._requests[rid] = req
        self._enqueue(req, now, retry=False)
        self._dispatch(now, out)
        return req, out

    def unsendable(self, child: str, child_rid: int, now: float, error: str) -> list[Effect]:
        """A `Send` could not be carried out (`error`: why, a whole sentence about the request):
        nothing reached the child; the request is answered with `error`."""
        process = self._child(child).process
        out = self._catch_up(now)
        attempt = process.attempts.pop(child_rid, None) if process is not None else None
        if attempt is None:
            return out
        self._forget(attempt)
        self.scheduler.finished(attempt.attempt_id, now)
        req = attempt.request
        req.attempts -= 1
        req.current = None
        self._resolve(req, out, now, error=error)
        self._dispatch(now, out)
        return out

    def caller_gone(self, rid: int, now: float) -> list[Effect]:
        """The caller of `rid` went away: answer it (cancelled), stop its work if we can."""
        out = self._catch_up(now)
        req = self._requests.get(rid)
        if req is None:
            return out
        attempt = req.current
        self._resolve(
            req, out, now, error=f"request {rid} abandoned by its caller", outcome="cancelled"
        )
        if attempt is not None and not attempt.abandoned:
            attempt.abandoned = True
            # A JSON-lines child cannot be told; its answer will be dropped. A dext child that
            # ignores Cancel is treated as hung, as for a timeout.
            if attempt.process.protocol == DEXT:
                self._send_cancel(attempt, now, out, kill_after_grace=True)
        self._dispatch(now, out)
        return out

    def advance(self, now: float) -> list[Effect]:
        """Time passed: act on what fell due (timeouts, heartbeats, deadlines, pipelining)."""
        return self._catch_up(now)

    # -- shutting down ----------------------------------------------------------------------

    def shutdown(self, now: float) -> list[Effect]:
        """Stop: queued requests fail now, nothing lost from here on is retried; running ones
        may still be answered (the driver gives them a grace period, then `grace_over`)."""
        self.shutting_down = True
        out = self._catch_up(now)
        for req in list(self._requests.values()):
            if req.attempt_id is not None and self.scheduler.is_queued(req.attempt_id):
                self._resolve(
                    req,
                    out,
                    now,
                    error=f"request {req.rid} ({req.stage}) was still queued when the"
                    " supervisor began to shut down; it was not sent to a prover",
                )
        return out

    def grace_over(self, now: float, grace: float) -> list[Effect]:
        """The shutdown grace period ended: what is still unanswered fails."""
        out = self._catch_up(now)
        for req in list(self._requests.values()):
            where = f"on {req.child}" if req.child else "(it was still queued)"
            self._resolve(
                req,
                out,
                now,
                error=f"request {req.rid} ({req.stage}) did not finish {where} within the"
                f" shutdown grace period ({grace:g}s)",
            )
        return out

    def fail_all(self, now: float, why: str) -> list[Effect]:
        """Answer every request still open with `why` (the supervisor stopped)."""
        out: list[Effect] = []
        for req in list(self._requests.values()):
            where = f" (last on {req.child})" if req.child else " (still queued)"
            self._resolve(req, out, now, error=f"request {req.rid} ({req.stage}): {why}{where}")
        return out

    # -- the rules --------------------------------------------------------------------------

    def _child(self, name: str) -> _Child:
        try:
            return self._children[name]
        except KeyError:
            raise UnknownChild(name) from None

    def _catch_up(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        fired = False
        for due in self._alarms.pop_due(now):
            fired = True
            if isinstance(due, _RequestTimeout):
                self._on_request_timeout(due.attempt, now, out)
            elif isinstance(due, _CancelGrace):
                self._on_cancel_grace(due.attempt, now, out)
            elif isinstance(due, _Heartbeat):
                self._on_heartbeat(due.process, now, out)
            else:
                self._on_stdin_watch(due.process, now, out)
        wakeup = self.scheduler.next_wakeup()
        if fired or (wakeup is not None and wakeup <= now):
            self._dispatch(now, out)
        return out

    def _dispatch(self, now: float, out: list[Effect]) -> None:
        """Act on the scheduler's decisions until it has nothing more to say."""
        again = True
        while again:
            again = False
            self._decided_at = now
            for decision in self.scheduler.decide(now):
                if isinstance(decision, Start):
                    self._queued -= 1
                    again |= self._start(decision.request_id, decision.child_id, now, out)
                elif isinstance(decision, Fail):
                    self._queued -= 1
                    self._on_fail(decision.request_id, decision.reason, now, out)
                elif isinstance(decision, Cancel):
                    self._on_deadline(decision.request_id, decision.reason, now, out)

    def _enqueue(self, req: TrackedRequest, now: float, *, retry: bool) -> None:
        aid = next(self._attempt_ids)
        req.attempt_id = aid
        req.current = None
        self._attempts[aid] = req
        job = Job(aid, req.stage, req.arrival, req.deadline, req.priority)
        self._queued += 1
        if retry:
            self.scheduler.requeue(job, now)
        else:
            self.scheduler.submit(job, now)

    def _start(self, aid: int, child: str, now: float, out: list[Effect]) -> bool:
        """Send attempt `aid` to `child`; True if the scheduler must be asked again."""
        c = self._children[child]
        req = self._attempts.get(aid)
        process = c.process
        if req is None or req.done or req.attempt_id != aid:
            self.scheduler.finished(aid, now)  # stale; free the slot it was given
            return False
        if process is None or process.down:
            # Not expected (the scheduler is told at once); put the job back all the same.
            self.scheduler.finished(aid, now)
            self._attempts.pop(aid, None)
            self._enqueue(req, now, retry=True)
            return True
        child_rid = process.next_rid
        process.next_rid += 1
        attempt = Attempt(aid, child_rid, req, now, process)
        if not process.attempts:
            process.last_activity = now
        process.attempts[child_rid] = attempt
        self._running[aid] = attempt
        req.attempts += 1
        req.child = child
        req.current = attempt
        out.append(Send(req, child, child_rid))
        limits = c.limits
        if limits.request_timeout:
            attempt.timeout = self._alarms.add(
                now + limits.request_timeout, _RequestTimeout(attempt)
            )
        hb = limits.heartbeat_timeout
        if hb and process.protocol == DEXT and process.heartbeat is None:
            process.heartbeat = self._alarms.add(process.last_activity + hb, _Heartbeat(process))
        return False

    def _forget(self, attempt: Attempt) -> None:
        """`attempt` left its process: its slot and alarms go."""
        self._running.pop(attempt.attempt_id, None)
        self._alarms.cancel(attempt.timeout)
        self._alarms.cancel(attempt.grace)
        attempt.timeout = attempt.grace = None

    def _take_down(self, process: _Process, now: float, charge_all: bool) -> None:
        process.down = True
        process.charge_all = charge_all
        process.stdin_waiting = False
        self._alarms.cancel(process.heartbeat)
        self._alarms.cancel(process.stdin_watch)
        process.heartbeat = process.stdin_watch = None
        self.scheduler.child_down(process.child.name, now)

    def _kill(
        self, process: _Process, reason: str, now: float, out: list[Effect], *, charge_all: bool
    ) -> None:
        if not process.down:
            self._take_down(process, now, charge_all)
        out.append(Kill(process.child.name, reason))

    def _resolve(
        self,
        req: TrackedRequest,
        out: list[Effect],
        now: float,
        *,
        output: Output | None = None,
        error: str | None = None,
        outcome: str | None = None,
    ) -> None:
        if req.done:
            return
        req.done = True
        req.current = None
        if req.attempt_id is not None:
            self._attempts.pop(req.attempt_id, None)
            if self.scheduler.is_queued(req.attempt_id):
                self.scheduler.remove(req.attempt_id)
                self._queued -= 1
        req.attempt_id = None
        self._requests.pop(req.rid, None)
        if error is not None:
            outcome = outcome or "error"
        elif outcome is None:
            faulty = isinstance(output, WindowPoStOutput | WindowPoStVanillaOutput) and bool(
                output.faults
            )
            outcome = "fault" if faulty else "ok"
        out.append(Resolve(req, output if error is None else None, error, outcome))

    def _describe_failure(self, req: TrackedRequest, reason: str) -> str:
        text = f"request {req.rid} ({req.stage}): {reason}"
        if req.attempts:
            text += f"; {req.attempts} attempt{'s' if req.attempts != 1 else ''} made"
        if req.history:
            text += " (" + "; ".join(req.history) + ")"
        return text

    def _retry_or_fail(
        self,
        req: TrackedRequest,
        c: _Child,
        aid: int,
        what: str,
        now: float,
        out: list[Effect],
        *,
        charge: bool = True,
        outcome: str = "error",
    ) -> None:
        """Attempt `aid` of `req` was lost (`what`): queue it again if it may, else answer it."""
        self._attempts.pop(aid, None)
        if req.done or req.attempt_id != aid:
            return
        if not charge:
            req.attempts -= 1
        max_attempts = max(1, c.limits.max_attempts)
        if self.shutting_down:
            why = f"{what}, and the supervisor is shutting down, so it was not retried"
            self._resolve(req, out, now, error=self._describe_failure(req, why), outcome=outcome)
        elif req.deadline is not None and now >= req.deadline:
            why = f"{what}; its deadline has passed"
            self._resolve(req, out, now, error=self._describe_failure(req, why), outcome="timeout")
        elif req.attempts < max_attempts:
            self._enqueue(req, now, retry=True)
            out.append(Retry(req, what, req.attempts + 1, max_attempts))
        else:
            why = f"{what}; giving up (MaxAttempts = {max_attempts} on {c.name})"
            self._resolve(req, out, now, error=self._describe_failure(req, why), outcome=outcome)

    def _on_fail(self, aid: int, reason: str, now: float, out: list[Effect]) -> None:
        req = self._attempts.pop(aid, None)
        if req is None or req.attempt_id != aid:
            return
        expired = req.deadline is not None and now >= req.deadline
        pool = self._by_stage.get(req.stage, [])
        if pool and all(c.gave_up for c in pool):
            # Say why no child can serve: the caller may not see the supervisor's log.
            reason += " (" + "; ".join(f"{c.name}: {c.last_exit}" for c in pool) + ")"
        self._resolve(
            req,
            out,
            now,
            error=self._describe_failure(req, reason),
            outcome="timeout" if expired else "error",
        )

    def _on_deadline(self, aid: int, reason: str, now: float, out: list[Effect]) -> None:
        attempt = self._running.get(aid)
        if attempt is None or attempt.abandoned:
            return
        attempt.abandoned = True
        req = attempt.request
        attempt.process.child.failed += 1
        self._resolve(
            req,
            out,
            now,
            error=f"request {req.rid} ({req.stage}): {reason}; cancelled (attempt {req.attempts})",
            outcome="timeout",
        )
        self._send_cancel(attempt, now, out, kill_after_grace=True)

    def _on_request_timeout(self, attempt: Attempt, now: float, out: list[Effect]) -> None:
        process = attempt.process
        if process.attempts.get(attempt.child_rid) is not attempt or attempt.abandoned:
            return
        attempt.timeout = None
        if process.down:
            return  # its loss will retry it
        attempt.abandoned = True
        req = attempt.request
        req.current = None
        c = process.child
        c.failed += 1
        what = f"timed out after {c.limits.request_timeout:g}s on {process.who}"
        req.history.append(f"attempt {req.attempts} {what}")
        self._retry_or_fail(req, c, attempt.attempt_id, what, now, out, outcome="timeout")
        self._send_cancel(attempt, now, out, kill_after_grace=True)

    def _send_cancel(
        self, attempt: Attempt, now: float, out: list[Effect], *, kill_after_grace: bool
    ) -> None:
        """Tell the child to stop `attempt`; with `kill_after_grace`, kill it if it still runs
        the attempt CancelGraceSecs later (a JSON-lines child, which cannot be told: then)."""
        process = attempt.process
        if process.down or process.attempts.get(attempt.child_rid) is not attempt:
            return
        out.append(SendCancel(process.child.name, attempt.child_rid))
        if kill_after_grace and attempt.grace is None:
            grace = process.child.limits.cancel_grace
            attempt.grace = self._alarms.add(now + grace, _CancelGrace(attempt))

    def _on_cancel_grace(self, attempt: Attempt, now: float, out: list[Effect]) -> None:
        attempt.grace = None
        process = attempt.process
        if process.down or process.attempts.get(attempt.child_rid) is not attempt:
            return
        grace = process.child.limits.cancel_grace
        how = "a Cancel" if process.protocol == DEXT else "its timeout (JSON lines: no Cancel)"
        # The request that hung was dealt with already; the others on this child did nothing
        # wrong, so their retry is free.
        self._kill(
            process,
            f"request {attempt.request.rid} (child id {attempt.child_rid}) still running"
            f" {grace:g}s after {how}",
            now,
            out,
            charge_all=False,
        )

    def _on_heartbeat(self, process: _Process, now: float, out: list[Effect]) -> None:
        process.heartbeat = None
        watch = process.stdin_watch
        if watch is not None and watch.when <= now:
            # Both watches are due: a child that takes nothing from a full stdin is stuck on its
            # input, which says more than its silence does.
            self._alarms.cancel(watch)
            self._on_stdin_watch(process, now, out)
        hb = process.child.limits.heartbeat_timeout
        if process.down or not hb or not process.attempts:
            return
        due = process.last_activity + hb
        if now < due:
            process.heartbeat = self._alarms.add(due, _Heartbeat(process))
            return
        self._kill(
            process,
            f"hung: no Progress or Response for {now - process.last_activity:.1f}s while working"
            f" (HeartbeatTimeoutSecs = {hb:g})",
            now,
            out,
            charge_all=True,
        )

    def _on_stdin_watch(self, process: _Process, now: float, out: list[Effect]) -> None:
        process.stdin_watch = None
        if process.down or not process.stdin_waiting:
            return
        timeout = process.child.limits.stdin_timeout
        due = process.stdin_progress_at + timeout
        if now < due:
            process.stdin_watch = self._alarms.add(due, _StdinWatch(process))
            return
        self._kill(
            process,
            f"hung: read nothing from its stdin for {now - process.stdin_progress_at:.1f}s while"
            f" messages for it waited in a full pipe (StdinTimeoutSecs = {timeout:g})",
            now,
            out,
            charge_all=True,
        )
