"""Quick requests queue in their child: a child that offers a queue takes that many jobs beyond
its capacity while its answers are quick, and a job left behind long work is taken back."""

from __future__ import annotations

import math

from damocles_ext.scheduling.children import _Child, _Running, gpu_free_at
from damocles_ext.scheduling.policy import ChildSlots, Job, Scheduler, Start, TakeBack

WD = "window_post"
QUICK_RUN = 3  # quick answers in a row before a child takes its queue (the default is 16)
TAKE_BACK_AFTER = 0.05


def scheduler(*children: ChildSlots, queue: int = 1) -> Scheduler:
    s = Scheduler(quick_run=QUICK_RUN, quick_answer=0.01, take_back_after=TAKE_BACK_AFTER)
    for c in children:
        s.add_child(c)
        s.child_ready(c.child_id, 0.0, queue=queue)
    return s


class Driver:
    """Submits jobs and answers them on the clock it keeps."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.now = 0.0
        self.next_id = 0

    def submit(self) -> list:
        rid = self.next_id
        self.next_id += 1
        self.s.submit(Job(rid, WD, self.now), self.now)
        return self.s.decide(self.now)

    def finish(self, rid: int, after: float = 0.001) -> list:
        self.now += after
        assert self.s.finished(rid, self.now)
        return self.s.decide(self.now)

    def warm(self, n: int = QUICK_RUN) -> None:
        """n quick answers, one job at a time."""
        for _ in range(n):
            (start,) = self.submit()
            self.finish(start.request_id)


def started(decisions: list) -> list[tuple[int, str]]:
    return [(d.request_id, d.child_id) for d in decisions if isinstance(d, Start)]


def test_a_busy_child_takes_one_more_job_only_once_its_answers_are_quick():
    d = Driver(scheduler(ChildSlots("a", WD)))
    first = d.submit()
    assert started(first) == [(0, "a")]
    assert d.submit() == []  # not quick yet: the job waits here, not in the child
    d.finish(0)  # job 1 starts; answers 1 and 2 make it quick
    d.finish(1)
    assert started(d.submit()) == [(2, "a")]
    d.finish(2)
    assert started(d.submit()) == [(3, "a")]
    assert started(d.submit()) == [(4, "a")]  # behind job 3, in the child
    assert d.submit() == []  # its queue is 1
    assert d.s.statistics().running == {"a": 2}


def test_a_slow_answer_ends_the_queue_until_the_child_is_quick_again():
    d = Driver(scheduler(ChildSlots("a", WD)))
    d.warm()
    assert started(d.submit()) == [(3, "a")]
    assert started(d.submit()) == [(4, "a")]
    d.finish(3, after=0.2)  # slow: job 4 takes its slot, nothing goes behind it
    assert d.submit() == []
    assert started(d.finish(4)) == [(5, "a")]  # the waiting one, alone
    assert d.submit() == []  # one quick answer since the slow one: not yet
    assert d.s.statistics().running == {"a": 1}


def test_an_idle_child_is_chosen_before_a_queue():
    d = Driver(scheduler(ChildSlots("a", WD), ChildSlots("b", WD)))
    d.s.child_down("b", 0.0)
    d.warm()
    assert started(d.submit()) == [(3, "a")]
    d.s.child_ready("b", d.now, queue=1)
    assert started(d.submit()) == [(4, "b")]  # not behind job 3 on a


def test_a_job_behind_long_work_is_taken_back_once_and_the_child_takes_no_more():
    d = Driver(scheduler(ChildSlots("a", WD)))
    d.warm()
    assert started(d.submit()) == [(3, "a")]
    turn = d.now
    assert started(d.submit()) == [(4, "a")]  # behind job 3
    assert d.s.next_wakeup() == turn + TAKE_BACK_AFTER
    assert d.s.decide(turn + TAKE_BACK_AFTER / 2) == []
    d.now = turn + TAKE_BACK_AFTER
    (taken,) = d.s.decide(d.now)
    assert isinstance(taken, TakeBack) and (taken.request_id, taken.child_id) == (4, "a")
    assert "queued behind work running over 0.05s" in taken.reason
    assert d.s.decide(d.now + 1) == []  # once
    assert d.s.next_wakeup() is None
    assert d.submit() == []  # not quick any more, and job 4 holds its slot until answered
    d.finish(4)  # its Cancel answered: job 3 still runs, the new job waits
    assert d.s.statistics().running == {"a": 1}


def test_no_queue_unless_offered_and_none_with_locks():
    for children, queue in (
        ((ChildSlots("a", WD),), 0),
        ((ChildSlots("a", WD, locks=frozenset({"gpu0"})),), 1),
    ):
        d = Driver(scheduler(*children, queue=queue))
        d.warm(2 * QUICK_RUN)
        assert started(d.submit()) == [(2 * QUICK_RUN, "a")]
        assert d.submit() == []


def test_the_book_cancels_a_job_taken_back_and_answers_its_request_once_at_no_attempt_cost():
    from helpers.child import window_task

    from damocles_ext.lifecycle import ChildLimits, RequestBook, Resolve, Retry, Send, SendCancel
    from damocles_ext.tasks import WindowPoStOutput

    ok = WindowPoStOutput(proofs=[b"p"], faults=[])
    sched = Scheduler(quick_run=1, quick_answer=0.01, take_back_after=TAKE_BACK_AFTER)
    book = RequestBook(sched)
    book.add_child("a", WD, limits=ChildLimits(max_attempts=1))
    book.child_ready("a", 0.0, protocol="dext", pid=1, queue=1)
    book.submit(1, window_task(), 0.0)
    book.answered("a", 1, 0.001, output=ok)  # quick: "a" takes one job behind the next
    r2, out = book.submit(2, window_task(), 0.002)
    assert out == [Send(r2, "a", 2)]
    r3, out = book.submit(3, window_task(), 0.003)
    assert out == [Send(r3, "a", 3)]
    assert book.next_wakeup() == 0.002 + TAKE_BACK_AFTER
    out = book.advance(0.002 + TAKE_BACK_AFTER)
    assert out[0] == SendCancel("a", 3)
    assert isinstance(out[1], Retry) and out[1].request is r3 and out[1].attempt == 1
    assert "taken back from" in out[1].what and out[1].level == "info"  # nothing failed
    assert len(out) == 2  # "a" holds job 2 and the cancelled job 3: nothing more goes to it
    assert book.answered("a", 3, 0.06, error="cancelled") == []  # the Cancel's answer: dropped
    out = book.answered("a", 2, 0.07, output=ok)
    assert out == [Resolve(r2, ok, None, "ok"), Send(r3, "a", 4)]  # again, same attempt count
    assert book.answered("a", 4, 0.071, output=ok) == [Resolve(r3, ok, None, "ok")]
    assert r3.attempts == 1  # MaxAttempts = 1, and it was answered: the take back was free
    assert book.retried == {}  # and no failed attempt: no retry counted in the metrics
    assert book.sizes() == dict.fromkeys(["requests", "attempts", "running", "queued", "alarms"], 0)


def test_a_request_that_could_not_be_sent_is_no_quick_answer():
    # Only answers the child gave count towards taking its queue: a Send that could not be
    # carried out (nothing reached the child) does not make it look quick.
    from helpers.child import window_task

    from damocles_ext.lifecycle import RequestBook, Resolve, Send

    sched = Scheduler(quick_run=1, quick_answer=0.01, take_back_after=TAKE_BACK_AFTER)
    book = RequestBook(sched)
    book.add_child("a", WD)
    book.child_ready("a", 0.0, protocol="dext", pid=1, queue=1)
    r1, out = book.submit(1, window_task(), 0.0)
    assert out == [Send(r1, "a", 1)]
    [resolved] = book.unsendable("a", 1, 0.001, "request 1: cannot be sent")
    assert isinstance(resolved, Resolve) and resolved.request is r1
    r2, out = book.submit(2, window_task(), 0.002)
    assert out == [Send(r2, "a", 2)]
    assert book.submit(3, window_task(), 0.003)[1] == []  # not behind 2: "a" is not quick


def test_no_job_goes_behind_work_that_is_overdue_already():
    d = Driver(scheduler(ChildSlots("a", WD)))
    d.warm()
    assert started(d.submit()) == [(3, "a")]
    d.now += 2 * TAKE_BACK_AFTER  # job 3 runs long, and no answer came to say so
    assert d.submit() == []  # waits here, free to go to whichever child frees first
    assert d.s.next_wakeup() is None


def test_when_a_childs_gpu_frees_does_not_depend_on_the_order_of_its_jobs():
    # One job waits behind another's GPU phase with nothing measured yet (no estimate), one is
    # still before its GPU phase (the GPU is wanted for an unknown time): +inf in either order.
    child = _Child(info=ChildSlots("g0", "window_post", 2, 1, frozenset()), order=0)
    job = Job(1, "window_post", 0.0, None, 0)
    waiting = _Running(job=job, child_id="g0", gpu_since=1.0, gpu_turn=None)
    before = _Running(job=job, child_id="g0")
    assert gpu_free_at(child, [waiting, before]) == math.inf
    assert gpu_free_at(child, [before, waiting]) == math.inf
