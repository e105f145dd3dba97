"""The producer (serve --jobs) once its job store is back after an outage: the requests that
waited through it look at their jobs at once, not at the end of a backoff grown meanwhile. A
real PostgreSQL server, stopped and started again."""

from __future__ import annotations

import trio

from damocles_ext.errors import ProverError
from damocles_ext.frontends import producer as producer_module
from damocles_ext.jobs.model import JobOutput
from damocles_ext.jobs.paths import StoreMap
from damocles_ext.jobs.rules import AllocationSpec, JobLimits
from damocles_ext.jobs.store import JobStore, StoreError, TrioJobStore
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt


def task(root: str, miner: int) -> WindowPoSt:
    name = f"s-t0{miner}-1"
    replica = PoStReplicaInfo(1, bytes(32), f"{root}/cache/{name}", f"{root}/sealed/{name}")
    return WindowPoSt(miner, "StackedDrgWindow8MiBV1_2", [replica], bytes(32))


async def test_requests_in_their_backoff_look_again_as_soon_as_the_store_answers_a_look(
    postgres_server, postgres_url, monkeypatch, tmp_path
):
    # Before, a request whose look failed slept its whole backoff (doubling to 30 s) whatever
    # happened meanwhile: in a chaos soak, jobs proved as the store came back were answered up
    # to 30 s later, or only at their deadline. Here the backoff is 10 minutes: only a wake-up
    # answers the three in time.
    monkeypatch.setattr(producer_module, "FIRST_BACKOFF", 600.0)
    monkeypatch.setattr(producer_module, "MAX_BACKOFF", 600.0)
    root = str(tmp_path)
    with JobStore.open(postgres_url, limits=JobLimits(poll_interval=0.02)) as store:
        jobs = TrioJobStore(store)
        producer = producer_module.JobProducer(jobs, StoreMap({"a": root}))
        get, failed, all_failed = jobs.get, [0], trio.Event()

        async def counted(job_id):  # the real look; each of the three fails once, then sleeps
            try:
                return await get(job_id)
            except StoreError:
                failed[0] += 1
                if failed[0] == 3:
                    all_failed.set()
                raise

        jobs.get = counted
        create, made, three_made = jobs.create, [0], trio.Event()

        async def create_counted(*args, **kwargs):  # the real creation; counts the jobs made
            outcome = await create(*args, **kwargs)
            made[0] += 1
            if made[0] == 3:
                three_made.set()
            return outcome

        jobs.create = create_counted
        answers: list[object] = []
        three_answered = trio.Event()

        async def submit(miner: int) -> None:
            answers.append(await producer.submit(task(root, miner)))
            if len(answers) == 3:
                three_answered.set()

        # A bound on a hang; a loaded machine stops and starts PostgreSQL slowly.
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for miner in (1000, 1001, 1002):
                    nursery.start_soon(submit, miner)
                await three_made.wait()
                await trio.to_thread.run_sync(postgres_server.pause)
                try:
                    await all_failed.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(postgres_server.resume)
                for job in await jobs.allocate(AllocationSpec(), 3, "w1"):
                    await jobs.finish(job.Id, JobOutput(proofs=(b"p",), faults=()), "",
                                      lease=job.lease)  # fmt: skip
                # A new request: its look works, and the three waiting look again at once.
                nursery.start_soon(submit, 1003)
                await three_answered.wait()
                [job] = await jobs.allocate(AllocationSpec(), 1, "w1")
                await jobs.finish(job.Id, JobOutput(proofs=(b"p",), faults=()), "",
                                  lease=job.lease)  # fmt: skip
    assert len(answers) == 4


async def test_a_job_whose_looks_fail_alone_wakes_nobody_and_is_not_woken_at_every_look(
    monkeypatch, tmp_path
):
    # One job's looks fail while the others' work (its row damaged: StoreError, 'remove it').
    # Each of its failures opened an 'outage' that the next look of another ended, waking every
    # waiting request (those polling at ease too) to look at once: those looks ended the outage
    # the failing one had opened again meanwhile, and so on, a storm of looks and log lines at
    # the store's speed. Now only requests in their backoff are woken, once per run of failures.
    monkeypatch.setattr(producer_module, "FIRST_BACKOFF", 600.0)
    monkeypatch.setattr(producer_module, "MAX_BACKOFF", 600.0)
    root = str(tmp_path)
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db", limits=JobLimits(poll_interval=0.5)) as (
        store
    ):
        jobs = TrioJobStore(store)
        producer = producer_module.JobProducer(jobs, StoreMap({"a": root}))
        damaged = producer_module.model.job_id(producer.job_input(task(root, 1000)))
        get, looks = jobs.get, {"damaged": 0, "others": 0}

        async def counted(job_id):
            if job_id == damaged:
                looks["damaged"] += 1
                await trio.lowlevel.checkpoint()
                raise StoreError(f"job {job_id!r} in the store is damaged (test): remove it")
            looks["others"] += 1
            return await get(job_id)

        jobs.get = counted
        async with trio.open_nursery() as nursery:
            for miner in range(1000, 1009):
                nursery.start_soon(producer.submit, task(root, miner))
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
    # Eight requests polling every 0.5 s for 2 s; the damaged one: its look, and one more.
    assert looks["others"] <= 8 * 5, looks
    assert 1 <= looks["damaged"] <= 3, looks


async def test_a_request_stopped_before_its_job_could_be_made_does_not_say_it_stays(
    postgres_server, postgres_url, monkeypatch, tmp_path
):
    # The store down from the moment the request came: no look found its job. Stopped (serve's
    # grace over), its answer said the job "stays in the job store" all the same.
    monkeypatch.setattr(producer_module, "FIRST_BACKOFF", 600.0)
    with JobStore.open(postgres_url) as store:
        jobs = TrioJobStore(store)
        producer = producer_module.JobProducer(jobs, StoreMap({"a": str(tmp_path)}))
        create, tried = jobs.create, trio.Event()

        async def create_failing(*args, **kwargs):
            try:
                return await create(*args, **kwargs)
            finally:
                tried.set()

        jobs.create = create_failing
        caught: list[BaseException] = []

        async def submit() -> None:
            try:
                await producer.submit(task(str(tmp_path), 1000))
            except ProverError as exc:  # the answer under test
                caught.append(exc)

        with trio.fail_after(60):
            await trio.to_thread.run_sync(postgres_server.pause)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(submit)
                    await tried.wait()  # its creation failed: it waits in its backoff
                    producer.in_flight.abandon("serve stopped before the job was done")
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(postgres_server.resume)
    [answer] = caught
    assert "serve stopped before the job was done" in str(answer)
    assert "stays in the job store" not in str(answer)
    assert "had answered yet: job" in str(answer) and "may not have been made" in str(answer)
