"""The coordinator's sector index (`Venus.SectorIndexerFind`) at its limit of sectors learned.

Run: .venv/bin/python -m bench.bench_sector_index [--jobs N] [--repeat R] [--save]

A coordinator learns the store names of every sector of the jobs in its store when it starts,
and of each job it allocates; past MAX_LEARNED (2M) sectors the oldest learned are forgotten.
Measured, on the event loop's thread as the coordinator runs it, with N full jobs of 2,349
sectors (default 1,100: 2.58M sectors, past the limit) decoded before the clock starts:

* the start: every job learned at once, against the floor, a plain dict of the same keys and
  names built by a plain loop (no limit, no shared names);
* then 20 allocations of a new full job each, at the limit: the time each one's learning holds
  the loop (the worker's call, and every other, waits for it), max and median.

Each figure is taken in R repeats (default 3), a fresh index each; min / median / max printed.
No goal: it shows what the limit costs (before the index was trimmed in one pass, the start
took 131 s and each allocation 1.3-2.1 s, the loop standing still meanwhile).
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.runner import bench_parser, finish, print_table, spread
from damocles_ext.frontends.sector_index import MAX_LEARNED, SectorIndex
from damocles_ext.jobs import model

SECTORS = 2349  # a full WindowPoSt partition
ALLOCATIONS = 20


def full_job(miner: int, first: int) -> model.WdPoStInput:
    stores = model.SectorAccessStores(SealedFile="store-a", CacheDir="store-b")
    return model.WdPoStInput(
        Sectors=tuple(
            model.WdPoStSectorInfo(SectorId=n, CommR=(0,) * 32, Upgrade=False, Accesses=stores)
            for n in range(first, first + SECTORS)
        ),
        MinerId=miner,
        ProofType="StackedDrgWindow32GiBV1_2",
        Seed=(1,) * 32,
    )


def plain_dict(jobs: list[model.WdPoStInput]) -> dict:
    learned = {}
    for job in jobs:
        for s in job.Sectors:
            learned[("normal", job.MinerId, s.SectorId)] = (s.Accesses.SealedFile, s.Accesses.CacheDir)  # fmt: skip
    return learned


def one_repeat(jobs: list[model.WdPoStInput], allocations: list[model.WdPoStInput]) -> dict:
    t0 = time.perf_counter()
    floor = plain_dict(jobs)
    floor_s = time.perf_counter() - t0
    index = SectorIndex()
    t0 = time.perf_counter()
    index.learn(jobs)
    start_s = time.perf_counter() - t0
    if len(index.learned) != min(MAX_LEARNED, len(floor)):
        raise RuntimeError(f"learned {len(index.learned)} sectors, not {MAX_LEARNED}")
    held = []
    for job in allocations:
        t0 = time.perf_counter()
        index.learn([job])
        held.append(time.perf_counter() - t0)
    return {
        "start_s": start_s,
        "floor_s": floor_s,
        "allocation_max_ms": max(held) * 1e3,
        "allocation_median_ms": statistics.median(held) * 1e3,
    }


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "sector_index")
    parser.add_argument("--jobs", type=int, default=1100, help="full jobs in the store (1,100)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats (3)")
    args: argparse.Namespace = parser.parse_args(argv)
    jobs = [full_job(1000, i * SECTORS) for i in range(args.jobs)]
    allocations = [full_job(1001, i * SECTORS) for i in range(ALLOCATIONS)]
    runs = [one_repeat(jobs, allocations) for _ in range(args.repeat)]
    figures = {key: spread([r[key] for r in runs]) for key in runs[0]}

    def mmm(key: str, fmt: str) -> str:
        f = figures[key]
        return " / ".join(fmt.format(f[k]) for k in ("min", "median", "max"))

    sectors = args.jobs * SECTORS
    print(
        f"{args.jobs} full jobs, {sectors:,} sectors (limit {MAX_LEARNED:,}), {args.repeat} repeats"
    )
    print_table(
        [
            ("the start: every job learned (s)", mmm("start_s", "{:.2f}")),
            ("floor: a plain dict of the same keys (s)", mmm("floor_s", "{:.2f}")),
            (f"an allocation at the limit, the longest of {ALLOCATIONS} (ms)", mmm("allocation_max_ms", "{:.1f}")),
            (f"an allocation at the limit, the median of {ALLOCATIONS} (ms)", mmm("allocation_median_ms", "{:.2f}")),
        ],
        ["measure (min / median / max)", "value"],
    )  # fmt: skip
    data = {
        "config": {"jobs": args.jobs, "sectors": sectors, "repeat": args.repeat},
        "figures": figures,
        "runs": runs,
    }
    finish("sector_index", data, args.save)


if __name__ == "__main__":
    main()
