"""The coordinator: damocles' worker-prover RPC over real HTTP, on a real SQLite store."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import threading
from contextlib import asynccontextmanager, contextmanager
from functools import partial

import h11
import msgspec
import pytest
import trio
from helpers.frontend import DEXT, dext_env, dext_run_async, read_answer
from test_jobs_rules import make_input

from damocles_ext.frontends.coordinator import CLEANUP_PASSES, Coordinator, CoordinatorServer
from damocles_ext.jobs import rpc, rules
from damocles_ext.jobs.model import READY, RUNNING, JobOutput
from damocles_ext.jobs.store import JobStore, TrioJobStore
from damocles_ext.logs import JsonFormatter

WORKER = "10.0.0.5"
PROOF = "StackedDrgWindow2KiBV1_2"


def as_json(value: object) -> object:
    return msgspec.json.decode(msgspec.json.encode(value))


class Client:
    """One kept-alive HTTP/1.1 connection speaking as go-jsonrpc's client does."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.next_id = 1

    async def post(
        self,
        body: bytes,
        *,
        chunked: bool = False,
        headers: list[tuple[str, str]] | None = None,
        method: str = "POST",
    ) -> tuple[int, bytes]:
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        headers = [("Host", "coordinator"), ("Content-Type", "application/json"), *(headers or [])]
        headers.append(("Transfer-Encoding", "chunked") if chunked
                       else ("Content-Length", str(len(body))))  # fmt: skip
        data = self.h11.send(h11.Request(method=method, target="/rpc/v0", headers=headers))
        data += self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage())
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            pass  # the server may refuse before reading it all; its answer is still there
        answer = await read_answer(self.h11, self.stream)
        return (0, b"") if answer is None else (answer.status, answer.body)

    async def call(
        self, method: str, *params: object, headers: list[tuple[str, str]] | None = None
    ) -> tuple[int, dict]:
        body = msgspec.json.encode(
            {"jsonrpc": "2.0", "method": method, "params": list(params), "id": self.next_id}
        )
        self.next_id += 1
        status, answer = await self.post(body, headers=headers)
        return status, msgspec.json.decode(answer)


@pytest.fixture(params=["sqlite", "postgresql"])
def job_store(request: pytest.FixtureRequest, tmp_path):
    """The store on SQLite and on the session's PostgreSQL (a new database each time)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/jobs.db"
    else:
        url = request.getfixturevalue("postgres_url")
    with JobStore.open(url) as s:
        yield s


async def serving(nursery: trio.Nursery, job_store: JobStore, **kw) -> CoordinatorServer:
    server = CoordinatorServer(Coordinator(TrioJobStore(job_store)), "127.0.0.1", 0, **kw)
    await nursery.start(server.serve)
    return server


async def connect(server: CoordinatorServer) -> Client:
    return Client(await trio.open_tcp_stream("127.0.0.1", server.port))


async def test_a_listing_of_every_job_holds_up_no_other_call(job_store, monkeypatch):
    # 30,000 jobs' briefs took 0.35 s of the event loop: eight clients listing in a loop kept a
    # worker's heartbeats waiting for up to 27 s. Here a listing is held in the middle of its
    # briefs until a heartbeat, a second listing and an allocation came and were answered.
    jobs = TrioJobStore(job_store)
    first, _ = await jobs.create(make_input(seed=1, proof_type=PROOF))
    await jobs.create(make_input(seed=2, proof_type=PROOF))
    [taken] = await jobs.allocate(rules.AllocationSpec(), 1, WORKER)
    building, go_on = threading.Event(), threading.Event()
    brief = rpc.job_brief

    def held_brief(job):
        if job.Id == first.Id and not go_on.is_set():
            building.set()
            go_on.wait(30)
        return brief(job)

    monkeypatch.setattr(rpc, "job_brief", held_brief)
    answers: list = []
    both = trio.Event()
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, job_store)

        async def listing() -> None:
            answers.append(await (await connect(server)).call("Venus.WdPoStAllJobs"))
            if len(answers) == 2:
                both.set()

        nursery.start_soon(listing)
        await trio.to_thread.run_sync(building.wait, 30)
        nursery.start_soon(listing)  # waits for the first one (one listing at a time)
        client = await connect(server)
        status, answer = await client.call("Venus.WdPoStHeartbeatJobs", [taken.Id], WORKER)
        assert (status, answer["result"]) == (200, None)
        status, answer = await client.call("Venus.WdPoStAllocateJobs", {}, 1, WORKER)
        assert status == 200 and len(answer["result"]) == 1
        assert answers == []
        go_on.set()
        await both.wait()
        nursery.cancel_scope.cancel()
    assert [len(a["result"]["Jobs"]) for _, a in answers] == [2, 2]


async def test_a_wdpost_worker_allocates_heartbeats_and_finishes_a_job(job_store):
    job_input = make_input(miner=1000, sectors=2, proof_type=PROOF)
    job, created = await TrioJobStore(job_store).create(job_input)
    assert created
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, job_store)
        client = await connect(server)
        # damocles-worker's wdpost planner: its spec, 1 job, its name.
        spec = {"AllowedMiners": [1000], "AllowedProofTypes": [PROOF]}
        status, answer = await client.call("Venus.WdPoStAllocateJobs", spec, 1, WORKER)
        assert status == 200
        assert answer["id"] == 1
        assert answer["result"] == [{"Id": job.Id, "Input": as_json(job_input)}]
        status, answer = await client.call("Venus.WdPoStAllocateJobs", spec, 1, WORKER)
        assert answer["result"] == []  # nothing left to take
        status, answer = await client.call("Venus.WdPoStHeartbeatJobs", [job.Id], WORKER)
        assert (status, answer) == (200, {"jsonrpc": "2.0", "result": None, "id": 3})
        output = {"proofs": ["AAEC"], "faults": [1]}
        status, answer = await client.call("Venus.WdPoStFinishJob", job.Id, output, "")
        assert (status, answer["result"]) == (200, None)
        status, answer = await client.call("Venus.WorkerPing", {"Name": WORKER})
        assert (status, answer["result"]) == (200, None)
        status, answer = await client.call("Venus.WdPoStAllJobs")
        assert status == 200 and answer["result"]["MaxTry"] == 2
        [brief] = answer["result"]["Jobs"]
        assert brief["Id"] == job.Id and brief["State"] == "finished"
        assert brief["ErrorReason"] == "" and brief["WorkerName"] == WORKER
        assert brief["TryNum"] == 1
        # As damocles' WdPoStJobBrief.MarshalJSON writes it: the input zeroed but for the
        # miner, the output emptied; the counts beside.
        assert brief["Input"] == {
            "Sectors": None,
            "MinerId": 1000,
            "ProofType": "",
            "Seed": [0] * 32,
        }
        assert brief["Output"] == {"proofs": None, "faults": None}
        stored = await TrioJobStore(job_store).get(job.Id)
        assert stored is not None and as_json(stored.Output) == output
        assert (brief["Sectors"], brief["Faults"]) == (2, 1)
        nursery.cancel_scope.cancel()


async def test_bad_requests_get_json_rpc_errors_and_the_server_keeps_serving(job_store):
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, job_store)
        client = await connect(server)
        status, body = await client.post(b'{"jsonrpc":"2.0","method":')
        error = msgspec.json.decode(body)["error"]
        assert (status, error["code"]) == (500, rpc.PARSE_ERROR)
        assert error["message"].startswith("(error code -32700) unmarshaling request: ")
        # go-jsonrpc v0.1.9's codes and messages (handler.go): "(error code N) ..."
        status, answer = await client.call("Venus.NoSuchMethod")
        assert (status, answer["error"]["code"]) == (500, rpc.METHOD_NOT_FOUND)
        assert (
            answer["error"]["message"]
            == "(error code -32601) method 'Venus.NoSuchMethod' not found"
        )
        status, answer = await client.call("Venus.WdPoStAllocateJobs", {}, 1)
        assert (status, answer["error"]["code"]) == (500, rpc.INVALID_PARAMS)
        assert answer["error"]["message"].startswith(
            "(error code -32602) wrong param count (method 'Venus.WdPoStAllocateJobs'): 2 != 3;"
        )
        status, answer = await client.call("Venus.WdPoStAllocateJobs", {}, "one", WORKER)
        assert (status, answer["error"]["code"]) == (500, rpc.PARSE_ERROR)
        assert answer["error"]["message"].startswith(
            "(error code -32700) unmarshaling params for 'Venus.WdPoStAllocateJobs' (param: 1): "
        )
        status, answer = await client.call("Venus.WdPoStResetJob", "nope")
        assert status == 200
        assert answer["error"] == {"code": 1, "message": "job 'nope' does not exist"}
        status, answer = await client.call("Venus.WdPoStHeartbeatJobs", ["nope"], WORKER)
        assert (status, answer["error"]["code"]) == (200, 1)
        assert "nope" in answer["error"]["message"]
        # The same connection still works.
        status, answer = await client.call("Venus.WdPoStAllJobs")
        assert (status, answer["result"]) == (200, {"Jobs": [], "MaxTry": 2})
        nursery.cancel_scope.cancel()


async def test_over_long_id_lists_and_filters_are_refused_params_answered_at_once(job_store):
    # One heartbeat naming a million jobs held the store's write lock for half a minute, id by
    # id, and a long filter failed in the database (too many SQL variables, or an index row
    # too large): all are refused at the door, as params it cannot take.
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, job_store)
        client = await connect(server)
        over = rpc.MAX_IDS_PER_CALL + 1
        for method, params in [
            ("Venus.WdPoStHeartbeatJobs", [[f"j{i}" for i in range(over)], WORKER]),
            ("Dext.HeartbeatJobs", [[{"Id": f"j{i}", "Lease": "x"} for i in range(over)], WORKER]),
            (
                "Venus.WdPoStAllocateJobs",
                [{"AllowedMiners": list(range(rpc.MAX_FILTER + 1))}, 1, WORKER],
            ),
            ("Dext.AllocateJobs", [{"AllowedProofTypes": ["t"] * (rpc.MAX_FILTER + 1)}, 1, WORKER]),
        ]:
            status, answer = await client.call(method, *params)
            assert (status, answer["error"]["code"]) == (500, rpc.PARSE_ERROR), method
            message = answer["error"]["message"]
            assert "(param: 0)" in message and "length <= 1000" in message, message
            assert "send at most that many in one call" in message
        # A worker's name is part of a row's key among the workers seen, which PostgreSQL
        # indexes up to 2,704 bytes: a longer one is refused, on either engine, saying why.
        worker = "w" * (rpc.MAX_WORKER_NAME + 1)
        status, answer = await client.call("Venus.WdPoStAllocateJobs", {}, 1, worker)
        assert (status, answer["error"]["code"]) == (500, rpc.INVALID_PARAMS)
        assert "(param: 2): the worker name takes 1001 bytes" in answer["error"]["message"]
        # Within the limits, the calls are made (here: no such jobs, nothing to allocate).
        ids = [f"j{i}" for i in range(rpc.MAX_IDS_PER_CALL)]
        status, answer = await client.call("Venus.WdPoStHeartbeatJobs", ids, WORKER)
        assert (status, answer["error"]["code"]) == (200, rpc.METHOD_ERROR)
        # The most miners a filter takes (20 KB stored) under the longest name: the worker is
        # seen, with its filter.
        big = 2**62
        miners = list(range(big, big + rpc.MAX_FILTER))
        spec = {"AllowedMiners": miners, "AllowedProofTypes": ["p" * 40] * 3}
        worker = "w" * rpc.MAX_WORKER_NAME
        status, answer = await client.call("Venus.WdPoStAllocateJobs", spec, 1, worker)
        assert (status, answer["result"]) == (200, [])
        nursery.cancel_scope.cancel()
    [seen] = (await TrioJobStore(job_store).summary()).workers
    assert (seen.worker, seen.allowed_miners) == (worker, miners)


async def test_a_head_request_gets_its_answers_head(sqlite_store):
    # h11 sends no body in answer to a HEAD: the answer went out as nothing at all before.
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store)
        client = await connect(server)
        assert await client.post(b"", method="HEAD") == (405, b"")
        # The connection goes on, and a POST on it is answered in full.
        status, answer = await client.call("Venus.WdPoStAllJobs")
        assert (status, answer["result"]["Jobs"]) == (200, [])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_oversized_body_is_refused(sqlite_store, chunked):
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store, max_body=1024)
        client = await connect(server)
        status, body = await client.post(b"[" + b" " * 4096 + b"]", chunked=chunked)
        assert status == 413 and b"at most 1024 bytes" in body
        status, answer = await (await connect(server)).call("Venus.WdPoStAllJobs")
        assert status == 200 and answer["result"]["Jobs"] == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_of_the_limit_exactly_is_served_and_held_as_its_own_size(
    sqlite_store, chunked
):
    # The body's count began at the size of the request's head: a body some hundred bytes
    # (up to 16 KiB) under the limit was refused "at most N bytes", and each body was held in
    # the buffer cap as that much larger.
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store, max_body=1024)
        client = await connect(server)
        call = b'{"jsonrpc":"2.0","method":"Venus.WdPoStAllJobs","params":[],"id":1}'
        status, body = await client.post(call.ljust(1024), chunked=chunked)
        assert status == 200 and msgspec.json.decode(body)["result"]["Jobs"] == [], body
        status, body = await client.post(call.ljust(1025), chunked=chunked)
        assert status == 413 and b"at most 1024 bytes" in body
        nursery.cancel_scope.cancel()
    assert server.peak_buffered == 1024


async def test_the_command_refuses_a_busy_port_and_a_bad_url(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        url = f"sqlite:///{tmp_path}/jobs.db"
        done = await dext_run_async("coordinator", "--jobs", url, "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert b"cannot listen on 127.0.0.1:" in done.stderr and b"--listen" in done.stderr
    assert b"Traceback" not in done.stderr
    done = await dext_run_async("coordinator", "--jobs", "mysql://x/y")
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"coordinator: error:" in done.stderr


@pytest.mark.parametrize("option", ["--listen", "--metrics"])
async def test_a_busy_port_fails_the_start_and_leaves_no_new_store_file(tmp_path, option):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        ports = {"--listen": "127.0.0.1:0", "--metrics": "127.0.0.1:0", option: taken}
        url = f"sqlite:///{tmp_path}/jobs.db"
        done = await dext_run_async("coordinator", "--jobs", url, *itertools.chain(*ports.items()))
    err = done.stderr.decode()
    assert done.returncode == 2 and f"on {taken}" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # the ports are bound before the store is opened


async def test_sigterm_stops_the_command_cleanly(tmp_path):
    url = f"sqlite:///{tmp_path}/jobs.db"
    proc = await trio.lowlevel.open_process(
        [*DEXT, "coordinator", "--jobs", url, "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        env=dext_env(),
    )
    assert proc.stderr is not None
    seen = b""
    with trio.fail_after(60):
        while b"serving the worker-prover RPC at" not in seen:
            chunk = await proc.stderr.receive_some(4096)
            assert chunk, seen
            seen += chunk
        proc.send_signal(signal.SIGTERM)
        while chunk := await proc.stderr.receive_some(4096):
            seen += chunk
        assert await proc.wait() == 0, seen
    assert b"Traceback" not in seen and b"stopped" in seen


class TimeOuts:
    """An observer of the coordinator's effects: `wait()` returns at the next TimedOut."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def __call__(self, effects) -> None:
        if any(isinstance(e, rules.TimedOut) for e in effects):
            self.event.set()

    async def wait(self) -> None:
        with trio.fail_after(8):
            await self.event.wait()
        self.event = trio.Event()


@asynccontextmanager
async def _taken_back_from_worker_a(job_store: JobStore):
    """A coordinator with one job, allocated to worker-a, which went silent past the heartbeat
    timeout: the sweep took the job back. Yields the store, the job and a client."""
    now = [1_700_000_000.0]
    jobs = TrioJobStore(job_store, clock=lambda: now[0])
    job, _ = await jobs.create(make_input(proof_type=PROOF))
    coordinator = Coordinator(jobs)
    async with trio.open_nursery() as nursery:
        server = CoordinatorServer(coordinator, "127.0.0.1", 0)
        await nursery.start(server.serve)
        client = await connect(server)
        _, answer = await client.call("Venus.WdPoStAllocateJobs", {}, 1, "worker-a")
        assert [j["Id"] for j in answer["result"]] == [job.Id]
        now[0] += 60  # worker-a went silent past the 15 s heartbeat timeout
        await nursery.start(coordinator.sweep_forever)  # started after its first pass
        yield jobs, job, client
        nursery.cancel_scope.cancel()


async def test_the_sweep_gives_a_silent_workers_job_to_the_next_worker(job_store):
    async with _taken_back_from_worker_a(job_store) as (_, job, client):
        _, answer = await client.call("Venus.WdPoStAllocateJobs", {}, 1, "worker-b")
        assert [j["Id"] for j in answer["result"]] == [job.Id]
        _, answer = await client.call("Venus.WdPoStAllJobs")
        [brief] = answer["result"]["Jobs"]
        assert (brief["WorkerName"], brief["TryNum"], brief["State"]) == ("worker-b", 2, "running")


async def test_a_damocles_workers_late_proof_and_its_finish_sent_again_are_taken(job_store):
    # damocles-worker sends a finish without a token or its name, and retries a refused one
    # (5 times, a minute apart, by default) with its WindowPoSt thread held. Its proof for a job
    # taken back from it while nobody else holds it is taken, as damocles takes it; the same
    # finish sent again (its answer lost) is acknowledged; a different one is still refused.
    output = {"proofs": ["AAEC"], "faults": []}
    async with _taken_back_from_worker_a(job_store) as (jobs, job, client):
        assert (await jobs.get(job.Id)).State == READY
        for _ in range(2):
            status, answer = await client.call("Venus.WdPoStFinishJob", job.Id, output, "")
            assert (status, answer.get("result", answer)) == (200, None)
        status, answer = await client.call(
            "Venus.WdPoStFinishJob", job.Id, {"proofs": ["AAED"], "faults": []}, ""
        )
        assert status == 200 and "the job is finished" in answer["error"]["message"]
        _, answer = await client.call("Venus.WdPoStAllocateJobs", {}, 1, "worker-b")
        assert answer["result"] == []  # proved once: nothing to give worker-b
    stored = await jobs.get(job.Id)
    assert stored.succeeded and as_json(stored.Output) == output and stored.TryNum == 1


async def test_a_refused_damocles_worker_finish_has_damocles_abort_code_so_it_is_not_retried(
    job_store,
):
    """damocles-worker's report_result (src/sealing/sealing_thread/planner/wdpost.rs:521) calls
    WdPoStFinishJob through `call_rpc!` (src/sealing/sealing_thread/util.rs:17-30): an error of
    code APIErrCode::SectorStateNotFound, 11001 (src/rpc/mod.rs:8; damocles-manager
    core/api_error_codes.go:6), aborts the task at once; any other is a temporary error, retried
    `max_retries` times `recover_interval` apart (wdpost.rs:181-201) with the wdpost thread
    held. damocles-manager takes every finish of a job it has (job_mgr_kv.go:254-281), so only
    our fencing refuses one: it must say so with 11001. An unknown job stays damocles' code 1
    ("key not found"): its producer may create it again, and the retry then delivers."""
    async with _taken_back_from_worker_a(job_store) as (_, job, client):
        _, answer = await client.call("Venus.WdPoStAllocateJobs", {}, 1, "worker-b")
        assert [j["Id"] for j in answer["result"]] == [job.Id]
        output = {"proofs": ["AAEC"], "faults": []}
        _, answer = await client.call("Venus.WdPoStFinishJob", job.Id, output, "")
        assert answer["result"] is None  # worker-b proved it
        # worker-a's late failure, once the job is proved: refused, and said so to abort.
        status, answer = await client.call("Venus.WdPoStFinishJob", job.Id, None, "gpu lost")
        assert status == 200
        assert answer["error"]["code"] == rpc.ABORT == 11001
        assert f"job {job.Id}: the job is finished" in answer["error"]["message"]
        status, answer = await client.call("Venus.WdPoStFinishJob", "gone", None, "x")
        assert (status, answer["error"]) == (
            200, {"code": rpc.METHOD_ERROR, "message": "job gone: key not found"}
        )  # fmt: skip


async def test_a_store_outage_longer_than_the_heartbeat_timeout_takes_back_no_job_for_it(tmp_path):
    # The store locked by another process for 30 s (over the 15 s timeout): worker-a's heartbeats
    # are refused all along. Its job is not taken back for that silence once the store answers.
    async with _a_job_of_worker_a(tmp_path) as (path, now, jobs, job):
        timeouts = TimeOuts()
        coordinator = Coordinator(jobs, observe=timeouts, watch_clocks=False)
        beat = heartbeat_body([job.Id], "worker-a")
        with _locked(path):
            for _ in range(3):
                now[0] += 10
                status, answer = await coordinator.answer(beat)
                assert status == 200 and b"stayed locked by another process" in answer, answer
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(coordinator.sweep_forever, 0.1))  # its first pass is done
            assert (await jobs.get(job.Id)).State == "running"
            # Silent for a timeout while the store answers: taken back.
            now[0] += 16
            await timeouts.wait()
            nursery.cancel_scope.cancel()


async def test_a_dead_workers_job_is_taken_back_though_the_store_fails_now_and_then(tmp_path):
    # Another worker's calls fail every 5 s (the store locked a moment): that costs the dead
    # worker's job no more than those moments, not its timeout for ever.
    async with _a_job_of_worker_a(tmp_path) as (path, now, jobs, job):  # then worker-a dies
        coordinator = Coordinator(jobs, watch_clocks=False)
        beat = heartbeat_body([], "worker-b")
        for _ in range(5):
            now[0] += 5
            with _locked(path):
                _, answer = await coordinator.answer(beat)
                assert b"stayed locked by another process" in answer, answer
            assert b'"result"' in (await coordinator.answer(beat))[1]  # answered again
        outcome = await coordinator.sweep_once()
    assert rules.TimedOut(job.Id, "worker-a") in outcome.effects


@asynccontextmanager
async def _a_job_of_worker_a(tmp_path, limits: rules.JobLimits | None = None):
    """A SQLite store (a busy timeout of 50 ms, `limits`) on a fake clock, with one job worker-a
    took: (its path, the clock [now], the TrioJobStore, the job as allocated, with its lease)."""
    path = tmp_path / "jobs.db"
    now = [1_700_000_000.0]
    with JobStore.open(f"sqlite:///{path}", busy_timeout=0.05, limits=limits) as store:
        jobs = TrioJobStore(store, clock=lambda: now[0])
        await jobs.create(make_input(proof_type=PROOF))
        [taken] = await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
        yield path, now, jobs, taken


@contextmanager
def _locked(path):
    """The SQLite store at `path` write-locked by another process's connection, within."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("COMMIT")
        holder.close()


def heartbeat_body(ids: list[str], worker: str) -> bytes:
    """A Venus.WdPoStHeartbeatJobs request body, as a damocles-worker posts it."""
    return msgspec.json.encode({"jsonrpc": "2.0", "method": "Venus.WdPoStHeartbeatJobs",
                                "params": [ids, worker], "id": 1})  # fmt: skip


class Logged(logging.Handler):
    """Sets `seen` when a record containing `words` is logged (from the trio thread)."""

    def __init__(self, words: str) -> None:
        super().__init__()
        self.words = words
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.seen.set()


async def test_a_wall_clock_stepping_forward_takes_back_no_job_for_the_step(sqlite_store):
    now = [1_700_000_000.0]
    steady = [0.0]  # the monotonic clock: the step moves the wall clock only
    jobs = TrioJobStore(sqlite_store, clock=lambda: now[0])
    job, _ = await jobs.create(make_input(proof_type=PROOF))
    await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
    timeouts = TimeOuts()
    coordinator = Coordinator(jobs, observe=timeouts, monotonic=lambda: steady[0])
    stepped = Logged("the wall clock stepped forward by 60 s (set by NTP")
    logging.getLogger("damocles_ext.coordinator").addHandler(stepped)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(coordinator.sweep_forever, 0.05))
            now[0] += 60  # NTP steps the clock a minute forward: worker-a looks silent
            with trio.fail_after(10):
                await stepped.seen.wait()
            nursery.cancel_scope.cancel()  # (the passes below are made one by one)
    finally:
        logging.getLogger("damocles_ext.coordinator").removeHandler(stepped)
    await coordinator.sweep_once()
    assert (await jobs.get(job.Id)).State == "running"
    # Silent for a timeout after the step: taken back.
    now[0] += 16
    assert rules.TimedOut(job.Id, "worker-a") in (await coordinator.sweep_once()).effects


async def test_a_coordinator_that_did_not_run_for_a_while_takes_back_no_job_for_it(sqlite_store):
    # SIGSTOP, a paused VM: both clocks move on, no pass is made, and the heartbeats sent
    # meanwhile wait unread while the first pass after it comes first.
    now = [1_700_000_000.0]
    jobs = TrioJobStore(sqlite_store, clock=lambda: now[0])
    job, _ = await jobs.create(make_input(proof_type=PROOF))
    await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
    coordinator = Coordinator(jobs, monotonic=lambda: now[0])
    stopped = Logged("this coordinator did not run for 40 s")
    logging.getLogger("damocles_ext.coordinator").addHandler(stopped)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(coordinator.sweep_forever, 0.05))
            now[0] += 40  # stopped for 40 s
            with trio.fail_after(10):
                await stopped.seen.wait()
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("damocles_ext.coordinator").removeHandler(stopped)
    assert (await jobs.get(job.Id)).State == "running"
    now[0] += 16  # silent for a timeout after it: taken back
    assert rules.TimedOut(job.Id, "worker-a") in (await coordinator.sweep_once()).effects


async def test_a_pass_that_waited_on_the_store_is_not_taken_for_a_coordinator_that_did_not_run(
    sqlite_store, monkeypatch
):
    # A table lock or a paused database held a sweep's call for 40 s: the coordinator ran all
    # along, and said it had not ("the machine paused?"), sending the operator to the wrong
    # machine. The store's wait is the store's: counted as unheard by the store's hearing, so
    # worker-a, whose heartbeats waited meanwhile, keeps its job.
    now = [1_700_000_000.0]
    jobs = TrioJobStore(sqlite_store, clock=lambda: now[0], monotonic=lambda: now[0])
    job, _ = await jobs.create(make_input(proof_type=PROOF))
    await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
    coordinator = Coordinator(jobs, monotonic=lambda: now[0])
    store_sweep, calls = sqlite_store.sweep, [0]

    def held_sweep(*args, **kwargs):  # in the store's thread: the call waits 40 s
        calls[0] += 1
        if calls[0] == 2:
            now[0] += 40
        return store_sweep(*args, **kwargs)

    monkeypatch.setattr(sqlite_store, "sweep", held_sweep)
    sweep, passes, fourth = coordinator.sweep_once, [0], trio.Event()

    async def counted_sweep():
        passes[0] += 1
        if passes[0] == 4:  # the third, after the held one, is done
            fourth.set()
        return await sweep()

    coordinator.sweep_once = counted_sweep
    stopped = Logged("did not run")
    logging.getLogger("damocles_ext.coordinator").addHandler(stopped)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(coordinator.sweep_forever, 0.05))
            with trio.fail_after(10):
                await fourth.wait()
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("damocles_ext.coordinator").removeHandler(stopped)
    assert not stopped.seen.is_set()
    assert (await jobs.get(job.Id)).State == "running"


async def test_a_restarted_coordinator_takes_back_no_job_for_the_silence_of_its_outage(job_store):
    now = [1_700_000_000.0]
    jobs = TrioJobStore(job_store, clock=lambda: now[0])
    job, _ = await jobs.create(make_input(proof_type=PROOF))
    [taken] = await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
    now[0] += 60  # the coordinator was down for a minute: worker-a could not heartbeat
    restarted_at = now[0]
    timeouts = TimeOuts()
    coordinator = Coordinator(jobs, observe=timeouts, watch_clocks=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(coordinator.sweep_forever, 0.1))  # its first pass is done
        assert (await jobs.get(job.Id)).State == "running"
        # worker-a reaches the coordinator again within a timeout: its job stays its own.
        now[0] += 10
        await jobs.heartbeat([job.Id], "worker-a", leases={job.Id: taken.lease})
        now[0] += 10
        await jobs.sweep(heard_since=restarted_at)  # a pass as the loop makes them
        assert (await jobs.get(job.Id)).State == "running"
        # Silent for a timeout while the coordinator serves: taken back.
        now[0] += 16
        await timeouts.wait()
        nursery.cancel_scope.cancel()
    again = await jobs.get(job.Id)
    assert again.State == "ready2run" and again.TryNum == 1


async def test_the_cleanup_forgets_every_expired_job_pass_after_pass(tmp_path):
    # One pass (1000 jobs) every 30 min kept up with 0.56 jobs/s: past that the store grew.
    now = [1_700_000_000.0]
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as store:
        jobs = TrioJobStore(store, clock=lambda: now[0])
        for seed in range(7):
            await jobs.create(make_input(seed=seed, proof_type=PROOF))
        for taken in await jobs.allocate(rules.AllocationSpec(), 7, "worker-a"):
            await jobs.finish(taken.Id, JobOutput((b"proof",), ()), "", lease=taken.lease)
        now[0] += store.limits.job_lifetime + 60
        coordinator = Coordinator(jobs, watch_clocks=False)
        coordinator.cleanup_pass = 3  # as 1000 is to a busy store
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.sweep_forever)  # its first pass cleans up
            nursery.cancel_scope.cancel()
        assert await jobs.list_jobs() == []
        # A backlog over CLEANUP_PASSES passes goes on at the next sweep, not 30 min later.
        for seed in range(7, 7 + 3 * CLEANUP_PASSES + 2):
            await jobs.create(make_input(seed=seed, proof_type=PROOF))
        for taken in await jobs.allocate(rules.AllocationSpec(), 100, "worker-a"):
            await jobs.finish(taken.Id, JobOutput((b"proof",), ()), "", lease=taken.lease)
        now[0] += store.limits.job_lifetime + 60
        assert await coordinator._cleanup() is True  # ten full passes, two jobs left
        assert len(await jobs.list_jobs()) == 2
        assert await coordinator._cleanup() is False and await jobs.list_jobs() == []


async def test_the_cleanup_runs_as_often_as_the_stores_limits_say(tmp_path):
    limits = rules.JobLimits(sweep_interval=0.05, cleanup_interval=0.5)
    async with _a_job_of_worker_a(tmp_path, limits) as (_, now, jobs, taken):
        await jobs.finish(taken.Id, JobOutput((b"proof",), ()), "", lease=taken.lease)
        coordinator = Coordinator(jobs, watch_clocks=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.sweep_forever)  # its first cleanup: nothing is old
            started = trio.current_time()
            now[0] += limits.job_lifetime + 60  # the finished job is past JobLifetime now
            # The next cleanup comes after the limits' 0.5 s, not after damocles' fixed 30 min,
            # and not at each sweep either.
            with trio.fail_after(5):
                while await jobs.list_jobs():  # noqa: ASYNC110 - a store change sends no event on SQLite
                    await trio.sleep(0.05)
            assert trio.current_time() - started >= limits.cleanup_interval
            nursery.cancel_scope.cancel()


async def test_the_sweep_runs_as_often_as_the_stores_limits_say(tmp_path):
    limits = rules.JobLimits(heartbeat_timeout=2.0, sweep_interval=0.5)
    async with _a_job_of_worker_a(tmp_path, limits) as (_, now, jobs, taken):
        timeouts = TimeOuts()
        coordinator = Coordinator(jobs, observe=timeouts, watch_clocks=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.sweep_forever)  # its first pass: nothing is due
            now[0] += 60  # worker-a went silent past the 2 s timeout
            # The next pass comes after the limits' 0.5 s, not after damocles' fixed 10 s.
            await timeouts.wait()
            nursery.cancel_scope.cancel()
        again = await jobs.get(taken.Id)
        assert again.State == "ready2run" and again.TryNum == 1


async def test_a_dead_workers_job_is_ready_again_a_quarter_of_a_short_heartbeat_timeout_after(
    tmp_path,
):
    # HeartbeatTimeout 1 s: the coordinator sweeps every 0.25 s, not at damocles' fixed 10 s,
    # which would leave the job running long after its worker went silent.
    limits = rules.JobLimits(heartbeat_timeout=1.0)
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db", limits=limits) as store:
        jobs = TrioJobStore(store)
        job, _ = await jobs.create(make_input(proof_type=PROOF))
        [taken] = await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")  # then silent
        assert taken.State == RUNNING
        async with trio.open_nursery() as nursery:
            await nursery.start(Coordinator(jobs).sweep_forever)
            # Its heartbeat time is whole seconds: timed out 1 to 2 s after the allocation.
            with trio.fail_after(5):
                while (found := await jobs.get(job.Id)) is None or found.State != READY:  # noqa: ASYNC110 - a store change sends no event on SQLite
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert (found.TryNum, found.ErrorReason) == (1, "")


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"", rpc.PARSE_ERROR, "(error code -32700) unmarshaling request: the body is not JSON"),
        (b"null", rpc.METHOD_NOT_FOUND, "(error code -32601) method '' not found"),  # as Go
        (b'{"jsonrpc":"2.0","params":[],"id":1}', rpc.METHOD_NOT_FOUND, "method '' not found"),
        (b'{"jsonrpc":"2.0","method":"Venus.WdPoStRemoveJob","params":[7],"id":1}',
         rpc.PARSE_ERROR, "unmarshaling params for 'Venus.WdPoStRemoveJob' (param: 0): "),
        (b'{"jsonrpc":"2.0","method":"Venus.WdPoStAllocateJobs","params":[{"AllowedMiners":[-1]},1,"w"],"id":1}',
         rpc.PARSE_ERROR, "(param: 0)"),
        # No job id, worker name, lease or proof type has a NUL (PostgreSQL's text takes none).
        (b'{"method":"Venus.WdPoStResetJob","params":["a\\u0000b"],"id":1}', rpc.PARSE_ERROR,
         "(param: 0)"),
        (b'{"method":"Dext.HeartbeatJobs","params":[[{"Id":"a","Lease":"\\u0000"}],"w"],"id":1}',
         rpc.PARSE_ERROR, "(param: 0)"),
        (b'{"method":"Venus.WdPoStAllocateJobs","params":[{},1,"w\\u0000"],"id":1}',
         rpc.PARSE_ERROR, "(param: 2)"),
        # Numbers no Go integer holds, wherever they are (msgspec's bounds stop at int64).
        (b'{"method":"Venus.WdPoStFinishJob","params":["j",{"faults":[18446744073709551616]},""],"id":1}',
         rpc.PARSE_ERROR, "(param: 1): Expected `int` <= 18446744073709551615 (a uint64) - at `$.faults[0]`"),
        (b'{"method":"Venus.WdPoStAllocateJobs","params":[{"AllowedMiners":[18446744073709551616]},1,"w"],"id":1}',
         rpc.PARSE_ERROR, "(param: 0): Expected `int` <= 18446744073709551615 (a uint64)"),
    ],
)  # fmt: skip
def test_the_request_decoder_says_what_is_wrong(body, code, words):
    with pytest.raises(rpc.RpcError) as caught:
        rpc.parse_request(body)
    assert caught.value.code == code and words in caught.value.message
    assert caught.value.http_status == 500


def test_the_request_decoder_takes_go_nil_slices_and_missing_params():
    call = rpc.parse_request(
        b'{"jsonrpc":"2.0","method":"Venus.WdPoStAllocateJobs","params":[{"AllowedMiners":null,'
        b'"AllowedProofTypes":null,"Extra":1},1,"w"],"id":"a"}'
    )
    assert call.params == (rpc.AllocateSpec(None, None), 1, "w") and call.request_id == "a"
    call = rpc.parse_request(b'{"jsonrpc":"2.0","method":"Venus.WdPoStAllJobs","id":2}')
    assert call.params == ()
    # go-jsonrpc does not look at "jsonrpc": neither do we.
    call = rpc.parse_request(b'{"jsonrpc":"1.0","method":"Venus.WdPoStAllJobs","id":3}')
    assert call.method == "Venus.WdPoStAllJobs"
    # A field of the output left out is Go's zero value: nil.
    call = rpc.parse_request(
        b'{"jsonrpc":"2.0","method":"Venus.WdPoStFinishJob","params":["j",{"proofs":["AAEC"]},""],'
        b'"id":4}'
    )
    assert call.params == ("j", JobOutput(proofs=(b"\0\1\2",), faults=None), "")
    call = rpc.parse_request(
        b'{"jsonrpc":"2.0","method":"Venus.WdPoStFinishJob","params":["j",{},"oom"],"id":5}'
    )
    assert call.params == ("j", JobOutput(None, None), "oom")


async def test_a_stopping_coordinator_answers_the_request_it_is_on_and_takes_no_new_one(
    tmp_path, sqlite_store
):
    # The request waits on the store (SQLite locked by another writer) when the stop comes: it
    # still gets its answer, then the server closes; idle connections and new ones are refused.
    from helpers.supervisor import wait_until

    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store)
        busy, _idle = await connect(server), await connect(server)
        await wait_until(lambda: len(server._slots) == 2, what="both connections accepted")
        writer = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        answers: list[tuple[int, dict]] = []

        async def allocate() -> None:
            answers.append(await busy.call("Venus.WdPoStAllocateJobs", {}, 1, "worker-b"))

        nursery.start_soon(allocate)
        await wait_until(lambda: sum(not c.idle for c in server._slots._open) == 1)
        server.stop()
        await wait_until(lambda: len(server._slots) == 1, what="the idle connection closed")
        writer.execute("ROLLBACK")
        writer.close()
        with trio.fail_after(30):
            await server.stopped.wait()
    [(status, answer)] = answers
    assert status == 200 and answer["result"] == []
    with pytest.raises(OSError, match=r"Connection refused|all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", server.port)


async def test_store_basic_info_answers_the_stores_a_worker_attaches_and_names_an_unknown_one(
    sqlite_store, caplog
):
    # damocles-worker asks it for each of its [[attached]] stores at start, and refuses to start
    # without a non-null answer.
    coordinator = Coordinator(TrioJobStore(sqlite_store), {"store-a": "/mnt/a"})
    async with trio.open_nursery() as nursery:
        server = CoordinatorServer(coordinator, "127.0.0.1", 0)
        await nursery.start(server.serve)
        client = await connect(server)
        status, answer = await client.call("Venus.StoreBasicInfo", "store-a")
        assert status == 200
        assert answer["result"] == {
            "Name": "store-a",
            "Path": "/mnt/a",
            "Strict": False,
            "ReadOnly": False,
            "Weight": 1,
            "Meta": {},
        }
        # An unknown one: null, as damocles answers it; the fix is logged here.
        with caplog.at_level(logging.WARNING, "damocles_ext.coordinator"):
            status, answer = await client.call("Venus.StoreBasicInfo", "store-b")
        assert (status, answer) == (200, {"jsonrpc": "2.0", "result": None, "id": 2})
        [said] = [r.getMessage() for r in caplog.records if "store-b" in r.getMessage()]
        assert "does not know" in said and "--store store-b=PATH" in said
        nursery.cancel_scope.cancel()


async def test_a_store_option_without_a_path_exits_2(tmp_path):
    done = await dext_run_async(
        "coordinator", "--jobs", f"sqlite:///{tmp_path}/jobs.db", "--store", "store-a"
    )
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"expected NAME=PATH" in done.stderr
    with trio.fail_after(30):  # (taken, it would serve until stopped)
        done = await dext_run_async(
            "coordinator", "--jobs", f"sqlite:///{tmp_path}/jobs.db", "--store", "store-a=mnt/a"
        )
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"'store-a=mnt/a': PATH must be absolute, where the store is mounted" in done.stderr
    # A name whose bytes are not UTF-8 (no worker could ever name it): refused, not served.
    with trio.fail_after(30):
        done = await dext_run_async(
            "coordinator", "--jobs", f"sqlite:///{tmp_path}/jobs.db",
            "--store", os.fsdecode(b"store-\xff=/mnt/a"),
        )  # fmt: skip
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"argument --store: 'store-?' is not UTF-8 text: byte \\xff" in done.stderr


async def test_a_source_node_header_without_proxy_exits_2_before_serving(tmp_path):
    # There is no source node to send it to: it was ignored, silently, and the coordinator served.
    with trio.fail_after(30):
        done = await dext_run_async(
            "coordinator", "--jobs", f"sqlite:///{tmp_path}/jobs.db", "--listen", "127.0.0.1:0",
            "--header", "Authorization: Bearer t",
        )  # fmt: skip
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"--header goes with --proxy ADDR: it is sent to that source node" in done.stderr
    assert b"serving" not in done.stderr


TOKEN = "s3cret-token-0123456789"


async def test_with_a_token_every_request_must_carry_it_as_a_bearer_token(sqlite_store):
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store, token=TOKEN)
        client = await connect(server)
        status, body = await client.post(
            msgspec.json.encode({"jsonrpc": "2.0", "method": "Venus.WdPoStAllJobs", "id": 1})
        )
        answer = msgspec.json.decode(body)
        assert status == 401 and answer["error"]["code"] == rpc.UNAUTHORIZED
        assert "requires a bearer token" in answer["error"]["message"]
        assert "a damocles-worker sends no header" in answer["error"]["message"]
        for wrong in ("Bearer not-the-token", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"):
            status, body = await client.post(
                b'{"jsonrpc":"2.0","method":"Venus.WdPoStAllJobs","id":2}',
                headers=[("Authorization", wrong)],
            )
            assert status == 401, wrong
            # Neither the right token nor the one given is ever sent back.
            assert TOKEN.encode() not in body and b"not-the-token" not in body
            assert msgspec.json.decode(body)["error"]["code"] == rpc.UNAUTHORIZED
        # The same connection serves a request that carries it (any case of the scheme).
        for scheme in ("Bearer", "bearer"):
            status, answer = await client.call(
                "Venus.WdPoStAllJobs", headers=[("Authorization", f"{scheme} {TOKEN}")]
            )
            assert (status, answer["result"]) == (200, {"Jobs": [], "MaxTry": 2})
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("open_index", [False, True])
async def test_the_index_may_be_answered_without_the_token_as_a_damocles_proxy_node_asks_it(
    sqlite_store, open_index
):
    # damocles-manager --proxy calls its source with no token (an empty one).
    find = b'{"jsonrpc":"2.0","method":"Venus.SectorIndexerFind","params":["normal",{"Miner":1,"Number":2}],"id":1}'  # fmt: skip
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store, token=TOKEN, index_without_token=open_index)
        client = await connect(server)
        status, body = await client.post(find)
        if open_index:
            assert (status, msgspec.json.decode(body)["result"]["Found"]) == (200, False)
        else:
            assert status == 401
        for other in (b'{"jsonrpc":"2.0","method":"Venus.WdPoStAllJobs","id":2}', b"not json"):
            status, body = await client.post(other)  # every other method still needs it
            assert status == 401 and msgspec.json.decode(body)["error"]["code"] == rpc.UNAUTHORIZED
        nursery.cancel_scope.cancel()


async def test_requests_with_a_wrong_token_are_warned_about_once_per_10_s_naming_the_peer(
    sqlite_store, caplog, autojump_clock
):
    # A worker with the wrong token, retrying: each request got a 401 and nothing was logged at
    # any level, so the coordinator's operator never learnt of it.
    caplog.set_level(logging.DEBUG, "damocles_ext")
    body = b'{"jsonrpc":"2.0","method":"Venus.WdPoStAllJobs","id":1}'

    async def refused(header: bytes) -> str:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        host, port = stream.socket.getsockname()[:2]
        await stream.send_all(
            b"POST /rpc/v0 HTTP/1.1\r\nHost: c\r\n%sContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (header, len(body), body)
        )
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        return f"{host}:{port}"

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith("damocles_ext")]

    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store, token=TOKEN)
        first = await refused(b"Authorization: Bearer not-the-token\r\n")
        for _ in range(99):
            await refused(b"Authorization: Bearer not-the-token\r\n")
        [line] = said()
        assert f"refused a request from {first}: it carries a bearer token that is not" in line
        assert "--token-file" in line and "not-the-token" not in line and TOKEN not in line
        await trio.sleep(11)  # (the mock clock) past the 10 s of the throttle
        peer = await refused(b"Authorization: Basic abc\r\n")
        expected = (
            f"refused a request from {peer}: it carries an Authorization header that is not"
            " `Bearer <token>`; give the client the token of this coordinator's --token-file (or"
            " serve it from a coordinator without one) (99 more like it in the last 10 s)"
        )
        assert said()[1:] == [expected], said()
        await refused(b"")  # within the 10 s: counted, not said
        await trio.sleep(11)
        peer_without = await refused(b"")
        assert len(said()) == 3 and said()[2].startswith(
            f"refused a request from {peer_without}: it carries no Authorization header;"
        ), said()
        assert said()[2].endswith("(1 more like it in the last 10 s)"), said()
        nursery.cancel_scope.cancel()


async def test_without_the_token_a_long_body_is_not_even_read(sqlite_store):
    # Refused on its headers and closed: a client without the token cannot make the coordinator
    # read (up to 16 MiB) bodies it will never use.
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store, token=TOKEN)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(
            b"POST /rpc/v0 HTTP/1.1\r\nHost: c\r\nContent-Length: 1048576\r\n\r\n"
        )
        answer = b""
        with trio.fail_after(30):  # without the check it waits for the body for 120 s
            while chunk := await stream.receive_some(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 ") and b"connection: close" in head.lower()
        assert msgspec.json.decode(body)["error"]["code"] == rpc.UNAUTHORIZED
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, b"does not exist; create it (the token on its first line"),
        ("", b"has no token"),
        ("\n\nsecond-line", b"has no token"),
        ("/dev/zero", b"is over 65536 bytes, longer than any token"),  # read a line, bounded
        ("s\u00e9cret\n", b"cannot be sent in an HTTP header: a header value is sent as ASCII"),
    ],
    ids=["missing", "empty", "blank", "endless", "not-ascii"],
)
async def test_a_missing_empty_or_endless_token_file_exits_2_saying_why(
    tmp_path, content, expected
):
    token_file = tmp_path / "token"
    if content == "/dev/zero":
        token_file.symlink_to(content)
    elif content is not None:
        token_file.write_text(content)
    done = await dext_run_async(
        "coordinator", "--jobs", f"sqlite:///{tmp_path}/jobs.db", "--token-file", str(token_file)
    )
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert expected in done.stderr and str(token_file).encode() in done.stderr


async def test_the_open_index_without_a_token_file_is_a_usage_error(tmp_path):
    done = await dext_run_async(
        "coordinator", "--jobs", f"sqlite:///{tmp_path}/jobs.db", "--index-without-token"
    )
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"--index-without-token goes with --token-file" in done.stderr


@pytest.mark.parametrize(
    ("body", "words", "request_id"),
    [
        # A float past a float64 is read as Go reads it into an interface (out of range: refused
        # where it stands) rather than failing the whole body at an unnamed `$[...]`.
        (b'{"method":"Venus.WdPoStAllocateJobs","params":[{"AllowedMiners":[1e400]},1,"w"],"id":3}',
         "(param: 0): Expected `int`, got `float` - at `$.AllowedMiners[0]`", 3),
        (b'{"method":"Venus.WdPoStFinishJob","params":["j",{"faults":[-1e999]},""],"id":3}',
         "(param: 1): Expected `int`, got `float` - at `$.faults[0]`", 3),
        (b'{"method":"Venus.WdPoStAllJobs","id":1e400}',
         "Expected `int | str | null`, got `float` - at `$.id`", None),
        # An integer of more digits than Python reads: said so, and what to send; wherever it
        # is (before: "more than any param or id takes", but an id of 4,300 digits is taken).
        (b'{"method":"Venus.WdPoStAllJobs","params":[],"id":' + b"9" * 5000 + b"}",
         ("unmarshaling request: a number in it has more digits than this server reads (4300);"
          " send numbers within a uint64"), None),
        (b'{"method":"Venus.WdPoStAllJobs","params":[],"id":1,"x":' + b"9" * 5000 + b"}",
         ("unmarshaling request: a number in it has more digits than this server reads (4300);"
          " send numbers within a uint64"), None),
    ],
)  # fmt: skip
def test_a_number_out_of_range_is_refused_naming_where_it_is(body, words, request_id):
    with pytest.raises(rpc.RpcError) as caught:
        rpc.parse_request(body)
    assert caught.value.code == rpc.PARSE_ERROR
    assert words in caught.value.message and "[...]" not in caught.value.message
    assert caught.value.request_id == request_id  # a refused param's answer carries the id


BIG = b"18446744073709551616"  # 2**64: no Go integer holds it


@pytest.mark.parametrize(
    ("body", "params"),
    [
        (b'{"method":"Venus.WdPoStAllJobs","id":1,"x":1e400}', ()),
        (b'{"method":"Venus.SectorIndexerFind","params":["normal",{"Miner":1,"x":1e400}],"id":1}',
         ("normal", rpc.SectorId(1, 0))),
        # An integer past a uint64 was refused "at `$.x`" wherever it stood.
        (b'{"method":"Venus.SectorIndexerFind","params":["normal",{"Miner":1,"x":' + BIG + b'}],"id":1}',
         ("normal", rpc.SectorId(1, 0))),
        (b'{"method":"Venus.WdPoStAllocateJobs","params":[{"AllowedMiners":[1],"x":[' + BIG + b']},1,"w"],"id":1}',
         (rpc.AllocateSpec([1], None), 1, "w")),
        # WorkerPing's info is read for its Name only (Go reads it as damocles' WorkerInfo).
        (b'{"method":"Venus.WorkerPing","params":[{"Name":"w","x":' + BIG + b'}],"id":1}',
         ({"Name": "w", "x": 2**64},)),
    ],
    ids=["float-envelope", "float-field", "int-field", "int-list-field", "int-worker-info"],
)  # fmt: skip
def test_a_number_out_of_range_under_a_key_no_field_has_is_skipped_as_go_skips_it(body, params):
    call = rpc.parse_request(body)
    assert (call.params, call.request_id) == (params, 1)


def test_only_a_body_with_a_float_past_a_float64_is_read_again_with_its_floats_by_float(
    monkeypatch,
):
    # Every body was read with float() for each float: a body of floats took 4 times as long.
    read_again: list[bytes] = []
    wide = rpc._wide_decoder

    class Counted:
        def decode(self, body: bytes) -> object:
            read_again.append(body)
            return wide.decode(body)

    monkeypatch.setattr(rpc, "_wide_decoder", Counted())
    floats = b"1.5,-0.0,1e308,-1.7976931348623157e308,1e-400,5e-324,0.1"
    within = b'{"method":"Venus.WorkerPing","params":[{"Name":"w","x":[%s]}],"id":1}' % floats
    call = rpc.parse_request(within)
    assert call.params == ({"Name": "w", "x": [1.5, -0.0, 1e308, -1.7976931348623157e308, 0.0,
                                              5e-324, 0.1]},)  # fmt: skip
    assert read_again == []
    past = within.replace(b"1e308,", b"1e400,")
    call = rpc.parse_request(past)
    assert call.params[0]["x"][2] == float("inf")
    assert read_again == [past]


def test_an_id_past_a_uint64_within_the_digits_read_is_given_back():
    rid = int("9" * 4300)
    call = rpc.parse_request(b'{"method":"Venus.WdPoStAllJobs","id":%d}' % rid)
    assert call.request_id == rid
    assert msgspec.json.decode(rpc.encode_result(call.request_id, None))["id"] == rid


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b'[{"jsonrpc":"2.0","method":"Venus.WdPoStAllJobs","params":[],"id":1}]', "an array"),
        (b"[]", "an array"),
        (b"7", "a number"),
        (b'"Venus.WdPoStAllJobs"', "a string"),
        (b"true", "a boolean"),
    ],
)
def test_a_body_that_is_no_request_object_says_what_a_request_is(body, what):
    # Before: "Expected `object | null`, got `array`", which neither says that a batch is not
    # served nor what to send instead.
    with pytest.raises(rpc.RpcError) as caught:
        rpc.parse_request(body)
    message = caught.value.message
    assert message.startswith(f"(error code -32700) unmarshaling request: the body is {what}")
    assert 'send one request object {"jsonrpc":"2.0","method":' in message
    if what == "an array":
        assert "a batch of requests is not served: send each in a POST of its own" in message


def test_a_body_nested_too_deeply_is_a_parse_error_not_an_exception():
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (
        b'{"jsonrpc":"2.0","method":"Venus.WorkerPing","params":[' + deep + b'],"id":1}',
        b'{"jsonrpc":"2.0","method":"Venus.WorkerPing","params":[1],"id":1,"x":' + deep + b"}",
    ):
        with pytest.raises(rpc.RpcError) as caught:
            rpc.parse_request(body)
        assert caught.value.code == rpc.PARSE_ERROR
        assert "nested too deeply" in caught.value.message


async def test_heartbeats_and_finishes_of_unknown_jobs_are_refused_in_damocles_words(job_store):
    coordinator = Coordinator(TrioJobStore(job_store))

    async def error_of(method: str, *params) -> tuple[int, dict]:
        body = msgspec.json.encode(
            {"jsonrpc": "2.0", "method": method, "params": list(params), "id": 3}
        )
        status, data = await coordinator.answer(body)
        return status, msgspec.json.decode(data)["error"]

    assert await error_of("Venus.WdPoStHeartbeatJobs", ["a", "b"], WORKER) == (
        200,
        {"code": rpc.METHOD_ERROR, "message": "job a: key not found; job b: key not found"},
    )
    assert await error_of("Venus.WdPoStFinishJob", "a", None, "failed") == (
        200,
        {"code": rpc.METHOD_ERROR, "message": "job a: key not found"},
    )


async def test_the_sweep_says_what_it_did_to_a_job_in_words(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    limits = rules.JobLimits(heartbeat_timeout=2.0, sweep_interval=0.5)
    async with _a_job_of_worker_a(tmp_path, limits) as (_, now, jobs, taken):
        timeouts = TimeOuts()
        coordinator = Coordinator(jobs, observe=timeouts, watch_clocks=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.sweep_forever)
            now[0] += 60  # worker-a went silent past the 2 s timeout
            await timeouts.wait()  # (its lines are logged with the effects' observation)
            nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if taken.Id in r.getMessage()] == [
        (
            f"sweep: job {taken.Id} timed out: worker 'worker-a' sent no heartbeat for its"
            " HeartbeatTimeout"
        ),
        f"sweep: job {taken.Id} is given to the workers again (tries so far: 1)",
    ]
    # In JSON logs, the job's id and the worker a timeout names are fields.
    docs = [
        json.loads(JsonFormatter().format(r)) for r in caplog.records if "sweep: " in r.getMessage()
    ]
    assert [(d["job_id"], d.get("worker")) for d in docs] == [
        (taken.Id, "worker-a"),
        (taken.Id, None),
    ]


async def test_a_pause_and_a_step_back_seen_by_one_pass_keep_the_pause_where_it_was(sqlite_store):
    # The pass after a 60 s pause (SIGSTOP) finds the wall clock an hour back as well: the
    # pause, read on the clock after the step, was moved back an hour with what came before it,
    # and a job heard before the pause counted it as silence.
    now = [1_700_000_000.0]
    steady = [0.0]
    jobs = TrioJobStore(sqlite_store, clock=lambda: now[0])
    coordinator = Coordinator(jobs, monotonic=lambda: steady[0])
    steady[0] += 1000
    now[0] += 1000
    last = (steady[0], now[0], now[0])
    steady[0] += 61  # a pass every 1 s, 60 s late
    now[0] += 61 - 3600
    coordinator.server_clock.watch(last, 1.0)
    # The 60 s before now could not be heard: silent for 15 s means heard before now - 75.
    assert coordinator.hearing.silent_before(now[0], 15) == now[0] - 75


async def test_a_wall_clock_stepping_back_still_takes_back_a_job_silent_after_the_step(
    sqlite_store,
):
    # NTP steps the clock an hour back (it was ahead). A job given out after the step, or heard
    # from after it, whose worker then dies, is taken back a timeout later, not once the clock
    # has regained the hour.
    now = [1_700_000_000.0]
    steady = [0.0]  # the monotonic clock: the step moves the wall clock only
    jobs = TrioJobStore(sqlite_store, clock=lambda: now[0])
    coordinator = Coordinator(jobs, monotonic=lambda: steady[0])
    before, _ = await jobs.create(make_input(seed=2, proof_type=PROOF))
    await jobs.allocate(rules.AllocationSpec(), 1, "worker-b")
    stepped = Logged("the wall clock stepped back by 3600 s")
    logging.getLogger("damocles_ext.coordinator").addHandler(stepped)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(coordinator.sweep_forever, 0.05))
            now[0] -= 3600
            with trio.fail_after(10):
                await stepped.seen.wait()
            nursery.cancel_scope.cancel()  # (the passes below are made one by one)
    finally:
        logging.getLogger("damocles_ext.coordinator").removeHandler(stepped)
    await jobs.heartbeat([before.Id], "worker-b")  # its last word: the stamp is reset
    job, _ = await jobs.create(make_input(proof_type=PROOF))
    await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
    now[0] += 10
    await coordinator.sweep_once()
    assert (await jobs.get(job.Id)).State == "running"
    now[0] += 6  # silent for a timeout (15 s) after it was given out or heard: taken back
    effects = (await coordinator.sweep_once()).effects
    assert rules.TimedOut(job.Id, "worker-a") in effects
    assert rules.TimedOut(before.Id, "worker-b") in effects
