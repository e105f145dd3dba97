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
import uuid
from pathlib import Path

import psutil
import pytest
import trio
from helpers_frontend import DEXT, ManagerLike, make_task, start_run, write_config
from supervisor_helpers import alive, jsonl_child, our_descendants, spec, wait_until, window_task

from damocles_ext.api import open_supervisor
from damocles_ext.supervisor import Supervisor
from damocles_ext.supervisor.restart import BackoffPolicy

FAST = BackoffPolicy(base=0.05, cap=0.2)


def child_stats(sup, name: str):
    return next(c for c in sup.statistics().children if c.name == name)


@pytest.fixture(autouse=True)
def no_leftover_processes():
    yield
    assert our_descendants() == []


# -- errors at spawn ---------------------------------------------------------------------------


async def test_a_nul_in_an_env_value_is_a_failed_start_and_the_pool_keeps_serving():
    bad = spec(jsonl_child(), index=0, envs={"BAD": "a\x00b"}, auto_restart=False)
    good = spec(jsonl_child(), index=1)
    async with open_supervisor([bad, good]) as sup:
        await wait_until(lambda: child_stats(sup, "window_post#0").state == "stopped", 10)
        last_exit = child_stats(sup, "window_post#0").last_exit
        assert "failed to start" in last_exit and "null byte" in last_exit
        assert "Envs" in last_exit
        out = await sup.submit(window_task(miner=5))
        assert out.faults[0] == 5


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
        assert out.faults[0] == 9
        sup.request_shutdown()


# -- crashes of productive children --------------------------------------------------------------


async def test_children_sigkilled_every_0_3s_while_working_answer_1000_requests_promptly(caplog):
    """The OOM killer or a GPU fault now and then: a child that answered requests restarts after
    the base delay every time, so the queue does not pile up behind growing backoffs."""
    caplog.set_level(logging.WARNING, "damocles_ext.supervisor")
    # Answers carry the child's pid (faults[1]), so the killer knows which runs have answered.
    child = jsonl_child("time.sleep(0.005)\nanswer(req)")
    specs = [spec(child, index=i, concurrent=4, max_attempts=20) for i in range(4)]
    base = BackoffPolicy().base
    productive: set[int] = set()
    kills: list[int] = []
    latencies: list[float] = []

    async def one(miner: int) -> None:
        start = trio.current_time()
        out = await sup.submit(window_task(miner=miner))
        latencies.append(trio.current_time() - start)
        assert out.faults[0] == miner
        productive.add(out.faults[1])

    async def killer() -> None:
        while True:
            await trio.sleep(0.3)  # the load's rhythm, not a synchronisation
            busy = [
                c.pid
                for c in sup.statistics().children
                if c.state == "busy" and c.pid in productive
            ]
            if busy:
                os.kill(busy[len(kills) % len(busy)], signal.SIGKILL)
                kills.append(busy[len(kills) % len(busy)])

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
    assert len(delays) >= len(kills)
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
    out = {"proofs": [], "faults": []}
    sys.stdout.write(json.dumps({"id": req["id"], "err_msg": None, "output": out}) + "\n")
    sys.stdout.flush()
"""


def _daemon_config(tmp_path: Path, marker: str, children: int = 2) -> tuple[Path, Path]:
    script = tmp_path / "daemonizing_child.py"
    script.write_text(DAEMONIZING_CHILD)
    pids = tmp_path / "pids.jsonl"
    block = (
        "[[WdPost]]\n"
        f"Bin = {json.dumps(sys.executable)}\n"
        f"Args = {json.dumps([str(script)])}\n"
        f"Envs = {{ MARKER = {json.dumps(marker)}, PIDS = {json.dumps(str(pids))} }}\n"
    )
    return write_config(tmp_path, block * children), pids


def _family(pids_file: Path) -> list[list[int]]:
    text = pids_file.read_text() if pids_file.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in (
                proc.info["cmdline"] or []
            ):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _kill_marked(marker: str) -> None:
    for proc in _marked(marker):
        try:
            proc.kill()
        except psutil.Error:
            pass


async def _sigkill_and_check_nothing_is_left(
    process: trio.Process, pids: Path, marker: str
) -> None:
    await wait_until(lambda: len(_family(pids)) == 2, 20, "both children and their daemons")
    family = _family(pids)
    for child, daemon in family:
        # The daemon really left: another session, and not below the child any more.
        assert os.getsid(daemon) not in (child, os.getsid(child))
        assert os.getpgid(daemon) != child
    assert len(_marked(marker)) == 2
    process.kill()
    await process.wait()
    everyone = [pid for pair in family for pid in pair]
    await wait_until(lambda: not any(alive(pid) for pid in everyone), 20, "the tree to die")
    assert _marked(marker) == []


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
        _kill_marked(marker)


async def test_sigkill_of_run_leaves_no_daemonized_grandchild(tmp_path):
    marker = f"dext-daemon-{uuid.uuid4().hex[:8]}"
    cfg, pids = _daemon_config(tmp_path, marker)
    try:
        async with trio.open_nursery() as nursery:
            process, _log = await start_run(nursery, cfg, tmp_path / "sock" / "control.sock")
            await _sigkill_and_check_nothing_is_left(process, pids, marker)
            nursery.cancel_scope.cancel()
    finally:
        _kill_marked(marker)


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
        assert _marked(marker) == []
    finally:
        _kill_marked(marker)
