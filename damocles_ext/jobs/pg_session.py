"""What the PostgreSQL server does with a job-store session whose client is gone.

The client side is covered by libpq's keepalives (database.PG_TCP_SETTINGS): a client notices a
dead server. The server does not notice a dead client (its host down, the network cut, the
process frozen) before its own TCP keepalives do, about 2 hours with Linux's defaults, and until
then keeps the session with what it holds: a job row read FOR UPDATE, an UPDATE not yet
committed. Every other session that needs that row (the worker reconnecting and retrying, a
producer, an operator's `reset` or `remove`) waits on the lock meanwhile.

So every session of the store (its engine's connections, the producers' LISTEN connection) sets
these for itself once connected, where the server ends it, and frees its locks:

- `idle_in_transaction_session_timeout`: the server waits this long for the next statement of
  a transaction. No transaction of the store waits on anything but its own statements: each is
  one blocking call in a thread (no await, no network call but the database's inside it), so a
  live client leaves a transaction idle for milliseconds;
- `tcp_keepalives_idle`, `_interval`, `_count` and `tcp_user_timeout`: the server's side of the
  TCP connection, as PG_TCP_SETTINGS on the client's: a session that waits for its client (or
  sends to it) learns that it is gone within about 30 s. (Nothing on a unix socket.)
- `client_connection_check_interval` (PostgreSQL 14 and later): a statement that runs (waits for
  a lock, say) looks this often at whether its client is still there, which it otherwise only
  learns when it answers.

A dead client's locks are freed within about 40 s (the 30 s timeout, or 25 s of keepalives and
the next check). A call that meets them meanwhile gives up after lock_timeout (below), naming
that session, and one made after lands. Not on PostgreSQL 12 and 13, which have no connection
check, for a session whose statement waits on another lock: it keeps its locks until that
statement ends. A session ended this way comes back to its client (if it was only frozen) as
SQLSTATE 25P03, its transaction rolled back, which retry.py runs again even at COMMIT.

And one for a live session that holds a lock a statement of ours waits for (an operator's psql
left inside BEGIN after a SELECT ... FOR UPDATE or an UPDATE, a change by hand), which the
above never end: `lock_timeout`, 4 s, so that a statement waits that long at most for each lock
it acquires (a row's tuple lock, then its holder's transaction, when it queued behind another
waiter), and its call fails naming the holder (lock_waits.py) rather than keep its thread
blocked for as long as the lock is held. The schema's lock (migration.py) sets its own wait
inside its transaction.

SET once connected rather than libpq's `options` parameter: PgBouncer refuses that parameter
at connect (unless told to ignore it), and SET works through PgBouncer's session pooling. A
server without one of these settings (an older PostgreSQL) is left without it; one it refuses
(a managed service that locked it, a value its platform cannot have) is left as the server has
it, the others set all the same, and warned of once per engine or listener. A URL's own
`options` (or PGOPTIONS) win for the settings they name, as the URL's parameters do over
PG_TCP_SETTINGS. These override the role's and the database's defaults, for the store's own
sessions only.

Behind PgBouncer (docs/JOBS.md says what to set there instead):
- the server-side keepalives, tcp_user_timeout and the connection check watch PgBouncer's link
  to the server, not our host: only the idle-in-transaction timeout frees a dead host's locks
  (PgBouncer's own tcp_keepidle, tcp_keepintvl, tcp_keepcnt, tcp_user_timeout and
  idle_transaction_timeout watch its clients);
- with transaction pooling, a SET lands on the server connection lent at that moment and stays
  there: it reaches the other clients of the same user and database lent it later, and our later
  transactions may run without it;
- with ignore_startup_parameters = options, a setting named in the URL's `options` is dropped by
  PgBouncer and not SET here either: nobody sets it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("damocles_ext.jobs.store")

#: The settings each session of the store gives itself (PostgreSQL's names and units). Read when
#: an engine (database.make_engine) or a listener (notify.JobListener.of_store) is made: a change
#: here (a test's bound of 100 ms, a value the server refuses) holds for those made after it.
PG_SESSION_SETTINGS: dict[str, str] = {
    "idle_in_transaction_session_timeout": "30s",
    "tcp_keepalives_idle": "10s",
    "tcp_keepalives_interval": "5s",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "30s",
    "client_connection_check_interval": "10s",
    # Not a dead client's: a live session's lock (an operator's psql left inside BEGIN after a
    # SELECT ... FOR UPDATE) waited for at most this long per lock a statement acquires
    # (lock_waits.py), at two tries at most (retry.py): a call alone behind one holder about
    # 8 s, inside a worker's 10 s RPC timeout; one queued behind another waiter for the row
    # waits for the tuple's lock and then the holder's, up to twice that.
    "lock_timeout": "4s",
}

#: A setting the server does not know (pg_settings has no row for it) is left.
_APPLY = (
    "SELECT set_config(s.name, v.value, false)"
    " FROM unnest(%s::text[], %s::text[]) AS v(name, value)"
    " JOIN pg_settings s ON s.name = v.name"
)


def split_options(options: str) -> list[str]:
    """The words of a libpq `options` value as the server splits them (pg_split_opts): at
    whitespace, where a backslash makes the character after it (a space, a backslash) part of
    the word."""
    words: list[str] = []
    word: str | None = None  # None between words
    escaped = False
    for char in options:
        if escaped or char not in _SPACE_OR_ESCAPE:
            word, escaped = (word or "") + char, False
        elif char == "\\":
            word, escaped = word or "", True
        elif word is not None:
            words.append(word)
            word = None
    if word is not None:
        words.append(word)
    return words


#: The server's whitespace (C's isspace) and its escape, in an `options` value.
_SPACE_OR_ESCAPE = frozenset(" \t\n\v\f\r\\")


def options_names(options: str) -> set[str]:
    """The settings a libpq `options` value sets: `-c name=value`, `-cname=value` or
    `--name=value` (PostgreSQL reads `-` in a name as `_`, and names in any case)."""
    names = set()
    words = iter(split_options(options))
    for word in words:
        if word == "-c":
            setting = next(words, "")
        elif word.startswith(("-c", "--")):
            setting = word[2:]
        else:
            continue
        if "=" in setting:
            names.add(setting.split("=", 1)[0].replace("-", "_").lower())
    return names


def session_settings(url: URL) -> dict[str, str]:
    """PG_SESSION_SETTINGS (as they are now) less those the URL's `options` parameter sets, or
    PGOPTIONS when it has none (libpq's order)."""
    given = url.query.get("options")
    if given is None:
        given = os.environ.get("PGOPTIONS", "")
    text = given if isinstance(given, str) else " ".join(given)
    named = options_names(text)
    return {k: v for k, v in PG_SESSION_SETTINGS.items() if k not in named}


class Refusals:
    """The settings the server refused to the sessions of one engine or listener: each is warned
    of once, not at each new connection. Shared by the pool's threads."""

    def __init__(self) -> None:
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def first(self, names: Iterable[str]) -> list[str]:
        """Those of `names` not warned of before, now counted as warned of."""
        with self._lock:
            new = [name for name in names if name not in self._warned]
            self._warned.update(new)
        return new


def apply(dbapi_connection: Any, settings: dict[str, str], where: str,
          refusals: Refusals | None = None) -> None:  # fmt: skip
    """Give the session of a psycopg connection `settings`, committed (a SET rolled back is
    undone): all in one statement, or, when the server refuses that, each on its own, so that
    one refused (a managed service that locked it, a value the platform cannot have) leaves the
    others set. Those refused are warned of (once for `refusals`) and the connection used as it
    is; a connection lost meanwhile raises, as any statement."""
    if not settings:
        return
    import psycopg  # here: a SQLite store never needs it

    try:
        _set(dbapi_connection, settings)  # one round trip, as nearly always
        return
    except psycopg.Error as error:
        _unless_refused(dbapi_connection, error)
    refused: dict[str, str] = {}
    for name, value in settings.items():
        try:  # a savepoint inside a transaction; its own transaction in autocommit
            with dbapi_connection.transaction():
                dbapi_connection.execute(_APPLY, ([name], [value]))
        except psycopg.Error as error:
            if dbapi_connection.closed or getattr(error, "sqlstate", None) is None:
                raise
            refused[name] = str(error).strip().splitlines()[0]
    if not dbapi_connection.autocommit:
        dbapi_connection.commit()
    new = list(refused) if refusals is None else refusals.first(refused)
    if new:
        log.warning(
            "the PostgreSQL server of the job store %s refused %s, of the session settings that"
            " free a dead client's locks and bound a wait for a lock (the others are set): a"
            " client that dies in a transaction may hold a job's locks for longer, or a call wait"
            " longer for one; set %s on its role or database (ALTER ROLE ... SET) if it allows"
            " that",
            where, "; ".join(f"{name} = {settings[name]} ({refused[name]})" for name in new),
            " and ".join(new),
        )  # fmt: skip


def _set(dbapi_connection: Any, settings: dict[str, str]) -> None:
    """All of `settings` in one statement, committed."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute(_APPLY, (list(settings), list(settings.values())))
    if not dbapi_connection.autocommit:
        dbapi_connection.commit()


def _unless_refused(dbapi_connection: Any, error: psycopg.Error) -> None:
    """Raise `error` unless the server answered it (the connection is there, in a transaction
    rolled back now); the settings are then tried one by one."""
    if dbapi_connection.closed or getattr(error, "sqlstate", None) is None:
        raise error
    if not dbapi_connection.autocommit:
        dbapi_connection.rollback()


def on_connect(engine: Engine, url: URL, where: str) -> None:
    """Apply session_settings(url) to each new connection of `engine`, read at its creation."""
    settings = session_settings(url)
    refusals = Refusals()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        apply(dbapi_connection, settings, where, refusals)
