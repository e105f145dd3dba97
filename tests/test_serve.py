"""`damocles-ext serve`: damocles' JSON lines on stdin/stdout.

The first part drives the JSON-lines server in-process over memory streams with a submit function
the test controls (framing, exactly-once answers, bad lines, end of input). The second part runs
the real command with real children, driven like damocles-manager drives a processor.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import psutil
import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers.child import make_plugin_dist
from helpers.frontend import (
    DEXT,
    ManagerLike,
    dext_run,
    dext_run_async,
    make_task,
    plugin_block,
    running,
    write_config,
)
from helpers.scheduling import Gate

from damocles_ext.client import connect
from damocles_ext.errors import ProverError
from damocles_ext.frontends.serve_jsonl import JsonLineServer
from damocles_ext.protocol import jsonl

# -- in-process: the server's own logic ------------------------------------------------------------


class Harness:
    """A JsonLineServer between two memory pipes; submit waits for the test's go-ahead per miner."""

    def __init__(self) -> None:
        self.to_server, server_in = trio.testing.memory_stream_one_way_pair()
        server_out, self.from_server = trio.testing.memory_stream_one_way_pair()
        self.release: dict[int, trio.Event] = {}
        self.started: dict[int, trio.Event] = {}
        self.input_closed = trio.Event()
        self.reader = jsonl.LineReader()
        self.lines: list[bytes] = []
        self.server = JsonLineServer(
            "window_post",
            self.submit,
            receive_stream=server_in,
            send_stream=server_out,
            on_input_closed=self.input_closed.set,
        )

    def gate(self, miner: int) -> tuple[trio.Event, trio.Event]:
        return (
            self.release.setdefault(miner, trio.Event()),
            self.started.setdefault(miner, trio.Event()),
        )

    async def submit(self, task):
        release, started = self.gate(task.miner_id)
        started.set()
        if task.miner_id == 13:
            raise ProverError("prover failed: miner 13")
        if task.miner_id == 66:
            raise KeyError("a bug")
        if task.miner_id == 67:
            return "not an output"  # a bug of ours: an answer that cannot be encoded
        await release.wait()
        return echo_output(task)

    async def read_lines(self, count: int) -> list[bytes]:
        while len(self.lines) < count:
            data = await self.from_server.receive_some()
            assert data, "server output ended"
            self.lines.extend(self.reader.receive_data(data))
        taken, self.lines = self.lines[:count], self.lines[count:]
        return taken

    async def responses(self, count: int) -> dict[int, jsonl.JsonResponse]:
        out = {}
        for line in await self.read_lines(count):
            r = jsonl.decode_response(line, "window_post")
            assert r.id not in out, f"request {r.id} answered twice"
            out[r.id] = r
        return out


@pytest.fixture
async def harness(nursery):
    h = Harness()
    nursery.start_soon(h.server.run)
    return h


async def test_ready_line_comes_first_without_any_request(harness):
    assert await harness.read_lines(1) == [b"window_post processor ready\n"]


async def test_concurrent_requests_are_answered_once_each_in_completion_order(harness):
    await harness.read_lines(1)
    await harness.to_server.send_all(
        b"".join(jsonl.encode_request(i, make_task(100 + i)) for i in (1, 2, 3))
    )
    for i in (1, 2, 3):
        await harness.gate(100 + i)[1].wait()  # all three run at once
    for i in (3, 1, 2):
        harness.release[100 + i].set()
        (line,) = await harness.read_lines(1)
        assert line == jsonl.encode_response(i, output=echo_output(make_task(100 + i)))


async def test_prover_error_and_internal_error_become_err_msg(harness):
    await harness.read_lines(1)
    await harness.to_server.send_all(
        jsonl.encode_request(7, make_task(13)) + jsonl.encode_request(8, make_task(66))
    )
    got = await harness.responses(2)
    assert got[7] == jsonl.JsonResponse(7, None, "request 7 (window_post): prover failed: miner 13")
    assert got[8].output is None
    assert (
        got[8].err_msg
        == "request 8 (window_post): internal error in damocles-ext: KeyError: 'a bug'"
    )


async def test_a_bug_of_ours_writing_an_answer_is_that_requests_answer_not_the_servers_end(
    harness,
):
    # Through submit (a task per request: serve --connect, --jobs, split WindowPoSt): the
    # answer that cannot be written is answered with the internal error; the rest go on.
    await harness.read_lines(1)
    release, _ = harness.gate(1)
    release.set()
    await harness.to_server.send_all(
        jsonl.encode_request(9, make_task(67)) + jsonl.encode_request(10, make_task(1))
    )
    got = await harness.responses(2)
    assert got[9].output is None and "internal error in damocles-ext" in got[9].err_msg
    assert got[10].output == echo_output(make_task(1))


async def test_bad_request_with_readable_id_is_answered_with_what_was_wrong(harness, caplog):
    await harness.read_lines(1)
    task = msgspec.json.decode(jsonl.task_to_json(make_task(1)))
    task["seed"] = task["seed"][:31]
    await harness.to_server.send_all(msgspec.json.encode({"id": 5, "task": task}) + b"\n")
    (got,) = (await harness.responses(1)).values()
    assert got.id == 5 and got.output is None
    assert "request 5" in got.err_msg and "$.seed" in got.err_msg and "32" in got.err_msg


async def test_unreadable_lines_are_logged_and_skipped(harness, caplog):
    await harness.read_lines(1)
    caplog.set_level(logging.ERROR, "damocles_ext.serve")
    harness.gate(2)[0].set()
    await harness.to_server.send_all(
        b"this is not json\n" + b'{"task": {}}\n' + jsonl.encode_request(2, make_task(2))
    )
    (got,) = (await harness.responses(1)).values()
    assert got.id == 2 and got.output == echo_output(make_task(2))
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot answer it" in m and "this is not json" in m for m in messages)
    assert harness.server.statistics().unreadable == 2


async def test_an_internal_error_on_one_line_is_logged_and_serve_goes_on(
    harness, caplog, monkeypatch
):
    original = jsonl.decode_request

    def buggy_decode_request(line, stage):
        if b'"id":3,' in line:
            raise RuntimeError("injected bug on one line")
        return original(line, stage)

    monkeypatch.setattr(jsonl, "decode_request", buggy_decode_request)
    await harness.read_lines(1)
    harness.gate(4)[0].set()
    await harness.to_server.send_all(
        jsonl.encode_request(3, make_task(3)) + jsonl.encode_request(4, make_task(4))
    )
    (line,) = await harness.read_lines(1)
    assert line == jsonl.encode_response(4, output=echo_output(make_task(4)))
    logged = [r for r in caplog.records if "internal error on a request line" in r.getMessage()]
    assert logged and logged[0].exc_info is not None


async def test_duplicate_id_in_flight_is_logged_not_answered_and_the_first_still_answered(
    harness, caplog
):
    # damocles routes an answer to whoever waits for its id: an error answer to the duplicate
    # would reach the first request's caller, and its proof would be lost.
    await harness.read_lines(1)
    await harness.to_server.send_all(jsonl.encode_request(4, make_task(40)))
    await harness.gate(40)[1].wait()
    bad = msgspec.json.encode({"id": 4, "task": {"miner_id": 1}}) + b"\n"
    await harness.to_server.send_all(jsonl.encode_request(4, make_task(41)) + bad)
    harness.gate(5)[0].set()
    await harness.to_server.send_all(jsonl.encode_request(5, make_task(5)))
    (line,) = await harness.read_lines(1)  # request 5 went past the duplicates
    assert line == jsonl.encode_response(5, output=echo_output(make_task(5)))
    assert harness.server.statistics().duplicates == 2
    assert not harness.gate(41)[1].is_set()
    harness.gate(40)[0].set()
    (line,) = await harness.read_lines(1)
    assert line == jsonl.encode_response(4, output=echo_output(make_task(40)))
    logged = [r.getMessage() for r in caplog.records if "already in flight" in r.getMessage()]
    assert len(logged) == 2 and all("request 4" in m for m in logged)


async def test_end_of_input_starts_shutdown_and_run_returns_after_the_last_answer():
    h = Harness()
    done = trio.Event()

    async def run_server() -> None:
        await h.server.run()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_server)
        await h.read_lines(1)
        await h.to_server.send_all(jsonl.encode_request(1, make_task(9)))
        await h.gate(9)[1].wait()
        await h.to_server.aclose()
        await h.input_closed.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # still owes request 1
        h.release[9].set()
        (line,) = await h.read_lines(1)
        assert line == jsonl.encode_response(1, output=echo_output(make_task(9)))
        await done.wait()


async def test_stop_reading_takes_no_more_requests_but_answers_those_read(harness):
    await harness.read_lines(1)
    await harness.to_server.send_all(jsonl.encode_request(1, make_task(50)))
    await harness.gate(50)[1].wait()
    harness.server.stop_reading()
    await harness.input_closed.wait()
    await harness.to_server.send_all(jsonl.encode_request(2, make_task(51)))
    harness.gate(51)[0].set()
    harness.release[50].set()
    (line,) = await harness.read_lines(1)
    assert line == jsonl.encode_response(1, output=echo_output(make_task(50)))
    await trio.testing.wait_all_tasks_blocked()
    assert not harness.gate(51)[1].is_set()


async def test_broken_stdout_stops_taking_requests():
    to_server, server_in = trio.testing.memory_stream_one_way_pair()
    server_out, from_server = trio.testing.memory_stream_one_way_pair()
    closed = trio.Event()

    async def submit(task):
        return echo_output(task)

    server = JsonLineServer(
        "window_post",
        submit,
        receive_stream=server_in,
        send_stream=server_out,
        on_input_closed=closed.set,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        assert await from_server.receive_some() == jsonl.ready_line("window_post")
        await from_server.aclose()  # the reader is gone
        await to_server.send_all(jsonl.encode_request(1, make_task(1)))
        await closed.wait()


async def test_a_stdout_pipe_whose_reader_left_is_logged_saying_why(caplog):
    # trio's BrokenResourceError has no text of its own: it was "stdout broke (): answer ...".
    to_server, server_in = trio.testing.memory_stream_one_way_pair()
    reader, writer = os.pipe()
    out = trio.lowlevel.FdStream(writer)
    closed = trio.Event()

    async def submit(task):
        return echo_output(task)

    server = JsonLineServer(
        "window_post", submit, receive_stream=server_in, send_stream=out,
        on_input_closed=closed.set,
    )  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            await trio.testing.wait_all_tasks_blocked()
            assert os.read(reader, 1 << 16) == jsonl.ready_line("window_post")
            os.close(reader)  # the reader is gone
            await to_server.send_all(jsonl.encode_request(1, make_task(1)))
            await closed.wait()
    finally:
        await out.aclose()
    assert "stdout broke (Broken pipe): answer to request 1 dropped, stopping" in caplog.text


async def test_a_stdout_that_breaks_before_the_ready_line_is_logged_saying_why(caplog):
    _, server_in = trio.testing.memory_stream_one_way_pair()

    async def submit(task):
        return echo_output(task)

    full = trio.lowlevel.FdStream(os.open("/dev/full", os.O_WRONLY))
    server = JsonLineServer("window_post", submit, receive_stream=server_in, send_stream=full)
    try:
        await server.send_ready()
    finally:
        await full.aclose()
    assert "stdout broke (No space left on device) before the ready line, stopping" in caplog.text


# -- the real command, real children -------------------------------------------------------------


def _stderr_text(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


async def serve_echo_round(cfg: Path, stderr_file, tasks: list) -> ManagerLike:
    """Run `serve window_post -c cfg`, send every task at once, check that each is answered with
    echo's output for it, then close stdin and check the exit code; returns the manager."""
    async with trio.open_nursery() as nursery:
        m = await ManagerLike.start(
            nursery,
            [*DEXT, "serve", "window_post", "-c", str(cfg)],
            "window_post",
            stderr=stderr_file,
        )
        with trio.fail_after(30):
            ids = [await m.send(task) for task in tasks]
            assert ids == list(range(1, len(tasks) + 1))
            for task, request_id in zip(tasks, ids, strict=True):
                r = await m.wait(request_id)
                assert r.err_msg is None, r.err_msg
                assert r.output == echo_output(task)
            await m.close_stdin()
            assert await m.process.wait() == 0
            await m.eof.wait()
    return m


async def test_serve_answers_concurrent_requests_like_damocles_manager_expects(
    tmp_path, stderr_file
):
    cfg = write_config(
        tmp_path,
        plugin_block("WdPost", "sleep", concurrent=4, seconds=0.2)
        + plugin_block("WdPost", "echo")
        + plugin_block("WinPost", "echo"),
    )
    m = await serve_echo_round(cfg, stderr_file, [make_task(1000 + i) for i in range(20)])
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])
    # Only this stage's children were started.
    log = _stderr_text(stderr_file)
    assert "winning_post" not in log.replace("serve window_post", ""), log


async def test_serve_answers_every_request_with_a_proof_though_one_child_fails_them_all(
    tmp_path, stderr_file
):
    # A GPU gone bad under one of two children: damocles-manager, which gives up a partition
    # batch on an error, still gets a proof for every request (each error ran again on the
    # other child), and the failing child is benched.
    cfg = write_config(
        tmp_path,
        plugin_block("WdPost", "sleep", seconds=0, fail="always")
        + plugin_block("WdPost", "sleep", seconds=0.2),  # long enough for #0 to get its turns
    )
    m = await serve_echo_round(cfg, stderr_file, [make_task(1000 + i % 4) for i in range(20)])
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])
    log = _stderr_text(stderr_file)
    assert "failed on window_post#0" in log and "retrying (attempt 2 of 2)" in log
    assert "window_post#0 (pid" in log and "it takes no request for 30s" in log


async def test_serve_runs_a_split_window_post_like_a_whole_one(tmp_path, stderr_file):
    # damocles-manager sees the same JSON lines; the vanilla and SNARK steps run on their own
    # children.
    cfg = write_config(
        tmp_path,
        plugin_block("WdPostVanilla", "sleep", concurrent=2, seconds=0.1)
        + plugin_block("WdPostSnark", "echo")
        + plugin_block("WinPost", "echo"),
    )
    m = await serve_echo_round(cfg, stderr_file, [make_task(2000 + i, 3) for i in range(4)])
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])
    log = _stderr_text(stderr_file)
    assert "window_post_vanilla#0" in log and "window_post_snark#0" in log, log


DYING_CHILD = """
import os, subprocess, sys
marker = os.environ["MARKER"]
if not os.path.exists(marker):
    with open(os.environ["FIFO"]) as f:  # the other child's helper is running
        f.read()
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    # One grandchild in a session of its own, one in our process group; then die.
    g1 = subprocess.Popen(sleeper, start_new_session=True)
    g2 = subprocess.Popen(sleeper)
    with open(marker + ".tmp", "w") as f:
        f.write(f"{g1.pid} {g2.pid} {os.getpid()}")
    os.rename(marker + ".tmp", marker)
    os._exit(3)
sys.stdout.write("window_post processor ready\\n")
sys.stdout.flush()
sys.stdin.read()
"""

HELPER_CHILD = """
import os, subprocess, sys
# A double-forked helper: the shell exits, the sleep is orphaned while this child lives on.
subprocess.run(["sh", "-c", "sleep 120 & echo $! > " + os.environ["HELPER"]], check=True)
with open(os.environ["FIFO"], "w") as f:
    f.write("go")
sys.stdout.write("window_post processor ready\\n")
sys.stdout.flush()
sys.stdin.read()
"""


async def test_serve_kills_what_a_dead_child_left_and_spares_a_live_childs_helper(
    tmp_path, stderr_file
):
    marker, helper, fifo = tmp_path / "left.pids", tmp_path / "helper.pid", tmp_path / "fifo"
    os.mkfifo(fifo)
    for name, code in (("dying.py", DYING_CHILD), ("helper.py", HELPER_CHILD)):
        (tmp_path / name).write_text(code)
    envs = f'MARKER = "{marker}"\nHELPER = "{helper}"\nFIFO = "{fifo}"\n'
    cfg = write_config(
        tmp_path,
        "".join(
            f'[[WdPost]]\nBin = "{sys.executable}"\nArgs = ["{tmp_path / name}"]\n'
            f"[WdPost.Envs]\n{envs}"
            for name in ("helper.py", "dying.py")
        ),
    )
    left: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            m = await ManagerLike.start(
                nursery,
                [*DEXT, "serve", "window_post", "-c", str(cfg), "--restart-delay", "0.05",
                 "--log-format", "json"],
                "window_post",
                stderr=stderr_file,
            )  # fmt: skip
            serve = psutil.Process(m.process.pid)
            with trio.fail_after(30):
                while not marker.exists():  # noqa: ASYNC110 - another process writes it
                    await trio.sleep(0.02)
                *left, dead = [int(pid) for pid in marker.read_text().split()]
                left.append(int(helper.read_text()))
                # The dead child's grandchildren came to serve (a child subreaper), were killed,
                # and reaped: no zombie left either. Without that they would live on (120 s).
                while any(psutil.pid_exists(pid) for pid in left[:2]):  # noqa: ASYNC110 - pids send no event
                    await trio.sleep(0.02)
                assert not [p for p in serve.children() if p.status() == psutil.STATUS_ZOMBIE]
                # The live child's orphaned helper also came to serve, and was left alone.
                assert psutil.Process(left[2]).ppid() == serve.pid
                await m.close_stdin()
                assert await m.process.wait() == 0
    finally:
        for pid in left:
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()
    log = _stderr_text(stderr_file)
    assert f"killing pid {left[0]}" in log and "outside its process group" in log, log
    assert f"killing pid {left[2]}" not in log, log
    # Its record carries the fields of the child's process that left it, as that child's other
    # records do, and the orphan's own: a JSON log consumer finds it by child, or by that pid.
    [kill] = [r for r in map(json.loads, log.splitlines()) if r.get("orphan_pid") == left[0]]
    assert kill["level"] == "warning" and kill["message"].startswith(f"killing pid {left[0]} ")
    assert (kill["child"], kill["stage"], kill["index"], kill["pid"]) == (
        "window_post#1", "window_post", 1, dead
    ), kill  # fmt: skip
    assert "time.sleep(120)" in kill["orphan_command"], kill


def test_an_orphans_record_keeps_a_long_lived_childs_fields_through_a_siblings_crash_loop(
    caplog,
):
    # The reaper keeps a bounded number of spawns' fields: it forgot the oldest spawn, so a
    # child's process spawned early and still running lost its fields after SPAWNS_REMEMBERED
    # spawns of a crash-looping sibling, and the record of what it left behind had none. Now
    # the ones ended longest ago go first; a running one's stay, and one that just ended too.
    from damocles_ext.supervisor.reaper import SPAWNS_REMEMBERED, Reaper

    running = {"t.1"}
    reaper = Reaper(lambda: [(None, mark) for mark in running])
    reaper.spawned("t.1", {"child": "window_post#0", "index": 0, "pid": 100})
    for n in range(2, SPAWNS_REMEMBERED + 10):  # window_post#1 crashing over and over
        reaper.spawned(f"t.{n}", {"child": "window_post#1", "index": 1, "pid": 100 + n})
        reaper.sweep_soon(f"t.{n}")
    running.clear()  # window_post#0's process ends at last, leaving an orphan behind
    reaper.sweep_soon("t.1")
    for n in range(SPAWNS_REMEMBERED + 10, SPAWNS_REMEMBERED + 20):  # the crash loop goes on
        reaper.spawned(f"t.{n}", {"child": "window_post#1", "index": 1, "pid": 100 + n})
        reaper.sweep_soon(f"t.{n}")
    caplog.set_level(logging.WARNING, "damocles_ext.supervisor")
    orphan = psutil.Process()  # (only its command line is read)
    reaper._log_orphan(orphan, "t.1")
    reaper._log_orphan(orphan, "t.2")  # ended longest ago: forgotten
    first, second = caplog.records
    assert (first.child, first.index, first.pid) == ("window_post#0", 0, 100), first.__dict__
    assert first.getMessage().startswith(f"killing pid {orphan.pid} (")
    assert "window_post#0 (pid 100) started it" in first.getMessage()
    assert not hasattr(second, "child") and "a child started it" in second.getMessage()


# Run in a process of its own: becoming a child subreaper is a property of the whole process.
_ZOMBIE_SCRIPT = r"""
import os, subprocess, sys
from damocles_ext.supervisor.orphans import OrphanAdopter

adopter = OrphanAdopter()
assert adopter.enable()
# A subprocess of this program (an observer plugin's, say), in our own process group.
ours = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
# Stands for an orphan of the tree that exited: not spawned by the supervisor, its own group.
stray = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"], process_group=0)
for p in (ours, stray):
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: a zombie
orphans, zombies = adopter.find(spawned=set(), live_marks=set())
assert orphans == [], orphans
assert zombies == [stray.pid], (zombies, ours.pid, stray.pid)
for pid in zombies:
    adopter.reap(pid)
assert ours.wait() == 3, ours.returncode  # its owner still gets its real exit status
print("ok")
"""


def test_the_orphan_sweep_leaves_zombies_of_our_own_process_group_to_their_owner():
    # serve and run reap the zombies among their children that they did not spawn (orphans of
    # a child's tree); a subprocess of the supervisor's own process (an observer plugin's) must
    # keep its exit status for the Popen that waits for it.
    result = subprocess.run(
        [sys.executable, "-c", _ZOMBIE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


async def test_serve_stdin_eof_drains_in_flight_requests(tmp_path, stderr_file):
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", concurrent=3, seconds=0.5))
    async with trio.open_nursery() as nursery:
        m = await ManagerLike.start(
            nursery,
            [*DEXT, "serve", "window_post", "-c", str(cfg)],
            "window_post",
            stderr=stderr_file,
        )
        with trio.fail_after(30):
            ids = [await m.send(make_task(i)) for i in range(3)]
            await m.close_stdin()  # at once: all three are still queued or running
            assert await m.process.wait() == 0, _stderr_text(stderr_file)
            await m.eof.wait()
    for i, request_id in enumerate(ids):
        assert m.responses[request_id].output == echo_output(make_task(i))


async def test_serve_deadline_after_gives_requests_a_deadline_that_cancels_them(
    tmp_path, stderr_file
):
    # damocles' JSON lines carry no deadline: without --deadline-after this proof would be
    # answered after its 30 s; with it, it is cancelled at its deadline and answered with why.
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=30, progress_interval=0.1))
    argv = [*DEXT, "serve", "window_post", "-c", str(cfg), "--deadline-after", "1s"]
    async with trio.open_nursery() as nursery:
        # Sent once the child is ready: its deadline passes while it runs, not before it starts.
        response = await _answer_to_one_window_post(nursery, argv, None, "ready: stage window_post")
    assert response.output is None, response
    assert response.err_msg.startswith("request 100: passed its deadline "), response
    assert "request 1" not in response.err_msg.replace("request 100", ""), response


async def test_a_winning_post_stuck_in_its_prover_is_answered_at_its_deadline_and_its_child_freed(
    tmp_path,
):
    # `fail = "hang"` is a prover stuck in a GPU call: it never returns and ignores Cancel, while
    # the built-in runtime goes on sending Progress, so no heartbeat timeout sees it (1 s here,
    # a third of the deadline). The request's deadline (serve gives one by default; 3 s here)
    # answers it and, the Cancel ignored, the child is killed after CancelGraceSecs and started
    # again.
    block = plugin_block("WinPost", "sleep", fail="hang")
    cfg = write_config(tmp_path, block + "CancelGraceSecs = 0.2\nHeartbeatTimeoutSecs = 1\n")
    argv = [*DEXT, "serve", "winning_post", "-c", str(cfg), "--deadline-after", "3s"]
    async with trio.open_nursery() as nursery:
        m = await ManagerLike.start(nursery, argv, "winning_post", stderr=subprocess.PIPE)
        with trio.fail_after(30):
            await m.wait_log("ready: stage winning_post")
            rid = await m.send(make_task(1, stage="winning_post"))
            response = await m.wait(rid)
            assert response.output is None and "passed its deadline" in response.err_msg
            await m.wait_log("0.2s after a Cancel")
            await m.wait_log_times("ready: stage winning_post", 2)
            await m.close_stdin()
            assert await m.process.wait() == 0, "\n".join(m.log)
    assert not any("hung" in line or "silent" in line for line in m.log), "\n".join(m.log)


async def _answer_to_one_window_post(
    nursery, argv: list[str], stderr_file, ready_log: str | None = None
):
    """Start a serve, send it one WindowPoSt (id 100: not the supervisor's own number for it;
    once `ready_log` is in serve's log, when given), close its stdin; its answer (the serve
    exits 0)."""
    stderr = subprocess.PIPE if ready_log is not None else stderr_file
    m = await ManagerLike.start(nursery, argv, "window_post", stderr=stderr)
    with trio.fail_after(20):
        if ready_log is not None:
            await m.wait_log(ready_log)
        await m.send_raw(jsonl.encode_request(100, make_task(1)), request_id=100)
        response = await m.wait(100)
        await m.close_stdin()
        assert await m.process.wait() == 0
    return response


@pytest.mark.parametrize(
    ("given", "stage", "deadline_after"),
    [
        ([], "window_post", 2400.0),  # past 40 minutes no WindowPoSt proof can count
        ([], "winning_post", 300.0),
        (["--deadline-after", "90s"], "winning_post", 90.0),
        (["--deadline-after", "0"], "window_post", None),
        (["--deadline-after", "off"], "window_post", None),
        (["--connect"], "winning_post", 300.0),
    ],
)
def test_serve_gives_each_request_a_deadline_by_default(given, stage, deadline_after):
    # A prover stuck in a GPU call under the built-in runtime still sends Progress (the
    # runtime's, every 2 s), so no heartbeat catches it: the deadline is what answers its
    # request and frees its child.
    from damocles_ext.cli import build_parser
    from damocles_ext.commands import serve

    source = [] if "--connect" in given else ["-c", "x.cfg"]
    args = build_parser().parse_args(["serve", stage, *given, *source])
    serve.check_supervising_options(args)
    assert args.deadline_after == deadline_after


@pytest.mark.parametrize("value", ["-5m", "nan", "inf", "35x", "m", "999999999h", "never"])
def test_serve_deadline_after_refuses_what_is_not_a_duration(tmp_path, value):
    result = dext_run(
        "serve",
        "window_post",
        "-c",
        str(tmp_path / "x.cfg"),
        f"--deadline-after={value}",
        input=b"",
    )
    assert result.returncode == 2 and b"--deadline-after" in result.stderr, result.stderr
    assert b"Traceback" not in result.stderr


def test_serve_refuses_deadline_after_given_twice_naming_both(tmp_path):
    # argparse kept the last one silently: a unit's 35m, overridden by an added 5m, took effect.
    result = dext_run("serve", "window_post", "-c", str(tmp_path / "x.cfg"),
                      "--deadline-after", "35m", "--deadline-after=5m", input=b"")  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 2 and result.stdout == b"", err
    assert "argument --deadline-after: given twice, '35m' and '5m': give it once" in err, err


async def test_serve_sigterm_answers_every_request_and_leaves_no_process(tmp_path, stderr_file):
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", concurrent=2, seconds=0.3))
    async with trio.open_nursery() as nursery:
        m = await ManagerLike.start(
            nursery,
            [*DEXT, "serve", "window_post", "-c", str(cfg)],
            "window_post",
            stderr=stderr_file,
        )
        with trio.fail_after(30):
            first = await m.request(make_task(1))  # a child is up and has served
            assert first.output == echo_output(make_task(1))
            family = psutil.Process(m.process.pid).children(recursive=True)
            assert family
            second = await m.send(make_task(2))
            m.process.send_signal(signal.SIGTERM)
            assert await m.process.wait() == 0, _stderr_text(stderr_file)
            await m.eof.wait()
    # In flight or still queued when the signal came: either way answered exactly once.
    response = m.responses[second]
    assert (response.output == echo_output(make_task(2))) != (response.err_msg is not None)
    assert m.duplicates == [] and m.unknown == []
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def test_a_second_signal_answers_every_request_in_flight_and_stops_at_once(tmp_path):
    # damocles-manager never fails the requests of a processor that exits: each must be answered.
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            m, (running, queued), family = await _serving_30s_proofs(nursery, tmp_path, 2)
            m.process.send_signal(signal.SIGTERM)
            await m.wait_log("shutting down gracefully")
            m.process.send_signal(signal.SIGTERM)
            assert await m.process.wait() == 0, "\n".join(m.log)
            await m.eof.wait()
            nursery.cancel_scope.cancel()
    for rid in (running, queued):
        error = m.responses[rid].err_msg
        assert error is not None and error.startswith(f"request {rid}"), error
    assert "stopped at once (second signal)" in m.responses[running].err_msg
    assert "on window_post#0" in m.responses[running].err_msg
    assert m.duplicates == [] and m.unknown == []
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def test_serve_stops_at_once_when_the_manager_is_gone(tmp_path):
    # A SIGKILLed damocles-manager closes both of our pipes: no answer can reach anyone, so the
    # 30 s proof in flight is not waited for.
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            m, _, family = await _serving_30s_proofs(nursery, tmp_path, 1)
            assert family
            await m.vanish()
            assert await m.process.wait() == 0, "\n".join(m.log)
            await m.wait_log("the reader is gone")
            await m.wait_log("did not finish on window_post#0")
            nursery.cancel_scope.cancel()
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def _serving_30s_proofs(nursery, tmp_path, n: int):
    """`serve window_post` with one child proving for 30 s, sent `n` requests: the manager, the
    request ids, and serve's children once the last request was submitted."""
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=30))
    argv = [*DEXT, "serve", "window_post", "-c", str(cfg), "--log-level", "debug"]
    m = await ManagerLike.start(nursery, argv, "window_post", stderr=subprocess.PIPE)
    await m.wait_log("ready: stage window_post")
    ids = [await m.send(make_task(k)) for k in range(1, n + 1)]
    # Logged right before submit(), which dispatches to the free child before it blocks.
    await m.wait_log(f"request {ids[-1]}: submitted")
    return m, ids, psutil.Process(m.process.pid).children(recursive=True)


def test_serve_config_error_exits_2_with_the_message_and_no_ready_line(tmp_path):
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\nConcurent = 2\n')
    result = dext_run("serve", "window_post", "-c", str(cfg), input=b"")
    assert result.returncode == 2
    assert result.stdout == b""
    assert b"Concurent" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        (
            plugin_block("WdPost", "sleep", fail="sometimes"),
            "WdPost[0].Plugin: prover 'sleep': sleep: option 'fail'",
        ),
        (
            plugin_block("WdPost", "native", library="/nonexistent/libvendor.so"),
            (
                "WdPost[0].Plugin: prover 'native': native: option 'library' = "
                "'/nonexistent/libvendor.so': no such file"
            ),
        ),
        (plugin_block("WdPost", "no-such-prover"), "WdPost[0].Plugin: unknown prover"),
        (
            '[[WdPost]]\nBin = "/nonexistent/prover"\n',
            'WdPost[0].Bin: "/nonexistent/prover" does not exist',
        ),
        ('[[WdPost]]\nBin = "/tmp"\n', 'WdPost[0].Bin: "/tmp" is a directory, not a program'),
    ],
)
def test_serve_whose_prover_cannot_load_exits_2_before_the_ready_line(tmp_path, block, reason):
    # damocles' own processor never says ready then, so damocles-manager's start fails; before,
    # serve said ready and the first request failed 15 s later, after five failed starts.
    cfg = write_config(tmp_path, block)
    result = dext_run("serve", "window_post", "-c", str(cfg), input=b"")
    assert result.returncode == 2, result.stderr.decode()
    assert result.stdout == b""
    err = result.stderr.decode()
    assert f"error: {cfg}: {reason}" in err, err
    assert "Traceback" not in err


def test_serve_checks_only_the_children_of_its_stage(tmp_path):
    cfg = write_config(
        tmp_path, plugin_block("WdPost", "echo") + plugin_block("WinPost", "no-such-prover")
    )
    result = dext_run("serve", "window_post", "-c", str(cfg), input=b"")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"window_post processor ready\n"


def test_a_native_library_that_is_not_one_fails_serve_before_the_ready_line(tmp_path):
    library = tmp_path / "libvendor.so"
    library.write_text("not a library\n")
    cfg = write_config(tmp_path, plugin_block("WdPost", "native", library=str(library)))
    result = dext_run("serve", "window_post", "-c", str(cfg), input=b"")
    assert (result.returncode, result.stdout) == (2, b""), result.stderr.decode()
    assert b"is not a shared library (no ELF header)" in result.stderr


def test_serve_of_a_config_whose_child_serves_that_config_again_exits_2_before_the_ready_line(
    tmp_path,
):
    # damocles-manager's own file given to serve (`--conf-dir` of its directory, as `serve
    # --jobs` takes it): its [[WdPost]] runs this very serve, which would start another, and so
    # on, a new process every fraction of a second, while the first one looked ready.
    entry = [sys.executable, "-m", "damocles_ext", "serve", "window_post", "--conf-dir"]
    args = msgspec.json.encode([*entry[1:], str(tmp_path)]).decode()
    cfg = write_config(tmp_path, f'[[WdPost]]\nBin = "{sys.executable}"\nArgs = {args}\n')
    result = dext_run("serve", "window_post", "-c", str(cfg), input=b"", timeout=30)
    assert (result.returncode, result.stdout) == (2, b""), result.stderr.decode()
    err = result.stderr.decode()
    assert f"error: {cfg}: WdPost[0] runs `damocles-ext serve window_post --conf-dir" in err, err
    assert "which reads this same file: each serve would start another, without end" in err
    assert "Traceback" not in err


def test_serve_without_children_for_the_stage_exits_2(tmp_path):
    cfg = write_config(tmp_path, plugin_block("WinPost", "echo"))
    result = dext_run("serve", "window_post", "--conf-dir", str(tmp_path), input=b"")
    assert result.returncode == 2
    assert b"no [[WdPost]] table" in result.stderr
    assert cfg.exists()


def test_serve_missing_config_exits_2(tmp_path):
    result = dext_run("serve", "window_post", "-c", str(tmp_path / "nope.cfg"), input=b"")
    assert result.returncode == 2
    assert b"nope.cfg" in result.stderr and b"Traceback" not in result.stderr


def test_serve_rejects_an_unknown_stage_with_usage_exit_2():
    result = dext_run("serve", "window_posts", "-c", "x.cfg", input=b"")
    assert result.returncode == 2
    assert b"invalid choice: 'window_posts'" in result.stderr


# -- serve --connect: both stages through one `damocles-ext run` -------------------------------


async def wait_status(path: Path, condition, what: str):
    """Poll `run`'s status document until `condition(doc)` holds; 10 s at most."""
    doc = None
    async with connect(path) as client:
        with trio.move_on_after(10):
            while True:
                doc = await client.status()
                if condition(doc):
                    return doc
                await trio.sleep(0.02)
    raise AssertionError(f"never saw: {what}; the last status: {doc}")


def _stage(doc, stage: str):
    return next(s for s in doc.stages if s.stage == stage)


def _connect_argv(stage: str, path: Path, *extra: str) -> list[str]:
    return [*DEXT, "serve", stage, "--connect", str(path), *extra]


def locked(block: str, lock: str = "gpu0") -> str:
    return block + f'Locks = ["{lock}"]\n'


async def test_two_serve_connect_processes_share_the_locks_of_one_run(
    tmp_path, sock_path, stderr_file
):
    # damocles-manager starts one processor per stage; through --connect both reach one
    # supervisor, so the WinningPoSt waits for the WindowPoSt holding gpu0, and then goes
    # before the WindowPoSt queued earlier.
    cfg = write_config(
        tmp_path,
        locked(plugin_block("WdPost", "sleep", seconds=1.5, progress_interval=0.1))
        + locked(plugin_block("WinPost", "sleep", seconds=0.3, progress_interval=0.1)),
    )
    window1, window2 = make_task(1), make_task(2)
    winning = make_task(3, stage="winning_post")
    order: list[str] = []
    async with trio.open_nursery() as nursery, running(nursery, cfg, sock_path) as (run, log):
        serves: dict[str, ManagerLike] = {}

        async def start(stage: str) -> None:
            argv = _connect_argv(stage, sock_path)
            serves[stage] = await ManagerLike.start(nursery, argv, stage, stderr=stderr_file)

        async with trio.open_nursery() as starting:
            for stage in ("window_post", "winning_post"):
                starting.start_soon(start, stage)
        wd, win = serves["window_post"], serves["winning_post"]

        async def note(m: ManagerLike, request_id: int, name: str) -> None:
            await m.wait(request_id)
            order.append(name)

        with trio.fail_after(30):
            async with trio.open_nursery() as answers:
                first = await wd.send(window1)
                answers.start_soon(note, wd, first, "window1")
                # (A status takes 0.25 s: the first WindowPoSt lasts long enough for two.)
                await wait_status(
                    sock_path, lambda d: _stage(d, "window_post").in_flight == 1, "window1 runs"
                )
                second = await wd.send(window2)
                answers.start_soon(note, wd, second, "window2")
                third = await win.send(winning)
                answers.start_soon(note, win, third, "winning")
                doc = await wait_status(
                    sock_path,
                    lambda d: (
                        (_stage(d, "window_post").queued, _stage(d, "winning_post").queued)
                        == (1, 1)
                    ),
                    "window2 and winning queued",
                )
                assert _stage(doc, "winning_post").waiting_for_lock == ["gpu0"], doc
                assert _stage(doc, "window_post").in_flight == 1, doc  # window1 still runs
                # The other stage's task type is refused by the serve's own decoding; and its
                # stdin closing still lets the queued WinningPoSt be answered.
                await win.send_raw(jsonl.encode_request(2, window1), 2)
                wrong = await win.wait(2)
                await win.close_stdin()
            assert order == ["window1", "winning", "window2"]
            assert wd.responses[first] == jsonl.JsonResponse(first, echo_output(window1), None)
            assert wd.responses[second] == jsonl.JsonResponse(second, echo_output(window2), None)
            assert win.responses[third] == jsonl.JsonResponse(third, echo_output(winning), None)
            assert wrong.output is None and "proof_type" in wrong.err_msg, wrong
            assert await win.process.wait() == 0, _stderr_text(stderr_file)
            await wd.close_stdin()
            assert await wd.process.wait() == 0, _stderr_text(stderr_file)
            assert (wd.duplicates, wd.unknown, wd.bad_lines) == ([], [], [])
            assert (win.duplicates, win.unknown, win.bad_lines) == ([], [], [])
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()


async def test_serve_connect_deadline_after_reaches_the_supervisor(
    tmp_path, sock_path, stderr_file
):
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=30, progress_interval=0.1))
    argv = _connect_argv("window_post", sock_path, "--deadline-after", "1")
    async with trio.open_nursery() as nursery, running(nursery, cfg, sock_path) as (_, log):
        with trio.fail_after(30):
            await log.wait_for("): ready (")  # the deadline passes while it runs
        response = await _answer_to_one_window_post(nursery, argv, stderr_file)
    assert response.output is None, response
    assert response.err_msg.startswith("request 100: passed its deadline "), response
    assert "request 1" not in response.err_msg.replace("request 100", ""), response


def test_serve_connect_to_a_socket_path_too_long_says_so(tmp_path):
    result = dext_run("serve", "window_post", "--connect", str(tmp_path / ("s" * 120)), input=b"")
    assert result.returncode == 2 and result.stdout == b""
    assert b"path too long" in result.stderr and b"None" not in result.stderr, result.stderr


def test_the_forwarder_passes_on_no_output_of_another_stage():
    # serve --connect sends a task typed by its stage; an answer of the other stage would be the
    # supervisor's bug and must not reach damocles-manager as a proof.
    from damocles_ext.frontends.forwarder import Forwarder
    from damocles_ext.tasks import WinningPoStOutput

    class Remote:
        path = "/run/x.sock"

        async def submit(self, task, **kw):
            return WinningPoStOutput(proofs=[b"x"])

    with pytest.raises(ProverError, match="answered a window_post task with a winning_post"):
        trio.run(Forwarder("window_post", Remote()).submit, make_task(1))


def test_serve_connect_without_a_supervisor_exits_2_before_the_ready_line(sock_path):
    result = dext_run("serve", "winning_post", "--connect", str(sock_path), input=b"")
    assert result.returncode == 2
    assert result.stdout == b""
    err = result.stderr.decode()
    assert f"no supervisor at {sock_path}: the socket does not exist" in err, err
    assert "start `damocles-ext run` first" in err and "Traceback" not in err, err


async def test_serve_connect_to_a_run_without_children_of_the_stage_exits_2(tmp_path, sock_path):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    async with trio.open_nursery() as nursery, running(nursery, cfg, sock_path) as (run, log):
        with trio.fail_after(30):
            result = await dext_run_async("serve", "winning_post", "--connect", str(sock_path))
            assert result.returncode == 2
            assert result.stdout == b""
            err = result.stderr.decode()
            assert f"the supervisor at {sock_path} has no [[WinPost]] child" in err, err
            assert "Traceback" not in err, err
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()


async def test_serve_connect_survives_a_restart_of_the_supervisor(tmp_path, sock_path):
    slow = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=30))
    (tmp_path / "fast").mkdir()
    fast = write_config(tmp_path / "fast", plugin_block("WdPost", "echo"))
    argv = _connect_argv("window_post", sock_path, "--log-level", "debug")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            async with running(nursery, slow, sock_path) as (run, _log):
                m = await ManagerLike.start(nursery, argv, "window_post", stderr=subprocess.PIPE)
                lost = await m.send(make_task(1))
                await wait_status(sock_path, lambda d: d.children[0].in_flight == 1, "running")
                run.kill()  # gone without a word: no answer, the connection just ends
                await run.wait()
                r = await m.wait(lost)
            assert r.output is None
            assert f"the supervisor at {sock_path} went away before it answered" in r.err_msg
            # Nobody listens now: a request tries to connect, and says why it could not.
            r = await m.request(make_task(2))
            assert r.output is None and f"no supervisor at {sock_path}" in r.err_msg, r
            async with running(nursery, fast, sock_path) as (run, log):
                r = await m.request(make_task(3))
                assert r == jsonl.JsonResponse(3, echo_output(make_task(3)), None)
                await m.wait_log("connected to the supervisor at")
                await m.close_stdin()
                assert await m.process.wait() == 0, "\n".join(m.log)
                run.send_signal(signal.SIGTERM)
                assert await run.wait() == 0, log.text()
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])


async def test_serve_connect_sigterm_answers_and_cancels_what_is_in_flight(tmp_path, sock_path):
    cfg = write_config(
        tmp_path, plugin_block("WdPost", "sleep", seconds=30, progress_interval=0.05)
    )
    argv = _connect_argv("window_post", sock_path, "--shutdown-grace", "0")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            async with running(nursery, cfg, sock_path) as (run, log):
                m = await ManagerLike.start(nursery, argv, "window_post", stderr=subprocess.PIPE)
                request_id = await m.send(make_task(1))
                await wait_status(sock_path, lambda d: d.children[0].in_flight == 1, "running")
                m.process.send_signal(signal.SIGTERM)
                r = await m.wait(request_id)
                assert r.output is None and "shutdown grace" in r.err_msg, r
                assert await m.process.wait() == 0, "\n".join(m.log)
                # The supervisor was told: its child is free again, long before the 30 s.
                await wait_status(sock_path, lambda d: d.children[0].in_flight == 0, "cancelled")
                run.send_signal(signal.SIGTERM)
                assert await run.wait() == 0, log.text()
    assert m.duplicates == [] and m.unknown == []


async def test_serve_connect_answers_a_request_read_after_its_first_signal(tmp_path, sock_path):
    # damocles-manager may write a request as the signal comes (or the line is in the pipe): it
    # is read and refused at once while the request in flight is waited for, as serve with
    # children of its own does, not left unanswered.
    cfg = write_config(
        tmp_path, plugin_block("WdPost", "sleep", seconds=30, progress_interval=0.05)
    )
    argv = _connect_argv("window_post", sock_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            async with running(nursery, cfg, sock_path) as (run, log):
                m = await ManagerLike.start(nursery, argv, "window_post", stderr=subprocess.PIPE)
                first = await m.send(make_task(1))
                await wait_status(sock_path, lambda d: d.children[0].in_flight == 1, "running")
                m.process.send_signal(signal.SIGTERM)
                await m.wait_log("SIGTERM: shutting down gracefully")
                second = await m.send(make_task(2))
                with trio.fail_after(10):
                    r = await m.wait(second)
                assert r.output is None, r
                assert r.err_msg.startswith(
                    "request 2 (window_post): damocles-ext serve is shutting down (signal): the"
                    f" request was not sent to the supervisor at {sock_path}; send it again"
                ), r
                assert first not in m.responses  # still waited for, within the grace
                m.process.send_signal(signal.SIGTERM)  # a second one: stop at once
                r = await m.wait(first)
                assert r.output is None and "stopped at once" in r.err_msg, r
                assert await m.process.wait() == 0, "\n".join(m.log)
                run.send_signal(signal.SIGTERM)
                assert await run.wait() == 0, log.text()
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--connect", "-c", "x.cfg"], "argument -c/--config: not allowed with argument --connect"),
        (["--conf-dir", "d", "--connect"], "not allowed with argument --conf-dir"),
        ([], "one of the arguments -c/--config --conf-dir --connect --jobs is required"),
        (["--connect", "--restart-delay", "2"], "--restart-delay does not apply to serve"),
        (["--connect", "--dump-dir", "d"], "give --dump-dir to that `run` instead"),
        (["--connect="], "argument --connect: empty socket path"),
    ],
)
def test_serve_connect_usage_errors_exit_2(extra, message):
    result = dext_run("serve", "window_post", *extra, input=b"")
    assert result.returncode == 2
    assert result.stdout == b""
    assert message in result.stderr.decode() and b"Traceback" not in result.stderr


def test_serve_connect_before_the_stage_says_to_put_it_after():
    result = dext_run("serve", "--connect", "winning_post", input=b"")
    assert result.returncode == 2 and result.stdout == b""
    assert (
        b"'winning_post' is a stage, not a socket path: put --connect after the stage"
        b" (serve winning_post --connect [SOCKET])"
    ) in result.stderr


# -- hostile lines and damocles' id rules, through a real serve (direct and --connect) ----------

#: A JSON value 1,500 arrays deep: 3 KB that msgspec cannot follow within Python's recursion limit.
BOMB = b"[" * 1500 + b"]" * 1500


@asynccontextmanager
async def serving(nursery, mode: str, cfg: Path, sock_path: Path):
    """A real `serve window_post` driven like damocles-manager: with its own children (direct),
    or forwarding to a real `run` (connect)."""
    if mode == "direct":
        yield await ManagerLike.start(
            nursery,
            [*DEXT, "serve", "window_post", "-c", str(cfg)],
            "window_post",
            stderr=subprocess.PIPE,
        )
        return
    async with running(nursery, cfg, sock_path) as (run, log):
        yield await ManagerLike.start(
            nursery, _connect_argv("window_post", sock_path), "window_post", stderr=subprocess.PIPE
        )
        run.send_signal(signal.SIGTERM)
        assert await run.wait() == 0, log.text()


def raw_request(id: int | str, task, *, junk: bytes | None = None) -> bytes:
    """A request line as damocles writes it (id first), with an extra member `junk` if given."""
    extra = b"" if junk is None else b',"junk":' + junk
    return b'{"id":' + str(id).encode() + extra + b',"task":' + jsonl.task_to_json(task) + b"}\n"


@pytest.mark.parametrize("mode", ["direct", "connect"])
async def test_serve_survives_a_deeply_nested_request_line_and_keeps_answering(
    tmp_path, sock_path, mode
):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            async with serving(nursery, mode, cfg, sock_path) as m:
                # Its id can be read (the first member): answered with what was wrong.
                await m.send_raw(raw_request(1, make_task(1), junk=BOMB), request_id=1)
                # Its id cannot (it comes after the bomb): logged, skipped.
                await m.send_raw(b'{"task":' + BOMB + b',"id":2}\n')
                await m.send_raw(b'{"id":3,"task":{"miner_id":' + BOMB + b"}}\n", request_id=3)
                r = await m.wait(1)
                assert r.output is None and r.err_msg.startswith("request 1"), r
                assert "nested too deeply" in r.err_msg
                assert "nested too deeply" in (await m.wait(3)).err_msg
                await m.wait_log("unreadable request line, cannot answer it")
                await m.send_raw(raw_request(4, make_task(4)), request_id=4)
                r = await m.wait(4)
                assert r.err_msg is None and r.output == echo_output(make_task(4)), r
                await m.close_stdin()
                assert await m.process.wait() == 0, "\n".join(m.log)
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])
    assert "Traceback" not in "\n".join(m.log)


@pytest.mark.parametrize("mode", ["direct", "connect"])
async def test_serve_follows_damocles_id_rules(tmp_path, sock_path, mode):
    # sleep fails every second request of its child: the first here is 41, the second 44.
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=0, fail="every:2"))
    huge = raw_request(43, make_task(43), junk=b'"' + b"x" * (100 * 2**20) + b'"')
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            async with serving(nursery, mode, cfg, sock_path) as m:
                # 41 and its duplicate in one write, so serve reads both before 41 can be
                # answered: the duplicate is logged, and the answer is the first one's.
                await m.send_raw(
                    raw_request(41, make_task(41)) + raw_request(41, make_task(42)), request_id=41
                )
                # damocles-manager cannot read an id beyond 64 bits: unreadable, not answered.
                await m.send_raw(raw_request(2**64, make_task(5)))
                await m.send_raw(huge, request_id=43)
                await m.send_raw(raw_request(44, make_task(44)), request_id=44)
                r = await m.wait(41)
                assert r == jsonl.JsonResponse(41, echo_output(make_task(41)), None)
                line = await m.wait_log("request 41 is already in flight")
                assert "not answered" in line
                r = await m.wait(43)
                assert r.output is None, r
                assert r.err_msg.startswith("request 43 (window_post): bad request: the request")
                assert f"line is {len(huge)} bytes, over the" in r.err_msg
                # The error names the request by its wire id, and the stage once.
                r = await m.wait(44)
                assert r.output is None and r.err_msg.startswith("request 44 failed on "), r
                assert r.err_msg.count("window_post") == 1, r.err_msg
                assert "sleep prover failing as configured" in r.err_msg
                await m.wait_log("does not fit in 64 bits")
                await m.close_stdin()
                assert await m.process.wait() == 0, "\n".join(m.log)
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])
    assert "Traceback" not in "\n".join(m.log)


async def test_a_second_signal_stops_serve_at_once_while_its_start_after_the_ready_line_hangs(
    tmp_path, monkeypatch
):
    # The first signal after the ready line is held until trio watches the signals; an
    # observer plugin whose import never returns (a network mount) kept serve from that, and
    # a second signal, which stops serve at once later on, was held too: nothing but SIGKILL
    # stopped it.
    gate = Gate(tmp_path / "gate")
    source = f"import os\nos.read(os.open({str(gate.path)!r}, os.O_RDWR), 1)\n"
    root = make_plugin_dist(
        tmp_path / "plugins", dist="stuck", module="stuck_import", source=source
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    cfg = write_config(tmp_path, '[[WdPost]]\nBin = "/bin/cat"\n')
    # Started with the stop signals at their default: a shell's background job (as a test run
    # may be) has SIGINT ignored, and serve keeps an ignored signal ignored.
    reset = (
        "import os, signal, sys\n"
        "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_DFL)\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    argv = [sys.executable, "-c", reset, *DEXT, "serve", "window_post", "-c", str(cfg)]
    process = None
    try:
        async with trio.open_nursery() as nursery:
            m = await ManagerLike.start(nursery, argv, "window_post", stderr=subprocess.DEVNULL)
            process = m.process
            # Two kinds: a second SIGTERM sent before the first is taken merges with it.
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGINT)
            with trio.fail_after(20):
                assert await process.wait() in (-signal.SIGTERM, -signal.SIGINT, 130)
            nursery.cancel_scope.cancel()
    finally:
        gate.close()
        if process is not None and process.returncode is None:
            process.kill()


async def test_a_signal_right_after_the_ready_line_still_answers_the_request_sent_before_it(
    tmp_path,
):
    # serve says ready before it imports trio and the supervisor (damocles-manager gives it 5 s),
    # and the manager writes its requests at once. A SIGTERM in the ~0.2 s before trio watched
    # the signals killed serve outright: the request was never answered, and its caller in the
    # manager waited for it until it gave up.
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    argv = [*DEXT, "serve", "window_post", "-c", str(cfg)]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            m = await ManagerLike.start(nursery, argv, "window_post", stderr=subprocess.PIPE)
            rid = await m.send(make_task(1))
            m.process.send_signal(signal.SIGTERM)
            assert await m.process.wait() == 0, "\n".join(m.log)
            await m.eof.wait()
            await m.wait_log("SIGTERM: shutting down gracefully")
    response = m.responses[rid]
    assert (response.output == echo_output(make_task(1))) != (response.err_msg is not None)
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])
