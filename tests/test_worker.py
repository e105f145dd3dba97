"""`damocles-ext worker`: pulls jobs from a real coordinator (in-process, over real HTTP) on a real
SQLite store (PostgreSQL for the end-to-end proof), proves them on real children from a config,
heartbeats them, delivers the results; and its sans-IO rules (jobs/worker_rules.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
from helpers.frontend import DEXT, dext_env, empty_store, plugin_block
from helpers.post import sectors

from damocles_ext.config import parse_config
from damocles_ext.errors import ProverError, UsageError
from damocles_ext.frontends import worker as worker_module
from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
from damocles_ext.frontends.worker import Worker, local_address_towards
from damocles_ext.frontends.worker_ping import CLOCK_SKEW
from damocles_ext.hookspecs import hookimpl
from damocles_ext.jobs import rpc, rules
from damocles_ext.jobs.endpoint import Endpoint
from damocles_ext.jobs.model import SectorAccessStores, WdPoStInput, WdPoStSectorInfo
from damocles_ext.jobs.outage import Outage, heartbeats_outage
from damocles_ext.jobs.store import JobStore, TrioJobStore
from damocles_ext.jobs.worker_rules import (
    LAST_TRY_MARGIN,
    MAX_EXACT_LOCKED,
    Api,
    Backoff,
    Failure,
    FinishVerdict,
    PulledJob,
    default_sector_paths,
    failure_of,
    failure_of_answer,
    finish_verdict,
    finish_wait,
    free_slots,
    job_gone,
    jobs_to_ask,
    passing_answer,
    proof_types_for_sizes,
    ready_slots,
    runnable_capacity,
    window_post_task,
)
from damocles_ext.jobs.worker_settings import WorkerSettings
from damocles_ext.logs import JsonFormatter
from damocles_ext.plugins import get_plugin_manager
from damocles_ext.post.verify import verify_window_post
from damocles_ext.tasks import WindowPoStOutput

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

PROOF_TYPE = "StackedDrgWindow2KiBV1_2"


def job_input(
    miner: int = 1000, seed: int = 7, store: str = "store-a", sector_ids=(1,), comm_rs=None
):
    return WdPoStInput(
        Sectors=tuple(
            WdPoStSectorInfo(
                SectorId=n,
                CommR=tuple(comm_rs[i]) if comm_rs else (n,) * 32,
                Upgrade=False,
                Accesses=SectorAccessStores(SealedFile=store, CacheDir=store),
            )
            for i, n in enumerate(sector_ids)
        ),
        MinerId=miner,
        ProofType=PROOF_TYPE,
        Seed=(seed,) * 31 + (seed % 64,),
    )


def children(tmp_path, text: str):
    return tuple(parse_config(text, str(tmp_path / "ext-prover.cfg")).children)


def worker_settings(manager: str, kids, **kw) -> WorkerSettings:
    """A test worker's settings: short heartbeats and backoffs, no pause between jobs."""
    kw.setdefault("name", "gpu-1")
    kw.setdefault("attached", {"store-a": empty_store()})  # the sleep and echo provers read none
    kw.setdefault("heartbeat_interval", 0.2)
    kw.setdefault("idle_poll", 600.0)  # a pause between jobs would fail the test's timeout
    kw.setdefault("retry_base", 0.05)
    kw.setdefault("retry_cap", 0.2)
    kw.setdefault("shutdown_grace", 5.0)
    return WorkerSettings(manager=manager, children=kids, **kw)


class Rig:
    """A coordinator on a real store, serving over HTTP on a loopback port, recording what the
    store did (allocations and finishes)."""

    def __init__(self, url: str, stores: dict[str, str] | None = None, *, coordinator=Coordinator):
        self.store = JobStore.open(url)
        self.jobs = TrioJobStore(self.store)
        self.effects: list[rules.Effect] = []
        self.running = 0
        self.most_running = 0
        stores = {"store-a": "/mnt/store-a"} if stores is None else stores
        self.coordinator = coordinator(self.jobs, stores, observe=self._observe)
        self.server = CoordinatorServer(self.coordinator, "127.0.0.1", 0)
        self.port = self.server.port

    def _observe(self, effects) -> None:
        for effect in effects:
            self.effects.append(effect)
            if isinstance(effect, rules.Allocated):
                self.running += 1
                self.most_running = max(self.most_running, self.running)
            elif isinstance(effect, rules.Finished):
                self.running -= 1

    def allocations_of(self, job_id: str) -> int:
        return sum(isinstance(e, rules.Allocated) and e.job_id == job_id for e in self.effects)

    def settings(self, kids, **kw) -> WorkerSettings:
        return worker_settings(f"127.0.0.1:{self.port}", kids, **kw)

    def close(self) -> None:
        self.server.close()
        self.store.close()


@pytest.fixture
def make_rig(tmp_path):
    """Rig(url, stores, coordinator=...), on a SQLite file in tmp_path unless a URL is given;
    every rig made is closed after the test."""
    made: list[Rig] = []

    def make(url: str | None = None, stores: dict[str, str] | None = None, **kw) -> Rig:
        made.append(Rig(url or f"sqlite:///{tmp_path}/jobs.db", stores, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def rig(make_rig) -> Rig:
    return make_rig()


class Running:
    """A worker running in the test's nursery; `stop()` stops it and waits until it ended."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.ended = trio.Event()

    async def _run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.worker.run(task_status=task_status)
        finally:
            self.ended.set()

    async def stop(self) -> None:
        self.worker.stop()
        await self.ended.wait()


async def start_worker(nursery, worker: Worker) -> Running:
    running = Running(worker)
    await nursery.start(running._run)
    return running


@contextlib.asynccontextmanager
async def serving(rig: Rig, worker: Worker):
    """The rig's coordinator serving and the worker running, for a minute at most; at the end of
    the body the worker is stopped (and waited for), then the coordinator."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            running = await start_worker(nursery, worker)
            yield
            await running.stop()
            nursery.cancel_scope.cancel()


async def drive_worker_command(
    manager: str, config: Path, steps: list[tuple[str, int]], *extra: str
) -> tuple[int, str]:
    """`damocles-ext worker` (store-a attached, named w9) against `manager`: for each (mark,
    signal) of `steps`, wait for `mark` on its stderr, then send `signal`; its exit code and
    all it wrote to stderr."""
    proc = await trio.lowlevel.open_process(
        [*DEXT, "worker", "--manager", manager, "-c", str(config),
         "--attached", f"store-a={empty_store()}", "--name", "w9", *extra],
        env=dext_env(), stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = b""
    for mark, signum in steps:
        while mark.encode() not in seen:
            chunk = await proc.stderr.receive_some(4096)
            assert chunk, seen.decode()
            seen += chunk
        proc.send_signal(signum)
    while chunk := await proc.stderr.receive_some(4096):
        seen += chunk
    return await proc.wait(), seen.decode()


def crashing_table(table: str, says: str) -> str:
    """A table whose child writes `says` on stderr and exits before it is ready, not restarted."""
    crash = f"import sys; print({says!r}, file=sys.stderr); sys.exit(3)"
    return (
        f"[[{table}]]\nBin = {json.dumps(sys.executable)}\nArgs = ['-c', {json.dumps(crash)}]\n"
        "AutoRestart = false\n"
    )


async def run_until_it_gives_up(rig: Rig, worker: Worker) -> ProverError:
    """Run the worker against the rig until it stops with the ProverError it raises."""
    with trio.fail_after(60), pytest.RaisesGroup(ProverError, flatten_subgroups=True) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            await worker.run()
    [error] = caught.value.exceptions
    return error


async def run_until(rig: Rig, worker: Worker, condition) -> None:
    """Run the worker against the rig until `condition()` holds, then stop both."""
    async with serving(rig, worker):
        await worker.wait_for(condition)


def logged(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    """The messages of the records caplog caught that contain `words`, in their order."""
    return [message for r in caplog.records if words in (message := r.getMessage())]


# --- end to end -----------------------------------------------------------------------------------


async def two_sectors_proved_on_python_ref(
    store_url,
    make_rig,
    tmp_path,
    *,
    second_comm_r_wrong: bool = False,
    before=None,
    until=None,
) -> tuple:
    """A job of two real sectors in store-a (its second comm_r wrong, if asked; `before(base,
    ids)` called on the store once made), pulled and proved by a worker with a python-ref child
    until it delivered (and `until()` holds): (the job as stored once delivered, its sector
    ids, the store's root)."""
    base = tmp_path / "mnt" / "store-a"
    manifest = sectors(base, PROOF_TYPE, 2, random_seed=3)
    ids = tuple(r.sector_id for r in manifest.replicas)
    comm_rs = [bytes.fromhex(r.comm_r) for r in manifest.replicas]
    if second_comm_r_wrong:
        comm_rs[1] = bytes(32)
    if before is not None:
        before(base, ids)
    rig = make_rig(store_url, {"store-a": str(base)})
    job, _ = await rig.jobs.create(job_input(sector_ids=ids, comm_rs=comm_rs))
    kids = children(tmp_path, plugin_block("WdPost", "python-ref"))
    worker = Worker(rig.settings(kids, attached={"store-a": str(base)}))
    await run_until(
        rig, worker, lambda: worker.counters.delivered == 1 and (until is None or until())
    )
    return await rig.jobs.get(job.Id), ids, base


async def test_a_job_in_the_store_is_pulled_proved_on_a_child_and_its_proofs_stored(
    store_url, make_rig, tmp_path
):
    done, ids, base = await two_sectors_proved_on_python_ref(store_url, make_rig, tmp_path)
    assert done.succeeded and done.TryNum == 1 and done.WorkerName == "gpu-1"
    assert done.Output is not None and done.Output.faults == ()
    # The proofs are this job's: the verifier accepts them for its sectors.
    task = window_post_task(
        PulledJob(done.Id, done.Input),
        [
            (str(base / "sealed" / f"s-t01000-{n}"), str(base / "cache" / f"s-t01000-{n}"))
            for n in ids
        ],
    )
    verify_window_post(task, WindowPoStOutput(list(done.Output.proofs), []))


async def test_a_sector_that_does_not_match_its_comm_r_is_not_blamed_on_its_files(
    store_url, make_rig, tmp_path, caplog
):
    # The job's line said "faulty (their files cannot be read here)" of every fault, sending
    # the operator to check mounts for a sector whose files read fine: the prover says why.
    caplog.set_level(logging.INFO, "damocles_ext")
    done, ids, _ = await two_sectors_proved_on_python_ref(
        store_url,
        make_rig,
        tmp_path,
        second_comm_r_wrong=True,
        until=lambda: logged(caplog, SEEN),
    )
    assert done.Output is not None and done.Output.faults == (ids[1],)
    [line] = logged(caplog, f"job {done.Id}: 1 of its 2 sectors are faulty")
    assert line.startswith(f"job {done.Id}: 1 of its 2 sectors are faulty: {ids[1]}; the prover")
    assert "cannot be read here" not in line
    # Its files were looked at once the result was delivered: they are there.
    seen = (
        f"job {done.Id}: {SEEN}: sector {ids[1]}: its files are here and readable, so the data"
        " did not check out against the comm_r, or the prover could not use it: the prover's"
        " log lines say which, where it writes any"
    )
    assert logged(caplog, SEEN) == [seen]
    assert logged(caplog, f"sector {ids[1]} is faulty: comm_r of sector {ids[1]} does not match")
    # Said once, on the job's line: not again by the supervisor's note of the request.
    assert not logged(caplog, "1 faulty sector, no proof")


SEEN = "the files of its faulty sectors, as this worker sees them"


async def test_a_faulty_sectors_missing_file_is_named_once_the_result_is_delivered(
    store_url, make_rig, tmp_path, caplog
):
    # The answer names faulty sectors, not why; a C or Bin prover may log nothing: the worker
    # looks at their files itself, after delivering (a stalled mount must not hold the result).
    caplog.set_level(logging.INFO, "damocles_ext")
    gone: list = []

    def lose_a_sealed_file(base, ids) -> None:
        gone.append(base / "sealed" / f"s-t01000-{ids[0]}")
        gone[0].unlink()

    done, ids, _ = await two_sectors_proved_on_python_ref(
        store_url, make_rig, tmp_path, before=lose_a_sealed_file, until=lambda: logged(caplog, SEEN)
    )
    assert done.Output is not None and done.Output.faults == (ids[0],)
    assert logged(caplog, SEEN) == [
        f"job {done.Id}: {SEEN}: sector {ids[0]}: {gone[0]} does not exist"
    ]
    # Looked at once delivered, not before: the result waits for no look.
    lines = [r.getMessage() for r in caplog.records]
    delivered = next(i for i, m in enumerate(lines) if m.startswith(f"job {done.Id}: delivered"))
    assert delivered < next(i for i, m in enumerate(lines) if SEEN in m)


async def test_a_look_at_faulty_sectors_files_stalled_does_not_hold_the_workers_stop(
    store_url, make_rig, tmp_path, caplog, monkeypatch
):
    from damocles_ext.frontends import worker_sectors

    caplog.set_level(logging.INFO, "damocles_ext")
    looking, stalled = threading.Event(), threading.Event()

    def a_stalled_mount(pairs):  # (in the look's worker thread)
        looking.set()
        stalled.wait(60)
        return [""] * len(pairs)

    monkeypatch.setattr(worker_sectors, "_file_problems", a_stalled_mount)
    base = tmp_path / "mnt" / "store-a"
    manifest = sectors(base, PROOF_TYPE, 2, random_seed=3)
    ids = tuple(r.sector_id for r in manifest.replicas)
    (base / "sealed" / f"s-t01000-{ids[0]}").unlink()
    comm_rs = [bytes.fromhex(r.comm_r) for r in manifest.replicas]
    rig = make_rig(store_url, {"store-a": str(base)})
    await rig.jobs.create(job_input(sector_ids=ids, comm_rs=comm_rs))
    kids = children(tmp_path, plugin_block("WdPost", "python-ref"))
    worker = Worker(rig.settings(kids, attached={"store-a": str(base)}))
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(rig.server.serve)
                running = await start_worker(nursery, worker)
                await trio.to_thread.run_sync(looking.wait, 30)
                assert worker.counters.delivered == 1
                with trio.fail_after(10):  # (the look alone would hold it for 60 s)
                    await running.stop()
                nursery.cancel_scope.cancel()
    finally:
        stalled.set()
    assert not logged(caplog, SEEN)


async def test_the_pulled_line_shows_the_partitions_as_wdpost_list_does(rig, tmp_path, caplog):
    # A job without partitions (serve --jobs makes them so) was logged "partitions None".
    caplog.set_level(logging.INFO, "damocles_ext")
    job, _ = await rig.jobs.create(job_input())
    worker = Worker(rig.settings(children(tmp_path, plugin_block("WdPost", "echo"))))
    await run_until(rig, worker, lambda: worker.counters.delivered == 1)
    pulled = f"job {job.Id}: pulled (miner 1000, deadline 0, partitions [], 1 sectors, try 1)"
    assert pulled in caplog.text, caplog.text


async def test_two_children_take_five_jobs_two_at_a_time_without_pausing_between_them(
    rig, tmp_path
):
    ids = [(await rig.jobs.create(job_input(seed=n)))[0].Id for n in range(5)]
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0.2) * 2)
    worker = Worker(rig.settings(kids))
    # idle_poll is 600 s: a pause after a job, or asking only after an idle wait, would blow this.
    await run_until(rig, worker, lambda: worker.counters.delivered == 5)
    jobs = [await rig.jobs.get(i) for i in ids]
    assert all(j.succeeded and j.TryNum == 1 for j in jobs)
    # Never more jobs running on this worker than it has slots: none waited on a busy child.
    assert rig.most_running <= 2
    assert all(rig.allocations_of(i) == 1 for i in ids)


async def test_two_children_sharing_a_lock_take_one_job_at_a_time(rig, tmp_path):
    # They take turns under the lock: the worker counted a slot for each and pulled two jobs at
    # once, one of which waited here for the lock while another worker may have been idle.
    ids = [(await rig.jobs.create(job_input(seed=n)))[0].Id for n in range(3)]
    block = plugin_block("WdPost", "sleep", seconds=0.1) + 'Locks = ["gpu0"]\n'
    kids = children(tmp_path, block * 2)
    assert [kid.locks for kid in kids] == [("gpu0",), ("gpu0",)]
    worker = Worker(rig.settings(kids))
    async with serving(rig, worker):
        await worker.wait_for(lambda: worker.counters.delivered == 3)
        assert worker.slots() == 1  # what its ping tells the manager too
    jobs = [await rig.jobs.get(i) for i in ids]
    assert all(j.succeeded and j.TryNum == 1 for j in jobs)
    assert rig.most_running == 1


def test_the_slots_of_children_sharing_locks_are_what_they_can_run_at_once():
    assert runnable_capacity([(2, ()), (3, ())]) == 5  # no lock: every child at once
    assert runnable_capacity([(1, ("a",)), (1, ("a",)), (2, ("b",))]) == 3
    # What surely runs at once whichever child takes a lock first: if a (4) takes x and y, b and c
    # wait; if b or c takes one, a waits. 4, not the best set's 5 (b and c), nor the sum's 9.
    assert runnable_capacity([(4, ("x", "y")), (2, ("x",)), (3, ("y",))]) == 4
    # One GPU's children of Concurrent 1 and 3: the 1 may hold it while pulled jobs wait.
    assert runnable_capacity([(3, ("gpu:0",)), (1, ("gpu:0",))]) == 1
    # Two [[WdPost]] blocks of Gpus = "all" on 8 GPUs: 16 children, 2 per GPU, run 8 at once.
    per_gpu = [(1, (f"gpu:{i}",)) for i in range(8)] * 2
    assert runnable_capacity(per_gpu) == 8
    assert runnable_capacity([*per_gpu, (2, ())]) == 10
    # Locks shared transitively make one group: with b's child (b, c) holding its locks, the
    # children of (a, b) and (c, d) wait, though they could run together.
    assert runnable_capacity([(1, ("a", "b")), (1, ("b", "c")), (1, ("c", "d"))]) == 1

    def chain(n):  # n children in a row, each sharing a lock with the next
        return [(1, (f"l{i}", f"l{i + 1}")) for i in range(n)]

    # Every third child holding its locks blocks the rest; past MAX_EXACT_LOCKED children in one
    # group it is not worked out, and the group counts as its least child.
    assert runnable_capacity(chain(MAX_EXACT_LOCKED)) == MAX_EXACT_LOCKED // 3
    assert runnable_capacity(chain(MAX_EXACT_LOCKED + 1)) == 1
    assert runnable_capacity(chain(MAX_EXACT_LOCKED) + per_gpu) == MAX_EXACT_LOCKED // 3 + 8


async def test_a_job_removed_or_reset_while_it_runs_is_cancelled_on_its_child_and_the_slot_goes_on(
    rig, tmp_path, recorder
):
    rec, pm = recorder
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=60, progress_interval=0.05))
    # A short grace: the last proof runs for a minute and is cancelled at the end.
    worker = Worker(rig.settings(kids, shutdown_grace=0.2), plugin_manager=pm)
    first, _ = await rig.jobs.create(job_input(seed=1))
    async with serving(rig, worker):
        await worker.wait_for(lambda: first.Id in worker.held)
        await rec.next("started")
        # The one slot is taken: the next job waits in the store, not on this worker.
        second, _ = await rig.jobs.create(job_input(seed=2))
        await rig.jobs.remove(first.Id)
        # The next heartbeat says "removed": the child is told to cancel, the slot is free.
        assert (await rec.next("finished"))[2] == "cancelled"
        await rec.next("started")
        await worker.wait_for(lambda: second.Id in worker.held)
        assert (await rig.jobs.get(second.Id)).State == "running"
        await rig.jobs.reset(second.Id)
        assert (await rec.next("finished"))[2] == "cancelled"
        # A reset job is ready again: the free slot takes it at once (its try count restarted).
        await rec.next("started")
        again = await rig.jobs.get(second.Id)
        assert again.State == "running" and again.TryNum == 1
        assert worker.counters.stopped == 2 and worker.counters.delivered == 0
    assert rig.allocations_of(first.Id) == 1


BIG_PROOF_CHILD = r"""
import base64, json, sys
# A damocles JSON-lines processor whose proof is over the coordinator's 16 MiB body limit.
sys.stdout.write("window_post processor ready\n")
sys.stdout.flush()
for line in sys.stdin:
    output = {"proofs": [base64.b64encode(bytes(17 << 20)).decode()], "faults": []}
    sys.stdout.write(json.dumps({"id": json.loads(line)["id"], "err_msg": None, "output": output}))
    sys.stdout.write("\n")
    sys.stdout.flush()
"""


async def test_a_result_the_coordinator_can_never_take_is_given_up_at_once_saying_why(
    rig, tmp_path, caplog
):
    # Before, an HTTP 413 was retried for the result's whole lifetime (25 h) with nothing
    # logged, while the job's heartbeats kept it from another worker.
    caplog.set_level(logging.INFO, "damocles_ext")
    script = tmp_path / "big.py"
    script.write_text(BIG_PROOF_CHILD)
    cfg = f"[[WdPost]]\nBin = {json.dumps(sys.executable)}\nArgs = {json.dumps([str(script)])}\n"
    job, _ = await rig.jobs.create(job_input())
    worker = Worker(rig.settings(children(tmp_path, cfg)))
    async with serving(rig, worker):
        await worker.wait_for(lambda: worker.counters.given_up == 1)
    assert worker.counters.delivered == 0 and worker.counters.finish_retries == 1
    assert f"job {job.Id}: its result (1 proofs) is given up after 1 attempts" in caplog.text
    assert "HTTP 413" in caplog.text
    # In JSON logs, each record about the job carries its id: filtering on it tells its story.
    about = [r for r in caplog.records if f"job {job.Id}" in r.getMessage()]
    assert [r.levelname for r in about] == ["INFO", "ERROR"]  # pulled, given up
    assert all(json.loads(JsonFormatter().format(r))["job_id"] == job.Id for r in about)


async def coordinator_down_at_a_finish(rig, worker, job, meanwhile, until) -> None:
    """The rig's coordinator goes away while `job` is proved; once two finish calls found it
    down, `meanwhile()` runs, the coordinator comes back on its port, and the worker runs
    until `until()`."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            running = await start_worker(nursery, worker)
            await worker.wait_for(lambda: job.Id in worker.held)
            rig.server.stop()
            await rig.server.stopped.wait()
            rig.server.close()
            # Two failed finish calls: the second one is a retry after a backoff.
            await worker.wait_for(
                lambda: job.Id in worker.held and worker.held[job.Id].delivery_failures >= 2
            )
            await meanwhile()
            rig.server = CoordinatorServer(rig.coordinator, "127.0.0.1", rig.port)
            await nursery.start(rig.server.serve)
            await worker.wait_for(until)
            await running.stop()
            nursery.cancel_scope.cancel()


async def test_a_result_finished_while_the_coordinator_is_down_is_delivered_after_its_restart(
    rig, tmp_path
):
    job, _ = await rig.jobs.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=1.0, progress_interval=0.05))
    worker = Worker(rig.settings(kids))

    async def still_running() -> None:  # its finish is kept for a retry meanwhile
        assert (await rig.jobs.get(job.Id)).State == "running"

    await coordinator_down_at_a_finish(
        rig, worker, job, still_running, lambda: worker.counters.delivered == 1
    )
    done = await rig.jobs.get(job.Id)
    assert done.succeeded and done.TryNum == 1 and done.Output.proofs
    assert rig.allocations_of(job.Id) == 1 and worker.counters.given_up == 0


async def test_a_proof_done_while_its_lease_lapsed_is_delivered_as_a_late_proof(rig, tmp_path):
    # The coordinator was away longer than HeartbeatTimeout: its sweep took the job back (a try
    # left). When it is back, the next heartbeat (every 0.2 s here) comes before the finish's
    # retry (2 s) and is answered timed_out: the proof, done, is delivered all the same (the
    # coordinator takes a late proof), not thrown away and proved again.
    now = [1_000_000.0]
    rig.jobs.clock = lambda: now[0]
    job, _ = await rig.jobs.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=1.0, progress_interval=0.05))
    worker = Worker(rig.settings(kids, retry_base=2.0, retry_cap=2.0))

    async def lease_lapses() -> None:
        now[0] += 60.0
        await rig.jobs.sweep()
        assert (await rig.jobs.get(job.Id)).State == "ready2run"

    await coordinator_down_at_a_finish(
        rig, worker, job, lease_lapses,
        lambda: worker.counters.delivered == 1 or worker.counters.stopped == 1,
    )  # fmt: skip
    done = await rig.jobs.get(job.Id)
    assert worker.counters.delivered == 1 and worker.counters.stopped == 0
    assert done.succeeded and done.Output.proofs and rig.allocations_of(job.Id) == 1


async def test_a_result_refused_after_the_coordinator_was_unreachable_is_not_said_maybe_delivered(
    rig, tmp_path, caplog
):
    # The finishes that found no coordinator never reached one: when the next is refused (the
    # job was removed meanwhile), the give-up must not say an earlier attempt may have done it.
    # (No heartbeat in the test's time: one would see the removal first and drop the result.)
    job, _ = await rig.jobs.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=1.0, progress_interval=0.05))
    worker = Worker(rig.settings(kids, heartbeat_interval=600.0))

    async def removed() -> None:
        await rig.jobs.remove(job.Id)

    await coordinator_down_at_a_finish(
        rig, worker, job, removed, lambda: worker.counters.given_up == 1
    )
    assert f"job {job.Id}: its result (1 proofs) is given up after" in caplog.text
    assert "the manager refused it" in caplog.text
    assert "may have delivered it" not in caplog.text


async def test_a_job_in_a_store_the_worker_lacks_fails_naming_the_store_and_the_job(rig, tmp_path):
    job, _ = await rig.jobs.create(job_input(store="far-away"))
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(rig.settings(kids, attached={"store-a": str(tmp_path)}))
    await run_until(rig, worker, lambda: worker.counters.delivered == 1)
    done = await rig.jobs.get(job.Id)
    assert done.State == "finished" and done.Output is None
    assert "'far-away'" in done.ErrorReason and job.Id in done.ErrorReason
    assert "--attached far-away=PATH" in done.ErrorReason


async def test_an_attached_store_the_manager_does_not_know_stops_the_worker_at_start_with_exit_2(
    make_rig, tmp_path
):
    rig = make_rig(stores={"store-a": str(tmp_path)})
    config = tmp_path / "ext-prover.cfg"
    config.write_text(plugin_block("WdPost", "echo"))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            result = await trio.run_process(
                [*DEXT, "worker", "--manager", f"127.0.0.1:{rig.port}", "-c", str(config),
                 "--attached", f"store-a={tmp_path}", "--attached", f"nope={tmp_path}"],
                env=dext_env(), capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            nursery.cancel_scope.cancel()
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "does not know the attached store 'nope'" in err and "Traceback" not in err
    assert "--store nope=PATH" in err


class Layout:
    """A site's own layout, as a plugin gives it: every store's sectors flat under one root."""

    def __init__(self, root) -> None:
        self.root = root
        self.asked: list[tuple[str, int]] = []

    @hookimpl
    def dext_sector_paths(self, job, sector, attached):
        self.asked.append((job.Id, sector.SectorId))
        name = f"s-t0{job.Input.MinerId}-{sector.SectorId}"
        return str(self.root / "sealed" / name), str(self.root / "cache" / name)


class PluginStop(BaseException):
    """A plugin's own BaseException (as gevent's GreenletExit is one)."""


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text")


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (SystemExit, "called sys.exit("),
        (asyncio.CancelledError, "CancelledError"),
        (PluginStop, "PluginStop"),
        (Unprintable, "Unprintable"),
    ],
)
async def test_a_plugin_whose_sector_paths_raise_a_base_exception_or_an_unprintable_one_fails_the_job(
    rig, tmp_path, raised, said
):
    """A sys.exit() (as a site's helper library may call), an asyncio.CancelledError or a
    BaseException of the plugin's own out of dext_sector_paths ended the worker, and an
    exception whose str() raises did too (the worker formats the job's error with it): each
    fails that job only, naming the hook."""

    class Raises:
        @hookimpl
        def dext_sector_paths(self, job, sector, attached):
            raise raised()

    job, _ = await rig.jobs.create(job_input())
    pm = get_plugin_manager(entry_points=False)
    pm.register(Raises(), name="raises")
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(rig.settings(kids), plugin_manager=pm)
    await run_until(rig, worker, lambda: worker.counters.delivered == 1)
    assert worker.counters.failed == 1
    done = await rig.jobs.get(job.Id)
    assert job.Id in done.ErrorReason
    assert "plugin 'raises': its dext_sector_paths" in done.ErrorReason
    assert said in done.ErrorReason


@pytest.mark.parametrize("returned", ["/one/path", ("/sealed", ""), ("/a", "/b", "/c")])
async def test_a_plugin_whose_sector_paths_are_not_a_pair_of_paths_fails_the_job(
    rig, tmp_path, returned
):
    """Its bug, not the sector's fault: before, a string's characters were taken for the two
    paths, and the prover answered the sector faulty, which the manager declares on chain."""

    class Garbled:
        @hookimpl
        def dext_sector_paths(self, job, sector, attached):
            return returned

    class Declines:
        @hookimpl
        def dext_sector_paths(self, job, sector, attached):
            return None  # asked first (registered last): the error names the one that answered

    job, _ = await rig.jobs.create(job_input())
    pm = get_plugin_manager(entry_points=False)
    pm.register(Garbled(), name="garbled")
    pm.register(Declines(), name="declines")
    worker = Worker(
        rig.settings(children(tmp_path, plugin_block("WdPost", "echo"))), plugin_manager=pm
    )
    await run_until(rig, worker, lambda: worker.counters.delivered == 1)
    done = await rig.jobs.get(job.Id)
    assert worker.counters.failed == 1 and done.Output is None
    assert (
        "plugin 'garbled': its dext_sector_paths returned" in done.ErrorReason
        and "not (sealed_file, cache_dir)" in done.ErrorReason
    )


async def test_a_plugin_gives_the_sector_paths_of_a_site_with_its_own_layout(rig, tmp_path):
    root = tmp_path / "elsewhere"
    manifest = sectors(root, PROOF_TYPE, 1, random_seed=5)
    [replica] = manifest.replicas
    job, _ = await rig.jobs.create(
        job_input(sector_ids=(replica.sector_id,), comm_rs=[bytes.fromhex(replica.comm_r)])
    )
    pm = get_plugin_manager(entry_points=False)
    layout = Layout(root)
    pm.register(layout, name="layout")
    kids = children(tmp_path, plugin_block("WdPost", "python-ref"))
    # The attached path holds nothing: only the plugin's paths can give a proof.
    worker = Worker(
        rig.settings(kids, attached={"store-a": str(tmp_path / "empty")}), plugin_manager=pm
    )
    await run_until(rig, worker, lambda: worker.counters.delivered == 1)
    done = await rig.jobs.get(job.Id)
    assert done.succeeded and done.Output.proofs and done.Output.faults == ()
    assert layout.asked == [(job.Id, replica.sector_id)]


async def test_stopping_lets_a_running_proof_finish_within_the_grace_and_delivers_it(rig, tmp_path):
    job, _ = await rig.jobs.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=1.0, progress_interval=0.05))
    worker = Worker(rig.settings(kids, shutdown_grace=30.0))
    async with serving(rig, worker):
        await worker.wait_for(lambda: job.Id in worker.held)
        await rig.jobs.create(job_input(seed=2))  # not taken: the worker is stopping
    assert (await rig.jobs.get(job.Id)).succeeded
    assert worker.counters.pulled == 1 and worker.counters.delivered == 1


async def test_a_proof_longer_than_the_grace_is_cancelled_and_left_to_the_heartbeat_timeout(
    rig, tmp_path, caplog
):
    job, _ = await rig.jobs.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=60, progress_interval=0.05))
    worker = Worker(rig.settings(kids, shutdown_grace=0.3))
    await run_until(rig, worker, lambda: job.Id in worker.held)
    # Still running in the store: the coordinator's sweep gives it to another worker.
    assert (await rig.jobs.get(job.Id)).State == "running"
    assert worker.counters.delivered == 0
    [line] = logged(caplog, "heartbeat timeout")
    assert job.Id in line and "cancelled" in line
    # Cancelled at the end of the grace, as said: not left running through the results' grace
    # and then said to be a result lost.
    assert not logged(caplog, "could not be delivered"), caplog.text


async def test_proofs_failing_while_the_worker_stops_start_no_pause(rig, tmp_path, caplog):
    # Three proofs failing in a row pause a worker (no job for 30 s, so that other workers
    # take them); failing while it stops, they would pause a worker that takes no job anyway,
    # and say so in its log and metrics: none is counted nor logged.
    for seed in range(3):
        await rig.jobs.create(job_input(seed=seed))
    block = plugin_block("WdPost", "sleep", concurrent=3, seconds=1.5, fail="always")
    worker = Worker(rig.settings(children(tmp_path, block), shutdown_grace=30.0, max_jobs=3))
    await run_until(rig, worker, lambda: len(worker.held) == 3)  # then stopped, within 1.5 s
    assert worker.counters.pulled == 3 and worker.counters.delivered == 3  # (3 failures)
    assert worker.counters.failed == 3
    assert worker.counters.pauses == 0 and worker.paused() is None
    assert not logged(caplog, "proofs failed here in a row"), caplog.text


async def test_a_second_sigterm_stops_the_worker_command_at_once_naming_the_jobs_it_held(
    rig, tmp_path
):
    config = tmp_path / "ext-prover.cfg"
    config.write_text(plugin_block("WdPost", "sleep", seconds=60, progress_interval=0.05))
    job, _ = await rig.jobs.create(job_input())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            steps = [(f"job {job.Id}: pulled", signal.SIGTERM),
                     ("shutting down gracefully", signal.SIGTERM)]  # fmt: skip
            _, text = await drive_worker_command(f"127.0.0.1:{rig.port}", config, steps)
            nursery.cancel_scope.cancel()
    assert "stopping at once: the manager gives the 1 jobs held here" in text, text
    assert job.Id in text.split("stopping at once", 1)[1] and "Traceback" not in text


async def test_sigterm_while_the_worker_waits_for_its_manager_at_start_exits_0(tmp_path):
    config = tmp_path / "ext-prover.cfg"
    config.write_text(plugin_block("WdPost", "echo"))
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(60):
        # It waits for the manager, and says so.
        steps = [("the manager is unreachable", signal.SIGTERM)]
        code, text = await drive_worker_command(f"127.0.0.1:{port}", config, steps)
    assert code == 0, text
    assert "nothing was pulled" in text and "Traceback" not in text, text


async def test_a_worker_stopped_while_its_manager_does_not_answer_stops_at_once(tmp_path, caplog):
    # The manager takes the connection and never answers: the start's call (its stores) waits
    # for its --rpc-timeout. A stop meanwhile gives it up at once (it waited the timeout out:
    # 10 s by default of `systemctl stop` for a worker that had taken nothing).
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    with trio.fail_after(60):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        worker = Worker(worker_settings(f"127.0.0.1:{port}", kids, rpc_timeout=3600.0))
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            connection = await listener.accept()
            worker.stop()
        await connection.aclose()
    said = logged(caplog, "nothing was pulled")
    assert said == ["stopped while waiting for the manager; nothing was pulled"], said


async def test_a_worker_stopped_while_it_looks_for_its_name_stops_at_once(
    tmp_path, caplog, monkeypatch
):
    # Without --name it asks the system for the address that reaches the manager first: a stop
    # then ends it there, and says so.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    looking = trio.Event()

    async def never_found(endpoint):
        looking.set()
        await trio.sleep_forever()

    monkeypatch.setattr(worker_module, "local_address_towards", never_found)
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(worker_settings("127.0.0.1:9", kids, name=None))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            await looking.wait()
            worker.stop()
    said = logged(caplog, "nothing was pulled")
    assert said == ["stopped before the worker could name itself; nothing was pulled"], said


async def test_a_worker_stopped_before_its_run_starts_no_child(tmp_path, caplog):
    # Named (--name) and with no attached store, its start reaches no checkpoint: the stop was
    # seen only by the loop that pulls, after its children had been started to be stopped.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(worker_settings("127.0.0.1:9", kids, attached={}))
    worker.stop()
    with trio.fail_after(60):
        await worker.run()
    said = logged(caplog, "nothing was pulled")
    assert said == ["stopped before the run started; nothing was pulled"], said
    assert not logged(caplog, "pulls WindowPoSt jobs")


async def test_sigterm_stops_the_worker_command_after_delivering_the_running_proof(rig, tmp_path):
    config = tmp_path / "ext-prover.cfg"
    config.write_text(
        plugin_block("WdPost", "sleep", seconds=1.0, progress_interval=0.05)
        + plugin_block("WinPost", "echo")
    )
    other, _ = await rig.jobs.create(job_input(miner=1001))
    job, _ = await rig.jobs.create(job_input())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            steps = [(f"job {job.Id}: pulled", signal.SIGTERM)]
            code, text = await drive_worker_command(
                f"/ip4/127.0.0.1/tcp/{rig.port}", config, steps,
                "--allowed-miners", "1000", "--allowed-sizes", "2KiB,32GiB",
            )  # fmt: skip
            assert code == 0, text
            nursery.cancel_scope.cancel()
    done = await rig.jobs.get(job.Id)
    # Another miner's job is left for another worker.
    assert (await rig.jobs.get(other.Id)).State == "ready2run"
    assert done.succeeded and done.WorkerName == "w9"
    # The manager's own ext-prover.cfg may be given: its [[WinPost]] children are not started.
    assert "children of other tables are not started (winning_post#0)" in text
    assert "Traceback" not in text and f"job {job.Id}: delivered" in text


async def test_a_worker_whose_children_all_gave_up_stops_with_an_error_instead_of_idling(
    rig, tmp_path
):
    worker = Worker(rig.settings(children(tmp_path, crashing_table("WdPost", "dying"))))
    error = await run_until_it_gives_up(rig, worker)
    assert "no WindowPoSt child can prove any more" in str(error) and "'dying'" in str(error)
    assert worker.counters.allocations == 0


async def test_a_store_that_is_not_mounted_fails_the_job_instead_of_faulting_every_sector(
    rig, tmp_path
):
    # An empty mountpoint: a prover would find no file and answer every sector faulty, which
    # damocles-manager declares on chain. The job fails instead, for a worker that has the store.
    unmounted = tmp_path / "mnt" / "store-a"
    unmounted.mkdir(parents=True)
    job, _ = await rig.jobs.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "python-ref"))
    worker = Worker(rig.settings(kids, attached={"store-a": str(unmounted)}))
    await run_until(rig, worker, lambda: worker.counters.delivered == 1)
    done = await rig.jobs.get(job.Id)
    assert worker.counters.failed == 1 and done.Output is None
    assert f"{unmounted}/cache is not a directory here: is the store mounted" in done.ErrorReason
    assert "Not proved here on the job's first try" in done.ErrorReason


async def test_a_store_not_there_on_a_later_try_is_proved_with_its_sectors_faulty(rig, tmp_path):
    # The store may be lost for good: a later try answers with its sectors as faults (and the
    # others proved), rather than failing the whole partition on every worker.
    unmounted = tmp_path / "mnt" / "store-a"
    unmounted.mkdir(parents=True)
    job, _ = await rig.jobs.create(job_input())
    [taken] = await rig.jobs.allocate(rules.AllocationSpec(), 1, "elsewhere")
    await rig.jobs.finish(job.Id, None, "failed elsewhere", lease=taken.lease)
    await rig.jobs.sweep()  # retried: ready for its second try
    kids = children(tmp_path, plugin_block("WdPost", "python-ref"))
    worker = Worker(rig.settings(kids, attached={"store-a": str(unmounted)}))
    await run_until(rig, worker, lambda: worker.counters.delivered == 1)
    done = await rig.jobs.get(job.Id)
    assert done.TryNum == 2 and done.ErrorReason == "" and done.Output is not None
    assert sorted(done.Output.faults) == sorted(s.SectorId for s in job.Input.Sectors)


async def test_a_worker_whose_proofs_all_fail_pauses_so_that_its_jobs_go_elsewhere(
    rig, tmp_path, caplog
):
    # Its child answers every request with an error at once (a broken GPU, a lock file it
    # cannot take): without a pause it would take every job, and spend its tries, in seconds.
    caplog.set_level(logging.INFO, "damocles_ext")
    ids = [(await rig.jobs.create(job_input(seed=n)))[0].Id for n in range(5)]
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0, fail="always"))
    worker = Worker(rig.settings(kids))
    await run_until(rig, worker, lambda: worker.counters.pauses == 1)
    assert worker.counters.pulled == 3  # Breaker's limit, then no more
    states = [(await rig.jobs.get(i)).State for i in ids]
    assert states.count("ready2run") >= 2, states  # left for other workers
    # Each "no proof" record carries the job's id and the supervisor's number of the request
    # that failed it, as its message and the supervisor's own records name it (JSON logs).
    failed = [
        json.loads(JsonFormatter().format(r))
        for r in caplog.records
        if ": no proof: " in r.getMessage()
    ]
    assert len(failed) == 3
    for doc in failed:
        assert doc["job_id"] in ids and doc["message"].startswith(f"job {doc['job_id']}: ")
        assert f": no proof: request {doc['request_id']} (window_post)" in doc["message"], doc


async def test_jobs_whose_own_input_is_refused_do_not_pause_the_worker(rig, tmp_path):
    # A sector given twice: refused by the supervisor before any prover sees it, the job's own
    # fault, not its prover's (WORKER.md): four in a row take no pause, and the jobs after
    # them are proved.
    for seed in range(4):
        await rig.jobs.create(job_input(seed=seed, sector_ids=(1, 1)))
    good, _ = await rig.jobs.create(job_input(seed=9))
    worker = Worker(rig.settings(children(tmp_path, plugin_block("WdPost", "echo"))))
    await run_until(rig, worker, lambda: worker.counters.delivered == 5)
    assert worker.counters.pauses == 0
    assert (await rig.jobs.get(good.Id)).succeeded


async def test_tasks_this_worker_cannot_send_pause_it_as_failures_do(rig, tmp_path):
    # An --attached path that is no text (lone surrogates, from a non-UTF-8 name): every task
    # built from it is refused before a prover sees it, the worker's fault, not the jobs' own:
    # it pauses after three, and the jobs go elsewhere.
    for seed in range(5):
        await rig.jobs.create(job_input(seed=seed))
    garbled = str(tmp_path / "store-\udcff")  # (its name's bytes: b"store-\xff")
    for part in ("sealed", "cache"):
        os.makedirs(os.path.join(garbled, part))
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(rig.settings(kids, attached={"store-a": garbled}))
    await run_until(rig, worker, lambda: worker.counters.pauses == 1)
    assert worker.counters.pulled == 3


def test_the_breaker_pauses_after_failures_in_a_row_doubling_and_a_proof_resets_it():
    from damocles_ext.jobs.worker_rules import Breaker

    breaker = Breaker(limit=3, pause=30, max_pause=100)

    def pauses(at: float, n: int = 3) -> list[float | None]:
        lines = [breaker.outcome(True, at, "no GPU") for _ in range(n)]
        return [None if line is None else breaker.paused_until for line in lines]

    assert pauses(0, 2) == [None, None]
    assert breaker.outcome(False, 0) is None  # a proof: the count starts again
    assert pauses(10) == [None, None, 40]
    assert pauses(20) == [None, None, None]  # while paused: jobs held before it, not counted
    assert pauses(50) == [None, None, 110]  # doubled
    assert pauses(200) == [None, None, 300]  # at most 100
    breaker.outcome(False, 300)
    assert pauses(400) == [None, None, 430]
    line = [breaker.outcome(True, 500, "no GPU") for _ in range(3)][-1]
    assert line == (
        "3 proofs failed here in a row (last: no GPU); taking no job for 60 s, so that other"
        " workers take them"
    )


async def test_a_split_worker_whose_snark_children_all_gave_up_stops_and_pulls_nothing(
    rig, tmp_path
):
    # Its vanilla children are ready, so it has slots; but no job could be finished here: it
    # must not take jobs (and their tries) to fail them.
    config = plugin_block("WdPostVanilla", "echo") + crashing_table("WdPostSnark", "no snark here")
    job, _ = await rig.jobs.create(job_input())
    worker = Worker(rig.settings(children(tmp_path, config)))
    error = await run_until_it_gives_up(rig, worker)
    assert "no WindowPoSt SNARK child can prove any more" in str(error), error
    assert "'no snark here'" in str(error)
    assert worker.counters.pulled == 0
    assert (await rig.jobs.get(job.Id)).State == "ready2run"


async def test_a_token_the_coordinator_refuses_stops_the_worker_at_start(rig, tmp_path):
    rig.server.token = b"the-right-one"
    worker = Worker(rig.settings(children(tmp_path, plugin_block("WdPost", "echo")), token="wrong"))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            with pytest.raises(
                UsageError, match="refused this worker's token: the bearer token is wrong"
            ):
                await worker.run()
            nursery.cancel_scope.cancel()


async def test_a_token_refused_while_running_stops_the_worker_instead_of_retrying_for_ever(
    rig, tmp_path
):
    # The coordinator restarted with another token: every heartbeat and the finish are refused.
    # The worker stops (exit 2 from the command), having said why, rather than retrying until
    # the job's deadline or its lifetime while the coordinator times the job out.
    rig.server.token = b"the-right-one"
    job, _ = await rig.jobs.create(job_input())
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=60, progress_interval=0.05))
    worker = Worker(rig.settings(kids, token="the-right-one", shutdown_grace=0.3))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.server.serve)
            with pytest.RaisesGroup(
                pytest.RaisesExc(UsageError, match="refused this worker's token: the bearer token"),
                flatten_subgroups=True,
            ):
                async with trio.open_nursery() as inner:
                    inner.start_soon(worker.run)
                    await worker.wait_for(lambda: job.Id in worker.held)
                    rig.server.token = b"another-one"
            nursery.cancel_scope.cancel()
    assert worker.counters.delivered == 0


async def test_the_default_name_is_the_local_address_that_reaches_the_manager():
    assert await local_address_towards(Endpoint("127.0.0.1", 1789)) == "127.0.0.1"


# --- the rules ------------------------------------------------------------------------------------


def test_sizes_become_damocles_workers_proof_type_names():
    assert proof_types_for_sizes(["32GiB"]) == (
        "StackedDrgWinning32GiBV1",
        "StackedDrgWindow32GiBV1",
        "StackedDrgWindow32GiBV1_2",
    )
    assert len(proof_types_for_sizes(["2KiB", "64GiB", "2KiB"])) == 6
    with pytest.raises(ValueError, match="'32G' is not a sector size"):
        proof_types_for_sizes(["32G"])


def test_as_many_jobs_are_asked_as_slots_are_free_and_one_from_damocles_manager():
    assert free_slots(4, 1) == 3 and free_slots(1, 3) == 0
    assert jobs_to_ask(Api.DEXT, 3) == 3 and jobs_to_ask(Api.VENUS, 3) == 1
    assert jobs_to_ask(Api.DEXT, 0) == 0 and jobs_to_ask(Api.VENUS, 0) == 0


def test_a_split_worker_takes_no_job_while_no_snark_child_is_up():
    # Its vanilla step could be proved, but not finished: under load the SNARK children were
    # still restarting (to give up) when the worker pulled, and the job's try was spent.
    vanilla, snark = "window_post_vanilla", "window_post_snark"
    assert ready_slots([(vanilla, "ready", 2, ()), (snark, "starting", 1, ())]) == 0
    assert (
        ready_slots([(vanilla, "ready", 2, ()), (snark, "backoff", 1, ()), (snark, "busy", 1, ())])
        == 2
    )
    assert (
        ready_slots(
            [(vanilla, "busy", 2, ()), (vanilla, "starting", 1, ()), (snark, "ready", 1, ())]
        )
        == 2
    )
    assert ready_slots([("window_post", "ready", 3, ()), ("window_post", "fatal", 1, ())]) == 3


def test_what_a_failed_call_means():
    assert failure_of(Api.DEXT, None) is Failure.UNREACHABLE
    assert failure_of(Api.DEXT, rpc.METHOD_NOT_FOUND) is Failure.NO_METHOD
    assert failure_of(Api.DEXT, rpc.REFUSED) is Failure.REFUSED
    # Our coordinator's code 1 is its store failing for a while; damocles-manager's too, but for
    # its kv store's `key not found`: the job is gone.
    assert failure_of(Api.DEXT, rpc.METHOD_ERROR) is Failure.ERROR
    assert failure_of(Api.VENUS, rpc.METHOD_ERROR, "key not found") is Failure.REFUSED
    assert failure_of(Api.VENUS, rpc.METHOD_ERROR, "DB Closed") is Failure.ERROR
    # A call the server cannot read is refused again as it is (a NUL in a text, say).
    for code in (rpc.PARSE_ERROR, rpc.INVALID_REQUEST, rpc.INVALID_PARAMS):
        assert failure_of(Api.DEXT, code) is failure_of(Api.VENUS, code) is Failure.REFUSED
    # ...but go-jsonrpc's -32700 for a body it could not read off the connection may pass.
    message = "(error code -32700) reading request: unexpected EOF"
    assert failure_of(Api.VENUS, rpc.PARSE_ERROR, message) is Failure.ERROR
    # An answer that is not JSON-RPC: refused as sent (413: too large) is refused again; a
    # proxy's 401, 403, 404 (in maintenance) or 5xx, or a garbled answer, may pass.
    for status in (400, 413, 414, 431):
        assert failure_of_answer(status) is Failure.REFUSED
    for status in (401, 403, 404, 408, 421, 429, 500, 502, 503, None):
        assert failure_of_answer(status) is Failure.ERROR
    # At the start: a proxy's 5xx, 408 or 429 while the manager is away is waited out; a 501 or
    # 505 (a server that takes no POST: another program at that port) is the operator's to fix.
    assert [s for s in (401, 404, 408, 429, 500, 501, 502, 503, 505, None) if passing_answer(s)] == [
        408, 429, 500, 502, 503,
    ]  # fmt: skip


async def test_our_coordinators_venus_refusal_of_a_heartbeat_says_the_job_is_gone(tmp_path):
    # A worker that found a damocles-manager speaks Venus.* to whatever serves that address
    # later: our coordinator refuses a job that is no longer this worker's with code 1 and
    # "job ID: why", not damocles' `key not found`. Taken for a store failing, the worker went
    # on proving a job another worker held, and its unfenced finish then overrode that one's.
    from test_coordinator import heartbeat_body

    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as store:
        jobs = TrioJobStore(store)
        job, _ = await jobs.create(job_input())
        await jobs.allocate(rules.AllocationSpec(), 1, "worker-b")  # reset, then given to b
        coordinator = Coordinator(jobs, watch_clocks=False)
        _, answer = await coordinator.answer(heartbeat_body([job.Id], "worker-a"))
    error = json.loads(answer)["error"]
    assert job_gone(error["code"], error["message"], [job.Id]), error
    assert not job_gone(error["code"], error["message"], ["another-job"])


def test_a_finish_is_retried_while_unreachable_until_the_deadline_or_the_lifetime():
    def verdict(failure, now, not_after=None):
        return finish_verdict(failure, now, not_after=not_after, allocated_at=100.0, lifetime=50.0)[
            0
        ]

    assert verdict(Failure.UNREACHABLE, 120) is FinishVerdict.RETRY
    assert verdict(Failure.ERROR, 120) is FinishVerdict.RETRY
    assert verdict(Failure.REFUSED, 120) is FinishVerdict.GIVE_UP
    assert verdict(Failure.UNREACHABLE, 130, not_after=130) is FinishVerdict.GIVE_UP
    assert verdict(Failure.UNREACHABLE, 150) is FinishVerdict.GIVE_UP


def test_a_finishs_wait_ends_shortly_before_its_jobs_deadline_and_within_it_at_the_deadline():
    # Before, the backoff alone (up to 30 s): a result was tried again after its job's deadline.
    assert finish_wait(30.0, 1000.0, None) == 30.0  # no deadline: the backoff's
    assert finish_wait(30.0, 1000.0, 1100.0) == 30.0  # well before it: the backoff's
    assert finish_wait(30.0, 1000.0, 1020.0) == 20.0 - LAST_TRY_MARGIN  # its last chance
    assert finish_wait(1.0, 1000.0, 1020.0) == 1.0  # a shorter backoff is kept
    assert finish_wait(30.0, 1018.0, 1020.0) == 2.0  # that chance gone: once more at it
    assert finish_wait(30.0, 1021.0, 1020.0) == 0.0  # (past it: given up after the try)


def test_a_results_last_try_lands_before_its_deadline_on_a_clock_behind_short_of_the_warning():
    # The last try's margin covers a worker's clock behind the manager's by less than the skew
    # it is warned of (CLOCK_SKEW), and the finish's round trip (1 s here): that try reaches
    # the manager before the deadline, by the manager's clock. A margin of 0 (the last try at
    # the deadline by the worker's clock, after it by the manager's) failed no test before.
    behind = CLOCK_SKEW - 0.01  # the worker's clock, unwarned
    manager_now, not_after = 1000.0, 1020.0
    wait = finish_wait(30.0, manager_now - behind, not_after)
    assert manager_now + wait + 1.0 <= not_after


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_an_answer():
    backoff = Backoff(1.0, 5.0)
    assert [backoff.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends():
    outage = Outage()
    assert outage.answered(1.0) is None
    assert "unreachable (refused)" in outage.failed(10.0, "refused")
    assert outage.failed(11.0, "refused") is None
    assert "unreachable for 5.0 s" in outage.answered(15.0)
    assert outage.answered(16.0) is None


def test_an_outage_a_call_could_not_connect_in_is_ended_by_a_heartbeat_and_that_ends_with_it():
    # Whether a call could not connect during the manager's outage (down, not stuck: then a
    # heartbeat's or a ping's answer ends it) was the worker's own flag beside its Outage, never
    # cleared when the outage ended; it is the outage's now, and ends with it.
    outage = Outage()
    assert outage.failed(10.0, "no answer") is not None  # an allocation unanswered: maybe stuck
    assert outage.heard(11.0) is None  # a heartbeat answered: the outage goes on
    assert outage.failed(12.0, "refused", connect=True) is None  # down, not stuck
    assert outage.heard(13.0) == "the manager answers again (unreachable for 3.0 s)"
    assert not outage.unconnected
    # The next outage begins with a call unanswered: a heartbeat's answer does not end it.
    assert outage.failed(20.0, "no answer") is not None
    assert outage.heard(21.0) is None and outage.down_since == 20.0
    # One begun by a call that could not connect, ended by an allocation answered: forgotten.
    assert outage.answered(22.0) is not None
    assert outage.failed(30.0, "refused", connect=True) is not None
    assert outage.answered(31.0) is not None and not outage.unconnected
    assert outage.heard(32.0) is None


def test_heartbeats_that_fail_are_said_once_and_once_more_when_they_are_answered_again():
    # (A coordinator whose job store is down answers them with an error at each interval.)
    beats = heartbeats_outage()
    assert beats.failed(10.0, "the job store is down").startswith(
        "the heartbeats of the jobs held here fail (the job store is down): their proofs go on"
    )
    assert [beats.failed(t, "the job store is down") for t in (20.0, 30.0)] == [None, None]
    assert beats.answered(40.0) == "heartbeats are answered again, after 3 failed in 30 s"
    assert beats.answered(50.0) is None


def test_an_outage_does_not_count_the_time_nothing_was_tried():
    # Heartbeats failing from 10, no job held (none sent) from 25 to 95 and from 97 to 100.
    beats = heartbeats_outage()
    beats.idle(5.0)  # (no outage: nothing to leave out)
    assert beats.failed(10.0, "down") is not None and beats.failed(20.0, "down") is None
    beats.idle(25.0)
    beats.idle(30.0)  # (the first one counts)
    assert beats.failed(95.0, "down") is None
    beats.idle(97.0)
    # 90 s, less the 70 and the 3 in which nothing was tried.
    assert beats.answered(100.0) == "heartbeats are answered again, after 3 failed in 17 s"
    # The next outage starts from nothing left over.
    assert beats.failed(200.0, "down") is not None
    assert beats.answered(210.0) == "heartbeats are answered again, after 1 failed in 10 s"


def test_sector_paths_follow_damocles_layout_and_a_missing_store_names_store_and_job():
    sector = WdPoStSectorInfo(
        SectorId=7, CommR=(0,) * 32, Upgrade=True,
        Accesses=SectorAccessStores(SealedFile="a", CacheDir="b"),
    )  # fmt: skip
    job = PulledJob("J1", job_input(miner=1001))
    assert default_sector_paths(job, sector, {"a": "/mnt/a", "b": "/mnt/b/"}) == (
        "/mnt/a/update/s-t01001-7",
        "/mnt/b/update-cache/s-t01001-7",
    )
    with pytest.raises(LookupError, match=r"job J1: .* store 'b', which this worker has not"):
        default_sector_paths(job, sector, {"a": "/mnt/a"})


def test_a_job_whose_sector_id_is_beyond_64_bits_is_no_task_and_says_which():
    job = PulledJob("J2", job_input(sector_ids=(2**64,), comm_rs=[(1,) * 32]))
    with pytest.raises(ValueError, match=f"job J2 .*sector_id {2**64} does not fit in 64 bits"):
        window_post_task(job, [("/s", "/c")])
    largest = job_input(sector_ids=(2**64 - 1,), comm_rs=[(1,) * 32])
    assert (
        window_post_task(PulledJob("J3", largest), [("/s", "/c")]).replicas[0].sector_id
        == 2**64 - 1
    )


class OwnDirectories:
    """A site's layout with a directory of its own for each sector (`<root>/<num>/sealed`)."""

    def __init__(self, root) -> None:
        self.root = root

    @hookimpl
    def dext_sector_paths(self, job, sector, attached):
        where = self.root / str(sector.SectorId)
        (where / "cache").mkdir(parents=True, exist_ok=True)
        return str(where / "sealed"), str(where / "cache")


async def test_the_looks_at_a_directory_per_sector_leave_nothing_behind(rig, tmp_path):
    # The worker kept a lock for each directory it had looked at, for ever: one per sector
    # with such a layout, growing with every sector it ever proved.
    for n in range(60):
        await rig.jobs.create(job_input(seed=n, sector_ids=(3 * n + 1, 3 * n + 2, 3 * n + 3)))
    pm = get_plugin_manager(entry_points=False)
    pm.register(OwnDirectories(tmp_path / "own"), name="own")
    kids = children(tmp_path, plugin_block("WdPost", "echo", concurrent=4))
    worker = Worker(rig.settings(kids, idle_poll=0.05), plugin_manager=pm)
    await run_until(rig, worker, lambda: worker.counters.delivered == 60)
    assert worker.counters.failed == 0
    assert worker._look_limiters == {}
