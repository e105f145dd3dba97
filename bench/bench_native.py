"""Native reference prover vs. the Python reference vs. this machine's SHA-256 limit.

Run: .venv/bin/python -m bench.bench_native [--save]
- SHA-256 limit: `openssl speed -evp sha256 -bytes 64 -seconds 1` (one process, one core), sampled
  --samples times (default 7). A tree node hash is SHA-256 of exactly 64 bytes, so that is the
  right ceiling.
- Tree building: `build_tree` of one 8MiB sealed file (262143 node hashes, read from the file and
  written to the tree file), single-threaded; throughput counts 64 hashed bytes per node. Each
  build is paired with one OpenSSL sample taken just before it, so that load from elsewhere hits
  both alike; the ratio is taken within each pair and reported as min / median / max.
- WindowPoSt over 2349 2KiB replicas (the sector count of one 32GiB partition) with
  StackedDrgWindow2KiBV1_2: every sector's sealed file, p_aux and tree file opened and read.
  The files are in the page cache (they were just written): this measures the prover, not a disk.
Goals: native tree building >= 70% of the SHA-256 limit per core (in every pair) and >= 5x the
Python reference; the 2349-replica WindowPoSt < 1 s with the native prover.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.runner import bench_parser, finish, goal_runs, print_table, spread
from damocles_ext.commands.common import positive_int
from damocles_ext.post import reference
from damocles_ext.post.fixtures import create_sectors, load_manifest, window_task, winning_task
from damocles_ext.post.native import NativeProver
from damocles_ext.post.verify import verify

REPLICAS = 2349
TREE_PROOF_TYPE = "StackedDrgWindow8MiBV1_2"
WINDOW_PROOF_TYPE = "StackedDrgWindow2KiBV1_2"


def openssl_sha256_64() -> float:
    """Bytes/s of `openssl speed -evp sha256` on 64-byte blocks: one 1-second sample."""
    out = subprocess.run(
        ["openssl", "speed", "-evp", "sha256", "-bytes", "64", "-seconds", "1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header = next(line for line in out.splitlines() if line.startswith("type"))
    sizes = re.findall(r"(\d+) bytes", header)
    row = next(line for line in out.splitlines() if line.lower().startswith("sha256"))
    values = re.findall(r"([\d.]+)k", row)
    return float(values[sizes.index("64")]) * 1000


def _mmm(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def _mbs(rates: list[float]) -> str:
    return " / ".join(f"{v / 1e6:.0f}" for v in _mmm(rates)) + " MB/s"


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median seconds of `repeat` calls, and the last result."""
    samples, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def paired_tree_builds(build, samples: int) -> tuple[list[float], list[float], object]:
    """`samples` pairs of (an OpenSSL 64-byte sample, then one native tree build): the limits in
    bytes/s, the build times in s, and the last build's result."""
    limits, times = [], []
    result = build()  # warm-up: the first build also creates the tree file
    for _ in range(samples):
        limits.append(openssl_sha256_64())
        start = time.perf_counter()
        result = build()
        times.append(time.perf_counter() - start)
    return limits, times, result


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "native")
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=7,
        metavar="N",
        help="OpenSSL samples, each paired with one native tree build (default 7)",
    )
    args = parser.parse_args(argv)
    native = NativeProver()
    with tempfile.TemporaryDirectory(prefix="dext-bench-") as tmp:
        root = Path(tmp)

        # --- tree building ------------------------------------------------------------------
        tree_manifest = load_manifest(
            create_sectors(root / "tree", TREE_PROOF_TYPE, 1, 1000, random_seed=1)
        )
        rep = tree_manifest.replicas[0]
        comm_c = (Path(rep.cache_dir) / "p_aux").read_bytes()[:32]
        nodes = (8 << 20) // 32
        hashed = 64 * (nodes - 1)
        limits, tree_times, comm_r = paired_tree_builds(
            lambda: native.build_tree(TREE_PROOF_TYPE, rep.sealed_file, root / "c", comm_c),
            args.samples,
        )
        t_tree_c = statistics.median(tree_times)
        t_tree_py, comm_r_py = timed(
            lambda: reference.build_tree(TREE_PROOF_TYPE, rep.sealed_file, root / "py", comm_c), 2
        )
        assert comm_r.hex() == rep.comm_r == comm_r_py.hex()

        # --- WindowPoSt over 2349 replicas ----------------------------------------------------
        start = time.perf_counter()
        manifest = load_manifest(
            create_sectors(root / "w", WINDOW_PROOF_TYPE, REPLICAS, 1000, random_seed=2)
        )
        t_fixtures = time.perf_counter() - start
        task = window_task(manifest, bytes(range(32)))
        t_window_c, out_c = timed(lambda: native.window_post(task), 7)
        t_window_py, out_py = timed(lambda: reference.window_post(task), 2)
        assert out_c == out_py and not out_c.faults
        t_verify_c, _ = timed(lambda: native.verify(task, out_c), 5)
        t_verify_py, _ = timed(lambda: verify(task, out_c), 2)
        # damocles-manager sends the one sector it chose from the eligible set
        win = winning_task(manifest, bytes(range(32)), sector_ids=[manifest.replicas[7].sector_id])
        t_winning_c, _ = timed(lambda: native.winning_post(win), 21)
    native.close()

    # Hashes a 2KiB V1_2 proof computes per sector: comm_r, and per challenge the challenge
    # derivation, the 8-node block (rows_to_discard 2 -> 7 hashes) and 3 stored levels.
    prove_hashes = REPLICAS * (1 + 10 * (1 + 7 + 3))
    tree_c = hashed / t_tree_c
    limit = statistics.median(limits)
    pair_ratios = [hashed / t / lim for t, lim in zip(tree_times, limits, strict=True)]
    vs_limit = goal_runs(pair_ratios, lambda v: v >= 0.7, "x")
    tree_py = hashed / t_tree_py
    rows = [
        [
            f"openssl speed -evp sha256 -bytes 64, {len(limits)} samples",
            "",
            _mbs(limits),
            "1.00",
        ],
        [
            "tree build 8MiB, native (C), paired with each sample",
            " / ".join(f"{v * 1e3:.1f}" for v in _mmm(tree_times)) + " ms",
            _mbs([hashed / t for t in tree_times]),
            " / ".join(f"{v:.2f}" for v in _mmm(pair_ratios)),
        ],
        [
            "tree build 8MiB, python-ref",
            f"{t_tree_py * 1e3:.0f} ms",
            f"{tree_py / 1e6:.1f} MB/s",
            f"{tree_py / limit:.3f}",
        ],
        [
            f"WindowPoSt {REPLICAS} x 2KiB, native (C)",
            f"{t_window_c * 1e3:.0f} ms",
            f"{REPLICAS / t_window_c:,.0f} sectors/s",
            f"{prove_hashes * 64 / t_window_c / limit:.2f}",
        ],
        [
            f"WindowPoSt {REPLICAS} x 2KiB, python-ref",
            f"{t_window_py * 1e3:.0f} ms",
            f"{REPLICAS / t_window_py:,.0f} sectors/s",
            f"{prove_hashes * 64 / t_window_py / limit:.3f}",
        ],
        [f"verify {len(out_c.proofs)} partitions, native", f"{t_verify_c * 1e3:.0f} ms", "", ""],
        [f"verify {len(out_c.proofs)} partitions, python", f"{t_verify_py * 1e3:.0f} ms", "", ""],
        ["WinningPoSt 2KiB (66 challenges), native", f"{t_winning_c * 1e3:.2f} ms", "", ""],
        [f"create {REPLICAS} 2KiB sector fixtures", f"{t_fixtures * 1e3:.0f} ms", "", ""],
    ]
    print_table(
        rows,
        ["what (min / median / max where 3 figures)", "time", "throughput", "x SHA-256 limit"],
    )
    goals = {
        "tree_native_vs_sha256_limit": round(statistics.median(pair_ratios), 3),
        "tree_native_vs_python": round(t_tree_py / t_tree_c, 1),
        "window_post_2349_native_s": round(t_window_c, 4),
    }
    met = (
        vs_limit["met"]
        and goals["tree_native_vs_python"] >= 5
        and goals["window_post_2349_native_s"] < 1.0
    )
    print(
        f"\ngoals: tree >= 0.70 x limit: median {goals['tree_native_vs_sha256_limit']:.2f}, "
        f"{vs_limit['verdict']}; "
        f"tree >= 5x python: {goals['tree_native_vs_python']:.1f}x; "
        f"2349-replica WindowPoSt < 1 s: {t_window_c:.3f} s -> {'met' if met else 'NOT met'}"
    )
    finish(
        "native",
        {
            "sha256_openssl_64B_bytes_per_s": limit,
            "sha256_openssl_64B_samples": spread(limits) | {"runs": limits},
            "tree_native_vs_sha256_limit_pairs": spread(pair_ratios) | {"runs": pair_ratios},
            "tree_native_vs_sha256_limit_goal": vs_limit,
            "tree_build_8MiB": {
                "native_s": t_tree_c,
                "native_s_runs": tree_times,
                "python_s": t_tree_py,
                "hashed_bytes": hashed,
                "native_bytes_per_s": tree_c,
                "python_bytes_per_s": tree_py,
            },
            "window_post_2349x2KiB": {
                "native_s": t_window_c,
                "python_s": t_window_py,
                "partitions": len(out_c.proofs),
                "page_cache": "warm",
            },
            "verify_2349x2KiB": {"native_s": t_verify_c, "python_s": t_verify_py},
            "winning_post_2KiB_native_s": t_winning_c,
            "fixtures_2349x2KiB_s": t_fixtures,
            "goals": goals,
            "goals_met": met,
        },
        args.save,
    )


if __name__ == "__main__":
    main()
