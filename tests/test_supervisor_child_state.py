"""A child's states (supervisor/states.py): one enum, one table, one place that moves them."""

from __future__ import annotations

import logging
import random
import re
import tempfile

import pytest
import trio
from helpers.supervisor import dext_child, python_child, spec, window_task

from damocles_ext.errors import ProverError
from damocles_ext.supervisor import Supervisor
from damocles_ext.supervisor.child_loop import Child
from damocles_ext.supervisor.restart import BackoffPolicy, RestartTracker
from damocles_ext.supervisor.states import TRANSITIONS, ChildState, IllegalTransition
from damocles_ext.supervisor.stats import CHILD_STATES

S = ChildState


def _child_in(state: ChildState) -> Child:
    """A fresh child moved to `state` along allowed transitions."""
    child = Child(spec(["true"]), RestartTracker(BackoffPolicy(), rng=random.Random(0)))
    path = {
        S.STARTING: [],
        S.READY: [S.READY],
        S.STOPPING: [S.STOPPING],
        S.BACKOFF: [S.BACKOFF],
        S.FATAL: [S.FATAL],
        S.STOPPED: [S.STOPPED],
    }[state]
    for step in path:
        child.change_state(step)
    assert child.state is state
    return child


def test_every_state_has_a_row_and_every_reported_state_is_a_state_or_busy():
    assert set(TRANSITIONS) == set(ChildState)
    assert {s.value for s in ChildState} | {"busy"} == set(CHILD_STATES)


def test_stopped_is_final_and_fatal_leads_only_to_a_retried_start():
    assert TRANSITIONS[S.STOPPED] == frozenset()
    # Only when the restart rules retry FATAL children (BackoffPolicy.retry_fatal).
    assert TRANSITIONS[S.FATAL] == frozenset({S.STARTING})


@pytest.mark.parametrize("old", list(ChildState), ids=lambda s: s.value)
@pytest.mark.parametrize("new", list(ChildState), ids=lambda s: s.value)
def test_a_move_is_made_if_and_only_if_the_table_allows_it(old, new):
    child = _child_in(old)
    if new in TRANSITIONS[old]:
        child.change_state(new)
        assert child.state is new
    else:
        with pytest.raises(IllegalTransition, match=f"from {old.value} to {new.value}"):
            child.change_state(new)
        assert child.state is old  # a refused move changes nothing


def test_the_state_cannot_be_assigned_around_the_table():
    child = _child_in(S.STARTING)
    with pytest.raises(AttributeError):
        child.state = S.FATAL  # type: ignore[misc]


async def test_a_child_that_crashes_goes_through_stopping_and_backoff_and_starts_again(caplog):
    # The first process exits on its first request; the second serves. Every move is logged
    # by change_state, the one place that makes them.
    caplog.set_level(logging.DEBUG, "damocles_ext.supervisor")
    child = dext_child(
        "if not os.path.exists(MARK):\n    open(MARK, 'w').close()\n    os._exit(3)\nanswer(msg)",
        setup="MARK = os.path.join(os.environ['MARKDIR'], 'crashed')",
    )
    with trio.fail_after(30):
        with tempfile.TemporaryDirectory() as markdir:
            sup = Supervisor(
                [spec(child, envs={"MARKDIR": markdir})],
                backoff=BackoffPolicy(base=0.01, jitter=0.0),
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                await sup.wait_ready()
                await sup.submit(window_task())  # lost with the first process, retried
                sup.request_shutdown()
    moves = re.findall(r"window_post#0: (\w+) -> (\w+)", caplog.text)
    assert moves == [
        ("starting", "ready"),
        ("ready", "stopping"),
        ("stopping", "backoff"),
        ("backoff", "starting"),
        ("starting", "ready"),
        ("ready", "stopping"),
        ("stopping", "stopped"),
    ]
    assert sup.statistics().children[0].state == "stopped"


async def test_a_child_stopped_before_its_ready_message_is_not_called_a_failed_start(caplog):
    # A child that never says ready until it is stopped (serve < /dev/null stops at once).
    caplog.set_level(logging.INFO, "damocles_ext.supervisor")
    sup = Supervisor([spec(python_child("import time; time.sleep(60)"))])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            sup.request_shutdown()
    (child,) = sup.statistics().children
    assert child.last_exit.startswith("stopped before it was ready"), child.last_exit
    assert "failed start" not in caplog.text and "no ready message" not in caplog.text


# Its first process exits with CODE before its ready message; the next one serves.
_FAILS_ITS_FIRST_START = """
MARK = os.path.join(os.environ['MARKDIR'], 'started')
if not os.path.exists(MARK):
    open(MARK, 'w').close()
    sys.exit(int(os.environ['CODE']))
"""


@pytest.mark.parametrize("code", [1, 2, 3])
async def test_when_refusals_are_final_only_an_exit_2_before_ready_is_fatal_a_crash_restarts(
    code, tmp_path
):
    # prove -c's policy (give_up_when_refused): exit code 2 before the ready message is the
    # child runtime's "the prover cannot load with this config", FATAL at once and said as a
    # refusal (prove exits 2, "fix the config"); any other failed start is retried as `run`
    # retries it. Making every failed start FATAL under that policy failed no test before.
    refused = code == 2
    envs = {"MARKDIR": str(tmp_path), "CODE": str(code)}
    sup = Supervisor(
        [spec(dext_child(setup=_FAILS_ITS_FIRST_START), envs=envs)],
        backoff=BackoffPolicy(base=0.01, cap=0.02, give_up_when_refused=True),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            if refused:
                with pytest.raises(ProverError, match="window_post#0 is FATAL"):
                    await sup.wait_ready()
            else:
                await sup.wait_ready()
            (child,) = sup.statistics().children
            sup.request_shutdown()
    if refused:
        assert (child.state, child.restarts, child.start_refused) == ("fatal", 0, True)
    else:
        assert (child.state, child.restarts, child.start_refused) == ("ready", 1, False)


async def test_a_refused_start_retried_as_run_retries_it_is_no_longer_said_once_ready(tmp_path):
    # Under `run`'s policy an exit 2 before the ready message is retried; the start after it
    # that says ready is no refusal: statistics (and prove, which reads it) say so.
    envs = {"MARKDIR": str(tmp_path), "CODE": "2"}
    sup = Supervisor(
        [spec(dext_child(setup=_FAILS_ITS_FIRST_START), envs=envs)],
        backoff=BackoffPolicy(base=0.01, cap=0.02),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            (child,) = sup.statistics().children
            sup.request_shutdown()
    assert (child.state, child.restarts, child.start_refused) == ("ready", 1, False)
    assert "exit code 2" in (child.last_exit or ""), child.last_exit


async def test_a_child_exiting_2_after_its_ready_message_is_no_refused_start():
    # Exit code 2 says "cannot load" only before the ready message: a prover that loaded and
    # then exits 2 on a request is a crash. prove reads start_refused to tell a config to fix
    # (exit 2) from a failed proof (exit 1); counting any exit 2 failed no test before.
    sup = Supervisor(
        [spec(dext_child("os._exit(2)"), auto_restart=False, max_attempts=1)],
        backoff=BackoffPolicy(give_up_when_refused=True),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            with pytest.raises(ProverError, match="went down while running it"):
                await sup.submit(window_task())
            (child,) = sup.statistics().children
            sup.request_shutdown()
    assert "exit code 2" in child.last_exit, child.last_exit
    assert child.start_refused is False
