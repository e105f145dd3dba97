"""The job store on a file system that fills up (the case a storage provider meets most): a real
tmpfs of 512 KiB, filled by a file and freed by removing it (root only: skipped without); and a
process over its file size limit."""

from __future__ import annotations

import logging
import resource
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import trio
import trio.lowlevel
from helpers.frontend import DEXT, dext_env, dext_run
from helpers.small_disk import SmallDisk, mounted_tmpfs
from test_coordinator import PROOF, heartbeat_body
from test_jobs_rules import make_input
from test_producer_outage import task

from damocles_ext.frontends import producer as producer_module
from damocles_ext.frontends.coordinator import Coordinator
from damocles_ext.jobs import rules
from damocles_ext.jobs.paths import StoreMap
from damocles_ext.jobs.rules import JobLimits
from damocles_ext.jobs.store import JobStore, StoreUnavailable, TrioJobStore


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with mounted_tmpfs(tmp_path / "disk") as disk:
        yield disk


def _empty_log(db: Path) -> None:
    """The store's write-ahead log emptied (as after a checkpoint): its next write must grow it."""
    with sqlite3.connect(db, isolation_level=None) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    conn.close()
    assert busy == 0 and Path(f"{db}-wal").stat().st_size == 0


async def test_heartbeats_refused_by_a_full_disk_take_back_no_job_once_it_has_room(small_disk):
    # Before, a sweep that read the store (the disk full refuses writes, not reads) ended the
    # outage the refused heartbeats began: after 15 s of heartbeats refused, worker-a's job was
    # taken back at the first sweep once the disk had room, at the cost of a try.
    now = [1_700_000_000.0]
    db = small_disk.path / "jobs.db"
    with JobStore.open(f"sqlite:///{db}") as store:
        jobs = TrioJobStore(store, clock=lambda: now[0])
        await jobs.create(make_input(proof_type=PROOF))
        [job] = await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
        coordinator = Coordinator(jobs, watch_clocks=False)
        _empty_log(db)
        small_disk.fill()
        beat = heartbeat_body([job.Id], "worker-a")
        for _ in range(8):  # 40 s of heartbeats refused, a sweep after each
            now[0] += 5
            status, answer = await coordinator.answer(beat)
            assert status == 200 and b"the file system that holds it is full" in answer, answer
            try:
                await coordinator.sweep_once()
            except StoreUnavailable:  # the disk full
                pass
        small_disk.free()
        now[0] += 1
        outcome = await coordinator.sweep_once()
        assert not any(isinstance(e, rules.TimedOut) for e in outcome.effects), outcome
        assert (await jobs.get(job.Id)).State == "running"
        # worker-a died with the disk full: its job is taken back a timeout after the disk had
        # room, though no worker's call wrote meanwhile (the sweep's own write said so).
        now[0] += 16
        outcome = await coordinator.sweep_once()
        assert rules.TimedOut(job.Id, "worker-a") in outcome.effects


async def test_calls_answered_without_a_write_do_not_end_a_full_disks_outage(small_disk):
    # A finish sent again for a job already finished (a worker retrying after a lost answer) is
    # answered on a full disk, and writes nothing: it ended the outage the refused heartbeats
    # began, and worker-a's job was taken back once the disk had room, at the cost of a try.
    now = [1_700_000_000.0]
    db = small_disk.path / "jobs.db"
    with JobStore.open(f"sqlite:///{db}") as store:
        jobs = TrioJobStore(store, clock=lambda: now[0])
        for seed in range(2):
            await jobs.create(make_input(proof_type=PROOF, seed=seed))
        [job] = await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
        [done] = await jobs.allocate(rules.AllocationSpec(), 1, "worker-b")
        await jobs.finish(done.Id, None, "no proof")
        coordinator = Coordinator(jobs, watch_clocks=False)
        _empty_log(db)
        small_disk.fill()
        again = msgspec.json.encode({"jsonrpc": "2.0", "method": "Venus.WdPoStFinishJob",
                                     "params": [done.Id, None, "no proof"], "id": 2})  # fmt: skip
        for _ in range(8):  # 40 s of heartbeats refused, each followed by a finish sent again
            now[0] += 5
            status, answer = await coordinator.answer(heartbeat_body([job.Id], "worker-a"))
            assert b"the file system that holds it is full" in answer, answer
            status, answer = await coordinator.answer(again)
            assert status == 200 and b'"result":null' in answer, answer  # answered, not written
        small_disk.free()
        now[0] += 1
        outcome = await coordinator.sweep_once()
        assert not any(isinstance(e, rules.TimedOut) for e in outcome.effects), outcome
        assert (await jobs.get(job.Id)).State == "running"


async def test_heartbeats_a_read_only_postgresql_refuses_take_back_no_job_once_it_writes(
    postgres_url,
):
    # The same on PostgreSQL: a server that answers reads and refuses writes (a standby after a
    # failover, default_transaction_read_only; a full disk is SQLSTATE 53100 likewise). Before,
    # its refusals were errors of a statement, heard as answers.
    import psycopg
    from sqlalchemy.engine import make_url

    database = make_url(postgres_url).database
    now = [1_700_000_000.0]
    with (
        JobStore.open(postgres_url) as store,
        psycopg.connect(postgres_url, autocommit=True) as admin,
    ):
        jobs = TrioJobStore(store, clock=lambda: now[0])
        await jobs.create(make_input(proof_type=PROOF))
        [job] = await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
        coordinator = Coordinator(jobs, watch_clocks=False)
        admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        store.engine.dispose()  # new sessions take it
        beat = heartbeat_body([job.Id], "worker-a")
        for _ in range(8):
            now[0] += 5
            status, answer = await coordinator.answer(beat)
            assert status == 200 and b"give the URL of the primary" in answer, answer
            try:
                await coordinator.sweep_once()
            except StoreUnavailable:
                pass
        admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        store.engine.dispose()
        now[0] += 1
        outcome = await coordinator.sweep_once()
        assert not any(isinstance(e, rules.TimedOut) for e in outcome.effects), outcome
        assert (await jobs.get(job.Id)).State == "running"


def test_commands_on_a_store_whose_disk_is_full_say_so_rather_than_blame_permissions(small_disk):
    # SQLite opens a WAL store by making its -shm file beside it, even to read: on a full disk
    # that is an I/O error. Before, `wdpost list` and `status --jobs` told to check that the
    # user may read the file, and a coordinator's start that its directory be writable.
    url = f"sqlite:///{small_disk.path}/jobs.db"
    with JobStore.open(url) as store:
        store.create(make_input(proof_type=PROOF), 1_700_000_000.0)
    small_disk.fill()
    for command in (["wdpost", "list"], ["status"], ["coordinator", "--listen", "127.0.0.1:0"]):
        result = dext_run(*command, "--jobs", url, timeout=30)
        said = result.stderr.decode()
        assert result.returncode in (1, 2), (command, said)
        assert "Traceback" not in said and "by this user" not in said, said
        assert "the file system that holds it is full" in said, said
        assert "free some space there" in said, said
    small_disk.free()
    result = dext_run("wdpost", "list", "--jobs", url)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2  # the header and the job


async def test_serve_says_a_full_disk_once_while_its_waiting_requests_reads_are_answered(
    small_disk, monkeypatch, caplog
):
    # Before, each look of a waiting request (a read, answered on a full disk) ended the outage
    # that the refused creations of the new requests began: a warning and an "answers again"
    # line for every refused creation, for as long as the disk stayed full.
    caplog.set_level(logging.INFO, logger="damocles_ext.producer")
    monkeypatch.setattr(producer_module, "FIRST_BACKOFF", 0.01)
    monkeypatch.setattr(producer_module, "MAX_BACKOFF", 0.05)
    root = str(small_disk.path / "sectors")
    url = f"sqlite:///{small_disk.path}/jobs.db"
    with JobStore.open(url, limits=JobLimits(poll_interval=0.01)) as store:
        jobs = TrioJobStore(store)
        producer = producer_module.JobProducer(jobs, StoreMap({"a": root}))
        create, refused, made = jobs.create, [0], [0]
        one_made, many_refused, three_made = trio.Event(), trio.Event(), trio.Event()

        async def counted(*args, **kwargs):  # the real creation, counted
            try:
                job, new = await create(*args, **kwargs)
            except StoreUnavailable:
                refused[0] += 1
                if refused[0] == 30:
                    many_refused.set()
                raise
            made[0] += new
            if made[0] == 1:
                one_made.set()
            if made[0] == 4:
                three_made.set()  # (and the one made before the disk was full)
            return job, new

        jobs.create = counted
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(producer.submit, task(root, 1000))
                await one_made.wait()
                _empty_log(small_disk.path / "jobs.db")
                small_disk.fill()
                for miner in (1001, 1002, 1003):  # new: refused while the disk is full
                    nursery.start_soon(producer.submit, task(root, miner))
                await many_refused.wait()
                small_disk.free()
                await three_made.wait()
                nursery.cancel_scope.cancel()
    said = [r.getMessage() for r in caplog.records if "the job store" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("the job store failed (job ") and "is full" in said[0], said
    assert said[1].startswith("the job store answers again, after "), said


def test_a_write_past_the_file_size_limit_says_what_may_be_wrong_not_permissions(tmp_path):
    # A real `wdpost remove` under RLIMIT_FSIZE 0 (systemd's LimitFSIZE; a quota is the same
    # I/O error to SQLite): before, "cannot open the job store ...; check that the file and its
    # directory are writable by this user".
    url = f"sqlite:///{tmp_path}/jobs.db"

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))

    with JobStore.open(url) as store:  # held open: its -shm file stays, as under a coordinator
        job, _ = store.create(make_input(proof_type=PROOF), 1_700_000_000.0)
        result = subprocess.run(
            [*DEXT, "wdpost", "remove", "--jobs", url, job.Id],
            env=dext_env(), preexec_fn=limited, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert store.get(job.Id) is not None
    said = result.stderr.decode()
    assert result.returncode == 1, said
    assert "Traceback" not in said and "writable by this user" not in said, said
    assert f"the job store {url} met an I/O error (disk I/O error, SQLITE_IOERR_WRITE)" in said
    assert "over its file size limit (ulimit -f, systemd's LimitFSIZE)" in said, said
    # SQLite writes at COMMIT: no connection was lost there, and nothing was stored.
    assert "connection was lost" not in said and "may have been stored" not in said, said
