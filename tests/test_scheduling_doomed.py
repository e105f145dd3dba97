"""Doomed starts (scheduling/doomed.py): a job that even the fastest recent proofs could not
finish before its deadline is answered at once instead of started. Sans-IO: the clock is the
`now` each call is given."""

from __future__ import annotations

import math

from helpers.child import window_task

from damocles_ext.lifecycle import ChildLimits, RequestBook, Resolve, Send
from damocles_ext.scheduling.policy import ChildSlots, Fail, Job, Scheduler, Start
from damocles_ext.scheduling.sim_engine import run_workload
from damocles_ext.scheduling.sim_scenario import WINDOW_POST, Scenario, generate
from damocles_ext.tasks import WindowPoStOutput

WD, WIN = "window_post", "winning_post"
OK = WindowPoStOutput(proofs=[b"p"], faults=[])
KIND = "StackedDrgWindow32GiBV1_1"


def job(rid: int, stage: str, arrival: float, *, deadline: float | None = None, size: int = 1,
        kind: str = KIND) -> Job:  # fmt: skip
    """A whole WindowPoSt's job: `size` replicas of proof type `kind`."""
    return Job(rid, stage, arrival, deadline=deadline, size=size, kind=kind)


def make(*names: str, stage: str = WD, **options) -> Scheduler:
    s = Scheduler(**options)
    for name in names:
        s.add_child(ChildSlots(name, stage))
        s.child_ready(name, 0.0)
    return s


def prove(s: Scheduler, durations: list[float], *, stage: str = WD, first_id: int = 1000,
          size: int = 1, kind: str = "StackedDrgWindow32GiBV1_1", now: float = 0.0) -> float:  # fmt: skip
    """Run one job per duration on the scheduler's one free child, each answered by a proof after
    its duration; returns the clock after the last."""
    for i, seconds in enumerate(durations):
        s.submit(job(first_id + i, stage, now, size=size, kind=kind), now)
        [start] = s.decide(now)
        assert isinstance(start, Start)
        now += seconds
        s.finished(start.request_id, now, failed=False)
    return now


def test_a_job_is_started_while_fewer_than_four_proofs_are_known():
    s = make("g0")
    now = prove(s, [300.0, 300.0, 300.0])  # three proofs of 300 s: no estimate yet
    s.submit(job(1, WD, now, deadline=now + 10.0), now)
    assert s.decide(now) == [Start(1, "g0")]


def test_one_fast_outlier_makes_the_estimate_optimistic_and_the_job_is_started():
    s = make("g0")
    now = prove(s, [300.0, 300.0, 20.0, 300.0])
    s.submit(job(1, WD, now, deadline=now + 60.0), now)  # 60 s left; 20 s once
    assert s.decide(now) == [Start(1, "g0")]


def test_a_job_its_fastest_recent_proof_could_not_finish_in_time_is_refused_once_and_said_why():
    s = make("g0")
    now = prove(s, [300.0, 320.0, 310.0, 305.0])
    s.submit(job(1, WD, now, deadline=now + 120.0), now)
    s.submit(job(2, WD, now, deadline=now + 900.0), now)
    decisions = s.decide(now)
    assert [type(d) for d in decisions] == [Fail, Start]
    fail = decisions[0]
    assert fail.request_id == 1
    assert "cannot finish before its deadline" in fail.reason
    assert "took at least 300.0s" in fail.reason and "120.0s were left" in fail.reason
    assert "its GPU was kept for requests that can still make their deadline" in fail.reason
    assert fail.reason.endswith("; it was not sent to a prover")
    assert decisions[1] == Start(2, "g0")  # the GPU went to the one that can make it
    s.finished(2, now + 300.0, failed=False)
    assert s.decide(now + 300.0) == []  # answered once: nothing more of request 1
    assert not s.is_queued(1)


def test_a_refusal_says_less_was_left_than_the_run_took_where_both_round_alike():
    s = make("g0")
    now = prove(s, [60.04] * 4)
    s.submit(job(1, WD, now, deadline=now + 60.01), now)
    [fail] = s.decide(now)
    assert isinstance(fail, Fail) and fail.late
    assert "took at least 60.0s" in fail.reason and "less than that was left" in fail.reason


def test_a_retry_that_became_doomed_while_it_waited_is_refused():
    s = make("g0")
    now = prove(s, [300.0] * 4)
    s.submit(job(1, WD, now, deadline=now + 1000.0), now)
    assert s.decide(now) == [Start(1, "g0")]
    now += 800.0  # the child went down with it: 200 s are left when it is queued again
    [lost] = s.child_down("g0", now)
    s.requeue(lost, now)
    s.child_ready("g0", now)
    [fail] = s.decide(now)
    assert isinstance(fail, Fail) and fail.request_id == 1
    assert "200.0s were left" in fail.reason


def test_a_winning_post_is_never_refused_as_doomed():
    s = make("w0", stage=WIN)
    now = prove(s, [30.0] * 4, stage=WIN)
    s.submit(job(1, WIN, now, deadline=now + 5.0), now)
    assert s.decide(now) == [Start(1, "w0")]


def test_a_job_another_child_has_no_estimate_for_or_could_prove_in_time_is_not_refused():
    s = make("slow", "fast")
    now = 0.0
    for i in range(4):  # slow proves in 300 s; fast in 60 s, but its 4th answer is an error
        s.submit(job(100 + 2 * i, WD, now), now)
        s.submit(job(101 + 2 * i, WD, now), now)
        for d in s.decide(now):
            fast = d.child_id == "fast"
            s.finished(d.request_id, now + (60.0 if fast else 300.0), failed=fast and i == 3)
        now += 300.0
    s.submit(job(1, WD, now, deadline=now + 200.0), now)  # doomed on slow; fast: no estimate
    s.submit(job(2, WD, now, deadline=now + 200.0), now)
    assert s.decide(now) == [Start(1, "fast")]  # not slow: too little data never dooms fast
    assert s.is_queued(2)  # ... which it waits for
    s.finished(1, now + 60.0, failed=False)  # fast has 4 proofs of 60 s now: 140 s are left
    assert s.decide(now + 60.0) == [Start(2, "fast")]
    s.finished(2, now + 120.0, failed=False)
    now += 300.0
    s.submit(job(3, WD, now, deadline=now + 100.0), now)
    assert s.decide(now) == [Start(3, "fast")]


def mixed(*, runs: int = 4, **options) -> tuple[Scheduler, float]:
    """A slow GPU (its last `runs` proofs took 300 s) and a fast one (60 s), both idle."""
    s = make("slow", "fast", **options)
    now = 0.0
    for i in range(runs):
        s.submit(job(100 + 2 * i, WD, now), now)
        s.submit(job(101 + 2 * i, WD, now), now)
        for d in s.decide(now):
            s.finished(d.request_id, now + (60.0 if d.child_id == "fast" else 300.0), failed=False)
        now += 300.0
    return s, now


def busy(s: Scheduler, child_id: str, now: float) -> int:
    """Keep `child_id` busy with a job of no deadline; its request id."""
    s.submit(job(50, WD, now), now)
    s.submit(job(51, WD, now), now)
    starts = s.decide(now)
    [mine] = [d.request_id for d in starts if d.child_id == child_id]
    [other] = [d.request_id for d in starts if d.child_id != child_id]
    s.remove(other)
    assert s.decide(now) == []
    return mine


def test_a_job_doomed_on_the_only_idle_child_waits_for_a_faster_busy_one_and_starts_there():
    s, now = mixed()
    running = busy(s, "fast", now)
    s.submit(job(1, WD, now, deadline=now + 200.0), now)  # slow: 300 s; fast: 60 s
    assert s.decide(now) == []  # not on slow, where it could not make it
    assert s.is_queued(1) and s.running_on("slow") == []
    s.finished(running, now + 30.0, failed=False)
    assert s.decide(now + 30.0) == [Start(1, "fast")]


def test_a_job_doomed_on_one_of_two_idle_children_starts_on_the_other():
    s, now = mixed()
    s.submit(job(1, WD, now, deadline=now + 200.0), now)
    s.submit(job(2, WD, now, deadline=now + 200.0), now)
    s.submit(job(3, WD, now, deadline=now + 1000.0), now)
    # Whatever the round robin: 2 waits for fast, and slow takes 3, behind it.
    assert s.decide(now) == [Start(1, "fast"), Start(3, "slow")]
    assert s.is_queued(2)


def test_the_child_a_job_is_held_back_from_takes_the_jobs_behind_it():
    s, now = mixed()
    busy(s, "fast", now)
    s.submit(job(1, WD, now, deadline=now + 200.0), now)
    assert s.decide(now) == []
    assert s.submit(job(2, WD, now, deadline=now + 1000.0), now)  # a decision to make
    assert s.decide(now) == [Start(2, "slow")]
    assert s.is_queued(1)


def test_a_job_with_time_enough_on_the_slow_child_still_starts_there():
    s, now = mixed()
    busy(s, "fast", now)
    s.submit(job(1, WD, now, deadline=now + 400.0), now)
    assert s.decide(now) == [Start(1, "slow")]


def test_a_job_held_back_is_refused_once_time_dooms_it_on_the_faster_child_too():
    s, now = mixed()
    busy(s, "fast", now)
    s.submit(job(1, WD, now, deadline=now + 200.0), now)
    assert s.decide(now) == []
    when = s.next_wakeup()  # 60 s on fast: from 140 s on, it cannot make it there either
    assert when is not None and math.isclose(when, now + 140.0) and when >= now + 140.0
    [fail] = s.decide(when)
    assert isinstance(fail, Fail) and fail.request_id == 1 and fail.late
    assert "took at least 60.0s" in fail.reason and "on fast" in fail.reason
    assert "59.9s were left" in fail.reason  # (59.99999...: not "60.0s", as long as it took)
    assert not s.is_queued(1)


def test_a_job_held_back_leaves_the_gpu_lock_of_the_child_it_skips_to_lower_stages():
    # slow shares its GPU (lock g1) with x, a child of a lower stage that runs two at a time.
    s = Scheduler()
    s.add_child(ChildSlots("slow", WD, 1, 1, frozenset({"g1"})))
    s.add_child(ChildSlots("fast", WD, 1, 1, frozenset({"g0"})))
    s.add_child(ChildSlots("x", "zz_other", 2, 1, frozenset({"g1"})))
    for cid in ("slow", "fast", "x"):
        s.child_ready(cid, 0.0)
    now = 0.0
    for i in range(4):  # slow's proofs take 300 s, fast's 60 s
        s.submit(job(100 + 2 * i, WD, now), now)
        s.submit(job(101 + 2 * i, WD, now), now)
        for d in s.decide(now):
            s.finished(d.request_id, now + (60.0 if d.child_id == "fast" else 300.0), failed=False)
        now += 300.0
    s.submit(Job(2, "zz_other", now), now)
    assert s.decide(now) == [Start(2, "x")]  # x holds g1: slow is locked out
    s.submit(job(1, WD, now), now)
    assert s.decide(now) == [Start(1, "fast")]
    s.submit(job(3, WD, now, deadline=now + 200.0), now)  # doomed on slow only: waits for fast
    s.submit(Job(4, "zz_other", now), now)
    # 3 will not go to slow while it waits: it keeps no lock of slow's from x's second job.
    assert s.decide(now) == [Start(4, "x")]
    assert s.is_queued(3)
    assert WD not in s.statistics().waiting_for_lock  # (status: it waits for no lock)


def test_no_job_is_held_back_for_a_child_it_avoids_nor_for_too_little_data_nor_when_turned_off():
    s, now = mixed()
    busy(s, "fast", now)
    s.submit(
        Job(1, WD, now, deadline=now + 200.0, size=1, kind=KIND, avoid=frozenset({"fast"})), now
    )
    assert s.decide(now) == [Start(1, "slow")]  # (fast could serve it, so it is not refused)
    s, now = mixed(runs=3)  # slow's 3 proofs of 300 s: no estimate yet
    busy(s, "fast", now)
    s.submit(job(1, WD, now, deadline=now + 200.0), now)
    assert s.decide(now) == [Start(1, "slow")]
    s, now = mixed(refuse_doomed=False)
    busy(s, "fast", now)
    s.submit(job(1, WD, now, deadline=now + 200.0), now)
    assert s.decide(now) == [Start(1, "slow")]


def test_errors_and_cancelled_runs_teach_no_proof_time():
    s = make("g0")
    now = 0.0
    for i in range(4):  # four errors after 1000 s each
        s.submit(job(100 + i, WD, now), now)
        s.decide(now)
        now += 1000.0
        s.finished(100 + i, now, failed=True)
    s.submit(job(1, WD, now, deadline=now + 10.0), now)
    assert s.decide(now) == [Start(1, "g0")]


def test_a_small_job_is_not_judged_by_the_time_bigger_ones_took():
    s = make("g0")
    now = prove(s, [1000.0] * 4, size=10)  # ten replicas took 1000 s each time
    s.submit(job(1, WD, now, deadline=now + 200.0, size=1), now)
    assert s.decide(now) == [Start(1, "g0")]


def test_a_bigger_job_is_judged_by_the_time_smaller_ones_took():
    s = make("g0")
    now = prove(s, [300.0] * 4, size=2)
    s.submit(job(1, WD, now, deadline=now + 120.0, size=10), now)
    [fail] = s.decide(now)
    assert isinstance(fail, Fail)
    assert "a window_post run of 10 replicas or fewer (StackedDrgWindow32GiBV1_1)" in fail.reason


def test_a_job_is_not_judged_by_proofs_of_another_proof_type_nor_when_of_unknown_size():
    s = make("g0")
    now = prove(s, [300.0] * 4, kind="StackedDrgWindow64GiBV1_1")
    s.submit(job(1, WD, now, deadline=now + 120.0), now)  # a 32 GiB one: no estimate
    s.submit(job(2, WD, now, deadline=now + 120.0, kind="StackedDrgWindow64GiBV1_1", size=0), now)
    assert s.decide(now) == [Start(1, "g0")]
    s.finished(1, now + 1.0, failed=False)
    assert s.decide(now + 1.0) == [Start(2, "g0")]  # size unknown (a split step's): started


def _partitions(refuse: bool) -> tuple[int, int]:
    # 4 GPUs of a slow machine (a 470-s SNARK) and 16 partitions per deadline: over capacity.
    scenario = Scenario(partitions=(4, 4, 4, 4), hours=12, seed=3)
    workload = generate(scenario)
    run_workload(scenario, workload, "c", refuse_doomed=refuse)
    wd = [j for j in workload.jobs if j.stage == WINDOW_POST]
    in_time = sum(j.finish is not None and j.finish <= j.due for j in wd)
    return in_time, sum(j.state == "cancelled" for j in wd)


def test_refusing_doomed_starts_proves_more_partitions_in_time_in_an_overloaded_simulation():
    in_time_before, cancelled_before = _partitions(refuse=False)
    in_time, cancelled = _partitions(refuse=True)
    assert cancelled < cancelled_before / 2  # (92 before, 12 with the rule)
    assert in_time > in_time_before  # (292 of 384 before, 332 with the rule)


def test_the_book_answers_a_doomed_retry_once_saying_it_was_not_sent_again():
    book = RequestBook()
    book.add_child("a", WD, limits=ChildLimits(max_attempts=3))
    book.child_ready("a", 0.0, protocol="dext", pid=100)
    now = 0.0
    for rid in range(1, 5):  # four proofs of 300 s each
        book.submit(rid, window_task(), now)
        now += 300.0
        assert [type(e) for e in book.answered("a", rid, now, output=OK)] == [Resolve]
    req, out = book.submit(10, window_task(), now, deadline=now + 1000.0)
    assert [type(e) for e in out] == [Send]
    now += 800.0  # its child is lost with it: 200 s are left when it could run again
    book.child_down("a", now)
    out = book.child_lost("a", now, "exited with status 1")
    out += book.child_ready("a", now, protocol="dext", pid=101)
    [res] = [e for e in out if isinstance(e, Resolve)]
    assert res.request is req and res.outcome == "timeout"  # as one its deadline cut
    assert "cannot finish before its deadline" in res.error
    assert "took at least 300.0s" in res.error and "200.0s were left" in res.error
    assert res.error.count("; it was not sent again") == 1
    assert "not sent to a prover" not in res.error
    assert not [e for e in out if isinstance(e, Send)]
    assert [e for e in book.advance(now + 2000.0) if isinstance(e, Resolve)] == []  # once


def test_a_job_whose_deadline_is_beyond_every_run_known_starts_unjudged(monkeypatch):
    # Most deadlines are far beyond any proof: such a job starts without its estimates being
    # looked at; one within reach of a run known is judged as ever (and refused here).
    import damocles_ext.scheduling.policy as policy

    judged: list[int] = []
    real_judge = policy.judge
    monkeypatch.setattr(
        policy, "judge", lambda job, *a: judged.append(job.request_id) or real_judge(job, *a)
    )
    s, now = mixed()  # slow: 300 s, fast: 60 s
    s.submit(job(1, WD, now, deadline=now + 300.5), now)
    [start] = s.decide(now)
    assert start.request_id == 1 and judged == []
    s.submit(job(2, WD, now, deadline=now + 300.0), now)  # the slow child's run: not beyond
    [start] = s.decide(now)
    assert start.request_id == 2 and judged == [2]


def test_the_longest_run_a_child_remembers_follows_its_runs_as_old_ones_go():
    from damocles_ext.scheduling.children import RUNS_KEPT

    s = make("g0")
    child = s._children["g0"]
    durations = [500.0] + [10.0] * (RUNS_KEPT - 1) + [20.0, 30.0, 5.0]
    for i, seconds in enumerate(durations):
        prove(s, [seconds], first_id=1000 + i)
        assert child.run_max == max(run for _, _, run in child.run_times)
    assert child.run_max == 30.0  # the 500 s run is no longer remembered
