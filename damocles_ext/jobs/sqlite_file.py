"""A SQLite store's file, watched: the file a process opened must stay the one at its path.

An operator's `rm`, a restore from a backup with `mv`, a cleanup script: the process goes on
with the file it opened, which no longer has that name. Whatever it stored from then on would be
in a file no command and no other process sees, and lost when it stops; and the `-wal` and
`-shm` files beside the path are still its own, so a process that opens the new file reads the
old store's last writes as if they were the new file's (SQLite's "how to corrupt": a restored
backup silently overwritten by them).

So each operation first compares the file at the path (device and inode) with the one the first
connection opened; once they differ (or the path is gone), the store is lost for this process
for good: an ERROR says so once, the old store's write-ahead log is copied into the old file and
emptied (so the file now at the path is read as it is), the connections are closed, and every
operation from then on raises StoreLost. A connection is never opened on another file than the
first one. What the process does about it is its own (JOBS.md: the producer answers its
requests at once, the coordinator command stops).

A file on a network file system is refused at open (`FileWatch.on_network`; the file system is
told by `mounts.network_file_system`): SQLite's locks and the shared memory of its write-ahead
log do not hold there. So is a file a service (the coordinator, the producer) would serve jobs
from that another user could change (`FileWatch.untrusted`).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine

from ..trusted_path import UntrustedPathError, describe_mode, resolve_trusted, trusted_uids
from .database import URL_HELP, StoreUnavailable, sqlite_file
from .mounts import network_file_system

log = logging.getLogger("damocles_ext.jobs.store")


class StoreLost(StoreUnavailable):
    """The SQLite file this process opened was deleted or replaced at its path: the process no
    longer uses the store (exit code 1)."""


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None when there is none."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # its directory gone, or now a file
        return None
    return (st.st_dev, st.st_ino)


class FileWatch:
    """The file of a SQLite store's engine: `check()` before each operation."""

    def __init__(self, path: Path, where: str) -> None:
        self.path = path
        self.where = where
        #: (device, inode) of the file the first connection opened; None before it.
        self.identity: tuple[int, int] | None = None
        #: The file opened, symlinks resolved: SQLite's -wal and -shm are named after it.
        self.opened = path
        #: Why the store is lost to this process (said in every StoreLost), or None.
        self.lost: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def on(cls, engine: Engine, url: URL, where: str) -> FileWatch | None:
        """The watch of the file of `engine`, at `url`, installed; None for PostgreSQL."""
        if engine.dialect.name != "sqlite":
            return None
        watch = cls(sqlite_file(url), where)
        watch.install(engine)
        return watch

    def on_network(self) -> str | None:
        """Why the store cannot be used where it is: on a network file system; or None."""
        kind = network_file_system(self.path)
        if kind is None:
            return None
        return (
            f"the job store {self.where} is on a network file system ({kind}), where SQLite's"
            " locks and write-ahead log do not hold: two processes (on two machines, or one) may"
            " both write and damage it; put the file on a local disk, or use PostgreSQL"
            f" ({URL_HELP})"
        )

    def refusal(self, served: bool) -> str | None:
        """Why a store opened to write cannot be used where it is (`on_network`; `served`: by a
        service, the coordinator or the producer: `untrusted` too), or None."""
        return self.on_network() or (self.untrusted() if served else None)

    def untrusted(self) -> str | None:
        """Why the store cannot be served from where it is: another user could change it (a
        directory on the way theirs, or open to others' writes; the file, or its -wal, -shm or
        -journal, which SQLite replays when it opens the store, another user's or writable by
        every user), and so the jobs and proofs a coordinator hands out; or None. The rule of
        the control socket's place and --dump-dir (trusted_path.resolve_trusted)."""
        path = self.path.absolute()
        exists = os.path.lexists(path)
        try:
            resolved = resolve_trusted(path if exists else path.parent)
        except UntrustedPathError as exc:
            why: str | None = f"{exc}"
        except OSError:
            return None  # (what is missing or unreadable: the opening says)
        else:
            why = _foreign_file(resolved if exists else resolved / path.name)
            if why is None:
                return None
        return (
            f"the job store {self.where} could be changed by another user: {why}; put it where"
            " only this user or root can change it (its directory theirs, mode 0700 or 0755),"
            " its files this user's or root's and not writable by others (chmod o-w)"
        )

    def log_held(self, engine: Engine, at_least: int) -> tuple[int, bool]:
        """The size of the store's write-ahead log file (bytes; 0 when there is none; beside the
        file a symlink names) and, when it is `at_least`, whether a reader holds part of it
        back: a passive checkpoint (which waits for no one) could not copy all of it into the
        file. One that could is cut back at the next write. Blocking: run it in a thread."""
        try:
            size = os.stat(f"{self.opened}-wal").st_size
        except OSError:
            return 0, False
        if size < at_least:
            return size, False
        with engine.connect() as conn:  # on the driver's connection: outside any transaction
            driver = conn.connection.driver_connection
            assert driver is not None
            _busy, frames, copied = driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return size, frames > copied

    def install(self, engine: Engine) -> None:
        @event.listens_for(engine, "do_connect")
        def _before_connect(*_args: Any) -> None:
            # A pool that grows, or replaces a connection, must not open the file now at the
            # path beside the old one's: they would share the old one's -wal and -shm.
            if self.identity is not None:
                self.check(engine)

        @event.listens_for(engine, "connect")
        def _connected(*_args: Any) -> None:
            with self._lock:
                if self.identity is None:
                    self.identity = _identity(self.path)
                    self.opened = Path(os.path.realpath(self.path))

        @event.listens_for(engine, "checkin")
        def _returned(dbapi_connection: Any, record: Any) -> None:
            # Once lost, each connection given back has the old store's log emptied and is
            # closed: SQLite's own close leaves the log of a moved file where it is, and one in
            # use (another thread's call) when the loss was found would keep it and what it
            # committed since beside the path, in a pool no longer used.
            if self.lost is not None and dbapi_connection is not None:
                self._empty_log(dbapi_connection)
                record.invalidate()

    def _what_happened(self) -> str | None:
        if self.identity is None:
            return None
        try:
            now = _identity(self.path)
        except OSError:  # a directory on the way this user may no longer enter: SQLite says it
            return None
        if now is None:
            return "was deleted"
        if now != self.identity:
            was, is_now = self.identity[1], now[1]
            return f"was replaced by another file (inode {was} when opened, now {is_now})"
        return None

    def check(self, engine: Engine) -> None:
        """StoreLost when the file at the path is no longer the one opened (said once at ERROR,
        the first time); returns otherwise."""
        with self._lock:
            if self.lost is None:
                happened = self._what_happened()
                if happened is None:
                    return
                self.lost = (
                    f"its file {str(self.path)!r} {happened} at"
                    f" {time.strftime('%Y-%m-%d %H:%M:%S')} while this process had it open"
                )
                newly = True
            else:
                newly = False
        if newly:
            log.error(
                "job store %s: %s. What this process would store from now on would go into the"
                " old file, which no command and no other process sees, and be lost when it"
                " stops: it no longer uses the store (no job is made, taken or finished through"
                " it; serve answers each request with this error, the coordinator stops). To"
                " put a store back: stop every damocles-ext process that uses it, remove %s-wal"
                " and %s-shm if the old file left them, put the file in place, and start them"
                " again",
                self.where, self.lost, self.opened, self.opened,
            )  # fmt: skip
            self._release(engine)
        raise StoreLost(
            f"job store {self.where}: {self.lost}; this process no longer uses it: restart it"
            " to open the file now at that path (see its ERROR line)"
        )

    def _release(self, engine: Engine) -> None:
        """Copy the old store's write-ahead log into the old file and empty it (so that a
        process opening the file now at the path does not read it as its own), then close the
        connections; a connection in use is emptied and closed when given back (_returned)."""
        try:
            # A pooled one (a new one would be refused), given back at once: _returned empties
            # the log through it.
            engine.pool.connect().close()
        except Exception as exc:  # noqa: BLE001 - best effort, said
            log.debug("no idle connection to empty the old store's log with: %s", exc)
        engine.dispose()

    @staticmethod
    def _empty_log(sqlite: Any) -> None:
        """wal_checkpoint(TRUNCATE) on a connection of the old file; best effort."""
        try:
            row = sqlite.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            log.debug("the old store's log emptied: %s (busy, log frames, copied)", row)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("could not empty the old store's write-ahead log: %s", exc)


def _foreign_file(store: Path) -> str | None:
    """The first of the store's file and the files SQLite keeps beside it that another user
    owns or every user may write, said; None when there is none."""
    trusted = trusted_uids()
    for path in (store, *(Path(f"{store}{end}") for end in ("-wal", "-shm", "-journal"))):
        try:
            st = os.lstat(path)
        except OSError:  # (not there: none to replay)
            continue
        if st.st_uid not in trusted:
            return f"{path} is owned by uid {st.st_uid}, not by us or root"
        if st.st_mode & 0o002 and not stat.S_ISLNK(st.st_mode):
            return (
                f"the file {path} (mode {describe_mode(st.st_mode)}) may be written by every user"
            )
    return None
