"""A running job's row held by a PostgreSQL session that is not the store's (an operator's psql
left inside BEGIN after a SELECT ... FOR UPDATE): a heartbeat passes over it, and once its last
stored heartbeat is half its HeartbeatTimeout old (at a later heartbeat than the first passed
over) the coordinator warns, once per hold, naming the job, its worker, the times and the
holder, from a task of its own: the heartbeat's answer never waits for it. On the session's
real server; the holder is a psycopg connection of the test's own; the store's clock is the
test's."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from typing import Self

import msgspec
import psycopg
import pytest
import trio
from sqlalchemy import exc
from test_jobs_migration import a_role
from test_jobs_rules import make_input

from damocles_ext.frontends.coordinator import Coordinator
from damocles_ext.frontends.held_warnings import HeldWarnings
from damocles_ext.jobs import held_rows, lock_waits, rules
from damocles_ext.jobs.database import jobs
from damocles_ext.jobs.lock_waits import find_row_holders
from damocles_ext.jobs.model import JobRecord
from damocles_ext.jobs.store import JobStore, TrioJobStore

T0 = 1_700_000_000.0
HOLDER = "operator-psql"
WORKER = "w1"


@pytest.fixture
def holder(postgres_url: str) -> Iterator[psycopg.Connection]:
    """A session that is not the store's, as an operator's psql: what it locks stays locked
    until it commits or rolls back."""
    with psycopg.connect(postgres_url, application_name=HOLDER) as conn:
        yield conn
        conn.rollback()


def lock(holder: psycopg.Connection, job_id: str, *, share: bool = False) -> None:
    """The job's row read FOR UPDATE (FOR SHARE) by `holder`, left inside its transaction."""
    mode = "SHARE" if share else "UPDATE"
    holder.execute(f"SELECT * FROM {jobs.name} WHERE id = %s FOR {mode}", [job_id])


class Beating:
    """A coordinator on a PostgreSQL store whose wall clock is `now`, its sweeps and warnings
    running in `nursery`, and running jobs of WORKER's, heartbeated through Venus' method
    (damocles-worker's) or Dext's (ours)."""

    def __init__(self, store: JobStore, method: str, nursery) -> None:
        self.now = T0
        self.jobs = TrioJobStore(store, clock=lambda: self.now)
        self.coordinator = Coordinator(self.jobs, monotonic=lambda: self.now, watch_clocks=False)
        # A look at the holders is given up after 1 s: not on an overloaded machine here.
        self.coordinator.held.look_timeout = 60.0
        self.method = method
        self.nursery = nursery
        self.held: list[JobRecord] = []
        self.job: JobRecord

    async def start(self, n: int = 1) -> JobRecord:
        # Its sweep passes once at start, then an hour later: never while the test runs.
        await self.nursery.start(functools.partial(self.coordinator.sweep_forever, 3600))
        for seed in range(1, n + 1):
            await self.jobs.create(make_input(seed=seed))
        self.held = await self.jobs.allocate(rules.AllocationSpec(), n, WORKER)
        self.job = self.held[0]
        return self.job

    async def call(self, at: float) -> list:
        """A heartbeat of the jobs at T0 + `at`: its result, once answered."""
        self.now = T0 + at
        if self.method == "Venus":
            name, held = "Venus.WdPoStHeartbeatJobs", [job.Id for job in self.held]
        else:
            name = "Dext.HeartbeatJobs"
            held = [{"Id": job.Id, "Lease": job.lease} for job in self.held]
        call = {"jsonrpc": "2.0", "method": name, "params": [held, WORKER], "id": 1}
        status, answer = await self.coordinator.answer(msgspec.json.encode(call))
        assert status == 200 and b'"result"' in answer, answer
        return msgspec.json.decode(answer)["result"]

    async def beat(self, at: float) -> JobRecord:
        """A heartbeat of the jobs at T0 + `at`, answered and its warnings given; the first
        job as stored after it."""
        await self.call(at)
        await self.coordinator.held.settled()
        job = await self.jobs.get(self.job.Id)
        assert job is not None
        return job


async def held_job(store: JobStore, method: str, nursery, holder) -> tuple[Beating, JobRecord]:
    """A Beating of one running job whose row `holder` holds."""
    beating = Beating(store, method, nursery)
    job = await beating.start()
    lock(holder, job.Id)
    return beating, job


@pytest.fixture
def store(postgres_url: str) -> Iterator[JobStore]:
    with JobStore.open(postgres_url) as s:
        assert s.limits.heartbeat_timeout == 15.0  # damocles' default: warned from 7.5 s
        yield s


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The coordinator's warnings of held rows (not its sweep's of the test's clock's skew)."""
    return [
        r
        for r in caplog.records
        if r.name == "damocles_ext.coordinator" and r.levelno == logging.WARNING
        and "heartbeats are not stored" in r.getMessage()
    ]  # fmt: skip


async def test_a_held_row_is_said_nothing_while_its_last_heartbeat_is_under_half_the_timeout(
    store, holder, caplog, nursery
):
    # Our own transactions (a sweep, an allocation) hold a row for milliseconds and make a
    # heartbeat pass over it now and then: a warning at every skip would be noise.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating, job = await held_job(store, "Venus", nursery, holder)
    assert (await beating.beat(3)).HeartbeatAt == job.HeartbeatAt  # passed over
    assert (await beating.beat(6)).HeartbeatAt == job.HeartbeatAt  # 6 s < 7.5 s
    holder.rollback()
    assert (await beating.beat(7)).HeartbeatAt == T0 + 7  # landed
    lock(holder, job.Id)
    assert (await beating.beat(14)).HeartbeatAt == T0 + 7  # 7 s since the last one stored
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("method", ["Venus", "Dext"])
async def test_a_row_held_past_half_the_timeout_is_warned_once_naming_job_worker_times_holder(
    store, holder, caplog, method, nursery
):
    # Before, a hold said nothing until the job's heartbeat aged past HeartbeatTimeout and a
    # sweep took the job back once the row was freed.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating, job = await held_job(store, method, nursery, holder)
    for at in (3, 6, 9, 12, 15, 18):  # a heartbeat every 3 s, as a worker sends them
        assert (await beating.beat(at)).HeartbeatAt == job.HeartbeatAt
    [warned] = warnings_of(caplog)
    said = warned.getMessage()
    assert (warned.job_id, warned.worker) == (job.Id, WORKER)
    assert f"job {job.Id} of worker {WORKER!r}: its heartbeats are not stored" in said
    assert "its last stored heartbeat is 9 s old" in said  # warned at 9 s, once
    assert "a sweep may take the job back from its worker in 6 s at the earliest" in said
    assert "HeartbeatTimeout 15 s" in said
    pid = holder.info.backend_pid
    assert f"The holder is pid {pid} (user " in said and HOLDER in said
    assert "idle in transaction" in said and "FOR UPDATE" in said
    assert f"SELECT pg_terminate_backend({pid})" in said
    holder.rollback()
    assert (await beating.beat(21)).HeartbeatAt == T0 + 21  # the holder gone, it lands


async def test_a_new_long_hold_after_a_heartbeat_landed_is_warned_again(
    store, holder, caplog, nursery
):
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating, job = await held_job(store, "Dext", nursery, holder)
    for at in (3, 6, 9, 12):
        await beating.beat(at)
    assert len(warnings_of(caplog)) == 1
    holder.rollback()
    assert (await beating.beat(16)).HeartbeatAt == T0 + 16  # landed: that hold is over
    lock(holder, job.Id)  # (a HeartbeatTimeout after its first warning: warned of in full)
    for at in (19, 22, 25, 28, 31):
        await beating.beat(at)
    first, second = warnings_of(caplog)
    assert "last stored heartbeat is 9 s old" in first.getMessage()
    assert "last stored heartbeat is 9 s old" in second.getMessage()  # at 25, 9 s after 16
    assert second.job_id == job.Id


def query_in(said: str) -> str:
    """The query a warning gives to find the holders."""
    return said.partition("among those this query lists: ")[2].partition(") and end its")[0]


@pytest.mark.parametrize("schema", [None, "dext"])
async def test_a_holder_that_cannot_be_named_exactly_is_told_how_to_find(
    postgres_url, caplog, nursery, schema
):
    # Two sessions share the row's lock (FOR SHARE): its xmax names neither of them. The query
    # the warning gives names the jobs table with its schema: with the store in a schema off
    # the operator's search_path (the store's URL sets its own), it failed ("relation
    # dext_wdpost_jobs does not exist").
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    url = postgres_url
    if schema is not None:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        url = f"{postgres_url}&options=-csearch_path%3D{schema}"
    table = jobs.name if schema is None else f"{schema}.{jobs.name}"
    with (
        JobStore.open(url) as store,
        psycopg.connect(postgres_url, application_name=HOLDER) as holder,
        psycopg.connect(postgres_url) as other,
    ):
        beating = Beating(store, "Venus", nursery)
        job = await beating.start()
        for session in (holder, other):
            session.execute(f"SELECT * FROM {table} WHERE id = %s FOR SHARE", [job.Id])
        for at in (3, 6, 9):
            assert (await beating.beat(at)).HeartbeatAt == job.HeartbeatAt
        other.rollback()
        [warned] = warnings_of(caplog)
        said = warned.getMessage()
        assert "Find the session holding it" in said and "pg_terminate_backend(PID)" in said
        assert "none listed: a prepared transaction" in said and "pg_prepared_xacts" in said
        query = query_in(said)
        assert f"'{schema or 'public'}.{jobs.name}'::regclass" in query
        # A second lock of the holder's on the table (an UPDATE after its FOR SHARE): before, the
        # query listed it once per lock mode.
        holder.execute(f"UPDATE {table} SET id = id WHERE id = %s", [job.Id])
        with psycopg.connect(postgres_url, autocommit=True) as operator:
            listed = operator.execute(query).fetchall()
        assert [row[0] for row in listed] == [holder.info.backend_pid]  # the query finds it
        holder.rollback()


async def test_jobs_held_by_one_session_are_warned_of_in_one_line_naming_them(
    store, holder, postgres_url, caplog, nursery
):
    # Before, each job was looked up on its own (about 7 round trips each) while the worker
    # waited for its answer, and each got a warning of its own naming the same holder.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating = Beating(store, "Dext", nursery)
    await beating.start(4)
    first, *others = sorted(beating.held, key=lambda job: job.Id)
    with psycopg.connect(postgres_url, application_name="other-psql") as other:
        other_pid = other.info.backend_pid
        for job in others:
            lock(holder, job.Id)
        lock(other, first.Id)
        for at in (3, 6, 9, 12):
            await beating.beat(at)
        other.rollback()
    by_holder = {r.getMessage().partition("The holder is pid ")[2].split()[0]: r
                 for r in warnings_of(caplog)}  # fmt: skip
    assert set(by_holder) == {str(holder.info.backend_pid), str(other_pid)}
    three = by_holder[str(holder.info.backend_pid)]
    said = three.getMessage()
    assert said.startswith(f"3 jobs of worker {WORKER!r}: their heartbeats are not stored")
    assert all(f"{job.Id} (its last stored heartbeat 9 s old" in said for job in others)
    assert (three.worker, getattr(three, "job_id", None)) == (WORKER, None)
    one = by_holder[str(other_pid)]
    assert one.job_id == first.Id and "other-psql" in one.getMessage()


def xmax(conn: psycopg.Connection, job_id: str) -> str:
    """The job's row's xmax: the last transaction that locked, updated or deleted it."""
    [(found,)] = conn.execute(f"SELECT CAST(xmax AS text) FROM {jobs.name} WHERE id = %s", [job_id])
    conn.rollback()
    return found


async def test_the_look_locks_no_row_found_free_while_no_other_session_could_hold_one(
    store, holder, postgres_url, nursery
):
    # Before, it locked each row not named (FOR UPDATE SKIP LOCKED) to tell whether it was
    # still held: a heartbeat or a sweep at that moment passed over a row freed long before
    # (its heartbeat skipped, the sweep's taking back not).
    _beating, job = await held_job(store, "Venus", nursery, holder)
    holder.commit()  # the row is free; its xmax still names the holder's transaction
    with psycopg.connect(postgres_url) as reader:
        before = xmax(reader, job.Id)
        found = await trio.to_thread.run_sync(lock_waits.row_holders, store.engine, [job.Id])
        assert found.free == {job.Id} and found.holders == {}
        assert xmax(reader, job.Id) == before  # no transaction of the look's locked it
        lock(reader, job.Id, share=True)
        lock(holder, job.Id, share=True)  # shared by two (a multixact): held, and so said
        found = await trio.to_thread.run_sync(lock_waits.row_holders, store.engine, [job.Id])
        assert found.free == set() and found.holders == {}
        reader.rollback()


async def test_a_holder_warned_of_is_not_warned_of_again_for_a_timeout_its_later_holds_summed_up(
    store, holder, caplog, nursery
):
    # Before, each heartbeat (each worker's) whose jobs one session held was a warning of its
    # own naming that same session: 60 workers held by one psql, 60 warnings.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating = Beating(store, "Dext", nursery)
    await beating.start(3)
    first, *later = beating.held
    lock(holder, first.Id)
    for at in (3, 9):
        await beating.beat(at)
    [warned] = warnings_of(caplog)
    for job in later:
        lock(holder, job.Id)  # their last heartbeat stored at 9 s
    for at in (12, 15, 18, 21):  # warned of at 18 s, 9 s after the holder was
        await beating.beat(at)
    assert warnings_of(caplog) == [warned]
    await beating.beat(24)  # the holder's warning a HeartbeatTimeout old: the others summed up
    [summed] = warnings_of(caplog)[1:]
    pid = holder.info.backend_pid
    assert summed.getMessage().startswith(
        f"the session of pid {pid}, warned of 15 s ago as the holder of job rows in the job store,"
        f" held the rows of 2 more jobs since, of worker {WORKER!r}:"
    )
    assert summed.worker == WORKER
    await beating.beat(27)
    assert len(warnings_of(caplog)) == 2  # said once


class Gate:
    """lock_waits.row_holders, made to wait (in its thread) until the test opens the gate; a
    context manager that opens it on the way out, whatever happened, so that a failing test
    leaves no thread waiting."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        real = lock_waits.row_holders

        def gated(engine, job_ids):
            self.entered.set()
            assert self.open.wait(30)
            return real(engine, job_ids)

        monkeypatch.setattr(lock_waits, "row_holders", gated)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.open.set()

    async def reached(self) -> None:
        """Return once a look waits at the gate (fails after 30 s)."""
        assert await trio.to_thread.run_sync(self.entered.wait, 30), "no look reached the gate"


async def test_a_heartbeats_answer_never_waits_for_the_look_at_its_holders(
    store, holder, caplog, nursery, monkeypatch
):
    # Before, the look ran while the worker waited for its heartbeat's answer, 1 s at most per
    # job, one after another. The look may take as long as it likes here (60 s): the answer
    # comes while it waits at the gate.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating, _job = await held_job(store, "Venus", nursery, holder)
    await beating.beat(3)
    with Gate(monkeypatch) as gate:
        with trio.fail_after(5):  # a heartbeat waiting for the look would wait 60 s
            assert await beating.call(9) is None
        await gate.reached()
        assert warnings_of(caplog) == []  # its look has not ended
    await beating.coordinator.held.settled()
    [warned] = warnings_of(caplog)
    assert f"The holder is pid {holder.info.backend_pid} " in warned.getMessage()


async def test_a_look_at_the_holders_that_gets_no_answer_is_given_up_on_a_thread_of_its_own(
    store, holder, caplog, nursery, monkeypatch
):
    # Before, a look given up kept one of the store's 4 thread slots.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating = Beating(store, "Venus", nursery)
    warnings = beating.coordinator.held
    job = await beating.start()
    lock(holder, job.Id)
    await beating.beat(3)
    warnings.look_timeout = 0.2
    with Gate(monkeypatch) as gate:
        await beating.call(9)
        await gate.reached()
        await warnings.settled()  # given up after 0.2 s, its thread still in the look
        assert beating.jobs._limiter.borrowed_tokens == 0  # none of the store's threads
        assert warnings._limiter.borrowed_tokens == 1  # the looks' own
        assert (await beating.jobs.get(job.Id)) is not None  # the store answers meanwhile
    [warned] = warnings_of(caplog)
    said = warned.getMessage()
    assert "Its holder could not be looked up (no answer within 0.2 s)" in said
    # The look read no table: the query names it with the schema read when the task started
    # (before, without: finding no table off the operator's search_path).
    assert query_in(said) == find_row_holders(f"'public.{jobs.name}'")


async def test_a_warning_while_a_look_given_up_still_runs_is_put_off_not_given_up_unnamed(
    store, holder, caplog, nursery, monkeypatch
):
    # Before, the next look waited for the looks' one thread, busy with the look given up, that
    # wait counted against its time limit, and its holds were warned of as "no answer", their
    # holder unnamed, for good.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating = Beating(store, "Venus", nursery)
    warnings = beating.coordinator.held
    await beating.start(2)
    first, second = beating.held
    lock(holder, first.Id)
    await beating.beat(3)
    warnings.look_timeout = 0.2
    with Gate(monkeypatch) as gate:
        await beating.beat(9)  # the first job's look, given up, waits at the gate
        await gate.reached()
        lock(holder, second.Id)  # its last heartbeat stored at 9 s
        for at in (12, 15, 18):  # warned of at 18 s, while the first look still runs
            await beating.beat(at)
        assert len(warnings_of(caplog)) == 1
        assert "the warning of 1 job row held elsewhere is put off: an earlier look" in caplog.text
    async with warnings._limiter:  # the look given up has ended
        pass
    await beating.beat(21)  # put off: handed again
    unnamed, named = warnings_of(caplog)
    assert "no answer within 0.2 s" in unnamed.getMessage() and unnamed.job_id == first.Id
    assert named.job_id == second.Id
    assert f"The holder is pid {holder.info.backend_pid} " in named.getMessage()


async def test_a_row_freed_before_its_holder_is_looked_up_is_said_nothing(
    store, holder, caplog, nursery, monkeypatch
):
    # A hold that ends between the heartbeat and the look (a sweep of ours, a reset) is not
    # warned of: before, the warning then told to find a session and terminate it.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating, _job = await held_job(store, "Venus", nursery, holder)
    await beating.beat(3)
    with Gate(monkeypatch) as gate:
        await beating.call(9)  # to be warned of: its look waits at the gate
        await gate.reached()
        holder.rollback()
    await beating.coordinator.held.settled()
    assert warnings_of(caplog) == []
    assert len(beating.coordinator.held.rows) == 0  # that hold is over


@pytest.mark.parametrize("method", ["Venus", "Dext"])
async def test_a_warning_that_fails_leaves_the_heartbeats_answer_as_it_is_and_is_given_later(
    store, holder, caplog, nursery, monkeypatch, method
):
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating, _job = await held_job(store, method, nursery, holder)

    def broken(held, advice):
        raise RuntimeError("a bug in the warning's words")

    monkeypatch.setattr(held_rows, "said_of", broken)
    assert await beating.call(3) == (None if method == "Venus" else [])
    assert await beating.call(9) == (None if method == "Venus" else [])
    await beating.coordinator.held.settled()
    assert "a bug in the warning's words" in caplog.text
    assert warnings_of(caplog) == []
    monkeypatch.undo()
    await beating.beat(12)  # not said: handed again
    [warned] = warnings_of(caplog)
    assert "last stored heartbeat is 12 s old" in warned.getMessage()


async def test_a_holder_hidden_from_the_stores_role_is_named_by_pid_with_the_grant_and_the_end(
    store, holder, postgres_url, caplog, nursery
):
    # A store role without pg_read_all_stats sees another role's session without its state,
    # address or statement, its backend_xid still: the holder was matched and said to be "from
    # a local socket, state hidden ..., running a statement: it holds the row until its
    # transaction ends", with neither the grant nor how to end it.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    url, role = a_role(
        postgres_url, "SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
    )
    with JobStore(url) as blind:
        beating = Beating(blind, "Venus", nursery)
        job = await beating.start()
        lock(holder, job.Id)  # the holder is the owner's session
        for at in (3, 6, 9):
            await beating.beat(at)
    [warned] = warnings_of(caplog)
    said = warned.getMessage()
    pid = holder.info.backend_pid
    assert f"The holder is pid {pid} (user postgres, {HOLDER}, its transaction hidden" in said
    assert f"GRANT pg_read_all_stats TO {role}" in said
    assert f"SELECT pg_terminate_backend({pid})" in said
    assert "local socket" not in said and "running a statement" not in said


async def test_a_warning_put_off_by_a_full_queue_is_handed_again_at_the_next_heartbeat(
    store, holder, caplog
):
    # Before that was tested, dropping the put-off hold's return to "not said" went unseen: it
    # stayed handed out, and was never warned of.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    now = [T0]
    jobs = TrioJobStore(store, clock=lambda: now[0])
    await jobs.create(make_input(seed=1))
    [job] = await jobs.allocate(rules.AllocationSpec(), 1, WORKER)
    warnings = HeldWarnings(jobs, queued=0, monotonic=lambda: now[0])  # no task: no room
    lock(holder, job.Id)
    for at in (3, 9, 12):
        now[0] = T0 + at
        warnings.heard(await jobs.heartbeat([job.Id], WORKER), WORKER)
    assert warnings.dropped == 2  # at 9 s, and handed again at 12 s
    assert "the warning of 1 job row held elsewhere is put off: 0 warnings wait" in caplog.text


@pytest.mark.parametrize("method", ["Venus", "Dext"])
async def test_a_failure_in_recording_a_hold_leaves_the_heartbeats_answer_as_it_is(
    store, holder, caplog, nursery, monkeypatch, method
):
    beating, _job = await held_job(store, method, nursery, holder)

    def broken(*args):
        raise RuntimeError("a bug in the holds' bookkeeping")

    monkeypatch.setattr(beating.coordinator.held.rows, "heard", broken)
    assert await beating.call(3) == (None if method == "Venus" else [])
    assert "a bug in the holds' bookkeeping" in caplog.text


async def test_a_look_waits_for_a_lock_on_the_whole_jobs_table_a_moment_only(postgres_url, holder):
    # The store's sessions here wait for a lock for ever (lock_timeout 0): the look sets its own
    # bounds (100 ms for a lock), or it would wait as long as the table is locked.
    with JobStore.open(f"{postgres_url}&options=-clock_timeout%3D0") as slow:
        holder.execute(f"LOCK TABLE {jobs.name} IN ACCESS EXCLUSIVE MODE")  # as ALTER TABLE
        try:
            with trio.fail_after(10), pytest.raises(exc.OperationalError) as failed:
                await trio.to_thread.run_sync(
                    lock_waits.row_holders, slow.engine, ["J"], abandon_on_cancel=True
                )
        finally:
            holder.rollback()
    assert lock_waits.is_lock_wait(failed.value)


async def test_a_failure_reading_the_jobs_table_at_the_start_stops_neither_warnings_nor_sweeps(
    store, holder, caplog, nursery, monkeypatch
):
    # The warnings' task runs beside the sweeps, in one nursery: before, any failure of its
    # first read but a database's one left it, and took the sweeps (the coordinator) with it.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")

    def broken(engine):
        raise RuntimeError("a bug in the table's read")

    monkeypatch.setattr(lock_waits, "jobs_table", broken)
    beating, _job = await held_job(store, "Venus", nursery, holder)
    for at in (3, 9):
        await beating.beat(at)
    assert "a bug in the table's read" in caplog.text
    [warned] = warnings_of(caplog)
    assert f"The holder is pid {holder.info.backend_pid} " in warned.getMessage()


def test_a_sweep_passes_over_a_row_another_session_holds_and_acts_on_the_others(store, holder):
    # Without SKIP LOCKED the pass waited for the row until its lock_timeout and then failed
    # whole: one psql session left in BEGIN stopped every timeout, retry and cancellation.
    for seed in (1, 2):
        store.create(make_input(seed=seed), T0)
    held, free = store.allocate(rules.AllocationSpec(), 2, WORKER, T0)
    lock(holder, held.Id)
    store.sweep(T0 + 100)  # both silent past HeartbeatTimeout (15 s)
    assert store.get(free.Id).State != held.State == "running"
    assert store.get(held.Id).State == "running"  # passed over, not waited for
    holder.rollback()
    store.sweep(T0 + 101)
    assert store.get(held.Id).State == store.get(free.Id).State
