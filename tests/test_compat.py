"""Mixed versions, as a rolling upgrade has them for hours: the messages older damocles-ext peers
actually send, byte for byte as their code wrote them, read by this version's code (sans-IO,
no old checkout). docs/JOBS.md "Rolling upgrades" says which directions are supported."""

from __future__ import annotations

import msgspec

from damocles_ext.frontends.worker_state import StopSignal
from damocles_ext.jobs import rpc
from damocles_ext.jobs.worker_rules import PulledJob
from damocles_ext.protocol import dext
from damocles_ext.status import parse_document

SEED = [7] * 31 + [7]
INPUT = {
    "Sectors": [
        {
            "SectorId": 1,
            "CommR": [1] * 32,
            "Upgrade": False,
            "Accesses": {"SealedFile": "store-a", "CacheDir": "store-a"},
        }
    ],
    "MinerId": 1000,
    "ProofType": "StackedDrgWindow2KiBV1_2",
    "Seed": SEED,
}


def test_the_calls_of_the_first_damocles_ext_worker_are_served():
    # The first worker (its allocate_params sent empty filters as null, later ones as []).
    bodies = [
        b'{"jsonrpc":"2.0","method":"Venus.StoreBasicInfo","params":["store-a"],"id":1}',
        (
            b'{"jsonrpc":"2.0","method":"Dext.AllocateJobs","params":[{"AllowedMiners":null,'
            b'"AllowedProofTypes":null},2,"w-old"],"id":2}'
        ),
        (
            b'{"jsonrpc":"2.0","method":"Dext.HeartbeatJobs","params":[[{"Id":"j1",'
            b'"Lease":"ab"}],"w-old"],"id":3}'
        ),
        (
            b'{"jsonrpc":"2.0","method":"Dext.FinishJob","params":["j1","ab",'
            b'{"proofs":["AAE="],"faults":[]},""],"id":4}'
        ),
        # (its pings, from the first worker that sent them: WorkerInfo{Name, Dest, Version,
        # Summary})
        (
            b'{"jsonrpc":"2.0","method":"Venus.WorkerPing","params":[{"Name":"w-old",'
            b'"Dest":"10.0.0.5:17890","Version":"damocles-ext v0.1.0","Summary":{"Threads":2,'
            b'"Empty":2,"Paused":0,"Running":0,"Waiting":0,"Errors":0}}],"id":5}'
        ),
    ]
    calls = [rpc.parse_request(body) for body in bodies]
    assert [c.method for c in calls] == [
        "Venus.StoreBasicInfo", "Dext.AllocateJobs", "Dext.HeartbeatJobs", "Dext.FinishJob",
        "Venus.WorkerPing",
    ]  # fmt: skip
    assert calls[1].params == (rpc.AllocateSpec(None, None), 2, "w-old")
    assert calls[2].params == ([rpc.JobLease("j1", "ab")], "w-old")
    assert calls[3].params[2].proofs == (b"\x00\x01",)


def test_the_answers_of_the_first_coordinator_with_dext_methods_are_read():
    # Its leased_job and its heartbeat's stop list, as it wrote them.
    job = {"Id": "j1", "Input": INPUT, "Lease": "ab", "NotAfter": 1.7e9, "DeadlineIdx": 3,
           "Partitions": [0], "TryNum": 1}  # fmt: skip
    pulled = msgspec.convert(job, PulledJob)
    assert (pulled.Lease, pulled.NotAfter, pulled.Input.MinerId) == ("ab", 1.7e9, 1000)
    [stop] = msgspec.json.decode(
        b'[{"Id":"j1","Reason":"lease_lost","Message":"given to another worker"}]',
        type=list[StopSignal],
    )
    assert stop.Reason == "lease_lost"
    # And what a newer one may add is skipped, in either answer.
    assert msgspec.convert({**job, "Later": 1}, PulledJob) == pulled
    assert msgspec.convert({"Id": "j1", "Reason": "x", "Later": 1}, StopSignal).Id == "j1"


def test_a_hello_of_a_child_older_than_the_queue_field_offers_no_queue():
    # The first dext/1 encoder wrote a Hello's fields in order, without `queue`.
    old = {"type": "hello", "protocol": "dext/1", "stage": "window_post", "pid": 42,
           "prover": "p", "version": "1", "capacity": 2}  # fmt: skip
    payload = msgspec.msgpack.encode(old)
    hello = dext.decode_payload(payload)
    assert hello == dext.Hello("dext/1", "window_post", 42, "p", "1", capacity=2, queue=0)


def test_a_status_document_of_a_supervisor_older_than_the_breaker_and_exiting_is_read():
    # The document of the first `run` with a status (no benched_for, on_probation, exiting,
    # lock_files.problems, worker).
    child = {
        "name": "window_post#0", "stage": "window_post", "index": 0, "pid": 10, "gpu": None,
        "state": "ready", "next_start_in": None, "in_flight": 0, "capacity": 1, "done": 0,
        "failed": 0, "restarts": 0, "last_exit": None, "started_at": 1.0, "uptime": 2.0,
        "protocol": "dext", "processes": 1, "rss_bytes": 1, "cpu_percent": 0.0, "locks": [],
        "locks_held": [], "lock_files": {"dir": "/tmp", "gpu": None, "priority": None},
    }  # fmt: skip
    supervisor = {"pid": 9, "version": "0.1.0", "started_at": 1.0, "uptime": 2.0,
                  "requests": 0, "shutting_down": False, "socket": None, "metrics": None,
                  "rss_bytes": None, "cpu_percent": None}  # fmt: skip
    doc = parse_document(
        {
            "schema": "damocles-ext/status/1",
            "time": 3.0,
            "supervisor": supervisor,
            "children": [child],
            "stages": [],
        }
    )
    [read] = doc.children
    assert (read.benched_for, read.on_probation, read.exiting) == (None, False, [])
    assert doc.worker is None
