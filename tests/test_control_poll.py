"""The control server's reader looks for a client's next request without blocking (for up to
pipe_turns.SPIN) once that client sent its last one within SPIN of its lone answer, so that a
client asking one request after the other is not met by a process asleep each time
(frontends/control_connection.py, frontends/inbox.py).

A real supervisor (an `echo` child) behind a real control socket, in this trio run; the client
is a plain blocking socket in a thread of its own, sending each request as soon as it read the
last answer. SPIN is 10 s, so that a request the reader polls for always comes within the poll,
and a poll that should not be made shows as a run that does not sleep when the client waits for
it to (5 s at most). The run's sleeps are counted (`BlockingWaits`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from damocles_ext_plugins.testing import echo_output
from helpers.child import winning_task
from helpers.frontend import make_task, plugin_block, write_config
from helpers.supervisor import BlockingWaits, instruments, wait_until_real

from damocles_ext.api import open_supervisor
from damocles_ext.frontends import control_connection
from damocles_ext.frontends.control import ControlServer, bind_control_socket
from damocles_ext.protocol import control as control_protocol
from damocles_ext.protocol import dext
from damocles_ext.supervisor import pipe_turns

WARM = 5  # requests before the child and the connection are both quick


class PlainClient:
    """A blocking client of the control socket, one request at a time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.decoder = control_protocol.frame_decoder()
        self.next_id = 0

    def ask(self) -> None:
        """Sends the next request and reads until its answer came (an echo of its task)."""
        self.next_id += 1
        task = make_task(self.next_id)
        self.sock.sendall(dext.encode(dext.Request(self.next_id, task)))
        while True:
            data = self.sock.recv(65536)
            assert data, "the control server closed the connection"
            for msg in self.decoder.receive_data(data):
                if isinstance(msg, control_protocol.ControlResponse) and msg.id == self.next_id:
                    assert msg.output == echo_output(task), msg
                    return


async def _serving(sup, sock_dir: Path, nursery) -> ControlServer:
    server = ControlServer(  # as run makes it
        bind_control_socket(sock_dir / "control.sock"),
        sup.submit,
        start=sup.start_nowait,
        batch=sup.batch,
    )
    await nursery.start(server.serve)
    return server


async def _in_a_thread(server: ControlServer, talk: Callable[[PlainClient], None]) -> None:
    """`talk` with a new client of `server`, in a thread, which then hangs up (a reader
    polling for its next request meets the end at once); the run goes on meanwhile."""
    client = PlainClient(server.path)

    def talk_then_hang_up() -> None:
        try:
            talk(client)
        finally:
            client.sock.close()

    await trio.to_thread.run_sync(talk_then_hang_up)


@pytest.fixture
def echo_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, plugin_block("WdPost", "echo"))


async def test_requests_sent_one_after_the_other_are_read_in_the_poll_not_after_a_sleep(
    echo_config, sock_dir, nursery, monkeypatch
):
    monkeypatch.setattr(pipe_turns, "SPIN", 10.0)
    waits = BlockingWaits()
    slept: list[int] = []

    def talk(client: PlainClient) -> None:
        for _ in range(WARM):
            client.ask()
        before = waits.waits
        for _ in range(20):
            client.ask()
        slept.append(waits.waits - before)

    with trio.fail_after(60):
        async with open_supervisor(str(echo_config)) as sup:
            server = await _serving(sup, sock_dir, nursery)
            with instruments(waits):
                await _in_a_thread(server, talk)
    # Each request polled for (not polled: a sleep before each, 20 in all). One sleep is
    # allowed for a warm-up not over (the child's first answers read by its reader).
    assert slept[0] <= 1, slept


async def test_a_request_later_than_spin_stops_the_poll_until_one_comes_within_it_again(
    echo_config, sock_dir, nursery, monkeypatch
):
    monkeypatch.setattr(pipe_turns, "SPIN", 10.0)
    # The reader's clock, which the client moves on by a minute: its next request "came late".
    late = [0.0]
    monkeypatch.setattr(control_connection, "perf_counter", lambda: time.perf_counter() + late[0])
    waits = BlockingWaits()
    seen: dict[str, object] = {}

    def talk(client: PlainClient) -> None:
        for _ in range(WARM):
            client.ask()
        late[0] += 60.0
        waits.slept.clear()  # (the reader polls for this request: it does not sleep now)
        client.ask()  # read in the poll, but a minute after its answer, as the reader sees it
        seen["slept at once after it"] = waits.slept.wait(5)  # polled: 10 s later
        client.ask()  # within SPIN of its answer: polled for again
        before = waits.waits
        client.ask()
        seen["sleeps before the next one"] = waits.waits - before

    with trio.fail_after(60):
        async with open_supervisor(str(echo_config)) as sup:
            server = await _serving(sup, sock_dir, nursery)
            with instruments(waits):
                await _in_a_thread(server, talk)
    assert seen == {"slept at once after it": True, "sleeps before the next one": 0}


async def test_no_poll_while_a_request_of_another_connection_is_in_flight(
    tmp_path, sock_dir, nursery, monkeypatch
):
    # A poll would hold its answer back.
    monkeypatch.setattr(pipe_turns, "SPIN", 10.0)
    cfg = write_config(
        tmp_path,
        plugin_block("WdPost", "echo") + plugin_block("WinPost", "sleep", seconds=600),
    )
    waits = BlockingWaits()
    seen: list[bool] = []

    def talk(client: PlainClient) -> None:
        for _ in range(WARM):
            client.ask()
        for _ in range(5):
            waits.slept.clear()
            client.ask()
            seen.append(waits.slept.wait(5))  # polled: 10 s later

    with trio.fail_after(60):
        async with open_supervisor(str(cfg)) as sup:
            server = await _serving(sup, sock_dir, nursery)
            other = await trio.open_unix_socket(str(server.path))
            await other.send_all(dext.encode(dext.Request(1, winning_task())))
            await wait_until_real(lambda: server.owed == 1, what="the other request read")
            with instruments(waits):
                await _in_a_thread(server, talk)
            await other.aclose()
    assert seen == [True] * 5
