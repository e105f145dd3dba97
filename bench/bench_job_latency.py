"""The latency a WindowPoSt job adds over `serve` with local children, and where it goes.

Run: .venv/bin/python -m bench.bench_job_latency [--requests 10] [--worker-poll 1] [--save]

The same small WindowPoSt request (4 sectors, the `echo` test prover: its answer takes no work,
so what is measured is the path), one at a time, written as damocles-manager writes it (one JSON
line on a processor's stdin) and timed until its answer line:

* local: `damocles-ext serve window_post -c cfg`, one `echo` child (Plugin = "echo");
* jobs: `damocles-ext serve window_post --jobs URL --store NAME=PATH` (the producer), a
  `damocles-ext coordinator --jobs URL` and a `damocles-ext worker` on that coordinator with one
  `echo` child, asking again every --worker-poll seconds after it found no job (damocles'
  advice for damocles-worker is 15 s, its default 60 s: with those, the worker's wait below
  grows to half of that on average);

on SQLite (the producer polls the store every --producer-poll seconds), on SQLite as on one
machine (the coordinator inside serve, `--listen`: the finishes it takes wake the producer), and
on PostgreSQL (a throw-away server; the producer is woken by NOTIFY, its polling only a
fallback). Before
each request the benchmark waits a random part of the worker's poll interval, so requests do not
fall at one phase of the polling loops.

The jobs path is split by the worker's log (JSON, millisecond times): from the request to the
worker pulling the job (the producer creating it, then the worker's poll), from pulled to
delivered (the echo child's proof and the finish call), and from delivered to the answer line
(the producer noticing: its poll, the NOTIFY or its own coordinator's wake-up, then answering).
"""

from __future__ import annotations

import contextlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.job_procs import (
    DEXT,
    ECHO_CONFIG,
    SECTORS,
    BenchFailure,
    Processor,
    WorkerProcess,
    make_task,
    parse_engines,
    producer_chain,
    spread,
    store_urls,
)
from bench.runner import bench_parser, finish, print_table


def paced(poll: float) -> None:
    """Wait a random part of the worker's poll interval: pacing, so requests do not all fall at
    one phase of the polling loops (nothing waits on this for an event)."""
    time.sleep(random.uniform(0, poll))


def measure_local(tmp: Path, requests: int, store: Path, poll: float) -> list[float]:
    config = tmp / "local.cfg"
    config.write_text(ECHO_CONFIG)
    processor = Processor([*DEXT, "serve", "window_post", "-c", str(config)], tmp / "local.log")
    try:
        processor.prove(make_task(store, 0))  # the child's start is not a request's latency
        latencies = []
        for n in range(1, requests + 1):
            paced(poll)
            start, end = processor.prove(make_task(store, n))
            latencies.append(end - start)
        return latencies
    finally:
        processor.close()


def measure_jobs(url: str, tmp: Path, requests: int, store: Path, worker_poll: float,
                 producer_poll: float, tag: str, *, listen: bool = False) -> dict[str, list[float]]:  # fmt: skip
    """Latency and its split (seconds) per request through serve --jobs, a coordinator (its own
    process, or with `listen` serve's --listen) and a `damocles-ext worker`."""
    parts: dict[str, list[float]] = {"total": [], "to_pull": [], "prove": [], "to_answer": []}
    with contextlib.ExitStack() as stack:
        chain = producer_chain(url, tmp, producer_poll, tag, listen=listen)
        processor, port = stack.enter_context(chain)
        worker = WorkerProcess(tmp, port, store, worker_poll)
        stack.callback(worker.close)
        processor.prove(make_task(store, 10_000))  # warm: connections, first imports
        for n in range(1, requests + 1):
            paced(worker_poll)
            wall = time.time()
            start, end = processor.prove(make_task(store, n))
            answered = wall + (end - start)
            pulled, delivered = worker.times_after(wall)
            parts["total"].append(end - start)
            parts["to_pull"].append(pulled - wall)
            parts["prove"].append(delivered - pulled)
            parts["to_answer"].append(answered - delivered)
    return parts


SPLIT = (
    ("to_pull", "request -> worker pulled it (job created, worker's poll)"),
    ("prove", "pulled -> delivered (echo child, finish call)"),
    ("to_answer", "delivered -> answer line (producer's poll, NOTIFY or --listen's wake-up)"),
)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "job_latency")
    parser.add_argument("--requests", type=int, default=10, help="requests per path (default 10)")
    parser.add_argument("--worker-poll", type=float, default=1.0,
                        help="seconds the worker waits after finding no job (default 1)")  # fmt: skip
    parser.add_argument("--producer-poll", type=float, default=3.0,
                        help="serve --jobs --poll-interval, seconds (default 3, damocles')")  # fmt: skip
    parser.add_argument("--engines", default="sqlite,postgresql",
                        help="which of sqlite,postgresql to measure (default both)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.requests < 1 or args.worker_poll <= 0 or args.producer_poll <= 0:
        parser.error("--requests, --worker-poll and --producer-poll must be positive")
    engines = parse_engines(parser, args.engines)
    results: dict = {
        "requests": args.requests,
        "worker_poll_s": args.worker_poll,
        "producer_poll_s": args.producer_poll,
        "sectors": SECTORS,
        "paths": {},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="dext-bench-latency-") as name:
            tmp = Path(name)
            store = tmp / "store-a"
            local = measure_local(tmp, args.requests, store, args.worker_poll)
            results["paths"]["local"] = {"total": spread(local)}
            print(f"local serve: median {statistics.median(local) * 1000:.1f} ms")
            with store_urls(engines, tmp) as urls:
                for engine, new_url in urls.items():
                    if isinstance(new_url, str):
                        results["paths"][engine] = new_url
                        continue
                    # SQLite also as on one machine: the coordinator inside serve (--listen).
                    for listen in (False, True) if engine == "SQLite" else (False,):
                        path = f"{engine}, serve --listen" if listen else engine
                        parts = measure_jobs(new_url(), tmp, args.requests, store,
                                             args.worker_poll, args.producer_poll,
                                             path.replace(" ", ""), listen=listen)  # fmt: skip
                        results["paths"][path] = {k: spread(v) for k, v in parts.items()}
                        total = statistics.median(parts["total"])
                        print(f"jobs on {path}: median {total:.3f} s")
    except BenchFailure as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    report(results)
    finish("job_latency", results, args.save)
    return 0


def report(results: dict) -> None:
    local = results["paths"]["local"]["total"]
    rows = [
        [
            "local serve (echo child)",
            *(f"{local[k] * 1000:.1f} ms" for k in ("min", "median", "max")),
        ]
    ]
    for engine, parts in results["paths"].items():
        if engine == "local" or isinstance(parts, str):
            continue
        total = parts["total"]
        rows.append(
            [f"jobs, {engine}: total", *(f"{total[k]:.3f} s" for k in ("min", "median", "max"))]
        )
        for key, label in SPLIT:
            p = parts[key]
            rows.append([f"  {label}", *(f"{p[k]:.3f} s" for k in ("min", "median", "max"))])
        added = total["median"] - local["median"]
        parts["added_median_s"] = added
        rows.append([f"jobs, {engine}: added over local (medians)", f"{added:.3f} s", "", ""])
    print()
    print(
        f"{results['requests']} requests per path; worker polls every "
        f"{results['worker_poll_s']:g} s, producer every {results['producer_poll_s']:g} s"
    )
    print_table(rows, ["path", "min", "median", "max"])
    for engine, parts in results["paths"].items():
        if isinstance(parts, str):
            print(f"\n{engine}: {parts}")


if __name__ == "__main__":
    sys.exit(main())
