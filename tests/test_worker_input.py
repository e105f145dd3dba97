"""`damocles-ext worker` against a manager whose allocation answer carries a job it cannot read:
the job is failed once, with the reason, and the worker goes on."""

from __future__ import annotations

import pytest
import trio
from helpers.frontend import plugin_block

from damocles_ext.config import parse_config
from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
from damocles_ext.frontends.worker import Worker
from damocles_ext.jobs.store import JobStore, TrioJobStore
from damocles_ext.jobs.worker_settings import WorkerSettings

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


class GarbledManager(Coordinator):
    """Answers the first allocation with the same unreadable job twice; records every call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, tuple]] = []
        self.finished = trio.Event()

    async def handle(self, call):
        self.calls.append((call.method, call.params))
        first = [m for m, _ in self.calls].count(call.method) == 1
        if call.method == "Dext.AllocateJobs" and first:
            bad = {"Id": "bad-1", "Lease": "L1", "Input": {"Sectors": "not a list"}}
            return [bad, bad]
        if call.method == "Dext.FinishJob":
            self.finished.set()
        return await super().handle(call)


async def test_an_unreadable_job_is_failed_once_with_the_reason_even_when_given_twice(tmp_path):
    store = JobStore.open(f"sqlite:///{tmp_path}/jobs.db")
    manager = GarbledManager(TrioJobStore(store), {})
    server = CoordinatorServer(manager, "127.0.0.1", 0)
    kids = tuple(
        parse_config(plugin_block("WdPost", "echo"), str(tmp_path / "ext-prover.cfg")).children
    )
    settings = WorkerSettings(
        manager=f"127.0.0.1:{server.port}", children=kids, name="gpu-1", idle_poll=600.0,
        retry_base=0.05, retry_cap=0.2, shutdown_grace=5.0,
    )  # fmt: skip
    worker = Worker(settings)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            await nursery.start(worker.run)
            with trio.fail_after(30):
                await manager.finished.wait()
                await worker.wait_for(lambda: not worker.held)
            worker.stop()
            nursery.cancel_scope.cancel()
    finally:
        server.close()
        store.close()
    finishes = [p for m, p in manager.calls if m == "Dext.FinishJob"]
    assert len(finishes) == 1, finishes
    job_id, lease, output, error = finishes[0]
    assert (job_id, lease, output) == ("bad-1", "L1", None)
    assert error.startswith("unreadable job input: ") and "Sectors" in error, error
    # Pulled once (it was not counted at all, while its failure was: status could show more
    # results than jobs pulled).
    assert worker.counters.pulled == 1 and worker.counters.given_up == 1
