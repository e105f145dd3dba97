"""The front ends' cost per request: the control socket of `run` and the JSON lines of `serve`,
each against its floor and against the in-process API, all measured in this run.

Run: .venv/bin/python -m bench.bench_frontends [--flood N] [--repeats R] [--quick] [--save]

Every way proves the same trivial request (the `echo` prover, a 1-replica WindowPoSt) with the
same children (2 `echo` children, Concurrent = 1); only the door differs:

* (a) control socket: `damocles-ext run` in its own process, driven through the public client
  (`damocles_ext.client.connect`) from this one:
  - round trip p50, one request at a time;
  - throughput, WINDOW requests in flight (WINDOW tasks, each submitting one after the other).
  Floor: a raw unix-socket msgpack echo, a plain Python server process (length-prefixed frames,
  decoded and encoded again with msgspec) and a plain blocking client, no damocles-ext code:
  its round trip, and its throughput with WINDOW frames written at once and read back.
* (b) `damocles-ext serve window_post` in its own process: a flood of N request lines (default
  100,000) written to its stdin at once, timed until the N-th answer line is read from its
  stdout (every answer is checked: each id once, no error). A fresh process per repeat, flooded
  once both its children are ready. Floor: a raw JSON-lines echo process (plain Python: read
  what stdin has, write each line back) driven the same way.
* (c) the in-process API (`Supervisor.submit` in this process): round trip p50, the same
  throughput with WINDOW in flight, and the same flood of N requests submitted at once: the
  reference both front ends are held to. Its requests carry the deadline `run` and `serve` give
  a request that comes without one (their default --deadline-after, 40 minutes for
  window_post), so every way proves the same request: a deadline costs the supervisor its
  bookkeeping (the deadline's alarm, the doomed-job rule), which is not the door's (13 us a
  round trip in a check side by side on this VM before the scheduler's deadline path was
  trimmed; since, within the drift). The API's round trip with no deadline is shown beside it, not a goal.

Goals (ratios within each repeat; a goal is met only if every repeat met it, bench/runner.py's
rule): the control socket's round trip p50 and its throughput's time per request within 2x the
API's; serve's flood within 2x the API's flood (time per request).

Each figure is measured in each of R repeats and reported as min / median / max over them. Within
a repeat the round trips are taken in TURNS turns, the ways one after the other in each (a
different one first each time), so that a ratio compares ways measured over the same seconds of
this VM, whose wake-up cost drifts within seconds; the throughputs and floods, one after the other.
All R repeats' round trips come first, then the R repeats' throughputs and floods, as in
bench_supervisor: after a flood of 100,000 requests this VM's wake-ups stay slower for a while
(the raw echo's round trip too), and a way that sleeps more often (the socket's, three processes
in turn) slows most. --round-trips-between-floods takes them as this benchmark did until
2026-12-08, each repeat's just before its own floods, so after the previous repeat's.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import trio
from damocles_ext_plugins.testing import echo_output

from bench.runner import (
    bench_parser,
    finish,
    goal_runs,
    mmm,
    print_table,
    rotated,
    share,
    spread,
)
from bench.supervisor_runs import front_end_deadline
from bench.supervisor_runs import small_task as trivial_task
from damocles_ext.config import parse_config
from damocles_ext.protocol import jsonl
from damocles_ext.supervisor.core import Supervisor
from damocles_ext.tasks import WindowPoSt

DEXT = [sys.executable, "-m", "damocles_ext"]
CONFIG = '[[WdPost]]\nPlugin = "echo"\nConcurrent = 1\n' * 2
CHILDREN = 2
WINDOW = 64
GOAL_RATIO = 2.0


# -- the floors: no damocles-ext code in these processes -----------------------------------------

# A unix-socket server answering each length-prefixed msgpack frame with one, one thread per
# connection: what the control socket does, without the supervisor behind it.
MSGPACK_ECHO_SERVER = r"""
import os, socket, struct, sys, threading
import msgspec
enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
def serve(conn):
    buf = b""
    while True:
        data = conn.recv(1 << 18)
        if not data:
            return
        buf += data
        out = []
        while len(buf) >= 4:
            (n,) = struct.unpack_from(">I", buf)
            if len(buf) < 4 + n:
                break
            msg = dec.decode(buf[4:4 + n])
            buf = buf[4 + n:]
            reply = enc.encode({"type": "response", "id": msg["id"], "output": msg["task"]})
            out.append(struct.pack(">I", len(reply)) + reply)
        if out:
            conn.sendall(b"".join(out))
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1]); srv.listen(16)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# Reads what stdin has, writes each whole line back: the JSON-lines floor.
JSONL_ECHO = r"""
import os
buf = b""
while True:
    data = os.read(0, 1 << 18)
    if not data:
        break
    buf += data
    *lines, buf = buf.split(b"\n")
    if lines:
        out = b"".join(line + b"\n" for line in lines)
        view = memoryview(out)
        while view:
            view = view[os.write(1, view):]
"""


class RawMsgpackClient:
    """A plain blocking client of MSGPACK_ECHO_SERVER."""

    def __init__(self, path: Path, task: WindowPoSt) -> None:
        import struct

        self._struct = struct.Struct(">I")
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder()
        self._task = msgspec.to_builtins(task)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(os.fspath(path))
        self._buf = b""
        self._ids = 0

    def _frame(self) -> bytes:
        self._ids += 1
        body = self._enc.encode({"type": "request", "id": self._ids, "task": self._task})
        return self._struct.pack(len(body)) + body

    def _read(self, count: int) -> None:
        while count:
            while len(self._buf) < 4 or len(self._buf) < 4 + self._struct.unpack_from(self._buf)[0]:
                data = self.sock.recv(1 << 18)
                if not data:
                    raise RuntimeError("the msgpack echo server went away")
                self._buf += data
            (n,) = self._struct.unpack_from(self._buf)
            msg = self._dec.decode(self._buf[4 : 4 + n])
            assert msg["type"] == "response", msg
            self._buf = self._buf[4 + n :]
            count -= 1

    def round_trip(self) -> None:
        self.sock.sendall(self._frame())
        self._read(1)

    def window(self, count: int) -> None:
        """`count` requests written at once, then their answers read."""
        self.sock.sendall(b"".join(self._frame() for _ in range(count)))
        self._read(count)


def start_msgpack_echo(path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", MSGPACK_ECHO_SERVER, os.fspath(path)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"listening\n"
    return proc


# -- damocles-ext run and serve as processes -----------------------------------------------------


def _watch_ready(stream, children: int, ready: threading.Event, log: list[str]) -> None:
    seen = 0
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        log.append(line)
        del log[:-50]
        if re.search(r"\(pid \d+\): ready \(", line):
            seen += 1
            if seen >= children:
                ready.set()


def start_logged(argv: list[str], **kwargs) -> tuple[subprocess.Popen[bytes], list[str]]:
    """A damocles-ext process, returned once its CHILDREN children said ready in its log."""
    proc = subprocess.Popen([*argv, "--log-level", "info"], stderr=subprocess.PIPE, **kwargs)
    ready = threading.Event()
    log: list[str] = []
    threading.Thread(
        target=_watch_ready, args=(proc.stderr, CHILDREN, ready, log), daemon=True
    ).start()
    if not ready.wait(60):
        proc.kill()
        raise RuntimeError("no ready children within 60 s:\n" + "\n".join(log))
    return proc, log


def flood_lines(n: int, task: WindowPoSt) -> bytes:
    return b"".join(jsonl.encode_request(i, task) for i in range(1, n + 1))


def peak_rss_mb(pid: int) -> float:
    """The peak resident set of process `pid` so far (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def flood(proc: subprocess.Popen[bytes], data: bytes, n: int, check: bool) -> tuple[float, float]:
    """Write `data` (n request lines) to proc's stdin from a thread, read n answer lines from its
    stdout; seconds from the first write to the last answer, and proc's peak RSS (MiB) then.
    stdin is closed after."""
    assert proc.stdin is not None and proc.stdout is not None
    out_fd = proc.stdout.fileno()
    writer = threading.Thread(target=proc.stdin.write, args=(data,), daemon=True)
    chunks = []
    lines = 0
    t0 = time.perf_counter()
    writer.start()
    while lines < n:
        chunk = os.read(out_fd, 1 << 20)
        if not chunk:
            raise RuntimeError(f"stdout closed after {lines} of {n} answers")
        lines += chunk.count(b"\n")
        chunks.append(chunk)
    elapsed = time.perf_counter() - t0
    rss = peak_rss_mb(proc.pid)
    writer.join()
    proc.stdin.close()
    if check:
        answers = b"".join(chunks).splitlines()
        ids = set()
        for line in answers:
            doc = json.loads(line)
            assert doc.get("err_msg") is None, doc
            ids.add(doc["id"])
        assert ids == set(range(1, n + 1)) and len(answers) == n, "not each id answered once"
    return elapsed, rss


# -- the measures --------------------------------------------------------------------------------


async def _timed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t0)
    return samples


TURNS = 10  # the round trips of a repeat, taken in turns with the ways one after the other


async def interleaved_round_trips(
    ways: dict[str, Callable[[], Awaitable[object]]], n: int, repeat: int
) -> dict[str, float]:
    """{way: p50 seconds} of n sequential calls of each way, taken in TURNS turns with the ways
    one after the other in each (a different one first each time): this VM's wake-up cost
    drifts within seconds, and a ratio of ways measured one after the other in blocks would
    compare a fast spell with a slow one."""
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for turn in range(TURNS):
        for name in rotated(list(ways), repeat * TURNS + turn):  # (each way first in some)
            samples[name] += await _timed(ways[name], share(n, TURNS, turn))
    return {name: statistics.median(got) for name, got in samples.items()}


async def windowed(submit: Callable[[], Awaitable[object]], total: int, window: int) -> float:
    """Requests per second with `window` in flight, `total` in all."""
    per_task = total // window

    async def worker() -> None:
        for _ in range(per_task):
            await submit()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(window):
            nursery.start_soon(worker)
    return per_task * window / (time.perf_counter() - t0)


async def api_flood(sup: Supervisor, task: WindowPoSt, n: int) -> float:
    """Seconds for n requests submitted at once to the in-process API, all answered."""
    expected = echo_output(task)
    wrong = 0

    async def one() -> None:
        nonlocal wrong
        wrong += (await sup.submit(task, deadline=front_end_deadline())) != expected

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    elapsed = time.perf_counter() - t0
    assert not wrong, f"{wrong} wrong answers"
    return elapsed


async def measure(args, tmp: Path) -> dict[str, list[float]]:
    from damocles_ext.client import connect

    task = trivial_task()
    expected = echo_output(task)
    cfg = tmp / "ext-prover.cfg"
    cfg.write_text(CONFIG)
    run_dir = tmp / "run"
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    echo_server = start_msgpack_echo(tmp / "echo.sock")
    run, _ = start_logged([*DEXT, "run", "-c", str(cfg), "--socket", str(run_dir / "control.sock")])
    raw = RawMsgpackClient(tmp / "echo.sock", task)
    lines = flood_lines(args.flood, task)
    sup = Supervisor(parse_config(CONFIG, "<bench>"))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready("window_post", CHILDREN)
            async with connect(run_dir / "control.sock") as client:

                async def via_api() -> None:
                    assert await sup.submit(task, deadline=front_end_deadline()) == expected

                async def via_api_no_deadline() -> None:
                    assert await sup.submit(task) == expected

                async def via_socket() -> None:
                    assert await client.submit(task) == expected

                async def via_raw() -> None:
                    raw.round_trip()  # blocking on purpose: a plain client

                ways = {
                    "api": via_api,
                    "api_no_deadline": via_api_no_deadline,
                    "socket": via_socket,
                    "raw_msgpack": via_raw,
                }
                for fn in ways.values():
                    await _timed(fn, args.latency // 10)  # warm-up

                async def round_trips(r: int) -> None:
                    p50s = await interleaved_round_trips(ways, args.latency, r)
                    for name, p50 in p50s.items():
                        add(f"{name}_round_trip_s", p50)

                between = args.round_trips_between_floods
                for r in range(0 if between else args.repeats):
                    print(f"round trips, repeat {r + 1}/{args.repeats} ...", flush=True)
                    await round_trips(r)
                for r in range(args.repeats):
                    what = (
                        "round trips, throughputs and floods"
                        if between
                        else "throughputs and floods"
                    )
                    print(f"{what}, repeat {r + 1}/{args.repeats} ...", flush=True)
                    if between:
                        await round_trips(r)
                    total = args.window_requests
                    add("api_per_s", await windowed(via_api, total, WINDOW))
                    add("socket_per_s", await windowed(via_socket, total, WINDOW))
                    t0 = time.perf_counter()
                    for _ in range(total // WINDOW):
                        raw.window(WINDOW)
                    add("raw_msgpack_per_s", total // WINDOW * WINDOW / (time.perf_counter() - t0))
                    # The floods: the API's in this process; serve and the raw echo in their own.
                    add("api_flood_s", await api_flood(sup, task, args.flood))
                    check = r == 0
                    seconds, rss = await trio.to_thread.run_sync(
                        serve_flood, cfg, lines, args.flood, check
                    )
                    add("serve_flood_s", seconds)
                    add("serve_peak_rss_mb", rss)
                    seconds, _ = await trio.to_thread.run_sync(
                        raw_jsonl_flood, lines, args.flood, check
                    )
                    add("raw_jsonl_flood_s", seconds)
            sup.request_shutdown()
    finally:
        raw.sock.close()
        echo_server.kill()
        echo_server.wait()
        run.terminate()
        run.wait(60)
    return figures


def serve_flood(cfg: Path, lines: bytes, n: int, check: bool) -> tuple[float, float]:
    proc, log = start_logged(
        [*DEXT, "serve", "window_post", "--conf-dir", str(cfg.parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == jsonl.ready_line("window_post")
    try:
        return flood(proc, lines, n, check)
    finally:
        if proc.wait(60) != 0:
            raise RuntimeError("serve failed:\n" + "\n".join(log))


def raw_jsonl_flood(lines: bytes, n: int, check: bool) -> tuple[float, float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", JSONL_ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        return flood(proc, lines, n, check=False)
    finally:
        proc.wait(60)


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "frontends")
    parser.add_argument(
        "--flood",
        type=int,
        default=100_000,
        metavar="N",
        help="request lines in each flood of serve, the raw echo and the API (default 100000)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, metavar="R", help="repeats of every figure (default 5)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: at most 2 repeats and 2000-request floods, fewer round trips"
        " (--save writes frontends-quick.json)",
    )
    parser.add_argument(
        "--round-trips-between-floods",
        action="store_true",
        help="take each repeat's round trips just before its throughputs and floods, so after"
        " the previous repeat's (as this benchmark did until 2026-12-08); default: every"
        " repeat's round trips first, before any throughput or flood, as bench_supervisor does",
    )
    args = parser.parse_args(argv)
    if args.flood < 1 or args.repeats < 1:
        parser.error("--flood and --repeats must be at least 1")
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.flood = min(args.flood, 2000)
    args.latency = 100 if args.quick else 2000
    args.window_requests = WINDOW * (4 if args.quick else 160)
    import logging

    logging.getLogger("damocles_ext").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="dext-bench-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o700)
        print(
            f"{args.repeats} repeats: {args.latency} round trips, {args.window_requests} requests"
            f" with {WINDOW} in flight, floods of {args.flood} each way",
            flush=True,
        )
        raw = trio.run(measure, args, tmp)

    us = 1e6
    rt = {
        k: spread([v * us for v in raw[f"{k}_round_trip_s"]])
        for k in ("api", "api_no_deadline", "socket", "raw_msgpack")
    }
    rate = {k: spread(raw[f"{k}_per_s"]) for k in ("api", "socket", "raw_msgpack")}
    fl = {k: spread(raw[f"{k}_flood_s"]) for k in ("api", "serve", "raw_jsonl")}
    per_req = {k: spread([v * us / args.flood for v in raw[f"{k}_flood_s"]]) for k in fl}

    # The door's cost per request over the API's, within each repeat (the ways are interleaved
    # in a repeat, so a ratio compares figures of the same stretch of time).
    def per_repeat(num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(raw[num], raw[den], strict=True)]

    ratios = {
        "socket_round_trip_over_api": per_repeat("socket_round_trip_s", "api_round_trip_s"),
        "socket_time_per_request_over_api": per_repeat("api_per_s", "socket_per_s"),
        "serve_flood_over_api": per_repeat("serve_flood_s", "api_flood_s"),
        "socket_round_trip_over_raw_msgpack": per_repeat(
            "socket_round_trip_s", "raw_msgpack_round_trip_s"
        ),
        "serve_flood_over_raw_jsonl": per_repeat("serve_flood_s", "raw_jsonl_flood_s"),
        # Not a goal: against the API given no deadline (what the front ends give is dearer).
        "socket_round_trip_over_api_no_deadline": per_repeat(
            "socket_round_trip_s", "api_no_deadline_round_trip_s"
        ),
    }
    print()
    print_table(
        [
            [
                "round trip p50, 1 in flight (µs)",
                mmm(rt["socket"], "{:.0f}"),
                mmm(rt["api"], "{:.0f}"),
                mmm(rt["raw_msgpack"], "{:.0f}"),
            ],
            [
                f"requests/s, {WINDOW} in flight",
                mmm(rate["socket"], "{:.0f}"),
                mmm(rate["api"], "{:.0f}"),
                mmm(rate["raw_msgpack"], "{:.0f}"),
            ],
        ],
        [
            "control socket (min / median / max)",
            "control socket",
            "in-process API",
            "raw unix-socket msgpack echo",
        ],
    )
    print()
    print_table(
        [
            [
                f"flood of {args.flood}: seconds",
                mmm(fl["serve"], "{:.2f}"),
                mmm(fl["api"], "{:.2f}"),
                mmm(fl["raw_jsonl"], "{:.3f}"),
            ],
            [
                "µs per request",
                mmm(per_req["serve"], "{:.1f}"),
                mmm(per_req["api"], "{:.1f}"),
                mmm(per_req["raw_jsonl"], "{:.2f}"),
            ],
            [
                "requests/s",
                mmm(spread([args.flood / s for s in raw["serve_flood_s"]]), "{:.0f}"),
                mmm(spread([args.flood / s for s in raw["api_flood_s"]]), "{:.0f}"),
                mmm(spread([args.flood / s for s in raw["raw_jsonl_flood_s"]]), "{:.0f}"),
            ],
        ],
        [
            "serve JSON lines (min / median / max)",
            "serve",
            "in-process API",
            "raw JSON-lines echo",
        ],
    )
    print(
        "The API's requests carry the deadline run and serve give one that comes without (40 min"
        " after it arrives), as the front ends' do; given none, its round trip p50 was"
        f" {mmm(rt['api_no_deadline'], '{:.0f}')} µs (min / median / max)"
    )
    rss = spread(raw["serve_peak_rss_mb"])
    print(
        f"serve's peak RSS after a flood of {args.flood}: {mmm(rss, '{:.0f}')} MiB (min / median / max)"
    )
    print()
    print_table(
        [[k, mmm(spread(v), "{:.2f}")] for k, v in ratios.items()],
        ["ratio per repeat", "x (min / median / max)"],
    )
    verdicts = {
        "socket_round_trip_within_2x_api": "socket_round_trip_over_api",
        "socket_throughput_within_2x_api": "socket_time_per_request_over_api",
        "serve_flood_within_2x_api": "serve_flood_over_api",
    }
    goals = {}
    print()
    for goal, ratio in verdicts.items():
        verdict = goal_runs(ratios[ratio], lambda v: v <= GOAL_RATIO, "x")
        goals[goal] = verdict["met"]
        print(f"goal {'met    ' if verdict['met'] else 'NOT met'}  {goal}: {verdict['verdict']}")
    results = {
        "config": {
            "children": CHILDREN,
            "prover": "echo, Concurrent = 1",
            "repeats": args.repeats,
            "round_trips_per_repeat": args.latency,
            "window": WINDOW,
            "window_requests_per_repeat": args.window_requests,
            "flood": args.flood,
            "round_trips": (
                "each repeat's before its throughputs and floods"
                if args.round_trips_between_floods
                else "all repeats' first, before any throughput or flood"
            ),
        },
        "round_trip_p50_us": rt,
        "requests_per_s_window": rate,
        "flood_seconds": fl,
        "flood_us_per_request": per_req,
        "serve_peak_rss_mb": rss,
        "ratios": ratios,
        "goals_met": goals,
        "samples": raw,
    }
    finish("frontends" + ("-quick" if args.quick else ""), results, args.save)


if __name__ == "__main__":
    main()
