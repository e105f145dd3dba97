"""`damocles-ext worker` and its jobs' deadlines: a proof cut short by its job's deadline is no
failure of this worker's prover (a real coordinator over HTTP, a real store, real children); and
a worker whose machine's clock is off its coordinator's reads a job's deadline (NotAfter, on the
coordinator's clock) on the coordinator's clock, from the difference the clock of its answers
shows (real processes: a coordinator on SQLite, its clock this machine's, and a worker whose
`time.time` is shifted, `dext_shifted`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from helpers.frontend import (
    CoordinatorProcess,
    LogWatcher,
    dext_env,
    dext_shifted,
    empty_store,
    plugin_block,
    write_config,
)
from test_worker import Rig, children, job_input, serving

from damocles_ext.frontends.worker import Worker
from damocles_ext.jobs.model import FINISHED, JobRecord
from damocles_ext.jobs.store import JobStore

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

WAIT = 60.0  # the bound of every wait on an observed condition, not a timing


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


async def test_a_proof_cut_by_its_deadline_is_not_sent_though_the_wall_clock_read_lags_it(
    tmp_path, caplog
):
    # The supervisor cuts the proof at the job's deadline; the worker's clock, read as the proof
    # fails, may be a little short of it (half a second here: clocks read apart, a clock within
    # the skew it does not correct). Still the deadline's cut: nothing is sent (the coordinator
    # refuses a finish after the deadline), no "given up" error.
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db")
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=60, progress_interval=0.05))
    settings = rig.settings(kids, shutdown_grace=0.2, idle_poll=0.05)
    worker = Worker(settings, clock=lambda: time.time() - 0.5)
    try:
        async with serving(rig, worker):
            await worker.supervisor.wait_ready("window_post", 1)
            job, _ = await rig.jobs.create(job_input(seed=5), not_after=time.time() + 3.0)
            await worker.wait_for(lambda: job.Id in worker.held)
            await worker.wait_for(lambda: job.Id not in worker.held)
            assert worker.counters.finish_retries == 0 and worker.counters.given_up == 1
            assert worker.counters.delivered == 0 and "given up" not in caplog.text
            assert f"job {job.Id}: no proof before its deadline; nothing to deliver" in caplog.text
    finally:
        rig.close()


class WorkerProcess:
    """One `damocles-ext worker` subprocess whose clock is `shift` s off this machine's."""

    def __init__(self, shift: float, config: Path, *extra: str) -> None:
        self.argv = [*dext_shifted(shift), "worker", "-c", str(config), "--name", "gpu-1",
                     "--attached", f"store-a={empty_store()}", "--idle-poll", "0.2s", *extra]  # fmt: skip
        self.proc: trio.Process | None = None
        self.log: LogWatcher | None = None

    async def start(self, nursery: trio.Nursery, port: int) -> LogWatcher:
        self.proc = await trio.lowlevel.open_process(
            [*self.argv, "--manager", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dext_env(),
        )  # fmt: skip
        assert self.proc.stderr is not None
        self.log = LogWatcher(self.proc.stderr)
        nursery.start_soon(self.log.run)
        await self.log.wait_for("pulls WindowPoSt jobs from")
        return self.log

    def stop(self) -> None:
        """Kill it and reap it (its children see their pipes close and exit)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.proc.pid, 0)


def coordinator(tmp_path: Path, heartbeat_timeout: str) -> CoordinatorProcess:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "sector-manager.cfg").write_text(
        f'[Common.Proving.WorkerProver]\nHeartbeatTimeout = "{heartbeat_timeout}"\n'
    )
    return CoordinatorProcess(
        f"sqlite:///{tmp_path}/jobs.db", "--conf-dir", str(tmp_path / "conf"),
        "--store", f"store-a={empty_store()}",
    )  # fmt: skip


def create_job(url: str, due_in: float) -> str:
    with JobStore.open(url, create=False) as store:
        job, _ = store.create(job_input(seed=3), time.time(), not_after=time.time() + due_in)
    return job.Id


async def until_finished(url: str, job_id: str) -> JobRecord:
    with JobStore.open(url, create=False) as store, trio.move_on_after(WAIT):
        while True:
            job = await trio.to_thread.run_sync(store.get, job_id)
            if job.State == FINISHED:
                return job
            await trio.sleep(0.1)  # the next look; nothing waits on this pause itself
    raise AssertionError(f"job {job_id} not finished within {WAIT:g} s")


@contextlib.asynccontextmanager
async def running(coord: CoordinatorProcess, worker: WorkerProcess) -> AsyncIterator[LogWatcher]:
    """The coordinator and then the worker started, the worker's log given; both stopped after,
    and what they said added to a failure."""
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                await coord.start(nursery)
                yield await worker.start(nursery, coord.port)
                nursery.cancel_scope.cancel()
    except BaseException as exc:
        exc.add_note(f"the worker said:\n{worker.log.text() if worker.log else ''}")
        exc.add_note(f"the coordinator said:\n{coord.stderr.decode(errors='replace')[-4000:]}")
        raise
    finally:
        worker.stop()
        coord.stop()


@pytest.mark.slow
async def test_a_worker_whose_clock_is_a_minute_ahead_proves_a_job_due_in_40_s(tmp_path):
    # The worker read the job's NotAfter on its own clock, 60 s ahead: 20 s past, it was not
    # sent to a prover, its error not sent either ("the coordinator cancels the job"), and its
    # heartbeats stopped: the coordinator took it back for a heartbeat timeout, gave it to the
    # same worker again, and the job ended 'heartbeat timeout' 30 s before its deadline.
    config = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=0.5))
    coord = coordinator(tmp_path, "3s")
    worker = WorkerProcess(60.0, config, "--heartbeat-interval", "0.5s")
    async with running(coord, worker) as log:
        job_id = create_job(coord.url, due_in=40)
        job = await until_finished(coord.url, job_id)
    assert (job.ErrorReason, job.TryNum, job.cancelled_at) == ("", 1, 0), log.text()
    assert job.Output is not None and job.Output.proofs, job
    assert f"job {job_id}: delivered 1 proofs" in log.text()
    assert "about 60 s ahead of the manager's" in log.text()  # (still warned)


@pytest.mark.slow
async def test_a_worker_whose_clock_is_a_minute_behind_cuts_the_proof_at_the_managers_deadline(
    tmp_path,
):
    # The worker read the job's NotAfter 60 s late: the proof ran on past the coordinator's
    # deadline until a heartbeat's answer said the job was cancelled (a heartbeat interval
    # later, at worst), its GPU taken all along; here the heartbeats are 30 s apart (their
    # first 30 s after the start), so only the worker's own deadline cuts it in time.
    config = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=50))
    coord = coordinator(tmp_path, "90s")
    worker = WorkerProcess(-60.0, config, "--heartbeat-interval", "30s")
    async with running(coord, worker) as log:
        job_id = create_job(coord.url, due_in=6)
        await log.wait_for(f"job {job_id}: pulled")
        with trio.move_on_after(20):  # the deadline, with room; far before a heartbeat
            await log.wait_for(f"job {job_id}: no proof before its deadline")
        job = await until_finished(coord.url, job_id)
    said = log.text()
    assert f"job {job_id}: no proof before its deadline" in said, said
    assert "took it back" not in said, said  # (by a heartbeat's answer)
    assert job.cancelled_at and job.TryNum == 1, job
    assert "about 60 s behind the manager's" in said
