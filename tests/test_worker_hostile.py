"""`damocles-ext worker` against a coordinator that misbehaves (tests/helpers/hostile_coordinator.py:
a scripted JSON-RPC server over real HTTP, beside the worker in the test's trio run; real
children): answers of the wrong shape, HTTP errors, connections cut mid-answer, answers that never
come, stop signals for jobs the worker never had. Each scenario checks that the worker stays up,
says what happened naming the job (or the coordinator), answers each job it took exactly once,
and backs off rather than asking again at full speed."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio
from helpers.frontend import plugin_block
from helpers.hostile_coordinator import HostileCoordinator
from test_worker import children, job_input, start_worker, worker_settings

from damocles_ext.frontends.worker import Worker

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

ECHO = plugin_block("WdPost", "echo", concurrent=2)
#: Proofs that last until the test stops the worker (its heartbeats are what the test watches),
#: two at once: a slot stays free while one runs.
LONG = plugin_block("WdPost", "sleep", concurrent=2, seconds=60, progress_interval=0.05)


def job(job_id: str, lease: str | None = "L1", try_num: int = 1, **input_fields: Any) -> dict:
    """A job as Dext.AllocateJobs gives it (Venus.WdPoStAllocateJobs: `lease=None`), its input's
    fields replaced by `input_fields`."""
    given: dict[str, Any] = {"Id": job_id, "Input": msgspec.to_builtins(job_input())}
    given["Input"].update(input_fields)
    if lease is not None:
        given |= {"Lease": lease, "TryNum": try_num}
    return given


def first(*jobs: Any) -> Callable[[list, int], Any]:
    """An allocation handler that gives `jobs` at its first call, none after."""
    return lambda params, n: list(jobs) if n == 1 else []


def venus(script: dict[str, Any]) -> dict[str, Any]:
    """A damocles-manager's script: no Dext.* method (the worker speaks Venus.* after one try)."""
    return {"Dext.AllocateJobs": None, **script}


def beats(coordinator: HostileCoordinator) -> int:
    return coordinator.count("Dext.HeartbeatJobs") + coordinator.count("Venus.WdPoStHeartbeatJobs")


def allocations(coordinator: HostileCoordinator) -> int:
    return coordinator.count("Dext.AllocateJobs") + coordinator.count("Venus.WdPoStAllocateJobs")


@contextlib.asynccontextmanager
async def against(tmp_path, script: dict[str, Any], prover: str = ECHO, **settings: Any):
    """(coordinator, worker): the worker running against a coordinator scripted by `script` (a
    method given None has no handler: go-jsonrpc's -32601), for 60 s at most; stopped at the end
    of the body, which must see it end on its own (no exception: it stayed up)."""
    coordinator = HostileCoordinator({k: v for k, v in script.items() if v is not None})
    for method in [k for k, v in script.items() if v is None]:
        del coordinator.script[method]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.serve)
            kids = children(tmp_path, prover)
            worker = Worker(worker_settings(coordinator.address, kids, **settings))
            running = await start_worker(nursery, worker)
            yield coordinator, worker
            await running.stop()
            nursery.cancel_scope.cancel()


async def until(worker: Worker, coordinator: HostileCoordinator, condition) -> None:
    """Wait until `condition()` holds, looked at after each change of the worker and each call
    the coordinator gets."""
    async with trio.open_nursery() as nursery:
        for wait in (worker.wait_for(condition), coordinator.wait_for(lambda c: condition())):

            async def waiting(wait=wait) -> None:
                await wait
                nursery.cancel_scope.cancel()

            nursery.start_soon(waiting)


def worker_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "damocles_ext.worker"]


# --- a job given twice ----------------------------------------------------------------------------


async def test_a_manager_that_gives_again_the_job_held_is_not_asked_again_at_full_speed(
    tmp_path, caplog
):
    # damocles-manager's allocation is one job a call; one that answers each with the job the
    # worker already proves filled no slot, and the worker asked again at once, for ever
    # (thousands of calls a second) instead of waiting as after an empty answer.
    script = venus({"Venus.WdPoStAllocateJobs": lambda params, n: [job("j1", lease=None)]})
    async with against(tmp_path, script, LONG, shutdown_grace=0.5) as (coordinator, worker):
        await coordinator.wait_for(lambda c: beats(c) >= 5)
        assert list(worker.held) == ["j1"]
        assert allocations(coordinator) <= 3, coordinator.methods()
    assert "job j1: given again while this worker holds it; ignored" in worker_lines(caplog)
    assert worker.counters.pulled == 1  # (a job given again is not pulled again)
    assert coordinator.finishes("j1") == []  # stopped before its end: left to the heartbeat timeout


# --- answers of the wrong shape -------------------------------------------------------------------


async def test_entries_of_an_allocation_that_are_no_job_lose_none_of_the_jobs_beside_them(
    tmp_path, caplog
):
    # Before, the answer was read as a whole: one entry that was no object (null, a number) threw
    # the whole answer away as "unreachable", and the jobs beside it, allocated to this worker,
    # were neither proved nor finished nor named anywhere.
    alloc = first(job("j1"), None, 5, {"Lease": "L9"}, job("j2"))
    async with against(tmp_path, {"Dext.AllocateJobs": alloc}) as (coordinator, worker):
        # The next allocation is asked after the jobs of the first are held (or it was lost).
        await worker.wait_for(lambda: allocations(coordinator) >= 2 and not worker.held)
    for job_id in ("j1", "j2"):
        [(_, lease, output, error)] = coordinator.finishes(job_id)
        assert (lease, error) == ("L1", "") and output["proofs"]
    lines = worker_lines(caplog)
    url = worker.manager_url
    left = "in an allocation; it is left to time out there"
    assert f"the manager at {url} gave not a job but None {left}" in lines
    assert f"the manager at {url} gave not a job but 5 {left}" in lines
    assert any(
        line.startswith(f"the manager at {url} gave a job without an id (Object missing required")
        for line in lines
    ), lines
    assert worker.manager_reachable and worker.counters.pulled == 2


async def test_null_for_an_allocation_or_a_heartbeats_stop_list_is_gos_empty_list(tmp_path, caplog):
    # Go encodes a nil slice as null. Before, a coordinator answering so was "unreachable" at each
    # allocation (asked again and again with a backoff), and each heartbeat counted as failed.
    script = {"Dext.AllocateJobs": lambda params, n: None}
    async with against(tmp_path, script) as (coordinator, worker):
        await until(
            worker, coordinator, lambda: worker.counters.allocations or allocations(coordinator) > 1
        )
    assert worker.counters.empty_allocations == 1 and allocations(coordinator) == 1
    script = {"Dext.AllocateJobs": first(job("j1")), "Dext.HeartbeatJobs": lambda params, n: None}
    async with against(tmp_path, script, LONG, shutdown_grace=0.5) as (coordinator, worker):
        await coordinator.wait_for(lambda c: beats(c) >= 3)
        assert worker.held["j1"].last_heartbeat is not None
    assert worker.manager_reachable
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        (
            "stopping: 1 proofs did not finish within 0.5 s and are cancelled; the manager gives"
            " their jobs to another worker after its heartbeat timeout: j1"
        )
    ]


# --- stop signals ---------------------------------------------------------------------------------


async def test_a_heartbeat_answer_to_stop_a_job_never_held_is_said_once_and_stops_nothing(
    tmp_path, caplog
):
    # Before, it was ignored without a word: the manager's mistake (its answer names a job this
    # worker never heartbeated) went unseen.
    ghost = {"Id": "ghost", "Reason": "reset", "Message": "reset by an operator"}
    script = {"Dext.AllocateJobs": first(job("j1")), "Dext.HeartbeatJobs": lambda p, n: [ghost]}
    async with against(tmp_path, script, LONG, shutdown_grace=0.5) as (coordinator, worker):
        await coordinator.wait_for(lambda c: beats(c) >= 4)
        assert worker.held["j1"].stop_reason is None and worker.held["j1"].state == "proving"
    said = [line for line in worker_lines(caplog) if "does not hold" in line]
    assert said == [
        (
            f"the manager at {worker.manager_url} says to stop 1 jobs this worker does not hold"
            " (ghost): nothing of theirs runs here; ignored (the manager's heartbeat answers"
            " should name only the jobs heartbeated)"
        )
    ]
    assert worker.counters.stopped == 0
