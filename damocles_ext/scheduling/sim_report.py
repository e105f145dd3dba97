"""The simulator's reports: a run and a bisection as JSON-ready documents and as text tables."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .sim_engine import PolicyResult, max_missfree_load, resolve_policies
from .sim_scenario import (
    Scenario,
    capacity_bound,
    generate,
    realized_capacity_bound,
    realized_overload,
)


def bisect_report(scenario: Scenario, policies: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Each policy's highest miss-free load (all misses; WindowPoSt only) and its fraction of
    the capacity bound and of the realized bound (the same test on the drawn durations)."""
    bound = capacity_bound(scenario)
    realized = realized_capacity_bound(scenario)
    out: dict[str, Any] = {
        "capacity_bound_partitions": round(bound, 3),
        "realized_bound_partitions": realized,
        "policies": {},
    }
    for policy in resolve_policies(policies):
        cache: dict[int, PolicyResult] = {}
        every = max_missfree_load(scenario, policy, _cache=cache)
        wdpost = max_missfree_load(scenario, policy, winning=False, _cache=cache)
        out["policies"][policy] = {
            "max_missfree_partitions": every,
            "fraction_of_bound": round(every / bound, 4),
            "fraction_of_realized_bound": round(every / realized, 4) if realized else None,
            "max_missfree_partitions_wdpost_only": wdpost,
            "fraction_of_bound_wdpost_only": round(wdpost / bound, 4),
        }
    return out


def format_bisect(doc: dict[str, Any]) -> str:
    """The bisection results as a plain-text table."""
    head = ("policy", "miss-free load", "of bound", "of realized", "WdPoSt-only load", "of bound")
    rows = [head]
    for name, r in doc["policies"].items():
        of_realized = r["fraction_of_realized_bound"]
        rows.append(
            (
                name,
                str(r["max_missfree_partitions"]),
                f"{r['fraction_of_bound']:.1%}",
                "-" if of_realized is None else f"{of_realized:.1%}",
                str(r["max_missfree_partitions_wdpost_only"]),
                f"{r['fraction_of_bound_wdpost_only']:.1%}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = (
        f"highest miss-free load (partitions per deadline, all miners; capacity bound "
        f"{doc['capacity_bound_partitions']:.2f}, realized bound "
        f"{doc['realized_bound_partitions']} for these draws)"
    )
    return title + "\n" + "\n".join(lines)


def _span(s: Scenario) -> str:
    """The span asked for, and the whole deadlines it is simulated as when they differ."""
    n = s.deadlines_per_miner
    whole = n * s.deadline_period / 3600.0
    if abs(whole - s.hours) < 1e-9:
        return f"{s.hours:g} h"
    return f"{s.hours:g} h (simulated as {n} whole deadline{'s' if n > 1 else ''} per miner: {whole:g} h)"


def describe(scenario: Scenario, doc: dict[str, Any]) -> str:
    """One paragraph: what was simulated, the bound and how loaded it is."""
    s = scenario
    offsets = (
        s.offsets
        if isinstance(s.offsets, str)
        else "offsets " + ",".join(f"{o:g}s" for o in s.offsets)
    )
    jitter = ""
    if s.snark_model != "partition":
        speeds = s.gpu_speeds()[:1] if s.snark_model == "machine" else s.gpu_speeds()
        times = "/".join(f"{s.snark.mean / v:.0f}s" for v in speeds)
        jitter = f": {times}, +-{s.snark_jitter:.0%}"
    return (
        f"{s.miners} miners ({offsets}), {s.gpus} GPUs, {s.total_partitions} partitions per "
        f"deadline ({','.join(map(str, s.partitions))} per miner), {_span(s)}, seed {s.seed}; "
        f"SNARK {s.snark.low:g}-{s.snark.high:g}s ({s.snark_model} model{jitter}; "
        f"progress every {s.progress_interval:g}s), "
        f"vanilla {s.vanilla.low:g}-{s.vanilla.high:g}s, "
        f"WinningPoSt {s.winning_gpu.low:g}-{s.winning_gpu.high:g}s at "
        f"{s.winning_rate:g}/h/miner, submit margin {s.submit_margin:g}s.\n"
        f"capacity bound {doc['capacity_bound_partitions']:.2f} partitions per deadline; "
        f"load {doc['load_fraction_of_bound']:.1%} of it; realized work/time peak "
        f"{doc['realized_overload']:.3f} (above 1: no schedule meets every deadline)"
    )


def report(scenario: Scenario, results: dict[str, PolicyResult]) -> dict[str, Any]:
    """The JSON form of a run: scenario, bound, per-policy results."""
    sc = asdict(scenario)
    sc["miners"] = scenario.miners
    sc["total_partitions"] = scenario.total_partitions
    bound = capacity_bound(scenario)
    return {
        "scenario": sc,
        "capacity_bound_partitions": round(bound, 3),
        "load_fraction_of_bound": round(scenario.total_partitions / bound, 4),
        "realized_overload": round(
            realized_overload(generate(scenario), scenario.gpu_capacity()), 4
        ),
        "results": {name: asdict(r) for name, r in results.items()},
    }


def format_table(results: dict[str, PolicyResult]) -> str:
    """A plain-text table of the results, one row per policy."""
    head = (
        "policy",
        "WdPoSt missed",
        "late parts",
        "WinPoSt missed",
        "GPU busy",
        "min slack",
        "p1 slack",
        "WinPoSt p99",
        "cancelled/refused parts",
    )
    rows = [head]

    def secs(x: float | None, r: PolicyResult) -> str:
        if x is None:  # no completion time: a partition never ran, or there was none
            return "abandoned" if r.wdpost_deadlines else "-"
        return f"{x:.0f}s"

    for name, r in results.items():
        rows.append(
            (
                name,
                f"{r.wdpost_deadlines_missed}/{r.wdpost_deadlines}",
                f"{r.wdpost_partitions_late + r.wdpost_partitions_abandoned}/{r.wdpost_partitions}",
                f"{r.winning_missed}/{r.winning}",
                f"{r.gpu_busy_fraction:.1%}",
                secs(r.min_slack, r),
                secs(r.p1_slack, r),
                "-" if r.winning_p99_latency is None else f"{r.winning_p99_latency:.1f}s",
                f"{r.wdpost_partitions_cancelled}/{r.wdpost_partitions_refused}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
