"""Simulated proving days: damocles' dispatch (a, b) against damocles-ext's Scheduler (c, c0).

Run: .venv/bin/python -m bench.bench_simulate
Every policy runs the same draws (seed per row). Goals (issue 5): in colliding-window scenarios
where (a) misses at least one deadline or budget, (c) misses none; and (c) stays miss-free up to at
least 90% of the capacity bound (found by bisection over partitions per deadline). (c) has children
that report their SNARK phase with done/total every 30 s; "c phase-only" reports the phase change
alone; (c0) reports nothing (JSON-lines children). `reference` is a yardstick, not a deployment:
vanilla split from SNARK, unlimited CPU, one global EDF queue. Bisection on one seed is noisy (a
whole partition is 5% of the bound with 4 GPUs), so each setting runs six seeds and the median is
the figure to quote.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from bench.runner import print_table, save_results
from damocles_ext.scheduling.simulator import (
    Scenario,
    Uniform,
    bisect_report,
    capacity_bound,
    max_missfree_load,
    report,
    simulate,
)

POLICIES = ("damocles", "damocles-c2", "damocles-ext", "damocles-ext-nophase", "reference")
SHORT = {
    "damocles": "a",
    "damocles-c2": "b",
    "damocles-ext": "c",
    "damocles-ext-nophase": "c0",
    "reference": "ref",
    "phase-only": "c phase-only",
}
SEEDS = (1, 2, 3, 4, 5, 6)


def at_load(base: Scenario, fraction: float) -> Scenario:
    return base.with_total_partitions(round(capacity_bound(base) * fraction))


def load_rows() -> tuple[list[dict], list[list]]:
    cases = []
    four = Scenario(gpus=4, partitions=(1,) * 4)
    eight = Scenario(gpus=8, partitions=(1,) * 4)
    for frac in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9):
        cases.append(("colliding, 4 miners, 4 GPUs", at_load(four, frac)))
    for frac in (0.6, 0.8, 0.9):
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


def bisect_cases() -> list[tuple[str, str, Scenario]]:
    cases = []
    for gpus in (4, 8):
        for seed in SEEDS:
            base = Scenario(gpus=gpus, partitions=(1,) * 4, seed=seed)
            cases.append((f"colliding, {gpus} GPUs", f"seed {seed}", base))
    for seed in (1, 2, 3):
        base = Scenario(gpus=4, partitions=(1,) * 4, offsets="spread", seed=seed)
        cases.append(("spread, 4 GPUs", f"seed {seed}", base))
        base = Scenario(gpus=4, partitions=(1,) * 4, snark=Uniform(300, 420), seed=seed)
        cases.append(("colliding, 4 GPUs, SNARK 5-7 min", f"seed {seed}", base))
    return cases


def bisect_rows() -> tuple[list[dict], list[list]]:
    docs, rows = [], []
    for group, seed, sc in bisect_cases():
        doc = bisect_report(sc, POLICIES)
        # The same scheduler when the children report only the start of the SNARK phase.
        phase_only = max_missfree_load(replace(sc, progress_interval=0.0), "damocles-ext")
        doc["policies"]["phase-only"] = {
            "max_missfree_partitions": phase_only,
            "fraction_of_bound": round(phase_only / doc["capacity_bound_partitions"], 4),
            "fraction_of_realized_bound": round(phase_only / doc["realized_bound_partitions"], 4),
        }
        doc["name"], doc["group"], doc["seed"] = f"{group}, {seed}", group, seed
        docs.append(doc)
        row = [group, seed, f"{doc['capacity_bound_partitions']:.2f}"]
        row.append(str(doc["realized_bound_partitions"]))
        for policy in (*POLICIES, "phase-only"):
            r = doc["policies"][policy]
            row.append(f"{r['max_missfree_partitions']} ({r['fraction_of_bound']:.0%})")
        rows.append(row)
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
            entry["policies"][policy] = {
                "median_fraction_of_bound": round(of_bound, 4),
                "median_fraction_of_realized_bound": round(of_realized, 4),
            }
            row.append(f"{of_bound:.1%} / {of_realized:.1%}")
        out.append(entry)
        rows.append(row)
    return out, rows


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
    print("Highest miss-free load (partitions per deadline, all miners; bisection, one seed a row)")
    print_table(
        brows,
        ["scenario", "seed", "bound", "realized", *(SHORT[p] for p in (*POLICIES, "phase-only"))],
    )
    print()
    median_docs, mrows = medians(bisect_docs)
    print("Median over seeds: highest miss-free load as a fraction of the bound / realized bound")
    print_table(mrows, ["scenario", "seeds", *(SHORT[p] for p in (*POLICIES, "phase-only"))])

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
            "scenario": m["group"],
            "c_median_fraction_of_bound": m["policies"]["damocles-ext"]["median_fraction_of_bound"],
            "reference_median_fraction_of_bound": m["policies"]["reference"][
                "median_fraction_of_bound"
            ],
            "met": m["policies"]["damocles-ext"]["median_fraction_of_bound"] >= 0.9,
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
    print("Goal 2 ((c) miss-free to >= 90% of the bound; median over seeds):")
    for g in goal2:
        print(
            f"  {g['scenario']}: c {g['c_median_fraction_of_bound']:.1%} "
            f"(reference {g['reference_median_fraction_of_bound']:.1%}) -> "
            f"{'met' if g['met'] else 'NOT met'}"
        )
    elapsed = time.perf_counter() - started
    path = save_results(
        "simulate",
        {
            "loads": load_docs,
            "bisect": bisect_docs,
            "bisect_medians": median_docs,
            "goal_missfree_where_damocles_misses": goal1,
            "goal_90_percent_of_bound": goal2,
            "wall_seconds": round(elapsed, 2),
        },
    )
    print(f"\n{elapsed:.1f}s; saved {path}")


if __name__ == "__main__":
    main()
