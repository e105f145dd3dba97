"""Races between the users of one PostgreSQL job store, each interleaving forced step by step:
a second store (or a raw session, or another process) holds a row mid-transaction, a store call
runs into it in a thread, and the test goes on only once the server shows that call waiting for
the lock (pg_stat_activity), so the events happen in the order named whatever the machine's
speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from test_jobs_rules import make_input

from damocles_ext.jobs import pg_session, rules
from damocles_ext.jobs.model import READY
from damocles_ext.jobs.store import JobStore

T0 = 1_700_000_000.0
ANY = rules.AllocationSpec()


def _session(url: str, dbname: str | None = None) -> psycopg.Connection:
    parsed = sa.engine.make_url(url)
    return psycopg.connect(
        host=str(parsed.query["host"]), user=parsed.username,
        dbname=dbname or parsed.database, autocommit=True,
    )  # fmt: skip


def _with_settings(url: str, **settings: str) -> str:
    """`url`'s database with these defaults for every new session (ALTER DATABASE ... SET);
    its deadlock_timeout short, so that a deadlock fails a test at once."""
    name = sa.engine.make_url(url).database
    with _session(url) as admin:
        for key, value in {"deadlock_timeout": "100ms", **settings}.items():
            admin.execute(f"ALTER DATABASE \"{name}\" SET {key} = '{value}'")
    return url


def _wait_for_lock_waits(url: str, count: int = 1) -> None:
    """Until `count` sessions of the database wait for a lock another holds: a look at the
    server's own state (the step of the race the test needs), not a guess at a time."""
    name = sa.engine.make_url(url).database
    deadline = time.monotonic() + 30
    with _session(url) as watch:
        while True:
            (waiting,) = watch.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = %s AND wait_event_type = 'Lock'",
                (name,),
            ).fetchone() or (0,)
            if waiting >= count:
                return
            assert time.monotonic() < deadline, "the store call never waited for the lock"
            time.sleep(0.005)  # polling the server's state; the order does not depend on it


class _Call:
    """`fn()` run in a thread: its result or exception once joined."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,))
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test by join()
            self.error = e

    def join(self) -> Any:
        self._thread.join(timeout=60)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


@contextmanager
def _mid_transaction(url: str) -> Iterator[tuple[JobStore, sa.Connection]]:
    """Another process's store with a transaction open: what it does on the connection holds
    its rows' locks until the block ends (committed)."""
    with JobStore(url, pool_size=1) as other, other.engine.connect() as conn, conn.begin():
        yield other, conn


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_a_database_whose_default_isolation_is_higher_still_takes_the_ordinary_races(
    postgres_url, isolation
):
    # The store's rules hold at READ COMMITTED; a database (or role) set to a higher default
    # made a finish that waited for another coordinator's heartbeat, and a producer's create
    # that met another's insert of the same job, fail with "could not serialize access".
    url = _with_settings(postgres_url, default_transaction_isolation=isolation)
    with JobStore.open(url) as js:
        job, _ = js.create(make_input(), T0)
        [running] = js.allocate(ANY, 1, "w1", T0 + 1)
        with _mid_transaction(url) as (other, conn):
            beat = other._each(conn, [job.Id], T0 + 2,
                               lambda _id: rules.Heartbeat("w1", running.lease))  # fmt: skip
            assert beat.wrote
            finish = _Call(lambda: js.finish(job.Id, None, "boom", T0 + 3, lease=running.lease))
            _wait_for_lock_waits(url)
        [finished] = finish.join().jobs
        assert (finished.State, finished.ErrorReason, finished.HeartbeatAt) == (
            "finished",
            "boom",
            T0 + 2,
        )

        second = make_input(seed=8)
        with _mid_transaction(url) as (other, conn):
            made, created = other._create(conn, rules.Create(second), T0 + 4)
            assert created
            create = _Call(lambda: js.create(second, T0 + 5))
            _wait_for_lock_waits(url)
        assert create.join() == (made, False)


def _icu_database(url: str) -> str:
    """A new database beside `url`'s that orders text as people read it (ICU's en-US: `a` before
    `B`), as a database made with a locale such as en_US.UTF-8 does: not as Python sorts it."""
    name = sa.engine.make_url(url).database + "_icu"
    with _session(url) as admin:
        try:
            admin.execute(
                f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu'
                " ICU_LOCALE 'en-US' LOCALE 'C'"
            )
        except psycopg.Error as e:  # before PostgreSQL 15, or built without ICU
            pytest.skip(f"this PostgreSQL server makes no ICU database: {e}")
    return _with_settings(str(sa.engine.make_url(url).set(database=name)))


def test_remove_all_beside_a_heartbeat_of_the_same_jobs_does_not_deadlock(postgres_url):
    # A heartbeat locks its jobs in Python's order of their ids; remove_all locked them all
    # first in the database's order (ORDER BY id), which a locale other than C makes another:
    # each held one job and waited for the other's, and PostgreSQL ended one of them with
    # "deadlock detected" (the heartbeat's worker told the store failed, or the command).
    url = _icu_database(postgres_url)
    with JobStore.open(url) as js:
        for seed in range(64):
            js.create(make_input(seed=seed), T0)
        ids = [job.Id for job in js.list_jobs()]
        with js.engine.connect() as conn:
            in_db = list(conn.execute(sa.text("SELECT unnest(CAST(:ids AS text[])) ORDER BY 1"),
                                      {"ids": ids}).scalars())  # fmt: skip
        # Two jobs the database orders the other way round from Python.
        first, second = next(
            (a, b) for a in ids for b in ids if a < b and in_db.index(b) < in_db.index(a)
        )
        for job_id in ids:
            if job_id not in (first, second):
                js.remove(job_id, T0)
        running = js.allocate(ANY, 2, "w1", T0 + 1)
        assert sorted(job.Id for job in running) == [first, second]

        # The heartbeat holds `first` and is about to read `second` when remove_all starts.
        reached, go = threading.Event(), threading.Event()

        def pause_before_second(_conn, _cursor, statement, parameters, *_args):
            if "FOR UPDATE" in statement and (parameters or {}).get("job_id") == second:
                reached.set()
                assert go.wait(timeout=60)

        with JobStore(url) as beating, JobStore(url) as removing:
            sa.event.listen(beating.engine, "before_cursor_execute", pause_before_second)
            heartbeat = _Call(lambda: beating.heartbeat([first, second], "w1", T0 + 2))
            assert reached.wait(timeout=60)
            remove_all = _Call(lambda: removing.remove_all(T0 + 2))
            _wait_for_lock_waits(url)  # remove_all waits for a job the heartbeat holds
            go.set()
            beat = heartbeat.join()
            removed = remove_all.join()
        assert [type(e) for e in beat.effects] == [rules.HeartbeatAccepted] * 2
        assert sorted(removed) == [first, second]
        assert js.list_jobs() == []


def test_two_producers_making_the_same_jobs_in_other_orders_do_not_deadlock(postgres_url):
    # create_many inserted its jobs in the order given: a producer inserting [B, A] beside one
    # inserting [A, B] held B and waited for A while the other held A and waited for B, and
    # PostgreSQL ended one with "deadlock detected". Both now insert in the order of the ids.
    url = _with_settings(postgres_url)
    low, high = sorted(
        (make_input(seed=1), make_input(seed=2)), key=lambda i: rules.new_job(i, T0).Id
    )
    with JobStore.open(url) as js:
        with _mid_transaction(url) as (other, conn):
            # The other producer has inserted the first of the two, in the order of the ids.
            made_low, created = other._create(conn, rules.Create(low), T0)
            assert created
            creating = _Call(
                lambda: js.create_many([rules.Create(high), rules.Create(low)], T0 + 1)
            )
            _wait_for_lock_waits(url)  # for the other's uncommitted job
            made_high, created = other._create(conn, rules.Create(high), T0)
            assert created
        assert creating.join() == [(made_high, False), (made_low, False)]
        assert sorted(j.Id for j in js.list_jobs()) == sorted((made_low.Id, made_high.Id))


#: The advisory lock the test holds to keep a frozen client's session busy until it is frozen.
_GATE = 7_305_001

#: Another machine's store, in a process of its own: a transaction that reads job argv[2] FOR
#: UPDATE, then waits for the test's _GATE, all in one simple query (BEGIN too: in autocommit,
#: psycopg sends no BEGIN of its own a round trip before), so never idle in between; the
#: server's idle-in-transaction timeout its sessions give themselves is argv[3]. Its wait at the
#: gate has no lock_timeout: under the store's (4 s), a loaded machine could end that wait (and
#: the transaction, with the row's lock) before the test froze the client.
_FROZEN_CLIENT = f"""
import sys
from damocles_ext.jobs import pg_session
from damocles_ext.jobs.store import JobStore

pg_session.PG_SESSION_SETTINGS["idle_in_transaction_session_timeout"] = sys.argv[3]
pg_session.PG_SESSION_SETTINGS["lock_timeout"] = "0"
store = JobStore(sys.argv[1], pool_size=1)
session = store.engine.raw_connection().driver_connection
session.autocommit = True
session.execute(  # no parameters: one simple query, its statements run as one
    "BEGIN; SELECT id FROM dext_wdpost_jobs WHERE id = '" + sys.argv[2] + "' FOR UPDATE;"
    " SELECT pg_advisory_xact_lock({_GATE})"
)
sys.stdin.read()
"""


def _poll(url: str, query: str, *params: Any) -> Any:
    """The first column of `query`'s first row once it is not null: the server's own state."""
    deadline = time.monotonic() + 30
    with _session(url) as watch:
        while (row := watch.execute(query, params).fetchone()) is None or row[0] is None:
            assert time.monotonic() < deadline, f"never true: {query}"
            time.sleep(0.005)  # polling the server's state; the order does not depend on it
    return row[0]


def test_a_job_locked_by_a_client_that_froze_mid_transaction_is_freed_within_its_timeout(
    postgres_url, monkeypatch
):
    # A worker's machine that dies (or is cut off) inside a transaction holding a job's row
    # lock: the server kept its session, idle in transaction, until its own TCP keepalives
    # noticed (about 2 hours), and an operator's reset of that job (or the worker's retry)
    # waited for it as long. Each session of the store now tells the server to end it once idle
    # that long inside a transaction; here the smallest bound, so the reset lands at once.
    bound = 0.1
    # The reset's store waits for the row through the polls, the SIGSTOP, the unlock and the
    # bound: under the default lock_timeout (4 s, two tries) a stall over 8 s failed it.
    monkeypatch.setitem(pg_session.PG_SESSION_SETTINGS, "lock_timeout", "60s")
    with JobStore.open(postgres_url) as js:
        job, _ = js.create(make_input(), T0)
        js.allocate(ANY, 1, "w1", T0 + 1)
    gate = _session(postgres_url)
    gate.execute("SELECT pg_advisory_lock(%s)", (_GATE,))
    client = subprocess.Popen(
        [sys.executable, "-u", "-c", _FROZEN_CLIENT, postgres_url, job.Id, f"{bound * 1000:g}ms"],
        stdin=subprocess.PIPE,
    )
    try:
        # The client holds the job's row and waits at the gate (busy: no idle time counts).
        holder = _poll(
            postgres_url,
            "SELECT min(pid) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s"
            " AND NOT granted",
            _GATE,
        )

        def reset() -> Any:
            with JobStore(postgres_url) as fresh:
                return fresh.reset(job.Id, T0 + 2)

        resetting = _Call(reset)
        _poll(  # the reset waits for the client's row lock
            postgres_url,
            "SELECT min(pid) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
            " AND application_name = 'damocles-ext'",
            holder,
        )
        os.kill(client.pid, signal.SIGSTOP)  # the client's machine is gone: it reads nothing
        opened = time.monotonic()
        gate.execute("SELECT pg_advisory_unlock(%s)", (_GATE,))  # now idle in its transaction
        record = resetting.join()  # the failsafe: 60 s
        took = time.monotonic() - opened
    finally:
        client.kill()
        os.kill(client.pid, signal.SIGCONT)
        client.wait()
        gate.close()
    assert (record.State, record.WorkerName, record.TryNum) == (READY, "", 0)
    assert took >= bound  # the server waited for the client first: it ended the session
