"""Transient PostgreSQL failures that the job store tries again (jobs/retry.py), on the session's
real server: a trigger on the jobs table makes the failure (a serialization failure or a
deadlock raised, or the store's own session ended with pg_terminate_backend) the first `times`
times it fires, counted in a sequence (nextval outlives the rollback of the try it failed).

And the conflicts the store finds itself (`StoreConflict`), tried again on either engine: a hook
on the store's statements makes another writer's change at the step of the race it needs."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import trio
from test_coordinator import PROOF, WORKER, connect, serving
from test_jobs_rules import make_input

from damocles_ext import cli
from damocles_ext.jobs import pg_session, retry, rules
from damocles_ext.jobs.database import jobs
from damocles_ext.jobs.model import FINISHED, READY, RUNNING, JobOutput, JobRecord, WdPoStInput
from damocles_ext.jobs.rows import row_values
from damocles_ext.jobs.store import JobStore, StoreConflict, StoreError, StoreUnavailable

T0 = 1_700_000_000.0
ANY = rules.AllocationSpec()
OUTPUT = JobOutput(proofs=(b"\x01" * 192,), faults=())


@pytest.fixture
def pg(postgres_url: str) -> Iterator[JobStore]:
    with JobStore.open(postgres_url) as s:
        yield s


def admin(store: JobStore, sql: str) -> list[tuple[Any, ...]]:
    """`sql` on a connection of its own (not the store's), in autocommit."""
    url = store.url
    with psycopg.connect(host=url.query["host"], user=url.username, dbname=url.database,
                         autocommit=True) as conn:  # fmt: skip
        cursor = conn.execute(sql)  # type: ignore[arg-type]  # a test's literal SQL
        return cursor.fetchall() if cursor.description else []


def frozen_until_ended(store: JobStore, pid: int) -> None:
    """Hold this thread (a store call's, frozen) until the server has ended session `pid`."""
    deadline = time.monotonic() + 30
    while admin(store, f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid}"):
        assert time.monotonic() < deadline, "the server never ended the idle session"
        time.sleep(0.005)  # polling the server's state; the order does not depend on it


def inject(store: JobStore, times: int, *, on: str, sqlstate: str | None = None,
           at_commit: bool = False) -> None:  # fmt: skip
    """The first `times` rows the jobs table's `on` (INSERT, UPDATE, DELETE) touches fail their
    transaction: with `sqlstate` raised, else with the session terminated (pg_terminate_backend
    of itself); at the row's statement, or as the transaction commits (`at_commit`)."""
    if sqlstate is not None:
        action = f"RAISE EXCEPTION 'injected failure' USING ERRCODE = '{sqlstate}'"
    else:
        action = "PERFORM pg_terminate_backend(pg_backend_pid())"
    when = "DEFERRABLE INITIALLY DEFERRED" if at_commit else ""
    admin(store, f"""
        CREATE SEQUENCE injected;
        CREATE FUNCTION inject() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            IF nextval('injected') <= {times} THEN {action}; END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER inject AFTER {on} ON dext_wdpost_jobs {when}
            FOR EACH ROW EXECUTE FUNCTION inject();
    """)  # fmt: skip


def fired(store: JobStore) -> int:
    """How often the injecting trigger fired: the tries that reached it."""
    [(value, called)] = admin(store, "SELECT last_value, is_called FROM injected")
    return int(value) if called else 0


def ready(store: JobStore) -> JobRecord:
    job, made = store.create(make_input(seed=1), T0)
    assert made
    return job


def running(store: JobStore) -> JobRecord:
    ready(store)
    [job] = store.allocate(ANY, 1, "w1", T0 + 1)
    return job


#: Each write of the store: (the trigger's event, the job it needs, the write; what it checks).
Write = tuple[str, Callable[[JobStore], Any], Callable[[JobStore, Any], None]]


def _create(s: JobStore, _: Any) -> None:
    job, made = s.create(make_input(seed=1), T0)
    assert made and s.get(job.Id) == job


def _allocate(s: JobStore, _: Any) -> None:
    [job] = s.allocate(ANY, 1, "w1", T0 + 1)
    assert s.get(job.Id) == job and job.State == RUNNING


def _heartbeat(s: JobStore, job: JobRecord) -> None:
    outcome = s.heartbeat([job.Id], "w1", T0 + 2, leases={job.Id: job.lease})
    assert [type(e) for e in outcome.effects] == [rules.HeartbeatAccepted]
    assert s.get(job.Id).HeartbeatAt == int(T0 + 2)


def _finish(s: JobStore, job: JobRecord) -> None:
    outcome = s.finish(job.Id, OUTPUT, "", T0 + 3, lease=job.lease)
    assert [type(e) for e in outcome.effects] == [rules.Finished]
    assert s.get(job.Id).State == FINISHED


def _finish_unleased(s: JobStore, job: JobRecord) -> None:
    # damocles' WdPoStFinishJob names neither the lease nor the worker.
    outcome = s.finish(job.Id, None, "try 1 failed", T0 + 3)
    assert [type(e) for e in outcome.effects] == [rules.Finished]


def _reset(s: JobStore, job: JobRecord) -> None:
    assert s.reset(job.Id, T0 + 3).State == READY
    assert s.get(job.Id).State == READY


def _remove(s: JobStore, job: JobRecord) -> None:
    assert s.remove(job.Id, T0 + 3)
    assert s.get(job.Id) is None


WRITES: dict[str, Write] = {
    "create": ("INSERT", lambda s: None, _create),
    "allocate": ("UPDATE", ready, _allocate),
    "heartbeat": ("UPDATE", running, _heartbeat),
    "finish": ("UPDATE", running, _finish),
    "finish_unleased": ("UPDATE", running, _finish_unleased),
    "reset": ("UPDATE", running, _reset),
    "remove": ("DELETE", ready, _remove),
}


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_rolled_back_once_for_a_conflict_is_tried_again_and_lands(pg, write, sqlstate):
    on, arrange, do = WRITES[write]
    job = arrange(pg)
    inject(pg, 1, on=on, sqlstate=sqlstate)
    do(pg, job)
    assert fired(pg) == 2  # the try rolled back, and the one that landed


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_a_conflict_at_every_try_ends_as_a_store_error_saying_so_after_the_bound(pg, sqlstate):
    job = ready(pg)
    inject(pg, 1000, on="UPDATE", sqlstate=sqlstate)
    with pytest.raises(StoreError) as raised:
        pg.allocate(ANY, 1, "w1", T0 + 1)
    assert not isinstance(raised.value, StoreUnavailable)  # the server answered: no outage
    message = str(raised.value)
    assert f"allocate failed: injected failure ({retry.CONFLICTS[sqlstate]}" in message
    assert f"SQLSTATE {sqlstate}, at each of {retry.ATTEMPTS} tries" in message
    assert fired(pg) == retry.ATTEMPTS
    assert pg.get(job.Id) == job  # nothing stored


def test_a_deadlock_before_a_lock_wait_spends_none_of_the_lock_waits_tries(pg, caplog):
    # The tries that wait past lock_timeout are bounded apart from the others: a reset that met
    # a deadlock at its first try and a lock wait at its second gave up there, saying it "waited
    # ... at each of 2 tries". The trigger's firings: a deadlock, two lock waits (the first
    # reset's); a deadlock, one lock wait, then none (the second's).
    job = running(pg)
    admin(pg, """
        CREATE SEQUENCE injected;
        CREATE FUNCTION inject() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            IF nextval('injected') IN (1, 4) THEN
                RAISE EXCEPTION 'injected deadlock' USING ERRCODE = '40P01';
            ELSIF currval('injected') IN (2, 3, 5) THEN
                RAISE EXCEPTION 'injected lock wait' USING ERRCODE = '55P03';
            END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER inject AFTER UPDATE ON dext_wdpost_jobs
            FOR EACH ROW EXECUTE FUNCTION inject();
    """)  # fmt: skip
    with caplog.at_level(logging.INFO, "damocles_ext.jobs.store"), pytest.raises(
        StoreUnavailable, match="at each of 2 tries"
    ):  # fmt: skip
        pg.reset(job.Id, T0 + 2)
    assert fired(pg) == 3  # the deadlock's try, and the two that waited
    assert "reset failed at try 2 of 3" in caplog.text
    reset = pg.reset(job.Id, T0 + 3)  # a deadlock and a lock wait: one lock wait is left
    assert (reset.State, fired(pg)) == (READY, 6)


@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_whose_session_is_terminated_before_commit_is_tried_again_and_lands(pg, write):
    on, arrange, do = WRITES[write]
    job = arrange(pg)
    inject(pg, 1, on=on)
    do(pg, job)
    assert fired(pg) == 2


#: Whether a write whose COMMIT's outcome is unknown is made again (docs/JOBS.md says why).
#: A finish naming neither lease nor worker (a damocles-worker's) is not: the job may have been
#: retried and given to another worker meanwhile, whose try it would end.
REPLAYED = {"create": True, "heartbeat": True, "finish": True, "finish_unleased": False,
            "allocate": False, "reset": False, "remove": False}  # fmt: skip


@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_whose_session_ends_as_it_commits_is_made_again_only_when_that_is_the_same_as_once(
    pg, write
):
    on, arrange, do = WRITES[write]
    job = arrange(pg)
    inject(pg, 1, on=on, at_commit=True)
    if REPLAYED[write]:
        do(pg, job)
        assert fired(pg) == 2
        return
    with pytest.raises(StoreUnavailable) as raised:
        do(pg, job)
    name = write.removesuffix("_unleased")
    said = (
        f"its connection was lost as the {name} was being committed, so it may have been stored:"
        f" not tried again, as a second {name} is not the same as one"
    )
    assert said in str(raised.value)
    assert fired(pg) == 1


def test_a_lost_connection_at_every_try_ends_as_the_store_unavailable_after_the_bound(pg):
    job = ready(pg)
    inject(pg, 1000, on="UPDATE")
    with pytest.raises(StoreUnavailable) as raised:
        pg.allocate(ANY, 1, "w1", T0 + 1)
    assert "terminating connection due to administrator command" in str(raised.value)
    assert f"(at try {retry.ATTEMPTS}: the server rolled back the tries before" in str(raised.value)
    assert fired(pg) == retry.ATTEMPTS
    assert pg.get(job.Id) == job


def test_the_stores_sessions_terminated_or_the_server_restarted_between_calls_fail_no_call(
    pg, postgres_server
):
    job = running(pg)
    admin(pg, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
              " WHERE application_name = 'damocles-ext' AND pid <> pg_backend_pid()"
              " AND datname = current_database()")  # fmt: skip
    _heartbeat(pg, job)
    postgres_server.pause()  # pg_ctl stop -m fast: every session ended (57P01), then started
    postgres_server.resume()
    _finish(pg, job)


# --- the callers --------------------------------------------------------------------------------


async def test_a_workers_allocation_gets_its_job_past_a_deadlock_or_an_error_saying_why(pg):
    for seed in (1, 2):
        pg.create(make_input(seed=seed, proof_type=PROOF), T0)
    inject(pg, 1, on="UPDATE", sqlstate="40P01")
    spec = {"AllowedMiners": None, "AllowedProofTypes": None}
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, pg)
        client = await connect(server)
        status, answer = await client.call("Venus.WdPoStAllocateJobs", spec, 1, WORKER)
        assert status == 200 and len(answer["result"]) == 1
        admin(pg, "CREATE OR REPLACE FUNCTION inject() RETURNS trigger LANGUAGE plpgsql AS $$"
                  " BEGIN RAISE EXCEPTION 'injected failure' USING ERRCODE = '40P01'; END $$")  # fmt: skip
        status, answer = await client.call("Venus.WdPoStAllocateJobs", spec, 1, WORKER)
        assert status == 200 and "result" not in answer
        message = answer["error"]["message"]
        assert f"a deadlock, SQLSTATE 40P01, at each of {retry.ATTEMPTS} tries" in message
        nursery.cancel_scope.cancel()


def test_wdpost_reset_whose_commit_was_lost_says_it_may_have_been_stored(pg, postgres_url, capsys):
    job = running(pg)
    inject(pg, 1, on="UPDATE", at_commit=True)
    assert cli.main(["wdpost", "reset", "--jobs", postgres_url, job.Id]) == 1
    err = capsys.readouterr().err
    assert (
        "its connection was lost as the reset was being committed, so it may have been stored"
        in err
    )
    assert "Traceback" not in err
    assert pg.get(job.Id).State == RUNNING  # here the server had not stored it


# --- conflicts the store finds itself -----------------------------------------------------------


def race_creates(store: JobStore, job_input: WdPoStInput, times: int,
                 other: JobStore | None) -> list[str]:  # fmt: skip
    """The first `times` inserts of `job_input`'s job by `store` meet that job made by another
    writer just before them and removed just after, before the store reads it back: by `other`
    (another process's store, committed at once: PostgreSQL) or, when None, on the try's own
    connection (SQLite, whose one writer at a time lets no other session in there, so this only
    stands in for the race). Returns the races made, each "removed" once complete."""
    job = rules.new_job(job_input, T0)
    races: list[str] = []
    inside = False  # the hook's own statements

    def ours(statement: str) -> bool:
        return not inside and statement.startswith(f"INSERT INTO {jobs.name}")

    def before(conn, _cursor, statement, *_args):
        nonlocal inside
        if ours(statement) and len(races) < times:
            inside = True
            if other is not None:
                other.create(job_input, T0)
            else:
                conn.execute(jobs.insert(), row_values(job))
            inside = False
            races.append("made")

    def after(conn, _cursor, statement, *_args):
        nonlocal inside
        if ours(statement) and races and races[-1] == "made":
            inside = True
            if other is not None:
                assert other.remove(job.Id, T0)
            else:
                conn.execute(jobs.delete().where(jobs.c.id == job.Id))
            inside = False
            races[-1] = "removed"

    sa.event.listen(store.engine, "before_cursor_execute", before)
    sa.event.listen(store.engine, "after_cursor_execute", after)
    return races


def other_writer(store: JobStore) -> JobStore | None:
    return JobStore(str(store.url)) if store.is_postgresql else None


@pytest.mark.parametrize("many", [False, True], ids=["create", "create_many"])
def test_a_create_that_met_its_job_made_and_removed_by_another_is_made_again_and_lands(js, many):
    # Its insert found the job there (another producer's), its read then found it gone (an
    # operator's remove): the call failed with StoreConflict, which the producer counted as a
    # store failure and waited a backoff for. The transaction was rolled back: run again.
    js.first_pause = 0.0
    job_input = make_input(seed=3)
    other = other_writer(js)
    try:
        races = race_creates(js, job_input, 1, other)
        if many:
            [(job, made)] = js.create_many([rules.Create(job_input)], T0 + 1)
        else:
            job, made = js.create(job_input, T0 + 1)
    finally:
        if other is not None:
            other.close()
    assert races == ["removed"]
    assert made and js.get(job.Id) == job and job.CreatedAt == int(T0 + 1)


def test_a_create_that_meets_the_race_at_every_try_says_so_after_the_bound(js):
    js.first_pause = 0.0
    job_input = make_input(seed=3)
    other = other_writer(js)
    try:
        races = race_creates(js, job_input, 1000, other)
        with pytest.raises(StoreConflict) as raised:
            js.create(job_input, T0 + 1)
    finally:
        if other is not None:
            other.close()
    assert races == ["removed"] * retry.ATTEMPTS
    job_id = rules.new_job(job_input, T0).Id
    assert str(raised.value) == (
        f"job store {js.where}: create failed: job {job_id} was made by another process and"
        f" removed while this one made it, at each of {retry.ATTEMPTS} tries (other processes"
        " kept writing the same job at that moment); it may work when tried again later"
    )
    assert js.list_jobs() == []


@pytest.mark.parametrize("write", ["finish", "reset"])
def test_a_write_whose_guard_found_the_row_changed_is_run_again_from_the_row_as_it_is(js, write):
    # The guarded UPDATE found another's write (here on the try's own connection: the rows are
    # locked, so no other session's write lands there): rolled back, and run again on the row
    # as it is now; reset is not replayable, but nothing of its first try was stored.
    js.first_pause = 0.0
    job = running(js)
    changed = []

    def before(conn, _cursor, statement, *_args):
        if statement.startswith(f"UPDATE {jobs.name}") and not changed:
            changed.append(job.Id)
            conn.execute(jobs.update().where(jobs.c.id == job.Id).values(updated_at=1))

    sa.event.listen(js.engine, "before_cursor_execute", before)
    if write == "finish":
        _finish_unleased(js, job)
    else:
        _reset(js, job)
    assert changed == [job.Id]


def test_remove_all_failing_after_some_batches_says_how_many_it_removed_and_told_each(pg):
    for seed in range(5):
        pg.create(make_input(seed=seed), T0)
    ids = sorted(job.Id for job in pg.list_jobs())
    # The third job's delete fails (not a transient failure: not tried again), in the second
    # transaction of two jobs each; the first was committed and told.
    admin(pg, """
        CREATE SEQUENCE deleted;
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            IF nextval('deleted') > 2 THEN RAISE EXCEPTION 'injected failure'; END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER refuse AFTER DELETE ON dext_wdpost_jobs
            FOR EACH ROW EXECUTE FUNCTION refuse();
    """)  # fmt: skip
    told: list[list[str]] = []
    with pytest.raises(StoreError) as raised:
        pg.remove_all(T0 + 1, batch=2, removed=told.append)
    assert told == [ids[:2]]
    assert str(raised.value).startswith(
        f"job store {pg.where}: remove_all failed: injected failure"
    )
    assert str(raised.value).endswith(
        " (2 of the 5 jobs were removed before it, each transaction of them committed: run it"
        " again to remove the rest)"
    )
    assert sorted(job.Id for job in pg.list_jobs()) == ids[2:]


def test_get_many_given_a_generator_reads_the_same_ids_when_tried_again(pg):
    # The ids were listed inside the try: the try again after its session ended had an
    # iterator already used up, and answered {}, as if none of the jobs were there.
    made = [pg.create(make_input(seed=seed), T0)[0] for seed in (1, 2)]
    ended: list[int] = []

    def end_own_session(_conn, cursor, statement, *_args):
        if statement.startswith("SELECT") and jobs.name in statement and not ended:
            ended.append(cursor.connection.info.backend_pid)
            admin(pg, f"SELECT pg_terminate_backend({ended[0]})")

    sa.event.listen(pg.engine, "before_cursor_execute", end_own_session)
    assert pg.get_many(job.Id for job in made) == {job.Id: job for job in made}
    assert len(ended) == 1  # the first try's session ended: the answer is the second try's


def test_a_call_frozen_in_its_transaction_past_the_servers_idle_timeout_is_run_again(
    pg, postgres_url, monkeypatch, caplog
):
    # The server ends a session left idle in a transaction for longer than the timeout each
    # session of the store gives itself (pg_session.py: what frees a dead client's row locks).
    # A client that was only frozen there (a VM paused, SIGSTOP) finds its connection lost
    # before COMMIT when it runs again, and its call is run again on a new session.
    monkeypatch.setitem(
        pg_session.PG_SESSION_SETTINGS, "idle_in_transaction_session_timeout", "100ms"
    )
    job = running(pg)
    frozen: list[int] = []

    def freeze_before_the_update(conn, _cursor, statement, *_args):
        if statement.startswith("UPDATE dext_wdpost_jobs") and not frozen:
            # The job's row is locked (read FOR UPDATE): frozen until the server ends the session.
            frozen.append(conn.connection.dbapi_connection.info.backend_pid)
            frozen_until_ended(pg, frozen[-1])

    with JobStore(postgres_url) as frozen_store:
        sa.event.listen(frozen_store.engine, "before_cursor_execute", freeze_before_the_update)
        with caplog.at_level(logging.INFO, "damocles_ext.jobs.store"):
            reset = frozen_store.reset(job.Id, T0 + 2)
    assert frozen and (reset.State, reset.WorkerName) == (READY, "")
    assert "reset failed at try 1 of 4, the server ended its session, idle in" in caplog.text


def test_a_call_frozen_before_its_commit_past_the_servers_idle_timeout_is_run_again(
    pg, postgres_url, monkeypatch, caplog
):
    # The server ended the session of a client frozen at the last step of its transaction (its
    # statements run, COMMIT not yet sent), idle in it longer than its idle-in-transaction
    # timeout: it rolled the transaction back, so nothing of it was stored, and the COMMIT the
    # client sends when it runs again fails with SQLSTATE 25P03. A call that is not replayable
    # (a reset) is run again all the same; before, that was taken for a connection lost as it
    # was committed, which may have stored it, and the call failed.
    # 1 s, not less: a try whose session a stall between its statements (a loaded machine)
    # outlasted would be ended before its COMMIT, and not frozen there as each one must be.
    monkeypatch.setitem(pg_session.PG_SESSION_SETTINGS, "idle_in_transaction_session_timeout", "1s")
    job = running(pg)
    frozen: list[int] = []
    freezes = [1]  # how many commits to freeze

    def freeze_before_the_commit(conn):
        if len(frozen) < freezes[0]:
            frozen.append(conn.connection.dbapi_connection.info.backend_pid)
            frozen_until_ended(pg, frozen[-1])

    with JobStore(postgres_url) as frozen_store:
        sa.event.listen(frozen_store.engine, "commit", freeze_before_the_commit)
        with caplog.at_level(logging.INFO, "damocles_ext.jobs.store"):
            reset = frozen_store.reset(job.Id, T0 + 2)
        assert len(frozen) == 1 and (reset.State, reset.WorkerName, reset.TryNum) == (READY, "", 0)
        assert pg.get(job.Id) == reset
        assert "reset failed at try 1 of 4, the server ended its session" in caplog.text
        assert "SQLSTATE 25P03" in caplog.text

        # Frozen at each try: the error says what ended the session, and that nothing was stored.
        pg.allocate(ANY, 1, "w1", T0 + 3)
        frozen_store.attempts, freezes[0] = 2, 3
        with pytest.raises(StoreError) as failed:
            frozen_store.reset(job.Id, T0 + 4)
    assert len(frozen) == 3
    assert "at each of 2 tries" in str(failed.value)
    assert "idle in its transaction for longer than idle_in_transaction_session_timeout" in str(
        failed.value
    )
    assert "paused or frozen" in str(failed.value) and "nothing of it was stored" in str(
        failed.value
    )
    assert pg.get(job.Id).State == RUNNING


def test_a_store_that_cannot_be_reached_is_not_tried_again(caplog):
    # An outage, not a transaction rolled back: each try could wait connect_timeout, and each
    # caller meets an outage in its own way. (Even a read, which may be run again.)
    with socket.socket() as probe:  # a loopback port with nobody listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.INFO, logger="damocles_ext.jobs.store")
    store = JobStore(f"postgresql://dext@127.0.0.1:{port}/jobs", connect_timeout=5)
    with store, pytest.raises(StoreUnavailable, match="cannot reach the job store"):
        store.get("j1")
    assert "trying again" not in caplog.text
