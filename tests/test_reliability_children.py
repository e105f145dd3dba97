"""Misbehaving children (issue 7): each test spawns a real child that breaks a rule on purpose
and checks that the supervisor survives it, says what happened, and keeps serving.

Children are small Python programs (`python -u -c`) built with supervisor_helpers, or the
built-in child runtime. Waits are on events or bounded polling of process state, never sleeps.
"""

from __future__ import annotations

import logging
import os
import time

import psutil
import pytest
import trio
from supervisor_helpers import (
    alive,
    builtin_child,
    dext_child,
    jsonl_child,
    our_descendants,
    python_child,
    spec,
    wait_until,
    window_task,
)

from damocles_ext.errors import ProverError
from damocles_ext.supervisor import Supervisor
from damocles_ext.supervisor.restart import BackoffPolicy

FAST = BackoffPolicy(base=0.02, cap=0.08)


def child_stats(sup: Supervisor, name: str = "window_post#0"):
    return next(c for c in sup.statistics().children if c.name == name)


@pytest.fixture(autouse=True)
def no_leftover_processes():
    yield
    assert our_descendants() == []


# -- a child that cannot start says why ---------------------------------------------------------


async def test_a_prover_that_cannot_load_fails_the_start_with_the_childs_own_reason():
    child = spec(builtin_child("window_post", "nope"))
    sup = Supervisor([child], backoff=BackoffPolicy(base=0.01, cap=0.02, max_failed_starts=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(ProverError) as info:
            await sup.wait_ready()
        sup.request_shutdown()
    # The child exits 2 after writing the reason on stderr; the supervisor quotes it.
    assert "unknown prover 'nope'" in str(info.value)
    stats = child_stats(sup)
    assert stats.state == "fatal"
    assert "exit code 2" in stats.last_exit and "unknown prover 'nope'" in stats.last_exit


async def test_a_child_exiting_with_an_error_after_ready_has_its_last_stderr_line_quoted():
    # Exit 3 with a message on the first request; the request is lost (MaxAttempts = 1).
    crash = python_child(
        """
        import sys
        sys.stdout.write("window_post processor ready\\n")
        sys.stdin.readline()
        sys.stderr.write("fatal: the GPU fell off the bus\\n")
        sys.exit(3)
        """
    )
    sup = Supervisor([spec(crash, max_attempts=1)], backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        with pytest.raises(ProverError) as info:
            await sup.submit(window_task())
        sup.request_shutdown()
    assert "exit code 3" in str(info.value)
    assert "the GPU fell off the bus" in str(info.value)


# -- a child that exits right after its ready message, forever ---------------------------------


async def test_a_child_exiting_right_after_ready_backs_off_to_the_cap_then_is_fatal_cheaply(
    caplog,
):
    caplog.set_level(logging.INFO, "damocles_ext.supervisor")
    quitter = python_child(
        """
        import sys
        sys.stdout.write("window_post processor ready\\n")
        sys.exit(0)
        """
    )
    policy = BackoffPolicy(base=0.1, cap=0.4, jitter=0.0, max_failed_starts=6)
    sup = Supervisor([spec(quitter)], backoff=policy)
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    wall_before = time.monotonic()
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await wait_until(lambda: child_stats(sup).state == "fatal", 20, "FATAL")
        wall = time.monotonic() - wall_before
        cpu = sum(me.cpu_times()[:2]) - cpu_before
        sup.request_shutdown()
    delays = [
        float(r.getMessage().rsplit(" ", 1)[1].rstrip("s"))
        for r in caplog.records
        if "restarting in" in r.getMessage()
    ]
    assert delays == [0.1, 0.2, 0.4, 0.4, 0.4]  # doubling to the cap, then FATAL at the 6th
    stats = child_stats(sup)
    assert stats.state == "fatal" and stats.restarts == 5
    assert "FATAL: exited 6 times in a row after its ready message without answering" in caplog.text
    # 1.5 s of backoff: the supervisor sleeps through it (no busy loop, no restart storm). The
    # CPU it does use is mostly the six fork+exec's and log lines.
    print(f"supervisor CPU {cpu:.3f} s over {wall:.2f} s wall")
    assert wall >= 1.5
    assert cpu < 0.25 * wall


def test_exits_after_serving_or_after_a_stable_run_never_add_up_to_fatal():
    from damocles_ext.supervisor.restart import GiveUp, RestartTracker

    tracker = RestartTracker(BackoffPolicy(max_failed_starts=3))
    for now in range(0, 100, 10):  # it answered requests each time: a crash, not a loop
        tracker.ready(float(now))
        assert not isinstance(tracker.exited(now + 1.0, "crash", served=True), GiveUp)
    for now in range(100, 200, 10):
        tracker.ready(float(now))  # 60 s ready without requests, then an exit: still fine
        assert not isinstance(tracker.exited(now + 60.0, "crash", served=False), GiveUp)
    tracker.ready(300.0)
    tracker.exited(301.0, "quit", served=False)
    tracker.ready(302.0)
    tracker.exited(303.0, "quit", served=False)
    tracker.ready(304.0)
    decision = tracker.exited(305.0, "quit", served=False)
    assert isinstance(decision, GiveUp) and decision.fatal
