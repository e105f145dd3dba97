"""The worker's control socket and metrics: `damocles-ext status` (the real CLI) over the socket of
a worker that holds a job, and Prometheus scrapes after a finished job and after a lost lease;
against a real coordinator over HTTP, real children."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import trio
from helpers.frontend import (
    DEXT,
    dext_env,
    dext_run_async,
    empty_store,
    make_task,
    plugin_block,
    write_config,
)
from test_worker import Rig, children, job_input

from damocles_ext.client import connect
from damocles_ext.errors import UsageError
from damocles_ext.frontends.control_socket import bind_control_socket
from damocles_ext.frontends.worker import Worker
from damocles_ext.frontends.worker_control import WorkerMetrics, run_worker
from damocles_ext.jobs.worker_status import WorkerJobStatus, WorkerPart, render_worker
from damocles_ext.metrics import MetricsServer, SupervisorMetrics
from damocles_ext.plugins import get_plugin_manager
from damocles_ext.protocol import jsonl

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


@pytest.fixture
def rig(tmp_path):
    r = Rig(f"sqlite:///{tmp_path}/jobs.db")
    yield r
    r.close()


class Served:
    """A worker run by run_worker with a control socket and a metrics port."""

    def __init__(self, rig: Rig, tmp_path, kids, **settings) -> None:
        pm = get_plugin_manager()
        self.metrics = SupervisorMetrics(process_metrics=False)
        self.worker = Worker(
            rig.settings(kids, **settings), plugin_manager=pm,
            supervisor_options={"inline_observers": [self.metrics]},  # as the command does
        )  # fmt: skip
        self.path = str(tmp_path / "w.sock")
        self.sock = bind_control_socket(self.path)
        WorkerMetrics(self.worker, self.metrics.registry)
        self.server = MetricsServer(self.metrics, "127.0.0.1", 0)
        self.started = trio.Event()
        self.ended = trio.Event()

    async def run(self) -> None:
        try:
            await run_worker(
                self.worker, sock=self.sock, limits={}, metrics=self.metrics,
                metrics_server=self.server, on_started=self.started.set,
            )  # fmt: skip
        finally:
            self.server.close()
            self.ended.set()

    async def scrape(self) -> str:
        def get() -> str:
            with urllib.request.urlopen(self.server.url, timeout=30) as answer:
                return answer.read().decode()

        return await trio.to_thread.run_sync(get)

    async def status(self, *options: str) -> str:
        done = await trio.run_process(
            [*DEXT, "status", "--socket", self.path, *options],
            capture_stdout=True, capture_stderr=True, env=dext_env(), check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    async def stop(self) -> None:
        self.worker.stop()
        await self.ended.wait()


@contextlib.asynccontextmanager
async def serving(rig: Rig, served: Served):
    """The rig's coordinator and the served worker, for a minute at most; the worker stopped at
    the end of the body."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            nursery.start_soon(served.run)
            await served.started.wait()
            yield served.worker
            await served.stop()
            nursery.cancel_scope.cancel()


async def test_status_over_the_socket_shows_the_held_job_and_a_scrape_counts_the_lost_lease(
    rig, tmp_path
):
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=60, progress_interval=0.05))
    served = Served(rig, tmp_path, kids, shutdown_grace=0.2)
    job, _ = await rig.jobs.create(job_input(miner=1000))
    async with serving(rig, served) as worker:
        await worker.wait_for(
            lambda: job.Id in worker.held and worker.held[job.Id].last_heartbeat is not None
        )
        doc = json.loads(await served.status("--json"))
        table = await served.status()
        await rig.jobs.remove(job.Id)
        await worker.wait_for(lambda: worker.counters.stopped == 1)
        scraped = await served.scrape()
    part = doc["worker"]
    assert part["name"] == "gpu-1" and part["manager"] == f"http://127.0.0.1:{rig.port}/rpc/v0"
    assert part["api"] == "Dext" and part["pulled"] == 1
    [held] = part["jobs"]
    assert held["id"] == job.Id and held["miner"] == 1000 and held["state"] == "proving"
    assert held["lease"] == "leased" and held["heartbeat_age"] is not None
    assert held["elapsed"] >= 0 and held["sectors"] == 1
    assert held["child"] == "window_post#0"
    assert [c["name"] for c in doc["children"]] == ["window_post#0"]
    assert f"worker gpu-1 pulls from http://127.0.0.1:{rig.port}/rpc/v0 (Dext)" in table
    assert job.Id in table and "leased" in table and "proving" in table
    assert 'damocles_ext_worker_leases_lost_total{reason="removed"} 1.0' in scraped
    for reason in ("cancelled", "lease_lost", "reset", "timed_out", "finished", "not_running",
                   "other"):  # fmt: skip
        assert f'damocles_ext_worker_leases_lost_total{{reason="{reason}"}} 0.0' in scraped
    assert "damocles_ext_worker_jobs_pulled_total 1.0" in scraped
    assert "damocles_ext_worker_jobs_finished_total 0.0" in scraped
    count = next(
        line for line in scraped.splitlines()
        if line.startswith("damocles_ext_worker_heartbeat_seconds_count")
    )  # fmt: skip
    assert float(count.split()[-1]) >= 1


async def test_status_shows_the_child_proving_each_job_and_the_new_one_after_a_retry(rig, tmp_path):
    kids = children(
        tmp_path, plugin_block("WdPost", "sleep", seconds=60, progress_interval=0.05) * 2
    )
    served = Served(rig, tmp_path, kids, shutdown_grace=0.2)
    job, _ = await rig.jobs.create(job_input())
    async with serving(rig, served) as worker:
        await worker.wait_for(lambda: job.Id in worker.held and worker.held[job.Id].child)
        [first] = json.loads(await served.status("--json"))["worker"]["jobs"]
        # Its child dies: the supervisor retries the request on the other one.
        [proving] = [c for c in worker.supervisor.statistics().children if c.name == first["child"]]
        os.kill(proving.pid, signal.SIGKILL)
        await worker.wait_for(lambda: worker.held[job.Id].child not in (None, first["child"]))
        [second] = json.loads(await served.status("--json"))["worker"]["jobs"]
        table = await served.status()
    names = {"window_post#0", "window_post#1"}
    assert first["id"] == second["id"] == job.Id and first["child"] in names
    assert second["child"] == (names - {first["child"]}).pop()
    [row] = [line for line in table.splitlines() if line.startswith(job.Id)]
    assert second["child"] in row.split()


async def test_a_scrape_after_a_pulled_and_finished_job_counts_it(rig, tmp_path):
    served = Served(rig, tmp_path, children(tmp_path, plugin_block("WdPost", "echo")))
    await rig.jobs.create(job_input())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            nursery.start_soon(served.run)
            await served.started.wait()
            await served.worker.wait_for(lambda: served.worker.counters.delivered == 1)
            scraped = await served.scrape()
            doc = json.loads(await served.status("--json"))
            await served.stop()
            nursery.cancel_scope.cancel()
    for line in (
        "damocles_ext_worker_jobs_pulled_total 1.0",
        "damocles_ext_worker_jobs_finished_total 1.0",
        "damocles_ext_worker_jobs_failed_total 0.0",
        "damocles_ext_worker_finish_retries_total 0.0",
        "damocles_ext_worker_manager_reachable 1.0",
        # The supervisor's own metrics are on the same port.
        'damocles_ext_requests_total{outcome="ok",stage="window_post"} 1.0',
    ):
        assert line in scraped, line
    allocations = next(
        line for line in scraped.splitlines()
        if line.startswith("damocles_ext_worker_allocations_total")
    )  # fmt: skip
    assert float(allocations.split()[-1]) >= 1
    assert doc["worker"]["delivered"] == 1 and doc["worker"]["jobs"] == []


async def test_a_worker_paused_by_prover_failures_says_so_in_its_metrics_and_status(rig, tmp_path):
    # After 3 proofs failed in a row it takes no job for 30 s: before, only a log line said so,
    # and its metrics (manager reachable, no job held) and status looked like an idle worker's.
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0, fail="always"))
    # The jobs are created once the worker runs (its metrics scraped before any failure): it
    # may have asked for jobs before there were any, and it asks again after idle_poll (600 s
    # in these tests: the test timed out when it did).
    served = Served(rig, tmp_path, kids, shutdown_grace=0.2, idle_poll=0.05)
    async with serving(rig, served) as worker:
        before = await served.scrape()
        for seed in range(5):
            await rig.jobs.create(job_input(seed=seed))
        await worker.wait_for(lambda: worker.counters.pauses == 1 and not worker.held)
        began = time.time()
        scraped = await served.scrape()
        doc = json.loads(await served.status("--json"))
        table = await served.status()
    for reason in ("prover_failures", "unproved_jobs"):  # there from the start, at 0
        assert f'damocles_ext_worker_pauses_total{{reason="{reason}"}} 0.0' in before
    assert "damocles_ext_worker_paused_until_timestamp_seconds 0.0" in before
    assert 'damocles_ext_worker_pauses_total{reason="prover_failures"} 1.0' in scraped
    assert 'damocles_ext_worker_pauses_total{reason="unproved_jobs"} 0.0' in scraped
    [until] = [
        float(line.split()[-1]) for line in scraped.splitlines()
        if line.startswith("damocles_ext_worker_paused_until_timestamp_seconds ")
    ]  # fmt: skip
    assert began < until <= began + 30
    part = doc["worker"]
    assert part["pauses"] == 1 and part["paused_reason"] == "prover_failures"
    assert abs(part["paused_until"] - until) < 1e-3 and 0 < part["paused_for"] <= 30
    assert part["paused_why"].startswith("3 proofs failed here in a row (last: request 3 ")
    assert part["paused_why"].endswith("taking no job for 30 s, so that other workers take them")
    [paused] = [line for line in table.splitlines() if line.startswith("PAUSED")]
    assert re.match(r"PAUSED until \d\d:\d\d:\d\d \(in \d+s\): 3 proofs failed here", paused), (
        paused
    )
    assert table.index("worker gpu-1 pulls from") < table.index("PAUSED")


def test_the_worker_part_renders_one_row_per_job():
    job = WorkerJobStatus(
        id="j1", miner=1000, deadline_idx=3, partitions=[0, 1], sectors=5, try_num=1,
        state="finishing", child=None, elapsed=75.0, heartbeat_age=2.0,
        lease="stopped: removed: gone", delivery_failures=1,
    )  # fmt: skip
    part = WorkerPart(
        manager="http://m:1789/rpc/v0", name="w", api="Venus", manager_reachable=False,
        max_jobs=2, pulled=3, delivered=2, failed=0, stopped=1, given_up=0, jobs=[job],
    )  # fmt: skip
    lines = render_worker(part, lambda s: "-" if s is None else f"{s:g}s")
    assert "(Venus, UNREACHABLE)" in lines[1] and "at most 2 at once" in lines[1]
    assert lines[2].split()[:3] == ["JOB", "MINER", "DDL"]
    assert lines[3].split()[:6] == ["j1", "1000", "3", "0,1", "5", "1"]
    assert "2s ago" in lines[3] and lines[3].endswith("stopped: removed: gone")


async def test_serve_connect_to_a_workers_socket_exits_2_before_the_ready_line(rig, tmp_path):
    # A worker's socket answers status (with its window_post children) but refuses every
    # request: serve --connect given it by mistake must fail damocles-manager's start, not
    # say ready and then fail each request.
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    served = Served(rig, tmp_path, kids)
    async with serving(rig, served):
        result = await dext_run_async("serve", "window_post", "--connect", served.path)
    err = result.stderr.decode()
    assert result.returncode == 2 and result.stdout == b"", err
    assert f"{served.path} is the control socket of a `damocles-ext worker`" in err, err
    assert "--socket path of a `damocles-ext run`" in err and "Traceback" not in err, err


async def test_many_proof_requests_to_a_workers_socket_are_each_refused_but_logged_few_times(
    rig, tmp_path, caplog
):
    # Each is answered (the client reads why), but a client sent here by mistake no longer
    # floods the worker's log with a warning per request: the refusals' log is throttled.
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    served = Served(rig, tmp_path, kids)
    caplog.set_level(logging.INFO, "damocles_ext")
    refused: list[str] = []

    async def send(client, miner: int) -> None:
        # A usage error, said by the answer (Response.kind): the client's socket is wrong.
        with pytest.raises(UsageError, match="answers status only") as info:
            await client.submit(make_task(miner))
        refused.append(str(info.value))

    async with (
        serving(rig, served),
        connect(served.path) as client,
        trio.open_nursery() as requests,
    ):
        for miner in range(1, 101):
            requests.start_soon(send, client, miner)
    assert len(refused) == 100
    logged = [r for r in caplog.records if "control socket" in r.getMessage()
              and r.levelno >= logging.WARNING]  # fmt: skip
    # One, and one more if the 100 took over the throttle's 10 s.
    assert 1 <= len(logged) <= 2, [r.getMessage() for r in logged]
    assert "proof request to the worker's control socket" in logged[0].getMessage()


async def test_a_worker_waiting_for_its_unreachable_manager_at_start_serves_metrics_and_status(
    rig, tmp_path
):
    # Its metrics used to start only once the manager had answered: a worker stuck at start
    # showed nothing on the dashboard, not even that its manager was unreachable. And its socket
    # was bound at start but answered only once the manager had: `status` waited out its
    # timeout, then said the worker might be stopped (SIGSTOP) or stuck.
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    rig.server.close()  # nothing answers at the worker's manager address
    served = Served(rig, tmp_path, kids)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(served.run)
            await served.worker.wait_for(lambda: not served.worker.manager_reachable)
            scraped = await served.scrape()
            done = await trio.run_process(
                [*DEXT, "status", "--socket", served.path, "--timeout", "5s"],
                capture_stdout=True, capture_stderr=True, env=dext_env(), check=False,
            )  # fmt: skip
            await served.stop()
    assert "damocles_ext_worker_manager_reachable 0.0" in scraped
    assert "damocles_ext_child_state" not in scraped  # no supervisor yet: no children
    err = done.stderr.decode()
    assert done.returncode == 1 and done.stdout == b"", err
    assert (
        "the worker has not started its children yet: it waits for its manager at"
        f" http://127.0.0.1:{rig.port}/rpc/v0, which has not answered so far (its log says why)"
    ) in err, err
    assert "did not answer within" not in err and "Traceback" not in err, err
    assert not served.started.is_set()


def test_a_managers_own_stop_reasons_count_under_one_label_not_one_each():
    # A label per text would grow the worker's metrics for as long as a manager made new ones
    # (a reason naming its job, say).
    from damocles_ext.frontends.worker_state import WorkerCounters

    counters = WorkerCounters()
    for i in range(1000):
        counters.count_stop(f"moved to miner f0{i}")
    counters.count_stop("removed")
    counters.count_stop("not_running")
    assert counters.stopped_by == {"other": 1000, "removed": 1, "not_running": 1}
    assert counters.stopped == 1002


@pytest.mark.parametrize("manager", ["silent", "refusing"])
async def test_prove_and_serve_at_the_socket_of_a_worker_still_waiting_for_its_manager_exit_2(
    tmp_path, manager
):
    # Before its manager answers, a worker's socket answers status with why it has no document
    # yet: prove --socket then exited 1 (a prover's failure) and serve --connect said its ready
    # line, as neither could tell a worker's socket from that answer.
    with socket.socket() as peer:
        peer.bind(("127.0.0.1", 0))
        if manager == "silent":
            peer.listen()  # takes the connection, never answers; "refusing": nobody listens
        cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
        sock = str(tmp_path / "w.sock")
        task = tmp_path / "task.json"
        task.write_bytes(jsonl.task_to_json(make_task()))
        proc = await trio.lowlevel.open_process(
            [*DEXT, "worker", "--manager", f"127.0.0.1:{peer.getsockname()[1]}", "-c", str(cfg),
             "--attached", f"store-a={empty_store()}", "--socket", sock],
            env=dext_env(), stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        seen = b""
        with trio.fail_after(60):
            while b"control socket listening on" not in seen:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, seen.decode()
                seen += chunk
            status = await dext_run_async("status", "--socket", sock)
            prove = await dext_run_async(
                "prove", "window_post", "--request", str(task), "--socket", sock
            )
            serve = await dext_run_async("serve", "window_post", "--connect", sock)
            proc.send_signal(signal.SIGTERM)
            while chunk := await proc.stderr.receive_some(4096):
                seen += chunk
            await proc.wait()
    assert "Traceback" not in seen.decode(), seen.decode()
    # status still says why there is no document (exit 1, as before)
    err = status.stderr.decode()
    assert status.returncode == 1 and "has not started its children yet" in err, err
    for result in (prove, serve):
        err = result.stderr.decode()
        assert result.returncode == 2 and result.stdout == b"", err
        assert f"{sock} is the control socket of a `damocles-ext worker`" in err, err
        assert "Traceback" not in err, err
