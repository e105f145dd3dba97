"""`damocles-ext worker` and `damocles-ext wdpost --manager` against a damocles-manager look-alike
(tests/helpers/damocles_manager.py: damocles' kv job manager and go-jsonrpc's forms, none of our
coordinator's code): what the manager receives, in damocles' exact forms, and what the worker
does with damocles' answers. Real children, real HTTP."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import urllib.error
import urllib.request

import pytest
import trio
from helpers.damocles_manager import KEY_NOT_FOUND, DamoclesManager
from helpers.frontend import DEXT, dext_env, empty_store, plugin_block
from test_worker import children, job_input, start_worker, worker_settings

from damocles_ext.errors import UsageError
from damocles_ext.frontends.worker import Worker
from damocles_ext.frontends.worker_beats import heartbeat_plain
from damocles_ext.frontends.worker_state import EMPTY_INPUT, HeldJob
from damocles_ext.jobs.client import RpcClient
from damocles_ext.jobs.model import HEARTBEAT_TIMEOUT_REASON
from damocles_ext.jobs.worker_rules import Api, PulledJob, proof_types_for_sizes

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

SLEEP_60 = {"seconds": 60, "progress_interval": 0.05}


@pytest.fixture
def manager():
    with DamoclesManager() as m:
        yield m


async def until(manager: DamoclesManager, predicate) -> None:
    """Wait (in a thread, at most 30 s) until the manager's state makes `predicate` hold."""
    await trio.to_thread.run_sync(manager.wait_for, predicate, abandon_on_cancel=True)


@contextlib.asynccontextmanager
async def pulling(manager: DamoclesManager, worker: Worker):
    """The worker running against the manager for a minute at most; stopped at the end."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            running = await start_worker(nursery, worker)
            yield
            await running.stop()


def venus_calls(manager: DamoclesManager, method: str) -> list[list]:
    return manager.params_of(f"Venus.{method}")


def test_the_look_alike_answers_in_damocles_forms(manager):
    def post(method: str, *params) -> tuple[int, dict]:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        request = urllib.request.Request(manager.url, body.encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    jid = manager.create(job_input())
    assert post("Dext.AllocateJobs", {}, 1, "w") == (500, {
        "jsonrpc": "2.0", "id": 1,
        "error": {"code": -32601, "message": "(error code -32601) method 'Dext.AllocateJobs' not found"},
    })  # fmt: skip
    status, answer = post("Venus.WdPoStHeartbeatJobs", [jid, "nope"], "w")
    assert (status, answer["error"]) == (200, {"code": 1, "message": KEY_NOT_FOUND})
    # The batch failed as a whole: the ready job it named first was not taken.
    assert manager.job(jid).State == "ready2run"
    status, answer = post("Venus.WdPoStResetJob", "nope")
    assert answer["error"]["message"] == "job 'nope' does not exist"
    assert post("Venus.WdPoStRemoveJob", "nope")[1]["result"] is None
    assert post("Venus.StoreBasicInfo", "nope")[1]["result"] is None


async def test_the_worker_command_pulls_heartbeats_and_finishes_in_damocles_worker_forms(
    manager, tmp_path
):
    config = tmp_path / "ext-prover.cfg"
    config.write_text(plugin_block("WdPost", "sleep", seconds=1.0, progress_interval=0.05))
    other = manager.create(job_input(miner=1001))
    jid = manager.create(job_input(miner=1000))
    with trio.fail_after(60):
        proc = await trio.lowlevel.open_process(
            [*DEXT, "worker", "--manager", manager.url, "-c", str(config), "--name", "w9",
             "--attached", f"store-a={empty_store()}", "--allowed-miners", "1000",
             "--allowed-sizes", "2KiB", "--heartbeat-interval", "0.2"],
            env=dext_env(), stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            await until(manager, lambda m: m.job(jid).State == "finished")
            proc.send_signal(signal.SIGTERM)
            err = b""
            while chunk := await proc.stderr.receive_some(4096):
                err += chunk
            assert await proc.wait() == 0, err.decode()
        finally:
            proc.kill()
            await proc.wait()
    done = manager.job(jid)
    assert done.ErrorReason == "" and done.TryNum == 1 and done.WorkerName == "w9"
    assert done.Output.proofs and done.Output.faults == ()
    assert manager.job(other).State == "ready2run"  # another miner's
    methods = [m for m, _ in manager.calls]
    # The start check: each attached store known to the manager, before anything else.
    assert manager.calls[0] == ("Venus.StoreBasicInfo", ["store-a"])
    # Our allocation is tried once; its -32601 switches the worker to damocles' for good.
    assert methods.count("Dext.AllocateJobs") == 1
    assert not [m for m in methods if m.startswith("Dext.") and m != "Dext.AllocateJobs"]
    spec = {"AllowedMiners": [1000], "AllowedProofTypes": list(proof_types_for_sizes(["2KiB"]))}
    allocations = venus_calls(manager, "WdPoStAllocateJobs")
    assert allocations and all(p == [spec, 1, "w9"] for p in allocations)
    beats = venus_calls(manager, "WdPoStHeartbeatJobs")
    assert len(beats) >= 2 and all(p == [[jid], "w9"] for p in beats)
    [finish] = venus_calls(manager, "WdPoStFinishJob")
    assert finish[0] == jid and finish[2] == "" and set(finish[1]) == {"proofs", "faults"}
    [ping] = venus_calls(manager, "WorkerPing")[:1]
    assert ping[0]["Name"] == "w9" and manager.pings["w9"]["Info"] == ping[0]
    assert b"Traceback" not in err


async def test_a_failed_proof_is_finished_with_its_error_text_and_no_output(manager, tmp_path):
    jid = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0, fail="always"))
    worker = Worker(worker_settings(manager.url, kids))
    async with pulling(manager, worker):
        await until(manager, lambda m: m.job(jid).State == "finished")
    [(finished, output, error)] = venus_calls(manager, "WdPoStFinishJob")
    assert finished == jid and output is None and "sleep prover failing as configured" in error
    assert manager.job(jid).ErrorReason == error and worker.api is Api.VENUS
    # No filter: empty lists, as damocles-worker's wdpost threads send them.
    [spec, *_] = venus_calls(manager, "WdPoStAllocateJobs")[0]
    assert spec == {"AllowedMiners": [], "AllowedProofTypes": []}


async def test_a_job_with_fields_a_newer_damocles_added_is_proved_not_failed(manager, tmp_path):
    # damocles-worker (serde) skips the fields it does not know. Before, our worker refused such
    # an input as unreadable and failed the job at once, on every try.
    manager.added_fields = True
    jid = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0))
    worker = Worker(worker_settings(manager.url, kids))
    async with pulling(manager, worker):
        await until(manager, lambda m: m.job(jid).State == "finished")
    done = manager.job(jid)
    assert (done.ErrorReason, done.TryNum) == ("", 1) and done.Output.proofs


async def test_a_removed_job_is_found_by_heartbeating_one_by_one_and_cancelled(
    manager, tmp_path, recorder
):
    rec, pm = recorder
    kept, gone = manager.create(job_input(seed=1)), manager.create(job_input(seed=2))
    kids = children(tmp_path, plugin_block("WdPost", "sleep", **SLEEP_60) * 2)
    worker = Worker(worker_settings(manager.url, kids, shutdown_grace=0.2), plugin_manager=pm)
    async with pulling(manager, worker):
        await worker.wait_for(lambda: len(worker.held) == 2)
        # One job per allocation call, as damocles-worker asks.
        assert [p[1] for p in venus_calls(manager, "WdPoStAllocateJobs")][:2] == [1, 1]
        await until(manager, lambda m: any(len(p[0]) == 2 for p in m.params_of(
            "Venus.WdPoStHeartbeatJobs")))  # fmt: skip
        manager.forget_calls()
        await trio.to_thread.run_sync(manager.call, "WdPoStRemoveJob", gone)
        # The batch heartbeat fails as a whole; alone, only the removed job's fails.
        assert (await rec.next("finished"))[2] == "cancelled"
        assert set(worker.held) == {kept}
        beats = [p[0] for p in venus_calls(manager, "WdPoStHeartbeatJobs")]
        assert sorted([kept, gone]) in [sorted(b) for b in beats] and [gone] in beats
        assert manager.job(kept).State == "running"
        assert worker.counters.stopped_by == {"not_running": 1}
    assert not venus_calls(manager, "WdPoStFinishJob")


async def test_a_heartbeat_taken_one_job_at_a_time_is_a_heartbeat_as_in_the_batch(
    manager, tmp_path
):
    # When the batch fails for a job the manager no longer has, each job is heartbeated alone:
    # the one taken then kept its old last heartbeat, and an outage of the heartbeats stayed
    # open until a batch was answered.
    kept = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(worker_settings(manager.url, kids), clock=lambda: 1234.0)
    held = [HeldJob(PulledJob(Id=i, Input=EMPTY_INPUT), 0.0, state="finishing")
            for i in (kept, "gone")]  # fmt: skip
    with trio.fail_after(30):
        worker._unreachable("the manager's store fails", worker._beats_failing)
        async with RpcClient(worker.settings.endpoint, timeout=10) as beats:
            await heartbeat_plain(worker, beats, held)
    assert [p[0] for p in venus_calls(manager, "WdPoStHeartbeatJobs")] == [
        [kept, "gone"],
        [kept],
        ["gone"],
    ]
    assert [h.last_heartbeat for h in held] == [1234.0, None]
    assert worker._beats_failing.down_since is None


async def test_a_job_gone_from_the_manager_stops_its_proof_but_not_its_result_being_finished(
    manager, tmp_path
):
    # Heartbeated alone, a job the manager no longer has: a proof running is cancelled, but a
    # result being delivered goes on (damocles-manager takes a finish whatever the job's state).
    # Before, stopping the finishing one too failed no test: the result, done, was dropped.
    kept = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(worker_settings(manager.url, kids), clock=lambda: 1234.0)
    held = [HeldJob(PulledJob(Id=i, Input=EMPTY_INPUT), 0.0, state=state)
            for i, state in ((kept, "proving"), ("gone-proving", "proving"),
                             ("gone-finishing", "finishing"))]  # fmt: skip
    worker.held = {h.job.Id: h for h in held}
    with trio.fail_after(30):
        async with RpcClient(worker.settings.endpoint, timeout=10) as beats:
            await heartbeat_plain(worker, beats, held)
    assert [h.stop_reason is not None for h in held] == [False, True, False]
    assert [h.scope.cancel_called for h in held] == [False, True, False]
    assert worker.counters.stopped_by == {"not_running": 1}


async def test_a_job_reset_while_it_runs_is_taken_back_by_its_next_heartbeat_as_in_damocles(
    manager, tmp_path
):
    # damocles' heartbeat moves a ready job to running: a reset does not reach the worker, whose
    # proof goes on and is delivered (damocles-worker does the same).
    jid = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=2, progress_interval=0.05))
    worker = Worker(worker_settings(manager.url, kids))
    async with pulling(manager, worker):
        await worker.wait_for(lambda: jid in worker.held)
        await trio.to_thread.run_sync(manager.call, "WdPoStResetJob", jid)
        await until(manager, lambda m: m.job(jid).State == "running" and m.job(jid).WorkerName)
        await worker.wait_for(lambda: worker.counters.delivered == 1)
    done = manager.job(jid)
    assert done.State == "finished" and done.ErrorReason == "" and done.TryNum == 0
    assert worker.counters.stopped == 0


async def test_a_job_timed_out_at_its_last_try_is_cancelled_and_not_finished(manager, tmp_path):
    now = [1_000_000.0]
    manager.clock, manager.job_max_try = (lambda: now[0]), 1
    jid = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", **SLEEP_60))
    worker = Worker(worker_settings(manager.url, kids, shutdown_grace=0.2))
    async with pulling(manager, worker):
        await worker.wait_for(lambda: jid in worker.held)
        now[0] += 60  # no heartbeat for a minute, as the manager's clock says
        manager.sweep()
        assert manager.job(jid).ErrorReason == HEARTBEAT_TIMEOUT_REASON
        await worker.wait_for(lambda: worker.counters.stopped == 1)
    assert manager.job(jid).State == "finished" and not venus_calls(manager, "WdPoStFinishJob")


async def test_the_manager_going_down_is_waited_out_logged_once_and_the_result_delivered_after(
    manager, tmp_path, caplog
):
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    jid = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=1.0, progress_interval=0.05))
    worker = Worker(worker_settings(manager.url, kids))
    async with pulling(manager, worker):
        await worker.wait_for(lambda: jid in worker.held)
        manager.stop()
        # The proof ends; its finish finds no manager, and is sent again after a backoff.
        await worker.wait_for(
            lambda: jid in worker.held and worker.held[jid].delivery_failures >= 2
        )
        assert not worker.manager_reachable
        manager.start()  # the same port
        await worker.wait_for(lambda: worker.counters.delivered == 1)
    assert manager.job(jid).State == "finished" and manager.job(jid).Output.proofs
    [(_, output, error)] = venus_calls(manager, "WdPoStFinishJob")
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "the manager is unreachable" in m]) == 1, lines
    assert len([m for m in lines if "the manager answers again" in m]) == 1, lines
    assert output["proofs"] and error == "" and worker.counters.given_up == 0


async def test_a_manager_down_while_every_slot_proves_is_shown_unreachable_by_the_heartbeats(
    manager, tmp_path, caplog
):
    # The usual state during WindowPoSt: every slot proving, so no allocation and no finish is
    # sent, only heartbeats. Before, a heartbeat refused its connection counted for the
    # heartbeats' own outage only: manager_reachable stayed True (the gauge at 1, no
    # UNREACHABLE in status) for as long as the manager was down.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    jid = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", **SLEEP_60))
    worker = Worker(worker_settings(manager.url, kids, max_jobs=1, ping_interval=1000.0))
    async with pulling(manager, worker):
        await worker.wait_for(lambda: jid in worker.held and worker.held[jid].child is not None)
        manager.stop()  # connections refused
        await worker.wait_for(lambda: not worker.manager_reachable)
        manager.start()  # the same port: the next heartbeat is answered
        await worker.wait_for(lambda: worker.manager_reachable)
        assert worker.held[jid].state == "proving"  # (no finish sent: the heartbeat ended it)
    lines = [r.getMessage() for r in caplog.records if r.name == "damocles_ext.worker"]
    [down] = [m for m in lines if m.startswith("the manager is unreachable")]
    assert "Venus.WdPoStHeartbeatJobs" in down, down
    assert len([m for m in lines if m.startswith("the manager answers again")]) == 1, lines
    assert not [m for m in lines if m.startswith("the heartbeats of the jobs")], lines


async def test_a_finish_alone_begins_the_managers_outage_and_an_error_answer_to_it_ends_it(
    manager, tmp_path, caplog
):
    # The one slot delivers, so no job is asked for, and heartbeats and pings are far apart:
    # the finish is the only call. Its failures begin the manager's outage (one line), and an
    # answer to it, though a JSON-RPC error (the manager back, its job store not yet), ends it.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    jid = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0.5, progress_interval=0.05))
    settings = worker_settings(
        manager.url, kids, max_jobs=1, heartbeat_interval=600.0, ping_interval=600.0
    )
    worker = Worker(settings)
    async with pulling(manager, worker):
        await worker.wait_for(lambda: jid in worker.held)
        manager.stop()  # connections refused; the proof goes on
        await worker.wait_for(lambda: worker.held[jid].delivery_failures >= 2)
        assert not worker.manager_reachable
        manager.kv_down = KV_DOWN
        manager.start()  # the same port: the finish is answered, with its store's error
        await worker.wait_for(lambda: worker.held[jid].delivery_error == KV_DOWN)
        assert worker.manager_reachable
        manager.kv_down = None
        await worker.wait_for(lambda: worker.counters.delivered == 1)
    assert manager.job(jid).State == "finished" and manager.job(jid).Output.proofs
    assert worker.counters.given_up == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "damocles_ext.worker"]
    [down] = [m for m in lines if m.startswith("the manager is unreachable")]
    assert "Venus.WdPoStFinishJob" in down, down
    assert len([m for m in lines if m.startswith("the manager answers again")]) == 1, lines


async def test_an_attached_store_damocles_manager_does_not_have_stops_the_worker_at_start(
    manager, tmp_path
):
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(worker_settings(manager.url, kids, attached={"store-a": "/a", "nope": "/b"}))
    with trio.fail_after(30), pytest.raises(UsageError, match="does not know the attached store"):
        await worker.run()
    # Checked in name order; the first the manager lacks stops it.
    assert manager.calls == [("Venus.StoreBasicInfo", ["nope"])]


def test_wdpost_list_reset_and_remove_work_against_damocles_manager(manager):
    def wdpost(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*DEXT, "wdpost", *args, "--manager", manager.url],
            env=dext_env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    ready, failed, gone = (manager.create(job_input(seed=n)) for n in range(3))
    manager.call("WdPoStAllocateJobs", {}, 2, "w1")
    manager.call("WdPoStFinishJob", failed, None, "it broke")
    manager.job_max_try = 1
    listed = wdpost("list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert listed.stdout.split()[:3] == ["JobID", "MinerID", "DDL"]
    assert set(rows) == {ready, failed, gone}
    assert "Failed" in rows[failed] and "it broke" in rows[failed]
    # MaxTry comes from the manager (1 here; the CLI's own default is 2).
    assert "1(Max)" in rows[failed] and "0(Max)" not in rows[ready]
    assert wdpost("reset", failed).returncode == 0
    assert manager.job(failed).State == "ready2run" and manager.job(failed).TryNum == 0
    unknown = wdpost("reset", ready, "nope")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "job 'nope' does not exist (reset before it: " + ready in unknown.stderr
    assert wdpost("remove", gone, "nope").returncode == 0 and manager.job(gone) is None
    all_removed = wdpost("remove-all", "--really-do-it")
    assert all_removed.returncode == 0, all_removed.stderr
    assert sorted(all_removed.stdout.split()) == sorted(
        ["wdpost", "job", ready, "removed", "wdpost", "job", failed, "removed"]
    )
    assert manager.kv == {}
    assert wdpost("list", "--all").stdout.split() == listed.stdout.splitlines()[0].split()


# What a damocles-manager on a MongoDB kv answers while it cannot reach its database (badger's is
# `DB Closed`, while its shutdown has closed the store and the HTTP server still answers).
KV_DOWN = "server selection error: context deadline exceeded, current topology: ReplicaSetNoPrimary"


async def test_a_job_store_failing_for_a_while_neither_cancels_the_proof_nor_loses_its_result(
    manager, tmp_path, caplog
):
    # Before, any error of a heartbeat was read as "the job is no longer running" and any error
    # of a finish as a refusal: the proof was cancelled, or its result given up, though only
    # `key not found` says that the manager no longer has the job.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    jid = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=1.5, progress_interval=0.05))
    worker = Worker(worker_settings(manager.url, kids))
    async with pulling(manager, worker):
        await worker.wait_for(lambda: jid in worker.held)
        manager.kv_down = KV_DOWN
        before = len(venus_calls(manager, "WdPoStHeartbeatJobs"))
        # The heartbeats fail while it proves; its finish fails too, and is sent again.
        await worker.wait_for(
            lambda: (
                worker.counters.stopped > 0
                or worker.counters.given_up > 0
                or (jid in worker.held and worker.held[jid].delivery_failures >= 2)
            )
        )
        assert (worker.counters.stopped, worker.counters.given_up) == (0, 0)
        assert len(venus_calls(manager, "WdPoStHeartbeatJobs")) >= before + 2
        manager.kv_down = None
        await worker.wait_for(lambda: worker.counters.delivered == 1)
    done = manager.job(jid)
    assert done.State == "finished" and done.ErrorReason == "" and done.Output.proofs
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "the heartbeats of the jobs held here fail" in m]) == 1, lines
    assert any("heartbeats are answered again" in m for m in lines), lines


async def test_two_store_names_attached_at_one_location_are_both_proved_from(tmp_path):
    # damocles-worker takes two [[attached]] names at one location (a store scanned by its
    # sectorstore.json name and listed by another, say). Before, the worker started with them
    # and then failed every job: "stores 'alias' and 'store-a' have the same path".
    store = empty_store()
    with DamoclesManager({"store-a": "/mnt/a", "alias": "/mnt/a"}) as manager:
        jids = [manager.create(job_input(store=name)) for name in ("store-a", "alias")]
        kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0))
        attached = {"store-a": store, "alias": store}
        worker = Worker(worker_settings(manager.url, kids, attached=attached))
        async with pulling(manager, worker):
            await until(manager, lambda m: all(m.job(j).State == "finished" for j in jids))
        for jid in jids:
            done = manager.job(jid)
            assert (done.ErrorReason, done.TryNum) == ("", 1) and done.Output.proofs


async def test_a_damocles_manager_without_worker_prover_is_said_with_what_to_do_and_waited_for(
    manager, tmp_path, caplog
):
    # Before, the worker said only that the manager "refuses the allocation (method not found)",
    # as though its store were down; damocles-worker says to enable the worker-prover module.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    jobs_api = {m: manager.methods.pop(m) for m in list(manager.methods) if "WdPoSt" in m}
    jid = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0))
    worker = Worker(worker_settings(manager.url, kids, idle_poll=0.2))
    async with pulling(manager, worker):
        await worker.wait_for(lambda: worker._refusals.down_since is not None)  # said
        manager.methods.update(jobs_api)  # restarted with --worker-prover
        await until(manager, lambda m: m.job(jid).State == "finished")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    [said] = [m for m in lines if "method 'Venus.WdPoStAllocateJobs' not found" in m]
    assert "started without --worker-prover" in said and "daemon run --worker-prover" in said
    assert any("the manager allocates again" in r.getMessage() for r in caplog.records)


async def test_a_proxy_answering_502_while_the_manager_restarts_is_waited_out_not_fatal(
    manager, tmp_path, caplog
):
    # A TLS-terminating proxy in front of the manager (as the docs advise) answers 502 while the
    # manager restarts. Before, a worker starting then exited 2 (which its unit never restarts),
    # and a running one logged an error at every allocation it tried again.
    caplog.set_level(logging.INFO, "damocles_ext.worker")

    def tried(m: DamoclesManager) -> int:
        return sum(method.endswith("(gateway 502)") for method in m.methods_called())

    manager.gateway = 502
    jid = manager.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0))
    worker = Worker(worker_settings(manager.url, kids, idle_poll=0.1))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)  # (it starts only once the stores are checked)
            await until(manager, lambda m: tried(m) >= 2)
            manager.gateway = None
            await until(manager, lambda m: m.job(jid).State == "finished")
            await worker.wait_for(lambda: not worker.held)
            manager.gateway = 502  # again, while it runs and asks for jobs
            seen = tried(manager)
            await until(manager, lambda m: tried(m) >= seen + 4)
            manager.gateway = None
            await worker.wait_for(lambda: worker.manager_reachable)
            worker.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    gateway = [m for m in lines if "HTTP 502" in m]
    assert len(gateway) == 2 and all("the manager is unreachable" in m for m in gateway), lines
