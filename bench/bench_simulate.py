"""Simulated proving days: damocles' dispatch (a, b) against damocles-ext's Scheduler (c).

Run: .venv/bin/python -m bench.bench_simulate
Every policy runs the same draws (seed per row). Goals (issue 5): in colliding-window scenarios
where (a) misses at least one deadline or budget, (c) misses none; and (c) stays miss-free up to at
least 90% of the capacity bound (found by bisection over partitions per deadline). `reference` is
a yardstick, not a deployment: vanilla split from SNARK, unlimited CPU, one global EDF queue.
"""

from __future__ import annotations

import time
from dataclasses import replace

from bench.runner import print_table, save_results
from damocles_ext.scheduling.simulator import (
    Scenario,
    Uniform,
    bisect_report,
    capacity_bound,
    report,
    simulate,
)

POLICIES = ("damocles", "damocles-c2", "damocles-ext", "reference")
SHORT = {"damocles": "a", "damocles-c2": "b", "damocles-ext": "c", "reference": "ref"}


def at_load(base: Scenario, fraction: float) -> Scenario:
    return base.with_total_partitions(round(capacity_bound(base) * fraction))


def load_rows() -> tuple[list[dict], list[list]]:
    cases = []
    four = Scenario(gpus=4, partitions=(1,) * 4)
    eight = Scenario(gpus=8, partitions=(1,) * 4)
    for frac in (0.5, 0.6, 0.7, 0.8, 0.9):
        cases.append(("colliding, 4 miners, 4 GPUs", at_load(four, frac)))
    for frac in (0.6, 0.8):
        cases.append(("colliding, 4 miners, 8 GPUs", at_load(eight, frac)))
    for frac in (0.7, 0.9):
        cases.append(("spread, 4 miners, 4 GPUs", at_load(replace(four, offsets="spread"), frac)))
    docs, rows = [], []
    for name, sc in cases:
        results = simulate(sc, POLICIES)
        doc = report(sc, results)
        doc["name"] = name
        docs.append(doc)
        for policy, r in results.items():
            rows.append(
                [
                    name,
                    sc.total_partitions,
                    f"{doc['load_fraction_of_bound']:.0%}",
                    SHORT[policy],
                    f"{r.wdpost_deadlines_missed}/{r.wdpost_deadlines}",
                    f"{r.winning_missed}/{r.winning}",
                    f"{r.gpu_busy_fraction:.1%}",
                    "abandoned" if r.p1_slack is None else f"{r.p1_slack:.0f}s",
                ]
            )
    return docs, rows


def bisect_rows() -> tuple[list[dict], list[list]]:
    cases = []
    for gpus in (4, 8):
        for seed in (1, 2, 3):
            cases.append(
                (
                    f"colliding, {gpus} GPUs, seed {seed}",
                    Scenario(gpus=gpus, partitions=(1,) * 4, seed=seed),
                )
            )
    cases.append(
        ("spread, 4 GPUs, seed 1", Scenario(gpus=4, partitions=(1,) * 4, offsets="spread"))
    )
    cases.append(
        (
            "colliding, 4 GPUs, SNARK 5-7 min",
            Scenario(gpus=4, partitions=(1,) * 4, snark=Uniform(300, 420)),
        )
    )
    cases.append(
        (
            "colliding, 8 GPUs, SNARK 5-7 min",
            Scenario(gpus=8, partitions=(1,) * 4, snark=Uniform(300, 420)),
        )
    )
    docs, rows = [], []
    for name, sc in cases:
        doc = bisect_report(sc, POLICIES)
        doc["name"] = name
        docs.append(doc)
        row = [name, f"{doc['capacity_bound_partitions']:.2f}"]
        for policy in POLICIES:
            r = doc["policies"][policy]
            row.append(f"{r['max_missfree_partitions']} ({r['fraction_of_bound']:.0%})")
        c = doc["policies"]["damocles-ext"]
        row.append(
            f"{c['max_missfree_partitions_wdpost_only']} ({c['fraction_of_bound_wdpost_only']:.0%})"
        )
        rows.append(row)
    return docs, rows


def main() -> None:
    started = time.perf_counter()
    load_docs, rows = load_rows()
    print("One day (48 deadlines), 4 miners, WinningPoSt 2/h/miner; SNARK 3-9 min, vanilla 1-3 min")
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
    print("Highest miss-free load (partitions per deadline, all miners; bisection, fixed seed)")
    print_table(brows, ["scenario", "bound", "a", "b", "c", "reference", "c (WdPoSt only)"])

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
    goal2 = [
        {
            "scenario": d["name"],
            "c_fraction_of_bound": d["policies"]["damocles-ext"]["fraction_of_bound"],
            "reference_fraction_of_bound": d["policies"]["reference"]["fraction_of_bound"],
            "met": d["policies"]["damocles-ext"]["fraction_of_bound"] >= 0.9,
        }
        for d in bisect_docs
    ]
    print()
    print("Goal 1 (colliding, (a) misses -> (c) misses none):")
    for g in goal1:
        print(
            f"  {g['scenario']} at {g['load']:.0%}: a missed {g['a_missed']}, "
            f"c missed {g['c_missed']} -> {'met' if g['met'] else 'NOT met'}"
        )
    print("Goal 2 ((c) miss-free to >= 90% of the bound):")
    for g in goal2:
        print(
            f"  {g['scenario']}: c {g['c_fraction_of_bound']:.1%} "
            f"(reference {g['reference_fraction_of_bound']:.1%}) -> "
            f"{'met' if g['met'] else 'NOT met'}"
        )
    elapsed = time.perf_counter() - started
    path = save_results(
        "simulate",
        {
            "loads": load_docs,
            "bisect": bisect_docs,
            "goal_missfree_where_damocles_misses": goal1,
            "goal_90_percent_of_bound": goal2,
            "wall_seconds": round(elapsed, 2),
        },
    )
    print(f"\n{elapsed:.1f}s; saved {path}")


if __name__ == "__main__":
    main()
