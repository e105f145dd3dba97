"""The control socket's client reads the answer of a lone request itself, polling the socket for
up to ANSWER_POLL once the last lone answer came within that (damocles_ext.client).

A fake supervisor on a real unix socket, in a thread of its own (a polling client holds its
trio run), answers each request as its test says; ANSWER_POLL is set so that a prompt answer
always comes within the poll (10 s), or so that the poll gives up before an answer the test
holds back. Where a test needs what the server writes to meet the poll, not the reader task,
the server writes it only once the caller's task took its next step after sending (`StepGate`:
the step in which it polls); a client that did not poll would take that step only after its
reader read the answer, and the gate's wait runs out. Whatever the poll meets (progress, an
answer, the end of the connection, a frame that breaks the protocol) ends as it does for the
reader task.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import make_task
from helpers.supervisor import StepGate, TaskSteps, instruments

from damocles_ext import client as client_module
from damocles_ext.client import connect
from damocles_ext.errors import ProverError
from damocles_ext.protocol import control as control_protocol
from damocles_ext.protocol import dext

#: What the fake supervisor does with the client's nth request (from 1): it writes on `conn`.
Reply = Callable[[int, dext.Request, socket.socket], None]


def answer(n: int, req: dext.Request, conn: socket.socket) -> None:
    conn.sendall(dext.encode(control_protocol.ControlResponse(req.id, echo_output(req.task))))


@contextmanager
def fake_supervisor(path: Path, reply: Reply) -> Iterator[None]:
    """A server at `path`, in a thread, that reads requests and has `reply` answer each."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        decoder = dext.FrameDecoder()
        n = 0
        with conn:
            try:
                while data := conn.recv(65536):
                    for req in decoder.receive_data(data):
                        n += 1
                        reply(n, req, conn)
            except OSError:
                return  # the client is gone, or a reply closed the connection

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.close()
        thread.join(10)


async def polling_client(client, monkeypatch, poll: float) -> None:
    """One request answered at once: the next lone one is polled for, for up to `poll`."""
    monkeypatch.setattr(client_module, "ANSWER_POLL", poll)
    assert await client.submit(make_task(1)) == echo_output(make_task(1))
    assert client._quick


def second_in_the_poll(gate: StepGate, act: Callable[[socket.socket], None]) -> Reply:
    """Answers each request but the second; on that one, `act` on the connection once the
    caller took its polling step."""

    def reply(n: int, req: dext.Request, conn: socket.socket) -> None:
        if n == 2:
            assert gate.wait_next(), "no poll"
            act(conn)
        else:
            answer(n, req, conn)

    return reply


async def failed_in_the_poll(client, gate: StepGate, monkeypatch) -> str:
    """A polling client's second request, its server's failure gated on the poll: what the
    ProverError it raised says (the connection is lost by then)."""
    await polling_client(client, monkeypatch, 10.0)
    with instruments(gate):
        gate.arm()
        with pytest.raises(ProverError) as raised:
            await client.submit(make_task(2))
    assert not client.open
    return str(raised.value)


async def test_lone_requests_answered_in_the_poll_are_each_a_checkpoint(sock_path, monkeypatch):
    gate, reader = StepGate(trio.lowlevel.current_task()), TaskSteps("Client._run")

    def answers_in_the_poll(n: int, req: dext.Request, conn: socket.socket) -> None:
        assert n == 1 or gate.wait_next(), "the caller took no step after sending: no poll"
        answer(n, req, conn)

    with fake_supervisor(sock_path, answers_in_the_poll):
        async with connect(sock_path) as client:
            await polling_client(client, monkeypatch, 10.0)
            with instruments(gate, reader):
                for miner in range(2, 30):
                    gate.arm()
                    with trio.testing.assert_checkpoints():  # a cancel and a schedule point
                        out = await client.submit(make_task(miner))
                    assert out == echo_output(make_task(miner)) and client._quick
            assert reader.steps == 0  # every answer read by its caller's poll


async def test_progress_read_in_the_poll_reaches_its_callback(sock_path, monkeypatch):
    gate, reader = StepGate(trio.lowlevel.current_task()), TaskSteps("Client._run")

    def talkative(n: int, req: dext.Request, conn: socket.socket) -> None:
        if n > 1:
            assert gate.wait_next(), "no poll"
            for done in range(3):
                conn.sendall(dext.encode(dext.Progress(req.id, "vanilla", done, 3)))
        answer(n, req, conn)

    seen: list = []
    with fake_supervisor(sock_path, talkative):
        async with connect(sock_path) as client:
            await polling_client(client, monkeypatch, 10.0)
            with instruments(gate, reader):
                gate.arm()
                out = await client.submit(make_task(2), on_progress=seen.append)
    assert out == echo_output(make_task(2)) and reader.steps == 0
    assert [(p.phase, p.done, p.total) for p in seen] == [("vanilla", d, 3) for d in range(3)]


async def test_a_late_answer_stops_the_poll_until_an_answer_comes_within_it(sock_path, monkeypatch):
    release, held = threading.Event(), threading.Event()

    def holds_the_second(n: int, req: dext.Request, conn: socket.socket) -> None:
        if n == 2:
            held.set()
            release.wait(30)
        answer(n, req, conn)

    with fake_supervisor(sock_path, holds_the_second):
        async with connect(sock_path) as client:
            await polling_client(client, monkeypatch, 1.0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.submit, make_task(2))
                # This task runs once the client polled 1 s in vain and sleeps on the socket.
                await trio.testing.wait_all_tasks_blocked()
                assert await trio.to_thread.run_sync(held.wait, 10)
                release.set()
            assert not client._quick  # the next lone request is not polled for
            assert await client.submit(make_task(3)) == echo_output(make_task(3))
            assert client._quick


async def test_a_frame_breaking_the_protocol_met_in_the_poll_fails_the_connection_saying_so(
    sock_path, monkeypatch
):
    gate = StepGate(trio.lowlevel.current_task())
    breaks = second_in_the_poll(
        gate, lambda conn: conn.sendall(b"\xff" * 8 + b"more bytes the reader must not decode")
    )
    with trio.fail_after(20), fake_supervisor(sock_path, breaks):
        async with connect(sock_path) as client:
            said = await failed_in_the_poll(client, gate, monkeypatch)
            assert isinstance(client._poll_error, dext.FrameTooLarge)  # met by the poll
    assert said.startswith("lost the connection to the supervisor at "), said
    assert "the supervisor broke the protocol: frame length" in said
    assert "exceeds the maximum" in said and "another version of damocles-ext" in said


async def test_the_connection_closed_while_the_client_polls_fails_the_request(
    sock_path, monkeypatch
):
    gate = StepGate(trio.lowlevel.current_task())
    closes = second_in_the_poll(gate, lambda conn: conn.shutdown(socket.SHUT_RDWR))
    with trio.fail_after(20), fake_supervisor(sock_path, closes):
        async with connect(sock_path) as client:
            said = await failed_in_the_poll(client, gate, monkeypatch)
            assert client._poll_error is None  # the end of the stream: the reader's to say
    assert "lost the connection to the supervisor" in said
    assert "the supervisor closed the connection" in said


async def test_a_connection_reset_while_the_client_polls_fails_the_request_saying_so(
    sock_path, monkeypatch
):
    gate = StepGate(trio.lowlevel.current_task())

    def resets_after_the_first(n: int, req: dext.Request, conn: socket.socket) -> None:
        answer(n, req, conn)
        select.select([conn], [], [], 10)  # the second request comes, and is left unread:
        assert gate.wait_next(), "no poll"
        conn.close()  # closed so, the connection is reset

    with trio.fail_after(20), fake_supervisor(sock_path, resets_after_the_first):
        async with connect(sock_path) as client:
            said = await failed_in_the_poll(client, gate, monkeypatch)
            assert isinstance(client._poll_error, ConnectionResetError)  # met by the poll
    assert "the connection broke: cannot read the stream:" in said and "reset by peer" in said


async def test_the_first_lone_request_of_a_connection_is_not_polled_for(sock_path, monkeypatch):
    monkeypatch.setattr(client_module, "ANSWER_POLL", 10.0)
    release, held = threading.Event(), threading.Event()

    def holds_the_first(n: int, req: dext.Request, conn: socket.socket) -> None:
        if n == 1:
            held.set()
            release.wait(30)
        answer(n, req, conn)

    # Polled for, it would hold this trio run for 10 s: past the 5 s given.
    with trio.fail_after(5), fake_supervisor(sock_path, holds_the_first):
        async with connect(sock_path) as client, trio.open_nursery() as nursery:
            nursery.start_soon(client.submit, make_task(1))
            await trio.testing.wait_all_tasks_blocked()
            assert await trio.to_thread.run_sync(held.wait, 10)  # (the server's thread read it)
            release.set()
