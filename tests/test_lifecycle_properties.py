"""The request book under random event sequences (hypothesis): its promises hold whatever
children, callers and time do.

* every request is resolved exactly once, and nothing is sent for it after that;
* a request is never resolved with an output after its deadline, and the book always asks to be
  woken by the earliest deadline of an open request;
* an open request is always somewhere: queued, or running on a live attempt of a process that is
  still there — never left behind on a child that died;
* after shutdown, the children's loss and the grace period, every request has its answer.
"""

from __future__ import annotations

from helpers.child import window_task
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from damocles_ext.lifecycle import ChildLimits, Kill, RequestBook, Resolve, Send
from damocles_ext.tasks import WindowPoStOutput

OK = WindowPoStOutput(proofs=[b"p"], faults=[])
CHILDREN = ("a", "b", "c")

limits_strategy = st.builds(
    ChildLimits,
    max_attempts=st.integers(1, 3),
    request_timeout=st.sampled_from([0.0, 5.0, 20.0]),
    cancel_grace=st.sampled_from([0.0, 2.0, 10.0]),
    heartbeat_timeout=st.sampled_from([0.0, 8.0]),
    stdin_timeout=st.sampled_from([0.0, 6.0]),
)


class BookMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.book = RequestBook()
        self.now = 0.0
        self.next_rid = 1
        self.deadlines: dict[int, float | None] = {}
        self.resolved: dict[int, Resolve] = {}
        self.pid = 100
        self.up: dict[str, str] = {}  # child -> "ready" | "down" (absent: no process)
        self.sent: dict[str, list[int]] = {}  # child -> child_rids sent to its current process
        self.shut = False
        self.pipelined: set[str] = set()  # children that may hold work back for their GPU

    @initialize(
        limits=st.lists(limits_strategy, min_size=1, max_size=len(CHILDREN)),
        capacity=st.integers(1, 3),
    )
    def add_children(self, limits: list[ChildLimits], capacity: int) -> None:
        for name, lim in zip(CHILDREN, limits, strict=False):  # fewer limits than names
            self.book.add_child(name, "window_post", capacity=capacity, limits=lim)
        self.children = CHILDREN[: len(limits)]
        self.capacity = capacity

    # -- carrying out effects, as the driver does --------------------------------------------

    def apply(self, effects) -> None:
        for effect in effects:
            if isinstance(effect, Resolve):
                rid = effect.request.rid
                assert rid not in self.resolved, f"request {rid} resolved twice"
                self.resolved[rid] = effect
                deadline = self.deadlines[rid]
                if effect.output is not None and deadline is not None:
                    assert self.now <= deadline, f"request {rid} answered after its deadline"
                assert (effect.output is None) != (effect.error is None)
            elif isinstance(effect, Send):
                assert effect.request.rid not in self.resolved, "sent after it was resolved"
                assert self.up.get(effect.child) == "ready", f"sent to {effect.child}, not ready"
                self.sent.setdefault(effect.child, []).append(effect.child_rid)
            elif isinstance(effect, Kill):
                assert effect.child in self.up
                self.up[effect.child] = "down"  # the driver takes it down; lost later

    # -- events -----------------------------------------------------------------------------

    @rule(deadline=st.none() | st.floats(0.0, 60.0), priority=st.integers(0, 2))
    def submit(self, deadline: float | None, priority: int) -> None:
        if self.shut:
            return  # the supervisor refuses new requests once shutting down
        rid = self.next_rid
        self.next_rid += 1
        absolute = None if deadline is None else self.now + deadline
        self.deadlines[rid] = absolute
        _, effects = self.book.submit(
            rid, window_task(miner=rid), self.now, deadline=absolute, priority=priority
        )
        self.apply(effects)

    @rule(data=st.data())
    def child_ready(self, data: st.DataObject) -> None:
        idle = [c for c in self.children if c not in self.up]
        if not idle:
            return
        child = data.draw(st.sampled_from(idle))
        protocol = data.draw(st.sampled_from(["dext", "jsonl"]))
        self.pid += 1
        self.up[child] = "ready"
        self.sent[child] = []
        self.apply(self.book.child_ready(child, self.now, protocol=protocol, pid=self.pid))

    @rule(data=st.data(), charge_all=st.booleans())
    def child_down(self, data: st.DataObject, charge_all: bool) -> None:
        live = [c for c, state in self.up.items() if state == "ready"]
        if not live:
            return
        child = data.draw(st.sampled_from(sorted(live)))
        self.up[child] = "down"
        self.apply(self.book.child_down(child, self.now, charge_all=charge_all))

    @rule(data=st.data())
    def child_lost(self, data: st.DataObject) -> None:
        if not self.up:
            return
        child = data.draw(st.sampled_from(sorted(self.up)))
        del self.up[child]
        self.sent.pop(child, None)
        self.apply(self.book.child_lost(child, self.now, "exited (killed by SIGKILL)"))
        # Nothing open is left on the process that died.
        for req in self._open():
            assert req.current is None or req.current.process.child.process is not None

    @rule(data=st.data(), good=st.booleans())
    def answer(self, data: st.DataObject, good: bool) -> None:
        choices = [(c, rid) for c, rids in self.sent.items() for rid in rids]
        if not choices:
            return
        child, rid = data.draw(st.sampled_from(sorted(choices)))
        self.sent[child].remove(rid)
        kw = {"output": OK} if good else {"error": "no such sector"}
        self.apply(self.book.answered(child, rid, self.now, **kw))

    @rule(data=st.data())
    def answers_read_together(self, data: st.DataObject) -> None:
        # Several answers of one child in one read, maybe with a repeat or an id never sent.
        live = sorted(c for c, rids in self.sent.items() if rids)
        if not live:
            return
        child = data.draw(st.sampled_from(live))
        rids = data.draw(st.lists(st.sampled_from(self.sent[child]), min_size=1, unique=True))
        extra = data.draw(st.lists(st.integers(0, 50), max_size=2))
        for rid in rids:
            self.sent[child].remove(rid)
        extra = [rid for rid in extra if rid not in self.sent[child]]  # answered or never sent
        batch = [
            (rid, OK, None) if data.draw(st.booleans()) else (rid, None, "no such sector")
            for rid in data.draw(st.permutations(rids + extra))
        ]
        self.apply(self.book.answers(child, batch, self.now))
        assert not any(self.book.is_running(child, rid) for rid in rids)

    @rule(data=st.data())
    def bogus_answer(self, data: st.DataObject) -> None:
        if not self.up:
            return
        child = data.draw(st.sampled_from(sorted(self.up)))
        rid = data.draw(st.integers(0, 50))
        if rid in self.sent.get(child, []):
            return
        self.apply(self.book.answered(child, rid, self.now, output=OK))

    @rule(data=st.data())
    def progress(self, data: st.DataObject) -> None:
        choices = [(c, rid) for c, rids in self.sent.items() for rid in rids]
        if not choices:
            return
        child, rid = data.draw(st.sampled_from(sorted(choices)))
        phase = data.draw(st.sampled_from(["vanilla", "snark", "done"]))
        if phase == "snark":  # a GPU phase: the scheduler pipelines the child from now on
            self.pipelined.add(child)
        self.apply(self.book.progress(child, rid, self.now, phase=phase, done=0, total=1))

    @rule(data=st.data())
    def unsendable(self, data: st.DataObject) -> None:
        choices = [(c, rids[-1]) for c, rids in self.sent.items() if rids]
        if not choices:
            return
        child, rid = data.draw(st.sampled_from(sorted(choices)))
        self.sent[child].remove(rid)
        self.apply(self.book.unsendable(child, rid, self.now, "too big"))

    @rule(data=st.data())
    def caller_gone(self, data: st.DataObject) -> None:
        open_ids = sorted(r.rid for r in self._open())
        if open_ids:
            rid = data.draw(st.sampled_from(open_ids))
            self.apply(self.book.caller_gone(rid, self.now))

    @rule(data=st.data())
    def stdin(self, data: st.DataObject) -> None:
        live = sorted(c for c, state in self.up.items() if state == "ready")
        if not live:
            return
        child = data.draw(st.sampled_from(live))
        what = data.draw(st.sampled_from(["blocked", "progress", "drained"]))
        if what == "blocked":
            self.book.stdin_blocked(child, self.now)
        elif what == "progress":
            self.book.stdin_progress(child, self.now)
        else:
            self.book.stdin_drained(child)

    @rule(dt=st.floats(0.0, 15.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.apply(self.book.advance(self.now))

    @rule()
    def wake_up_on_time(self) -> None:
        wakeup = self.book.next_wakeup()
        if wakeup is not None:
            self.now = max(self.now, wakeup)
            self.apply(self.book.advance(self.now))

    @precondition(lambda self: not self.shut)
    @rule()
    def shutdown(self) -> None:
        self.shut = True
        self.apply(self.book.shutdown(self.now))

    # -- what must always hold ----------------------------------------------------------------

    def _open(self):
        return list(self.book._requests.values())

    @invariant()
    def open_requests_are_somewhere(self) -> None:
        for req in self._open():
            assert req.rid not in self.resolved
            assert req.attempt_id is not None, f"request {req.rid} has no attempt"
            if self.book.scheduler.is_queued(req.attempt_id):
                continue
            attempt = req.current
            assert attempt is not None, f"request {req.rid} is neither queued nor running"
            assert not attempt.abandoned
            process = attempt.process
            assert process.child.process is process, f"request {req.rid} left on a dead process"
            assert process.attempts.get(attempt.child_rid) is attempt

    @invariant()
    def no_ready_child_has_a_free_slot_while_requests_wait(self) -> None:
        # Unless every waiting request avoids it (it answered them with an error: they wait
        # for another child; a request behind them goes on), or the breaker leaves it out.
        waiting = [r for r in self._open() if self.book.scheduler.is_queued(r.attempt_id)]
        if not waiting:
            return
        avoided = set.intersection(*(set(r.avoid or ()) for r in waiting))
        for child, state in self.up.items():
            if state == "ready" and child not in self.pipelined and child not in avoided:
                if self.book.scheduler.breaker.leaves_out(child, self.now):
                    continue
                assert self.book.in_flight(child) >= self.capacity, f"{child} idles"

    @invariant()
    def the_book_wakes_up_by_the_earliest_deadline(self) -> None:
        deadlines = [r.deadline for r in self._open() if r.deadline is not None]
        if deadlines:
            wakeup = self.book.next_wakeup()
            assert wakeup is not None and wakeup <= min(deadlines)

    @invariant()
    def resolved_requests_leave_the_book(self) -> None:
        assert self.book.unanswered + len(self.resolved) == self.next_rid - 1

    def teardown(self) -> None:
        # Stop as the supervisor does: shutdown, children lost, grace over: all answered.
        if not hasattr(self, "children"):
            return
        self.apply(self.book.shutdown(self.now))
        for child in sorted(self.up):
            self.apply(self.book.child_lost(child, self.now, "stopped (shutdown)"))
        self.up.clear()
        self.apply(self.book.grace_over(self.now + 30.0, 30.0))
        assert sorted(self.resolved) == list(range(1, self.next_rid))
        sizes = self.book.sizes()
        assert sizes["requests"] == sizes["attempts"] == sizes["running"] == 0, sizes
        assert sizes["queued"] == 0, sizes


def test_the_request_book_keeps_its_promises() -> None:
    run_state_machine_as_test(
        BookMachine,
        settings=settings(
            max_examples=100,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
