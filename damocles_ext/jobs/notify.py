"""Early wake-ups for producers on PostgreSQL: the store sends `NOTIFY dext_wdpost_jobs, '<job id>'`
in the transactions that finish, cancel, reset or remove a job (store.py), and a producer LISTENs.

psycopg's async API is asyncio-only, so the LISTEN runs on psycopg's sync connection in one
thread of its own, which hands each job id back to trio (`trio.from_thread.run_sync`). The
notifications only shorten a wait: the producer polls all the same (YugabyteDB has LISTEN off,
and a notification sent while the listener was reconnecting is lost), so a listener that loses
its connection logs it, wakes every waiter once it is back (something may have changed in the
gap) and reconnects with a backoff, while polling carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import psycopg
import trio
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.pq import Conninfo

from ..threads import NoThreadError, run_in_thread
from .database import describe_url, first_line, pg_tcp_settings
from .outage import Outage
from .pg_session import Refusals, session_settings
from .pg_session import apply as apply_session_settings
from .store import NOTIFY_CHANNEL as CHANNEL
from .store import JobStore

log = logging.getLogger("damocles_ext.producer")

#: How often the listening thread looks up from its socket to see whether it must stop.
CHECK_INTERVAL: Final = 0.5
FIRST_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 30.0
APPLICATION_NAME: Final = "damocles-ext listen"


def _keep_when_idle(conn: psycopg.Connection[Any]) -> None:
    """Exempt this session from an idle_session_timeout a DBA set (on the role, the database or
    the server): a listening session is idle by design, and the server would end it at every
    timeout (a warning each time, and the notifications of the gap lost). A server older than
    PostgreSQL 14 has no such timeout."""
    try:
        conn.execute("SET idle_session_timeout = 0")
    except psycopg.errors.UndefinedObject:
        pass


class JobListener:
    """LISTEN on the store's channel: `on_job(job_id)` for each notification and `on_connect()`
    each time the listening connection is (re)established, both called in trio."""

    def __init__(
        self,
        conninfo: str,
        on_job: Callable[[str], None],
        on_connect: Callable[[], None] = lambda: None,
        *,
        connect_timeout: int = 10,
        tcp: Mapping[str, Any] | None = None,
        session: Mapping[str, str] | None = None,
        where: str | None = None,
    ) -> None:
        self.conninfo = conninfo
        #: libpq's TCP settings (database.PG_TCP_SETTINGS less the URL's own): a listener that
        #: only receives learns that its server's host died from the keepalives alone.
        self.tcp: dict[str, Any] = dict(tcp or {})
        #: The server's side (pg_session.PG_SESSION_SETTINGS less the URL's own): the server
        #: ends the session of a listener whose host died, rather than keep it for hours.
        self.session: dict[str, str] = dict(session or {})
        #: Those the server refused, warned of at the first connection, not at each.
        self.refusals = Refusals()
        #: The store for messages (a conninfo that is a URL: itself, its password hidden).
        self.where = describe_url(conninfo) if where is None else where
        self.on_job = on_job
        self.on_connect = on_connect
        self.connect_timeout = connect_timeout
        self._stop = threading.Event()
        # A thread of its own: it never takes one of the store's worker threads.
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    def of_store(
        cls, store: JobStore, on_job: Callable[[str], None], on_connect: Callable[[], None]
    ) -> JobListener | None:
        """The listener of a PostgreSQL store, or None for SQLite (which has no LISTEN)."""
        if not store.is_postgresql:
            return None
        # The connection parameters the store's engine gives psycopg: the same servers, user and
        # database. (The URL rendered again for libpq would keep only the last of several
        # `host=` parameters, which SQLAlchemy joins into one list of hosts to try.)
        _, params = store.engine.dialect.create_connect_args(store.url)
        libpq = {d.keyword.decode() for d in Conninfo.get_defaults()}  # not psycopg's `context`
        conninfo = make_conninfo(**{k: v for k, v in params.items() if k in libpq})
        return cls(
            conninfo, on_job, on_connect, tcp=pg_tcp_settings(store.url),
            session=session_settings(store.url), where=store.where,
        )  # fmt: skip

    async def run(self) -> None:
        """Listen until cancelled (the thread stops within CHECK_INTERVAL after)."""
        token = trio.lowlevel.current_trio_token()
        backoff = FIRST_BACKOFF
        try:
            while True:
                try:
                    await run_in_thread(
                        self._listen, token, abandon_on_cancel=True, limiter=self._limiter
                    )
                    return
                except NoThreadError as exc:  # at the limit of tasks: polling goes on
                    log.warning(
                        "the job store's notification listener for %s: %s; polling goes on,"
                        " trying again in %gs", self.where, exc, backoff,
                    )  # fmt: skip
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            self._stop.set()

    def _listen(self, token: trio.lowlevel.TrioToken) -> None:
        backoff = FIRST_BACKOFF
        # One warning when it cannot listen, one line when it does again: the store down for an
        # hour is not a line per reconnection (the retries in between at debug).
        outage = Outage(
            begins=f"the job store's notification listener cannot listen on {self.where}"
            " ({why}); polling goes on, and it connects again in the background",
            ends="the job store's notification listener listens again (after {failures} failed"
            " connections in {lasted:.0f} s)",
        )
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.conninfo,
                    autocommit=True,
                    connect_timeout=self.connect_timeout,
                    application_name=APPLICATION_NAME,
                    **self.tcp,
                ) as conn:
                    _keep_when_idle(conn)
                    apply_session_settings(conn, self.session, self.where, self.refusals)
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    back = outage.answered(time.monotonic())  # (one line either way)
                    log.info("%s", back or f"listening for job changes on {self.where}")
                    backoff = FIRST_BACKOFF
                    if not self._hand(token, self.on_connect):
                        return
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=CHECK_INTERVAL):
                            if not self._hand(token, self.on_job, note.payload):
                                return
            except psycopg.errors.FeatureNotSupported as exc:
                log.warning(
                    "the job store %s does not offer LISTEN (%s): results are found by polling"
                    " only", self.where, str(exc).strip(),
                )  # fmt: skip
                return
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                why = first_line(exc)
                if (line := outage.failed(time.monotonic(), why)) is not None:
                    log.warning("%s", line)
                log.debug("notification listener: %s; connecting again in %gs", why, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _hand(self, token: trio.lowlevel.TrioToken, fn: Callable[..., None], *args: str) -> bool:
        """Run `fn(*args)` in trio; False when trio is gone (stop listening)."""
        try:
            trio.from_thread.run_sync(fn, *args, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled):
            return False
        return True
