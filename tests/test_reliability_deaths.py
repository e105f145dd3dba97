"""Supervisor deaths: `serve` and `run` SIGKILLed, and SIGTERM under load.

damocles-manager stops its ext-prover with SIGKILL, so that is the common way for `serve` to end.
The children then die of PR_SET_PDEATHSIG; their own children (grandchildren, in the child's
process group) are killed by the supervisor's group guardian. The checks walk the whole tree with
psutil, grandchildren included, and look for stragglers anywhere by a marker in their command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest
import trio
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import (
    DEXT,
    ManagerLike,
    make_task,
    plugin_block,
    script_block,
    start_run,
    write_config,
)
from helpers.supervisor import alive, kill_marked, marked, wait_until

from damocles_ext.client import connect
from damocles_ext.errors import ProverError

# A JSON-lines child that starts a grandchild in its own process group (a prover's helper), notes
# the pids, and answers requests.
FAMILY_CHILD = r"""
import json, os, subprocess, sys
marker = os.environ["MARKER"]
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", marker])
with open(os.environ["PIDS"], "a") as f:
    f.write(json.dumps([os.getpid(), g.pid]) + "\n")
sys.stdout.write("window_post processor ready\n")
sys.stdout.flush()
for line in sys.stdin:
    req = json.loads(line)
    out = {"proofs": ["AA=="], "faults": []}  # one proof (a 0 byte)
    sys.stdout.write(json.dumps({"id": req["id"], "err_msg": None, "output": out}) + "\n")
    sys.stdout.flush()
"""


def _family_config(tmp_path: Path, marker: str, children: int = 2) -> tuple[Path, Path]:
    script = tmp_path / "family_child.py"
    script.write_text(FAMILY_CHILD)
    pids = tmp_path / "pids.jsonl"
    block = script_block(script, {"MARKER": marker, "PIDS": str(pids)})
    return write_config(tmp_path, block * children), pids


def _family(pids_file: Path, count: int) -> list[int]:
    lines = pids_file.read_text().splitlines() if pids_file.exists() else []
    if len(lines) < count:
        return []
    return [pid for line in lines for pid in json.loads(line)]


async def _sigkill_and_check_the_tree(process: trio.Process, family: list[int], marker: str):
    tree = psutil.Process(process.pid).children(recursive=True)
    assert {p.pid for p in tree} >= set(family)  # children and grandchildren, under us
    process.kill()
    await process.wait()
    # PDEATHSIG kills the children at once; the guardian kills their process groups.
    await wait_until(lambda: not any(alive(pid) for pid in family), 2.0, "the tree to die")
    assert [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert marked(marker) == []


async def test_sigkill_of_serve_leaves_no_child_or_grandchild(tmp_path):
    marker = f"dext-death-{uuid.uuid4().hex[:8]}"
    cfg, pids = _family_config(tmp_path, marker)
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
            await wait_until(lambda: len(_family(pids, 2)) == 4, 10, "both children up")
            await _sigkill_and_check_the_tree(m.process, _family(pids, 2), marker)
            nursery.cancel_scope.cancel()
    finally:
        kill_marked(marker)


async def test_sigkill_of_run_leaves_no_child_or_grandchild(tmp_path):
    marker = f"dext-death-{uuid.uuid4().hex[:8]}"
    cfg, pids = _family_config(tmp_path, marker)
    sock_dir = tmp_path / "sock"
    try:
        async with trio.open_nursery() as nursery:
            process, _log = await start_run(nursery, cfg, sock_dir / "control.sock")
            await wait_until(lambda: len(_family(pids, 2)) == 4, 10, "both children up")
            await _sigkill_and_check_the_tree(process, _family(pids, 2), marker)
            nursery.cancel_scope.cancel()
    finally:
        kill_marked(marker)


@pytest.mark.slow
async def test_sigterm_under_load_answers_every_request_within_the_grace_period(tmp_path):
    # 2 children x Concurrent 2 of 0.4 s requests; 40 requests sent at once, SIGTERM as soon as
    # the first answers arrive: those running finish (grace 3 s), the queued get a clear error.
    cfg = write_config(
        tmp_path,
        plugin_block("WdPost", "sleep", concurrent=2, seconds=0.4, progress_interval=0.1) * 2,
    )
    sock = tmp_path / "sock" / "control.sock"
    tasks = [make_task(100 + i) for i in range(40)]
    outcomes: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        process, log = await start_run(nursery, cfg, sock, "--shutdown-grace", "3")
        async with connect(sock) as client:
            first = trio.Event()

            async def one(i: int) -> None:
                try:
                    outcomes[i] = await client.submit(tasks[i])
                except ProverError as exc:
                    outcomes[i] = exc
                first.set()

            async with trio.open_nursery() as requests:
                for i in range(len(tasks)):
                    requests.start_soon(one, i)
                await first.wait()
                sent_term = time.monotonic()
                process.send_signal(signal.SIGTERM)
            answered_within = time.monotonic() - sent_term
        with trio.fail_after(10):
            returncode = await process.wait()
        stopped_within = time.monotonic() - sent_term
        nursery.cancel_scope.cancel()
    assert returncode == 0, log.text()[-2000:]
    assert sorted(outcomes) == list(range(len(tasks)))
    outputs = [i for i, o in outcomes.items() if not isinstance(o, Exception)]
    errors = {i: str(o) for i, o in outcomes.items() if isinstance(o, Exception)}
    assert all(outcomes[i] == echo_output(tasks[i]) for i in outputs)
    assert errors and outputs  # some were running, some still queued
    for text in errors.values():
        assert "still queued when the supervisor began to shut down" in text, text
    assert answered_within < 3.0 and stopped_within < 3.0 + 5.0


async def test_the_guardian_removes_the_tmp_root_of_a_supervisor_killed_not_of_one_alive(tmp_path):
    # A per-process TMPDIR root is removed at exit (atexit), which SIGKILL skips: the guardian
    # removes it when its stdin ends and its supervisor is gone, never while it still runs.
    from damocles_ext.supervisor.orphans import GroupGuardian

    kept, removed = tmp_path / "alive-root", tmp_path / "killed-root"
    for root in (kept, removed):
        (root / "window_post-gpu0").mkdir(parents=True)
    killed = await trio.lowlevel.open_process(["sleep", "600"])
    guardian = GroupGuardian()
    await guardian.started()
    guardian.remove_when_gone(str(kept))  # this process: alive at the end
    guardian.remove_when_gone(str(removed), pid=killed.pid)
    killed.kill()
    await killed.wait()  # reaped: no longer even a zombie
    guardian.close()  # the end of its stdin, as when its supervisor dies
    await wait_until(lambda: not removed.exists(), 10, "the killed one's root removed")
    assert kept.exists()  # decided before the other one, in order


async def test_a_guardian_whose_start_outlasts_its_bound_is_reaped_at_close(mock_clock):
    # Its intermediate process (a double fork: it exits at once) is waited for 5 s of trio's
    # clock; a test's MockClock that jumps, or a machine loaded enough, passed that bound while
    # it still started, and it stayed a zombie of the supervisor's process for good.
    from damocles_ext.supervisor.orphans import GroupGuardian

    guardian = GroupGuardian()
    intermediate = guardian._helper
    assert intermediate is not None
    os.kill(intermediate.pid, signal.SIGSTOP)  # it has not exited by the bound
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guardian.started)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(6)  # past the bound
    assert intermediate.returncode is None
    os.kill(intermediate.pid, signal.SIGCONT)
    pidfd = os.pidfd_open(intermediate.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)  # exited, not reaped yet
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)
    guardian.close()
    assert intermediate.returncode == 0
    assert not any(p.pid == intermediate.pid for p in psutil.Process().children())


def test_a_forked_copy_does_not_claim_its_parents_tmp_root(monkeypatch):
    # Its guardian would remove the parent's root, in use, when the copy is killed.
    from damocles_ext.config import machine

    monkeypatch.setattr(machine, "_per_run_tmp_root", "/tmp/damocles-ext-0-abc")
    monkeypatch.setattr(machine, "_per_run_owner", os.getpid())
    assert machine.per_run_tmp_root() == "/tmp/damocles-ext-0-abc"
    monkeypatch.setattr(machine, "_per_run_owner", os.getpid() + 1)  # as in a forked copy
    assert machine.per_run_tmp_root() is None
