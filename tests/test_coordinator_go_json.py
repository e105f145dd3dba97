"""The coordinator reads RPC params as damocles-manager does: go-jsonrpc hands each one to Go's
encoding/json, which matches an object's keys to the fields in any case, ignores unknown keys and
takes `null` as Go's nil or as no value. Real HTTP calls to a real coordinator (SQLite)."""

from __future__ import annotations

import json

import msgspec
import pytest
import trio
from test_coordinator import PROOF, WORKER, Client
from test_jobs_rules import make_input

from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
from damocles_ext.jobs import rpc
from damocles_ext.jobs.gojson import go_fold
from damocles_ext.jobs.model import FINISHED, JobOutput
from damocles_ext.jobs.store import TrioJobStore


@pytest.fixture
def jobs(sqlite_store):
    return TrioJobStore(sqlite_store)


async def post(port: int, method: str, params: str) -> tuple[int, dict]:
    """One call whose params are given as raw JSON text (keys twice, nulls)."""
    client = Client(await trio.open_tcp_stream("127.0.0.1", port))
    body = f'{{"jsonrpc":"2.0","method":"{method}","params":{params},"id":1}}'
    status, answer = await client.post(body.encode())
    await client.stream.aclose()
    return status, json.loads(answer)


async def serve(nursery: trio.Nursery, jobs: TrioJobStore) -> int:
    server = CoordinatorServer(Coordinator(jobs), "127.0.0.1", 0)
    await nursery.start(server.serve)
    return server.port


async def test_an_allocation_filter_in_any_case_is_applied_not_dropped(jobs):
    # Before, a key not spelled exactly as Go's field was skipped as unknown: the filter meant
    # "any", and a worker of miner 2000 was given miner 1000's job.
    ours, theirs = make_input(miner=2000, proof_type=PROOF), make_input(miner=1000)
    mine, _ = await jobs.create(ours)
    await jobs.create(theirs)
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, jobs)
        spec = f'{{"allowedminers":[2000],"ALLOWEDPROOFTYPES":["{PROOF}"],"Unknown":1}}'
        status, answer = await post(port, "Venus.WdPoStAllocateJobs", f'[{spec},2,"{WORKER}"]')
        assert status == 200, answer
        assert [job["Id"] for job in answer["result"]] == [mine.Id]
        nursery.cancel_scope.cancel()


async def test_a_key_given_twice_in_two_cases_takes_the_last_as_go_does(jobs):
    first, _ = await jobs.create(make_input(miner=1000))
    second, _ = await jobs.create(make_input(miner=2000))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, jobs)
        spec = '{"AllowedMiners":[1000],"allowedMiners":[2000]}'
        _, answer = await post(port, "Venus.WdPoStAllocateJobs", f'[{spec},2,"w"]')
        assert [job["Id"] for job in answer["result"]] == [second.Id]
        # A later null is Go's nil slice: any miner.
        spec = '{"AllowedMiners":[3000],"allowedminers":null}'
        _, answer = await post(port, "Venus.WdPoStAllocateJobs", f'[{spec},2,"w"]')
        assert [job["Id"] for job in answer["result"]] == [first.Id]
        nursery.cancel_scope.cancel()


async def test_a_finish_whose_output_keys_are_in_another_case_keeps_its_proofs(jobs):
    # Before, {"Proofs": ...} was skipped: the job was finished as a success with no proof.
    job, _ = await jobs.create(make_input(miner=1000))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, jobs)
        _, answer = await post(port, "Venus.WdPoStAllocateJobs", '[{},1,"w"]')
        assert [j["Id"] for j in answer["result"]] == [job.Id]
        output = '{"Proofs":["AAEC"],"FAULTS":[3]}'
        status, answer = await post(port, "Venus.WdPoStFinishJob", f'["{job.Id}",{output},""]')
        assert (status, answer["result"]) == (200, None)
        nursery.cancel_scope.cancel()
    stored = await jobs.get(job.Id)
    assert stored is not None and stored.State == FINISHED
    assert stored.Output == JobOutput(proofs=(b"\0\1\2",), faults=(3,))


async def test_a_sector_id_in_any_case_finds_the_sector(jobs):
    await jobs.create(make_input(miner=1000, sectors=1))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, jobs)
        await post(port, "Venus.WdPoStAllocateJobs", '[{},1,"w"]')  # the index learns it
        for sid in (
            '{"miner":1000,"NUMBER":0}',
            '{"Miner":1000,"number":0,"Extra":{}}',
            '{"Miner":1000,"Number":null}',  # Go: null leaves a number at 0
            '{"Miner":1000,"miner":null,"Number":0}',  # ... or as it was
        ):
            status, answer = await post(port, "Venus.SectorIndexerFind", f'["normal",{sid}]')
            assert status == 200, answer
            assert answer["result"] == {
                "Found": True,
                "Instance": {"SealedFile": "store-a", "CacheDir": "store-b"},
            }, sid
        nursery.cancel_scope.cancel()


async def test_null_params_are_go_zero_values(jobs):
    # go-jsonrpc unmarshals `null` into a struct, a number or a string as their zero value: a
    # null spec is "any miner", and a null error reason is a success.
    job, _ = await jobs.create(make_input(miner=1000))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, jobs)
        status, answer = await post(port, "Venus.WdPoStAllocateJobs", '[null,1,"w"]')
        assert [j["Id"] for j in answer["result"]] == [job.Id], answer
        status, answer = await post(port, "Venus.WdPoStHeartbeatJobs", f'[["{job.Id}",null],"w"]')
        assert status == 200 and "job : key not found" in answer["error"]["message"], answer
        status, answer = await post(port, "Venus.WdPoStHeartbeatJobs", '[null,"w"]')
        assert (status, answer["result"]) == (200, None), answer
        output = '{"proofs":["AAEC"],"faults":null}'
        status, answer = await post(port, "Venus.WdPoStFinishJob", f'["{job.Id}",{output},null]')
        assert (status, answer["result"]) == (200, None), answer
        status, answer = await post(port, "Venus.WdPoStAllocateJobs", '[{},null,"w"]')
        assert (status, answer["result"]) == (200, [])  # none asked for
        nursery.cancel_scope.cancel()
    stored = await jobs.get(job.Id)
    assert stored is not None and stored.succeeded and stored.Output is not None


async def test_a_bad_value_under_a_key_in_another_case_is_a_clear_error(jobs):
    # Before, the key was skipped and the call made without it: no error at all.
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, jobs)
        for method, params, where in [
            ("Venus.WdPoStAllocateJobs", '[{"allowedMiners":["x"]},1,"w"]',
             "(param: 0): Expected `int`, got `str` - at `$.AllowedMiners[0]`"),
            ("Venus.WdPoStFinishJob", '["j",{"Faults":[-1]},""]',
             "(param: 1): Expected `int` >= 0 - at `$.faults[0]`"),
            ("Venus.SectorIndexerFind", '["normal",{"miner":"1000"}]',
             "(param: 1): Expected `int`, got `str` - at `$.Miner`"),
        ]:  # fmt: skip
            status, answer = await post(port, method, params)
            assert (status, answer["error"]["code"]) == (500, rpc.PARSE_ERROR), answer
            message = answer["error"]["message"]
            assert f"unmarshaling params for '{method}' {where}" in message, message
        nursery.cancel_scope.cancel()


async def test_a_worker_ping_whose_name_key_is_in_another_case_keeps_the_worker_live(jobs):
    now = [1000.0]
    jobs.clock = lambda: now[0]
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, jobs)
        await post(port, "Venus.WdPoStAllocateJobs", f'[{{}},1,"{WORKER}"]')
        now[0] = 5000.0
        status, answer = await post(port, "Venus.WorkerPing", f'[{{"name":"{WORKER}"}}]')
        assert (status, answer["result"]) == (200, None)
        nursery.cancel_scope.cancel()
    [seen] = (await jobs.summary()).workers
    assert (seen.worker, seen.last_seen) == (WORKER, 5000.0)


def test_go_folds_the_long_s_and_the_kelvin_sign_with_ascii_letters():
    assert go_fold("allowedMiners") == go_fold("ALLOWEDMINERS") == "ALLOWEDMINERS"
    assert go_fold("allowedMiner\u017f") == "ALLOWEDMINERS"  # U+017F: Go folds it with s
    assert go_fold("\u212aey") == "KEY"  # the Kelvin sign: with k
    assert go_fold("\u0130d") != "ID"  # not İ: Go's simple folding keeps it apart from I


async def test_a_request_whose_envelope_keys_are_in_another_case_is_served(jobs):
    # go-jsonrpc decodes the request itself with encoding/json too: `"Method"` is its method.
    # Before, it was skipped, and the call answered "method '' not found".
    job, _ = await jobs.create(make_input(miner=1000))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, jobs)
        client = Client(await trio.open_tcp_stream("127.0.0.1", port))
        body = b'{"JSONRPC":"2.0","Method":"Venus.WdPoStAllocateJobs","PARAMS":[{},1,"w"],"Id":7}'
        status, answer = await client.post(body)
        assert status == 200, answer
        assert json.loads(answer) == {
            "jsonrpc": "2.0",
            "result": [{"Id": job.Id, "Input": json.loads(msgspec.json.encode(job.Input))}],
            "id": 7,
        }
        nursery.cancel_scope.cancel()


async def test_a_param_error_says_what_to_send(jobs):
    assert set(rpc.PARAM_FORMS) == set(rpc.METHODS)  # every method says its params
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, jobs)
        for method, params, form in [
            ("Venus.SectorIndexerFind", '["normal",{"Miner":"x"}]',
             '["normal" or "upgrade", {"Miner":miner id,"Number":sector number}]'),
            ("Venus.WdPoStFinishJob", '["j",5,""]',
             '[job id, {"proofs":[base64],"faults":[sector numbers]} or null, error reason or ""]'),
            ("Venus.WdPoStHeartbeatJobs", '[["j"]]', "[[job ids], worker name]"),
        ]:  # fmt: skip
            status, answer = await post(port, method, params)
            assert status == 500, answer
            message = answer["error"]["message"]
            assert message.endswith(f"; send the params of '{method}' as {form}"), message
        nursery.cancel_scope.cancel()


def test_each_params_type_is_described_once_not_at_every_call():
    # msgspec's description of a type takes hundreds of microseconds: made at every call, it
    # made reading a call's params a hundred times slower (bench: 6 us became 0.7 ms).
    from damocles_ext.jobs import gojson, rpc

    body = json.dumps(
        {
            "method": "Venus.WdPoStAllocateJobs",
            "id": 1,
            "params": [{"allowedMiners": [1000]}, 1, "w1"],
        }
    ).encode()
    rpc.parse_request(body)
    made = gojson._shaper_of.cache_info().misses
    for _ in range(3):
        assert rpc.parse_request(body).params[0].AllowedMiners == [1000]
    assert gojson._shaper_of.cache_info().misses == made
