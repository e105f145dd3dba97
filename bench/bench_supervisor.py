"""The supervisor's overhead: latency, throughput, re-dispatch after a crash, idle cost.

Run: .venv/bin/python -m bench.bench_supervisor [--quick] [--save]

What is compared, all measured in this run on this machine:

* Latency of one trivial request (the `echo` prover, a 1-replica WindowPoSt), one at a time:
  - raw pipe: the same child program (`damocles-ext child window_post --plugin echo`, dext/1)
    driven by a blocking parent writing a frame and reading the answer: the floor;
  - supervisor, Python API: `await Supervisor.submit(task)` in-process, one echo child;
  - supervisor, control socket: `damocles-ext run` in its own process, our client in this one
    (two hops: client -> run -> child);
  - concurrent.futures.ProcessPoolExecutor(1) calling the same echo function.
  Goal: the API's p50 within 1.5x of the raw pipe's.
* Throughput with 2 workers of the same trivial prover and a realistic payload: a 2349-replica
  32GiB WindowPoSt (one partition). The prover's work is the same (hash the sector ids), so what
  differs is the cost of moving the task: dext/msgpack for us, pickle for the pool. Both get all
  requests at once (our 2 children with Concurrent = 1, the pool with max_workers = 2).
  Goal: >= 4x the pool's requests per second.
* Re-dispatch: with 2 `sleep` children, a request is running on one; we SIGKILL it and time until
  the request's first progress report arrives from the sibling (so: crash detection, re-queue,
  dispatch, the sibling decoding the task and starting it). Goal: < 50 ms.
* Idle cost: `damocles-ext run` with 8 echo children, all ready, nothing to do: the supervisor
  process's CPU over 10 s and its RSS (children not included). Goals: < 0.5% of a core, < 60 MB.
* `serve` start: from exec to its ready line (damocles-manager waits 5 s). Goal: < 1 s.

Throughput also shows the raw-pipe ceiling: the same 2 children each driven by a blocking thread
with one request in flight, no supervisor.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import trio
from damocles_ext_plugins.testing import echo_output

from bench.runner import bench_parser, finish, print_table
from damocles_ext.config import parse_config
from damocles_ext.errors import ProverError
from damocles_ext.protocol import dext
from damocles_ext.supervisor.core import Supervisor
from damocles_ext.supervisor.restart import BackoffPolicy
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

DEXT = [sys.executable, "-m", "damocles_ext"]
REPLICAS = 2349


def small_task(miner: int = 1000) -> WindowPoSt:
    return WindowPoSt(
        miner_id=miner,
        proof_type="StackedDrgWindow2KiBV1_2",
        replicas=[
            PoStReplicaInfo(1, bytes(range(32)), "/mnt/cache/s-t01000-1", "/mnt/sealed/s-t01000-1")
        ],
        seed=bytes(range(31)) + b"\x1f",
    )


def partition_task(miner: int = 1234) -> WindowPoSt:
    rng = random.Random(miner)
    replicas = []
    for i in range(REPLICAS):
        sector = 100_000 + i
        store = f"/mnt/store-{i % 24:02d}"
        replicas.append(
            PoStReplicaInfo(
                sector,
                rng.randbytes(32),
                f"{store}/cache/s-t0{miner}-{sector}",
                f"{store}/sealed/s-t0{miner}-{sector}",
            )
        )
    seed = bytearray(rng.randbytes(32))
    seed[31] &= 0x3F
    return WindowPoSt(
        miner_id=miner, proof_type="StackedDrgWindow32GiBV1_2", replicas=replicas, seed=bytes(seed)
    )


def config_text(plugin: str, count: int, concurrent: int = 1, options: str = "") -> str:
    block = f'[[WdPost]]\nPlugin = "{plugin}"\nConcurrent = {concurrent}\n'
    if options:
        block += f"PluginOptions = {{ {options} }}\n"
    return block * count


def percentiles(samples: list[float]) -> dict:
    s = sorted(samples)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]

    return {
        "n": len(s),
        "p50_ms": pct(50) * 1e3,
        "p99_ms": pct(99) * 1e3,
        "mean_ms": statistics.fmean(s) * 1e3,
    }


# -- latency -------------------------------------------------------------------------------------


class RawChild:
    """One child program driven by a plain blocking loop: the floor, no supervisor."""

    def __init__(self) -> None:
        (spec,) = parse_config(config_text("echo", 1), "<bench>").children
        self.proc = subprocess.Popen(
            spec.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **spec.envs},
        )
        self.decoder = dext.FrameDecoder()
        self.pending: list = []
        self.ids = 0
        assert isinstance(self._next_message(), dext.Hello)

    def _next_message(self) -> dext.Message:
        while not self.pending:
            data = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not data:
                raise RuntimeError("raw child exited")
            self.pending.extend(self.decoder.receive_data(data))
        return self.pending.pop(0)

    def prove(self, task: WindowPoSt):
        self.ids += 1
        frame = memoryview(dext.encode(dext.Request(self.ids, task)))
        while frame:
            frame = frame[os.write(self.proc.stdin.fileno(), frame) :]
        msg = self._next_message()
        while not isinstance(msg, dext.Response):
            msg = self._next_message()
        assert msg.output is not None, msg
        return msg.output

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def serve_ready_time(rounds: int, tmp: Path) -> dict:
    """Seconds from exec of `damocles-ext serve` to its ready line (damocles-manager allows 5)."""
    (tmp / "ext-prover.cfg").write_text(config_text("echo", 1))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*DEXT, "serve", "window_post", "--conf-dir", str(tmp)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        line = proc.stdout.readline()
        samples.append(time.perf_counter() - t0)
        assert line == b"window_post processor ready\n", line
        proc.stdin.close()
        proc.wait(30)
    return percentiles(samples) | {"max_ms": max(samples) * 1e3}


def _echo_in_worker(task: WindowPoSt):
    return echo_output(task)


class RunProcess:
    """`damocles-ext run` as a subprocess; watches its log for readiness."""

    def __init__(self, cfg: Path, socket_path: Path, ready_children: int) -> None:
        self.cfg = cfg
        self.socket_path = socket_path
        self.ready_children = ready_children
        self.listening = trio.Event()
        self.all_ready = trio.Event()
        self.process: trio.Process | None = None
        self.log: list[str] = []

    async def start(self, nursery: trio.Nursery) -> None:
        self.process = await trio.lowlevel.open_process(
            [
                *DEXT,
                "run",
                "-c",
                str(self.cfg),
                "--socket",
                str(self.socket_path),
                "--log-level",
                "info",
            ],
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        nursery.start_soon(self._watch_log)
        with trio.fail_after(60):
            await self.listening.wait()
            await self.all_ready.wait()

    async def _watch_log(self) -> None:
        buf = b""
        ready = 0
        while True:
            data = await self.process.stderr.receive_some()
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                self.log.append(line)
                if "control socket listening" in line:
                    self.listening.set()
                if re.search(r"\(pid \d+\): ready \(", line):
                    ready += 1
                    if ready >= self.ready_children:
                        self.all_ready.set()

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            await self.process.wait()


async def latency(n: int, warmup: int, rounds: int, tmp: Path) -> dict:
    """Sequential round trips of a 1-replica echo task, the four ways interleaved in `rounds`
    rounds so that a burst of load on a shared machine hits all of them alike."""
    from damocles_ext.client import connect

    task = small_task()
    samples: dict[str, list[float]] = {
        "raw_pipe": [],
        "supervisor_api": [],
        "control_socket": [],
        "process_pool": [],
    }
    cfg = tmp / "latency.cfg"
    cfg.write_text(config_text("echo", 1))
    raw = RawChild()
    sup = Supervisor(parse_config(config_text("echo", 1), "<bench>"))
    with ProcessPoolExecutor(max_workers=1) as pool:
        # Fork the pool's worker now: forked later, it would hold copies of the supervisor's pipe
        # ends and its children would not see their stdin close at shutdown.
        pool.submit(_echo_in_worker, task).result()
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready("window_post", 1)
            run = RunProcess(cfg, tmp / "run" / "control.sock", 1)
            await run.start(nursery)
            async with connect(run.socket_path) as client:

                async def via_api() -> None:
                    await sup.submit(task)

                async def via_socket() -> None:
                    await client.submit(task)

                async def via_raw() -> None:
                    raw.prove(task)  # blocking on purpose: the plain parent's floor

                async def via_pool() -> None:
                    pool.submit(_echo_in_worker, task).result()

                ways = {
                    "raw_pipe": via_raw,
                    "supervisor_api": via_api,
                    "control_socket": via_socket,
                    "process_pool": via_pool,
                }
                for fn in ways.values():
                    for _ in range(warmup):
                        await fn()
                per_round = max(1, n // rounds)
                for _ in range(rounds):
                    for name, fn in ways.items():
                        for _ in range(per_round):
                            t0 = time.perf_counter()
                            await fn()
                            samples[name].append(time.perf_counter() - t0)
            await run.stop()
            sup.request_shutdown()
    raw.close()
    return {name: percentiles(s) for name, s in samples.items()}


# -- throughput ----------------------------------------------------------------------------------


async def throughput(m: int, rounds: int, tmp: Path) -> dict:
    """Bursts of 2349-replica tasks, all submitted at once, 2 workers each way; the ways take
    turns for `rounds` rounds (m requests per way in all)."""
    from concurrent.futures import ThreadPoolExecutor

    from damocles_ext.client import connect

    tasks = [partition_task(1000 + i) for i in range(m)]
    per_round = max(2, m // rounds)
    elapsed = {"raw_pipe": 0.0, "supervisor_api": 0.0, "control_socket": 0.0, "process_pool": 0.0}
    done = dict.fromkeys(elapsed, 0)
    cfg = tmp / "throughput.cfg"
    cfg.write_text(config_text("echo", 2))
    raw = [RawChild(), RawChild()]
    threads = ThreadPoolExecutor(2)
    with ProcessPoolExecutor(max_workers=2) as pool:
        # Both pool workers are forked before any supervisor pipe exists (see latency()).
        for f in [pool.submit(_echo_in_worker, t) for t in tasks[:10]]:
            f.result()
        assert len(pool._processes) == 2
        sup = Supervisor(parse_config(config_text("echo", 2), "<bench>"))
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready("window_post", 2)
            run = RunProcess(cfg, tmp / "run2" / "control.sock", 2)
            await run.start(nursery)
            async with connect(run.socket_path) as client:

                async def burst_async(submit, batch) -> list:
                    outputs: list = [None] * len(batch)

                    async def one(i: int) -> None:
                        outputs[i] = await submit(batch[i])

                    async with trio.open_nursery() as burst:
                        for i in range(len(batch)):
                            burst.start_soon(one, i)
                    return outputs

                async def via_api(batch):
                    return await burst_async(sup.submit, batch)

                async def via_socket(batch):
                    return await burst_async(client.submit, batch)

                async def via_raw(batch):
                    # Each child driven by its own blocking thread, one request in flight each.
                    outputs: list = [None] * len(batch)

                    def drive(k: int) -> None:
                        for i in range(k, len(batch), 2):
                            outputs[i] = raw[k].prove(batch[i])

                    list(threads.map(drive, (0, 1)))
                    return outputs

                async def via_pool(batch):
                    return [f.result() for f in [pool.submit(_echo_in_worker, t) for t in batch]]

                ways = {
                    "raw_pipe": via_raw,
                    "supervisor_api": via_api,
                    "control_socket": via_socket,
                    "process_pool": via_pool,
                }
                for fn in ways.values():
                    await fn(tasks[:10])  # warm-up
                for r in range(rounds):
                    batch = tasks[(r * per_round) % m :][:per_round]
                    for name, fn in ways.items():
                        t0 = time.perf_counter()
                        outputs = await fn(batch)
                        elapsed[name] += time.perf_counter() - t0
                        done[name] += len(batch)
                        assert outputs == [echo_output(t) for t in batch], name
            await run.stop()
            sup.request_shutdown()
    threads.shutdown()
    for c in raw:
        c.close()
    return {
        name: {
            "requests": done[name],
            "seconds": elapsed[name],
            "per_s": done[name] / elapsed[name],
        }
        for name in elapsed
    }


# -- re-dispatch after SIGKILL -------------------------------------------------------------------


async def redispatch(k: int) -> dict:
    config = parse_config(
        config_text("sleep", 2, options="seconds = 60, progress_interval = 30"), "<bench>"
    )
    # A short restart delay only so that the k rounds do not wait for the default 1 s, 2 s, ...
    sup = Supervisor(config, backoff=BackoffPolicy(base=0.05, cap=0.2))
    samples = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for round_no in range(k):
            await sup.wait_ready("window_post", 2)
            samples.append(await _redispatch_once(sup, small_task(round_no)))
        sup.request_shutdown()
    return percentiles(samples) | {"max_ms": max(samples) * 1e3}


async def _redispatch_once(sup: Supervisor, task: WindowPoSt) -> float:
    """Start `task`, SIGKILL the child running it, return seconds until the sibling reports."""
    started = trio.Event()
    resumed = trio.Event()
    state: dict = {"killed": None}

    def on_progress(p: dext.Progress) -> None:
        if not started.is_set():
            started.set()
        elif state["killed"] is not None and not resumed.is_set():
            state["t1"] = time.perf_counter()
            resumed.set()

    async def request() -> None:
        with contextlib.suppress(ProverError):  # cancelled below, or lost with its child
            await sup.submit(task, on_progress=on_progress)

    async with trio.open_nursery() as inner:
        inner.start_soon(request)
        await started.wait()
        (busy,) = [c for c in sup.statistics().children if c.in_flight]
        state["killed"] = busy.name
        t0 = time.perf_counter()
        os.kill(busy.pid, signal.SIGKILL)
        with trio.fail_after(10):
            await resumed.wait()
        (now_busy,) = [c for c in sup.statistics().children if c.in_flight]
        assert now_busy.name != busy.name, "progress came from the killed child?"
        inner.cancel_scope.cancel()
    return state["t1"] - t0


# -- idle cost -----------------------------------------------------------------------------------


async def idle_cost(seconds: float, tmp: Path) -> dict:
    cfg = tmp / "idle.cfg"
    cfg.write_text(config_text("echo", 8))
    async with trio.open_nursery() as nursery:
        run = RunProcess(cfg, tmp / "run3" / "control.sock", 8)
        await run.start(nursery)
        proc = psutil.Process(run.process.pid)
        await trio.sleep(1.0)  # let start-up work (imports, spawning) settle before measuring
        c0 = proc.cpu_times()
        t0 = time.monotonic()
        await trio.sleep(seconds)
        c1 = proc.cpu_times()
        elapsed = time.monotonic() - t0
        mem = proc.memory_full_info()
        children = proc.children()
        children_rss = sum(c.memory_info().rss for c in children)
        await run.stop()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return {
        "children": len(children),
        "window_s": elapsed,
        "cpu_percent_of_core": 100 * cpu / elapsed,
        "rss_mb": mem.rss / 2**20,
        "uss_mb": mem.uss / 2**20,
        "children_rss_mb_total": children_rss / 2**20,
    }


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "supervisor")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds (a smoke run; --save writes supervisor-quick.json)",
    )
    args = parser.parse_args(argv)
    # The re-dispatch rounds kill children on purpose; their warnings are expected.
    logging.getLogger("damocles_ext").setLevel(logging.ERROR)
    n, warmup, m, k, idle_s = (300, 30, 100, 5, 3.0) if args.quick else (2000, 100, 400, 20, 10.0)

    results: dict = {
        "config": {
            "latency_requests": n,
            "warmup": warmup,
            "throughput_requests": m,
            "throughput_replicas": REPLICAS,
            "redispatch_rounds": k,
            "idle_seconds": idle_s,
        }
    }
    with tempfile.TemporaryDirectory(prefix="dext-bench-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o700)
        print(f"latency: {n} sequential echo requests each ...", flush=True)
        lat = trio.run(latency, n, warmup, 10, tmp)
        results["latency"] = lat
        print(f"throughput: {m} x {REPLICAS}-replica WindowPoSt, 2 workers ...", flush=True)
        thr = trio.run(throughput, m, 5 if args.quick else 10, tmp)
        results["throughput"] = thr
        print(f"re-dispatch after SIGKILL: {k} rounds ...", flush=True)
        results["redispatch"] = trio.run(redispatch, k)
        print(f"idle: 8 children, {idle_s:g} s ...", flush=True)
        results["idle"] = trio.run(idle_cost, idle_s, tmp)
        print("serve: exec to ready line ...", flush=True)
        results["serve_ready"] = serve_ready_time(5 if args.quick else 20, tmp)

    floor = lat["raw_pipe"]["p50_ms"]
    print()
    print_table(
        [[name, v["p50_ms"], v["p99_ms"], v["p50_ms"] / floor] for name, v in lat.items()],
        ["latency (1-replica echo)", "p50 ms", "p99 ms", "p50 / raw pipe"],
    )
    print()
    pool_rate = thr["process_pool"]["per_s"]
    print_table(
        [[name, v["per_s"], v["per_s"] / pool_rate] for name, v in thr.items()],
        [f"throughput ({REPLICAS}-replica task, 2 workers)", "req/s", "x process pool"],
    )
    print()
    rd, idle, ready = results["redispatch"], results["idle"], results["serve_ready"]
    print_table(
        [
            [
                "re-dispatch after SIGKILL (p50 / max)",
                f"{rd['p50_ms']:.1f} / {rd['max_ms']:.1f} ms",
            ],
            [
                "serve: exec to ready line (p50 / max)",
                f"{ready['p50_ms']:.0f} / {ready['max_ms']:.0f} ms",
            ],
            ["idle CPU, 8 children", f"{idle['cpu_percent_of_core']:.2f}% of a core"],
            ["idle RSS of the supervisor", f"{idle['rss_mb']:.1f} MB (USS {idle['uss_mb']:.1f})"],
        ],
        ["measure", "value"],
    )
    goals = {
        "api_p50_within_1.5x_raw_pipe": lat["supervisor_api"]["p50_ms"] <= 1.5 * floor,
        "throughput_at_least_4x_pool": thr["supervisor_api"]["per_s"] >= 4 * pool_rate,
        "redispatch_under_50ms": rd["max_ms"] < 50,
        "idle_cpu_under_0.5pct": idle["cpu_percent_of_core"] < 0.5,
        "idle_rss_under_60mb": idle["rss_mb"] < 60,
        "serve_ready_line_within_1s": ready["max_ms"] < 1000,
    }
    results["goals_met"] = goals
    print()
    for goal, met in goals.items():
        print(f"{'met    ' if met else 'MISSED '} {goal}")
    finish("supervisor" + ("-quick" if args.quick else ""), results, args.save)


if __name__ == "__main__":
    main()
