"""The benchmarks' command lines: `--help` describes without running, and the tracked figures in
bench/results/ are written only when asked (`--save`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# Every module that runs as `python -m bench.NAME`.
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def _results_snapshot() -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in RESULTS.glob("*")}


def test_every_benchmark_is_found():
    assert {"bench_codec", "bench_native", "bench_simulate", "bench_metrics", "bench_supervisor",
            "bench_jobs", "bench_child", "chaos", "chaos_child"} <= set(MODULES)  # fmt: skip


@pytest.mark.parametrize("module", MODULES)
def test_help_on_a_benchmark_prints_its_help_and_runs_nothing(module: str, tmp_path: Path):
    before = _results_snapshot()
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--help"],
        cwd=ROOT,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert out.startswith("usage:"), out
    if module != "chaos_child":
        assert "--save" in out
    # A run would print its figures and say whether it saved them.
    assert "saved" not in out and done.stderr == b""
    assert _results_snapshot() == before


def test_a_benchmark_run_without_save_leaves_the_tracked_results_alone():
    before = _results_snapshot()
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_codec"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert "not saved (add --save to write bench/results/codec.json)" in done.stdout.decode()
    assert _results_snapshot() == before


def test_save_writes_the_results_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from bench import runner

    monkeypatch.setattr(runner, "RESULTS_DIR", tmp_path)
    assert runner.finish("x", {"a": 1}, save=False) is None
    assert list(tmp_path.iterdir()) == []
    path = runner.finish("x", {"a": 1}, save=True)
    assert path == tmp_path / "x.json" and '"a": 1' in path.read_text()


def test_the_jobs_benchmark_checks_each_job_was_allocated_once_on_both_engines():
    before = _results_snapshot()
    quick = ["--jobs", "20", "--repeat", "1", "--clients", "1,4"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_jobs", *quick],
        cwd=ROOT,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=180,
        check=False,
    )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "SQLite, 4 clients: floor" in out and "each job allocated exactly once" in out
    assert "idle RPC calls/s" in out
    # PostgreSQL is measured, or skipped with the reason when this machine has no server.
    assert "PostgreSQL, 4 clients: floor" in out or "PostgreSQL: skipped: no PostgreSQL" in out
    assert "Peer: damocles-manager's own worker-prover" in out
    assert "not saved (add --save to write bench/results/jobs.json)" in out
    assert _results_snapshot() == before


def test_a_job_allocated_twice_or_never_fails_the_jobs_benchmark():
    from bench.jobs_clients import BenchFailure, check_exactly_once

    check_exactly_once([["a", "b"], ["c"], []], {"a", "b", "c"}, "run")
    with pytest.raises(BenchFailure, match=r"1 allocated more than once \['b'\], 0 never"):
        check_exactly_once([["a", "b"], ["b", "c"]], {"a", "b", "c"}, "run")
    with pytest.raises(BenchFailure, match=r"0 allocated more than once \[\], 1 never \['c'\]"):
        check_exactly_once([["a"], ["b"]], {"a", "b", "c"}, "run")
    with pytest.raises(BenchFailure, match=r"1 unknown \['x'\]"):
        check_exactly_once([["a", "b", "c", "x"]], {"a", "b", "c"}, "run")


def test_the_jobs_goal_is_met_only_if_every_run_met_it():
    from bench.bench_jobs import goal_verdict

    # The saved run on SQLite: a median of 96, one run above 100; and one whose median is above.
    assert goal_verdict([104.2, 95.0, 96.5]) == "NOT MET (2 of 3 runs below: 95.0, 96.5 jobs/s)"
    assert goal_verdict([126.7, 99.5, 119.6]) == "NOT MET (1 of 3 runs below: 99.5 jobs/s)"
    assert goal_verdict([141.8, 108.5, 110.3]) == "met (every run; the slowest 108.5 jobs/s)"


def _bench_child(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.bench_child", *args],
        cwd=ROOT,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )


def test_the_child_benchmark_measures_our_child_against_the_floor_and_says_if_the_goal_is_met():
    before = _results_snapshot()
    done = _bench_child("--requests", "30", "--repeat", "1")
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "| floor: minimal msgspec child" in out and "| damocles-ext child (this checkout)" in out
    assert re.search(
        r"^goal (met|NOT met): our child's CPU per request is [0-9.]+x", out, re.MULTILINE
    )
    assert "not saved (add --save to write bench/results/child.json)" in out
    assert _results_snapshot() == before


def test_the_child_benchmark_refuses_a_directory_that_is_not_a_checkout(tmp_path: Path):
    done = _bench_child("--compare-with", str(tmp_path))
    assert done.returncode == 2
    err = done.stderr.decode()
    assert f"--compare-with {tmp_path}: damocles_ext is imported from" in err
    assert "give a checkout of damocles-ext" in err and "Traceback" not in err
