"""Our Dext.* RPC methods (leases, stop signals, fenced finishes) over real HTTP, through the
RpcClient, on a real SQLite store with a clock the test moves."""

from __future__ import annotations

import msgspec
import pytest
import trio
from test_jobs_rules import make_input

from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
from damocles_ext.jobs import rpc
from damocles_ext.jobs.client import RpcCallError, RpcClient
from damocles_ext.jobs.model import WdPoStInput
from damocles_ext.jobs.store import JobStore, TrioJobStore

T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def job_store(request: pytest.FixtureRequest, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/jobs.db"
    else:
        url = request.getfixturevalue("postgres_url")
    with JobStore.open(url) as s:
        yield s


class Setup:
    def __init__(self, job_store: JobStore) -> None:
        self.now = T0
        self.jobs = TrioJobStore(job_store, clock=lambda: self.now)
        self.server = CoordinatorServer(Coordinator(self.jobs), "127.0.0.1", 0)

    def client(self) -> RpcClient:
        return RpcClient(f"127.0.0.1:{self.server.port}")


async def test_allocation_gives_as_many_jobs_as_free_slots_each_with_its_lease(job_store):
    s = Setup(job_store)
    late, _ = await s.jobs.create(make_input(seed=1), deadline_idx=7, partitions=[0, 1])
    soon, _ = await s.jobs.create(make_input(seed=2), deadline_idx=3, not_after=T0 + 600)
    await s.jobs.create(make_input(seed=3))
    async with trio.open_nursery() as nursery, s.client() as client:
        await nursery.start(s.server.serve)
        got = await client.call("Dext.AllocateJobs", {}, 2, "gpu-1")
        # Earliest deadline first; each with the lease to carry.
        assert [j["Id"] for j in got] == [soon.Id, late.Id]
        assert got[0]["NotAfter"] == T0 + 600 and got[1]["NotAfter"] is None
        assert (got[0]["DeadlineIdx"], got[1]["DeadlineIdx"]) == (3, 7)
        assert got[1]["Partitions"] == [0, 1] and got[0]["TryNum"] == 1
        assert msgspec.convert(got[1]["Input"], WdPoStInput) == late.Input
        stored = {j.Id: j for j in await s.jobs.list_jobs()}
        assert [j["Lease"] for j in got] == [stored[soon.Id].lease, stored[late.Id].lease]
        assert len({j["Lease"] for j in got}) == 2
        assert await client.call("Dext.AllocateJobs", {}, 0, "gpu-1") == []
        nursery.cancel_scope.cancel()


async def test_a_finish_counts_only_from_the_current_lease(job_store):
    s = Setup(job_store)
    job, _ = await s.jobs.create(make_input())
    output = {"proofs": ["AAEC"], "faults": []}
    async with trio.open_nursery() as nursery, s.client() as client:
        await nursery.start(s.server.serve)
        [got] = await client.call("Dext.AllocateJobs", {}, 1, "gpu-1")
        with pytest.raises(RpcCallError) as caught:
            await client.call("Dext.FinishJob", job.Id, "not-the-lease", output, "")
        assert caught.value.code == rpc.REFUSED and caught.value.status == 200
        assert "given to another worker" in caught.value.message
        assert (await s.jobs.get(job.Id)).State == "running"
        await client.call("Dext.FinishJob", job.Id, got["Lease"], output, "")
        done = await s.jobs.get(job.Id)
        assert done.succeeded and done.Output is not None and done.Output.proofs == (b"\0\1\2",)
        # The same finish again (its answer lost to a coordinator's restart) is acknowledged
        # and changes nothing; another lease's is refused.
        await client.call("Dext.FinishJob", job.Id, got["Lease"], None, "a changed mind")
        assert await s.jobs.get(job.Id) == done
        with pytest.raises(RpcCallError) as caught:
            await client.call("Dext.FinishJob", job.Id, "not-the-lease", output, "")
        assert caught.value.code == rpc.REFUSED and "finished" in caught.value.message
        with pytest.raises(RpcCallError) as caught:
            await client.call("Dext.FinishJob", "nope", got["Lease"], None, "x")
        assert caught.value.code == rpc.REFUSED and "removed" in caught.value.message
        nursery.cancel_scope.cancel()


async def test_a_damocles_workers_late_finish_does_not_end_a_job_a_dext_worker_now_runs(job_store):
    # A damocles-worker (Venus, no lease sent) went silent; its job was taken back and given to
    # a damocles-ext worker (Dext, lease carried). The damocles-worker's stale failure must not
    # end the job nor leave the Dext worker's proof acknowledged and dropped.
    s = Setup(job_store)
    job, _ = await s.jobs.create(make_input())
    output = {"proofs": ["AAEC"], "faults": []}
    async with trio.open_nursery() as nursery, s.client() as client:
        await nursery.start(s.server.serve)
        await client.call("Venus.WdPoStAllocateJobs", {}, 1, "10.0.0.1")
        s.now += 60
        await s.jobs.sweep()
        [got] = await client.call("Dext.AllocateJobs", {}, 1, "dext-w2")
        with pytest.raises(RpcCallError) as caught:
            await client.call("Venus.WdPoStFinishJob", job.Id, None, "stale failure")
        assert "carries its lease" in caught.value.message
        held = await s.jobs.get(job.Id)
        assert (held.State, held.WorkerName, held.ErrorReason) == ("running", "dext-w2", "")
        assert await client.call("Dext.HeartbeatJobs", [{"Id": job.Id, "Lease": got["Lease"]}],
                                 "dext-w2") == []  # fmt: skip
        await client.call("Dext.FinishJob", job.Id, got["Lease"], output, "")
        done = await s.jobs.get(job.Id)
        assert done.succeeded and done.Output is not None and done.Output.proofs == (b"\0\1\2",)
        nursery.cancel_scope.cancel()


async def test_heartbeats_answer_which_jobs_to_stop_and_why(job_store):
    s = Setup(job_store)
    ids = {}
    for name, seed in [("ok", 1), ("timed", 2), ("reset", 3), ("removed", 4), ("deadline", 5),
                       ("finished", 6)]:  # fmt: skip
        not_after = T0 + 100 if name == "deadline" else None
        job, _ = await s.jobs.create(make_input(seed=seed), not_after=not_after)
        ids[job.Id] = name
    async with trio.open_nursery() as nursery, s.client() as a, s.client() as b:
        await nursery.start(s.server.serve)
        held = await a.call("Dext.AllocateJobs", {}, 6, "gpu-a")
        lease = {ids[j["Id"]]: {"Id": j["Id"], "Lease": j["Lease"]} for j in held}
        assert len(lease) == 6
        assert await a.call("Dext.HeartbeatJobs", list(lease.values()), "gpu-a") == []

        await a.call("Venus.WdPoStResetJob", lease["reset"]["Id"])
        await a.call("Venus.WdPoStRemoveJob", lease["removed"]["Id"])
        await a.call("Dext.FinishJob", lease["finished"]["Id"], lease["finished"]["Lease"],
                     None, "out of memory")  # fmt: skip
        s.now += 101  # past the deadline, not yet swept
        stop = await a.call("Dext.HeartbeatJobs", list(lease.values()), "gpu-a")
        reasons = {ids[x["Id"]]: x["Reason"] for x in stop}
        # "ok" and "timed" went 101 s without a heartbeat, but no sweep took them back yet:
        # they are still gpu-a's.
        assert reasons == {
            "reset": "reset",
            "removed": "removed",
            "deadline": "cancelled",
            "finished": "finished",
        }
        assert all(x["Message"] for x in stop)
        assert "out of memory" in {ids[x["Id"]]: x["Message"] for x in stop}["finished"]

        # gpu-a went silent past the heartbeat timeout on "ok" and "timed": the sweep takes them
        # back, and gpu-b is given one of them.
        s.now += 30
        await s.jobs.sweep()
        [taken] = await b.call("Dext.AllocateJobs", {}, 1, "gpu-b")
        other = "timed" if ids[taken["Id"]] == "ok" else "ok"
        stop = await a.call(
            "Dext.HeartbeatJobs", [lease["ok"], lease["timed"], lease["deadline"]], "gpu-a"
        )
        reasons = {ids[x["Id"]]: x["Reason"] for x in stop}
        assert reasons == {ids[taken["Id"]]: "lease_lost", other: "timed_out",
                           "deadline": "cancelled"}  # fmt: skip
        # The new holder is not told to stop.
        assert await b.call("Dext.HeartbeatJobs", [{"Id": taken["Id"], "Lease": taken["Lease"]}],
                            "gpu-b") == []  # fmt: skip
        nursery.cancel_scope.cancel()


def test_the_dext_methods_check_their_params():
    body = b'{"jsonrpc":"2.0","method":"Dext.HeartbeatJobs","params":[[{"Id":"x"}],"w"],"id":1}'
    with pytest.raises(rpc.RpcError) as caught:
        rpc.parse_request(body)
    assert caught.value.code == rpc.PARSE_ERROR and "Lease" in caught.value.message


async def test_an_unknown_dext_method_or_a_refused_finish_is_an_error_answer_with_the_id(job_store):
    coordinator = Coordinator(TrioJobStore(job_store))

    async def answer(method: str, params: list, request_id: int) -> tuple[int, dict]:
        body = msgspec.json.encode(
            {"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}
        )
        status, data = await coordinator.answer(body)
        return status, msgspec.json.decode(data)

    status, got = await answer("Dext.NoSuchMethod", [], 7)
    assert (status, got["error"]["code"], got["id"]) == (500, rpc.METHOD_NOT_FOUND, 7)
    status, got = await answer("Dext", [], 8)
    assert (status, got["error"]["code"], got["id"]) == (500, rpc.METHOD_NOT_FOUND, 8)
    status, got = await answer("Dext.FinishJob", ["no-such-job", "lease", None, ""], 9)
    assert (status, got["error"]["code"], got["id"]) == (200, rpc.REFUSED, 9)
    assert "does not exist" in got["error"]["message"]


def test_every_dext_method_rpc_accepts_is_served(job_store):
    dext = Coordinator(TrioJobStore(job_store)).dext
    accepted = {name.removeprefix("Dext.") for name in rpc.METHODS if name.startswith("Dext.")}
    assert accepted == set(dext._methods)
