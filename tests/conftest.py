"""Fixtures that more than one test module uses. Helpers that are plain functions or classes live
in the `helpers` package beside this file."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pytest
from helpers.frontend import short_socket_dir
from helpers.postgres import PostgresServer, find_bindir, scratch_parent
from helpers.scheduling import Recorder
from helpers.supervisor import our_descendants

from damocles_ext.plugins import get_plugin_manager
from damocles_ext.supervisor.reaper import join_late_reaps

if TYPE_CHECKING:
    from damocles_ext.jobs.store import JobStore

# A shell's background job (`pytest ... &`) starts with SIGINT ignored, and every process a test
# spawns would inherit that: the tests of what a SIGINT does would fail. Ctrl-C works as in a
# terminal's run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def root_logging_kept() -> Iterator[None]:
    """Puts the root logger's handlers and level back after each test: a command run in-process
    sets its own, on pytest's capture stream of that test, which is closed by the next one (a
    record logged there then is a "Logging error" on stderr, and the level hides records from
    caplog)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def no_leftover_processes() -> Iterator[None]:
    """Fails a test that leaves a child, grandchild or zombie of this process behind.

    Not autouse: a module of supervisor tests opts in with
    `pytestmark = pytest.mark.usefixtures("no_leftover_processes")`; other modules keep helper
    processes of their own for a whole module."""
    yield
    # A process a stopped supervisor left still dying (its last kill gave up waiting: under a
    # mock clock, whose timeouts jump while the kernel tears the process down in real time) is
    # reaped by a thread once it exits: waited for, in real time and bounded.
    join_late_reaps(10.0)
    assert our_descendants() == []


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """A private (0700) directory with a short path, for unix sockets: their paths are limited to
    107 bytes, and pytest's tmp_path can be longer."""
    with short_socket_dir("t", tmp_path.name) as d:
        yield d


@pytest.fixture
def sock_path(sock_dir: Path) -> Path:
    """Where a test's `damocles-ext run` puts its control socket."""
    return sock_dir / "control.sock"


@pytest.fixture
def stderr_file(tmp_path: Path) -> Iterator[BinaryIO]:
    """A file for a subprocess's stderr: unlike a pipe, nobody must read it for the child to go
    on, and the test reads it whole afterwards."""
    with open(tmp_path / "serve.stderr", "w+b") as f:
        yield f


@pytest.fixture
def recorder() -> tuple[Recorder, object]:
    """A `Recorder` of request starts and finishes, and a plugin manager holding only it (for
    `plugin_manager=` of a Supervisor)."""
    rec = Recorder()
    pm = get_plugin_manager(entry_points=False)
    pm.register(rec, name="recorder")
    return rec, pm


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL server for the whole session (see helpers/postgres.py); the tests
    that use it skip only when this machine has no PostgreSQL programs at all."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(
            "no PostgreSQL server programs (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or "
            "on PATH: install them (Debian: apt-get install postgresql) to run these tests"
        )
    server = PostgresServer(bindir, parent=scratch_parent())
    try:
        server.start()
    except BaseException:
        with contextlib.suppress(Exception):  # the start's own error is the one to see
            server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty database on the session's PostgreSQL server: its `postgresql://` URL. Dropped
    after the test: the server's directory holds only the databases in use."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A job store's URL on each engine in turn: a SQLite file in tmp_path, then a new database
    on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[JobStore]:
    """A job store on SQLite, for what does not depend on the database (HTTP, auth) or needs
    SQLite's file lock."""
    from damocles_ext.jobs.store import JobStore  # SQLAlchemy: only for the tests that use it

    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as s:
        yield s


@pytest.fixture
def js(store_url: str) -> Iterator[JobStore]:
    """An open JobStore at `store_url` (its schema made), closed after the test."""
    from damocles_ext.jobs.store import JobStore  # SQLAlchemy: only for the tests that use it

    with JobStore.open(store_url) as s:
        yield s
