"""The dispatch policy driven by scripted event sequences: no processes, no clock."""

from __future__ import annotations

import ast
import math
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from damocles_ext.scheduling.policy import (
    CancelRunning,
    ChildSlots,
    Fail,
    Job,
    Scheduler,
    Start,
)

WD, WIN = "window_post", "winning_post"


def make(*children: ChildSlots, ready: bool = True) -> Scheduler:
    s = Scheduler()
    for c in children:
        s.add_child(c)
        if ready:
            s.child_ready(c.child_id, 0.0)
    return s


def child(cid: str, stage: str = WD, capacity: int = 1, weight: int = 1, locks=()) -> ChildSlots:
    return ChildSlots(cid, stage, capacity, weight, frozenset(locks))


def starts(decisions) -> list[tuple[int, str]]:
    return [(d.request_id, d.child_id) for d in decisions if isinstance(d, Start)]


def run_one_at_a_time(s: Scheduler, ids, now: float = 0.0) -> list[int]:
    """Start order on a single capacity-1 child: finish each job as soon as it starts."""
    order = []
    while True:
        started = starts(s.decide(now))
        if not started:
            return order
        assert len(started) == 1
        order.append(started[0][0])
        s.finished(started[0][0], now)


# -- choice of child ----------------------------------------------------------------------------


def test_weights_3_to_1_spread_exactly_300_100_with_smooth_interleaving():
    s = make(child("a", weight=3), child("b", weight=1))
    picks = []
    for i in range(400):
        s.submit(Job(i, WD, arrival=i), i)
        [(rid, cid)] = starts(s.decide(i))
        assert rid == i
        picks.append(cid)
        s.finished(i, i)
    assert picks.count("a") == 300 and picks.count("b") == 100
    # nginx's smooth weighted round robin: a a b a, repeating (never a a a b)
    assert "".join(picks[:12]) == "aaba" * 3


def test_waiting_job_goes_to_the_first_child_that_frees_a_slot():
    s = make(child("a"), child("b"), child("c"))
    for i in range(5):
        s.submit(Job(i, WD, arrival=0), 0)
    assert sorted(cid for _, cid in starts(s.decide(0))) == ["a", "b", "c"]
    running_on_c = s.running_on("c")[0]
    s.finished(running_on_c, 1)
    assert starts(s.decide(1)) == [(3, "c")]
    s.finished(s.running_on("a")[0], 2)
    assert starts(s.decide(2)) == [(4, "a")]


def test_idle_child_is_preferred_over_a_busy_child_with_a_free_slot():
    s = make(child("a", capacity=2, weight=10), child("b", capacity=2, weight=1))
    s.submit(Job(1, WD, 0), 0)
    assert starts(s.decide(0)) == [(1, "a")]
    s.submit(Job(2, WD, 0), 0)
    assert starts(s.decide(0)) == [(2, "b")]  # b is idle, a is already working
    s.submit(Job(3, WD, 0), 0)
    assert starts(s.decide(0))[0][0] == 3


def test_child_is_not_eligible_until_ready_and_not_after_down():
    s = make(child("a"), ready=False)
    s.submit(Job(1, WD, 0), 0)
    assert s.decide(0) == []
    s.child_ready("a", 1)
    assert starts(s.decide(1)) == [(1, "a")]
    assert [j.request_id for j in s.child_down("a", 2)] == [1]
    s.submit(Job(2, WD, 2), 2)
    assert s.decide(2) == []  # a restarting child keeps jobs waiting, it does not fail them


# -- queue order --------------------------------------------------------------------------------


def test_earliest_deadline_first_and_no_deadline_last():
    s = make(child("a"))
    for rid, deadline in [(1, None), (2, 300.0), (3, 100.0), (4, 200.0), (5, None)]:
        s.submit(Job(rid, WD, arrival=0, deadline=deadline), 0)
    assert run_one_at_a_time(s, range(5)) == [3, 4, 2, 1, 5]


def test_higher_priority_first_among_equal_deadlines_then_fifo():
    s = make(child("a"))
    jobs = [(1, 0), (2, 5), (3, 0), (4, 5), (5, -1)]
    for rid, prio in jobs:
        s.submit(Job(rid, WD, arrival=rid, deadline=500.0, priority=prio), rid)
    assert run_one_at_a_time(s, range(5)) == [2, 4, 1, 3, 5]


def test_deadline_beats_priority():
    s = make(child("a"))
    s.submit(Job(1, WD, 0, deadline=900.0, priority=100), 0)
    s.submit(Job(2, WD, 0, deadline=100.0, priority=0), 0)
    assert run_one_at_a_time(s, range(2)) == [2, 1]


def test_retried_jobs_go_to_the_head_of_the_queue_in_their_original_order():
    s = make(child("a", capacity=2), child("b"))
    for i in range(1, 6):
        s.submit(Job(i, WD, arrival=i), i)
    assert sorted(starts(s.decide(5))) == [(1, "a"), (2, "b"), (3, "a")]
    lost = s.child_down("a", 6)
    assert [j.request_id for j in lost] == [1, 3]
    for job in reversed(lost):
        s.requeue(job, 6)
    s.finished(2, 7)
    assert run_one_at_a_time(s, range(4), now=7) == [1, 3, 4, 5]


def test_retry_does_not_overtake_a_job_with_an_earlier_deadline():
    s = make(child("a"))
    s.submit(Job(1, WD, 0, deadline=1000.0), 0)
    assert starts(s.decide(0)) == [(1, "a")]
    s.submit(Job(2, WD, 1, deadline=500.0), 1)
    s.submit(Job(3, WD, 1, deadline=2000.0), 1)
    [job] = s.child_down("a", 2)
    s.requeue(job, 2)
    s.child_ready("a", 3)
    assert run_one_at_a_time(s, range(3), now=3) == [2, 1, 3]


# -- locks and WinningPoSt ----------------------------------------------------------------------


def test_winning_post_overtakes_queued_window_post_on_the_same_lock():
    s = make(child("wd0", WD, locks=["gpu0"]), child("win0", WIN, locks=["gpu0"]))
    for i in range(1, 4):
        s.submit(Job(i, WD, arrival=i), i)
    assert starts(s.decide(3)) == [(1, "wd0")]
    s.submit(Job(100, WIN, arrival=4), 4)
    assert starts(s.decide(4)) == []  # gpu0 is busy with a WindowPoSt: the WinningPoSt waits
    s.finished(1, 5)
    assert starts(s.decide(5)) == [(100, "win0")]
    s.finished(100, 6)
    assert starts(s.decide(6)) == [(2, "wd0")]


def test_waiting_winning_post_keeps_lower_stages_off_its_lock_even_with_free_slots():
    s = make(child("wd0", WD, capacity=2, locks=["gpu0"]), child("win0", WIN, locks=["gpu0"]))
    s.submit(Job(1, WD, 0), 0)
    assert starts(s.decide(0)) == [(1, "wd0")]
    s.submit(Job(100, WIN, 1), 1)
    s.submit(Job(2, WD, 1), 1)
    assert starts(s.decide(1)) == []  # wd0 has a free slot, but taking it would extend gpu0
    assert s.statistics().waiting_for_lock == {WIN: ("gpu0",)}
    s.finished(1, 2)
    assert starts(s.decide(2)) == [(100, "win0")]


def test_winning_post_goes_to_a_gpu_that_is_free_now():
    s = make(
        child("wd0", WD, locks=["gpu0"]),
        child("wd1", WD, locks=["gpu1"]),
        child("win0", WIN, locks=["gpu0"]),
        child("win1", WIN, locks=["gpu1"]),
    )
    s.submit(Job(1, WD, 0), 0)
    assert starts(s.decide(0)) == [(1, "wd0")]
    for rid in (100, 101):
        s.submit(Job(rid, WIN, 1), 1)
        assert starts(s.decide(1)) == [(rid, "win1")]
        s.finished(rid, 1)


def test_two_children_with_one_lock_never_run_at_once():
    s = make(child("a", WD, locks=["L"]), child("b", WD, locks=["L"]))
    for i in range(4):
        s.submit(Job(i, WD, 0), 0)
    for t in range(1, 5):
        started = starts(s.decide(t))
        assert len(started) == 1
        assert sum(len(s.running_on(c)) for c in "ab") == 1
        s.finished(started[0][0], t)


def test_locks_are_shared_across_stages_and_released_on_child_down():
    s = make(child("wd0", WD, locks=["gpu0"]), child("win0", WIN, locks=["gpu0"]))
    s.submit(Job(1, WD, 0), 0)
    s.decide(0)
    assert s.statistics().locks_held == {"gpu0": "wd0"}
    s.submit(Job(2, WIN, 1), 1)
    assert s.decide(1) == []
    s.child_down("wd0", 2)
    assert starts(s.decide(2)) == [(2, "win0")]


# -- deadlines ----------------------------------------------------------------------------------


def test_a_job_whose_deadline_passed_in_its_queue_says_what_it_waited_for():
    # A WinningPoSt and a WindowPoSt behind a WindowPoSt holding the GPU's lock: their answers
    # said only "deadline passed ... before the request could start", not what held them.
    s = make(child("p", WD, capacity=2, locks={"gpu:0"}), child("w", WIN, locks={"gpu:0"}))
    s.add_child(child("gone", WIN))  # never ready
    s.submit(Job(1, WD, 0), 0)
    assert starts(s.decide(0)) == [(1, "p")]
    s.submit(Job(2, WIN, 1, deadline=10.0), 1)
    s.submit(Job(3, WD, 1, deadline=3.0), 1)
    assert starts(s.decide(1)) == []  # the WinningPoSt reserves the lock: the WindowPoSt waits
    [fail] = s.decide(4.0)
    assert fail == Fail(
        3,
        "deadline passed 1.0s ago before the request could start (waiting for: p: its locks kept"
        " for a request ahead of this one); it was not sent to a prover",
    )
    [fail] = s.decide(10.0)
    assert fail == Fail(
        2,
        "deadline passed 0.0s ago before the request could start (waiting for: w: lock gpu:0"
        " held by p; gone: not ready (starting or restarting)); it was not sent to a prover",
    )


def test_queued_job_past_its_deadline_fails_without_reaching_a_prover():
    s = make(child("a"))
    s.submit(Job(1, WD, 0), 0)
    assert starts(s.decide(0)) == [(1, "a")]
    s.submit(Job(2, WD, 0, deadline=50.0), 0)
    assert s.decide(0) == []
    assert s.next_wakeup() == 50.0
    assert s.decide(49.9) == []
    [fail] = s.decide(62.5)
    assert fail == Fail(
        2,
        "deadline passed 12.5s ago before the request could start (waiting for: a: busy (1"
        " running)); it was not sent to a prover",
    )
    s.finished(1, 63)
    assert s.decide(63) == []
    assert s.next_wakeup() is None


def test_running_job_past_its_deadline_is_cancelled_once():
    s = make(child("a"))
    s.submit(Job(1, WD, 0, deadline=100.0), 0)
    assert starts(s.decide(0)) == [(1, "a")]
    assert s.next_wakeup() == 100.0
    [cancel] = s.decide(101.0)
    assert isinstance(cancel, CancelRunning) and (cancel.request_id, cancel.child_id) == (1, "a")
    assert "deadline" in cancel.reason and "a" in cancel.reason
    assert s.next_wakeup() is None
    assert s.decide(200.0) == []
    assert s.running_on("a") == [1]  # the supervisor decides when it is really gone


def test_stage_whose_children_are_all_fatal_fails_queued_and_new_jobs_at_once():
    s = make(child("a"), child("b"))
    s.child_down("a", 0)
    s.child_down("b", 0)
    s.submit(Job(1, WD, 0), 0)
    assert s.decide(0) == []  # restarting children: wait
    s.child_fatal("a", 1)
    assert s.decide(1) == []  # b may still come back
    s.child_fatal("b", 2)
    reason = "no window_post child can serve: all 2 children are FATAL"
    assert s.decide(2) == [Fail(1, reason)]
    s.submit(Job(2, WD, 3), 3)
    assert s.decide(3) == [Fail(2, reason)]
    s.child_ready("b", 4)  # a FATAL child that comes back serves again
    s.submit(Job(3, WD, 4), 4)
    assert starts(s.decide(4)) == [(3, "b")]


def test_stage_without_children_fails_at_once():
    s = make(child("a", WD))
    s.submit(Job(1, WIN, 0), 0)
    assert s.decide(0) == [Fail(1, "no winning_post children are configured")]


def test_removed_jobs_are_not_started_and_running_ones_free_their_slot():
    s = make(child("a"))
    for i in range(3):
        s.submit(Job(i, WD, 0), 0)
    assert starts(s.decide(0)) == [(0, "a")]
    assert s.remove(1) and s.remove(0)
    assert not s.remove(42)
    assert starts(s.decide(1)) == [(2, "a")]


def test_bad_calls_raise_clear_errors():
    s = make(child("a"))
    s.submit(Job(1, WD, 0), 0)
    with pytest.raises(ValueError, match="request 1 is already queued"):
        s.submit(Job(1, WD, 0), 0)
    with pytest.raises(KeyError, match="unknown child 'zz'"):
        s.child_ready("zz", 0)
    with pytest.raises(ValueError, match="already registered"):
        s.add_child(child("a"))
    with pytest.raises(ValueError, match="capacity and weight must be >= 1"):
        s.add_child(child("q", capacity=0))


def test_statistics_report_queues_deadlines_children_and_locks():
    s = make(child("a", locks=["gpu0"]), child("w", WIN))
    s.child_down("w", 0)
    s.submit(Job(1, WD, 0, deadline=70.0), 0)
    s.submit(Job(2, WD, 0, deadline=30.0), 0)
    s.decide(0)
    st_ = s.statistics()
    assert st_.queued == {WD: 1}
    assert st_.nearest_deadline == {WD: 70.0}
    assert st_.running == {"a": 1, "w": 0}
    assert st_.children == {"a": "ready", "w": "down"}
    assert st_.locks_held == {"gpu0": "a"}


def test_scheduling_package_does_no_io():
    forbidden = {"trio", "os", "subprocess", "socket", "time", "threading", "asyncio"}
    pkg = pathlib.Path(__file__).parent.parent / "damocles_ext" / "scheduling"
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            assert not set(names) & forbidden, f"{path.name} imports {names}"


# -- pipelining: children that report their SNARK phase ------------------------------------------


def warm_up(s: Scheduler, now: float, cids, vanilla: float = 100.0, gpu: float = 300.0) -> float:
    """One job per child, all at once: a vanilla phase, a reported SNARK, done. Returns the end."""
    base = 1000 + int(now)
    for i, _ in enumerate(cids):
        s.submit(Job(base + i, WD, now), now)
    assert sorted(cid for _, cid in starts(s.decide(now))) == sorted(cids)
    for i, _ in enumerate(cids):
        assert s.progress(base + i, "snark", 0, 10, now + vanilla)
    for i, _ in enumerate(cids):
        assert s.finished(base + i, now + vanilla + gpu)
    return now + vanilla + gpu


def test_pipelined_child_takes_its_next_job_a_vanilla_phase_before_its_gpu_frees():
    s = make(child("a", capacity=2))
    t = warm_up(s, 0, ["a"])  # vanilla 100 s, GPU 300 s
    s.submit(Job(1, WD, t), t)
    assert starts(s.decide(t)) == [(1, "a")]
    s.progress(1, "snark", 0, 10, t + 100)  # on the GPU; expected to end at t + 400
    s.submit(Job(2, WD, t + 100), t + 100)
    assert s.decide(t + 100) == []  # a free slot, but the GPU is busy for 300 s more
    assert s.next_wakeup() == t + 300  # a vanilla phase (100 s) before the GPU frees
    # Half done after 75 s: it runs faster than the last one; it should end at t + 250.
    s.progress(1, "snark", 5, 10, t + 175)
    assert s.next_wakeup() == t + 150
    s.progress(1, "snark", 5, 10, t + 177)  # a heartbeat repeating the last frame: no news
    assert s.next_wakeup() == t + 150
    assert starts(s.decide(t + 175)) == [(2, "a")]


def test_queued_job_goes_to_the_gpu_that_frees_first_not_the_first_free_slot():
    s = make(child("a", capacity=2), child("b", capacity=2))
    t = warm_up(s, 0, ["a", "b"])
    s.submit(Job(1, WD, t), t)
    s.submit(Job(2, WD, t), t)
    assert len(starts(s.decide(t))) == 2
    [on_a], [on_b] = s.running_on("a"), s.running_on("b")
    s.progress(on_a, "snark", 0, 10, t + 100)
    s.progress(on_b, "snark", 0, 10, t + 100)
    s.progress(on_a, "snark", 4, 10, t + 220)  # a: ends at t + 400
    s.progress(on_b, "snark", 5, 10, t + 220)  # b: ends at t + 340
    s.submit(Job(3, WD, t + 220), t + 220)
    # a is registered first and equally loaded, but b's GPU frees 60 s sooner.
    assert starts(s.decide(t + 300)) == [(3, "b")]


def test_idle_gpu_starts_two_vanilla_phases_only_while_every_child_keeps_work():
    s = make(child("a", capacity=2), child("b", capacity=2))
    t = warm_up(s, 0, ["a", "b"])
    for rid in range(1, 5):
        s.submit(Job(rid, WD, t), t)
    started = starts(s.decide(t))
    # Two idle children take one each; the queue (2 jobs) still covers both children, so one
    # takes a second; the last job waits for whichever GPU frees first.
    assert len(started) == 3 and sorted(c for _, c in started).count("a") in (1, 2)
    assert s.is_queued(4)


def test_a_phase_after_the_snark_frees_the_gpu_for_the_next_job():
    s = make(child("a", capacity=2))
    t = warm_up(s, 0, ["a"])
    s.submit(Job(1, WD, t), t)
    s.decide(t)
    s.progress(1, "snark", 0, 10, t + 100)
    s.submit(Job(2, WD, t + 100), t + 100)
    assert s.decide(t + 110) == []
    s.progress(1, "write_proof", 0, 1, t + 120)  # GPU work over early
    assert starts(s.decide(t + 120)) == [(2, "a")]


def test_child_reporting_only_the_phase_change_is_assumed_as_fast_as_its_fastest_snark():
    s = make(child("a", capacity=2))
    warm_up(s, 0, ["a"], gpu=500)
    t = warm_up(s, 1000, ["a"], gpu=300)
    s.submit(Job(1, WD, t), t)
    s.decide(t)
    s.progress(1, "snark", 0, 0, t + 100)  # no done/total within the phase, ever
    s.submit(Job(2, WD, t + 100), t + 100)
    assert s.decide(t + 100) == []
    assert s.next_wakeup() == t + 300  # GPU since t + 100, shortest SNARK 300 s, vanilla 100 s


def test_children_without_phase_reports_keep_the_plain_slot_rule():
    s = make(child("a", capacity=2))
    s.submit(Job(1, WD, 0), 0)
    assert starts(s.decide(0)) == [(1, "a")]
    assert s.progress(1, "vanilla", 3, 10, 5)  # not a GPU phase: no pipelining
    s.submit(Job(2, WD, 5), 5)
    assert starts(s.decide(5)) == [(2, "a")]
    assert not s.progress(99, "snark", 0, 1, 6)  # unknown request
    s.finished(1, 7)
    assert not s.progress(1, "snark", 0, 1, 8)  # no longer running


def test_gpu_phases_are_configurable():
    s = Scheduler(gpu_phases={"gpu"})
    s.add_child(child("a", capacity=2))
    s.child_ready("a", 0)
    s.submit(Job(1, WD, 0), 0)
    s.decide(0)
    s.progress(1, "gpu", 0, 10, 50)
    s.finished(1, 150)
    s.submit(Job(2, WD, 150), 150)
    s.decide(150)
    s.progress(2, "gpu", 0, 10, 200)
    s.submit(Job(3, WD, 200), 200)
    assert s.decide(200) == []  # pipelined through the "gpu" phase: GPU busy until ~300
    assert s.next_wakeup() == 250


# -- random event sequences ---------------------------------------------------------------------

CHILDREN = [
    child("wd0", WD, capacity=2, weight=2, locks=["gpu0"]),
    child("wd1", WD, capacity=1, weight=1, locks=["gpu1"]),
    child("wd2", WD, capacity=1, weight=3, locks=["gpu1", "disk"]),
    child("win0", WIN, capacity=1, locks=["gpu0"]),
    child("win1", WIN, capacity=1, locks=["gpu1"]),
]
CIDS = [c.child_id for c in CHILDREN]

ops = st.one_of(
    st.tuples(
        st.just("submit"),
        st.sampled_from([WD, WIN]),
        st.one_of(st.none(), st.floats(0, 50)),
        st.integers(-2, 2),
    ),
    st.tuples(st.just("finish"), st.integers(0, 50)),
    st.tuples(st.just("down"), st.sampled_from(CIDS), st.booleans()),
    st.tuples(st.just("ready"), st.sampled_from(CIDS)),
    st.tuples(st.just("fatal"), st.sampled_from(CIDS)),
    st.tuples(st.just("tick"), st.floats(0, 20)),
    st.tuples(st.just("remove"), st.integers(0, 50)),
    st.tuples(
        st.just("progress"),
        st.integers(0, 50),
        st.sampled_from(["vanilla", "snark", "post"]),
        st.integers(0, 10),
    ),
)


class Model:
    """The test's own record of each request, checked against every decision."""

    def __init__(self) -> None:
        self.s = make(*CHILDREN, ready=False)
        self.info = {c.child_id: c for c in CHILDREN}
        self.state: dict[int, str] = {}  # queued / running / done / failed / removed
        self.where: dict[int, str] = {}
        self.jobs: dict[int, Job] = {}
        self.cancelled: set[int] = set()
        self.now = 0.0
        self.next_id = 0

    def apply(self, decisions) -> None:
        started_deadline: dict[str, float] = {}
        for d in decisions:
            if isinstance(d, Start):
                assert self.state[d.request_id] == "queued", d
                job = self.jobs[d.request_id]
                assert self.info[d.child_id].stage == job.stage
                self.state[d.request_id] = "running"
                self.where[d.request_id] = d.child_id
                dl = math.inf if job.deadline is None else job.deadline
                started_deadline[job.stage] = max(started_deadline.get(job.stage, -1), dl)
            elif isinstance(d, Fail):
                assert self.state[d.request_id] == "queued", d
                self.state[d.request_id] = "failed"
            else:
                assert self.state[d.request_id] == "running" and d.request_id not in self.cancelled
                job = self.jobs[d.request_id]
                assert job.deadline is not None and job.deadline <= self.now
                self.cancelled.add(d.request_id)
        self.check(started_deadline)

    def check(self, started_deadline) -> None:
        holders: dict[str, set[str]] = {}
        for cid, info in self.info.items():
            mine = [r for r, s_ in self.state.items() if s_ == "running" and self.where[r] == cid]
            assert sorted(self.s.running_on(cid)) == sorted(mine)
            assert len(mine) <= info.capacity
            if mine:
                for lock in info.locks:
                    holders.setdefault(lock, set()).add(cid)
        assert all(len(h) == 1 for h in holders.values()), holders
        for rid, s_ in self.state.items():
            job = self.jobs[rid]
            if s_ == "queued":
                assert self.s.is_queued(rid)
                dl = math.inf if job.deadline is None else job.deadline
                assert dl >= started_deadline.get(job.stage, -math.inf)  # EDF within a decide
                assert job.deadline is None or job.deadline > self.now  # expired ones failed

    def step(self, op) -> None:
        kind = op[0]
        if kind == "submit":
            rid = self.next_id
            self.next_id += 1
            deadline = None if op[2] is None else self.now + op[2]
            job = Job(rid, op[1], self.now, deadline, op[3])
            self.jobs[rid] = job
            self.state[rid] = "queued"
            self.s.submit(job, self.now)
        elif kind == "finish":
            running = [r for r, s_ in self.state.items() if s_ == "running"]
            if running:
                rid = running[op[1] % len(running)]
                assert self.s.finished(rid, self.now)
                self.state[rid] = "done"
        elif kind in ("down", "fatal"):
            lost = (self.s.child_down if kind == "down" else self.s.child_fatal)(op[1], self.now)
            assert sorted(j.request_id for j in lost) == sorted(
                r for r, s_ in self.state.items() if s_ == "running" and self.where[r] == op[1]
            )
            for job in lost:
                self.cancelled.discard(job.request_id)
                if kind == "down" and op[2]:
                    self.state[job.request_id] = "queued"
                    self.s.requeue(job, self.now)
                else:
                    self.state[job.request_id] = "failed"  # the supervisor answers it
        elif kind == "ready":
            self.s.child_ready(op[1], self.now)
        elif kind == "tick":
            self.now += op[1]
        elif kind == "progress":
            running = [r for r, s_ in self.state.items() if s_ == "running"]
            if running:
                assert self.s.progress(running[op[1] % len(running)], op[2], op[3], 10, self.now)
        elif kind == "remove":
            live = [r for r, s_ in self.state.items() if s_ in ("queued", "running")]
            if live:
                rid = live[op[1] % len(live)]
                assert self.s.remove(rid)
                self.state[rid] = "removed"
        self.apply(self.s.decide(self.now))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=60))
def test_random_event_sequences_keep_every_invariant(sequence):
    m = Model()
    for op in sequence:
        m.step(op)
    # Drain: every child comes back and finishes its work; every request must end exactly once.
    for cid in CIDS:
        m.s.child_ready(cid, m.now)
    m.apply(m.s.decide(m.now))
    for _ in range(len(m.state) + 1):
        for rid, s_ in list(m.state.items()):
            if s_ == "running":
                assert m.s.finished(rid, m.now)
                m.state[rid] = "done"
        m.apply(m.s.decide(m.now))
    assert not [r for r, s_ in m.state.items() if s_ in ("queued", "running")]
    assert m.s.statistics().locks_held == {}
    assert sum(m.s.statistics().queued.values()) == 0
