"""Helpers for the supervisor tests: child specs, tasks, fake children, process checks."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import trio
import trio.testing

from damocles_ext.config import ChildSpec
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt, WinningPoSt

PY = sys.executable


def spec(
    argv: list[str] | tuple[str, ...],
    *,
    index: int = 0,
    stage: str = "window_post",
    **overrides: object,
) -> ChildSpec:
    """A ChildSpec as config.py would build it, with test-friendly defaults."""
    fields: dict[str, object] = {
        "stage": stage,
        "index": index,
        "block": index,
        "name": f"{stage}#{index}",
        "argv": tuple(argv),
        "kind": "bin",
        "envs": {},
        "inherit_envs": True,
        "concurrent": 1,
        "weight": 1,
        "ready_timeout": 10.0,
        "protocol": "auto",
        "plugin": None,
        "plugin_options": {},
        "cpuset": None,
        "auto_restart": True,
        "max_attempts": 2,
        "request_timeout": None,
        "heartbeat_timeout": None,
        "cancel_grace": 10.0,
        "locks": (),
        "gpu": None,
    }
    fields.update(overrides)
    return ChildSpec(**fields)  # type: ignore[arg-type]


def python_child(code: str) -> list[str]:
    """argv of a Python child running `code` (unbuffered), as trio's own tests do."""
    return [PY, "-u", "-c", textwrap.dedent(code)]


def builtin_child(
    stage: str = "window_post", plugin: str = "echo", *options: str, protocol: str | None = None
) -> list[str]:
    """argv of the built-in child runtime (`damocles-ext child`)."""
    argv = [PY, "-m", "damocles_ext", "child", stage, "--plugin", plugin]
    for opt in options:
        argv += ["--option", opt]
    if protocol:
        argv += ["--protocol", protocol]
    return argv


def window_task(miner: int = 1000, sector: int = 1) -> WindowPoSt:
    """A small WindowPoSt task (the echo prover answers it from its fields)."""
    return WindowPoSt(
        miner_id=miner,
        proof_type="StackedDrgWindow2KiBV1_2",
        replicas=[PoStReplicaInfo(sector, bytes(range(32)), "/tmp/cache", "/tmp/sealed")],
        seed=bytes(32),
    )


def winning_task(miner: int = 1000) -> WinningPoSt:
    """A small WinningPoSt task."""
    return WinningPoSt(
        miner_id=miner,
        proof_type="StackedDrgWinning2KiBV1",
        replicas=[PoStReplicaInfo(1, bytes(range(32)), "/tmp/cache", "/tmp/sealed")],
        seed=bytes(32),
    )


# A damocles-style JSON-lines child: answers each request with one proof naming it (who()). The body of
# `handle(req)` decides what to do; it returns the response dict or None (no answer).
JSONL_CHILD = """
import base64, json, os, sys, time
STAGE = {stage!r}
{setup}
sys.stdout.write(STAGE + " processor ready\\n")
sys.stdout.flush()
def answer(req, err=None):
    # one proof, "<miner_id> <pid>": tells a test which request and which child this answer is
    if err is None:
        proof = base64.b64encode(b"%d %d" % (req["task"]["miner_id"], os.getpid())).decode()
        out = {{"proofs": [proof], "faults": []}}
        msg = {{"id": req["id"], "err_msg": None, "output": out}}
    else:
        msg = {{"id": req["id"], "err_msg": err, "output": None}}
    sys.stdout.write(json.dumps(msg) + "\\n")
    sys.stdout.flush()
for line in sys.stdin:
    req = json.loads(line)
{handle}
"""


def who(output: object) -> tuple[int, int]:
    """(miner id, pid) from the proof a fake child answered: which request, which child."""
    miner, pid = output.proofs[0].split()  # type: ignore[attr-defined]
    return int(miner), int(pid)


def jsonl_child(
    handle: str = "answer(req)", setup: str = "", stage: str = "window_post"
) -> list[str]:
    """argv of a fake damocles JSON-lines child; `handle` is code run per request (`req`)."""
    return _fake_child(JSONL_CHILD, handle, setup, stage, indent=4)


# A dext/1 child built on the project's codec; `handle` runs per Request (`msg`).
DEXT_CHILD = """
import os, sys
from damocles_ext.protocol import dext
from damocles_ext.tasks import WindowPoStOutput
out = sys.stdout.buffer
def send(m):
    out.write(dext.encode(m))
    out.flush()
def answer(msg):  # one proof, "<miner_id> <pid>" (see who())
    proof = b"%d %d" % (msg.task.miner_id, os.getpid())
    send(dext.Response(msg.id, output=WindowPoStOutput([proof], [])))
{setup}
send(dext.Hello("dext/1", {stage!r}, os.getpid(), "fake", "1", {capacity}))
dec = dext.FrameDecoder()
while True:
    data = os.read(0, 65536)
    if not data:
        break
    for msg in dec.receive_data(data):
        if isinstance(msg, dext.Request):
{handle}
        elif isinstance(msg, dext.Cancel):
{cancel}
        elif isinstance(msg, dext.Shutdown):
            sys.exit(0)
"""


def dext_child(
    handle: str = "answer(msg)",
    setup: str = "",
    stage: str = "window_post",
    cancel: str = "pass",
    capacity: int = 1,
) -> list[str]:
    """argv of a fake dext/1 child; `handle` is code run per Request (`msg`), `cancel` per
    Cancel (`msg`); `capacity`: requests at once, as its Hello says."""
    code = DEXT_CHILD.replace("{capacity}", str(capacity))
    return _fake_child(code, handle, setup, stage, indent=12, cancel=cancel)


def _fake_child(
    template: str, handle: str, setup: str, stage: str, indent: int, cancel: str = ""
) -> list[str]:
    def block(code: str) -> str:
        return textwrap.indent(textwrap.dedent(code), " " * indent)

    code = template.format(
        stage=stage, setup=textwrap.dedent(setup), handle=block(handle), cancel=block(cancel)
    )
    return [PY, "-u", "-c", code]


# A split WindowPoSt vanilla child whose answers have the right shape and prove nothing (every
# SNARK step refuses them).
BAD_VANILLA = dext_child(
    "send(dext.Response(msg.id, output=WindowPoStVanillaOutput([b'garbage'], [])))",
    setup="from damocles_ext.tasks import WindowPoStVanillaOutput",
    stage="window_post_vanilla",
)


def one_bad_vanilla_child() -> list[ChildSpec]:
    """Split WindowPoSt children: BAD_VANILLA and a good (`echo`) vanilla child, two SNARK."""
    van, snark = "window_post_vanilla", "window_post_snark"
    return [
        spec(BAD_VANILLA, stage=van),
        spec(builtin_child(van, "echo"), stage=van, index=1),
        spec(builtin_child(snark, "echo"), stage=snark),
        spec(builtin_child(snark, "echo"), stage=snark, index=1),
    ]


async def cancel_once_running(sup, task) -> None:
    """Submit `task` to `sup` and cancel its caller once a child reports progress on it."""
    running = trio.Event()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def first() -> None:
                await sup.submit(task, on_progress=lambda p: running.set())

            nursery.start_soon(first)
            await running.wait()
            scope.cancel()
    assert scope.cancelled_caught


def child_stats(sup, name: str = "window_post#0"):
    """The `ChildStats` of the child called `name` in `sup.statistics()`."""
    return next(c for c in sup.statistics().children if c.name == name)


def alive(pid: int) -> bool:
    """True if `pid` is a running (non-zombie) process."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def our_descendants() -> list[psutil.Process]:
    """Every process below this test process, zombies included (an unreaped child is a leak)."""
    return [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.is_running()]


def marked(marker: str) -> list[psutil.Process]:
    """Every live process with `marker` among its arguments, anywhere on the machine: finds the
    processes a test started even once they left our tree (daemonized, or orphaned)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in (
                proc.info["cmdline"] or []
            ):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def kill_marked(marker: str) -> None:
    """SIGKILL what `marked(marker)` finds (the clean-up after a test that may have leaked)."""
    for proc in marked(marker):
        try:
            proc.kill()
        except psutil.Error:
            pass


async def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `predicate` with a deadline (for process state, which sends no events)."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - process state sends no event
            await trio.sleep(0.01)


async def wait_until_real(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """`wait_until` for a test on `mock_clock`, whose time moves only when the test jumps it:
    there trio.sleep would never return, so this polls each time the run loop has been idle for
    10 ms of real time, and gives up after `timeout` real seconds."""
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"no {what} within {timeout} s of real time")
        await trio.testing.wait_all_tasks_blocked(0.01)


class TaskSteps(trio.abc.Instrument):
    """How many steps the tasks whose name ends with `suffix` took (a reader task's, say)."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.steps += 1


class BlockingWaits(trio.abc.Instrument):
    """How many times the run loop waited for I/O with no task ready (slept, but for events)."""

    def __init__(self) -> None:
        self.waits = 0
        self.slept = threading.Event()  # set at each (for another thread to wait on)

    def before_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            self.waits += 1
            self.slept.set()


class StepGate(trio.abc.Instrument):
    """Counts the steps of one trio task (the caller); `wait_next` (from the server's thread)
    waits for the first step after `arm()`, up to `timeout` seconds: False if none came."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0
        self.after = -1
        self.changed = threading.Condition()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            with self.changed:
                self.steps += 1
                self.changed.notify_all()

    def arm(self) -> None:
        """Called by the caller just before a `submit`, which sends before it yields."""
        with self.changed:
            self.after = self.steps

    def wait_next(self, timeout: float = 5.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.steps > self.after >= 0, timeout)


@contextmanager
def instruments(*added: trio.abc.Instrument) -> Iterator[None]:
    """`added` watch this trio run within the block."""
    for instrument in added:
        trio.lowlevel.add_instrument(instrument)
    try:
        yield
    finally:
        for instrument in added:
            trio.lowlevel.remove_instrument(instrument)
