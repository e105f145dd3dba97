"""A dext/1 prover child that misbehaves on demand, for the chaos run (bench/chaos.py).

Run as `python chaos_child.py <stage>` (Bin = python, Args = [this file, stage]). It answers each
Request with the `echo` prover's output after a short random work time, `CHAOS_CAPACITY` at once
(its Hello offers `CHAOS_QUEUE` more, which wait in arrival order), and misbehaves:

* at start, with probability `CHAOS_HANDSHAKE_EXIT`, it exits during its handshake: before
  writing anything, after half a Hello frame, or after a short pause;
* on SIGUSR1 it writes garbage to its stdout (the protocol pipe);
* on SIGUSR2 it spawns a grandchild that sleeps for ten minutes with `CHAOS_MARKER` in its command
  line and environment, in its own process group (like a prover's helper) or, with probability
  `CHAOS_ESCAPE`, in a new session (a helper that daemonizes);
* SIGSTOP/SIGCONT/SIGKILL need no help from it.

Its randomness comes from `CHAOS_SEED` and its pid, so a run is reproducible up to scheduling.
"""

from __future__ import annotations

import heapq
import os
import random
import select
import signal
import subprocess
import sys
import time

from damocles_ext_plugins.testing import echo_output

from damocles_ext.protocol import dext

GARBAGE = (
    b"\xde\xad\xbe\xef chaos: this is not a dext frame",
    b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1",  # a whole frame of msgpack's never-used byte
    b"window_post processor ready\n",  # the other protocol's ready line, mid-stream
)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", nargs="?", default="window_post", help="default window_post")
    stage = parser.parse_args(argv).stage
    env = os.environ
    rng = random.Random(f"{env.get('CHAOS_SEED', '0')}-{os.getpid()}")
    capacity = int(env.get("CHAOS_CAPACITY", "2"))
    queue = int(env.get("CHAOS_QUEUE", "0"))  # offered in the Hello: requests beyond capacity
    work_min = float(env.get("CHAOS_WORK_MIN", "0.002"))
    work_max = float(env.get("CHAOS_WORK_MAX", "0.02"))
    marker = env.get("CHAOS_MARKER", "dext-chaos")
    escape = float(env.get("CHAOS_ESCAPE", "0"))
    out = sys.stdout.buffer

    def write(data: bytes) -> bool:
        try:
            out.write(data)
            out.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    hello = dext.encode(
        dext.Hello(dext.PROTOCOL_VERSION, stage, os.getpid(), "chaos", "1", capacity, queue)
    )
    if rng.random() < float(env.get("CHAOS_HANDSHAKE_EXIT", "0")):
        how = rng.choice(("silent", "half-hello", "pause"))
        print(f"chaos: exiting during the handshake ({how})", file=sys.stderr, flush=True)
        if how == "half-hello":
            write(hello[: len(hello) // 2])
        elif how == "pause":
            time.sleep(rng.uniform(0, 0.2))
        return 1

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    pending_signals: list[int] = []
    signal.signal(signal.SIGUSR1, lambda s, f: pending_signals.append(s))
    signal.signal(signal.SIGUSR2, lambda s, f: pending_signals.append(s))

    if not write(hello):
        return 1
    decoder = dext.FrameDecoder()
    timers: list[tuple[float, int, object]] = []  # (due, id, task)
    cancelled: set[int] = set()
    waiting: list[tuple[int, object]] = []  # beyond capacity, in arrival order
    running = 0
    shutting_down = False
    grandchildren: list[subprocess.Popen] = []
    poller = select.poll()
    poller.register(0, select.POLLIN)
    poller.register(wake_r, select.POLLIN)

    def start(rid: int, task: object) -> None:
        nonlocal running
        running += 1
        heapq.heappush(timers, (time.monotonic() + rng.uniform(work_min, work_max), rid, task))

    while True:
        timeout = None
        if timers:
            timeout = max(0, int((timers[0][0] - time.monotonic()) * 1000) + 1)
        for fd, _ in poller.poll(timeout):
            if fd == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            data = os.read(0, 1 << 16)
            for msg in decoder.receive_data(data):
                if isinstance(msg, dext.Request):
                    if shutting_down:
                        write(dext.encode(dext.Response(msg.id, error="chaos: shutting down")))
                    elif running < capacity:
                        start(msg.id, msg.task)
                    else:
                        waiting.append((msg.id, msg.task))
                elif isinstance(msg, dext.Cancel):
                    # Only what is still here: a Cancel after the answer names nothing.
                    if any(t[1] == msg.id for t in timers) or any(w[0] == msg.id for w in waiting):
                        cancelled.add(msg.id)
                elif isinstance(msg, dext.Shutdown):
                    shutting_down = True
            if not data:
                return 0
        while pending_signals:
            sig = pending_signals.pop()
            if sig == signal.SIGUSR1:
                print("chaos: writing garbage to stdout", file=sys.stderr, flush=True)
                write(rng.choice(GARBAGE))
            else:
                new_session = rng.random() < escape
                grandchildren.append(
                    subprocess.Popen(
                        [sys.executable, "-c", "import sys, time; time.sleep(600)", marker],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        start_new_session=new_session,
                    )
                )
                print(
                    f"chaos: spawned grandchild {grandchildren[-1].pid}"
                    f"{' in a new session' if new_session else ''}",
                    file=sys.stderr,
                    flush=True,
                )
        # A waiting request cancelled is answered at once, before a freed slot could start it.
        for rid, _task in [w for w in waiting if w[0] in cancelled]:
            waiting.remove((rid, _task))
            cancelled.discard(rid)
            write(dext.encode(dext.Response(rid, error="cancelled")))
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, rid, task = heapq.heappop(timers)
            running -= 1
            if rid in cancelled:
                cancelled.discard(rid)
                response = dext.Response(rid, error="cancelled")
            else:
                response = dext.Response(rid, output=echo_output(task))
            if not write(dext.encode(response)):
                return 0
            if waiting:
                start(*waiting.pop(0))
        if shutting_down and not timers and not waiting:
            return 0


if __name__ == "__main__":
    sys.exit(main())
