"""The request book, sans-IO: events in, effects out, no processes, time passed in by hand."""

from __future__ import annotations

import pytest
from helpers.child import window_task
from hypothesis import given, settings
from hypothesis import strategies as st

from damocles_ext.lifecycle import (
    ChildLimits,
    Kill,
    Note,
    ReportProgress,
    RequestBook,
    Resolve,
    Retry,
    Send,
    SendCancel,
    UnknownChild,
)
from damocles_ext.lifecycle.rules import UNREAD_WAIT
from damocles_ext.tasks import WindowPoStOutput, WinningPoStOutput

OK = WindowPoStOutput(proofs=[b"p"], faults=[])


def book_with(*children: tuple[str, ChildLimits], capacity: int = 1) -> RequestBook:
    book = RequestBook()
    for name, limits in children:
        book.add_child(name, "window_post", capacity=capacity, limits=limits)
    return book


def ready(book: RequestBook, *names: str, protocol: str = "dext", now: float = 0.0) -> list:
    out = []
    for i, name in enumerate(names):
        out += book.child_ready(name, now, protocol=protocol, pid=100 + i)
    return out


def kinds(effects) -> list[str]:
    return [type(e).__name__ for e in effects]


def resolved(effects) -> list[Resolve]:
    return [e for e in effects if isinstance(e, Resolve)]


# -- the plain path ------------------------------------------------------------------------------


def test_a_request_goes_to_a_ready_child_and_its_answer_resolves_it():
    book = book_with(("a", ChildLimits()))
    assert ready(book, "a") == []
    req, out = book.submit(1, window_task(), 1.0)
    assert out == [Send(req, "a", 1)]
    out = book.answered("a", 1, 2.0, output=OK)
    assert out == [Resolve(req, OK, None, "ok")]
    assert book.sizes() == dict.fromkeys(["requests", "attempts", "running", "queued", "alarms"], 0)


def test_a_request_waits_for_a_child_and_each_process_numbers_its_requests_from_one():
    book = book_with(("a", ChildLimits()))
    r1, out = book.submit(1, window_task(), 0.0)
    assert out == []  # no child ready: queued
    assert ready(book, "a", now=1.0) == [Send(r1, "a", 1)]
    r2, out = book.submit(2, window_task(), 1.5)
    assert out == []  # capacity 1: queued behind r1
    assert book.answered("a", 1, 2.0, output=OK) == [
        Resolve(r1, OK, None, "ok"),
        Send(r2, "a", 2),
    ]


def test_faults_are_an_outcome_of_their_own_and_a_wrong_stage_is_an_error():
    book = book_with(("a", ChildLimits()))
    ready(book, "a")
    faulty = WindowPoStOutput(proofs=[], faults=[1])  # the task's sectors are 0 and 1
    req, _ = book.submit(1, window_task(), 0.0)
    # The answer holds the faulty sectors' numbers only: a warning names them and where the
    # prover says why (its log lines), before the answer.
    said = "request 1 (window_post): 1 faulty sector, no proof: 1; the log lines of a (pid 100)"
    assert book.answered("a", 1, 1.0, output=faulty) == [
        Note("warning", f"{said} say why", child="a", pid=100, request_id=1, faults=1),
        Resolve(req, faulty, None, "fault"),
    ]
    req, _ = book.submit(2, window_task(), 1.0)
    (res,) = resolved(book.answered("a", 2, 2.0, output=WinningPoStOutput(proofs=[])))
    assert res.error == "request 2 (window_post): a (pid 100) answered with a winning_post output"
    # An output no task of the stage can have: faults for sectors it does not have (damocles-
    # manager would declare them), or nothing at all.
    for rid, output, said in [
        (3, WindowPoStOutput([], [1, 7, 9]), "faults for sectors not in the task: [7, 9]"),
        (4, WindowPoStOutput([], []), "neither proofs nor faults"),
        (5, WindowPoStOutput([b"p", b""], []), "proof 1 of 0 bytes"),
    ]:
        book.submit(rid, window_task(), 3.0)
        (res,) = resolved(book.answered("a", rid, 4.0, output=output))
        assert res.error == f"request {rid} (window_post): a (pid 100) answered with {said}"
    assert book.counters("a") == (1, 4)


def test_an_error_answer_with_no_other_child_is_the_answer():
    book = book_with(("a", ChildLimits(max_attempts=3)))
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    out = book.answered("a", 1, 1.0, error="no such sector")
    assert out == [
        Resolve(req, None, "request 1 (window_post) failed on a (pid 100): no such sector", "error")
    ]
    req, _ = book.submit(2, window_task(), 2.0)
    (empty,) = resolved(book.answered("a", 2, 3.0, error=" "))
    assert empty.error == (
        "request 2 (window_post) failed on a (pid 100): an error without a message (the prover"
        " gave none)"
    )


def test_an_error_answer_runs_again_on_a_child_that_has_not_failed_it():
    # damocles-manager gives up a partition batch on an error: a second GPU gets a chance first.
    book = book_with(("a", ChildLimits(max_attempts=2)), ("b", ChildLimits(max_attempts=2)))
    ready(book, "a", "b")
    req, (send,) = book.submit(1, window_task(), 0.0)
    assert send == Send(req, "a", 1)
    out = book.answered("a", 1, 1.0, error="CUDA error: out of memory")
    assert out == [
        # Where the lost attempt ran, for the retry's record (the request is sent to b).
        Retry(req, "failed on a (pid 100): CUDA error: out of memory", 2, 2, child="a", pid=100),
        Send(req, "b", 1),
    ]
    assert book.answered("b", 1, 2.0, output=OK) == [Resolve(req, OK, None, "ok")]
    # Both fail it: the answer says what each did.
    req, (send,) = book.submit(2, window_task(), 3.0)
    first, other = send.child, "b" if send.child == "a" else "a"
    pid = {"a": 100, "b": 101}
    _retry, send = book.answered(first, send.child_rid, 4.0, error="bad")
    assert send.child == other
    (res,) = resolved(book.answered(other, send.child_rid, 5.0, error="bad too"))
    assert res.error == (
        f"request 2 (window_post): failed on {other} (pid {pid[other]}): bad too; 2 attempts"
        f" made (attempt 1 on {first}: bad)"
    )


def test_a_request_a_child_failed_waits_for_another_child_rather_than_going_back_to_it():
    book = book_with(("a", ChildLimits(max_attempts=2)), ("b", ChildLimits(max_attempts=2)))
    ready(book, "a", "b")
    r1, (send1,) = book.submit(1, window_task(), 0.0)
    r2, (send2,) = book.submit(2, window_task(), 0.0)
    assert {send1.child, send2.child} == {"a", "b"}
    on_a, on_b = (r1, r2) if send1.child == "a" else (r2, r1)
    out = book.answered("a", 1, 1.0, error="bad")
    assert kinds(out) == ["Retry"]  # b is busy: the request waits for it
    r3, out = book.submit(3, window_task(), 1.5)
    assert out == [Send(r3, "a", 2)]  # a fresh one behind it goes on, to a
    out = book.answered("b", 1, 2.0, output=OK)
    assert out == [Resolve(on_b, OK, None, "ok"), Send(on_a, "b", 2)]
    # MaxAttempts = 1: the error is the answer.
    book = book_with(("a", ChildLimits(max_attempts=1)), ("b", ChildLimits(max_attempts=1)))
    ready(book, "a", "b")
    _req, (send,) = book.submit(3, window_task(), 0.0)
    assert kinds(book.answered(send.child, 1, 1.0, error="bad")) == ["Resolve"]


def test_a_child_that_fails_while_its_sibling_proves_is_benched_with_a_warning():
    # A broken GPU: every request it gets fails and runs again on b, which proves it. Its third
    # error in a row benches it; then no request goes to it while b serves.
    book = book_with(("a", ChildLimits(max_attempts=2)), ("b", ChildLimits(max_attempts=2)))
    ready(book, "a", "b")
    now, notes, a_errors, sent = 0.0, [], 0, []
    pending = []
    for rid in range(1, 9):
        _, out = book.submit(rid, window_task(), now)
        pending += out
        while pending:  # answer every Send: a fails, b proves
            effect = pending.pop(0)
            if isinstance(effect, Note):
                notes.append((a_errors, effect))
            if not isinstance(effect, Send):
                continue
            sent.append(effect.child)
            now += 1
            if effect.child == "a":
                a_errors += 1
                pending += book.answered("a", effect.child_rid, now, error="CUDA error 999")
            else:
                pending += book.answered("b", effect.child_rid, now, output=OK)
    ((at, note),) = notes
    assert at == 3 and note.level == "warning"
    assert note.message == (
        "a (pid 100) answered its last 3 requests with an error while another window_post child"
        " proved for the same miner: it takes no request for 30s while another child can serve"
        " them, then one at a time until it makes a proof"
    )
    assert sent.count("a") == 3  # none after its bench
    assert book.sizes()["requests"] == 0  # each answered, by b


def test_second_and_unknown_answers_are_dropped_with_a_note():
    book = book_with(("a", ChildLimits()))
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    book.answered("a", 1, 1.0, output=OK)
    (again,) = book.answered("a", 1, 2.0, output=OK)
    said = "a (pid 100): a second response to its request 1 dropped"
    assert again == Note("warning", said, child="a", pid=100)
    (unknown,) = book.answered("a", 9, 2.0, output=OK)
    assert isinstance(unknown, Note) and "unknown id 9" in unknown.message
    assert "1..1" in unknown.message


def test_answers_read_together_resolve_each_and_fill_the_freed_slots_in_one_dispatch():
    book = book_with(("a", ChildLimits()), capacity=3)
    ready(book, "a")
    reqs = [book.submit(rid, window_task(miner=rid), 0.0)[0] for rid in range(1, 7)]
    batch = [(2, None, "no such sector"), (9, OK, None), (1, OK, None), (2, OK, None)]
    out = book.answers("a", batch, 1.0)
    assert kinds(out) == ["Resolve", "Note", "Resolve", "Note", "Send", "Send"]
    assert [(e.request.rid, e.outcome) for e in resolved(out)] == [(2, "error"), (1, "ok")]
    assert "unknown id 9" in out[1].message and "second response to its request 2" in out[3].message
    assert [(e.request, e.child_rid) for e in out if isinstance(e, Send)] == [
        (reqs[3], 4),
        (reqs[4], 5),
    ]
    assert book.in_flight("a") == 3


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 4),
    n=st.integers(1, 12),
    data=st.data(),
)
def test_answers_read_together_end_as_the_same_answers_one_by_one(capacity, n, data):
    # One child, n requests, answered in batches of what it holds: every request gets the answer
    # it would get one answer at a time, and the child is kept full while work waits.
    together = book_with(("a", ChildLimits()), capacity=capacity)
    alone = book_with(("a", ChildLimits()), capacity=capacity)
    sent: dict[str, list[int]] = {"together": [], "alone": []}
    answers: dict[str, dict[int, tuple]] = {"together": {}, "alone": {}}

    def take(name: str, effects) -> None:
        for e in effects:
            if isinstance(e, Send):
                sent[name].append(e.child_rid)
            elif isinstance(e, Resolve):
                assert e.request.rid not in answers[name], "answered twice"
                answers[name][e.request.rid] = (e.output, e.error)

    for name, book in (("together", together), ("alone", alone)):
        take(name, ready(book, "a"))
        for rid in range(1, n + 1):
            take(name, book.submit(rid, window_task(miner=rid), 0.0)[1])
    good = {rid: data.draw(st.booleans()) for rid in range(1, n + 1)}

    def answer(rid: int) -> tuple:
        return (rid, OK, None) if good[rid] else (rid, None, "no such sector")

    now = 0.0
    while sent["together"]:
        now += 1.0
        batch = data.draw(st.lists(st.sampled_from(sent["together"]), min_size=1, unique=True))
        for rid in batch:
            sent["together"].remove(rid)
        take("together", together.answers("a", [answer(rid) for rid in batch], now))
        for rid in batch:  # (each process numbers the requests it is sent as they came)
            sent["alone"].remove(rid)
            _, output, error = answer(rid)
            take("alone", alone.answered("a", rid, now, output=output, error=error))
        assert sorted(sent["together"]) == sorted(sent["alone"])
        assert together.in_flight("a") == min(capacity, n - len(answers["together"]))
    assert answers["together"] == answers["alone"] and len(answers["alone"]) == n


def test_progress_is_reported_to_the_caller():
    book = book_with(("a", ChildLimits()))
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    out = book.progress("a", 1, 0.5, phase="snark", done=1, total=4)
    assert out == [ReportProgress(req, "snark", 1, 4)]


def test_an_event_about_a_child_never_added_is_a_bug_of_the_caller():
    with pytest.raises(UnknownChild):
        RequestBook().child_ready("ghost", 0.0, protocol="dext", pid=1)


def test_a_request_id_the_book_holds_already_is_a_bug_of_the_caller():
    book = book_with(("a", ChildLimits()))
    ready(book, "a")
    first, _ = book.submit(1, window_task(), 0.0)
    with pytest.raises(ValueError, match="request id 1 is already in the book"):
        book.submit(1, window_task(miner=2), 0.5)
    assert book.answered("a", 1, 1.0, output=OK) == [Resolve(first, OK, None, "ok")]


def test_a_request_avoiding_a_child_goes_to_another_that_can_serve_it():
    # (A split WindowPoSt's vanilla step made again: not on the child whose proofs failed.)
    book = book_with(("a", ChildLimits()), ("b", ChildLimits()))
    ready(book, "a", "b")
    req, out = book.submit(1, window_task(), 0.0, avoid=frozenset({"a"}))
    assert out == [Send(req, "b", 1)]


def test_an_unsendable_task_frees_the_slot_and_answers_the_request():
    book = book_with(("a", ChildLimits()))
    ready(book, "a")
    r1, _ = book.submit(1, window_task(), 0.0)
    r2, _ = book.submit(2, window_task(), 0.0)
    out = book.unsendable("a", 1, 0.1, "request 1 (window_post): too big")
    assert out == [Resolve(r1, None, "request 1 (window_post): too big", "error"), Send(r2, "a", 2)]
    assert r1.attempts == 0


def test_an_unsendable_attempt_the_request_moved_on_from_frees_its_slot_and_nothing_else():
    # Found by the property test: a request timed out on a, was retried on b, and then a's
    # write of it failed. That answered the request with a's error while it ran on b, and b's
    # answer started it once more, to be sent after its answer and never leave the book.
    book = book_with(
        ("a", ChildLimits(max_attempts=2, request_timeout=5.0)), ("b", ChildLimits(max_attempts=2))
    )
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    assert kinds(book.advance(5.0)) == ["Retry", "SendCancel"]
    assert kinds(ready(book, "b", now=5.0)) == ["Send"]  # the retry, on b
    assert book.unsendable("a", 1, 5.0, "request 1 (window_post): too big") == []
    assert not req.done and book.is_running("b", 1)
    out = book.answered("b", 1, 6.0, output=OK)
    assert out == [Resolve(req, OK, None, "ok")]
    book.child_lost("a", 7.0, "exited (killed by SIGKILL)")
    sizes = book.sizes()
    assert sizes["requests"] == sizes["attempts"] == sizes["running"] == sizes["queued"] == 0


# -- child loss and retry ------------------------------------------------------------------------


def test_a_request_lost_with_its_child_is_retried_on_a_sibling():
    book = book_with(("a", ChildLimits(max_attempts=2)), ("b", ChildLimits(max_attempts=2)))
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    ready(book, "b")  # b is idle, a runs the request
    book.child_down("a", 1.0)
    out = book.child_lost("a", 1.0, "exited (code 3)")
    assert kinds(out) == ["Retry", "Send"]
    retry, send = out
    what = "a (pid 100) went down while running it: exited (code 3)"
    assert retry == Retry(req, what, 2, 2, child="a", pid=100)
    assert send == Send(req, "b", 1)
    assert req.history == ["attempt 1 on a: exited (code 3)"]
    assert book.answered("b", 1, 2.0, output=OK) == [Resolve(req, OK, None, "ok")]


def test_attempts_run_out_under_max_attempts():
    book = book_with(("a", ChildLimits(max_attempts=2)))
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    book.child_lost("a", 1.0, "exited (code 3)")
    ready(book, "a", now=2.0)
    (res,) = resolved(book.child_lost("a", 3.0, "exited (code 4)"))
    assert res.error == (
        "request 1 (window_post): a (pid 100) went down while running it: exited (code 4);"
        " giving up (MaxAttempts = 2 on a); 2 attempts made (attempt 1 on a: exited (code 3);"
        " attempt 2 on a: exited (code 4))"
    )


def test_answers_written_before_a_child_went_down_are_still_taken():
    book = book_with(("a", ChildLimits()))
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    book.child_down("a", 1.0)
    assert book.answered("a", 1, 1.1, output=OK) == [Resolve(req, OK, None, "ok")]
    assert book.child_lost("a", 1.2, "exited (code 0)") == []


def test_a_child_going_down_is_sent_nothing_by_the_alarms_it_catches_up_with():
    # The driver learns that "a" exits before it tells the book that a request timeout fell
    # due (both in one pass of trio's loop, or after a stall): the retry the timeout makes must
    # not go to the exiting process, where it would be lost and charged a second attempt.
    book = book_with(("a", ChildLimits(max_attempts=2, request_timeout=5.0)), capacity=2)
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    out = book.child_down("a", 7.0)
    assert not [e for e in out if isinstance(e, Send)]
    assert kinds(book.child_lost("a", 7.5, "exited (code 3)")) == ["Retry"]
    assert ready(book, "a", now=8.0) == [Send(req, "a", 1)]
    assert book.answered("a", 1, 9.0, output=OK) == [Resolve(req, OK, None, "ok")]


def test_a_child_that_gave_up_fails_the_queue_with_why():
    book = book_with(("a", ChildLimits()))
    book.submit(1, window_task(), 0.0)
    (res,) = resolved(book.child_gave_up("a", 1.0, fatal=True, last_exit="exited (code 1)"))
    assert "a: exited (code 1)" in res.error and res.outcome == "error"


def test_a_request_failing_while_a_sibling_still_serves_names_no_last_exit():
    # The last exits are why no child can serve: said when every one gave up, not when one did.
    book = book_with(("a", ChildLimits()), ("b", ChildLimits()))
    ready(book, "b")
    book.submit(1, window_task(), 0.0)  # b is busy with it
    book.child_gave_up("a", 0.5, fatal=True, last_exit="exited (code 1)")
    book.submit(2, window_task(), 1.0, deadline=5.0)
    (res,) = resolved(book.advance(5.0))
    assert res.outcome == "timeout" and "exited (code 1)" not in res.error
    assert book.cannot_serve("window_post") is None


def test_a_process_replaced_before_it_was_reported_lost_gives_back_what_ran_on_it():
    # A new process of "a" says it is ready while the book still holds the last one (a missed
    # child_lost, a bug of the driver's): what ran on the last one is lost with it, not kept
    # for ever, and the new one numbers its requests from 1 again.
    book = book_with(("a", ChildLimits(max_attempts=2)))
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    out = book.child_ready("a", 1.0, protocol="dext", pid=200)
    what = "a (pid 100) went down while running it: replaced by a new process"
    assert out == [Retry(req, what, 2, 2, child="a", pid=100), Send(req, "a", 1)]
    assert book.counters("a") == (0, 1)
    assert req.lost_on == {"a"}  # (a split WindowPoSt's SNARK step: as if a refused it)
    assert book.answered("a", 1, 2.0, output=OK) == [Resolve(req, OK, None, "ok")]
    assert book.unanswered == 0


def test_whether_a_process_was_sent_or_answered_anything_is_its_own_not_the_last_ones():
    # The restart rules read them as a process ends: one that answered restarts at once and is
    # never FATAL; one that said ready and exited with nothing sent, again and again, is.
    book = book_with(("a", ChildLimits()))
    ready(book, "a")
    assert (book.sent("a"), book.served("a")) == (False, False)
    book.submit(1, window_task(), 0.0)
    assert (book.sent("a"), book.served("a")) == (True, False)
    book.answered("a", 1, 1.0, error="no such sector")  # an error is an answer too
    assert (book.sent("a"), book.served("a")) == (True, True)
    book.child_lost("a", 2.0, "exited (code 1)")
    assert (book.sent("a"), book.served("a")) == (True, True)  # the last process's, as it ended
    ready(book, "a", now=3.0)
    assert (book.sent("a"), book.served("a")) == (False, False)
    # The answer to a request its caller left counts: the process works.
    book.submit(2, window_task(), 4.0)
    book.caller_gone(2, 5.0)
    assert book.served("a") is False
    assert book.answered("a", 1, 6.0, error="cancelled") == []
    assert book.served("a") is True


def test_a_process_lost_after_its_request_moved_on_leaves_the_request_as_it_is():
    # 1 timed out on a and runs again on b; then a's process is lost. That is no news for 1: its
    # history and a's failures are unchanged, and it is still b's (a caller gone cancels it there).
    limits = ChildLimits(max_attempts=2, request_timeout=10.0, cancel_grace=50.0)
    book = book_with(("a", limits), ("b", limits))
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    ready(book, "b")
    assert kinds(book.advance(10.0)) == ["Retry", "SendCancel", "Send"]
    assert book.child_lost("a", 11.0, "exited (code 1)") == []
    assert req.history == ["attempt 1 timed out after 10s on a (pid 100)"]
    assert req.lost_on == frozenset() and book.counters("a") == (0, 1)
    out = book.caller_gone(1, 12.0)
    assert out == [
        Resolve(req, None, "request 1 abandoned by its caller", "cancelled"),
        SendCancel("b", 1),
    ]


def test_progress_of_an_attempt_the_request_left_is_not_reported_to_its_caller():
    limits = ChildLimits(max_attempts=2, request_timeout=10.0, cancel_grace=50.0)
    book = book_with(("a", limits), ("b", limits))
    ready(book, "a", "b")
    req, _ = book.submit(1, window_task(), 0.0)
    assert kinds(book.advance(10.0)) == ["Retry", "SendCancel", "Send"]  # now on b
    assert book.progress("a", 1, 11.0, phase="snark", done=3, total=4) == []
    assert book.progress("b", 1, 11.0, phase="vanilla", done=1, total=4) == [
        ReportProgress(req, "vanilla", 1, 4)
    ]
    book.caller_gone(1, 12.0)
    assert book.progress("b", 1, 13.0, phase="snark", done=2, total=4) == []


# -- time ----------------------------------------------------------------------------------------


def test_a_request_timeout_retries_elsewhere_cancels_and_kills_after_the_grace():
    limits = ChildLimits(max_attempts=2, request_timeout=10.0, cancel_grace=5.0)
    book = book_with(("a", limits), ("b", limits))
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    ready(book, "b")
    assert book.next_wakeup() == 10.0
    out = book.advance(10.0)
    assert kinds(out) == ["Retry", "SendCancel", "Send"]
    assert out[1] == SendCancel("a", 1) and out[2] == Send(req, "b", 1)
    assert req.history == ["attempt 1 timed out after 10s on a (pid 100)"]
    assert book.next_wakeup() == 15.0
    out = book.advance(15.0)
    assert out == [Kill("a", "request 1 (child id 1) still running 5s after a Cancel", 1)]
    # The killed child's other work would be retried free: here there is none.
    assert book.child_lost("a", 15.1, "killed") == []
    assert book.answered("b", 1, 16.0, output=OK) == [Resolve(req, OK, None, "ok")]


def test_a_request_timing_out_at_its_deadline_is_answered_late_not_retried():
    limits = ChildLimits(max_attempts=2, request_timeout=10.0)
    book = book_with(("a", limits), ("b", limits))
    ready(book, "a", "b")
    book.submit(1, window_task(), 0.0, deadline=10.0)
    out = book.advance(10.0)
    assert kinds(out) == ["Resolve", "SendCancel"]
    assert out[0].outcome == "timeout" and out[0].late
    assert "timed out after 10s on a (pid 100); its deadline has passed" in out[0].error


def test_a_child_killed_for_ignoring_a_cancel_costs_its_other_requests_no_attempt():
    limits = ChildLimits(max_attempts=1, cancel_grace=5.0)
    book = book_with(("a", limits), ("b", limits), capacity=2)
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    other, _ = book.submit(2, window_task(), 0.0)
    book.caller_gone(1, 1.0)
    (kill,) = book.advance(6.0)  # 1 still runs 5 s after its Cancel
    assert kill == Kill("a", "request 1 (child id 1) still running 5s after a Cancel", 1)
    # The supervisor carries the Kill out: its mark_down says the child goes down, charging
    # all (its default); the book's own word, said with the Kill, stands.
    assert book.child_down("a", 6.1) == []
    ready(book, "b", now=6.5)
    out = book.child_lost("a", 7.0, "exited (killed by SIGKILL)")
    assert kinds(out) == ["Retry", "Send"] and out[1] == Send(other, "b", 1)
    assert book.answered("b", 1, 8.0, output=OK) == [Resolve(other, OK, None, "ok")]


def test_a_child_that_answers_within_the_grace_is_not_killed():
    book = book_with(("a", ChildLimits(request_timeout=10.0, cancel_grace=5.0)))
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    (res,) = resolved(book.advance(10.0))  # MaxAttempts 1: answered with the timeout
    assert res.outcome == "timeout"
    assert book.answered("a", 1, 12.0, error="cancelled") == []  # dropped: answered already
    assert book.advance(15.0) == [] and book.next_wakeup() is None


def test_a_cancel_grace_ending_after_its_child_went_down_kills_nothing():
    # The child is going away already (exiting, or stopped): no kill, no "ignored a Cancel".
    book = book_with(("a", ChildLimits(cancel_grace=5.0)))
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    assert SendCancel("a", 1) in book.caller_gone(1, 1.0)
    book.child_down("a", 3.0)
    assert book.advance(6.0) == []


def test_a_timeout_or_grace_due_while_the_childs_answer_waits_unread_waits_for_it_once():
    # The supervisor did not run for a while (SIGSTOP, a paused VM): the child answered in time
    # but its answer waits unread in its pipe as the alarms come due. The driver tells the book
    # so (`spoke`, via before_alarms, as supervisor/unheard.py does): the alarm waits for it.
    limits = ChildLimits(max_attempts=1, request_timeout=10.0, cancel_grace=5.0)
    book = book_with(("a", limits), capacity=2)
    book.before_alarms = lambda now: book.spoke("a", now)
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    assert book.answered("a", 1, 11.5, output=OK) == [Resolve(req, OK, None, "ok")]
    # A Cancel obeyed in time, its answer read after the grace: the child is not killed.
    book.submit(2, window_task(), 12.0)
    assert SendCancel("a", 2) in book.caller_gone(2, 13.0)
    assert book.next_wakeup() == 18.0  # the grace: killed if it still runs then
    assert book.answered("a", 2, 19.5, error="cancelled") == []
    assert book.next_wakeup() is None
    # Waited once only: a child whose output always waits (chatty, its answer not in it) is
    # timed out UNREAD_WAIT later.
    late, _ = book.submit(3, window_task(), 20.0)
    assert book.advance(30.5) == []
    (res,) = resolved(book.advance(30.5 + UNREAD_WAIT))
    assert res.request is late and res.outcome == "timeout"


def test_a_timeout_due_as_its_answer_is_read_waits_for_it_whichever_task_ran_first():
    # After a stall the reader may run before the driver: the answer is in its hand, not in the
    # pipe, as the timeout that fell due meanwhile is acted on (answers() catches up first).
    book = book_with(("a", ChildLimits(max_attempts=1, request_timeout=10.0)))
    book.before_alarms = lambda now: None  # nothing left in the pipe
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    assert book.answered("a", 1, 11.5, output=OK) == [Resolve(req, OK, None, "ok")]


def test_an_alarm_is_not_put_off_when_nothing_waits_unread():
    book = book_with(("a", ChildLimits(request_timeout=10.0)))
    book.before_alarms = lambda now: None
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    (res,) = resolved(book.advance(10.0))
    assert res.outcome == "timeout"


def test_a_deadline_cancels_the_running_request_and_a_late_answer_is_dropped():
    book = book_with(("a", ChildLimits(cancel_grace=5.0)))
    ready(book, "a")
    book.submit(1, window_task(), 0.0, deadline=20.0)
    assert book.next_wakeup() == 20.0
    # The answer arrives after the deadline: the deadline is acted on first.
    out = book.answered("a", 1, 21.0, output=OK)
    (res,) = resolved(out)
    assert res.outcome == "timeout" and "passed its deadline" in res.error
    assert SendCancel("a", 1) in out


def test_a_deadline_cut_counts_one_failure_of_its_child_and_an_abandoned_one_none_more():
    book = book_with(("a", ChildLimits(cancel_grace=5.0)), capacity=2)
    ready(book, "a")
    book.submit(1, window_task(), 0.0, deadline=20.0)
    book.submit(2, window_task(), 0.0, deadline=20.0)
    assert SendCancel("a", 2) in book.caller_gone(2, 1.0)  # its grace ends at 6
    assert book.answered("a", 2, 2.0, error="cancelled") == []
    book.submit(3, window_task(), 3.0, deadline=20.0)
    assert SendCancel("a", 3) in book.caller_gone(3, 19.0)  # its grace ends at 24
    out = book.advance(20.0)  # 1 is cut by its deadline; 3, abandoned, is told nothing more
    assert kinds(out) == ["Resolve", "SendCancel"] and out[1] == SendCancel("a", 1)
    assert book.counters("a") == (0, 1)
    # A deadline passing while its child goes down counts it once too.
    book = book_with(("a", ChildLimits()))
    ready(book, "a")
    book.submit(1, window_task(), 0.0, deadline=10.0)
    book.child_down("a", 5.0)
    assert resolved(book.advance(10.0))[0].outcome == "timeout"
    assert book.counters("a") == (0, 1)


def test_a_queued_request_fails_at_its_deadline_without_reaching_a_child():
    book = book_with(("a", ChildLimits()))
    req, _ = book.submit(1, window_task(), 0.0, deadline=5.0)
    (res,) = resolved(book.advance(5.0))
    assert res.outcome == "timeout" and "it was not sent to a prover" in res.error
    assert req.attempts == 0


def test_a_silent_dext_child_is_killed_after_its_heartbeat_timeout():
    book = book_with(("a", ChildLimits(heartbeat_timeout=60.0)))
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    book.progress("a", 1, 30.0, phase="vanilla", done=0, total=1)
    assert book.advance(60.0) == []  # it spoke at 30 s
    assert book.next_wakeup() == 90.0
    (kill,) = book.advance(90.0)
    assert kill == Kill(
        "a", "hung: no Progress or Response for 60.0s while working (HeartbeatTimeoutSecs = 60)"
    )


def test_a_child_that_writes_what_is_about_no_request_is_alive_for_its_heartbeat():
    # A line the supervisor skips, a second ready message: the child spoke.
    book = book_with(("a", ChildLimits(heartbeat_timeout=60.0)))
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    assert book.heard_from("a", 30.0) == []
    assert book.advance(60.0) == [] and book.next_wakeup() == 90.0


def test_a_child_whose_progress_waits_unread_after_a_stall_is_not_judged_hung():
    # The supervisor did not run for 100 s while the child kept sending Progress: the driver
    # tells the book it spoke (before_alarms, as supervisor/unheard.py does) before the
    # heartbeat is judged, and its reader then reads the Progress.
    book = book_with(("a", ChildLimits(heartbeat_timeout=60.0)))
    book.before_alarms = lambda now: book.spoke("a", now)
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    assert book.advance(100.0) == [] and book.next_wakeup() == 160.0
    assert book.progress("a", 1, 100.1, phase="vanilla", done=1, total=2) == [
        ReportProgress(req, "vanilla", 1, 2)
    ]


def test_a_dext_child_with_no_work_is_not_judged_hung_by_its_silence():
    book = book_with(("a", ChildLimits(heartbeat_timeout=60.0)))
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    assert book.answered("a", 1, 5.0, output=OK) == [Resolve(req, OK, None, "ok")]
    assert book.advance(60.0) == [] and book.advance(65.0) == [] and book.advance(500.0) == []
    assert book.next_wakeup() is None


def test_a_child_that_speaks_late_is_not_judged_hung_by_a_late_driver():
    book = book_with(("a", ChildLimits(heartbeat_timeout=60.0)))
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    # The driver was late (the heartbeat was due at 60 s), but the child speaks: it is alive.
    assert book.answered("a", 1, 61.0, output=OK) == [Resolve(req, OK, None, "ok")]


def test_json_lines_children_have_no_heartbeat():
    book = book_with(("a", ChildLimits(heartbeat_timeout=60.0)))
    ready(book, "a", protocol="jsonl")
    book.submit(1, window_task(), 0.0)
    assert book.next_wakeup() is None


def test_a_child_that_reads_nothing_from_a_full_stdin_is_killed():
    book = book_with(("a", ChildLimits(stdin_timeout=60.0)))
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    book.stdin_blocked("a", 1.0)
    book.stdin_progress("a", 40.0)
    assert book.advance(61.0) == []
    book.stdin_drained("a")
    assert book.advance(100.0) == []  # drained: the watch ends
    book.stdin_blocked("a", 200.0)
    (kill,) = book.advance(260.0)
    assert isinstance(kill, Kill) and "StdinTimeoutSecs = 60" in kill.reason


def test_a_stdin_pipe_that_fills_again_and_again_keeps_one_watch():
    book = book_with(("a", ChildLimits(stdin_timeout=60.0)))
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    for t in range(10):  # full, then drained, ten times within a StdinTimeoutSecs
        book.stdin_blocked("a", float(t))
        book.stdin_drained("a")
    assert book.sizes()["alarms"] == 1
    assert book.advance(60.0) == [] and book.sizes()["alarms"] == 0  # drained: the watch ends


# -- the caller, and shutdown --------------------------------------------------------------------


def test_a_caller_gone_is_answered_cancelled_and_its_dext_child_told():
    book = book_with(("a", ChildLimits(cancel_grace=5.0)))
    ready(book, "a")
    req, _ = book.submit(1, window_task(), 0.0)
    out = book.caller_gone(1, 1.0)
    assert out == [
        Resolve(req, None, "request 1 abandoned by its caller", "cancelled"),
        SendCancel("a", 1),
    ]
    assert book.answered("a", 1, 2.0, error="cancelled") == []  # frees the slot, nothing more


def test_a_caller_gone_is_not_timed_out_later_nor_told_again_nor_told_while_going_down():
    book = book_with(("a", ChildLimits(request_timeout=10.0, cancel_grace=50.0)), capacity=2)
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    assert SendCancel("a", 1) in book.caller_gone(1, 1.0)
    assert book.advance(10.0) == []  # its request timeout: nothing more to do
    assert book.counters("a") == (0, 0)
    book.submit(2, window_task(), 11.0)
    book.child_down("a", 12.0)
    assert kinds(book.caller_gone(2, 13.0)) == ["Resolve"]  # no Cancel to a process going away


def test_a_caller_gone_from_a_json_lines_child_is_not_told_or_killed():
    book = book_with(("a", ChildLimits(cancel_grace=5.0)))
    ready(book, "a", protocol="jsonl")
    book.submit(1, window_task(), 0.0)
    assert kinds(book.caller_gone(1, 1.0)) == ["Resolve"]
    assert book.next_wakeup() is None


def test_shutdown_fails_queued_requests_and_does_not_retry_lost_ones():
    book = book_with(("a", ChildLimits(max_attempts=3)))
    ready(book, "a")
    running, _ = book.submit(1, window_task(), 0.0)
    queued, _ = book.submit(2, window_task(), 0.0)
    (res,) = resolved(book.shutdown(1.0))
    assert res.request is queued and "still queued when the supervisor began" in res.error
    (res,) = resolved(book.child_lost("a", 2.0, "stopped (shutdown)"))
    assert res.request is running and "shutting down, so it was not retried" in res.error


def test_the_grace_period_ends_what_is_left():
    book = book_with(("a", ChildLimits()))
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    book.shutdown(1.0)
    (res,) = resolved(book.grace_over(31.0, 30.0))
    assert res.error == (
        "request 1 (window_post) did not finish on a within the shutdown grace period (30s)"
    )
    assert book.unanswered == 0


def test_a_child_both_silent_and_deaf_is_killed_for_its_stdin():
    book = book_with(("a", ChildLimits(heartbeat_timeout=60.0, stdin_timeout=60.0)))
    ready(book, "a")
    book.submit(1, window_task(), 0.0)
    book.stdin_blocked("a", 0.0)
    (kill,) = book.advance(61.0)
    assert isinstance(kill, Kill) and "StdinTimeoutSecs = 60" in kill.reason


def test_a_deadline_passing_while_its_child_goes_down_answers_the_request_then():
    # The scheduler forgets what ran on a child that went down; the request stays on it until
    # it is lost, and its deadline must not be missed meanwhile.
    book = book_with(("a", ChildLimits()))
    ready(book, "a")
    book.submit(1, window_task(), 0.0, deadline=10.0)
    book.child_down("a", 5.0)
    assert book.next_wakeup() == 10.0
    (res,) = resolved(book.advance(10.0))
    assert (
        res.outcome == "timeout" and "while a (pid 100), which ran it, was going down" in res.error
    )
    assert book.child_lost("a", 12.0, "exited (code 0)") == []


def test_a_kill_at_the_deadline_still_answers_the_request_at_its_deadline():
    book = book_with(("a", ChildLimits(heartbeat_timeout=8.0)))
    ready(book, "a")
    book.submit(1, window_task(), 0.0, deadline=8.0)
    out = book.advance(8.0)
    assert kinds(out) == ["Kill", "Resolve"] and out[1].outcome == "timeout"


def test_a_dext_childs_heartbeat_counts_from_the_request_it_is_sent_after_being_idle():
    # Idle for longer than its HeartbeatTimeoutSecs (nothing to say while it has no work), a
    # child sent a request is given the whole timeout from then, not judged hung at once.
    book = book_with(("a", ChildLimits(heartbeat_timeout=60.0)))
    ready(book, "a")
    req, out = book.submit(1, window_task(), 100.0)
    assert out == [Send(req, "a", 1)]
    assert book.next_wakeup() == 160.0
    assert book.advance(159.0) == []
    (kill,) = book.advance(160.0)
    assert isinstance(kill, Kill) and "no Progress or Response for 60.0s" in kill.reason


def test_an_answer_after_the_grace_period_or_a_stop_answered_its_request_is_not_a_second_one():
    # grace_over and fail_all answer requests a child still runs: the child's own answer, read
    # before it is stopped, only frees the slot (the caller was told; observers hear of it once).
    book = book_with(("a", ChildLimits()), capacity=2)
    ready(book, "a")
    first, _ = book.submit(1, window_task(), 0.0)
    book.shutdown(1.0)
    assert resolved(book.grace_over(31.0, 30.0))[0].request is first
    assert book.answered("a", 1, 31.5, output=OK) == []
    book = book_with(("a", ChildLimits()), capacity=2)
    ready(book, "a")
    second, _ = book.submit(1, window_task(), 0.0)
    assert resolved(book.fail_all(1.0, "stopped at once"))[0].request is second
    assert book.answered("a", 1, 1.5, error="interrupted") == []
    assert book.unanswered == 0
