"""The worker resolves a job's sectors through the sector-location service (`worker --proxy`)
when it has not attached their store: real children prove on sector fixtures while the damocles
source node look-alike answers, stops, or hangs."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import test_worker
import trio
from helpers.damocles_source import DamoclesSource
from helpers.frontend import plugin_block
from helpers.post import sectors
from test_worker import PROOF_TYPE, children, job_input, serving, start_worker

from damocles_ext.frontends.worker import Worker
from damocles_ext.frontends.worker_control import worker_part
from damocles_ext.jobs.worker_rules import PulledJob, window_post_task
from damocles_ext.post.verify import verify_window_post
from damocles_ext.sectors.cache import CacheRules
from damocles_ext.sectors.locator import SectorLocator
from damocles_ext.sectors.providers import SourceNode
from damocles_ext.sectors.snapshot import CacheSnapshot
from damocles_ext.tasks import WindowPoStOutput

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

MINER = 1000


make_rig, rig = test_worker.make_rig, test_worker.rig  # the fixtures, shared


@pytest.fixture
def moved(tmp_path, make_rig):
    """Three sectors now in store-new; the jobs still name store-old, which no worker attaches
    (the sectors were moved after the jobs were made)."""
    base = tmp_path / "mnt" / "store-new"
    manifest = sectors(base, PROOF_TYPE, 3, random_seed=21, miner=MINER)
    comm_rs = {r.sector_id: bytes.fromhex(r.comm_r) for r in manifest.replicas}
    return base, comm_rs, make_rig(None, {"store-new": str(base)})


def make_job(comm_rs, numbers, seed):
    return job_input(
        miner=MINER, seed=seed, store="store-old", sector_ids=numbers,
        comm_rs=[comm_rs[n] for n in numbers],
    )  # fmt: skip


def verify(job, base, output) -> None:
    paths = [
        (str(base / "sealed" / f"s-t0{MINER}-{s.SectorId}"),
         str(base / "cache" / f"s-t0{MINER}-{s.SectorId}"))
        for s in job.Input.Sectors
    ]  # fmt: skip
    task = window_post_task(PulledJob(job.Id, job.Input), paths)
    verify_window_post(task, WindowPoStOutput(list(output.proofs), []))


def worker_on_source(rig, kids, source, base, comm_rs) -> tuple[Worker, SectorLocator]:
    """A worker whose locator asks `source` only (no scan), which knows every sector in
    store-new: what it said is all the worker knows; fresh_for 0, so that every lookup asks it
    and, when it is down or hung, checks the files it named."""
    for number in comm_rs:
        source.put(MINER, number, "store-new")
    node = SourceNode(source.url, {"store-new": str(base)})
    locator = SectorLocator([node], rules=CacheRules(fresh_for=0, refresh_lead=0))
    attached = {"store-new": str(base)}
    return Worker(rig.settings(kids, attached=attached, idle_poll=0.2), locator=locator), locator


async def test_with_the_source_stopped_mid_run_proofs_go_on_from_cached_locations_and_gone_files_are_faults(
    moved, tmp_path, caplog
):
    base, comm_rs, rig = moved
    kids = children(tmp_path, plugin_block("WdPost", "python-ref"))
    with DamoclesSource() as source:
        worker, locator = worker_on_source(rig, kids, source, base, comm_rs)
        first, _ = await rig.jobs.create(make_job(comm_rs, (1, 2, 3), seed=1))
        async with serving(rig, worker):
            await worker.wait_for(lambda: worker.counters.delivered == 1)
            source.stop()  # mid-run: the worker goes on
            (base / "sealed" / f"s-t0{MINER}-3").unlink()
            second, _ = await rig.jobs.create(make_job(comm_rs, (1, 2, 3), seed=2))
            await worker.wait_for(lambda: worker.counters.delivered == 2)
            third, _ = await rig.jobs.create(make_job(comm_rs, (1, 2), seed=3))
            await worker.wait_for(lambda: worker.counters.delivered == 3)
            status = worker_part(worker).sectors
        await locator.aclose()
    done = [await rig.jobs.get(job.Id) for job in (first, second, third)]
    assert [d.ErrorReason for d in done] == ["", "", ""]
    verify(first, base, done[0].Output)
    # Sector 3's files vanished while the source was down: a fault, as damocles-manager
    # expects (it proves again without it), and the rest proved from their last locations.
    assert done[1].Output.faults == (3,) and done[1].Output.proofs == ()
    assert done[2].Output.faults == () and done[2].Output.proofs
    verify(third, base, done[2].Output)
    assert status["stale_answers"] == 4 and status["missing"] == 1
    assert status["source_errors"] and status["last_source_error"] is not None
    # Said once a job and kind, not once a sector (thousands a job while a source was down).
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and r.getMessage().startswith(("job " + second.Id, "job " + third.Id))]  # fmt: skip
    assert said[0].startswith(f"job {second.Id}: 2 sector(s) given from their last known"), said
    assert said[1].startswith(f"job {second.Id}: 1 sector(s) faults (sector 3 of miner"), said
    assert said[2].startswith(f"job {third.Id}: 2 sector(s) given from their last known"), said
    assert len(said) == 3, said


async def test_a_worker_restarted_while_the_source_is_down_proves_from_the_locations_it_kept(
    moved, tmp_path
):
    """The locator's snapshot (`worker --sector-cache`): a worker learns the sectors' locations,
    stops; started again while the source node is down, it proves from them."""
    base, comm_rs, rig = moved
    kids = children(tmp_path, plugin_block("WdPost", "python-ref"))
    path = str(tmp_path / "sectors.snapshot")
    with DamoclesSource() as source, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            worker, locator = worker_on_source(rig, kids, source, base, comm_rs)
            locator.snapshot = CacheSnapshot(path)
            first, _ = await rig.jobs.create(make_job(comm_rs, (1, 2), seed=1))
            running = await start_worker(nursery, worker)
            await worker.wait_for(lambda: worker.counters.delivered == 1)
            await running.stop()
            await locator.aclose()
            source.stop()
            worker, locator = worker_on_source(rig, kids, source, base, comm_rs)
            locator.snapshot = CacheSnapshot(path)
            second, _ = await rig.jobs.create(make_job(comm_rs, (1, 2), seed=2))
            running = await start_worker(nursery, worker)
            await worker.wait_for(lambda: worker.counters.delivered == 1)
            status = worker_part(worker).sectors
            await running.stop()
            await locator.aclose()
            nursery.cancel_scope.cancel()
    done = [await rig.jobs.get(job.Id) for job in (first, second)]
    assert [d.ErrorReason for d in done] == ["", ""]
    assert done[1].Output.faults == () and done[1].Output.proofs
    verify(second, base, done[1].Output)
    assert status["stale_answers"] == 2 and status["snapshot"]["restored"] == 2


async def test_a_hanging_source_does_not_delay_a_proof_past_its_deadline(moved, tmp_path):
    base, comm_rs, rig = moved
    kids = children(tmp_path, plugin_block("WdPost", "python-ref"))
    with DamoclesSource() as source:
        worker, locator = worker_on_source(rig, kids, source, base, comm_rs)
        await rig.jobs.create(make_job(comm_rs, (1, 2), seed=1))
        async with serving(rig, worker):
            await worker.wait_for(lambda: worker.counters.delivered == 1)
            source.hold()  # answers nothing until released (after the test): slower than 10 s
            not_after = time.time() + 20
            job, _ = await rig.jobs.create(make_job(comm_rs, (1, 2), seed=2), not_after=not_after)
            with trio.fail_after(20):
                await worker.wait_for(lambda: worker.counters.delivered == 2)
            delivered_at = time.time()
            source.release()
        await locator.aclose()
    done = await rig.jobs.get(job.Id)
    assert done.ErrorReason == "" and done.Output.proofs and delivered_at < not_after
    verify(job, base, done.Output)


async def test_without_proxy_a_store_not_attached_still_fails_the_job_naming_it(rig, tmp_path):
    job, _ = await rig.jobs.create(job_input(store="store-old"))
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(rig.settings(kids, attached={"store-a": str(tmp_path)}))
    async with serving(rig, worker):
        await worker.wait_for(lambda: worker.counters.delivered == 1)
    done = await rig.jobs.get(job.Id)
    assert "'store-old'" in done.ErrorReason and worker_part(worker).sectors is None


async def test_the_look_at_faulty_sectors_names_a_few_causes_counts_the_rest_and_stops_at_its_cap(
    tmp_path, monkeypatch
):
    from damocles_ext.frontends import worker_sectors

    monkeypatch.setattr(worker_sectors, "FAULTS_LOOKED_AT", 9)
    ids = tuple(range(1, 12))
    paths = []
    for n in ids:  # 1-7: no sealed file; 8: a FIFO for a sealed file; 9-11: whole
        sealed, cache = tmp_path / "sealed" / f"s-{n}", tmp_path / "cache" / f"s-{n}"
        cache.mkdir(parents=True)
        sealed.parent.mkdir(exist_ok=True)
        if n == 8:
            os.mkfifo(sealed)
        elif n > 8:
            sealed.write_bytes(b"replica")
        paths.append((str(sealed), str(cache)))
    where = dict(zip(ids, paths, strict=True))
    line = await worker_sectors.faults_seen("J", where, list(ids), trio.CapacityLimiter(2))
    gone = [f"sector {n}: {tmp_path}/sealed/s-{n} does not exist" for n in range(1, 6)]
    assert line == (
        f"job J: the files of its faulty sectors, as this worker sees them: {'; '.join(gone)};"
        " and 3 more; sector 9: its files are here and readable, so the data did not check out"
        " against the comm_r, or the prover could not use it: the prover's log lines say which,"
        " where it writes any; 2 more not looked at"
    )
    assert "is a FIFO, not a regular file" not in line  # (one of the 3 counted, not named)
    line = await worker_sectors.faults_seen("J", where, [8, 10, 11], trio.CapacityLimiter(2))
    assert line.startswith(
        f"job J: the files of its faulty sectors, as this worker sees them: sector 8:"
        f" {tmp_path}/sealed/s-8 is a FIFO, not a regular file; sectors 10, 11: their files are"
        " here and readable, so the data"
    )


async def test_the_looks_at_faulty_sectors_start_no_thread_past_their_limit_on_a_stalled_mount(
    tmp_path, monkeypatch
):
    from damocles_ext.frontends import worker_sectors

    monkeypatch.setattr(worker_sectors, "STORE_LOOK_TIMEOUT", 0.5)
    began, stalled = threading.Event(), threading.Event()
    started = []

    def a_stalled_mount(pairs):  # (in a look's thread)
        started.append(pairs)
        began.set()
        stalled.wait(60)
        return [""] * len(pairs)

    monkeypatch.setattr(worker_sectors, "_file_problems", a_stalled_mount)
    where = {
        n: (f"{tmp_path}/store-{n}/sealed/s-{n}", f"{tmp_path}/store-{n}/cache/s-{n}")
        for n in (1, 2, 3)
    }
    threads = trio.CapacityLimiter(1)
    try:
        line = await worker_sectors.faults_seen("J", where, [1, 2, 3], threads)
        # One directory's thread took the one token and stalls; the others waited for it in
        # vain: each of the three says the storage did not answer; one thread was started.
        assert began.wait(30) and len(started) == 1
        for n in (1, 2, 3):
            assert f"sector {n}: {tmp_path}/store-{n}/sealed: the storage did not answer" in line
        again = await worker_sectors.faults_seen("J", where, [2], threads)  # the token still held
        assert len(started) == 1 and "did not answer" in again
    finally:
        stalled.set()
