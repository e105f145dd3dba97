"""The supervisor benchmark's pieces that need no peer: its tasks and configs, `damocles-ext run`
as a process, re-dispatch after a SIGKILL, the idle cost, `serve`'s time to its ready line."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import trio

from damocles_ext.config import parse_config
from damocles_ext.errors import ProverError
from damocles_ext.protocol import dext
from damocles_ext.supervisor.core import Supervisor
from damocles_ext.supervisor.restart import BackoffPolicy
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

DEXT = [sys.executable, "-m", "damocles_ext"]


def small_task(miner: int = 1000) -> WindowPoSt:
    """The trivial request: a 1-replica WindowPoSt."""
    return WindowPoSt(
        miner_id=miner,
        proof_type="StackedDrgWindow2KiBV1_2",
        replicas=[
            PoStReplicaInfo(1, bytes(range(32)), "/mnt/cache/s-t01000-1", "/mnt/sealed/s-t01000-1")
        ],
        seed=bytes(range(31)) + b"\x1f",
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
