"""A SQLite store whose file is deleted or replaced under a running process (an operator's `rm`,
a restore from a backup with `mv`): the process notices at its next store operation, says so
once at ERROR, and stores nothing more in a file no command sees (sqlite_file.py, JOBS.md)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
from test_jobs_rules import make_input

from damocles_ext.jobs import rules
from damocles_ext.jobs.store import JobStore, StoreLost, StoreUnavailable

T0 = 1_700_000_000.0


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def store_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name == "damocles_ext.jobs.store"
    ]


def test_a_deleted_store_file_is_noticed_at_the_next_operation_and_nothing_more_is_stored(
    tmp_path, caplog
):
    path = tmp_path / "jobs.db"
    with JobStore.open(url_of(path)) as store:
        job, _ = store.create(make_input(seed=1), T0)
        os.unlink(path)
        with pytest.raises(StoreLost) as lost:
            store.create(make_input(seed=2), T0)  # was stored in the unlinked file
        assert f"its file {str(path)!r} was deleted" in str(lost.value)
        assert "restart it to open the file now at that path" in str(lost.value)
        assert isinstance(lost.value, StoreUnavailable) and lost.value.exit_code == 1
        # Every operation after it, reads too; and no new empty store is made at the path.
        for call in (
            lambda: store.get(job.Id),
            lambda: store.allocate(rules.AllocationSpec(), 1, "w", T0),
            lambda: store.sweep(T0),
            lambda: store.summary(T0),
        ):
            with pytest.raises(StoreLost):
                call()
        assert not path.exists()
    [error] = store_errors(caplog)
    assert f"its file {str(path)!r} was deleted" in error
    assert f"remove {path}-wal and {path}-shm if the old file left them" in error


def test_a_store_file_replaced_by_a_backup_is_noticed_and_the_backup_is_read_as_it_is(
    tmp_path, caplog
):
    path = tmp_path / "jobs.db"
    with JobStore.open(url_of(tmp_path / "backup.db")) as backup:
        kept, _ = backup.create(make_input(seed=9), T0)
    with JobStore.open(url_of(path)) as store:
        for seed in range(1, 4):
            store.create(make_input(seed=seed), T0)
        os.replace(tmp_path / "backup.db", path)  # the restore, the process still running
        with pytest.raises(StoreLost, match="was replaced by another file"):
            store.create(make_input(seed=4), T0)
        # A process that opens the path now reads the backup, not the old store's last writes
        # that its -wal beside the path still held.
        with JobStore.open(url_of(path), create=False) as reopened:
            assert reopened.list_jobs() == [kept]
        with pytest.raises(StoreLost):
            store.list_jobs()
    assert len(store_errors(caplog)) == 1


def test_a_store_whose_file_stays_goes_on_and_no_connection_opens_another_file(tmp_path):
    path = tmp_path / "jobs.db"
    with JobStore.open(url_of(path), pool_size=1) as store:
        store.create(make_input(seed=1), T0)
        store.engine.dispose()  # a connection opened again later, as a pool does
        assert len(store.list_jobs()) == 1
        os.replace(path, tmp_path / "moved.db")
        store.engine.dispose()
        # The pool's next connection would have made a new empty file at the path.
        with pytest.raises(StoreLost, match="was deleted"):
            store.engine.connect()
        assert not path.exists()


# --- serve --jobs ---------------------------------------------------------------------------------


async def test_serve_answers_its_waiting_and_its_new_requests_at_once_once_its_file_is_deleted(
    tmp_path,
):
    from test_producer import send_until_created, start_serve, stop, task_in_store_a, window_task

    path = tmp_path / "jobs.db"
    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, url_of(path), "--store", f"a={root}",
                              "--poll-interval", "0.2")  # fmt: skip
        waiting = await send_until_created(m, task, job_id)
        os.unlink(path)
        # Before: its job was looked at in the unlinked file until a worker finished it there,
        # which no worker could (a coordinator opening the path finds no such job).
        with trio.fail_after(30):
            answer = await m.wait(waiting)
        said = f"job store {url_of(path)}: its file {str(path)!r} was deleted"
        assert f"job {job_id}: not proved: {said}" in answer.err_msg
        # A new request is answered at once too, and no job is made for it anywhere.
        with trio.fail_after(30):
            answer = await m.request(window_task(root, miner=1001))
        assert said in answer.err_msg
        assert not path.exists()
        errors = [line for line in m.log if " ERROR damocles_ext.jobs.store: " in line]
        assert len(errors) == 1 and said in errors[0], "\n".join(m.log)
        await stop(m)
