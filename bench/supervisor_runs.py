"""The supervisor benchmark's pieces that need no peer: its tasks and configs, `damocles-ext run`
as a process, re-dispatch after a SIGKILL, the idle cost, `serve`'s time to its ready line, each
taken in repeats, and the verdicts on their goals (met only if every repeat met it)."""

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

from bench.baselines import cpu_seconds
from bench.runner import goal_runs, mmm, share, spread_runs
from damocles_ext.commands.serve import DEFAULT_DEADLINE_AFTER
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


def front_end_deadline() -> float:
    """The deadline `run` and `serve` give a request that comes without one (their default
    --deadline-after for window_post): the API is given it too, so that each way proves the
    same request and a ratio is the door's cost, not that of a deadline only one way tracks."""
    return time.time() + DEFAULT_DEADLINE_AFTER["window_post"]


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


def shares(n: int, repeats: int) -> list[int]:
    """n rounds shared out over `repeats` repeats as evenly as can be (over n if fewer)."""
    parts = min(repeats, n)
    return [share(n, parts, i) for i in range(parts)]


def _by_repeat(repeats: list[list[float]]) -> dict:
    """Seconds per round, grouped by repeat -> the figures: over every round (percentiles and
    max_ms, as one block gave them) and each repeat's own p50 and max, with their spreads."""
    every = [v for r in repeats for v in r]
    per = [
        {"n": len(r), "p50_ms": percentiles(r)["p50_ms"], "max_ms": max(r) * 1e3} for r in repeats
    ]
    return (
        percentiles(every)
        | {"max_ms": max(every) * 1e3, "repeats": per}
        | {"per_repeat": {k: spread_runs([p[k] for p in per]) for k in ("p50_ms", "max_ms")}}
    )


def serve_ready_time(rounds: int, repeats: int, tmp: Path) -> dict:
    """Seconds from exec of `damocles-ext serve` to its ready line (damocles-manager allows 5),
    `rounds` starts in `repeats` repeats."""
    (tmp / "ext-prover.cfg").write_text(config_text("echo", 1))
    groups = []
    for n in shares(rounds, repeats):
        samples = []
        for _ in range(n):
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
        groups.append(samples)
    return _by_repeat(groups)


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


async def redispatch(k: int, repeats: int) -> dict:
    """Re-dispatch after SIGKILL of a busy child: k rounds in `repeats` repeats."""
    config = parse_config(
        config_text("sleep", 2, options="seconds = 60, progress_interval = 30"), "<bench>"
    )
    # A short restart delay only so that the k rounds do not wait for the default 1 s, 2 s, ...
    sup = Supervisor(config, backoff=BackoffPolicy(base=0.05, cap=0.2))
    groups: list[list[float]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for n in shares(k, repeats):
            groups.append([])
            for _ in range(n):
                await sup.wait_ready("window_post", 2)
                task = small_task(sum(map(len, groups)))
                groups[-1].append(await _redispatch_once(sup, task))
        sup.request_shutdown()
    return _by_repeat(groups)


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


async def idle_cost(seconds: float, windows: int, tmp: Path) -> dict:
    """`damocles-ext run` with 8 echo children and nothing to do: its CPU over `windows` windows
    of `seconds` each, one after the other, read from its CPU-time clock (to the nanosecond), and
    its RSS at the end of each. The whole: CPU over all the windows, RSS and USS at the end."""
    cfg = tmp / "idle.cfg"
    cfg.write_text(config_text("echo", 8))
    rows = []
    async with trio.open_nursery() as nursery:
        run = RunProcess(cfg, tmp / "run3" / "control.sock", 8)
        await run.start(nursery)
        proc = psutil.Process(run.process.pid)
        await trio.sleep(1.0)  # let start-up work (imports, spawning) settle before measuring
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        for _ in range(windows):
            c, t = cpu_seconds(proc.pid), time.monotonic()
            await trio.sleep(seconds)
            cpu, elapsed = cpu_seconds(proc.pid) - c, time.monotonic() - t
            mem = proc.memory_full_info()
            rows.append(
                {
                    "window_s": elapsed,
                    "cpu_percent_of_core": 100 * cpu / elapsed,
                    "rss_mb": mem.rss / 2**20,
                    "uss_mb": mem.uss / 2**20,
                }
            )
        cpu, elapsed = cpu_seconds(proc.pid) - c0, time.monotonic() - t0
        children = proc.children()
        children_rss = sum(c.memory_info().rss for c in children)
        await run.stop()
    per = {k: spread_runs([r[k] for r in rows]) for k in ("cpu_percent_of_core", "rss_mb")}
    return {
        "children": len(children),
        "window_s": elapsed,
        "cpu_percent_of_core": 100 * cpu / elapsed,
        "rss_mb": rows[-1]["rss_mb"],
        "uss_mb": rows[-1]["uss_mb"],
        "children_rss_mb_total": children_rss / 2**20,
        "windows": rows,
        "per_window": per,
    }


# -- the goals -----------------------------------------------------------------------------------


def other_goals(rd: dict, idle: dict, ready: dict) -> dict[str, tuple[str, str, dict]]:
    """The goals measured apart from the round trips and floods: {key: (goal, figures as printed,
    goal_runs' verdict)}, each met only if every repeat (or idle window) met it."""
    rd_p, ready_p, idle_p = rd["per_repeat"], ready["per_repeat"], idle["per_window"]

    def rounds(fig: dict, what: str) -> str:
        ns = sorted({r["n"] for r in fig["repeats"]})
        each = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        return f"{len(fig['repeats'])} repeats of {each} {what if each != '1' else what[:-1]}"

    def ms(p: dict, fmt: str) -> str:
        return f"p50 {mmm(p['p50_ms'], fmt)}, max {mmm(p['max_ms'], fmt)} ms"

    windows = f"{len(idle['windows'])} windows of {idle['windows'][0]['window_s']:.1f} s"
    return {
        "redispatch_under_50ms": ("<= 50 ms", f"{ms(rd_p, '{:.1f}')} ({rounds(rd, 'rounds')})", goal_runs(rd_p["max_ms"]["runs"], lambda v: v <= 50, " ms")),
        "idle_cpu_under_0.5pct": ("< 0.5% of a core", f"{mmm(idle_p['cpu_percent_of_core'], '{:.3f}')}% of a core, {idle['children']} children ({windows})", goal_runs(idle_p["cpu_percent_of_core"]["runs"], lambda v: v < 0.5, "%")),
        "idle_rss_under_60mb": ("< 60 MB", f"{mmm(idle_p['rss_mb'], '{:.1f}')} MB (USS at the end {idle['uss_mb']:.1f})", goal_runs(idle_p["rss_mb"]["runs"], lambda v: v < 60, " MB")),
        "serve_ready_line_within_1s": ("< 1 s", f"{ms(ready_p, '{:.0f}')} ({rounds(ready, 'starts')})", goal_runs(ready_p["max_ms"]["runs"], lambda v: v < 1000, " ms")),
    }  # fmt: skip
