"""Sector locations: lookups per second with and without the locator's cache, against a damocles
source node look-alike, and the time a 2,349-sector deadline spends locating its sectors.

Run: .venv/bin/python -m bench.bench_sectors [--sectors 2349] [--repeat 3] [--save]

The source node is tests/helpers/damocles_source.py (go-jsonrpc's answers to
`Venus.SectorIndexerFind`, one HTTP/1.1 server thread per connection) in a process of its own,
indexing --sectors sectors of one miner, their sealed files in store `a` and cache directories
in store `b` (both on this machine's disk, so the scan and the file checks are real).

* baseline (not our code): the source called directly, one call per sector in turn on one
  kept-alive connection (the standard library's http.client), as a damocles proxy node asks
  for each sector (damocles asks twice per sector per deadline: the pre-check and the proof;
  one call is counted here);
* locator, cold: a new locator (source node, then the scan) locates every sector, asking the
  source over 8 connections, 16 calls at once;
* locator, warm: the same sectors again, every entry fresh: no call to the source.

The deadline is --sectors sectors (2,349: a full 32GiB deadline) located in one batch with 30
minutes to the deadline (the locator's budget: min(60 s, a quarter of it)):

* cold, warm: as above;
* source down, scan: the source process is gone; the scan of the stores finds every sector;
* source down, cache only: the source is gone and there is no scan; the last known locations
  (learned in a first pass, older than `fresh_for`) are given after their files are checked;
* source hung: the source process is stopped (SIGSTOP: connections are accepted, nothing is
  answered) with a 10 s budget: the source's share of it runs out, the scan answers the rest.

Each figure is min/median/max over --repeat runs; every run checks that every sector got its
right location (a wrong or missing answer fails the benchmark, exit 1).

Goal: a warm lookup at least 10x the baseline's rate, and every source-down or hung deadline
located within its budget with every sector found.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench.runner import bench_parser, finish, print_table
from damocles_ext.sectors import Bounds, SectorRef, SectorSettings
from damocles_ext.sectors.cache import CacheRules
from damocles_ext.sectors.locator import SectorLocator
from damocles_ext.sectors.providers import build_providers

ROOT = Path(__file__).resolve().parent.parent
MINER = 1000
DEADLINE_SECTORS = (
    2349  # the sectors of one full WindowPoSt partition, as the brief counts a deadline
)
TIME_LEFT = 30 * 60.0
HUNG_BUDGET = 10.0
GOAL_WARM_RATIO = 10.0

_SOURCE = """
import sys
sys.path.insert(0, {root!r})
from tests.helpers.damocles_source import DamoclesSource
server = DamoclesSource()
for n in range(1, {count} + 1):
    server.put({miner}, n, "a", "b")
server.start()
print(server.port, flush=True)
sys.stdin.read()
server.stop()
"""


class BenchFailure(Exception):
    pass


class Source:
    """The look-alike in a process of its own (its threads do not share our GIL)."""

    def __init__(self, count: int) -> None:
        code = _SOURCE.format(root=str(ROOT), count=count, miner=MINER)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise BenchFailure(f"the source look-alike did not start ({line!r})")
        self.port = int(line)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.kill()
        self.proc.wait()


def make_stores(root: Path, count: int) -> dict[str, str]:
    stores = {"a": root / "a", "b": root / "b"}
    (stores["a"] / "sealed").mkdir(parents=True)
    (stores["b"] / "cache").mkdir(parents=True)
    for n in range(1, count + 1):
        (stores["a"] / "sealed" / f"s-t0{MINER}-{n}").write_bytes(b"")
        (stores["b"] / "cache" / f"s-t0{MINER}-{n}").mkdir()
    return {name: str(path) for name, path in stores.items()}


def expected(stores: dict[str, str], n: int) -> tuple[str, str]:
    return (f"{stores['a']}/sealed/s-t0{MINER}-{n}", f"{stores['b']}/cache/s-t0{MINER}-{n}")


def check(answers, stores: dict[str, str], what: str) -> None:
    for answer in answers:
        loc = answer.location
        got = None if loc is None else (loc.sealed_file, loc.cache_dir)
        if not answer.found or got != expected(stores, answer.sector.number):
            raise BenchFailure(f"{what}: {answer.sector}: {answer.status} {got} {answer.detail}")


def baseline(port: int, count: int) -> float:
    """Seconds for `count` calls, one per sector in turn, with http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    start = time.perf_counter()
    for n in range(1, count + 1):
        body = json.dumps({"jsonrpc": "2.0", "method": "Venus.SectorIndexerFind", "id": n,
                           "params": ["normal", {"Miner": MINER, "Number": n}]})  # fmt: skip
        conn.request("POST", "/rpc/v0", body, {"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
        if not answer["result"]["Found"]:
            raise BenchFailure(f"baseline: sector {n} not found")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def locator_for(settings: SectorSettings, rules: CacheRules, bounds: Bounds) -> SectorLocator:
    return SectorLocator(build_providers(settings), rules=rules, bounds=bounds)


async def timed(locator: SectorLocator, sectors, time_left: float | None):
    start = time.perf_counter()
    answers = await locator.locate(sectors, time_left=time_left)
    return time.perf_counter() - start, answers


def one_repeat(count: int, stores: dict[str, str], hung_budget: float) -> dict[str, float]:
    """Seconds of each measure, in one run, against a new source process."""
    sectors = [SectorRef(MINER, n) for n in range(1, count + 1)]
    out: dict[str, float] = {}
    source = Source(count)
    try:
        out["baseline"] = baseline(source.port, count)
        settings = SectorSettings(proxy=source.address, stores=stores)
        # fresh_for long enough for the warm pass, keep_for for the cache-only pass.
        rules = CacheRules(fresh_for=600, refresh_lead=60)

        async def passes() -> None:
            async with locator_for(settings, rules, Bounds()) as loc:
                out["cold"], answers = await timed(loc, sectors, TIME_LEFT)
                check(answers, stores, "cold")
                out["warm"], answers = await timed(loc, sectors, TIME_LEFT)
                check(answers, stores, "warm")
            # Learned with the source up; then every entry is stale (fresh_for 0) and the source
            # gone: the cache-only locator must give the last known locations.
            stale = CacheRules(fresh_for=0, refresh_lead=0)
            only_source = SectorSettings(proxy=source.address, stores=stores)
            async with SectorLocator(build_providers(only_source)[:1], rules=stale) as cached:
                _, answers = await timed(cached, sectors, TIME_LEFT)
                check(answers, stores, "cache-only learning")
                source.pause()
                try:
                    hung_bounds = Bounds(batch_timeout=hung_budget)
                    async with locator_for(settings, stale, hung_bounds) as hung:
                        out["hung"], answers = await timed(hung, sectors, TIME_LEFT)
                        check(answers, stores, "source hung")
                finally:
                    source.resume()
                source.close()
                out["down_cache"], answers = await timed(cached, sectors, TIME_LEFT)
                check(answers, stores, "source down, cache only")
                if not all(a.cached for a in answers):
                    raise BenchFailure("source down, cache only: an answer not from the cache")
            async with locator_for(settings, rules, Bounds()) as down:
                out["down_scan"], answers = await timed(down, sectors, TIME_LEFT)
                check(answers, stores, "source down, scan")

        trio.run(passes)
    finally:
        source.close()
    return out


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "sectors")
    parser.add_argument("--sectors", type=int, default=DEADLINE_SECTORS,
                        help=f"sectors in the deadline (default {DEADLINE_SECTORS})")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--hung-budget", type=float, default=HUNG_BUDGET, metavar="SECONDS",
                        help=f"the budget of the hung-source pass (default {HUNG_BUDGET:g})")  # fmt: skip
    args = parser.parse_args(argv)
    if args.sectors < 1 or args.repeat < 1 or not args.hung_budget > 0:
        parser.error("--sectors and --repeat must be at least 1, --hung-budget above 0")
    runs: list[dict[str, float]] = []
    load_before = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="dext-bench-sectors-") as tmp:
            stores = make_stores(Path(tmp), args.sectors)
            for i in range(args.repeat):
                runs.append(one_repeat(args.sectors, stores, args.hung_budget))
                print(f"run {i + 1}: " + ", ".join(f"{k} {v:.3f} s" for k, v in runs[-1].items()))
    except BenchFailure as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    n = args.sectors
    seconds = {key: spread([r[key] for r in runs]) for key in runs[0]}
    # The slowest run is the lowest rate.
    rates = {
        key: {"min": n / seconds[key]["max"], "median": n / seconds[key]["median"],
              "max": n / seconds[key]["min"]}
        for key in ("baseline", "cold", "warm")
    }  # fmt: skip
    ratios = {key: spread([r["baseline"] / r[key] for r in runs]) for key in ("cold", "warm")}
    budget = Bounds().budget(TIME_LEFT)
    goals = {
        f"warm lookups >= {GOAL_WARM_RATIO:g}x the baseline's rate (every run)": all(
            r["baseline"] / r["warm"] >= GOAL_WARM_RATIO for r in runs
        ),
        f"source down: within the {budget:g} s budget (every run)": all(
            max(r["down_scan"], r["down_cache"]) <= budget for r in runs
        ),
        f"source hung: within the {args.hung_budget:g} s budget (every run)": all(
            r["hung"] <= args.hung_budget for r in runs
        ),
    }
    print(f"\n{n} sectors, {args.repeat} runs; lookups per second (min / median / max):")
    labels = {"baseline": "source called directly (baseline)", "cold": "locator, cold cache",
              "warm": "locator, warm cache"}  # fmt: skip
    print_table(
        [[labels[k], rates[k]["min"], rates[k]["median"], rates[k]["max"]] for k in labels],
        ["", "min", "median", "max"],
    )
    print(
        "against the baseline in the same run (min / median / max): cold "
        + " / ".join(f"{v:.2f}x" for v in ratios["cold"].values())
        + ", warm "
        + " / ".join(f"{v:,.0f}x" for v in ratios["warm"].values())
    )
    print(f"\nthe deadline's {n} sectors located, seconds (min / median / max):")
    deadline = {"baseline": "source called directly (baseline)", "cold": "cold cache",
                "warm": "warm cache", "down_scan": "source down, scan",
                "down_cache": "source down, cache only",
                "hung": f"source hung ({args.hung_budget:g} s budget)"}  # fmt: skip
    print_table(
        [[deadline[k], seconds[k]["min"], seconds[k]["median"], seconds[k]["max"]]
         for k in deadline],
        ["", "min", "median", "max"],
    )  # fmt: skip
    print()
    for goal, met in goals.items():
        print(f"{'met    ' if met else 'MISSED '} {goal}")
    results = {
        "sectors": n,
        "repeat": args.repeat,
        "time_left": TIME_LEFT,
        "budget": budget,
        "hung_budget": args.hung_budget,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "runs": runs,
        "seconds": seconds,
        "lookups_per_second": rates,
        "rate_vs_baseline": ratios,
        "goals_met": goals,
    }
    finish("sectors", results, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
