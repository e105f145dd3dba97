"""The benchmarks' command lines: `--help` describes without running, and the tracked figures in
bench/results/ are written only when asked (`--save`)."""

from __future__ import annotations

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
            "chaos", "chaos_child"} <= set(MODULES)  # fmt: skip


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
