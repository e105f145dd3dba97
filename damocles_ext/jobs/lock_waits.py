"""A statement of the job store that waited for a lock longer than its session's lock_timeout
(pg_session.PG_SESSION_SETTINGS; SQLSTATE 55P03 lock_not_available): the sessions that held
it, and the error that names them and says what to do.

A transaction of the store holds a job's row for milliseconds, and a sweep pass over 1000 jobs
(its limit) holds its rows about 0.6 s plus its round trips, about 2000 (a write and a NOTIFY
per job changed): about a second on a LAN. That is what the default lock_timeout assumes: on a
link over about 3 ms a round trip, raise it through the URL's options. So a wait of seconds
means another session that is not ours and stays alive (an operator's psql left inside BEGIN
after a SELECT ... FOR UPDATE or an UPDATE, a change by hand), or one of ours that is stuck
(frozen: the server ends it after its idle-in-transaction timeout) or slowed (an overloaded
server or disk). At COMMIT, the one lock waited for is PostgreSQL's NOTIFY lock: every
transaction that notifies (ours do, to wake the producers) takes one lock of the whole server at
its COMMIT, held until that commit is flushed, so a slow flush (a disk, a synchronous standby)
makes the next ones wait. Without the bound the statement waited as long as the lock was held:
a trio caller gave up after its call timeout, but its thread could not be stopped and kept a
slot of the store's small thread limiter, so a few such calls stalled every call of the
process."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection, Engine

from ..wording import some_and_more
from . import pg_session
from .database import StoreUnavailable, first_line, jobs, metadata, workers

#: PostgreSQL's SQLSTATE lock_not_available: a lock waited for over lock_timeout (or NOWAIT).
LOCK_NOT_AVAILABLE: Final = "55P03"
#: Tries of an operation at most while its statements wait past lock_timeout: once more, for a
#: holder of ours slower than usual; a holder still there is not waited for again (each wait
#: holds a thread of the store: two waits of the default 4 s stay inside a worker's 10 s RPC
#: timeout, so it hears why). Not a bound on the call's time: lock_timeout holds for each lock
#: a statement acquires, and one queued behind another waiter for a row waits for its tuple
#: lock, then for the holder's transaction: up to about 16 s in all.
LOCK_ATTEMPTS: Final = 2

#: What is said of a session: whether it is one of damocles-ext's (our engine's application
#: name, the URL's when it sets one, or damocles-ext's own: its listener's too).
_SESSIONS = (
    "SELECT a.pid, a.usename, a.application_name, a.client_addr, a.state, a.xact_start,"
    " left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120) AS query,"
    " (a.application_name = current_setting('application_name')"
    " OR a.application_name LIKE 'damocles-ext%') AS ours"
    " FROM pg_stat_activity a"
    " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
)
#: The lock modes on a table that no row lock, UPDATE or DELETE waits for: ACCESS SHARE (a
#: plain read's) and SHARE UPDATE EXCLUSIVE (VACUUM's, ANALYZE's, CREATE INDEX CONCURRENTLY's);
#: every other mode conflicts with one of theirs.
_NOT_WAITED_FOR = "('AccessShareLock', 'ShareUpdateExclusiveLock')"
#: Seconds a read of a job's row or a look at its holders waits for a lock on the whole table.
TABLE_LOCK_WAIT: Final = 0.1
_TABLE_LOCK_WAIT_MS = f"{round(TABLE_LOCK_WAIT * 1000)}ms"
#: Seconds a look at the holders of held rows is waited for (its caller's bound: each of its
#: statements' too).
LOOK_TIMEOUT: Final = 1.0

#: Those in a transaction since before a wait of ours began.
_COLUMNS = (
    _SESSIONS + " AND a.xact_start <= now() - CAST(current_setting('lock_timeout') AS interval)"
)

#: The transaction that holds job :job_id's row: a row locked (FOR UPDATE), updated or deleted
#: by a transaction carries its xid in xmax. A plain read of it waits for no row lock, but for
#: a lock on the whole table (ALTER TABLE, LOCK TABLE, VACUUM FULL): read only after a wait for
#: a job's row, under _XMAX_WAIT.
_XMAX = sa.text("SELECT CAST(xmax AS text) FROM " + jobs.name + " WHERE id = :job_id")
_XMAX_WAIT = sa.text(f"SET LOCAL lock_timeout = '{_TABLE_LOCK_WAIT_MS}'")
#: The session whose transaction is :xmax, exactly. A row locked by several transactions at
#: once carries a multixact id instead, which names none of them (and might equal an unrelated
#: xid): the session must also hold a lock on the jobs table, as every locker of one of its rows
#: does. Nothing found: the guess below.
_HOLDS_ROW = (
    " AND a.backend_xid = {xmax}"
    " AND EXISTS (SELECT 1 FROM pg_locks l"
    " WHERE l.pid = a.pid AND l.granted AND l.relation = {table})"
)
_ROW_HOLDER = sa.text(
    _COLUMNS + _HOLDS_ROW.format(xmax="CAST(:xmax AS xid)", table="to_regclass(:table)")
)

#: The table of OID {oid}, as an SQL literal of its name qualified by its schema.
_QUALIFIED = (
    "(SELECT quote_literal(quote_ident(n.nspname) || '.' || quote_ident(c.relname))"
    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = {oid})"
)
#: The jobs table as the store's sessions find it (by their search_path).
_JOBS_TABLE = sa.text("SELECT " + _QUALIFIED.format(oid="to_regclass(:name)"))

#: The rows :ids held now (a heartbeat passed over them), each with the session that holds it
#: when its xmax names one exactly (as _ROW_HOLDER, whenever its transaction began), and
#: whether another session (a prepared transaction too) holds a lock on the jobs table that a
#: row lock, an UPDATE or a DELETE takes (none: no row can be held): one statement for all of
#: them, none of whose locks it waits for (a plain read).
_ROW_HOLDERS = sa.text(
    "SELECT j.id, quote_ident(current_user) AS role,"
    " pg_has_role('pg_read_all_stats', 'USAGE') AS sees_all,"
    + _QUALIFIED.format(oid="j.tableoid")
    + " AS jobs_table, EXISTS (SELECT 1 FROM pg_locks l WHERE l.relation = j.tableoid"
    " AND l.granted AND l.pid IS DISTINCT FROM pg_backend_pid() AND l.mode NOT IN "
    + _NOT_WAITED_FOR
    + ") AS table_locked,"
    " h.* FROM "
    + jobs.name
    + " j LEFT JOIN LATERAL ("
    + _SESSIONS
    + _HOLDS_ROW.format(xmax="j.xmax", table="j.tableoid")
    + ") h ON true"
    " WHERE j.id = ANY(CAST(:ids AS text[]))"
)
#: Of the rows :ids, those no session holds any more (locked by this look for a moment, in its
#: own transaction, rolled back at once: a heartbeat or a sweep meanwhile passes over such a
#: row; read only while another session holds a lock on the table, as one sharing a row does).
_FREE_ROWS = sa.text(
    "SELECT id FROM " + jobs.name + " WHERE id = ANY(CAST(:ids AS text[])) FOR UPDATE SKIP LOCKED"
)
#: The look's bounds: TABLE_LOCK_WAIT for a lock on the whole table, LOOK_TIMEOUT for each
#: statement.
_LOOK_BOUNDS = sa.text(
    f"SELECT set_config('lock_timeout', '{_TABLE_LOCK_WAIT_MS}', true),"
    f" set_config('statement_timeout', '{round(LOOK_TIMEOUT * 1000)}ms', true)"
)

#: A lock of session `a` on one of the tables :names (as the store's sessions find them: by
#: their search_path, not another schema's of the same name) that one of our statements can
#: wait for (any mode but _NOT_WAITED_FOR).
_LOCKS_ONE = (
    " AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.granted"
    " AND l.relation IN (SELECT to_regclass(n) FROM unnest(CAST(:names AS text[])) AS n)"
    " AND l.mode NOT IN " + _NOT_WAITED_FOR + ")"
)
#: The sessions of clients (not autovacuum's nor another of the server's own) in a transaction
#: since before our wait began (lock_timeout ago at least: the lock timeout as the failed session
#: had it, the engine's sessions all set the same) that hold such a lock.
_HOLDERS = sa.text(
    _COLUMNS
    + " AND a.backend_type = 'client backend'"
    + _LOCKS_ONE
    + " ORDER BY a.xact_start, a.pid"
)

#: The sessions of other roles whose transaction, state and statement pg_stat_activity hides
#: from this one (it sees them with pg_read_all_stats, or pg_monitor) that hold such a lock:
#: pg_locks is readable by all, so their pid and user at least.
_HIDDEN = sa.text(
    "SELECT a.pid, a.usename FROM pg_stat_activity a"
    " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
    " AND NOT pg_has_role(a.usesysid, 'USAGE')"  # (asked only of a role without the grant)
    + _LOCKS_ONE
    + " ORDER BY a.pid"
)
#: The store's lock_timeout, its role, and whether that sees every session in pg_stat_activity.
_ROLE = sa.text(
    "SELECT current_setting('lock_timeout'), quote_ident(current_user),"
    " pg_has_role('pg_read_all_stats', 'USAGE')"
)

#: How an operator finds the holder while a call of the store waits, when it could not be read.
FIND_IT = (
    "SELECT pid, application_name, client_addr, state, query FROM pg_stat_activity WHERE pid IN"
    " (SELECT unnest(pg_blocking_pids(pid)) FROM pg_stat_activity WHERE wait_event_type = 'Lock')"
)


def find_row_holders(table: str = f"'{jobs.name}'") -> str:
    """How an operator finds the sessions that may hold a job's row while no statement waits for
    it (a heartbeat passes over a held row): those of this database holding a lock on the jobs
    table `table` (an SQL literal; qualified by its schema as the store's session finds it, so
    that the operator's search_path need not hold it) that a row lock can wait for (as
    `_LOCKS_ONE`), each once, oldest transaction first."""
    return (
        "SELECT a.pid, a.usename, a.application_name, a.client_addr, a.state, a.xact_start,"
        " a.query FROM pg_stat_activity a WHERE EXISTS (SELECT 1 FROM pg_locks l WHERE"
        f" l.pid = a.pid AND l.relation = {table}::regclass AND l.granted AND l.mode NOT IN"
        f" {_NOT_WAITED_FOR}) AND a.datname = current_database() AND a.pid <> pg_backend_pid()"
        " ORDER BY a.xact_start"
    )


#: The row a statement waited for, from the error's context ('while locking tuple (0,1) in
#: relation "dext_wdpost_jobs"'); a lock on a whole table has none.
_RELATION = re.compile(r'tuple \(\d+,\d+\) in relation "([^"]+)"')
_ROWS = {jobs.name: "a job's row", workers.name: "the worker's row"}


class Subject(NamedTuple):
    """What a call of the store is about: its words in an error (' of job X', or ''), and its
    one job's id (None for none or several)."""

    text: str = ""
    job_id: str | None = None


@dataclass(frozen=True)
class Session:
    """A session that held (or may have held) the lock."""

    pid: int
    described: str
    ours: bool  #: one of damocles-ext's
    idle: bool  #: idle in its transaction (not running a statement)
    hidden: bool = False  #: another role's, whose transaction this role may not see


@dataclass(frozen=True)
class Held:
    """The lock_timeout of the store's sessions (None: neither read nor set by the store: the
    URL's options set it and the server could not be asked), the sessions that held the
    lock, and whether that one is exactly the holder (of the job's row) or a guess."""

    timeout: str | None
    sessions: list[Session]
    exact: bool = False
    #: The store's role when it may not see other roles' sessions (no pg_read_all_stats).
    blind: str | None = None


def is_lock_wait(error: exc.DBAPIError) -> bool:
    """Whether `error` is a statement that waited for a lock past its lock_timeout."""
    return getattr(error.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


def waited_row(error: exc.DBAPIError) -> str | None:
    """The table whose row the statement waited for, from the error's context, or None."""
    diag = getattr(error.orig, "diag", None)
    found = _RELATION.search(getattr(diag, "context", None) or "")
    return None if found is None else found.group(1)


def holders(engine: Engine, job_id: str | None = None, table: str | None = None) -> Held:
    """The lock_timeout of `engine`'s sessions and the other sessions that held the lock: the
    one holding job `job_id`'s row when given (only after a wait for that row) and found, else
    those that may have: holding a lock on `table` (the one waited for, when known), or on any
    of the store's tables. Whatever fails here leaves the error without them, never raises."""
    names = [t.name for t in metadata.sorted_tables]
    names = [table] if table in names else names
    timeout = pg_session.session_settings(engine.url).get("lock_timeout")
    blind = None
    try:
        with engine.connect() as conn:
            timeout, role, sees_all = conn.execute(_ROLE).one()
            blind = None if sees_all else str(role)
            conn.rollback()
            if job_id is not None and (xmax := _xmax(conn, job_id)) is not None:
                rows = conn.execute(_ROW_HOLDER, {"xmax": xmax, "table": jobs.name}).all()
                if rows:
                    return Held(timeout, [_session(r) for r in rows], True, blind)
            sessions = [_session(r) for r in conn.execute(_HOLDERS, {"names": names})]
            if blind is not None:
                sessions += [_hidden(r) for r in conn.execute(_HIDDEN, {"names": names})]
    except exc.SQLAlchemyError:
        return Held(timeout, [], blind=blind)
    return Held(timeout, sessions, blind=blind)


@dataclass(frozen=True)
class RowHolders:
    """Of job rows a heartbeat passed over: the session holding each, when named exactly, and
    those no session holds any more (or gone); the others are held by a session not named."""

    holders: dict[str, Session]
    free: frozenset[str]
    #: The store's role when it may not see other roles' sessions (no pg_read_all_stats).
    blind: str | None = None
    #: The jobs table, as an SQL literal qualified by its schema (None: no row was read).
    table: str | None = None


def row_holders(engine: Engine, job_ids: list[str]) -> RowHolders:
    """Who holds the rows of jobs `job_ids` now: one transaction on a connection of `engine`'s,
    of three statements at most whatever their number, each bounded (`_LOOK_BOUNDS`), rolled
    back; it locks no row unless another session holds a lock on the jobs table (`_FREE_ROWS`).
    Raises the database's error."""
    with engine.connect() as conn, conn.begin() as look:
        conn.execute(_LOOK_BOUNDS)
        rows = list(conn.execute(_ROW_HOLDERS, {"ids": job_ids}))
        holders = {r.id: _session(r) for r in rows if r.pid is not None}
        unnamed = sorted({r.id for r in rows} - holders.keys())
        free = set(job_ids) - {r.id for r in rows}  # removed since
        if unnamed and not any(r.table_locked for r in rows):
            free |= set(unnamed)  # no session may hold a row: none is locked to tell
        elif unnamed:
            free |= {r.id for r in conn.execute(_FREE_ROWS, {"ids": unnamed})}
        look.rollback()
    blind = next((str(r.role) for r in rows if not r.sees_all), None)
    table = next((str(r.jobs_table) for r in rows), None)
    return RowHolders(holders, frozenset(free), blind, table)


def jobs_table(engine: Engine) -> str | None:
    """The jobs table as the store's sessions find it, as an SQL literal of its name qualified
    by its schema (None: not there). Raises the database's error."""
    with engine.connect() as conn:
        found = conn.execute(_JOBS_TABLE, {"name": jobs.name}).scalar()
    return None if found is None else str(found)


def row_advice(holder: Session | None, rows: int = 1, blind: str | None = None,
               table: str | None = None) -> str:  # fmt: skip
    """Who holds `rows` job rows that a heartbeat passed over, and what to do; `blind`: the
    store's role, when it may not see other roles' sessions; `table`: the jobs table qualified
    by its schema (`jobs_table`; None: not known, named without it)."""
    them = "it" if rows == 1 else "them"
    if holder is None:
        return (
            f"Find the session holding {them} (while it holds {them}, among those this query"
            f" lists: {find_row_holders(table) if table else find_row_holders()}) and end its"
            " transaction: COMMIT or ROLLBACK in it, or,"
            " if it is not damocles-ext's and nothing of it is to be kept, SELECT"
            " pg_terminate_backend(PID); none listed: a prepared transaction, which has no"
            " session, may hold it (SELECT gid, owner, prepared FROM pg_prepared_xacts: COMMIT"
            " PREPARED or ROLLBACK PREPARED its gid)"
        )
    grant = _grant(blind, "this warning") if holder.hidden else ""
    return f"The holder is {holder.described}. {grant}{'. '.join(_what_to_do([holder]))}"


def _grant(blind: str | None, said: str) -> str:
    """The sentence that asks for pg_read_all_stats, for `said` (this error, this warning) to
    name a holder's state and statement; '' for a role that sees them."""
    if blind is None:
        return ""
    return (
        f"This role ({blind}) may not see other roles' sessions in pg_stat_activity: grant it"
        f" pg_read_all_stats (GRANT pg_read_all_stats TO {blind}) for {said} to name the holder,"
        " its state and its statement. "
    )


def _what_to_do(sessions: list[Session]) -> list[str]:
    """What to do of `sessions` that hold a lock of the store's: one sentence per kind of them
    there is (ours, idle, running a statement, hidden from this role)."""
    said: list[str] = []
    idle = [s.pid for s in sessions if s.idle and not s.ours]
    if idle:
        ends = " or ".join(f"SELECT pg_terminate_backend({pid})" for pid in idle)
        said.append(
            f"A session left idle inside its transaction (a psql after BEGIN, a change by hand)"
            f" holds its locks until it ends it: COMMIT or ROLLBACK in it, or {ends}"
        )
    if any(not s.idle and not s.ours and not s.hidden for s in sessions):
        said.append("A session running a statement holds its locks until its transaction ends")
    if hidden := [s.pid for s in sessions if s.hidden and not s.ours]:
        said.append(
            "A session holds its locks until its transaction ends: COMMIT or ROLLBACK in it,"
            " or, if it is not damocles-ext's and nothing of it is to be kept, "
            + " or ".join(f"SELECT pg_terminate_backend({pid})" for pid in hidden)
        )
    if any(s.ours for s in sessions):
        said.append(
            "A transaction of damocles-ext holds its rows for milliseconds (a sweep pass about a"
            " second): one that takes seconds is slowed by its server (its load, its disk) or"
            " its link, or frozen (the server ends it after its idle-in-transaction timeout)"
        )
    return said


def _xmax(conn: Connection, job_id: str) -> str | None:
    """Job `job_id`'s xmax, read in a transaction of its own that waits 100 ms at most for a
    lock on the table (taken since the wait); None when it waited longer (rolled back)."""
    try:
        with conn.begin():
            conn.execute(_XMAX_WAIT)
            xmax = conn.execute(_XMAX, {"job_id": job_id}).scalar()
    except exc.DBAPIError:
        return None
    return None if xmax is None else str(xmax)


def _session(r: Any) -> Session:
    if r.state is None:  # another role's, whose transaction this role may not see
        return _hidden(r, r.application_name or "no application name", bool(r.ours))
    origin = "a local socket" if r.client_addr is None else str(r.client_addr)
    since = "" if r.xact_start is None else f" since {r.xact_start:%Y-%m-%d %H:%M:%S %Z}"
    last = f"; its last statement: {r.query}" if r.query else ""
    described = (
        f"pid {r.pid} (user {r.usename}, {r.application_name or 'no application name'}, from"
        f" {origin}, {r.state}{since}{last})"
    )
    if r.ours:
        described = f"a damocles-ext session (a slow server or disk?), {described}"
    idle = str(r.state or "").startswith("idle in transaction")
    return Session(int(r.pid), described, bool(r.ours), idle)


def _hidden(r: Any, name: str | None = None, ours: bool = False) -> Session:
    """Another role's session, whose transaction this role may not see: its pid, its user, and
    its application `name` when known."""
    named = "" if name is None else f"{name}, "
    described = f"pid {r.pid} (user {r.usename}, {named}its transaction hidden from this role)"
    return Session(int(r.pid), described, ours, idle=False, hidden=True)


def too_long(where: str, name: str, subject: Subject, error: exc.DBAPIError, tries: int,
             engine: Engine, phase: str) -> StoreUnavailable:  # fmt: skip
    """The error of the operation `name` (on `subject`) whose statement (in `phase`, as
    retry.Phase names it) waited for a lock past lock_timeout at its last try, naming the
    sessions that held it."""
    if phase == "commit":
        return _notify_lock(where, name, subject, error, tries, engine)
    table = waited_row(error)
    lock = "a lock" if table is None else f"the lock on {_ROWS.get(table, f'a row of {table}')}"
    # The job's xmax names its holder only after a wait for its row: after one for a lock on
    # the whole table, reading it would wait for that lock too.
    held = holders(engine, subject.job_id if table == jobs.name else None, table)
    gave_up = (
        f"job store {where}: {name}{subject.text} waited for {lock} longer than"
        f" {_bound(held.timeout)} at each of {tries} tries, and gave up ({first_line(error)});"
        " nothing of it was stored."
    )
    grant = _grant(held.blind, "this error")
    if not held.sessions:
        return StoreUnavailable(
            f"{gave_up} {grant}Its holder has gone since, or is hidden from this role; while a call"
            f" waits, find it with: {FIND_IT}. A transaction of damocles-ext holds a job's row"
            " for milliseconds: the holder is another session left inside its transaction (a"
            " psql after BEGIN, a change by hand) or a stuck one (a damocles-ext frozen or cut"
            " off inside one: the server ends its session within about 40 s); end its"
            " transaction (COMMIT or ROLLBACK in it, or SELECT pg_terminate_backend(PID)), then"
            " try again"
        )
    who = "; ".join(s.described for s in held.sessions)
    if held.exact:
        head = f"{gave_up} The lock is held by {who}."
    else:
        head = (
            f"{gave_up} Sessions in a transaction since before the wait that hold locks on the"
            f" store's tables, one of which may hold it: {who}. {grant}"
        ).rstrip()
    said = _what_to_do(held.sessions)  # one sentence at least: each session is of a kind
    return StoreUnavailable(f"{head} {'. '.join(said)}; then try again")


def _bound(timeout: str | None) -> str:
    return "its lock_timeout" if timeout is None else f"its lock_timeout ({timeout})"


def lock_timeout(engine: Engine) -> str | None:
    """The store's sessions' lock_timeout, as the server says it (else as we set it)."""
    try:
        with engine.connect() as conn:
            return str(conn.execute(_ROLE).one()[0])
    except exc.SQLAlchemyError:
        return pg_session.session_settings(engine.url).get("lock_timeout")


def _notify_lock(where: str, name: str, subject: Subject, error: exc.DBAPIError, tries: int,
                 engine: Engine) -> StoreUnavailable:  # fmt: skip
    """A COMMIT that waited past lock_timeout: for PostgreSQL's NOTIFY lock, the one lock a
    COMMIT takes (every transaction that sent a NOTIFY takes it, one for the whole server, and
    holds it until its commit is flushed); no row of ours is held by then."""
    timeout = lock_timeout(engine)
    return StoreUnavailable(
        f"job store {where}: {name}{subject.text} could not commit: its COMMIT waited for"
        f" PostgreSQL's NOTIFY lock longer than {_bound(timeout)} at each of {tries} tries,"
        f" and gave up ({first_line(error)}); nothing of it was stored. Every transaction that"
        " sends a NOTIFY (damocles-ext's do, to wake its producers) takes that one lock of the"
        " whole server at its COMMIT and holds it until its commit is flushed: another"
        " transaction's commit is slow (a slow or full disk, a synchronous standby that does"
        " not answer: pg_stat_activity shows it waiting on SyncRep or WAL events); try again"
        " once the server commits at its usual pace"
    )


def subject_of(method: Callable[..., Any]) -> Callable[..., Subject]:
    """What a call of the store's `method` is about: ' of job X' from its `job_id` argument,
    ' of jobs X, Y' from its `job_ids` list, else ''; and its one job's id."""
    signature = inspect.signature(method)

    def subject(*args: Any, **kwargs: Any) -> Subject:
        try:
            given = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return Subject()
        if isinstance(job_id := given.get("job_id"), str):
            return Subject(f" of job {job_id}", job_id)
        ids = given.get("job_ids")
        if isinstance(ids, list | tuple) and ids:
            shown = some_and_more([str(i) for i in ids[:5]], len(ids))
            one = ids[0] if len(set(ids)) == 1 and isinstance(ids[0], str) else None
            return Subject(f" of job{'s' if len(ids) > 1 else ''} {shown}", one)
        return Subject()

    return subject
