"""The policy's breaker (scheduling/breaker.py): a child that fails request after request while a
sibling proves is benched, then put on probation. Scripted events, no processes, no clock."""

from __future__ import annotations

import math

from damocles_ext.scheduling.breaker import BENCH_FIRST, BENCH_MAX, BREAKER_ERRORS, ChildBreaker
from damocles_ext.scheduling.policy import ChildSlots, Job, Scheduler, Start

WD = "window_post"


def two(capacity_a: int = 1, capacity_b: int = 1, **kwargs) -> Scheduler:
    s = Scheduler(**kwargs)
    s.add_child(ChildSlots("a", WD, capacity_a))
    s.add_child(ChildSlots("b", WD, capacity_b))
    s.child_ready("a", 0.0)
    s.child_ready("b", 0.0)
    return s


class Driver:
    """Jobs submitted one by one, answered by a rule per child: "a" fails, "b" proves."""

    def __init__(self, s: Scheduler, fails: set[str]) -> None:
        self.s, self.fails, self.next_id = s, fails, 1
        self.where: dict[int, str] = {}  # running: request id -> child

    def submit(self, now: float, count: int = 1) -> None:
        for _ in range(count):
            self.s.submit(Job(self.next_id, WD, now), now)
            self.next_id += 1

    def decide(self, now: float) -> list[tuple[int, str]]:
        started = [(d.request_id, d.child_id) for d in self.s.decide(now) if isinstance(d, Start)]
        self.where.update(started)
        return started

    def answer(self, rid: int, now: float) -> None:
        child = self.where.pop(rid)
        assert self.s.finished(rid, now, failed=child in self.fails)

    def answer_all(self, now: float) -> None:
        for rid in sorted(self.where):
            self.answer(rid, now)


def test_errors_in_a_row_while_a_sibling_proves_bench_the_child_and_its_jobs_wait_for_the_sibling():
    d = Driver(two(), fails={"a"})
    now = 0.0
    errors = 0
    while errors < BREAKER_ERRORS:  # one job at a time each: they alternate between a and b
        d.submit(now, 2)
        for _rid, child in d.decide(now):
            errors += child == "a"
        now += 1
        d.answer_all(now)
    assert d.s.streak("a").benched_until == now + BENCH_FIRST
    assert d.s.streak("b").benched_until == -math.inf
    # Benched: four jobs queued, b busy with one at a time, a idle: a takes none of them.
    d.submit(now, 4)
    for _ in range(4):
        assert [c for _, c in d.decide(now)] == ["b"]
        now += 1
        d.answer_all(now)
    assert d.decide(now) == []


def test_a_bench_ends_in_probation_one_job_at_a_time_a_proof_ends_it_an_error_doubles_it():
    d = Driver(two(capacity_a=4), fails={"a"})
    for t in range(BREAKER_ERRORS):  # a fails, b proves meanwhile
        d.submit(float(t), 2)
        d.decide(float(t))
        d.answer_all(t + 0.5)
    benched_at = BREAKER_ERRORS - 0.5
    end = benched_at + BENCH_FIRST
    assert d.s.streak("a").benched_until == end
    d.submit(end - 1, 6)
    assert [c for _, c in d.decide(end - 1)] == ["b"]
    # The policy wakes the book when the bench ends; a takes one job, though it has 4 slots.
    assert d.s.next_wakeup() == end
    assert [c for _, c in d.decide(end)] == ["a"]
    assert d.decide(end + 0.1) == []
    # Its error benches it again at once, for twice as long.
    (rid_a,) = [r for r, c in d.where.items() if c == "a"]
    d.answer(rid_a, end + 1)
    assert d.s.streak("a").benched_until == end + 1 + 2 * BENCH_FIRST
    assert d.decide(end + 1) == []
    # Probation again; this time a proof: a is trusted with all its slots again.
    d.fails.clear()
    probe = end + 1 + 2 * BENCH_FIRST
    (rid_a,) = [r for r, c in d.decide(probe) if c == "a"]
    d.answer(rid_a, probe + 1)
    assert d.s.streak("a").benched_until == -math.inf
    assert sorted(c for _, c in d.decide(probe + 1)) == ["a", "a", "a"]  # what is left queued


def test_a_sibling_proof_benches_a_child_past_its_errors_and_benches_double_to_the_longest():
    s = two(breaker=ChildBreaker(errors=1, first=10.0, longest=35.0))
    for rid in (1, 2):
        s.submit(Job(rid, WD, 0.0), 0.0)
    assert sorted(d.child_id for d in s.decide(0.0) if isinstance(d, Start)) == ["a", "b"]
    s.finished(1, 1.0, failed=True)  # a fails before b ever proved: the task may be at fault
    assert s.streak("a").benched_until == -math.inf
    assert s.breaker.news == []
    s.finished(2, 2.0, failed=False)  # b proves: a, past its errors, is benched now
    assert s.breaker.news == ["a"]
    assert s.streak("a").benched_until == 12.0
    s.submit(Job(3, WD, 2.0), 2.0)  # b busy from now on
    assert [d.child_id for d in s.decide(2.0) if isinstance(d, Start)] == ["b"]
    now, lengths = 12.0, [10.0]
    for rid in range(4, 7):
        s.submit(Job(rid, WD, now), now)
        assert [d.child_id for d in s.decide(now) if isinstance(d, Start)] == ["a"]  # probation
        now += 1
        s.finished(rid, now, failed=True)
        lengths.append(s.streak("a").benched_until - now)
        now = s.streak("a").benched_until
    assert lengths == [10.0, 20.0, 35.0, 35.0]
    assert s.breaker.news == ["a"] * 4
    assert BENCH_FIRST < BENCH_MAX


def test_errors_that_every_child_makes_bench_nobody():
    # The tasks are at fault (a miner's sector files gone), not a child: no sibling proves.
    d = Driver(two(), fails={"a", "b"})
    for t in range(3 * BREAKER_ERRORS):
        d.submit(float(t), 2)
        assert sorted(c for _, c in d.decide(float(t))) == ["a", "b"]
        d.answer_all(t + 0.5)
    assert d.s.streak("a").benched_until == d.s.streak("b").benched_until == -math.inf


def test_a_benched_child_serves_when_no_sibling_can():
    d = Driver(two(), fails={"a"})
    for t in range(BREAKER_ERRORS):
        d.submit(float(t), 2)
        d.decide(float(t))
        d.answer_all(t + 0.5)
    assert d.s.streak("a").benched_until > BREAKER_ERRORS
    d.s.child_down("b", 10.0)  # restarting: jobs wait for it rather than go to a failing child
    d.submit(10.0)
    assert d.decide(10.0) == []
    d.s.child_fatal("b", 11.0)  # it will not come back: a proof that may fail beats none
    assert [c for _, c in d.decide(11.0)] == ["a"]


def test_a_fresh_process_ends_the_bench_and_its_first_answer_decides():
    d = Driver(two(capacity_a=2), fails={"a"})
    for t in range(BREAKER_ERRORS):
        d.submit(float(t), 2)
        d.decide(float(t))
        d.answer_all(t + 0.5)
    d.s.child_down("a", 5.0)
    d.s.child_ready("a", 6.0)  # started again (a restart may clear a GPU error)
    d.submit(6.0, 3)
    assert sorted(c for _, c in d.decide(6.0)) == ["a", "b"]  # on probation: one job on a


def test_answers_without_an_outcome_count_for_nothing():
    s = two()
    for rid in range(1, 3):
        s.submit(Job(rid, WD, 0.0), 0.0)
    s.decide(0.0)
    s.finished(2, 0.5, failed=False)
    for i in range(2 * BREAKER_ERRORS):
        s.finished(1, 1.0 + i)  # e.g. the answer to a Cancel; and not running after the first
    assert s.streak("a").errors == 0
