"""dext/1 frame codec: round trips, exact bytes, chunking, truncation, garbage, size limits."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damocles_ext.protocol import dext
from damocles_ext.tasks import (
    PoStReplicaInfo,
    WindowPoSt,
    WindowPoStOutput,
    WinningPoSt,
    WinningPoStOutput,
)

REPLICA = PoStReplicaInfo(
    sector_id=7, comm_r=bytes(range(32)), cache_dir="/cache/s-t01000-7", sealed_file="/sealed/s-7"
)
WINDOW = WindowPoSt(
    miner_id=1000, proof_type="StackedDrgWindow32GiBV1_2", replicas=[REPLICA], seed=b"\x01" * 32
)
WINNING = WinningPoSt(
    miner_id=1000, proof_type="StackedDrgWinning32GiBV1", replicas=[REPLICA], seed=b"\x02" * 32
)

MESSAGES = [
    dext.Hello(
        protocol="dext/1", stage="window_post", pid=42, prover="echo", version="0.1", capacity=2
    ),
    dext.Request(id=1, task=WINDOW),
    dext.Request(id=2, task=WINNING, deadline=1_800_000_000.5, priority=5),
    dext.Response(id=1, output=WindowPoStOutput(proofs=[b"\x00" * 192], faults=[3, 4])),
    dext.Response(id=2, output=WinningPoStOutput(proofs=[b"\xff" * 192])),
    dext.Response(id=3, error="prover failed: out of memory"),
    dext.Progress(id=1, phase="snark", done=3, total=10),
    dext.Cancel(id=1),
    dext.Shutdown(),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    frame = dext.encode(message)
    assert dext.FrameDecoder().receive_data(frame) == [message]


def test_frame_prefix_is_the_payload_length_big_endian():
    frame = dext.encode(dext.Cancel(id=5))
    payload = frame[4:]
    assert int.from_bytes(frame[:4], "big") == len(payload)
    # msgpack map {"type": "cancel", "id": 5}, field order as declared (tag first)
    assert payload == b"\x82\xa4type\xa6cancel\xa2id\x05"


def test_shutdown_frame_exact_bytes():
    assert dext.encode(dext.Shutdown()) == b"\x00\x00\x00\x0f\x81\xa4type\xa8shutdown"


def test_task_in_request_keeps_its_stage():
    [decoded] = dext.FrameDecoder().receive_data(dext.encode(dext.Request(id=9, task=WINNING)))
    assert isinstance(decoded.task, WinningPoSt)


def test_many_frames_in_one_chunk():
    data = b"".join(dext.encode(m) for m in MESSAGES)
    assert dext.FrameDecoder().receive_data(data) == MESSAGES


def test_truncated_stream_raises_at_eof():
    frame = dext.encode(dext.Request(id=1, task=WINDOW))
    dec = dext.FrameDecoder()
    assert dec.receive_data(frame[:-1]) == []
    with pytest.raises(dext.ProtocolError, match="stream ended inside a frame"):
        dec.receive_data(b"")


def test_clean_eof_is_not_an_error():
    dec = dext.FrameDecoder()
    dec.receive_data(dext.encode(dext.Cancel(id=1)))
    assert dec.receive_data(b"") == []


def test_oversized_length_prefix_is_refused_before_the_payload_arrives():
    dec = dext.FrameDecoder(max_frame_size=1024)
    with pytest.raises(dext.ProtocolError, match="exceeds the maximum of 1024 bytes"):
        dec.receive_data((1025).to_bytes(4, "big"))
    # nothing but the 4 prefix bytes was ever buffered
    assert dec.pending == 4


def test_a_1_gib_prefix_costs_no_memory():
    dec = dext.FrameDecoder()
    with pytest.raises(dext.ProtocolError):
        dec.receive_data((1 << 30).to_bytes(4, "big") + b"\x00" * 10)
    assert dec.pending < 100


def test_undecodable_payload_is_a_protocol_error():
    bad = b"\xc1"  # never used in msgpack
    with pytest.raises(dext.ProtocolError, match="undecodable dext frame"):
        dext.FrameDecoder().receive_data(len(bad).to_bytes(4, "big") + bad)


def test_unknown_message_type_is_a_protocol_error():
    payload = msgspec.msgpack.encode({"type": "launch_missiles", "id": 1})
    with pytest.raises(dext.ProtocolError):
        dext.FrameDecoder().receive_data(len(payload).to_bytes(4, "big") + payload)


def test_wrong_field_types_are_a_protocol_error():
    payload = msgspec.msgpack.encode({"type": "request", "id": "one", "task": {}})
    with pytest.raises(dext.ProtocolError, match="id"):
        dext.FrameDecoder().receive_data(len(payload).to_bytes(4, "big") + payload)


def test_short_seed_in_a_request_is_a_protocol_error():
    task = msgspec.to_builtins(WINDOW, builtin_types=(bytes,))
    task["seed"] = b"\x01" * 31
    payload = msgspec.msgpack.encode({"type": "request", "id": 1, "task": task})
    with pytest.raises(dext.ProtocolError, match="seed"):
        dext.FrameDecoder().receive_data(len(payload).to_bytes(4, "big") + payload)


def test_data_after_eof_is_refused():
    dec = dext.FrameDecoder()
    dec.receive_data(b"")
    with pytest.raises(dext.ProtocolError, match="after end of stream"):
        dec.receive_data(b"x")


# -- properties ----------------------------------------------------------------------------------

messages = st.sampled_from(MESSAGES)


@st.composite
def chunked(draw):
    msgs = draw(st.lists(messages, min_size=1, max_size=8))
    data = b"".join(dext.encode(m) for m in msgs)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    chunks, prev = [], 0
    for cut in [*cuts, len(data)]:
        chunks.append(data[prev:cut])
        prev = cut
    return msgs, [c for c in chunks if c]


@settings(max_examples=200, deadline=None)
@given(chunked())
def test_any_chunking_of_valid_frames_gives_the_same_messages(case):
    msgs, chunks = case
    dec = dext.FrameDecoder()
    out = []
    for chunk in chunks:
        out.extend(dec.receive_data(chunk))
    assert out == msgs
    assert dec.receive_data(b"") == []


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_truncated_input_never_invents_a_message(msgs, data):
    stream = b"".join(dext.encode(m) for m in msgs)
    cut = data.draw(st.integers(0, len(stream) - 1))
    out = dext.FrameDecoder().receive_data(stream[:cut]) if cut else []
    # only whole frames that fit before the cut come out, in order
    whole, size = 0, 0
    for m in msgs:
        size += len(dext.encode(m))
        if size <= cut:
            whole += 1
    assert out == msgs[:whole]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_garbage_raises_only_the_protocol_error(garbage):
    dec = dext.FrameDecoder(max_frame_size=4096)
    try:
        dec.receive_data(garbage)
        dec.receive_data(b"")
    except dext.ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1025, max_value=2**32 - 1))
def test_any_oversized_prefix_is_refused_without_allocating(length):
    dec = dext.FrameDecoder(max_frame_size=1024)
    with pytest.raises(dext.ProtocolError):
        dec.receive_data(length.to_bytes(4, "big"))
    assert dec.pending == 4


def test_the_same_framing_carries_another_message_set():
    class Ping(msgspec.Struct, tag="ping"):
        n: int

    wider = dext.Message | Ping
    dec = dext.FrameDecoder(message_type=wider)
    assert dec.receive_data(dext.encode(Ping(3)) + dext.encode(dext.Cancel(1))) == [
        Ping(3),
        dext.Cancel(1),
    ]
    with pytest.raises(dext.ProtocolError):
        dext.FrameDecoder().receive_data(dext.encode(Ping(3)))


def nested_msgpack(depth: int) -> bytes:
    """A msgpack value `depth` arrays deep (one byte per level): about 3 KB at 3,000 levels."""
    return b"\x91" * depth + b"\xc0"


def test_a_deeply_nested_frame_is_a_protocol_error_not_a_recursion_error():
    # {"type": "progress", "id": 1, "junk": <bomb>}: an unknown field is skipped, which still
    # walks every level of it.
    payload = b"\x83\xa4type\xa8progress\xa2id\x01\xa4junk" + nested_msgpack(3000)
    frame = len(payload).to_bytes(4, "big") + payload
    with pytest.raises(dext.ProtocolError, match="nested too deeply"):
        dext.FrameDecoder().receive_data(frame)


@pytest.mark.parametrize("split", [None, 2, 70_000], ids=["whole", "prefix-split", "payload-split"])
def test_a_payload_over_64_kib_and_a_small_one_decode_alike_whole_or_split(split):
    # Payloads under 64 KiB are decoded from a copy, larger ones from a view of the input:
    # both, read whole or split inside the large frame (the buffered path), give the messages.
    big = dext.Response(id=1, error="x" * 100_000)
    small = dext.Cancel(id=2)
    stream = dext.encode(big) + dext.encode(small)
    dec = dext.FrameDecoder()
    chunks = [stream] if split is None else [stream[:split], stream[split:]]
    assert [m for chunk in chunks for m in dec.receive_data(chunk)] == [big, small]
    assert dec.pending == 0


@pytest.mark.parametrize("split", [None, 3], ids=["whole", "split"])
def test_an_undecodable_payload_gets_the_same_error_whole_or_split(split):
    bad = b"\xc1\xc1\xc1"
    frame = dext.encode(dext.Cancel(id=1)) + len(bad).to_bytes(4, "big") + bad
    dec = dext.FrameDecoder()
    if split is not None:
        assert dec.receive_data(frame[:-split]) == [dext.Cancel(id=1)]
    with pytest.raises(dext.ProtocolError, match=r"^undecodable dext frame of 3 bytes: "):
        dec.receive_data(frame if split is None else frame[-split:])


@pytest.mark.parametrize(
    "bad",
    [b"proof done\n", b"\xff\xff\xff\xff", len(b"\xc1").to_bytes(4, "big") + b"\xc1"],
    ids=["printf", "oversized-length", "undecodable"],
)
def test_whole_frames_before_bad_bytes_in_one_read_come_with_the_error(bad):
    # One stdio flush: a whole Response, then bytes that break the protocol. The Response is
    # handed over with the error, as it is when the pipe splits the two into separate reads.
    good = [dext.Progress(1, "sleep", 1, 2), dext.Response(1, error="x")]
    stream = b"".join(dext.encode(m) for m in good) + bad
    split = dext.FrameDecoder()
    assert split.receive_data(stream[: -len(bad)]) == good
    with pytest.raises(dext.ProtocolError) as in_two:
        split.receive_data(bad)
    with pytest.raises(dext.ProtocolError) as in_one:
        dext.FrameDecoder().receive_data(stream)
    assert in_one.value.messages == good
    assert in_two.value.messages == []
    assert str(in_one.value) == str(in_two.value)


def test_whole_frames_before_bad_bytes_after_a_buffered_start_come_with_the_error():
    # The first frame arrives in two reads: the second read completes it and breaks the rules.
    frame = dext.encode(dext.Response(1, error="x"))
    dec = dext.FrameDecoder()
    assert dec.receive_data(frame[:3]) == []
    with pytest.raises(dext.ProtocolError, match="exceeds the maximum") as info:
        dec.receive_data(frame[3:] + b"\xff\xff\xff\xff")
    assert info.value.messages == [dext.Response(1, error="x")]


@pytest.mark.parametrize("task", [WINDOW, WINNING])
@pytest.mark.parametrize(("deadline", "priority"), [(None, 0), (1_800_000_000.5, -3), (12, 2**62)])
def test_a_request_with_its_task_encoded_already_is_the_same_frame(task, deadline, priority):
    # The supervisor and the client send the task's bytes from its check (tasks.task_check):
    # a child reads the very frame a Request makes.
    from damocles_ext.tasks import task_check

    encoded = task_check(task)
    assert isinstance(encoded, bytes)
    raw = dext.RawRequest(9, msgspec.Raw(encoded), deadline, priority)
    assert dext.encode(raw) == dext.encode(dext.Request(9, task, deadline, priority))
    assert dext.FrameDecoder().receive_data(dext.encode(raw)) == [
        dext.Request(9, task, deadline, priority)
    ]
