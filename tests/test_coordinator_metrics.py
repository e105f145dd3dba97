"""The coordinator's Prometheus metrics: counters from what its workers and sweeps do, gauges from
the store's summary at scrape time, scraped over real HTTP; a store that fails or hangs is
`damocles_ext_jobs_store_up 0` while the coordinator keeps serving."""

from __future__ import annotations

import logging
import signal
import socket
import sqlite3
import subprocess

import pytest
import trio
from helpers.frontend import DEXT, CoordinatorProcess, dext_env, dext_run_async
from sqlalchemy import make_url
from test_coordinator import Client
from test_jobs_rules import make_input
from test_metrics import scrape, value

from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
from damocles_ext.jobs import summary
from damocles_ext.jobs.metrics import JobMetrics
from damocles_ext.jobs.pings import PausedWorkers
from damocles_ext.jobs.store import JobStore, TrioJobStore
from damocles_ext.metrics import MetricsServer

T0 = 1_700_000_000.0
PROOF = "StackedDrgWindow2KiBV1_2"
PROOF_OUT = {"proofs": ["AAEC"], "faults": []}  # a finish with a proof: a success
P = "damocles_ext_"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def start(nursery: trio.Nursery, store: JobStore, clock: Clock, **kw):
    paused = PausedWorkers(clock)  # as the command shares them
    metrics = JobMetrics(store, clock=clock, process_metrics=False, paused_workers=paused, **kw)
    coordinator = Coordinator(TrioJobStore(store, clock=clock), observe=metrics.observe,
                              paused_workers=paused)  # fmt: skip
    server = CoordinatorServer(coordinator, "127.0.0.1", 0)
    metrics_server = MetricsServer(metrics, "127.0.0.1", 0)
    await nursery.start(server.serve)
    await nursery.start(metrics_server.serve)
    client = Client(await trio.open_tcp_stream("127.0.0.1", server.port))
    return coordinator, client, metrics_server, metrics


async def test_the_coordinators_metrics_count_its_workers_and_sweeps_and_read_the_store(tmp_path):
    clock = Clock()
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as store:
        jobs = TrioJobStore(store, clock=clock)
        ok, _ = await jobs.create(make_input(seed=1, miner=1000, proof_type=PROOF))
        silent, _ = await jobs.create(make_input(seed=2, miner=1000, proof_type=PROOF))
        late, _ = await jobs.create(make_input(seed=3, miner=1000, proof_type=PROOF),
                                    not_after=T0 + 30)  # fmt: skip
        await jobs.create(make_input(seed=4, miner=2000, proof_type=PROOF))
        async with trio.open_nursery() as nursery:
            coordinator, client, metrics_server, _ = await start(nursery, store, clock)
            spec = {"AllowedMiners": [1000], "AllowedProofTypes": [PROOF]}
            _, answer = await client.call("Venus.WdPoStAllocateJobs", spec, 3, "worker-a")
            assert {j["Id"] for j in answer["result"]} == {ok.Id, silent.Id, late.Id}
            _, answer = await client.call("Venus.WdPoStFinishJob", ok.Id, PROOF_OUT, "")
            assert answer["result"] is None
            _, answer = await client.call("Venus.WdPoStFinishJob", "nope", None, "")
            assert answer["error"]["code"] == 1
            clock.now += 60  # worker-a is silent past the heartbeat timeout and the deadline
            await nursery.start(coordinator.sweep_forever)  # started after its first pass
            # worker-a's finish for its timed-out job comes too late: refused.
            _, answer = await client.call("Venus.WdPoStFinishJob", silent.Id, None, "")
            assert "not running" in answer["error"]["message"]
            got = await scrape(metrics_server.url)
            assert value(got, P + "job_allocations_total") == 3
            assert value(got, P + "job_heartbeat_timeouts_total") == 1
            assert value(got, P + "job_retries_total") == 1
            assert value(got, P + "job_cancellations_total") == 1
            assert value(got, P + "job_finishes_total", result="ok") == 1
            assert value(got, P + "job_refusals_total", event="finish") == 2
            assert value(got, P + "job_refusals_total", event="heartbeat") == 0
            # The store, read at the scrape: the retried job and miner 2000's wait; worker-a
            # (seen 60 s ago) only takes miner 1000's.
            assert value(got, P + "jobs_store_up") == 1
            assert value(got, P + "jobs", state="ready2run") == 2
            assert value(got, P + "jobs", state="finished-ok") == 1
            assert value(got, P + "jobs", state="cancelled") == 1
            assert value(got, P + "jobs", state="running") == 0
            assert value(got, P + "jobs_unallocatable") == 1
            assert value(got, P + "job_workers_live") == 1
            assert value(got, P + "jobs_oldest_ready_seconds") == 60
            clock.now += 600  # nobody heard from since: both ready jobs have no live worker
            got = await scrape(metrics_server.url)
            assert value(got, P + "job_workers_live") == 0
            assert value(got, P + "jobs_unallocatable") == 2
            # worker-a's ping (damocles' WorkerInfo) says it is alive again.
            _, answer = await client.call("Venus.WorkerPing", {"Name": "worker-a", "Dest": "x"})
            assert answer["result"] is None
            got = await scrape(metrics_server.url)
            assert value(got, P + "job_workers_live") == 1
            assert value(got, P + "jobs_unallocatable") == 1
            nursery.cancel_scope.cancel()


async def test_a_store_gone_is_up_0_and_the_coordinator_keeps_serving(postgres_server):
    url = postgres_server.create_database()
    database = make_url(url).database
    clock = Clock()
    with JobStore.open(url) as store:
        await TrioJobStore(store, clock=clock).create(make_input(seed=1))
        async with trio.open_nursery() as nursery:
            _, client, metrics_server, _ = await start(nursery, store, clock)
            assert value(await scrape(metrics_server.url), P + "jobs_store_up") == 1
            postgres_server.drop_database(url)  # with the sessions on it, on any version
            got = await scrape(metrics_server.url)
            assert value(got, P + "jobs_store_up") == 0
            assert value(got, P + "jobs", state="ready2run") is None  # no stale levels
            assert value(got, P + "job_allocations_total") == 0  # the counters are still there
            # The RPC answers, with the store's error, and the metrics port still serves.
            status, answer = await client.call("Venus.WdPoStAllJobs")
            message = answer["error"]["message"]
            assert status == 200 and "job store" in message
            assert (
                "refused the login" in message
                and f'database "{database}" does not exist' in message
            )
            assert value(await scrape(metrics_server.url), P + "jobs_store_up") == 0
            nursery.cancel_scope.cancel()


async def test_a_store_that_does_not_answer_in_time_is_up_0_without_holding_the_scrape(tmp_path):
    path = tmp_path / "jobs.db"
    clock = Clock()
    with JobStore.open(f"sqlite:///{path}", busy_timeout=120) as store:
        await TrioJobStore(store, clock=clock).create(make_input(seed=1))
        async with trio.open_nursery() as nursery:
            _, _, metrics_server, metrics = await start(nursery, store, clock, query_timeout=0.5)
            locker = sqlite3.connect(path, isolation_level=None)
            try:
                locker.execute("BEGIN EXCLUSIVE")  # another process holding the store
                got = await scrape(metrics_server.url)
                assert value(got, P + "jobs_store_up") == 0
                # The first query still waits for the lock: the next scrape starts no other.
                first = metrics.collector._pending
                got = await scrape(metrics_server.url)
                assert value(got, P + "jobs_store_up") == 0
                assert metrics.collector._pending is first and first.is_alive()
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            await trio.to_thread.run_sync(first.join, 60)
            got = await scrape(metrics_server.url)
            assert value(got, P + "jobs_store_up") == 1
            assert value(got, P + "jobs", state="ready2run") == 1
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("metrics_host", ["127.0.0.1", "0.0.0.0"])
async def test_metrics_on_the_rpcs_own_port_say_so_not_that_the_address_is_in_use(
    tmp_path, metrics_host
):
    url = f"sqlite:///{tmp_path}/jobs.db"
    with socket.socket() as probe:  # a port free now, for both options
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = await dext_run_async("coordinator", "--jobs", url, "--listen", f"127.0.0.1:{port}",
                                "--metrics", f"{metrics_host}:{port}")  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err, err
    assert f"cannot serve metrics on {metrics_host}:{port}: Address already in use" in err, err
    assert "it is the port --listen serves the RPC on; give the metrics a port of their own" in err


async def test_metrics_on_the_same_port_of_another_address_family_are_served(tmp_path):
    # 0.0.0.0 takes IPv4's addresses only: the IPv6 loopback's same port is another address.
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    coordinator = CoordinatorProcess(f"sqlite:///{tmp_path}/jobs.db", "--metrics", f"[::1]:{port}")
    async with trio.open_nursery() as nursery:
        try:
            with trio.fail_after(60):
                await coordinator.start(nursery, port, host="0.0.0.0")
                got = await scrape(f"http://[::1]:{port}/metrics")
                assert value(got, P + "jobs_store_up") == 1
        finally:
            coordinator.stop()


async def test_the_command_serves_metrics_and_refuses_a_busy_metrics_port(tmp_path):
    url = f"sqlite:///{tmp_path}/jobs.db"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = await dext_run_async("coordinator", "--jobs", url, "--listen", "127.0.0.1:0",
                                    "--metrics", f"127.0.0.1:{port}")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert b"--metrics" in done.stderr and b"Traceback" not in done.stderr
    proc = await trio.lowlevel.open_process(
        [
            *DEXT,
            "coordinator",
            "--jobs",
            url,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        env=dext_env(),
    )
    assert proc.stderr is not None
    seen = b""
    try:
        with trio.fail_after(60):
            while b"serving the worker-prover RPC at" not in seen:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, seen
                seen += chunk
            metrics_url = seen.split(b"metrics on ", 1)[1].split()[0].decode()
            got = await scrape(metrics_url)
            assert value(got, P + "jobs_store_up") == 1
            assert value(got, P + "jobs", state="ready2run") == 0
            assert value(got, P + "job_allocations_total") == 0
            assert any(name == "process_cpu_seconds_total" for name, _ in got)
            proc.send_signal(signal.SIGTERM)
            while chunk := await proc.stderr.receive_some(4096):
                seen += chunk
            assert await proc.wait() == 0, seen
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"Traceback" not in seen


@pytest.mark.parametrize("bad", ["nonsense:port", "127.0.0.1:99999"])
async def test_a_bad_metrics_address_exits_2(tmp_path, bad):
    done = await dext_run_async("coordinator", "--jobs", f"sqlite:///{tmp_path}/j.db",
                                "--metrics", bad)  # fmt: skip
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"--metrics" in done.stderr


def summary_of(paused: int, threads: int = 2) -> dict:
    """damocles-worker's WorkerInfoSummary, its keys as a Go client may spell them."""
    return {"threads": threads, "empty": threads - paused, "paused": paused, "running": 0,
            "waiting": 0, "errors": 0}  # fmt: skip


def paused_in_store(store: JobStore, now: float) -> tuple[int | None, dict[str, tuple]]:
    """The store's summary of the pauses: (paused workers, {live worker: (paused, slots)})."""
    s = store.summary(now)
    return s.paused_workers, {w.worker: (w.paused_slots, w.slots) for w in s.workers}


async def test_a_live_worker_whose_ping_says_paused_is_shown_paused(tmp_path, caplog):
    # A worker (ours after prover failures, a damocles-worker an operator paused) that says
    # in its ping that its slots are Paused takes no job on them: before, the coordinator read
    # its Name only and showed it live like any other, nothing saying it is paused.
    caplog.set_level(logging.INFO, "damocles_ext.coordinator")
    clock = Clock()
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as store:
        async with trio.open_nursery() as nursery:
            _, client, metrics_server, _ = await start(nursery, store, clock)
            spec = {"AllowedMiners": [], "AllowedProofTypes": []}
            for worker in ("worker-a", "worker-b"):  # both asked for jobs: known, live
                await client.call("Venus.WdPoStAllocateJobs", spec, 1, worker)

            async def ping(name: str, **more) -> None:
                _, answer = await client.call("Venus.WorkerPing", {"Name": name, **more})
                assert answer == {"jsonrpc": "2.0", "id": answer["id"], "result": None}, answer

            await ping("worker-a", Dest="10.0.0.1:0", summary=summary_of(2))
            # worker-b's Summary is absent or malformed: never a failed ping, never paused.
            for broken in ("x", None, {"Paused": -1}, {"Paused": "2"}, {"Paused": True}, [1]):
                await ping("worker-b", Summary=broken)
            await ping("worker-b")
            # A sealing worker pinging: paused, but never asked for jobs, so not live.
            await ping("sealer", Summary=summary_of(3, threads=3))
            got = await scrape(metrics_server.url)
            assert value(got, P + "job_workers_live") == 2
            assert value(got, P + "job_workers_paused") == 1
            # And in the store, for `status --jobs` (which reads the store, not us).
            assert paused_in_store(store, clock.now) == (
                1,
                {"worker-a": (2, 2), "worker-b": (0, 0)},
            )
            assert "worker-a  any     any          0s ago     2 of 2 slots" in summary.render(
                store.summary(clock.now)
            )
            clock.now += 600  # no ping since: neither live nor paused any more
            got = await scrape(metrics_server.url)
            assert value(got, P + "job_workers_paused") == 0
            assert paused_in_store(store, clock.now) == (0, {})
            await ping("worker-a", Summary=summary_of(1))
            await ping("worker-a", Summary=summary_of(2))  # (one line while it lasts)
            got = await scrape(metrics_server.url)
            assert value(got, P + "job_workers_live") == 1
            assert value(got, P + "job_workers_paused") == 1
            assert paused_in_store(store, clock.now) == (1, {"worker-a": (2, 2)})
            await ping("worker-a", Summary=summary_of(0))
            got = await scrape(metrics_server.url)
            assert value(got, P + "job_workers_paused") == 0
            assert paused_in_store(store, clock.now) == (0, {"worker-a": (0, 2)})
            nursery.cancel_scope.cancel()
    said = [r.getMessage() for r in caplog.records if "worker-a says" in r.getMessage()]
    then = "(its Venus.WorkerPing): it takes no job on them until it says otherwise; see its log"
    assert said == [
        f"worker worker-a says 2 of its 2 job slots are paused {then} or status",
        f"worker worker-a says 1 of its 2 job slots are paused {then} or status",
        "worker worker-a says no job slot is paused any more (its Venus.WorkerPing)",
    ], said
    assert not [r for r in caplog.records if "worker-b" in r.getMessage()]


async def test_the_dext_methods_are_counted_as_the_venus_ones_are(tmp_path):
    clock = Clock()
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as store:
        jobs = TrioJobStore(store, clock=clock)
        for seed in (1, 2):
            await jobs.create(make_input(seed=seed, miner=1000, proof_type=PROOF))
        async with trio.open_nursery() as nursery:
            _, client, metrics_server, _ = await start(nursery, store, clock)
            spec = {"AllowedMiners": [], "AllowedProofTypes": []}
            _, answer = await client.call("Dext.AllocateJobs", spec, 2, "worker-b")
            first, second = answer["result"]
            _, answer = await client.call(
                "Dext.HeartbeatJobs", [{"Id": first["Id"], "Lease": "not-the-lease"}], "worker-b"
            )
            assert [stop["Id"] for stop in answer["result"]] == [first["Id"]]
            _, answer = await client.call(
                "Dext.FinishJob", second["Id"], second["Lease"], PROOF_OUT, ""
            )
            assert answer["result"] is None
            _, answer = await client.call("Dext.FinishJob", first["Id"], "not-the-lease", None, "")
            assert answer["error"]["code"] == 2
            got = await scrape(metrics_server.url)
            assert value(got, P + "job_allocations_total") == 2
            assert value(got, P + "job_finishes_total", result="ok") == 1
            assert value(got, P + "job_refusals_total", event="heartbeat") == 1
            assert value(got, P + "job_refusals_total", event="finish") == 1
            nursery.cancel_scope.cancel()
