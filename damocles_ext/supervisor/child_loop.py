"""One child's own loop: spawn, handshake, read and write its pipes, tear down, back off, again.

`child_loop` is the task that serves one configured child for the supervisor's whole run. Each
of its processes (`Process`) gets a stderr relay, an exit watcher, one writer task (stdin: what
`send` cannot write at once, in order) and one reader (`read`, stdout), until it goes down
(`mark_down`); then it is torn down, its requests go back to the supervisor, and the restart rules
(`restart.RestartTracker`) say when it starts again, if ever.

The child's state (`ChildState`) changes only in `Child.change_state`, which checks the change
against `TRANSITIONS`. The request side (dispatch, timeouts, answers) is the request book's
(`lifecycle.RequestBook`): the functions here tell it what the child did through `ChildHost`, the
supervisor's narrow interface, which carries out its effects (`host.tell`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..config import child_env, describe_argv
from ..logs import report_bad_output
from . import pipe_turns
from .connection import ChildConnection, ChildProtocolError, Ready, preview
from .observers import child_info, exit_status
from .pipe_turns import READS_IN_A_ROW, PipeTurn, closing, off_the_pipe, wake_reader
from .process import ChildProcess, SpawnError, prepare_spawn, spawn
from .reaper import REAP_TIMEOUT
from .restart import GiveUp, RestartTracker
from .states import TRANSITIONS, ChildState, IllegalTransition
from .stderr_relay import StderrCap, relay_stderr, stderr_summary

if TYPE_CHECKING:
    from ..lifecycle import RequestBook
    from .observers import Observers
    from .orphans import GroupGuardian
    from .reaper import Reaper

log = logging.getLogger("damocles_ext.supervisor")
child_log = logging.getLogger("damocles_ext.child")

_READ_SIZE = ChildProcess.READ_SIZE  # (a global: read() reads it at each read)
_GROUP_TERM_WAIT = 1.0  # grandchildren's time to leave after SIGTERM once their parent exited
_PIPE_DRAIN_TIMEOUT = 0.5  # after the reap: what the child wrote is read within a few ticks
_SLOW_PLUGINS = (
    "; a prover plugin installed here that is slow to import (a module-level CUDA or torch"
    " import) or to build its prover delays every Plugin child"
)
_STDERR_TAIL_LINES = 2  # a child's last stderr lines quoted in its exit reason (failed starts)
_MAX_QUEUE = 16  # requests beyond Concurrent a child may be sent (its Hello's queue, bounded)


class ChildHost(Protocol):
    """What a child's task needs from the supervisor (`host.SupervisorHost`)."""

    book: RequestBook
    reaper: Reaper
    observers: Observers
    stop_timeout: float

    @property
    def guardian(self) -> GroupGuardian | None: ...

    def tell(self, event: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Tell the request book `event(*args, **kwargs)` (a bound method of `book`) and carry
        out its effects, even those it gave before it raised."""

    def output(self, child: Child, p: Process, events: list[Any]) -> None:
        """Act on what the child wrote (answers, progress, skipped lines)."""

    def task_failed(self, child: Child, reason: str, p: Process | None = None) -> None:
        """A bug of ours in the child's task: take it down, retry its requests."""

    def changed(self) -> None:
        """Readiness changed: wake whoever waits on the supervisor's state."""


class Child:
    """One configured child ([[WdPost]] table, say) across all its processes."""

    def __init__(self, spec: Any, tracker: RestartTracker) -> None:
        self.spec = spec
        self.name: str = spec.name
        self.tracker = tracker
        self._state = ChildState.STARTING
        self.p: Process | None = None
        self.pid: int | None = None
        # What the records about it carry as fields (JSON logs), as its stderr lines do.
        self.fields: dict[str, Any] = {"child": spec.name, "stage": spec.stage, "index": spec.index}
        self.log = logging.LoggerAdapter(log, self.fields)
        self.protocol: str | None = None
        self.next_start_at: float | None = None
        self.started_at: float | None = None
        self.last_exit: str | None = None
        # Its last start failed with exit code 2 (the child runtime's: the prover cannot load).
        self.start_refused = False
        self.stop = trio.Event()
        self.launched = False
        self.capacity = max(1, spec.concurrent)
        self.stderr_cap = StderrCap()  # across its processes: a crash loop gets no new bursts

    @property
    def state(self) -> ChildState:
        """Its state; changed by `change_state` only."""
        return self._state

    def change_state(self, new: ChildState) -> None:
        """Move to `new`; raises IllegalTransition if TRANSITIONS does not allow it."""
        if new not in TRANSITIONS[self._state]:
            raise IllegalTransition(
                f"{self.name}: no transition from {self._state.value} to {new.value}"
            )
        self.log.debug("%s: %s -> %s", self.name, self._state.value, new.value)
        self._state = new


class Process:
    """One process of a child: from spawn to reaping."""

    def __init__(self, proc: ChildProcess, conn: ChildConnection) -> None:
        self.proc = proc
        self.conn = conn
        channel = trio.open_memory_channel[bytes | bytearray](math.inf)  # frames to write
        self.send_channel, self.receive_channel = channel
        self.wake = trio.Event()  # something for the child task to look at
        self.down_reason: str | None = None
        self.handshake_scope = trio.CancelScope()
        self.reader_done: trio.Event | None = None
        self.read_ended = False  # EOF or a protocol error: nothing more is read
        self.stderr_done = trio.Event()
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self.stdin_fd = proc.stdin.fileno()
        self.tree_mark: str | None = None  # its OrphanAdopter mark
        self.queued_writes = 0  # chunks handed to the writer task and not yet written
        self.turn = PipeTurn()  # the reader's or a caller's (pipe_turns)

    def interrupt(self) -> None:
        """Make the child task look at this process now (it went down, or we stop)."""
        self.wake.set()
        self.handshake_scope.cancel()


async def read(host: ChildHost, child: Child, p: Process) -> None:
    """Read `p`'s stdout and act on it, as its reader task, until EOF or a protocol error. It
    stays in wait_readable while anything is in flight; idle after a `submit` caller's request,
    it leaves the pipe a while, for a caller to read its own answer (pipe_turns). Plain os.read
    on the non-blocking pipe (FdStream's receive_some yields after every read); a read shorter
    than asked emptied the pipe, so the next one waits for the pipe first (no EAGAIN)."""
    fd = p.proc.stdout.fileno()
    unyielded = 0
    wait = False
    try:
        while not p.read_ended:
            if wait:
                unyielded = 0
                if p.turn.wanted and p.down_reason is None and not host.book.in_flight(child.name):
                    await off_the_pipe(p)  # a caller may read its own answer (pipe_turns)
                    if p.read_ended:
                        break
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError:
                    pass  # closed under us: the read below says so
            elif unyielded >= READS_IN_A_ROW:
                unyielded = 0
                await trio.lowlevel.checkpoint()
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                wait = True
                continue
            except OSError:
                data = b""
            unyielded += 1
            wait = 0 < len(data) < _READ_SIZE
            on_data(host, child, p, data)
            if p.turn.sent_at:  # a front end's lone request not polled for (pipe_turns)
                pipe_turns.answered_unpolled(p)
    finally:
        assert p.reader_done is not None
        p.reader_done.set()


def kill(
    host: ChildHost,
    child: Child,
    p: Process,
    reason: str,
    *,
    charge_all: bool = True,
    request_id: int | None = None,
) -> None:
    """Take a child down now: SIGKILL its process group; its task does the rest.

    `charge_all`: its loss costs each of its requests an attempt (the book's own kills have
    said already whether it does). `request_id`: the request it is killed over, if one."""
    if p.down_reason is None:
        fields = child.fields if request_id is None else {**child.fields, "request_id": request_id}
        log.error("%s (pid %s): %s; killing its process group", child.name, child.pid, reason,
                  extra=fields)  # fmt: skip
    try:
        mark_down(host, child, p, reason, charge_all=charge_all)
    finally:  # killed even after a bug of ours in telling the book
        p.proc.kill_tree()


def mark_down(
    host: ChildHost,
    child: Child,
    p: Process,
    reason: str,
    *,
    charge_all: bool = True,
    gone: bool | None = None,
) -> None:
    """The process is going away: no more dispatch to it; its task tears it down. `gone`: the
    caller's `p.proc.group_gone()`, if it has it."""
    first = p.down_reason is None
    if first:
        p.down_reason = reason
        wake_reader(p)  # what it wrote last is read at once (pipe_turns)
    if child.p is p:
        if child.state in (ChildState.READY, ChildState.STARTING):
            child.change_state(ChildState.STOPPING)
            host.changed()
        # Else its locks are held until it and the rest of its group are gone (_locks_freed):
        # a wrapper script's prover, in its group, may hold the GPU after the script exited.
        # (Only the first word counts for the book: no /proc scan for the later ones.)
        exited = first and (p.proc.group_gone() if gone is None else gone)
        now = trio.current_time()
        host.tell(host.book.child_down, child.name, now, charge_all=charge_all, exited=exited)
    p.interrupt()


def _locks_freed(host: ChildHost, child: Child, proc: ChildProcess) -> None:
    """`proc` was reaped: the locks held for it since it went down alive (killed) are free."""
    host.tell(host.book.child_exited, child.name, trio.current_time(), pid=proc.pid)
    host.changed()  # a worker counts no slot of a child whose lock was kept for it


def _exited(host: ChildHost, child: Child, proc: ChildProcess) -> None:
    """`proc` was reaped, the rest of its group killed (or it is stuck for good: the reaper):
    its locks are free, and its group, once it exited, is no longer the guardian's to kill."""
    _locks_freed(host, child, proc)
    if proc.exit is not None and host.guardian is not None:
        host.guardian.remove(proc.pid)


async def child_loop(
    host: ChildHost, child: Child, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve `child` until it is stopped or given up on; started() once it was launched."""
    try:
        while not child.stop.is_set():
            try:
                was_ready, reason = await _run_process(host, child, task_status)
            except Exception as exc:
                # The same wall as in _run_process, for a bug outside its process's nursery.
                reason = f"internal error in damocles-ext: {_describe_error(exc)}"
                child.log.exception("%s: %s", child.name, reason)
                was_ready = False
                _launched(child, task_status)
                host.task_failed(child, reason)
            if child.stop.is_set():
                break
            now = trio.current_time()
            name, book = child.name, host.book
            decision = (
                child.tracker.exited(now, reason, served=book.served(name), sent=book.sent(name))
                if was_ready
                else child.tracker.start_failed(reason, refused=child.start_refused)
            )
            if isinstance(decision, GiveUp):
                child.change_state(ChildState.FATAL if decision.fatal else ChildState.STOPPED)
                retry = decision.retry_in
                child.next_start_at = None if retry is None else now + retry
                child.log.error("%s: %s", child.name, decision.reason)
                host.changed()
                host.tell(
                    host.book.child_gave_up,
                    child.name,
                    now,
                    fatal=decision.fatal,
                    last_exit=child.last_exit,
                )
                if retry is None:
                    break
                # Still FATAL for its stage until a start succeeds (the book's child_ready).
                child.log.info("%s: trying to start it again in %.2fs", child.name, retry)
            else:
                child.change_state(ChildState.BACKOFF)
                child.next_start_at = now + decision.delay
                child.log.warning("%s: restarting in %.2fs", child.name, decision.delay)
                host.changed()
            assert child.next_start_at is not None
            with trio.move_on_at(child.next_start_at):
                await child.stop.wait()
            child.next_start_at = None
    finally:
        _launched(child, task_status)
        if child.state not in (ChildState.FATAL, ChildState.STOPPED):
            child.change_state(ChildState.STOPPED)
        host.changed()


def _launched(child: Child, task_status: Any) -> None:
    if not child.launched:
        child.launched = True
        task_status.started()


async def _run_process(host: ChildHost, child: Child, task_status: Any) -> tuple[bool, str]:
    """One process of `child`, from spawn to reaping; returns (was it ready, why it ended)."""
    spec = child.spec
    if child.state is not ChildState.STARTING:  # the first start begins in it
        child.change_state(ChildState.STARTING)
    child.start_refused = False  # of this process only: said again if it refuses too
    child.fields.pop("pid", None)  # the last process's; the next one's once it is spawned
    host.changed()
    env = child_env(spec)
    mark = host.reaper.adopter.mark(env)
    try:
        prepare_spawn(
            spec.name,
            spec.stage,
            spec.block,
            spec.argv,
            spec.kind,
            env,
            spec.cpuset,
            tmpdir=spec.envs.get("TMPDIR"),
            private_tmpdir=spec.private_tmpdir,
        )
        proc = spawn(spec.name, spec.argv, env, spec.cpuset)
    except (SpawnError, OSError, ValueError) as exc:
        # OSError and ValueError: a check in prepare_spawn that met what it did not expect
        # (a NUL in a path, an fd limit): still this child's failed start, not our crash.
        why = str(exc) if isinstance(exc, SpawnError) else f"{spec.name}: cannot start: {exc}"
        _launched(child, task_status)
        child.last_exit = f"failed to start: {why}"
        child.log.error("%s", why)
        return False, why
    guardian = host.guardian
    if guardian is not None:
        guardian.add(proc.pid)  # its process group, for if we are killed
    child.pid = child.fields["pid"] = proc.pid
    child.started_at = time.time()
    child.protocol = None
    p = Process(proc, ChildConnection(spec.stage, spec.protocol, spec.name))
    p.tree_mark = host.reaper.spawned(mark, child.fields)  # (its fields: what it leaves)
    child.p = p
    _launched(child, task_status)
    child.log.info("%s: started pid %d: %s", child.name, proc.pid, _short_argv(spec))
    host.observers.observe("dext_child_started", child=child_info(child))
    prefix = f"[{spec.stage}#{spec.index} pid={proc.pid}]"
    ready = False
    reason = "?"
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay_stderr, p, prefix, dict(child.fields), child.stderr_cap)
            nursery.start_soon(_watch_exit, host, child, p)
            ready = await _handshake(host, child, p)
            if ready:
                p.reader_done = trio.Event()
                nursery.start_soon(_writer, host, child, p)
                nursery.start_soon(read, host, child, p)
                while p.down_reason is None and not child.stop.is_set():
                    p.wake = trio.Event()
                    await p.wake.wait()
                if p.down_reason is None:
                    await _stop_gracefully(host, child, p)
            reason = await _tear_down(host, child, p, ready)
            nursery.cancel_scope.cancel()
    except Exception as exc:
        # A bug of ours while serving this process ends it (killed and reaped just below),
        # never the supervisor; marked down first, so no submitter reads its closed pipe.
        reason = f"internal error in damocles-ext: {_describe_error(exc)}"
        child.log.exception("%s (pid %d): %s; killing it", child.name, proc.pid, reason)
        host.task_failed(child, reason, p)
    finally:
        with trio.CancelScope(shield=True):
            if proc.exit is None:
                proc.kill_tree()
                with trio.move_on_after(REAP_TIMEOUT):
                    await proc.wait()
                if proc.exit is None:  # its locks stay held until it exits: the reaper says so
                    held, exited = host.book.exiting(child.name), lambda: _exited(host, child, proc)
                    host.reaper.keep(proc, child.name, held, exited, child.fields)
            if proc.exit is not None:
                _exited(host, child, proc)
            closing(p)  # (a caller reading its pipe reads no more: pipe_turns)
            await proc.aclose()
        child.p = None
    return ready, reason


async def _relay_stderr(p: Process, prefix: str, fields: dict[str, Any], cap: StderrCap) -> None:
    try:
        await relay_stderr(p.proc.stderr, prefix, child_log, fields, p.stderr_tail, cap)
    finally:
        p.stderr_done.set()


async def _handshake(host: ChildHost, child: Child, p: Process) -> bool:
    """Wait ReadyTimeoutSecs for the ready message; False (p.down_reason says why) if none."""
    spec = child.spec
    timeout = spec.ready_timeout or 5.0
    events: list[Any] = []
    data = b""
    exited = False
    broke: ChildProtocolError | None = None
    try:
        with p.handshake_scope:
            p.handshake_scope.deadline = trio.current_time() + timeout
            while not p.conn.ready:
                data = await p.proc.receive_stdout()
                events = p.conn.receive_data(data)
        exited = not child.stop.is_set() and (p.down_reason or "").startswith("exited")
        if exited:
            # The exit can be seen before what the child wrote just before it. It is reaped,
            # so all it wrote is in the pipe: read what is there, without waiting for more.
            while not p.conn.ready and (data := p.proc.stdout_now()):
                events = p.conn.receive_data(data)
    except ChildProtocolError as exc:
        if p.conn.ready:  # a valid Hello, then bad bytes in the same read: ready, then broke
            broke = exc
        elif data:
            what = f"undecodable output at start: {exc}"
            report_bad_output(child.name, p.proc.pid, data, what)
        if broke is None:
            mark_down(host, child, p, "failed start")
            p.down_reason = f"failed start: {exc}"  # says more than an exit seen first
            return False
    if not p.conn.ready:
        wrote = f"it wrote {preview(p.conn.head)}" if p.conn.head else "it wrote nothing"
        if p.down_reason is None and child.stop.is_set():  # not a failure: we stop it
            mark_down(host, child, p, "stopped before it was ready")
        elif p.down_reason is None:
            slow = _SLOW_PLUGINS if child.spec.kind == "plugin" else ""
            why = f"no ready message within {timeout:g}s ({wrote}): the ReadyTimeoutSecs of its"
            mark_down(host, child, p, f"failed start: {why} table{slow}; raise it if need be")
        elif p.down_reason.startswith("exited"):
            p.down_reason = f"failed start: {p.down_reason} before its ready message ({wrote})"
        return False
    if exited:
        # Ready, then exited before it was acted on: to the restart rules an exit after ready
        # (not a failed start); it takes no request (no dext_child_ready, not in status).
        child.tracker.ready(trio.current_time())
        child.log.info("%s (pid %d): ready, and exited at once", child.name, p.proc.pid)
        return True
    if broke is not None:  # a Hello, then bad bytes in one read: a start, then a run that
        child.tracker.ready(trio.current_time())  # broke at once, killed before the book is
        _kill_broken(host, child, p, data, broke)  # (no request was sent to it: none charged)
        return True
    if child.stop.is_set() or p.down_reason is not None:
        mark_down(host, child, p, "stopped before it was ready")
        return False
    ready = next(ev for ev in events if isinstance(ev, Ready))
    child.protocol = ready.protocol
    if ready.hello is not None and ready.hello.capacity < child.capacity:
        child.log.warning(
            "%s: its Hello says capacity %d, but Concurrent is %d; sending up to %d at once",
            child.name,
            ready.hello.capacity,
            child.capacity,
            child.capacity,
        )
    now = trio.current_time()
    child.change_state(ChildState.READY)
    child.tracker.ready(now)
    child.log.info("%s (pid %d): ready (%s)", child.name, p.proc.pid, ready.protocol)
    host.changed()
    host.observers.observe("dext_child_ready", child=child_info(child))
    # A queue offered in the Hello (bounded: it is the child's word) is taken for quick requests.
    queue = min(max(0, ready.hello.queue), _MAX_QUEUE) if ready.hello is not None else 0
    host.tell(
        host.book.child_ready, child.name, now, protocol=ready.protocol, pid=p.proc.pid, queue=queue
    )
    rest = [ev for ev in events if not isinstance(ev, Ready)]
    if rest:
        host.output(child, p, rest)
    return True


def on_data(host: ChildHost, child: Child, p: Process, data: bytes) -> None:
    """Act on what the child wrote (b"" at EOF); sets p.read_ended when reading must stop."""
    broke: ChildProtocolError | None = None
    try:
        try:
            events = p.conn.receive_data(data)
        except ChildProtocolError as exc:
            # The whole messages before the bad bytes are acted on first (an answer), as when
            # the pipe splits them into two reads; then the child is killed, below.
            broke, events = exc, exc.events
        if events:
            host.output(child, p, events)
    except Exception as exc:
        # A bug of ours on what this child wrote (read here by the reader task or by a
        # submitter, see read) ends this child, not the supervisor or the submitter.
        p.read_ended = True
        child.log.exception("%s (pid %s): internal error on its output", child.name, child.pid)
        kill(
            host,
            child,
            p,
            f"internal error in damocles-ext on its output: {type(exc).__name__}: {exc}",
        )
        return
    if broke is not None:
        _kill_broken(host, child, p, data, broke)
    elif not data:
        p.read_ended = True
        mark_down(host, child, p, "closed its stdout")


def _kill_broken(host: ChildHost, child: Child, p: Process, data: bytes, exc: Exception) -> None:
    """The child broke the protocol in `data`: say what it wrote, and kill it."""
    p.read_ended = True
    report_bad_output(child.name, p.proc.pid, data, f"undecodable output: {exc}")
    kill(host, child, p, f"broke the protocol: {exc}")


def send(host: ChildHost, child: Child, p: Process, data: bytes | bytearray) -> None:
    """Write to the child's stdin without blocking dispatch."""
    if p.queued_writes == 0 and p.down_reason is None:
        # The writer task is idle: write directly (the pipe is non-blocking), which saves a
        # task switch per request; whatever does not fit goes through the writer, in order.
        try:
            n = os.write(p.stdin_fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            mark_down(host, child, p, "its stdin pipe broke")
            return
        if n == len(data):
            return
        data = data[n:]
    if p.queued_writes == 0:
        # The pipe is full; the writer tells the book each time the child takes bytes (below).
        host.book.stdin_blocked(child.name, trio.current_time())
    p.queued_writes += 1
    try:
        p.send_channel.send_nowait(data)
    except trio.ClosedResourceError:
        p.queued_writes -= 1


async def _writer(host: ChildHost, child: Child, p: Process) -> None:
    stdin = p.proc.stdin
    try:
        async with p.receive_channel:
            async for data in p.receive_channel:
                # Batch whatever else is waiting into one write.
                parts = [data]
                while True:
                    try:
                        parts.append(p.receive_channel.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await _write_all(host, child, p, b"".join(parts) if len(parts) > 1 else data)
                p.queued_writes -= len(parts)
                if p.queued_writes == 0:
                    host.book.stdin_drained(child.name)
        await stdin.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        if not child.stop.is_set():
            mark_down(host, child, p, "its stdin pipe broke")


async def _write_all(host: ChildHost, child: Child, p: Process, data: bytes | bytearray) -> None:
    """FdStream.send_all, noting when the child takes bytes (the StdinTimeoutSecs watch)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(p.stdin_fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(p.stdin_fd)
            continue
        view = view[n:]
        host.book.stdin_progress(child.name, trio.current_time())
    await trio.lowlevel.checkpoint()


async def _watch_exit(host: ChildHost, child: Child, p: Process) -> None:
    info = await p.proc.wait()
    gone = p.proc.group_gone()
    mark_down(host, child, p, f"exited ({info.describe()})", gone=gone)
    if gone:  # else once the tear-down killed the rest (_tear_down)
        _locks_freed(host, child, p.proc)  # its group stays the guardian's until torn down


async def _stop_gracefully(host: ChildHost, child: Child, p: Process) -> None:
    """Shutdown frame or stdin close, SIGTERM to the group, SIGKILL after stop_timeout."""
    mark_down(host, child, p, "stopped (shutdown)")
    p.proc.remember_descendants()
    data = p.conn.encode_shutdown()
    if data is not None:
        send(host, child, p, data)
    p.send_channel.close()  # the writer sends what is queued, then closes stdin
    with trio.move_on_after(host.stop_timeout):
        await p.proc.wait()
    if p.proc.exit is None:
        child.log.warning(
            "%s (pid %d): still running %gs after it was asked to stop; SIGTERM",
            child.name,
            p.proc.pid,
            host.stop_timeout,
        )
        p.proc.signal_group(signal.SIGTERM)
        with trio.move_on_after(host.stop_timeout):
            await p.proc.wait()
    elif p.proc.signal_group(signal.SIGTERM):
        # The child left something behind in its group: a polite signal first.
        with trio.move_on_after(_GROUP_TERM_WAIT):
            await p.proc.until_group_gone()


async def _tear_down(host: ChildHost, child: Child, p: Process, was_ready: bool) -> str:
    """Kill what is left of the process tree, reap it, requeue or fail its requests."""
    mark_down(host, child, p, p.down_reason or "exited")
    p.proc.kill_tree()
    with trio.move_on_after(REAP_TIMEOUT):
        await p.proc.wait()
    host.reaper.sweep_soon(p.tree_mark)  # what it left outside its group is ours now (subreaper)
    # Answers written just before the exit may sit in the pipe, and the last stderr lines (a
    # traceback) are what an operator needs: taken first. Once it is reaped EOF is waited for
    # briefly: a grandchild that left the group (setsid) may hold the pipes open for ever.
    drain = _PIPE_DRAIN_TIMEOUT if p.proc.exit is not None else REAP_TIMEOUT
    with trio.move_on_after(drain) as drain_scope:
        if p.reader_done is not None:
            await p.reader_done.wait()
        await p.stderr_done.wait()
    if drain_scope.cancelled_caught and p.proc.exit is not None:
        child.log.warning(
            "%s (pid %d): exited, but its stdout/stderr are still open: a process it started"
            " outside its process group (setsid) holds them and may outlive it",
            child.name,
            p.proc.pid,
        )
    exit_info = p.proc.exit
    status = exit_info.describe() if exit_info else "did not die after SIGKILL"
    reason = p.down_reason or "exited"
    what = reason if exit_info and status in reason else f"{reason}; {status}"
    if exit_info is not None and exit_info.crashed:  # which prover: the request's error says
        what += f"; a crash of {_short_argv(child.spec)}"
    if p.stderr_tail and (not was_ready or (exit_info and exit_info.returncode)):
        # A child that could not start (or gave up) says why on stderr, e.g. "unknown
        # prover"; the operator should not have to dig that out of the log.
        what += f"; its last stderr: {stderr_summary(p.stderr_tail)}"
    child.last_exit = what
    child.start_refused = not was_ready and exit_info is not None and exit_info.returncode == 2
    host.tell(host.book.child_lost, child.name, trio.current_time(), what)
    if child.stop.is_set():
        child.log.info("%s (pid %d): %s", child.name, p.proc.pid, what)
    else:
        child.log.error("%s (pid %d): %s", child.name, p.proc.pid, what)
    host.changed()
    host.observers.observe(
        "dext_child_exited",
        child=child_info(child),
        status=exit_status(exit_info, reason),
    )
    if exit_info is not None:  # (else the reaper frees its locks once it exits)
        await _until_group_gone(host, child, p)
    return what


async def _until_group_gone(host: ChildHost, child: Child, p: Process) -> None:
    """The child was reaped and the rest of its group SIGKILLed: its locks are free once that
    is gone too (a prover its script started holds the GPU's memory until it is), or after
    REAP_TIMEOUT, said (stuck in the kernel)."""
    with trio.move_on_after(REAP_TIMEOUT):
        await p.proc.until_group_gone()
    if left := p.proc.group_left():
        child.log.error("%s (pid %d): pid %s of its group still not dead %gs after SIGKILL (stuck in"
                  " the kernel: a GPU driver call?); its locks are freed, and a proof on its GPU"
                  " may fail while that holds the GPU's memory: check the machine (dmesg)",
                  child.name, p.proc.pid, ", ".join(map(str, left)), REAP_TIMEOUT)  # fmt: skip
    _locks_freed(host, child, p.proc)


def _short_argv(spec: Any) -> str:
    text = describe_argv(spec) if hasattr(spec, "plugin_options") else " ".join(spec.argv)
    return text if len(text) <= 200 else text[:200] + "..."


def _describe_error(exc: BaseException) -> str:
    """`Type: message` of an exception, of each one in a (nursery's) exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe_error(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
