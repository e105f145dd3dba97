"""Doomed starts refused (scheduling/doomed.py) vs started, in overloaded simulations: policy c,
4 GPUs, seeds 1-8; one GPU model per machine, and mixed GPUs (`--snark-model gpu`: each GPU's
SNARK time drawn on its own, so a partition too late for a slow GPU may still make it on a fast
one). Prints, per scenario and seed, partitions proved in time, cancelled while running and
refused early, before (refuse_doomed=False) and after, and min/median/max over the seeds.

    .venv/bin/python -m bench.bench_doomed [--save]
"""

from __future__ import annotations

import statistics

from bench.runner import bench_parser, finish
from damocles_ext.scheduling.sim_engine import run_workload
from damocles_ext.scheduling.sim_scenario import WINDOW_POST, Scenario, generate

# (hours, partitions per deadline per miner, snark model)
SCENARIOS = ((6.0, 8, "machine"), (12.0, 4, "machine"), (6.0, 8, "gpu"))
SEEDS = range(1, 9)


def counts(
    hours: float, partitions: int, model: str, seed: int, refuse: bool
) -> tuple[int, int, int]:
    scenario = Scenario(partitions=(partitions,) * 4, hours=hours, seed=seed, snark_model=model)
    workload = generate(scenario)
    run_workload(scenario, workload, "c", refuse_doomed=refuse)
    wd = [j for j in workload.jobs if j.stage == WINDOW_POST]
    in_time = sum(j.finish is not None and j.finish <= j.due for j in wd)
    return in_time, sum(j.state == "cancelled" for j in wd), sum(j.state == "refused" for j in wd)


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__, "doomed").parse_args(argv)
    figures: dict[str, dict] = {}
    for hours, partitions, model in SCENARIOS:
        name = f"--hours {hours:g} --partitions {partitions}"
        name += f" --snark-model {model}" if model != "machine" else ""
        print(f"{name}: in time, cancelled, refused")
        rows = {r: [counts(hours, partitions, model, s, r) for s in SEEDS] for r in (False, True)}
        figures[name] = {
            "seeds": list(SEEDS),
            "before (in time, cancelled, refused)": rows[False],
            "after (in time, cancelled, refused)": rows[True],
        }
        for i, seed in enumerate(SEEDS):
            print(f"  seed {seed}: before {rows[False][i]} after {rows[True][i]}")
        for k, what in enumerate(("in time", "cancelled", "refused")):
            for r in (False, True):
                v = [row[k] for row in rows[r]]
                when = "after " if r else "before"
                med = statistics.median(v)
                print(f"  {what:9} {when}: min {min(v)} median {med:g} max {max(v)}")
    finish("doomed", {"config": {"policy": "c", "gpus": 4}, "scenarios": figures}, args.save)


if __name__ == "__main__":
    main()
