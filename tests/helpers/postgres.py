"""A throw-away PostgreSQL server for the job-store tests: initdb and pg_ctl in a temporary
directory, listening on a unix socket in that directory only (no TCP port to collide on),
fsync off. The test session puts the directory in /dev/shm (a tmpfs) when it has room
(`scratch_parent`): on a disk each new database (about 300 files, 7.5 MB) took 0.1-0.25 s to
make, and removing a session's hundred or so took 4-50 s in the teardown of a worker's last
test; in memory, 0.02 s and a fraction of one. The benchmark that starts one keeps it in /tmp,
as its saved figures were measured. initdb refuses to run as root (tests and CI run as root),
so as root the server's files belong to, and its programs run as, the `postgres` user that
Debian's package makes."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def find_bindir() -> Path | None:
    """The directory of initdb and pg_ctl: Debian's /usr/lib/postgresql/<version>/bin (newest
    first), else wherever PATH has them; None when there are none."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for bindir in candidates:
        if (Path(bindir) / "initdb").is_file() and (Path(bindir) / "pg_ctl").is_file():
            return Path(bindir)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(initdb)).parent
    return None


# The test session drops each test's database after it (`drop_database`): it needs a few
# databases' room at a time, plus the WAL.
_SHM, _SHM_ROOM = "/dev/shm", 1 << 30


def scratch_parent() -> str | None:
    """Where the test session's server goes: /dev/shm if it is a directory with room, else None
    (tempfile's default, /tmp)."""
    try:
        if os.path.isdir(_SHM) and shutil.disk_usage(_SHM).free >= _SHM_ROOM:
            return _SHM
    except OSError:
        pass
    return None


class PostgresServer:
    """One server; `url(database)` names a database on it, `create_database()` makes a new one."""

    def __init__(self, bindir: Path, parent: str | None = None) -> None:
        """`parent`: the directory to make the server's own in (default: tempfile's, /tmp)."""
        self.bindir = bindir
        # Not under pytest's tmp_path: its parents are 0700 root, which the postgres user
        # cannot pass through. mkdtemp in /dev/shm or /tmp gives a private directory with a
        # short path (unix socket paths are limited to 107 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="dext-pg-", dir=parent))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.log = self.root / "server.log"
        self._user: str | None = None
        self._count = 0
        self._started = False
        if os.geteuid() == 0:
            self._user = "postgres"
            try:
                entry = pwd.getpwnam(self._user)
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise RuntimeError(
                    "running as root, and there is no `postgres` user to run the test server as "
                    "(initdb refuses root): create it, as Debian's postgresql package does"
                ) from None
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, *argv: str, timeout: float = 120) -> None:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}"
            )

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "--auth=trust", "--username=postgres",
                  "--encoding=UTF8", "--no-sync", "--no-instructions")  # fmt: skip
        self._started = True  # from here on, stop() must try to stop it
        self.resume()

    def pause(self) -> None:
        """Stop the server, keeping its data (an outage): `resume` starts it again. A clean
        stop: with fsync off, an immediate one may lose what was written (tables made)."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")

    def resume(self) -> None:
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-o", options)  # fmt: skip

    def stop(self) -> None:
        try:
            if self._started:
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", scheme: str = "postgresql") -> str:
        return f"{scheme}://postgres@/{database}?host={self.socket_dir}"

    def create_database(self) -> str:
        """A new empty database; its URL (plain `postgresql://`, as a user would write it). From
        PostgreSQL 15 on it is copied file by file (STRATEGY FILE_COPY): unlike 15's default
        (WAL_LOG), that writes no WAL for the copy."""
        import psycopg

        self._count += 1
        name = f"t{os.getpid()}_{self._count}"
        with psycopg.connect(host=str(self.socket_dir), user="postgres", dbname="postgres",
                             autocommit=True) as conn:  # fmt: skip
            strategy = " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
            conn.execute(f'CREATE DATABASE "{name}"{strategy}')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drops the database `url` names (made by `create_database`), ending the sessions a
        test left on it: with DROP DATABASE's FORCE from PostgreSQL 13 on; before 13 (12 is
        supported), which has no FORCE, by ending them first with pg_terminate_backend."""
        import psycopg

        name = url.split("?")[0].rsplit("/", 1)[1]
        with psycopg.connect(host=str(self.socket_dir), user="postgres", dbname="postgres",
                             autocommit=True) as conn:  # fmt: skip
            if conn.info.server_version >= 130000:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
