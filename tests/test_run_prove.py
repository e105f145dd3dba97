"""`damocles-ext run` / `prove` and the control socket: placement and permissions of the socket,
the dext conversation over it, and the prove command end to end with real children."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import psutil
import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import (
    DEXT,
    dext_env,
    dext_run,
    dext_run_async,
    draining_run,
    make_task,
    plugin_block,
    running,
    start_run,
    write_config,
)
from helpers.kept_out import a_closed_directory, said_when_kept_out
from helpers.small_disk import mounted_tmpfs

from damocles_ext.client import NoSupervisorError, connect, open_stream, submit_sync
from damocles_ext.errors import ProverError, UsageError
from damocles_ext.frontends.control import (
    ControlServer,
    bind_control_socket,
    default_socket_path,
    peer_uid,
)
from damocles_ext.frontends.control_socket import peer_credentials
from damocles_ext.frontends.run import _discard
from damocles_ext.protocol import control as control_protocol
from damocles_ext.protocol import dext, jsonl

IS_ROOT = os.geteuid() == 0


# -- where the socket goes and who may reach it ----------------------------------------------------


def test_default_socket_path_prefers_xdg_runtime_dir():
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/1000"}) == Path(
        "/run/user/1000/damocles-ext/control.sock"
    )
    assert default_socket_path({}) == Path("/run/damocles-ext/control.sock")


def test_a_relative_xdg_runtime_dir_is_ignored_as_the_xdg_spec_says():
    # Taken as is, `run` and `prove` started in different directories missed each other.
    assert default_socket_path({"XDG_RUNTIME_DIR": "run/user"}) == Path(
        "/run/damocles-ext/control.sock"
    )


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
    with pytest.raises(UsageError) as raised:
        bind_control_socket(sock_dir / "control.sock")
    assert str(raised.value) == (  # and what to do
        f"control socket path {sock_dir}/control.sock is a symlink; refusing to use it: remove it"
        " or choose another path with --socket"
    )


def test_a_file_above_the_socket_directory_is_a_usage_error_naming_it(sock_dir: Path):
    (sock_dir / "afile").write_text("")
    with pytest.raises(UsageError, match=r"afile is a file, not a directory; choose another"):
        bind_control_socket(sock_dir / "afile" / "sub" / "control.sock")


def test_a_socket_directory_under_one_this_user_may_not_enter_is_a_usage_error():
    with a_closed_directory() as closed:
        said = said_when_kept_out(lambda: bind_control_socket(closed / "s" / "control.sock"))
    assert said == (
        f"UsageError: cannot look at control socket directory {closed}/s: permission denied (a"
        " directory above it is closed to this user); choose a path you own with --socket"
    )


def test_a_socket_directory_on_a_read_only_file_system_exits_2_saying_so(sock_dir: Path):
    # Before: mkdir's EROFS (or ENOSPC) escaped as a traceback, exit 1.
    config = write_config(sock_dir, plugin_block("WdPost", "echo"))
    with mounted_tmpfs(sock_dir / "ro", "ro,size=64k"):
        result = dext_run("run", "-c", str(config), "--socket", str(sock_dir / "ro/s/control.sock"))
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr
    assert (
        f"cannot create control socket directory {sock_dir}/ro/s: Read-only file system; choose"
        " another path with --socket"
    ).encode() in result.stderr


def test_a_socket_directory_on_a_full_file_system_says_to_free_space(sock_dir: Path):
    with (
        mounted_tmpfs(sock_dir / "full", "size=64k,nr_inodes=1"),  # no inode for anything
        pytest.raises(UsageError) as raised,
    ):
        bind_control_socket(sock_dir / "full" / "s" / "control.sock")
    assert str(raised.value) == (
        f"cannot create control socket directory {sock_dir}/full/s: No space left on device:"
        " free some space there, or choose another path with --socket"
    )


def test_run_with_xdg_runtime_dir_a_file_exits_2_naming_it(sock_dir: Path, monkeypatch):
    (sock_dir / "runtime").write_text("")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sock_dir / "runtime"))
    config = write_config(sock_dir, plugin_block("WdPost", "echo"))
    result = dext_run("run", "-c", str(config))
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr
    assert f"{sock_dir / 'runtime'} is a file, not a directory".encode() in result.stderr


def test_group_readable_directory_is_refused_with_the_fix(sock_dir: Path):
    d = sock_dir / "open"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(UsageError, match=r"mode 0755.*chmod 700"):
        bind_control_socket(d / "control.sock")


def test_a_shared_sticky_directory_is_refused_with_a_directory_of_its_own_not_a_chmod(sock_dir):
    # `chmod 700 /tmp` (the advice before) would break every other user of /tmp.
    shared = sock_dir / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(UsageError) as caught:
        bind_control_socket(shared / "control.sock")
    assert "mode 1777" in str(caught.value) and "chmod" not in str(caught.value)
    assert f"--socket {shared}/damocles-ext/control.sock (made 0700)" in str(caught.value)
    if IS_ROOT:  # as /tmp is to a user: another's (root's)
        os.chown(shared, 65534, 65534)
        with pytest.raises(UsageError) as caught:
            bind_control_socket(shared / "control.sock")
        assert "owned by uid 65534" in str(caught.value)
        assert f"Give the socket a directory of its own, e.g. --socket {shared}/damocles-ext/" in (
            str(caught.value)
        )


def test_an_empty_socket_option_is_refused_not_taken_for_the_current_directory():
    for command in (["status"], ["run", "-c", "x.cfg"], ["prove", "window_post", "--request", "t"]):
        result = dext_run(*command, "--socket", "")
        assert result.returncode == 2
        assert b"argument --socket: empty; give the control socket's path" in result.stderr


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
        with pytest.raises(
            UsageError,
            match=re.escape(f"another damocles-ext (run or worker) is listening on {path}"),
        ):
            bind_control_socket(path)
    finally:
        first.close()


BINDER = """
import sys
from damocles_ext.errors import UsageError
from damocles_ext.frontends.control_socket import bind_control_socket
for line in iter(sys.stdin.readline, ""):
    try:
        sock = bind_control_socket(line.strip())
    except UsageError as e:
        print("refused", e, flush=True)
        continue
    print("bound", flush=True)
    sys.stdin.readline()  # until the test has looked
    sock.close()
"""


def test_two_starts_over_a_stale_socket_bind_one_and_the_other_says_it_is_taken(sock_dir: Path):
    """Before, both could find the stale socket (nobody listening), and the second remove the
    first's fresh one and bind its own: the first then listened where nobody could reach it,
    without a word. The path's lock lets exactly one through, every time."""
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", BINDER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dext_env(),
        )
        for _ in range(2)
    ]
    try:
        for n in range(150):  # each about 7 ms; before, about 1 in 14 went wrong
            path = sock_dir / f"c{n}.sock"
            stale = socket.socket(socket.AF_UNIX)
            stale.bind(str(path))
            stale.close()
            for start in starts:  # both waiting on their stdin: gone as one
                start.stdin.write(f"{path}\n")
            for start in starts:
                start.stdin.flush()
            said = {start.pid: start.stdout.readline() for start in starts}
            bound = [pid for pid, line in said.items() if line == "bound\n"]
            assert len(bound) == 1, (n, said)
            [refused] = [line for pid, line in said.items() if pid not in bound]
            assert refused.startswith(
                f"refused another damocles-ext (run or worker) is listening on {path}"
            ), refused
            assert refused.endswith("; stop it first or choose another path with --socket\n")
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))  # the one that bound is the one reached
                assert peer_credentials(client)[0] == bound[0]
            for start in starts:
                if start.pid in bound:
                    start.stdin.write("\n")
                    start.stdin.flush()
    finally:
        for start in starts:
            start.stdin.close()
            assert start.wait(timeout=30) == 0


def test_a_control_socket_not_served_after_all_removes_only_its_own_file(sock_dir: Path):
    path = sock_dir / "control.sock"
    sock = bind_control_socket(path)
    path.unlink()  # and another socket put there since
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    try:
        _discard(sock)
        assert stat.S_ISSOCK(path.lstat().st_mode)  # the other's, kept
    finally:
        other.close()
    sock = bind_control_socket(path)  # its lock was released with it: a stale socket replaced
    _discard(sock)
    assert list(sock_dir.iterdir()) == []  # neither the socket nor its lock file left


def test_a_symlink_at_the_socket_s_lock_file_is_refused_not_followed(sock_dir: Path):
    target = sock_dir / "elsewhere"
    (sock_dir / ".control.sock.lock").symlink_to(target)
    with pytest.raises(UsageError) as raised:
        bind_control_socket(sock_dir / "control.sock")
    assert str(raised.value) == (
        f"control socket lock file {sock_dir}/.control.sock.lock is a symlink; refusing to use"
        " it: remove it or choose another path with --socket"
    )
    assert not target.exists()


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


async def test_a_progress_not_yet_sent_when_its_answer_is_ready_reaches_the_client_first(
    sock_dir, nursery
):
    async def submit(task, *, deadline=None, priority=0, on_progress=None):
        on_progress(dext.Progress(12345, "done", 4, 4))  # the prover's last report, then at once:
        return echo_output(task)

    server = ControlServer(bind_control_socket(sock_dir / "control.sock"), submit)
    await nursery.start(server.serve)
    seen: list[dext.Progress] = []
    async with connect(server.path) as client:
        assert await client.submit(make_task(1), on_progress=seen.append) == echo_output(
            make_task(1)
        )
    assert [(p.id, p.phase, p.done, p.total) for p in seen] == [(1, "done", 4, 4)]


async def test_a_request_that_cannot_be_encoded_is_the_callers_error_and_the_connection_stays(
    control,
):
    server, backend = control
    async with connect(server.path) as client:
        with pytest.raises(UsageError, match=r"request 1 cannot be sent: .*serialize ints"):
            await client.submit(make_task(2**64))  # a miner id over 64 bits
        backend.release[2] = trio.Event()
        backend.release[2].set()
        assert await client.submit(make_task(2)) == echo_output(make_task(2))


@pytest.mark.parametrize(
    ("task", "kwargs", "problem"),
    [
        (make_task(2), {"priority": 1.5}, "its priority 1.5 is not a whole number"),
        (make_task(2), {"deadline": "soon"}, "its deadline 'soon' is a str, not a number"),
        ("task.json", {}, "refused: str is not a task"),
        (
            msgspec.structs.replace(make_task(2), seed=b"s" * 31),
            {},
            "(window_post) refused: its task is not valid: Expected `bytes` of length >= 32",
        ),
    ],
)
async def test_a_request_the_caller_got_wrong_is_refused_before_it_is_sent(
    control, task, kwargs, problem
):
    # Sent, it broke the protocol: the supervisor closed the connection, failing the other
    # requests on it with a bare "closed the connection".
    server, backend = control
    async with connect(server.path) as client:
        with pytest.raises(UsageError, match=re.escape(problem)):
            await client.submit(task, **kwargs)
        backend.release[3] = trio.Event()
        backend.release[3].set()
        assert await client.submit(make_task(3)) == echo_output(make_task(3))


async def test_a_call_after_the_connect_block_fails_at_once(control):
    server, _ = control
    async with connect(server.path) as client:
        pass
    with pytest.raises(ProverError, match=r"was closed \(its connect\(\) block ended\)"):
        await client.submit(make_task(1))  # before, it waited for ever
    with pytest.raises(ProverError, match="was closed"):
        await client.status()


async def test_a_supervisor_whose_backlog_is_full_is_busy_not_an_impostor(sock_dir):
    # A connect that meets a full backlog gets EAGAIN; trio hands back a socket that never
    # connected, whose peer is pid 0, uid -1: taken for "another user's impostor" before.
    path = sock_dir / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    listener.listen(0)  # never accepts
    waiting = []
    try:
        while True:  # fill the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            waiting.append(s)
            try:
                s.connect(os.fspath(path))
            except BlockingIOError:
                break
        with pytest.raises(NoSupervisorError, match="takes no more connections"):
            await open_stream(path, busy_for=0.2)
    finally:
        for s in [*waiting, listener]:
            s.close()


def test_prove_refuses_a_priority_no_frame_can_carry(tmp_path):
    task = str(_task_file(tmp_path, make_task()))
    result = dext_run("prove", "window_post", "--request", task, "--priority", str(2**63))
    assert result.returncode == 2
    assert b"argument --priority: must be within -2**63 .. 2**63 - 1" in result.stderr


async def test_requests_on_one_connection_are_answered_by_id_in_any_order(control):
    server, backend = control
    results: dict[int, object] = {}
    progress: list[tuple] = []
    # Each request is finished only once its progress has reached the client.
    seen = {m: trio.Event() for m in (1, 2, 3)}

    def on_progress(miner: int, p: object) -> None:
        progress.append((miner, p))
        seen[miner].set()

    async with connect(server.path) as client, trio.open_nursery() as nursery:

        async def one(miner: int) -> None:
            results[miner] = await client.submit(
                make_task(miner), on_progress=lambda p: on_progress(miner, p)
            )

        for miner in (1, 2, 3):
            nursery.start_soon(one, miner)
        for miner in (1, 2, 3):
            await seen[miner].wait()
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
    # Raised out of the `async with` block: still a ProverError, not an ExceptionGroup.
    with pytest.raises(ProverError, match=r"miner 13 is unlucky \(deadline=1234.5, priority=7\)"):
        async with connect(server.path) as client:
            await client.submit(make_task(13), deadline=1234.5, priority=7)


async def test_an_error_names_the_clients_request_id_and_runs_own_number_beside_it(
    sock_dir, nursery
):
    # The supervisor numbers requests its own way (its log does too): a client reads about its
    # own id, with run's number beside it to find the request in run's log.
    async def submit(task, *, deadline=None, priority=0, on_progress=None):
        if task.miner_id == 1:
            raise ProverError("request 7 (window_post): passed its deadline while queued")
        raise ProverError("no child can serve it")

    server = ControlServer(bind_control_socket(sock_dir / "control.sock"), submit)
    await nursery.start(server.serve)
    async with connect(server.path) as client:
        for _ in range(4):  # ids 1 to 4
            with pytest.raises(ProverError):
                await client.submit(make_task(2))
        with pytest.raises(ProverError) as labelled:
            await client.submit(make_task(1))
        with pytest.raises(ProverError) as plain:
            await client.submit(make_task(2))
    assert str(labelled.value) == (
        "request 5 (window_post; request 7 in run's log): passed its deadline while queued"
    )
    assert str(plain.value) == "request 6: no child can serve it"


async def test_client_disconnect_cancels_its_in_flight_requests(control):
    server, backend = control
    async with connect(server.path) as client, trio.open_nursery() as nursery:
        nursery.start_soon(client.submit, make_task(5))
        await backend._events(5)[1].wait()
        nursery.cancel_scope.cancel()
    await server.wait_idle()
    assert backend.cancelled == {5}


async def test_a_client_that_shuts_only_its_sending_side_gets_its_answers_then_the_close(
    control, caplog
):
    # `nc -N` and HTTP/1.0-like clients send their requests, then shutdown(SHUT_WR), and read.
    server, backend = control
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(server.path))
    await sock.send(
        b"".join(dext.encode(dext.Request(i, make_task(m))) for i, m in ((1, 6), (2, 7)))
    )
    await backend._events(6)[1].wait()
    await backend._events(7)[1].wait()
    closing = trio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "closed its sending side" in record.getMessage():
                closing.set()

    seen = Seen()
    caplog.set_level(logging.INFO, logger="damocles_ext.control")
    logging.getLogger("damocles_ext.control").addHandler(seen)
    try:
        sock.shutdown(socket.SHUT_WR)
        with trio.fail_after(10):
            await closing.wait()  # run read the end of the requests with both still running
    finally:
        logging.getLogger("damocles_ext.control").removeHandler(seen)
    backend.release[6].set()
    backend.release[7].set()
    decoder, answers = dext.FrameDecoder(), []
    while data := await sock.recv(65536):  # until run closes the connection, once answered
        answers += [m for m in decoder.receive_data(data) if isinstance(m, dext.Response)]
    sock.close()
    assert sorted((a.id, a.output) for a in answers) == [
        (1, echo_output(make_task(6))),
        (2, echo_output(make_task(7))),
    ]
    assert backend.cancelled == set()


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


async def test_a_request_whose_id_is_in_flight_on_the_connection_is_logged_not_answered(
    control, caplog
):
    # Answers are routed by id (the client's pending map): an error answer to the duplicate would
    # reach the first request's waiter, which would take it for its own.
    server, backend = control
    stream = await trio.open_unix_socket(str(server.path))
    decoder = dext.FrameDecoder()
    await stream.send_all(dext.encode(dext.Request(1, make_task(8))))
    await backend._events(8)[1].wait()
    # Request 2 is read after the duplicate: once it runs, the duplicate was dealt with.
    await stream.send_all(
        dext.encode(dext.Request(1, make_task(9))) + dext.encode(dext.Request(2, make_task(10)))
    )
    await backend._events(10)[1].wait()
    backend._events(8)[0].set()
    backend._events(10)[0].set()
    responses: list[dext.Response] = []
    while len(responses) < 2:
        data = await stream.receive_some()
        assert data, "the control server closed the connection"
        responses += [m for m in decoder.receive_data(data) if isinstance(m, dext.Response)]
    await stream.aclose()
    assert sorted((r.id, r.output) for r in responses) == [
        (1, echo_output(make_task(8))),
        (2, echo_output(make_task(10))),
    ]
    assert 9 not in backend.started  # never submitted
    assert any("request id 1 while it is in flight" in r.getMessage() for r in caplog.records)


async def test_a_nan_deadline_from_a_client_is_answered_with_an_error_saying_why(
    tmp_path, sock_dir, nursery
):
    from damocles_ext.api import open_supervisor

    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    async with open_supervisor(str(cfg)) as sup:
        server = ControlServer(bind_control_socket(sock_dir / "control.sock"), sup.submit)
        await nursery.start(server.serve)
        stream = await trio.open_unix_socket(str(server.path))
        decoder = dext.FrameDecoder()
        await stream.send_all(
            dext.encode(dext.Request(7, make_task(8), deadline=float("nan")))
            + dext.encode(dext.Request(8, make_task(9)))
        )
        responses: dict[int, dext.Response] = {}
        while len(responses) < 2:
            data = await stream.receive_some()
            assert data, "the control server closed the connection"
            for msg in decoder.receive_data(data):
                if isinstance(msg, dext.Response):
                    responses[msg.id] = msg
        await stream.aclose()
        server.stop_accepting()
    assert responses[7].output is None
    assert "its deadline nan is not a finite number" in responses[7].error
    # The same connection goes on: the next request is proven.
    assert responses[8].output == echo_output(make_task(9)) and responses[8].error is None


async def test_a_client_speaking_garbage_is_disconnected(control):
    server, _ = control
    stream = await trio.open_unix_socket(str(server.path))
    await stream.send_all(b"\xff\xff\xff\xffnot a frame")
    said = b""
    while data := await stream.receive_some():  # closed on us, after saying why
        said += data
    [refusal] = control_protocol.frame_decoder().receive_data(said)
    assert isinstance(refusal, control_protocol.Refusal), refusal
    assert "a frame of 4294967295 bytes" in refusal.error
    assert "is the client speaking dext/1?" in refusal.error
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
        lambda: subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=False
        )
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


# -- run + prove end to end: real processes, real children ------------------------------------------


def _task_file(directory: Path, task, name: str = "task.json") -> Path:
    path = directory / name
    path.write_bytes(jsonl.task_to_json(task))
    return path


ECHO_BOTH = plugin_block("WdPost", "echo", concurrent=2) + plugin_block("WinPost", "echo")


async def test_run_serves_prove_and_the_client_then_stops_cleanly_on_sigterm(tmp_path, sock_dir):
    cfg = write_config(tmp_path, ECHO_BOTH)
    path = sock_dir / "run" / "control.sock"
    window, winning = make_task(7), make_task(8, stage="winning_post")
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, path)
        # The socket's place, as `run` made it.
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        family = psutil.Process(run.pid).children(recursive=True)
        with trio.fail_after(30):
            done = await dext_run_async(
                "prove",
                "window_post",
                "--request",
                str(_task_file(tmp_path, window)),
                "--socket",
                str(path),
            )
            assert done.returncode == 0, done.stderr.decode()
            assert done.stdout == jsonl.output_to_json(echo_output(window)) + b"\n"
            out_file = tmp_path / "out.json"
            done = await dext_run_async(
                "prove",
                "winning_post",
                "--request",
                str(_task_file(tmp_path, winning, "w.json")),
                "--socket",
                str(path),
                "--output",
                str(out_file),
                "--deadline",
                "60",
            )
            assert done.returncode == 0, done.stderr.decode()
            assert done.stdout == b""
            assert out_file.read_bytes() == jsonl.output_to_json(echo_output(winning)) + b"\n"
            # Several requests at once on one connection, both stages.
            async with connect(path) as client:
                results = {}

                async def one(miner: int, stage: str) -> None:
                    results[miner] = await client.submit(make_task(miner, stage=stage))

                async with trio.open_nursery() as burst:
                    for miner in range(20):
                        burst.start_soon(one, miner, ("window_post", "winning_post")[miner % 2])
            assert results == {
                m: echo_output(make_task(m, stage=("window_post", "winning_post")[m % 2]))
                for m in range(20)
            }
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()
    assert not path.exists()
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def test_second_run_on_a_live_socket_exits_2_and_sighup_stops_the_first_gracefully(
    tmp_path, sock_dir
):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    path = sock_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, path)
        with trio.fail_after(30):
            second = await dext_run_async("run", "-c", str(cfg), "--socket", str(path))
            assert second.returncode == 2
            assert (
                f"another damocles-ext (run or worker) is listening on {path}".encode()
                in second.stderr
            )
            # The terminal that started it closed: before, SIGHUP's default action killed it at
            # once, with nothing logged and its socket left behind.
            run.send_signal(signal.SIGHUP)
            assert await run.wait() == 0, log.text()
    assert "SIGHUP: shutting down gracefully" in log.text()
    assert not path.exists()


@pytest.mark.parametrize(
    ("received", "at_once"),
    [
        ((signal.SIGHUP, signal.SIGHUP), False),
        ((signal.SIGTERM, signal.SIGINT), True),
        ((signal.SIGHUP, signal.SIGTERM), True),
    ],
)
async def test_a_second_sighup_does_not_stop_at_once_as_a_second_sigterm_does(received, at_once):
    # A closing terminal may send SIGHUP twice (the shell's, the kernel's at the session's end).
    from damocles_ext.frontends.signals import watch_signals

    async def signals():
        for signum in received:
            yield signum

    calls: list[str] = []
    await watch_signals(signals(), trio.CancelScope(), lambda: calls.append("graceful"),
                        at_once=lambda: calls.append("at once"))  # fmt: skip
    assert calls == (["graceful", "at once"] if at_once else ["graceful"])


async def test_a_second_sigterm_answers_the_requests_in_flight_saying_why(tmp_path, sock_dir):
    # They got "the supervisor closed the connection" (through serve --connect, a guess at a
    # restart): run cancelled everything at once, answers unsent.
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", concurrent=2, seconds=60))
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, sock_dir / "control.sock")
        with trio.fail_after(30):
            async with connect(sock_dir / "control.sock") as client:
                errors: list[str] = []
                proving = [trio.Event(), trio.Event()]

                async def one(k: int) -> None:
                    def seen(progress: object) -> None:
                        proving[k].set()

                    with pytest.raises(ProverError) as info:
                        await client.submit(make_task(k), on_progress=seen)
                    errors.append(str(info.value))

                async with trio.open_nursery() as calls:
                    for k in (0, 1):
                        calls.start_soon(one, k)
                    for event in proving:
                        await event.wait()
                    run.send_signal(signal.SIGTERM)
                    await log.wait_for("shutting down gracefully")
                    run.send_signal(signal.SIGTERM)
            await run.wait()
    assert len(errors) == 2
    for error in errors:
        assert "damocles-ext run stopped at once (second signal)" in error, error


async def test_under_nohup_sighup_does_not_stop_run(tmp_path, sock_dir):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, sock_dir / "control.sock", nohup=True)
        with trio.fail_after(30):
            run.send_signal(signal.SIGHUP)  # ignored: never delivered
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()
    assert "SIGTERM: shutting down gracefully" in log.text() and "SIGHUP" not in log.text()


def test_run_refuses_a_symlinked_socket_directory(tmp_path, sock_dir):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    real = sock_dir / "real"
    real.mkdir(mode=0o700)
    (sock_dir / "link").symlink_to(real)
    result = dext_run("run", "-c", str(cfg), "--socket", str(sock_dir / "link" / "control.sock"))
    assert result.returncode == 2
    assert b"is a symlink" in result.stderr and b"Traceback" not in result.stderr


def test_prove_embedded_runs_the_config_in_process(tmp_path):
    write_config(tmp_path, ECHO_BOTH)
    task = make_task(21, stage="winning_post")
    result = dext_run(
        "prove",
        "winning_post",
        "--request",
        str(_task_file(tmp_path, task)),
        "--conf-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == jsonl.output_to_json(echo_output(task)) + b"\n"


def test_prove_exits_1_with_the_prover_error(tmp_path):
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=0, fail="always"))
    result = dext_run(
        "prove", "window_post", "--request", str(_task_file(tmp_path, make_task())), "-c", str(cfg)
    )
    assert result.returncode == 1
    assert b"sleep prover failing as configured" in result.stderr
    assert result.stdout == b"" and b"Traceback" not in result.stderr


def test_prove_interrupted_by_ctrl_c_exits_130_without_a_traceback(tmp_path):
    # trio raises the KeyboardInterrupt out of the supervisor's nursery, inside a group.
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=600))
    task = str(_task_file(tmp_path, make_task()))
    argv = [*DEXT, "prove", "window_post", "--request", task, "-c", str(cfg)]
    # Python raises KeyboardInterrupt only if SIGINT was not ignored when it started (it is for
    # a job started in the background of a shell without job control): undo that, then exec.
    undo = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL)"
    proc = subprocess.Popen(
        [sys.executable, "-c", f"{undo}; os.execv(sys.argv[1], sys.argv[1:])", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dext_env(),
    )
    try:
        err = b""
        while b"window_post sleep:" not in err:  # proving (its first progress line)
            line = proc.stderr.readline()
            assert line, err.decode()
            err += line
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, (err + rest).decode()
    assert b"Traceback" not in err + rest and out == b""


REFUSED_OPTION = plugin_block("WdPost", "sleep", fail="sometimes")


async def test_prove_through_a_run_without_children_of_the_stage_exits_2_naming_the_table(
    tmp_path, sock_path
):
    """A run with no [[WinPost]] child cannot prove a WinningPoSt: its config, or the --socket,
    is the operator's to fix (exit code 2, as serve --connect exits on it), not a prover that
    failed (exit code 1); the message names the table to add."""
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    task = tmp_path / "task.json"
    task.write_bytes(jsonl.task_to_json(make_task(stage="winning_post")))
    async with trio.open_nursery() as nursery, running(nursery, cfg, sock_path) as (run, log):
        with trio.fail_after(30):
            result = await dext_run_async("prove", "winning_post", "--request", str(task),
                                          "--socket", str(sock_path))  # fmt: skip
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert f"the supervisor at {sock_path} has no [[WinPost]] child" in err, err
    assert "Traceback" not in err, err


def test_prove_with_a_prover_that_cannot_load_exits_2_at_once(tmp_path):
    # Before, prove started the child, which exited five times (15 s of backoff), then exit 1.
    cfg = write_config(tmp_path, REFUSED_OPTION)
    result = dext_run(
        "prove", "window_post", "--request", str(_task_file(tmp_path, make_task())), "-c", str(cfg)
    )
    assert result.returncode == 2, result.stderr.decode()
    err = result.stderr.decode()
    assert f"damocles-ext prove: error: {cfg}: WdPost[0].Plugin: prover 'sleep'" in err, err
    assert "option 'fail'" in err and "Traceback" not in err
    assert result.stdout == b""


def test_prove_with_a_prover_whose_factory_fails_exits_2_without_restarting_it(tmp_path):
    # What check-config cannot see: the prover's factory raises in the child (exit code 2).
    # Before, prove restarted it five times (15 s of backoff), then exited 1.
    cfg = write_config(
        tmp_path, '[[WdPost]]\nPlugin = "sleep"\nPluginOptions = { load_fail = true }\n'
    )
    result = dext_run(
        "prove", "window_post", "--request", str(_task_file(tmp_path, make_task())), "-c", str(cfg)
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "prover 'sleep' (plugin testing) failed to start" in err and "fix the config" in err
    assert "restarting in" not in err and "Traceback" not in err
    assert result.stdout == b""


def test_run_with_a_prover_that_cannot_load_exits_2_before_its_socket_exists(tmp_path, sock_dir):
    cfg = write_config(tmp_path, plugin_block("WinPost", "echo") + REFUSED_OPTION)
    path = sock_dir / "control.sock"
    result = dext_run("run", "-c", str(cfg), "--socket", str(path), timeout=30)
    assert result.returncode == 2, result.stderr.decode()
    assert f"damocles-ext run: error: {cfg}: WdPost[0].Plugin: prover 'sleep'".encode() in (
        result.stderr
    )
    assert not path.exists()


CHILD_SCRIPT = r"""
import base64, json, sys
# A damocles JSON-lines processor that answers with its own argv as the proof, plus two faults.
sys.stdout.write("window_post processor ready\n")
sys.stdout.flush()
for line in sys.stdin:
    request = json.loads(line)
    proof = base64.b64encode(json.dumps(sys.argv[1:]).encode()).decode()
    output = {"proofs": [proof], "faults": [3, 7]}
    sys.stdout.write(json.dumps({"id": request["id"], "err_msg": None, "output": output}) + "\n")
    sys.stdout.flush()
"""


def test_bin_args_with_shell_metacharacters_reach_the_child_literally_and_faults_are_listed(
    tmp_path,
):
    script = tmp_path / "child.py"
    script.write_text(CHILD_SCRIPT)
    canary = tmp_path / "canary"
    args = [
        str(script),
        f"$(touch {canary})",
        f"`touch {canary}`",
        "a b",
        "*",
        "; echo hi",
        "'\"",
        "$HOME",
    ]
    cfg = write_config(
        tmp_path,
        f"[[WdPost]]\nBin = {json.dumps(sys.executable)}\nArgs = {json.dumps(args)}\n",
    )
    result = dext_run(
        "prove",
        "window_post",
        "--request",
        str(_task_file(tmp_path, make_task(replicas=8))),
        "-c",
        str(cfg),
    )
    assert result.returncode == 0, result.stderr.decode()
    output = jsonl.output_from_json(result.stdout, "window_post")
    assert json.loads(output.proofs[0]) == args[1:]
    assert not canary.exists()
    assert b"2 faulty sectors: 3, 7" in result.stderr


# -- prove: bad input is exit 2 with a message that says what and where ----------------------------


def _prove(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return dext_run("prove", "window_post", *args)


def test_prove_missing_request_file(tmp_path):
    r = _prove(tmp_path, "--request", str(tmp_path / "nope.json"), "--socket", "/nonexistent.sock")
    assert r.returncode == 2
    assert f"request file {tmp_path / 'nope.json'} does not exist".encode() in r.stderr


def test_prove_bad_json_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "miner_id": 1000,\n  "proof_type": oops\n}\n')
    r = _prove(tmp_path, "--request", str(bad))
    assert r.returncode == 2
    assert b"bad.json" in r.stderr and b"line 3, column" in r.stderr, r.stderr


def test_prove_deeply_nested_json_is_a_usage_error_not_a_traceback(tmp_path):
    bad = tmp_path / "deep.json"
    bad.write_bytes(b'{"miner_id": 1000, "junk": ' + b"[" * 1500 + b"]" * 1500 + b"}")
    r = _prove(tmp_path, "--request", str(bad))
    assert r.returncode == 2, r.stderr
    assert b"deep.json" in r.stderr and b"nested too deeply" in r.stderr, r.stderr
    assert b"Traceback" not in r.stderr


def test_prove_missing_field_is_named(tmp_path):
    data = msgspec.json.decode(jsonl.task_to_json(make_task()))
    del data["seed"]
    bad = tmp_path / "t.json"
    bad.write_bytes(msgspec.json.encode(data))
    r = _prove(tmp_path, "--request", str(bad))
    assert r.returncode == 2 and b"missing required field `seed`" in r.stderr, r.stderr


def test_prove_wrong_size_is_named(tmp_path):
    data = msgspec.json.decode(jsonl.task_to_json(make_task()))
    data["replicas"][0]["comm_r"] = [1] * 31
    bad = tmp_path / "t.json"
    bad.write_bytes(msgspec.json.encode(data))
    r = _prove(tmp_path, "--request", str(bad))
    assert r.returncode == 2
    assert b"of length >= 32" in r.stderr and b"$.replicas[0].comm_r" in r.stderr, r.stderr


def test_prove_task_of_the_other_stage_gets_a_hint(tmp_path):
    task = _task_file(tmp_path, make_task(stage="winning_post"))
    r = _prove(tmp_path, "--request", str(task))
    assert r.returncode == 2 and b"use `prove winning_post`" in r.stderr, r.stderr


def test_prove_without_a_supervisor_says_how_to_get_one(tmp_path, sock_dir):
    task = _task_file(tmp_path, make_task())
    r = _prove(tmp_path, "--request", str(task), "--socket", str(sock_dir / "none.sock"))
    assert r.returncode == 2
    assert b"no supervisor at" in r.stderr and b"damocles-ext run" in r.stderr
    assert b"Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("deadline", "message"),
    [
        ("soon", "neither a number of seconds nor an ISO 8601 time"),
        ("", "neither a number of seconds nor an ISO 8601 time"),
        ("-5", "must be positive"),
        ("nan", "must be positive and finite"),
        ("2001-01-01T00:00:00+00:00", "is in the past"),
        # A local time in year 1 is year 0 in UTC east of Greenwich: no time at all.
        ("0001-01-01T00:00:00", "cannot be turned into a time|is in the past"),
        ("9999-12-31T23:59:59", "too far ahead"),
        ("1e300", "too far ahead"),
    ],
)
def test_prove_bad_deadline(tmp_path, deadline, message):
    task = _task_file(tmp_path, make_task())
    r = _prove(tmp_path, "--request", str(task), f"--deadline={deadline}")
    assert r.returncode == 2, r.stderr
    assert re.search(message, r.stderr.decode()), r.stderr
    assert b"Traceback" not in r.stderr


@pytest.mark.skipif(
    not Path("/usr/share/zoneinfo/America/New_York").exists(), reason="no time zone database"
)
@pytest.mark.parametrize(
    ("deadline", "message"),
    [
        (
            "2099-03-08T02:30:00",
            (
                "--deadline 2099-03-08T02:30:00 is skipped by this machine's local time (its clocks go"
                " forward then): give it with its UTC offset, e.g. 2099-03-08T02:30:00-05:00 or"
                " 2099-03-08T02:30:00-04:00"
            ),
        ),
        (
            "2099-11-01T01:30:00",
            (
                "--deadline 2099-11-01T01:30:00 comes twice in this machine's local time (its clocks"
                " go back then): give it with its UTC offset, e.g. 2099-11-01T01:30:00-04:00 or"
                " 2099-11-01T01:30:00-05:00"
            ),
        ),
    ],
)
def test_prove_refuses_a_local_deadline_that_daylight_saving_time_skips_or_repeats(
    tmp_path, monkeypatch, deadline, message
):
    # Read silently as one of two times an hour apart, before.
    monkeypatch.setenv("TZ", "America/New_York")
    task = _task_file(tmp_path, make_task())
    r = _prove(tmp_path, "--request", str(task), f"--deadline={deadline}")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr.decode()
    assert b"Traceback" not in r.stderr


def test_prove_output_into_a_missing_directory_is_refused_before_proving(tmp_path):
    task = _task_file(tmp_path, make_task())
    r = _prove(tmp_path, "--request", str(task), "--output", str(tmp_path / "no" / "out.json"))
    assert r.returncode == 2 and b"does not exist" in r.stderr


def test_prove_output_onto_its_own_request_file_is_refused_before_proving(tmp_path):
    # The proof replaced the request it answers, which verify needs beside it.
    task = _task_file(tmp_path, make_task())
    before = task.read_bytes()
    for same in (str(task), f"{tmp_path}/./{task.name}"):
        r = _prove(tmp_path, "--request", str(task), "--output", same)
        assert (
            r.returncode == 2
            and b"is the --request file: the proof would overwrite that file" in r.stderr
        )
    assert task.read_bytes() == before


def test_prove_output_under_a_directory_this_user_may_not_enter_is_refused_before_proving():
    from damocles_ext.commands.prove import _check_output_path

    with a_closed_directory() as closed:
        said = said_when_kept_out(lambda: _check_output_path(f"{closed}/out.json"))
    assert said == (
        f"UsageError: --output {closed}/out.json: permission denied (its directory, or one above"
        " it, is closed to this user); give a file you may write"
    )


def test_prove_output_to_a_fifo_writes_into_it_and_leaves_it_a_fifo(tmp_path):
    # Stands in for `-o /dev/null` (not used itself: as root a regression would replace it).
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    # The reader is open before prove starts, so prove's open for writing does not block; reads
    # after prove exits see what it wrote, then end of file (no writer left).
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
        task = make_task(56)
        result = dext_run(
            "prove",
            "window_post",
            "--request",
            str(_task_file(tmp_path, task)),
            "-c",
            str(cfg),
            "-o",
            str(fifo),
        )
        assert result.returncode == 0, result.stderr.decode()
        received = b""
        while chunk := os.read(reader, 65536):
            received += chunk
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert received == jsonl.output_to_json(echo_output(task)) + b"\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_prove_output_is_never_written_through_a_file_planted_beside_it(tmp_path):
    # --output in a directory others write to (/tmp): the temporary file the output is first
    # written to must not be one someone planted under a name they could guess, a symlink to a
    # file of ours (the proof would overwrite it) or a file of theirs (renamed into place, theirs
    # to change).
    import argparse

    from damocles_ext.commands.prove import _emit

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me\n")
    out = tmp_path / "out.json"
    planted = tmp_path / f".out.json.{os.getpid()}.tmp"  # the name it had
    planted.symlink_to(victim)
    output = echo_output(make_task(57))
    _emit(output, out, argparse.Namespace())
    assert victim.read_bytes() == b"keep me\n"
    assert not out.is_symlink()
    assert out.read_bytes() == jsonl.output_to_json(output) + b"\n"
    assert planted.is_symlink()  # left alone, not ours


def _a_shared_dir_with_their_symlink_to_a_fifo(tmp_path: Path) -> tuple[Path, Path]:
    # /tmp with another user's symlink at the output's name, to a FIFO (for a block device:
    # as root, a regression would write into it).
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    fifo = tmp_path / "device"
    os.mkfifo(fifo)
    out = shared / "out.json"
    out.symlink_to(fifo)
    os.lchown(out, 65534, 65534)
    return out, fifo


def test_prove_output_is_never_written_through_another_users_symlink(tmp_path):
    # Before, prove followed it and wrote the proof into whatever it led to (unless the kernel's
    # fs.protected_symlinks was on): refused now, exit 2, before proving.
    out, fifo = _a_shared_dir_with_their_symlink_to_a_fifo(tmp_path)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that a write would not block
    try:
        cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
        task_file = _task_file(tmp_path, make_task(58))
        result = dext_run("prove", "window_post", "--request", str(task_file), "-c", str(cfg),
                          "-o", str(out))  # fmt: skip
        assert os.read(reader, 65536) == b""
    finally:
        os.close(reader)
    assert result.returncode == 2, result.stderr.decode()
    assert result.stderr.decode() == (
        f"damocles-ext prove: error: --output {out}: {out} is a symlink owned by uid 65534 in {out.parent}"
        " (owned by uid 0), neither ours, root's nor the directory owner's: refusing to write"
        " through it (it could lead to a device or a FIFO of its owner's choosing); remove it,"
        " or give another file\n"
    )


@pytest.mark.parametrize("reached", ["directly", "through our symlink"])
def test_prove_output_refuses_another_users_symlink_planted_while_proving(tmp_path, reached):
    import argparse

    from damocles_ext.commands.prove import _emit

    out, fifo = _a_shared_dir_with_their_symlink_to_a_fifo(tmp_path)
    if reached == "through our symlink":
        ours = tmp_path / "ours.json"
        ours.symlink_to(out)
        out = ours
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(UsageError, match="the proof was made but is lost"):
            _emit(echo_output(make_task(59)), out, argparse.Namespace())
        assert os.read(reader, 65536) == b""
    finally:
        os.close(reader)


def test_prove_output_to_dev_stdout_writes_to_stdout(tmp_path):
    # /dev/stdout is root's symlink, to /proc/self/fd/1 (ours), to a pipe here: followed.
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    task = make_task(60)
    result = dext_run("prove", "window_post", "--request", str(_task_file(tmp_path, task)),
                      "-c", str(cfg), "-o", "/dev/stdout")  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == jsonl.output_to_json(echo_output(task)) + b"\n"


@pytest.mark.parametrize(
    ("link_to", "append"),
    [("self", False), ("self", True), ("thread-self", False), ("another", False)],
    ids=["truncated", "appended", "thread-self", "another-process"],
)
def test_prove_output_to_a_link_to_an_open_file_writes_into_that_file(tmp_path, link_to, append):
    # `prove -o /dev/stdout > out.json`: the path led to a regular file, so the proof was
    # written beside it and renamed over the link, replacing it (as root, the system's own
    # /dev/stdout), and out.json stayed empty. A stand-in link here, to spare the system's; also
    # one to another process's open file, which is written through, not renamed over.
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    task = make_task(60)
    out = tmp_path / "out.json"
    out.write_bytes(b"before\n" if append else b"")
    with open(out, "ab" if append else "wb") as stdout:
        holder = None
        if link_to == "another":  # a process holding out.json as its stdout, as a shell would
            stdout.write(b"an older and longer output, left from another run\n" * 20)
            stdout.flush()
            holder = subprocess.Popen(["sleep", "60"], stdout=stdout)
            target = f"/proc/{holder.pid}/fd/1"
        else:
            target = f"/proc/{link_to}/fd/1"
        link = tmp_path / "stdout"
        link.symlink_to(target)
        try:
            result = subprocess.run(
                [*DEXT, "prove", "window_post", "--request", str(_task_file(tmp_path, task)),
                 "-c", str(cfg), "-o", str(link)],
                stdout=stdout if holder is None else subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=dext_env(), timeout=60, check=False,
            )  # fmt: skip
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()
    assert result.returncode == 0, result.stderr.decode()
    assert link.is_symlink() and os.readlink(link) == target
    before = b"before\n" if append else b""
    assert out.read_bytes() == before + jsonl.output_to_json(echo_output(task)) + b"\n"


def test_parse_deadline_accepts_seconds_and_iso_times():
    from damocles_ext.commands.prove import parse_deadline

    assert parse_deadline("90", now=1000.0) == 1090.0
    assert parse_deadline("2030-01-01T00:00:00+00:00", now=0.0) == 1893456000.0


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01T00:00:00",
        "0001-01-01",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59",
        "9999-12-31T23:59:59-12:00",
        "nan",
        "-nan",
        "inf",
        "-inf",
        "-1",
        "0",
        "1e308",
        "1e400",
        "9" * 400,
        "",
        " ",
        "0x10",
    ],
)
def test_parse_deadline_refuses_what_is_not_a_time_saying_what_is_accepted(text):
    from damocles_ext.commands.prove import parse_deadline

    with pytest.raises(UsageError) as info:
        parse_deadline(text, now=1_800_000_000.0)
    message = str(info.value)
    assert message.startswith((f"--deadline {text}", f"--deadline {text!r}"))
    assert "past" in message or "ISO 8601 time (e.g." in message, message


async def test_prove_through_run_exits_1_when_the_prover_fails(tmp_path, sock_dir):
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=0, fail="always"))
    path = sock_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, path)
        with trio.fail_after(30):
            done = await dext_run_async(
                "prove",
                "window_post",
                "--socket",
                str(path),
                "--request",
                str(_task_file(tmp_path, make_task())),
            )
            assert done.returncode == 1
            assert b"sleep prover failing as configured" in done.stderr
            assert b"Traceback" not in done.stderr and done.stdout == b""
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()


async def test_submit_sync_works_from_a_plain_thread(control):
    server, backend = control
    backend._events(31)[0].set()
    output = await trio.to_thread.run_sync(
        lambda: submit_sync(make_task(31), socket_path=server.path)
    )
    assert output == echo_output(make_task(31))


def test_prove_reads_the_task_from_stdin_with_a_dash(tmp_path):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    task = make_task(55)
    result = dext_run(
        "prove", "window_post", "--request", "-", "-c", str(cfg), input=jsonl.task_to_json(task)
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == jsonl.output_to_json(echo_output(task)) + b"\n"


async def test_a_run_that_drains_still_answers_status_and_keeps_its_socket(tmp_path, sock_path):
    # Between the first SIGTERM and its end, `run` still proves what it took: `status` says it
    # is shutting down (it said no supervisor ran), a new request is refused saying why, and a
    # second `run` cannot take the socket, and the GPUs, meanwhile.
    async with draining_run(tmp_path, sock_path) as (cfg, _run, _log, client):
        with trio.fail_after(30):
            doc = await client.status()
            assert doc.supervisor.shutting_down is True
        async with connect(sock_path) as second:  # a new connection is still taken
            assert (await second.status()).supervisor.shutting_down is True
            with pytest.raises(ProverError, match="shutting down"):
                await second.submit(make_task(2))
        other = dext_run("run", "-c", str(cfg), "--socket", str(sock_path), timeout=30)
        assert other.returncode == 2, other.stderr
        assert sock_path.exists()
