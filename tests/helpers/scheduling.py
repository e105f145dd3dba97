"""Real children whose requests end when the test says, and an observer that records what the
supervisor started: the scheduling tests (test_scheduling_real, test_split) read the supervisor's
decisions from these, with no sleeps and no polling."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
import trio.testing

from damocles_ext.config import ChildSpec
from damocles_ext.hookspecs import hookimpl

from .supervisor import python_child, spec

GATED_CHILD = """
import os, sys
from damocles_ext.protocol import dext
from damocles_ext.tasks import WindowPoStOutput, WindowPoStSnarkOutput, WinningPoStOutput

stage, name, gate_path, log_path = sys.argv[1:5]
gate = os.open(gate_path, os.O_RDWR)  # read-write: opening never blocks, reads never see EOF
log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
out = sys.stdout.buffer

def send(msg):
    out.write(dext.encode(msg))
    out.flush()

send(dext.Hello("dext/1", stage, os.getpid(), "gated", "1", 1))
decoder = dext.FrameDecoder()
while data := os.read(0, 65536):
    for msg in decoder.receive_data(data):
        if isinstance(msg, dext.Request):
            os.write(log, f"start {name} {msg.task.miner_id}\\n".encode())
            os.read(gate, 1)
            os.write(log, f"end {name} {msg.task.miner_id}\\n".encode())
            if stage == "window_post":
                output = WindowPoStOutput(proofs=[b"ok"], faults=[])
            elif stage == "window_post_snark":  # a split WindowPoSt's SNARK step (test_split)
                output = WindowPoStSnarkOutput(proofs=[b"ok"])
            else:
                output = WinningPoStOutput(proofs=[b"ok"])
            send(dext.Response(msg.id, output=output))
        elif isinstance(msg, dext.Shutdown):
            sys.exit(0)
"""


class Recorder:
    """Observer plugin: every request start and finish, in the supervisor's order."""

    def __init__(self) -> None:
        self.send, self.events = trio.open_memory_channel[tuple](100)
        self.log: list[tuple] = []

    # async def: a plain observer runs in a worker thread, where a trio channel must not be used
    @hookimpl
    async def dext_request_started(self, request) -> None:
        event = ("started", request.id, request.child)
        self.log.append(event)
        self.send.send_nowait(event)

    @hookimpl
    async def dext_request_finished(self, request, outcome, duration) -> None:
        event = ("finished", request.id, outcome)
        self.log.append(event)
        self.send.send_nowait(event)

    async def next(self, kind: str) -> tuple:
        """The next event of this kind (events of the other kind are kept in `log` only)."""
        with trio.fail_after(10):
            while True:
                event = await self.events.receive()
                if event[0] == kind:
                    return event


class Gate:
    """The write end of a child's named pipe: each byte lets one request finish."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.fd: int | None = None

    def release(self) -> None:
        if self.fd is None:  # the child holds the read end open from its start
            self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        os.write(self.fd, b"x")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def gated(tmp: Path, stage: str, index: int, gate: Gate, log: Path, **overrides) -> ChildSpec:
    """A gated child: it logs "start"/"end" lines for each request to `log` and waits on `gate`."""
    name = f"{stage}#{index}"
    argv = [*python_child(GATED_CHILD), stage, name, str(gate.path), str(log)]
    return spec(argv, index=index, stage=stage, **overrides)


@contextmanager
def wd_and_win_gates(tmp: Path) -> Iterator[tuple[Path, Gate, Gate]]:
    """An empty log and the gates of a WindowPoSt and a WinningPoSt child, closed at the end."""
    log = tmp / "log"
    log.touch()
    wd, win = Gate(tmp / "wd"), Gate(tmp / "win")
    try:
        yield log, wd, win
    finally:
        wd.close()
        win.close()


def child_log(path: Path) -> list[str]:
    """The lines the gated children wrote to their log so far."""
    return path.read_text().splitlines()


async def submit_in_order(sup, nursery, requests) -> None:
    """Submit each (task, deadline) in its own task, one after another: request ids follow
    this order, since each submit is queued before the next one is issued."""
    for task, deadline in requests:
        nursery.start_soon(lambda t=task, d=deadline: sup.submit(t, deadline=d))
        await trio.testing.wait_all_tasks_blocked()
