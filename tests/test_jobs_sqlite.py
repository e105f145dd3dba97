"""The SQLite store as it runs for months on one machine: its write-ahead log and file sizes,
the file system it is on (JOBS.md, The store)."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers.frontend import DEXT
from test_jobs_rules import make_input

from damocles_ext.jobs import database, mounts, rules
from damocles_ext.jobs.store import JobStore, StoreConfigError, TrioJobStore

T0 = 1_700_000_000.0


def wal_size(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


@contextlib.contextmanager
def reader_holding(path: Path, *, holds: bool = True) -> Iterator[None]:
    """A connection to the store at `path` keeping one snapshot while in the block (a `sqlite3`
    shell left inside a transaction); `holds=False`: open, in no transaction."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as reader:
        if holds:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM dext_wdpost_jobs").fetchone()
        yield
        if holds:
            reader.execute("COMMIT")


def make_and_remove(store: JobStore, batches: int, jobs: int = 100) -> None:
    """`batches` transactions making `jobs` jobs of 200 sectors each, each followed by one
    removing them all: the write-ahead log grows by about 4 MB per 100 jobs."""
    for batch in range(batches):
        events = [rules.Create(make_input(sectors=200, seed=i % 200, miner=batch * jobs + i))
                  for i in range(jobs)]  # fmt: skip
        store.create_many(events, T0)
        store.remove_all(T0)


def test_a_store_opened_to_read_reads_beside_a_writers_transaction(tmp_path):
    # `wdpost list` and `status --jobs` open the store read-only: their transactions began with
    # BEGIN IMMEDIATE, SQLite's write lock, so a writer inside a transaction (a coordinator
    # stopped mid-call, a `sqlite3` shell) made them wait its busy timeout and fail, and a long
    # list held the writers up. WAL lets a reader read beside a writer: they now do.
    path = tmp_path / "jobs.db"
    with JobStore.open(f"sqlite:///{path}") as store:
        made, _ = store.create(make_input(), T0)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE dext_wdpost_jobs SET deadline_idx = deadline_idx")
        url = f"sqlite:///{path}"
        with JobStore.open(url, read_only=True, busy_timeout=0.5) as reader:
            assert [job.Id for job in reader.list_jobs()] == [made.Id]
            assert reader.summary(T0).total == 1
        writer.execute("COMMIT")
    with JobStore.open(f"sqlite:///{path}", busy_timeout=0.5) as store:  # (writers still write)
        store.remove(made.Id, T0)


def test_the_write_ahead_log_shrinks_back_once_a_reader_that_held_it_open_is_gone(tmp_path):
    # A reader that keeps one snapshot (a `sqlite3` shell left in a transaction, a backup)
    # stops every checkpoint: the log grows with each write. Once it is gone the log is copied
    # in and restarted, but SQLite keeps the file at its largest size for as long as a
    # connection is open (a coordinator's: months) unless journal_size_limit says otherwise.
    path = tmp_path / "jobs.db"
    with JobStore.open(f"sqlite:///{path}") as store:
        with reader_holding(path):
            make_and_remove(store, 6)
            assert wal_size(path) > 2 * database.SQLITE_WAL_SIZE_LIMIT  # it grew meanwhile
        # The next commits checkpoint the whole log (nobody reads an old snapshot), restart it,
        # and cut its file down to the limit (what one small commit adds to it aside).
        for seed in range(3):
            store.create(make_input(seed=seed), T0)
        assert wal_size(path) < database.SQLITE_WAL_SIZE_LIMIT + 1_000_000


def in_read_only_mount(tmp_path: Path, store: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """`argv` run (STORE in it: the store's path) in a mount namespace of its own where `store`
    was copied onto a tmpfs then mounted read-only; skips the test where no namespace may be
    made (no unshare, no privilege)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a read-only file system with")
    mount = tmp_path / "ro"
    mount.mkdir()
    command = " ".join(shlex.quote(a.replace("STORE", f"{mount}/jobs.db")) for a in argv)
    script = (
        f"mount -t tmpfs none {mount} && cp {store} {mount}/jobs.db"
        f" && mount -o remount,ro {mount} || exit 99; exec {command}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode == 99 or "unshare failed" in done.stderr:
        pytest.skip(f"cannot mount a read-only file system here: {done.stderr.strip()}")
    return done


@pytest.mark.parametrize(
    ("command", "code"),
    [(["wdpost", "list"], 2), (["status"], 2), (["coordinator", "--listen", "127.0.0.1:0"], 1)],
)
def test_a_store_on_a_read_only_mount_is_refused_saying_the_mount_is_read_only(
    tmp_path, command, code
):
    # Before: "check that the file and its directory are writable by this user", which they
    # were: only the mount was not.
    store = tmp_path / "jobs.db"
    with JobStore.open(f"sqlite:///{store}") as s:
        s.create(make_input(), T0)
    done = in_read_only_mount(tmp_path, store, [*DEXT, *command, "--jobs", "sqlite:///STORE"])
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    assert f"the file system that holds '{tmp_path}/ro' is mounted read-only" in done.stderr
    assert "mount it read-write, or copy the store to a writable directory" in done.stderr


def test_the_read_only_mount_judged_is_the_one_of_a_symlinks_target(tmp_path):
    # SQLite's files are beside the target: before, the link's own directory was judged.
    store = tmp_path / "jobs.db"
    with JobStore.open(f"sqlite:///{store}") as s:
        s.create(make_input(), T0)
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "ro" / "jobs.db")  # the copy on the read-only mount
    code = (
        "import sys; from pathlib import Path; from damocles_ext.jobs.mounts import"
        " read_only_mount; print(read_only_mount(Path(sys.argv[1])))"
    )
    done = in_read_only_mount(tmp_path, store, [sys.executable, "-c", code, str(link)])
    assert done.returncode == 0, done.stderr
    assert f"the file system that holds '{tmp_path}/ro' is mounted read-only" in done.stdout


def test_a_store_that_a_process_out_of_file_descriptors_cannot_open_says_so(tmp_path):
    # SQLite says "unable to open database file" as for a permission: before, "check that the
    # file and its directory are writable by this user", which they were. In a child of its own:
    # it uses up every descriptor it may open, then reads the store.
    url = f"sqlite:///{tmp_path}/jobs.db"
    JobStore.open(url).close()
    code = (
        "import os, resource, sys\n"
        "from damocles_ext.jobs.store import JobStore, StoreError\n"
        "store = JobStore(sys.argv[1])\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir('/proc/self/fd')) + 16, hard))\n"
        "hogs = []\n"
        "while True:\n"
        "    try: hogs.append(os.open(os.devnull, os.O_RDONLY))\n"
        "    except OSError: break\n"
        "try: store.list_jobs()\n"
        "except StoreError as error: print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, url], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot open the job store {url}: unable to open database file; " in done.stdout
    assert "this process has as many files open as its limit allows (ulimit -n" in done.stdout
    assert "writable by this user" not in done.stdout


def mount_table(tmp_path: Path, kind: str) -> Path:
    """A mount table (as /proc/self/mountinfo) in which tmp_path's file system is of `kind`."""
    device = tmp_path.stat().st_dev
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        f"41 27 {os.major(device)}:{os.minor(device)} / {tmp_path} rw,relatime shared:1"
        f" - {kind} server:/export rw,vers=4.2\n"
    )
    return table


def test_a_store_on_a_network_file_system_is_refused_with_exit_code_2(tmp_path, monkeypatch):
    # Before: used as a local one; two processes (on two machines sharing the export, or even
    # one) may both take the write lock there and damage the store.
    monkeypatch.setattr(mounts, "MOUNTINFO", mount_table(tmp_path, "nfs4"))
    for create in (True, False):
        with pytest.raises(StoreConfigError) as raised:
            JobStore.open(f"sqlite:///{tmp_path}/jobs.db", create=create)
        assert raised.value.exit_code == 2
        assert "is on a network file system (nfs4)" in str(raised.value)
        assert "put the file on a local disk, or use PostgreSQL" in str(raised.value)
    assert not (tmp_path / "jobs.db").exists()  # nothing made there


def test_a_store_on_a_network_file_system_may_still_be_read(tmp_path, monkeypatch):
    # A copy only read there is no danger (wdpost list, status): only a store written there.
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as store:
        store.create(make_input(), T0)
    monkeypatch.setattr(mounts, "MOUNTINFO", mount_table(tmp_path, "nfs4"))
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db", read_only=True) as store:
        assert len(store.list_jobs()) == 1


def test_a_store_on_a_local_file_system_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(mounts, "MOUNTINFO", mount_table(tmp_path, "ext4"))
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as store:
        store.create(make_input(), T0)
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as store:  # this machine's real table
        assert len(store.list_jobs()) == 1


async def test_a_coordinator_warns_once_while_the_write_ahead_log_grows_past_its_bound(
    tmp_path, caplog
):
    # A reader that keeps one snapshot makes the log grow with every write, for as long as it
    # stays: unbounded, and no process said so until the disk was full.
    from damocles_ext.frontends.coordinator import Coordinator

    caplog.set_level(logging.INFO, "damocles_ext.coordinator")
    path = tmp_path / "jobs.db"
    with JobStore.open(f"sqlite:///{path}") as store:
        coordinator = Coordinator(TrioJobStore(store))
        coordinator.log_warn_size = 20 * 1024 * 1024  # 64 MiB by default
        with reader_holding(path):
            make_and_remove(store, 3)
            assert wal_size(path) > coordinator.log_warn_size
            async with trio.open_nursery() as nursery:
                await nursery.start(coordinator.sweep_forever)  # the first pass looks
                nursery.cancel_scope.cancel()
            await coordinator._check_log()  # said once
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert f"the write-ahead log of the job store sqlite:///{path} ({path}-wal) is" in warning
        assert "a reader that stays inside one transaction" in warning
        assert f"fuser -v {path}" in warning
        for seed in range(3):  # checkpointed and cut back now that the reader is gone
            store.create(make_input(seed=seed), T0)
        await coordinator._check_log()
        assert "is back to" in caplog.records[-1].getMessage()


async def _log_warnings(url: str, store_path: Path, caplog, *, reader: bool) -> list[str]:
    from damocles_ext.frontends.coordinator import Coordinator

    caplog.set_level(logging.INFO, "damocles_ext.coordinator")
    with JobStore.open(url) as store:
        coordinator = Coordinator(TrioJobStore(store))
        coordinator.log_warn_size = 10 * 1024 * 1024
        with reader_holding(store_path, holds=reader):
            make_and_remove(store, 1, jobs=300)  # one big transaction
            assert wal_size(store_path) > coordinator.log_warn_size
            await coordinator._check_log()
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_a_big_log_no_reader_holds_back_is_not_blamed_on_a_reader(tmp_path, caplog):
    # One big transaction leaves a big log that the next write cuts back: no reader to find.
    path = tmp_path / "jobs.db"
    assert await _log_warnings(f"sqlite:///{path}", path, caplog, reader=False) == []


async def test_the_log_warning_of_a_store_given_through_a_symlink_names_its_targets_log(
    tmp_path, caplog
):
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "jobs.db"
    (tmp_path / "jobs.db").symlink_to(target)  # SQLite's -wal is beside the target
    url = f"sqlite:///{tmp_path}/jobs.db"
    (warning,) = await _log_warnings(url, target, caplog, reader=True)
    assert f"({target}-wal) is" in warning and f"fuser -v {target} {target}-wal" in warning


def test_a_sqlite_store_imports_neither_psycopg_nor_sqlalchemys_postgresql_dialects(tmp_path):
    # SQLAlchemy's postgresql package imports every driver's dialect (about 27 ms of CPU) and
    # psycopg about 65 ms: a coordinator, a worker or `serve --jobs` on SQLite pays for neither.
    code = (
        "import sys\n"
        "from damocles_ext.jobs.store import JobStore\n"
        "from test_jobs_rules import make_input\n"
        "with JobStore.open(sys.argv[1]) as store:\n"
        "    made, _ = store.create(make_input(), 1.0)\n"
        "    assert store.get(made.Id) == made\n"
        "print(sorted(m for m in sys.modules if m.startswith(('psycopg', 'sqlalchemy.dialects.p'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, f"sqlite:///{tmp_path / 'jobs.db'}"],
        capture_output=True, text=True, check=False, cwd=Path(__file__).parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n", done.stdout
