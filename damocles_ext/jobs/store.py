"""The WindowPoSt job store: one SQLAlchemy Core code path over SQLite and PostgreSQL.

Each operation is one transaction (remove_all: one per batch of jobs) that reads the rows it
concerns, asks the rules (rules.py) what they become, and writes that back: the rules decide,
the store persists atomically. Two processes may share one PostgreSQL database (several
coordinators and producers at once), so nothing here keeps state between calls, and every write
is guarded:

- rows an operation changes are read `FOR UPDATE` on PostgreSQL; allocation and the sweeps add
  `SKIP LOCKED`, so racing coordinators take different jobs instead of waiting on each other,
  and so do heartbeats (a held job's heartbeat waits for its next);
- on SQLite every transaction starts with `BEGIN IMMEDIATE` (one writer at a time, the others
  wait up to the busy timeout; a store opened read-only begins deferred), in WAL mode so readers
  never block;
- each UPDATE and DELETE also names the row's previous state, try count and update time, and a
  write that finds the row changed under it raises `StoreConflict` rather than overwrite it
  (its transaction rolled back, the operation is run again from its start: retry.py);
- creation is `INSERT … ON CONFLICT DO NOTHING`: the id is the input's hash, so a duplicate is
  the same job.
- on PostgreSQL, a transaction rolled back for a serialization failure or a deadlock, or whose
  connection was lost before its COMMIT, is run again a few times (retry.py, `database_errors`).

The calls are blocking (psycopg's sync driver, the sqlite3 module); `TrioJobStore` runs each in a
worker thread under a small limiter. Every call takes `now` (unix seconds) from its caller: the
trio wrapper reads the clock, tests pass the time they want.
"""

from __future__ import annotations

import importlib
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from . import migration, retry, rules
from . import statements as stmts
from . import summary as jobs_summary
from . import workers as worker_rows
from .database import (
    DEFAULT_BUSY_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PASS_LIMIT,
    SCHEMA_VERSION,
    URL_HELP,
    InvalidJob,
    JobNotFound,
    StoreConfigError,
    StoreConflict,
    StoreError,
    StoreTakesNoWrites,
    StoreUnavailable,
    a_mistake_at_open,
    check_create,
    describe_url,
    jobs,
    make_engine,
    parse_url,
    schema_version,
    sqlite_file,
    sqlite_store_problem,
)
from .model import FINISHED, READY, RUNNING, JobOutput, JobRecord, WdPoStInput
from .retry import database_errors
from .rows import DamagedJob, job_of_row, readable_jobs, row_values
from .sqlite_file import FileWatch, StoreLost
from .trio_store import TrioJobStore

#: Jobs one transaction of remove_all removes at most: other writers get the store in between
#: (20,000 jobs in one held SQLite's write lock for seconds, every worker's heartbeat behind it).
REMOVE_BATCH = 500
#: How long remove_all leaves SQLite's write lock free between two transactions: a writer
#: waiting for it looks again after a sleep that grows to 100 ms (SQLite's busy handler), and
#: does not queue; taken again at once, it stayed with remove_all (measured: a heartbeat held
#: up 1.7 s by 20,000 jobs removed 500 at a time). PostgreSQL's lock waiters queue.
SQLITE_TURN = 0.1
#: Our insert met another process's job, removed before we read it (PostgreSQL only: SQLite's
#: one writer at a time lets no other in between).
_CREATED_AND_REMOVED = "job {} was made by another process and removed while this one made it"
#: The PostgreSQL channel of job changes producers wait for; the payload is the job id.
NOTIFY_CHANNEL = "dext_wdpost_jobs"
_NOTIFY = sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, sa.bindparam("job_id", type_=sa.String)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a write did: the records as stored after it and the rules' effects."""

    jobs: tuple[JobRecord, ...]
    effects: tuple[rules.Effect, ...]
    #: Whether it wrote a row (a refused or repeated heartbeat or finish writes none): what a
    #: store refusing writes (a full disk) cannot answer.
    wrote: bool = False
    #: The jobs passed over because another session held their row (a heartbeat's, on
    #: PostgreSQL): in `jobs` as last committed, with no effect (frontends/held_warnings.py
    #: warns of a job held so long its last stored heartbeat is half its HeartbeatTimeout old).
    skipped: tuple[str, ...] = ()


class JobStore:
    """The job store at one URL. Thread-safe: each call is one transaction on its own connection."""

    def __init__(self, url: str, *, limits: rules.JobLimits | None = None,
                 busy_timeout: float = DEFAULT_BUSY_TIMEOUT, read_only: bool = False,
                 connect_timeout: int = DEFAULT_CONNECT_TIMEOUT, pool_size: int = 8,
                 lease_factory: Callable[[], str] | None = None) -> None:  # fmt: skip
        self.url = parse_url(url)
        # As the user wrote it (password hidden): the driver we chose is not theirs to see.
        self.where = describe_url(url)
        self.limits = limits if limits is not None else rules.JobLimits()
        self.engine = make_engine(url, busy_timeout=busy_timeout, connect_timeout=connect_timeout,
                                  pool_size=pool_size, read_only=read_only)  # fmt: skip
        dialect = self.engine.dialect.name  # (postgresql's package imports all its drivers)
        self.is_postgresql = dialect == "postgresql"
        self._insert: Any = importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert
        self._new_lease = lease_factory or (lambda: secrets.token_hex(12))
        self._damaged: set[str] = set()  # ids of damaged rows warned of (rows.readable_jobs)
        #: The schema version the store is read at: SCHEMA_VERSION, unless opened read-only.
        self.version = SCHEMA_VERSION
        #: A SQLite store's file, which must stay the one at its path (sqlite_file.py).
        self.file_watch = FileWatch.on(self.engine, self.url, self.where)
        #: Where each thread's transaction is, and how often a transient failure is tried again.
        self.phase = retry.Phase()
        self.attempts, self.first_pause = retry.ATTEMPTS, retry.FIRST_PAUSE

    @classmethod
    def open(
        cls,
        url: str,
        *,
        create: bool = True,
        open_timeout: float | None = None,
        writable: bool = False,
        read_only: bool = False,
        **kwargs: Any,
    ) -> JobStore:
        """A store ready for use: connected, its schema created or migrated.

        With `create=False` (an operator's command) a store that does not exist yet is an error
        rather than a new empty one: a mistyped URL must not look like a store with no jobs.

        `open_timeout`: how long the opening waits for a lock another process holds (SQLite's
        write lock, PostgreSQL's schema lock) before it fails, saying so, instead of the busy
        timeout (a start that must be quick: `serve`'s ready line). The store returned waits as
        long as `kwargs` say. `writable` (a service's store): check that it takes writes (a
        read-only file or replica fails the opening, not every job later), and who may change it.

        `read_only` (a command that only reads, implies `create=False`): the schema is never
        changed, so that a newer damocles-ext's command does not upgrade it under a running
        older coordinator: an older store is read as it is (`version`), and a read it cannot
        answer is refused saying so (StoreConfigError); the store is for reading only."""
        opening = kwargs
        if open_timeout is not None:
            busy = min(open_timeout, kwargs.get("busy_timeout", DEFAULT_BUSY_TIMEOUT))
            opening = dict(kwargs, busy_timeout=busy)
        store = cls(url, read_only=read_only, **opening)
        try:
            # (A copy read on a network file system is no danger: only a store written there.)
            if store.file_watch and not read_only and (why := store.file_watch.refusal(writable)):
                raise StoreConfigError(why)
            if not create or read_only:
                store.check_exists()
            if read_only:
                store.version = migration.readable(store.where, store.schema_version())
            else:
                store.migrate(lock_timeout=open_timeout, writable=writable)
        except BaseException as e:
            store.close()
            if isinstance(e, StoreUnavailable) and a_mistake_at_open(e.__cause__, store.url):
                raise StoreConfigError(str(e)) from None  # a mistake in the URL, not an outage
            raise
        if opening is kwargs:
            return store
        store.close()  # its connections wait for locks only open_timeout long
        waiting = cls(url, read_only=read_only, **kwargs)
        waiting.version = store.version  # read-only: the schema found, not this damocles-ext's
        return waiting

    def check_exists(self) -> None:
        """Raises StoreConfigError when there is no job store at the URL."""
        if not self.is_postgresql:
            if problem := sqlite_store_problem(sqlite_file(self.url), self.where):
                raise StoreConfigError(problem)
        elif self._existing_version() == 0:
            why = "the database has no job tables; check the URL"
            raise StoreConfigError(f"there is no job store at {self.where}: {why}")

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        if self.file_watch is not None:
            self.file_watch.check(self.engine)  # StoreLost once its file is not at its path
        self.phase.name = "connect"
        with self.engine.begin() as conn:
            self.phase.name = "work"
            yield conn
            self.phase.name = "commit"  # whatever fails from here on may have been stored

    def _locked(self, statement: Any, *, skip_locked: bool = False) -> Any:
        # Renders FOR UPDATE [SKIP LOCKED] on PostgreSQL; SQLite has no row locks and needs none
        # (BEGIN IMMEDIATE already holds the only write lock).
        return statement.with_for_update(skip_locked=skip_locked)

    # --- schema -------------------------------------------------------------------------------

    @database_errors
    def migrate(self, *, lock_timeout: float | None = None, writable: bool = False) -> int:
        """Create the schema, or bring an older one up to SCHEMA_VERSION; returns the version
        found (0 for a new store). Refuses a newer one with a StoreConfigError. `lock_timeout`:
        on PostgreSQL, how long to wait for the schema lock another session holds (StoreError
        after it; SQLite's wait is its busy timeout); an upgrade waits for table locks at most
        migration.UPGRADE_LOCK_TIMEOUT."""
        found = 0
        try:
            with self._transaction() as conn:
                if self.is_postgresql:
                    migration.take_schema_lock(conn, self.where, lock_timeout)
                found = self._version(conn)
                if found == 0:
                    migration.check_not_elsewhere(conn, self.url, self.where, creating=True)
                if found > SCHEMA_VERSION:
                    raise migration.too_new(self.where, found)
                migration.bring_up(conn, found, lock_timeout=lock_timeout)
                if writable:
                    migration.check_writable(conn, self.url, self.where)
                return found
        except exc.DBAPIError as e:
            why = (
                migration.not_permitted(e, self.engine, self.url, self.where, found)
                or migration.lock_waited_out(e, self.engine, self.where, found, lock_timeout)
                or migration.no_schema(e, self.engine, self.url, self.where)
            )
            if why is not None:
                raise why from e
            raise

    def _version(self, conn: Connection) -> int:
        if not sa.inspect(conn).has_table(schema_version.name):
            return 0
        versions = conn.execute(sa.select(schema_version.c.version)).scalars().all()
        if len(versions) != 1:
            raise StoreConfigError(
                f"the job store {self.where} has {len(versions)} rows in "
                f"{schema_version.name} (one expected): it was changed by hand; repair it or "
                "give another store URL"
            )
        return int(versions[0])

    @database_errors(replayable=True)
    def _existing_version(self) -> int:
        """The schema version, after check_not_elsewhere when there is no store."""
        with self._transaction() as conn:
            if (found := self._version(conn)) == 0:
                migration.check_not_elsewhere(conn, self.url, self.where, creating=False)
            return found

    @database_errors(replayable=True)
    def schema_version(self) -> int:
        with self._transaction() as conn:
            return self._version(conn)

    # --- one job at a time --------------------------------------------------------------------

    def _read(self, conn: Connection, job_id: str, *, lock: bool = True,
              skip_locked: bool = False) -> JobRecord | None:  # fmt: skip
        locked = stmts.READ_JOB_SKIP_LOCKED if skip_locked else stmts.READ_JOB_LOCKED
        statement = locked if lock else stmts.READ_JOB
        row = conn.execute(statement, {"job_id": job_id}).first()
        return None if row is None else job_of_row(row)

    def _write(self, conn: Connection, old: JobRecord | None, new: JobRecord | None) -> bool:
        """Store `new` in place of `old`; whether that wrote a row (not when they are equal)."""
        if old is None and new is None:
            return False
        if old is None:
            assert new is not None
            conn.execute(stmts.INSERT_JOB, row_values(new))
            return True
        if new is None:
            done = conn.execute(stmts.DELETE_JOB, stmts.guard_params(old))
        elif new == old:
            return False
        else:
            done = conn.execute(stmts.UPDATE_JOB, stmts.update_params(old, new))
        if done.rowcount != 1:
            raise StoreConflict(
                f"job {old.Id} changed in the store while it was being updated: another process"
                " wrote it at the same moment"
            )
        if self.is_postgresql and _wakes_producers(old, new):
            # Delivered at commit to the producers that LISTEN (notify.py): they look now.
            conn.execute(_NOTIFY, {"job_id": old.Id})
        return True

    def _apply(self, conn: Connection, job_id: str, event: rules.Event, now: float, *,
               skip_locked: bool = False) -> tuple[rules.Step, bool, bool]:  # fmt: skip
        """The rules' step for `event` on job `job_id`, stored; whether it wrote a row; whether
        the row was held. `skip_locked`: a row another session holds is not waited for: the
        step is the job as last committed, with no effect, and nothing is written."""
        try:
            old = self._read(conn, job_id, skip_locked=skip_locked)
        except DamagedJob:  # unreadable: only removed (read, and so locked, all the same)
            if not isinstance(event, rules.Remove):
                raise
            conn.execute(stmts.DELETE_JOB_BY_ID, {"job_id": job_id})
            if self.is_postgresql:  # its waiting producers woken, as _write's removals do
                conn.execute(_NOTIFY, {"job_id": job_id})
            self._damaged.discard(job_id)  # (made again and damaged again: warned of again)
            return rules.Step(None, (rules.Removed(job_id),)), True, False
        if old is None and skip_locked:
            held = self._read(conn, job_id, lock=False)  # there, but locked: or gone indeed
            if held is not None:
                return rules.Step(held, ()), False, True
        step = rules.apply(old, event, now, self.limits, job_id=job_id)
        return step, self._write(conn, old, step.job), False

    @database_errors(replayable=True)
    def create(self, job_input: WdPoStInput, now: float, *, deadline_idx: int = 0,
               partitions: Sequence[int] | None = None,
               not_after: float | None = None) -> tuple[JobRecord, bool]:  # fmt: skip
        """damocles' Create: the job for this input, made if new; returns (job, created)."""
        event = rules.Create(
            job_input,
            deadline_idx=deadline_idx,
            partitions=None if partitions is None else tuple(partitions),
            not_after=not_after,
        )
        with self._transaction() as conn:
            return self._create(conn, event, now)

    @database_errors(replayable=True)
    def create_many(
        self, events: Sequence[rules.Create], now: float
    ) -> list[tuple[JobRecord, bool]]:
        """Several Creates in one transaction (a deadline's partitions at once), in the order
        given; one read and one multi-row insert, however many there are."""
        for create in events:
            check_create(create)
        ids = [rules.new_job(create.input, now).Id for create in events]
        with self._transaction() as conn:
            existing = self._read_many(conn, ids)
            fresh: dict[str, JobRecord] = {}
            for job_id, create in zip(ids, events, strict=True):
                if job_id in existing or job_id in fresh:
                    continue
                step = rules.apply(None, create, now, self.limits, job_id=job_id)
                assert step.job is not None
                fresh[job_id] = step.job
            inserted: set[str] = set()
            if fresh:
                statement = stmts.insert_new(self._insert)
                # In the order of the ids, as every producer's: one inserting B then A beside
                # one inserting A then B would each wait for the other's uncommitted job.
                ordered = [row_values(fresh[job_id]) for job_id in sorted(fresh)]
                rows = conn.execute(statement, ordered)
                inserted = set(rows.scalars().all())
            if len(inserted) < len(fresh):
                # Other producers made some of them between our read and our insert.
                existing.update(self._read_many(conn, [i for i in fresh if i not in inserted]))
            made = []
            ours = set(inserted)
            for job_id in ids:
                if job_id in inserted:
                    made.append((fresh[job_id], True))
                    inserted.discard(job_id)  # a duplicate later in `events` is not new
                elif job_id in existing:
                    made.append((existing[job_id], False))
                elif job_id in ours:  # a duplicate of one made here
                    made.append((fresh[job_id], False))
                else:  # neither made here nor there: another's, removed since
                    raise StoreConflict(_CREATED_AND_REMOVED.format(job_id))
            return made

    def _read_many(self, conn: Connection, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        ids = sorted(set(job_ids))
        found: dict[str, JobRecord] = {}
        for start in range(0, len(ids), 500):
            statement = sa.select(jobs).where(jobs.c.id.in_(ids[start : start + 500]))
            for row in conn.execute(statement):
                found[row.id] = job_of_row(row)
        return found

    def _create(self, conn: Connection, event: rules.Create, now: float) -> tuple[JobRecord, bool]:
        check_create(event)
        job_id = rules.new_job(event.input, now).Id
        existing = self._read(conn, job_id, lock=False)
        step = rules.apply(existing, event, now, self.limits, job_id=job_id)
        assert step.job is not None
        if existing is not None:
            return existing, False
        inserted = conn.execute(stmts.insert_new(self._insert), row_values(step.job)).first()
        if inserted is not None:
            return step.job, True
        # Another producer made the same job between our read and our insert.
        raced = self._read(conn, job_id, lock=False)
        if raced is None:
            raise StoreConflict(_CREATED_AND_REMOVED.format(job_id))
        return raced, False

    @database_errors(replayable=True)
    def get(self, job_id: str) -> JobRecord | None:
        with self._transaction() as conn:
            return self._read(conn, job_id, lock=False)

    def get_many(self, job_ids: Iterable[str]) -> dict[str, JobRecord]:
        """The jobs among these ids that exist (a producer's look for its results)."""
        return self._get_many(list(job_ids))  # listed once: a try again reads the same ids

    @database_errors(replayable=True, name="get_many")
    def _get_many(self, job_ids: list[str]) -> dict[str, JobRecord]:
        with self._transaction() as conn:
            return self._read_many(conn, job_ids)

    @database_errors(replayable=True)
    def list_jobs(self) -> list[JobRecord]:
        """Every job, newest CreatedAt first (damocles' order)."""
        with self._transaction() as conn:
            rows = conn.execute(sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id)).all()
        return readable_jobs(rows, self._damaged)

    @database_errors(replayable=True)
    def heartbeat(self, job_ids: Sequence[str], worker: str, now: float, *,
                  leases: Mapping[str, str] | None = None) -> Outcome:  # fmt: skip
        """damocles' Heartbeat for a worker's running jobs; each job's lease, when given, must
        be its current one. Refused and unknown jobs are in the effects (`Refused`, `NotFound`);
        the others' heartbeats are stored, but for a job whose row another session holds: it is
        in `jobs` as last committed and in `skipped`, with no effect and nothing written (its
        next heartbeat tries again)."""
        with self._transaction() as conn:
            # A held job row (an operator's psql after SELECT ... FOR UPDATE) is not waited for:
            # waiting, one failed the whole heartbeat at lock_timeout, and with it the worker's
            # other jobs, which silence then took back. The sweep skips locked rows too: that
            # job is not taken back while it is held. The jobs' rows first, the worker's last (no
            # deadlock: what else locks both, allocation, skips locked job rows).
            outcome = self._each(conn, job_ids, now, lambda job_id: rules.Heartbeat(
                worker, None if leases is None else leases.get(job_id)), skip_locked=True)  # fmt: skip
            touched = worker_rows.touch(conn, [worker], now)
        return replace(outcome, wrote=True) if touched else outcome

    @database_errors(replayable=True)
    def worker_seen(self, worker: str, now: float, paused: tuple[int, int] | None = None) -> None:
        """A worker that asked for jobs before is alive now (damocles' WorkerPing); `paused`:
        how many of its job slots its ping says are paused, of how many (None: it says not)."""
        with self._transaction() as conn:
            worker_rows.touch(conn, [worker], now)
            worker_rows.pinged(conn, self._insert, worker, paused, now)

    @database_errors(replayable=True)
    def summary(
        self, now: float, *, live_window: float = jobs_summary.DEFAULT_LIVE_WINDOW
    ) -> jobs_summary.JobsSummary:
        """The jobs by kind, the oldest ready job, the live workers and the ready jobs none of
        them may take (see jobs/summary.py), read in one transaction."""
        seen = worker_rows.seen_table(self.version)
        if seen is None:
            raise migration.too_old(self.where, self.version, "the summary of its workers", 2)
        with self._transaction() as conn:
            return worker_rows.read_summary(conn, now, live_window, self.where, seen, self.version)

    def _each(self, conn: Connection, job_ids: Iterable[str], now: float,
              event_for: Callable[[str], rules.Event], *,
              skip_locked: bool = False) -> Outcome:  # fmt: skip
        stored: list[JobRecord] = []
        effects: list[rules.Effect] = []
        skipped: list[str] = []
        wrote = False
        # Sorted: two callers locking the same rows in the same order cannot deadlock.
        for job_id in sorted(set(job_ids)):
            step, written, held = self._apply(conn, job_id, event_for(job_id), now,
                                              skip_locked=skip_locked)  # fmt: skip
            wrote |= written
            effects += step.effects
            if step.job is not None:
                stored.append(step.job)
            if held:
                skipped.append(job_id)
        return Outcome(tuple(stored), tuple(effects), wrote, tuple(skipped))

    @database_errors(replayable=lambda *_args, lease=None, worker=None: bool(lease or worker))
    def finish(self, job_id: str, output: JobOutput | None, error_reason: str,
               now: float, *, lease: str | None = None, worker: str | None = None) -> Outcome:  # fmt: skip
        """damocles' Finish, fenced: see rules. A refusal is a `Refused` effect, not an error."""
        event = rules.Finish(output, error_reason, lease=lease, worker=worker)
        with self._transaction() as conn:
            return self._each(conn, [job_id], now, lambda _id: event)

    @database_errors
    def reset(self, job_id: str, now: float) -> JobRecord:
        """damocles' Reset; raises JobNotFound for an unknown id (damocles' message)."""
        with self._transaction() as conn:
            step, _, _ = self._apply(conn, job_id, rules.Reset(), now)
        if step.job is None:
            raise JobNotFound(job_id)
        return step.job

    @database_errors
    def remove(self, job_id: str, now: float) -> bool:
        """damocles' Remove: an unknown id is a silent success; returns whether one was removed."""
        with self._transaction() as conn:
            step, _, _ = self._apply(conn, job_id, rules.Remove(), now)
        return any(isinstance(e, rules.Removed) for e in step.effects)

    def remove_all(self, now: float, *, batch: int = REMOVE_BATCH, pause: float | None = None,
                   removed: Callable[[list[str]], None] | None = None) -> list[str]:  # fmt: skip
        """Every job there when it starts removed, `batch` at most per transaction, each
        committed before the next begins, so that other writers (workers' heartbeats, the
        coordinator) are not held up for all of them; their ids. A job made meanwhile is left.
        `pause`: seconds between two transactions (default: SQLITE_TURN on SQLite, none on
        PostgreSQL). `removed` is told each transaction's ids once committed (so a failure
        later leaves none unsaid); the failure says how many were removed before it."""
        # In Python's order, as each transaction locks its jobs (_each) and a heartbeat its own;
        # the database's own (ORDER BY id, by its collation) may be another.
        ids, batch = sorted(self._job_ids()), max(1, batch)
        if pause is None:
            pause = 0.0 if self.is_postgresql else SQLITE_TURN
        gone: list[str] = []
        for start in range(0, len(ids), batch):
            if start and pause > 0:
                time.sleep(pause)  # the others' turn at SQLite's write lock
            try:
                done = self._remove_batch(ids[start : start + batch], now)
            except StoreError as e:
                if not gone:
                    raise
                raise type(e)(
                    f"{e} ({len(gone)} of the {len(ids)} jobs were removed before it, each"
                    " transaction of them committed: run it again to remove the rest)"
                ) from e
            gone += done
            if removed is not None:
                removed(done)
        return gone

    @database_errors(replayable=True, name="remove_all")
    def _job_ids(self) -> list[str]:
        with self._transaction() as conn:
            return list(conn.execute(sa.select(jobs.c.id)).scalars())

    @database_errors(name="remove_all")
    def _remove_batch(self, job_ids: Sequence[str], now: float) -> list[str]:
        """These jobs removed in one transaction, each locked in its turn (an id gone since is
        passed over); the ids removed."""
        with self._transaction() as conn:
            outcome = self._each(conn, job_ids, now, lambda _id: rules.Remove())
        return [e.job_id for e in outcome.effects if isinstance(e, rules.Removed)]

    # --- many jobs at once --------------------------------------------------------------------

    @database_errors
    def allocate(
        self, spec: rules.AllocationSpec, n: int, worker: str, now: float, *,
        sent_back: bool = False,
    ) -> list[JobRecord]:  # fmt: skip
        """damocles' AllocateJobs: up to `n` ready jobs this worker may take, earliest deadline
        first, each now running on it under a new lease (the returned records carry it;
        `sent_back`: the worker carries it with its calls, Dext's, see rules.SENT_LEASE). The
        worker and its spec are recorded as seen now, whether or not it got a job: that is
        what tells which ready jobs no live worker may take (`summary`)."""
        if n <= 0:
            with self._transaction() as conn:
                worker_rows.record(conn, self._insert, worker, spec, now)
            return []
        candidates = stmts.allocation_candidates(
            bool(spec.allowed_miners), bool(spec.allowed_proof_types)
        )
        params: dict[str, Any] = {"now": now, "n": n}
        if spec.allowed_miners:
            params["miners"] = list(spec.allowed_miners)
        if spec.allowed_proof_types:
            params["proof_types"] = list(spec.allowed_proof_types)
        allocated: list[JobRecord] = []
        with self._transaction() as conn:
            worker_rows.record(conn, self._insert, worker, spec, now)
            rows = conn.execute(candidates, params).all()
            while len(found := readable_jobs(rows, self._damaged)) < len(rows) == params["n"]:
                params["n"] += len(rows) - len(found)  # damaged rows took places: look further
                rows = conn.execute(candidates, params).all()
            for job in rules.choose(found, spec, n, now):
                allocate = rules.Allocate(worker, self._new_lease(), sent_back)
                step = rules.apply(job, allocate, now, self.limits)
                self._write(conn, job, step.job)
                assert step.job is not None and isinstance(step.effects[0], rules.Allocated)
                allocated.append(step.job)
        return allocated

    @database_errors
    def sweep(
        self,
        now: float,
        *,
        limit: int = DEFAULT_PASS_LIMIT,
        job_ids: Sequence[str] | None = None,
        heard_since: float = 0.0,
        silent_before: float | None = None,
        probe_write: bool = False,
    ) -> Outcome:
        """damocles' MakeJobsDie + RetryFailedJobs, and our deadline cancellation: one pass over
        the jobs the rules may change now (only `job_ids` when given: a producer settling its
        own job at its deadline). A running job's silence counts from `heard_since` at the
        earliest, and it is silent when last heard from before `silent_before` (rules.Sweep).
        `probe_write`: with a write that changes nothing but must land (StoreTakesNoWrites when
        it cannot: a full disk). Safe to run in several processes at once."""
        c = jobs.c
        event = rules.Sweep(heard_since=heard_since, silent_before=silent_before)
        silent_before = rules.silent_before(event, now, self.limits)
        due = [
            sa.and_(c.state.in_((READY, RUNNING)), c.not_after <= now),
            sa.and_(
                c.state == FINISHED,
                c.error_reason != "",
                c.cancelled_at == 0,
                c.try_num < self.limits.max_try,
            ),
        ]
        if heard_since < silent_before:
            due.append(
                sa.and_(c.state == RUNNING, c.heartbeat_at > 0, c.heartbeat_at < silent_before)
            )
        statement = sa.select(jobs).where(sa.or_(*due))
        if job_ids is not None:
            statement = statement.where(c.id.in_(job_ids))
        return self._pass(statement.order_by(c.id).limit(limit), event, now, probe=probe_write)

    @database_errors
    def cleanup(self, now: float, *, limit: int = DEFAULT_PASS_LIMIT) -> Outcome:
        """damocles' CleanupExpiredJobs: finished jobs created more than JobLifetime ago."""
        statement = sa.select(jobs).where(
            jobs.c.state == FINISHED, jobs.c.created_at < now - self.limits.job_lifetime
        )
        with self._transaction() as conn:
            # Workers gone for as long as a finished job is kept are forgotten with them.
            worker_rows.forget(conn, now - self.limits.job_lifetime)
        return self._pass(statement.order_by(jobs.c.id).limit(limit), rules.Cleanup(), now)

    def _pass(self, statement: Any, event: rules.Event, now: float, *,
              probe: bool = False) -> Outcome:  # fmt: skip
        stored: list[JobRecord] = []
        effects: list[rules.Effect] = []
        wrote = probe
        with self._transaction() as conn:
            if probe:
                # Negated twice: SQLite writes nothing for a row set to what it holds.
                flip = schema_version.update().values(version=-schema_version.c.version)
                conn.execute(flip)
                conn.execute(flip)
            for old in readable_jobs(
                conn.execute(self._locked(statement, skip_locked=True)), self._damaged
            ):
                step = rules.apply(old, event, now, self.limits)
                wrote |= self._write(conn, old, step.job)
                effects += step.effects
                if step.job is not None and step.effects:
                    stored.append(step.job)
        return Outcome(tuple(stored), tuple(effects), wrote)


def _wakes_producers(old: JobRecord, new: JobRecord | None) -> bool:
    """A change a waiting producer acts on: finished (done, failed, cancelled), back to ready
    (reset, retried) or gone (removed)."""
    if new is None:
        return True
    # Or finished again: a late proof turned a failed job with a try left into a success.
    return (new.State != old.State or new.Output != old.Output) and new.State in (FINISHED, READY)


__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_PASS_LIMIT",
    "SCHEMA_VERSION",
    "URL_HELP",
    "InvalidJob",
    "JobNotFound",
    "JobStore",
    "Outcome",
    "StoreConfigError",
    "StoreConflict",
    "StoreError",
    "StoreLost",
    "StoreTakesNoWrites",
    "StoreUnavailable",
    "TrioJobStore",
    "describe_url",
    "make_engine",
    "parse_url",
]
