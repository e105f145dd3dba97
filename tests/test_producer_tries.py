"""The tries of a job are the ones its producer waits for: `serve --jobs` reads JobMaxTry from
damocles-manager's sector-manager.cfg, while a coordinator on another machine may run with
another (the README's coordinator has no --conf-dir: damocles' default, 2). damocles' manager
retries the jobs it waits for itself, by its own JobMaxTry; so does serve."""

from __future__ import annotations

import signal
import time

import pytest
import trio
from helpers.frontend import CoordinatorProcess
from test_producer import job_id_of, send_until_created, start_serve, stop, window_task

from damocles_ext.api import open_job_producer
from damocles_ext.errors import ProverError
from damocles_ext.jobs import model, rules
from damocles_ext.jobs.client import RpcClient
from damocles_ext.jobs.store import JobStore, StoreUnavailable

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


async def fail_once(client: RpcClient, job_id: str, why: str) -> int:
    """Take the job as a worker does (asking until the coordinator gives it) and fail it; the
    try it was."""
    while True:
        jobs = await client.call("Dext.AllocateJobs", {}, 1, "gpu-1")
        if jobs:
            [job] = jobs
            assert job["Id"] == job_id
            await client.call("Dext.FinishJob", job_id, job["Lease"], None, why)
            return job["TryNum"]
        await trio.sleep(0.05)  # the next ask, as a worker's idle poll; bounded by the caller


async def test_a_job_gets_the_tries_of_serves_job_max_try_under_a_coordinator_with_fewer(
    postgres_url, tmp_path
):
    root = str(tmp_path / "s")
    (tmp_path / "sector-manager.cfg").write_text(
        f'[[Common.PersistStores]]\nName = "a"\nPath = "{root}"\n'
        "[Common.Proving.WorkerProver]\nJobMaxTry = 3\n"
    )
    task = window_task(root)
    job_id = job_id_of(task, {"a": root})
    coordinator = CoordinatorProcess(postgres_url, "--store", f"a={root}")  # JobMaxTry 2
    try:
        async with trio.open_nursery() as nursery:
            await coordinator.start(nursery)
            m = await start_serve(
                nursery, postgres_url, "--conf-dir", str(tmp_path), "--poll-interval", "0.1"
            )
            request_id = await send_until_created(m, task, job_id)
            async with RpcClient(f"127.0.0.1:{coordinator.port}") as client:
                with trio.fail_after(30):
                    tries = [await fail_once(client, job_id, f"gpu fault {i}") for i in (1, 2, 3)]
            assert tries == [1, 2, 3]
            with trio.fail_after(30):
                response = await m.wait(request_id)
            assert response.output is None
            assert response.err_msg == (
                f"request {request_id} (window_post): job {job_id} failed on worker 'gpu-1'"
                " (try 3 of JobMaxTry 3): gpu fault 3; the same task gets this answer until its job"
                f" is reset (`damocles-ext wdpost reset --jobs URL {job_id}`)"
            )
            await stop(m)
            assert coordinator.proc is not None
            coordinator.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await coordinator.proc.wait() == 0
    finally:
        coordinator.stop()
    assert b"Traceback" not in coordinator.stderr


def serves_conf(tmp_path) -> tuple[str, str]:
    """A sector-manager.cfg with JobMaxTry 3 in tmp_path, a SQLite store's URL there, and the
    root of store "a"."""
    root = str(tmp_path / "s")
    (tmp_path / "sector-manager.cfg").write_text(
        f'[[Common.PersistStores]]\nName = "a"\nPath = "{root}"\n'
        "[Common.Proving.WorkerProver]\nJobMaxTry = 3\n"
    )
    return f"sqlite:///{tmp_path}/jobs.db", root


async def take(store: JobStore) -> model.JobRecord:
    """The job a worker is given, asking until there is one (bounded by the caller)."""
    while True:
        taken = store.allocate(rules.AllocationSpec(), 1, "gpu-1", 0)
        if taken:
            return taken[0]
        await trio.sleep(0.05)


def finish(store: JobStore, job: model.JobRecord, error: str) -> None:
    output = None if error else model.JobOutput(proofs=(b"p",), faults=())
    store.finish(job.Id, output, error, 0, lease=job.lease)


async def test_a_retry_whose_sweep_failed_is_made_again_when_the_store_answers(tmp_path):
    # serve's one-job sweep fails (the store down for that moment, a connection dropped): the
    # job is still failed with tries left, and only serve retries it (no coordinator, or one
    # with a lower JobMaxTry); the next look must try the retry again, not wait for the deadline.
    url, root = serves_conf(tmp_path)
    task = window_task(root)
    job_id = job_id_of(task, {"a": root})
    async with open_job_producer(url, conf_dir=str(tmp_path), poll_interval=0.05) as producer:
        sweep, sweeps = producer.store.sweep, []

        async def sweep_failing_once(*args, **kwargs):
            sweeps.append(args)
            if len(sweeps) == 1:
                raise StoreUnavailable("the connection was lost")
            return await sweep(*args, **kwargs)

        producer.store.sweep = sweep_failing_once  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer.submit, task)
            with JobStore.open(url) as store, trio.fail_after(10):
                tries = []
                for error in ("gpu fault 1", ""):
                    job = await take(store)
                    assert job.Id == job_id
                    tries.append(job.TryNum)
                    finish(store, job, error)
    assert tries == [1, 2]
    assert len(sweeps) == 2


@pytest.mark.parametrize("how", ["removed", "reset"])
async def test_a_job_removed_and_made_again_or_reset_gets_its_tries_again(tmp_path, how):
    # Its first try failed and serve retried it; then it was removed (wdpost remove) and serve
    # made it again, or an operator reset it (wdpost reset): its tries count from 0 again, and
    # its new first failure is retried too (after a reset, serve, having retried a try 1
    # already, left it failed before, and the request waited for its deadline).
    url, root = serves_conf(tmp_path)
    task = window_task(root)
    async with (
        open_job_producer(url, conf_dir=str(tmp_path), poll_interval=0.05) as producer,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(producer.submit, task)
        with JobStore.open(url) as store, trio.fail_after(10):
            tries = []
            for error in ("gpu fault 1", how, "gpu fault 1 again", ""):
                job = await take(store)
                tries.append(job.TryNum)
                if error == "removed":
                    store.remove(job.Id, 0)
                elif error == "reset":
                    store.reset(job.Id, time.time())
                else:
                    finish(store, job, error)
    assert tries == [1, 2, 1, 2]


def hold_the_row_at_the_first_sweep(producer, postgres_url: str, state: str) -> list:
    """Wrap `producer`'s sweep: at its first call, another session holds the job's row (FOR
    UPDATE, as a heartbeat or finish being stored does), which must be in `state`, and the sweep
    must pass over it; the later calls sweep as usual. The calls' arguments, listed."""
    sweep, sweeps = producer.store.sweep, []

    async def sweep_beside_a_lock_holder_once(*args, **kwargs):
        sweeps.append(args)
        if len(sweeps) > 1:
            return await sweep(*args, **kwargs)
        [job_id] = args[0]
        with JobStore(postgres_url) as other, other.engine.begin() as conn:
            held = other._read(conn, job_id)  # FOR UPDATE, until the block ends
            assert held is not None and held.State == state
            outcome = await sweep(*args, **kwargs)
            assert outcome.effects == ()  # passed over: the row was held
            return outcome

    producer.store.sweep = sweep_beside_a_lock_holder_once
    return sweeps


async def test_a_retry_whose_sweep_found_the_job_held_by_another_is_made_at_the_next_look(
    tmp_path, postgres_url
):
    # serve's one-job sweep passes over a row another session holds (SKIP LOCKED: a late
    # heartbeat or finish of it being stored at that moment), and then did nothing; serve took
    # the retry as made, so the job stayed failed with a try left (a coordinator with a lower
    # JobMaxTry never retries it) until its deadline. The next look must make it.
    _, root = serves_conf(tmp_path)
    task = window_task(root)
    job_id = job_id_of(task, {"a": root})
    async with open_job_producer(
        postgres_url, conf_dir=str(tmp_path), poll_interval=0.05
    ) as producer:
        sweeps = hold_the_row_at_the_first_sweep(producer, postgres_url, model.FINISHED)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer.submit, task)
            with JobStore.open(postgres_url) as store, trio.fail_after(10):
                tries = []
                for error in ("gpu fault 1", ""):
                    job = await take(store)
                    assert job.Id == job_id
                    tries.append(job.TryNum)
                    finish(store, job, error)
    assert tries == [1, 2]
    assert len(sweeps) == 2


async def test_a_deadline_sweep_that_found_the_job_held_by_another_is_made_at_the_next_look(
    tmp_path, postgres_url
):
    # serve's one-job sweep at the job's deadline passes over a row another session holds
    # (SKIP LOCKED: a late heartbeat of it being stored at that moment), and then did nothing;
    # serve took the cancellation as made, so the job was not cancelled at its deadline (only
    # by a coordinator's sweep, if one runs) and the request waited on. The next look must make
    # it, after the pause.
    _, root = serves_conf(tmp_path)
    task = window_task(root)
    async with open_job_producer(
        postgres_url, conf_dir=str(tmp_path), poll_interval=0.05
    ) as producer:
        sweeps = hold_the_row_at_the_first_sweep(producer, postgres_url, model.READY)
        with trio.fail_after(10), pytest.raises(ProverError, match="its deadline passed"):
            await producer.submit(task, deadline=time.time() - 1)  # nobody takes it
    assert len(sweeps) == 2
