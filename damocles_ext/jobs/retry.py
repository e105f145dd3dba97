"""Transient PostgreSQL failures, tried again in one place: `database_errors` (below) runs every
operation of a `JobStore` through `run`, which runs it again, a bounded number of times after a
jittered pause, when its transaction failed in a way that left nothing written, and turns the
last failure into the StoreError that names the store and says what to do.

Tried again (PostgreSQL only: SQLite's writers wait for its one write lock up to the busy
timeout, and it has no such failures):

- a transaction the server rolled back to let another go on: a serialization failure (SQLSTATE
  40001) or a deadlock (40P01), met at any statement or at COMMIT: the server answered, nothing
  of the transaction was stored;
- a session the server ended because it was idle in its transaction longer than its
  idle_in_transaction_session_timeout (SQLSTATE 25P03: the client was frozen inside it, see
  pg_session.py), met at any statement or at COMMIT: the server rolled the transaction back
  before it ended the session, so nothing of it was stored either;
- a transaction whose connection was lost before its COMMIT was sent (the server restarting or
  failing over, `pg_terminate_backend`, the network cut): a session that ends rolls back;
- a statement that waited for a lock longer than its session's lock_timeout (SQLSTATE 55P03,
  see lock_waits.py), at most lock_waits.LOCK_ATTEMPTS tries in all: one of our own sessions
  may hold a row longer than usual, but a holder still there is not waited for again;
- a connection lost while its COMMIT was sent, when the transaction may have been stored and
  its answer lost, only for an operation whose second run leaves the store, and answers, as one
  run would (`replayable`: reads, create, heartbeat, worker_seen, a finish that names its lease
  or worker; docs/JOBS.md says why the others are not).

Tried again on either engine: a `StoreConflict`, raised by the operation itself inside its
transaction when a row it read changed or went before it wrote (a job another process made and
removed while this one made it): the transaction is rolled back, so nothing of it was stored and
every operation may be run again, replayable or not, as after a serialization failure.

Not tried again: a failure to connect (the server down, refusing, unreachable: each try could
wait connect_timeout): an outage, which each caller meets in its own way.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Final, ParamSpec, TypeVar, overload

from sqlalchemy import exc
from sqlalchemy.engine import URL, Engine

from . import lock_waits
from .database import StoreConflict, StoreError, first_line, is_unreachable, store_failure

log = logging.getLogger("damocles_ext.jobs.store")

#: Tries of one operation at most (the first and three more).
ATTEMPTS: Final = 4
#: The longest pause before the second try; each next one may be twice as long.
FIRST_PAUSE: Final = 0.05
MAX_PAUSE: Final = 1.0
#: The SQLSTATEs of a transaction the server rolled back to let another go on.
CONFLICTS: Final = {"40001": "a serialization failure", "40P01": "a deadlock"}
#: The SQLSTATE of a session the server ended for idling in its transaction, rolled back.
IDLE_ENDED: Final = "25P03"

P = ParamSpec("P")
R = TypeVar("R")


class Phase(threading.local):
    """Where the calling thread's transaction is: "connect" (a connection being checked out or
    made), "work" (its statements), "commit" (its COMMIT sent). Each thread has its own."""

    name = "connect"


def why_again(error: exc.DBAPIError, phase: str, *, replayable: bool) -> str | None:
    """Why a transaction that failed with `error` in `phase` may be run again, or None."""
    sqlstate = getattr(error.orig, "sqlstate", None) or ""
    if sqlstate in CONFLICTS:
        return f"{CONFLICTS[sqlstate]} (SQLSTATE {sqlstate})"
    if sqlstate == lock_waits.LOCK_NOT_AVAILABLE:
        return (
            f"it waited for a lock longer than its lock_timeout (SQLSTATE {sqlstate}; tried"
            f" {lock_waits.LOCK_ATTEMPTS} times at most)"
        )
    if sqlstate == IDLE_ENDED:  # whatever the phase: the server rolled back before it ended it
        return (
            "the server ended its session, idle in its transaction past its"
            f" idle_in_transaction_session_timeout (SQLSTATE {sqlstate}), and rolled it back"
        )
    if phase == "connect" or not is_unreachable(error):
        return None
    if phase == "work":
        return "its connection lost before COMMIT"
    return "its connection lost as COMMIT was sent" if replayable else None


def pause(attempt: int, first: float = FIRST_PAUSE) -> float:
    """The pause after try `attempt` failed: at random up to `first` doubled at each try, at
    most MAX_PAUSE (sessions that deadlocked on each other then try again apart)."""
    return random.uniform(0.0, min(MAX_PAUSE, first * 2 ** (attempt - 1)))


def run(call: Callable[[], R], *, name: str, where: str, url: URL, phase: Phase,
        replayable: bool, attempts: int = ATTEMPTS, first_pause: float = FIRST_PAUSE,
        engine: Engine,
        subject: Callable[[], lock_waits.Subject] = lock_waits.Subject) -> R:  # fmt: skip
    """`call()` (the operation `name` of the store at `where`), tried up to `attempts` times
    while it fails with a transient PostgreSQL failure or a StoreConflict; its last database
    failure is raised as a StoreError (a StoreUnavailable when the store could not be reached),
    its last conflict as a StoreConflict that says it was met at each try. A lock waited for
    past lock_timeout ends it after lock_waits.LOCK_ATTEMPTS tries, with an error naming
    `subject()` (' of job X', and its id) and the sessions that held it (read on `engine`)."""
    attempt, waits = 1, 0  # the tries, and those of them that waited past lock_timeout
    while True:
        phase.name = "connect"
        try:
            return call()
        except StoreConflict as conflict:  # rolled back before its COMMIT: nothing stored
            if attempt >= attempts:
                raise StoreConflict(
                    f"job store {where}: {name} failed: {conflict}, at each of {attempt} tries"
                    " (other processes kept writing the same job at that moment); it may work"
                    " when tried again later"
                ) from conflict
            log.info("job store %s: %s failed at try %d of %d: %s; trying again",
                     where, name, attempt, attempts, conflict)  # fmt: skip
        except exc.DBAPIError as error:
            postgresql = url.get_backend_name() == "postgresql"
            why = why_again(error, phase.name, replayable=replayable) if postgresql else None
            # A lock waited for bounds the tries that wait (each holds a thread of the store),
            # counted apart from the others: a deadlock at the first does not spend one.
            waited = postgresql and lock_waits.is_lock_wait(error)
            waits += waited
            last = attempt >= attempts or (waited and waits >= lock_waits.LOCK_ATTEMPTS)
            if why is None or last:
                if waited:
                    failure = lock_waits.too_long(
                        where, name, subject(), error, waits, engine, phase.name
                    )
                    raise failure from error
                raise _failure(name, where, url, error, phase.name, why, attempt) from error
            bound = attempts
            if waited:  # the tries it may still wait at, at most
                bound = min(attempts, attempt + lock_waits.LOCK_ATTEMPTS - waits)
            log.info("job store %s: %s failed at try %d of %d, %s; trying again",
                     where, name, attempt, bound, why)  # fmt: skip
        time.sleep(pause(attempt, first_pause))
        attempt += 1


def _failure(name: str, where: str, url: URL, error: exc.DBAPIError, phase: str,
             why: str | None, tries: int) -> StoreError:  # fmt: skip
    """The StoreError for the last failure of `name`, and why it was not tried again."""
    failure = store_failure(where, url, name, error)
    sqlstate = getattr(error.orig, "sqlstate", None) or ""
    if sqlstate in CONFLICTS:
        return type(failure)(
            f"{failure} ({CONFLICTS[sqlstate]}, SQLSTATE {sqlstate}, at each of {tries} tries:"
            " other sessions kept conflicting with it; it may work when tried later, else look"
            " at what holds the store's rows: pg_stat_activity, the server's log)"
        )
    if sqlstate == IDLE_ENDED:
        return type(failure)(
            f"job store {where}: {name} failed: {first_line(error)} (SQLSTATE {sqlstate}), at each"
            f" of {tries} tries: the server ended the session, idle in its transaction for longer"
            " than idle_in_transaction_session_timeout, and rolled it back (nothing of it was"
            " stored); this process was paused or frozen inside its transactions (a paused VM,"
            " a stopped process, heavy swapping), or that timeout (the URL's options, PGOPTIONS,"
            " the role's setting) is too short for it"
        )
    postgresql = url.get_backend_name() == "postgresql"  # SQLite has no connection to lose
    if why is None and postgresql and phase == "commit" and is_unreachable(error):
        return type(failure)(
            f"{failure}; its connection was lost as the {name} was being committed, so it may"
            f" have been stored: not tried again, as a second {name} is not the same as one"
        )
    if tries > 1:
        return type(failure)(
            f"{failure} (at try {tries}: the server rolled back the tries before, or their"
            " connection was lost before COMMIT)"
        )
    return failure


@overload
def database_errors(method: Callable[P, R]) -> Callable[P, R]: ...
@overload
def database_errors(
    *, replayable: bool | Callable[..., bool] = False, name: str | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
def database_errors(
    method: Callable[P, R] | None = None,
    *,
    replayable: bool | Callable[..., bool] = False,
    name: str | None = None,
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """A method of store.JobStore run through `run`: tried again after a transient PostgreSQL
    failure that left nothing stored (`replayable`: also after a connection lost as its COMMIT
    was sent, for an operation whose second run is the same as one; a callable says it of the
    call's arguments), its last database failure turned into a StoreError that names the store
    (and the job the call is about) and says what to do. `name`: the operation's in messages (a
    step of one: the method's own)."""

    def wrap(method: Callable[P, R]) -> Callable[P, R]:
        subject = lock_waits.subject_of(method)

        @functools.wraps(method)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            store: Any = args[0]  # a JobStore (store.py imports this module)
            again = replayable(*args, **kwargs) if callable(replayable) else replayable
            return run(
                lambda: method(*args, **kwargs), name=name or method.__name__, where=store.where,
                url=store.url, phase=store.phase, replayable=again,
                attempts=store.attempts, first_pause=store.first_pause, engine=store.engine,
                subject=lambda: subject(*args, **kwargs),
            )  # fmt: skip

        return wrapper

    return wrap if method is None else wrap(method)
