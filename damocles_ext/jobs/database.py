"""The job store's database side: its errors, its tables, URLs and engines (rows <-> records:
rows.py).

One code path for SQLite and PostgreSQL (SQLAlchemy Core); `store.JobStore` runs the operations
on it. Every name here is importable from `damocles_ext.jobs.store` as well.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import sqlite3
import stat
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.util import asbool

from ..errors import DextError, UsageError, not_utf8
from ..tasks import deadline_problem
from . import model, rules
from .mounts import FULL_FIX_READING, no_space_left, out_of_descriptors, read_only_mount
from .pg_hosts import bare_query_problem, several_servers_problem, split_userinfo
from .pg_session import on_connect as _pg_session_setup

#: The schema this code reads and writes. A store at a newer version is refused (a newer
#: damocles-ext made it); an older one is migrated forward at open, in one transaction.
SCHEMA_VERSION = 5
# The versions, for the migration steps (store.JobStore.migrate):
# 1: dext_wdpost_jobs;
# 2: dext_workers added (the workers seen and their allocation filters, for `status --jobs`);
# 3: the index of ready jobs ends with the id, as the allocation order does: the database reads
#    the next job off the index instead of sorting every ready job created in the same second;
# 4: the workers seen in dext_job_workers, keyed by the spec's digest, not the spec (a filter of
#    hundreds of miners passed PostgreSQL's index limit); its rows copied in, dext_workers left;
# 5: dext_job_workers_paused: what each worker's last ping said of its job slots paused
#    (prover failures, an operator), for `status --jobs`.

URL_HELP = (
    "give sqlite:///PATH (a file on this machine; sqlite:////abs/path for an absolute one) or "
    "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
)
DEFAULT_BUSY_TIMEOUT = 30.0
#: The size a SQLite store's write-ahead log file is cut down to when it restarts (bytes). It
#: is checkpointed every 1,000 pages (SQLite's default, about 4 MB), but grows past that for as
#: long as another connection reads an old snapshot (a `sqlite3` shell left in a transaction, a
#: backup) and, without a limit, keeps its largest size while any connection stays open.
SQLITE_WAL_SIZE_LIMIT = 16 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 10
#: libpq's TCP settings for every connection (a URL's own query parameters win): a server that
#: stops answering (its host down, the network cut) fails the call within about 30 s instead of
#: leaving it waiting for ever: keepalive probes after 10 s of silence, 5 s apart, 3 lost; data
#: sent and not acknowledged for 30 s.
PG_TCP_SETTINGS: Final = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
# Rows one sweep or cleanup pass changes at most (damocles: 128); the caller runs another pass
# when a pass was full.
DEFAULT_PASS_LIMIT = 1000


class StoreError(DextError):
    """The job store failed (unreachable, or an error from the database): exit code 1."""


class StoreUnavailable(StoreError):
    """The store could not be reached, or did not answer: nothing was read or written that its
    caller heard of (what the caller was told by others in the meantime may have been lost)."""


class StoreTakesNoWrites(StoreUnavailable):
    """The store refused a write (its file system full, or the file read-only) and may still
    answer reads: only a write that lands says it is available again."""


class StoreConfigError(StoreError, UsageError):
    """A bad store URL, or a store this version cannot use: exit code 2."""


class StoreConflict(StoreError):
    """A row changed between our read and our write; the caller may retry the operation."""


class InvalidJob(UsageError):
    """A job that cannot be stored as given (a value out of range, a deadline that is no time)."""


class JobNotFound(StoreError):
    def __init__(self, job_id: str) -> None:
        # damocles' words for it, which its CLI and RPC clients print.
        super().__init__(f"job '{job_id}' does not exist")
        self.job_id = job_id


metadata = sa.MetaData()

# Table names carry our prefix: a PostgreSQL database may be shared with other programs.
schema_version = sa.Table(
    "dext_schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

jobs = sa.Table(
    "dext_wdpost_jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("deadline_idx", sa.BigInteger, nullable=False),
    sa.Column("partitions", sa.Text, nullable=False),  # JSON, "null" for none
    sa.Column("input", sa.Text, nullable=False),  # JSON, damocles' form
    sa.Column("miner_id", sa.BigInteger, nullable=False),  # from input, for allocation filters
    sa.Column("proof_type", sa.Text, nullable=False),  # likewise
    sa.Column("output", sa.Text, nullable=True),  # JSON
    sa.Column("try_num", sa.BigInteger, nullable=False),
    sa.Column("error_reason", sa.Text, nullable=False),
    sa.Column("worker_name", sa.Text, nullable=False),
    sa.Column("started_at", sa.BigInteger, nullable=False),
    sa.Column("heartbeat_at", sa.BigInteger, nullable=False),
    sa.Column("finished_at", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("lease", sa.Text, nullable=True),
    sa.Column("not_after", sa.Float, nullable=True),
    sa.Column("cancelled_at", sa.BigInteger, nullable=False),
    sa.Index("dext_wdpost_jobs_ready", "state", "not_after", "created_at", "id"),
)
#: The index of schema versions 1 and 2, which version 3 replaces.
OLD_READY_INDEX = "dext_wdpost_jobs_state"

# Each worker that asked for jobs, once per allocation spec it used (a worker's threads may have
# different filters), and when it was last seen: what tells which ready jobs no live worker may
# take. In the store, not in memory, so every coordinator on a shared database sees every worker.
# The spec is keyed by its digest: a key of PostgreSQL's index takes 2,704 bytes at most, and a
# worker may filter by hundreds of miners. (Versions 2 and 3 kept them in OLD_WORKERS, keyed by
# the spec itself: a table of another name, so that a coordinator of that version still running
# on the store while another is upgraded goes on with its own.)
OLD_WORKERS = "dext_workers"
workers = sa.Table(
    "dext_job_workers",
    metadata,
    sa.Column("worker", sa.Text, primary_key=True),
    sa.Column("spec_digest", sa.Text, primary_key=True),  # summary.spec_digest of the spec
    sa.Column("spec", sa.Text, nullable=False),  # summary.spec_key: canonical JSON
    sa.Column("last_seen", sa.Float, nullable=False),
)

# What each worker's last ping (damocles' WorkerPing, its Summary) said of its job slots: how
# many are paused (no job on them), of how many, and when (a worker that asked for jobs before;
# written when it changes, else at most once in 10 s). In the store, so that `status --jobs`
# shows what the coordinator that took the ping heard.
workers_paused = sa.Table(
    "dext_job_workers_paused",
    metadata,
    sa.Column("worker", sa.Text, primary_key=True),
    sa.Column("paused", sa.BigInteger, nullable=False),
    sa.Column("slots", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

# --- URLs and engines ---------------------------------------------------------------------------


def describe_url(url: str | URL) -> str:
    """The URL for messages and logs, its password hidden."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        return "<unparsable URL>"
    # libpq takes the password (and a client key's passphrase) as query parameters too.
    head, mark, query = parsed.render_as_string(hide_password=True).partition("?")
    return head + mark + _PASSWORD_PARAMETER.sub(r"\1***", query)


#: A password in a URL's query string (after the '?'): libpq's password= and sslpassword=.
_PASSWORD_PARAMETER = re.compile(r"(?i)((?:^|&)(?:ssl)?password=)[^&]*")


def _password_hidden(url: str) -> str:
    """`url`, which SQLAlchemy cannot parse, for a message: what may be its password written ***
    (from the first ':' of the user info to its end, pg_hosts.split_userinfo, and a password=
    parameter)."""
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    userinfo, after = split_userinfo(rest)
    if userinfo is not None and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{after}"
    head, mark, query = rest.partition("?")
    query = _PASSWORD_PARAMETER.sub(r"\1***", query)
    return f"{scheme}{sep}{head}{mark}{query}"


def parse_url(url: str) -> URL:
    """A store URL as SQLAlchemy takes it: `postgresql://` means psycopg 3; only the two engines.

    Raises StoreConfigError saying what is wrong with the URL and what to give instead."""
    if (bad := not_utf8(url)) is not None:
        # An argument with bytes that are not UTF-8 (a file name in another encoding): neither
        # SQLite nor PostgreSQL takes it, and quoting it into a message fails as well.
        # Not quoted: the URL may hold a password, and it cannot be parsed to hide it.
        raise StoreConfigError(
            f"the job store URL is not UTF-8 text: {bad} is not, and a store's file name,"
            f" database, user and password must be; rename the file, or {URL_HELP}"
        )
    if url.startswith("postgres") and (problem := several_servers_problem(url)):
        raise StoreConfigError(f"job store URL {_password_hidden(url)!r}: {problem}")
    if problem := bare_query_problem(url):
        raise StoreConfigError(f"job store URL {_password_hidden(url)!r} {problem}; {URL_HELP}")
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        shown = _password_hidden(url)
        raise StoreConfigError(f"job store URL {shown!r} is not a URL: {URL_HELP}") from None
    except ValueError as why:  # a port that is not a number, an unclosed [IPv6 address]
        raise StoreConfigError(
            f"job store URL {_password_hidden(url)!r} is not a valid URL ({why}): {URL_HELP}"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        from psycopg.pq import Conninfo

        # libpq refuses another name only as the first connection is made, in words that read as
        # an outage (exit code 1).
        options = {d.keyword.decode() for d in Conninfo.get_defaults()}
        if unknown := sorted(set(parsed.query) - options):
            raise StoreConfigError(
                f"job store URL {describe_url(parsed)!r}: PostgreSQL takes no {unknown[0]!r}"
                " parameter; the query parameters are libpq's connection options (sslmode,"
                f" connect_timeout, application_name, ...): check its spelling ({URL_HELP})"
            )
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        if parsed.database in (None, "", ":memory:"):
            raise StoreConfigError(
                f"job store URL {describe_url(parsed)!r} names no file: an in-memory SQLite "
                f"store is lost with the process and cannot be shared; {URL_HELP}"
            )
        unknown = sorted(set(parsed.query) - PYSQLITE_PARAMETERS)
        if unknown and not sqlite_uri(parsed):
            # SQLAlchemy would warn and drop it: a mode=ro asked for would not be had.
            raise StoreConfigError(
                f"job store URL {describe_url(parsed)!r}: SQLite takes no {unknown[0]!r} here;"
                " its URI parameters (such as mode=ro) go with uri=true and the file given as"
                f" sqlite:///file:/PATH?mode=ro&uri=true; {URL_HELP}"
            )
        return parsed.set(drivername="sqlite+pysqlite")
    raise StoreConfigError(
        f"job store URL {describe_url(parsed)!r}: {parsed.drivername!r} is not supported "
        f"(SQLite and PostgreSQL through psycopg 3 are); {URL_HELP}"
    )


def _sqlite_setup(engine: Engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" below issue the BEGIN: pysqlite's own is a deferred one,
        # which lets two writers both read and then fail to upgrade their locks.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute(f"PRAGMA journal_size_limit = {SQLITE_WAL_SIZE_LIMIT}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A store opened to read only begins deferred: its reads take no write lock, and WAL
        # lets them read beside a writer (`wdpost list` waited on a writer's transaction, and
        # held the writers up while it read).
        reads_only = conn.get_execution_options().get(READS_ONLY, False)
        conn.exec_driver_sql("BEGIN" if reads_only else "BEGIN IMMEDIATE")


#: The execution option of an engine whose SQLite transactions only read (`reads_only`).
READS_ONLY = "dext_reads_only"


def reads_only(engine: Engine) -> Engine:
    """`engine` for a store opened to read only: on SQLite its transactions begin deferred."""
    return engine.execution_options(**{READS_ONLY: True})


def pg_tcp_settings(url: URL) -> dict[str, int]:
    """PG_TCP_SETTINGS less those `url` sets itself (its own win)."""
    return {k: v for k, v in PG_TCP_SETTINGS.items() if k not in url.query}


def make_engine(url: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                connect_timeout: int = DEFAULT_CONNECT_TIMEOUT, pool_size: int = 8,
                read_only: bool = False) -> Engine:  # fmt: skip
    """An engine for a store URL (not yet connected); `read_only`: a store opened to read only
    (on SQLite its transactions begin deferred: `reads_only`)."""
    parsed = parse_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = sa.create_engine(
                parsed,
                connect_args={"timeout": busy_timeout, "check_same_thread": False},
                pool_size=pool_size,
                max_overflow=pool_size,
            )
            _sqlite_setup(engine, busy_timeout)
            return reads_only(engine) if read_only else engine
        tcp = pg_tcp_settings(parsed)
        engine = sa.create_engine(
            parsed,
            connect_args={
                "connect_timeout": connect_timeout,
                "application_name": "damocles-ext",
                # libpq's default is the database's encoding: in a LATIN1 database, psycopg
                # itself failed to encode other text (UnicodeEncodeError, no StoreError). The
                # server converts, and refuses what its encoding cannot hold (22P05).
                "client_encoding": "UTF8",
                **tcp,
            },
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            # The store's rules hold at READ COMMITTED (a row read FOR UPDATE after a wait is
            # the row as committed, an insert that met another's reads it): a database or role
            # whose default_transaction_isolation is higher failed ordinary races (a finish
            # beside a heartbeat, two producers making one job) with serialization errors.
            isolation_level="READ COMMITTED",
        )
        _pg_session_setup(engine, parsed, describe_url(parsed))  # the server's side: pg_session.py
        return engine
    except (exc.ArgumentError, ValueError, TypeError) as why:  # e.g. ?timeout=abc
        raise StoreConfigError(
            f"job store URL {describe_url(parsed)!r}: {why}; check its query parameters"
            f" ({URL_HELP})"
        ) from None


# --- rows and records ---------------------------------------------------------------------------


def check_create(event: rules.Create) -> None:
    try:
        model.check_input(event.input)
    except ValueError as e:
        raise InvalidJob(str(e)) from None
    if not 0 <= event.deadline_idx <= model.I64_MAX:
        raise InvalidJob(f"bad job: DeadlineIdx {event.deadline_idx} is out of range")
    if event.partitions is not None and not all(0 <= p <= model.I64_MAX for p in event.partitions):
        raise InvalidJob(f"bad job: a partition index in {list(event.partitions)} is out of range")
    if event.not_after is not None and (problem := deadline_problem(event.not_after)):
        # (Out of the years 0001-9999 it broke every sweep, which formats the deadline.)
        raise InvalidJob(f"bad job: not_after {event.not_after!r} {problem}; give a unix time")


# --- the store ----------------------------------------------------------------------------------


def is_unreachable(error: exc.DBAPIError) -> bool:
    """A failure to reach or open the database, as opposed to an error of one statement."""
    if error.connection_invalidated:
        return True
    # psycopg: class 08 is a connection exception, 57P0x the server shutting down; a deadlock
    # (40P01) or a lock timeout is an OperationalError too, but the server was reached.
    # 53300 (too_many_connections) is a login refused for want of a free connection.
    sqlstate = getattr(error.orig, "sqlstate", None)
    if sqlstate is not None:
        return bool(sqlstate.startswith(("08", "57P", PG_TOO_MANY_CONNECTIONS)))
    # sqlite3: the file cannot be opened, read or locked; not an error of one statement.
    code = getattr(error.orig, "sqlite_errorname", None)
    if code is not None:
        return bool(code.startswith(_SQLITE_UNREACHABLE))
    # psycopg has no SQLSTATE before a connection exists.
    return isinstance(error, exc.OperationalError)


_SQLITE_UNREACHABLE = (
    "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_NOTADB", "SQLITE_READONLY",
    "SQLITE_PERM", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CORRUPT",
)  # fmt: skip


#: The PostgreSQL server was reached and refused the login: the URL's user, password or database
#: is wrong (libpq gives no SQLSTATE before a connection exists; this is the server's text).
_LOGIN_REFUSED = re.compile(
    r"password authentication failed|role \".*\" does not exist|database \".*\" does not exist"
    r"|no pg_hba\.conf entry|no password supplied|(?:Ident|Peer) authentication failed"
    r"|permission denied for database"
)


#: PostgreSQL's SQLSTATE too_many_connections: its max_connections, or the CONNECTION LIMIT of
#: the URL's role or database, reached.
PG_TOO_MANY_CONNECTIONS: Final = "53300"
#: PostgreSQL's words for it (libpq gives no SQLSTATE before a connection exists): the server's
#: max_connections reached, or a role's or a database's CONNECTION LIMIT (its kind and name).
_NO_SLOT_LEFT = re.compile(
    r"too many clients|remaining connection slots are reserved"
    r"|too many connections for (role|database) \"([^\"]*)\""
)


def no_slot_left(error: exc.DBAPIError) -> tuple[str, str] | None:
    """Whether PostgreSQL refused the login of `error` for want of a free connection: ('', '')
    for its max_connections, (kind, name) for the CONNECTION LIMIT of a 'role' or a 'database';
    None when it did not."""
    found = _NO_SLOT_LEFT.search(str(error.orig))
    if found is None and getattr(error.orig, "sqlstate", None) != PG_TOO_MANY_CONNECTIONS:
        return None
    return (found[1], found[2]) if found is not None and found[1] else ("", "")


#: libpq refusing the value of one of the URL's parameters (sslmode=bogus, port=99999).
_BAD_PARAMETER = re.compile(r"\binvalid (?:[a-z_]+ value|port number): ")


def bad_parameter(error: BaseException | None) -> bool:
    """Whether `error` (a database error) is libpq refusing the value of a URL parameter."""
    orig = error.orig if isinstance(error, exc.DBAPIError) else None
    return orig is not None and bool(_BAD_PARAMETER.search(str(orig)))


def login_refused(error: BaseException | None) -> bool:
    """Whether `error` (a database error) is a PostgreSQL server refusing the URL's login."""
    orig = error.orig if isinstance(error, exc.DBAPIError) else None
    return orig is not None and bool(_LOGIN_REFUSED.search(str(orig)))


#: What to do about a SQLite store this user cannot read.
READ_FIX = (
    "check that this user may read the file and write its directory (a store in WAL mode needs"
    " its -wal and -shm files)"
)


#: What to do about an I/O error of a SQLite store on a file system that is not full.
IO_ERROR_FIX = (
    "its file system may be over a quota or failing, or this process over its file size limit"
    " (ulimit -f, systemd's LimitFSIZE): check the quota, the limits and the kernel log"
)
#: SQLite's I/O errors of a write: the store may still answer reads.
_IOERR_OF_WRITES: Final = frozenset(
    {"SQLITE_IOERR_WRITE", "SQLITE_IOERR_FSYNC", "SQLITE_IOERR_DIR_FSYNC",
     "SQLITE_IOERR_TRUNCATE", "SQLITE_IOERR_SHMSIZE"}
)  # fmt: skip


#: What to do about a SQLite store whose file is damaged (cut short, overwritten).
DAMAGED_FIX = "restore it from a backup, or move it away to start a new store (its jobs are lost)"


#: The query parameters SQLAlchemy's pysqlite dialect takes itself (SQLite URI ones need uri).
PYSQLITE_PARAMETERS: Final = frozenset(
    {"timeout", "uri", "isolation_level", "detect_types", "check_same_thread", "cached_statements"}
)


def sqlite_uri(url: URL) -> bool:
    """Whether a SQLite URL gives its file as a SQLite URI (uri=true, as SQLAlchemy reads it)."""
    value = url.query.get("uri")
    return isinstance(value, str) and asbool(value)


def sqlite_file(url: URL) -> Path:
    """The file of a SQLite store's URL (its database part, or the path of a file: URI)."""
    database = url.database or ""
    if sqlite_uri(url) and database.startswith("file:"):
        return Path(urlsplit(database).path)
    return Path(database)


def a_mistake_at_open(error: BaseException | None, url: URL) -> bool:
    """Whether `error`, met opening the store at `url`, is a mistake in the URL rather than an
    outage: a login the PostgreSQL server refuses, a file that is not an SQLite database, a
    directory that does not exist."""
    if login_refused(error) or bad_parameter(error):
        return True
    if url.get_backend_name() != "sqlite" or not isinstance(error, exc.DBAPIError):
        return False
    code = getattr(error.orig, "sqlite_errorname", "")
    path = sqlite_file(url)
    return code == "SQLITE_NOTADB" or is_dir(path) is not False or not is_dir(path.parent)


def is_dir(path: Path) -> bool | None:
    """Whether `path` is a directory; None when this user may not look (a directory on the way
    it may not enter), where Path.is_dir() would raise."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None


def sqlite_store_problem(path: Path, where: str) -> str | None:
    """Why there is no job store in the SQLite file at `path` (`where` names it), or None;
    read-only: a file that is not one (another program's database) is left as it was."""
    try:
        st = path.stat()
    except FileNotFoundError:
        relative = (
            ""
            if path.is_absolute()
            else (
                f" ({path} is relative to the current directory: sqlite:/// then a relative path;"
                f" an absolute one takes four slashes, sqlite:////var/lib/...)"
            )
        )
        return f"there is no job store at {where}: no such file{relative}; check the URL"
    except OSError as error:  # a directory on the way this user may not enter
        return f"cannot read the job store at {where} ({error.strerror}): {READ_FIX}"
    if not stat.S_ISREG(st.st_mode):
        return f"there is no job store at {where}: it is not a regular file; check the URL"
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            found = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                (schema_version.name,),
            ).fetchone()
    except sqlite3.DatabaseError as error:
        code = getattr(error, "sqlite_errorname", "")
        if code.startswith("SQLITE_CORRUPT"):
            return f"the job store at {where} is damaged ({error}): {DAMAGED_FIX}"
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return (
                f"the job store at {where} is locked by another process ({error}): try again, or"
                " find what holds it"
            )
        if code == "SQLITE_NOTADB":
            return f"there is no job store at {where}: the file is not an SQLite database ({error}); check the URL"
        if mount := read_only_mount(path):
            return f"cannot read the job store at {where} ({error}): {mount}"
        if code.startswith("SQLITE_IOERR") and no_space_left(path):
            return f"cannot read the job store at {where} ({error}): {FULL_FIX_READING}"
        if code.startswith("SQLITE_IOERR"):
            return (
                f"cannot read the job store at {where} ({error}, {code}): SQLite could not make"
                f" or use the -shm file beside it: {IO_ERROR_FIX}"
            )
        # Another user's store (0600), or a WAL store whose -shm this user cannot make.
        return f"cannot read the job store at {where} ({error}): {READ_FIX}"
    if found is None:
        return f"there is no job store at {where}: the database has no job tables; check the URL"
    return None


#: PostgreSQL's SQLSTATE insufficient_privilege ("permission denied for ...").
PG_NO_PRIVILEGE: Final = "42501"


#: The privileges a coordinator and serve --jobs use on each of the store's tables.
PG_PRIVILEGES: Final = ("SELECT", "INSERT", "UPDATE", "DELETE")


def grant_hint(grantee: str) -> str:
    """The GRANT that gives `grantee` every privilege of PG_PRIVILEGES on the store's tables."""
    return f"GRANT {', '.join(PG_PRIVILEGES)} ON {', '.join(metadata.tables)} TO {grantee}"


def pg_role(url: URL) -> str:
    """The PostgreSQL role a URL logs in as (libpq's default: $PGUSER, else this user's name)."""
    return url.username or os.environ.get("PGUSER") or getpass.getuser()


def first_line(error: Exception) -> str:
    """The first line of a database error's text (the driver's own, under SQLAlchemy's), or its
    type when it has none."""
    orig = error.orig if isinstance(error, exc.DBAPIError) else None
    text = str(orig) if orig is not None else str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


#: PostgreSQL's SQLSTATEs of a write refused by a server that still answers reads: disk_full,
#: read_only_sql_transaction; and what to do.
_PG_WRITES_REFUSED: Final = {
    "53100": "the PostgreSQL server's disk is full: free some space there",
    "25006": "the PostgreSQL server takes no writes (a standby, or default_transaction_read_only"
    " set): give the URL of the primary",
}


def store_failure(where: str, url: URL, operation: str, error: exc.DBAPIError) -> StoreError:
    """The StoreError for a database failure of `operation` on the store at `where` (its URL
    `url`): what went wrong and what to do about it; StoreUnavailable when the database could
    not be reached or opened, as opposed to an error of one statement."""
    what = first_line(error)
    if (fix := _PG_WRITES_REFUSED.get(getattr(error.orig, "sqlstate", None) or "")) is not None:
        return StoreTakesNoWrites(f"cannot write to the job store {where}: {what}; {fix}")
    if not is_unreachable(error):
        hint = ""
        if getattr(error.orig, "sqlstate", None) == "42P01" or "no such table" in str(error.orig):
            hint = (
                "; the store's tables are gone (its database dropped or emptied?): restart"
                " damocles-ext to make them again, or give the URL of the store"
            )
        elif getattr(error.orig, "sqlstate", None) == "22P05":  # untranslatable_character
            hint = (
                "; the PostgreSQL database's encoding cannot hold that text: give the URL of a"
                " database created WITH ENCODING 'UTF8'"
            )
        elif getattr(error.orig, "sqlstate", None) == PG_NO_PRIVILEGE:
            hint = (
                f"; the PostgreSQL role {pg_role(url)!r} lacks a privilege on the store's tables:"
                f" {grant_hint('it')}, or give the URL of a role that has them"
            )
        return StoreError(f"job store {where}: {operation} failed: {what}{hint}")
    if url.get_backend_name() == "postgresql" and login_refused(error):
        return StoreUnavailable(
            f"the PostgreSQL server of the job store {where} refused the login: {what}; check"
            " the user, the password (or the pgpass file) and the database in the URL"
        )
    if url.get_backend_name() == "postgresql" and bad_parameter(error):
        return StoreUnavailable(
            f"the job store URL {where} has a value libpq refuses ({what}): check its port and"
            " query parameters against libpq's connection options"
        )
    if url.get_backend_name() == "postgresql" and (full := no_slot_left(error)) is not None:
        limited, name = full
        if limited:  # ALTER names it as an SQL identifier: quoted unless lower case
            ident = name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else f'"{name}"'
            return StoreUnavailable(
                f"the PostgreSQL {limited} {name!r} of the job store {where} has as many connections"
                f" as its CONNECTION LIMIT allows ({what}): raise it (ALTER {limited.upper()}"
                f" {ident} CONNECTION LIMIT n), or lower what holds connections"
                f" {'as that role' if limited == 'role' else 'to that database'}"
                " (a damocles-ext process keeps up to 16 in its pool)"
            )
        return StoreUnavailable(
            f"the PostgreSQL server of the job store {where} takes no more connections ({what}):"
            " raise its max_connections (a damocles-ext process keeps up to 16 in its pool), or"
            " stop what holds them"
        )
    if url.get_backend_name() == "postgresql":
        return StoreUnavailable(
            f"cannot reach the job store {where}: {what}; check that the PostgreSQL server is"
            " running and reachable from here, and the user, password and database in the URL"
        )
    code = getattr(error.orig, "sqlite_errorname", "")
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StoreUnavailable(
            f"the job store {where} stayed locked by another process for longer than the busy"
            f" timeout ({what}): find what holds it (a stuck process, or a file system without"
            " working locks, such as some network mounts)"
        )
    if code == "SQLITE_NOTADB":
        return StoreUnavailable(
            f"cannot open the job store {where}: the file is not an SQLite database ({what});"
            " give the URL of a job store, or of a file that does not exist yet"
        )
    if code.startswith("SQLITE_READONLY"):
        fix = read_only_mount(sqlite_file(url)) or (
            "it is read-only here: make the file and its directory writable by this user (and no"
            " mode=ro in the URL)"
        )
        return StoreTakesNoWrites(f"cannot write to the job store {where}: {what}; {fix}")
    if code.startswith("SQLITE_CORRUPT"):
        return StoreUnavailable(f"the job store {where} is damaged ({what}): {DAMAGED_FIX}")
    # A full disk is SQLITE_FULL, or an I/O error where SQLite grew its -shm file (or fsync'd).
    if code == "SQLITE_FULL" or (
        code.startswith("SQLITE_IOERR") and no_space_left(sqlite_file(url))
    ):
        return StoreTakesNoWrites(
            f"cannot write to the job store {where}: {what}; the file system that holds it is"
            " full: free some space there"
        )
    if code.startswith("SQLITE_IOERR"):  # not a permission: the file was opened, or the -shm made
        kind = StoreTakesNoWrites if code in _IOERR_OF_WRITES else StoreUnavailable
        return kind(f"the job store {where} met an I/O error ({what}, {code}): {IO_ERROR_FIX}")
    path = sqlite_file(url)
    parent = path.parent
    if code.startswith("SQLITE_CANTOPEN") and (files := out_of_descriptors(path)):
        hint = f"no file could be opened: {files}"
    elif is_dir(path):
        hint = (
            f"{str(path)!r} is a directory: give the path of a file in it (e.g. {path / 'jobs.db'})"
        )
    elif is_dir(path.parent) is None or is_dir(path) is None:
        hint = (
            f"this user may not enter its directory {str(parent)!r} (or one above it): check"
            " their mode and owner"
        )
    elif not is_dir(parent):
        hint = f"its directory {str(parent)!r} does not exist: create it"
    elif mount := read_only_mount(path):
        hint = mount
    else:
        hint = "check that the file and its directory are writable by this user"
    return StoreUnavailable(f"cannot open the job store {where}: {what}; {hint}")
