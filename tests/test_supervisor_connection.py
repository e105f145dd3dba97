"""The per-child protocol adapter (supervisor/connection.py), fed canned bytes."""

from __future__ import annotations

import os

import pytest
from helpers.supervisor import window_task

from damocles_ext.protocol import dext, jsonl
from damocles_ext.supervisor.connection import (
    Answer,
    ChildConnection,
    ChildProtocolError,
    ProgressEvent,
    Ready,
    Skipped,
)
from damocles_ext.tasks import WindowPoStOutput


def hello(stage: str = "window_post", protocol: str = dext.PROTOCOL_VERSION) -> bytes:
    return dext.encode(dext.Hello(protocol, stage, os.getpid(), "echo", "1", 2))


def test_auto_detects_dext_from_a_hello_frame_split_in_pieces():
    conn = ChildConnection("window_post")
    frame = hello()
    events = []
    for i in range(len(frame)):
        events += conn.receive_data(frame[i : i + 1])
    assert conn.protocol == "dext" and conn.ready
    assert [type(e) for e in events] == [Ready]
    assert events[0].hello.capacity == 2


def test_auto_detects_json_lines_from_the_ready_line():
    conn = ChildConnection("winning_post")
    assert conn.receive_data(b"winning_post processor ready\n") == [Ready("jsonl", None)]
    assert conn.protocol == "jsonl"


def test_ready_line_with_crlf_is_accepted_but_other_variants_are_not():
    assert ChildConnection("window_post").receive_data(b"window_post processor ready\r\n")
    for line in (
        b"window_post processor ready \n",
        b" window_post processor ready\n",
        b"winning_post processor ready\n",
        b"WINDOW_POST processor ready\n",
    ):
        with pytest.raises(ChildProtocolError) as info:
            ChildConnection("window_post").receive_data(line)
        assert repr(line)[2:-3] in str(info.value)  # says what came instead


def test_wrong_ready_line_error_shows_what_came_instead_truncated():
    conn = ChildConnection("window_post")
    with pytest.raises(ChildProtocolError) as info:
        conn.receive_data(b"Traceback (most recent call last): " + b"x" * 1000 + b"\n")
    text = str(info.value)
    assert "Traceback" in text and "window_post processor ready" in text
    assert len(text) < 500


def test_hello_for_another_stage_or_protocol_is_refused():
    with pytest.raises(ChildProtocolError, match="stage 'winning_post'"):
        ChildConnection("window_post").receive_data(hello("winning_post"))
    with pytest.raises(ChildProtocolError, match="dext/9"):
        ChildConnection("window_post").receive_data(hello(protocol="dext/9"))


def test_eof_before_ready_says_what_was_written():
    conn = ChildConnection("window_post", "jsonl")
    assert conn.receive_data(b"loading params") == []
    with pytest.raises(ChildProtocolError, match=r"before its ready message.*loading params"):
        conn.receive_data(b"")


def test_dext_framing_error_after_ready_is_fatal():
    conn = ChildConnection("window_post")
    conn.receive_data(hello())
    with pytest.raises(ChildProtocolError, match="framing error"):
        conn.receive_data(b"\xff\xff\xff\xff garbage")


def test_a_hello_then_a_bad_length_in_one_read_is_ready_then_a_framing_error():
    # Not "no valid Hello": the Hello was whole and valid, and comes with the error.
    conn = ChildConnection("window_post")
    with pytest.raises(ChildProtocolError, match=r"^dext framing error: frame length") as info:
        conn.receive_data(hello() + b"\xff\xff\xff\xff")
    assert conn.ready
    assert [type(e) for e in info.value.events] == [Ready]


def test_an_answer_then_bad_bytes_in_one_read_comes_with_the_error():
    conn = ChildConnection("window_post")
    conn.receive_data(hello())
    out = WindowPoStOutput(proofs=[b"p"], faults=[])
    data = dext.encode(dext.Response(1, output=out)) + b"proof done\n"
    with pytest.raises(ChildProtocolError, match="framing error") as info:
        conn.receive_data(data)
    assert info.value.events == [Answer(1, out, None)]


def test_an_answer_then_a_forbidden_message_in_one_read_comes_with_the_error():
    conn = ChildConnection("window_post")
    conn.receive_data(hello())
    data = dext.encode(dext.Response(1, error="no")) + hello()
    with pytest.raises(ChildProtocolError, match="second Hello") as info:
        conn.receive_data(data)
    assert info.value.events == [Answer(1, None, "no")]


def test_dext_child_may_not_send_parent_messages():
    conn = ChildConnection("window_post")
    conn.receive_data(hello())
    with pytest.raises(ChildProtocolError, match="Shutdown"):
        conn.receive_data(dext.encode(dext.Shutdown()))


def test_a_second_hello_says_it_is_a_second_hello():
    conn = ChildConnection("window_post")
    conn.receive_data(hello())
    with pytest.raises(ChildProtocolError) as info:
        conn.receive_data(hello())
    message = str(info.value)
    assert "sent a second Hello frame" in message and "after it was ready" in message
    assert "only a parent may send" not in message


def test_dext_responses_and_progress_become_events():
    conn = ChildConnection("window_post", "dext")
    out = WindowPoStOutput(proofs=[b"p"], faults=[3])
    data = (
        hello()
        + dext.encode(dext.Progress(1, "sleep", 1, 4))
        + dext.encode(dext.Response(1, output=out))
    )
    events = conn.receive_data(data)
    assert events[1:] == [ProgressEvent(1, "sleep", 1, 4), Answer(1, out, None)]


def test_a_progress_phase_of_a_whole_log_is_cut_to_a_short_name():
    # A custom binary's phase is kept for status and sent on to control clients, and comes
    # again with each heartbeat: a megabyte of it is cut, not carried.
    conn = ChildConnection("window_post", "dext")
    events = conn.receive_data(hello() + dext.encode(dext.Progress(1, "x" * 1_000_000, 0, 1)))
    assert events[1:] == [ProgressEvent(1, "x" * dext.MAX_PHASE_CHARS + "...", 0, 1)]


def test_a_bad_json_line_is_skipped_and_reading_goes_on():
    conn = ChildConnection("window_post")
    conn.receive_data(jsonl.ready_line("window_post"))
    out = WindowPoStOutput(proofs=[b"p"], faults=[])
    events = conn.receive_data(
        b"not json at all\n" + b'{"id": 4, "output": null}\n' + jsonl.encode_response(5, out)
    )
    assert isinstance(events[0], Skipped) and events[0].child_rid is None
    assert isinstance(events[1], Skipped) and events[1].child_rid == 4
    assert events[2] == Answer(5, out, None)


def test_requests_cancel_and_shutdown_bytes_per_protocol():
    task = window_task()
    d = ChildConnection("window_post", "dext")
    assert dext.FrameDecoder().receive_data(d.encode_request(3, task, 12.5, 2)) == [
        dext.Request(3, task, 12.5, 2)
    ]
    assert d.encode_cancel(3) == dext.encode(dext.Cancel(3))
    assert d.encode_shutdown() == dext.encode(dext.Shutdown())
    j = ChildConnection("window_post", "jsonl")
    assert j.encode_request(3, task) == jsonl.encode_request(3, task)
    assert j.encode_cancel(3) is None and j.encode_shutdown() is None


def test_an_over_long_json_line_with_a_leading_id_answers_that_request():
    # Skipped whole (over the line limit), but its id leads it, as damocles writes it: the
    # request is answered as invalid instead of waiting for ever.
    conn = ChildConnection("window_post", "jsonl")
    conn.receive_data(jsonl.ready_line("window_post"))
    line = b'{"id":7,"err_msg":null,"output":{"proofs":["' + b"A" * (jsonl.DEFAULT_MAX_LINE + 8)
    events = conn.receive_data(line + b'"]}}\n')
    assert [(type(e), e.child_rid) for e in events] == [(Skipped, 7)]
