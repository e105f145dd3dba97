"""`damocles-ext status --jobs URL`: the job store's summary, read from the store with no
supervisor running (a table, or the documented JSON), next to a real `run`'s document when
--socket is given too; a URL with no store behind it is an error that creates nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import trio
from helpers.frontend import dext_run_async, running, write_config
from test_jobs_rules import make_input
from test_status import wait_ready

from damocles_ext.jobs import model, summary
from damocles_ext.jobs.rules import AllocationSpec
from damocles_ext.jobs.store import JobStore

W2K = "StackedDrgWindow2KiBV1_2"
W32G = "StackedDrgWindow32GiBV1_2"


def make_store(path: Path) -> tuple[str, float]:
    """Five ready jobs (two of miner 3000's 32GiB ones no worker may take), one running, and two
    live workers with different filters; the time it was made."""
    url = f"sqlite:///{path}"
    now = time.time()
    with JobStore.open(url) as s:
        for seed in range(4):
            s.create(make_input(seed=seed, miner=1000), now - 600 + seed)
        for seed in range(2):
            s.create(make_input(seed=10 + seed, miner=3000, proof_type=W32G), now - 30)
        s.allocate(AllocationSpec((1000,)), 1, "10.0.0.5", now - 20)
        s.allocate(AllocationSpec((), (W2K,)), 0, "gpu\x1b[2J-2", now - 5)
    return url, now


async def test_status_jobs_prints_the_stores_summary_without_a_supervisor(tmp_path):
    url, made = make_store(tmp_path / "jobs.db")
    done = await dext_run_async("status", "--jobs", url, "--json")
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    doc = json.loads(done.stdout)
    assert doc["schema"] == "damocles-ext/jobs/1" and doc["store"] == url
    assert made <= doc["time"] <= time.time()
    assert doc["jobs"] == {"ready2run": 5, "running": 1, "finished-ok": 0, "finished-failed": 0,
                           "cancelled": 0}  # fmt: skip
    assert doc["total"] == 6
    # The oldest job (seed 0) was allocated: the oldest ready one is the next.
    assert doc["oldest_ready_created_at"] == int(made - 599)
    assert 599 <= doc["oldest_ready_age"] <= time.time() - made + 600
    assert doc["unallocatable"] == 2
    assert doc["unallocatable_groups"] == [{"miner": 3000, "proof_type": W32G, "jobs": 2}]
    assert doc["live_window"] == summary.DEFAULT_LIVE_WINDOW and doc["live_workers"] == 2
    assert [(w["worker"], w["allowed_miners"], w["allowed_proof_types"]) for w in doc["workers"]] \
        == [("10.0.0.5", [1000], []), ("gpu\x1b[2J-2", [], [W2K])]  # fmt: skip
    # Every field the JSON has is documented in docs/STATUS.md, and no other.
    documented = (Path(__file__).parent.parent / "docs" / "STATUS.md").read_text()
    section = documented.split("## The jobs summary", 1)[1]
    for field in [*doc, *doc["workers"][0], *doc["unallocatable_groups"][0]]:
        assert f"| `{field}` |" in section, field

    done = await dext_run_async("status", "--jobs", url)
    assert done.returncode == 0, done.stderr
    table = done.stdout.decode()
    assert "ready2run        5" in table and "total            6" in table
    oldest = model.job_id(make_input(seed=1, miner=1000))
    assert doc["oldest_ready_job"] == oldest and f"oldest ready job: {oldest}, created " in table
    assert "live workers (seen in the last 2m0s): 2" in table
    assert "unallocatable: 2 ready jobs (no live worker's filters admit them)" in table
    assert "3000   StackedDrgWindow32GiBV1_2  2" in table
    assert "\x1b" not in table  # a worker's name cannot reach the terminal as an escape


async def test_status_jobs_with_no_store_at_the_url_exits_2_and_creates_nothing(tmp_path):
    missing = tmp_path / "nope.db"
    done = await dext_run_async("status", "--jobs", f"sqlite:///{missing}")
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"there is no job store at" in done.stderr and b"check the URL" in done.stderr
    assert not missing.exists()
    done = await dext_run_async("status", "--jobs", "mysql://somewhere/db", "--json")
    assert done.returncode == 2 and b"not supported" in done.stderr and done.stdout == b""
    done = await dext_run_async("status", "--jobs", "nonsense")  # no scheme: no URL at all
    assert done.returncode == 2 and b"is not a URL" in done.stderr, done.stderr


async def test_status_jobs_with_an_unreachable_postgresql_exits_1_saying_what_to_check(tmp_path):
    # Not the caller's mistake in the URL (exit 2) but a server down now: exit 1, as documented.
    done = await dext_run_async("status", "--jobs", f"postgresql://u@/db?host={tmp_path}")
    assert done.returncode == 1 and done.stdout == b"", done.stderr
    err = done.stderr.decode()
    assert "cannot reach the job store" in err and "check that the PostgreSQL server" in err, err
    assert "Traceback" not in err
    # A host that cannot be found: not the store's absence either (a name not in DNS yet).
    done = await dext_run_async("status", "--jobs", "postgresql://[bad")
    assert done.returncode == 1 and b"failed to resolve host" in done.stderr, done.stderr
    assert b"the user, password and database in the URL" in done.stderr, done.stderr
    documented = (Path(__file__).parent.parent / "docs" / "STATUS.md").read_text()
    section = documented.split("## The jobs summary", 1)[1].split("\n## ", 1)[0]
    assert "a SQLite file that does not exist" in section and "2 for a URL" in section
    assert "1 for a store that\ncannot be reached now" in section
    assert "does not parse" not in section and "no URL (no scheme" in section
    assert "(`postgresql://[bad`) or whose user or password the server refuses is exit 1" in section


async def test_status_jobs_and_socket_print_the_supervisors_document_with_the_jobs_beside(
    tmp_path, sock_dir
):
    url, _ = make_store(tmp_path / "jobs.db")
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\n')
    path = sock_dir / "control.sock"
    async with trio.open_nursery() as nursery, running(nursery, cfg, path) as (_run, log):
        with trio.fail_after(40):
            await wait_ready(log, ["window_post#0"])
            done = await dext_run_async("status", "--socket", str(path), "--jobs", url, "--json")
            assert done.returncode == 0, done.stderr
            doc = json.loads(done.stdout)
            assert doc["schema"] == "damocles-ext/status/1"
            assert [c["name"] for c in doc["children"]] == ["window_post#0"]
            assert doc["jobs"]["schema"] == "damocles-ext/jobs/1"
            assert doc["jobs"]["unallocatable"] == 2
            done = await dext_run_async("status", "--socket", str(path), "--jobs", url)
            assert done.returncode == 0, done.stderr
            table = done.stdout.decode()
            assert "window_post#0" in table and f"job store {url}" in table
            # Without --jobs, the supervisor's document is as it was: no "jobs" in it.
            done = await dext_run_async("status", "--socket", str(path), "--json")
            assert "jobs" not in json.loads(done.stdout)
        nursery.cancel_scope.cancel()


def test_the_table_names_a_single_unallocatable_job_and_says_when_no_worker_is_live():
    s = summary.summarize(
        counts={"ready2run": 1},
        ready=[summary.ReadyGroup(7, W2K, 1, 100)],
        oldest_ready=("J1", 100),
        workers=[],
        now=160,
        store="sqlite:///x.db",
    )
    table = summary.render(s)
    assert "oldest ready job: J1, created 1m0s ago" in table
    assert "live workers (seen in the last 2m0s): 0" in table
    assert "unallocatable: 1 ready job (no worker is live)" in table
    empty = summary.render(summary.summarize(counts={}, ready=[], oldest_ready=None, workers=[],
                                             now=0))  # fmt: skip
    assert "oldest ready job: none" in empty and "unallocatable: none" in empty
