"""Fuzzing both wire decoders, as a parent and as a child.

In-process, with hypothesis: random bytes, and valid messages mixed with garbage, cut at random
boundaries, go into every decoder the program has for peer input: the supervisor's view of a
child (`ChildConnection`, auto/dext/jsonl), the child runtime's codecs, the control socket's
frame decoder, and the two sans-IO decoders with small limits. Each may only raise its own
protocol error, must return well-typed events, and keeps its buffers within its limits (bounded
memory). A deadline per example guards against a hang (super-linear work on some input).

With processes: the child runtime fed random bytes exits on its own (0 or 1, no traceback), and
the supervisor survives children that write random bytes: each request is answered once.
"""

from __future__ import annotations

import random
import sys

import pytest
import trio
from helpers.supervisor import dext_child, jsonl_child, our_descendants, spec, who, window_task
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from damocles_ext.child_codecs import _Bad, _Cancel, _DextCodec, _JsonlCodec, _Request, _Shutdown
from damocles_ext.errors import ProverError
from damocles_ext.protocol import control, dext, jsonl
from damocles_ext.supervisor import Supervisor
from damocles_ext.supervisor.connection import (
    Answer,
    ChildConnection,
    ChildProtocolError,
    ProgressEvent,
    Ready,
    Skipped,
)
from damocles_ext.supervisor.restart import BackoffPolicy
from damocles_ext.tasks import WindowPoStOutput

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
STAGE = "window_post"

VALID_FROM_CHILD = [
    dext.encode(dext.Hello("dext/1", STAGE, 1, "fuzz", "1", 2)),
    dext.encode(dext.Response(1, output=WindowPoStOutput([b"p" * 192], [3]))),
    dext.encode(dext.Response(2, error="boom")),
    dext.encode(dext.Progress(1, "snark", 3, 10)),
    jsonl.ready_line(STAGE),
    jsonl.encode_response(1, WindowPoStOutput([b"p"], [])),
    jsonl.encode_response(2, err_msg="x"),
    b"\n",
]
VALID_FROM_PARENT = [
    dext.encode(dext.Request(1, window_task())),
    dext.encode(dext.Cancel(1)),
    dext.encode(dext.Shutdown()),
    jsonl.encode_request(1, window_task()),
    jsonl.encode_request(2**64, window_task()),
]


@st.composite
def streams(draw, valid: list[bytes]) -> list[bytes]:
    """Valid messages and garbage, concatenated, then cut into random chunks."""
    parts = draw(st.lists(st.one_of(st.sampled_from(valid), st.binary(max_size=64)), max_size=12))
    data = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks, last = [], 0
    for cut in [*cuts, len(data)]:
        if cut > last:
            chunks.append(data[last:cut])
            last = cut
    return chunks


# -- the supervisor's side (a parent reading a child) ------------------------------------------


@FUZZ
@given(st.sampled_from(["auto", "dext", "jsonl"]), streams(VALID_FROM_CHILD))
def test_child_connection_raises_only_child_protocol_error_and_keeps_its_head_short(
    protocol, chunks
):
    conn = ChildConnection(STAGE, protocol, "fuzz#0")
    try:
        for chunk in [*chunks, b""]:
            for event in conn.receive_data(chunk):
                assert isinstance(event, Ready | Answer | ProgressEvent | Skipped)
                if isinstance(event, Answer):
                    assert (event.output is None) or isinstance(event.output, WindowPoStOutput)
            assert len(conn.head) <= 200
    except ChildProtocolError as exc:
        assert str(exc).strip()


@FUZZ
@given(st.binary(max_size=512))
def test_child_connection_on_pure_garbage(data):
    for protocol in ("auto", "dext", "jsonl"):
        conn = ChildConnection(STAGE, protocol, "fuzz#0")
        try:
            conn.receive_data(data)
            conn.receive_data(b"")
        except ChildProtocolError:
            pass


# -- the child runtime's side (a child reading its parent) -------------------------------------


@FUZZ
@given(streams(VALID_FROM_PARENT))
def test_child_dext_codec_raises_only_the_protocol_error(chunks):
    codec = _DextCodec()
    try:
        for chunk in chunks:
            for item in codec.feed(chunk):
                assert isinstance(item, _Request | _Cancel | _Shutdown | _Bad)
    except dext.ProtocolError as exc:
        assert str(exc).strip()


@FUZZ
@given(streams(VALID_FROM_PARENT))
def test_child_jsonl_codec_never_raises_and_names_bad_lines(chunks):
    codec = _JsonlCodec(STAGE)
    for chunk in [*chunks, b""]:
        for item in codec.feed(chunk):
            assert isinstance(item, _Request | _Bad)
            if isinstance(item, _Bad):
                assert item.message.strip()


# -- the control socket, and the decoders' limits ----------------------------------------------


@FUZZ
@given(streams([*VALID_FROM_PARENT, control.encode(control.StatusRequest(4))]))
def test_control_socket_decoder_raises_only_the_protocol_error(chunks):
    decoder = control.frame_decoder()
    try:
        for chunk in [*chunks, b""]:
            decoder.receive_data(chunk)
    except dext.ProtocolError:
        pass


@FUZZ
@given(st.integers(8, 256), streams(VALID_FROM_CHILD))
def test_frame_decoder_buffers_less_than_one_frame(limit, chunks):
    decoder = dext.FrameDecoder(max_frame_size=limit)
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            assert decoder.pending < dext.HEADER_SIZE + limit
    except dext.ProtocolError:
        pass


@FUZZ
@given(st.integers(1, 64), streams(VALID_FROM_CHILD))
def test_line_reader_buffers_at_most_one_line(limit, chunks):
    reader = jsonl.LineReader(max_line=limit)
    for chunk in [*chunks, b""]:
        for line in reader.receive_data(chunk):
            assert isinstance(line, jsonl.LineTooLong) or len(line) <= limit + 1
        assert len(reader._buf) <= limit


# -- processes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["dext", "jsonl"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_the_child_runtime_fed_random_bytes_exits_on_its_own_without_a_traceback(
    protocol, seed
):
    rng = random.Random(seed)
    garbage = bytes(rng.randrange(256) for _ in range(4096))
    if seed == 2:  # a valid request first, then garbage
        garbage = (
            dext.encode(dext.Request(1, window_task()))
            if protocol == "dext"
            else jsonl.encode_request(1, window_task())
        ) + garbage
    argv = [sys.executable, "-m", "damocles_ext", "child", STAGE, "--plugin", "echo"]
    argv += ["--protocol", protocol]
    with trio.fail_after(20):
        result = await trio.run_process(
            argv, stdin=garbage, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode in (0, 1), result.stderr.decode()[-2000:]
    assert b"Traceback" not in result.stderr
    if protocol == "dext" and result.returncode == 1:
        assert b"protocol error from the parent" in result.stderr


@pytest.mark.parametrize("protocol", ["dext", "jsonl"])
async def test_the_supervisor_survives_children_writing_random_bytes(protocol):
    # Each child writes a few KiB of random bytes (its own seed) on the first request, then
    # answers; the request is answered once, by output or by a clear error.
    garbage = """
    import random
    junk = bytes(random.Random(os.getpid()).randrange(256) for _ in range(4096))
    """
    if protocol == "dext":
        argv = dext_child("out.write(junk); out.flush(); answer(msg)", setup=garbage)
    else:
        argv = jsonl_child(
            "sys.stdout.buffer.write(junk); sys.stdout.flush(); answer(req)", setup=garbage
        )
    # A JSON-lines answer glued to a garbage line without a newline is unreadable, so nothing
    # answers that request: RequestTimeoutSecs bounds the wait, as it would for a lost answer.
    children = [
        spec(argv, index=i, max_attempts=2, request_timeout=0.5, cancel_grace=0.1) for i in range(2)
    ]
    sup = Supervisor(children, backoff=BackoffPolicy(base=0.01, cap=0.05))
    outcomes = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready(count=2)
            for i in range(3):
                try:
                    outcomes.append(await sup.submit(window_task(miner=i)))
                except ProverError as exc:
                    outcomes.append(exc)
            sup.request_shutdown()
    assert len(outcomes) == 3
    clear = ("broke the protocol", "invalid response", "timed out after 0.5s")
    for outcome in outcomes:
        if isinstance(outcome, ProverError):
            assert any(text in str(outcome) for text in clear), str(outcome)
        else:
            assert who(outcome)[0] == outcomes.index(outcome)
    assert our_descendants() == []
