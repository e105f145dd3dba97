"""A request a child answered with an error runs again on another child (Job.avoid): what it
waits for, what goes on behind it, and what its answer says. The request book and the policy,
sans-IO: events in, effects out, time passed in by hand."""

from __future__ import annotations

from helpers.child import window_task, winning_task

from damocles_ext.lifecycle import (
    ChildLimits,
    Kill,
    Note,
    RequestBook,
    Resolve,
    Retry,
    Send,
    SendCancel,
)
from damocles_ext.scheduling.policy import ChildSlots, Job, Scheduler, Start
from damocles_ext.tasks import (
    WindowPoStOutput,
    WindowPoStVanillaOutput,
    WinningPoStOutput,
    split_window_post,
)

OK = WindowPoStOutput(proofs=[b"p"], faults=[])
WD = "window_post"


def ready_book(*names: str, stage: str = WD, max_attempts: int = 2) -> RequestBook:
    """A book whose children `names` (pids 100, 101 ...) of `stage` are ready at 0."""
    book = RequestBook()
    for name in names:
        book.add_child(name, stage, limits=ChildLimits(max_attempts=max_attempts))
    for i, name in enumerate(names):
        book.child_ready(name, 0.0, protocol="dext", pid=100 + i)
    return book


def two_children() -> RequestBook:
    return ready_book("a", "b")


def bench_b(book: RequestBook) -> float:
    """b fails everything, a proves everything, until the breaker benches b; the time then."""
    now, rid, pending = 0.0, 0, []
    while not book.scheduler.breaker.benches:
        rid += 1
        _, out = book.submit(rid, window_task(), now)
        pending += out
        while pending:
            e = pending.pop(0)
            if isinstance(e, Send):
                now += 1
                if e.child == "b":
                    pending += book.answered("b", e.child_rid, now, error="CUDA error 999")
                else:
                    pending += book.answered("a", e.child_rid, now, output=OK)
    assert book.sizes()["requests"] == 0
    return now


def test_an_error_while_the_only_other_child_is_benched_is_the_answer_and_work_goes_on():
    # Waiting for a benched child (then sent to it, broken) would stall the stage for the bench.
    book = two_children()
    now = bench_b(book) + 1
    _, (send,) = book.submit(100, window_task(), now)
    assert send.child == "a"
    (res,) = book.answered("a", send.child_rid, now + 1, error="CUDA error: out of memory")
    assert isinstance(res, Resolve) and "out of memory" in res.error
    r, out = book.submit(101, window_task(), now + 2)
    assert out == [Send(r, "a", send.child_rid + 1)]


def test_retries_after_an_error_and_a_child_lost_are_counted_by_stage():
    # What damocles_ext_request_retries_total reads (Supervisor.statistics): a request queued
    # again after a failed attempt, once per retry.
    book = ready_book("a", "b", max_attempts=3)
    assert book.retried == {}
    _, [sent] = book.submit(1, window_task(), 0.0)
    assert isinstance(sent, Send)
    out = book.answered(sent.child, sent.child_rid, 1.0, error="CUDA error 999")
    [retry, again] = [e for e in out if isinstance(e, (Retry, Send))]
    assert isinstance(retry, Retry) and retry.request is sent.request
    assert isinstance(again, Send) and again.child != sent.child
    assert book.retried == {WD: 1}
    out = book.child_lost(again.child, 2.0, "killed by SIGKILL")
    assert any(isinstance(e, Retry) for e in out)
    assert book.retried == {WD: 2}


def test_a_job_due_sooner_than_a_waiting_retry_starts_on_the_child_the_retry_avoids():
    got = {}
    for incremental in (False, True):
        s = Scheduler(incremental=incremental)
        for cid in ("a", "b"):
            s.add_child(ChildSlots(cid, WD))
            s.child_ready(cid, 0.0)
        s.submit(Job(1, WD, 0.0), 0.0)
        s.submit(Job(2, WD, 0.0), 0.0)
        assert s.decide(0.0) == [Start(1, "a"), Start(2, "b")]
        s.finished(1, 1.0, failed=True)
        s.requeue(Job(3, WD, 0.0, avoid=frozenset({"a"})), 1.0)  # waits for b
        assert s.decide(1.0) == []
        s.submit(Job(4, WD, 2.0, deadline=60.0), 2.0)  # ahead of the retry: deadline first
        got[incremental] = s.decide(2.0)
    assert got[False] == got[True] == [Start(4, "a")]


def test_a_request_with_a_deadline_behind_a_waiting_retry_starts_on_the_idle_child():
    book = two_children()
    _, (s1,) = book.submit(1, window_task(), 0.0)
    _, (s2,) = book.submit(2, window_task(), 0.0)
    assert (s1.child, s2.child) == ("a", "b")
    book.answered("a", 1, 1.0, error="CUDA error: out of memory")  # waits for b
    _, out = book.submit(3, window_task(), 2.0, deadline=10.0)
    assert [e.child for e in out if isinstance(e, Send)] == ["a"]


def test_with_the_only_sibling_stopped_for_good_an_error_is_the_answer():
    # AutoRestart = false: the sibling is done (the scheduler's FATAL); no retry on the child
    # that just failed the request.
    book = two_children()
    book.child_down("b", 0.5)
    book.child_lost("b", 0.5, "exited 1")
    book.child_gave_up("b", 0.5, fatal=False, last_exit="exited 1")
    _, (send,) = book.submit(1, window_task(), 1.0)
    assert send.child == "a"
    (res,) = book.answered("a", send.child_rid, 2.0, error="bad")
    assert res.error == "request 1 (window_post) failed on a (pid 100): bad"


def test_a_retry_still_queued_at_shutdown_says_what_its_first_attempt_said():
    book = two_children()
    book.submit(1, window_task(), 0.0)
    book.submit(2, window_task(), 0.0)
    book.answered("a", 1, 1.0, error="CUDA error: out of memory")  # waits for b
    (res,) = [e for e in book.shutdown(2.0) if isinstance(e, Resolve)]
    assert res.error == (
        "request 1 (window_post): still queued when the supervisor began to shut down; it was"
        " not sent again; 1 attempt made (attempt 1 on a: CUDA error: out of memory)"
    )


def test_a_retry_whose_deadline_passes_in_the_queue_says_it_was_not_sent_again():
    book = two_children()
    book.submit(1, window_task(), 0.0, deadline=5.0)
    book.submit(2, window_task(), 0.0)
    book.answered("a", 1, 1.0, error="CUDA error: out of memory")  # waits for b
    (res,) = [e for e in book.advance(6.0) if isinstance(e, Resolve)]
    assert res.outcome == "timeout"
    assert "it was not sent again; 1 attempt made (attempt 1 on a: CUDA error" in res.error
    assert "not sent to a prover" not in res.error


def gpus_shared_with_a_lower_stage(retried: str, incremental: bool) -> Scheduler:
    """Children w1 (lock g0) and w2 (g1) of stage `retried`, and p1 (g0, 2 slots) and p2 (g1)
    of a stage served after it, all ready."""
    lower = "window_post_vanilla"  # served after window_post and winning_post
    s = Scheduler(incremental=incremental)
    for cid, stage, lock, cap in (
        ("w1", retried, "g0", 1),
        ("w2", retried, "g1", 1),
        ("p1", lower, "g0", 2),
        ("p2", lower, "g1", 1),
    ):
        s.add_child(ChildSlots(cid, stage, capacity=cap, locks=frozenset({lock})))
        s.child_ready(cid, 0.0)
    return s


def _gpus_shared_with_a_lower_stage(retried: str, incremental: bool) -> Scheduler:
    """gpus_shared_with_a_lower_stage, where w1 took job 1 and p2 job 2 (holding g1), then w1
    failed job 1, which is queued again as job 3, avoiding w1."""
    lower = "window_post_vanilla"
    s = gpus_shared_with_a_lower_stage(retried, incremental)
    s.submit(Job(1, retried, 0.0), 0.0)
    assert s.decide(0.0) == [Start(1, "w1")]
    s.submit(Job(2, lower, 0.0), 0.0)
    assert s.decide(0.0) == [Start(2, "p2")]  # g0 is w1's: p2 holds g1, w2 waits for it
    s.finished(1, 1.0, failed=True)
    s.requeue(Job(3, retried, 0.0, avoid=frozenset({"w1"})), 1.0)
    s.submit(Job(4, lower, 1.0), 1.0)
    return s


def test_a_waiting_retry_reserves_no_lock_of_the_child_it_avoids():
    # A WindowPoSt retry that avoids w1 waits for w2 (lock g1): w1's lock g0 is not kept from
    # the child of the lower stage that shares it.
    for incremental in (True, False):
        s = _gpus_shared_with_a_lower_stage(WD, incremental)
        assert s.decide(1.0) == [Start(4, "p1")]
        s.submit(Job(5, "window_post_vanilla", 2.0), 2.0)
        assert s.decide(2.0) == [Start(5, "p1")]
        assert s.statistics().waiting_for_lock == {WD: ("g1",)}


def test_a_winning_post_retry_no_other_child_can_start_now_goes_back_to_the_one_it_avoids():
    # Its block has about 20 s: waiting for w2, whose GPU another stage holds for minutes, would
    # miss it, while w1 (whose error may well have been passing) sits idle.
    for incremental in (True, False):
        s = _gpus_shared_with_a_lower_stage("winning_post", incremental)
        assert s.decide(1.0) == [Start(3, "w1")]  # job 4 waits: g0 is w1's now
        s.finished(3, 2.0)
        assert s.decide(2.0) == [Start(4, "p1")]


def test_a_winning_post_retry_goes_to_a_child_it_does_not_avoid_when_one_can_start_now():
    for incremental in (True, False):
        s = Scheduler(incremental=incremental)
        for cid in ("w1", "w2"):
            s.add_child(ChildSlots(cid, "winning_post", 1))
            s.child_ready(cid, 0.0)
        s.requeue(Job(1, "winning_post", 0.0, avoid=frozenset({"w1"})), 0.0)
        assert s.decide(0.0) == [Start(1, "w2")]


def test_a_winning_post_retry_no_child_can_start_reserves_the_locks_of_those_it_avoids_too():
    # It may go to any of them: p1, which holds w1's lock g0, takes no more work meanwhile.
    lower = "window_post_vanilla"
    for incremental in (True, False):
        s = gpus_shared_with_a_lower_stage("winning_post", incremental)
        s.submit(Job(1, "winning_post", 0.0), 0.0)
        s.submit(Job(2, lower, 0.0), 0.0)
        assert s.decide(0.0) == [Start(1, "w1"), Start(2, "p2")]  # p2 holds g1
        s.finished(1, 1.0, failed=True)
        s.submit(Job(5, lower, 1.0), 1.0)
        assert s.decide(1.0) == [Start(5, "p1")]  # p1 holds g0
        s.requeue(Job(3, "winning_post", 0.0, avoid=frozenset({"w1"})), 1.5)
        s.submit(Job(4, lower, 1.5), 1.5)
        assert s.decide(1.5) == []  # not job 4 on p1: g0 is kept for the retry
        assert s.statistics().waiting_for_lock == {"winning_post": ("g0", "g1")}
        s.finished(5, 2.0)
        assert s.decide(2.0) == [Start(3, "w1")]


def test_a_winning_post_that_failed_twice_on_a_child_reserves_none_of_its_locks():
    # Job.back False: it waits for w2 as any retry waits and will not go to w1, so p1, which
    # holds w1's lock g0, goes on taking work (it stood idle until w2 took the WinningPoSt).
    lower = "window_post_vanilla"
    for incremental in (True, False):
        s = gpus_shared_with_a_lower_stage("winning_post", incremental)
        s.submit(Job(1, lower, 0.0), 0.0)
        s.submit(Job(2, lower, 0.0), 0.0)
        assert s.decide(0.0) == [Start(1, "p1"), Start(2, "p2")]  # p1 holds g0, p2 g1
        s.requeue(Job(3, "winning_post", 0.0, avoid=frozenset({"w1"}), back=False), 1.0)
        s.submit(Job(4, lower, 1.0), 1.0)
        assert s.decide(1.0) == [Start(4, "p1")], incremental
        assert s.statistics().waiting_for_lock == {"winning_post": ("g1",)}
        s.finished(2, 2.0)
        assert s.decide(2.0) == [Start(3, "w2")]


def _retry_behind_a_start_that_fills_the_only_child(incremental: bool) -> list:
    lower = "window_post_vanilla"  # served after window_post
    s = Scheduler(incremental=incremental)
    s.add_child(ChildSlots("c", WD, 1))  # no lock
    s.add_child(ChildSlots("d", WD, 1, 1, frozenset({"L"})))
    s.add_child(ChildSlots("e", lower, 2, 1, frozenset({"L"})))
    for cid in ("c", "d", "e"):
        s.child_ready(cid, 0.0)
    s.submit(Job(1, lower, 0.0), 0.0)
    assert s.decide(0.0) == [Start(1, "e")]  # e holds L
    s.submit(Job(2, WD, 1.0, deadline=100.0), 1.0)  # to c (d waits for L)
    s.requeue(Job(3, WD, 1.0, avoid=frozenset({"d"})), 1.0)  # d failed it
    s.submit(Job(4, lower, 1.0), 1.0)
    return s.decide(1.0)


def test_a_retry_behind_a_start_that_filled_the_only_child_reserves_only_its_own_locks():
    # The start fills c; the retry, which avoids d, reserves nothing of d's (L): e takes job 4,
    # in the incremental decisions as in the full recomputation.
    expected = [Start(2, "c"), Start(4, "e")]
    assert _retry_behind_a_start_that_fills_the_only_child(True) == expected
    assert _retry_behind_a_start_that_fills_the_only_child(False) == expected


def test_a_fresh_job_with_avoid_waits_for_a_child_it_does_not_avoid():
    s = Scheduler()
    s.add_child(ChildSlots("a", WD, 1))
    s.add_child(ChildSlots("b", WD, 1))
    s.child_ready("a", 0.0)  # b restarting: not ready, not FATAL
    s.submit(Job(1, WD, 0.0, avoid=frozenset({"a"})), 0.0)
    assert s.decide(0.0) == []
    s.child_ready("b", 1.0)
    assert s.decide(1.0) == [Start(1, "b")]


def test_an_error_once_the_shutdown_began_is_the_answer_said_once():
    book = two_children()
    book.submit(1, window_task(), 0.0)  # on a
    book.shutdown(0.5)
    (res,) = [e for e in book.answered("a", 1, 1.0, error="bad") if isinstance(e, Resolve)]
    assert res.error == "request 1 (window_post) failed on a (pid 100): bad"


def test_errors_read_after_their_child_began_to_go_down_count_for_the_breaker():
    # A prover that answers an error and exits: its exit may be seen before its answer is read
    # (the scheduler forgot the job with its child); the error still counts.
    book = two_children()
    now, pid = 0.0, 200
    notes: list[str] = []
    for rid in (1, 2, 3):
        _, out = book.submit(rid, window_task(), now)
        (send,) = [e for e in out if isinstance(e, Send)]
        if send.child == "b":  # a's turn next: b proves one, a takes the one after
            book.answered("b", send.child_rid, now + 0.5, output=OK)
            _, out = book.submit(rid + 10, window_task(), now + 0.5)
            (send,) = [e for e in out if isinstance(e, Send)]
        assert send.child == "a"
        book.child_down("a", now + 1)  # its exit seen first...
        out = book.answered("a", send.child_rid, now + 1, error="CUDA error 999")  # ...then this
        notes += [e.message for e in out if isinstance(e, Note)]
        for e in out:  # its retry, on b, proves
            if isinstance(e, Send):
                book.answered("b", e.child_rid, now + 2, output=OK)
        book.child_lost("a", now + 2, "exited 1")
        pid += 1
        book.child_ready("a", now + 3, protocol="dext", pid=pid)
        now += 4
    streak = book.scheduler.breaker.streak("a")
    assert (streak.errors, streak.benches) == (3, 1)  # benched (its restart ended that one)
    # The warning says so: a first bench of a child going down lasts until it is back.
    (note,) = [n for n in notes if "requests with an error" in n]
    assert "takes no request until its next process is ready while another" in note, note


def test_vanilla_proofs_judged_after_their_child_restarted_bench_its_new_process_no_longer():
    # A vanilla child's third refused proofs, judged once a new process of it is ready: in the
    # order they were made, that first bench ended at the new process's hello.
    vanilla = "window_post_vanilla"
    book = RequestBook()
    for i, name in enumerate(("a", "b")):
        book.add_child(name, vanilla, limits=ChildLimits(max_attempts=1))
        book.child_ready(name, 0.0, protocol="dext", pid=100 + i)
    made = WindowPoStVanillaOutput(vanilla_proofs=[b"v"], faults=[])
    by_child: dict[str, list] = {"a": [], "b": []}
    now, rid = 0.0, 0
    while len(by_child["a"]) < 3:
        rid += 1
        req, out = book.submit(rid, split_window_post(window_task()), now)
        req.judged_later = True
        (send,) = [e for e in out if isinstance(e, Send)]
        now += 1
        book.answered(send.child, send.child_rid, now, output=made)
        by_child[send.child].append(req)
    for req in by_child["a"][:2]:
        book.judge_vanilla(req, True, now)
    for req in by_child["b"]:
        book.judge_vanilla(req, False, now)
    book.child_lost("a", now, "exited 1")
    book.child_ready("a", now + 1, protocol="dext", pid=200)
    out = book.judge_vanilla(by_child["a"][2], True, now + 2)
    breaker = book.scheduler.breaker
    assert breaker.streak("a").errors == 3
    assert not breaker.leaves_out("a", now + 2)
    assert not [e for e in out if isinstance(e, Note) and "takes no request for" in e.message]


def test_a_winning_post_goes_back_to_a_child_that_failed_it_once_not_after_a_second_error():
    # MaxAttempts 3; w1 fails it at once each time (its GPU broken a while), w2's GPU is held by
    # a WindowPoSt: the second attempt goes back to w1 at once, the third waits for w2.
    book = RequestBook()
    lower = "window_post_vanilla"  # another stage, sharing w2's GPU lock
    for name, stage, lock in (("w1", "winning_post", "g0"), ("w2", "winning_post", "g1"),
                              ("p", lower, "g1")):  # fmt: skip
        book.add_child(name, stage, locks=frozenset({lock}), limits=ChildLimits(max_attempts=3))
    for i, name in enumerate(("w1", "w2", "p")):
        book.child_ready(name, 0.0, protocol="dext", pid=100 + i)
    _, out = book.submit(1, split_window_post(window_task()), 0.0)
    hold = [e for e in out if isinstance(e, Send)]
    assert [s.child for s in hold] == ["p"]  # g1 held
    _, out = book.submit(2, winning_task(), 1.0)
    sends = [e for e in out if isinstance(e, Send)]
    for attempt in (1, 2):
        assert [s.child for s in sends] == ["w1"], attempt
        out = book.answered("w1", sends[0].child_rid, 1.0 + attempt, error="CUDA error 999")
        sends = [e for e in out if isinstance(e, Send)]
    assert sends == []  # the third attempt waits for w2
    out = book.answered("p", hold[0].child_rid, 5.0, output=WindowPoStVanillaOutput([b"v"], []))
    assert [e.child for e in out if isinstance(e, Send)] == ["w2"]


def test_a_winning_posts_try_back_on_the_child_that_failed_it_keeps_its_last_attempt_for_another():
    # MaxAttempts 2 (the default): its second attempt went back to w1 at once (w2's GPU held by
    # a WindowPoSt) and failed there too: the answer, a lost block, though w2 was free soon
    # after. The try back is not counted: the last attempt waits for w2.
    book = RequestBook()
    for name, stage, lock in (("w1", WIN, "g0"), ("w2", WIN, "g1"), ("p", "window_post", "g1")):
        book.add_child(name, stage, locks=frozenset({lock}), limits=ChildLimits(max_attempts=2))
    for i, name in enumerate(("w1", "w2", "p")):
        book.child_ready(name, 0.0, protocol="dext", pid=100 + i)
    _, (hold,) = book.submit(1, window_task(), 0.0)  # holds g1
    req, (send,) = book.submit(2, winning_task(), 1.0, deadline=21.0)
    retries = []
    for at in (2.0, 3.0):
        assert send.child == "w1"
        out = book.answered("w1", send.child_rid, at, error="CUDA error 999")
        retries += [(r.attempt, r.max_attempts) for r in out if isinstance(r, Retry)]
        sends = [e for e in out if isinstance(e, Send)]
        send = sends[0] if sends else None
    assert send is None and retries == [(2, 2), (3, 3)]  # it waits for w2
    out = book.answered("p", hold.child_rid, 12.0, output=OK)
    (send,) = [e for e in out if isinstance(e, Send) and e.child == "w2"]
    assert book.answered("w2", send.child_rid, 13.0, output=WIN_OK)[-1] == Resolve(req, WIN_OK, None, "ok")  # fmt: skip


def test_a_winning_posts_free_try_back_that_times_out_is_the_only_free_one():
    # A timeout or a lost child does not end its going back (only a second error does): each
    # try back was free, so a child that timed out each time had it back for ever.
    book = RequestBook()
    book.add_child("w", WIN, limits=ChildLimits(max_attempts=2, request_timeout=5.0))
    book.child_ready("w", 0.0, protocol="dext", pid=100)
    req, (send,) = book.submit(1, winning_task(), 0.0)
    out = book.answered("w", send.child_rid, 1.0, error=OOM)  # tried again, on w: free
    now, pid = 1.0, 100
    while not any(isinstance(e, Resolve) for e in out):
        assert now < 300, "it goes back for ever"
        now += 6.0  # past RequestTimeoutSecs, then past the Cancel's grace: killed
        out = book.advance(now)
        if any(isinstance(e, Kill) for e in out):  # the driver reaps it and starts another
            pid += 1
            out += book.child_lost("w", now, "killed") + book.child_ready(
                "w", now, protocol="dext", pid=pid
            )
    (resolve,) = [e for e in out if isinstance(e, Resolve)]
    assert resolve.request is req and "3 attempts made" in (resolve.error or ""), resolve.error


def test_a_winning_posts_try_back_that_times_out_keeps_its_last_attempt_for_the_sibling():
    # Only a second error ended its going back: once its free try back on w1 timed out, the
    # last attempt went to w1 again as soon as w1 answered the Cancel, and failed there.
    book = RequestBook()
    timed = ChildLimits(max_attempts=2, request_timeout=3.0)
    for name, stage, lock in (("w1", WIN, "g0"), ("w2", WIN, "g1"), ("p", WD, "g1")):
        limits = timed if stage == WIN else ChildLimits(max_attempts=2)
        book.add_child(name, stage, locks=frozenset({lock}), limits=limits)
    for i, name in enumerate(("w1", "w2", "p")):
        book.child_ready(name, 0.0, protocol="dext", pid=100 + i)
    _, (hold,) = book.submit(1, window_task(), 0.0)  # holds g1
    req, (send,) = book.submit(2, winning_task(), 1.0, deadline=21.0)
    out = book.answered("w1", send.child_rid, 2.0, error="CUDA error 999")
    (back,) = [e for e in out if isinstance(e, Send)]
    assert back.child == "w1"  # its free try back
    out = book.advance(5.5)  # timed out: Cancel sent
    out += book.answered("w1", back.child_rid, 5.6, error="cancelled")  # it obeyed
    assert [e for e in out if isinstance(e, Send)] == []  # the last attempt waits for w2
    out = book.answered("p", hold.child_rid, 9.0, output=OK)
    (last,) = [e for e in out if isinstance(e, Send) and e.child == "w2"]
    assert Resolve(req, WIN_OK, None, "ok") in book.answered("w2", last.child_rid, 10.0, output=WIN_OK)  # fmt: skip


def test_a_request_whose_deadline_cuts_its_retry_says_what_its_first_attempt_said():
    # Its answer named only the child the deadline cut: an operator read a hung GPU there and
    # never learnt that the other had refused the request.
    book = two_children()
    req, (send,) = book.submit(1, window_task(), 0.0, deadline=10.0)
    first = send.child
    out = book.answered(first, send.child_rid, 1.0, error="RuntimeError: bad proofs")
    (retry,) = [e for e in out if isinstance(e, Send)]
    assert retry.child != first
    (resolve,) = [e for e in book.advance(10.0) if isinstance(e, Resolve)]
    assert resolve.request is req and resolve.error is not None
    assert resolve.error.endswith(
        f"cancelled (attempt 2; before it: attempt 1 on {first}: RuntimeError: bad proofs)"
    ), resolve.error


def test_a_winning_post_failed_by_every_child_is_answered_with_each_attempt():
    book = RequestBook()
    for name, lock in (("w1", "g0"), ("w2", "g1")):
        book.add_child(name, WIN, locks=frozenset({lock}), limits=ChildLimits(max_attempts=2))
    for i, name in enumerate(("w1", "w2")):
        book.child_ready(name, 0.0, protocol="dext", pid=100 + i)
    _, (send,) = book.submit(1, winning_task(), 0.0, deadline=20.0)
    out = book.answered("w1", send.child_rid, 1.0, error="bad")
    (send,) = [e for e in out if isinstance(e, Send)]
    assert send.child == "w2"  # free: no going back
    out = book.answered("w2", send.child_rid, 2.0, error="bad too")
    (resolve,) = [e for e in out if isinstance(e, Resolve)]
    assert resolve.error is not None and "2 attempts made" in resolve.error, resolve.error


# -- a WinningPoSt with no second opinion to ask runs again where it failed, once ----------------

WIN = "winning_post"
WIN_OK = WinningPoStOutput(proofs=[b"p"])
OOM = "CUDA error: out of memory"
AGAIN = (
    "no other winning_post child can give a second opinion, and {:.1f}s after it arrived"
    " another try may still make its block (about 20 s): it runs again, once"
)


def lone_child(stage: str = WIN, max_attempts: int = 2) -> RequestBook:
    """One child, w (pid 100), of `stage`: most operators run one [[WinPost]] child."""
    return ready_book("w", stage=stage, max_attempts=max_attempts)


def test_a_winning_post_error_on_a_lone_child_runs_again_on_it_and_may_prove():
    # Its block is lost without a proof, and a passing error (a WindowPoSt on the GPU held its
    # memory) is often gone at the next try.
    book = lone_child()
    req, (send,) = book.submit(1, winning_task(), 10.0)
    out = book.answered("w", send.child_rid, 12.5, error=OOM)
    what = f"failed on w (pid 100): {OOM}; " + AGAIN.format(2.5)
    assert out == [Retry(req, what, 2, 2, child="w", pid=100), Send(req, "w", 2)]
    assert book.answered("w", 2, 15.0, output=WIN_OK) == [Resolve(req, WIN_OK, None, "ok")]


def test_a_second_error_on_the_lone_child_is_the_answer_and_tells_both():
    # Once per request: MaxAttempts 3 leaves an attempt, but a child failing it twice in a few
    # seconds is not passing (and a broken GPU fails at once: it would use every attempt).
    book = lone_child(max_attempts=3)
    req, _ = book.submit(1, winning_task(), 0.0)
    book.answered("w", 1, 1.0, error=OOM)
    (res,) = book.answered("w", 2, 2.0, error="CUDA error 999")
    assert res == Resolve(
        req,
        None,
        "request 1 (winning_post): failed on w (pid 100): CUDA error 999; 2 attempts made"
        f" (attempt 1 on w: {OOM})",
        "error",
    )
    assert book.sizes()["requests"] == 0


def test_a_winning_post_error_while_another_one_waits_is_the_answer_and_that_one_goes_next():
    # The retry would go ahead of it (retries come first) and could cost it its own block.
    book = lone_child()
    first, (send,) = book.submit(1, winning_task(), 0.0)
    second, none_yet = book.submit(2, winning_task(), 0.5)
    assert none_yet == []  # Concurrent = 1: it waits
    out = book.answered("w", send.child_rid, 10.0, error=OOM)
    assert out == [
        Resolve(first, None, f"request 1 (winning_post) failed on w (pid 100): {OOM}", "error"),
        Send(second, "w", 2),
    ]


def test_a_window_post_error_on_a_lone_child_is_the_answer_as_before():
    # damocles-manager gives up the batch on an error; no block is lost in seconds.
    book = lone_child(WD, max_attempts=3)
    req, _ = book.submit(1, window_task(), 0.0)
    (res,) = book.answered("w", 1, 1.0, error=OOM)
    assert res == Resolve(
        req, None, f"request 1 (window_post) failed on w (pid 100): {OOM}", "error"
    )


def test_a_winning_post_error_with_a_sibling_to_ask_takes_the_second_opinion_only():
    book = RequestBook()
    for i, name in enumerate(("w1", "w2")):
        book.add_child(name, WIN, limits=ChildLimits(max_attempts=2))
        book.child_ready(name, 0.0, protocol="dext", pid=100 + i)
    req, (send,) = book.submit(1, winning_task(), 0.0)
    assert send.child == "w1"
    out = book.answered("w1", 1, 1.0, error=OOM)
    assert out == [Retry(req, f"failed on w1 (pid 100): {OOM}", 2, 2, child="w1", pid=100),
                   Send(req, "w2", 1)]  # fmt: skip
    (res,) = book.answered("w2", 1, 2.0, error="bad")  # MaxAttempts spent: the answer
    assert res.error == (
        f"request 1 (winning_post): failed on w2 (pid 101): bad; 2 attempts made (attempt 1 on"
        f" w1: {OOM})"
    )


def _lone_error(book: RequestBook, at: float, deadline: float | None = None) -> list:
    book.submit(1, winning_task(), 0.0, deadline=deadline)
    return book.answered("w", 1, at, error=OOM)


def test_a_winning_post_error_too_late_for_its_block_is_the_answer():
    # 14 s after it arrived a healthy proof (2-6 s) could no longer make its block's ~20 s.
    assert [type(e) for e in _lone_error(lone_child(), 13.9)] == [Retry, Send]
    (res,) = _lone_error(lone_child(), 14.0)
    assert res.error == f"request 1 (winning_post) failed on w (pid 100): {OOM}"


def test_a_winning_post_error_past_its_deadline_or_at_shutdown_or_with_one_attempt_is_the_answer():
    # An error read at its deadline: the deadline answered it first, and nothing runs again.
    out = _lone_error(lone_child(), 2.0, deadline=2.0)
    assert [type(e) for e in out] == [Resolve, SendCancel] and out[0].outcome == "timeout"
    book = lone_child()
    book.submit(1, winning_task(), 0.0)
    book.shutdown(0.5)
    (res,) = [e for e in book.answered("w", 1, 1.0, error=OOM) if isinstance(e, Resolve)]
    assert res.error == f"request 1 (winning_post) failed on w (pid 100): {OOM}"
    (res,) = _lone_error(lone_child(max_attempts=1), 1.0)
    assert res.error == f"request 1 (winning_post) failed on w (pid 100): {OOM}"


def test_a_winning_post_run_again_on_the_child_its_error_benched_benches_it_once():
    # w1 erred twice while w2 proved for the same miner; w2 then stopped for good. w1's third
    # error benches it, and with no sibling left the request runs again there (a proof that
    # may fail beats none): its second error counts, but benches w1 no longer or again.
    book = RequestBook()
    for i, name in enumerate(("w1", "w2")):
        book.add_child(name, WIN, limits=ChildLimits(max_attempts=2))
        book.child_ready(name, 0.0, protocol="dext", pid=100 + i)
    breaker = book.scheduler.breaker
    now, rid = 0.0, 0
    while breaker.streak("w1").errors < 2:
        rid += 1
        _, pending = book.submit(rid, winning_task(), now)
        while pending:
            e = pending.pop(0)
            if isinstance(e, Send):
                now += 1
                if e.child == "w1":
                    pending += book.answered("w1", e.child_rid, now, error=OOM)
                else:
                    pending += book.answered("w2", e.child_rid, now, output=WIN_OK)
    assert not breaker.benches
    book.child_down("w2", now)
    book.child_lost("w2", now, "exited 1")
    book.child_gave_up("w2", now, fatal=False, last_exit="exited 1")
    _, (send,) = book.submit(100, winning_task(), now)
    assert send.child == "w1"
    out = book.answered("w1", send.child_rid, now + 1, error=OOM)
    notes = [e for e in out if isinstance(e, Note)]
    assert len(notes) == 1 and "takes no request for 30s" in notes[0].message
    (send,) = [e for e in out if isinstance(e, Send)]
    assert send.child == "w1"
    out = book.answered("w1", send.child_rid, now + 2, error="CUDA error 999")
    assert [type(e) for e in out] == [Resolve]
    assert "CUDA error 999; 2 attempts made (attempt 1 on w1: CUDA error: out of" in out[0].error
    streak = breaker.streak("w1")
    assert (streak.errors, streak.benches, streak.benched_until) == (4, 1, now + 1 + 30.0)
