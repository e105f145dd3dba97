"""A statement of the job store that waited for a lock longer than its session's lock_timeout
(pg_session.PG_SESSION_SETTINGS; SQLSTATE 55P03 lock_not_available): the sessions that held
it, and the error that names them and says what to do.

A transaction of the store holds a job's row for milliseconds (a sweep pass over many jobs on a
slow link, for a second or so), so a wait of seconds means another session that is not ours
and stays alive (an operator's psql left inside BEGIN after a SELECT ... FOR UPDATE or an
UPDATE, a change by hand) or one of ours that is stuck (frozen: the server ends it after its
idle-in-transaction timeout). Without the bound the statement waited as long as the lock was
held: a trio caller gave up after its call timeout, but its thread could not be stopped and
kept a slot of the store's small thread limiter, so a few such calls stalled every call of
the process."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Engine

from .database import StoreUnavailable, first_line, metadata

#: PostgreSQL's SQLSTATE lock_not_available: a lock waited for over lock_timeout (or NOWAIT).
LOCK_NOT_AVAILABLE: Final = "55P03"
#: Tries of an operation at most while its statements wait past lock_timeout: once more, for a
#: holder of ours slower than usual; a holder still there is not waited for again (each wait
#: holds a thread of the store: two waits of the default 4 s stay inside a worker's 10 s RPC
#: timeout, so it hears why).
LOCK_ATTEMPTS: Final = 2

#: The sessions in a transaction since before our wait began (lock_timeout ago at least) that
#: hold a lock on the store's tables one of our statements can wait for: every mode but ACCESS
#: SHARE (a plain read's) conflicts with a row lock's, an UPDATE's or a DELETE's. The lock
#: timeout as the failed session had it: the engine's sessions all set the same.
_HOLDERS = sa.text(
    "SELECT a.pid, a.usename, a.application_name, a.client_addr, a.state, a.xact_start,"
    " left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120) AS query,"
    " current_setting('lock_timeout') AS lock_timeout"
    " FROM pg_stat_activity a"
    " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
    " AND a.xact_start <= now() - CAST(current_setting('lock_timeout') AS interval)"
    " AND EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
    " WHERE l.pid = a.pid AND l.granted AND l.mode <> 'AccessShareLock' AND c.relname IN :names)"
    " ORDER BY a.xact_start, a.pid"
).bindparams(sa.bindparam("names", expanding=True))

#: How an operator finds the holder while a call of the store waits, when it could not be read.
FIND_IT = (
    "SELECT pid, application_name, client_addr, state, query FROM pg_stat_activity WHERE pid IN"
    " (SELECT unnest(pg_blocking_pids(pid)) FROM pg_stat_activity WHERE wait_event_type = 'Lock')"
)


def is_lock_wait(error: exc.DBAPIError) -> bool:
    """Whether `error` is a statement that waited for a lock past its lock_timeout."""
    return getattr(error.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


def holders(engine: Engine) -> tuple[str | None, list[tuple[int, str]]]:
    """The lock_timeout of `engine`'s sessions, and the other sessions that may have held the
    lock: their pids and descriptions ('pid 12 (user u, psql, from 10.0.0.5, idle in
    transaction since ...; its last statement: ...)'); (None, []) when they cannot be read."""
    names = [t.name for t in metadata.sorted_tables]
    try:
        with engine.connect() as conn:
            rows: list[Any] = list(conn.execute(_HOLDERS, {"names": names}))
            if not rows:
                timeout = conn.execute(sa.text("SHOW lock_timeout")).scalar_one()
                return str(timeout), []
    except exc.DBAPIError:
        return None, []
    return str(rows[0].lock_timeout), [(int(r.pid), _described(r)) for r in rows]


def _described(r: Any) -> str:
    origin = "a local socket" if r.client_addr is None else str(r.client_addr)
    since = "" if r.xact_start is None else f" since {r.xact_start:%Y-%m-%d %H:%M:%S %Z}"
    last = f"; its last statement: {r.query}" if r.query else ""
    return (
        f"pid {r.pid} (user {r.usename}, {r.application_name or 'no application name'}, from"
        f" {origin}, {r.state or 'state hidden from this role'}{since}{last})"
    )


def too_long(where: str, name: str, subject: str, error: exc.DBAPIError, tries: int,
             engine: Engine) -> StoreUnavailable:  # fmt: skip
    """The error of the operation `name` (on `subject`: ' of job X', or '') whose statement
    waited for a lock past lock_timeout at its last try, naming the sessions that held it."""
    timeout, held = holders(engine)
    bound = "its lock_timeout" if timeout is None else f"its lock_timeout ({timeout})"
    if held:
        who = "held by " + "; ".join(described for _, described in held)
    else:
        who = f"its holder is gone since, or hidden from this role; while a call waits: {FIND_IT}"
    pid = str(held[0][0]) if len(held) == 1 else "PID"
    return StoreUnavailable(
        f"job store {where}: {name}{subject} waited for a lock on the store's rows longer than"
        f" {bound} at each of {tries} tries, and gave up ({first_line(error)}); nothing of it was"
        f" stored. The lock is {who}. A transaction of damocles-ext holds a job's row for"
        " milliseconds: this is another session left inside its transaction (a psql after"
        " BEGIN, a change by hand) or a stuck one (a damocles-ext frozen or cut off inside"
        " one: the server ends its session within about 40 s); end its transaction (COMMIT or"
        f" ROLLBACK in it, or SELECT pg_terminate_backend({pid})), then try again"
    )


def subject_of(method: Callable[..., Any]) -> Callable[..., str]:
    """What a call of the store's `method` is about, in its error: ' of job X' from its
    `job_id` argument, ' of jobs X, Y' from its `job_ids` list, else ''."""
    signature = inspect.signature(method)

    def subject(*args: Any, **kwargs: Any) -> str:
        try:
            given = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return ""
        if isinstance(job_id := given.get("job_id"), str):
            return f" of job {job_id}"
        ids = given.get("job_ids")
        if isinstance(ids, list | tuple) and ids:
            shown = ", ".join(str(i) for i in ids[:5])
            more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
            return f" of job{'s' if len(ids) > 1 else ''} {shown}{more}"
        return ""

    return subject
