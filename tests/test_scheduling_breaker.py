"""The policy's breaker (scheduling/breaker.py): a child that fails request after request while a
sibling proves is benched, then put on probation. Scripted events, no processes, no clock."""

from __future__ import annotations

import math

from damocles_ext.scheduling.breaker import BENCH_FIRST, BREAKER_ERRORS, ChildBreaker
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
    assert d.s.breaker.streak("a").benched_until == now + BENCH_FIRST
    assert d.s.breaker.streak("b").benched_until == -math.inf
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
    assert d.s.breaker.streak("a").benched_until == end
    d.submit(end - 1, 6)
    assert [c for _, c in d.decide(end - 1)] == ["b"]
    # The policy wakes the book when the bench ends; a takes one job, though it has 4 slots.
    assert d.s.next_wakeup() == end
    assert [c for _, c in d.decide(end)] == ["a"]
    assert d.decide(end + 0.1) == []
    # Its error benches it again at once, for twice as long.
    (rid_a,) = [r for r, c in d.where.items() if c == "a"]
    d.answer(rid_a, end + 1)
    assert d.s.breaker.streak("a").benched_until == end + 1 + 2 * BENCH_FIRST
    assert d.decide(end + 1) == []
    # Probation again; this time a proof: a is trusted with all its slots again.
    d.fails.clear()
    probe = end + 1 + 2 * BENCH_FIRST
    (rid_a,) = [r for r, c in d.decide(probe) if c == "a"]
    d.answer(rid_a, probe + 1)
    assert d.s.breaker.streak("a").benched_until == -math.inf
    assert sorted(c for _, c in d.decide(probe + 1)) == ["a", "a", "a"]  # what is left queued


def test_a_sibling_proof_benches_a_child_past_its_errors_and_benches_double_to_the_longest():
    s = two(breaker=ChildBreaker(errors=1, first=10.0, longest=35.0))
    for rid in (1, 2):
        s.submit(Job(rid, WD, 0.0), 0.0)
    assert sorted(d.child_id for d in s.decide(0.0) if isinstance(d, Start)) == ["a", "b"]
    s.finished(1, 1.0, failed=True)  # a fails before b ever proved: the task may be at fault
    assert s.breaker.streak("a").benched_until == -math.inf
    assert s.breaker.news == []
    s.finished(2, 2.0, failed=False)  # b proves: a, past its errors, is benched now
    assert s.breaker.news == ["a"]
    assert s.breaker.streak("a").benched_until == 12.0
    s.submit(Job(3, WD, 2.0), 2.0)  # b busy from now on
    assert [d.child_id for d in s.decide(2.0) if isinstance(d, Start)] == ["b"]
    now, lengths = 12.0, [10.0]
    for rid in range(4, 7):
        s.submit(Job(rid, WD, now), now)
        assert [d.child_id for d in s.decide(now) if isinstance(d, Start)] == ["a"]  # probation
        now += 1
        s.finished(rid, now, failed=True)
        lengths.append(s.breaker.streak("a").benched_until - now)
        now = s.breaker.streak("a").benched_until
    assert lengths == [10.0, 20.0, 35.0, 35.0]
    assert s.breaker.news == ["a"] * 4


def test_a_child_benched_over_a_thousand_times_in_a_row_stays_benched_for_the_longest():
    # A GPU broken for a week beside a working sibling: an error on probation every 10 min
    # benches it again, over a thousand times; the doubling must stop at the longest bench
    # (2**1024 seconds is no float: the answer that benched it raised, and its request was lost).
    s = two(breaker=ChildBreaker(errors=1, first=1.0, longest=600.0))
    for rid in (1, 2):
        s.submit(Job(rid, WD, 0.0), 0.0)
    assert sorted(d.child_id for d in s.decide(0.0) if isinstance(d, Start)) == ["a", "b"]
    s.finished(1, 1.0, failed=True)
    s.finished(2, 2.0, failed=False)  # b proves: a is benched
    s.submit(Job(3, WD, 2.0), 2.0)  # b busy from now on
    assert [d.child_id for d in s.decide(2.0) if isinstance(d, Start)] == ["b"]
    now = s.breaker.streak("a").benched_until
    for rid in range(4, 1204):
        s.submit(Job(rid, WD, now), now)
        assert [d.child_id for d in s.decide(now) if isinstance(d, Start)] == ["a"]  # probation
        assert s.finished(rid, now, failed=True)
        benches = s.breaker.streak("a").benches
        assert s.breaker.streak("a").benched_until - now == min(600.0, 2.0 ** min(benches - 1, 10))
        now = s.breaker.streak("a").benched_until
    assert s.breaker.streak("a").benches == 1201


def test_errors_that_every_child_makes_bench_nobody():
    # The tasks are at fault (a miner's sector files gone), not a child: no sibling proves.
    d = Driver(two(), fails={"a", "b"})
    for t in range(3 * BREAKER_ERRORS):
        d.submit(float(t), 2)
        assert sorted(c for _, c in d.decide(float(t))) == ["a", "b"]
        d.answer_all(t + 0.5)
    assert (
        d.s.breaker.streak("a").benched_until == d.s.breaker.streak("b").benched_until == -math.inf
    )


def test_a_benched_child_serves_when_no_sibling_can():
    d = Driver(two(), fails={"a"})
    for t in range(BREAKER_ERRORS):
        d.submit(float(t), 2)
        d.decide(float(t))
        d.answer_all(t + 0.5)
    assert d.s.breaker.streak("a").benched_until > BREAKER_ERRORS
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
    assert s.breaker.streak("a").errors == 0


def starts_at(s: Scheduler, now: float) -> list[tuple[int, str]]:
    return [(d.request_id, d.child_id) for d in s.decide(now) if isinstance(d, Start)]


def test_errors_for_a_miner_no_sibling_proved_for_bench_nobody_until_one_does():
    # A bad miner's three partitions come at once while "a" proves a good miner's long task:
    # "b" fails them one after the other. Its sibling's proof for another miner says nothing.
    s = two()
    s.submit(Job(1, WD, 0.0, key=1), 0.0)
    assert starts_at(s, 0.0) == [(1, "a")]
    for rid in (2, 3, 4):
        s.submit(Job(rid, WD, 0.1, key=2), 0.1)
    now = 0.1
    for rid in (2, 3, 4):
        assert starts_at(s, now) == [(rid, "b")]
        now += 0.1
        s.finished(rid, now, failed=True)
    s.finished(1, 5.0, failed=False)
    assert s.breaker.streak("b").benched_until == -math.inf
    assert s.breaker.news == []
    # The same miner proved by "a": the errors were b's after all; it is benched at once.
    s.submit(Job(5, WD, 6.0, key=2), 6.0)
    s.submit(Job(6, WD, 6.0, key=2), 6.0)
    on = {c: r for r, c in starts_at(s, 6.0)}
    assert sorted(on) == ["a", "b"]
    s.finished(on["a"], 7.0, failed=False)
    assert s.breaker.news == ["b"]
    assert s.breaker.streak("b").benched_until == 7.0 + BENCH_FIRST


def test_tasks_every_child_fails_bench_nobody_when_another_miner_proves():
    s = two()
    rid, now = 0, 0.0
    for _ in range(BREAKER_ERRORS):
        for _ in range(2):
            rid += 1
            s.submit(Job(rid, WD, now, key=7), now)
        started = starts_at(s, now)
        assert sorted(c for _, c in started) == ["a", "b"]
        now += 1
        for r, _ in started:
            s.finished(r, now, failed=True)
    rid += 1
    s.submit(Job(rid, WD, now, key=8), now)
    ((r, _),) = starts_at(s, now)
    s.finished(r, now + 1, failed=False)
    assert s.breaker.news == []


def test_a_benched_child_waits_while_a_sibling_on_probation_can_serve():
    s = Scheduler(breaker=ChildBreaker(errors=1, first=10.0))
    for cid in ("a", "b", "c"):
        s.add_child(ChildSlots(cid, WD, 1))
        s.child_ready(cid, 0.0)
    for rid in (1, 2, 3):
        s.submit(Job(rid, WD, 0.0), 0.0)
    assert starts_at(s, 0.0) == [(1, "a"), (2, "b"), (3, "c")]
    s.finished(1, 1.0, failed=True)
    s.finished(3, 2.0, failed=False)  # a benched until 12
    s.submit(Job(4, WD, 2.5), 2.5)
    assert starts_at(s, 2.5) == [(4, "c")]
    s.finished(2, 3.0, failed=True)
    s.finished(4, 5.0, failed=False)  # b benched until 15
    s.child_fatal("c", 12.5)
    # At 13: a on probation (idle), b benched, c FATAL: a takes one, the other waits for it.
    s.submit(Job(5, WD, 13.0), 13.0)
    s.submit(Job(6, WD, 13.0), 13.0)
    assert starts_at(s, 13.0) == [(5, "a")]


def test_a_benched_child_reserves_no_lock_for_the_stage_it_does_not_serve():
    # w1 (gpu:0) is benched and a WinningPoSt waits for w2 (busy): gpu:0 is not kept from p0.
    win = "winning_post"
    s = Scheduler(breaker=ChildBreaker(errors=1))
    s.add_child(ChildSlots("w1", win, 1, 1, frozenset({"gpu:0"})))
    s.add_child(ChildSlots("w2", win, 1, 1, frozenset({"gpu:1"})))
    s.add_child(ChildSlots("p0", WD, 2, 1, frozenset({"gpu:0"})))
    for cid in ("w1", "w2", "p0"):
        s.child_ready(cid, 0.0)
    s.submit(Job(1, win, 0.0), 0.0)
    s.submit(Job(2, win, 0.0), 0.0)
    assert starts_at(s, 0.0) == [(1, "w1"), (2, "w2")]
    s.finished(1, 1.0, failed=True)
    s.finished(2, 2.0, failed=False)  # w1 benched
    s.submit(Job(3, win, 3.0), 3.0)
    assert starts_at(s, 3.0) == [(3, "w2")]
    s.submit(Job(4, WD, 3.0), 3.0)
    assert starts_at(s, 3.0) == [(4, "p0")]
    s.submit(Job(5, win, 4.0), 4.0)  # waits for w2
    s.submit(Job(6, WD, 4.0), 4.0)
    assert starts_at(s, 4.0) == [(6, "p0")]


def test_errors_of_an_old_process_that_benched_nothing_do_not_bench_a_fresh_one():
    s = two()
    s.child_down("b", 0.0)
    for t in (1.0, 2.0, 3.0):
        s.submit(Job(int(t), WD, t), t)
        assert starts_at(s, t) == [(int(t), "a")]
        s.finished(int(t), t + 0.5, failed=True)  # no sibling up: nothing to compare with
    s.child_down("a", 4.0)
    s.child_ready("b", 5.0)
    s.submit(Job(10, WD, 5.0), 5.0)
    assert starts_at(s, 5.0) == [(10, "b")]
    s.child_ready("a", 5.5)  # restarted: a restart may clear a GPU error
    s.finished(10, 6.0, failed=False)
    assert s.breaker.streak("a").benched_until == -math.inf
    assert s.breaker.news == []


def test_a_pipelined_child_takes_a_second_job_in_vanilla_when_its_only_sibling_is_benched():
    # A GPU still in its vanilla phase takes one more job while the queue holds one for every
    # other child that may take work (none left without it): a benched child takes none, so
    # the stage does as a stage of one child would.
    for incremental in (True, False):
        s = Scheduler(incremental=incremental, breaker=ChildBreaker(errors=1))
        for cid in ("a", "b"):
            s.add_child(ChildSlots(cid, WD, 2))
            s.child_ready(cid, 0.0)
        s.submit(Job(1, WD, 0.0), 0.0)
        s.submit(Job(2, WD, 0.0), 0.0)
        assert starts_at(s, 0.0) == [(1, "a"), (2, "b")]
        for rid in (1, 2):  # both report their SNARK: pipelined
            s.progress(rid, "snark", 0, 10, 100.0)
        s.finished(2, 400.0, failed=True)
        s.finished(1, 400.0, failed=False)  # b benched until 430
        assert s.breaker.news == ["b"]
        s.submit(Job(3, WD, 400.0), 400.0)
        s.submit(Job(4, WD, 400.0), 400.0)
        assert starts_at(s, 400.0) == [(3, "a"), (4, "a")]


def test_a_child_that_exits_after_each_error_is_benched_and_its_restarts_do_not_end_a_second_bench():
    # A prover that answers an error and exits, every time: restarted a second later, it took a
    # request at each restart and was never benched (each process had one error, forgotten).
    s = two()
    now, rid = 0.0, 0
    taken_by_a = []
    for _ in range(6):
        for _i in range(2):
            rid += 1
            s.submit(Job(rid, WD, now, key=1), now)
        started = starts_at(s, now)
        taken_by_a.append(sum(c == "a" for _, c in started))
        now += 1
        for r, c in started:
            s.finished(r, now, failed=c == "a")  # b proves the same miner meanwhile
        s.child_down("a", now)  # it exits after its error...
        now += 1
        s.child_ready("a", now)  # ...and is started again
        for r in range(1, rid + 1):
            s.remove(r)  # what waits is served by b; only a's share matters here
    # Three errors (one per process) bench it; its next process is on probation (a restart
    # may clear a GPU error) and its error benches it again, for 60 s: restarts change nothing.
    assert taken_by_a == [1, 1, 1, 1, 0, 0]
    assert s.breaker.streak("a").benches == 2
    assert s.breaker.leaves_out("a", now)


def test_answers_judged_late_count_in_the_order_they_were_made():
    # A split WindowPoSt's vanilla step is judged with its SNARK step: by then its child may
    # have answered more, which the breaker counted first.
    s = two()
    breaker = s.breaker
    a = s._children["a"]
    for t in (1.0, 2.0):  # a: two errors, answered (and counted) at 1 and 2
        breaker.count(a, 7, True, t)
    breaker.count(a, 7, False, 3.0, at=0.5)  # a proof made before them ends no streak
    assert breaker.streak("a").errors == 2
    breaker.count(a, 7, True, 4.0, at=3.5)  # counted, in its place: the third in a row
    assert breaker.streak("a").errors == 3
    breaker.count(a, 7, False, 5.0, at=4.5)  # a proof made after them ends them
    assert breaker.streak("a").errors == 0
    breaker.count(a, 7, True, 6.0, at=4.0)  # an error made before that proof counts for nothing
    assert breaker.streak("a").errors == 0
    breaker.count(a, 7, True, 7.0)
    assert breaker.streak("a").errors == 1


def test_errors_judged_late_bench_their_child_with_a_siblings_proof_made_after_the_first():
    # As a vanilla child's whose proofs both SNARK children refuse: its sibling's proof for the
    # same miner, made after the first of its errors was made, is the evidence at its third.
    s = two()
    breaker = s.breaker
    a, b = s._children["a"], s._children["b"]
    for t in range(BREAKER_ERRORS):
        breaker.count(a, 7, True, 10.0 + t, at=float(t))  # made at t, judged at 10 + t
        if t == 0:
            breaker.count(b, 7, False, 10.5, at=0.5)  # made after a's first error
    last = 10.0 + BREAKER_ERRORS - 1
    assert breaker.streak("a").benched_until == last + BENCH_FIRST


def test_a_proof_judged_while_no_child_errs_outranks_an_error_made_before_it():
    # A vanilla step's proof judged while no child has errors in a row still has its place: an
    # error made before it, judged later (both SNARK children refused those proofs), counts
    # for nothing.
    s = two()
    breaker = s.breaker
    a = s._children["a"]
    breaker.count(a, 7, False, 10.0, at=5.0)
    breaker.count(a, 7, True, 20.0, at=3.0)
    assert breaker.streak("a").errors == 0
    assert not breaker.erring


def test_a_proof_judged_late_ends_the_errors_made_before_it_not_those_after():
    # a: an error, a proof, an error, an error, in that order: never three in a row, though its
    # proof (a vanilla step's) is judged after the second error was counted.
    s = two()
    breaker = s.breaker
    a, b = s._children["a"], s._children["b"]
    breaker.count(a, 7, True, 1.0)
    breaker.count(a, 7, True, 3.0)
    breaker.count(b, 7, False, 3.5)  # the sibling proves for the same miner
    breaker.count(a, 7, False, 3.6, at=2.0)  # made between a's errors
    assert breaker.streak("a").errors == 1
    assert breaker.streak("a").since == 3.0
    breaker.count(a, 7, True, 4.0)
    assert breaker.streak("a").errors == 2
    assert not breaker.leaves_out("a", 4.0)


def test_a_bench_whose_errors_a_proof_judged_late_split_ends():
    # Benched at its third error; then a proof made between its second and third is judged:
    # in the order they were made, only one error follows its last proof.
    s = two()
    breaker = s.breaker
    a, b = s._children["a"], s._children["b"]
    breaker.count(a, 7, True, 1.0)
    breaker.count(b, 7, False, 1.5)
    breaker.count(a, 7, True, 2.0)
    breaker.count(a, 7, True, 3.0)
    assert breaker.leaves_out("a", 3.0)
    breaker.count(a, 7, False, 5.0, at=2.5)
    assert breaker.streak("a").errors == 1
    assert not breaker.leaves_out("a", 5.0)
    assert "a" not in breaker.suspects


def test_a_siblings_proof_made_before_an_unproven_streak_benches_nobody():
    # a erred three times with no sibling proof for the miner since its first error; b's proof
    # judged now (a vanilla step's) was made before them: no evidence. One made after is.
    s = two()
    breaker = s.breaker
    a, b = s._children["a"], s._children["b"]
    for t in (10.0, 11.0, 12.0):
        breaker.count(a, 7, True, t)
    assert "a" in breaker.unproven
    breaker.count(b, 7, False, 20.0, at=5.0)
    assert breaker.streak("a").benches == 0
    assert "a" in breaker.unproven
    breaker.count(b, 7, False, 21.0, at=13.0)
    assert breaker.leaves_out("a", 21.0)


def test_a_proof_finished_while_no_child_errs_outranks_errors_made_before_it_counted_later():
    # A SNARK step's refusal counts only once a sibling proves that step, so it can come after
    # a proof the refusing child made meanwhile, while no child erred: that proof still counts,
    # and the errors made before it do not bench the child.
    s = two()
    b = s._children["b"]
    s.submit(Job(1, WD, 0.0, key=7), 0.0)
    assert [d.child_id for d in s.decide(0.0) if isinstance(d, Start)] == ["a"]
    assert s.finished(1, 5.0, failed=False)  # a proves while nobody errs
    for t in (6.0, 7.0, 8.0):  # a's refusals made at 1, 2, 3, counted as b proves each step
        s.breaker.count_late("a", 7, True, t, at=t - 5.0)
        s.breaker.count(b, 7, False, t)
    assert s.breaker.streak("a").errors == 0
    assert not s.breaker.leaves_out("a", 8.0)
