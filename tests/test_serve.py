"""`damocles-ext serve`: damocles' JSON lines on stdin/stdout.

The first part drives the JSON-lines server in-process over memory streams with a submit function
the test controls (framing, exactly-once answers, bad lines, end of input). The second part runs
the real command with real children, driven like damocles-manager drives a processor.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import psutil
import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers_frontend import DEXT, ManagerLike, dext_run, make_task, plugin_block, write_config

from damocles_ext.errors import ProverError
from damocles_ext.protocol import jsonl
from damocles_ext.supervisor.serve import JsonLineServer

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
    assert got[7] == jsonl.JsonResponse(7, None, "prover failed: miner 13")
    assert got[8].output is None
    assert got[8].err_msg == "internal error in damocles-ext: KeyError: 'a bug'"


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


async def test_duplicate_id_in_flight_is_rejected_and_the_first_still_answered(harness):
    await harness.read_lines(1)
    await harness.to_server.send_all(jsonl.encode_request(4, make_task(40)))
    await harness.gate(40)[1].wait()
    await harness.to_server.send_all(jsonl.encode_request(4, make_task(41)))
    (dup,) = await harness.read_lines(1)
    assert b"already in flight" in dup
    harness.gate(40)[0].set()
    (line,) = await harness.read_lines(1)
    assert line == jsonl.encode_response(4, output=echo_output(make_task(40)))


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


# -- the real command, real children -------------------------------------------------------------


@pytest.fixture
def stderr_file(tmp_path: Path):
    with open(tmp_path / "serve.stderr", "w+b") as f:
        yield f


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
            for task, request_id in zip(tasks, ids):
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


async def test_serve_runs_a_split_window_post_like_a_whole_one(tmp_path, stderr_file):
    # damocles-manager sees the same JSON lines; the vanilla and SNARK steps run on their own
    # children (damocles #981).
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
        f.write(f"{g1.pid} {g2.pid}")
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
                [*DEXT, "serve", "window_post", "-c", str(cfg), "--restart-delay", "0.05"],
                "window_post",
                stderr=stderr_file,
            )
            serve = psutil.Process(m.process.pid)
            with trio.fail_after(30):
                while not marker.exists():
                    await trio.sleep(0.02)
                left = [int(pid) for pid in marker.read_text().split()]
                left.append(int(helper.read_text()))
                # The dead child's grandchildren came to serve (a child subreaper), were killed,
                # and reaped: no zombie left either. Without that they would live on (120 s).
                while any(psutil.pid_exists(pid) for pid in left[:2]):
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


# Run in a process of its own: becoming a child subreaper is a property of the whole process.
_ZOMBIE_SCRIPT = r"""
import os, subprocess, sys
from damocles_ext.supervisor.process import OrphanAdopter

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
        capture_output=True, text=True, timeout=60, check=False,
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


async def test_serve_stops_at_once_when_the_manager_is_gone(tmp_path):
    # A SIGKILLed damocles-manager closes both of our pipes: no answer can reach anyone, so the
    # 30 s proof in flight is not waited for.
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=30))
    argv = [*DEXT, "serve", "window_post", "-c", str(cfg), "--log-level", "debug"]
    async with trio.open_nursery() as nursery:
        m = await ManagerLike.start(nursery, argv, "window_post", stderr=subprocess.PIPE)
        with trio.fail_after(20):
            await m.wait_log("ready: stage window_post")
            await m.send(make_task(1))
            # Logged right before submit(), which dispatches to the free child before it blocks.
            await m.wait_log("request 1: submitted")
            family = psutil.Process(m.process.pid).children(recursive=True)
            assert family
            await m.vanish()
            assert await m.process.wait() == 0, "\n".join(m.log)
            await m.wait_log("the reader is gone")
            await m.wait_log("did not finish on window_post#0")
            nursery.cancel_scope.cancel()
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_serve_config_error_exits_2_with_the_message_and_no_ready_line(tmp_path):
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\nConcurent = 2\n')
    result = dext_run("serve", "window_post", "-c", str(cfg), input=b"")
    assert result.returncode == 2
    assert result.stdout == b""
    assert b"Concurent" in result.stderr and b"Traceback" not in result.stderr


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
