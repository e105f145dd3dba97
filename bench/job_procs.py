"""The processes of the worker-prover chain, as the job benchmarks start and drive them.

* `Processor`: a `damocles-ext serve window_post` (local children, or `--jobs URL`) driven as
  damocles-manager drives its ext-prover processor: one JSON line per request on its stdin, the
  answers read from its stdout (by a thread, into a queue, so that an answer that never comes is
  a timeout, not a hang);
* `WorkerProcess`: a `damocles-ext worker` logging JSON, whose `pulled` and `delivered` lines
  are collected with their times (the log's millisecond clock, unix seconds);
* `marking_child`: the config table of a JSON-lines prover child (a real process) that writes
  the time and its pid to a file when a request reaches it, works `seconds`, and answers as the
  `echo` test prover does.

The coordinator is started by bench.bench_jobs.coordinator, the throw-away PostgreSQL by
bench.bench_jobs.postgres_engine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import itertools
import json
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from damocles_ext_plugins.testing import echo_output

from bench.jobs_clients import MINER, PROOF_TYPE, BenchFailure
from damocles_ext.protocol import jsonl
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

DEXT = [sys.executable, "-m", "damocles_ext"]
STORE = "store-a"
TIMEOUT = 120.0  # seconds an answer may take before the run fails
SECTORS = 4
RPC_AT = re.compile(r"serving the worker-prover RPC at http://[^ ]+:(\d+)/rpc/v0")
ECHO_CONFIG = '[[WdPost]]\nPlugin = "echo"\n'


def make_task(store_path: Path, n: int, sectors: int = SECTORS) -> WindowPoSt:
    """A request whose paths follow damocles' layout under the store, new each time (`n`)."""
    replicas = [
        PoStReplicaInfo(
            sector_id=100 + s,
            comm_r=bytes([(n + s) % 256]) * 32,
            cache_dir=f"{store_path}/cache/s-t0{MINER}-{100 + s}",
            sealed_file=f"{store_path}/sealed/s-t0{MINER}-{100 + s}",
        )
        for s in range(sectors)
    ]
    seed = n.to_bytes(4, "big") + bytes(28)
    return WindowPoSt(miner_id=MINER, proof_type=PROOF_TYPE, replicas=replicas, seed=seed)


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def serve_jobs_argv(url: str, store: Path, producer_poll: float, *extra: str) -> list[str]:
    """`serve window_post --jobs URL` with the bench's store and poll interval."""
    return [
        *DEXT, "serve", "window_post", "--jobs", url, "--store", f"{STORE}={store}",
        "--poll-interval", f"{producer_poll:g}s", *extra,
    ]  # fmt: skip


class Processor:
    """A `damocles-ext serve` process driven as damocles-manager drives it."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self.closed = False
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
        )
        assert self.proc.stdout is not None
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        ready = self._line(60)
        if ready != jsonl.ready_line("window_post"):
            self.close()
            raise BenchFailure(
                f"{' '.join(argv[2:])}: no ready line (got {ready!r}):\n{self.tail()}"
            )
        self.next_id = 1

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def _read(self, stdout) -> None:
        for line in stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def _line(self, timeout: float) -> bytes:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchFailure(f"serve answered nothing in {timeout:g} s:\n{self.tail()}") from None

    def rpc_port(self, timeout: float = 30) -> int:
        """The port of the worker-prover RPC a `serve --jobs --listen 127.0.0.1:0` serves, read
        from its log."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = RPC_AT.search(self.log.read_text(errors="replace"))
            if found:
                return int(found.group(1))
            time.sleep(0.01)  # looking again at the log another process writes
        raise BenchFailure(f"serve --listen named no RPC address in {timeout:g} s:\n{self.tail()}")

    def send(self, task: WindowPoSt) -> int:
        """Write one request line; its id."""
        assert self.proc.stdin is not None
        request_id = self.next_id
        self.next_id += 1
        self.proc.stdin.write(jsonl.encode_request(request_id, task))
        self.proc.stdin.flush()
        return request_id

    def receive(self, timeout: float = TIMEOUT) -> jsonl.JsonResponse:
        """The next answer line, decoded; BenchFailure when serve exits or is silent."""
        line = self._line(timeout)
        if not line:
            raise BenchFailure(f"serve exited:\n{self.tail()}")
        return jsonl.decode_response(line, "window_post")

    def prove(self, task: WindowPoSt) -> tuple[float, float]:
        """Write the request and read its answer, checked; (when written, when answered)."""
        start = time.perf_counter()
        request_id = self.send(task)
        response = self.receive()
        end = time.perf_counter()
        check_answer(response, request_id, task)
        return start, end

    def close(self) -> list[bytes]:
        """Close its stdin (serve stops) and wait for it to exit; the lines it wrote that were
        not read (an answer given twice would be one)."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # EOF: serve stops
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        left: list[bytes] = []
        if self.closed:
            return left
        self.closed = True
        with contextlib.suppress(queue.Empty):
            while line := self.lines.get(timeout=5):  # b"": the reader saw the end
                left.append(line)
        return left


def check_answer(response: jsonl.JsonResponse, request_id: int, task: WindowPoSt) -> None:
    """The answer is request_id's, and the echo prover's output for `task`."""
    if response.id != request_id or response.err_msg:
        raise BenchFailure(f"request {request_id} answered {response}")
    if response.output != echo_output(task):
        raise BenchFailure(f"request {request_id}: not the echo prover's answer: {response}")


class WorkerProcess:
    """A `damocles-ext worker` logging JSON; `events` collects each job's `pulled` and
    `delivered` times (unix seconds, the log's millisecond clock) as they come."""

    PULLED = re.compile(r"^job (\S+): pulled ")
    DELIVERED = re.compile(r"^job (\S+): delivered ")

    def __init__(self, tmp: Path, port: int, store: Path, poll: float, *, name: str = "bench-worker",
                 config: str = ECHO_CONFIG, options: tuple[str, ...] = ()) -> None:  # fmt: skip
        path = tmp / f"{name}.cfg"
        path.write_text(config)
        # The store in damocles' layout, empty (the echo children read no file): a worker
        # refuses a job whose sectors' directories are missing (an unmounted store).
        for sub in ("sealed", "cache"):
            (store / sub).mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log: list[str] = []
        self.events: list[tuple[str, str, float]] = []  # (what, job id, when)
        self.changed = threading.Condition()
        self.started = False
        self.exited = False
        self.proc = subprocess.Popen(
            [
                *DEXT, "worker", "--manager", f"127.0.0.1:{port}", "-c", str(path),
                "--attached", f"{STORE}={store}", "--idle-poll", f"{poll:g}s",
                "--name", name, "--log-format", "json", *options,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.wait_for(lambda: self.started or self.exited, 60) or not self.started:
            self.close()
            raise BenchFailure(f"worker {name} did not start:\n" + "".join(self.log[-20:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.changed:
                self.log.append(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                message = record.get("message", "")
                if "pulls WindowPoSt jobs from" in message:
                    self.started = True
                for what, pattern in (("pulled", self.PULLED), ("delivered", self.DELIVERED)):
                    found = pattern.match(message)
                    if found:
                        when = _dt.datetime.fromisoformat(record["time"]).timestamp()
                        self.events.append((what, found.group(1), when))
                self.changed.notify_all()
        with self.changed:
            self.exited = True
            self.changed.notify_all()

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until `condition()` (looked at under the log's lock) holds; whether it does."""
        with self.changed:
            return self.changed.wait_for(condition, timeout)

    def times(self, what: str, job_id: str | None = None) -> list[float]:
        with self.changed:
            return [t for w, j, t in self.events if w == what and job_id in (None, j)]

    def times_after(self, start: float) -> tuple[float, float]:
        """(pulled, delivered) of the one job pulled at or after `start` (less the log's ms)."""
        with self.changed:
            pulled = [(j, t) for w, j, t in self.events if w == "pulled" and t >= start - 0.001]
        if len(pulled) != 1:
            raise BenchFailure(f"expected one job pulled after the request, saw {pulled}")
        job_id, at = pulled[0]
        # The answer may come before the worker logs its delivery (it logs the finish's reply).
        self.wait_for(lambda: bool(self.times("delivered", job_id)), 10)
        delivered = self.times("delivered", job_id)
        if len(delivered) != 1:
            raise BenchFailure(f"job {job_id}: delivered {len(delivered)} times")
        return at, delivered[0]

    def kill(self) -> float:
        """SIGKILL the worker (its children are left as a dead worker leaves them); when."""
        self.proc.kill()
        at = time.time()
        self.proc.wait()
        return at

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)


# A damocles ext-prover child (JSON lines on stdio), as small as one can be: it marks when each
# request reaches it, works, and answers as the echo prover.
_CHILD = """\
import os, sys, time
from damocles_ext.protocol import jsonl
from damocles_ext_plugins.testing import echo_output
marker, seconds = sys.argv[1], float(sys.argv[2])
out = sys.stdout.buffer
out.write(jsonl.ready_line("window_post"))
out.flush()
for line in sys.stdin.buffer:
    request = jsonl.decode_request(line, "window_post")
    with open(marker, "a") as f:
        f.write(f"{time.time()!r} {os.getpid()}\\n")
    time.sleep(seconds)  # the proof's work
    out.write(jsonl.encode_response(request.id, echo_output(request.task)))
    out.flush()
"""


def marking_child(marker: Path, seconds: float) -> str:
    """A [[WdPost]] table: the child above, marking into `marker`, working `seconds` a request."""
    args = ["-c", _CHILD, str(marker), f"{seconds:g}"]
    return f"[[WdPost]]\nBin = {json.dumps(sys.executable)}\nArgs = {json.dumps(args)}\n"


def marks(marker: Path) -> list[tuple[float, int]]:
    """(when, pid) of each request that reached a marking child, in order."""
    if not marker.exists():
        return []
    found = []
    for line in marker.read_text().splitlines():
        when, pid = line.split()
        found.append((float(when), int(pid)))
    return found


ENGINES = ("sqlite", "postgresql")


def parse_engines(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """--engines: a comma-separated part of ENGINES (a usage error, exit 2, otherwise)."""
    engines = [e.strip().lower() for e in text.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        parser.error(f"--engines: choose from {', '.join(ENGINES)}, got {text!r}")
    return engines


@contextlib.contextmanager
def store_urls(engines: list[str], tmp: Path) -> Iterator[dict[str, Callable[[], str] | str]]:
    """For each engine asked for, by its name (SQLite, PostgreSQL): a maker of fresh, empty job
    store URLs, or why the engine is skipped. PostgreSQL is a throw-away server, stopped after."""
    from bench.bench_jobs import postgres_engine

    count = itertools.count(1)
    found: dict[str, Callable[[], str] | str] = {}
    with contextlib.ExitStack() as stack:
        if "sqlite" in engines:
            found["SQLite"] = lambda: f"sqlite:///{tmp}/jobs-{next(count)}.db"
        if "postgresql" in engines:
            pg = stack.enter_context(postgres_engine())
            found["PostgreSQL"] = pg if isinstance(pg, str) else (lambda: pg.new()[0])
        yield found


@contextlib.contextmanager
def producer_chain(url: str, tmp: Path, producer_poll: float, tag: str, *, listen: bool = False,
                   options: tuple[str, ...] = ()) -> Iterator[tuple[Processor, int]]:  # fmt: skip
    """`serve window_post --jobs URL` and the coordinator its workers call: a process of its own,
    or with `listen` serve's own (`--listen`); (the serve, the port of the workers' RPC).
    `options` go to both (e.g. --conf-dir). Both are stopped after."""
    from bench.bench_jobs import coordinator

    store = tmp / STORE
    with contextlib.ExitStack() as stack:
        port = None
        if not listen:
            port = stack.enter_context(coordinator(url, "--store", f"{STORE}={store}", *options))
        extra = ("--listen", "127.0.0.1:0") if listen else ()
        processor = Processor(
            serve_jobs_argv(url, store, producer_poll, *options, *extra), tmp / f"serve-{tag}.log"
        )
        stack.callback(processor.close)
        yield processor, processor.rpc_port() if port is None else port
