"""A killed child's GPU lock is freed when its process exits, not when it is marked down.

A process stuck in a GPU driver call can take seconds to die after SIGKILL, and holds the GPU's
memory until it does: a sibling on the same GPU (or the child's own next process) must not
start a proof there meanwhile. The request book keeps the locks (scheduling/holds.py) until
the supervisor says the process was reaped (`child_exited`); what the killed child ran goes on
elsewhere as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import msgspec
import pytest
import trio
import trio.testing
from helpers.scheduling import Gate, gated
from helpers.supervisor import (
    alive,
    builtin_child,
    dext_child,
    our_descendants,
    python_child,
    spec,
    window_task,
    winning_task,
)

from damocles_ext.api import open_supervisor
from damocles_ext.errors import ProverError
from damocles_ext.jobs.worker_rules import ready_slots_of
from damocles_ext.lifecycle import ChildLimits, Kill, RequestBook, Resolve, Send
from damocles_ext.status import assemble, render_table
from damocles_ext.supervisor import Supervisor
from damocles_ext.supervisor.child_loop import _exited
from damocles_ext.supervisor.process import spawn
from damocles_ext.supervisor.reaper import KEEP_LOCKS_FOR, Reaper, join_late_reaps
from damocles_ext.supervisor.restart import BackoffPolicy
from damocles_ext.supervisor.stats import ChildStats, ExitingProcess

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

WD, WIN = "window_post", "winning_post"
GPU0 = frozenset({"gpu:0"})
HUNG = ChildLimits(heartbeat_timeout=60.0)


def gpu_book(*children: tuple[str, str, str, ChildLimits]) -> RequestBook:
    book = RequestBook()
    for name, stage, lock, limits in children:
        book.add_child(name, stage, locks=(lock,), limits=limits)
    return book


def sends(effects) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


# -- the request book, sans-IO -----------------------------------------------------------------


def test_a_killed_childs_gpu_lock_stays_held_until_its_process_exits():
    book = gpu_book(("a", WD, "gpu:0", HUNG), ("w", WIN, "gpu:0", ChildLimits()))
    book.child_ready("a", 0.0, protocol="dext", pid=100)
    book.child_ready("w", 0.0, protocol="dext", pid=101)
    _, out = book.submit(1, window_task(), 0.0)
    assert [s.child for s in sends(out)] == ["a"]
    win, out = book.submit(2, winning_task(), 1.0)
    assert out == []  # gpu:0 is a's
    out = book.advance(60.0)  # a is hung: killed
    assert [type(e) for e in out] == [Kill]
    # Killed, not exited: the WinningPoSt waits for gpu:0, and everyone can see why.
    assert book.exiting("a") == [(100, GPU0, 60.0)]
    assert book.scheduler.statistics().waiting_for_lock == {WIN: ("gpu:0",)}
    out = book.child_lost("a", 60.5, "hung; did not die after SIGKILL")
    assert [type(e) for e in out] == [Resolve]  # answered at once, as before
    assert book.child_exited("w", 61.0, pid=101) == []  # not the process held for
    assert sends(book.child_exited("a", 70.0, pid=100)) == [Send(win, "w", 1)]
    assert book.exiting("a") == []
    assert book.child_exited("a", 70.0, pid=100) == []  # said twice: nothing more


def test_the_killed_childs_next_process_waits_for_the_old_one_too():
    book = gpu_book(("a", WD, "gpu:0", HUNG))
    book.child_ready("a", 0.0, protocol="dext", pid=100)
    book.submit(1, window_task(), 0.0)
    book.advance(60.0)
    book.child_lost("a", 61.0, "hung; did not die after SIGKILL")
    _, out = book.submit(2, window_task(), 62.0)
    assert sends(book.child_ready("a", 63.0, protocol="dext", pid=200)) == []
    assert sends(out) == []
    (send,) = sends(book.child_exited("a", 64.0, pid=100))
    assert send.child == "a" and send.request.rid in (1, 2)


def test_a_killed_childs_request_runs_at_once_on_another_gpu():
    limits = ChildLimits(max_attempts=2, heartbeat_timeout=60.0)
    book = gpu_book(("a", WD, "gpu:0", limits), ("b", WD, "gpu:1", limits))
    book.child_ready("a", 0.0, protocol="dext", pid=100)
    req, _ = book.submit(1, window_task(), 0.0)
    book.child_ready("b", 0.0, protocol="dext", pid=101)
    book.advance(60.0)  # a killed; its process still exists
    out = book.child_lost("a", 60.5, "hung; killed by SIGKILL")
    assert sends(out) == [Send(req, "b", 1)]
    assert book.exiting("a") == [(100, GPU0, 60.0)]


def test_a_process_seen_exited_before_it_went_down_holds_nothing():
    book = gpu_book(("a", WD, "gpu:0", ChildLimits()), ("w", WIN, "gpu:0", ChildLimits()))
    book.child_ready("a", 0.0, protocol="dext", pid=100)
    book.child_ready("w", 0.0, protocol="dext", pid=101)
    book.submit(1, window_task(), 0.0)
    win, _ = book.submit(2, winning_task(), 0.0)
    assert sends(book.child_down("a", 1.0, exited=True)) == [Send(win, "w", 1)]
    assert book.exiting("a") == []


# -- the supervisor, with real children ---------------------------------------------------------


class ProcessAtDispatch:
    """Inline observer: for each request written to a child (the supervisor calls it as it
    writes it), which child, and whether the process `pid` still existed (not reaped) then;
    `running` instead: whether it still ran (a zombie has freed the GPU)."""

    def __init__(self, *, running: bool = False) -> None:
        self.pid: int | None = None
        self.seen: list[tuple[str, bool]] = []
        self.send, self.starts = trio.open_memory_channel[str](10)
        self._running = running

    def dext_request_started(self, request) -> None:
        assert self.pid is not None
        there = alive(self.pid) if self._running else os.path.exists(f"/proc/{self.pid}")
        self.seen.append((request.child, there))
        self.send.send_nowait(request.child)


def gpu_siblings(children, watch: ProcessAtDispatch):
    """A supervisor of `children` (sharing a GPU), quick to restart them, `watch`ing dispatch."""
    backoff = BackoffPolicy(base=0.05, cap=0.2)
    return open_supervisor(children, stop_timeout=2.0, backoff=backoff, inline_observers=[watch])


async def noted(answers: dict[str, object], sup, name: str, task) -> None:
    """Submit `task` to `sup`: its output, or its ProverError, in answers[name]."""
    try:
        answers[name] = await sup.submit(task)
    except ProverError as exc:
        answers[name] = exc


async def test_a_killed_childs_gpu_goes_to_a_sibling_only_once_its_process_is_reaped(tmp_path):
    log = tmp_path / "log"
    log.touch()
    hog_gate, probe_gate = Gate(tmp_path / "hog"), Gate(tmp_path / "probe")
    # The hog's request blocks on its gate without a word: hung, killed after 0.3 s.
    hog = gated(
        tmp_path, WD, 0, hog_gate, log, locks=("gpu:0",), heartbeat_timeout=0.3, max_attempts=1
    )
    probe = gated(tmp_path, WIN, 0, probe_gate, log, locks=("gpu:0",))
    watch = ProcessAtDispatch()
    answers: dict[str, object] = {}

    try:
        async with gpu_siblings([hog, probe], watch) as sup:
            await sup.wait_ready(WD)
            await sup.wait_ready(WIN)
            (stats,) = [c for c in sup.statistics().children if c.name == f"{WD}#0"]
            watch.pid = stats.pid
            async with trio.open_nursery() as nursery:
                nursery.start_soon(noted, answers, sup, WD, window_task())
                with trio.fail_after(10):
                    assert await watch.starts.receive() == f"{WD}#0"
                nursery.start_soon(noted, answers, sup, WIN, winning_task())  # waits for gpu:0
                with trio.fail_after(10):  # the hog is killed, then the WinningPoSt starts
                    assert await watch.starts.receive() == f"{WIN}#0"
                assert [c.exiting for c in sup.statistics().children] == [(), ()]  # nothing kept
                probe_gate.release()
    finally:
        hog_gate.close()
        probe_gate.close()
    # The WinningPoSt was written to the probe only once the hog's process was gone.
    assert watch.seen == [(f"{WD}#0", True), (f"{WIN}#0", False)]
    assert isinstance(answers[WD], ProverError) and "hung" in str(answers[WD])
    assert not isinstance(answers[WIN], ProverError)


async def test_a_gpu_held_by_a_wrapper_scripts_prover_goes_to_a_sibling_only_once_it_is_gone(
    tmp_path,
):
    # `Bin` a script that runs the prover without exec: the prover, in the child's process
    # group, holds the GPU. Here the script dies first (killed at the gate's word) while its
    # prover lives on: the GPU was handed to the sibling at the script's reap, before the tear
    # -down even killed the prover; it now waits until the whole group is gone.
    seen = await wrapper_scripts_prover_then_sibling(tmp_path)
    # The WinningPoSt was written to the sibling only once the prover was gone.
    assert seen == [(f"{WD}#0", True), (f"{WIN}#0", False)]


async def wrapper_scripts_prover_then_sibling(tmp_path) -> list[tuple[str, bool]]:
    """The script's prover takes a WindowPoSt on gpu:0 and kills its script; a WinningPoSt on
    gpu:0 waits meanwhile: for each dispatch, (child, whether the prover still ran)."""
    gate, pid_file = Gate(tmp_path / "gate"), tmp_path / "prover.pid"
    prover = dext_child(
        "os.read(gate, 1); os.kill(os.getppid(), signal.SIGKILL); time.sleep(3600)",
        setup=f"""
            import signal, time
            gate = os.open({str(gate.path)!r}, os.O_RDWR)
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
        """,
    )
    argv = ["/bin/sh", "-c", '"$@"; exit 0', "sh", *prover]
    script = spec(argv, locks=("gpu:0",), max_attempts=1)
    probe = spec(builtin_child(WIN, "echo"), stage=WIN, locks=("gpu:0",))
    watch = ProcessAtDispatch(running=True)
    answers: dict[str, object] = {}
    try:
        async with gpu_siblings([script, probe], watch) as sup:
            await sup.wait_ready(WD)
            await sup.wait_ready(WIN)
            watch.pid = int(pid_file.read_text())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(noted, answers, sup, WD, window_task())
                with trio.fail_after(10):
                    assert await watch.starts.receive() == f"{WD}#0"
                nursery.start_soon(noted, answers, sup, WIN, winning_task())  # waits for gpu:0
                await trio.testing.wait_all_tasks_blocked()
                assert watch.seen == [(f"{WD}#0", True)]
                gate.release()  # the prover kills its script
                with trio.fail_after(10):
                    assert await watch.starts.receive() == f"{WIN}#0"
    finally:
        gate.close()
    assert isinstance(answers[WD], ProverError) and "SIGKILL" in str(answers[WD])
    assert not isinstance(answers[WIN], ProverError)
    return watch.seen


# The script test above, run by a program whose parent adopts orphans and never reaps them (a
# container's PID 1 that does not reap, an embedding program that is a subreaper): the dead
# prover stays a zombie, which holds nothing, and must not keep the GPU's lock.
NO_REAPER = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER; adopted orphans never reaped
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
SCRIPT_UNDER_NO_REAPER = """
import json, logging, pathlib, sys, trio
sys.path.insert(0, sys.argv[1])
import test_lock_holds as t
logging.basicConfig(level=logging.ERROR)
records = []
logging.getLogger().addHandler(h := logging.Handler())
h.emit = records.append
seen = trio.run(t.wrapper_scripts_prover_then_sibling, pathlib.Path(sys.argv[2]))
print(json.dumps({"seen": seen, "errors": [r.getMessage() for r in records]}))
"""


def test_a_dead_prover_that_nobody_reaps_does_not_keep_the_gpu(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    argv = [sys.executable, "-c", NO_REAPER, "-c", SCRIPT_UNDER_NO_REAPER, tests, str(tmp_path)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    finally:
        if (pid_file := tmp_path / "prover.pid").exists():  # its zombie, if it is ours now
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(pid_file.read_text()), os.WNOHANG)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    assert said["seen"] == [[f"{WD}#0", True], [f"{WIN}#0", False]]
    # Not held until the tear-down's bound, taken for a process stuck in the kernel.
    assert not [e for e in said["errors"] if "still not dead" in e], said["errors"]


async def test_a_process_that_outlives_sigkill_keeps_its_locks_logged_until_it_exits(caplog):
    # No test can make a process survive SIGKILL (a driver call in state D): this one is simply
    # not killed, and handed to the reaper as the child task does with one still there after it.
    caplog.set_level(logging.INFO, logger="damocles_ext")
    proc = spawn(f"{WD}#0", python_child("import sys; sys.stdin.read()"), dict(os.environ))
    reaper = Reaper(list)
    exited = trio.Event()
    exiting = [(proc.pid, GPU0, 0.0), (proc.pid + 1, frozenset({"gpu:1"}), 0.0)]
    try:
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()
            nursery.start_soon(reaper.run, scope, False)
            # The child's fields (Child.fields), its pid one of an earlier process's.
            fields = {"child": f"{WD}#0", "stage": WD, "index": 0, "pid": 1}
            reaper.keep(proc, f"{WD}#0", exiting, exited.set, fields)
            held = [r.getMessage() for r in caplog.records if "stay held" in r.getMessage()]
            said = (
                f"{WD}#0 (pid {proc.pid}): still not dead 5s or more after SIGKILL (stuck in the"
                " kernel: a GPU driver call?); gpu:0 stay held for it until it exits, so nothing"
                " else runs on them meanwhile (status: `exiting`), for 25s at most"
            )
            assert held == [said]
            assert list(reaper.unreaped) == [proc]
            await proc.stdin.aclose()  # it exits
            with trio.fail_after(10):
                await exited.wait()
            assert not reaper.unreaped
            assert f"{WD}#0 (pid {proc.pid}): exited at last; gpu:0 free" in caplog.text
            # Both records carry the child's fields (JSON logs), with this process's pid.
            about = [r for r in caplog.records if f"(pid {proc.pid})" in r.getMessage()]
            assert len(about) == 2
            for record in about:
                assert {k: vars(record).get(k) for k in fields} == {**fields, "pid": proc.pid}
            scope.cancel()
    finally:
        proc.kill_tree()
        await proc.wait()
        await proc.aclose()


async def test_the_locks_of_a_process_stuck_for_good_are_freed_after_a_bound_saying_so(
    caplog, mock_clock
):
    # A process stuck for good (a driver that hangs, a network file system that never answers)
    # must not keep its GPU's other work (its child's next process, a WinningPoSt sharing the
    # lock) waiting until each request's deadline: its locks are freed 25 s on, and it is still
    # waited for.
    mock_clock.autojump_threshold = 0.01  # the real process below exits only when told
    caplog.set_level(logging.INFO, logger="damocles_ext")
    proc = spawn(f"{WD}#0", python_child("import sys; sys.stdin.read()"), dict(os.environ))
    reaper = Reaper(list)
    freed: list[float] = []
    told = [trio.Event(), trio.Event()]

    def on_exit() -> None:
        freed.append(trio.current_time())
        told[len(freed) - 1].set()

    try:
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()
            nursery.start_soon(reaper.run, scope, False)
            kept_at = trio.current_time()
            reaper.keep(proc, f"{WD}#0", [(proc.pid, GPU0, 0.0)], on_exit)
            with trio.fail_after(KEEP_LOCKS_FOR + 30):  # on the mock clock: the bound's
                await told[0].wait()
            assert freed[0] - kept_at == pytest.approx(KEEP_LOCKS_FOR, abs=1.5)
            assert list(reaper.unreaped) == [proc]  # still waited for
            said = [r for r in caplog.records if "stuck for good" in r.getMessage()]
            assert len(said) == 1 and said[0].levelname == "ERROR"
            assert "gpu:0 free now" in said[0].getMessage()
            # It exits at last (said again, harmless), in real time: the clock runs as a wall's.
            mock_clock.autojump_threshold, mock_clock.rate = math.inf, 1.0
            await proc.stdin.aclose()
            with trio.fail_after(30):
                await told[1].wait()
            assert not reaper.unreaped
            assert f"{WD}#0 (pid {proc.pid}): exited at last" in caplog.text
            assert "exited at last; gpu:0 free" not in caplog.text  # freed already
            scope.cancel()
    finally:
        proc.kill_tree()
        await proc.wait()
        await proc.aclose()


async def test_a_process_still_there_when_the_supervisor_stops_is_reaped_once_it_exits(
    caplog, autojump_clock, monkeypatch
):
    # The last kill waits REAP_TIMEOUT for what it SIGKILLed; one that dies later (stuck in a
    # driver call for seconds) is waited for by no task once the supervisor has returned, and
    # stayed a zombie of this process for the rest of its life. No test can make a process
    # survive SIGKILL: this one is simply not killed by the last kill, and killed after it.
    caplog.set_level(logging.INFO, logger="damocles_ext")
    proc = spawn(f"{WD}#0", python_child("import sys; sys.stdin.read()"), dict(os.environ))
    monkeypatch.setattr(proc, "kill_tree", lambda: None)
    # A sibling dead already (not reaped: a zombie), which the last kill's wait, given up on
    # the first, never reached: reaped then, and not said to be stuck.
    dead = spawn(f"{WD}#1", python_child("import sys; sys.stdin.read()"), dict(os.environ))
    os.kill(dead.pid, signal.SIGKILL)
    await trio.to_thread.run_sync(os.waitid, os.P_PID, dead.pid, os.WEXITED | os.WNOWAIT)
    reaper = Reaper(lambda: [(proc, "m0"), (dead, None)])
    reaper.spawned("m0", {"child": f"{WD}#0", "stage": "window_post", "index": 0, "pid": proc.pid})
    try:
        await reaper.kill_everything()  # gives up after REAP_TIMEOUT (the mock clock's)
        assert proc.exit is None
        assert dead.exit is not None and dead.exit.describe() == "killed by SIGKILL"
        # A task that waits for it all the same waits for the thread, and trio runs on: its pidfd
        # closed, the wait called Popen.wait in the loop and froze it until the process exited
        # (it is killed after 10 s, real time, should that happen: the test fails, not hangs).
        guard = threading.Timer(10.0, os.kill, (proc.pid, signal.SIGKILL))
        guard.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proc.wait)
            await trio.testing.wait_all_tasks_blocked()
            assert proc.exit is None  # (the loop ran on)
            guard.cancel()
            os.kill(proc.pid, signal.SIGKILL)  # it dies at last, the supervisor long returned
        assert join_late_reaps(10.0)  # (a real-time bound: the thread that reaps it ends)
        assert [p for p in our_descendants() if p.pid == proc.pid] == []  # no zombie
        assert proc.exit is not None and proc.exit.describe() == "killed by SIGKILL"
        [said] = [r for r in caplog.records if "as the supervisor stops" in r.getMessage()]
        assert said.levelname == "ERROR" and said.pid == proc.pid
        assert said.getMessage() == (
            f"{WD}#0 (pid {proc.pid}): still not dead 5s after SIGKILL as the supervisor stops (stuck in"
            " the kernel: a GPU driver call?); it is reaped whenever it exits; check the machine"
            " (dmesg) if it stays"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        join_late_reaps(10.0)
        for each in (proc, dead):
            if each.exit is None:
                await each.wait()
            await each.aclose()


async def test_status_shows_the_locks_held_for_a_killed_process_not_exited_yet():
    sup = Supervisor([spec(["true"], locks=("gpu:0",), heartbeat_timeout=60.0)])
    book, now, name = sup._book, trio.current_time(), f"{WD}#0"
    book.child_ready(name, now - 70, protocol="dext", pid=4242)
    book.submit(1, window_task(), now - 70)
    assert [type(e) for e in book.advance(now)] == [Kill]  # hung: killed, its locks kept
    stats = sup.statistics()
    (held,) = stats.children[0].exiting
    since = held.since
    assert (held.pid, held.locks) == (4242, ("gpu:0",)) and abs(since - time.time()) < 5
    doc = assemble(stats, {}, {}, {}, now=since + 125, supervisor_started=since)
    (exiting,) = msgspec.to_builtins(doc)["children"][0]["exiting"]
    assert exiting == {"pid": 4242, "locks": ["gpu:0"], "since": since, "since_in": -125.0}
    assert "gpu:0 held for pid 4242 (down 2m05s, not exited)" in render_table(doc)
    book.child_exited(name, now + 1, pid=4242)
    assert sup.statistics().children[0].exiting == ()


# -- the worker: no job pulled for a child that would wait for a killed process ---------------


def child_stats(name: str, lock: str, exiting: tuple[ExitingProcess, ...] = ()) -> ChildStats:
    return ChildStats(
        name, WD, 0, 1, None, "ready", None, 0, 1, 0, 0, 0, None, None, "dext",
        locks=(lock,), exiting=exiting,
    )  # fmt: skip


def test_a_worker_counts_no_slot_of_a_child_whose_gpu_is_kept_for_a_killed_process():
    stuck = (ExitingProcess(4242, ("gpu:0",), time.time()),)
    # a's killed process holds gpu:0: a's next process, and b on the same GPU, would only wait.
    children = [
        child_stats(f"{WD}#0", "gpu:0", stuck),
        child_stats(f"{WD}#1", "gpu:0"),
        child_stats(f"{WD}#2", "gpu:1"),
    ]
    assert ready_slots_of(children) == 1
    # Once it exited: a or b (they take turns on gpu:0), and c.
    assert ready_slots_of([child_stats(c.name, c.locks[0]) for c in children]) == 2


async def test_a_late_exit_wakes_whoever_waits_for_the_children_to_change():
    # What the reaper reports of a process that outlived SIGKILL frees its locks: a worker
    # waiting for a slot must look again.
    async with open_supervisor([spec(dext_child(), locks=("gpu:0",))]) as sup:
        await sup.wait_ready(WD, 1)
        woken = trio.Event()

        async def waiter() -> None:
            await sup.wait_changed()
            woken.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            (child,) = sup._children.values()
            _exited(sup._host, child, SimpleNamespace(pid=4242, exit=-9))
            with trio.fail_after(5):
                await woken.wait()


async def test_a_process_reaped_late_is_struck_off_the_groups_the_guardian_kills():
    # The guardian SIGKILLs every process group still listed when the supervisor dies. A process
    # that outlived SIGKILL and exited later (the reaper's report) must be struck off then, as
    # one reaped at once is: months later its pid, so its group id, may be someone else's.
    async with open_supervisor([spec(dext_child())]) as sup:
        await sup.wait_ready(WD, 1)
        guardian = sup._host.guardian
        assert guardian is not None
        told: list[int] = []
        remove = guardian.remove

        def recorded(pgid: int) -> None:
            told.append(pgid)
            remove(pgid)

        guardian.remove = recorded  # type: ignore[method-assign]
        (child,) = sup._children.values()
        _exited(sup._host, child, SimpleNamespace(pid=4242, exit=None))  # stuck: locks freed
        assert told == []  # still there: its group is still the guardian's to kill
        _exited(sup._host, child, SimpleNamespace(pid=4242, exit=-9))  # reaped at last
        assert told == [4242]
