"""A job store that is down is said once, and once more when it answers again: not a line per
pass or per call. A real PostgreSQL server, stopped and started again."""

from __future__ import annotations

import logging
from functools import partial

import trio

from damocles_ext.frontends.coordinator import Coordinator
from damocles_ext.jobs.store import JobStore, TrioJobStore


class Said(logging.Handler):
    """Sets `seen` once `times` records with `words` are logged."""

    def __init__(self, words: str, times: int = 1) -> None:
        super().__init__()
        self.words, self.seen, self.left = words, trio.Event(), times

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.left -= 1
            if self.left <= 0:
                self.seen.set()


async def test_a_store_outage_is_one_warning_of_the_sweep_and_one_line_when_it_works_again(
    postgres_server, postgres_url, caplog
):
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    back = Said("the sweep works again")
    logging.getLogger("damocles_ext.coordinator").addHandler(back)
    try:
        with JobStore.open(postgres_url) as store:
            coordinator = Coordinator(TrioJobStore(store))
            sweep, failing = coordinator.sweep_once, trio.Event()

            async def counted():  # the real pass; the fifth while the server is down says so
                if coordinator._sweep_outage.failures >= 5:
                    failing.set()
                return await sweep()

            coordinator.sweep_once = counted
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(coordinator.sweep_forever, 0.05))
                await trio.to_thread.run_sync(postgres_server.pause)
                try:
                    with trio.fail_after(30):
                        await failing.wait()  # a pass every 0.05 s, each failing
                finally:
                    await trio.to_thread.run_sync(postgres_server.resume)
                with trio.fail_after(30):
                    await back.seen.wait()
                nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("damocles_ext.coordinator").removeHandler(back)
    lines = [r.getMessage() for r in caplog.records if "the sweep" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("the sweep failed (")
    assert lines[0].endswith(
        "; it is tried again at each pass, and a line says when it works again"
    )
    assert lines[1].startswith("the sweep works again, after ")
    assert int(lines[1].split("after ")[1].split()[0]) >= 5


async def test_a_store_outage_is_one_warning_of_the_producer_for_all_its_waiting_requests(
    postgres_server, postgres_url, caplog, monkeypatch, tmp_path
):
    # serve --jobs with requests in flight: each looks at its job again with a backoff while the
    # store is down; the outage is said once for all of them, and once when a look works again.
    from damocles_ext.frontends import producer as producer_module
    from damocles_ext.jobs.model import JobOutput
    from damocles_ext.jobs.paths import StoreMap
    from damocles_ext.jobs.rules import AllocationSpec, JobLimits
    from damocles_ext.jobs.store import StoreError
    from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

    monkeypatch.setattr(producer_module, "FIRST_BACKOFF", 0.01)
    monkeypatch.setattr(producer_module, "MAX_BACKOFF", 0.02)
    caplog.set_level(logging.INFO, logger="damocles_ext.producer")
    created = Said(": created (", times=3)
    logging.getLogger("damocles_ext.producer").addHandler(created)
    root = str(tmp_path)

    def task(miner: int) -> WindowPoSt:
        name = f"s-t0{miner}-1"
        replica = PoStReplicaInfo(1, bytes(32), f"{root}/cache/{name}", f"{root}/sealed/{name}")
        return WindowPoSt(miner, "StackedDrgWindow8MiBV1_2", [replica], bytes(32))

    try:
        with JobStore.open(postgres_url, limits=JobLimits(poll_interval=0.02)) as store:
            jobs = TrioJobStore(store)
            producer = producer_module.JobProducer(jobs, StoreMap({"a": root}))
            get, failed, failing = jobs.get, [0], trio.Event()

            async def counted(job_id):  # the real look; the 20th failed one says enough
                try:
                    return await get(job_id)
                except StoreError:
                    failed[0] += 1
                    if failed[0] >= 20:
                        failing.set()
                    raise

            jobs.get = counted
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for miner in (1000, 1001, 1002):  # three requests waiting, no worker yet
                        nursery.start_soon(producer.submit, task(miner))
                    await created.seen.wait()
                    await trio.to_thread.run_sync(postgres_server.pause)
                    try:
                        await failing.wait()
                    finally:
                        await trio.to_thread.run_sync(postgres_server.resume)
                    # A worker proves the three: the requests are answered, their waits end.
                    for job in await jobs.allocate(AllocationSpec(), 3, "w1"):
                        await jobs.finish(job.Id, JobOutput(proofs=(b"p",), faults=()), "",
                                          lease=job.lease)  # fmt: skip
    finally:
        logging.getLogger("damocles_ext.producer").removeHandler(created)
    lines = [r.getMessage() for r in caplog.records if "the job store" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("the job store failed (job ")
    assert lines[0].endswith("; a line says when the store answers again")
    assert lines[1].startswith("the job store answers again, after ")
    assert int(lines[1].split("after ")[1].split()[0]) >= 20
