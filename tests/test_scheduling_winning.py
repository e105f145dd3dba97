"""A WinningPoSt's child (scheduling/doomed.py's `in_time`): among the children free to take it,
one whose recent WinningPoSt runs say it can make the deadline, rather than round robin's choice
when that one's recent runs all took the time left or longer. Sans-IO: the clock is the `now`
each call is given."""

from __future__ import annotations

from damocles_ext.scheduling.policy import CancelRunning, ChildSlots, Job, Scheduler, Start

WIN = "winning_post"
KIND = "StackedDrgWinning32GiBV1"


def win(rid: int, now: float, budget: float | None = 20.0, *, kind: str = KIND) -> Job:
    """A WinningPoSt of one replica, due `budget` seconds from `now` (its block's time)."""
    deadline = None if budget is None else now + budget
    return Job(rid, WIN, now, deadline=deadline, size=1, kind=kind)


def make(*names: str, capacity: int = 1) -> Scheduler:
    s = Scheduler()
    for name in names:
        s.add_child(ChildSlots(name, WIN, capacity))
        s.child_ready(name, 0.0)
    return s


def answer_each(s: Scheduler, speed: dict[str, float], now: float, count: int, **job) -> list[str]:
    """`count` WinningPoSts one after another, each answered by a proof after its child's
    `speed`; the children they went to (time goes on as they run, then 10 s more)."""
    went = []
    for i in range(count):
        s.submit(win(9000 + len(went) + i * 100, now, **job), now)
        [start] = s.decide(now)
        assert isinstance(start, Start)
        went.append(start.child_id)
        now += speed[start.child_id]
        s.finished(start.request_id, now, failed=False)
        assert s.decide(now) == []
        now += 10.0
    return went


def learned(speed: dict[str, float]) -> tuple[Scheduler, float]:
    """Two children that each proved a WinningPoSt of no deadline, at their `speed`."""
    s = make(*speed)
    now = 0.0
    for rid in (1, 2):
        s.submit(win(rid, now, None), now)
    for d in s.decide(now):
        s.finished(d.request_id, now + speed[d.child_id], failed=False)
    now += max(speed.values())
    assert s.decide(now) == []
    return s, now


def test_a_winning_post_goes_to_the_idle_child_that_makes_its_deadline_not_to_one_that_took_longer():
    speed = {"slow": 25.0, "fast": 1.0}
    s, now = learned(speed)
    # Both idle at each arrival: round robin would send every other one to the slow child.
    assert answer_each(s, speed, now, 6) == ["fast"] * 6


def test_a_winning_post_cancelled_at_its_deadline_keeps_the_next_ones_off_its_child():
    s = make("slow", "fast")
    s.submit(win(1, 0.0), 0.0)
    assert s.decide(0.0) == [Start(1, "slow")]  # nothing known yet: round robin's choice
    s.submit(win(2, 4.0), 4.0)
    assert s.decide(4.0) == [Start(2, "fast")]
    s.finished(2, 5.0, failed=False)
    [cancel] = s.decide(20.0)  # no answer in 20 s: it ran that long at least
    assert isinstance(cancel, CancelRunning) and cancel.request_id == 1
    s.finished(1, 20.5, failed=True)  # its answer to the cancel: no run's time
    assert s.decide(20.5) == []
    assert answer_each(s, {"slow": 25.0, "fast": 1.0}, 24.0, 6) == ["fast"] * 6


def test_round_robin_still_shares_winning_posts_among_children_that_make_their_deadline():
    speed = {"slow": 8.0, "fast": 1.0}
    s, now = learned(speed)
    assert answer_each(s, speed, now, 4) == ["fast", "slow", "fast", "slow"]
    s, now = learned({"slow": 25.0, "fast": 1.0})  # nor is one of no deadline judged
    assert answer_each(s, speed, now, 4, budget=None) == ["fast", "slow", "fast", "slow"]


def test_a_winning_post_goes_at_once_to_a_slow_child_when_no_other_is_free():
    speed = {"slow": 25.0, "fast": 1.0}
    s, now = learned(speed)
    s.submit(win(10, now), now)
    assert s.decide(now) == [Start(10, "fast")]
    s.submit(win(11, now), now)
    assert s.decide(now) == [Start(11, "slow")]  # a block does not wait for a sibling


def test_a_child_with_no_run_known_is_preferred_to_one_known_too_slow_and_a_known_fit_to_both():
    s = make("slow", "new", "fast")
    for rid in (1, 2, 3):
        s.submit(win(rid, 0.0, None), 0.0)
    went = {d.child_id: d.request_id for d in s.decide(0.0)}  # one each
    s.finished(went["slow"], 25.0, failed=False)
    s.finished(went["fast"], 1.0, failed=False)
    s.remove(went["new"])  # nothing known of it
    now = 100.0
    s.submit(win(3, now, 0.5), now)  # every run known took longer than the time left
    assert [d.child_id for d in s.decide(now)] == ["new"]
    s.submit(win(4, now), now)  # slow and fast free: fast makes it
    assert [d.child_id for d in s.decide(now)] == ["fast"]
    s.submit(win(5, now), now)  # slow alone is free
    assert [d.child_id for d in s.decide(now)] == ["slow"]


def test_when_no_free_child_makes_the_deadline_the_fastest_known_takes_it():
    speed = {"slow": 25.0, "fast": 21.0}
    s, now = learned(speed)
    assert answer_each(s, speed, now, 4) == ["fast"] * 4


def test_runs_of_another_proof_type_say_nothing_of_a_winning_posts_time():
    speed = {"slow": 25.0, "fast": 1.0}
    s, now = learned(speed)
    other = "StackedDrgWinning64GiBV1"
    assert answer_each(s, speed, now, 2, kind=other) == ["fast", "slow"]
