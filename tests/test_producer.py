"""The producer: `damocles-ext serve window_post --jobs URL` turns damocles-manager's requests into
jobs of a real store (SQLite under tmp_path, the session's PostgreSQL) and answers from them.

serve runs as a real subprocess driven like damocles-manager drives a processor (ManagerLike);
the worker is the test, calling the store (allocate, finish) as a coordinator would, or the
coordinator's RPC itself when serve runs it (--listen)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from helpers.frontend import DEXT, ManagerLike, dext_env, dext_run, dext_with, make_task

from damocles_ext.jobs import model, rules
from damocles_ext.jobs.paths import StoreMap, job_input
from damocles_ext.jobs.store import JobStore, TrioJobStore
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

PROOF = "StackedDrgWindow2KiBV1_2"
WORKER = "gpu-1"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.db"
    return request.getfixturevalue("postgres_url")


def window_task(root: str, miner: int = 1000, sectors: tuple[int, ...] = (1, 2),
                upgraded: tuple[int, ...] = ()) -> WindowPoSt:  # fmt: skip
    """A task whose paths are in damocles' layout under the store at `root`."""

    def replica(n: int) -> PoStReplicaInfo:
        sealed, cache = ("update", "update-cache") if n in upgraded else ("sealed", "cache")
        name = f"s-t0{miner}-{n}"
        return PoStReplicaInfo(
            n, bytes([n]) * 32, f"{root}/{cache}/{name}", f"{root}/{sealed}/{name}"
        )

    return WindowPoSt(miner, PROOF, [replica(n) for n in sectors], bytes([miner % 64]) * 32)


def job_id_of(task: WindowPoSt, stores: dict[str, str]) -> str:
    return model.job_id(job_input(task, StoreMap(stores)))


async def start_serve(nursery, url: str, *args: str) -> ManagerLike:
    argv = [*DEXT, "serve", "window_post", "--jobs", url, "--log-level", "debug", *args]
    return await ManagerLike.start(
        nursery, argv, "window_post", stderr=subprocess.PIPE, ready_timeout=30
    )


async def finish_as_worker(url: str, job_id: str, output, error: str = "", worker: str = WORKER):
    """Take the job (the only ready one) and finish it, as a worker does through a coordinator."""
    with JobStore.open(url) as store:
        jobs = TrioJobStore(store)
        [taken] = await jobs.allocate(rules.AllocationSpec(), 1, worker)
        assert taken.Id == job_id
        outcome = await jobs.finish(job_id, output, error, lease=taken.lease)
        assert outcome.effects == (rules.Finished(job_id, error),)


async def stderr_until(process, text: bytes, seen: bytes = b"") -> bytes:
    """What `process` wrote to stderr, read until it holds `text` (`seen`: read before)."""
    while text not in seen:
        chunk = await process.stderr.receive_some(4096)
        assert chunk, seen
        seen += chunk
    return seen


async def to_the_end(process, seen: bytes) -> tuple[bytes, bytes]:
    """`process`'s whole stdout and the rest of its stderr (after `seen`), once it exited 0."""
    out = b""
    while chunk := await process.stdout.receive_some(4096):
        out += chunk
    while chunk := await process.stderr.receive_some(4096):
        seen += chunk
    assert await process.wait() == 0, seen
    return out, seen


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/jobs.db"


def task_in_store_a(tmp_path: Path) -> tuple[str, WindowPoSt, str]:
    """The root of a store named 'a' under tmp_path, a task in it and the task's job id."""
    root = str(tmp_path / "s")
    task = window_task(root)
    return root, task, job_id_of(task, {"a": root})


async def send_until_created(m: ManagerLike, task: WindowPoSt, job_id: str) -> int:
    """Send `task`; its id once serve logged that it created the job."""
    request_id = await m.send(task)
    await m.wait_log(f"job {job_id}: created")
    return request_id


async def finish_and_expect_proofs(m: ManagerLike, url: str, job_id: str, request_id: int,
                                   proofs: tuple[bytes, ...] = (b"p",),
                                   within: float = 30) -> None:  # fmt: skip
    """Finish the job as a worker with `proofs`; the request is answered with them."""
    await finish_as_worker(url, job_id, model.JobOutput(proofs=proofs, faults=()))
    with trio.fail_after(within):
        response = await m.wait(request_id)
    assert response.err_msg is None and response.output.proofs == list(proofs)


async def stop(m: ManagerLike) -> None:
    await m.close_stdin()
    with trio.fail_after(30):
        assert await m.process.wait() == 0, "\n".join(m.log)
    assert m.duplicates == [] and m.unknown == [] and m.bad_lines == []
    assert not any("Traceback" in line for line in m.log), "\n".join(m.log)


async def test_a_request_becomes_damocles_job_and_is_answered_with_its_proofs_and_faults(
    store_url, tmp_path
):
    root = str(tmp_path / "store-a")
    task = window_task(root, sectors=(1, 2, 3), upgraded=(3,))
    job_id = job_id_of(task, {"a": root})
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, store_url, "--store", f"a={root}", "--poll-interval", "0.1")
        request_id = await send_until_created(m, task, job_id)
        with JobStore.open(store_url) as store:
            job = store.get(job_id)
        # damocles' job: store names for paths, Upgrade from update/, the request's values; by
        # default a deadline 40 minutes on (no later proof can count for its deadline).
        assert job is not None and job.State == model.READY and job.not_after is not None
        assert abs(job.not_after - (job.CreatedAt + 2400)) < 5, (job.not_after, job.CreatedAt)
        assert [(s.SectorId, s.Upgrade, s.Accesses.SealedFile, s.Accesses.CacheDir)
                for s in job.Input.Sectors] == [(1, False, "a", "a"), (2, False, "a", "a"),
                                                 (3, True, "a", "a")]  # fmt: skip
        assert job.Input.Seed == tuple(task.seed) and job.Input.MinerId == 1000
        assert job.Id == model.job_id_of_json(model.go_json(job.Input))
        output = model.JobOutput(proofs=(b"proof-1",), faults=(2,))
        await finish_as_worker(store_url, job_id, output)
        with trio.fail_after(30):
            response = await m.wait(request_id)
        assert response.err_msg is None, response
        assert response.output.proofs == [b"proof-1"] and response.output.faults == [2]
        await stop(m)


async def test_a_job_failed_at_job_max_try_is_answered_with_job_worker_tries_and_reason(
    tmp_path,
):
    url = sqlite_url(tmp_path)
    root = str(tmp_path / "s")
    # The store and the limits come from damocles-manager's own file.
    (tmp_path / "sector-manager.cfg").write_text(
        f'[[Common.PersistStores]]\nName = "nfs-1"\nPath = "{root}"\n'
        "[Common.Proving.WorkerProver]\nJobMaxTry = 1\n"
    )
    task = window_task(root)
    job_id = job_id_of(task, {"nfs-1": root})
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, url, "--conf-dir", str(tmp_path), "--poll-interval", "0.1",
                              "--log-format", "json")  # fmt: skip
        request_id = await send_until_created(m, task, job_id)
        await finish_as_worker(url, job_id, None, "cuda: out of memory", worker="gpu-7")
        with trio.fail_after(30):
            response = await m.wait(request_id)
        assert response.output is None
        assert response.err_msg == (
            f"request {request_id} (window_post): job {job_id} failed on worker 'gpu-7' (try 1 of"
            " JobMaxTry 1): cuda: out of memory; the same task gets this answer until its job is"
            f" reset (`damocles-ext wdpost reset --jobs URL {job_id}`)"
        )
        await stop(m)
    # In JSON logs, serve's record of the error answer names the job and its worker as fields.
    (said,) = (r for r in map(json.loads, m.log) if "failed on worker" in r["message"])
    assert (said["caller_request_id"], said["job_id"], said["worker"]) == (
        request_id,
        job_id,
        "gpu-7",
    ), said


async def test_a_job_nobody_takes_before_its_deadline_is_cancelled_and_answered_with_why(
    store_url, tmp_path
):
    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        # A long poll: the answer comes at the deadline, not at the next look.
        m = await start_serve(nursery, store_url, "--store", f"a={root}", "--deadline-after",
                              "1s", "--poll-interval", "60")  # fmt: skip
        request_id = await m.send(task)
        with trio.fail_after(30):
            response = await m.wait(request_id)
        assert response.output is None
        assert f"job {job_id} was cancelled: its deadline passed at " in response.err_msg
        assert "(it was waiting for a worker; tries 0 of 2); last worker: none" in response.err_msg
        await stop(m)
    with JobStore.open(store_url) as store:
        job = store.get(job_id)
    assert job is not None and job.cancelled and job.not_after is not None


async def test_a_restarted_serve_reattaches_to_the_job_of_a_request_sent_again(store_url, tmp_path):
    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        first = await start_serve(nursery, store_url, "--store", f"a={root}")
        await first.send(task)
        await first.wait_log(f"job {job_id}: created")
        # What damocles-manager's stop does to its processors.
        first.process.kill()
        await first.process.wait()
        output = model.JobOutput(proofs=(b"done-while-away",), faults=())
        await finish_as_worker(store_url, job_id, output)
        # damocles-manager, started again, sends the same request (ids count from 1 again).
        second = await start_serve(nursery, store_url, "--store", f"a={root}",
                                   "--poll-interval", "60", "--log-format", "json")  # fmt: skip
        with trio.fail_after(30):
            response = await second.request(task)
        assert response.err_msg is None and response.output.proofs == [b"done-while-away"]
        assert any(f"job {job_id}: re-attached to the existing job (Succeed" in line
                   for line in second.log)  # fmt: skip
        # In JSON logs, the records about the job carry its id (and the worker that did it).
        about = [json.loads(line) for line in second.log if f"job {job_id}: " in line]
        assert [r.get("job_id") for r in about] == [job_id, job_id], about
        assert about[-1]["message"] == f"job {job_id}: done on worker 'gpu-1'"
        assert about[-1]["worker"] == "gpu-1"
        await stop(second)
    with JobStore.open(store_url) as store:
        assert [j.Id for j in store.list_jobs()] == [job_id]


async def test_a_job_removed_while_waited_for_is_created_again_and_still_answered(tmp_path):
    url = sqlite_url(tmp_path)
    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, url, "--store", f"a={root}", "--poll-interval", "0.1")
        request_id = await send_until_created(m, task, job_id)
        with JobStore.open(url) as store:
            assert store.remove(job_id, 0)
        await m.wait_log(f"job {job_id} was removed from the store while waited for")
        await m.wait_log("creating it again")
        with trio.fail_after(30):
            await m.wait_log_times(f"job {job_id}: created", 2)
        await finish_and_expect_proofs(m, url, job_id, request_id)
        await stop(m)


async def test_stdin_eof_answers_a_request_still_waiting_with_its_job_id_and_that_it_stays(
    tmp_path,
):
    url = sqlite_url(tmp_path)
    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, url, "--store", f"a={root}", "--shutdown-grace", "0.5")
        request_id = await send_until_created(m, task, job_id)
        await m.close_stdin()
        with trio.fail_after(30):
            response = await m.wait(request_id)
            assert await m.process.wait() == 0
    assert response.output is None
    assert "serve stopped before the job was done (shutdown grace 0.5 s)" in response.err_msg
    assert f"job {job_id} stays in the job store {url}" in response.err_msg
    assert "a restarted serve given the same request re-attaches to it" in response.err_msg
    with JobStore.open(url) as store:
        assert store.get(job_id).State == model.READY


async def test_a_request_with_a_path_in_no_store_gets_an_error_answer_and_serve_goes_on(tmp_path):
    url = sqlite_url(tmp_path)
    root = str(tmp_path / "s")
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, url, "--store", f"a={root}", "--poll-interval", "0.1")
        with trio.fail_after(30):
            response = await m.request(window_task("/elsewhere", sectors=(4,)))
        assert response.output is None
        assert response.err_msg.startswith(
            "request 1 (window_post): bad request: sector 4 of miner 1000: its sealed_file"
            " '/elsewhere/sealed/s-t01000-4' is in none of the stores (a="
        )
        assert "--store NAME=PATH" in response.err_msg
        # The next request is served.
        task = window_task(root)
        job_id = job_id_of(task, {"a": root})
        request_id = await send_until_created(m, task, job_id)
        await finish_and_expect_proofs(m, url, job_id, request_id)
        await stop(m)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["winning_post", "--jobs", "{url}"], "WinningPoSt must stay local"),
        (["window_post", "--jobs", "mysql://u@h/db"], "'mysql' is not supported"),
        (["window_post", "--jobs", "sqlite://"], "names no file"),
        (["window_post", "--jobs", "postgresql://u@h:abc/db"], "is not a valid URL"),
        (["window_post", "--jobs", "{url}?timeout=abc"], "check its query parameters"),
        (["window_post", "--jobs", "{url}", "--store", "a"], "expected NAME=PATH"),
        # Relative, a store names another place in each process (and none under systemd's /).
        (["window_post", "--jobs", "{url}", "--store", "a=mnt/a"], "PATH must be absolute"),
        (["window_post", "--jobs", "{url}", "--store", "a=/x", "--store", "a=/y"],
         "store 'a' is given twice"),
        (["window_post", "--jobs", "{url}", "-c", "x.cfg"], "does not apply to serve --jobs"),
        (["window_post", "--jobs", "{url}", "--restart-delay", "2"],
         "--restart-delay does not apply to serve --jobs"),
        (["window_post", "--jobs", "{url}", "--conf-dir", "{tmp}/nope"], "does not exist"),
        (["window_post", "-c", "x.cfg", "--store", "a=/x"], "--store goes with --jobs URL"),
        (["window_post", "--jobs", "{url}", "--poll-interval", "0"], "must be a positive duration"),
        (["window_post", "--jobs", "{url}", "--store-file-check", "0"],
         "must be a positive duration"),
        (["window_post", "--jobs", "{url}", "--store-file-check", "soon"], "is not a duration"),
        (["window_post", "-c", "x.cfg", "--store-file-check", "1s"],
         "--store-file-check goes with --jobs URL"),
    ],
)  # fmt: skip
def test_a_bad_start_exits_2_before_the_ready_line_saying_why(tmp_path, args, words):
    url = sqlite_url(tmp_path)
    args = [a.replace("{url}", url).replace("{tmp}", str(tmp_path)) for a in args]
    done = dext_run("serve", *args, input=b"")
    assert done.returncode == 2, done.stderr
    assert done.stdout == b""  # no ready line: damocles-manager's start fails
    err = done.stderr.decode()
    assert words in err and "Traceback" not in err
    # Only why it did not start: no warning about what it would have done.
    assert "no store is known" not in err


def test_a_busy_listen_port_fails_the_start_and_leaves_no_new_store_file(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = dext_run("serve", "window_post", "--jobs", sqlite_url(tmp_path),
                        "--listen", f"127.0.0.1:{port}", input=b"")  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b"", err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # the port is bound before the store is opened


#: serve with SERVE_CONNECT_TIMEOUT 1 s rather than 3: a start that waits it out fails sooner
#: (libpq and psycopg wait 2 s at least for a connection).
SHORT_CONNECT_TIMEOUT = dext_with({"damocles_ext.frontends.serve.SERVE_CONNECT_TIMEOUT": 1})


def test_a_database_that_does_not_answer_fails_the_start_before_damocles_gives_up_on_it():
    # A listener that never accepts: the TCP connection is made, PostgreSQL's greeting never
    # comes. damocles-manager waits 5 s for the ready line; the store gets 3 s of them
    # (SERVE_CONNECT_TIMEOUT), not the 10 s other commands give it, so the start fails with
    # our reason rather than with damocles' timeout. Run here with it at 1 s (2 s in libpq).
    from damocles_ext.frontends.serve import SERVE_CONNECT_TIMEOUT

    assert SERVE_CONNECT_TIMEOUT < 5
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        port = mute.getsockname()[1]
        started = time.monotonic()
        done = dext_run(
            "serve", "window_post", "--jobs", f"postgresql://u@127.0.0.1:{port}/db",
            "--store", "a=/tmp", input=b"", dext=SHORT_CONNECT_TIMEOUT,
        )  # fmt: skip
        took = time.monotonic() - started
    assert done.returncode == 1 and done.stdout == b""  # no ready line
    err = done.stderr.decode()
    assert f"cannot reach the job store postgresql://u@127.0.0.1:{port}/db" in err, err
    assert "timeout" in err and "Traceback" not in err
    # With the 10 s timeout of the other commands it could not end before 10 s.
    assert took < 9.5, took


def test_a_store_that_takes_no_write_fails_the_start_saying_so(tmp_path):
    # A read-only file (here its URL's mode=ro: root writes any file) would take every job's
    # request and fail it, retried until its deadline; the start fails instead, with why.
    with JobStore.open(sqlite_url(tmp_path)):
        pass
    url = f"sqlite:///file:{tmp_path}/jobs.db?mode=ro&uri=true"
    done = dext_run("serve", "window_post", "--jobs", url, "--store", "a=/tmp", input=b"")
    assert done.returncode == 1 and done.stdout == b"", done.stderr  # no ready line
    err = done.stderr.decode()
    assert "attempt to write a readonly database; it is read-only here" in err, err
    assert "Traceback" not in err


def test_a_store_another_process_keeps_locked_fails_the_start_before_damocles_gives_up(
    store_url, tmp_path
):
    # SQLite's write lock, or PostgreSQL's schema lock, held by a stuck process: the start waits
    # SERVE_CONNECT_TIMEOUT for it, not the 30 s busy timeout (or for ever), and says why.
    import sqlite3

    import psycopg

    with JobStore.open(store_url):
        pass  # the store exists
    if store_url.startswith("sqlite"):
        holder = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        words = "stayed locked by another process"
    else:
        holder = psycopg.connect(store_url)
        holder.execute("SELECT pg_advisory_lock(7426385010214)")
        words = "another session held its schema lock for over 1 s"
    try:
        started = time.monotonic()
        done = dext_run("serve", "window_post", "--jobs", store_url, "--store", "a=/tmp",
                        input=b"", timeout=40, dext=SHORT_CONNECT_TIMEOUT)  # fmt: skip
        took = time.monotonic() - started
    finally:
        holder.close()
    assert done.returncode == 1 and done.stdout == b"", done.stderr  # no ready line
    err = done.stderr.decode()
    assert words in err and "Traceback" not in err, err
    # SERVE_CONNECT_TIMEOUT and the start-up, not SQLite's 30 s busy timeout, nor for ever.
    assert took < 20, took


async def test_listen_runs_the_coordinator_in_the_same_process(tmp_path):
    from test_coordinator import Client

    url = sqlite_url(tmp_path)
    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        # A minute between looks: an answer within the test's bound came from the finish, which
        # the coordinator in the same process passes to the waiting request at once.
        m = await start_serve(nursery, url, "--store", f"a={root}", "--listen", "127.0.0.1:0",
                              "--poll-interval", "60")  # fmt: skip
        line = await m.wait_log("serving the worker-prover RPC at http://")
        port = int(re.search(r"127\.0\.0\.1:(\d+)/rpc/v0", line).group(1))
        request_id = await send_until_created(m, task, job_id)
        client = Client(await trio.open_tcp_stream("127.0.0.1", port))
        status, answer = await client.call("Venus.StoreBasicInfo", "a")
        assert status == 200 and answer["result"]["Path"] == root
        status, answer = await client.call(
            "Venus.WdPoStAllocateJobs", {"AllowedMiners": None, "AllowedProofTypes": None}, 1,
            WORKER,
        )  # fmt: skip
        assert status == 200 and [j["Id"] for j in answer["result"]] == [job_id]
        status, answer = await client.call(
            "Venus.WdPoStFinishJob", job_id, {"proofs": ["cHJvb2Y="], "faults": []}, ""
        )
        assert status == 200 and answer["result"] is None, answer
        with trio.fail_after(30):
            response = await m.wait(request_id)
        assert response.err_msg is None and response.output.proofs == [b"proof"]
        await client.stream.aclose()
        await stop(m)


async def test_listen_with_a_token_file_refuses_a_worker_without_the_token(tmp_path):
    # Loopback is no boundary between local users: with --token-file the RPC served by serve
    # --jobs --listen asks for the token, as the coordinator's does.
    from test_coordinator import Client

    token = tmp_path / "token"
    token.write_text("s3cret-serve-token\n")
    root, _task, _job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, sqlite_url(tmp_path), "--store", f"a={root}",
                              "--listen", "127.0.0.1:0", "--token-file", str(token))  # fmt: skip
        line = await m.wait_log("serving the worker-prover RPC at http://")
        port = int(re.search(r"127\.0\.0\.1:(\d+)/rpc/v0", line).group(1))
        client = Client(await trio.open_tcp_stream("127.0.0.1", port))
        status, answer = await client.call("Venus.StoreBasicInfo", "a")
        assert status == 401 and "requires a bearer token" in answer["error"]["message"]
        status, answer = await client.call(
            "Venus.StoreBasicInfo", "a", headers=[("Authorization", "Bearer s3cret-serve-token")]
        )
        assert status == 200 and answer["result"]["Path"] == root
        await client.stream.aclose()
        await stop(m)


def test_a_token_file_without_listen_exits_2_saying_what_it_goes_with(tmp_path):
    token = tmp_path / "token"
    token.write_text("t\n")
    done = dext_run("serve", "window_post", "--jobs", sqlite_url(tmp_path), "--store", "a=/tmp",
                    "--token-file", str(token), input=b"")  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b"", err
    assert "--token-file goes with --listen" in err and "Traceback" not in err
    done = dext_run("serve", "window_post", "-c", "/nonexistent.toml",
                    "--token-file", str(token), input=b"")  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and "--token-file goes with --jobs URL" in err, err


#: Files serve must not wait on before its ready line: made at a path, and what serve calls them.
NOT_REGULAR_FILES = pytest.mark.parametrize(
    ("make", "kind"),
    [
        (os.mkfifo, "a FIFO (named pipe)"),
        (lambda p: os.symlink("/dev/zero", p), "a character device"),
    ],
    ids=["fifo", "device"],
)


@NOT_REGULAR_FILES
def test_a_token_file_that_is_a_fifo_or_a_device_exits_2_at_once_saying_what_it_is(
    tmp_path, make, kind
):
    # serve reads it before its ready line: a FIFO without a writer held that open() for ever
    # (damocles-manager saw a start that never said ready), /dev/zero was read as an endless line.
    token = tmp_path / "token"
    make(str(token))
    done = dext_run("serve", "window_post", "--jobs", sqlite_url(tmp_path), "--store", "a=/tmp",
                    "--listen", "127.0.0.1:0", "--token-file", str(token), input=b"",
                    timeout=30)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b"" and "Traceback" not in err, err
    assert (
        f"the token file {str(token)!r} is {kind}, not a regular file: serve needs a regular" in err
    )


@NOT_REGULAR_FILES
def test_a_sector_manager_cfg_that_is_a_fifo_or_a_device_exits_2_at_once_saying_what_it_is(
    tmp_path, make, kind
):
    # serve --jobs --conf-dir reads it before its ready line: a FIFO without a writer held that
    # open() for ever, /dev/zero was read up to the size limit and called too large.
    conf = tmp_path / "manager"
    conf.mkdir()
    make(str(conf / "sector-manager.cfg"))
    done = dext_run("serve", "window_post", "--jobs", sqlite_url(tmp_path), "--conf-dir",
                    str(conf), input=b"", timeout=30)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b"" and "Traceback" not in err, err
    pipe = " (a pipe such as <(command) or /dev/stdin is one)" if "FIFO" in kind else ""
    assert (
        f"{conf / 'sector-manager.cfg'}: is {kind}{pipe}, not a regular file, so it is not" in err
    )
    assert "write the sector-manager.cfg to a file and give its path" in err


def test_a_token_file_is_read_as_bytes_and_only_its_first_line_decoded(tmp_path):
    # It was read as UTF-8 text: a byte that is not UTF-8 after the first line (in the buffer
    # the first read filled) made a good token refused.
    from damocles_ext.commands.common import regular_token_file, token_file

    token = tmp_path / "token"
    token.write_bytes(b"s3cret\n\xff\xfe not text\n")
    assert regular_token_file(str(token)) == "s3cret" and token_file(str(token)) == "s3cret"
    token.write_bytes(b"s3\xffcret\n")
    with pytest.raises(argparse.ArgumentTypeError, match="its first line is not UTF-8"):
        regular_token_file(str(token))


def test_a_token_file_below_a_file_is_said_to_be_under_a_file_not_missing(tmp_path):
    from damocles_ext.commands.common import regular_token_file

    (tmp_path / "file").write_text("")
    path = str(tmp_path / "file" / "token")
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        regular_token_file(path)
    assert str(caught.value) == (
        f"the token file {path!r} cannot be there: a part of its path before it is a file, not a"
        " directory; fix the path"
    )


@pytest.mark.parametrize("closed", ["file", "directory"])
def test_a_token_file_serve_may_not_read_names_its_uid_and_says_to_fix_permissions(closed):
    from helpers.kept_out import NOBODY, a_closed_directory, said_when_kept_out

    from damocles_ext.commands.common import regular_token_file

    with a_closed_directory() as directory:
        token = directory / "inside"
        if closed == "file":
            token = directory.parent / "token"
            token.write_text("s3cret\n")
            token.chmod(0)
        said = said_when_kept_out(lambda: regular_token_file(str(token)))
    uid = os.geteuid() or NOBODY
    assert said == (
        f"TokenFileError: the token file {str(token)!r} cannot be read by uid {uid}, which this"
        " command runs as (permission denied); fix its permissions, or those of a directory on"
        f" its path, so that uid {uid} may read it"
    )


async def test_listen_lets_the_coordinator_answer_the_call_it_is_on_when_serve_stops(
    tmp_path, caplog
):
    # serve --listen, in this process: a worker's call waits on the store (SQLite locked by
    # another writer) when serve's input ends. serve stops as the coordinator command does: the
    # call gets its answer (a finish stored is acknowledged, not cut), then the port closes.
    import os
    import sqlite3

    from helpers.supervisor import wait_until
    from test_coordinator import Client

    from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
    from damocles_ext.frontends.producer import JobProducer, producer_settings, run_producer

    caplog.set_level(logging.INFO, "damocles_ext")
    store = JobStore.open(sqlite_url(tmp_path))
    settings = producer_settings(None, [("a", str(tmp_path))], None)
    producer = JobProducer.on(store, settings, deadline_after=None)
    rpc = Coordinator(TrioJobStore(store), settings.stores, observe=producer.observe)
    server = CoordinatorServer(rpc, "127.0.0.1", 0)
    protocol_in, to_serve = os.pipe()
    from_serve, protocol_out = os.pipe()
    writer = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    answers: list[tuple[int, dict]] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                run_producer, "window_post", producer, protocol_in, protocol_out, 5.0,
                (rpc, server),
            )  # fmt: skip
            await wait_until(
                lambda: any(
                    "serving window_post through" in r.getMessage() for r in caplog.records
                ),
                what="serve serving (after the coordinator's first sweep)",
            )
            busy = Client(await trio.open_tcp_stream("127.0.0.1", server.port))
            writer.execute("BEGIN IMMEDIATE")

            async def allocate() -> None:
                answers.append(await busy.call("Venus.WdPoStAllocateJobs", {}, 1, WORKER))

            nursery.start_soon(allocate)
            await wait_until(lambda: server._slots and sum(not c.idle for c in server._slots._open) == 1,
                             what="the call waiting on the store")  # fmt: skip
            os.close(to_serve)  # damocles-manager went away: serve stops
            await wait_until(lambda: server.stopping, what="the coordinator stopping")
            writer.execute("ROLLBACK")
            with trio.fail_after(30):
                await server.stopped.wait()
    finally:
        writer.close()
        for fd in (from_serve,):
            os.close(fd)
        store.close()
    [(status, answer)] = answers
    assert status == 200 and answer["result"] == []
    with pytest.raises(OSError, match=r"Connection refused|all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", server.port)


async def test_sigterm_answers_the_waiting_request_within_the_grace_and_exits_0(tmp_path):
    url = sqlite_url(tmp_path)
    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, url, "--store", f"a={root}", "--shutdown-grace", "0.5")
        # The signal handler is in place once it serves (the ready line goes out before).
        await m.wait_log("serving window_post through the job store")
        request_id = await send_until_created(m, task, job_id)
        m.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            response = await m.wait(request_id)
            assert await m.process.wait() == 0
    assert f"job {job_id} stays in the job store" in response.err_msg
    assert any("stopped: 1 requests read, 1 answered" in line for line in m.log), m.log


def test_the_stores_of_a_conf_dir_are_mapped_the_same_way(tmp_path: Path):
    # A store without Name is named by its path as written, in the job too.
    (tmp_path / "sector-manager.cfg").write_text('[[Common.PersistStores]]\nPath = "/mnt/x/"\n')
    from damocles_ext.jobs.manager_config import read_settings

    stores = StoreMap(read_settings(str(tmp_path)).stores)
    access, upgrade = stores.locate(1000, 5, "/mnt/x/sealed/s-t01000-5", "/mnt/x/cache/s-t01000-5")
    assert access.SealedFile == access.CacheDir == "/mnt/x/" and not upgrade


# -- PostgreSQL: LISTEN/NOTIFY wakes the producer before its next poll ---------------------------


async def test_a_notification_wakes_the_producer_long_before_its_poll_interval(
    postgres_url, tmp_path
):
    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        # A minute between looks: an answer within the test's bound came from the notification.
        m = await start_serve(nursery, postgres_url, "--store", f"a={root}",
                              "--poll-interval", "60")  # fmt: skip
        await m.wait_log("listening for job changes on")
        request_id = await send_until_created(m, task, job_id)
        await finish_and_expect_proofs(m, postgres_url, job_id, request_id)
        await stop(m)


async def test_the_listener_tries_every_host_of_the_url_as_the_store_does(postgres_url, tmp_path):
    # A URL may name several hosts (`?host=a&host=b`, an HA pair): the store tries each in turn,
    # but the listener's URL, rendered again for libpq, kept the last alone, and listened nowhere.
    url = f"{postgres_url}&host={tmp_path}/no-server-here"
    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, url, "--store", f"a={root}",
                              "--poll-interval", "60")  # fmt: skip
        with trio.fail_after(30):
            await m.wait_log("listening for job changes on")
        request_id = await send_until_created(m, task, job_id)
        await finish_and_expect_proofs(m, url, job_id, request_id)
        await stop(m)
    assert not any("listener lost its connection" in line for line in m.log), m.log


async def test_the_listener_outlives_an_idle_session_timeout_the_dba_set(postgres_url, caplog):
    # A listening session is idle by design: with idle_session_timeout set on the database (or
    # the role), the server ended it at every timeout, a WARNING each time and the notifications
    # of each gap lost. The server's clock must pass the timeout: pg_sleep, on the server.
    import psycopg

    from damocles_ext.jobs.notify import CHANNEL, JobListener

    database = postgres_url.split("?")[0].rsplit("/", 1)[1]
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" SET idle_session_timeout = 500')
    connects: list[int] = []
    connected, heard = trio.Event(), trio.Event()

    def on_connect() -> None:
        connects.append(1)
        connected.set()

    with JobStore.open(postgres_url) as s:
        listener = JobListener.of_store(s, lambda job_id: heard.set(), on_connect)
    assert listener is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listener.run)
        with trio.fail_after(30):
            await connected.wait()
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                await trio.to_thread.run_sync(admin.execute, "SELECT pg_sleep(1.5)")
                admin.execute(f"NOTIFY {CHANNEL}, 'job'")
            await heard.wait()
        nursery.cancel_scope.cancel()
    assert connects == [1]
    assert not [r for r in caplog.records if "cannot listen on" in r.getMessage()]


async def test_a_listener_that_cannot_connect_says_so_once_not_at_each_try(monkeypatch, caplog):
    # The store down for an hour was 120 warnings an hour ("lost its connection", though it
    # never had one), while the store's own outage is one line.
    from damocles_ext.jobs import notify

    monkeypatch.setattr(notify, "FIRST_BACKOFF", 0.01)
    monkeypatch.setattr(notify, "MAX_BACKOFF", 0.01)
    caplog.set_level(logging.DEBUG, "damocles_ext")
    tries = trio.Event()

    class Counted(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "connecting again" in record.getMessage() and not tries.is_set():
                self.count = getattr(self, "count", 0) + 1
                if self.count >= 5:
                    trio.from_thread.run_sync(tries.set, trio_token=token)

    token = trio.lowlevel.current_trio_token()
    handler = Counted()
    logging.getLogger("damocles_ext").addHandler(handler)
    listener = notify.JobListener("host=127.0.0.1 port=1 dbname=jobs user=x", lambda _j: None,
                                  connect_timeout=1, where="postgresql://x@127.0.0.1:1/jobs")  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener.run)
            with trio.fail_after(30):
                await tries.wait()
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("damocles_ext").removeHandler(handler)
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert "cannot listen on postgresql://x@127.0.0.1:1/jobs" in warned[0].getMessage()


async def test_a_lost_listener_connection_is_logged_and_opened_again(postgres_url, tmp_path):
    import psycopg

    from damocles_ext.jobs.notify import APPLICATION_NAME

    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, postgres_url, "--store", f"a={root}",
                              "--poll-interval", "60")  # fmt: skip
        await m.wait_log("listening for job changes on")
        request_id = await send_until_created(m, task, job_id)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND datname = current_database()",
                (APPLICATION_NAME,),
            ).fetchall()
        assert killed == [(True,)]
        with trio.fail_after(30):
            await m.wait_log("notification listener cannot listen on")
            await m.wait_log("notification listener listens again")  # (one line for it)
        await finish_and_expect_proofs(m, postgres_url, job_id, request_id, (b"q",))
        await stop(m)


# -- prove --jobs and the Python API: the same producer ------------------------------------------


async def test_prove_jobs_submits_the_task_as_a_job_and_prints_the_workers_output(tmp_path):
    import json

    from damocles_ext.protocol.jsonl import task_to_json

    url = sqlite_url(tmp_path)
    root, task, job_id = task_in_store_a(tmp_path)
    (tmp_path / "task.json").write_bytes(task_to_json(task))
    # Its result looked for every 0.1 s, not damocles' 3 s.
    argv = [*DEXT, "prove", "window_post", "--request", str(tmp_path / "task.json"), "--jobs",
            url, "--store", f"a={root}", "--log-level", "info", "--no-progress",
            "--poll-interval", "0.1"]  # fmt: skip
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dext_env()
    )
    with trio.fail_after(60):
        seen = await stderr_until(process, f"job {job_id}: created".encode())
        await finish_as_worker(url, job_id, model.JobOutput(proofs=(b"p",), faults=(1,)))
        out, seen = await to_the_end(process, seen)
    assert json.loads(out) == {"proofs": ["cA=="], "faults": [1]}
    assert b"1 faulty sector: 1" in seen and b"Traceback" not in seen


def test_prove_jobs_of_a_task_whose_job_was_cancelled_says_how_to_prove_it_again(tmp_path):
    # Proving the same task again (a new --deadline, workers back) answered the old
    # cancellation at once, a deadline long past, and nothing said what to do.
    from damocles_ext.protocol.jsonl import task_to_json

    url = sqlite_url(tmp_path)
    root, task, job_id = task_in_store_a(tmp_path)
    (tmp_path / "task.json").write_bytes(task_to_json(task))
    prove = ["prove", "window_post", "--request", str(tmp_path / "task.json"), "--jobs", url,
             "--store", f"a={root}", "--no-progress", "--log-level", "info",
             "--poll-interval", "0.1"]  # fmt: skip
    first = dext_run(*prove, "--deadline", "1")  # no worker: cancelled at its deadline
    assert first.returncode == 1 and f"job {job_id} was cancelled".encode() in first.stderr
    again = dext_run(*prove, "--deadline", "600")
    assert again.returncode == 1 and f"job {job_id}: created".encode() not in again.stderr
    assert (
        f"the same task gets this answer until its job is removed (`damocles-ext wdpost remove"
        f" --jobs URL {job_id}`)"
    ).encode() in again.stderr, again.stderr
    # What it says to do works: a new job, with the new deadline.
    assert dext_run("wdpost", "remove", "--jobs", url, job_id).returncode == 0
    third = dext_run(*prove, "--deadline", "1")
    assert f"job {job_id}: created".encode() in third.stderr, third.stderr


def test_prove_jobs_without_deadline_gives_the_job_serves_default_and_ends_at_it(tmp_path):
    # Without --deadline, the job had none: with no worker to take it, prove waited for ever.
    # It now gets serve --jobs's default (shortened to 1 s here), and is cancelled at it.
    from damocles_ext.protocol.jsonl import task_to_json

    url = sqlite_url(tmp_path)
    root, task, job_id = task_in_store_a(tmp_path)
    (tmp_path / "task.json").write_bytes(task_to_json(task))
    short = {"window_post": 1.0, "winning_post": 1.0}
    done = dext_run("prove", "window_post", "--request", str(tmp_path / "task.json"), "--jobs",
                    url, "--store", f"a={root}", "--no-progress", "--poll-interval", "0.1",
                    dext=dext_with({"damocles_ext.commands.serve.DEFAULT_DEADLINE_AFTER": short}),
                    timeout=30)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert f"job {job_id} was cancelled" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--socket", "/x"], "--socket does not apply with --jobs"),
        (["--priority", "3"], "--priority does not apply with --jobs"),
        (["--store", "a=/elsewhere"], "is in none of the stores (a=/elsewhere)"),
        (["--poll-interval", "0"], "must be a positive duration"),
        (["--poll-interval", "soon"], "is not a duration"),
    ],
)
def test_prove_jobs_refuses_what_does_not_apply_with_exit_2(tmp_path, extra, words):
    from damocles_ext.protocol.jsonl import task_to_json

    (tmp_path / "task.json").write_bytes(task_to_json(window_task(str(tmp_path / "s"))))
    done = dext_run("prove", "window_post", "--request", str(tmp_path / "task.json"),
                    "--jobs", f"sqlite:///{tmp_path}/j.db", *extra)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert words in done.stderr.decode() and b"Traceback" not in done.stderr


def test_prove_poll_interval_without_jobs_is_refused_with_exit_2(tmp_path):
    from damocles_ext.protocol.jsonl import task_to_json

    (tmp_path / "task.json").write_bytes(task_to_json(window_task(str(tmp_path / "s"))))
    done = dext_run("prove", "window_post", "--request", str(tmp_path / "task.json"),
                    "--socket", str(tmp_path / "none.sock"), "--poll-interval", "1s")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert b"--poll-interval goes with --jobs URL" in done.stderr
    assert b"Traceback" not in done.stderr


async def test_the_python_api_answers_from_the_job_a_worker_finished(tmp_path):
    from damocles_ext.api import open_job_producer, submit_job
    from damocles_ext.errors import ProverError, UsageError

    url = sqlite_url(tmp_path)
    root = str(tmp_path / "s")
    done_task, failed_task = window_task(root, miner=1000), window_task(root, miner=1001)
    with JobStore.open(url, limits=rules.JobLimits(max_try=1)) as store:
        for task, error in ((done_task, ""), (failed_task, "disk gone")):
            job, _ = store.create(job_input(task, StoreMap({"a": root})), 0)
            [taken] = store.allocate(rules.AllocationSpec(), 1, "w9", 0)
            output = model.JobOutput(proofs=(b"x",), faults=()) if not error else None
            store.finish(job.Id, output, error, 0, lease=taken.lease)
    output = await submit_job(url, done_task, stores={"a": root})
    assert output.proofs == [b"x"] and output.faults == []
    # The store and JobMaxTry 1 from damocles-manager's file: the failure is final.
    (tmp_path / "sector-manager.cfg").write_text(
        f'[[Common.PersistStores]]\nName = "a"\nPath = "{root}"\n'
        "[Common.Proving.WorkerProver]\nJobMaxTry = 1\n"
    )
    failed_id = job_id_of(failed_task, {"a": root})
    async with open_job_producer(url, conf_dir=str(tmp_path), poll_interval=60) as producer:
        with trio.fail_after(30), pytest.raises(ProverError) as caught:
            await producer.submit(failed_task)
        assert str(caught.value) == (
            f"job {failed_id} failed on worker 'w9' (try 1 of JobMaxTry 1): disk gone; the same"
            f" task gets this answer until its job is reset (`damocles-ext wdpost reset --jobs"
            f" URL {failed_id}`)"
        )
        with pytest.raises(UsageError, match="WinningPoSt must stay local"):
            await producer.submit(make_task(stage="winning_post"))


@pytest.mark.parametrize(
    ("proofs", "faults", "said"),
    [
        ((b"",), (), "proof 0 of 0 bytes"),
        ((), (), "neither proofs nor faults"),
        ((), (7,), "faults for sectors not in the task: [7]"),
    ],
    ids=["empty-proof", "nothing", "foreign-fault"],
)
async def test_a_job_a_worker_finished_with_a_result_no_child_may_give_is_an_error(
    tmp_path, proofs, faults, said
):
    # A worker's result was passed on as it came: an empty proof went to damocles-manager, which
    # submits it; faults for sectors not in the job would be declared. Our children's answers
    # were held to this already.
    from damocles_ext.api import submit_job
    from damocles_ext.errors import ProverError

    url = sqlite_url(tmp_path)
    root = str(tmp_path / "s")
    task = window_task(root, miner=1000)
    with JobStore.open(url) as store:
        job, _ = store.create(job_input(task, StoreMap({"a": root})), 0)
        [taken] = store.allocate(rules.AllocationSpec(), 1, "w9", 0)
        store.finish(job.Id, model.JobOutput(proofs, faults), "", 0, lease=taken.lease)
    with trio.fail_after(30), pytest.raises(ProverError) as caught:
        await submit_job(url, task, stores={"a": root})
    assert str(caught.value).startswith(
        f"job {job.Id} finished without an error but with {said} (worker 'w9'): not a proof;"
    )


async def test_the_python_api_logs_the_warnings_of_damocles_managers_config(tmp_path, caplog):
    from damocles_ext.api import open_job_producer

    async with open_job_producer(sqlite_url(tmp_path), conf_dir=str(tmp_path)):
        pass
    missing = (
        f"--conf-dir {tmp_path}: there is no sector-manager.cfg in it; damocles' defaults apply"
        " (JobMaxTry 2, HeartbeatTimeout 15s, JobLifetime 25h)"
    )
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [missing]


async def test_a_store_that_fails_while_waited_for_is_retried_not_answered_as_a_failure(
    postgres_url, tmp_path
):
    import psycopg

    root, task, job_id = task_in_store_a(tmp_path)
    async with trio.open_nursery() as nursery:
        m = await start_serve(nursery, postgres_url, "--store", f"a={root}",
                              "--poll-interval", "0.2")  # fmt: skip
        request_id = await send_until_created(m, task, job_id)
        database = psycopg.conninfo.conninfo_to_dict(postgres_url)["dbname"]
        with psycopg.connect(postgres_url, dbname="postgres", autocommit=True) as admin:
            # The database down for serve: no new connection, the open ones closed.
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )
            with trio.fail_after(30):
                await m.wait_log(f"the job store failed (job {job_id}: ")
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await finish_and_expect_proofs(m, postgres_url, job_id, request_id, within=60)
        await stop(m)


def test_importing_the_producer_leaves_psycopg_for_the_listener():
    # serve --jobs imports the producer before its ready line; psycopg (the LISTEN/NOTIFY
    # listener's) is loaded only when a PostgreSQL store's listener starts, after it.
    code = "import sys, damocles_ext.frontends.producer; print('psycopg' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert done.stdout == b"False\n", done.stderr
