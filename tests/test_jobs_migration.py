"""The job store's life across versions: an older store upgraded at open while other sessions
use it, on the session's real PostgreSQL server (and SQLite where it applies). The old stores are
made with the SQL of their versions (test_jobs_summary.make_old_store)."""

from __future__ import annotations

import psycopg
import pytest
from test_jobs_rules import make_input
from test_jobs_summary import T0, make_old_store

from damocles_ext.jobs import rules, store
from damocles_ext.jobs.store import JobStore, StoreUnavailable


def test_an_upgrade_a_session_idle_in_a_transaction_holds_gives_up_naming_it(postgres_url):
    # The upgrade's DROP INDEX waits for every transaction open on the jobs table, and every
    # process on the store waits behind it: an operator's psql left idle in a transaction held
    # the upgrading coordinator, silent, and every running one with it, for as long as it
    # stayed open. The server ends this one after 30 s, so the test cannot hang.
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(postgres_url, 2, job)
    with psycopg.connect(postgres_url) as idle:
        idle.execute("SET idle_in_transaction_session_timeout = '30s'")
        idle.execute("SELECT count(*) FROM dext_wdpost_jobs")  # and its transaction left open
        with pytest.raises(StoreUnavailable) as raised:
            JobStore.open(postgres_url)
        pid = idle.info.backend_pid
    message = str(raised.value)
    assert "cannot upgrade the job store" in message and "from schema version 2 to 4" in message
    assert f"for over 5 s (pid {pid} (user postgres, " in message
    assert "idle in transaction since" in message
    assert "it is left at version 2, unchanged" in message and "pg_terminate_backend" in message
    with JobStore.open(postgres_url) as s:  # that session gone, the upgrade goes through
        assert s.schema_version() == store.SCHEMA_VERSION and s.get(job.Id) == job
