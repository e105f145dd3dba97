"""`damocles-ext worker` while its coordinator's job store is down: the coordinator answers, but
refuses each allocation, heartbeat and finish (code 1, the store failed). A real coordinator over
HTTP on a real PostgreSQL server, stopped and started again; real children."""

from __future__ import annotations

import contextlib
import logging
import time

import pytest
import trio
from helpers.frontend import plugin_block
from test_worker import Rig, children, job_input, serving

from damocles_ext.frontends.worker import Worker
from damocles_ext.jobs.store import StoreError
from damocles_ext.jobs.worker_rules import LAST_TRY_MARGIN

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


async def test_allocations_refused_while_the_store_is_down_are_said_once_and_asked_again_soon(
    postgres_server, postgres_url, tmp_path, caplog
):
    # Before, each refused allocation was a warning, and the next was asked after a backoff
    # doubling to 30 s: once the store was back, an idle worker waited out the rest of it while
    # the jobs made meanwhile waited (a chaos soak saw one idle 27 s after a 33 s outage, and
    # jobs cancelled at their deadline). Now the refusals are one line, one more when it
    # allocates again, and the next call is never later than --idle-poll.
    caplog.set_level(logging.INFO, logger="damocles_ext.worker")
    rig = Rig(postgres_url)
    allocate, refused, failing = rig.jobs.allocate, [0], trio.Event()

    async def counted(*args, **kwargs):  # the coordinator's real allocation; counts refusals
        try:
            return await allocate(*args, **kwargs)
        except StoreError:
            refused[0] += 1
            if refused[0] >= 5:
                failing.set()
            raise

    rig.jobs.allocate = counted
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    # A backoff far longer than the test: only the cap at --idle-poll asks again in time.
    worker = Worker(rig.settings(kids, idle_poll=0.05, retry_base=600.0, retry_cap=600.0))
    try:
        async with serving(rig, worker):
            await worker.wait_for(lambda: worker.counters.empty_allocations >= 1)
            await trio.to_thread.run_sync(postgres_server.pause)
            try:
                with trio.fail_after(20):  # one call each --idle-poll: 5 within 0.25 s
                    await failing.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(postgres_server.resume)
            job, _ = await rig.jobs.create(job_input())
            await worker.wait_for(lambda: worker.counters.delivered == 1)
        assert (await rig.jobs.get(job.Id)).succeeded
    finally:
        rig.close()
    lines = [r.getMessage() for r in caplog.records if "allocat" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("the manager refuses the allocation (Dext.AllocateJobs at ")
    assert lines[1].startswith("the manager allocates again, after ")
    assert int(lines[1].split("after ")[1].split()[0]) >= 5


@contextlib.asynccontextmanager
async def store_down_at_its_finish(rig, postgres_server, worker, job_id):
    """The worker proves the job; its first finish reaches the coordinator, which hands it to
    its store only once the PostgreSQL server is stopped: it fails there (code 1, the store
    unreachable). The body runs once the worker saw it fail, the server down; it gets a
    function that starts the server again (done after the body if it did not)."""
    finish, arrived, down, up = rig.jobs.finish, trio.Event(), trio.Event(), [False]

    async def once_the_store_is_down(*args, **kwargs):
        arrived.set()
        await down.wait()
        return await finish(*args, **kwargs)

    async def resume():
        if not up[0]:
            await trio.to_thread.run_sync(postgres_server.resume)
            up[0] = True

    rig.jobs.finish = once_the_store_is_down
    async with serving(rig, worker):
        await arrived.wait()
        await trio.to_thread.run_sync(postgres_server.pause)
        try:
            down.set()
            await worker.wait_for(lambda: worker.held[job_id].delivery_failures >= 1)
            yield resume
        finally:
            with trio.CancelScope(shield=True):
                await resume()


async def test_a_result_the_store_refused_goes_as_soon_as_a_heartbeat_is_answered_again(
    postgres_server, postgres_url, tmp_path, caplog
):
    # Before, only a manager that could not be connected to woke the results waiting out their
    # backoff when it answered again; a finish the coordinator answered with its store's error
    # (code 1) waited out the rest of its backoff (up to 30 s) after the heartbeats (failing on
    # the store too) were answered again, and a job whose deadline came meanwhile was cancelled
    # with its proof done.
    caplog.set_level(logging.INFO, logger="damocles_ext.worker")
    rig = Rig(postgres_url)
    job, _ = await rig.jobs.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    # A backoff far longer than the test: only the wake-up sends the result again in time.
    worker = Worker(rig.settings(kids, retry_base=600.0, retry_cap=600.0))
    try:
        async with store_down_at_its_finish(rig, postgres_server, worker, job.Id) as resume:
            assert "cannot reach the job store" in caplog.text
            # Its heartbeats fail too, as the store is down: they are answered again once it
            # is back, and the result waiting goes then.
            await worker.wait_for(lambda: worker._beats_failing.down_since is not None)
            await resume()
            with trio.fail_after(20):  # a heartbeat every 0.2 s: the first answered sends it
                await worker.wait_for(lambda: worker.counters.delivered == 1)
        assert (await rig.jobs.get(job.Id)).succeeded
    finally:
        rig.close()
    assert f"job {job.Id}: delivered 1 proofs (attempt 2)" in caplog.text


async def test_a_result_the_store_refused_is_tried_again_shortly_before_its_jobs_deadline(
    postgres_server, postgres_url, tmp_path
):
    # Before, the result waited out its backoff (up to 30 s) whatever the job's deadline: with
    # no heartbeat answered meanwhile, it was tried again after the coordinator had cancelled
    # the job, its proof done. Now it is tried again LAST_TRY_MARGIN (5 s) before the deadline
    # at the latest. No heartbeat in the test's time; the clocks (the worker's wall clock, the
    # store's) are the test's, the deadline far off in real time (the supervisor's own).
    now = [time.time()]
    rig = Rig(postgres_url)
    rig.jobs.clock = lambda: now[0]
    not_after = now[0] + 600.0
    job, _ = await rig.jobs.create(job_input(), not_after=not_after)
    now[0] = not_after - LAST_TRY_MARGIN - 0.5  # (frozen there: the failed finish's time too)
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    settings = rig.settings(kids, heartbeat_interval=600.0, retry_base=600.0, retry_cap=600.0)
    worker = Worker(settings, clock=lambda: now[0])
    # The waits the worker asks for, each held until the store is back (its try then lands).
    waits, back, retry_wait = [], trio.Event(), worker.retry_wait

    async def recorded(seconds, **kwargs):
        waits.append(seconds)
        await back.wait()
        await retry_wait(seconds, **kwargs)

    worker.retry_wait = recorded
    try:
        async with store_down_at_its_finish(rig, postgres_server, worker, job.Id) as resume:
            await worker.wait_for(lambda: len(waits) == 1)
            # Not the backoff's 600 s (the manager's clock is read to the millisecond).
            assert waits == [pytest.approx(0.5, abs=0.002)]
            await resume()
            back.set()
            await worker.wait_for(lambda: worker.counters.delivered == 1)
        assert (await rig.jobs.get(job.Id)).succeeded
    finally:
        rig.close()


async def test_a_proof_done_but_not_delivered_when_its_job_is_cancelled_says_so_and_why(
    postgres_server, postgres_url, tmp_path, caplog
):
    # Before, "the manager took it back (cancelled: ...); its proof is cancelled" was said of a
    # proof done and waiting to be delivered: nothing told that it was lost, nor why.
    caplog.set_level(logging.INFO, logger="damocles_ext.worker")
    now = [time.time()]
    rig = Rig(postgres_url)
    rig.jobs.clock = lambda: now[0]
    not_after = now[0] + 600.0
    job, _ = await rig.jobs.create(job_input(), not_after=not_after)
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(rig.settings(kids, retry_base=600.0, retry_cap=600.0), clock=lambda: now[0])
    try:
        async with store_down_at_its_finish(rig, postgres_server, worker, job.Id) as resume:
            now[0] = not_after + 1.0  # the deadline passes while the store is down
            await resume()  # the next heartbeat answered says the job is cancelled
            await worker.wait_for(lambda: worker.counters.stopped == 1)
    finally:
        rig.close()
    assert worker.counters.delivered == 0
    [line] = [r for r in caplog.records if "took it back" in r.getMessage()]
    assert line.levelname == "ERROR"
    text = line.getMessage()
    taken = f"job {job.Id}: the manager took it back (cancelled: its deadline passed at "
    assert text.startswith(taken)
    undelivered = ") before its proof, done, could be delivered (1 delivery failed, the last: "
    assert f"{undelivered}cannot reach the job store " in text
    assert text.endswith("); it is dropped")
    assert "its proof is cancelled" not in caplog.text
