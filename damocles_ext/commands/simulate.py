"""`damocles-ext simulate`: compare dispatch policies on simulated Filecoin proving days."""

from __future__ import annotations

import argparse
import json
import math


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `simulate` and its options."""
    parser = subparsers.add_parser(
        "simulate",
        help="simulate proving days and compare damocles' dispatch with damocles-ext's",
        description=(
            "A discrete-event simulation on Filecoin's chain timing (48 deadlines a day, 30-minute "
            "windows, randomness 10 minutes before a window opens). Every policy runs the same "
            "random draws. Policies: a = damocles ext-prover as it is, b = damocles with "
            "Concurrent=2 and a shared TMPDIR, c = damocles-ext's scheduler with children that "
            "report their SNARK phase (WinningPoSt children with GpuLock = false: they time-share "
            "the GPU), cl = the same with the GPU lock shared by both stages (GpuLock = true), "
            "c0 = the same as c without phase reports (JSON-lines children), "
            "cs = damocles-ext with WindowPoSt split into vanilla and SNARK steps on different "
            "children ([[WdPostVanilla]]/[[WdPostSnark]]), "
            "reference = vanilla split from SNARK with one global EDF queue (a yardstick, not a "
            "deployment), clairvoyant = the reference knowing every SNARK's duration in advance "
            "(what foresight would be worth). "
            "Durations are seconds unless suffixed with m (minutes) or h (hours)."
        ),
    )
    parser.add_argument(
        "--miners",
        type=int,
        default=4,
        help="how many miners prove on this machine (default 4, at most 1000)",
    )
    parser.add_argument(
        "--gpus", type=int, default=4, help="how many GPUs (default 4, at most 1000)"
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=3,
        help="partitions per deadline per miner (default 3, at most 1000)",
    )
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--hours", type=float, help="simulated span in hours (default 24)")
    span.add_argument("--days", type=float, help="simulated span in days")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--offsets",
        default="colliding",
        help="'colliding' (all miners share deadline times), 'spread' (evenly staggered), or "
        "comma-separated seconds per miner (default colliding)",
    )
    parser.add_argument(
        "--submit-margin",
        default="5m",
        help="proofs are due this long before the window closes (default 5m)",
    )
    parser.add_argument(
        "--snark",
        default="3m-9m",
        help="SNARK time of one partition, LOW-HIGH; see --snark-model for what varies"
        " (default 3m-9m)",
    )
    parser.add_argument(
        "--snark-model",
        default="machine",
        help="where the SNARK times' spread comes from: machine (default: one GPU model per "
        "machine, its time drawn once per seed), gpu (mixed GPUs: a time drawn per GPU), "
        "partition (each partition drawn on its own, whatever the GPU: a packing stress case)",
    )
    parser.add_argument(
        "--snark-jitter",
        type=float,
        help="machine and gpu models: a partition's SNARK takes its GPU's time within +- this "
        "fraction (default 0.05, an assumption: see docs/SIMULATION.md)",
    )
    parser.add_argument(
        "--vanilla", default="1m-3m", help="vanilla time per partition, LOW-HIGH (default 1m-3m)"
    )
    parser.add_argument(
        "--winning", default="2-6", help="WinningPoSt GPU time, LOW-HIGH (default 2-6 seconds)"
    )
    parser.add_argument(
        "--winning-rate",
        type=float,
        default=2.0,
        help="WinningPoSt requests per hour per miner (Poisson; default 2)",
    )
    parser.add_argument(
        "--progress-interval",
        default="30s",
        help="(c): how often a running SNARK reports done/total; 0 = only when it starts "
        "(default 30s)",
    )
    parser.add_argument(
        "--policies",
        default="a,b,c",
        help="comma-separated: a, b, c, cl, c0, cs, ref, clairvoyant (or damocles, "
        "damocles-c2, damocles-ext, damocles-ext-gpulock, damocles-ext-nophase, "
        "damocles-ext-split, reference; default a,b,c)",
    )
    parser.add_argument(
        "--bisect",
        action="store_true",
        help="also find each policy's highest miss-free load (partitions per deadline, all "
        "miners) and show it as a fraction of the capacity bound",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


#: A miner proves WinningPoSt at most once a 30-second epoch.
_MAX_WINNING_RATE = 120.0
_MAX_COUNT = 1000
_PROVING_PERIOD = 24 * 3600.0


def _seconds(text: str, option: str) -> float:
    from damocles_ext.errors import UsageError

    from .common import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _range(text: str, option: str):
    from damocles_ext.errors import UsageError
    from damocles_ext.scheduling.simulator import Uniform

    parts = text.split("-")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip() for p in parts):  # `-1`: no "'' is not a duration"
        raise UsageError(f"{option}: {text!r} is not LOW-HIGH (for example 3m-9m) or one duration")
    low, high = (_seconds(p, option) for p in parts)
    if low > high:
        raise UsageError(f"{option}: the low end {low:g}s is above the high end {high:g}s")
    return Uniform(low, high)


def build_scenario(args: argparse.Namespace):
    """The Scenario the options describe; UsageError names the bad option."""
    from damocles_ext.errors import UsageError
    from damocles_ext.scheduling.simulator import Scenario

    # An inf or NaN would slip through comparisons below: inf WinningPoSt an hour runs for ever
    # and fills memory, NaN means none at all. (--snark-jitter's range check refuses them.)
    for option, value in (
        ("--hours", args.hours),
        ("--days", args.days),
        ("--winning-rate", args.winning_rate),
    ):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{option} must be a finite number, got {value:g}")
    for name in ("miners", "gpus"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
        if getattr(args, name) > _MAX_COUNT:
            # A run's time grows faster than its miners (200 take seconds, 2,000 minutes), and
            # a count past memory ended in MemoryError: one machine's miners and GPUs are fewer.
            raise UsageError(
                f"--{name} is limited to {_MAX_COUNT} (one machine's), got {getattr(args, name)}"
            )
    if args.partitions < 0:
        raise UsageError(f"--partitions must be 0 or more, got {args.partitions}")
    if args.partitions > _MAX_COUNT:
        raise UsageError(f"--partitions is limited to {_MAX_COUNT}, got {args.partitions}")
    hours = (
        24.0
        if args.hours is None and args.days is None
        else (args.hours if args.hours is not None else args.days * 24.0)
    )
    if not hours > 0:
        raise UsageError(f"the simulated span must be positive, got {hours:g} hours")
    if hours > 24 * 31:
        raise UsageError(f"the simulated span is limited to 31 days, got {hours / 24:g} days")
    if args.winning_rate < 0:
        raise UsageError(f"--winning-rate must be 0 or more, got {args.winning_rate:g}")
    if args.winning_rate > _MAX_WINNING_RATE:
        raise UsageError(
            f"--winning-rate {args.winning_rate:g} is more than one WinningPoSt per 30-second"
            f" epoch; a miner proves at most once an epoch: give at most {_MAX_WINNING_RATE:g}"
        )
    offsets: str | tuple[float, ...] = args.offsets
    if args.offsets not in ("colliding", "spread"):
        try:
            offsets = tuple(_seconds(x, "--offsets") for x in args.offsets.split(","))
        except UsageError as exc:
            # A negative offset is a list all right: say what is wrong in it.
            looks_like_a_list = "," in args.offsets or args.offsets.strip()[:1] in "-+.0123456789"
            raise UsageError(
                str(exc)
                if looks_like_a_list
                else f"--offsets: {args.offsets!r} is neither 'colliding', 'spread' nor a "
                "comma-separated list of durations (one per miner)"
            ) from None
        late = [o for o in offsets if o >= _PROVING_PERIOD]
        if late:
            # A later start only lengthens the run (and its WinningPoSt draws) without changing it.
            raise UsageError(
                f"--offsets: {late[0]:g}s is not within the 24-hour proving period a miner's"
                " deadlines repeat in; give offsets below 24 hours (86400s)"
            )
        if len(offsets) != args.miners:
            raise UsageError(
                f"--offsets gives {len(offsets)} offsets but --miners is {args.miners}; "
                "give one per miner"
            )
    from damocles_ext.scheduling.simulator import SNARK_MODELS

    if args.snark_model not in SNARK_MODELS:
        raise UsageError(
            f"--snark-model: {args.snark_model!r} is not one of {', '.join(SNARK_MODELS)}"
        )
    jitter = 0.05 if args.snark_jitter is None else args.snark_jitter
    if not 0 <= jitter < 1:
        raise UsageError(
            f"--snark-jitter must be at least 0 and below 1 (a fraction), got {jitter:g}"
        )
    if args.snark_jitter is not None and args.snark_model == "partition":
        raise UsageError(
            "--snark-jitter applies to the machine and gpu models; with --snark-model partition "
            "each partition's SNARK time is drawn from --snark alone"
        )
    snark = _range(args.snark, "--snark")
    if not snark.low > 0:
        raise UsageError(
            f"--snark: a SNARK takes time; the low end must be above 0, got {args.snark!r}"
        )
    margin = _seconds(args.submit_margin, "--submit-margin")
    if margin >= 1800:
        raise UsageError(f"--submit-margin {margin:g}s leaves no time in a 30-minute window")
    progress_interval = _seconds(args.progress_interval, "--progress-interval")
    if 0 < progress_interval < 1:
        raise UsageError(
            f"--progress-interval {progress_interval:g}s: give 0 (only when a SNARK starts) or at"
            " least 1s; shorter intervals only slow the simulation down"
        )
    return Scenario(
        gpus=args.gpus,
        partitions=(args.partitions,) * args.miners,
        hours=hours,
        offsets=offsets,
        seed=args.seed,
        submit_margin=margin,
        vanilla=_range(args.vanilla, "--vanilla"),
        snark=snark,
        snark_model=args.snark_model,
        snark_jitter=jitter,
        winning_gpu=_range(args.winning, "--winning"),
        winning_rate=args.winning_rate,
        progress_interval=progress_interval,
    )


def run(args: argparse.Namespace) -> int:
    """Simulate, print the table (or JSON); exit 2 on bad options."""
    from damocles_ext.errors import UsageError
    from damocles_ext.scheduling import simulator as sim

    scenario = build_scenario(args)
    try:
        policies = sim.resolve_policies([p.strip() for p in args.policies.split(",") if p.strip()])
    except ValueError as exc:
        raise UsageError(f"--policies: {exc}") from None
    if not policies:
        raise UsageError("--policies: name at least one policy")
    results = sim.simulate(scenario, policies)
    doc = sim.report(scenario, results)
    if args.bisect:
        doc["bisect"] = sim.bisect_report(scenario, policies)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(sim.describe(scenario, doc))
    print()
    print(sim.format_table(results))
    if args.bisect:
        print()
        print(sim.format_bisect(doc["bisect"]))
    return 0
