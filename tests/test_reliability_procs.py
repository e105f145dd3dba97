"""Processes the supervisor must outlive, and outlast: spawn errors, crashes under load,
grandchildren that leave the tree, children that stall.

Children are real processes (`python -u -c ...` or the built-in child runtime); time enters
through events, bounded polling of process state, or a MockClock that the test moves.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import psutil
import pytest
import trio
import trio.testing
from helpers.frontend import DEXT, ManagerLike, make_task, script_block, start_run, write_config
from helpers.supervisor import (
    alive,
    builtin_child,
    child_stats,
    dext_child,
    jsonl_child,
    kill_marked,
    marked,
    python_child,
    spec,
    wait_until,
    wait_until_real,
    who,
    window_task,
    winning_task,
)

from damocles_ext import config
from damocles_ext.api import open_supervisor
from damocles_ext.errors import ProverError
from damocles_ext.supervisor import Supervisor
from damocles_ext.supervisor.restart import BackoffPolicy
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

FAST = BackoffPolicy(base=0.05, cap=0.2)


pytestmark = pytest.mark.usefixtures("no_leftover_processes")


# -- errors at spawn ---------------------------------------------------------------------------


async def test_a_nul_in_an_env_value_is_a_failed_start_and_the_pool_keeps_serving():
    bad = spec(jsonl_child(), index=0, envs={"BAD": "a\x00b"}, auto_restart=False)
    good = spec(jsonl_child(), index=1)
    async with open_supervisor([bad, good]) as sup:
        await wait_until(lambda: child_stats(sup, "window_post#0").state == "stopped", 10)
        last_exit = child_stats(sup, "window_post#0").last_exit
        assert "failed to start" in last_exit and "null byte" in last_exit
        out = await sup.submit(window_task(miner=5))
        assert who(out)[0] == 5


@pytest.fixture
def no_free_fds():
    """Use up every file descriptor this process may open, then hand back `release()`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A low limit keeps the number of fds to fill small.
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, open_now + 64), hard))
    hogs: list[int] = []

    def fill() -> None:
        while True:
            try:
                hogs.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def release() -> None:
        while hogs:
            os.close(hogs.pop())
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    try:
        yield fill, release
    finally:
        release()


async def test_no_free_fd_at_spawn_is_a_failed_start_with_its_reason_and_the_child_recovers(
    no_free_fds,
):
    fill, release = no_free_fds
    sup = Supervisor([spec(jsonl_child())], backoff=BackoffPolicy(base=0.2, cap=0.2))
    async with trio.open_nursery() as nursery:
        fill()
        try:
            await nursery.start(sup.run)
            # Launched means its first start was tried: with no fd left, it could not make pipes.
            last_exit = child_stats(sup, "window_post#0").last_exit
        finally:
            release()
        assert last_exit is not None and "cannot create its pipes" in last_exit
        assert "EMFILE" in last_exit
        out = await sup.submit(window_task(miner=9))
        assert who(out)[0] == 9
        sup.request_shutdown()


# -- crashes of productive children --------------------------------------------------------------


async def test_children_sigkilled_every_0_3s_while_working_answer_1000_requests_promptly(caplog):
    """The OOM killer or a GPU fault now and then: a child that answered requests restarts after
    the base delay every time, so the queue does not pile up behind growing backoffs."""
    caplog.set_level(logging.WARNING, "damocles_ext.supervisor")
    # Answers carry the child's pid (see who()), so the killer knows which runs have answered.
    child = jsonl_child("time.sleep(0.005)\nanswer(req)")
    specs = [spec(child, index=i, concurrent=4, max_attempts=20) for i in range(4)]
    base = BackoffPolicy().base
    productive: set[int] = set()
    kills: set[int] = set()
    latencies: list[float] = []

    async def one(miner: int) -> None:
        start = trio.current_time()
        out = await sup.submit(window_task(miner=miner))
        latencies.append(trio.current_time() - start)
        assert who(out)[0] == miner
        productive.add(who(out)[1])

    async def killer() -> None:
        while True:
            await trio.sleep(0.3)  # the load's rhythm, not a synchronisation
            busy = [
                c.pid
                for c in sup.statistics().children
                if c.state == "busy" and c.pid in productive and c.pid not in kills
            ]
            if busy:
                victim = busy[len(kills) % len(busy)]
                os.kill(victim, signal.SIGKILL)
                kills.add(victim)

    async with open_supervisor(specs) as sup:
        await sup.wait_ready("window_post", count=4)
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(killer)
                async with trio.open_nursery() as requests:
                    for miner in range(1, 1001):
                        requests.start_soon(one, miner)
                nursery.cancel_scope.cancel()
    assert len(latencies) == 1000
    assert kills, "no child was killed: the test proves nothing"
    # Generous for a loaded 2-core machine; with the backoff doubling, requests waited 45 s+.
    assert max(latencies) < 30, sorted(latencies)[-5:]
    delays = [
        float(m.group(1))
        for r in caplog.records
        if (m := re.search(r"restarting in ([0-9.]+)s", r.getMessage()))
    ]
    # Each kill is followed by a restart, except maybe the last (the supervisor stopped first).
    assert len(delays) >= len(kills) - 1
    assert max(delays) <= base, delays


async def test_serve_under_manager_load_with_working_children_sigkilled_every_0_3s(tmp_path):
    """The same through a real `serve`, driven as damocles-manager drives it: 1,000 JSON lines at
    once on its stdin, a working child SIGKILLed every 0.3 s; each line is answered once, with
    its output, in bounded time, and every restart comes after the base delay."""
    argv = jsonl_child("time.sleep(0.005)\nanswer(req)")
    block = (
        f"[[WdPost]]\nBin = {json.dumps(argv[0])}\nArgs = {json.dumps(argv[1:])}\n"
        "Concurrent = 4\nMaxAttempts = 20\n"
    )
    cfg = write_config(tmp_path, block * 4)
    base = BackoffPolicy().base
    kills: set[int] = set()
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        m = await ManagerLike.start(
            nursery, [*DEXT, "serve", "window_post", "-c", str(cfg)], "window_post",
            stderr=subprocess.PIPE,
        )  # fmt: skip
        serve = psutil.Process(m.process.pid)

        def productive() -> set[int]:
            # Answers carry their child's pid (see who()): those runs have answered something.
            return {who(r.output)[1] for r in list(m.responses.values()) if r.output}

        async def killer() -> None:
            while True:
                await trio.sleep(0.3)  # the load's rhythm, not a synchronisation
                working = productive() - kills
                alive_now = [c.pid for c in serve.children() if c.pid in working]
                if alive_now:
                    victim = alive_now[len(kills) % len(alive_now)]
                    os.kill(victim, signal.SIGKILL)
                    kills.add(victim)

        async def one(request_id: int, miner: int, sent: float) -> None:
            r = await m.wait(request_id)
            latencies.append(trio.current_time() - sent)
            assert r.err_msg is None, r.err_msg
            assert who(r.output)[0] == miner

        with trio.fail_after(120):
            nursery.start_soon(killer)
            async with trio.open_nursery() as waiters:
                sent = trio.current_time()
                for miner in range(1, 1001):
                    request_id = await m.send(make_task(miner=miner))
                    waiters.start_soon(one, request_id, miner, sent)
            await m.close_stdin()
            assert await m.process.wait() == 0
        nursery.cancel_scope.cancel()
    assert len(latencies) == 1000 and not m.duplicates and not m.unknown
    assert len(kills) >= 3, "too few kills: the test proves little"
    # Generous for a loaded 2-core machine; with the backoff doubling, requests waited 45 s+.
    assert max(latencies) < 60, sorted(latencies)[-5:]
    delays = [float(x) for line in m.log for x in re.findall(r"restarting in ([0-9.]+)s", line)]
    assert len(delays) >= len(kills) - 1
    assert max(delays) <= base, delays


# -- nothing of ours survives the supervisor ------------------------------------------------------

# A JSON-lines prover that daemonizes a helper the classic way (fork, setsid, fork, stdio to
# /dev/null), so the helper is in no process group or session of ours; it notes both pids.
DAEMONIZING_CHILD = r"""
import json, os, sys
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.write(w, str(os.getpid()).encode())
    os.close(w)
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)",
                              os.environ["MARKER"]])
os.close(w)
os.waitpid(pid, 0)
daemon = int(os.read(r, 64))
with open(os.environ["PIDS"], "a") as f:
    f.write(json.dumps([os.getpid(), daemon]) + "\n")
sys.stdout.write("window_post processor ready\n")
sys.stdout.flush()
for line in sys.stdin:
    req = json.loads(line)
    out = {"proofs": ["AA=="], "faults": []}  # one proof (a 0 byte)
    sys.stdout.write(json.dumps({"id": req["id"], "err_msg": None, "output": out}) + "\n")
    sys.stdout.flush()
"""


def _daemon_config(tmp_path: Path, marker: str, children: int = 2) -> tuple[Path, Path]:
    script = tmp_path / "daemonizing_child.py"
    script.write_text(DAEMONIZING_CHILD)
    pids = tmp_path / "pids.jsonl"
    block = script_block(script, {"MARKER": marker, "PIDS": str(pids)})
    return write_config(tmp_path, block * children), pids


def _family(pids_file: Path) -> list[list[int]]:
    text = pids_file.read_text() if pids_file.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


async def _sigkill_and_check_nothing_is_left(
    process: trio.Process, pids: Path, marker: str
) -> None:
    await wait_until(lambda: len(_family(pids)) == 2, 20, "both children and their daemons")
    family = _family(pids)
    for child, daemon in family:
        # The daemon really left: another session, and not below the child any more.
        assert os.getsid(daemon) not in (child, os.getsid(child))
        assert os.getpgid(daemon) != child
    assert len(marked(marker)) == 2
    process.kill()
    await process.wait()
    everyone = [pid for pair in family for pid in pair]
    await wait_until(lambda: not any(alive(pid) for pid in everyone), 20, "the tree to die")
    assert marked(marker) == []


async def test_sigkill_of_serve_leaves_no_daemonized_grandchild(tmp_path):
    marker = f"dext-daemon-{uuid.uuid4().hex[:8]}"
    cfg, pids = _daemon_config(tmp_path, marker)
    try:
        async with trio.open_nursery() as nursery:
            m = await ManagerLike.start(
                nursery,
                [*DEXT, "serve", "window_post", "-c", str(cfg)],
                "window_post",
                stderr=subprocess.DEVNULL,
            )
            response = await m.request(make_task(1))
            assert response.err_msg is None
            await _sigkill_and_check_nothing_is_left(m.process, pids, marker)
            nursery.cancel_scope.cancel()
    finally:
        kill_marked(marker)


async def test_sigkill_of_run_leaves_no_daemonized_grandchild(tmp_path):
    marker = f"dext-daemon-{uuid.uuid4().hex[:8]}"
    cfg, pids = _daemon_config(tmp_path, marker)
    try:
        async with trio.open_nursery() as nursery:
            process, _log = await start_run(nursery, cfg, tmp_path / "sock" / "control.sock")
            await _sigkill_and_check_nothing_is_left(process, pids, marker)
            nursery.cancel_scope.cancel()
    finally:
        kill_marked(marker)


async def test_a_supervisor_of_the_python_api_leaves_no_daemonized_grandchild(tmp_path):
    # No subreaper here (the host process is not ours to change): the guardian, at the
    # supervisor's end, finds the daemon by its mark.
    marker = f"dext-daemon-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "daemonizing_child.py"
    script.write_text(DAEMONIZING_CHILD)
    pids = tmp_path / "pids.jsonl"
    envs = {"MARKER": marker, "PIDS": str(pids)}
    try:
        async with open_supervisor([spec([sys.executable, str(script)], envs=envs)]) as sup:
            await sup.submit(window_task())
            await wait_until(lambda: len(_family(pids)) == 1, 20, "the daemon")
            [[_child, daemon]] = _family(pids)
            assert alive(daemon)
        await wait_until(lambda: not alive(daemon), 20, "the daemon to die")
        assert marked(marker) == []
    finally:
        kill_marked(marker)


# -- stuck children are noticed by default --------------------------------------------------------

EXAMPLE = Path(__file__).parent.parent / "ext-prover.cfg.example"
README = Path(__file__).parent.parent / "README.md"


def test_hung_child_timeouts_are_on_by_default_with_the_documented_values():
    assert config.DEFAULT_HEARTBEAT_TIMEOUT == 60.0
    assert config.DEFAULT_STDIN_TIMEOUT == 60.0
    cfg = config.parse_config('[[WdPost]]\nPlugin = "echo"\n', "t.cfg")
    assert config.effective_timeouts(cfg.children[0]) == (60.0, 60.0)
    off = config.parse_config(
        '[[WdPost]]\nPlugin = "echo"\nHeartbeatTimeoutSecs = 0\nStdinTimeoutSecs = 0\n', "t.cfg"
    )
    assert config.effective_timeouts(off.children[0]) == (0.0, 0.0)
    example = EXAMPLE.read_text()
    assert (
        "# HeartbeatTimeoutSecs (number 0 to 86400; default 60, 10 in [[WinPost]]; 0 turns it off)"
        in example
    )
    assert "# StdinTimeoutSecs (number 0 to 86400; default 60; 0 turns it off)" in example
    readme = README.read_text()
    assert "`HeartbeatTimeoutSecs` (default 60 s, 10 s for WinningPoSt" in readme
    assert "`StdinTimeoutSecs` (default 60)" in readme


def test_winning_post_children_default_to_a_heartbeat_timeout_that_fits_its_20s_budget():
    assert config.DEFAULT_WINNING_POST_HEARTBEAT_TIMEOUT == 10.0
    tables = ("WinPost", "WdPostVanilla", "WdPostSnark")
    text = "\n".join(f'[[{t}]]\nPlugin = "echo"' for t in tables)
    win, vanilla, snark = config.parse_config(text + "\n", "t.cfg").children
    assert config.effective_timeouts(win) == (10.0, 60.0)
    assert config.effective_timeouts(vanilla) == config.effective_timeouts(snark) == (60.0, 60.0)
    # A value the block gives is kept, for WinPost too (0: off).
    for given in (60, 0, 3.5):
        block = f'[[WinPost]]\nPlugin = "echo"\nHeartbeatTimeoutSecs = {given}\n'
        (child,) = config.parse_config(block, "t.cfg").children
        assert config.effective_timeouts(child) == (float(given), 60.0)


async def _killed_within_real_seconds(finished: trio.Event, pid: int, seconds: float) -> None:
    """Wait (in real time: the MockClock stands still) for `finished`; else kill `pid`, so that
    the supervisor can shut down, and fail."""
    done = threading.Event()

    async def watch() -> None:
        await finished.wait()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        ok = await trio.to_thread.run_sync(done.wait, seconds)
        nursery.cancel_scope.cancel()
    if not ok:
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the child was not killed as hung within {seconds}s after its timeout")


# Sends a Progress and, in the same write, half of its Response frame; then stalls for good.
STALL_MID_FRAME = """
import time
frame = dext.encode(dext.Response(msg.id, error="never finished"))
out.write(dext.encode(dext.Progress(msg.id, "prove", 0, 1)) + frame[: len(frame) // 2])
out.flush()
time.sleep(3600)
"""


async def test_a_dext_child_stalled_mid_frame_is_killed_as_hung_under_default_settings(
    mock_clock,
):
    # mock_clock moves only when told: a real child's start is not cut short by a jumped ready
    # timeout, and the default 60 s wait costs nothing.
    failures: list[str] = []
    progressed = trio.Event()
    finished = trio.Event()

    async def call() -> None:
        with pytest.raises(ProverError) as info:
            await sup.submit(window_task(), on_progress=lambda _p: progressed.set())
        failures.append(str(info.value))
        finished.set()

    async with open_supervisor([spec(dext_child(STALL_MID_FRAME), max_attempts=1)]) as sup:
        await sup.wait_ready()
        pid = child_stats(sup, "window_post#0").pid
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await progressed.wait()
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(config.DEFAULT_HEARTBEAT_TIMEOUT - 1)
            await trio.testing.wait_all_tasks_blocked()
            assert child_stats(sup, "window_post#0").state == "busy" and alive(pid)
            mock_clock.jump(2)
            await _killed_within_real_seconds(finished, pid, 30)
        assert not alive(pid)
    [failure] = failures
    assert "hung: no Progress or Response for 61.0s" in failure
    assert "HeartbeatTimeoutSecs = 60" in failure


async def test_a_winning_post_sent_to_a_hung_child_goes_to_its_sibling_after_10s_by_default(
    mock_clock,
):
    # Two WinningPoSt children, one hung (SIGSTOP, as a hung GPU driver leaves it): under the
    # defaults the request is taken back after 10 s and proved by the sibling, well within
    # WinningPoSt's ~20 s, not lost for the 60 s of the other stages.
    specs = [
        spec(builtin_child("winning_post", "echo"), stage="winning_post", index=i) for i in (0, 1)
    ]
    dispatched: list[str | None] = []
    results: list[object] = []

    async def call() -> None:
        results.append(await sup.submit(winning_task(), on_dispatch=dispatched.append))

    async with open_supervisor(specs) as sup:
        await sup.wait_ready("winning_post", count=2)
        hung = child_stats(sup, "winning_post#0").pid
        os.kill(hung, signal.SIGSTOP)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await wait_until_real(lambda: dispatched, what="the dispatch")
                # Both idle: the first registered takes it (smooth round robin's tie-break).
                assert dispatched == ["winning_post#0"]
                await trio.testing.wait_all_tasks_blocked()
                mock_clock.jump(config.DEFAULT_WINNING_POST_HEARTBEAT_TIMEOUT - 1)
                await trio.testing.wait_all_tasks_blocked()
                assert child_stats(sup, "winning_post#0").state == "busy" and alive(hung)
                mock_clock.jump(2)
                await wait_until_real(lambda: results, what="the answer from the sibling")
        finally:
            if alive(hung):
                os.kill(hung, signal.SIGCONT)
        assert dispatched == ["winning_post#0", None, "winning_post#1"]  # None: taken back
        assert not alive(hung)
        assert "hung: no Progress or Response for 11.0s" in (
            child_stats(sup, "winning_post#0").last_exit or ""
        )


# Says hello, then never reads its stdin again.
DEAF_DEXT_CHILD = """
import os, sys, time
from damocles_ext.protocol import dext
sys.stdout.buffer.write(dext.encode(dext.Hello("dext/1", "window_post", os.getpid(), "deaf", "1", 1)))
sys.stdout.buffer.flush()
time.sleep(3600)
"""


def _task_bigger_than_a_pipe() -> WindowPoSt:
    # About 3 MiB on the wire: more than the 1 MiB stdin pipe (or the 64 KiB one) holds.
    replicas = [
        PoStReplicaInfo(i, bytes(32), "/cache/" + "c" * 250, "/sealed/" + "s" * 250)
        for i in range(6000)
    ]
    return WindowPoSt(1000, "StackedDrgWindow2KiBV1_2", replicas, bytes(32))


async def test_a_dext_child_that_stops_reading_stdin_is_killed_as_hung_under_default_settings(
    mock_clock,
):
    failures: list[str] = []
    finished = trio.Event()

    async def call() -> None:
        with pytest.raises(ProverError) as info:
            await sup.submit(_task_bigger_than_a_pipe())
        failures.append(str(info.value))
        finished.set()

    async with open_supervisor([spec(python_child(DEAF_DEXT_CHILD), max_attempts=1)]) as sup:
        await sup.wait_ready()
        pid = child_stats(sup, "window_post#0").pid
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()  # the pipe is full, the writer waits
            mock_clock.jump(config.DEFAULT_STDIN_TIMEOUT - 1)
            await trio.testing.wait_all_tasks_blocked()
            assert child_stats(sup, "window_post#0").state == "busy" and alive(pid)
            mock_clock.jump(2)
            await _killed_within_real_seconds(finished, pid, 30)
        assert not alive(pid)
    [failure] = failures
    assert "hung: read nothing from its stdin for 61.0s" in failure
    assert "StdinTimeoutSecs = 60" in failure


# Reads its whole request (larger than its stdin pipe), reports a Progress, then answers once
# the test writes a byte to the FIFO $CTL.
READS_ALL_THEN_WAITS = """
import os, sys
from damocles_ext.protocol import dext
from damocles_ext.tasks import WindowPoStOutput
out = sys.stdout.buffer
out.write(dext.encode(dext.Hello("dext/1", "window_post", os.getpid(), "slow", "1", 1)))
out.flush()
ctl = os.open(os.environ["CTL"], os.O_RDWR)
dec, msgs = dext.FrameDecoder(), []
while not msgs:
    msgs = dec.receive_data(os.read(0, 65536))
out.write(dext.encode(dext.Progress(msgs[0].id, "read", 0, 1)))
out.flush()
os.read(ctl, 1)
out.write(dext.encode(dext.Response(msgs[0].id, output=WindowPoStOutput([b"read"], []))))
out.flush()
"""


async def test_a_child_that_read_its_full_stdin_pipe_is_not_killed_as_deaf_while_it_works(
    tmp_path, mock_clock
):
    # Its request filled the pipe; the child read it all, and works on it longer than
    # StdinTimeoutSecs: nothing waits for its stdin any more, so it is no hang.
    ctl, ack, envs = _told_fifos(tmp_path)
    outputs: list[object] = []
    read = trio.Event()

    async def call() -> None:
        task = _task_bigger_than_a_pipe()
        outputs.append(await sup.submit(task, on_progress=lambda p: read.set()))

    try:
        child = spec(python_child(READS_ALL_THEN_WAITS), envs=envs, heartbeat_timeout=0.0)
        async with open_supervisor([child]) as sup:
            await sup.wait_ready()
            pid = child_stats(sup).pid
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await read.wait()
                await trio.testing.wait_all_tasks_blocked()  # the writer is done
                mock_clock.jump(config.DEFAULT_STDIN_TIMEOUT + 1)
                await trio.testing.wait_all_tasks_blocked()
                assert child_stats(sup).state == "busy" and alive(pid)
                os.write(ctl, b"a")
            assert outputs[0].proofs == [b"read"]
            assert child_stats(sup).restarts == 0
    finally:
        os.close(ctl)
        os.close(ack)


async def test_a_child_that_stops_reading_stdin_once_is_killed_and_its_request_retried(tmp_path):
    # StdinTimeoutSecs from a config file, short for a real-time test; the child plays deaf
    # on its first run only, so the retry (on its next run) gets the answer.
    once = tmp_path / "deaf-once"
    code = (
        "import os, sys, time\n"
        f"if not os.path.exists({str(once)!r}):\n"
        f"    open({str(once)!r}, 'w').close()\n"
        "    sys.stdout.write('window_post processor ready\\n'); sys.stdout.flush()\n"
        "    time.sleep(3600)\n"
    )
    jsonl_code = jsonl_child()[-1]
    script = tmp_path / "child.py"
    script.write_text(code + jsonl_code)
    cfg = config.parse_config(
        "[[WdPost]]\n"
        f"Bin = {json.dumps(sys.executable)}\n"
        f"Args = {json.dumps(['-u', str(script)])}\n"
        "StdinTimeoutSecs = 0.5\n",
        "t.cfg",
    )
    async with open_supervisor(cfg, backoff=FAST) as sup:
        await sup.wait_ready()
        first = child_stats(sup, "window_post#0").pid
        with trio.fail_after(30):
            out = await sup.submit(_task_bigger_than_a_pipe())
        assert who(out)[0] == 1000 and who(out)[1] != first
        stats = child_stats(sup, "window_post#0")
        assert stats.restarts == 1 and "StdinTimeoutSecs = 0.5" in stats.last_exit


def _told_fifos(tmp_path) -> tuple[int, int, dict[str, str]]:
    """The FIFOs $CTL (the test tells the child) and $ACK (the child says it did): their
    descriptors, opened here, and the child's Envs naming them."""
    fifos = {name: tmp_path / name.lower() for name in ("CTL", "ACK")}
    for path in fifos.values():
        os.mkfifo(path)
    ctl, ack = (os.open(path, os.O_RDWR) for path in fifos.values())
    return ctl, ack, {name: str(path) for name, path in fifos.items()}


# Reports a Progress each time the test writes a byte to the FIFO $CTL (then a byte to $ACK, so
# the test knows the Progress is in the pipe); answers when the byte is "a".
SPEAKS_WHEN_TOLD = """
ctl, ack = os.open(os.environ["CTL"], os.O_RDWR), os.open(os.environ["ACK"], os.O_RDWR)
while os.read(ctl, 1) == b"p":
    send(dext.Progress(msg.id, "prove", 0, 1))
    os.write(ack, b"!")
answer(msg)
"""


async def test_a_supervisor_that_did_not_run_for_a_while_hears_its_child_before_judging_it(
    tmp_path, mock_clock
):
    # The supervisor stalls (SIGSTOP and SIGCONT, swapped out: here the test holds its loop)
    # while its busy child keeps reporting Progress; when it runs again, the heartbeat timeout
    # is past and the Progress waits unread in the pipe. The child spoke: it is not hung.
    ctl, ack, envs = _told_fifos(tmp_path)
    dispatched = trio.Event()
    outputs: list[object] = []

    async def call() -> None:
        outputs.append(await sup.submit(window_task(), on_dispatch=lambda _c: dispatched.set()))

    try:
        async with open_supervisor([spec(dext_child(SPEAKS_WHEN_TOLD), envs=envs)]) as sup:
            await sup.wait_ready()
            pid = child_stats(sup).pid
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await dispatched.wait()
                # The reader and the driver wake in one pass of trio's loop, in either order:
                # ten stalls leave no order untried.
                for _ in range(10):
                    await trio.testing.wait_all_tasks_blocked()
                    os.write(ctl, b"p")
                    assert os.read(ack, 1) == b"!"  # the loop stands still meanwhile
                    mock_clock.jump(config.DEFAULT_HEARTBEAT_TIMEOUT + 1)
                    await trio.testing.wait_all_tasks_blocked()
                    assert child_stats(sup).state == "busy", child_stats(sup).last_exit
                os.write(ctl, b"a")
        assert who(outputs[0]) == (1000, pid)
        assert child_stats(sup).restarts == 0
    finally:
        os.close(ctl)
        os.close(ack)


# Answers its request when the test writes a byte to the FIFO $CTL, then writes a byte to $ACK
# (the test then knows the answer is in the pipe).
ANSWERS_WHEN_TOLD = """
ctl, ack = os.open(os.environ["CTL"], os.O_RDWR), os.open(os.environ["ACK"], os.O_RDWR)
os.read(ctl, 1)
answer(msg)
os.write(ack, b"!")
os.close(ctl)
os.close(ack)
"""


async def test_a_supervisor_that_did_not_run_for_a_while_takes_an_answer_written_in_time(
    tmp_path, mock_clock
):
    # The child answers within its RequestTimeoutSecs while the supervisor does not run (here
    # the test holds its loop); when it runs again the timeout is past and the answer waits in
    # the pipe, or in its reader's hand: it is taken, not dropped as timed out.
    ctl, ack, envs = _told_fifos(tmp_path)
    child = spec(dext_child(ANSWERS_WHEN_TOLD), envs=envs, request_timeout=5.0, max_attempts=1)
    try:
        async with open_supervisor([child]) as sup:
            await sup.wait_ready()
            pid = child_stats(sup).pid
            # The reader and the driver wake in one pass of trio's loop, in either order: ten
            # stalls leave no order untried.
            for miner in range(1000, 1010):
                dispatched = trio.Event()
                async with trio.open_nursery() as nursery:
                    outputs: list[object] = []

                    async def call(
                        miner: int = miner, done: trio.Event = dispatched, out: list = outputs
                    ) -> None:
                        task = window_task(miner=miner)
                        out.append(await sup.submit(task, on_dispatch=lambda _c: done.set()))

                    nursery.start_soon(call)
                    await dispatched.wait()
                    await trio.testing.wait_all_tasks_blocked()
                    os.write(ctl, b"a")
                    assert os.read(ack, 1) == b"!"  # the loop stands still meanwhile
                    mock_clock.jump(6.0)
                assert who(outputs[0]) == (miner, pid)
            assert child_stats(sup).restarts == 0
    finally:
        os.close(ctl)
        os.close(ack)


# Takes one read from its stdin, and reports a Progress, each time the test writes "r" to the
# FIFO $CTL (then a byte to $ACK); on "a", reads the rest of its request and answers it.
READS_WHEN_TOLD = """
import os, sys
from damocles_ext.protocol import dext
from damocles_ext.tasks import WindowPoStOutput
out = sys.stdout.buffer
out.write(dext.encode(dext.Hello("dext/1", "window_post", os.getpid(), "drip", "1", 1)))
out.flush()
ctl, ack = os.open(os.environ["CTL"], os.O_RDWR), os.open(os.environ["ACK"], os.O_RDWR)
dec, msgs = dext.FrameDecoder(), []
while os.read(ctl, 1) == b"r":
    msgs += dec.receive_data(os.read(0, 65536))
    out.write(dext.encode(dext.Progress(1, "read", 0, 1)))
    out.flush()
    os.write(ack, b"!")
while not msgs:
    msgs = dec.receive_data(os.read(0, 65536))
out.write(dext.encode(dext.Response(msgs[0].id, output=WindowPoStOutput([b"read"], []))))
out.flush()
"""


async def test_a_supervisor_that_did_not_run_for_a_while_sees_its_child_read_its_stdin(
    tmp_path, mock_clock
):
    # As above, with a request larger than the child's stdin pipe: while the supervisor did not
    # run, the child took bytes from the pipe; it is not stuck on its input.
    ctl, ack, envs = _told_fifos(tmp_path)
    outputs: list[object] = []

    async def call() -> None:
        outputs.append(await sup.submit(_task_bigger_than_a_pipe()))

    try:
        child = spec(python_child(READS_WHEN_TOLD), envs=envs, max_attempts=1)
        async with open_supervisor([child]) as sup:
            await sup.wait_ready()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                for _ in range(10):
                    await trio.testing.wait_all_tasks_blocked()  # the pipe is full again
                    os.write(ctl, b"r")
                    assert os.read(ack, 1) == b"!"  # the loop stands still meanwhile
                    mock_clock.jump(config.DEFAULT_STDIN_TIMEOUT + 1)
                    await trio.testing.wait_all_tasks_blocked()
                    assert child_stats(sup).state == "busy", child_stats(sup).last_exit
                os.write(ctl, b"a")
        assert outputs[0].proofs == [b"read"]
        assert child_stats(sup).restarts == 0
    finally:
        os.close(ctl)
        os.close(ack)
