"""`damocles-ext run` / `prove` and the control socket: placement and permissions of the socket,
the dext conversation over it, and the prove command end to end with real children."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest
import trio

from damocles_ext.client import NoSupervisorError, connect
from damocles_ext.errors import ProverError, UsageError
from damocles_ext.protocol import dext
from damocles_ext.supervisor.control import (
    ControlServer,
    bind_control_socket,
    default_socket_path,
    peer_uid,
)
from damocles_ext_plugins.testing import echo_output
from helpers_frontend import make_task

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be long.
    d = Path(f"/tmp/dext-t{os.getpid()}-{tmp_path.name[-20:]}")
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
    d.rmdir()


# -- where the socket goes and who may reach it ----------------------------------------------------


def test_default_socket_path_prefers_xdg_runtime_dir():
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/1000"}) == Path(
        "/run/user/1000/damocles-ext/control.sock"
    )
    assert default_socket_path({}) == Path("/run/damocles-ext/control.sock")


def test_socket_is_0600_inside_a_created_0700_directory(sock_dir: Path):
    path = sock_dir / "sub" / "control.sock"
    old = os.umask(0o022)
    try:
        sock = bind_control_socket(path)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        sock.close()


def test_symlinked_socket_directory_is_refused(sock_dir: Path):
    real = sock_dir / "real"
    real.mkdir(mode=0o700)
    (sock_dir / "link").symlink_to(real)
    with pytest.raises(UsageError, match="is a symlink"):
        bind_control_socket(sock_dir / "link" / "control.sock")
    assert list(real.iterdir()) == []


def test_symlinked_socket_path_is_refused(sock_dir: Path):
    target = sock_dir / "elsewhere.sock"
    (sock_dir / "control.sock").symlink_to(target)
    with pytest.raises(UsageError, match="control.sock is a symlink"):
        bind_control_socket(sock_dir / "control.sock")


def test_group_readable_directory_is_refused_with_the_fix(sock_dir: Path):
    d = sock_dir / "open"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(UsageError, match=r"mode 0755.*chmod 700"):
        bind_control_socket(d / "control.sock")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a directory to another user")
def test_directory_owned_by_another_user_is_refused(sock_dir: Path):
    d = sock_dir / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(UsageError, match="owned by uid 65534"):
        bind_control_socket(d / "control.sock")


def test_regular_file_at_socket_path_is_not_replaced(sock_dir: Path):
    path = sock_dir / "control.sock"
    path.write_text("precious")
    with pytest.raises(UsageError, match="is not a socket"):
        bind_control_socket(path)
    assert path.read_text() == "precious"


def test_stale_socket_is_replaced(sock_dir: Path):
    path = sock_dir / "control.sock"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(path))
    old.close()  # the file stays, nobody listens
    sock = bind_control_socket(path)
    try:
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(path))  # refused if the stale file were still there
        probe.close()
    finally:
        sock.close()


def test_live_socket_is_not_taken_over(sock_dir: Path):
    path = sock_dir / "control.sock"
    first = bind_control_socket(path)
    try:
        with pytest.raises(UsageError, match=f"another damocles-ext run is listening on {path}"):
            bind_control_socket(path)
    finally:
        first.close()


def test_too_long_socket_path_is_a_usage_error(sock_dir: Path):
    with pytest.raises(UsageError, match="at most 107"):
        bind_control_socket(sock_dir / ("x" * 120))


# -- the dext conversation, against an in-process submit function ---------------------------------


class FakeBackend:
    """A submit function whose requests finish when the test says so: the control server's own
    logic is tested here; the supervisor behind it is tested with real children below."""

    def __init__(self) -> None:
        self.release: dict[int, trio.Event] = {}
        self.started: dict[int, trio.Event] = {}
        self.cancelled: set[int] = set()

    def _events(self, miner: int) -> tuple[trio.Event, trio.Event]:
        self.release.setdefault(miner, trio.Event())
        self.started.setdefault(miner, trio.Event())
        return self.release[miner], self.started[miner]

    async def submit(self, task, *, deadline=None, priority=0, on_progress=None):
        release, started = self._events(task.miner_id)
        if task.miner_id == 13:
            raise ProverError(f"miner 13 is unlucky (deadline={deadline}, priority={priority})")
        if on_progress is not None:
            on_progress(dext.Progress(12345, "waiting", 0, 1))
        started.set()
        try:
            await release.wait()
        except trio.Cancelled:
            self.cancelled.add(task.miner_id)
            raise
        return echo_output(task)


@pytest.fixture
async def control(sock_dir: Path, nursery):
    backend = FakeBackend()
    server = ControlServer(bind_control_socket(sock_dir / "control.sock"), backend.submit)
    await nursery.start(server.serve)
    return server, backend


async def test_requests_on_one_connection_are_answered_by_id_in_any_order(control):
    server, backend = control
    results: dict[int, object] = {}
    progress: list[tuple] = []
    async with connect(server.path) as client:
        async with trio.open_nursery() as nursery:
            async def one(miner: int) -> None:
                results[miner] = await client.submit(
                    make_task(miner), on_progress=lambda p: progress.append((miner, p))
                )
            for miner in (1, 2, 3):
                nursery.start_soon(one, miner)
            for miner in (3, 1, 2):  # finish out of order
                await backend._events(miner)[1].wait()
                backend.release[miner].set()
    assert results == {m: echo_output(make_task(m)) for m in (1, 2, 3)}
    # Progress is re-addressed to the client's own request ids (1, 2, 3 in start order).
    assert sorted(m for m, _ in progress) == [1, 2, 3]
    assert all((p.phase, p.done, p.total) == ("waiting", 0, 1) for _, p in progress)
    assert sorted(p.id for _, p in progress) == [1, 2, 3]
    assert server.statistics().requests == 3


async def test_prover_error_comes_back_as_prover_error_with_its_message(control):
    server, _ = control
    async with connect(server.path) as client:
        with pytest.raises(ProverError, match=r"miner 13 is unlucky \(deadline=1234.5, priority=7\)"):
            await client.submit(make_task(13), deadline=1234.5, priority=7)


async def test_client_disconnect_cancels_its_in_flight_requests(control):
    server, backend = control
    async with connect(server.path) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.submit, make_task(5))
            await backend._events(5)[1].wait()
            nursery.cancel_scope.cancel()
    await server.wait_idle()
    assert backend.cancelled == {5}


async def test_cancelling_submit_cancels_the_request_but_not_the_connection(control):
    server, backend = control
    async with connect(server.path) as client:
        with trio.CancelScope() as scope:
            async def cancel_once_started() -> None:
                await backend._events(6)[1].wait()
                scope.cancel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_once_started)
                await client.submit(make_task(6))
        await server.wait_idle()
        assert backend.cancelled == {6}
        backend._events(7)[0].set()
        assert await client.submit(make_task(7)) == echo_output(make_task(7))


async def test_duplicate_request_id_on_a_connection_is_refused(control):
    server, backend = control
    stream = await trio.open_unix_socket(str(server.path))
    decoder = dext.FrameDecoder()
    await stream.send_all(dext.encode(dext.Request(1, make_task(8))) * 2)
    response = None
    while response is None:
        for msg in decoder.receive_data(await stream.receive_some()):
            if isinstance(msg, dext.Response):
                response = msg
    assert response.id == 1 and "already in flight" in response.error
    backend._events(8)[0].set()
    await stream.aclose()


async def test_a_client_speaking_garbage_is_disconnected(control):
    server, _ = control
    stream = await trio.open_unix_socket(str(server.path))
    await stream.send_all(b"\xff\xff\xff\xffnot a frame")
    assert await stream.receive_some() == b""  # closed on us
    await stream.aclose()
    async with connect(server.path) as client:  # the server is still fine
        with pytest.raises(ProverError, match="unlucky"):
            await client.submit(make_task(13))


async def test_stop_accepting_removes_the_socket_file_but_keeps_connections(control):
    server, backend = control
    async with connect(server.path) as client:
        server.stop_accepting()
        await trio.testing.wait_all_tasks_blocked()
        assert not server.path.exists()
        backend._events(9)[0].set()
        assert await client.submit(make_task(9)) == echo_output(make_task(9))


async def test_connecting_where_nobody_listens_is_a_usage_error(sock_dir: Path):
    with pytest.raises(NoSupervisorError, match="the socket does not exist"):
        async with connect(sock_dir / "none.sock"):
            pass
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_dir / "stale.sock"))
    stale.close()
    with pytest.raises(NoSupervisorError, match="nobody is listening"):
        async with connect(sock_dir / "stale.sock"):
            pass


@pytest.mark.skipif(not IS_ROOT, reason="needs root to connect as another user")
async def test_peer_of_another_uid_is_turned_away_even_if_the_permissions_are_loosened(control):
    server, _ = control
    # Simulate a loosened socket file, then connect as uid 65534 through an O_PATH descriptor
    # opened while still root: only the SO_PEERCRED check stands in the way.
    os.chmod(server.path, 0o666)
    code = textwrap.dedent(f"""
        import os, socket
        fd = os.open({str(server.path)!r}, os.O_PATH)
        os.setgid(65534); os.setuid(65534)
        s = socket.socket(socket.AF_UNIX)
        s.connect(f"/proc/self/fd/{{fd}}")
        s.settimeout(5)
        try:
            print(s.recv(10) == b"")
        except TimeoutError:
            print("still connected")
    """)
    result = await trio.to_thread.run_sync(
        lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=20)
    )
    assert result.stdout.strip() == "True", result.stderr
    assert server.statistics().rejected == 1


def test_peer_uid_reads_the_connecting_process_uid():
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert peer_uid(a) == os.geteuid()
    finally:
        a.close()
        b.close()
