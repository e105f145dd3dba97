"""What follows from the request book's events: dispatch, retries, answers, and the time rules
(request timeouts, cancel graces, heartbeats, the stdin watch). `book.RequestBook` is the events'
side (its public methods); this is its base class, the rules they share.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from mypy_extensions import mypyc_attr

from ..scheduling.policy import (
    NOT_SENT,
    URGENT,
    CancelRunning,
    Fail,
    Job,
    Scheduler,
    Start,
    TakeBack,
)
from ..stages import WINDOW_POST_SPLIT
from ..tasks import (
    OUTPUTS_WITH_FAULTS,
    Output,
    WindowPoSt,
    WindowPoStSnark,
    WinningPoSt,
)
from .deadlines import Alarms
from .effects import Effect, Kill, Note, Resolve, Retry, Send, SendCancel
from .records import (
    DEXT,
    Attempt,
    CancelGrace,
    ChildRecord,
    DeadlineOnDown,
    Due,
    HeartbeatDue,
    ProcessRecord,
    RequestTimeout,
    StdinWatch,
    TrackedRequest,
    UnknownChild,
)

#: A WinningPoSt's error that no other child can give a second opinion on runs again where
#: it failed, once, if it came less than this many seconds after the request arrived. Its block
#: has about 20 s after the parent block arrives (30 s epochs, less 10 s of propagation), and a
#: healthy WinningPoSt takes 2-6 s on a GPU: a try started later than 20 - 6 s after the
#: request arrived (which is after the parent block) cannot make the block, even going well.
WINNING_RETRY_WITHIN = 14.0

#: How long a request's timeout, or its Cancel's grace, due while its child's output waits unread
#: (the supervisor did not run for a while: SIGSTOP, a paused VM), waits once for that output to
#: be read: an answer written in time is taken, a child that obeyed its Cancel is not killed.
#: Unread: the driver found it in the pipe as the alarms came due (`spoke`), or its reader has
#: it in hand (`answers`, which acts on what fell due first). The reader runs in the same pass of
#: trio's loop, so any short time will do.
UNREAD_WAIT = 0.1


@mypyc_attr(allow_interpreted_subclasses=True)  # (tests derive from it)
class BookRules:
    """The request book's state and the rules that change it (see `book.RequestBook`)."""

    def __init__(self, scheduler: Scheduler | None = None) -> None:
        self.scheduler = scheduler or Scheduler()
        self._children: dict[str, ChildRecord] = {}
        self._by_stage: dict[str, list[ChildRecord]] = {}
        self._requests: dict[int, TrackedRequest] = {}  # not yet answered
        self._attempts: dict[int, TrackedRequest] = {}  # attempt id -> request, queued or running
        self._running: dict[int, Attempt] = {}  # attempt id -> where it runs (abandoned too)
        self._queued = 0  # attempts waiting in the scheduler's queues
        #: Requests queued again after an attempt failed (an error, a timeout, its child lost),
        #: by stage (the metrics' retries; a take back is none).
        self.retried: dict[str, int] = {}
        self._attempt_ids = itertools.count(1)
        self._alarms: Alarms[Due] = Alarms()
        self._decided_at = -float("inf")
        #: Once set (`shutdown`, or by the driver as soon as it is asked to stop), nothing lost
        #: is retried.
        self.shutting_down = False
        #: Called with `now` before the alarms due at `now` are acted on: the driver of the book
        #: tells it there (`spoke`, `stdin_progress`) what children did that it has not heard
        #: of yet, which must count before their silence is judged (supervisor/unheard.py).
        self.before_alarms: Callable[[float], None] | None = None

    # -- the rules --------------------------------------------------------------------------

    def _child(self, name: str) -> ChildRecord:
        try:
            return self._children[name]
        except KeyError:
            raise UnknownChild(name) from None

    def _catch_up(self, now: float, out: list[Effect] | None) -> list[Effect]:
        """Act on the alarms due by `now`; their effects go to `out` (a new list if None),
        which is returned."""
        out = [] if out is None else out
        fired = False
        due_by_now = self._alarms.due(now)
        if due_by_now and self.before_alarms is not None:
            self.before_alarms(now)
        # Until none is due: a rule may set an alarm that is due already (a kill takes its
        # process down, and a deadline of a request on it may have passed).
        while due_by_now and (due_now := self._alarms.pop_due(now)):
            fired = True
            for due in due_now:
                if isinstance(due, RequestTimeout):
                    self._on_request_timeout(due.attempt, now, out)
                elif isinstance(due, CancelGrace):
                    self._on_cancel_grace(due.attempt, now, out)
                elif isinstance(due, HeartbeatDue):
                    self._on_heartbeat(due.process, now, out)
                elif isinstance(due, StdinWatch):
                    self._on_stdin_watch(due.process, now, out)
                else:
                    self._on_deadline_while_down(due.attempt, now, out)
        if fired or ((wakeup := self.scheduler.next_wakeup()) is not None and wakeup <= now):
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
                    self._on_fail(decision.request_id, decision.reason, decision.late, now, out)
                elif isinstance(decision, CancelRunning):
                    self._on_deadline(decision.request_id, decision.reason, now, out)
                elif isinstance(decision, TakeBack):
                    again |= self._on_take_back(decision.request_id, decision.reason, now, out)

    def _enqueue(self, req: TrackedRequest, now: float, *, retry: bool) -> bool:
        """Queue a new attempt of `req`; False if the scheduler need not decide for it."""
        aid = next(self._attempt_ids)
        req.attempt_id = aid
        req.current = None
        self._attempts[aid] = req
        # A whole WindowPoSt is sized for doomed starts, a WinningPoSt for its child's choice
        # (scheduling/doomed.py): its replicas and proof type.
        task = req.task
        sized = isinstance(task, (WindowPoSt, WinningPoSt))
        job = Job(
            aid,
            req.stage,
            req.arrival,
            req.deadline,
            req.priority,
            req.breaker_key,
            req.avoid,
            req.back,
            len(task.replicas) if sized else 0,
            task.proof_type if sized else "",
        )
        self._queued += 1
        if retry:
            self.scheduler.requeue(job, now)
            return True
        return self.scheduler.submit(job, now)

    def _start(self, aid: int, child: str, now: float, out: list[Effect]) -> bool:
        """Send attempt `aid` to `child`; True if the scheduler must be asked again."""
        c = self._children[child]
        req = self._attempts.get(aid)
        process = c.process
        # Below, the scheduler forgets the job (remove) rather than hearing it finished: nothing
        # ran, and it must not count as the child's quick answer.
        if req is None or req.done or req.attempt_id != aid:
            self.scheduler.remove(aid)  # stale; free the slot it was given
            return False
        if process is None or process.down:
            # Not expected (the scheduler is told at once); put the job back all the same.
            self.scheduler.remove(aid)
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
        # The first try back only (a block does not wait: the scheduler sent it back here); one
        # that timed out or was lost would go back again, free each time, with no end.
        if req.avoid is not None and child in req.avoid and req.stage == URGENT:
            attempt.free = req.free_tries == 0
            req.free_tries += attempt.free
        c.sent = True
        req.child = child
        req.current = attempt
        out.append(Send(req, child, child_rid))
        limits = c.limits
        if limits.request_timeout:
            attempt.timeout = self._alarms.add(
                now + limits.request_timeout, RequestTimeout(attempt)
            )
        hb = limits.heartbeat_timeout
        if hb and process.protocol == DEXT and process.heartbeat is None:
            process.heartbeat = self._alarms.add(process.last_activity + hb, HeartbeatDue(process))
        return False

    def _forget(self, attempt: Attempt) -> None:
        """`attempt` left its process: its slot and alarms go."""
        self._running.pop(attempt.attempt_id, None)
        if not (attempt.timeout is attempt.grace is attempt.deadline is None):  # any alarm set
            self._alarms.cancel(attempt.timeout)
            self._alarms.cancel(attempt.grace)
            self._alarms.cancel(attempt.deadline)
            attempt.timeout = attempt.grace = attempt.deadline = None

    def _take_down(
        self, process: ProcessRecord, now: float, charge_all: bool, *, exited: bool = False
    ) -> None:
        process.down = True
        process.charge_all = charge_all
        process.stdin_waiting = False
        self._alarms.cancel(process.heartbeat)
        self._alarms.cancel(process.stdin_watch)
        process.heartbeat = process.stdin_watch = None
        # Unless it has exited, the process may still be alive (killed: one stuck in a GPU
        # driver call takes seconds to die) and hold its GPU: the locks its requests held stay
        # held until the supervisor says it exited (child_exited).
        hold = None if exited else process.who
        self.scheduler.child_down(process.child.name, now, hold=hold)
        if hold is not None and hold in self.scheduler.holds.by_name:
            process.child.exiting.append(process)
        # The scheduler forgets what ran on it, deadlines included, but its requests stay on it
        # until it is lost (answers it wrote before it went still count): watch their deadlines.
        for attempt in process.attempts.values():
            deadline = attempt.request.deadline
            if not attempt.abandoned and deadline is not None and attempt.deadline is None:
                attempt.deadline = self._alarms.add(deadline, DeadlineOnDown(attempt))

    def _kill(
        self,
        process: ProcessRecord,
        reason: str,
        now: float,
        out: list[Effect],
        *,
        charge_all: bool,
        request_id: int | None = None,
    ) -> None:
        if not process.down:
            self._take_down(process, now, charge_all)
        out.append(Kill(process.child.name, reason, request_id))

    def _resolve(
        self,
        req: TrackedRequest,
        out: list[Effect],
        now: float,
        *,
        output: Output | None = None,
        error: str | None = None,
        outcome: str | None = None,
        late: bool = False,
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
            faulty = isinstance(output, OUTPUTS_WITH_FAULTS) and bool(output.faults)
            outcome = "fault" if faulty else "ok"
        out.append(Resolve(req, output if error is None else None, error, outcome, late))

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
        process: ProcessRecord,
        aid: int,
        what: str,
        now: float,
        out: list[Effect],
        *,
        charge: bool = True,
        free: bool = False,
        outcome: str = "error",
        level: str = "warning",
        failure: bool = True,
    ) -> None:
        """Attempt `aid` of `req` was lost (`what`) on `process`: queue it again if it may, else
        answer it; `level`: the retry's, for the log; `free`: the attempt's (Attempt.free);
        `failure`: the attempt failed (a retry counted in `retried`), not taken back."""
        c = process.child
        self._attempts.pop(aid, None)
        if req.done or req.attempt_id != aid:
            return
        if not charge:
            req.attempts -= 1
            req.free_tries -= free
        elif free and failure:  # its try back timed out or was lost: its last is another's
            req.back = False
        max_attempts = max(1, c.limits.max_attempts)
        if self.shutting_down:
            why = f"{what}, and the supervisor is shutting down, so it was not retried"
            self._resolve(req, out, now, error=self._describe_failure(req, why), outcome=outcome)
        elif req.deadline is not None and now >= req.deadline:
            why = f"{what}; its deadline has passed"
            error = self._describe_failure(req, why)
            self._resolve(req, out, now, error=error, outcome="timeout", late=True)
        elif req.attempts - req.free_tries < max_attempts:
            self._enqueue(req, now, retry=True)
            if failure:
                self.retried[req.stage] = self.retried.get(req.stage, 0) + 1
            of = max_attempts + req.free_tries
            out.append(Retry(req, what, req.attempts + 1, of, level, c.name, process.pid))
        else:
            why = f"{what}; giving up (MaxAttempts = {max_attempts} on {c.name})"
            self._resolve(req, out, now, error=self._describe_failure(req, why), outcome=outcome)

    def _failed_answer(
        self,
        c: ChildRecord,
        attempt: Attempt,
        why: str,
        what: str,
        said: str,
        now: float,
        out: list[Effect],
    ) -> None:
        """`attempt` was answered with an error or a bad output (`why`, or `what` after the
        request's name; `said`: what was wrong, without the child). While the request has an
        attempt left and another child of its stage that has not failed it is neither FATAL nor
        benched, it runs again there (a second opinion: damocles-manager gives up a partition
        batch on an error); else this is its answer, unless it is a WinningPoSt that failed
        within WINNING_RETRY_WITHIN seconds of its arrival while no other one waits: its block
        is lost without a proof, and a passing error (CUDA out of memory, a driver hiccup) is
        often gone at the next try, so it runs again (on the same child when that one is alone:
        the scheduler sends a WinningPoSt no other child can take to one it avoids), once per
        request."""
        req = attempt.request
        if isinstance(req.task, WindowPoStSnark):  # counted if a sibling proves the step
            self.scheduler.finished(attempt.attempt_id, now)
            req.refusals.append((c.name, now, attempt.process))
        else:
            self._answered(attempt, c.name, True, now)
            self._bench_news(now, out)
        if req.avoid and c.name in req.avoid:  # it failed there twice: no going back again
            req.back = False
        avoid = (req.avoid or frozenset()) | {c.name}
        others = self._by_stage.get(req.stage, ())
        breaker = self.scheduler.breaker
        max_attempts = max(1, c.limits.max_attempts)
        over = self.shutting_down or (req.deadline is not None and now >= req.deadline)
        req.avoid = avoid  # (also once answered: a split WindowPoSt asks who failed its step)
        may = not over and req.attempts - req.free_tries < max_attempts
        if may and any(o.name not in avoid and breaker.can_serve(o.name, now) for o in others):
            retry: str | None = what
        elif may and (again := self._try_again(req, now)) is not None:
            req.tried_again = True
            retry = f"{what}; {again}"
        else:
            retry = None
        if retry is not None:
            req.history.append(f"attempt {req.attempts} on {c.name}: {said}")
            self._enqueue(req, now, retry=True)
            self.retried[req.stage] = self.retried.get(req.stage, 0) + 1
            pid = attempt.process.pid
            of = max_attempts + req.free_tries
            out.append(Retry(req, retry, req.attempts + 1, of, child=c.name, pid=pid))
        elif req.history:  # the last of several attempts: say what became of each
            self._resolve(req, out, now, error=self._describe_failure(req, what))
        else:
            self._resolve(req, out, now, error=why)

    def _try_again(self, req: TrackedRequest, now: float) -> str | None:
        """Why `req`, just failed with no other child to give a second opinion, runs again
        (for its Retry), or None if it does not: not a WinningPoSt, tried again already,
        failed too late for another try to make its block, or another WinningPoSt waits (the
        retry would go first, and could cost that one its block)."""
        if req.stage != URGENT or req.tried_again:
            return None
        since = now - req.arrival
        if since >= WINNING_RETRY_WITHIN:
            return None
        if self.scheduler.statistics().queued.get(req.stage):
            return None  # another one waits: it goes first, its block is still to be made
        return (
            f"no other {req.stage} child can give a second opinion, and {since:.1f}s after"
            " it arrived another try may still make its block (about 20 s): it runs again,"
            " once"
        )

    def _answered(self, attempt: Attempt, child: str, failed: bool, now: float) -> None:
        """The scheduler frees `attempt`'s slot and counts its answer (an error, or a proof) for
        the breaker; an answer read after its child began to go down (the scheduler dropped the
        job with it) is counted here: a prover that answers and exits is often seen exiting
        first."""
        if not self.scheduler.finished(attempt.attempt_id, now, failed=failed):
            self.scheduler.breaker.count_late(child, attempt.request.breaker_key, failed, now)

    def _count_refusals(self, req: TrackedRequest, now: float) -> None:
        """A sibling proved SNARK step `req`: the errors its children made of it count for the
        breaker now, in their place among their answers (before that proof is counted)."""
        for name, made_at, process in req.refusals:
            self._count_made(name, process, req.breaker_key, True, now, made_at)
        req.refusals.clear()

    def _count_made(
        self, name: str, process: ProcessRecord, key: int, failed: bool, now: float, at: float
    ) -> None:
        """An answer `name`'s `process` made `at`, counted for the breaker `now`, in its place
        among the child's answers (as a newer process's, if the child restarted since)."""
        if name in self._children:
            newer = self._children[name].process not in (None, process)
            self.scheduler.breaker.count_late(name, key, failed, now, at, restarted=newer)

    def _bench_news(self, now: float, out: list[Effect]) -> None:
        """Say which children the scheduler's breaker just benched, and why."""
        news = self.scheduler.breaker.news
        for name in news:
            c = self._children[name]
            streak = self.scheduler.breaker.streak(name)
            who = c.process.who if c.process is not None else name
            again = f" (bench {streak.benches} in a row)" if streak.benches > 1 else ""
            how_long = f"for {streak.benched_until - now:.0f}s{again}"
            if streak.benches == 1 and (c.process is None or c.process.down):
                how_long = "until its next process is ready"  # a first bench ends at a restart
            same = (
                "the same vanilla proofs" if c.stage == WINDOW_POST_SPLIT[1] else "the same miner"
            )
            answered = f"answered its last {streak.errors} requests with an error"
            if c.stage == WINDOW_POST_SPLIT[0]:
                answered += " (or with vanilla proofs the SNARK children refused)"
            text = (
                f"{who} {answered} while another {c.stage} child proved for {same}: it takes"
                f" no request {how_long} while another child can serve them, then one at a time"
                " until it makes a proof"
            )
            pid = c.process.pid if c.process is not None else None
            out.append(Note("warning", text, name, pid))
        news.clear()

    def _on_fail(self, aid: int, reason: str, late: bool, now: float, out: list[Effect]) -> None:
        """The scheduler's `Fail` of attempt `aid` (`late`: refused as unable to finish before
        its deadline, answered as a timeout, as one cut by its deadline)."""
        req = self._attempts.pop(aid, None)
        if req is None or req.attempt_id != aid:
            return
        expired = late or (req.deadline is not None and now >= req.deadline)
        if req.attempts and reason.endswith(NOT_SENT):  # a retry: it was sent before
            reason = reason.removesuffix(NOT_SENT) + "; it was not sent again"
        reason += self._last_exits(req.stage)
        self._resolve(
            req,
            out,
            now,
            error=self._describe_failure(req, reason),
            outcome="timeout" if expired else "error",
            late=expired,
        )

    def _last_exits(self, stage: str) -> str:
        """Why no child of `stage` can serve, when every one gave up: each one's last exit, in
        parentheses after a space (the caller may not see the supervisor's log); else ""."""
        pool = self._by_stage.get(stage, [])
        if pool and all(c.gave_up for c in pool):
            return " (" + "; ".join(f"{c.name}: {c.last_exit}" for c in pool) + ")"
        return ""

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
            error=f"request {req.rid} ({req.stage}): {reason}; cancelled (attempt {req.attempts}"
            f"{_before(req)})",
            outcome="timeout",
            late=True,
        )
        self._send_cancel(attempt, now, out, kill_after_grace=True)

    def _on_take_back(self, aid: int, reason: str, now: float, out: list[Effect]) -> bool:
        """Attempt `aid` waits in its child behind long work: cancel it there (its slot is held
        until the child answers the Cancel, and a child still running it CancelGraceSecs later
        is killed, as for any abandoned attempt) and queue its request again at no cost. True
        if it was queued again."""
        attempt = self._running.get(aid)
        if attempt is None or attempt.abandoned:
            return False
        attempt.abandoned = True
        req = attempt.request
        req.current = None
        process = attempt.process
        self._send_cancel(attempt, now, out, kill_after_grace=True)
        what = f"taken back from {process.who}, where it was {reason}"
        self._retry_or_fail(
            req,
            process,
            aid,
            what,
            now,
            out,
            charge=False,
            free=attempt.free,
            level="info",
            failure=False,
        )
        return not req.done

    def _on_deadline_while_down(self, attempt: Attempt, now: float, out: list[Effect]) -> None:
        attempt.deadline = None
        process = attempt.process
        req = attempt.request
        if attempt.abandoned or req.done or process.attempts.get(attempt.child_rid) is not attempt:
            return
        attempt.abandoned = True
        req.current = None
        process.child.failed += 1
        self._resolve(
            req,
            out,
            now,
            error=f"request {req.rid} ({req.stage}): its deadline passed while {process.who},"
            f" which ran it, was going down (attempt {req.attempts}{_before(req)})",
            outcome="timeout",
            late=True,
        )

    def _on_request_timeout(self, attempt: Attempt, now: float, out: list[Effect]) -> None:
        process = attempt.process
        if process.attempts.get(attempt.child_rid) is not attempt or attempt.abandoned:
            return
        attempt.timeout = None
        if process.down:
            return  # its loss will retry it
        if not attempt.timeout_waited and attempt.process.unread_at == now:
            attempt.timeout_waited = True  # see UNREAD_WAIT
            attempt.timeout = self._alarms.add(now + UNREAD_WAIT, RequestTimeout(attempt))
            return
        attempt.abandoned = True
        req = attempt.request
        req.current = None
        c = process.child
        c.failed += 1
        what = f"timed out after {c.limits.request_timeout:g}s on {process.who}"
        req.history.append(f"attempt {req.attempts} {what}")
        self._retry_or_fail(
            req, process, attempt.attempt_id, what, now, out, free=attempt.free, outcome="timeout"
        )
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
            attempt.grace = self._alarms.add(now + grace, CancelGrace(attempt))

    def _on_cancel_grace(self, attempt: Attempt, now: float, out: list[Effect]) -> None:
        attempt.grace = None
        process = attempt.process
        if process.down or process.attempts.get(attempt.child_rid) is not attempt:
            return
        if not attempt.grace_waited and process.unread_at == now:
            attempt.grace_waited = True  # see UNREAD_WAIT
            attempt.grace = self._alarms.add(now + UNREAD_WAIT, CancelGrace(attempt))
            return
        grace = process.child.limits.cancel_grace
        how = "a Cancel" if process.protocol == DEXT else "its timeout (JSON lines: no Cancel)"
        # The request that hung was dealt with already; the others on this child did nothing
        # wrong, so their retry is free.
        rid = attempt.request.rid
        self._kill(
            process,
            f"request {rid} (child id {attempt.child_rid}) still running {grace:g}s after {how}",
            now,
            out,
            charge_all=False,
            request_id=rid,
        )

    def _on_heartbeat(self, process: ProcessRecord, now: float, out: list[Effect]) -> None:
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
            process.heartbeat = self._alarms.add(due, HeartbeatDue(process))
            return
        self._kill(
            process,
            f"hung: no Progress or Response for {now - process.last_activity:.1f}s while working"
            f" (HeartbeatTimeoutSecs = {hb:g})",
            now,
            out,
            charge_all=True,
        )

    def _on_stdin_watch(self, process: ProcessRecord, now: float, out: list[Effect]) -> None:
        process.stdin_watch = None
        if process.down or not process.stdin_waiting:
            return
        timeout = process.child.limits.stdin_timeout
        due = process.stdin_progress_at + timeout
        if now < due:
            process.stdin_watch = self._alarms.add(due, StdinWatch(process))
            return
        self._kill(
            process,
            f"hung: read nothing from its stdin for {now - process.stdin_progress_at:.1f}s while"
            f" messages for it waited in a full pipe (StdinTimeoutSecs = {timeout:g})",
            now,
            out,
            charge_all=True,
        )


def _before(req: TrackedRequest) -> str:
    """What became of `req`'s earlier attempts, for the answer its last one ends with."""
    return f"; before it: {'; '.join(req.history)}" if req.history else ""
