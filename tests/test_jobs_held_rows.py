"""When a coordinator warns of a job whose heartbeats are passed over, its row held by another
session (jobs/held_rows.py), sans-IO: heartbeats in with the time, the holds to warn of out."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
from test_jobs_rules import running

from damocles_ext.jobs import rules
from damocles_ext.jobs.held_rows import NAMED, HeldRows, HeldTooLong, said_of
from damocles_ext.jobs.model import FINISHED, JobRecord

T0 = 1_700_000_000.0
TIMEOUT = 15.0  # damocles' HeartbeatTimeout: warned from 7.5 s


def job(seed: int = 1, worker: str = "w1", lease: str = "L1") -> JobRecord:
    """A running job of `worker`, its last heartbeat stored at T0."""
    return running(T0, worker=worker, lease=lease, seed=seed)


def skip(held: HeldRows, at: float, *jobs: JobRecord, worker: str = "w1", effects=(),
         leases=None) -> list[str]:  # fmt: skip
    """A heartbeat of `worker` at T0 + `at` that passed over `jobs`: the ids warned of, said."""
    warn = held.heard(worker, jobs, [j.Id for j in jobs], effects, T0 + at, at, TIMEOUT, leases)
    held.said(warn)
    return [w.job_id for w in warn]


def test_a_hold_is_warned_of_at_a_later_skip_once_half_the_timeout_passed_then_not_again():
    held, j = HeldRows(), job()
    assert skip(held, 3, j) == []  # first seen
    assert skip(held, 6, j) == []  # 6 s < 7.5 s
    assert skip(held, 9, j) == [j.Id]
    assert [skip(held, at, j) for at in (12, 15, 18)] == [[], [], []]  # once per hold


def test_a_first_skip_says_nothing_however_old_the_last_heartbeat():
    # A worker cut off for 16 s whose first heartbeat back races our own sweep taking the job
    # back: a row held for milliseconds, which must not be warned of.
    held, j = HeldRows(), job()
    warn = held.heard("w1", [j], [j.Id], [], T0 + 16, 16, TIMEOUT)
    assert warn == []
    [again] = held.heard("w1", [j], [j.Id], [], T0 + 19, 19, TIMEOUT)
    assert again == HeldTooLong(j.Id, "L1", "w1", 19.0, 0.0, TIMEOUT)


@pytest.mark.parametrize(
    "effect",
    [
        rules.HeartbeatAccepted("J"),
        rules.Refused("J", "Heartbeat", "not yours"),
        rules.NotFound("J", "Heartbeat"),
    ],
    ids=["accepted", "refused", "unknown"],
)
def test_a_landed_refused_or_unknown_heartbeat_ends_the_hold_and_a_new_one_is_warned_again(
    effect,
):
    held, j = HeldRows(), job()
    assert [skip(held, at, j) for at in (3, 9)] == [[], [j.Id]]
    ended = dataclasses.replace(effect, job_id=j.Id)
    assert held.heard("w1", [], [], [ended], T0 + 10, 10, TIMEOUT) == []
    assert len(held) == 0
    assert [skip(held, at, j) for at in (12, 15)] == [[], [j.Id]]


def test_two_skips_far_apart_are_two_holds_not_one_long_one():
    # A skip at 3 s (our own sweep passing), no heartbeat of the job's worker until 18 s (it was
    # cut off), and its first one back passed over as our sweep takes the job back: before, it
    # was warned of, held for 15 s, and the holder named was that sweep.
    held, j = HeldRows(), job()
    assert skip(held, 3, j) == []
    assert skip(held, 18, j) == []  # first seen again
    assert skip(held, 21, j) == [j.Id]
    assert skip(held, 24, j) == []


def test_a_hold_of_a_worker_with_heartbeats_over_half_the_timeout_apart_is_warned_of():
    # A worker's --heartbeat-interval of 10 s (allowed; warned of over 5 s): each skip came over
    # half the HeartbeatTimeout after the one before, so each was first seen again, and none
    # of its holds was ever warned of.
    held, j = HeldRows(), job()
    assert held.heard("w1", [j], [], [rules.HeartbeatAccepted(j.Id)], T0, 0, TIMEOUT) == []
    assert skip(held, 10, j) == []  # first seen
    assert skip(held, 20, j) == [j.Id]  # 10 s later: its interval, the same hold
    # A worker of 3 s cut off for 15 s is not one: its next skip is first seen again.
    k = job(seed=2, worker="w2")
    assert held.heard("w2", [k], [], [rules.HeartbeatAccepted(k.Id)], T0, 0, TIMEOUT) == []
    assert skip(held, 3, k, worker="w2") == []
    assert skip(held, 18, k, worker="w2") == []  # first seen again
    assert skip(held, 21, k, worker="w2") == [k.Id]


def test_a_call_right_after_a_heartbeat_is_not_taken_for_the_workers_interval():
    # The worker's one-job-at-a-time fallback (after its batch heartbeat failed) calls again at
    # once, as does another worker of the same name: measured as an interval, those calls made
    # a 10 s worker's every skip a hold first seen again, never warned of.
    held, j = HeldRows(), job()
    assert held.heard("w1", [j], [], [rules.HeartbeatAccepted(j.Id)], T0, 0, TIMEOUT) == []
    warned = {}
    for at in (10, 20, 30):
        warned[at] = skip(held, at, j)
        warned[at + 0.01] = skip(held, at + 0.01, j)  # the same beat, job by job
    # At the second beat: the call job by job right after the first is no second sighting.
    assert warned == {10: [], 10.01: [], 20: [j.Id], 20.01: [], 30: [], 30.01: []}


def test_a_hold_of_a_minute_is_warned_of_once():
    held, j = HeldRows(), job()
    assert [w for at in range(3, 63, 3) for w in skip(held, at, j)] == [j.Id]


def test_a_hold_not_seen_for_a_heartbeat_timeout_is_forgotten():
    # Its worker stopped sending heartbeats while it was held: the hold is not kept for ever.
    # Another job's skips keep the holds looked at (a skip of the same job would be first seen
    # again whether or not the old hold was forgotten).
    held, j, other = HeldRows(), job(seed=1), job(seed=2)
    assert skip(held, 3, j) == []
    assert skip(held, 3 + TIMEOUT, other) == []
    assert len(held) == 2  # j's last seen a HeartbeatTimeout ago: kept
    assert skip(held, 3 + TIMEOUT + 4, other) == [other.Id]
    assert len(held) == 1  # j's last seen over a HeartbeatTimeout ago: forgotten


def test_another_workers_job_a_finished_one_and_an_old_lease_are_not_warned_of():
    held = HeldRows()
    theirs = job(seed=1, worker="w2")
    done = msgspec.structs.replace(job(seed=2), State=FINISHED)
    mine = job(seed=3)
    for at in (3, 9, 12):
        assert skip(held, at, theirs, done) == []
        # Dext's heartbeat with a lease that is no longer the job's: refused once freed.
        assert skip(held, at, mine, leases={mine.Id: "L0"}) == []
    assert [skip(held, at, mine, leases={mine.Id: "L1"}) for at in (15, 18)] == [[], [mine.Id]]


def test_several_jobs_held_at_once_are_warned_of_together():
    held = HeldRows()
    jobs = [job(seed=n) for n in range(5)]
    assert skip(held, 3, *jobs) == []
    assert skip(held, 9, *jobs) == sorted(j.Id for j in jobs)


def test_a_job_given_to_another_worker_and_held_again_is_a_new_hold():
    # w1 was warned; the job was reset and given to w2 (a new lease), and held again before any
    # heartbeat of w2's landed: before, that hold was never warned of (keyed by job id alone).
    held, j = HeldRows(), job()
    assert [skip(held, at, j) for at in (3, 9)] == [[], [j.Id]]
    again = running(T0 + 10, worker="w2", lease="L2", seed=1)
    assert again.Id == j.Id
    assert skip(held, 13, again, worker="w2") == []
    assert skip(held, 18, again, worker="w2") == [j.Id]


def test_a_warning_not_said_is_handed_again_and_one_handed_out_is_not_handed_twice():
    held, j = HeldRows(), job()
    held.heard("w1", [j], [j.Id], [], T0 + 3, 3, TIMEOUT)
    [warn] = held.heard("w1", [j], [j.Id], [], T0 + 9, 9, TIMEOUT)
    assert held.heard("w1", [j], [j.Id], [], T0 + 12, 12, TIMEOUT) == []  # handed out already
    held.not_said([warn])  # the look for its holder failed, or the queue was full
    [warn] = held.heard("w1", [j], [j.Id], [], T0 + 15, 15, TIMEOUT)
    held.ended([warn])  # the row was found free by then: that hold is over
    assert held.heard("w1", [j], [j.Id], [], T0 + 18, 18, TIMEOUT) == []  # first seen again
    assert [w.job_id for w in held.heard("w1", [j], [j.Id], [], T0 + 21, 21, TIMEOUT)] == [j.Id]


def test_the_holds_kept_are_bounded_and_those_kept_are_warned_of():
    # Before, a new hold over the bound evicted the oldest first seen: with more jobs held than
    # the bound, no hold lived to its warning, and a long one warned of was forgotten, then
    # warned of again.
    held = HeldRows(max_holds=3)
    first, later = [job(seed=n) for n in range(3)], [job(seed=n) for n in range(3, 5)]
    assert skip(held, 3, *first) == []
    assert skip(held, 6, *first, *later) == []
    assert len(held) == 3
    assert skip(held, 9, *first, *later) == sorted(j.Id for j in first)
    assert skip(held, 12, *first, *later) == []  # said once; the others wait for room
    ended = [rules.HeartbeatAccepted(first[0].Id)]
    assert held.heard("w1", [], [], ended, T0 + 13, 13, TIMEOUT) == []
    assert skip(held, 15, *later) == []
    assert len(skip(held, 18, *later)) == 1  # there was room for one


def test_the_warning_rounds_the_time_left_up_and_says_at_the_earliest():
    # Before: "in 0 s" for 0.3 s left, and a take-back time that the coordinator's allowance
    # for its own outages may make later was said as exact.
    held = HeldTooLong("J", "L1", "w1", 14.7, 0.3, TIMEOUT)
    said = said_of([held], "The holder is pid 7")
    assert "its last stored heartbeat is 15 s old" in said
    assert "may take the job back from its worker in 1 s at the earliest" in said
    assert "but may be once it is freed, unless a heartbeat lands first" in said
    # Due now: said once, where the bracket said again that it "may be once it is freed".
    now = dataclasses.replace(held, taken_back_in=0.0)
    said = said_of([now], "The holder is pid 7")
    assert "as soon as its row is freed, at the earliest (HeartbeatTimeout 15 s; unless a" in said
    assert "once it is freed" not in said


def test_the_warning_names_no_kind_of_holder_but_the_advices():
    # It said "(a SELECT ... FOR UPDATE or an UPDATE left inside its transaction)" whoever held
    # the row, also when the advice said it was a damocles-ext session, not to be terminated.
    held = HeldTooLong("J", "L1", "w1", 9.0, 6.0, TIMEOUT)
    said = said_of([held], "The holder is a damocles-ext session")
    assert "FOR UPDATE" not in said and "left inside" not in said


def test_a_warning_of_many_jobs_names_a_few_and_counts_the_others():
    held = [HeldTooLong(f"J{n:02}", "L1", "w1", 9.0, 6.0, TIMEOUT) for n in range(NAMED + 3)]
    said = said_of(held, "The holder is pid 7")
    assert said.startswith(f"{NAMED + 3} jobs of worker 'w1': their heartbeats are not stored")
    assert f"J{NAMED - 1:02} (" in said and f"J{NAMED:02}" not in said
    assert "; and 3 more (" in said and said.endswith("Said once for these holds")


def test_holds_are_timed_on_the_monotonic_clock_a_step_back_of_the_wall_clock_holds_up_nothing():
    # Before, first seen, last seen and the forgetting of old holds were on the wall clock: set
    # back an hour, a hold not seen since was kept (and its expiry not looked for) for an hour,
    # and a hold seen 3 s before was first seen again (3 609 s since it was seen on that clock).
    held, j, other = HeldRows(), job(seed=1), job(seed=2)
    assert held.heard("w1", [j], [j.Id], [], T0 + 3, 3, TIMEOUT) == []
    back = T0 - 3600  # the wall clock set back an hour; the monotonic goes on
    at = 3 + TIMEOUT + 1
    assert held.heard("w1", [other], [other.Id], [], back + at, at, TIMEOUT) == []
    assert len(held) == 1  # j's hold, last seen over a HeartbeatTimeout ago, is forgotten
    [warn] = held.heard("w1", [other], [other.Id], [], T0 + 9, at + 3, TIMEOUT)
    assert warn.job_id == other.Id  # seen 3 s before on the monotonic clock: warned of
