"""Floors and peers for the supervisor benchmark: code that is not ours, measured in the same run.

* The floor: a minimal msgspec child (`FLOOR_CHILD`, a few lines of Python: read a
  length-prefixed msgpack frame from stdin, decode it, answer with the request's id and the
  `echo` prover's proof: SHA-256 of the seed, the miner id and the sector ids) driven over a blocking pipe by a plain Python
  parent (`PipeFloor`) that encodes each request and decodes each answer with msgspec. Nothing of
  damocles-ext runs in the loop: the frames are the same bytes our children get.
* The C-to-C pipe: a tiny C parent and child (one program, forked) moving frames of the same
  sizes; compiled at run time with the system `cc` (`CPipe`), not measured without one.
* The peers: `concurrent.futures.ProcessPoolExecutor`, `multiprocessing.Pool` and loky's
  reusable executor (not measured if loky is not installed: `pip install -e '.[test]'`), each
  calling the same trivial function, the `echo` prover's (`echo_in_worker`).
* Labelled as what it is, not a floor: our own child runtime (`damocles-ext child`) driven by the
  same blocking parent (`OwnChildBlocking`): the child's share without the supervisor; and the
  floor child speaking dext behind our supervisor (`floor_child_config`): the supervisor's share
  without our child runtime; and the floor with its parent polling the pipe for the answer before
  it blocks, as our API's caller does (`PipeFloorPolling`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import json
import multiprocessing
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import msgspec
import psutil
import trio
from damocles_ext_plugins.testing import echo_output

from damocles_ext.config import parse_config
from damocles_ext.protocol import dext
from damocles_ext.tasks import Output, Task

FLOOR_CHILD = """\
import hashlib, os, msgspec
decode, encode = msgspec.msgpack.Decoder().decode, msgspec.msgpack.Encoder().encode
def read(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    return buf
while True:
    msg = decode(read(int.from_bytes(read(4), "big")))
    task = msg["task"]
    h = hashlib.sha256(task["seed"] + task["miner_id"].to_bytes(8, "little"))
    for replica in task["replicas"]:
        h.update(replica[0].to_bytes(8, "little"))
    out = encode({"type": "response", "id": msg["id"], "output": {"proofs": [h.digest()], "faults": []}})
    os.write(1, len(out).to_bytes(4, "big") + out)
"""


def _floor_speaking_dext() -> str:
    """FLOOR_CHILD as a dext child a supervisor can run (a `Bin` child): its hello first, an
    output tagged with its stage, a Shutdown ends it and any other frame from the parent is
    left unanswered; each request served with the floor's very lines."""
    steps = (
        (
            "def read(n):\n",
            (
                "def write(fd, obj):\n"
                "    out = encode(obj)\n"
                '    os.write(fd, len(out).to_bytes(4, "big") + out)\n'
                "def read(n):\n"
            ),
        ),
        (
            "while True:\n",
            (
                'write(1, {"type": "hello", "protocol": dext_version, "stage": "window_post",'
                ' "pid": os.getpid(), "prover": "floor", "version": "1"})\nwhile True:\n'
            ),
        ),
        (
            '    task = msg["task"]\n',
            (
                '    if msg["type"] != "request":\n'
                '        if msg["type"] == "shutdown":\n'
                "            raise SystemExit(0)\n"
                "        continue\n"
                '    task = msg["task"]\n'
            ),
        ),
        ('"output": {"proofs"', '"output": {"stage": "window_post", "proofs"'),
    )
    text = FLOOR_CHILD
    for old, new in steps:
        if text.count(old) != 1:
            raise RuntimeError(f"FLOOR_CHILD changed: {old!r} is not in it once")
        text = text.replace(old, new)
    return f"dext_version = {dext.PROTOCOL_VERSION!r}\n" + text


def floor_child_config(tmp: Path, count: int = 1) -> str:
    """The config of `count` WindowPoSt children running the floor child as a dext `Bin` child
    (its program written under `tmp`): our supervisor with the floor's child behind it, what of
    a round trip is the supervisor's. Not a floor: the supervisor is our code."""
    program = tmp / "floor_child.py"
    program.write_text(_floor_speaking_dext())

    def quoted(text: str) -> str:  # a TOML basic string, as JSON writes one (not in \u pairs)
        return json.dumps(text, ensure_ascii=False)

    block = f"[[WdPost]]\nBin = {quoted(sys.executable)}\nArgs = [{quoted(str(program))}]\n"
    return (block + 'Protocol = "dext"\n') * count


_libc = ctypes.CDLL(None, use_errno=True)


def cpu_seconds(pid: int) -> float:
    """CPU seconds another process has used so far, all its threads (dead ones too).

    Read from its CPU-time clock (clock_getcpuclockid), exact to the nanosecond; psutil's
    user + system times, in clock ticks (10 ms), where that clock cannot be had."""
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
        with contextlib.suppress(OSError):
            return time.clock_gettime(clock.value)
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _read_exactly(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise RuntimeError("the child closed its stdout")
        buf += chunk
    return buf


class PipeFloor:
    """The minimal msgspec child, driven by a blocking Python parent: one request at a time."""

    label = "msgspec child, blocking Python parent (floor)"
    spin = 0.0  # the floor blocks at once (PipeFloorPolling: polls first)

    def __init__(self, task: Task) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FLOOR_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        # The request as plain msgpack data: the very payload a dext child gets for `task`.
        self.request = msgspec.msgpack.decode(dext.encode(dext.Request(0, task))[4:])
        self.encode = msgspec.msgpack.Encoder().encode
        self.decode = msgspec.msgpack.Decoder().decode
        self.ids = 0
        self.win = self.proc.stdin.fileno()
        self.rout = self.proc.stdout.fileno()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def prove(self, task: Task | None = None) -> bytes:
        """One round trip (the task is always the one given at start); returns the proof."""
        self.ids += 1
        self.request["id"] = self.ids
        payload = self.encode(self.request)
        os.write(self.win, len(payload).to_bytes(4, "big") + payload)
        if self.spin:
            self._poll()
        answer = self.decode(_read_exactly(self.rout, int.from_bytes(_read_exactly(self.rout, 4))))
        if answer["id"] != self.ids:
            raise RuntimeError(f"floor child answered {answer['id']} to request {self.ids}")
        return answer["output"]["proofs"][0]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


class PipeFloorPolling(PipeFloor):
    """The floor with the poll our API's caller makes (supervisor/pipe_turns.py): after its
    write the parent looks at the pipe without blocking for up to `spin` seconds, then reads it
    as the floor does."""

    label = "msgspec child, Python parent polling like ours (not the floor)"

    def __init__(self, task: Task, spin: float) -> None:
        super().__init__(task)
        self.spin = spin
        self.poller = select.poll()
        self.poller.register(self.rout, select.POLLIN)

    def _poll(self) -> None:
        """Until the answer is there or `spin` is up, look without blocking (the read blocks)."""
        until = time.perf_counter() + self.spin
        while not self.poller.poll(0) and time.perf_counter() < until:
            pass


class OwnChildBlocking:
    """Our child runtime (`damocles-ext child`, the echo prover) driven by the same kind of blocking
    parent: not a floor, what our child costs without the supervisor."""

    label = "our child runtime, blocking Python parent"

    def __init__(self, config_text: str) -> None:
        (spec,) = parse_config(config_text, "<bench>").children
        self.proc = subprocess.Popen(
            spec.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **spec.envs},
        )
        self.decoder = dext.FrameDecoder()
        self.pending: list = []
        self.ids = 0
        if not isinstance(self._next_message(), dext.Hello):
            raise dext.ProtocolError("our child did not say hello first")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _next_message(self) -> dext.Message:
        while not self.pending:
            data = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not data:
                raise RuntimeError("our child exited")
            self.pending.extend(self.decoder.receive_data(data))
        return self.pending.pop(0)

    def prove(self, task: Task) -> Output:
        self.ids += 1
        frame = memoryview(dext.encode(dext.Request(self.ids, task)))
        while frame:
            frame = frame[os.write(self.proc.stdin.fileno(), frame) :]
        msg = self._next_message()
        while not isinstance(msg, dext.Response):
            msg = self._next_message()
        if msg.output is None:
            raise RuntimeError(f"our child answered an error: {msg.error}")
        return msg.output

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


class TrioDispatcher:
    """Not a floor, a reference: the least a trio parent does to serve callers from child pipes.

    The floor children (`PipeFloor`'s program, one request at a time each), one reader task per
    child pipe, a FIFO of waiting requests and a `trio.Event` per request: what any trio
    supervisor must do per request (a caller task parked and woken, a reader task woken by the
    pipe, a write and a read), with no request book, no scheduler, no retries, timeouts or
    deadlines. It shows what trio itself costs here, beside what our supervisor adds to it.
    Run it inside `open()`'s context (its reader tasks run in the given nursery).
    """

    label = "trio dispatcher, no book (reference: what trio itself costs; not a floor)"

    def __init__(self, task: Task, children: int) -> None:
        self.floors = [PipeFloor(task) for _ in range(children)]
        for floor in self.floors:
            os.set_blocking(floor.rout, False)
        self.request = self.floors[0].request
        self.encode, self.decode = self.floors[0].encode, self.floors[0].decode
        self.idle = list(range(children))
        self.queue: collections.deque[int] = collections.deque()
        self.waiting: dict[int, list] = {}
        self.ids = itertools.count(1)

    @property
    def pids(self) -> list[int]:
        return [f.pid for f in self.floors]

    def start(self, nursery: trio.Nursery) -> None:
        for k in range(len(self.floors)):
            nursery.start_soon(self._reader, k)

    def _send(self, k: int, rid: int) -> None:
        self.request["id"] = rid
        payload = self.encode(self.request)
        os.write(self.floors[k].win, len(payload).to_bytes(4, "big") + payload)

    async def _reader(self, k: int) -> None:
        fd, buf = self.floors[k].rout, b""
        while True:
            await trio.lowlevel.wait_readable(fd)
            buf += os.read(fd, 1 << 16)
            while len(buf) >= 4 and len(buf) >= 4 + (n := int.from_bytes(buf[:4], "big")):
                answer, buf = self.decode(buf[4 : 4 + n]), buf[4 + n :]
                slot = self.waiting.pop(answer["id"])
                slot[1] = answer["output"]["proofs"][0]
                slot[0].set()
                if self.queue:
                    self._send(k, self.queue.popleft())
                else:
                    self.idle.append(k)

    async def prove(self) -> bytes:
        """One request: to an idle child, else queued; returns the proof."""
        rid = next(self.ids)
        slot: list = [trio.Event(), None]
        self.waiting[rid] = slot
        if self.idle:
            self._send(self.idle.pop(), rid)
        else:
            self.queue.append(rid)
        await slot[0].wait()
        return slot[1]

    def close(self) -> None:
        for floor in self.floors:
            floor.close()


class TrioDirect:
    """Not a floor, a reference: the least any trio parent can do for one request at a time.

    The floor child (`PipeFloor`'s program) behind a caller that writes its request and then
    waits on the child's pipe itself (`trio.lowlevel.wait_readable`), reads and decodes the
    answer: no reader task, no hand-over to the caller, nothing watching the pipe between
    requests (a child that dies while idle is noticed at the next request only, which no
    supervisor may accept). What is left of the round trip is trio's own: a pass of its run
    loop (an epoll_wait) and the wake-up of a parked task. One caller at a time.
    """

    label = "trio, the caller waits on the pipe itself (reference: trio's least; not a floor)"

    def __init__(self, task: Task) -> None:
        self.floor = PipeFloor(task)
        os.set_blocking(self.floor.rout, False)
        self.buf = b""

    @property
    def pids(self) -> list[int]:
        return [self.floor.pid]

    async def prove(self) -> bytes:
        """One round trip; returns the proof."""
        floor = self.floor
        floor.ids += 1
        floor.request["id"] = floor.ids
        payload = floor.encode(floor.request)
        os.write(floor.win, len(payload).to_bytes(4, "big") + payload)
        buf = self.buf
        while len(buf) < 4 or len(buf) < 4 + (n := int.from_bytes(buf[:4], "big")):
            await trio.lowlevel.wait_readable(floor.rout)
            data = os.read(floor.rout, 1 << 16)
            if not data:
                raise RuntimeError("the floor child closed its stdout")
            buf += data
        answer, self.buf = floor.decode(buf[4 : 4 + n]), buf[4 + n :]
        if answer["id"] != floor.ids:
            raise RuntimeError(f"floor child answered {answer['id']} to request {floor.ids}")
        return answer["output"]["proofs"][0]

    def close(self) -> None:
        self.floor.close()


# -- C to C --------------------------------------------------------------------------------------

C_PIPE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/wait.h>

static int rd(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) { ssize_t r = read(fd, buf + got, n - got); if (r <= 0) return -1; got += r; }
    return 0;
}
static int wr(int fd, const char *buf, size_t n) {
    size_t put = 0;
    while (put < n) { ssize_t w = write(fd, buf + put, n - put); if (w <= 0) return -1; put += w; }
    return 0;
}
static int cmp(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b; return (x > y) - (x < y);
}
static double cpu(int who) {
    struct rusage u; getrusage(who, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}
int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s N REQUEST_BYTES ANSWER_BYTES\n", argv[0]); return 2; }
    long n = atol(argv[1]); size_t req = atol(argv[2]), ans = atol(argv[3]);
    int down[2], up[2];
    if (pipe(down) || pipe(up)) { perror("pipe"); return 1; }
    char *buf = calloc(1, req > ans ? req : ans);
    long long *ns = calloc(n, sizeof *ns);
    pid_t pid = fork();
    if (pid == 0) {  /* the child: read a frame, answer it */
        close(down[1]); close(up[0]);
        unsigned char head[4];
        while (rd(down[0], (char *)head, 4) == 0) {
            size_t len = (size_t)head[0] << 24 | head[1] << 16 | head[2] << 8 | head[3];
            if (rd(down[0], buf, len)) break;
            buf[0] = (char)(ans - 4 >> 24); buf[1] = (char)(ans - 4 >> 16);
            buf[2] = (char)(ans - 4 >> 8); buf[3] = (char)(ans - 4);
            if (wr(up[1], buf, ans)) break;
        }
        _exit(0);
    }
    close(down[0]); close(up[1]);
    memset(buf, 0, req);
    buf[0] = (char)(req - 4 >> 24); buf[1] = (char)(req - 4 >> 16);
    buf[2] = (char)(req - 4 >> 8); buf[3] = (char)(req - 4);
    double cpu0 = cpu(RUSAGE_SELF);
    for (long i = 0; i < n; i++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        if (wr(down[1], buf, req) || rd(up[0], buf, 4) || rd(up[0], buf + 4, ans - 4)) return 1;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ns[i] = (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
        buf[0] = (char)(req - 4 >> 24); buf[1] = (char)(req - 4 >> 16);
        buf[2] = (char)(req - 4 >> 8); buf[3] = (char)(req - 4);
    }
    double parent = cpu(RUSAGE_SELF) - cpu0;
    close(down[1]);
    waitpid(pid, NULL, 0);
    qsort(ns, n, sizeof *ns, cmp);
    printf("%lld %lld %.9f %.9f\n", ns[n / 2], ns[n * 99 / 100], parent / n, cpu(RUSAGE_CHILDREN) / n);
    return 0;
}
"""


class CPipe:
    """The C parent and child, compiled once into a temporary directory; None without a compiler."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    @classmethod
    def build(cls, workdir: Path) -> CPipe | str:
        """The compiled program, or why there is none (the reason is printed, not raised)."""
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            return "not measured: no C compiler (cc) on PATH; install one (e.g. gcc) to measure it"
        source = workdir / "pipe.c"
        source.write_text(C_PIPE)
        binary = workdir / "pipe"
        done = subprocess.run(
            [cc, "-O2", "-o", str(binary), str(source)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            return f"not measured: {cc} failed to compile the C pipe: {done.stderr.strip()[:300]}"
        return cls(binary)

    def run(self, n: int, request_bytes: int, answer_bytes: int) -> dict:
        """n round trips of frames of these sizes: p50/p99 and CPU per request, in seconds."""
        out = subprocess.run(
            [str(self.binary), str(n), str(request_bytes), str(answer_bytes)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.split()
        p50, p99, parent, child = int(out[0]), int(out[1]), float(out[2]), float(out[3])
        return {
            "p50_s": p50 / 1e9,
            "p99_s": p99 / 1e9,
            "parent_cpu_s": parent,
            "child_cpu_s": child,
        }


# -- peers: process pools ------------------------------------------------------------------------


def echo_in_worker(task: Task) -> Output:
    """The trivial function every pool runs: the `echo` prover's answer."""
    return echo_output(task)


class Peer:
    """One process pool behind one interface: a round trip, and a flood with a bounded window."""

    def __init__(self, name: str, workers: int, submit: Callable, close: Callable) -> None:
        self.name = name
        self.workers = workers
        self._submit = submit  # (task, on_done(result), on_error(exc)) -> None
        self._close = close

    def round_trip(self, task: Task) -> Output:
        done = threading.Event()
        box: list = []
        self._submit(
            task, lambda r: (box.append(r), done.set()), lambda e: (box.append(e), done.set())
        )
        if not done.wait(60):
            raise RuntimeError(f"{self.name}: no answer within 60 s")
        (result,) = box
        if isinstance(result, BaseException):
            raise result
        return result

    def flood(self, tasks: Sequence[Task], in_flight: int) -> list:
        """Every task, at most `in_flight` submitted and not answered at any time; the outputs."""
        window = threading.Semaphore(in_flight)
        outputs: list = [None] * len(tasks)
        errors: list[BaseException] = []
        for i, task in enumerate(tasks):
            window.acquire()

            def on_done(result, i=i) -> None:
                outputs[i] = result
                window.release()

            def on_error(exc, i=i) -> None:
                errors.append(exc)
                window.release()

            self._submit(task, on_done, on_error)
        for _ in range(in_flight):
            window.acquire()
        if errors:
            raise errors[0]
        return outputs

    def close(self) -> None:
        self._close()


def _executor_peer(name: str, executor, workers: int) -> Peer:
    def submit(task, on_done, on_error) -> None:
        future = executor.submit(echo_in_worker, task)

        def done(f) -> None:
            exc = f.exception()
            if exc is None:
                on_done(f.result())
            else:
                on_error(exc)

        future.add_done_callback(done)

    return Peer(name, workers, submit, lambda: executor.shutdown(wait=True))


def _pool_peer(workers: int) -> Peer:
    pool = multiprocessing.get_context("fork").Pool(workers)

    def submit(task, on_done, on_error) -> None:
        pool.apply_async(echo_in_worker, (task,), callback=on_done, error_callback=on_error)

    def close() -> None:
        pool.close()
        pool.join()

    return Peer("multiprocessing.Pool", workers, submit, close)


def make_peers(workers: int, task: Task) -> tuple[list[Peer], dict[str, str]]:
    """The pools with `workers` processes each, started and warmed up; and those not measured,
    with why. Start them before any supervisor pipe exists: a worker forked later would hold
    copies of the supervisor's pipe ends, and its children would not see their stdin close."""
    peers = [
        _executor_peer(
            "ProcessPoolExecutor",
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")),
            workers,
        ),
        _pool_peer(workers),
    ]
    missing: dict[str, str] = {}
    try:
        from loky import get_reusable_executor
    except ImportError:
        missing["loky"] = (
            "not measured: loky is not installed (pip install -e '.[test]' installs it)"
        )
    else:
        peers.append(_executor_peer("loky", get_reusable_executor(max_workers=workers), workers))
    for peer in peers:
        # Every worker started and the function imported in each before anything is timed.
        peer.flood([task] * (20 * workers), in_flight=2 * workers)
    return peers, missing


@contextlib.contextmanager
def c_pipe() -> CPipe | str:
    """The C-to-C pipe program for the duration, or why it is not measured."""
    with tempfile.TemporaryDirectory(prefix="dext-bench-c-") as d:
        yield CPipe.build(Path(d))
