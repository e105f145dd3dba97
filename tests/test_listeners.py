"""What clients can hold of `run`: the control socket and the metrics port survive running out of
file descriptors, cap their connections, close idle ones, and bound the bytes of unfinished
frames; a real `run` started with a low RLIMIT_NOFILE keeps proving and stops with exit 0."""

from __future__ import annotations

import gzip
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import h11
import psutil
import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers import frontend
from helpers.frontend import (
    DEXT,
    LogWatcher,
    make_task,
    plugin_block,
    write_config,
)

from damocles_ext.client import ReconnectingClient, connect
from damocles_ext.errors import ProverError
from damocles_ext.frontends.control import ControlServer, bind_control_socket
from damocles_ext.protocol import dext

# Low enough that a test floods it with a hundred connections, high enough for Python, trio,
# one child's pipes and the process-group guardian.
LOW_NOFILE = 64


async def start_run(
    nursery: trio.Nursery, cfg: Path, socket_path: Path, *extra: str, nofile: int | None = None
) -> tuple[trio.Process, LogWatcher]:
    """`damocles-ext run` once its child is ready too: these tests prove through it at once."""
    process, watcher = await frontend.start_run(nursery, cfg, socket_path, *extra, nofile=nofile)
    with trio.fail_after(30):
        await watcher.wait_for("ready (dext)")
    return process, watcher


async def stop(run: trio.Process, log: LogWatcher) -> None:
    run.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        code = await run.wait()
    assert code == 0, log.text()[-3000:]
    assert "Traceback" not in log.text(), log.text()[-3000:]


def open_fds(pid: int) -> int:
    return psutil.Process(pid).num_fds()


async def wait_closed_by_peer(sock: trio.socket.SocketType) -> bytes:
    """Wait until the other end closes `sock` (EOF or reset); what it sent before."""
    received = b""
    while True:
        try:
            data = await sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return received
        if not data:
            return received
        received += data


# -- the control socket, in a real `run` with few descriptors ---------------------------------


async def test_run_out_of_descriptors_at_the_control_socket_keeps_proving_and_stops_with_0(
    tmp_path, sock_dir
):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    path = sock_dir / "control.sock"
    flood: list[trio.socket.SocketType] = []
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, path, nofile=LOW_NOFILE)
        try:
            with trio.fail_after(60):
                # More idle connections than the process has descriptors: accept hits EMFILE.
                for _ in range(100):
                    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    await s.connect(str(path))
                    flood.append(s)
                await log.wait_for("accept failed with EMFILE")
                # Every descriptor is in use (the flood took what the idle ones freed) ...
                assert open_fds(run.pid) >= LOW_NOFILE - 2
                # ... and a real client is still served: an idle connection makes room for it.
                async with connect(path) as client:
                    assert await client.submit(make_task(5)) == echo_output(make_task(5))
                # Idle flood connections were closed to free descriptors, not served forever.
                await wait_closed_by_peer(flood[0])
                # Fill the table again (the client's descriptor came back when it left): the
                # last of these connections is served once accepted, so all were.
                for _ in range(5):
                    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    await s.connect(str(path))
                    flood.append(s)
                await s.send(dext.encode(dext.Request(1, make_task(10))))
                [answer] = dext.FrameDecoder().receive_data(await s.recv(65536))
                assert answer.output == echo_output(make_task(10))
                # (All but at most one: a closing connection may free one after the last
                # accept.) SIGTERM still stops it cleanly.
                assert open_fds(run.pid) >= LOW_NOFILE - 1
                await stop(run, log)
        finally:
            for s in flood:
                s.close()
            if run.returncode is None:
                run.kill()
            nursery.cancel_scope.cancel()
    assert not path.exists()


def peak_rss(pid: int) -> int:
    """The process's resident memory high-water mark (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


async def test_run_holding_partial_frames_of_many_clients_stays_under_its_buffer_cap(
    tmp_path, sock_dir
):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    path = sock_dir / "control.sock"
    clients, each = 8, 12 * 2**20  # 96 MiB of unfinished frames offered, 16 MiB allowed
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, path, "--max-buffer", "16M")
        held: list[trio.socket.SocketType] = []
        dropped = []
        try:
            with trio.fail_after(60):
                before = peak_rss(run.pid)

                async def hold_a_partial_frame() -> None:
                    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    held.append(s)
                    await s.connect(str(path))
                    # A 16 MiB frame that never ends: its header, then 12 MiB of it.
                    data = memoryview((16 * 2**20 - 1).to_bytes(4, "big") + bytes(each))
                    try:
                        while data:
                            data = data[await s.send(data[: 2**20]) :]
                    except (BrokenPipeError, ConnectionResetError):
                        dropped.append(s)

                async with trio.open_nursery() as flood:
                    for _ in range(clients):
                        flood.start_soon(hold_a_partial_frame)
                grown = peak_rss(run.pid) - before
                assert grown < 56 * 2**20, f"peak RSS grew {grown / 2**20:.0f} MiB"
                # Over the cap, the connections holding most were closed.
                assert len(dropped) >= clients - 2, log.text()[-2000:]
                await log.wait_for("over the limit of 16 MiB (--max-buffer)")
                async with connect(path) as client:
                    assert await client.submit(make_task(3)) == echo_output(make_task(3))
                await stop(run, log)
        finally:
            for s in held:
                s.close()
            if run.returncode is None:
                run.kill()
            nursery.cancel_scope.cancel()


# -- the control server's limits, in process (a backend whose requests end when told) -----------


class Backend:
    """`submit` whose requests run until the test releases them."""

    def __init__(self) -> None:
        self.started: dict[int, trio.Event] = {}
        self.release: dict[int, trio.Event] = {}

    def events(self, miner: int) -> tuple[trio.Event, trio.Event]:
        return (
            self.started.setdefault(miner, trio.Event()),
            self.release.setdefault(miner, trio.Event()),
        )

    async def submit(self, task, *, deadline=None, priority=0, on_progress=None):
        started, release = self.events(task.miner_id)
        started.set()
        await release.wait()
        return echo_output(task)


async def serve_control(nursery, sock_dir: Path, **limits) -> tuple[ControlServer, Backend]:
    backend = Backend()
    server = ControlServer(bind_control_socket(sock_dir / "control.sock"), backend.submit, **limits)
    await nursery.start(server.serve)
    return server, backend


async def raw_connection(server: ControlServer) -> trio.socket.SocketType:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await s.connect(str(server.path))
    return s


async def test_a_connection_closed_to_make_room_as_its_request_arrives_acts_on_none_of_it(
    sock_dir, nursery
):
    # The idlest connection is closed for a new one in the very pass of trio's loop in which its
    # reader was woken for a request: its reader reads before it meets the cancel (a read that
    # needs no wait is no checkpoint). The request must not be started (and then dropped with
    # the connection, its client told nothing): the goodbye says nothing more was read, so the
    # client sends it again (ReconnectingClient does).
    from damocles_ext.frontends.control_connection import Connection

    server, backend = await serve_control(nursery, sock_dir)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        theirs.sendall(dext.encode(dext.Request(1, make_task(1))))
        conn = Connection(server, trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        conn.evict("room for a new connection")  # before its reader ran: it finds the bytes
        with trio.fail_after(10):
            await conn.run()
        theirs.setblocking(False)  # (what was written by now, or nothing)
        try:
            said = dext.FrameDecoder().receive_data(theirs.recv(65536))
        except BlockingIOError:
            said = []
    assert 1 not in backend.started
    [goodbye] = said
    assert goodbye.id == 0 and "before reading more from it: room for a new" in goodbye.error
    assert server.statistics().in_flight == 0


async def test_over_the_connection_cap_the_idlest_makes_room_or_the_new_one_hears_why_not(
    sock_dir, nursery
):
    server, backend = await serve_control(nursery, sock_dir, max_connections=2)
    async with connect(server.path) as a, connect(server.path) as b, trio.open_nursery() as busy:
        results = {}

        async def prove(client, miner: int) -> None:
            results[miner] = await client.submit(make_task(miner))

        busy.start_soon(prove, a, 1)
        busy.start_soon(prove, b, 2)
        await backend.events(1)[0].wait()
        await backend.events(2)[0].wait()
        # Both connections have a request in flight: a third is refused, and told why.
        with pytest.raises(ProverError, match=r"too many connections \(2 open, all busy"):
            async with connect(server.path) as c:
                await c.submit(make_task(3))
        assert server.statistics().refused == 1
        # serve --connect's client, refused at both tries, says so (not "stopped or restarted?").
        remote = ReconnectingClient(server.path)
        async with trio.open_nursery() as reading:
            reading.start_soon(remote.run)
            with pytest.raises(ProverError) as refused:
                await remote.submit(make_task(4))
            reading.cancel_scope.cancel()
        said = str(refused.value)
        assert "closed the connection before it answered" in said and "too many" in said, said
        assert "stopped or restarted" not in said
        # Once `a` is idle, a new connection closes it (the idlest) and is served.
        backend.events(1)[1].set()
        while 1 not in results:
            await trio.testing.wait_all_tasks_blocked()
        backend.events(4)[1].set()
        async with connect(server.path) as d:
            assert await d.submit(make_task(4)) == echo_output(make_task(4))
        # `a` was told why before the close.
        while a._lost is None:
            await trio.testing.wait_all_tasks_blocked()
        assert "closed the connection before reading more from it: control socket: 2" in a._lost
        with pytest.raises(ProverError, match="closed the connection before reading more"):
            await a.submit(make_task(5))
        # `b`, busy all along, was left alone.
        backend.events(2)[1].set()
    assert results == {1: echo_output(make_task(1)), 2: echo_output(make_task(2))}
    stats = server.statistics()
    assert (stats.evicted, stats.refused) == (1, 3)  # (c once, serve --connect's client twice)


async def test_an_idle_connection_is_closed_but_one_with_a_request_in_flight_is_not(
    sock_dir, nursery, autojump_clock
):
    server, backend = await serve_control(nursery, sock_dir, idle_timeout=600)
    async with connect(server.path) as busy_client, trio.open_nursery() as requests:
        answer = []

        async def prove() -> None:
            answer.append(await busy_client.submit(make_task(1)))

        requests.start_soon(prove)
        await backend.events(1)[0].wait()
        start = trio.current_time()
        idle = await raw_connection(server)
        # Closed, with a word that nothing more was read (a crossing request can be resent).
        [goodbye] = dext.FrameDecoder().receive_data(await wait_closed_by_peer(idle))
        idle.close()
        assert goodbye.id == 0 and "idle for 600 s (run's --idle-timeout)" in goodbye.error
        assert 600 <= trio.current_time() - start < 601
        assert server.statistics().idle_closed == 1
        # A WindowPoSt may run for half an hour: its connection stays.
        await trio.sleep(3600)
        backend.events(1)[1].set()
    assert answer == [echo_output(make_task(1))]
    # Bytes arriving keep a connection too, and the timeout counts from the last of them.
    trickle = await raw_connection(server)
    frame = dext.encode(dext.Request(1, make_task(2)))
    start = trio.current_time()
    for byte in frame[:-1]:
        await trio.sleep(500)
        await trickle.send(bytes([byte]))
    await wait_closed_by_peer(trickle)
    trickle.close()
    assert 600 <= trio.current_time() - start - 500 * (len(frame) - 1) < 601


async def test_a_request_written_as_the_idle_timeout_runs_out_is_read_and_answered(
    sock_dir, nursery, autojump_clock
):
    # The request is in the socket, unread, when the connection's idle time is up: the idle
    # watch and the reader wake in the same pass of trio's loop, in either order (hence several
    # rounds). The request is read and answered; the connection is not closed under it.
    server, backend = await serve_control(nursery, sock_dir, idle_timeout=600)
    for miner in range(1, 9):
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        plain.connect(str(server.path))
        await trio.testing.wait_all_tasks_blocked()  # accepted, idle, its watch asleep
        plain.sendall(dext.encode(dext.Request(miner, make_task(miner))))
        autojump_clock.jump(600)  # no checkpoint since the write: nothing has read it yet
        client = trio.socket.from_stdlib_socket(plain)
        started, release = backend.events(miner)
        with trio.fail_after(60):
            await started.wait()
            release.set()
            [answer] = dext.FrameDecoder().receive_data(await client.recv(65536))
        assert (answer.id, answer.output) == (miner, echo_output(make_task(miner)))
        client.close()
    assert server.statistics().idle_closed == 0


async def test_unfinished_frames_over_the_buffer_cap_close_the_connection_holding_most(
    sock_dir, nursery
):
    cap = 4 * 2**20
    server, backend = await serve_control(nursery, sock_dir, max_buffered=cap)
    header = (cap - 1).to_bytes(4, "big")  # a frame that will never be finished
    sizes = (3 * 2**20, 2 * 2**20, 1 * 2**20)
    held = []
    for size in sizes:
        s = await raw_connection(server)
        await s.send(header)
        sent = 0
        while sent < size:
            sent += await s.send(b"x" * min(65536, size - sent))
        held.append(s)  # (send returns once the server has read nearly all of it)
    # 6 MiB would be held: the connection holding 3 MiB is closed, the others stay.
    await wait_closed_by_peer(held[0])
    while server.statistics().buffered < sum(sizes[1:]) - 2**20:  # the rest in the kernel
        await trio.testing.wait_all_tasks_blocked()
    stats = server.statistics()
    assert stats.over_buffer == 1
    assert stats.buffered <= cap
    assert stats.connections == 2
    # And a frame longer than the whole budget is refused from its header.
    big = await raw_connection(server)
    await big.send((cap + 1).to_bytes(4, "big"))
    await wait_closed_by_peer(big)
    for s in (*held, big):
        s.close()
    # The server goes on.
    backend.events(7)[1].set()
    async with connect(server.path) as client:
        assert await client.submit(make_task(7)) == echo_output(make_task(7))


# -- the metrics port ---------------------------------------------------------------------------


async def metrics_url(log: LogWatcher) -> str:
    line = await log.wait_for("metrics on http://127.0.0.1:")
    return line.split("metrics on ", 1)[1].strip()


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


async def scrape(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=20) as response:
            assert response.status == 200
            return response.read().decode()

    return await trio.to_thread.run_sync(get)


async def tcp_connection(url: str) -> trio.socket.SocketType:
    s = trio.socket.socket()
    await s.connect(address(url))
    return s


async def http_exchange(url: str, request: bytes) -> bytes:
    """Send `request` on a new connection; everything the server sends before closing."""
    s = await tcp_connection(url)
    with s:
        await s.send(request)
        received = b""
        while True:
            try:
                data = await s.recv(65536)
            except ConnectionResetError:
                return received
            if not data:
                return received
            received += data


async def test_idle_metrics_connections_do_not_stop_a_scrape_and_are_closed_after_the_timeout(
    tmp_path, sock_dir
):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, sock_dir / "control.sock",
                                   "--metrics", "127.0.0.1:0", "--metrics-max-connections", "4",
                                   "--metrics-idle-timeout", "1")  # fmt: skip
        held: list[trio.socket.SocketType] = []
        try:
            with trio.fail_after(60):
                url = await metrics_url(log)
                # Silent connections, and slow ones that never finish their request head.
                for i in range(10):
                    s = await tcp_connection(url)
                    if i % 2:
                        await s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    held.append(s)
                text = await scrape(url)
                assert "damocles_ext_child_state" in text
                # Over the cap of 4, the idlest went at once; the rest after the idle timeout.
                for s in held:
                    await wait_closed_by_peer(s)
                await log.wait_for("metrics port: 4 connections are open (the limit)")
                # Keep-alive: one connection, several scrapes, then the idle timeout ends it.
                s = await tcp_connection(url)
                held.append(s)
                client = h11.Connection(h11.CLIENT)
                for _ in range(2):
                    await s.send(client.send(h11.Request(method="GET", target="/metrics",
                                                         headers=[("Host", "x")])))  # fmt: skip
                    await s.send(client.send(h11.EndOfMessage()))
                    events = []
                    while not events or not isinstance(events[-1], h11.EndOfMessage):
                        event = client.next_event()
                        if event is h11.NEED_DATA:
                            client.receive_data(await s.recv(65536))
                        else:
                            events.append(event)
                    assert events[0].status_code == 200
                    client.start_next_cycle()
                await wait_closed_by_peer(s)
                # A request head over 16 KiB, or something else than GET, is refused: also one
                # that arrives whole in one read, with no part of it over the limit alone.
                for length in (16_400, 40_000):
                    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * length
                    answer = await http_exchange(url, head + b"\r\n\r\n")
                    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
                answer = await http_exchange(
                    url, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                )
                assert answer.startswith(b"HTTP/1.1 405 "), answer[:200]
                # What prometheus_client's server offered: gzip, and a filter by name.
                answer = await http_exchange(
                    url, b"GET /metrics?name[]=damocles_ext_requests_total HTTP/1.1\r\nHost: x\r\n"
                    b"Accept-Encoding: gzip\r\nConnection: close\r\n\r\n",
                )  # fmt: skip
                head, _, body = answer.partition(b"\r\n\r\n")
                assert b"Content-Encoding: gzip" in head, head
                text = gzip.decompress(body).decode()
                assert "damocles_ext_requests_total{" in text
                assert "damocles_ext_child_state" not in text
                # Also the gauges read at scrape time and the process collector's.
                names = "name[]=damocles_ext_child_state&name[]=process_resident_memory_bytes"
                text = await scrape(url.replace("/metrics", f"/metrics?{names}"))
                assert (
                    "damocles_ext_child_state{" in text and "process_resident_memory_bytes " in text
                )
                assert "damocles_ext_requests_total" not in text
                await stop(run, log)
        finally:
            for s in held:
                s.close()
            if run.returncode is None:
                run.kill()
            nursery.cancel_scope.cancel()


async def test_metrics_port_out_of_descriptors_still_answers_a_scrape_and_stops_with_0(
    tmp_path, sock_dir
):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, sock_dir / "control.sock",
                                   "--metrics", "127.0.0.1:0", "--metrics-max-connections", "1000",
                                   nofile=LOW_NOFILE)  # fmt: skip
        held: list[trio.socket.SocketType] = []
        try:
            with trio.fail_after(60):
                url = await metrics_url(log)
                for _ in range(100):
                    held.append(await tcp_connection(url))
                await log.wait_for("metrics port: accept failed with EMFILE")
                assert open_fds(run.pid) >= LOW_NOFILE - 2
                assert "damocles_ext_child_state" in await scrape(url)
                await stop(run, log)
        finally:
            for s in held:
                s.close()
            if run.returncode is None:
                run.kill()
            nursery.cancel_scope.cancel()


# -- a request crossing the supervisor's close --------------------------------------------------


async def test_a_request_crossing_an_idle_close_is_sent_again_on_a_new_connection(
    sock_dir, nursery
):
    from damocles_ext.client import ReconnectingClient

    path = sock_dir / "c.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen()
    seen: list[int] = []

    async def supervisor_like() -> None:
        # The first connection closes the way an idle one does, while the request is on its way
        # (here: already arrived, the worst case); the second answers it.
        for n in (1, 2):
            conn, _ = await listener.accept()
            with conn:
                decoder = dext.FrameDecoder()
                request = None
                while request is None:
                    for msg in decoder.receive_data(await conn.recv(65536)):
                        request = msg
                seen.append(n)
                if n == 1:
                    await conn.send(dext.encode(dext.Response(0, error="idle for 600 s")))
                else:
                    output = echo_output(request.task)
                    await conn.send(dext.encode(dext.Response(request.id, output=output)))
                    await conn.recv(1)  # until the client goes

    nursery.start_soon(supervisor_like)
    remote = ReconnectingClient(path)
    await remote.connect()
    nursery.start_soon(remote.run)
    assert await remote.submit(make_task(4)) == echo_output(make_task(4))
    assert seen == [1, 2] and remote.connections == 2
    await remote.aclose()
    listener.close()


# -- the settings -------------------------------------------------------------------------------


def test_run_defaults_for_the_limits_are_those_of_the_servers():
    from damocles_ext import metrics
    from damocles_ext.commands import run
    from damocles_ext.frontends import control

    assert run.DEFAULT_MAX_CONNECTIONS == control.DEFAULT_MAX_CONNECTIONS
    assert run.DEFAULT_IDLE_TIMEOUT == control.DEFAULT_IDLE_TIMEOUT
    assert run.DEFAULT_MAX_BUFFERED == control.DEFAULT_MAX_BUFFERED
    assert run.DEFAULT_METRICS_MAX_CONNECTIONS == metrics.DEFAULT_MAX_CONNECTIONS
    assert run.DEFAULT_METRICS_IDLE_TIMEOUT == metrics.DEFAULT_IDLE_TIMEOUT


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-connections", "0", "--max-connections: must be at least 1, got 0"),
        ("--metrics-max-connections", "many", "not a whole number: 'many'"),
        ("--idle-timeout", "0", "--idle-timeout: must be a positive duration"),
        ("--metrics-idle-timeout", "soon", "'soon' is not a duration"),
        ("--max-buffer", "lots", "'lots' is not a size"),
        ("--max-buffer", "4K", "'4K' is under 1 MiB"),
        ("--restart-delay", "inf", "must be a finite number of seconds"),
    ],
)
def test_bad_limit_settings_exit_2_saying_what_is_wrong(tmp_path, option, value, message):
    from helpers.frontend import dext_run

    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    done = dext_run("run", "-c", str(cfg), "--socket", str(tmp_path / "c.sock"), option, value)
    assert done.returncode == 2
    err = done.stderr.decode()
    assert message in err and "Traceback" not in err, err


async def test_serve_connect_goes_on_proving_across_idle_closes_of_its_connection(
    tmp_path, sock_dir
):
    from helpers.frontend import ManagerLike

    from damocles_ext.protocol import jsonl

    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    path = sock_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, path, "--idle-timeout", "1")
        try:
            with trio.fail_after(60):
                m = await ManagerLike.start(
                    nursery,
                    [*DEXT, "serve", "window_post", "--connect", str(path)],
                    "window_post",
                    stderr=subprocess.PIPE,
                )
                for miner in (1, 2):
                    r = await m.request(make_task(miner))
                    assert r == jsonl.JsonResponse(miner, echo_output(make_task(miner)), None)
                    # Idle after its answer: run closes the connection, and says why.
                    line = await m.wait_log("before reading more from it: idle")
                    assert " INFO " in line, line  # routine: not a warning
                    m.log.clear()
                await m.close_stdin()
                assert await m.process.wait() == 0
                assert not [line for line in m.log if "WARNING" in line], m.log
                await stop(run, log)
        finally:
            if run.returncode is None:
                run.kill()
            nursery.cancel_scope.cancel()


class GatedStatus:
    """A status source that counts its calls and answers once the test sets `release`."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = trio.Event()

    async def __call__(self) -> dict:
        self.calls += 1
        await self.release.wait()
        return {"calls": self.calls}


async def serve_gated_status(nursery, sock_dir: Path) -> tuple[ControlServer, GatedStatus]:
    status = GatedStatus()
    server = ControlServer(
        bind_control_socket(sock_dir / "c.sock"), Backend().submit, status=status
    )
    await nursery.start(server.serve)
    return server, status


async def test_status_requests_sent_without_reading_the_replies_are_answered_a_few_at_a_time(
    sock_dir, nursery
):
    from damocles_ext.frontends.control_status import MAX_STATUS_IN_FLIGHT
    from damocles_ext.protocol import control as control_protocol

    server, status = await serve_gated_status(nursery, sock_dir)
    s = await raw_connection(server)
    await s.send(b"".join(control_protocol.encode(control_protocol.StatusRequest(i))
                          for i in range(1, 1001)))  # fmt: skip
    await trio.testing.wait_all_tasks_blocked()
    # Not a task (and a /proc walk) per request: the connection waits for its replies to go.
    assert status.calls == MAX_STATUS_IN_FLIGHT
    status.release.set()
    decoder = control_protocol.frame_decoder()
    replies = []
    while len(replies) < 1000:
        replies += decoder.receive_data(await s.recv(65536))
    assert sorted(r.id for r in replies) == list(range(1, 1001))
    assert status.calls == 1000
    s.close()


async def test_status_requests_past_the_server_wide_bound_get_an_error_reply_at_once(
    sock_dir, nursery
):
    from damocles_ext.frontends.control_status import (
        MAX_STATUS_IN_FLIGHT,
        MAX_STATUS_IN_FLIGHT_SERVER,
    )
    from damocles_ext.protocol import control as control_protocol

    server, status = await serve_gated_status(nursery, sock_dir)
    # Each connection within its own bound, together at the server's.
    full = MAX_STATUS_IN_FLIGHT_SERVER // MAX_STATUS_IN_FLIGHT
    conns = [await raw_connection(server) for _ in range(full + 1)]
    for n, s in enumerate(conns[:full]):
        ids = range(n * MAX_STATUS_IN_FLIGHT + 1, (n + 1) * MAX_STATUS_IN_FLIGHT + 1)
        await s.send(b"".join(control_protocol.encode(control_protocol.StatusRequest(i))
                              for i in ids))  # fmt: skip
    await trio.testing.wait_all_tasks_blocked()
    assert status.calls == MAX_STATUS_IN_FLIGHT_SERVER
    # One more, on a connection with nothing in flight: an error reply at once, no /proc walk.
    last = conns[-1]
    await last.send(control_protocol.encode(control_protocol.StatusRequest(1000)))
    decoder = control_protocol.frame_decoder()
    with trio.fail_after(10):  # (without the bound it would wait for `release`)
        [refused] = decoder.receive_data(await last.recv(65536))
    assert refused.id == 1000 and refused.status is None
    assert f"{MAX_STATUS_IN_FLIGHT_SERVER} status requests are being answered" in refused.error
    assert status.calls == MAX_STATUS_IN_FLIGHT_SERVER
    assert server.statistics().status_refused == 1
    # The others are answered once their status is ready, and the bound frees with them.
    status.release.set()
    for n, s in enumerate(conns[:full]):
        replies, d = [], control_protocol.frame_decoder()
        while len(replies) < MAX_STATUS_IN_FLIGHT:
            replies += d.receive_data(await s.recv(65536))
        assert all(r.status is not None for r in replies)
        assert sorted(r.id for r in replies) == list(
            range(n * MAX_STATUS_IN_FLIGHT + 1, (n + 1) * MAX_STATUS_IN_FLIGHT + 1)
        )
    await last.send(control_protocol.encode(control_protocol.StatusRequest(1001)))
    [served] = decoder.receive_data(await last.recv(65536))
    assert served.id == 1001 and served.status == {"calls": MAX_STATUS_IN_FLIGHT_SERVER + 1}
    for s in conns:
        s.close()


async def test_a_connection_closed_for_the_buffer_cap_refuses_its_whole_frames_and_says_goodbye(
    sock_dir, nursery
):
    cap = 100_000
    server, backend = await serve_control(nursery, sock_dir, max_buffered=cap)
    header = (cap - 1).to_bytes(4, "big")  # frames that will never be finished
    other = await raw_connection(server)
    await other.send(header + b"x" * 40_000)
    while server.statistics().buffered < 40_000:
        await trio.testing.wait_all_tasks_blocked()
    # One read brings a whole request and the start of a frame that puts this connection, now
    # holding the most, over the cap.
    s = await raw_connection(server)
    await s.send(dext.encode(dext.Request(1, make_task(1))) + header + b"x" * 70_000)
    [goodbye] = dext.FrameDecoder().receive_data(await wait_closed_by_peer(s))
    s.close()
    assert goodbye.id == 0
    assert "closed the connection before reading more from it" in goodbye.error
    assert "(--max-buffer)" in goodbye.error
    # The request was not read, as the goodbye says: the client may send it again elsewhere.
    assert not backend.events(1)[0].is_set()
    stats = server.statistics()
    assert (stats.over_buffer, stats.connections, stats.requests) == (1, 1, 0)
    other.close()


async def a_status_asked(nursery, sock_dir):
    """A server whose status answer waits for the test, and a raw client whose status request
    7 it is answering: (server, the gated status, the client's socket)."""
    from damocles_ext.protocol import control as control_protocol

    server, status = await serve_gated_status(nursery, sock_dir)
    s = await raw_connection(server)
    await s.send(control_protocol.encode(control_protocol.StatusRequest(7)))
    await trio.testing.wait_all_tasks_blocked()
    assert status.calls == 1
    return server, status, s


async def test_a_stopping_server_waits_for_the_status_requests_in_flight_too(sock_dir, nursery):
    # `run` stopping waits (wait_idle) for what its clients asked before it closes their
    # connections: a `status` asked as it stops is answered, not cut off.
    from damocles_ext.protocol import control as control_protocol

    server, status, s = await a_status_asked(nursery, sock_dir)
    server.stop_accepting()
    idle = trio.Event()

    async def wait_idle() -> None:
        await server.wait_idle()
        idle.set()

    nursery.start_soon(wait_idle)
    await trio.testing.wait_all_tasks_blocked()
    assert not idle.is_set()
    status.release.set()
    [reply] = control_protocol.frame_decoder().receive_data(await s.recv(65536))
    assert reply.id == 7 and reply.status == {"calls": 1}
    with trio.fail_after(10):
        await idle.wait()
    s.close()


async def test_a_client_that_shuts_only_its_sending_side_gets_its_status_replies(sock_dir, nursery):
    # As its requests' answers: the status replies it asked for before its shutdown(SHUT_WR)
    # are written, then the connection is closed; before, they were dropped.
    from damocles_ext.protocol import control as control_protocol

    _, status, s = await a_status_asked(nursery, sock_dir)
    s.shutdown(socket.SHUT_WR)
    await trio.testing.wait_all_tasks_blocked()
    status.release.set()
    decoder, replies = control_protocol.frame_decoder(), []
    with trio.fail_after(10):
        while data := await s.recv(65536):  # until the server closes the connection
            replies += decoder.receive_data(data)
    assert [(r.id, r.status) for r in replies] == [(7, {"calls": 1})]
    s.close()
