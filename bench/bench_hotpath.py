"""The supervisor's per-request path with trivial tasks, against its floor and a peer, same run.

Run: .venv/bin/python -m bench.bench_hotpath [--repeats N] [--quick] [--save]

Each repeat measures, in this order and in this process:

* floor: bench/baselines.py's minimal msgspec child (`PipeFloor`, the floor bench_supervisor
  uses: read a length-prefixed msgpack frame, answer with the `echo` prover's proof) driven over
  a blocking pipe by a plain Python parent; round trip p50, one request at a time;
* API, 1 child: `await Supervisor.submit(task)` of a 1-replica WindowPoSt on one `echo` child,
  one at a time; round trip p50;
* API, 2 children, 256 in flight: requests/s, and the supervisor's CPU per request (this
  process's `time.process_time()` over the burst: the children are other processes);
* multiprocessing.Pool(2): the same number of calls of the `echo` function (`apply_async`, all
  in flight), requests/s.

Goals (the per-request path's): API p50 <= 3x the floor's; supervisor CPU <= 25 us per request
at 256 in flight; API requests/s with 2 children >= multiprocessing.Pool(2)'s.
"""

from __future__ import annotations

import logging
import multiprocessing
import statistics
import time

import trio
from damocles_ext_plugins.testing import echo_output

from bench.baselines import PipeFloor
from bench.runner import bench_parser, finish, print_table
from damocles_ext.config import parse_config
from damocles_ext.supervisor.core import Supervisor
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

IN_FLIGHT = 256


def small_task(miner: int = 1000) -> WindowPoSt:
    replica = PoStReplicaInfo(1, bytes(range(32)), "/mnt/cache/s-1", "/mnt/sealed/s-1")
    return WindowPoSt(
        miner_id=miner,
        proof_type="StackedDrgWindow2KiBV1_2",
        replicas=[replica],
        seed=bytes(range(31)) + b"\x1f",
    )


def echo_config(children: int):
    block = '[[WdPost]]\nPlugin = "echo"\nConcurrent = 1\n'
    return parse_config(block * children, "<bench>")


def _p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def floor_latency(n: int) -> float:
    """p50 of `n` round trips on the pipe floor, in microseconds."""
    task = small_task()
    floor = PipeFloor(task)
    try:
        for _ in range(n // 10):
            floor.prove()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            floor.prove()
            samples.append(time.perf_counter() - t0)
    finally:
        floor.close()
    return _p50(samples)


async def api_latency(n: int) -> float:
    """p50 of `n` sequential `submit`s on one echo child, in microseconds."""
    sup = Supervisor(echo_config(1))
    task = small_task()
    samples = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready("window_post", 1)
        for _ in range(n // 10):
            await sup.submit(task)
        for _ in range(n):
            t0 = time.perf_counter()
            await sup.submit(task)
            samples.append(time.perf_counter() - t0)
        sup.request_shutdown()
    return _p50(samples)


async def api_throughput(m: int) -> tuple[float, float]:
    """`m` requests, IN_FLIGHT at a time, 2 echo children: (requests/s, CPU us per request)."""
    sup = Supervisor(echo_config(2))
    task = small_task()
    expected = echo_output(task).proofs
    result: tuple[float, float] = (0.0, 0.0)

    async def burst(count: int) -> None:
        todo = iter(range(count))

        async def worker() -> None:
            for _ in todo:
                output = await sup.submit(task)
                assert output.proofs == expected

        async with trio.open_nursery() as inner:
            for _ in range(IN_FLIGHT):
                inner.start_soon(worker)

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready("window_post", 2)
        await burst(min(m, 1000))  # warm-up
        c0, t0 = time.process_time(), time.perf_counter()
        await burst(m)
        c1, t1 = time.process_time(), time.perf_counter()
        result = (m / (t1 - t0), (c1 - c0) / m * 1e6)
        sup.request_shutdown()
    return result


def _echo_in_worker(task: WindowPoSt):
    return echo_output(task)


def pool_throughput(m: int) -> float:
    """`m` calls of the echo function on multiprocessing.Pool(2), all in flight: requests/s."""
    tasks = [small_task()] * m
    with multiprocessing.get_context("fork").Pool(2) as pool:
        for r in [pool.apply_async(_echo_in_worker, (t,)) for t in tasks[:1000]]:  # warm-up
            r.get()
        t0 = time.perf_counter()
        results = [pool.apply_async(_echo_in_worker, (t,)) for t in tasks]
        for r in results:
            r.get()
        return m / (time.perf_counter() - t0)


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "hotpath")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each measure (default 5)")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    logging.getLogger("damocles_ext").setLevel(logging.ERROR)
    n, m = (100, 500) if args.quick else (2000, 20000)
    rows: dict[str, list[float]] = {
        "floor_p50_us": [],
        "api_p50_us": [],
        "api_per_s": [],
        "api_cpu_us": [],
        "pool_per_s": [],
    }
    for i in range(args.repeats):
        print(f"repeat {i + 1} of {args.repeats} ...", flush=True)
        rows["floor_p50_us"].append(floor_latency(n))
        rows["api_p50_us"].append(trio.run(api_latency, n))
        per_s, cpu = trio.run(api_throughput, m)
        rows["api_per_s"].append(per_s)
        rows["api_cpu_us"].append(cpu)
        rows["pool_per_s"].append(pool_throughput(m))
    ratio = [a / f for a, f in zip(rows["api_p50_us"], rows["floor_p50_us"], strict=True)]
    vs_pool = [a / p for a, p in zip(rows["api_per_s"], rows["pool_per_s"], strict=True)]
    figures = {name: _spread(v) for name, v in rows.items()}
    figures["api_p50_over_floor"] = _spread(ratio)
    figures["api_per_s_over_pool"] = _spread(vs_pool)
    print()
    print_table(
        [[name, f["min"], f["median"], f["max"]] for name, f in figures.items()],
        ["measure", "min", "median", "max"],
    )
    goals = {
        "api_p50_within_3x_floor": figures["api_p50_over_floor"]["median"] <= 3,
        "supervisor_cpu_under_25us": figures["api_cpu_us"]["median"] <= 25,
        "throughput_at_least_pool": figures["api_per_s_over_pool"]["median"] >= 1,
    }
    print()
    for goal, met in goals.items():
        print(f"{'met    ' if met else 'MISSED '} {goal}")
    config = {"latency_requests": n, "throughput_requests": m, "in_flight": IN_FLIGHT}
    results = {"config": config, "runs": rows, "figures": figures, "goals_met": goals}
    finish("hotpath" + ("-quick" if args.quick else ""), results, args.save)


if __name__ == "__main__":
    main()
