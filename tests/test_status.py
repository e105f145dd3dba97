"""`damocles-ext status` against a real `damocles-ext run`: every field of the status document
checked against the children we configured (and psutil's view of them), busy children and the
locks they hold, a queued request's deadline, a killed child in backoff, and the table."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import time
from pathlib import Path

import msgspec
import psutil
import pytest
import trio
from helpers.frontend import (
    dext_run_async,
    make_task,
    running,
    write_config,
)

from damocles_ext.client import connect
from damocles_ext.errors import ProverError
from damocles_ext.protocol import control
from damocles_ext.status import (
    SCHEMA,
    ChildStatus,
    LockFiles,
    StageStatus,
    StatusDocument,
    StatusError,
    SupervisorStatus,
    format_bytes,
    format_duration,
    parse_document,
    render_table,
)


def _config(tmp_path: Path) -> tuple[Path, Path]:
    gpu_tmp = tmp_path / "gpu0-tmp"
    text = f"""
[[WdPost]]
Plugin = "sleep"
PluginOptions = {{ seconds = 60, progress_interval = 0.1 }}
Envs = {{ CUDA_VISIBLE_DEVICES = "0", TMPDIR = "{gpu_tmp}" }}

[[WdPost]]
Plugin = "sleep"
PluginOptions = {{ seconds = 60, progress_interval = 0.1 }}

[[WinPost]]
Plugin = "echo"
Concurrent = 2
"""
    return write_config(tmp_path, text), gpu_tmp


async def wait_ready(log, names: list[str]) -> None:
    """Wait for each child's "<name> (pid N): ready (dext)" line in `run`'s log."""
    while True:
        ready = {n for n in names for line in log.lines if line.endswith("ready (dext)")
                 and f" {n} (pid " in line}  # fmt: skip
        if len(ready) == len(names):
            return
        assert not log.closed, log.text()
        await log._changed.wait()


async def _status(path: Path) -> dict:
    done = await dext_run_async("status", "--socket", str(path), "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    return json.loads(done.stdout)


def _by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["children"]}


async def test_status_json_reports_each_child_as_configured_idle_busy_and_in_backoff(
    tmp_path: Path, sock_dir: Path
):
    cfg, gpu_tmp = _config(tmp_path)
    path = sock_dir / "control.sock"
    before = time.time()
    async with (
        trio.open_nursery() as nursery,
        running(nursery, cfg, path, "--restart-delay", "30") as (run, log),
    ):
        with trio.fail_after(40):
            await wait_ready(log, ["window_post#0", "window_post#1", "winning_post#0"])

            # -- idle: every field against what we configured and what psutil sees --------
            doc = await _status(path)
            assert doc["schema"] == SCHEMA == "damocles-ext/status/1"
            assert before <= doc["time"] <= time.time()
            sup = doc["supervisor"]
            assert sup["pid"] == run.pid
            assert sup["socket"] == str(path)
            assert sup["metrics"] is None  # not asked for
            assert sup["requests"] == 0 and sup["shutting_down"] is False
            assert 0 <= sup["uptime"] <= time.time() - before + 1
            assert sup["rss_bytes"] > 1 << 20
            # The supervisor's own memory, not its tree's (each child's is in its own row).
            assert 0.5 < sup["rss_bytes"] / psutil.Process(run.pid).memory_info().rss < 1.5
            forked = {p.pid for p in psutil.Process(run.pid).children()}
            children = _by_name(doc)
            assert list(children) == ["window_post#0", "window_post#1", "winning_post#0"]
            expected = {
                "window_post#0": ("window_post", 0, "0", 1, ["gpu:0"], "sleep"),
                "window_post#1": ("window_post", 1, None, 1, [], "sleep"),
                "winning_post#0": ("winning_post", 0, None, 2, [], "echo"),
            }
            for name, (stage, index, gpu, capacity, locks, prover) in expected.items():
                c = children[name]
                assert (c["stage"], c["index"], c["gpu"], c["capacity"]) == (
                    stage,
                    index,
                    gpu,
                    capacity,
                )
                assert c["state"] == "ready" and c["next_start_in"] is None
                assert (c["in_flight"], c["done"], c["failed"], c["restarts"]) == (0, 0, 0, 0)
                assert c["last_exit"] is None
                assert c["protocol"] == "dext"
                assert c["pid"] in forked
                proc = psutil.Process(c["pid"])
                cmdline = proc.cmdline()
                assert stage in cmdline and prover in cmdline
                # Spawned within this run. (Not psutil's create_time: it counts from the boot
                # time in whole seconds, and was 1.0 s off time.time() on our 2-core VM.)
                assert before <= c["started_at"] <= doc["time"]
                assert 0 < c["uptime"] <= time.time() - c["started_at"] + 1
                assert c["processes"] == 1
                assert 0.5 < c["rss_bytes"] / proc.memory_info().rss < 2
                assert 0 <= c["cpu_percent"] <= 100 * os.cpu_count()
                assert c["locks"] == locks and c["locks_held"] == []
            # bellperson's lock files: in the child's TMPDIR (created by the supervisor), absent.
            assert children["window_post#0"]["lock_files"] == {
                "dir": str(gpu_tmp),
                "gpu": None,
                "priority": None,
                "problems": [],
            }
            stages = {s["stage"]: s for s in doc["stages"]}
            assert stages["window_post"] == {
                "stage": "window_post",
                "queued": 0,
                "nearest_deadline": None,
                "nearest_deadline_in": None,
                "waiting_for_lock": [],
                "children": 2,
                "ready": 2,
                "in_flight": 0,
                "capacity": 2,
            }
            assert stages["winning_post"]["children"] == 1
            assert stages["winning_post"]["capacity"] == 2

            # -- busy: two long requests running, a third queued with a deadline ------------
            async with connect(path) as client:
                working = [trio.Event(), trio.Event()]
                deadline = time.time() + 300

                async def prove(i: int, event: trio.Event | None, when: float | None) -> None:
                    def on_progress(_p) -> None:
                        if event is not None:
                            event.set()

                    await client.submit(make_task(100 + i), deadline=when, on_progress=on_progress)

                async with trio.open_nursery() as requests:
                    requests.start_soon(prove, 0, working[0], None)
                    requests.start_soon(prove, 1, working[1], None)
                    for event in working:
                        await event.wait()  # both children sent progress: both are working
                    requests.start_soon(prove, 2, None, deadline)
                    # bellperson in the GPU child's TMPDIR takes its GPU lock now.
                    gpu_tmp.mkdir(exist_ok=True)
                    lock_fd = os.open(gpu_tmp / "bellman.gpu.lock", os.O_RDWR | os.O_CREAT)
                    try:
                        fcntl.flock(lock_fd, fcntl.LOCK_EX)
                        doc = await _status(path)
                    finally:
                        os.close(lock_fd)
                    children = _by_name(doc)
                    for name in ("window_post#0", "window_post#1"):
                        assert children[name]["state"] == "busy"
                        assert children[name]["in_flight"] == 1
                    assert children["window_post#0"]["locks_held"] == ["gpu:0"]
                    assert children["window_post#1"]["locks_held"] == []
                    assert children["window_post#0"]["lock_files"]["gpu"] is True
                    assert children["window_post#0"]["lock_files"]["priority"] is None
                    assert children["winning_post#0"]["state"] == "ready"
                    stage = {s["stage"]: s for s in doc["stages"]}["window_post"]
                    assert stage["queued"] == 1 and stage["in_flight"] == 2
                    assert abs(stage["nearest_deadline"] - deadline) < 1.0
                    assert 250 < stage["nearest_deadline_in"] <= 300
                    assert doc["supervisor"]["requests"] == 3

                    # -- a child killed: backoff, with the time until its restart ----------
                    echo_pid = children["winning_post#0"]["pid"]
                    os.kill(echo_pid, signal.SIGKILL)
                    await log.wait_for("winning_post#0: restarting in")
                    doc = await _status(path)
                    echo = _by_name(doc)["winning_post#0"]
                    assert echo["state"] == "backoff"
                    assert echo["pid"] is None and echo["uptime"] is None
                    assert echo["rss_bytes"] is None and echo["cpu_percent"] is None
                    assert 0 < echo["next_start_in"] <= 60
                    assert echo["restarts"] == 1
                    assert "SIGKILL" in echo["last_exit"]

                    table = await dext_run_async("status", "--socket", str(path))
                    assert table.returncode == 0, table.stderr.decode()
                    text = table.stdout.decode()
                    assert text.startswith(f"damocles-ext {doc['supervisor']['version']}, pid")
                    header, *rows = text.split("\n\n")[1].splitlines()
                    assert header.split() == [
                        "CHILD", "PID", "GPU", "STATE", "REQS", "DONE", "FAILED", "RESTARTS",
                        "UPTIME", "RSS", "CPU%", "LOCKS",
                    ]  # fmt: skip
                    row = {r.split()[0]: r.split() for r in rows}
                    assert row["window_post#0"][1:5] == [
                        str(children["window_post#0"]["pid"]),
                        "0",
                        "busy",
                        "1/1",
                    ]
                    assert row["window_post#0"][-1] == "gpu:0"
                    assert row["winning_post#0"][1:4] == ["-", "-", "backoff"]
                    assert "last exit of winning_post#0: " in text and "SIGKILL" in text
                    assert "window_post     2/2   2/2       1  in 4m" in text
                    requests.cancel_scope.cancel()
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()


async def test_a_fifo_named_like_a_gpu_lock_is_reported_and_neither_status_nor_run_hang(
    tmp_path: Path, sock_dir: Path
):
    # Anyone can create /tmp/bellman.gpu.lock; opening a FIFO for reading blocks until a writer
    # comes, which once hung `status` and then `run`'s shutdown (its worker thread never returned).
    gpu_tmp = tmp_path / "gpu0-tmp"
    gpu_tmp.mkdir(mode=0o700)
    os.mkfifo(gpu_tmp / "bellman.gpu.lock")
    cfg = write_config(tmp_path, f"""
[[WdPost]]
Plugin = "echo"
Envs = {{ TMPDIR = "{gpu_tmp}" }}
""")  # fmt: skip
    path = sock_dir / "control.sock"
    async with (
        trio.open_nursery() as nursery,
        running(nursery, cfg, path) as (run, log),
    ):
        with trio.fail_after(30):
            await wait_ready(log, ["window_post#0"])
            doc = await _status(path)
            problem = (
                f"bellman.gpu.lock is not probed: {gpu_tmp / 'bellman.gpu.lock'} is a FIFO (named"
                " pipe), not a regular file; remove it (bellperson's lock files are regular files)"
            )
            assert _by_name(doc)["window_post#0"]["lock_files"] == {
                "dir": str(gpu_tmp),
                "gpu": None,
                "priority": None,
                "problems": [problem],
            }
            table = await dext_run_async("status", "--socket", str(path))
            assert table.returncode == 0, table.stderr.decode()
            assert f"lock files of window_post#0: {problem}\n" in table.stdout.decode()
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()


async def test_lock_files_are_probed_where_the_child_looks_not_in_the_supervisors_tmpdir(
    tmp_path: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    # A child with InheritEnvs = false keeps its lock files in /tmp; status probed the
    # supervisor's TMPDIR instead, and said "not held" of files nobody uses. (An empty TMPDIR in
    # Envs is refused: bellperson would look in its working directory.)
    ours = tmp_path / "supervisor-tmp"
    ours.mkdir()
    monkeypatch.setenv("TMPDIR", str(ours))
    cfg = write_config(tmp_path, """
[[WdPost]]
Plugin = "echo"
InheritEnvs = false

[[WdPost]]
Plugin = "echo"
""")  # fmt: skip
    path = sock_dir / "control.sock"
    async with (
        trio.open_nursery() as nursery,
        running(nursery, cfg, path) as (run, log),
    ):
        with trio.fail_after(30):
            names = ["window_post#0", "window_post#1"]
            await wait_ready(log, names)
            children = _by_name(await _status(path))
            assert [children[n]["lock_files"]["dir"] for n in names] == ["/tmp", str(ours)]
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()


async def test_status_of_a_run_whose_socket_path_is_not_utf8_shows_the_byte_as_an_escape(
    tmp_path: Path, sock_dir: Path
):
    # The document carries the socket's path, and the reply only UTF-8 text: the supervisor
    # closed every status connection ("internal error"), so status never worked there.
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\n')
    path = sock_dir / os.fsdecode(b"control-\xff.sock")
    async with (
        trio.open_nursery() as nursery,
        running(nursery, cfg, path) as (run, log),
    ):
        with trio.fail_after(30):
            await wait_ready(log, ["window_post#0"])
            doc = await _status(path)
            assert doc["supervisor"]["socket"] == f"{sock_dir}/control-\\udcff.sock"
            done = await dext_run_async("status", "--socket", str(path))
            assert done.returncode == 0, done.stderr.decode()
            assert b"window_post#0" in done.stdout
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()
            assert "internal error" not in log.text()


@pytest.mark.parametrize(
    "command",
    [["status", "--socket"], ["serve", "window_post", "--connect"]],
    ids=["status", "serve"],
)
async def test_a_socket_option_given_the_sockets_directory_says_to_give_the_socket_in_it(
    sock_dir: Path, command: list[str]
):
    # It said "it is not a socket; start one with `damocles-ext run`" of a directory whose run
    # may well be listening on the control.sock in it.
    done = await dext_run_async(*command, str(sock_dir))
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b"", err
    assert (
        f"no supervisor at {sock_dir}: it is a directory, not the socket; give the socket's own"
        f" path, e.g. {sock_dir}/control.sock"
    ) in err, err
    assert "start one" not in err and "Traceback" not in err, err


async def test_status_with_nothing_listening_exits_2_with_a_message(sock_dir: Path):
    missing = sock_dir / "nothing.sock"
    done = await dext_run_async("status", "--socket", str(missing))
    assert done.returncode == 2
    err = done.stderr.decode()
    assert f"no supervisor at {missing}: the socket does not exist" in err
    assert "damocles-ext run" in err and "Traceback" not in err and done.stdout == b""
    # A stale socket file: nobody accepts.
    import socket as socket_module

    stale = sock_dir / "stale.sock"
    s = socket_module.socket(socket_module.AF_UNIX)
    s.bind(str(stale))
    s.close()
    done = await dext_run_async("status", "--socket", str(stale), "--json")
    assert done.returncode == 2
    assert "nobody is listening" in done.stderr.decode() and done.stdout == b""


async def test_status_of_a_stopped_supervisor_gives_up_after_its_timeout_saying_why(
    tmp_path: Path, sock_path: Path
):
    # A `run` stopped with SIGSTOP still takes connections (the kernel does), and never answers.
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\n')
    async with trio.open_nursery() as nursery, running(nursery, cfg, sock_path) as (run, log):
        async with connect(sock_path) as client:
            await client.status()
        run.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(30):
                done = await dext_run_async("status", "--socket", str(sock_path), "--timeout", "1s")
        finally:
            run.send_signal(signal.SIGCONT)
        run.send_signal(signal.SIGTERM)
        assert await run.wait() == 0, log.text()
    err = done.stderr.decode()
    assert done.returncode == 1 and done.stdout == b"" and "Traceback" not in err
    assert f"the supervisor at {sock_path} did not answer within 1 s" in err
    assert "stopped (SIGSTOP" in err


async def test_a_request_to_a_stopped_supervisor_fails_soon_after_its_deadline_saying_why(
    tmp_path: Path, sock_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A `run` stopped with SIGSTOP reads nothing and answers nothing: a client whose request
    # has a deadline stops waiting a little after it, rather than for ever.
    monkeypatch.setattr("damocles_ext.client.LATE_ANSWER", 0.5)
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\n')
    async with trio.open_nursery() as nursery, running(nursery, cfg, sock_path) as (run, log):
        async with connect(sock_path) as client:
            await client.submit(make_task())
            run.send_signal(signal.SIGSTOP)
            try:
                with trio.fail_after(30), pytest.raises(ProverError) as caught:
                    await client.submit(make_task(), deadline=time.time() + 0.5)
            finally:
                run.send_signal(signal.SIGCONT)
            # Woken, the supervisor is told to cancel it; the connection still serves.
            assert await client.submit(make_task(7)) is not None
        run.send_signal(signal.SIGTERM)
        assert await run.wait() == 0, log.text()
    message = str(caught.value)
    assert f"the supervisor at {sock_path} did not answer by the request's deadline" in message
    assert "nor 0.5 s after it" in message and "SIGSTOP" in message


async def test_a_request_without_a_deadline_to_a_stopped_supervisor_is_given_up_saying_why(
    tmp_path: Path, sock_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # `prove --socket` with no --deadline waited for ever, saying nothing, on a `run` stopped
    # with SIGSTOP: the supervisor's status is asked while it proves, and its silence ends it.
    from damocles_ext.frontends import prove

    monkeypatch.setattr(prove, "ALIVE_EVERY", 0.2)
    monkeypatch.setattr(prove, "ALIVE_WITHIN", 3.0)  # (a status takes its CPU sample: 0.25 s)
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "sleep"\nPluginOptions = { seconds = 1 }\n')
    async with trio.open_nursery() as nursery, running(nursery, cfg, sock_path) as (run, log):
        # Alive and slow (1 s, several status requests meanwhile): answered.
        assert await prove._prove_remote(str(sock_path), make_task(), None, 0, None) is not None
        run.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(30), pytest.raises(ProverError) as caught:
                await prove._prove_remote(str(sock_path), make_task(), None, 0, None)
        finally:
            run.send_signal(signal.SIGCONT)
        run.send_signal(signal.SIGTERM)
        assert await run.wait() == 0, log.text()
    message = str(caught.value)
    assert "did not answer a status request within 3 s" in message and "SIGSTOP" in message


async def test_what_a_child_said_is_printed_in_the_table_with_its_control_characters_escaped():
    # A child whose first frame has a message type holding ESC, CR and LF: the decoder's error
    # quotes it, and it reached the table raw as the child's last exit (a forged row, the
    # terminal's colours changed).
    from helpers.supervisor import child_stats, python_child, spec, wait_until_real

    from damocles_ext.status import StatusSource
    from damocles_ext.supervisor import Supervisor

    code = r"""
import msgspec, struct, sys, time
b = msgspec.msgpack.encode({"type": "\x1b[2K\rwindow_post#0  1234  0  ready FORGED\n\x1b[31m"})
sys.stdout.buffer.write(struct.pack(">I", len(b)) + b)
sys.stdout.flush()
time.sleep(30)
"""
    sup = Supervisor([spec(python_child(code), ready_timeout=5.0, auto_restart=False)])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await wait_until_real(lambda: child_stats(sup).last_exit is not None, what="exit")
            doc = parse_document(await StatusSource(sup, socket="t", cpu_interval=0).as_data())
            sup.request_shutdown()
    text = render_table(doc)
    assert "\x1b" not in text and "\r" not in text
    assert "\\x1b[2K\\rwindow_post#0" in text  # said, escaped
    assert not any(line.startswith("window_post#0  1234") for line in text.splitlines())


async def test_a_status_out_of_file_descriptors_says_so_not_as_an_internal_error(caplog):
    # The status reads /proc (and the first time, before they were imported with it, modules
    # of its own: files too): at the limit of open files it raised OSError, answered as
    # "internal error" with a traceback in `run`'s log. Now it says what failed and which limit
    # to raise, as a DextError (the control socket's answer), and logs one warning.
    import resource

    from helpers.supervisor import builtin_child, spec

    from damocles_ext.errors import DextError
    from damocles_ext.status import StatusSource
    from damocles_ext.supervisor import Supervisor

    sup = Supervisor([spec(builtin_child("window_post", "echo"))])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            # Ready: its start over, no descriptor of its spawn to be closed (freed) meanwhile.
            await sup.wait_ready("window_post")
            source = StatusSource(sup, socket="t", cpu_interval=0)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            held: list[int] = []
            try:
                # Every descriptor this process may have, in use.
                top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
                resource.setrlimit(resource.RLIMIT_NOFILE, (top + 8, hard))
                with contextlib.suppress(OSError):
                    while True:
                        held.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
                with pytest.raises(DextError) as caught:
                    await source.document()
            finally:
                for fd in held:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            sup.request_shutdown()
    said = str(caught.value)
    assert said.startswith("cannot measure the children for the status: Too many open files")
    assert "ulimit -n" in said, said
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [said]


# -- the document and the table, without processes ------------------------------------------------


def _doc(**child_changes) -> StatusDocument:
    child = ChildStatus(
        name="window_post#0",
        stage="window_post",
        index=0,
        pid=4242,
        gpu="0",
        state="busy",
        next_start_in=None,
        in_flight=1,
        capacity=1,
        done=12,
        failed=1,
        restarts=2,
        last_exit="killed by SIGKILL (request 7 timed out)",
        started_at=1_000.0,
        uptime=7_380.0,
        protocol="dext",
        processes=3,
        rss_bytes=512 << 20,
        cpu_percent=98.5,
        locks=["gpu:0"],
        locks_held=["gpu:0"],
        lock_files=LockFiles("/tmp/d/window_post-gpu0/", True, True),
    )
    child = msgspec.structs.replace(child, **child_changes)
    return StatusDocument(
        schema=SCHEMA,
        time=10_000.0,
        supervisor=SupervisorStatus(
            pid=4200,
            version="0.1.0",
            started_at=2_000.0,
            uptime=8_000.0,
            requests=2,
            shutting_down=False,
            socket="/run/user/0/damocles-ext/control.sock",
            metrics=None,
            rss_bytes=40 << 20,
            cpu_percent=0.0,
        ),
        children=[child],
        stages=[
            StageStatus("window_post", 1, 10_750.0, 750.0, ["gpu:0"], 1, 1, 1, 1),
        ],
    )


def test_table_shows_backoff_with_the_time_until_the_restart():
    text = render_table(
        _doc(state="backoff", pid=None, next_start_in=4.25, uptime=None, rss_bytes=None,
             cpu_percent=None, in_flight=0, locks_held=[], lock_files=None)
    )  # fmt: skip
    row = text.split("\n\n")[1].splitlines()[1].split()
    assert row[:5] == ["window_post#0", "-", "0", "backoff", "4.2s"]
    assert row[-2:] == ["-", "-"]  # CPU%, LOCKS


def test_table_shows_a_bench_after_the_state_and_probation_after_it():
    benched = render_table(_doc(state="ready", in_flight=0, benched_for=29.4))
    assert benched.split("\n\n")[1].splitlines()[1].split()[3:6] == ["ready,", "benched", "29s"]
    backoff = render_table(_doc(state="backoff", pid=None, next_start_in=4.25, benched_for=20.0))
    assert "backoff 4.2s, benched 20s" in backoff
    probation = render_table(_doc(state="busy", on_probation=True))
    assert "busy, on probation" in probation
    assert "probation" not in render_table(_doc()) and "benched" not in render_table(_doc())


def test_table_shows_a_fatal_child_that_is_retried_with_the_time_until_its_next_try():
    text = render_table(
        _doc(state="fatal", pid=None, next_start_in=42.0, uptime=None, rss_bytes=None,
             cpu_percent=None, in_flight=0, locks_held=[], lock_files=None)
    )  # fmt: skip
    row = text.split("\n\n")[1].splitlines()[1].split()
    assert row[:6] == ["window_post#0", "-", "0", "fatal,", "retry", "42s"]
    assert "last exit of window_post#0: killed by SIGKILL" in text  # why it is failing


def test_table_shows_held_locks_and_bellperson_lock_files():
    text = render_table(_doc())
    row = text.split("\n\n")[1].splitlines()[1].split()
    assert row[0:5] == ["window_post#0", "4242", "0", "busy", "1/1"]
    assert row[5:9] == ["12", "1", "2", "2h03m"]
    assert row[9:11] == ["512.0", "MiB"] and row[11] == "98.5"
    assert row[12] == "gpu:0,bellperson:gpu+priority"
    assert "last exit of window_post#0: killed by SIGKILL (request 7 timed out)" in text
    assert "in 12m30s" in text and "gpu:0" in text.split("\n\n")[-1]


def test_lock_files_that_are_not_regular_files_are_listed_under_the_table(tmp_path: Path):
    from damocles_ext.status import measure

    # (a device, not a FIFO: were it opened, this test would fail rather than hang)
    os.symlink("/dev/null", tmp_path / "bellman.priority.lock")
    _, _, locks = measure({}, {"window_post#0": str(tmp_path)}, 0)
    lock_files = locks["window_post#0"]
    assert (lock_files.gpu, lock_files.priority) == (None, None)
    assert lock_files.problems == [
        (
            f"bellman.priority.lock is not probed: {tmp_path / 'bellman.priority.lock'} is a"
            " character device, not a regular file; remove it (bellperson's lock files are"
            " regular files)"
        )
    ]
    text = render_table(_doc(lock_files=lock_files))
    assert text.split("\n\n")[1].splitlines()[1].split()[-1] == "gpu:0"
    assert f"lock files of window_post#0: {lock_files.problems[0]}\n" in text
    # A document from a supervisor that predates `problems` still reads.
    data = msgspec.to_builtins(_doc())
    del data["children"][0]["lock_files"]["problems"]
    assert parse_document(data) == _doc()


def test_document_of_another_schema_is_refused_with_the_reason():
    data = msgspec.to_builtins(_doc())
    assert parse_document(data) == _doc()
    data["schema"] = "damocles-ext/status/2"
    with pytest.raises(StatusError, match=r"schema 'damocles-ext/status/2'.*same version"):
        parse_document(data)
    data = msgspec.to_builtins(_doc())
    del data["children"][0]["pid"]
    with pytest.raises(StatusError, match="malformed status document"):
        parse_document(data)


def test_status_messages_share_the_control_socket_framing():
    decoder = control.frame_decoder()
    reply = control.StatusReply(3, status={"schema": SCHEMA})
    frames = control.encode(control.StatusRequest(2)) + control.encode(reply)
    assert decoder.receive_data(frames) == [control.StatusRequest(2), reply]


async def test_client_status_without_a_status_source_is_an_error(sock_dir: Path):
    from damocles_ext.frontends.control import ControlServer, bind_control_socket

    async def submit(task, **kw):
        raise AssertionError("not called")

    sock = bind_control_socket(sock_dir / "c.sock")
    server = ControlServer(sock, submit)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with connect(sock_dir / "c.sock") as client:
            with pytest.raises(ProverError, match="does not report its status"):
                await client.status()
        nursery.cancel_scope.cancel()


def test_durations_and_sizes_read_as_people_write_them():
    assert [format_duration(x) for x in (None, 4.25, 45, 750, 7_380, 90_000)] == [
        "-", "4.2s", "45s", "12m30s", "2h03m", "1d01h",
    ]  # fmt: skip
    assert [format_bytes(x) for x in (None, 512, 2048, 3 << 30)] == [
        "-", "512 B", "2.0 KiB", "3.0 GiB",
    ]  # fmt: skip


def test_process_trees_are_found_even_with_parentheses_in_a_program_name(tmp_path: Path):
    import shutil
    import subprocess
    import sys

    from damocles_ext.status import sample_trees

    odd = tmp_path / "a) b (c"  # /proc/PID/stat shows it as "(a) b (c)"
    odd.symlink_to(shutil.which("sleep"))
    code = f"import subprocess, sys; p = subprocess.Popen([{str(odd)!r}, '30']); print(p.pid); sys.stdin.read()"
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    grandchild = None
    try:
        grandchild = int(parent.stdout.readline())
        tree = sample_trees({"t": parent.pid, "gone": 2**22 + 1})
        assert list(tree) == ["t"]  # a root that does not exist is left out
        assert tree["t"].processes == 2
        expected = sum(psutil.Process(p).memory_info().rss for p in (parent.pid, grandchild))
        assert 0.8 < tree["t"].rss_bytes / expected < 1.25
    finally:
        parent.kill()
        parent.wait()
        if grandchild is not None:
            psutil.Process(grandchild).kill()


def test_the_supervisors_own_cpu_and_memory_leave_out_its_childrens():
    import subprocess
    import sys

    from damocles_ext.status import measure

    # A child of this process that spins: a tree measurement of this process would count it.
    spin = subprocess.Popen(
        [sys.executable, "-u", "-c", "print('spinning', flush=True)\nwhile True: pass"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert spin.stdout.readline() == "spinning\n"
        trees, cpu, _ = measure({"spin": spin.pid}, {}, 0.5, own_pid=os.getpid())
        own = psutil.Process().memory_info().rss
        assert trees[""].processes == 1
        assert 0.5 < trees[""].rss_bytes / own < 1.5
        # This process sleeps through the window while its child burns whatever CPU it gets.
        assert cpu["spin"] is not None and cpu["spin"] > 0
        assert cpu[""] is not None and cpu[""] < cpu["spin"]
    finally:
        spin.kill()
        spin.wait()
