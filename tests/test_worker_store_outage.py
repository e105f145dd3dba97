"""`damocles-ext worker` while its coordinator's job store is down: the coordinator answers, but
refuses each allocation (code 1, the store failed). A real coordinator over HTTP on a real
PostgreSQL server, stopped and started again; real children."""

from __future__ import annotations

import logging

import pytest
import trio
from helpers.frontend import plugin_block
from test_worker import Rig, children, job_input, serving

from damocles_ext.frontends.worker import Worker
from damocles_ext.jobs.store import StoreError

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
