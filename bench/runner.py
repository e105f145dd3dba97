"""Small shared helpers for the benchmarks: their arguments, print a table, save figures as JSON.

Every benchmark prints its figures; with `--save` it also writes them to
bench/results/<name>.json together with when and where they were measured, so the figures in
docs/ can be traced to a file and rerun. Those files are tracked: a run to look, or on a
loaded machine, must not replace them unless asked.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from damocles_ext.compiled import how_they_run

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """Where the figures were measured."""
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        # The request book and the scheduler ran compiled, or why their sources ran instead.
        "compiled_modules": how_they_run(),
    }


def bench_parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """The benchmark's arguments: its docstring as help, and --save for bench/results/NAME.json."""
    parser = argparse.ArgumentParser(
        description=(doc or "").strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--save",
        action="store_true",
        help=f"also write the figures to bench/results/{name}.json, the tracked file docs/"
        " quotes (default: print them only)",
    )
    return parser


def finish(name: str, data: dict, save: bool) -> Path | None:
    """Save the figures with --save (save_results), else say how; returns the path written."""
    if not save:
        print(f"\nnot saved (add --save to write bench/results/{name}.json)")
        return None
    path = save_results(name, data)
    print(f"\nsaved {path}")
    return path


def save_results(name: str, data: dict) -> Path:
    """Write bench/results/<name>.json with a timestamp and machine info; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "measured_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "results": data,
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def print_table(rows: Iterable[Sequence], headers: Sequence[str]) -> None:
    """Print rows as an aligned plain-text table (also valid Markdown)."""
    rows = [[_fmt(c) for c in row] for row in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
        for i, h in enumerate(headers)
    ]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def time_call(fn: Callable[[], object], *, repeat: int = 7, min_time: float = 0.2) -> dict:
    """Median and best seconds per call of fn, auto-ranging the loop count like timeit."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / repeat or number >= 1 << 20:
            break
        number *= 2
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return {"median_s": statistics.median(samples), "best_s": min(samples), "loops": number}


def spread(values: Sequence[float]) -> dict:
    """min / median / max of a benchmark's repeats."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def spread_runs(values: Sequence[float]) -> dict:
    """`spread(values)` with the values themselves ("runs"), as the JSON keeps them."""
    return spread(values) | {"runs": values}


def mmm(figures: dict, fmt: str = "{:.1f}") -> str:
    """A spread's min / median / max as printed: "1.0 / 2.0 / 3.0"."""
    return " / ".join(fmt.format(figures[k]) for k in ("min", "median", "max"))


def share(n: int, parts: int, i: int) -> int:
    """Part `i` of n things shared out over `parts` parts as evenly as can be."""
    return n // parts + (i < n % parts)


def rotated(ways: Sequence, start: int) -> list:
    """`ways` begun at `start` (modulo their number): who goes first moves turn by turn, so no
    way always follows another."""
    k = start % len(ways)
    return [*ways[k:], *ways[:k]]


def goal_runs(runs: Sequence[float], ok: Callable[[float], bool], unit: str = "") -> dict:
    """A goal is met only if every run met it: a median that meets it hides the runs that missed.

    Returns the runs, whether the goal was met and the verdict as printed."""
    missed = [v for v in runs if not ok(v)]
    if missed:
        verdict = (
            f"NOT met ({len(missed)} of {len(runs)} runs missed: "
            + ", ".join(f"{_fmt(float(v))}{unit}" for v in missed)
            + ")"
        )
    else:
        verdict = "met (every run)"
    return {"runs": list(runs), "met": not missed, "verdict": verdict}
