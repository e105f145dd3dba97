"""Simulated proving days: damocles' dispatch (a, b) against damocles-ext's Scheduler (c, c0, cs).

Run: .venv/bin/python -m bench.bench_simulate [--save]   (uses every CPU; about 8 minutes on 2 cores)
Every policy runs the same draws (seed per row). Goals: in colliding-window scenarios
where (a) misses at least one deadline or budget, (c) misses none; and (c) stays miss-free up to at
least 90% of the capacity bound (found by bisection over partitions per deadline). (c) has children
that report their SNARK phase with done/total every 30 s; "c phase-only" reports the phase change
alone; (c0) reports nothing (JSON-lines children); (cs) splits WindowPoSt into a vanilla step and a
SNARK step on different children. `reference` is a yardstick, not a deployment:
vanilla split from SNARK, unlimited CPU, one global EDF queue; `clairvoyant` is the reference knowing
every SNARK's duration in advance (longest first).

SNARK times come from 3-9 min in three ways (simulator.SNARK_MODELS): "machine" (the default: one
GPU model per machine, each seed another machine), "gpu" (mixed GPUs in one machine) and
"partition" (every partition drawn on its own: the packing stress case). Each
model runs twelve seeds with 4 and with 8 GPUs. Bisection on one seed is noisy (a whole partition
is 3-7% of the bound with 4 GPUs), so the median over seeds is the figure to quote, with the count
of seeds reaching 90%. In the partition model, where the bound is the same for every seed, every
seed is also run at each whole load near 90% of the bound, and the table counts the days without a
miss (no bisection there).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from bench.runner import bench_parser, finish, print_table
from damocles_ext.scheduling.simulator import (
    Scenario,
    bisect_report,
    capacity_bound,
    max_missfree_load,
    report,
    simulate,
)

POLICIES = (
    "damocles",
    "damocles-c2",
    "damocles-ext",
    "damocles-ext-nophase",
    "damocles-ext-split",
    "reference",
    "clairvoyant",
)
#: The day tables also run (c) with the implicit GPU lock shared by WindowPoSt and WinningPoSt
#: (GpuLock = true), to show what it costs WinningPoSt; it is not bisected.
LOAD_POLICIES = (*POLICIES, "damocles-ext-gpulock")
SHORT = {
    "damocles": "a",
    "damocles-ext-gpulock": "cl",
    "damocles-c2": "b",
    "damocles-ext": "c",
    "damocles-ext-nophase": "c0",
    "damocles-ext-split": "cs",
    "reference": "ref",
    "clairvoyant": "clairvoyant",
    "phase-only": "c phase-only",
}
SEEDS = tuple(range(1, 13))
#: SNARK time models, the default first (see simulator.SNARK_MODELS).
MODELS = ("machine", "gpu", "partition")
#: Policies run at every whole load near 90% of the bound, on every seed (`near_bound_rows`).
NEAR_BOUND_POLICIES = ("damocles-ext", "damocles-ext-split", "reference", "clairvoyant")


def at_load(base: Scenario, fraction: float) -> Scenario:
    return base.with_total_partitions(round(capacity_bound(base) * fraction))


def _load_case(case: tuple[str, Scenario]) -> dict:
    name, sc = case
    doc = report(sc, simulate(sc, LOAD_POLICIES))
    doc["name"] = name
    return doc


def load_rows() -> tuple[list[dict], list[list]]:
    cases = []
    four = Scenario(gpus=4, partitions=(1,) * 4)
    eight = Scenario(gpus=8, partitions=(1,) * 4)
    stress = replace(four, snark_model="partition")
    for frac in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9):
        cases.append(("colliding, 4 miners, 4 GPUs", at_load(four, frac)))
    for frac in (0.6, 0.8, 0.9):
        cases.append(("colliding, 4 miners, 8 GPUs", at_load(eight, frac)))
    for frac in (0.7, 0.9):
        cases.append(("spread, 4 miners, 4 GPUs", at_load(replace(four, offsets="spread"), frac)))
    for frac in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9):
        cases.append(("colliding, 4 miners, 4 GPUs, partition", at_load(stress, frac)))
    with _pool() as pool:
        docs = list(pool.map(_load_case, cases))
    rows = []
    for doc in docs:
        for policy, r in doc["results"].items():
            rows.append(
                [
                    doc["name"],
                    doc["scenario"]["total_partitions"],
                    f"{doc['load_fraction_of_bound']:.0%}",
                    SHORT[policy],
                    f"{r['wdpost_deadlines_missed']}/{r['wdpost_deadlines']}",
                    f"{r['winning_missed']}/{r['winning']}",
                    f"{r['gpu_busy_fraction']:.1%}",
                    "abandoned" if r["p1_slack"] is None else f"{r['p1_slack']:.0f}s",
                ]
            )
    return docs, rows


def bisect_cases() -> list[tuple[str, str, Scenario]]:
    cases = []
    for model in MODELS:
        for gpus in (4, 8):
            for seed in SEEDS:
                base = Scenario(gpus=gpus, partitions=(1,) * 4, seed=seed, snark_model=model)
                cases.append((f"colliding, {gpus} GPUs, {model}", f"seed {seed}", base))
    # How much the machine model's result owes to its assumed +-5% per-partition jitter.
    for jitter in (0.10, 0.20):
        for seed in SEEDS:
            base = Scenario(gpus=4, partitions=(1,) * 4, seed=seed, snark_jitter=jitter)
            cases.append((f"colliding, 4 GPUs, machine +-{jitter:.0%}", f"seed {seed}", base))
    for seed in (1, 2, 3):
        base = Scenario(gpus=4, partitions=(1,) * 4, offsets="spread", seed=seed)
        cases.append(("spread, 4 GPUs, machine", f"seed {seed}", base))
    return cases


def _bisect_case(case: tuple[str, str, Scenario]) -> dict:
    group, seed, sc = case
    doc = bisect_report(sc, POLICIES)
    # The same scheduler when the children report only the start of the SNARK phase.
    phase_only = max_missfree_load(replace(sc, progress_interval=0.0), "damocles-ext")
    doc["policies"]["phase-only"] = {
        "max_missfree_partitions": phase_only,
        "fraction_of_bound": round(phase_only / doc["capacity_bound_partitions"], 4),
        "fraction_of_realized_bound": round(phase_only / doc["realized_bound_partitions"], 4),
    }
    doc["name"], doc["group"], doc["seed"] = f"{group}, {seed}", group, seed
    doc["snark_model"] = sc.snark_model
    return doc


def _pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=os.cpu_count() or 1)


def bisect_rows() -> tuple[list[dict], list[list]]:
    rows = []
    with _pool() as pool:  # each case is independent and deterministic
        docs = list(pool.map(_bisect_case, bisect_cases()))
    for doc in docs:
        row = [doc["group"], doc["seed"], f"{doc['capacity_bound_partitions']:.2f}"]
        row.append(str(doc["realized_bound_partitions"]))
        for policy in (*POLICIES, "phase-only"):
            r = doc["policies"][policy]
            row.append(f"{r['max_missfree_partitions']} ({r['fraction_of_bound']:.0%})")
        rows.append(row)
    return docs, rows


def _near_bound_case(args: tuple[int, int, int]) -> tuple[int, int, int, dict[str, int]]:
    gpus, load, seed = args
    base = Scenario(gpus=gpus, partitions=(1,) * 4, seed=seed, snark_model="partition")
    results = simulate(base.with_total_partitions(load), NEAR_BOUND_POLICIES)
    return gpus, load, seed, {p: r.missed for p, r in results.items()}


def near_bound_rows() -> tuple[list[dict], list[list]]:
    """Partition model: every seed at every whole load from 85% to 95% of the bound (the same
    for every seed in this model): days without a miss. No bisection here, so nothing assumes
    that misses grow with the load."""
    bounds = {
        gpus: capacity_bound(Scenario(gpus=gpus, partitions=(1,) * 4, snark_model="partition"))
        for gpus in (4, 8)
    }
    cases = [
        (gpus, load, seed)
        for gpus, bound in bounds.items()
        for load in range(round(0.85 * bound), math.floor(0.95 * bound) + 1)
        for seed in SEEDS
    ]
    with _pool() as pool:
        outcomes = list(pool.map(_near_bound_case, cases))
    docs, rows = [], []
    for gpus, bound in bounds.items():
        for load in range(round(0.85 * bound), math.floor(0.95 * bound) + 1):
            missed = {p: [] for p in NEAR_BOUND_POLICIES}
            for g, ld, _seed, per_policy in outcomes:
                if (g, ld) == (gpus, load):
                    for p, n in per_policy.items():
                        missed[p].append(n)
            clean = {p: sum(n == 0 for n in missed[p]) for p in NEAR_BOUND_POLICIES}
            docs.append(
                {
                    "gpus": gpus,
                    "snark_model": "partition",
                    "partitions": load,
                    "fraction_of_bound": round(load / bound, 4),
                    "seeds": len(SEEDS),
                    "missfree_days": clean,
                    "misses_per_seed": missed,
                }
            )
            rows.append(
                [f"colliding, {gpus} GPUs, partition", load, f"{load / bound:.1%}"]
                + [f"{clean[p]}/{len(SEEDS)}" for p in NEAR_BOUND_POLICIES]
            )
    return docs, rows


def medians(bisect_docs: list[dict]) -> tuple[list[dict], list[list]]:
    groups: dict[str, list[dict]] = {}
    for d in bisect_docs:
        groups.setdefault(d["group"], []).append(d)
    out, rows = [], []
    for group, docs in groups.items():
        entry = {"group": group, "seeds": len(docs), "policies": {}}
        row = [group, len(docs)]
        for policy in (*POLICIES, "phase-only"):
            of_bound = statistics.median(d["policies"][policy]["fraction_of_bound"] for d in docs)
            of_realized = statistics.median(
                d["policies"][policy]["fraction_of_realized_bound"] for d in docs
            )
            at_90 = sum(d["policies"][policy]["fraction_of_bound"] >= 0.9 for d in docs)
            entry["policies"][policy] = {
                "median_fraction_of_bound": round(of_bound, 4),
                "median_fraction_of_realized_bound": round(of_realized, 4),
                "seeds_at_90_percent": at_90,
            }
            row.append(f"{of_bound:.1%} ({at_90})")
        out.append(entry)
        rows.append(row)
    return out, rows


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__, "simulate").parse_args(argv)
    started = time.perf_counter()
    load_docs, rows = load_rows()
    print(
        "One day (48 deadlines), 4 miners, WinningPoSt 2/h/miner; SNARK 3-9 min (machine model, "
        "seed 1), vanilla 1-3 min"
    )
    print_table(
        rows,
        [
            "scenario",
            "parts/deadline",
            "of bound",
            "policy",
            "WdPoSt missed",
            "WinPoSt missed",
            "GPU busy",
            "p1 slack",
        ],
    )
    print()
    bisect_docs, brows = bisect_rows()
    print("Highest miss-free load (partitions per deadline, all miners; bisection, one seed a row)")
    print_table(
        brows,
        ["scenario", "seed", "bound", "realized", *(SHORT[p] for p in (*POLICIES, "phase-only"))],
    )
    print()
    median_docs, mrows = medians(bisect_docs)
    print(
        "Median over seeds: highest miss-free load as a fraction of the bound "
        "(seeds at 90% or more)"
    )
    print_table(mrows, ["scenario", "seeds", *(SHORT[p] for p in (*POLICIES, "phase-only"))])

    print()
    near_docs, nrows = near_bound_rows()
    print("Partition model, near the bound: days (seeds) with no miss at each whole load")
    print_table(
        nrows, ["scenario", "parts/deadline", "of bound", *(SHORT[p] for p in NEAR_BOUND_POLICIES)]
    )

    goal1 = []
    for doc in load_docs:
        if doc["scenario"]["offsets"] != "colliding":
            continue
        a, c = doc["results"]["damocles"], doc["results"]["damocles-ext"]
        a_missed = a["wdpost_deadlines_missed"] + a["winning_missed"]
        if a_missed:
            c_missed = c["wdpost_deadlines_missed"] + c["winning_missed"]
            goal1.append(
                {
                    "scenario": doc["name"],
                    "load": doc["load_fraction_of_bound"],
                    "a_missed": a_missed,
                    "c_missed": c_missed,
                    "met": c_missed == 0,
                }
            )

    def median_of(m: dict, policy: str) -> float:
        return m["policies"][policy]["median_fraction_of_bound"]

    # damocles-ext runs either way: whole proofs on phase-reporting children (c) or split (cs).
    def seeds_at_90(m: dict, policy: str) -> int:
        return m["policies"][policy]["seeds_at_90_percent"]

    goal2 = [
        {
            "scenario": m["group"],
            "seeds": m["seeds"],
            "c_seeds_at_90_percent": seeds_at_90(m, "damocles-ext"),
            "cs_seeds_at_90_percent": seeds_at_90(m, "damocles-ext-split"),
            "clairvoyant_seeds_at_90_percent": seeds_at_90(m, "clairvoyant"),
            "c_median_fraction_of_bound": median_of(m, "damocles-ext"),
            "cs_median_fraction_of_bound": median_of(m, "damocles-ext-split"),
            "reference_median_fraction_of_bound": median_of(m, "reference"),
            "clairvoyant_median_fraction_of_bound": median_of(m, "clairvoyant"),
            # The goal names (c); the split deployment (cs) is reported beside it.
            "met": median_of(m, "damocles-ext") >= 0.9,
            "cs_met": median_of(m, "damocles-ext-split") >= 0.9,
        }
        for m in median_docs
    ]
    print()
    print("Goal 1 (colliding, (a) misses -> (c) misses none):")
    for g in goal1:
        print(
            f"  {g['scenario']} at {g['load']:.0%}: a missed {g['a_missed']}, "
            f"c missed {g['c_missed']} -> {'met' if g['met'] else 'NOT met'}"
        )
    print("Goal 2 ((c) miss-free to >= 90% of the bound; median over seeds; cs beside it):")
    for g in goal2:
        print(
            f"  {g['scenario']}: c {g['c_median_fraction_of_bound']:.1%}, "
            f"cs {g['cs_median_fraction_of_bound']:.1%} "
            f"(reference {g['reference_median_fraction_of_bound']:.1%}, "
            f"clairvoyant {g['clairvoyant_median_fraction_of_bound']:.1%}); seeds at 90%: "
            f"c {g['c_seeds_at_90_percent']}/{g['seeds']}, "
            f"cs {g['cs_seeds_at_90_percent']}/{g['seeds']}, "
            f"clairvoyant {g['clairvoyant_seeds_at_90_percent']}/{g['seeds']} -> "
            f"{'met' if g['met'] else 'NOT met'} (cs: {'met' if g['cs_met'] else 'NOT met'})"
        )
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.1f}s")
    finish(
        "simulate",
        {
            "loads": load_docs,
            "bisect": bisect_docs,
            "bisect_medians": median_docs,
            "near_bound": near_docs,
            "goal_missfree_where_damocles_misses": goal1,
            "goal_90_percent_of_bound": goal2,
            "wall_seconds": round(elapsed, 2),
        },
        args.save,
    )


if __name__ == "__main__":
    main()
