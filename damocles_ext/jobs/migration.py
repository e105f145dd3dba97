"""The job store's schema, on the opening transaction of store.JobStore.migrate: its lock on
PostgreSQL, its creation, and the steps from each older version to SCHEMA_VERSION.

An upgrade on PostgreSQL changes the jobs table's indexes, which takes a lock on the table that
waits for every session with a transaction open on it, and that every later reader waits
behind: a session left idle in a transaction (an operator's psql) would hold the upgrade, and
with it every process on the store, for as long as it stays open. So the upgrade waits at most
UPGRADE_LOCK_TIMEOUT for its locks, then gives up, leaving the store as it was, and names the
sessions that held them."""

from __future__ import annotations

import logging
import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import URL, Connection, Engine

from . import workers as worker_rows
from .database import (
    OLD_READY_INDEX,
    PG_NO_PRIVILEGE,
    PG_PRIVILEGES,
    SCHEMA_VERSION,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    first_line,
    grant_hint,
    jobs,
    metadata,
    pg_role,
    schema_version,
    workers_paused,
)
from .lock_waits import is_lock_wait

log = logging.getLogger("damocles_ext.jobs")

#: The key of the advisory lock that makes one session at a time create or upgrade the schema.
SCHEMA_LOCK = 7426385010214
#: The longest an upgrade on PostgreSQL waits for a lock on a table another session holds.
UPGRADE_LOCK_TIMEOUT = 5.0


def _set_lock_timeout(conn: Connection, seconds: float) -> None:
    """PostgreSQL: this transaction's statements wait `seconds` at most for a lock."""
    conn.execute(sa.text(f"SET LOCAL lock_timeout = {max(1, int(seconds * 1000))}"))


def take_schema_lock(conn: Connection, where: str, lock_timeout: float | None) -> None:
    """PostgreSQL: hold the schema lock for this transaction: two coordinators starting at once
    must not both create the tables. Waits `lock_timeout` s (None: as long as the server's own
    lock_timeout, if any), then raises StoreUnavailable."""
    if lock_timeout is not None:
        _set_lock_timeout(conn, lock_timeout)
    else:  # the role's, the database's or the URL's, not the one the store's sessions SET
        conn.execute(sa.text("SET LOCAL lock_timeout TO DEFAULT"))
    try:
        conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"))
    except exc.OperationalError as e:
        if not is_lock_wait(e):
            raise
        waited = "" if lock_timeout is None else f" for over {lock_timeout:g} s"
        raise StoreUnavailable(
            f"the job store {where}: another session held its schema lock{waited} (a"
            " damocles-ext opening or upgrading it, or stuck; or the server's own lock_timeout"
            " ran out): find it in pg_stat_activity, or try again"
        ) from None


def upgrade_lock_timeout(lock_timeout: float | None) -> float:
    """How long the upgrade's statements wait for a table lock (at most UPGRADE_LOCK_TIMEOUT)."""
    return UPGRADE_LOCK_TIMEOUT if lock_timeout is None else min(lock_timeout, UPGRADE_LOCK_TIMEOUT)


def bring_up(conn: Connection, found: int, *, lock_timeout: float | None) -> None:
    """The schema at version `found` (0: none) made SCHEMA_VERSION, and recorded so; on
    PostgreSQL an older one's steps wait for table locks `upgrade_lock_timeout(lock_timeout)`."""
    if found >= SCHEMA_VERSION:
        return
    if found > 0 and conn.dialect.name == "postgresql":
        _set_lock_timeout(conn, upgrade_lock_timeout(lock_timeout))
    if found == 0:
        metadata.create_all(conn)
    had = set(sa.inspect(conn).get_table_names())
    if 0 < found < 3:
        conn.execute(sa.text(f"DROP INDEX IF EXISTS {OLD_READY_INDEX}"))
        for index in jobs.indexes:
            index.create(conn, checkfirst=True)
    if 0 < found < 4:
        worker_rows.create_and_carry_over(conn)
    if 0 < found < 5:
        workers_paused.create(conn, checkfirst=True)
    # Later versions' steps go here, each from `found` up.
    if found > 0 and conn.dialect.name == "postgresql":
        grant_like_jobs(conn, [t.name for t in metadata.sorted_tables if t.name not in had])
    conn.execute(schema_version.delete())
    conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))


#: How a store of an older version gets upgraded, for the messages that refuse one.
HOW_TO_UPGRADE = (
    "this damocles-ext upgrades it when its coordinator or `serve --jobs` starts on the store, when"
    " one of its commands writes to it (`wdpost reset`, `remove`), or with `damocles-ext status"
    " --jobs URL --upgrade` (on PostgreSQL as the owner of its tables)"
)


def too_new(where: str, found: int) -> StoreConfigError:
    """The refusal of a store at schema version `found`, made by a newer damocles-ext."""
    return StoreConfigError(
        f"the job store {where} has schema version {found}, newer than this damocles-ext knows"
        f" ({SCHEMA_VERSION}): a newer damocles-ext made it; upgrade this one, or give another"
        " store URL"
    )


def readable(where: str, found: int) -> int:
    """`found`, the schema version of a store opened read-only; too_new's refusal if newer."""
    if found > SCHEMA_VERSION:
        raise too_new(where, found)
    return found


def too_old(where: str, found: int, what: str, needed: int) -> StoreConfigError:
    """The refusal of a read that a store opened read-only at the older schema version `found`
    cannot answer: `what` needs version `needed`."""
    return StoreConfigError(
        f"the job store {where} has schema version {found}, older than this damocles-ext's"
        f" ({SCHEMA_VERSION}), and {what} needs version {needed} or later; a command that only"
        " reads leaves the schema as it is (a coordinator of an older damocles-ext may be"
        f" running on it): use that damocles-ext's commands, or upgrade the store: {HOW_TO_UPGRADE}"
    )


#: The privileges the roles other than this session's (which owns what it creates) and PUBLIC
#: (grantee 0) hold on a table, as GRANT takes them: its owner's too (its implicit ones when the
#: table was never granted), for an upgrade run by another role (a superuser, or a role that may
#: create tables) leaves the new table that role's.
_GRANTS = sa.text(
    "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'"
    " ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS grantee,"
    " a.privilege_type, a.is_grantable"
    " FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a"
    " WHERE c.oid = to_regclass(:table)"
    " AND a.grantee <> (SELECT oid FROM pg_roles WHERE rolname = current_user)"
    " ORDER BY 1, 2"
)


def grant_like_jobs(conn: Connection, tables: list[str]) -> None:
    """PostgreSQL: give each of `tables` (made by an upgrade) the privileges other roles and
    PUBLIC hold on the jobs table, its owner included when another role runs the upgrade. A new
    table is its creator's alone: a coordinator's role granted the tables before, or the owner of
    the others, would be refused on it."""
    if not tables:
        return
    held: dict[tuple[str, bool], list[str]] = {}
    for row in conn.execute(_GRANTS, {"table": jobs.name}):
        held.setdefault((row.grantee, bool(row.is_grantable)), []).append(row.privilege_type)
    for table in tables:
        for (grantee, grantable), privileges in held.items():
            grant = f"GRANT {', '.join(privileges)} ON {table} TO {grantee}"
            conn.execute(sa.text(grant + (" WITH GRANT OPTION" if grantable else "")))
            log.info("%s, as on %s (the upgrade made %s)", grant, jobs.name, table)


def lock_waited_out(
    error: exc.DBAPIError, engine: Engine, where: str, found: int, lock_timeout: float | None
) -> StoreError | None:
    """The StoreUnavailable for an upgrade from `found` that gave up waiting for a table lock
    (`error`), naming the sessions that hold locks on the store's tables; None for another
    error."""
    if found in (0, SCHEMA_VERSION) or not is_lock_wait(error):
        return None
    holders = _lock_holders(engine)
    return StoreUnavailable(
        f"cannot upgrade the job store {where} from schema version {found} to"
        f" {SCHEMA_VERSION}: another session held a lock on its tables for over"
        f" {upgrade_lock_timeout(lock_timeout):g} s ({holders or 'gone since'}); it is left at"
        f" version {found}, unchanged, and every process on it waited only that long: end that"
        " session, or let it finish its transaction (an idle one: commit or roll back;"
        " SELECT pg_terminate_backend(PID) ends it), then start again"
    )


def _lock_holders(engine: Engine) -> str:
    """The other sessions holding locks on the store's tables ('pid 12 (user u, psql, idle in
    transaction since ...)', ...); '' when there are none now or they cannot be read.

    Not lock_waits.holders, which names the holders for the store's calls (UPDATE, SELECT FOR
    UPDATE): it leaves out the lock modes those never wait for (a plain read's ACCESS SHARE,
    VACUUM's SHARE UPDATE EXCLUSIVE) and the transactions younger than the sessions'
    lock_timeout. The upgrade's DDL waits for more (DROP INDEX's ACCESS EXCLUSIVE for every
    mode, a plain read's too: a psql left idle after a SELECT holds it up), for a lock_timeout
    of its own (upgrade_lock_timeout)."""
    names = [t.name for t in metadata.sorted_tables]
    query = sa.text(
        "SELECT DISTINCT a.pid, a.usename, a.application_name, a.state, a.xact_start"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        # The store's own tables (its search_path's), not those of a store of another schema
        # or database named alike: their sessions are no one's to end for this upgrade.
        " WHERE l.relation IN (SELECT to_regclass(n) FROM unnest(CAST(:names AS text[])) AS n)"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND l.granted AND a.pid <> pg_backend_pid() ORDER BY a.pid"
    )
    try:
        with engine.connect() as conn:
            rows: list[Any] = list(conn.execute(query, {"names": names}))
    except exc.DBAPIError:
        return ""
    return ", ".join(
        f"pid {r.pid} (user {r.usename}, {r.application_name or 'no application name'}, "
        f"{r.state or 'state hidden'}"
        + ("" if r.xact_start is None else f" since {r.xact_start:%Y-%m-%d %H:%M:%S %Z}")
        + ")"
        for r in rows
    )


_ELSEWHERE = sa.text(
    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relname = :name AND c.relkind IN ('r', 'p') AND NOT pg_table_is_visible(c.oid)"
    " ORDER BY 1"
)


def check_not_elsewhere(conn: Connection, url: URL, where: str, *, creating: bool) -> None:
    """PostgreSQL, where no store is on the search_path: StoreConfigError when the database has
    one in a schema off it (its tables in the schema of the role that made them, "$user" on
    the default search_path): another role would make a second, empty store, or read none.
    A store made where the URL names its search_path itself is one of its own, and allowed."""
    if conn.dialect.name != "postgresql":
        return
    # Only where the store would land is the first schema the URL names: one that does not
    # exist (a typo) leaves the next on the path, public say, a second store of its own.
    if creating and "search_path" in str(url.query.get("options", "")):
        here = conn.execute(sa.text("SELECT current_schema()")).scalar()
        if here is not None and here == _first_on_path(conn):
            return
    schemas = list(conn.execute(_ELSEWHERE, {"name": schema_version.name}).scalars())
    if not schemas:
        return
    path = conn.execute(sa.text("SHOW search_path")).scalar_one()
    role = pg_role(url)
    raise StoreConfigError(
        f"the job store {where}: the database has its tables in schema {', '.join(schemas)},"
        f" which is not on the search_path of the PostgreSQL role {role!r} ({path}), so it would"
        f" use another, empty store: add options=-csearch_path%3D{schemas[0]} to the URL (or"
        f" ALTER ROLE {role} SET search_path = {schemas[0]}); a second store of its own in"
        " another schema is made only by a URL that names that schema so"
    )


def _first_on_path(conn: Connection) -> str:
    """The first schema of the session's search_path as the server reads its text: a quoted
    name as written ("" a quote), another lowercased, $user the role's own."""
    text = str(conn.execute(sa.text("SHOW search_path")).scalar_one()).strip()
    if text.startswith('"'):
        end = re.match(r'"((?:[^"]|"")*)"', text)
        first = text[1:] if end is None else end[1].replace('""', '"')
    else:  # the server lowercases ASCII letters only
        first = text.split(",", 1)[0].strip().translate(_ASCII_LOWER)
    if first == "$user":
        first = str(conn.execute(sa.text("SELECT current_user")).scalar_one())
    # Names are cut to NAMEDATALEN - 1 bytes (a character is not split).
    return first.encode()[:63].decode(errors="ignore")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


#: PostgreSQL's SQLSTATE invalid_schema_name: "no schema has been selected to create in".
_NO_SCHEMA = "3F000"


def no_schema(error: exc.DBAPIError, engine: Engine, url: URL, where: str) -> StoreError | None:
    """The StoreConfigError for a store that cannot be created because no schema on the
    search_path exists (`error`), naming that search_path; None for another error."""
    if getattr(error.orig, "sqlstate", None) != _NO_SCHEMA:
        return None
    try:
        with engine.connect() as conn:
            path = str(conn.execute(sa.text("SHOW search_path")).scalar_one())
    except exc.DBAPIError:
        path = "unknown"
    role = pg_role(url)
    return StoreConfigError(
        f"cannot create the job store at {where}: none of the schemas on the search_path of the"
        f" PostgreSQL role {role!r} exists (search_path: {path}; set by the URL's"
        " options=-csearch_path=..., ALTER ROLE or ALTER DATABASE): create the first one"
        f" (CREATE SCHEMA name AUTHORIZATION {role}), or give a search_path that names an"
        " existing schema"
    )


def not_permitted(
    error: exc.DBAPIError, engine: Engine, url: URL, where: str, found: int
) -> StoreError | None:
    """The StoreConfigError for a PostgreSQL role that may not create, upgrade or write the store
    at version `found` (`error`: permission denied), saying what it needs; None for another
    error."""
    if getattr(error.orig, "sqlstate", None) != PG_NO_PRIVILEGE:
        return None
    role, what = pg_role(url), first_line(error)
    if found == 0:
        return StoreConfigError(
            f"cannot create the job store at {where}: the PostgreSQL role {role!r} may not create"
            f" tables in its database ({what}): create the store once with the URL of a role"
            f" that may (its owner's), or GRANT CREATE ON SCHEMA public TO {role} (or the schema"
            " first on its search_path)"
        )
    schema = _schema_refused(what)
    if found < SCHEMA_VERSION and schema is not None and _owns_jobs(engine):
        # The owner itself: the upgrade makes a table, in a schema it may not create in.
        return StoreConfigError(
            f"the job store {where} has schema version {found}, older than this damocles-ext's"
            f" ({SCHEMA_VERSION}), and its upgrade makes a table, which the PostgreSQL role"
            f" {role!r} may not do in schema {schema!r} ({what}): GRANT CREATE ON SCHEMA"
            f" {schema} TO {role} (it may be revoked once upgraded), then start again"
        )
    if found < SCHEMA_VERSION:
        return StoreConfigError(
            f"the job store {where} has schema version {found}, older than this damocles-ext's"
            f" ({SCHEMA_VERSION}), and the PostgreSQL role {role!r} may not upgrade it ({what}):"
            " only the owner of its tables may; run this damocles-ext once with the owner's URL"
            " (`damocles-ext status --jobs URL --upgrade` upgrades it), then start this one again"
        )
    return _write_refused(role, where, what)


def _owns_jobs(engine: Engine) -> bool:
    """Whether this session's role owns the jobs table (or is a member of its owner's)."""
    query = sa.text(
        "SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c"
        " WHERE c.oid = to_regclass(:table)"
    )
    try:
        with engine.connect() as conn:
            return bool(conn.execute(query, {"table": jobs.name}).scalar())
    except exc.DBAPIError:
        return False


def _schema_refused(what: str) -> str | None:
    """The schema of a 'permission denied for schema X' (CREATE refused), else None."""
    found = re.search(r"permission denied for schema (\S+)", what)
    return found[1] if found else None


def _write_refused(role: str, where: str, what: str) -> StoreConfigError:
    return StoreConfigError(
        f"the PostgreSQL role {role!r} may not write the job store {where} ({what}): a"
        " coordinator and serve --jobs need SELECT, INSERT, UPDATE and DELETE on its tables:"
        f" {grant_hint(role)}, or give the URL of a role that has them"
    )


_MISSING = sa.text(
    "SELECT t.name, p.privilege FROM unnest(CAST(:tables AS text[])) AS t(name),"
    " unnest(CAST(:privileges AS text[])) AS p(privilege)"
    " WHERE NOT has_table_privilege(t.name, p.privilege)"
)


def check_writable(conn: Connection, url: URL, where: str) -> None:
    """That the store takes writes: a write that changes nothing (refused by a read-only file
    or replica), and on PostgreSQL every privilege a coordinator uses on each table (a role
    granted some tables by hand and not the others would start, and have every allocation
    refused). StoreConfigError naming what is missing."""
    conn.execute(schema_version.update().values(version=schema_version.c.version))
    if conn.dialect.name != "postgresql":
        return
    params = {"tables": list(metadata.tables), "privileges": list(PG_PRIVILEGES)}
    missing: dict[str, list[str]] = {}
    for table, privilege in conn.execute(_MISSING, params):
        missing.setdefault(table, []).append(privilege)
    if missing:
        lacks = "; ".join(f"{', '.join(p)} on {t}" for t, p in missing.items())
        raise _write_refused(pg_role(url), where, f"it lacks {lacks}")
