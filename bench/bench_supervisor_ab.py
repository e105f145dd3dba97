"""The supervisor's own cost per request, this checkout against another, interleaved in one session.

Run: .venv/bin/python -m bench.bench_supervisor_ab --compare-with DIR [--repeat N] [--save]

DIR is another checkout of damocles-ext (e.g. `git worktree add ../base <commit>`): the figures
before a change of the supervisor, measured beside the figures after it, so that the drift of a
shared machine hits both alike. Each repeat runs, in a fresh process per checkout (its
`damocles_ext` on PYTHONPATH, its own children), the in-process API (`await Supervisor.submit`)
with trivial requests (a 1-replica WindowPoSt, the `echo` prover):

* 256 in flight on 2 children (--requests, default 8192): requests/s and this process's CPU per
  request (`time.process_time`: the supervisor and its callers; the children are not in it);
* the same with each request given the deadline `run` and `serve` give one that comes without
  (40 min), as every request damocles sends has one: what tracking and judging it costs;
* one at a time on 1 child (--requests / 4): the same two figures;
* the dispatch policy alone (`Scheduler`, no process, no trio; --requests x 8 jobs): submit,
  decide, finish (a proof), decide and next_wakeup of one job at a time on one child: jobs/s and
  CPU per job. What a change of the policy costs, without the noise of pipes and wake-ups.

The order of the two checkouts alternates from repeat to repeat. Printed: min / median / max of
each, and the ratio ours / theirs of the CPU per request within each repeat. Not a goal of its
own: it says what a change did, where bench_supervisor says where the supervisor stands.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.runner import bench_parser, finish, print_table, spread, spread_runs
from damocles_ext.commands.common import positive_int
from damocles_ext.commands.serve import DEFAULT_DEADLINE_AFTER

ROOT = Path(__file__).resolve().parent.parent

# Run in the checkout's own process: only damocles_ext's public pieces, which old checkouts have.
DRIVER = r"""
import sys, time, trio
import damocles_ext
from damocles_ext.config import parse_config
from damocles_ext.supervisor.core import Supervisor
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

n, in_flight, children = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
deadline_after = float(sys.argv[4])  # 0: no deadline
task = WindowPoSt(1000, "StackedDrgWindow2KiBV1_2",
                  [PoStReplicaInfo(1, bytes(32), "/mnt/cache/s-1", "/mnt/sealed/s-1")],
                  bytes(range(32)))
config = '[[WdPost]]\nPlugin = "echo"\nConcurrent = 1\n' * children

async def main():
    sup = Supervisor(parse_config(config, "<bench>"))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready("window_post", children)

        async def caller(k):
            for _ in range(k):
                if deadline_after:
                    await sup.submit(task, deadline=time.time() + deadline_after)
                else:
                    await sup.submit(task)

        async def flood(total):
            async with trio.open_nursery() as callers:
                for i in range(in_flight):
                    callers.start_soon(caller, total // in_flight + (i < total % in_flight))

        await flood(max(in_flight, n // 8))  # warm-up
        cpu0, t0 = time.process_time(), time.perf_counter()
        await flood(n)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        print(damocles_ext.__file__, n / elapsed, cpu / n)
        sup.request_shutdown()

trio.run(main)
"""


# The policy alone: only what old checkouts have too (`finished(..., failed=False)` where it exists).
SCHEDULER_DRIVER = r"""
import inspect, sys, time
import damocles_ext
from damocles_ext.scheduling.policy import ChildSlots, Job, Scheduler

n = int(sys.argv[1])
s = Scheduler()
s.add_child(ChildSlots("a", "window_post", 1))
s.child_ready("a", 0.0)
proof = {"failed": False} if "failed" in inspect.signature(s.finished).parameters else {}

def jobs(first, count):
    for i in range(first, first + count):
        now = float(i)
        s.submit(Job(i, "window_post", now), now)
        s.decide(now)
        s.finished(i, now, **proof)
        s.decide(now)
        s.next_wakeup()

jobs(0, n // 8)  # warm-up
cpu0, t0 = time.process_time(), time.perf_counter()
jobs(n, n)
elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
print(damocles_ext.__file__, n / elapsed, cpu / n)
"""


class BenchError(Exception):
    """A checkout could not be measured; the message says which and why."""


def measure(checkout: Path, driver: str, *args: float) -> tuple[float, float]:
    """(requests or jobs per second, CPU seconds per request or job) of `checkout` under
    `driver`, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        [sys.executable, "-c", driver, *map(str, args)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise BenchError(f"{checkout}: the driver failed: {done.stderr.strip()[-500:]}")
    where, rate, cpu = done.stdout.split()
    if Path(where).resolve() != (checkout / "damocles_ext" / "__init__.py").resolve():
        raise BenchError(f"{checkout}: damocles_ext was imported from {where}, not from it")
    return float(rate), float(cpu)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "supervisor_ab")
    parser.add_argument("--compare-with", type=Path, required=True, metavar="DIR",
                        help="the other checkout of damocles-ext (its root directory)")  # fmt: skip
    parser.add_argument("--repeat", type=positive_int, default=8, metavar="N",
                        help="runs of each checkout per mode (default 8)")  # fmt: skip
    parser.add_argument("--requests", type=positive_int, default=8192, metavar="N",
                        help="requests per run at 256 in flight (a quarter one at a time)")  # fmt: skip
    args = parser.parse_args(argv)
    other = args.compare_with.resolve()
    if not (other / "damocles_ext" / "supervisor" / "core.py").is_file():
        parser.exit(2, f"{parser.prog}: error: --compare-with {other}: not a damocles-ext checkout"
                    " (no damocles_ext/supervisor/core.py there)\n")  # fmt: skip
    ways = {"this checkout": ROOT, str(other): other}
    after = DEFAULT_DEADLINE_AFTER["window_post"]  # run's and serve's, for a request without
    modes = {"256 in flight, 2 children": (DRIVER, args.requests, 256, 2, 0),
             f"256 in flight, 2 children, a {after / 60:g}-min deadline": (DRIVER, args.requests, 256, 2, after),
             "1 at a time, 1 child": (DRIVER, max(1, args.requests // 4), 1, 1, 0),
             "the policy alone, 1 at a time": (SCHEDULER_DRIVER, args.requests * 8)}  # fmt: skip
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {
        m: {w: [] for w in ways} for m in modes
    }
    try:
        for r in range(args.repeat):
            print(f"repeat {r + 1}/{args.repeat}", flush=True)
            order = list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]
            for mode, (driver, *driver_args) in modes.items():
                for name, checkout in order:
                    runs[mode][name].append(measure(checkout, driver, *driver_args))
    except BenchError as exc:
        parser.exit(1, f"{parser.prog}: {exc}\n")
    rows, results = [], {}
    for mode, per_way in runs.items():
        ours, theirs = per_way["this checkout"], per_way[str(other)]
        ratios = [a[1] / b[1] for a, b in zip(ours, theirs, strict=True)]
        results[mode] = {"cpu_ratio_ours_over_theirs": spread_runs(ratios)}
        for name, values in per_way.items():
            rate = spread([v[0] for v in values])
            cpu = spread([v[1] * 1e6 for v in values])
            results[mode][name] = {"per_s": rate, "cpu_us_per_request": cpu}
            rows.append([mode, name, f"{rate['min']:.0f} / {rate['median']:.0f} / {rate['max']:.0f}",
                         f"{cpu['min']:.1f} / {cpu['median']:.1f} / {cpu['max']:.1f}"])  # fmt: skip
        rows.append([mode, "ours / theirs, CPU per request, per repeat",
                     " ".join(f"{x:.2f}" for x in ratios), f"median {statistics.median(ratios):.2f}"])  # fmt: skip
    print()
    print_table(rows, ["mode", "checkout", "req/s (min / median / max)", "CPU us/req"])
    finish("supervisor_ab", {"compare_with": str(other), "repeat": args.repeat,
                             "requests": args.requests, "results": results}, args.save)  # fmt: skip


if __name__ == "__main__":
    main()
