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

on SQLite (the producer polls the store every --producer-poll seconds) and on PostgreSQL (the
tests' throw-away server; the producer is woken by NOTIFY, its polling only a fallback). Before
each request the benchmark waits a random part of the worker's poll interval, so requests do not
fall at one phase of the polling loops.

The jobs path is split by the worker's log (JSON, millisecond times): from the request to the
worker pulling the job (the producer creating it, then the worker's poll), from pulled to
delivered (the echo child's proof and the finish call), and from delivered to the answer line
(the producer noticing: its poll or the NOTIFY, then answering).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from damocles_ext_plugins.testing import echo_output

from bench.bench_jobs import coordinator, postgres_engine
from bench.jobs_clients import MINER, PROOF_TYPE, BenchFailure
from bench.runner import bench_parser, finish, print_table
from damocles_ext.protocol import jsonl
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

DEXT = [sys.executable, "-m", "damocles_ext"]
STORE = "store-a"
TIMEOUT = 120.0  # seconds an answer may take before the run fails
SECTORS = 4


def make_task(store_path: Path, n: int) -> WindowPoSt:
    """A request whose paths follow damocles' layout under the store, new each time (`n`)."""
    replicas = [
        PoStReplicaInfo(
            sector_id=100 + s,
            comm_r=bytes([(n + s) % 256]) * 32,
            cache_dir=f"{store_path}/cache/s-t0{MINER}-{100 + s}",
            sealed_file=f"{store_path}/sealed/s-t0{MINER}-{100 + s}",
        )
        for s in range(SECTORS)
    ]
    seed = n.to_bytes(4, "big") + bytes(28)
    return WindowPoSt(miner_id=MINER, proof_type=PROOF_TYPE, replicas=replicas, seed=seed)


class Processor:
    """A `damocles-ext serve` process driven as damocles-manager drives it, one request at a time."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
        )
        assert self.proc.stdout is not None
        # Lines come through a queue, so that an answer that never comes is a timeout, not a hang.
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        ready = self._line(60)
        if ready != jsonl.ready_line("window_post"):
            self.close()
            raise BenchFailure(
                f"{' '.join(argv[2:])}: no ready line (got {ready!r}):\n{log.read_text()[-2000:]}"
            )
        self.next_id = 1

    def _read(self, stdout) -> None:
        for line in stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def _line(self, timeout: float) -> bytes:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchFailure(
                f"serve answered nothing in {timeout:g} s:\n{self.log.read_text()[-2000:]}"
            ) from None

    def prove(self, task: WindowPoSt) -> tuple[float, float]:
        """Write the request and read its answer; (when written, when answered)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request_id = self.next_id
        self.next_id += 1
        start = time.perf_counter()
        self.proc.stdin.write(jsonl.encode_request(request_id, task))
        self.proc.stdin.flush()
        line = self._line(TIMEOUT)
        end = time.perf_counter()
        if not line:
            raise BenchFailure(f"serve exited:\n{self.log.read_text()[-2000:]}")
        response = jsonl.decode_response(line, "window_post")
        if response.id != request_id or response.err_msg:
            raise BenchFailure(f"request {request_id} answered {line[:300]!r}")
        if response.output != echo_output(task):
            raise BenchFailure(
                f"request {request_id}: not the echo prover's answer: {line[:300]!r}"
            )
        return start, end

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # EOF: serve stops
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class WorkerProcess:
    """A `damocles-ext worker` with one `echo` child, logging JSON; `events` collects each job's
    `pulled` and `delivered` times (unix seconds, the log's millisecond clock) as they come."""

    PULLED = re.compile(r"^job (\S+): pulled ")
    DELIVERED = re.compile(r"^job (\S+): delivered ")

    def __init__(self, tmp: Path, port: int, store: Path, poll: float) -> None:
        config = tmp / "worker.cfg"
        config.write_text('[[WdPost]]\nPlugin = "echo"\n')
        self.log: list[str] = []
        self.events: list[tuple[str, str, float]] = []  # (what, job id, when)
        self.ready = threading.Event()
        self.started = False
        self.proc = subprocess.Popen(
            [
                *DEXT,
                "worker",
                "--manager",
                f"127.0.0.1:{port}",
                "-c",
                str(config),
                "--attached",
                f"{STORE}={store}",
                "--idle-poll",
                f"{poll:g}s",
                "--name",
                "bench-worker",
                "--log-format",
                "json",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(60) or not self.started:
            self.close()
            raise BenchFailure("the worker did not start:\n" + "".join(self.log[-20:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            message = record.get("message", "")
            if "pulls WindowPoSt jobs from" in message:
                self.started = True
                self.ready.set()
            for what, pattern in (("pulled", self.PULLED), ("delivered", self.DELIVERED)):
                found = pattern.match(message)
                if found:
                    when = _dt.datetime.fromisoformat(record["time"]).timestamp()
                    self.events.append((what, found.group(1), when))
        self.ready.set()  # exited: the waiter sees the log

    def times_after(self, start: float) -> tuple[float, float]:
        """(pulled, delivered) of the one job pulled at or after `start` (less the log's ms)."""
        pulled = [(j, t) for w, j, t in self.events if w == "pulled" and t >= start - 0.001]
        if len(pulled) != 1:
            raise BenchFailure(f"expected one job pulled after the request, saw {pulled}")
        job_id, at = pulled[0]
        delivered = [t for w, j, t in self.events if w == "delivered" and j == job_id]
        if len(delivered) != 1:
            raise BenchFailure(f"job {job_id}: delivered {len(delivered)} times")
        return at, delivered[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def paced(poll: float) -> None:
    """Wait a random part of the worker's poll interval: pacing, so requests do not all fall at
    one phase of the polling loops (nothing waits on this for an event)."""
    time.sleep(random.uniform(0, poll))


def measure_local(tmp: Path, requests: int, store: Path, poll: float) -> list[float]:
    config = tmp / "local.cfg"
    config.write_text('[[WdPost]]\nPlugin = "echo"\n')
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
                 producer_poll: float, tag: str) -> dict[str, list[float]]:  # fmt: skip
    """Latency and its split (seconds) per request through serve --jobs, a coordinator and a
    `damocles-ext worker`."""
    parts: dict[str, list[float]] = {"total": [], "to_pull": [], "prove": [], "to_answer": []}
    with coordinator(url, "--store", f"{STORE}={store}") as port:
        worker = WorkerProcess(tmp, port, store, worker_poll)
        processor = None
        try:
            processor = Processor(
                [
                    *DEXT,
                    "serve",
                    "window_post",
                    "--jobs",
                    url,
                    "--store",
                    f"{STORE}={store}",
                    "--poll-interval",
                    f"{producer_poll:g}s",
                ],
                tmp / f"serve-{tag}.log",
            )
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
        finally:
            if processor is not None:
                processor.close()
            worker.close()
    return parts


SPLIT = (
    ("to_pull", "request -> worker pulled it (job created, worker's poll)"),
    ("prove", "pulled -> delivered (echo child, finish call)"),
    ("to_answer", "delivered -> answer line (producer's poll or NOTIFY)"),
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
    engines = [e.strip().lower() for e in args.engines.split(",")]
    if set(engines) - {"sqlite", "postgresql"}:
        parser.error(f"--engines: choose from sqlite, postgresql, got {args.engines!r}")
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
            if "sqlite" in engines:
                parts = measure_jobs(f"sqlite:///{tmp}/jobs.db", tmp, args.requests, store,
                                     args.worker_poll, args.producer_poll, "sqlite")  # fmt: skip
                results["paths"]["SQLite"] = {k: spread(v) for k, v in parts.items()}
                print(f"jobs on SQLite: median {statistics.median(parts['total']):.3f} s")
            if "postgresql" in engines:
                with postgres_engine() as pg:
                    if isinstance(pg, str):
                        results["paths"]["PostgreSQL"] = pg
                    else:
                        url, _ = pg.new()
                        parts = measure_jobs(url, tmp, args.requests, store, args.worker_poll,
                                             args.producer_poll, "postgresql")  # fmt: skip
                        results["paths"]["PostgreSQL"] = {k: spread(v) for k, v in parts.items()}
                        print(
                            f"jobs on PostgreSQL: median {statistics.median(parts['total']):.3f} s"
                        )
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
