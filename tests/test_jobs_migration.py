"""The job store's life across versions: an older store upgraded at open while other sessions
use it, on the session's real PostgreSQL server (and SQLite where it applies). The old stores are
made with the SQL of their versions (test_jobs_summary.make_old_store)."""

from __future__ import annotations

import itertools
import os
from urllib.parse import quote

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from test_jobs_rules import make_input
from test_jobs_summary import T0, make_old_store

from damocles_ext import cli
from damocles_ext.jobs import database, rules, store
from damocles_ext.jobs.store import (
    JobStore,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
)


def schema_of(url: str) -> tuple[int, list[str]]:
    """The store's schema version and its tables, read without damocles-ext."""
    engine = store.make_engine(url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version FROM dext_schema_version")).scalar_one()
            return version, sorted(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_the_commands_that_only_read_leave_an_older_stores_schema_as_it_is(
    store_url, version, capsys
):
    # An older coordinator may be running on the store: `wdpost list` and `status --jobs` of a
    # newer damocles-ext upgraded its schema under it.
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(store_url, version, job)
    before = schema_of(store_url)
    assert cli.main(["wdpost", "list", "--jobs", store_url]) == 0
    assert job.Id in capsys.readouterr().out
    if version >= 2:  # the workers seen are in the old table: read from there
        assert cli.main(["status", "--jobs", store_url, "--json"]) == 0
        out = capsys.readouterr().out
        assert '"ready2run": 1' in out
        assert '"paused_workers": null' in out  # (none kept before version 5: not known)
    else:  # none kept: the summary cannot be told, and the message says what to do
        assert cli.main(["status", "--jobs", store_url]) == 2
        err = capsys.readouterr().err
        assert (
            f"has schema version 1, older than this damocles-ext's ({store.SCHEMA_VERSION}), and"
            " the summary of"
        ) in err
        assert "`serve --jobs` starts on the store" in err and "status --jobs URL --upgrade" in err
    with JobStore.open(store_url, read_only=True) as s:
        assert s.version == version and s.list_jobs() == [job]
        if version >= 2:  # the worker a coordinator of that version saw
            assert [w.worker for w in s.summary(T0).workers] == ["old"]
    assert schema_of(store_url) == before
    assert cli.main(["status", "--jobs", store_url, "--upgrade", "--json"]) == 0
    assert '"ready2run": 1' in capsys.readouterr().out
    assert schema_of(store_url)[0] == store.SCHEMA_VERSION


def test_the_commands_that_only_read_refuse_a_store_a_newer_damocles_ext_made(store_url, capsys):
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(store_url, 3, job)
    engine = store.make_engine(store_url)
    with engine.begin() as conn:
        conn.execute(store.schema_version.update().values(version=store.SCHEMA_VERSION + 1))
    engine.dispose()
    for command in (["wdpost", "list"], ["status"], ["wdpost", "reset", job.Id]):
        assert cli.main([*command, "--jobs", store_url]) == 2
        assert (
            f"has schema version {store.SCHEMA_VERSION + 1}, newer than this damocles-ext knows"
            f" ({store.SCHEMA_VERSION}): a newer damocles-ext made it; upgrade this one"
        ) in capsys.readouterr().err
    assert schema_of(store_url)[0] == store.SCHEMA_VERSION + 1


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
    assert "cannot upgrade the job store" in message
    assert f"from schema version 2 to {store.SCHEMA_VERSION}" in message
    assert f"for over 5 s (pid {pid} (user postgres, " in message
    assert "idle in transaction since" in message
    assert "it is left at version 2, unchanged" in message and "pg_terminate_backend" in message
    with JobStore.open(postgres_url) as s:  # that session gone, the upgrade goes through
        assert s.schema_version() == store.SCHEMA_VERSION and s.get(job.Id) == job


def test_an_upgrade_held_up_names_the_sessions_on_its_own_tables_not_another_stores(postgres_url):
    # Two stores in one database, each in its schema (a URL with its own search_path): the
    # holders were matched by table name, so a reader of the other store was named too, for the
    # operator to end (pg_terminate_backend) though it held nothing of this one.
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA a")
        admin.execute("CREATE SCHEMA b")
    in_a = f"{postgres_url}&options=-csearch_path%3Da"
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(in_a, 2, job)
    JobStore.open(f"{postgres_url}&options=-csearch_path%3Db").close()
    with psycopg.connect(postgres_url) as other, psycopg.connect(postgres_url) as idle:
        for conn in (other, idle):
            conn.execute("SET idle_in_transaction_session_timeout = '30s'")
        other.execute("SELECT count(*) FROM b.dext_wdpost_jobs")  # the other store's reader
        idle.execute("SELECT count(*) FROM a.dext_wdpost_jobs")  # and this one's
        with pytest.raises(StoreUnavailable) as raised:
            JobStore.open(in_a)
        message = str(raised.value)
        assert f"pid {idle.info.backend_pid} (user " in message, message
        assert f"pid {other.info.backend_pid} " not in message, message


def test_an_upgrade_the_owner_may_not_make_its_new_table_for_says_which_grant(postgres_url):
    # The upgrade to version 4 makes a table: the tables' owner without CREATE on the schema
    # (PostgreSQL 15's default for public, CVE-2018-1058's advice) was told that only the
    # owner may upgrade, to run with the owner's URL: the one it ran with.
    role = f"up{os.getpid()}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    try:
        as_role = make_url(postgres_url).set(username=role).render_as_string(hide_password=False)
        make_old_store(as_role, 3, rules.new_job(make_input(seed=9, miner=1234), T0))
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}")
            admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        with pytest.raises(StoreConfigError) as raised:
            JobStore.open(as_role)
        message = str(raised.value)
        assert "its upgrade makes a table, which the PostgreSQL role" in message, message
        assert f"GRANT CREATE ON SCHEMA public TO {role}" in message, message
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


def test_a_search_path_that_names_no_existing_schema_is_a_mistake_that_says_what_to_do(
    postgres_url,
):
    # Before: "migrate failed: no schema has been selected to create in", exit code 1, as if
    # the store were broken, with nothing said of the search_path or what to do.
    with pytest.raises(StoreConfigError) as raised:
        JobStore.open(f"{postgres_url}&options=-csearch_path%3Ddext_nosuch")
    message = str(raised.value)
    assert message.startswith("cannot create the job store at ")
    assert "none of the schemas on the search_path of the PostgreSQL role 'postgres'" in message
    assert "(search_path: dext_nosuch; " in message
    assert "CREATE SCHEMA name AUTHORIZATION postgres" in message
    assert raised.value.exit_code == 2


def test_a_store_in_a_schema_off_the_search_path_is_neither_made_again_nor_called_missing(
    postgres_url, capsys
):
    # The store's tables land in the first schema of its maker's search_path ("$user" first by
    # default: a role with a schema of its name). Another role, or a URL without that
    # search_path, saw no tables: its coordinator made a second, empty store in public (the
    # producers' jobs never reached its workers) and `wdpost list` said there was no store.
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA dext")
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    with JobStore.open(f"{postgres_url}&options=-csearch_path%3Ddext") as s:
        s.create_many([rules.Create(job.Input, job.DeadlineIdx, job.Partitions)], T0)
    with pytest.raises(StoreConfigError) as raised:
        JobStore.open(postgres_url)
    assert raised.value.exit_code == 2
    message = str(raised.value)
    assert (
        "the database has its tables in schema dext, which is not on the search_path of the"
        " PostgreSQL role 'postgres' (\"$user\", public)"
    ) in message
    assert "add options=-csearch_path%3Ddext to the URL" in message
    assert cli.main(["wdpost", "list", "--jobs", postgres_url]) == 2
    assert "its tables in schema dext" in capsys.readouterr().err
    with psycopg.connect(postgres_url) as conn:  # nothing made in public
        assert conn.execute("SELECT to_regclass('public.dext_wdpost_jobs')").fetchone() == (None,)
    assert (
        cli.main(
            ["wdpost", "list", "--all", "--jobs", f"{postgres_url}&options=-csearch_path%3Ddext"]
        )
        == 0
    )
    assert job.Id in capsys.readouterr().out
    # A URL that names the search_path itself makes a store of its own there, as it did.
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA other")
    with JobStore.open(f"{postgres_url}&options=-csearch_path%3Dother") as s:
        assert s.list_jobs() == []
    # Named as the server reads names: quoted with a comma in it, in capitals, as the role's.
    long = "s" * 70  # cut to 63 bytes, as the server cuts names
    for schema, path in (("a,b", '"a,b"'), ("other2", "Other2"), ("postgres", "$user,public"),
                         ("Ärger", "Ärger"), (long[:63], long)):  # fmt: skip
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'CREATE SCHEMA "{schema}"')
        with JobStore.open(f"{postgres_url}&options=-csearch_path%3D{quote(path)}") as s:
            assert s.list_jobs() == []
    # One whose first schema does not exist (a typo) would make it in the next one, public: a
    # second store beside dext's, which the exception for a named search_path let through.
    with pytest.raises(StoreConfigError, match="its tables in schema "):
        JobStore.open(f"{postgres_url}&options=-csearch_path%3Ddxet,public")
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('public.dext_wdpost_jobs')").fetchone() == (None,)


_roles = itertools.count()


def a_role(postgres_url: str, grant: str = "") -> tuple[str, str]:
    """The URL of a new login role (not the database's owner) on the store's database, and its
    name; given `grant` ('SELECT ON ALL TABLES IN SCHEMA public', ...) when not empty."""
    role = f"r{os.getpid()}_{next(_roles)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        if grant:
            conn.execute(f"GRANT {grant} TO {role}")
    return postgres_url.replace("postgres@", f"{role}@", 1), role


def test_a_role_that_may_not_create_upgrade_or_write_the_store_is_told_what_it_needs(
    postgres_url,
):
    # Before: "migrate failed: permission denied for schema public", exit code 1, nothing said
    # about what the role lacks or what to do.
    url, role = a_role(postgres_url)
    with pytest.raises(StoreConfigError) as raised:
        JobStore.open(url)
    assert str(raised.value).startswith("cannot create the job store at ")
    assert f"the PostgreSQL role {role!r} may not create tables in its database" in str(
        raised.value
    )
    assert f"GRANT CREATE ON SCHEMA public TO {role}" in str(raised.value)
    assert raised.value.exit_code == 2

    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(postgres_url, 3, job)
    url, role = a_role(
        postgres_url, "SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
    )
    with pytest.raises(StoreConfigError) as raised:
        JobStore.open(url)
    assert f"has schema version 3, older than this damocles-ext's ({store.SCHEMA_VERSION})" in str(
        raised.value
    )
    assert f" role {role!r} may not upgrade it (permission denied" in str(raised.value)
    assert "run this damocles-ext once with the owner's URL" in str(raised.value)

    with JobStore.open(postgres_url) as s:  # upgraded by the owner
        assert s.get(job.Id) == job
    url, role = a_role(postgres_url, "SELECT ON ALL TABLES IN SCHEMA public")
    with JobStore.open(url) as s:  # an operator's read-only role reads it
        assert s.get(job.Id) == job
        with pytest.raises(StoreError) as refused:  # and a write says what it lacks
            s.create(make_input(seed=10), T0)
    assert f"the PostgreSQL role {role!r} lacks a privilege on the store's tables: GRANT" in str(
        refused.value
    )
    with pytest.raises(StoreConfigError) as raised:
        JobStore.open(url, writable=True)  # a coordinator's does not get far
    assert f"the PostgreSQL role {role!r} may not write the job store " in str(raised.value)
    assert f"dext_job_workers, dext_job_workers_paused TO {role}, or give the URL of a role" in str(
        raised.value
    )


def test_an_upgrade_grants_the_table_it_makes_to_the_roles_granted_the_jobs_table(
    postgres_url, caplog
):
    # The table version 4 makes was its owner's alone: a coordinator logging in as a role
    # granted the tables of version 3 was refused at open (before that check: it started, and
    # every allocation was refused), until someone granted it the new table by hand.
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(postgres_url, 3, job)
    url, role = a_role(
        postgres_url, "SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
    )
    reader_url, reader = a_role(postgres_url, "SELECT ON ALL TABLES IN SCHEMA public")
    _, granting = a_role(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"GRANT SELECT ON dext_wdpost_jobs TO {granting} WITH GRANT OPTION")
        conn.execute("GRANT TRUNCATE ON dext_wdpost_jobs TO PUBLIC")
    caplog.set_level("INFO", "damocles_ext.jobs")
    JobStore.open(postgres_url).close()  # upgraded by the owner
    assert (
        f"GRANT DELETE, INSERT, SELECT, UPDATE ON dext_job_workers TO {role}, as on"
        " dext_wdpost_jobs (the upgrade made dext_job_workers)"
    ) in caplog.text
    with JobStore.open(url, writable=True) as s:
        [taken] = s.allocate(rules.AllocationSpec((1234,)), 1, "w", T0 + 1)
        assert taken.Id == job.Id
        assert [w.worker for w in s.summary(T0 + 1).workers] == ["old", "w"]  # the new row written
    with psycopg.connect(postgres_url) as conn:
        held = conn.execute(
            "SELECT a.grantee::regrole::text, a.privilege_type, a.is_grantable"
            " FROM pg_class c, aclexplode(c.relacl) a"
            " WHERE c.oid = 'dext_job_workers'::regclass AND a.grantee <> c.relowner"
            " ORDER BY 1, 2"
        ).fetchall()
    assert held == sorted(
        [
            ("-", "TRUNCATE", False),  # PUBLIC
            *[(role, p, False) for p in ("DELETE", "INSERT", "SELECT", "UPDATE")],
            (reader, "SELECT", False),
            (granting, "SELECT", True),
        ]
    )
    with JobStore.open(reader_url, read_only=True) as s:  # an operator's reading role reads
        assert s.summary(T0 + 1).live_workers == 2


def test_an_upgrade_run_by_a_superuser_grants_the_new_table_to_the_owner_of_the_others(
    postgres_url, caplog
):
    # The tables belong to a role of their own, whose coordinator never granted them (their
    # ACL empty: the owner's privileges implicit); a superuser (the DBA) ran the upgrade, and
    # the table it made was the superuser's alone: the owner's coordinator was refused at open.
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    owner_url, owner = a_role(postgres_url, "CREATE ON SCHEMA public")
    make_old_store(owner_url, 3, job)
    caplog.set_level("INFO", "damocles_ext.jobs")
    JobStore.open(postgres_url).close()  # upgraded by the superuser
    assert f"ON dext_job_workers TO {owner}, as on dext_wdpost_jobs" in caplog.text
    with JobStore.open(owner_url, writable=True) as s:
        [taken] = s.allocate(rules.AllocationSpec((1234,)), 1, "w", T0 + 1)
        assert taken.Id == job.Id
        assert [w.worker for w in s.summary(T0 + 1).workers] == ["old", "w"]


def test_a_read_only_open_with_an_open_timeout_still_reads_an_older_store_as_it_is(store_url):
    # The opening waits for locks open_timeout long, then hands back a store of its own: that
    # one took the schema to be this damocles-ext's, and read the workers from a table the
    # older store does not have.
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(store_url, 3, job)
    with JobStore.open(store_url, read_only=True, open_timeout=2.0) as s:
        assert s.version == 3
        assert [w.worker for w in s.summary(T0).workers] == ["old"]
    assert schema_of(store_url)[0] == 3


def test_a_role_granted_only_the_tables_of_version_4_reads_the_summary_of_an_upgraded_store(
    postgres_url,
):
    # The upgraded store keeps the table of version 3 for the coordinators of that version; a
    # monitoring role granted what our GRANT hints list (the tables of version 4) is not granted
    # it, and its summary leaves it out rather than failing on it.
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(postgres_url, 3, job)
    with JobStore.open(postgres_url) as s:
        tables = ", ".join(database.metadata.tables)
    url, _ = a_role(postgres_url, f"SELECT ON {tables}")
    with JobStore.open(url, read_only=True) as s:
        got = s.summary(T0)
        assert [w.worker for w in got.workers] == ["old"]  # carried over into dext_job_workers
        assert (got.jobs["ready2run"], got.unallocatable) == (1, 0)


def test_a_role_granted_the_tables_of_version_4_only_reads_a_summary_without_the_pauses(
    postgres_url,
):
    # A monitoring role granted SELECT on the tables of version 4 only, as a GRANT of before
    # listed them (the upgrade grants its new table to the roles that then hold privileges on
    # the jobs table): its summary says the pauses are not known rather than failing on them.
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(postgres_url, 4, job)
    with JobStore.open(postgres_url) as s:  # upgraded by the owner
        s.worker_seen("old", T0, (1, 2))
    before = [name for name in database.metadata.tables if name != database.workers_paused.name]
    url, _ = a_role(postgres_url, f"SELECT ON {', '.join(before)}")
    with JobStore.open(url, read_only=True) as s:
        got = s.summary(T0)
    assert [(w.worker, w.paused_slots) for w in got.workers] == [("old", None)]
    assert got.paused_workers is None and (got.jobs["ready2run"], got.unallocatable) == (1, 0)
    with JobStore.open(postgres_url, read_only=True) as s:  # the owner reads them
        got = s.summary(T0)
    assert [(w.worker, w.paused_slots, w.slots) for w in got.workers] == [("old", 1, 2)]
    assert got.paused_workers == 1
