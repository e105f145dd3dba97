"""`damocles-ext worker` and its jobs' deadlines: a proof cut short by its job's deadline is no
failure of this worker's prover (a real coordinator over HTTP, a real store, real children)."""

from __future__ import annotations

import time

import pytest
from helpers.frontend import plugin_block
from test_worker import Rig, children, job_input, serving

from damocles_ext.frontends.worker import Worker

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


async def test_proofs_cut_short_by_their_deadline_do_not_pause_the_worker(tmp_path, caplog):
    # Before, three jobs whose deadline passed while they were proved counted as three prover
    # failures in a row: the worker took no job for 30 s (doubling up to 10 min while it went
    # on), "so that other workers take them", and the next deadline's jobs waited.
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db")
    kids = children(
        tmp_path, plugin_block("WdPost", "sleep", seconds=60, progress_interval=0.05) * 3
    )
    # It asks for jobs every 0.05 s while it has a free slot: the jobs, made once its three
    # children are ready (a loaded machine starts them slowly), are all taken before their
    # deadline.
    worker = Worker(rig.settings(kids, shutdown_grace=0.2, idle_poll=0.05))
    try:
        async with serving(rig, worker):
            await worker.supervisor.wait_ready("window_post", 3)
            ends = time.time() + 2.0
            late = [(await rig.jobs.create(job_input(seed=n), not_after=ends))[0] for n in range(3)]
            await worker.wait_for(lambda: all(j.Id in worker.held for j in late))
            await worker.wait_for(lambda: not any(j.Id in worker.held for j in late))
            assert worker.counters.pauses == 0
            # Nothing is sent for them (a finish after the deadline is refused): no call, and no
            # error line about a result given up, one warning each.
            assert worker.counters.finish_retries == 0 and worker.counters.given_up == 3
            assert "given up" not in caplog.text
            for j in late:
                assert (
                    f"job {j.Id}: no proof before its deadline; nothing to deliver" in caplog.text
                )
            # The next job (the next deadline's) is taken at once.
            after, _ = await rig.jobs.create(job_input(seed=9))
            await worker.wait_for(lambda: after.Id in worker.held)
    finally:
        rig.close()
