"""A job's row locked by a PostgreSQL session that is not the store's and stays alive (an
operator's psql left inside BEGIN after a SELECT ... FOR UPDATE or an UPDATE, a change by hand):
the store's statements wait for it at most the lock_timeout each of its sessions sets
(pg_session.py), so a call fails naming that session instead of leaving a thread blocked for as
long as the lock is held. On the session's real server; the holder is a psycopg connection of
the test's own."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
import trio
from test_jobs_migration import a_role
from test_jobs_rules import make_input

from damocles_ext.jobs import pg_session, rules
from damocles_ext.jobs import workers as worker_rows
from damocles_ext.jobs.database import jobs, workers
from damocles_ext.jobs.model import READY, RUNNING
from damocles_ext.jobs.store import JobStore, StoreUnavailable, TrioJobStore

T0 = 1_700_000_000.0
ANY = rules.AllocationSpec()
HOLDER = "operator-psql"


@pytest.fixture
def pg(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobStore]:
    """A store whose sessions wait 200 ms for a lock (the default is seconds)."""
    monkeypatch.setitem(pg_session.PG_SESSION_SETTINGS, "lock_timeout", "200ms")
    with JobStore.open(postgres_url) as s:
        yield s


@pytest.fixture
def holder(postgres_url: str) -> Iterator[psycopg.Connection]:
    """A session that is not the store's, as an operator's psql: not in autocommit, so what it
    locks stays locked until it commits or rolls back (or ends)."""
    with psycopg.connect(postgres_url, application_name=HOLDER) as conn:
        yield conn
        conn.rollback()


def lock(holder: psycopg.Connection, job_id: str) -> None:
    """The job's row read FOR UPDATE by `holder`, left inside its transaction."""
    holder.execute(f"SELECT * FROM {jobs.name} WHERE id = %s FOR UPDATE", [job_id])


def gone_before_named(store: JobStore, holder: psycopg.Connection) -> None:
    """`holder` ends its transaction as `store` looks for who held the lock it waited for."""

    def end_the_holder_first(_conn, _cursor, statement, *_args):
        if "pg_stat_activity" in statement:
            holder.rollback()

    sa.event.listen(store.engine, "before_cursor_execute", end_the_holder_first)


def waiting_on_locks(postgres_url: str) -> list[tuple[int, str]]:
    """The sessions of the test's database waiting for a lock now (pid, application_name)."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchall()


def test_a_job_another_session_keeps_locked_fails_its_call_within_the_lock_timeout_naming_it(
    pg, holder, postgres_url
):
    # Before, the store's statement waited for as long as the lock was held: the trio caller
    # gave up after its call timeout, but its thread stayed blocked, holding a slot of the
    # store's small thread limiter, so a few such calls stalled every call of the process.
    job, _ = pg.create(make_input(seed=1), T0)
    other, _ = pg.create(make_input(seed=2), T0)
    [running] = pg.allocate(ANY, 1, "w1", T0 + 1)
    assert running.Id == job.Id
    lock(holder, job.Id)

    async def main() -> tuple[StoreUnavailable, object]:
        store = TrioJobStore(pg, threads=1, call_timeout=5.0)
        with pytest.raises(StoreUnavailable) as failed:
            await store.reset(job.Id)
        # Nothing of ours waits on the lock any more, and the store's one thread is free.
        assert waiting_on_locks(postgres_url) == []
        return failed.value, await store.get(other.Id)

    try:
        error, read = trio.run(main)
    finally:
        holder.rollback()  # a thread left blocked (before) is let go before the store closes
    assert read == other
    said = str(error)
    assert f"reset of job {job.Id} waited for the lock on a job's row longer than" in said
    assert "lock_timeout (200ms)" in said and "at each of 2 tries" in said
    assert f"pid {holder.info.backend_pid}" in said and HOLDER in said
    assert "idle in transaction" in said and "FOR UPDATE" in said
    assert "ROLLBACK" in said and f"pg_terminate_backend({holder.info.backend_pid})" in said
    assert pg.get(job.Id).State == RUNNING  # nothing of the reset stored

    # The holder gone, the next call lands.
    reset = pg.reset(job.Id, T0 + 2)
    assert (reset.State, reset.WorkerName) == (READY, "")
    assert waiting_on_locks(postgres_url) == []


def test_a_lock_wait_past_the_lock_timeout_is_tried_once_more_and_lands_if_freed_meanwhile(
    pg, holder, caplog
):
    # One of our own sessions may hold a row longer than usual (a sweep pass over many jobs on
    # a slow link): the operation is run once more. A holder still there at the second try is
    # not waited for again: each wait holds a thread of the store.
    job, _ = pg.create(make_input(seed=1), T0)
    pg.allocate(ANY, 1, "w1", T0 + 1)
    lock(holder, job.Id)
    tries: list[str] = []

    def count_locking_reads(_conn, _cursor, statement, *_args):
        if "FOR UPDATE" in statement and jobs.name in statement:
            tries.append(statement)
            if len(tries) == 2 and free[0]:
                holder.rollback()

    free = [True]

    sa.event.listen(pg.engine, "before_cursor_execute", count_locking_reads)
    with caplog.at_level(logging.INFO, "damocles_ext.jobs.store"):
        reset = pg.reset(job.Id, T0 + 2)
    assert len(tries) == 2 and (reset.State, reset.WorkerName) == (READY, "")
    assert (
        "reset failed at try 1 of 2" in caplog.text
        and "of 4" not in caplog.text
        and "SQLSTATE 55P03" in caplog.text
    )

    # Held at both tries: the error after the second, not two more waits.
    pg.allocate(ANY, 1, "w1", T0 + 3)
    lock(holder, job.Id)
    tries.clear()
    free[0] = False
    with pytest.raises(StoreUnavailable, match="at each of 2 tries"):
        pg.reset(job.Id, T0 + 4)
    assert len(tries) == 2


def test_a_holder_gone_before_it_could_be_named_is_told_how_to_find_one(pg, holder):
    # The holder ended its transaction between the last wait and the look at who held it:
    # the error says how to find one while a call waits, rather than name nobody.
    job, _ = pg.create(make_input(seed=1), T0)
    lock(holder, job.Id)
    gone_before_named(pg, holder)
    with pytest.raises(StoreUnavailable) as failed:
        pg.remove(job.Id, T0 + 1)
    said = str(failed.value)
    assert f"remove of job {job.Id}" in said and "has gone since" in said
    assert "pg_blocking_pids(pid)" in said and "pg_terminate_backend(PID)" in said
    assert pg.get(job.Id) == job


def test_the_schema_lock_waits_as_the_open_says_not_as_the_sessions_lock_timeout(pg, postgres_url):
    # Opening the store waits for the schema lock open_timeout when given, else as long as
    # the server's own lock_timeout (the role's, the database's, the URL's): the one each
    # session of the store sets for its calls (200 ms here) must not cut that wait short.
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        server = conn.execute("SHOW lock_timeout").fetchone()
    seen: list[str] = []

    def show_after_the_schema_lock(_conn, cursor, statement, *_args):
        if "pg_advisory_xact_lock" in statement:
            seen.append(cursor.connection.execute("SHOW lock_timeout").fetchone()[0])

    sa.event.listen(pg.engine, "after_cursor_execute", show_after_the_schema_lock)
    pg.migrate()
    pg.migrate(lock_timeout=2.5)
    with pg.engine.connect() as conn:  # the store's calls, outside the migration's transaction
        seen.append(conn.execute(sa.text("SHOW lock_timeout")).scalar_one())
    assert server is not None and seen == [server[0], "2500ms", "200ms"]


def test_the_session_holding_the_jobs_row_is_named_exactly_not_others_holding_other_rows(
    pg, holder, postgres_url
):
    # Before, every session in a transaction holding a write lock on the store's tables was
    # named, and told to be terminated: here the operator's other psql, which holds another job.
    job, _ = pg.create(make_input(seed=1), T0)
    other, _ = pg.create(make_input(seed=2), T0)
    with psycopg.connect(postgres_url, application_name="bystander") as bystander:
        lock(bystander, other.Id)  # in its transaction before the holder's
        lock(holder, job.Id)
        bystanding = bystander.info.backend_pid
        with pytest.raises(StoreUnavailable) as failed:
            pg.reset(job.Id, T0 + 1)
        said = str(failed.value)
        bystander.rollback()
    pid = holder.info.backend_pid
    assert f"The lock is held by pid {pid} (user" in said and HOLDER in said
    assert f"pid {bystanding}" not in said and "bystander" not in said
    assert f"pg_terminate_backend({pid})" in said and "pg_terminate_backend(PID)" not in said


def test_a_damocles_ext_session_holding_the_row_is_said_to_be_slow_not_to_be_terminated(pg):
    # One of our own sessions (a sweep pass, a batch of remove_all, a slow COMMIT) is slow, not
    # left behind by someone: terminating it is not the advice.
    job, _ = pg.create(make_input(seed=1), T0)
    with JobStore(str(pg.url)) as ours, ours._transaction() as conn:
        ours._read(conn, job.Id)  # FOR UPDATE, its transaction left open
        with pytest.raises(StoreUnavailable) as failed:
            pg.reset(job.Id, T0 + 1)
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    said = str(failed.value)
    assert f"The lock is held by a damocles-ext session (a slow server or disk?), pid {pid}" in said
    assert "pg_terminate_backend" not in said


def test_a_vacuum_or_analyze_on_the_store_is_not_taken_for_the_holder(pg, holder, postgres_url):
    # A session that holds only VACUUM's or ANALYZE's lock on the store's tables (SHARE UPDATE
    # EXCLUSIVE, which no row lock waits for; autovacuum's are not client sessions at all) was
    # named as a holder, and told to be terminated, when the real one had gone.
    job, _ = pg.create(make_input(seed=1), T0)
    with psycopg.connect(postgres_url, application_name="analyzing") as analyzing:
        analyzing.execute(f"LOCK TABLE {jobs.name} IN SHARE UPDATE EXCLUSIVE MODE")
        analyzer = analyzing.info.backend_pid
        lock(holder, job.Id)
        gone_before_named(pg, holder)
        with pytest.raises(StoreUnavailable) as failed:
            pg.reset(job.Id, T0 + 1)
        analyzing.rollback()
    said = str(failed.value)
    assert "analyzing" not in said and f"pid {analyzer}" not in said
    assert "has gone since" in said and "pg_blocking_pids(pid)" in said


def test_a_wait_for_a_lock_on_the_whole_jobs_table_names_its_holder_without_a_third_wait(
    pg, holder
):
    # A lock on the whole table (ALTER TABLE, LOCK TABLE, VACUUM FULL): a call on one job then
    # read that job's xmax to name the holder of its row, which waited behind the table's lock
    # for a third lock_timeout and failed unsaid; the error said the holder had gone since.
    job, _ = pg.create(make_input(seed=1), T0)
    waits: list[str] = []

    def count_lock_waits(context):
        if getattr(context.original_exception, "sqlstate", None) == "55P03":
            waits.append(context.statement)

    sa.event.listen(pg.engine, "handle_error", count_lock_waits)
    holder.execute(f"LOCK TABLE {jobs.name} IN ACCESS EXCLUSIVE MODE")
    try:
        with pytest.raises(StoreUnavailable) as failed:
            pg.reset(job.Id, T0 + 1)
    finally:
        holder.rollback()
    said = str(failed.value)
    assert len(waits) == 2  # the reset's two tries, and nothing more
    assert f"reset of job {job.Id} waited for a lock longer than its lock_timeout (200ms)" in said
    assert f"pid {holder.info.backend_pid}" in said and HOLDER in said and "LOCK TABLE" in said
    assert "gone since" not in said


def test_the_sessions_guessed_at_hold_the_table_waited_for_not_another_nor_its_namesake(
    pg, holder, postgres_url
):
    # A row locked inside a savepoint names no holder exactly (its xmax is the savepoint's), so
    # the sessions holding a lock on the table are named as ones that may hold it. Before, those
    # holding a lock on any of the store's tables were (a worker's row), and on any table of the
    # same name in another schema of the database (another store's).
    job, _ = pg.create(make_input(seed=1), T0)
    pg.allocate(ANY, 1, "w1", T0 + 1)
    with (
        psycopg.connect(postgres_url, application_name="on-workers") as on_workers,
        psycopg.connect(postgres_url, application_name="namesake") as namesake,
    ):
        namesake.execute(f"CREATE SCHEMA other; CREATE TABLE other.{jobs.name} (id text)")
        namesake.commit()
        others = [on_workers.info.backend_pid, namesake.info.backend_pid]
        on_workers.execute(f"SELECT * FROM {workers.name} WHERE worker = 'w1' FOR UPDATE")
        namesake.execute(f"LOCK TABLE other.{jobs.name} IN ROW EXCLUSIVE MODE")
        holder.execute("SAVEPOINT inside")
        lock(holder, job.Id)
        try:
            with pytest.raises(StoreUnavailable) as failed:
                pg.reset(job.Id, T0 + 2)
        finally:
            on_workers.rollback()
            namesake.rollback()
    said = str(failed.value)
    assert "one of which may hold it" in said
    assert f"pid {holder.info.backend_pid}" in said and HOLDER in said
    assert "on-workers" not in said and "namesake" not in said
    assert all(f"pid {pid} " not in said for pid in others)


def test_a_store_role_that_may_not_see_other_roles_sessions_names_the_holders_pid_and_says_why(
    pg, holder, postgres_url
):
    # A dedicated store role sees other roles' sessions in pg_stat_activity without their
    # transaction, state or statement unless it has pg_read_all_stats: the holder was never
    # named, and nothing said why. pg_locks, readable by all, names its pid and user at least.
    job, _ = pg.create(make_input(seed=1), T0)
    url, role = a_role(
        postgres_url, "SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
    )
    lock(holder, job.Id)  # the holder is the owner's session
    pid = holder.info.backend_pid
    with JobStore(url) as blind:
        with pytest.raises(StoreUnavailable) as failed:
            blind.reset(job.Id, T0 + 1)
        said = str(failed.value)
        assert f"pid {pid} (user postgres, its transaction hidden from this role)" in said
        assert f"GRANT pg_read_all_stats TO {role}" in said
        assert f"pg_terminate_backend({pid})" in said

        with psycopg.connect(postgres_url, autocommit=True) as owner:
            owner.execute(f"GRANT pg_read_all_stats TO {role}")
        with pytest.raises(StoreUnavailable) as failed:
            blind.reset(job.Id, T0 + 1)
    said = str(failed.value)
    assert f"The lock is held by pid {pid} (user postgres, {HOLDER}" in said
    assert "pg_read_all_stats" not in said


def test_a_heartbeat_passes_over_a_job_held_elsewhere_and_stores_the_workers_others(
    postgres_url, holder, monkeypatch
):
    # A heartbeat waited for each of its jobs' rows: one held elsewhere (an operator's psql
    # after SELECT ... FOR UPDATE) failed the whole heartbeat after two lock_timeouts, and the
    # coordinator counted only those seconds as unheard: the worker's other running jobs were
    # taken back by the sweep while it still proved them. Now the held one is passed over (no
    # effect: neither refused nor unknown, its worker goes on) and the others' are stored. A
    # long lock_timeout: a heartbeat that waits is seen waiting, not failing.
    monkeypatch.setitem(pg_session.PG_SESSION_SETTINGS, "lock_timeout", "60s")
    with JobStore.open(postgres_url) as pg:
        held, _ = pg.create(make_input(seed=1), T0)
        free, _ = pg.create(make_input(seed=2), T0)
        running = {job.Id: job for job in pg.allocate(ANY, 2, "w1", T0 + 1)}
        assert set(running) == {held.Id, free.Id}
        lock(holder, held.Id)
        leases = {job_id: job.lease for job_id, job in running.items()}
        later = T0 + 1 + worker_rows.TOUCH_EVERY + 1  # the worker's row is written too
        beating = threading.Thread(
            target=lambda: outcomes.append(pg.heartbeat(list(leases), "w1", later, leases=leases))
        )
        outcomes: list = []
        beating.start()
        try:
            while beating.is_alive():
                assert waiting_on_locks(postgres_url) == [], "the heartbeat waited for the row"
                time.sleep(0.005)  # polling the server's state
        finally:
            holder.rollback()
            beating.join()
        [outcome] = outcomes
        assert outcome.effects == (rules.HeartbeatAccepted(free.Id),)
        beat = {job.Id: job for job in outcome.jobs}
        assert beat[held.Id] == running[held.Id]  # as stored: its worker is told nothing new
        assert rules.stop_reason(beat[held.Id], leases[held.Id], later) is None
        assert pg.get(free.Id).HeartbeatAt == later
        assert pg.get(held.Id) == running[held.Id]
        # The holder gone, its next heartbeat lands.
        outcome = pg.heartbeat([held.Id], "w1", later + 1, leases=leases)
        assert outcome.effects == (rules.HeartbeatAccepted(held.Id),)
        assert pg.get(held.Id).HeartbeatAt == later + 1


#: A transaction that notifies and writes (a commit that wrote nothing to the WAL waits for no
#: standby), as one simple query (no parameters); run again, it writes again.
STALLED = "BEGIN; CREATE TEMP TABLE stalled (); DROP TABLE stalled; NOTIFY dext_test; COMMIT"


def test_a_wait_for_the_workers_row_says_so_and_names_its_holder(pg, holder):
    # A heartbeat updates its worker's row (last, after its jobs'): one held elsewhere was
    # called "a lock on the store's rows", and its holder looked for among the job's lockers.
    job, _ = pg.create(make_input(seed=1), T0)
    pg.allocate(ANY, 1, "w1", T0 + 1)
    holder.execute(f"SELECT * FROM {workers.name} WHERE worker = 'w1' FOR UPDATE")
    with pytest.raises(StoreUnavailable) as failed:
        pg.heartbeat([job.Id], "w1", T0 + 1 + worker_rows.TOUCH_EVERY + 1)
    said = str(failed.value)
    assert f"heartbeat of job {job.Id} waited for the lock on the worker's row longer" in said
    assert f"pid {holder.info.backend_pid}" in said and HOLDER in said


@pytest.fixture
def stalled_commits(postgres_url: str) -> Iterator[psycopg.Connection]:
    """An admin session of a server whose commits under synchronous_commit = on wait for a
    synchronous standby that never answers (the store's sessions commit under the test
    server's default, off, and never wait for it)."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        admin.execute("SELECT pg_reload_conf()")
        try:
            yield admin
        finally:
            admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
            admin.execute("SELECT pg_reload_conf()")


def test_a_commit_that_waited_for_the_notify_lock_says_so_not_a_rows_holder(
    pg, stalled_commits, postgres_url
):
    # Every transaction that sends a NOTIFY takes one lock of the whole server at its COMMIT,
    # held until that commit is flushed (here: waits for its synchronous standby). Our reset,
    # which notifies, waited for it at COMMIT: before, its error blamed a holder of the store's
    # rows "gone since" and advised terminating one.
    job, _ = pg.create(make_input(seed=1), T0)
    pg.allocate(ANY, 1, "w1", T0 + 1)
    with psycopg.connect(postgres_url, autocommit=True) as committer:
        committer.execute("SET synchronous_commit = on")
        pid = committer.info.backend_pid
        deadline = time.monotonic() + 30
        while True:  # until the server's processes have read the new synchronous_standby_names
            notifying = threading.Thread(target=committer.execute, args=(STALLED,))
            notifying.start()
            while notifying.is_alive() and stalled_commits.execute(
                "SELECT wait_event IS DISTINCT FROM 'SyncRep' FROM pg_stat_activity"
                " WHERE pid = %s", [pid]
            ).fetchone() != (False,):  # fmt: skip
                assert time.monotonic() < deadline, "the commit never waited for its standby"
                time.sleep(0.005)  # polling the server's state; the order does not depend on it
            if notifying.is_alive():
                break
            notifying.join()
        try:
            with pytest.raises(StoreUnavailable) as failed:
                pg.reset(job.Id, T0 + 2)
        finally:
            stalled_commits.execute("SELECT pg_cancel_backend(%s)", [pid])  # commits locally
            notifying.join()
    said = str(failed.value)
    assert f"reset of job {job.Id} could not commit" in said and "at each of 2 tries" in said
    assert "PostgreSQL's NOTIFY lock" in said and "synchronous standby" in said
    assert "gone since" not in said and "pg_terminate_backend" not in said
    assert pg.get(job.Id).State == RUNNING  # nothing of the reset stored
