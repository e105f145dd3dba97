"""What Prometheus metrics cost an idle supervisor.

Run: .venv/bin/python -m bench.bench_metrics [--window SECONDS] [--quick] [--save]

Four `damocles-ext run` processes, each with 8 ready `echo` children and nothing to do, measured
over the same window (they run side by side, so machine noise hits all of them alike):

* off:        no --metrics (the baseline);
* on:         --metrics 127.0.0.1:0, never scraped (the HTTP thread and the observer plugin);
* scraped15:  --metrics, scraped every 15 s, Prometheus' default scrape interval;
* scraped1:   --metrics, scraped every second (to measure the cost of one scrape precisely).

For each: CPU time of the supervisor process only (all its threads, children not included) over
the window, as % of one core. Figures: on - off and scraped15 - off, and the CPU per scrape
(scraped1 - on, divided by its scrapes) with what it comes to at one scrape per 15 s.
Goal: scraped15 - off <= 0.5% of a core.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from bench.runner import bench_parser, finish, print_table

CHILDREN = 8
GOAL_PERCENT = 0.5
_METRICS_URL = re.compile(r"metrics on (http://\S+)")


class Instance:
    """One `damocles-ext run` with its log in a file."""

    def __init__(self, name: str, tmp: Path, metrics: bool, scrape_every: float | None) -> None:
        self.name = name
        self.scrape_every = scrape_every
        self.dir = tmp / name
        self.dir.mkdir(mode=0o700)
        cfg = self.dir / "ext-prover.cfg"
        cfg.write_text('[[WdPost]]\nPlugin = "echo"\n' * CHILDREN)
        argv = [sys.executable, "-m", "damocles_ext", "run", "-c", str(cfg), "--socket",
                str(self.dir / "c.sock")]  # fmt: skip
        if metrics:
            argv += ["--metrics", "127.0.0.1:0"]
        self.log_path = self.dir / "run.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log
        )
        self.url: str | None = None
        self.scrapes = 0
        self.scrape_seconds: list[float] = []
        self.bytes = 0

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log_path.read_text(errors="replace")
            ready = text.count("ready (dext)")
            match = _METRICS_URL.search(text)
            if match:
                self.url = match.group(1)
            if ready >= CHILDREN:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: run exited early:\n{text}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: children not ready within {timeout} s")

    def scrape(self) -> None:
        assert self.url is not None
        t0 = time.perf_counter()
        with urllib.request.urlopen(self.url, timeout=10) as response:
            self.bytes = len(response.read())
        self.scrape_seconds.append(time.perf_counter() - t0)
        self.scrapes += 1

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def scraper(instance: Instance, stop: threading.Event) -> None:
    """Scrape at a fixed rate, the first time at once (as Prometheus does after a target appears)."""
    assert instance.scrape_every is not None
    next_at = time.monotonic()
    while not stop.is_set():
        instance.scrape()
        next_at += instance.scrape_every
        stop.wait(max(0.0, next_at - time.monotonic()))


def measure(window: float, settle: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="dext-bench-metrics-", dir="/tmp"))
    os.chmod(tmp, 0o700)
    specs = [("off", False, None), ("on", True, None), ("scraped15", True, 15.0),
             ("scraped1", True, 1.0)]  # fmt: skip
    instances = [Instance(n, tmp, metrics, every) for n, metrics, every in specs]
    try:
        for inst in instances:
            inst.wait_ready()
        time.sleep(settle)  # start-up work (imports, spawning, first statistics) is over
        stop = threading.Event()
        before = {i.name: i.cpu_seconds() for i in instances}
        t0 = time.monotonic()
        threads = [
            threading.Thread(target=scraper, args=(i, stop), daemon=True)
            for i in instances
            if i.scrape_every is not None
        ]
        for t in threads:
            t.start()
        stop.wait(window)
        after = {i.name: i.cpu_seconds() for i in instances}
        elapsed = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join()
        rows = {}
        for inst in instances:
            cpu = after[inst.name] - before[inst.name]
            rows[inst.name] = {
                "cpu_seconds": cpu,
                "cpu_percent_of_core": 100 * cpu / elapsed,
                "scrapes": inst.scrapes,
                "scrape_ms_p50": (
                    1e3 * sorted(inst.scrape_seconds)[len(inst.scrape_seconds) // 2]
                    if inst.scrape_seconds
                    else None
                ),
                "exposition_bytes": inst.bytes or None,
                "rss_mb": psutil.Process(inst.proc.pid).memory_info().rss / 2**20,
            }
    finally:
        for inst in instances:
            inst.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"window_s": elapsed, "instances": rows}


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "metrics")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured (default 20)")
    parser.add_argument("--quick", action="store_true", help="a 10 s window (a smoke run)")
    args = parser.parse_args(argv)
    window = 10.0 if args.quick else args.window
    run = measure(window, settle=2.0)
    rows = run["instances"]
    off = rows["off"]["cpu_percent_of_core"]
    on = rows["on"]["cpu_percent_of_core"]
    s15 = rows["scraped15"]["cpu_percent_of_core"]
    s1 = rows["scraped1"]
    per_scrape_ms = (
        1e3 * (s1["cpu_seconds"] - rows["on"]["cpu_seconds"]) / s1["scrapes"]
        if s1["scrapes"]
        else None
    )
    at_15s = per_scrape_ms / 15.0 / 10.0 if per_scrape_ms is not None else None  # ms/15 s -> %
    summary = {
        "children_per_supervisor": CHILDREN,
        "metrics_on_minus_off_percent": on - off,
        "scraped15_minus_off_percent": s15 - off,
        "cpu_ms_per_scrape": per_scrape_ms,
        "scrape_cost_at_15s_percent": at_15s,
        "goal_percent_of_core": GOAL_PERCENT,
        "goal_met": (s15 - off) <= GOAL_PERCENT,
    }
    print(f"idle supervisor, {CHILDREN} echo children, {run['window_s']:.1f} s window\n")
    print_table(
        [
            [name, r["cpu_percent_of_core"], r["cpu_seconds"] * 1e3, r["scrapes"],
             r["scrape_ms_p50"] if r["scrape_ms_p50"] is not None else "-", r["rss_mb"]]
            for name, r in rows.items()
        ],
        ["instance", "CPU % of a core", "CPU ms", "scrapes", "scrape p50 ms", "RSS MB"],
    )  # fmt: skip
    print()
    print(f"metrics on, not scraped, minus off: {on - off:+.3f}% of a core")
    print(f"scraped every 15 s minus off:       {s15 - off:+.3f}% of a core"
          f" (goal <= {GOAL_PERCENT}%: {'met' if summary['goal_met'] else 'MISSED'})")  # fmt: skip
    if per_scrape_ms is not None:
        print(f"CPU per scrape: {per_scrape_ms:.2f} ms -> {at_15s:.4f}% of a core at one per 15 s")
    finish("metrics", {"window_s": run["window_s"], "summary": summary, **rows}, args.save)


if __name__ == "__main__":
    main()
