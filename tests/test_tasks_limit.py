"""A machine at its limit of tasks (`ulimit -u`, systemd's TasksMax): commands that cannot start
a thread or a process say what ran out and what to do, and survive it where they can, with real
processes run as a uid whose processes and threads are all held but a few (helpers/tasks_limit)."""

from __future__ import annotations

import json
import re
import signal
import socket as pysocket
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import (
    DEXT,
    LogWatcher,
    ManagerLike,
    dext_env,
    make_task,
    plugin_block,
    write_config,
)
from helpers.tasks_limit import (
    a_uid_of_its_own,
    as_user,
    own_dir,
    run_cleanly_at_the_limit,
    skip_unless_possible,
    tasks_held,
)
from test_producer import finish_and_expect_proofs, job_id_of, window_task

from damocles_ext.frontends.coordinator import PARSE_ON_A_THREAD
from damocles_ext.protocol import dext


@pytest.fixture
def uid() -> int:
    skip_unless_possible()
    return a_uid_of_its_own()


def test_a_coordinator_that_cannot_start_a_thread_says_what_ran_out_without_a_traceback(
    uid, tmp_path
):
    store = own_dir(tmp_path / "svc", uid) / "jobs.db"
    argv = [*DEXT, "coordinator", "--jobs", f"sqlite:///{store}", "--listen", "127.0.0.1:0"]
    with tasks_held(uid, leave=1):  # its process, and no thread for its store
        done = subprocess.run(
            as_user(uid, argv), capture_output=True, timeout=60, env=dext_env(), check=False
        )
    err = done.stderr.decode()
    assert done.returncode == 1, err  # systemd's Restart=on-failure starts it again
    assert "Traceback" not in err, err
    assert f"damocles-ext coordinator: error: job store sqlite:///{store}: cannot start a" in err
    assert "ulimit -u" in err and "TasksMax" in err, err


async def test_serve_jobs_without_a_thread_for_its_store_waits_saying_why_then_proves(
    uid, tmp_path
):
    root = str(tmp_path / "s")
    task = window_task(root)
    job_id = job_id_of(task, {"a": root})
    url = f"sqlite:///{own_dir(tmp_path / 'svc', uid)}/jobs.db"
    argv = [*DEXT, "serve", "window_post", "--jobs", url, "--store", f"a={root}"]
    # Its process; no thread for its store's calls.
    async with serve_at_the_limit(uid, [*argv, "--poll-interval", "0.1"]) as (m, release):
        request_id = await m.send(task)
        with trio.fail_after(30):
            line = await m.wait_log("the job store failed")
        assert "cannot start a thread" in line and "ulimit -u" in line, line
        assert request_id not in m.responses  # not answered with the error: it waits
        # Threads to be had again: the job is made, and its proof is the answer.
        release()
        with trio.fail_after(60):
            await m.wait_log(f"job {job_id}: created")
        await finish_and_expect_proofs(m, url, job_id, request_id)


@asynccontextmanager
async def serve_at_the_limit(
    uid: int, argv: list[str]
) -> AsyncIterator[tuple[ManagerLike, Callable[[], None]]]:
    """`serve` (argv) as `uid` with no task to spare but its process, once ready: (it, the
    function that frees the tasks). After the block: stdin closed, exit code 0, no traceback."""
    with tasks_held(uid, leave=1) as release:
        async with trio.open_nursery() as nursery:
            m = await ManagerLike.start(nursery, as_user(uid, argv), "window_post",
                                        stderr=subprocess.PIPE, ready_timeout=30)  # fmt: skip
            try:
                yield m, release
                await m.close_stdin()
                with trio.fail_after(30):
                    assert await m.process.wait() == 0
            finally:
                if m.process.returncode is None:
                    m.process.kill()
    assert not any("Traceback" in line for line in m.log), "\n".join(m.log)


@asynccontextmanager
async def running_as(
    uid: int, cfg: Path, socket: Path, *extra: str
) -> AsyncIterator[tuple[trio.Process, LogWatcher]]:
    """`damocles-ext run` as `uid` (under the tasks limit), once its socket listens; killed at
    the end if the test did not stop it (its children die with it: PDEATHSIG)."""
    run = await trio.lowlevel.open_process(
        as_user(uid, [*DEXT, "run", "-c", str(cfg), "--socket", str(socket), *extra]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=dext_env(),
    )  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            log = LogWatcher(run.stderr)
            nursery.start_soon(log.run)
            with trio.fail_after(30):
                await log.wait_for("control socket listening")
            yield run, log
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()


async def stop(run: trio.Process, log: LogWatcher) -> None:
    run.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        assert await run.wait() == 0, log.text()


async def prove_through(socket: Path, task):
    """The output of `task` sent to `run`'s socket (as root: damocles_ext.client refuses a
    socket in a directory of another user's, which the server takes root's connections to)."""
    with trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM) as s:
        await s.connect(str(socket))
        await s.send(dext.encode(dext.Request(1, task)))
        decoder, answers = dext.FrameDecoder(), []
        with trio.fail_after(30):
            while not answers:
                answers = decoder.receive_data(await s.recv(65536))
    return answers[0].output


async def test_run_started_with_no_thread_to_be_had_serves_once_tasks_free(uid, tmp_path, sock_dir):
    cfg = write_config(own_dir(tmp_path / "cfg", uid), plugin_block("WdPost", "echo"))
    socket = own_dir(sock_dir / "run", uid) / "control.sock"  # in a directory only root writes
    # Its process and its guardian's: no thread for reaping the guardian's double fork (which
    # took run down at its start), none for a child's runtime either.
    with tasks_held(uid, leave=2) as release:
        async with running_as(uid, cfg, socket) as (run, log):
            with trio.fail_after(30):
                line = await log.wait_for("failed start")
            # The child's own words, not a traceback of its runtime.
            assert "cannot start its threads (can't start new thread): this user" in line, line
            release()
            with trio.fail_after(60):
                await log.wait_for("ready (dext)")
            assert await prove_through(socket, make_task(7)) == echo_output(make_task(7))
            await stop(run, log)
    assert "Traceback" not in log.text(), log.text()


async def test_run_that_cannot_fork_says_which_limit_ran_out_then_proves_once_tasks_free(
    uid, tmp_path, sock_dir
):
    cfg = write_config(own_dir(tmp_path / "cfg", uid), plugin_block("WdPost", "echo"))
    socket = own_dir(sock_dir / "run", uid) / "control.sock"
    with tasks_held(uid, leave=1) as release:  # its own process only: no guardian, no child
        async with running_as(uid, cfg, socket) as (run, log):
            with trio.fail_after(30):
                guardian = await log.wait_for("cannot start the process-group guardian")
                spawn = await log.wait_for("window_post#0: cannot start")
                await log.wait_for("window_post#0: restarting in")
            release()
            for line in guardian, spawn:
                assert "(errno EAGAIN): this user or service has as many processes" in line, line
                assert "ulimit -u" in line and "TasksMax" in line, line
            with trio.fail_after(60):
                await log.wait_for("ready (dext)")
            assert await prove_through(socket, make_task(8)) == echo_output(make_task(8))
            await stop(run, log)
    assert "Traceback" not in log.text(), log.text()


async def status_through(socket: Path):
    """The StatusReply of `run` at `socket` (as root, as prove_through)."""
    from damocles_ext.protocol import control as control_protocol

    with trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM) as s:
        await s.connect(str(socket))
        await s.send(control_protocol.encode(control_protocol.StatusRequest(1)))
        decoder, replies = control_protocol.frame_decoder(), []
        with trio.fail_after(30):
            while not replies:
                replies = decoder.receive_data(await s.recv(65536))
    return replies[0]


async def test_a_status_without_a_thread_to_measure_the_children_says_why_then_is_answered(
    uid, tmp_path, sock_dir
):
    cfg = write_config(own_dir(tmp_path / "cfg", uid), plugin_block("WdPost", "echo"))
    socket = own_dir(sock_dir / "run", uid) / "control.sock"
    with tasks_held(uid, leave=1) as release:  # run's process only: no thread for a status
        async with running_as(uid, cfg, socket) as (run, log):
            reply = await status_through(socket)
            assert reply.status is None, reply
            assert reply.error.startswith("cannot measure the children for the status: cannot"
                                          " start a thread"), reply.error  # fmt: skip
            assert "ulimit -u" in reply.error and "TasksMax" in reply.error, reply.error
            with trio.fail_after(30):
                await log.wait_for("cannot measure the children for the status")
            release()
            reply = await status_through(socket)
            assert reply.error is None and reply.status["schema"] == "damocles-ext/status/1"
            await stop(run, log)
    assert "Traceback" not in log.text(), log.text()


async def http_call(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    """The status and body of a GET (a POST of `body` when given) of `url` (from this process,
    root's: not under the limit)."""

    def call() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, data=body, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return await trio.to_thread.run_sync(call)


async def test_a_coordinator_that_cannot_start_a_thread_for_a_large_body_answers_why_and_serves_on(
    uid, tmp_path
):
    url = f"sqlite:///{own_dir(tmp_path / 'svc', uid)}/jobs.db"
    argv = [*DEXT, "serve", "window_post", "--jobs", url, "--listen", "127.0.0.1:0"]
    name = "w" * (PARSE_ON_A_THREAD + 1)  # parsed on a thread of its own
    ping = b'{"jsonrpc":"2.0","method":"Venus.WorkerPing","params":[{"Name":"%s"}],"id":3}' % (
        name.encode()
    )
    async with serve_at_the_limit(uid, argv) as (m, release):  # no thread to parse a body on
        with trio.fail_after(30):
            line = await m.wait_log("serving the worker-prover RPC at")
        rpc_url = re.search(r"http://\S+", line).group(0)
        status, answer = await http_call(rpc_url, ping)
        assert status == 500, answer
        error = json.loads(answer)["error"]["message"]
        assert "cannot read this request body of" in error, error
        assert "cannot start a thread" in error and "ulimit -u" in error, error
        with trio.fail_after(30):
            said = await m.wait_log("cannot read this request body")
        assert "TasksMax" in said, said
        release()  # threads to be had again: the same request is answered
        status, answer = await http_call(rpc_url, ping)
        assert (status, json.loads(answer)) == (
            200, {"jsonrpc": "2.0", "id": 3, "result": None}
        ), answer  # fmt: skip


async def test_a_metrics_page_without_a_thread_to_build_it_is_a_503_saying_why_then_served(
    uid, tmp_path, sock_dir
):
    cfg = write_config(own_dir(tmp_path / "cfg", uid), plugin_block("WdPost", "echo"))
    socket = own_dir(sock_dir / "run", uid) / "control.sock"
    with tasks_held(uid, leave=1) as release:  # run's process only: no thread for a scrape
        async with running_as(uid, cfg, socket, "--metrics", "127.0.0.1:0") as (run, log):
            with trio.fail_after(30):
                line = await log.wait_for("metrics on ")
            url = re.search(r"http://\S+", line).group(0)
            status, page = await http_call(url)
            assert status == 503, page
            assert b"cannot build the metrics exposition: cannot start a thread" in page, page
            assert b"ulimit -u" in page, page
            with trio.fail_after(30):
                said = await log.wait_for("cannot build the metrics exposition")
            assert "TasksMax" in said, said
            release()
            status, page = await http_call(url)
            assert status == 200 and b"damocles_ext_" in page, page
            await stop(run, log)
    assert "Traceback" not in log.text(), log.text()


OBSERVED = """
import logging, trio
from damocles_ext.hookspecs import ChildInfo, hookimpl
from damocles_ext.plugins import call_observers, get_plugin_manager
from damocles_ext.supervisor.observers import Observers

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

class Plain:  # a plain function: called on a worker thread
    @hookimpl
    def dext_child_started(self, child):
        print("called")

pm = get_plugin_manager(entry_points=False)
pm.register(Plain())
child = ChildInfo("window_post", 0, "window_post#0", 1234, "0")

async def main():
    observers = Observers(pm)
    observers.open()
    observers.observe("dext_child_started", child=child)
    observers.close()
    await observers.run()  # the supervisor's observer task
    await call_observers(pm, "dext_child_started", child=child)
    print("dropped", observers.dropped)

trio.run(main)
"""


def test_an_observer_without_a_thread_misses_its_event_saying_why_and_the_supervisor_goes_on(uid):
    out, err = run_cleanly_at_the_limit(uid, OBSERVED)
    assert out == ["dropped 1"], out
    said = [line for line in err.splitlines() if "observer hook dext_child_started" in line]
    assert len(said) == 2, err  # the supervisor's task, and call_observers
    for line in said:
        assert line.startswith("WARNING"), line
        assert "cannot start a thread" in line and "ulimit -u" in line, line


LOOKED_UP = """
import trio
from damocles_ext.jobs.client import RpcClient, RpcConnectionError, local_address_towards
from damocles_ext.jobs.endpoint import parse_endpoint

async def main():
    manager = parse_endpoint("http://localhost:1789/rpc/v0")  # a name: looked up on a thread
    try:
        await local_address_towards(manager)  # a worker without --name
    except OSError as exc:
        print("name:", exc)
    try:
        await RpcClient(manager).call("Venus.WorkerPing", {})
    except RpcConnectionError as exc:
        print("call:", exc.sent, exc)

trio.run(main)
"""


def test_a_worker_that_cannot_look_its_manager_up_for_lack_of_a_thread_says_why(uid):
    name, call = run_cleanly_at_the_limit(uid, LOOKED_UP)[0]
    assert name.startswith("name: [Errno 11] cannot look localhost up: cannot start a"), name
    assert call.startswith(
        "call: False cannot connect to http://localhost:1789/rpc/v0 (for Venus.WorkerPing):"
        " cannot look localhost up: cannot start a thread"
    ), call
    for line in name, call:
        assert "ulimit -u" in line and "TasksMax" in line, line


WATCHED = """
import sys, trio
from damocles_ext.frontends.producer import JobProducer
from damocles_ext.jobs.paths import StoreMap
from damocles_ext.jobs.store import JobStore, TrioJobStore

store = JobStore.open(sys.argv[1])
store.list_jobs()  # its first connection: its file is watched from now on
producer = JobProducer(
    TrioJobStore(store), StoreMap({}), deadline_after=None, file_check_every=0.01
)

async def main():
    with trio.move_on_after(0.5):  # checks every 10 ms: a few dozen without a thread
        await producer.watch_store_file()
    print("watching on")

trio.run(main)
"""


def test_an_idle_serves_store_file_check_without_a_thread_skips_that_check(uid, tmp_path):
    # serve --jobs checks its SQLite file every 10 s on a thread: without one, the check is
    # skipped (the next one looks), not an error that ends serve.
    store = own_dir(tmp_path / "svc", uid) / "jobs.db"
    url = repr(f"sqlite:///{store}")
    out, _ = run_cleanly_at_the_limit(uid, WATCHED.replace("sys.argv[1]", url))
    assert out == ["watching on"], out


LISTENED = """
import trio
from damocles_ext.jobs.notify import JobListener

listener = JobListener("postgresql://127.0.0.1:1/jobs", lambda job: None)

async def main():
    with trio.move_on_after(2):  # tries again after 0.5 s, then 1 s: still no thread
        await listener.run()
    print("polling on")

trio.run(main)
"""


def test_a_notification_listener_without_a_thread_says_why_and_polling_goes_on(uid):
    # serve --jobs on PostgreSQL listens for job changes on a thread of its own: without one,
    # it says so and tries again later (polling finds the results meanwhile), not an error that
    # ends serve.
    out, err = run_cleanly_at_the_limit(uid, LISTENED)
    assert out == ["polling on"], out
    said = [line for line in err.splitlines() if "notification listener" in line]
    assert len(said) >= 2 and all("cannot start a thread" in line for line in said), said
    assert "ulimit -u" in said[0] and "polling goes on, trying again in 0.5s" in said[0], said


LOOKED_AT = """
from types import SimpleNamespace
import trio
from damocles_ext.frontends.worker_sectors import store_problem
from damocles_ext.sectors.files import check_locations
from damocles_ext.sectors.model import SectorLocation, SectorProviderError, SectorRef
from damocles_ext.sectors.providers import StoreScan

async def main():
    limiter = trio.CapacityLimiter(1)
    location = SectorLocation("/mnt/a/sealed/s-t01000-5", "/mnt/a/cache/s-t01000-5")
    print("check:", (await check_locations([location], limiter=limiter, timeout=5))[0])
    job = SimpleNamespace(Id="j1")
    print("store:", await store_problem(job, [(location.sealed_file, location.cache_dir)], {}))
    try:
        await StoreScan({"a": "/mnt/a"}).find(SectorRef(1000, 5))
    except SectorProviderError as exc:
        print("scan:", exc)

trio.run(main)
"""


def test_sector_file_checks_and_the_store_scan_without_a_thread_say_why(uid):
    # A worker's sector checks and a scan of the stores run on threads: without one, each says
    # what ran out, as a storage that did not answer does (before: a RuntimeError escaped).
    check, store, scan = run_cleanly_at_the_limit(uid, LOOKED_AT)[0]
    # A worker's look at a job's store directories: the job is not proved here (before, the
    # error ended the worker's job task, and with it the worker).
    assert store.startswith("store: job j1: cannot look at /mnt/a/cache: cannot start a"), store
    assert check.startswith("check: /mnt/a/sealed/s-t01000-5: cannot start a thread"), check
    assert scan.startswith("scan: sector 5 of miner 1000: scanning the stores: cannot start a"), (
        scan
    )
    assert "ulimit -u" in check and "ulimit -u" in scan


SUMMED = """
import logging, sys
from prometheus_client import generate_latest
from damocles_ext.jobs.metrics import JobMetrics
from damocles_ext.jobs.store import JobStore

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
metrics = JobMetrics(JobStore.open(sys.argv[1]))
page = generate_latest(metrics.registry).decode()  # on this thread: only the query needs one
print([line for line in page.splitlines() if line.startswith("damocles_ext_jobs_store_up")])
"""


def test_the_job_store_gauges_without_a_thread_for_their_query_say_what_ran_out(uid, tmp_path):
    store = own_dir(tmp_path / "svc", uid) / "jobs.db"
    url = repr(f"sqlite:///{store}")
    out, err = run_cleanly_at_the_limit(uid, SUMMED.replace("sys.argv[1]", url))
    assert out == ["['damocles_ext_jobs_store_up 0.0']"], out
    (said,) = [line for line in err.splitlines() if "summary for the metrics failed" in line]
    assert said.startswith("WARNING"), said
    assert "cannot start a thread" in said and "ulimit -u" in said and "TasksMax" in said, said


PRODUCED = """
import trio
from damocles_ext.api import open_job_producer
from damocles_ext.jobs.store import StoreUnavailable

async def main():
    try:
        async with open_job_producer(sys.argv[1]):
            print("opened")
    except StoreUnavailable as exc:
        print("store:", exc)

trio.run(main)
"""


def test_the_python_apis_job_producer_without_a_thread_to_open_its_store_says_why(uid, tmp_path):
    store = own_dir(tmp_path / "svc", uid) / "jobs.db"
    url = f"sqlite:///{store}"
    ((said,), _) = run_cleanly_at_the_limit(uid, PRODUCED.replace("sys.argv[1]", repr(url)))
    assert said.startswith(f"store: job store {url}: cannot start a thread"), said
    assert "ulimit -u" in said and "TasksMax" in said, said
