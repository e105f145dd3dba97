"""`serve window_post` with 2 children, 200 concurrent requests, and one
child SIGKILLed every 0.5 s: every request is answered (output or err_msg), exactly once, within a
bounded time."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
import trio
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import DEXT, ManagerLike, make_task, plugin_block, write_config

REQUESTS = 200
KILL_EVERY = 0.5  # seconds: the test's workload, not a synchronisation
OVERALL_LIMIT = 28.0


def _live_children(pid: int) -> list[psutil.Process]:
    out = []
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
async def test_every_request_is_answered_once_while_children_are_sigkilled(
    tmp_path: Path, stderr_file
):
    cfg = write_config(
        tmp_path,
        plugin_block("WdPost", "sleep", concurrent=4, seconds=0.1, progress_interval=0.05) * 2,
    )
    tasks = {}
    kills: list[int] = []
    async with trio.open_nursery() as nursery:
        # Restart waits of 0.1 s doubling to 1 s instead of 1 s doubling to 60 s: a kill every
        # 0.5 s doubles a child's wait at each kill, so with the defaults the children would
        # spend most of the run in backoff (bounded, but by minutes, not this test's budget).
        argv = [
            *DEXT,
            "serve",
            "window_post",
            "-c",
            str(cfg),
            "--restart-delay",
            "0.1",
            "--restart-max-delay",
            "1",
        ]
        m = await ManagerLike.start(nursery, argv, "window_post", stderr=stderr_file)
        all_answered = trio.Event()

        async def killer() -> None:
            while not all_answered.is_set():
                await trio.sleep(KILL_EVERY)
                live = _live_children(m.process.pid)
                if not live:
                    continue  # both are restarting
                # The oldest is the likeliest to be busy: a crash in the middle of requests.
                victim = min(live, key=lambda p: p.create_time())
                try:
                    victim.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    continue
                kills.append(victim.pid)

        with trio.fail_after(OVERALL_LIMIT):
            for i in range(REQUESTS):
                task = make_task(10_000 + i)
                tasks[await m.send(task)] = task
            nursery.start_soon(killer)
            for request_id in tasks:
                await m.wait(request_id)
            all_answered.set()
            family = psutil.Process(m.process.pid).children(recursive=True)
            await m.close_stdin()
            returncode = await m.process.wait()
            await m.eof.wait()
    stderr_file.seek(0)
    log = stderr_file.read().decode(errors="replace")

    assert returncode == 0, log[-3000:]
    assert sorted(m.responses) == sorted(tasks) == list(range(1, REQUESTS + 1))
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])
    ok = [i for i, r in m.responses.items() if r.err_msg is None]
    # Errors are allowed: a request lost with its child twice (MaxAttempts = 2) fails, and a
    # child killed before it is ready five times in a row is FATAL, after which its requests
    # fail at once. What must hold is that each gets exactly one answer, and the right one.
    for request_id, response in m.responses.items():
        if response.err_msg is None:
            assert response.output == echo_output(tasks[request_id])
        else:
            assert response.output is None and response.err_msg.strip()
    assert len(kills) >= 2, "the killer never got to kill: the test did not test anything"
    # Nothing of serve's is left behind: no child, no grandchild.
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(f"{len(kills)} kills, {len(ok)} outputs, {REQUESTS - len(ok)} errors")
