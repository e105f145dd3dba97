"""The workers table and the summary's queries, on one connection: store.JobStore calls these
inside its own transactions, on SQLite and PostgreSQL alike.

A worker is recorded when it asks for jobs (with the spec it asked with) and touched when it
heartbeats or pings; the summary reads aggregates only (counts grouped by kind, ready jobs
grouped by miner and proof type), so its cost grows with the number of distinct miners and proof
types, not with the number of jobs sent back to Python.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import summary
from .database import OLD_WORKERS, jobs, workers, workers_paused
from .model import FINISHED, READY, RUNNING
from .rules import STAMP_AHEAD_MAX, AllocationSpec

# Touching a worker on every heartbeat (every 3 s per running job) would write its row as often:
# once in this many seconds is enough for a live window of minutes.
TOUCH_EVERY = 10.0


@functools.cache
def _upsert(insert: Callable[[Any], Any]) -> Any:
    # Built once per dialect's insert (see statements.py): each call only binds its values.
    statement = insert(workers).values(
        worker=sa.bindparam("w_worker"),
        spec_digest=sa.bindparam("w_digest"),
        spec=sa.bindparam("w_spec"),
        last_seen=sa.bindparam("w_at"),
    )
    stored, given = workers.c.last_seen, statement.excluded.last_seen
    return statement.on_conflict_do_update(
        index_elements=[workers.c.worker, workers.c.spec_digest],
        # The later stamp: a late call (a store call gives up after 60 s) never moves it back;
        # one stored further ahead than a call is ever late was stamped before the wall clock
        # stepped back, and is replaced (as touch does). A CASE: the same SQL on both engines.
        set_={
            "last_seen": sa.case(
                (sa.and_(stored > given, stored <= given + STAMP_AHEAD_MAX), stored),
                else_=given,
            )
        },
    )


_TOUCH = (
    workers.update()
    .where(
        workers.c.worker.in_(sa.bindparam("names", expanding=True)),
        # Or further ahead of now than a call is ever late: stamped before the wall clock
        # stepped back (a late heartbeat or ping never sets it back).
        sa.or_(
            workers.c.last_seen < sa.bindparam("before"),
            workers.c.last_seen > sa.bindparam("after"),
        ),
    )
    .values(last_seen=sa.bindparam("w_at"))
)


def record(conn: Connection, insert: Callable[[Any], Any], worker: str, spec: AllocationSpec,
           now: float) -> None:  # fmt: skip
    """The worker asked for jobs with this spec now (an upsert: one row per worker and spec);
    a row stamped later is kept, unless it is more than STAMP_AHEAD_MAX ahead of `now`."""
    key = summary.spec_key(spec)
    conn.execute(
        _upsert(insert),
        {"w_worker": worker, "w_digest": summary.spec_digest(key), "w_spec": key, "w_at": now},
    )


def create_and_carry_over(conn: Connection) -> None:
    """Schema version 4: the workers seen in their table, with the rows of versions 2 and 3's
    (OLD_WORKERS, keyed by the spec itself) copied in when it is there. That one is left as it
    was, to the coordinators of version 3 still running on the store."""
    workers.create(conn)
    if not sa.inspect(conn).has_table(OLD_WORKERS):
        return
    rows = conn.execute(sa.text(f"SELECT worker, spec, last_seen FROM {OLD_WORKERS}")).all()
    if rows:
        conn.execute(
            workers.insert(),
            [
                {
                    "worker": row.worker,
                    "spec_digest": summary.spec_digest(row.spec),
                    "spec": row.spec,
                    "last_seen": float(row.last_seen),
                }
                for row in rows
            ],
        )


def touch(conn: Connection, names: Iterable[str], now: float) -> bool:
    """These workers were seen now (a heartbeat, a ping): refresh the specs they are known by;
    whether a row was written (not within TOUCH_EVERY of the last time; one more than
    STAMP_AHEAD_MAX ahead of it, stamped before the wall clock stepped back, is written again
    with the new time, else it would stay ahead, and the worker live by it after it died, until
    the clock regained the step; a late call never sets a later stamp back).

    A name that never asked for jobs stays unknown: a sealing worker pings too, and must not
    count as a worker that would take WindowPoSt jobs."""
    names = sorted(set(names))
    if not names:
        return False
    done = conn.execute(
        _TOUCH,
        {"names": names, "before": now - TOUCH_EVERY, "after": now + STAMP_AHEAD_MAX, "w_at": now},
    )
    return bool(done.rowcount)


def forget(conn: Connection, before: float) -> int:
    """Forget the workers not seen since `before`, and pauses not heard of since (a store
    written to is at SCHEMA_VERSION); how many rows of workers went."""
    conn.execute(workers_paused.delete().where(workers_paused.c.at < before))
    return int(conn.execute(workers.delete().where(workers.c.last_seen < before)).rowcount)


@functools.cache
def _pause_upsert(insert: Callable[[Any], Any]) -> Any:
    statement = insert(workers_paused).values(
        worker=sa.bindparam("p_worker"),
        paused=sa.bindparam("p_paused"),
        slots=sa.bindparam("p_slots"),
        at=sa.bindparam("p_at"),
    )
    stored, given = workers_paused.c, statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[stored.worker],
        set_={"paused": given.paused, "slots": given.slots, "at": given.at},
        where=sa.and_(
            # A late ping never says an older state; a row stamped further ahead than a call is
            # ever late was stamped before the wall clock stepped back, and is replaced.
            sa.or_(stored.at <= given.at, stored.at > given.at + STAMP_AHEAD_MAX),
            # Written when it changes, else at most once in TOUCH_EVERY (read within a window).
            sa.or_(
                stored.paused != given.paused,
                stored.slots != given.slots,
                stored.at < given.at - TOUCH_EVERY,
                stored.at > given.at,
            ),
        ),
    )


def pinged(conn: Connection, insert: Callable[[Any], Any], worker: str,
           pause: tuple[int, int] | None, now: float) -> None:  # fmt: skip
    """Worker `worker` pinged now saying (paused, slots) (pings.pause_of; None: not read):
    written for a worker that asked for jobs before, as `touch` refreshes it (a name that never
    did is no WindowPoSt worker: a sealing worker, or any client, writes nothing)."""
    if pause is None:
        return
    known = sa.select(workers.c.worker).where(workers.c.worker == worker).limit(1)
    if conn.execute(known).first() is None:
        return
    values = {"p_worker": worker, "p_paused": pause[0], "p_slots": pause[1], "p_at": now}
    conn.execute(_pause_upsert(insert), values)


#: The workers seen as schema versions 2 and 3 kept them (keyed by the spec itself), which a
#: read-only open of such a store reads, and an upgraded store's summary reads beside its own.
_OLD_SEEN = sa.table(OLD_WORKERS, sa.column("worker"), sa.column("spec"), sa.column("last_seen"))


def seen_table(version: int) -> Any:
    """The table of the workers seen at schema `version`; None before version 2 (none kept)."""
    return workers if version >= 4 else _OLD_SEEN if version >= 2 else None


_READABLE = sa.text(
    "SELECT CASE WHEN to_regclass(:table) IS NULL THEN false"
    " ELSE has_table_privilege(:table, 'SELECT') END"
)


def _readable(conn: Connection, table: str) -> bool:
    """Whether `table` is there, and (PostgreSQL) this role may read it: a role granted only
    some tables (what our GRANT hints listed at its version) reads those alone."""
    if conn.dialect.name != "postgresql":
        return sa.inspect(conn).has_table(table)
    return bool(conn.execute(_READABLE, {"table": table}).scalar())


def read_summary(
    conn: Connection,
    now: float,
    live_window: float,
    where: str,
    seen_in: Any,
    version: int,
) -> summary.JobsSummary:
    """The summary from a few aggregate queries (see summary.summarize); the workers seen read
    from `seen_in` (seen_table), and at version 4 from the table of versions 2 and 3 too while
    it is there; their pauses from version 5 on (before: not known)."""
    c = jobs.c
    kind = sa.case(
        (c.state == READY, "ready2run"),
        (c.state == RUNNING, "running"),
        (c.cancelled_at != 0, "cancelled"),
        (c.error_reason == "", "finished-ok"),
        else_="finished-failed",
    ).label("kind")
    counts = {
        row.kind: int(row.n)
        for row in conn.execute(
            sa.select(kind, sa.func.count().label("n"))
            .where(c.state.in_((READY, RUNNING, FINISHED)))
            .group_by(kind)
        )
    }
    ready = [
        summary.ReadyGroup(int(row.miner_id), row.proof_type, int(row.n), int(row.oldest))
        for row in conn.execute(
            sa.select(
                c.miner_id,
                c.proof_type,
                sa.func.count().label("n"),
                sa.func.min(c.created_at).label("oldest"),
            )
            .where(c.state == READY)
            .group_by(c.miner_id, c.proof_type)
        )
    ]
    first = conn.execute(
        sa.select(c.id, c.created_at).where(c.state == READY).order_by(c.created_at, c.id).limit(1)
    ).first()
    tables = [seen_in]
    if seen_in is workers and _readable(conn, OLD_WORKERS):
        # Upgraded from version 2 or 3: a coordinator of that version may still run on the
        # store (a rolling upgrade), recording the workers it serves in its own table.
        tables.append(_OLD_SEEN)
    latest: dict[tuple[str, str], float] = {}  # a worker and spec in both: its last sighting
    for table in tables:
        for row in conn.execute(
            sa.select(table.c.worker, table.c.spec, table.c.last_seen).where(
                table.c.last_seen >= now - live_window
            )
        ):
            key = (row.worker, row.spec)
            latest[key] = max(latest.get(key, -math.inf), float(row.last_seen))
    pauses: dict[str, tuple[int, int]] | None = None  # (None: not known)
    if version >= 5 and (conn.dialect.name != "postgresql" or _readable(conn, workers_paused.name)):
        t = workers_paused.c
        pauses = {  # (one stamped ahead of the window: before the wall clock stepped back)
            row.worker: (int(row.paused), int(row.slots))
            for row in conn.execute(
                sa.select(t.worker, t.paused, t.slots).where(
                    t.at >= now - live_window, t.at <= now + live_window
                )
            )
        }
    seen = [
        summary.WorkerSeen(worker, summary.spec_of_key(spec), last_seen)
        for (worker, spec), last_seen in latest.items()
    ]
    return summary.summarize(
        counts=counts,
        ready=ready,
        oldest_ready=None if first is None else (first.id, int(first.created_at)),
        workers=seen,
        now=now,
        live_window=live_window,
        store=where,
        pauses=pauses,
    )
