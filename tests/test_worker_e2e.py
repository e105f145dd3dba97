"""Worker-prover mode end to end, with chaos, all real processes on one machine.

damocles-manager's side is the test, driving `damocles-ext serve window_post --jobs postgresql://…`
as it drives an ext-prover (JSON lines on its stdin, at most `Concurrent` requests in flight).
A `damocles-ext coordinator` serves the jobs on the session's PostgreSQL, with damocles-manager's
own sector-manager.cfg (a short HeartbeatTimeout), and three `damocles-ext worker`s prove them on
`native` children (the C reference prover through cffi) from 8MiB sectors. Each worker attaches
store `store-a` at a directory of its own; the requests name the manager's path of that store,
which the producer turns into the store name.

The sectors are the same in every copy (the same comm_r, the same proofs), but the copies of the
two workers the chaos hits keep fewer rows of each sector's tree: their proofs rebuild those rows
(as a real prover does for discarded rows) and take a good part of a second, while the third
worker's take milliseconds. So "mid-proof" is real without any sleep, and the run stays short.

While 200 requests go through: one worker is SIGKILLed while it holds a job, another is
SIGSTOPped while it holds one, past the heartbeat timeout, until the job was proved elsewhere,
then SIGCONTed while the coordinator is SIGKILLed; the coordinator is started again on its port.
Every wait is on something observed (the store, a log line, a metric), each bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import trio
from helpers.frontend import DEXT, CoordinatorProcess, LogWatcher, ManagerLike, dext_env

from damocles_ext.jobs.model import FINISHED, RUNNING, JobRecord
from damocles_ext.jobs.store import JobStore
from damocles_ext.post.fixtures import create_sectors, load_manifest
from damocles_ext.post.verify import verify_window_post
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt, WindowPoStOutput

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_processes")]

PROOF_TYPE = "StackedDrgWindow8MiBV1_2"
MINER = 1000
SECTORS = (1, 2)  # one partition of an 8MiB WindowPoSt
REQUESTS = 200
CONCURRENT = 16  # the Concurrent of damocles-manager's ext-prover entry: requests in flight
# The requests go in three bursts: the second once the killed and the stopped worker's jobs were
# proved elsewhere, the third once the coordinator is back; so each event meets running jobs.
BURSTS = (90, 60, 50)
# Short, so that the killed and stopped workers' jobs move on quickly; 12 heartbeats of the
# workers (every 0.5 s) long, so that a live worker's job is not taken back while a 2-core CI
# machine, proving on every core, delays them (at 3 s, 6 heartbeats, it once was).
HEARTBEAT_TIMEOUT = "6s"
SLOW_ROWS = 14  # tree rows the slow copies do not keep: each proof rebuilds them
FAST, KILLED, STOPPED = "gpu-fast", "gpu-killed", "gpu-stopped"
# Bounds against a hang, not timings: on a loaded 2-core machine the whole run takes minutes.
WAIT = 60.0  # the bound of every wait on an observed condition


def manager_cfg(store_root: Path) -> str:
    # damocles-manager's own file: the store as it names it, and its worker-prover limits.
    # JobMaxTry leaves room for the retries the chaos causes.
    return f"""
[[Common.PersistStores]]
Name = "store-a"
Path = "{store_root}"

[Common.Proving.WorkerProver]
JobMaxTry = 5
HeartbeatTimeout = "{HEARTBEAT_TIMEOUT}"
"""


def prover_cfg(concurrent: int) -> str:
    # No GPU lock: the three workers share this machine's TMPDIR and would prove one at a time.
    return (
        f'[[WdPost]]\nPlugin = "native"\nConcurrent = {concurrent}\n'
        "PluginOptions = { gpu_lock = false }\n"
    )


def make_sectors(root: Path, rows_to_discard: int) -> list[str]:
    """The sectors under `root` (damocles' layout), the same ones whatever `rows_to_discard`;
    their comm_r as hex."""
    manifest = load_manifest(
        create_sectors(root, PROOF_TYPE, len(SECTORS), MINER, rows_to_discard=rows_to_discard,
                       random_seed=11)
    )  # fmt: skip
    return [r.comm_r for r in manifest.replicas]


def request(i: int, store_root: Path, comm_rs: list[str]) -> WindowPoSt:
    """Request `i`, with the sectors at the manager's path of the store; its own seed."""
    replicas = [
        PoStReplicaInfo(
            sector_id=n,
            comm_r=bytes.fromhex(comm_r),
            cache_dir=f"{store_root}/cache/s-t0{MINER}-{n}",
            sealed_file=f"{store_root}/sealed/s-t0{MINER}-{n}",
        )
        for n, comm_r in zip(SECTORS, comm_rs, strict=True)
    ]
    return WindowPoSt(MINER, PROOF_TYPE, replicas, i.to_bytes(4, "little") + bytes(28))


class WorkerProcess:
    """One `damocles-ext worker` subprocess, its log watched."""

    def __init__(self, name: str, store: Path, config: Path) -> None:
        self.name = name
        self.store = store
        self.config = config
        self.proc: trio.Process | None = None
        self.log: LogWatcher | None = None
        self.metrics_url = ""

    async def start(self, nursery: trio.Nursery, port: int) -> None:
        self.proc = await trio.lowlevel.open_process(
            [*DEXT, "worker", "--manager", f"127.0.0.1:{port}", "-c", str(self.config),
             "--name", self.name, "--attached", f"store-a={self.store}",
             "--heartbeat-interval", "0.5s", "--idle-poll", "0.2s", "--shutdown-grace", "10",
             "--metrics", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dext_env(),
        )  # fmt: skip
        self.log = LogWatcher(self.proc.stderr)
        nursery.start_soon(self.log.run)
        line = await self.log.wait_for("metrics on ")
        self.metrics_url = line.split("metrics on ", 1)[1].strip()
        await self.log.wait_for("pulls WindowPoSt jobs from")

    async def metric(self, name: str) -> float:
        def scrape() -> str:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as answer:
                return answer.read().decode()

        return metric_value(await trio.to_thread.run_sync(scrape), name)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)


def metric_value(text: str, name: str) -> float:
    """The value of the sample `name` (with its labels, as exposed) in a Prometheus scrape."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name} in the scrape")


async def scrape(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.read().decode()

    return await trio.to_thread.run_sync(get)


class Store:
    """The job store as the test reads it (the rows, never through our processes)."""

    def __init__(self, url: str) -> None:
        self.store = JobStore.open(url, create=False)

    async def jobs(self) -> dict[str, JobRecord]:
        return {j.Id: j for j in await trio.to_thread.run_sync(self.store.list_jobs)}

    async def until(self, what: str, condition) -> dict[str, JobRecord]:
        """Look at the jobs until `condition(jobs)` holds (bounded); its last look."""
        with trio.move_on_after(WAIT):
            while True:
                jobs = await self.jobs()
                if condition(jobs):
                    return jobs
                await trio.sleep(0.02)  # the next look; nothing waits on this pause itself
        raise AssertionError(f"not within {WAIT:g}s: {what}")

    def close(self) -> None:
        self.store.close()


def running_on(jobs: dict[str, JobRecord], worker: str) -> dict[str, JobRecord]:
    return {i: j for i, j in jobs.items() if j.State == RUNNING and j.WorkerName == worker}


async def until_true(what: str, probe) -> None:
    """Ask `probe()` until it says True (bounded)."""
    with trio.move_on_after(WAIT):
        while True:
            if await probe():
                return
            await trio.sleep(0.05)  # the next look; nothing waits on this pause itself
    raise AssertionError(f"not within {WAIT:g}s: {what}")


async def test_two_hundred_requests_are_each_proved_once_through_a_killed_worker_a_stopped_worker_and_a_coordinator_restart(
    postgres_url, tmp_path
):
    t0 = time.monotonic()
    figures: dict[str, float] = {}
    manager_root = tmp_path / "manager" / "store-a"  # where damocles-manager sees the store
    conf = tmp_path / "manager-conf"
    conf.mkdir()
    (conf / "sector-manager.cfg").write_text(manager_cfg(manager_root))
    stores = {name: tmp_path / name / "store-a" for name in (FAST, KILLED, STOPPED)}
    workers: dict[str, WorkerProcess] = {}
    for name, concurrent in ((FAST, 4), (KILLED, 1), (STOPPED, 1)):
        config = tmp_path / name / "ext-prover.cfg"
        config.parent.mkdir()
        config.write_text(prover_cfg(concurrent))
        workers[name] = WorkerProcess(name, stores[name], config)
    coordinator = CoordinatorProcess(
        postgres_url, "--conf-dir", str(conf), "--metrics", "127.0.0.1:0"
    )
    made: dict[str, list[str]] = {}

    async def make(name: str, rows_to_discard: int) -> None:
        made[name] = await trio.to_thread.run_sync(make_sectors, stores[name], rows_to_discard)

    store: Store | None = None
    serve: ManagerLike | None = None
    answers: dict[int, object] = {}
    all_answered = trio.Event()
    bursts = [trio.Event() for _ in BURSTS]
    try:
        with trio.fail_after(400):
            async with trio.open_nursery() as nursery:
                # The fast copy keeps its whole trees, the slow ones not (made while the
                # coordinator starts: the C code hashes without the GIL).
                async with trio.open_nursery() as starting:
                    starting.start_soon(make, FAST, 2)
                    starting.start_soon(make, KILLED, SLOW_ROWS)
                    starting.start_soon(coordinator.start, nursery)
                comm_rs = made[FAST]
                assert made[KILLED] == comm_rs  # the same sectors: the same comm_r
                # The stopped worker's copy: hard links to the killed one's files, another path.
                shutil.copytree(stores[KILLED], stores[STOPPED], copy_function=os.link)
                tasks = [request(i, manager_root, comm_rs) for i in range(REQUESTS)]
                store = Store(postgres_url)

                async def start_serve() -> None:
                    nonlocal serve
                    serve = await ManagerLike.start(
                        nursery,
                        [*DEXT, "serve", "window_post", "--jobs", postgres_url, "--conf-dir",
                         str(conf), "--poll-interval", "1s"],
                        "window_post", stderr=subprocess.PIPE, ready_timeout=60,
                    )  # fmt: skip

                async with trio.open_nursery() as starting:  # all four at once
                    for w in workers.values():
                        starting.start_soon(w.start, nursery, coordinator.port)
                    starting.start_soon(start_serve)
                assert serve is not None
                figures["start"] = time.monotonic() - t0

                async def send_all() -> None:
                    # At most CONCURRENT requests in flight, as damocles-manager sends them.
                    slots = trio.Semaphore(CONCURRENT)

                    async def one(i: int) -> None:
                        request_id = await serve.send(tasks[i])
                        answers[i] = await serve.wait(request_id)
                        slots.release()
                        if len(answers) == REQUESTS:
                            all_answered.set()

                    async with trio.open_nursery() as sending:
                        first = 0
                        for size, go in zip(BURSTS, bursts, strict=True):
                            await go.wait()
                            for i in range(first, first + size):
                                await slots.acquire()
                                sending.start_soon(one, i)
                            first += size

                nursery.start_soon(send_all)
                bursts[0].set()

                # --- a worker is SIGKILLed, another SIGSTOPped, each right after it pulled a
                # job: their proofs take a good part of a second, so each is mid-proof.
                killed, stopped = workers[KILLED], workers[STOPPED]
                await killed.log.wait_for(": pulled")
                children = psutil.Process(killed.proc.pid).children(recursive=True)
                killed.signal(signal.SIGKILL)
                await killed.proc.wait()
                killed_at = time.monotonic()
                lost = running_on(await store.jobs(), KILLED)
                assert lost, f"{KILLED} held no job when killed:\n{killed.log.text()}"
                late_id, late_job, stopped_at = await stop_while_proving(stopped, store)

                # Its children do not go on proving for nobody: they see their stdin close.
                await until_true(
                    "the killed worker's children exit",
                    lambda: trio.to_thread.run_sync(lambda: not any(map(alive, children))),
                )

                # The killed worker's jobs run elsewhere after the timeout, as a later try.
                jobs = await store.until(
                    "the killed worker's jobs are taken by another worker",
                    lambda j: all(
                        j[i].WorkerName not in ("", KILLED) and j[i].TryNum > lost[i].TryNum
                        for i in lost
                    ),
                )
                figures["sigkill_to_elsewhere"] = time.monotonic() - killed_at
                # The stopped worker's job is proved by another worker meanwhile.
                jobs = await store.until(
                    "the stopped worker's job is proved by another worker",
                    lambda j: (
                        j[late_id].State == FINISHED
                        and j[late_id].ErrorReason == ""
                        and j[late_id].WorkerName not in ("", STOPPED)
                    ),
                )
                figures["sigstop_to_proved_elsewhere"] = time.monotonic() - stopped_at
                accepted = jobs[late_id]
                assert accepted.TryNum > late_job.TryNum and accepted.Output is not None
                bursts[1].set()

                # --- the coordinator is SIGKILLed while jobs run ----------------------------
                running = await store.until(
                    "jobs of the second burst run", lambda j: len(running_on(j, FAST)) >= 2
                )
                await coordinator.kill()
                down_at = time.monotonic()
                # Running just before the kill (a quick proof may end before it lands: it
                # ended where it ran too) and just after it.
                at_kill = {
                    i: (j.WorkerName, j.TryNum)
                    for jobs in (running, await store.jobs())
                    for i, j in running_on(jobs, FAST).items()
                }
                # The stopped worker wakes while no coordinator answers: its proof (done while
                # it was stopped) cannot be delivered and waits for a retry.
                stopped.signal(signal.SIGCONT)
                await until_true(
                    "the woken worker tried to deliver the late result",
                    lambda: _finishing_with_retries(stopped),
                )
                await coordinator.start(nursery, port=coordinator.port)
                figures["coordinator_down"] = time.monotonic() - down_at
                # Its finish reaches the new coordinator, which refuses it: the job is another's.
                line = await stopped.log.wait_for(f"job {late_id}: its result")
                assert "is given up" in line and "not running" in line, line
                bursts[2].set()

                with trio.move_on_after(200):
                    await all_answered.wait()
                if not all_answered.is_set():
                    raise AssertionError(await stalled(answers, store, workers, serve))
                figures["all_answered"] = time.monotonic() - t0
                refused = metric_value(
                    await scrape(coordinator.metrics_url),
                    'damocles_ext_job_refusals_total{event="finish"}',
                )
                assert refused >= 1
                # The worker's supervisor counts what it proved on the same port.
                finished = await workers[FAST].metric("damocles_ext_worker_jobs_finished_total")
                proved = await workers[FAST].metric(
                    'damocles_ext_requests_total{outcome="ok",stage="window_post"}'
                )
                assert finished >= 1 and proved >= finished

                # --- everything stops cleanly -----------------------------------------------
                await serve.close_stdin()
                assert await serve.process.wait() == 0, "\n".join(serve.log)
                for w in (workers[FAST], stopped):
                    w.signal(signal.SIGTERM)
                coordinator.proc.send_signal(signal.SIGTERM)
                for w in (workers[FAST], stopped):
                    assert await w.proc.wait() == 0, w.log.text()
                assert await coordinator.proc.wait() == 0, coordinator.stderr.decode()
                final = await store.jobs()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):  # a failed run leaves nothing behind
            procs = [w.proc for w in workers.values()] + [coordinator.proc]
            if serve is not None:
                procs.append(serve.process)
            for proc in procs:
                if proc is not None and proc.returncode is None:
                    proc.kill()  # a stopped process dies of SIGKILL too
                    await proc.wait()
        if store is not None:
            store.close()

    # Each request answered exactly once, with proofs the verifier accepts for its challenge.
    assert serve.duplicates == [] and serve.unknown == [] and serve.bad_lines == []
    assert sorted(answers) == list(range(REQUESTS))
    for i, answer in answers.items():
        assert answer.err_msg is None, (i, answer.err_msg)
        verify_window_post(tasks[i], WindowPoStOutput(answer.output.proofs, answer.output.faults))
    assert len(final) == REQUESTS
    assert all(j.State == FINISHED and j.ErrorReason == "" for j in final.values())
    # The killed worker's jobs: finished on another worker, at a later try.
    for i, before in lost.items():
        assert final[i].WorkerName not in (KILLED, "") and final[i].TryNum > before.TryNum
    # The late finish was refused: the proof accepted from the other worker stayed.
    assert final[late_id].WorkerName == accepted.WorkerName != STOPPED
    assert final[late_id].Output == accepted.Output and final[late_id].TryNum == accepted.TryNum
    # The coordinator's restart took no job back: those running at its kill ended where they ran,
    # in the same try. But for jobs the kill gave in an allocation whose answer it cut short: the
    # worker never held them ("may have done the call"), so they time out and run again, later.
    assert at_kill
    fast_log = workers[FAST].log.text()
    for i, (worker, try_num) in at_kill.items():
        if not re.search(rf"job {i}: pulled \(.*, try {try_num}\)", fast_log):
            assert final[i].TryNum > try_num, i
            continue
        assert (final[i].WorkerName, final[i].TryNum) == (worker, try_num), i
    for text in [serve.log and "\n".join(serve.log), coordinator.stderr.decode()] + [
        w.log.text() for w in workers.values()
    ]:
        assert "Traceback" not in text
    print(
        "worker e2e:",
        ", ".join(f"{k} {v:.2f}s" for k, v in figures.items()),
        f"| jobs of the killed worker {len(lost)}, running at the coordinator's kill"
        f" {len(at_kill)}, finishes refused {refused:g}",
    )


async def stop_while_proving(worker: WorkerProcess, store: Store) -> tuple[str, JobRecord, float]:
    """SIGSTOP `worker` right after it pulled a job, and keep it stopped once that job is given
    to another worker: the job, as it was when stopped, and when. Should the stop have come
    as its finish was on the wire (the job finished by `worker` itself), it is woken and
    stopped again at its next job."""
    assert worker.log is not None
    mark = 0
    while True:
        line = await worker.log.wait_for(": pulled", mark)
        mark = worker.log.lines.index(line, mark) + 1
        worker.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        job_id = line.split("job ", 1)[1].split(":", 1)[0]
        held = (await store.jobs()).get(job_id)
        if held is not None and held.State == RUNNING and held.WorkerName == worker.name:
            jobs = await store.until(
                f"the job {worker.name} was stopped on is taken back or finished",
                lambda j, job_id=job_id, held=held: (
                    j[job_id].TryNum > held.TryNum or j[job_id].State == FINISHED
                ),
            )
            if jobs[job_id].TryNum > held.TryNum:
                return job_id, held, stopped_at
        worker.signal(signal.SIGCONT)


def alive(process: psutil.Process) -> bool:
    """Running, and not a zombie (an orphan whose reaper has not reaped it yet has exited)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def stalled(answers, store: Store, workers: dict[str, WorkerProcess], serve) -> str:
    """What the failure message of a run whose requests were not all answered shows."""
    counts: dict[tuple[str, str], int] = {}
    for job in (await store.jobs()).values():
        key = (job.State, job.WorkerName)
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{len(answers)} of {REQUESTS} answered; jobs by (state, worker): {counts}"]
    for w in workers.values():
        assert w.log is not None
        parts.append(f"--- {w.name}:\n" + "\n".join(w.log.lines[-15:]))
    parts.append("--- serve:\n" + "\n".join(serve.log[-15:]))
    return "\n".join(parts)


async def _finishing_with_retries(worker: WorkerProcess) -> bool:
    finishing = await worker.metric('damocles_ext_worker_jobs_held{state="finishing"}')
    retries = await worker.metric("damocles_ext_worker_finish_retries_total")
    return finishing >= 1 and retries >= 1
