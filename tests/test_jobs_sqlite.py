"""The SQLite store as it runs for months on one machine: its write-ahead log and file sizes,
the file system it is on (JOBS.md, The store)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from test_jobs_rules import make_input

from damocles_ext.jobs import database, rules
from damocles_ext.jobs.store import JobStore

T0 = 1_700_000_000.0


def wal_size(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


def test_the_write_ahead_log_shrinks_back_once_a_reader_that_held_it_open_is_gone(tmp_path):
    # A reader that keeps one snapshot (a `sqlite3` shell left in a transaction, a backup)
    # stops every checkpoint: the log grows with each write. Once it is gone the log is copied
    # in and restarted, but SQLite keeps the file at its largest size for as long as a
    # connection is open (a coordinator's: months) unless journal_size_limit says otherwise.
    path = tmp_path / "jobs.db"
    with JobStore.open(f"sqlite:///{path}") as store:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM dext_wdpost_jobs").fetchone()
            for batch in range(6):
                events = [rules.Create(make_input(sectors=200, seed=i, miner=batch))
                          for i in range(100)]  # fmt: skip
                store.create_many(events, T0)
                store.remove_all(T0)
            assert wal_size(path) > 2 * database.SQLITE_WAL_SIZE_LIMIT  # it grew meanwhile
            reader.execute("COMMIT")
        # The next commits checkpoint the whole log (nobody reads an old snapshot), restart it,
        # and cut its file down to the limit (what one small commit adds to it aside).
        for seed in range(3):
            store.create(make_input(seed=seed), T0)
        assert wal_size(path) < database.SQLITE_WAL_SIZE_LIMIT + 1_000_000
