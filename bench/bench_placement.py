"""Round trips with the CPUs fixed: the parent and its child on one CPU, and on two.

Run: .venv/bin/python -m bench.bench_placement [--requests N] [--repeat R] [--save]

On a VM a round trip over a pipe costs very different amounts depending on where the kernel
put the two processes. On this one (since 2026-12-08) the floor's round trip takes about 8 us
when the parent and the child share a CPU, and about 60 us when they are on two: waking an idle
vCPU is slow. Unpinned, each pair of processes lands one way or the other, and may move from
time to time, so bench_supervisor's ratios compare ways that may not have been placed alike.
Here every way is measured in each placement, pinned alike:

* one CPU: this process (its threads) and the way's child process (its threads) on the first
  CPU this process may use;
* two CPUs: this process on the first, the child on the second;
* unpinned: every process free to run on any of them, as bench_supervisor measures.

The ways, each one request at a time, the trivial request (a 1-replica WindowPoSt):
* the floor: the minimal msgspec child over a blocking pipe, a plain Python parent
  (bench/baselines.py's `PipeFloor`);
* trio's least (`TrioDirect`): the floor child, the caller waiting on its pipe in trio;
* our child runtime behind the same blocking parent as the floor (`OwnChildBlocking`);
* the API: `await Supervisor.submit(task)` in this process, 1 `echo` child.

Each repeat takes N round trips per way and placement in SLICES turns, the placements and the
ways in a rotating order. Per repeat: the round trip's p50, this process's CPU per request
(time.process_time: the parent's, or the supervisor's for the API) and the child's (its CPU-time
clock, every thread); each shown as min / median / max over the repeats. Two goals are judged in
each placement apart, met only if every repeat met them: bench_supervisor's round-trip goal (the
API's p50 <= 3x the floor's) and its child goal (our child's CPU per request <= 2x the floor
child's, each behind the same blocking parent). Not shorter than a few hundred requests a turn: a process that has just
been moved to another CPU runs slower for a while. Needs two CPUs; with one, only "one CPU"
is measured.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import trio

from bench.baselines import OwnChildBlocking, PipeFloor, TrioDirect, cpu_seconds
from bench.runner import bench_parser, finish, goal_runs, mmm, print_table, rotated, share, spread
from bench.supervisor_runs import config_text, small_task
from damocles_ext.commands.common import positive_int
from damocles_ext.config import parse_config
from damocles_ext.supervisor.core import Supervisor

GOAL_RATIO = 3.0  # the API's round trip over the floor's
CHILD_GOAL_RATIO = 2.0  # our child's CPU per request over the floor child's, same parent
SLICES = 5
WARMUP = 200
LABELS = {
    "floor": PipeFloor.label,
    "trio_direct": TrioDirect.label,
    "own_child_blocking": OwnChildBlocking.label + " (not a floor: our code)",
    "api": "damocles-ext, Python API (1 child)",
}
FIGURES = {
    "p50": "round trip p50 us",
    "parent_cpu": "this process's CPU per request us",
    "child_cpu": "the child's CPU per request us",
}
PLACEMENTS = {"one_cpu": "one CPU", "two_cpus": "two CPUs", "unpinned": "unpinned"}


def threads_of(pid: int) -> list[int]:
    """The thread ids of process `pid` (itself included)."""
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` to `cpus` (sched_setaffinity sets one thread's)."""
    for tid in threads_of(pid):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)


def placements(allowed: set[int]) -> dict[str, tuple[set[int], set[int]]]:
    """{placement: (this process's CPUs, the children's CPUs)} for the CPUs we may use."""
    first, *others = sorted(allowed)
    chosen = {"one_cpu": ({first}, {first})}
    if others:
        chosen["two_cpus"] = ({first}, {others[0]})
        chosen["unpinned"] = (allowed, allowed)
    return chosen


async def _take(call, n: int, is_async: bool, times: list[float]) -> None:
    perf = time.perf_counter
    for _ in range(n):
        t0 = perf()
        if is_async:
            await call()
        else:
            call()
        times.append(perf() - t0)


class _Sample:
    """One way's round trips in one placement within a repeat, and the CPU they took."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.parent_cpu = 0.0  # this process's (all its threads)
        self.child_cpu = 0.0  # the way's child process's (all its threads)

    async def take(self, call, n: int, is_async: bool, pid: int) -> None:
        child0, cpu0 = cpu_seconds(pid), time.process_time()
        await _take(call, n, is_async, self.times)
        self.parent_cpu += time.process_time() - cpu0
        self.child_cpu += cpu_seconds(pid) - child0


async def measure(requests: int, repeat: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{figure: {placement: {way: [one per repeat]}}}: the round trip's p50 and the parent's
    and the child's CPU per request (s)."""
    task = small_task()
    allowed = os.sched_getaffinity(0)
    chosen = placements(allowed)
    floor, least = PipeFloor(task), TrioDirect(task)
    own = OwnChildBlocking(config_text("echo", 1))
    sup = Supervisor(parse_config(config_text("echo", 1), "<bench>"))
    runs: dict[str, dict[str, dict[str, list[float]]]] = {
        fig: {p: {w: [] for w in LABELS} for p in chosen} for fig in FIGURES
    }
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready("window_post", 1)
            (child,) = sup.statistics().children
            if child.pid is None:
                raise RuntimeError(f"the API's child {child.name} has no process")
            ways: dict[str, tuple[Callable[[], object], bool, int]] = {
                "floor": (floor.prove, False, floor.pid),
                "trio_direct": (least.prove, True, least.pids[0]),
                "own_child_blocking": (lambda: own.prove(task), False, own.pid),
                "api": (lambda: sup.submit(task), True, child.pid),
            }
            for call, is_async, _ in ways.values():
                await _take(call, WARMUP, is_async, [])
            for r in range(repeat):
                samples = {p: {w: _Sample() for w in ways} for p in chosen}
                for turn in range(SLICES):
                    for place in rotated(list(chosen), r * SLICES + turn):
                        mine, theirs = chosen[place]
                        pin(os.getpid(), mine)
                        for name in rotated(list(ways), r + turn):
                            call, is_async, pid = ways[name]
                            pin(pid, theirs)
                            await _take(call, WARMUP // 4, is_async, [])  # settle on the CPU
                            n = share(requests, SLICES, turn)
                            await samples[place][name].take(call, n, is_async, pid)
                for place in chosen:
                    for name, sample in samples[place].items():
                        n = len(sample.times)
                        runs["p50"][place][name].append(statistics.median(sample.times))
                        runs["parent_cpu"][place][name].append(sample.parent_cpu / n)
                        runs["child_cpu"][place][name].append(sample.child_cpu / n)
                print(f"  repeat {r + 1}/{repeat}", file=sys.stderr)
            sup.request_shutdown()
    finally:
        pin(os.getpid(), allowed)
        floor.close()
        least.close()
        own.close()
    return runs


def report(runs: dict[str, dict[str, dict[str, list[float]]]]) -> dict:
    """Print the tables and the goals per placement; returns ratios and goals for the JSON."""
    places = list(runs["p50"])
    for fig, title in FIGURES.items():
        rows = [
            [label, *(mmm(spread([v * 1e6 for v in runs[fig][p][name]])) for p in places)]
            for name, label in LABELS.items()
        ]
        print()
        print_table(rows, [f"{title} (min / median / max)", *(PLACEMENTS[p] for p in places)])
    ratios: dict[str, list[float]] = {}
    goals = {}
    for place in places:
        p50, child_cpu = runs["p50"][place], runs["child_cpu"][place]
        for name in ("trio_direct", "own_child_blocking", "api"):
            ratios[f"{place}_{name}_over_floor"] = _over(p50[name], p50["floor"])
        ratios[f"{place}_own_child_cpu_over_floor_child"] = _over(
            child_cpu["own_child_blocking"], child_cpu["floor"]
        )
        goals[f"{place}_api_within_3x_floor"] = goal_runs(
            ratios[f"{place}_api_over_floor"], lambda x: x <= GOAL_RATIO, "x"
        )
        goals[f"{place}_child_cpu_within_2x_floor_child"] = goal_runs(
            ratios[f"{place}_own_child_cpu_over_floor_child"], lambda x: x <= CHILD_GOAL_RATIO, "x"
        )
    print()
    print_table(
        [[k, mmm(spread(v), "{:.2f}")] for k, v in ratios.items()],
        ["ratio per repeat", "x (min / median / max)"],
    )
    print()
    for name, goal in goals.items():
        print(f"goal {'met' if goal['met'] else 'NOT met':8s} {name}: {goal['verdict']}")
    return {"ratios": ratios, "goals": goals}


def _over(ours: list[float], theirs: list[float]) -> list[float]:
    return [a / b for a, b in zip(ours, theirs, strict=True)]


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "placement")
    parser.add_argument("--requests", type=positive_int, default=2000,
                        help="round trips per way, placement and repeat (default 2000)")  # fmt: skip
    parser.add_argument("--repeat", type=positive_int, default=5, help="repeats (default 5)")
    args = parser.parse_args(argv)
    print(f"{args.requests} round trips per way and placement, {args.repeat} repeats ...")
    runs = trio.run(measure, args.requests, args.repeat)
    verdicts = report(runs)
    data = {
        "config": {"requests": args.requests, "repeat": args.repeat, "slices": SLICES},
        **{
            f"{fig}_s": {
                p: {w: spread(v) | {"runs": v} for w, v in ways.items()}
                for p, ways in places.items()
            }
            for fig, places in runs.items()
        },
        **verdicts,
    }
    finish("placement", data, args.save)


if __name__ == "__main__":
    main()
