"""A frame `run`'s control socket cannot take is refused in a message of its own (Refusal), after
what was answered: it says why (another version; the frame limit and --max-buffer), fails what
the connection had in flight, and clients neither take it for the id-0 "safe to send again"
goodbye nor send the refused request again."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import msgspec
import pytest
import trio
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import make_task

from damocles_ext import __version__
from damocles_ext.client import ReconnectingClient, connect
from damocles_ext.errors import ProverError
from damocles_ext.frontends.control import ControlServer, bind_control_socket
from damocles_ext.protocol import control as control_protocol
from damocles_ext.protocol import dext

# The message set of a client older than Refusal.
OLD_CONTROL_MESSAGES = (
    dext.Hello
    | dext.Request
    | dext.Response
    | dext.Progress
    | dext.Cancel
    | dext.Shutdown
    | control_protocol.StatusRequest
    | control_protocol.StatusReply
)


class Backend:
    """`submit` whose requests run until the test releases them; it notes those cancelled."""

    def __init__(self) -> None:
        self.started: dict[int, trio.Event] = {}
        self.release: dict[int, trio.Event] = {}
        self.cancelled: list[int] = []

    def events(self, miner: int) -> tuple[trio.Event, trio.Event]:
        return (
            self.started.setdefault(miner, trio.Event()),
            self.release.setdefault(miner, trio.Event()),
        )

    async def submit(self, task, *, deadline=None, priority=0, on_progress=None):
        started, release = self.events(task.miner_id)
        started.set()
        try:
            await release.wait()
        except trio.Cancelled:
            self.cancelled.append(task.miner_id)
            raise
        return echo_output(task)


async def serve(nursery, sock_dir: Path, **limits) -> tuple[ControlServer, Backend]:
    backend = Backend()
    server = ControlServer(bind_control_socket(sock_dir / "control.sock"), backend.submit, **limits)
    await nursery.start(server.serve)
    return server, backend


async def raw_connection(server: ControlServer) -> trio.socket.SocketType:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await s.connect(str(server.path))
    return s


async def read_until_closed(sock: trio.socket.SocketType) -> bytes:
    received = b""
    while True:
        try:
            data = await sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


def raw_frame(message: dict) -> bytes:
    payload = msgspec.msgpack.encode(message)
    return len(payload).to_bytes(4, "big") + payload


async def test_a_frame_of_an_unknown_type_is_refused_after_the_answers_naming_the_versions(
    sock_dir, nursery
):
    server, backend = await serve(nursery, sock_dir)
    s = await raw_connection(server)
    decoder = control_protocol.frame_decoder()
    await s.send(
        dext.encode(dext.Request(1, make_task(1))) + dext.encode(dext.Request(2, make_task(2)))
    )
    await backend.events(1)[0].wait()
    backend.events(2)[1].set()
    [answered] = decoder.receive_data(await s.recv(65536))
    assert answered == control_protocol.ControlResponse(2, output=echo_output(make_task(2)))
    # A newer client's message type, while request 1 is in flight.
    await s.send(raw_frame({"type": "status_v2", "id": 3}))
    said = await read_until_closed(s)
    s.close()
    # One Refusal, no Response (request 1 is failed by it, not answered twice), no id-0 goodbye.
    [refusal] = decoder.receive_data(said)
    assert isinstance(refusal, control_protocol.Refusal), refusal
    assert "Invalid value 'status_v2' - at `$.type`" in refusal.error
    assert (
        f"another version of damocles-ext than this supervisor's ({__version__})" in refusal.error
    )
    assert "restart `run` with the client's version" in refusal.error
    assert backend.cancelled == [1]  # its request in flight is cancelled
    assert server.statistics().in_flight == 0
    # A client older than Refusal cannot decode it: a protocol error, not id 0's "send again".
    with pytest.raises(dext.ProtocolError, match="Invalid value 'refusal'"):
        dext.FrameDecoder(message_type=OLD_CONTROL_MESSAGES).receive_data(said)
    async with connect(server.path) as client:  # the supervisor goes on
        backend.events(4)[1].set()
        assert await client.submit(make_task(4)) == echo_output(make_task(4))


async def test_a_client_frame_of_a_message_clients_do_not_send_is_refused_naming_it(
    sock_dir, nursery
):
    server, _ = await serve(nursery, sock_dir)
    s = await raw_connection(server)
    await s.send(dext.encode(dext.Progress(1, "proving")))
    [refusal] = control_protocol.frame_decoder().receive_data(await read_until_closed(s))
    s.close()
    assert isinstance(refusal, control_protocol.Refusal), refusal
    assert "a Progress frame, which no client sends" in refusal.error
    assert f"({__version__})" in refusal.error


@pytest.mark.parametrize("rid", [0, -1])
async def test_a_request_id_below_one_is_refused_not_answered_as_the_connections_goodbye(
    sock_dir, nursery, rid
):
    # Id 0 is the supervisor's, in a Response about the connection ("nothing more was read: send
    # again"): a client counting from 0 had its first answer look like that goodbye.
    server, backend = await serve(nursery, sock_dir)
    s = await raw_connection(server)
    await s.send(dext.encode(dext.Request(rid, make_task(1))))
    [refusal] = control_protocol.frame_decoder().receive_data(await read_until_closed(s))
    s.close()
    assert isinstance(refusal, control_protocol.Refusal), refusal
    assert f"a request with id {rid}: request ids are from 1" in refusal.error
    assert 1 not in backend.started


async def test_clients_breaking_the_protocol_in_a_loop_are_logged_a_line_per_10_s_with_a_count(
    sock_dir, nursery, caplog, autojump_clock
):
    # A client in a retry loop, breaking the protocol on each connection (garbage, a request id
    # 0, a frame only a prover child sends): a line per connection flooded the log.
    caplog.set_level(logging.INFO, "damocles_ext.control")
    server, _ = await serve(nursery, sock_dir)
    frames = [
        b"GET / HTTP/1.1\r\n\r\n",
        dext.encode(dext.Request(0, make_task(1))),
        dext.encode(dext.Progress(1, "proving")),
    ]

    async def break_it(times: int) -> None:
        for i in range(times):
            s = await raw_connection(server)
            await s.send(frames[i % len(frames)])
            [refusal] = control_protocol.frame_decoder().receive_data(await read_until_closed(s))
            s.close()
            assert isinstance(refusal, control_protocol.Refusal), refusal  # each still told

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]

    await break_it(60)
    assert len(said()) == 1 and "control client broke the protocol" in said()[0], said()
    await trio.sleep(11)  # (the mock clock) past the throttle's 10 s
    await break_it(1)
    assert len(said()) == 2, said()
    assert "(59 more like it in the last 10 s)" in said()[1], said()


async def test_a_frame_cut_off_by_a_half_close_gets_no_refusal(sock_dir, nursery, caplog):
    caplog.set_level(logging.INFO, "damocles_ext.control")
    server, _ = await serve(nursery, sock_dir)
    s = await raw_connection(server)
    frame = dext.encode(dext.Request(1, make_task(1)))
    await s.send(frame[: len(frame) // 2])
    s.shutdown(socket.SHUT_WR)
    assert await read_until_closed(s) == b""  # nothing to say to a client that is gone
    s.close()
    # A hang-up (a client killed as it wrote), said as one, not as a protocol error.
    [said] = [r for r in caplog.records if "inside a frame" in r.getMessage()]
    assert said.levelname == "INFO" and "hung up" in said.getMessage()


# 1000 replicas (50 KiB): the frame goes into the socket whole; 20000 (1 MiB): the supervisor closes
# the connection while the client still writes it, and the write fails before the Refusal is read.
@pytest.mark.parametrize("replicas", [1000, 20000])
async def test_an_oversized_frame_is_refused_naming_max_buffer_and_fails_the_clients_requests(
    sock_dir, nursery, replicas
):
    server, backend = await serve(nursery, sock_dir, max_buffered=16 * 1024)
    async with connect(server.path) as client, trio.open_nursery() as inner:
        errors: dict[int, str] = {}

        async def prove(miner: int, replicas: int) -> None:
            with pytest.raises(ProverError) as info:
                await client.submit(make_task(miner, replicas=replicas))
            errors[miner] = str(info.value)

        inner.start_soon(prove, 1, 1)
        await backend.events(1)[0].wait()
        inner.start_soon(prove, 2, replicas)
    assert errors[1] == errors[2], errors  # the one in flight is failed with the same reason
    assert "refused what this client sent" in errors[2]
    assert "over this supervisor's limit of 16384 (run's --max-buffer, 16 KiB)" in errors[2]
    assert "restart `run` with a --max-buffer of at least" in errors[2]
    assert "not proved" in errors[2]
    assert backend.cancelled == [1]


@pytest.mark.parametrize("replicas", [1000, 20000])
async def test_reconnecting_client_does_not_send_a_refused_request_again(
    sock_dir, nursery, replicas
):
    server, backend = await serve(nursery, sock_dir, max_buffered=16 * 1024)
    remote = ReconnectingClient(server.path)
    await remote.connect()
    nursery.start_soon(remote.run)
    with pytest.raises(ProverError, match=r"refused what this client sent.*--max-buffer"):
        await remote.submit(make_task(1, replicas=replicas))
    assert remote.connections == 1 and server.statistics().accepted == 1  # not sent again
    assert 1 not in backend.started
    backend.events(2)[1].set()  # the next request connects again
    assert await remote.submit(make_task(2)) == echo_output(make_task(2))
    assert remote.connections == 2
    await remote.aclose()


async def test_a_request_made_once_a_refusal_arrived_goes_on_a_new_connection(sock_dir, nursery):
    path = sock_dir / "c.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen()
    seen: list[tuple[int, int]] = []
    refused = trio.Event()

    async def supervisor_like() -> None:
        # The first connection refuses its first request and closes only later (a supervisor
        # still unwinding that connection's requests); the second answers.
        for n in (1, 2):
            conn, _ = await listener.accept()
            with conn:
                decoder = control_protocol.frame_decoder()
                while not (msgs := decoder.receive_data(await conn.recv(65536))):
                    pass
                seen.append((n, msgs[0].task.miner_id))
                if n == 1:
                    await conn.send(control_protocol.encode(control_protocol.Refusal("too big")))
                    await refused.wait()
                else:
                    answer = dext.Response(msgs[0].id, output=echo_output(msgs[0].task))
                    await conn.send(dext.encode(answer))
                    await conn.recv(1)

    nursery.start_soon(supervisor_like)
    remote = ReconnectingClient(path)
    await remote.connect()
    nursery.start_soon(remote.run)
    first = remote._client
    assert first is not None

    async def refused_one() -> None:
        with pytest.raises(ProverError, match="too big"):
            await remote.submit(make_task(1))

    nursery.start_soon(refused_one)
    while first._refusal is None:  # until the client has read the Refusal (not its close)
        await trio.lowlevel.checkpoint()
    with trio.fail_after(10), pytest.raises(ProverError, match="refused an earlier frame"):
        await first.submit(make_task(3))  # on that connection: at once, nothing sent
    with trio.fail_after(10):  # (before: sent on the refused connection, never read)
        answered = remote.submit(make_task(2))
        refused.set()
        assert await answered == echo_output(make_task(2))
    assert seen == [(1, 1), (2, 2)]
    await remote.aclose()
    listener.close()
