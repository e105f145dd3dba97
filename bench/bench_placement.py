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
ways in a rotating order; each figure is the p50 of a repeat, shown as min / median / max over
the repeats. The round-trip goal (the API's p50 <= 3x the floor's, in every repeat) is judged in
each placement apart. Not shorter than a few hundred requests a turn: a process that has just
been moved to another CPU runs slower for a while. Needs two CPUs; with one, only "one CPU"
is measured.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import trio

from bench.baselines import OwnChildBlocking, PipeFloor, TrioDirect
from bench.runner import bench_parser, finish, goal_runs, mmm, print_table, rotated, share, spread
from bench.supervisor_runs import config_text, small_task
from damocles_ext.commands.common import positive_int
from damocles_ext.config import parse_config
from damocles_ext.supervisor.core import Supervisor

GOAL_RATIO = 3.0
SLICES = 5
WARMUP = 200
LABELS = {
    "floor": PipeFloor.label,
    "trio_direct": TrioDirect.label,
    "own_child_blocking": OwnChildBlocking.label + " (not a floor: our code)",
    "api": "damocles-ext, Python API (1 child)",
}
PLACEMENTS = {"one_cpu": "one CPU", "two_cpus": "two CPUs", "unpinned": "unpinned"}


def threads_of(pid: int) -> list[int]:
    """The thread ids of process `pid` (itself included)."""
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` to `cpus` (sched_setaffinity sets one thread's)."""
    for tid in threads_of(pid):
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


async def measure(requests: int, repeat: int) -> dict:
    """{placement: {way: [p50 per repeat (s)]}}."""
    task = small_task()
    allowed = os.sched_getaffinity(0)
    chosen = placements(allowed)
    floor, least = PipeFloor(task), TrioDirect(task)
    own = OwnChildBlocking(config_text("echo", 1))
    sup = Supervisor(parse_config(config_text("echo", 1), "<bench>"))
    runs: dict[str, dict[str, list[float]]] = {p: {w: [] for w in LABELS} for p in chosen}
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
                times: dict[str, dict[str, list[float]]] = {
                    p: {w: [] for w in ways} for p in chosen
                }
                for turn in range(SLICES):
                    for place in rotated(list(chosen), r * SLICES + turn):
                        mine, theirs = chosen[place]
                        pin(os.getpid(), mine)
                        for name in rotated(list(ways), r + turn):
                            call, is_async, pid = ways[name]
                            pin(pid, theirs)
                            await _take(call, WARMUP // 4, is_async, [])  # settle on the CPU
                            n = share(requests, SLICES, turn)
                            await _take(call, n, is_async, times[place][name])
                for place in chosen:
                    for name in ways:
                        runs[place][name].append(statistics.median(times[place][name]))
                print(f"  repeat {r + 1}/{repeat}", file=sys.stderr)
            pin(os.getpid(), allowed)
            sup.request_shutdown()
    finally:
        floor.close()
        least.close()
        own.close()
    return runs


def report(runs: dict) -> dict:
    """Print the table and the goal per placement; returns ratios and goals for the JSON."""
    rows = []
    for name, label in LABELS.items():
        rows.append([label, *(mmm(spread([v * 1e6 for v in runs[p][name]])) for p in runs)])
    print()
    print_table(rows, ["round trip p50 us (min / median / max)", *(PLACEMENTS[p] for p in runs)])
    ratios, goals = {}, {}
    for place, ways in runs.items():
        floor = ways["floor"]
        for name in ("trio_direct", "own_child_blocking", "api"):
            ratios[f"{place}_{name}_over_floor"] = [a / f for a, f in zip(ways[name], floor, strict=True)]  # fmt: skip
        goals[f"{place}_api_within_3x_floor"] = goal_runs(
            ratios[f"{place}_api_over_floor"], lambda x: x <= GOAL_RATIO, "x"
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
        "round_trip_p50_s": {
            p: {w: spread(v) | {"runs": v} for w, v in ways.items()} for p, ways in runs.items()
        },
        **verdicts,
    }
    finish("placement", data, args.save)


if __name__ == "__main__":
    main()
