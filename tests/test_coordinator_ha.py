"""Two `damocles-ext coordinator` processes on one PostgreSQL database (or one SQLite file) serve the same workers,
while one of them is SIGKILLed and started again on its port: no job is ever given to two
workers, every job finishes, and the workers of the dead one carry on through the other."""

from __future__ import annotations

import base64
import logging
import re
import time
from functools import partial

import pytest
import trio
from helpers.coordinators import (
    heartbeat_forever,
    no_longer_running,
    two_jobs_with_a_quick_heartbeat_timeout,
    what_they_said,
)
from helpers.frontend import CoordinatorProcess
from test_jobs_rules import make_input

from damocles_ext.jobs.client import RpcClient, RpcConnectionError
from damocles_ext.jobs.model import FINISHED
from damocles_ext.jobs.store import JobStore, TrioJobStore
from damocles_ext.jobs.store_clock import clock_skew

JOBS = 24
WORKERS = 4  # the even ones speak our Dext.* methods, the odd ones damocles-worker's Venus.*


class Gate:
    """Where every worker waits until the test lets them on (they hold no call in flight)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrived = 0
        self.all_here = trio.Event()
        self.go = trio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.n:
            self.all_here.set()
        await self.go.wait()


class Worker:
    def __init__(self, index: int, addresses: list[str], phase: list[int]) -> None:
        self.name = f"gpu-{index}"
        self.dext = index % 2 == 0
        self.clients = [RpcClient(a, timeout=60) for a in addresses]
        self.turn = index
        self.phase = phase  # [0]: 1 before the kill, 2 while dead, 3 after the restart
        self.allocated: list[str] = []
        self.errors: list[tuple[int, int, str]] = []  # (coordinator, phase, message)
        self.served_by_restarted = 0

    async def call(self, method: str, *params: object) -> object:
        # Round robin over the coordinators; a connection error moves on to the other one.
        for _ in range(2):
            i = self.turn % 2
            self.turn += 1
            try:
                result = await self.clients[i].call(method, *params)
            except RpcConnectionError as e:
                self.errors.append((i, self.phase[0], str(e)))
                continue
            if i == 0 and self.phase[0] == 3:
                self.served_by_restarted += 1
            return result
        raise AssertionError(f"{self.name}: both coordinators failed {method}: {self.errors[-2:]}")

    async def allocate(self) -> dict | None:
        method = "Dext.AllocateJobs" if self.dext else "Venus.WdPoStAllocateJobs"
        jobs = await self.call(method, {}, 1, self.name)
        assert isinstance(jobs, list) and len(jobs) <= 1
        if not jobs:
            return None
        self.allocated.append(jobs[0]["Id"])
        return jobs[0]

    async def heartbeat(self, job: dict) -> None:
        if self.dext:
            held = [{"Id": job["Id"], "Lease": job["Lease"]}]
            assert await self.call("Dext.HeartbeatJobs", held, self.name) == []
        else:
            assert await self.call("Venus.WdPoStHeartbeatJobs", [job["Id"]], self.name) is None

    async def finish(self, job: dict) -> None:
        proof = base64.b64encode(f"{job['Id']} by {self.name}".encode()).decode()
        output = {"proofs": [proof], "faults": []}
        if self.dext:
            await self.call("Dext.FinishJob", job["Id"], job["Lease"], output, "")
        else:
            await self.call("Venus.WdPoStFinishJob", job["Id"], output, "")

    async def run(self, holding_gate: Gate, idle_gate: Gate) -> None:
        done = 0
        while True:
            if done == 3:
                await idle_gate.wait()  # no job held: the coordinator restarts meanwhile
            job = await self.allocate()
            if job is None:
                return
            await self.heartbeat(job)
            if done == 1:
                await holding_gate.wait()  # a job held: the coordinator is killed meanwhile
                await self.heartbeat(job)
            await self.finish(job)
            done += 1


@pytest.mark.slow
async def test_two_coordinators_on_one_postgresql_serve_workers_while_one_is_killed_and_restarted(
    postgres_url,
):
    await two_coordinators_serve_workers_while_one_is_killed_and_restarted(postgres_url)


@pytest.mark.slow
async def test_two_coordinators_on_one_sqlite_file_serve_workers_while_one_is_killed_and_restarted(
    tmp_path,
):
    # One machine, one file: every transaction takes SQLite's one write lock (BEGIN IMMEDIATE).
    await two_coordinators_serve_workers_while_one_is_killed_and_restarted(
        f"sqlite:///{tmp_path / 'jobs.db'}"
    )


async def two_coordinators_serve_workers_while_one_is_killed_and_restarted(url: str):
    with JobStore.open(url) as store:
        for seed in range(JOBS):
            # Created now: a coordinator's cleanup forgets finished jobs over a day old.
            store.create(make_input(miner=1000 + seed, seed=seed), time.time())
    a, b = CoordinatorProcess(url), CoordinatorProcess(url)
    phase = [1]
    holding, idle = Gate(WORKERS), Gate(WORKERS)
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as starting:  # both at once: each takes a while
                    starting.start_soon(a.start, nursery)
                    starting.start_soon(b.start, nursery)
                addresses = [f"/ip4/127.0.0.1/tcp/{a.port}", f"http://127.0.0.1:{b.port}"]
                workers = [Worker(i, addresses, phase) for i in range(WORKERS)]
                async with trio.open_nursery() as running:
                    for w in workers:
                        running.start_soon(w.run, holding, idle)
                    await holding.all_here.wait()
                    await a.kill()
                    phase[0] = 2
                    holding.go.set()
                    await idle.all_here.wait()
                    await a.start(nursery, port=a.port)  # the same port again
                    phase[0] = 3
                    idle.go.set()
                for w in workers:
                    for client in w.clients:
                        await client.aclose()
                nursery.cancel_scope.cancel()
    finally:
        a.stop()
        b.stop()

    # No job was given to two workers, and each was given once.
    allocated = [job_id for w in workers for job_id in w.allocated]
    assert sorted(allocated) == sorted(set(allocated)) and len(allocated) == JOBS
    owner = {job_id: w.name for w in workers for job_id in w.allocated}
    with JobStore.open(url, create=False) as store:
        jobs = store.list_jobs()
    assert len(jobs) == JOBS
    for job in jobs:
        assert (job.State, job.ErrorReason, job.TryNum) == (FINISHED, "", 1), job
        assert job.WorkerName == owner[job.Id]
        assert job.Output is not None
        assert job.Output.proofs == (f"{job.Id} by {owner[job.Id]}".encode(),)
    # Each worker met the dead coordinator, was told so clearly, and went on through the other;
    # the restarted one served again.
    for w in workers:
        assert w.errors, f"{w.name} never called the dead coordinator"
        for coordinator, when, message in w.errors:
            assert (coordinator, when) == (0, 2), (w.name, message)
            assert f"cannot connect to http://127.0.0.1:{a.port}/rpc/v0" in message
    assert sum(w.served_by_restarted for w in workers) > 0
    assert b"Traceback" not in a.stderr + b.stderr


async def test_a_coordinator_whose_clock_is_off_the_servers_keeps_to_the_servers_and_is_warned(
    postgres_url, caplog
):
    # Coordinators on one store stamped heartbeats with their own clocks: one 30 s ahead of the
    # server took the other coordinators' workers' jobs back 30 s early. Each keeps to the
    # server's clock, read before its first pass, and says this machine's is off.
    from damocles_ext.frontends.coordinator import Coordinator
    from damocles_ext.jobs.store import TrioJobStore

    caplog.set_level(logging.INFO, "damocles_ext.coordinator")
    offset = [30.0]
    with JobStore.open(postgres_url) as store:
        jobs = TrioJobStore(store, clock=lambda: time.time() + offset[0])
        coordinator = Coordinator(jobs)
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.sweep_forever)  # the first pass reads the clock
            nursery.cancel_scope.cancel()
        clock = coordinator.server_clock
        assert clock.reading.notice.skew is not None and 29 < clock.reading.notice.skew < 31
        assert abs(jobs.clock() - time.time()) < 1  # the server's (this test's machine's)
        (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "this machine's clock is 30.0 s ahead of the clock of the job store's" in (
            warning.getMessage()
        )
        assert "keeps to the server's clock" in warning.getMessage()
        assert "NTP" in warning.getMessage()
        # Moved onto the server's clock, 30 s back: what the hearing kept moved with it (its
        # start 30 s ahead, no job would have been taken back for 30 s).
        assert abs(coordinator.hearing.since - time.time()) < 5
        offset[0] = -0.01  # set right: said once, and the skew forgotten
        await clock.read_server()
        assert clock.reading.notice.skew is None
        assert abs(jobs.clock() - time.time()) < 1
        assert "agrees with the job store's server again" in caplog.records[-1].getMessage()


async def test_a_producer_whose_clock_is_off_the_servers_keeps_to_the_servers_and_is_warned(
    postgres_url, caplog
):
    # `serve --jobs` without a coordinator of its own gave its jobs deadlines from its clock,
    # which the coordinators and workers judge by the server's: 30 s behind, its jobs were
    # cancelled 30 s early. It reads the server's clock before it serves, and says this
    # machine's is off.
    from damocles_ext.frontends.producer import JobProducer

    caplog.set_level(logging.INFO, "damocles_ext")
    with JobStore.open(postgres_url) as store:
        behind = TrioJobStore(store, clock=lambda: time.time() - 30)
        producer = JobProducer(behind, {}, deadline_after=2400.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(producer.watch_clock)
            assert abs(producer.clock() - time.time()) < 1  # the server's (this test machine's)
            assert abs(behind.clock() - time.time()) < 1
            nursery.cancel_scope.cancel()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "this machine's clock is 30.0 s behind the clock of the job store's" in warning
    assert "this producer keeps to the server's clock" in warning, warning
    assert "so no job is cancelled early for it" in warning, warning


async def test_sqlite_has_no_server_clock_to_compare_with(tmp_path, caplog):
    from damocles_ext.frontends.coordinator import Coordinator
    from damocles_ext.jobs.store import TrioJobStore

    with JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}") as store:
        assert clock_skew(store.engine, time.time) is None
        jobs = TrioJobStore(store, clock=lambda: time.time() + 3600)
        coordinator = Coordinator(jobs)
        await coordinator.server_clock.read_server()
        assert jobs.server_offset is None  # one machine: its own clock
        assert abs(jobs.clock() - time.time() - 3600) < 1
    assert coordinator.server_clock.reading.notice.skew is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_while_one_coordinator_is_down_its_workers_that_cannot_reach_the_other_lose_their_jobs(
    postgres_url, tmp_path
):
    # Silence is judged by each coordinator from what it hears: while A is down, B hears the
    # worker that reaches B too and keeps its job, and takes back, after HeartbeatTimeout, the
    # job of the worker that reaches A alone (a damocles-worker has one rpc_client.addr), which
    # a single coordinator restarted would have left it (it counts silence from its start).
    from helpers.supervisor import wait_until_real

    conf = two_jobs_with_a_quick_heartbeat_timeout(postgres_url, tmp_path)
    a, b = CoordinatorProcess(postgres_url, *conf), CoordinatorProcess(postgres_url, *conf)
    with what_they_said(a, b), trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            to_a = RpcClient(f"127.0.0.1:{a.port}", timeout=30)
            to_b = RpcClient(f"127.0.0.1:{b.port}", timeout=30)
            (only_a,) = await to_a.call("Dext.AllocateJobs", {}, 1, "reaches-a-only")
            (both,) = await to_a.call("Dext.AllocateJobs", {}, 1, "reaches-both")
            held = [{"Id": both["Id"], "Lease": both["Lease"]}]
            # Heard through B from the start: a job's HeartbeatAt is in whole seconds, so a
            # first heartbeat only after A's kill, or a slow one, could come a timeout late
            # on a loaded machine.
            nursery.start_soon(heartbeat_forever, to_b, held, "reaches-both")
            await a.kill()
            await wait_until_real(partial(no_longer_running, postgres_url, only_a["Id"]),
                                  what="the silent worker's job taken back")  # fmt: skip
            await a.start(nursery, port=a.port)
            mine = [{"Id": only_a["Id"], "Lease": only_a["Lease"]}]
            (stop,) = await to_a.call("Dext.HeartbeatJobs", mine, "reaches-a-only")
            assert stop["Reason"] == "timed_out"
            with JobStore.open(postgres_url, create=False) as store:
                kept = store.get(both["Id"])
            assert (kept.State, kept.lease, kept.TryNum) == ("running", both["Lease"], 1)
            # The heartbeats stop before their client closes: a client closed under a call
            # breaks that call ("broke before its answer"), a failure of the test's own.
            nursery.cancel_scope.cancel()
        for client in (to_a, to_b):
            await client.aclose()
    assert b"Traceback" not in a.stderr + b.stderr


async def test_a_worker_heartbeating_through_a_coordinator_whose_clock_is_behind_keeps_its_job(
    postgres_url, tmp_path
):
    # B's machine is 40 s behind A's, more than HeartbeatTimeout: B stamped its workers'
    # heartbeats with its own clock, A's sweep read them as 40 s old and took every job given
    # out through B back within seconds ("no heartbeat for its HeartbeatTimeout"), though its
    # worker heartbeated all along; two such tries and the proof was lost. Every coordinator on
    # one PostgreSQL keeps to the server's clock: only the silent job is taken back.
    from helpers.frontend import dext_shifted
    from helpers.supervisor import wait_until_real

    conf = two_jobs_with_a_quick_heartbeat_timeout(postgres_url, tmp_path)
    a = CoordinatorProcess(postgres_url, *conf)
    b = CoordinatorProcess(postgres_url, *conf, dext=dext_shifted(-40.0))
    with what_they_said(a, b), trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            to_b = RpcClient(f"127.0.0.1:{b.port}", timeout=30)
            kept, silent = await to_b.call("Dext.AllocateJobs", {}, 2, "w2")
            # Its answers' Date, which workers compare their clocks with, is the server's.
            assert to_b.server_date is not None
            assert abs(to_b.server_date + 0.5 - time.time()) < 3
            held = [{"Id": kept["Id"], "Lease": kept["Lease"]}]
            nursery.start_soon(heartbeat_forever, to_b, held, "w2")
            # The silent job is taken back a timeout after it was given out: by then, A
            # had read the kept job's stamps as 40 s old, and took it back in the same pass.
            await wait_until_real(partial(no_longer_running, postgres_url, silent["Id"]),
                                  what="the silent job taken back")  # fmt: skip
            nursery.cancel_scope.cancel()
        await to_b.aclose()
        with JobStore.open(postgres_url, create=False) as store:
            job = store.get(kept["Id"])
        assert (job.State, job.lease, job.TryNum) == ("running", kept["Lease"], 1)
    said = b.stderr.decode()
    # (A reading is off by up to half its round trip: within a second on a loaded machine.)
    assert re.search(
        r"this machine's clock is (39\.\d|40\.\d) s behind the clock of the job", said
    ), said
    assert "keeps to the server's clock" in said, said
    assert b"Traceback" not in a.stderr + b.stderr


async def test_a_step_of_the_wall_clock_leaves_the_store_on_the_servers_and_affects_no_job(
    postgres_url, caplog
):
    # NTP steps this machine's clock a minute forward: the coordinator's store stays on the
    # server's clock, advanced by the monotonic clock (test_clock_steps.py has it with a real
    # coordinator); no stretch is counted as unheard.
    from helpers.supervisor import wait_until

    from damocles_ext.frontends.coordinator import Coordinator
    from damocles_ext.jobs.store import TrioJobStore

    caplog.set_level(logging.INFO, "damocles_ext.coordinator")
    shift = [0.0]
    with JobStore.open(postgres_url) as store:
        jobs = TrioJobStore(store, clock=lambda: time.time() + shift[0], steady=time.monotonic)
        coordinator = Coordinator(jobs)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(coordinator.sweep_forever, 0.05))
            shift[0] = 60.0
            assert abs(jobs.clock() - time.time()) < 1  # at once, not at the next pass
            await wait_until(lambda: "which does not follow it, so no job is affected"
                             in caplog.text, timeout=30, what="the step said")  # fmt: skip
            nursery.cancel_scope.cancel()
        now = jobs.clock()
        assert abs(now - time.time()) < 1
        assert coordinator.hearing.silent_before(now, 0.01) == now - 0.01
    assert "the wall clock stepped forward by 60 s since the last sweep" in caplog.text
    # Warned of as a machine whose clock is off, not as a step that costs anything.
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "this machine's clock is 60.0 s ahead of the clock of the job store's" in warning


async def test_a_first_reading_of_the_servers_clock_that_fails_is_tried_at_each_sweep(
    postgres_url, caplog, monkeypatch
):
    # The first readings of the server's clock fail (a passing database error, a connection
    # reset): the coordinator stamps and sweeps on this machine's clock, 40 s off the server's
    # the others keep to, until one works. It reads at each sweep, and warns once meanwhile.
    from helpers.supervisor import wait_until

    from damocles_ext.frontends.coordinator import Coordinator
    from damocles_ext.jobs import trio_store

    caplog.set_level(logging.DEBUG, "damocles_ext.coordinator")
    failures = [0]

    def reading(engine, clock):
        if failures[0]:
            failures[0] -= 1
            raise ConnectionResetError("connection reset by peer")
        return clock_skew(engine, clock)

    monkeypatch.setattr(trio_store, "clock_skew", reading)
    failures[0] = 3
    with JobStore.open(postgres_url) as store:
        jobs = TrioJobStore(store, clock=lambda: time.time() + 40, steady=time.monotonic)
        coordinator = Coordinator(jobs)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(coordinator.sweep_forever, 0.05))
            assert abs(jobs.clock() - time.time() - 40) < 1  # this machine's, meanwhile
            await wait_until(lambda: abs(jobs.clock() - time.time()) < 1, timeout=30,
                             what="the server's clock read again")  # fmt: skip
            nursery.cancel_scope.cancel()
    assert failures[0] == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    (failed,) = [m for m in warned if "cannot read the clock" in m]
    assert "connection reset by peer" in failed
    assert "on this machine's clock, which may be off the server's" in failed
    assert "it is read again at each sweep" in failed
    assert "the clock of the job store's server is read again" in caplog.text


async def test_serve_with_its_own_coordinator_keeps_to_the_servers_clock_from_its_start(
    postgres_url, tmp_path
):
    # serve --jobs --listen read the server's clock only at its coordinator's first sweep, begun
    # after it served; and its producer's store kept this machine's clock: 40 s behind the
    # server, the producer's own sweep at a job's deadline (on the server's clock) found the
    # deadline 40 s ahead and did nothing, the job left to the coordinator's next sweep. It
    # reads the server's clock before it serves, and the producer sweeps on it.
    import subprocess

    from helpers.frontend import ManagerLike, dext_shifted
    from test_producer import stop, task_in_store_a

    # HeartbeatTimeout 10 minutes: the coordinator's sweeps 10 s apart (damocles' interval).
    (tmp_path / "sector-manager.cfg").write_text(
        '[Common.Proving.WorkerProver]\nHeartbeatTimeout = "10m"\n'
    )
    root, task, job_id = task_in_store_a(tmp_path)
    argv = [*dext_shifted(-40.0), "serve", "window_post", "--jobs", postgres_url,
            "--log-level", "debug", "--store", f"a={root}", "--conf-dir", str(tmp_path),
            "--listen", "127.0.0.1:0", "--deadline-after", "2s", "--poll-interval", "60"]  # fmt: skip
    async with trio.open_nursery() as nursery:
        m = await ManagerLike.start(
            nursery, argv, "window_post", stderr=subprocess.PIPE, ready_timeout=30
        )
        serving = await m.wait_log("serving the worker-prover RPC at")
        request_id = await m.send(task)
        with trio.fail_after(30):
            response = await m.wait(request_id)
        assert f"job {job_id} was cancelled: its deadline passed at " in response.err_msg
        await stop(m)
    said = "\n".join(m.log)
    behind = [
        i for i, line in enumerate(m.log) if re.search(r"clock is (39|40)\.\d s behind", line)
    ]
    assert behind and behind[0] < m.log.index(serving), said
    # Cancelled by the producer's sweep at the deadline, not by the coordinator's next one.
    assert f"sweep: job {job_id} cancelled" not in said, said
    with JobStore.open(postgres_url, create=False) as store:
        job = store.get(job_id)
    assert job is not None and job.cancelled and job.not_after is not None
    assert abs(job.CreatedAt - time.time()) < 15  # the server's clock (this test's machine's)
    assert abs(job.not_after - job.CreatedAt - 2) < 1


def test_status_and_wdpost_list_read_the_stamps_on_the_servers_clock(postgres_url):
    # `status --jobs` and `wdpost list` compared this machine's clock with the stamps the
    # coordinators make on the PostgreSQL server's: on a machine 5 minutes ahead of it, the worker
    # seen a moment ago was not live, and its running job's heartbeat was 5 minutes old.
    import json

    from helpers.frontend import dext_run, dext_shifted

    from damocles_ext.jobs import rules

    with JobStore.open(postgres_url) as store:
        store.create(make_input(miner=1000, seed=0), time.time())
        [job] = store.allocate(rules.AllocationSpec(), 1, "gpu-1", time.time())
    ahead = dext_shifted(300.0)
    status = dext_run("status", "--jobs", postgres_url, "--json", dext=ahead)
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert abs(summary["time"] - time.time()) < 30, summary
    assert summary["live_workers"] == 1 and summary["workers"][0]["last_seen_ago"] < 30, summary
    listing = dext_run("wdpost", "list", "--jobs", postgres_url, dext=ahead)
    assert listing.returncode == 0, listing.stderr
    (row,) = [line for line in listing.stdout.decode().splitlines() if line.startswith(job.Id)]
    elapsed, heartbeat = row.split()[-2:]  # no error: the last two columns
    for shown in (elapsed, heartbeat):  # a few seconds at most: "1.859s", "859ms", not "5m1s"
        assert re.fullmatch(r"\d+(\.\d+)?s|\d+ms", shown), listing.stdout.decode()


async def test_serve_waits_a_bounded_time_for_a_server_clock_that_does_not_answer(
    postgres_url, caplog
):
    # serve --listen reads the server's clock before it serves, its requests and signals unread
    # meanwhile: a server that does not answer is waited for 3 s (here 0.2 s), not a store
    # call's minute; said, and left to the sweeps, which read it until a reading works.
    from damocles_ext.frontends.coordinator import Coordinator

    caplog.set_level(logging.INFO, "damocles_ext.coordinator")
    with JobStore.open(postgres_url) as store:
        jobs = TrioJobStore(store)
        answering = jobs._in_thread
        coordinator = Coordinator(jobs)
        clock = coordinator.server_clock

        async def stalled(call, within):
            await trio.sleep_forever()

        jobs._in_thread = stalled
        with trio.fail_after(10):
            await clock.read_server(0.2)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert "did not answer within 0.2 s when its clock was read" in warning, warning
        assert "until a sweep reads it" in warning
        assert jobs.server_offset is None  # read at the first sweep
        jobs._in_thread = answering
        await clock.read_server()
        assert "the clock of the job store's server is read again" in caplog.text
