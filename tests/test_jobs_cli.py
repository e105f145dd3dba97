"""`damocles-ext wdpost`: damocles' `util worker wdpost` table, and list/reset/remove/remove-all
against a real store (SQLite, and the session's PostgreSQL)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_jobs_rules import make_input

from damocles_ext import cli
from damocles_ext.jobs import listing, model, rules, summary
from damocles_ext.jobs.database import StoreConfigError, jobs, sqlite_store_problem
from damocles_ext.jobs.model import READY
from damocles_ext.jobs.store import JobStore

LIMITS = rules.JobLimits()
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def story() -> list[model.JobRecord]:
    """Four jobs, newest first: failed at max try, succeeded with a fault, running, ready."""

    def go(job, event, at):
        return rules.apply(job, event, T0 + at, LIMITS).job

    ready = go(None, rules.Create(make_input(seed=1), deadline_idx=3, partitions=(1, 2)), 0)
    busy = go(
        None, rules.Create(make_input(seed=2, sectors=2), deadline_idx=4, partitions=(0,)), 60
    )
    busy = go(busy, rules.Allocate("10.0.0.7", "x"), 100)
    busy = go(busy, rules.Heartbeat("10.0.0.7"), 497)
    faulty = go(None, rules.Create(make_input(seed=3)), 120)
    faulty = go(faulty, rules.Allocate("gpu-2", "y"), 130)
    out = model.JobOutput(proofs=(b"p",), faults=(5,))
    faulty = go(faulty, rules.Finish(out, "", lease="y"), 528)
    failed = go(None, rules.Create(make_input(seed=4)), 180)
    failed = go(failed, rules.Allocate("gpu-2", "z"), 190)
    failed = go(failed, rules.Sweep(), 210)
    failed = go(failed, rules.Allocate("gpu-3", "z2"), 220)
    failed = go(failed, rules.Finish(None, "sector 5:\tcache\nmissing", lease="z2"), 3820)
    return [failed, faulty, busy, ready]


def test_list_prints_damocles_columns_and_formats_and_hides_successes():
    failed, _faulty, busy, ready = story()
    table = listing.render_list(story(), max_try=2, now=T0 + 500.25, tz=UTC)
    assert table == (
        "JobID        MinerID  DDL  Partitions  Sectors  Worker    State       Try     CreateAt        Elapsed       Heartbeat  Error\n"
        f"{failed.Id}  1000     0    []          1        gpu-3     Failed      2(Max)  11-14 22:16:20  1h0m0s(done)  -          sector 5: cache missing\n"
        f"{busy.Id}  1000     4    [0]         2        10.0.0.7  Running     1       11-14 22:14:20  6m40s         3.25s      \n"
        f"{ready.Id}  1000     3    [1, 2]      1                  ReadyToRun  0       11-14 22:13:20  -             -          \n"
    )  # fmt: skip


def test_list_detail_with_all_shows_every_timestamp_and_the_raw_state():
    failed, faulty, busy, ready = story()
    table = listing.render_list(
        story(), max_try=2, now=T0 + 500, tz=UTC, show_all=True, detail=True
    )
    assert table == (
        "JobID        Prefix     Miner  DDL  Partitions  Sectors  Worker    State       Try     CreateAt        StartedAt       HeartbeatAt     FinishedAt      UpdatedAt       Error\n"
        f"{failed.Id}  finished   1000   0    []          1        gpu-3     Failed      2(Max)  11-14 22:16:20  11-14 22:17:00  11-14 22:17:00  11-14 23:17:00  11-14 23:17:00  sector 5: cache missing\n"
        f"{faulty.Id}  finished   1000   0    []          1        gpu-2     Faults(1)   1       11-14 22:15:20  11-14 22:15:30  11-14 22:15:30  11-14 22:22:08  11-14 22:22:08  \n"
        f"{busy.Id}  running    1000   4    [0]         2        10.0.0.7  Running     1       11-14 22:14:20  11-14 22:15:00  11-14 22:21:37  -               11-14 22:21:37  \n"
        f"{ready.Id}  ready2run  1000   3    [1, 2]      1                  ReadyToRun  0       11-14 22:13:20  -               -               -               11-14 22:13:20  \n"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (0.0004, "0s"),
        (0.5, "500ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (3.25, "3.25s"),
        (62.5, "1m2.5s"),
        (398, "6m38s"),
        (3600, "1h0m0s"),
        (3661.001, "1h1m1.001s"),
        (-1.2, "-1.2s"),
    ],
)
def test_durations_are_written_as_go_writes_them(seconds, shown):
    assert listing.go_duration(seconds) == shown


# --- the command against a real store -----------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.db"
    return request.getfixturevalue("postgres_url")


def test_resetting_a_job_past_its_deadline_says_the_sweep_cancels_it_again(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/jobs.db"
    now = time.time()
    with JobStore.open(url) as s:
        late, _ = s.create(make_input(seed=1), now - 120, not_after=now - 60)
        timely, _ = s.create(make_input(seed=2), now - 120, not_after=now + 3600)
    assert cli.main(["wdpost", "reset", "--jobs", url, late.Id, timely.Id]) == 0
    err = capsys.readouterr().err
    assert (
        f"damocles-ext wdpost reset: warning: job {late.Id} is reset, but its deadline passed "
        in err
    )
    assert "the next sweep cancels it again, and no proof of it can count for its deadline" in err
    assert timely.Id not in err


def test_the_commands_list_reset_and_remove_jobs_in_the_store(store_url, capsys):
    now = time.time()
    with JobStore.open(store_url) as s:
        jobs = [s.create(make_input(seed=i), now - 10 * i)[0] for i in range(3)]
        [taken] = s.allocate(rules.AllocationSpec(), 1, "gpu-1", now)
        s.finish(taken.Id, model.JobOutput(proofs=(b"p",), faults=()), "", now,
                 lease=taken.lease)  # fmt: skip

    assert cli.main(["wdpost", "list", "--jobs", store_url]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].split() == list(listing.LIST_COLUMNS)
    assert [line.split()[0] for line in shown[1:]] == [j.Id for j in jobs if j.Id != taken.Id]
    assert cli.main(["wdpost", "list", "--all", "--detail", "--jobs", store_url]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].split() == list(listing.DETAIL_COLUMNS)
    assert [line.split()[0] for line in shown[1:]] == [j.Id for j in jobs]  # newest first
    assert "Succeed" in next(line for line in shown if line.startswith(taken.Id))

    assert cli.main(["wdpost", "reset", "--jobs", store_url, taken.Id]) == 0
    assert cli.main(["wdpost", "reset", "--jobs", store_url, jobs[2].Id, "nope", jobs[1].Id]) == 2
    err = capsys.readouterr().err
    assert f"job 'nope' does not exist (reset before it: {jobs[2].Id})" in err
    # Named by its subcommand, as each of wdpost's: what failed is `reset`.
    assert err.startswith("damocles-ext wdpost reset: error: "), err
    with JobStore.open(store_url) as s:
        assert s.get(taken.Id).State == READY and s.get(taken.Id).TryNum == 0

    assert cli.main(["wdpost", "remove", "--jobs", store_url, jobs[1].Id, "nope"]) == 0
    assert cli.main(["wdpost", "remove-all", "--jobs", store_url]) == 0
    assert capsys.readouterr().out == "Pass --really-do-it to actually execute this action\n"
    assert cli.main(["wdpost", "remove-all", "--really-do-it", "--jobs", store_url]) == 0
    removed = capsys.readouterr().out.splitlines()
    assert sorted(removed) == sorted(f"wdpost job {j.Id} removed" for j in jobs if j != jobs[1])
    with JobStore.open(store_url) as s:
        assert s.list_jobs() == []


def test_remove_all_with_jobs_given_twice_is_refused_and_removes_nothing(
    store_url, tmp_path, capsys
):
    # argparse kept the last --jobs silently: `--jobs A --jobs B` removed every job of B.
    with JobStore.open(store_url) as s:
        s.create(make_input(seed=1), time.time())
    other = f"sqlite:///{tmp_path}/other.db"
    args = ["wdpost", "remove-all", "--really-do-it", "--jobs", other, "--jobs", store_url]
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --jobs: given twice ('{other}' and '{store_url}'): give it once" in err
    with JobStore.open(store_url) as s:
        assert len(s.list_jobs()) == 1
    assert not (tmp_path / "other.db").exists()


def test_a_damaged_job_is_listed_as_a_warning_and_removed_by_its_id(store_url, capsys, caplog):
    now = time.time()
    with JobStore.open(store_url) as s:
        bad, _ = s.create(make_input(seed=1), now)
        good, _ = s.create(make_input(seed=2), now)
        with s.engine.begin() as conn:
            conn.execute(sa.update(jobs).where(jobs.c.id == bad.Id).values(output="[1"))
    assert cli.main(["wdpost", "list", "--jobs", store_url]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in shown[1:]] == [good.Id]
    assert f"wdpost remove {bad.Id}" in caplog.text
    assert cli.main(["wdpost", "remove", "--jobs", store_url, bad.Id]) == 0
    with JobStore.open(store_url) as s:
        assert [j.Id for j in s.list_jobs()] == [good.Id]


def test_the_commands_never_create_a_store_at_a_mistyped_url(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/typo.db"
    assert cli.main(["wdpost", "list", "--jobs", url]) == 2
    err = capsys.readouterr().err
    assert f"there is no job store at {url}: no such file; check the URL" in err
    assert err.startswith("damocles-ext wdpost list: error: "), err
    for args in (["remove", "j1"], ["remove-all", "--really-do-it"]):
        assert cli.main(["wdpost", *args, "--jobs", url]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"damocles-ext wdpost {args[0]}: error: there is no job store"), err
    assert not (tmp_path / "typo.db").exists()
    # Three slashes and a path meant from the root: relative, and the message says so.
    assert cli.main(["wdpost", "list", "--jobs", "sqlite:///var/lib/nope/jobs.db"]) == 2
    assert (
        "no such file (var/lib/nope/jobs.db is relative to the current directory: sqlite:/// then"
        " a relative path; an absolute one takes four slashes, sqlite:////var/lib/...)"
    ) in capsys.readouterr().err


def test_a_file_that_is_no_store_is_said_so_and_left_as_it_was(tmp_path, capsys):
    other = tmp_path / "other.db"  # another program's SQLite database, in its journal mode
    with contextlib.closing(sqlite3.connect(other)) as db, db:
        db.execute("CREATE TABLE t (x)")
    text, empty = tmp_path / "notes.txt", tmp_path / "empty"
    text.write_text("not a database\n")
    empty.touch()
    for path, why in ((other, "the database has no job tables"), (empty, "the database has no job tables"),
                      (text, "the file is not an SQLite database"),
                      (tmp_path, "it is not a regular file")):  # fmt: skip
        before = path.read_bytes() if path.is_file() else None
        assert cli.main(["wdpost", "list", "--jobs", f"sqlite:///{path}"]) == 2
        assert f"there is no job store at sqlite:///{path}: {why}" in capsys.readouterr().err
        assert before is None or path.read_bytes() == before
    with contextlib.closing(sqlite3.connect(other)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not switched to WAL
    assert not list(tmp_path.glob("*-wal"))


def test_a_damaged_store_is_said_so_with_what_to_do(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/jobs.db"
    with JobStore.open(url):
        pass
    size = (tmp_path / "jobs.db").stat().st_size
    with open(tmp_path / "jobs.db", "r+b") as f:  # cut short, as by a full disk or a bad copy
        f.truncate(size // 2)
    # (The coordinator binds its port before it opens the store: an ephemeral one, not 1789,
    # which another test, or anything on this machine, may hold.)
    coordinator = ["coordinator", "--listen", "127.0.0.1:0", "--jobs", url]
    for command in (["wdpost", "list", "--jobs", url], coordinator):
        assert cli.main(command) != 0
        err = capsys.readouterr().err
        assert "is damaged (database disk image is malformed): restore it from a backup" in err


def test_a_store_given_as_a_sqlite_uri_is_found(tmp_path, capsys):
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db"):
        pass
    # uri as SQLAlchemy reads it (true, True, 1, yes...), and the parameters pysqlite takes.
    for query in ("mode=ro&uri=true", "uri=True&mode=ro", "uri=1", "uri=true&check_same_thread=0"):
        url = f"sqlite:///file:{tmp_path}/jobs.db?{query}"
        assert cli.main(["wdpost", "list", "--jobs", url]) == 0, capsys.readouterr().err
    url = f"sqlite:///{tmp_path}/jobs.db?check_same_thread=false&timeout=5"
    assert cli.main(["wdpost", "list", "--jobs", url]) == 0, capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to look as another user")
def test_a_store_this_user_may_not_read_is_said_so_not_taken_for_no_store():
    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path: in a 0700 directory
        _a_store_this_user_may_not_read(Path(tmp))


def _a_store_this_user_may_not_read(tmp_path: Path) -> None:
    (tmp_path / "svc").mkdir()
    url = f"sqlite:///{tmp_path}/svc/jobs.db"
    with JobStore.open(url):
        pass
    (tmp_path / "svc" / "jobs.db").chmod(0o600)  # the service user's store
    tmp_path.chmod(0o755)
    as_nobody = {}
    for path in (tmp_path / "svc" / "jobs.db", tmp_path / "svc"):  # the store, then a way in
        if path.is_dir():
            path.chmod(0o700)
        read, write = os.pipe()
        if (pid := os.fork()) == 0:  # the check as an operator would run it, without our files
            try:
                os.setgid(65534)
                os.setuid(65534)
                said = sqlite_store_problem(tmp_path / "svc" / "jobs.db", url) or ""
                os.write(write, said.encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as answer:
            as_nobody[path.name] = answer.read().decode()
    assert as_nobody["jobs.db"].startswith(
        f"cannot read the job store at {url} (unable to open database file): check that this"
        " user may read the file and write its directory"
    ), as_nobody
    assert as_nobody["svc"].startswith(
        f"cannot read the job store at {url} (Permission denied): check that"
    ), as_nobody


def test_a_store_in_a_directory_that_does_not_exist_is_a_mistake_in_the_url(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/nodir/jobs.db"
    assert cli.main(["coordinator", "--listen", "127.0.0.1:0", "--jobs", url]) == 2
    assert f"its directory '{tmp_path}/nodir' does not exist: create it" in capsys.readouterr().err


def test_a_store_url_naming_a_directory_is_a_mistake_in_the_url_that_says_so(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}"
    assert cli.main(["coordinator", "--listen", "127.0.0.1:0", "--jobs", url]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path}' is a directory: give the path of a file in it" in err
    assert "writable" not in err


def test_a_postgresql_database_without_job_tables_is_no_store(postgres_url, capsys):
    assert cli.main(["wdpost", "list", "--jobs", postgres_url]) == 2
    assert "the database has no job tables; check the URL" in capsys.readouterr().err


def test_a_password_given_as_a_query_parameter_is_hidden_in_messages_and_the_summary(
    postgres_url, capsys
):
    # libpq takes password= (and sslpassword=, a client key's passphrase) in the query string;
    # only the user info's password was hidden, so these reached the terminal, the journal and
    # `status --json`'s "store". (The test server trusts its socket: the login takes any.)
    url = f"{postgres_url}&password=s3cr3tPW&sslpassword=k3yPW"
    assert cli.main(["wdpost", "list", "--jobs", url]) == 2  # no store yet: the URL is quoted
    JobStore.open(url).close()
    assert cli.main(["status", "--jobs", url, "--json"]) == 0
    said = capsys.readouterr()
    text = said.out + said.err
    assert "there is no job store at" in said.err and '"store":' in said.out
    assert text.count("&password=***") == 2 and text.count("&sslpassword=***") == 2, text
    assert "s3cr3tPW" not in text and "k3yPW" not in text


@pytest.mark.parametrize("mistake", ["database", "user"])
def test_a_login_the_postgresql_server_refuses_is_a_mistake_in_the_url(
    postgres_server, mistake, capsys
):
    url = postgres_server.url(database="nosuchdb")
    if mistake == "user":
        url = postgres_server.url().replace("postgres@", "nosuchrole@", 1)
    assert cli.main(["wdpost", "list", "--jobs", url]) == 2
    err = capsys.readouterr().err
    assert (
        "refused the login" in err and f'"nosuch{"db" if mistake == "database" else "role"}"' in err
    )
    assert "check the user, the password (or the pgpass file) and the database in the URL" in err
    with pytest.raises(StoreConfigError):  # the commands that create their store, too
        JobStore.open(url)


def test_names_and_texts_from_clients_reach_the_tables_without_control_characters():
    evil = "gpu\x1b]0;owned\x07\t1\n"
    job = rules.apply(None, rules.Create(make_input(seed=9)), T0, LIMITS).job
    job = rules.apply(job, rules.Allocate(evil, "l"), T0 + 1, LIMITS).job
    table = listing.render_list([job], max_try=2, now=T0 + 2, tz=UTC, detail=True)
    assert "gpu ]0;owned  1 " in table and "\x1b" not in table and "\x07" not in table
    assert table.count("\n") == 2  # the header and the job: the name broke no line
    s = summary.summarize(
        counts={"ready2run": 1},
        ready=[summary.ReadyGroup(1000, "\x1b[2J", 1, int(T0))],
        oldest_ready=(job.Id, int(T0)),
        workers=[summary.WorkerSeen(evil, rules.AllocationSpec((), ("\x1b[2J",)), T0)],
        now=T0 + 2,
    )
    text = summary.render(s)
    assert "\x1b" not in text and "\x07" not in text and "gpu ]0;owned  1 " in text


def test_remove_all_into_a_pipe_closed_early_still_removes_every_job(tmp_path):
    # `remove-all --really-do-it | head -1`: the reader goes away after the first batch's ids;
    # the removal goes on (a half-done remove-all would surprise), then it ends as a command
    # whose reader went away does: exit 1, no traceback.
    from test_jobs_store import create_many

    url = f"sqlite:///{tmp_path}/jobs.db"
    with JobStore.open(url) as s:
        create_many(s, 1200)  # three transactions of 500 at most
    reader, writer = os.pipe()
    # A page of pipe: the ids (31 bytes each) overflow it, so the reader's close is met by a
    # write whatever the pace of either side.
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(
        [sys.executable, "-m", "damocles_ext", "wdpost", "remove-all", "--really-do-it",
         "--jobs", url],
        stdout=writer, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(writer)
    with os.fdopen(reader, "rb") as out:
        assert out.readline().startswith(b"wdpost job ")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert b"Traceback" not in err, err
    with JobStore.open(url) as s:
        assert s.list_jobs() == []


def test_remove_all_prints_a_servers_job_id_without_its_control_characters():
    from damocles_ext.jobs.listing import removed_line

    assert removed_line("3Fgf\x1b[2J\nx") == "wdpost job 3Fgf [2J x removed"


@pytest.mark.parametrize(
    "command",
    [
        ["wdpost", "list"],
        ["status"],
        ["coordinator", "--listen", "127.0.0.1:0"],
        ["serve", "window_post"],
    ],
    ids=["wdpost", "status", "coordinator", "serve"],
)
def test_a_store_url_with_bytes_that_are_not_utf8_is_refused_saying_which(tmp_path, command):
    # A file name in another encoding, as the shell passes it: os.fsdecode's surrogates.
    url = b"sqlite:///" + os.fsencode(tmp_path) + b"/jobs-\xff.db"
    done = subprocess.run(
        [sys.executable, "-m", "damocles_ext", *command, "--jobs", url],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert b"Traceback" not in done.stderr
    assert b"the job store URL is not UTF-8 text: byte \\xff (character" in done.stderr
    assert b"rename the file, or give sqlite:///PATH" in done.stderr


@pytest.mark.parametrize("subcommand", ["reset", "remove"])
@pytest.mark.parametrize("where", ["--jobs", "--manager"])
def test_a_job_id_with_bytes_that_are_not_utf8_is_refused_before_any_job_changes(
    tmp_path, subcommand, where
):
    url = f"sqlite:///{tmp_path}/jobs.db"
    with JobStore.open(url) as store:
        job, _ = store.create(make_input(), T0)
    # --manager: a closed port, as nothing is to be sent.
    target = url if where == "--jobs" else "127.0.0.1:1"
    done = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "wdpost", subcommand, where, target,
         job.Id, b"3Fgf\xffnrub1"],
        check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert b"Traceback" not in done.stderr
    assert (
        b"argument ID: '3Fgf?nrub1' is not UTF-8 text: byte \\xff (character 5) is not, so no job"
        b" has it; copy the id from `wdpost list --all`"
    ) in done.stderr
    with JobStore.open(url) as store:
        assert store.get(job.Id) == job


def test_wdpost_list_and_status_write_no_c1_or_bidirectional_control_of_a_worker_name(
    tmp_path, capsys
):
    # U+009B is CSI (as ESC [), U+202E turns the rest of the line around: they reached the
    # operator's terminal from any client's worker name.
    url = f"sqlite:///{tmp_path}/jobs.db"
    with JobStore.open(url) as store:
        store.create(make_input(), time.time())
        [job] = store.allocate(rules.AllocationSpec((), ()), 1, "gpu\x9b2J\u202eevil", time.time())
    assert cli.main(["wdpost", "list", "--jobs", url]) == 0
    assert cli.main(["status", "--jobs", url]) == 0
    out = capsys.readouterr().out
    assert f"{job.Id}  1000" in out and out.count("gpu 2J evil") == 2, out
    assert "\x9b" not in out and "\u202e" not in out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cr3t@db.example:5432x/jobs", "postgresql://u:***@db.example:5432x/jobs"),
        ("postgresql://u:s3cr3t@[::1/jobs", "postgresql://u:***@[::1/jobs"),
        ("postgresql//u:s3/cr@3t@db/jobs", "postgresql//u:***@db/jobs"),
        (
            "postgresql://u@db:x/jobs?password=s3cr3t&a=1",
            "postgresql://u@db:x/jobs?password=***&a=1",
        ),
    ],
)
def test_a_store_url_that_cannot_be_parsed_is_quoted_without_its_password(capsys, url, shown):
    # Quoted as given, it put the password in the terminal and in a service's journal.
    assert cli.main(["wdpost", "list", "--jobs", url]) == 2
    err = capsys.readouterr().err
    assert f"job store URL {shown!r} is not a" in err, err
    assert "s3" not in err


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        # Refused only at the first connection: "schema_version failed", exit code 1.
        ("&sslmod=require", ("PostgreSQL takes no 'sslmod' parameter; the query parameters are"
         " libpq's connection options (sslmode, connect_timeout, application_name, ...): check"
         " its spelling")),
        # Read as an outage: "cannot reach ... check that the PostgreSQL server is running".
        ("&sslmode=requir", ('has a value libpq refuses (connection is bad: invalid sslmode value:'
         ' "requir"): check its port and query parameters against libpq\'s connection options')),
    ],
)  # fmt: skip
@pytest.mark.parametrize(
    "command", [["wdpost", "list"], ["coordinator", "--listen", "127.0.0.1:0"]]
)
def test_a_postgresql_url_parameter_libpq_refuses_is_a_mistake_in_the_url(
    postgres_url, capsys, extra, said, command
):
    assert cli.main([*command, "--jobs", postgres_url + extra]) == 2
    err = capsys.readouterr().err
    assert said in err, err
    assert "is running" not in err and "failed:" not in err, err
