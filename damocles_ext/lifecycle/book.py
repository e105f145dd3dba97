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
  for one request (it ignored a Cancel) costs its other requests nothing. An attempt answered
  with an error (or a bad output) is queued again too, while attempts are left, avoiding the
  children that failed it, when one of the others is neither FATAL nor benched (the policy's
  breaker): it waits for one, and the requests behind it go on.
* Times. Request timeouts (RequestTimeoutSecs), cancel graces (CancelGraceSecs), the heartbeat
  of dext children (HeartbeatTimeoutSecs) and the stdin watch (StdinTimeoutSecs) are alarms;
  deadlines and pipelining are the scheduler's. `next_wakeup()` is the earliest of them all;
  every event first catches up with what fell due before `now` (an answer that arrives after its
  request's deadline finds the request already answered with the timeout), except that a child
  that speaks is alive: its activity counts before its heartbeat is judged, and a child going
  down is taken down first: a retry those alarms make is not sent to it.
* Answers. A request is answered exactly once (`Resolve`); whatever comes for it later (a late
  answer, a second answer, a loss) only frees the slot it held.
* Effects. Every event returns its effects in order; given `out`, it appends them to that list
  as they come and returns it. A caller that carries `out` out even when the event raises (a
  bug of ours) loses none of the answers given before it did: the book counts them as given.

Nothing here reads a clock or does I/O; the property tests drive it with random event sequences.
"""

from __future__ import annotations

from collections.abc import Iterable

from mypy_extensions import mypyc_attr

from ..scheduling.children import cannot_serve
from ..scheduling.policy import ChildSlots
from ..tasks import OUTPUTS_WITH_FAULTS, Output, Task, output_problem, stage_of
from ..tasks import WindowPoStVanillaOutput as VanillaOutput
from ..wording import sector_list
from .effects import Effect, Note, ReportProgress
from .records import (
    DEXT,
    ChildLimits,
    ChildRecord,
    ProcessRecord,
    StdinWatch,
    TrackedRequest,
)
from .rules import BookRules


@mypyc_attr(allow_interpreted_subclasses=True)  # (tests derive from it)
class RequestBook(BookRules):
    """Requests, their attempts and the children they run on; see the module's docstring."""

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

    def attempt_ids(self, child: str) -> frozenset[int]:
        """The child_rids of the attempts on `child`'s current process (abandoned ones too)."""
        process = self._child(child).process
        return frozenset(process.attempts) if process is not None else frozenset()

    def only_attempt(self, child: str, sent: frozenset[int] | None = None) -> int | None:
        """The child_rid of the one attempt on `child`'s current process, or None (none, or more:
        an answer whose id is unreadable can be only that one's); None too when it is not in
        `sent` (`attempt_ids` as the answer was read, if other answers were read with it): sent
        since, it cannot be its answer."""
        process = self._child(child).process
        if process is None or len(process.attempts) != 1:
            return None
        rid = next(iter(process.attempts))
        return rid if sent is None or rid in sent else None

    def is_running(self, child: str, child_rid: int) -> bool:
        """Whether `child`'s current process runs an attempt under `child_rid`."""
        process = self._child(child).process
        return process is not None and child_rid in process.attempts

    def cannot_serve(self, stage: str) -> str | None:
        """Why a request of `stage` would fail at once (no child of it configured, or all FATAL:
        the policy's "No server"), as its answer would say, or None."""
        why = cannot_serve(stage, self.scheduler.breaker.children_of(stage))
        return None if why is None else why + self._last_exits(stage)

    def counters(self, child: str) -> tuple[int, int]:
        """(done, failed) requests of `child` over its whole life."""
        c = self._child(child)
        return c.done, c.failed

    def served(self, child: str) -> bool:
        """Whether `child`'s current (or last) process answered anything (the restart rules)."""
        return self._child(child).served

    def sent(self, child: str) -> bool:
        """Whether `child`'s current (or last) process was sent a request (the restart rules)."""
        return self._child(child).sent

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
        child = ChildRecord(name, stage, limits or ChildLimits())
        self._children[name] = child
        self._by_stage.setdefault(stage, []).append(child)
        self.scheduler.add_child(
            ChildSlots(
                child_id=name,
                stage=stage,
                capacity=max(1, capacity),
                weight=max(1, weight),
                locks=frozenset(locks),
            )
        )

    def child_ready(
        self,
        child: str,
        now: float,
        *,
        protocol: str,
        pid: int | None,
        queue: int = 0,
        out: list[Effect] | None = None,
    ) -> list[Effect]:
        """A new process of `child` said it is ready (speaking `protocol`): it takes requests,
        and `queue` more while they are quick (the scheduler's "Quick requests")."""
        out = self._catch_up(now, out)
        c = self._child(child)
        if c.process is not None:  # the last one was never reported lost: it is now
            self.child_lost(child, now, "replaced by a new process", out=out)
        c.process = ProcessRecord(c, protocol, pid, last_activity=now)
        c.served = c.sent = False
        c.gave_up = False
        self.scheduler.child_ready(child, now, queue=queue)
        self._dispatch(now, out)
        return out

    def child_down(
        self,
        child: str,
        now: float,
        *,
        charge_all: bool = True,
        exited: bool = False,
        out: list[Effect] | None = None,
    ) -> list[Effect]:
        """`child`'s process is going away (exited, broke, killed, stopping): no more requests go
        to it. Its requests stay on it until `child_lost`: answers it wrote before it went are
        still taken. `charge_all`: its loss costs each of its requests an attempt. Unless it
        `exited` (was reaped), the locks its requests hold stay held until `child_exited`."""
        c = self._child(child)
        out = [] if out is None else out
        process = c.process
        if process is None or process.down:
            self._catch_up(now, out)
            return out
        # First: what the alarms due now retry goes to no process going away.
        self._take_down(process, now, charge_all, exited=exited)
        self._catch_up(now, out)
        self._dispatch(now, out)
        return out

    def child_lost(
        self, child: str, now: float, what: str, *, out: list[Effect] | None = None
    ) -> list[Effect]:
        """`child`'s process is gone (`what`: how it ended): retry or answer what ran on it."""
        c = self._child(child)
        out = [] if out is None else out
        process = c.process
        if process is not None and not process.down:  # first: no alarm of it kills what is gone
            self._take_down(process, now, True, exited=True)
        self._catch_up(now, out)
        if process is None:
            return out
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
            if process.charge_all and not self.shutting_down:  # its own fault, not a stop
                req.lost_on |= {c.name}
            self._retry_or_fail(
                req,
                process,
                attempt.attempt_id,
                f"{process.who} went down while running it: {what}",
                now,
                out,
                charge=process.charge_all,
                free=attempt.free,
            )
        self._dispatch(now, out)
        return out

    def child_exited(
        self, child: str, now: float, *, pid: int | None, out: list[Effect] | None = None
    ) -> list[Effect]:
        """`child`'s process `pid` exited (was reaped): the locks kept for it since it went down
        alive (`child_down`) are free. Said of every process reaped; once more is harmless."""
        c = self._child(child)
        out = self._catch_up(now, out)
        gone = [p for p in c.exiting if p.pid == pid]
        if gone:
            c.exiting = [p for p in c.exiting if p.pid != pid]
            if self.scheduler.exited(gone[0].who, now):
                self._dispatch(now, out)
        return out

    def exiting(self, child: str) -> list[tuple[int | None, frozenset[str], float]]:
        """`child`'s processes that went down alive and have not exited yet: (pid, the locks
        kept for it, when it went down), oldest first."""
        holds = self.scheduler.holds.by_name
        exiting = self._child(child).exiting
        return [(p.pid, h.locks, h.since) for p in exiting if (h := holds.get(p.who)) is not None]

    def child_gave_up(
        self,
        child: str,
        now: float,
        *,
        fatal: bool,
        last_exit: str | None,
        out: list[Effect] | None = None,
    ) -> list[Effect]:
        """`child` will not start again (`fatal`: it kept failing; else AutoRestart is off or
        we stop). When every child of a stage gave up fatally, its requests fail with why."""
        c = self._child(child)
        out = self._catch_up(now, out)
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
        out: list[Effect] | None = None,
    ) -> list[Effect]:
        """`child` answered its request `child_rid` with `output`, or with `error`."""
        return self.answers(child, ((child_rid, output, error),), now, out)

    def answers(
        self,
        child: str,
        answers: Iterable[tuple[int, Output | None, str | None]],
        now: float,
        out: list[Effect] | None = None,
    ) -> list[Effect]:
        """`child` answered several requests at once (`(child_rid, output, error)` each, read
        together): as `answered` for each in turn, and the slots they free are filled after the
        last of them, in one dispatch."""
        c = self._child(child)
        process = c.process
        if process is None:
            return self._catch_up(now, out)
        process.last_activity = now
        process.unread_at = now  # in hand, not yet acted on: a due alarm waits (UNREAD_WAIT)
        out = self._catch_up(now, out)
        for child_rid, output, error in answers:
            attempt = process.attempts.pop(child_rid, None)
            if attempt is None:
                if 0 < child_rid < process.next_rid:
                    text = f"a second response to its request {child_rid} dropped"
                else:
                    text = (
                        f"response with unknown id {child_rid} dropped (ids sent so far:"
                        f" 1..{process.next_rid - 1})"
                    )
                out.append(Note("warning", f"{process.who}: {text}", child, process.pid))
                continue
            self._forget(attempt)
            c.served = True
            if attempt.abandoned:
                self.scheduler.finished(attempt.attempt_id, now)
                continue
            req = attempt.request
            req.current = None
            self._attempts.pop(attempt.attempt_id, None)
            what = said = None  # what was wrong with the answer (said: without the child)
            if error is not None:
                said = error.strip() or "an error without a message (the prover gave none)"
                what = f"failed on {process.who}: {said}"
            elif output is None or stage_of(output) != req.stage:
                got = "no output" if output is None else f"a {stage_of(output)} output"
                said = f"answered with {got}"
                what = f"{process.who} {said}"
            elif (wrong := output_problem(req.task, output)) is not None:
                said = f"answered with {wrong}"
                what = f"{process.who} {said}"
            if what is None:
                if req.judged_later and not (isinstance(output, VanillaOutput) and output.faults):
                    self.scheduler.finished(attempt.attempt_id, now)  # judged with its SNARK step
                    req.judge = (child, now, process)
                else:
                    if req.refusals:
                        self._count_refusals(req, now)
                    self._answered(attempt, child, False, now)
                if self.scheduler.breaker.news:  # a proof here benches a failing sibling
                    self._bench_news(now, out)
                c.done += 1
                if isinstance(output, OUTPUTS_WITH_FAULTS) and output.faults and not req.done:
                    out.append(_faults_note(req, process, output.faults))
                self._resolve(req, out, now, output=output)
            else:
                c.failed += 1
                head = f"request {req.rid} ({req.stage})" + ("" if error is not None else ":")
                self._failed_answer(c, attempt, f"{head} {what}", what, said or "", now, out)
        if self._queued:
            self._dispatch(now, out)
        return out

    def progress(
        self,
        child: str,
        child_rid: int,
        now: float,
        *,
        phase: str,
        done: int,
        total: int,
        out: list[Effect] | None = None,
    ) -> list[Effect]:
        """`child` reports progress on its request `child_rid` (dext Progress)."""
        process = self._child(child).process
        if process is None:
            return self._catch_up(now, out)
        process.last_activity = now
        out = self._catch_up(now, out)
        attempt = process.attempts.get(child_rid)
        if attempt is None:
            text = f"{process.who}: progress for unknown request {child_rid}"
            out.append(Note("debug", text, child, process.pid))
            return out
        # Phase changes (e.g. into the GPU's SNARK) let the policy pipeline the child.
        self.scheduler.progress(attempt.attempt_id, phase, done, total, now)
        if not attempt.abandoned:
            out.append(ReportProgress(attempt.request, phase, done, total))
        if self._queued:
            self._dispatch(now, out)
        return out

    def heard_from(
        self, child: str, now: float, *, out: list[Effect] | None = None
    ) -> list[Effect]:
        """`child` wrote something that is about no request: it is alive (the heartbeat)."""
        process = self._child(child).process
        if process is not None:
            process.last_activity = now
        return self._catch_up(now, out)

    def spoke(self, child: str, now: float) -> None:
        """`child` wrote something, not read yet, by `now`: it is alive (nothing is judged
        here: `before_alarms` tells this as alarms are about to be)."""
        process = self._child(child).process
        if process is not None:
            process.last_activity = max(process.last_activity, now)
            process.unread_at = now

    def stdin_blocked(self, child: str, now: float) -> None:
        """Messages for `child` wait for room in its stdin pipe, from `now`."""
        process = self._child(child).process
        if process is None or process.down:
            return
        process.stdin_waiting = True
        process.stdin_progress_at = now
        timeout = process.child.limits.stdin_timeout
        if timeout and process.stdin_watch is None:
            process.stdin_watch = self._alarms.add(now + timeout, StdinWatch(process))

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
        second_step: bool = False,
        avoid: frozenset[str] | None = None,
        out: list[Effect] | None = None,
    ) -> tuple[TrackedRequest, list[Effect]]:
        """A new request `rid` (unique) for `task`'s stage; `deadline` on the book's clock;
        `second_step`: the SNARK step of a split WindowPoSt (see `shutdown`); `avoid`: children
        it is not sent to while another of its stage can serve (as for a retry)."""
        if rid in self._requests:
            raise ValueError(f"request id {rid} is already in the book")
        out = self._catch_up(now, out)
        req = TrackedRequest(rid, task, stage_of(task), now, deadline, deadline_unix, priority)
        req.second_step = second_step
        req.avoid = avoid
        self._requests[rid] = req
        if self._enqueue(req, now, retry=False):  # (what time brought, _catch_up decided)
            self._dispatch(now, out)
        return req, out

    def judge_vanilla(
        self,
        req: TrackedRequest,
        refused: bool | None,
        now: float,
        *,
        out: list[Effect] | None = None,
    ) -> list[Effect]:
        """The SNARK step of the vanilla proofs split WindowPoSt step `req` made ended: `refused`
        by two SNARK children or more, or by a lone one that then proved another vanilla child's
        proofs of the request (the proofs' fault, likely), False: proved, None: nothing was said
        of the proofs (one SNARK child's error, a deadline, a cancel, a lost child).
        The vanilla child's answer counts for the breaker now, an error if refused, a proof if
        proved, in its place among that child's answers (a first bench it brings on a process
        newer than the one that made the proofs ends, as it would have at that process's hello);
        proofs nobody judged count for nothing, as a request lost with its child does."""
        out = self._catch_up(now, out)
        judge, req.judge = req.judge, None
        if judge is not None and refused is not None and judge[0] in self._children:
            name, made_at, process = judge
            self._count_made(name, process, req.breaker_key, refused, now, made_at)
            self._bench_news(now, out)
            if self._queued:  # a proof may end a bench
                self._dispatch(now, out)
        return out

    def unsendable(
        self, child: str, child_rid: int, now: float, error: str, *, out: list[Effect] | None = None
    ) -> list[Effect]:
        """A `Send` could not be carried out (`error`: why, a whole sentence about the request):
        nothing reached the child; the request is answered with `error`."""
        process = self._child(child).process
        out = self._catch_up(now, out)
        attempt = process.attempts.pop(child_rid, None) if process is not None else None
        if attempt is None:
            return out
        self._forget(attempt)
        self.scheduler.remove(attempt.attempt_id)  # nothing ran: no answer of the child's
        if attempt.abandoned:
            # Its request was answered or moved on (retried elsewhere after a timeout): only
            # the slot was this attempt's. Answering the request here would answer it while its
            # attempt on the other child runs, whose answer would then start it once more.
            self._dispatch(now, out)
            return out
        req = attempt.request
        req.attempts -= 1
        req.current = None
        self._resolve(req, out, now, error=error)
        self._dispatch(now, out)
        return out

    def caller_gone(self, rid: int, now: float, *, out: list[Effect] | None = None) -> list[Effect]:
        """The caller of `rid` went away: answer it (cancelled), stop its work if we can."""
        out = self._catch_up(now, out)
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

    def advance(self, now: float, *, out: list[Effect] | None = None) -> list[Effect]:
        """Time passed: act on what fell due (timeouts, heartbeats, deadlines, pipelining)."""
        return self._catch_up(now, out)

    # -- shutting down ----------------------------------------------------------------------

    def shutdown(self, now: float, *, out: list[Effect] | None = None) -> list[Effect]:
        """Stop: queued requests fail now, nothing lost from here on is retried; running ones
        may still be answered (the driver gives them a grace period, then `grace_over`). A
        split WindowPoSt's SNARK step counts as running even while queued: its vanilla step is
        done, and the SNARK step of one still in its vanilla step is taken within the grace."""
        self.shutting_down = True
        out = self._catch_up(now, out)
        for req in list(self._requests.values()):
            if req.second_step:
                continue
            if req.attempt_id is not None and self.scheduler.is_queued(req.attempt_id):
                sent = "not sent to a prover" if not req.attempts else "not sent again"
                why = f"still queued when the supervisor began to shut down; it was {sent}"
                self._resolve(req, out, now, error=self._describe_failure(req, why))
        return out

    def grace_over(
        self, now: float, grace: float, *, out: list[Effect] | None = None
    ) -> list[Effect]:
        """The shutdown grace period ended: what is still unanswered fails."""
        out = self._catch_up(now, out)
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

    def fail_all(self, now: float, why: str, *, out: list[Effect] | None = None) -> list[Effect]:
        """Answer every request still open with `why` (the supervisor stopped)."""
        out = [] if out is None else out
        for req in list(self._requests.values()):
            where = f" (last on {req.child})" if req.child else " (still queued)"
            self._resolve(req, out, now, error=f"request {req.rid} ({req.stage}): {why}{where}")
        return out


def _faults_note(req: TrackedRequest, process: ProcessRecord, faults: list[int]) -> Note:
    """The warning for a request answered with faulty sectors: the answer gives their numbers
    only; why each is faulty is the prover's to say, in its log (the built-in provers say it
    there, one line a sector)."""
    count = len(faults)
    listed = sector_list(faults)
    text = (
        f"request {req.rid} ({req.stage}): {count} faulty sector{'s' if count != 1 else ''},"
        f" no proof: {listed}; the log lines of {process.who} say why"
    )
    return Note("warning", text, process.child.name, process.pid, req.rid, count)
