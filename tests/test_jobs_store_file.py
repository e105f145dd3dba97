"""A SQLite store whose file is deleted or replaced under a running process (an operator's `rm`,
a restore from a backup with `mv`): the process notices at its next store operation, says so
once at ERROR, and stores nothing more in a file no command sees (sqlite_file.py, JOBS.md)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from test_jobs_rules import make_input

from damocles_ext.api import open_job_producer
from damocles_ext.jobs import rules
from damocles_ext.jobs.database import StoreConfigError
from damocles_ext.jobs.store import JobStore, StoreLost, StoreUnavailable, TrioJobStore

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


def test_a_store_given_through_a_symlink_names_the_log_files_beside_its_target(tmp_path, caplog):
    target, link = tmp_path / "data" / "jobs.db", tmp_path / "jobs.db"
    target.parent.mkdir()
    link.symlink_to(target)
    with JobStore.open(url_of(link)) as store:
        store.create(make_input(seed=1), T0)
        assert (tmp_path / "data" / "jobs.db-wal").exists()  # SQLite's, beside the target
        store.list_jobs()  # the file at the path is the one opened: no false alarm
        os.unlink(target)
        with pytest.raises(StoreLost, match="was deleted"):
            store.list_jobs()
    [error] = store_errors(caplog)
    # Before: it named {link}-wal and {link}-shm, which never existed.
    assert f"remove {target}-wal and {target}-shm if the old file left them" in error


def test_a_store_whose_directory_was_moved_and_replaced_by_a_file_is_noticed(tmp_path):
    path = tmp_path / "store" / "jobs.db"
    path.parent.mkdir()
    with JobStore.open(url_of(path)) as store:
        store.create(make_input(seed=1), T0)
        os.rename(tmp_path / "store", tmp_path / "moved")
        (tmp_path / "store").write_text("not a directory")
        # Before: taken for a directory this user may not enter, and the old file used on.
        with pytest.raises(StoreLost, match="was deleted"):
            store.list_jobs()


def test_a_write_in_progress_when_the_file_is_replaced_does_not_overwrite_the_backup(tmp_path):
    from damocles_ext.jobs import statements
    from damocles_ext.jobs.rows import row_values

    path = tmp_path / "jobs.db"
    with JobStore.open(url_of(tmp_path / "backup.db")) as backup:
        kept, _ = backup.create(make_input(seed=9), T0)
    with JobStore.open(url_of(path), busy_timeout=0.2) as store:
        store.create(make_input(seed=1), T0)
        # Another thread's call, in its transaction when the store is found lost.
        with store.engine.connect() as busy:
            busy.begin()
            made = rules.new_job(make_input(seed=2), T0)
            busy.execute(statements.INSERT_JOB, row_values(made))
            os.replace(tmp_path / "backup.db", path)
            with pytest.raises(StoreLost, match="was replaced by another file"):
                store.list_jobs()
            busy.commit()
        # Before: that connection stayed open (in a pool no longer used) with the -wal beside
        # the path, and its commit in it: the backup was read as the old store.
        with JobStore.open(url_of(path), create=False) as reopened:
            assert reopened.list_jobs() == [kept]


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


async def test_an_idle_producer_notices_a_deleted_store_file_and_empties_its_log_within_its_check(
    tmp_path, mock_clock, caplog
):
    from damocles_ext.frontends.producer import FILE_CHECK_EVERY, JobProducer
    from damocles_ext.jobs.paths import StoreMap

    path = tmp_path / "jobs.db"
    with JobStore.open(url_of(path)) as store:
        store.create(make_input(seed=1), T0)  # a request answered before: its log beside the path
        assert (tmp_path / "jobs.db-wal").stat().st_size > 0
        producer = JobProducer(TrioJobStore(store), StoreMap({}))
        done = threading.Event()

        async def watch() -> None:
            await producer.watch_store_file()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            os.unlink(path)
            # Before: nothing until the next request, however long serve stayed idle.
            mock_clock.jump(FILE_CHECK_EVERY)
            # In real time (the clock stands still): the check runs in a thread.
            assert await trio.to_thread.run_sync(done.wait, 30)
    [error] = store_errors(caplog)
    assert f"its file {str(path)!r} was deleted" in error
    assert (tmp_path / "jobs.db-wal").stat().st_size == 0


async def test_an_idle_serve_says_its_store_file_was_deleted_without_a_request(tmp_path):
    from test_producer import (
        finish_and_expect_proofs,
        send_until_created,
        start_serve,
        stop,
        task_in_store_a,
    )

    from damocles_ext.frontends.producer import FILE_CHECK_EVERY

    path = tmp_path / "jobs.db"
    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        # Its check every 0.5 s (--store-file-check) rather than every 10 s (FILE_CHECK_EVERY,
        # the default): said within the bound below, half of that, only if serve honours it.
        m = await start_serve(nursery, url_of(path), "--store", f"a={root}",
                              "--poll-interval", "0.2", "--store-file-check", "0.5s")  # fmt: skip
        request = await send_until_created(m, task, job_id)
        await finish_and_expect_proofs(m, url_of(path), job_id, request)
        os.unlink(path)  # serve idle: no request in flight
        with trio.fail_after(FILE_CHECK_EVERY / 2):
            await m.wait_log(f"its file {str(path)!r} was deleted")
            await m.wait_log("the old store's log emptied")
        assert (tmp_path / "jobs.db-wal").stat().st_size == 0
        await stop(m)


class StoreErrorSaid(logging.Handler):
    """Sets `said` (a threading.Event: the check logs from its thread) at the store's ERROR."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.said = threading.Event()
        self.messages: list[str] = []  # what it said (not through caplog: see the test below)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.said.set()


async def test_an_idle_api_job_producer_says_its_store_file_was_deleted_within_its_check(
    tmp_path, mock_clock
):
    from damocles_ext.api import open_job_producer
    from damocles_ext.frontends.producer import FILE_CHECK_EVERY

    path = tmp_path / "jobs.db"
    handler = StoreErrorSaid()
    logging.getLogger("damocles_ext.jobs.store").addHandler(handler)
    try:
        async with open_job_producer(url_of(path)):
            await trio.testing.wait_all_tasks_blocked()
            os.unlink(path)  # the producer idle: no submit in flight
            # Before: nothing until its next submit, however long it stayed idle (serve --jobs
            # said it within its check).
            mock_clock.jump(FILE_CHECK_EVERY)
            # In real time (the clock stands still): the check runs in a thread.
            assert await trio.to_thread.run_sync(handler.said.wait, 30)
    finally:
        logging.getLogger("damocles_ext.jobs.store").removeHandler(handler)
    # The handler's own record of it: caplog missed this thread's record in one full run (a
    # root handler left by another test's logging set-up, on a closed stream).
    [error] = handler.messages
    assert f"its file {str(path)!r} was deleted" in error


# --- the coordinator --------------------------------------------------------------------------------


async def test_the_coordinator_stops_with_exit_1_saying_why_once_its_store_file_is_replaced(
    tmp_path,
):
    from helpers.frontend import CoordinatorProcess
    from test_coordinator import Client

    path = tmp_path / "jobs.db"
    with JobStore.open(url_of(tmp_path / "backup.db")) as backup:
        backup.create(make_input(seed=9, proof_type="StackedDrgWindow2KiBV1_2"), T0)
    coordinator = CoordinatorProcess(url_of(path))
    async with trio.open_nursery() as nursery:
        await coordinator.start(nursery)
        assert coordinator.proc is not None
        client = Client(await trio.open_tcp_stream("127.0.0.1", coordinator.port))
        spec = {"AllowedMiners": None, "AllowedProofTypes": None}
        status, answer = await client.call("Venus.WdPoStAllocateJobs", spec, 1, "w1")
        assert status == 200 and answer["result"] == []
        os.replace(tmp_path / "backup.db", path)  # a restore while it runs
        # Before: it went on giving jobs from the old file (none), never the backup's.
        status, answer = await client.call("Venus.WdPoStAllocateJobs", spec, 1, "w1")
        said = f"its file {str(path)!r} was replaced by another file"
        assert status == 200 and said in answer["error"]["message"], answer
        with trio.fail_after(30):
            assert await coordinator.proc.wait() == 1
    stderr = coordinator.stderr.decode()
    assert f"damocles-ext coordinator: error: job store {url_of(path)}: {said}" in stderr, stderr
    assert "Traceback" not in stderr
    # Started again (as systemd does), it serves the backup as it was restored.
    async with trio.open_nursery() as nursery:
        await coordinator.start(nursery)
        client = Client(await trio.open_tcp_stream("127.0.0.1", coordinator.port))
        status, answer = await client.call("Venus.WdPoStAllocateJobs", spec, 1, "w1")
        assert status == 200 and len(answer["result"]) == 1, answer
        coordinator.stop()


async def test_a_coordinator_notices_a_deleted_store_file_at_its_next_sweep_without_a_call(
    tmp_path, mock_clock
):
    from damocles_ext.frontends.coordinator import Coordinator

    path = tmp_path / "jobs.db"
    told, said = threading.Event(), []

    def lost(exc: StoreLost) -> None:
        said.append(str(exc))
        told.set()

    with JobStore.open(url_of(path)) as store:
        coordinator = Coordinator(TrioJobStore(store), watch_clocks=False)
        coordinator.on_store_lost = lost
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.sweep_forever)  # its first pass is done
            os.unlink(path)
            mock_clock.jump(rules.sweep_every(store.limits))  # the next pass
            # In real time (the clock stands still): the pass runs in a thread.
            assert await trio.to_thread.run_sync(told.wait, 30)
            nursery.cancel_scope.cancel()
    assert len(said) == 1 and f"its file {str(path)!r} was deleted" in said[0]


@pytest.mark.parametrize("extra", [[], ["--metrics", "127.0.0.1:0"]], ids=["rpc", "metrics"])
def test_a_coordinator_whose_store_file_is_deleted_as_it_starts_stops_with_exit_1_saying_why(
    extra, tmp_path, monkeypatch, capsys, caplog
):
    import http.client
    import json

    from damocles_ext import cli
    from damocles_ext.commands import coordinator as command
    from damocles_ext.frontends import coordinator as frontend

    path = tmp_path / "jobs.db"
    servers: list[frontend.CoordinatorServer] = []

    class Server(frontend.CoordinatorServer):  # the port it bound, for the worker's call
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)

    # Its first sweep pass (in its thread) held until a worker's call was answered: the call
    # finds the store lost while the command still starts its sweep.
    first_pass, call_answered = threading.Event(), threading.Event()
    sweep = JobStore.sweep

    def held_first_sweep(self, *args, **kwargs):
        if not first_pass.is_set():
            first_pass.set()
            call_answered.wait(30)
        return sweep(self, *args, **kwargs)

    monkeypatch.setattr(frontend, "CoordinatorServer", Server)
    monkeypatch.setattr(JobStore, "sweep", held_first_sweep)
    monkeypatch.setattr(command, "setup_from_args", lambda args: None)  # caplog keeps the logs
    answers: list[dict] = []

    def worker() -> None:
        try:
            assert first_pass.wait(30)
            os.unlink(path)
            rpc = http.client.HTTPConnection("127.0.0.1", servers[0].port, timeout=30)
            body = {"jsonrpc": "2.0", "method": "Venus.WdPoStAllocateJobs", "id": 1,
                    "params": [{"AllowedMiners": None, "AllowedProofTypes": None}, 1, "w1"]}  # fmt: skip
            rpc.request("POST", "/rpc/v0", json.dumps(body), {"Content-Type": "application/json"})
            answers.append(json.loads(rpc.getresponse().read()))
            rpc.close()
        finally:
            call_answered.set()

    calling = threading.Thread(target=worker)
    calling.start()
    try:
        # Before: trio's "child exited without calling task_status.started()" (the sweep
        # cancelled in its first pass), a traceback and no word of the store.
        code = cli.main(["coordinator", "--jobs", url_of(path), "--listen", "127.0.0.1:0", *extra])
    finally:
        call_answered.set()
        calling.join(30)
    said = f"its file {str(path)!r} was deleted"
    assert said in answers[0]["error"]["message"], answers
    assert code == 1
    err = capsys.readouterr().err
    assert f"damocles-ext coordinator: error: job store {url_of(path)}: {said}" in err, err
    stopping = [r.getMessage() for r in caplog.records if r.name == "damocles_ext.coordinator"
                and r.levelno == logging.ERROR]  # fmt: skip
    assert len(stopping) == 1 and stopping[0].startswith("stopping: ") and said in stopping[0]
    assert len(store_errors(caplog)) == 1


def test_the_metrics_of_a_store_whose_file_was_deleted_say_the_store_is_down(tmp_path, caplog):
    from prometheus_client import generate_latest

    from damocles_ext.jobs.metrics import JobMetrics

    path = tmp_path / "jobs.db"
    with JobStore.open(url_of(path)) as store:
        metrics = JobMetrics(store, process_metrics=False)
        assert b"damocles_ext_jobs_store_up 1.0" in generate_latest(metrics.registry)
        os.unlink(path)
        scraped = generate_latest(metrics.registry).decode()
    assert "damocles_ext_jobs_store_up 0.0" in scraped and "damocles_ext_jobs{" not in scraped
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"its file {str(path)!r} was deleted" in w for w in warned), warned


def another_users_place(tmp_path: Path) -> Path:
    """A directory uid 65534 owns and anyone may write to (their /tmp/x, made before ours)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(0o777)
    os.chown(theirs, 65534, 65534)
    return theirs


def test_a_coordinator_refuses_a_store_another_user_could_replace_with_exit_2(tmp_path):
    # Before: it made the store there; the other user replaced the file with one of their own
    # (jobs marked finished with the faults or proofs they chose), and the coordinator started
    # again served it to damocles-manager.
    from helpers.frontend import dext_run

    path = another_users_place(tmp_path) / "jobs.db"
    result = dext_run("coordinator", "--jobs", url_of(path), "--listen", "127.0.0.1:0")
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert (
        f"the job store {url_of(path)} could be changed by another user: directory"
        f" {path.parent} is owned by uid 65534, not by us or root" in err
    ), err
    assert "put it where only this user or root can change it" in err and "Traceback" not in err
    assert not path.exists()


def test_a_served_store_file_every_user_may_write_is_refused_and_an_operator_may_still_read_it(
    tmp_path,
):
    path = tmp_path / "jobs.db"
    with JobStore.open(url_of(path), writable=True) as store:
        store.create(make_input(seed=1), T0)
    path.chmod(0o666)
    with pytest.raises(StoreConfigError) as refused:
        JobStore.open(url_of(path), writable=True)  # the coordinator's, the producer's
    assert f"the file {path} (mode 0666) may be written by every user" in str(refused.value)
    assert "chmod o-w" in str(refused.value)
    with JobStore.open(url_of(path), create=False, read_only=True) as store:  # wdpost list
        assert len(store.list_jobs()) == 1

    async def producer() -> None:
        async with open_job_producer(url_of(path)):
            pass

    with pytest.raises(StoreConfigError, match=r"\(mode 0666\) may be written by every user"):
        trio.run(producer)  # the API's producer, as serve's
    path.chmod(0o644)
    JobStore.open(url_of(path), writable=True).close()


def test_a_served_store_in_a_sticky_shared_directory_is_taken_when_the_file_is_ours(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp: nobody else may rename our file away
    JobStore.open(url_of(shared / "jobs.db"), writable=True).close()
    if os.geteuid() == 0:
        os.chown(shared / "jobs.db", 65534, 65534)  # theirs, in /tmp: they could replace it
        with pytest.raises(StoreConfigError, match="owned by uid 65534, not by us or root"):
            JobStore.open(url_of(shared / "jobs.db"), writable=True)


@pytest.mark.parametrize("theirs", ["jobs.db", "jobs.db-wal", "jobs.db-shm", "jobs.db-journal"])
def test_a_served_store_whose_file_or_log_another_user_owns_is_refused(tmp_path, theirs):
    # Its owner could rewrite the file; a -wal or -journal another user put beside it (in /tmp,
    # say) is replayed into the store as SQLite opens it.
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777 if theirs != "jobs.db" else 0o755)
    JobStore.open(url_of(shared / "jobs.db"), writable=True).close()
    (shared / theirs).touch()
    os.chown(shared / theirs, 65534, 65534)
    with pytest.raises(StoreConfigError) as refused:
        JobStore.open(url_of(shared / "jobs.db"), writable=True)
    assert f"{shared / theirs} is owned by uid 65534, not by us or root" in str(refused.value)
