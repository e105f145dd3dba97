"""The job store's frequent statements, built once with bound parameters.

A statement built per call (`select(jobs).where(jobs.c.id == job_id)`, `.values(row)`) makes
SQLAlchemy coerce every value into a new bound parameter and hash the new statement to find its
compiled form: about a millisecond per allocation, several times what SQLite takes to run it.
Built once here, a statement is compiled once and each call only binds its values (`*_params`).
Parameter names carry a prefix: SQLAlchemy reserves the column names in an UPDATE's SET clause.
"""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa

from .database import jobs
from .model import READY, JobRecord
from .rows import row_values

_c = jobs.c

#: The row as it was read: a write that finds anything else lost a race and must not land
#: (IS NOT DISTINCT FROM: a lease that was NULL must still be NULL).
_GUARD = sa.and_(
    _c.id == sa.bindparam("g_id"),
    _c.state == sa.bindparam("g_state"),
    _c.try_num == sa.bindparam("g_try_num"),
    _c.updated_at == sa.bindparam("g_updated_at"),
    _c.lease.is_not_distinct_from(sa.bindparam("g_lease", type_=_c.lease.type)),
)

READ_JOB = sa.select(jobs).where(_c.id == sa.bindparam("job_id"))
#: FOR UPDATE on PostgreSQL; SQLite has no row locks and needs none (BEGIN IMMEDIATE already
#: holds the only write lock).
READ_JOB_LOCKED = READ_JOB.with_for_update()
#: FOR UPDATE SKIP LOCKED: no row when another session holds it (a heartbeat's: see store.py).
READ_JOB_SKIP_LOCKED = READ_JOB.with_for_update(skip_locked=True)
INSERT_JOB = jobs.insert()
UPDATE_JOB = (
    jobs.update().where(_GUARD).values({c.name: sa.bindparam(f"v_{c.name}") for c in jobs.c})
)
DELETE_JOB = jobs.delete().where(_GUARD)
#: A row removed whatever it holds: a damaged one, which reads back as no job (rows.DamagedJob).
DELETE_JOB_BY_ID = jobs.delete().where(_c.id == sa.bindparam("job_id"))


def guard_params(old: JobRecord) -> dict[str, Any]:
    """The values of DELETE_JOB's guard: `old` as it was read."""
    return {
        "g_id": old.Id,
        "g_state": old.State,
        "g_try_num": old.TryNum,
        "g_updated_at": old.UpdatedAt,
        "g_lease": old.lease,
    }


def update_params(old: JobRecord, new: JobRecord) -> dict[str, Any]:
    """The values of UPDATE_JOB: `old` as it was read becomes `new`."""
    params = guard_params(old)
    for name, value in row_values(new).items():
        params[f"v_{name}"] = value
    return params


@functools.cache
def insert_new(insert: Any) -> Any:
    """INSERT of a job row unless its id is there already (RETURNING the id when inserted);
    `insert` is the dialect's (sqlalchemy.dialects.sqlite.insert or postgresql.insert)."""
    return insert(jobs).on_conflict_do_nothing().returning(_c.id)


@functools.cache
def allocation_candidates(by_miner: bool, by_proof_type: bool) -> Any:
    """The ready jobs a worker may take, in allocation order, locked (SKIP LOCKED: another
    allocation's rows are passed over, not waited for). Parameters: `now`, `n` (how many), and
    `miners` / `proof_types` when filtered by them (lists)."""
    statement = sa.select(jobs).where(
        _c.state == READY,
        sa.or_(_c.not_after.is_(None), _c.not_after > sa.bindparam("now")),
    )
    if by_miner:
        statement = statement.where(_c.miner_id.in_(sa.bindparam("miners", expanding=True)))
    if by_proof_type:
        statement = statement.where(_c.proof_type.in_(sa.bindparam("proof_types", expanding=True)))
    # The order follows rules.allocation_key; rules.choose re-checks what this returns.
    return (
        statement.order_by(_c.not_after.asc().nulls_last(), _c.created_at, _c.id)
        .limit(sa.bindparam("n", type_=sa.BigInteger))  # damocles asks up to 2**32 - 1
        .with_for_update(skip_locked=True)
    )


__all__ = [
    "DELETE_JOB",
    "DELETE_JOB_BY_ID",
    "INSERT_JOB",
    "READ_JOB",
    "READ_JOB_LOCKED",
    "UPDATE_JOB",
    "allocation_candidates",
    "guard_params",
    "insert_new",
    "update_params",
]
