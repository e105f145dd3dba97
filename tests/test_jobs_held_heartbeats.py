"""A running job's row held by a PostgreSQL session that is not the store's (an operator's psql
left inside BEGIN after a SELECT ... FOR UPDATE): a heartbeat passes over it, and once its last
stored heartbeat is half its HeartbeatTimeout old the coordinator warns, once per hold, naming
the job, its worker, the times and the holder. On the session's real server; the holder is a
psycopg connection of the test's own; the store's clock is the test's."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import msgspec
import psycopg
import pytest
from test_jobs_rules import make_input

from damocles_ext.frontends.coordinator import Coordinator
from damocles_ext.jobs import rules
from damocles_ext.jobs.database import jobs
from damocles_ext.jobs.lock_waits import FIND_ROW_HOLDERS
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
    """A coordinator on a PostgreSQL store whose wall clock is `now`, and one running job of
    WORKER's, heartbeated through Venus' method (damocles-worker's) or Dext's (ours)."""

    def __init__(self, store: JobStore, method: str) -> None:
        self.now = T0
        self.jobs = TrioJobStore(store, clock=lambda: self.now)
        self.coordinator = Coordinator(self.jobs, monotonic=lambda: self.now, watch_clocks=False)
        self.method = method
        self.job: JobRecord

    async def start(self) -> JobRecord:
        await self.jobs.create(make_input(seed=1))
        [self.job] = await self.jobs.allocate(rules.AllocationSpec(), 1, WORKER)
        return self.job

    async def beat(self, at: float) -> JobRecord:
        """A heartbeat of the job at T0 + `at`, answered; the job as stored after it."""
        self.now = T0 + at
        if self.method == "Venus":
            name, held = "Venus.WdPoStHeartbeatJobs", [self.job.Id]
        else:
            name, held = "Dext.HeartbeatJobs", [{"Id": self.job.Id, "Lease": self.job.lease}]
        call = {"jsonrpc": "2.0", "method": name, "params": [held, WORKER], "id": 1}
        body = msgspec.json.encode(call)
        status, answer = await self.coordinator.answer(body)
        assert status == 200 and b'"result"' in answer, answer
        job = await self.jobs.get(self.job.Id)
        assert job is not None
        return job


@pytest.fixture
def store(postgres_url: str) -> Iterator[JobStore]:
    with JobStore.open(postgres_url) as s:
        assert s.limits.heartbeat_timeout == 15.0  # damocles' default: warned from 7.5 s
        yield s


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "damocles_ext.coordinator" and r.levelno == logging.WARNING
    ]


async def test_a_held_row_is_said_nothing_while_its_last_heartbeat_is_under_half_the_timeout(
    store, holder, caplog
):
    # Our own transactions (a sweep, an allocation) hold a row for milliseconds and make a
    # heartbeat pass over it now and then: a warning at every skip would be noise.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating = Beating(store, "Venus")
    job = await beating.start()
    lock(holder, job.Id)
    assert (await beating.beat(3)).HeartbeatAt == job.HeartbeatAt  # passed over
    assert (await beating.beat(6)).HeartbeatAt == job.HeartbeatAt  # 6 s < 7.5 s
    holder.rollback()
    assert (await beating.beat(7)).HeartbeatAt == T0 + 7  # landed
    lock(holder, job.Id)
    assert (await beating.beat(14)).HeartbeatAt == T0 + 7  # 7 s since the last one stored
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("method", ["Venus", "Dext"])
async def test_a_row_held_past_half_the_timeout_is_warned_once_naming_job_worker_times_holder(
    store, holder, caplog, method
):
    # Before, a hold said nothing until the job's heartbeat aged past HeartbeatTimeout and a
    # sweep took the job back once the row was freed.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating = Beating(store, method)
    job = await beating.start()
    lock(holder, job.Id)
    for at in (3, 6, 9, 12, 15, 18):  # a heartbeat every 3 s, as a worker sends them
        assert (await beating.beat(at)).HeartbeatAt == job.HeartbeatAt
    [warned] = warnings_of(caplog)
    said = warned.getMessage()
    assert (warned.job_id, warned.worker) == (job.Id, WORKER)
    assert f"job {job.Id} of worker {WORKER!r}: its heartbeats are not stored" in said
    assert "its last stored heartbeat is 9 s old" in said  # warned at 9 s, once
    assert "a sweep may take the job back from its worker in 6 s" in said
    assert "HeartbeatTimeout 15 s" in said
    pid = holder.info.backend_pid
    assert f"It is held by pid {pid} (user " in said and HOLDER in said
    assert "idle in transaction" in said and "FOR UPDATE" in said
    assert f"SELECT pg_terminate_backend({pid})" in said
    holder.rollback()
    assert (await beating.beat(21)).HeartbeatAt == T0 + 21  # the holder gone, it lands


async def test_a_new_long_hold_after_a_heartbeat_landed_is_warned_again(store, holder, caplog):
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating = Beating(store, "Dext")
    job = await beating.start()
    lock(holder, job.Id)
    for at in (3, 6, 9, 12):
        await beating.beat(at)
    assert len(warnings_of(caplog)) == 1
    holder.rollback()
    assert (await beating.beat(13)).HeartbeatAt == T0 + 13  # landed: that hold is over
    lock(holder, job.Id)
    for at in (16, 19, 22, 25, 28):
        await beating.beat(at)
    first, second = warnings_of(caplog)
    assert "last stored heartbeat is 9 s old" in first.getMessage()
    assert "last stored heartbeat is 9 s old" in second.getMessage()  # at 22, 9 s after 13
    assert second.job_id == job.Id


async def test_a_holder_that_cannot_be_named_exactly_is_told_how_to_find(
    store, holder, postgres_url, caplog
):
    # Two sessions share the row's lock (FOR SHARE): its xmax names neither of them.
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    beating = Beating(store, "Venus")
    job = await beating.start()
    with psycopg.connect(postgres_url) as other:
        lock(holder, job.Id, share=True)
        lock(other, job.Id, share=True)
        for at in (3, 6, 9):
            assert (await beating.beat(at)).HeartbeatAt == job.HeartbeatAt
        other.rollback()
    [warned] = warnings_of(caplog)
    said = warned.getMessage()
    assert "Find the session holding it" in said and FIND_ROW_HOLDERS in said
    assert "pg_terminate_backend(PID)" in said
    with psycopg.connect(postgres_url, autocommit=True) as operator:
        listed = operator.execute(FIND_ROW_HOLDERS).fetchall()
    assert holder.info.backend_pid in [row[0] for row in listed]  # the query finds it
