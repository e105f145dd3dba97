"""Whose turn it is to read a child's stdout: its reader task, or a caller reading its answer.

A caller of `Supervisor.submit` waiting on its child's pipe itself costs trio one task step and
one wait for I/O per answer; the reader task reading the answer and waking the caller costs two
of each (bench_supervisor: `TrioDirect` against `TrioDispatcher`, and the API one at a time).
But trio lets one task at a time wait on a descriptor, and moving the reader off it per request
(`notify_closing`) costs more than it saves. So the reader task leaves the pipe of its own
accord when nothing is in flight on its child and the last request sent it was a `submit`
caller's (`PipeTurn.wanted`; a front end's requests leave it on the pipe), for `LINGER` after
the last answer at most:

* A request `submit` sends to a child whose reader is off the pipe, with no caller on it, is
  *claimed*: its caller reads the pipe in its own task (`read_own`) until it is answered, acting
  on whatever the child wrote (other requests' answers, progress) as the reader would. It then
  hands the pipe back (`release`): the reader takes it at once if anything is still in flight
  on the child, or the child is going down; else at `LINGER` after the last release, unless a
  caller took it again by then (callers one after the other keep the reader off the pipe).
* Anything else sent to such a child (a front end's request, a retry, a second caller's request
  while one reads) wakes the reader (`wake_reader`), as does the child going down: whatever is
  in flight is read by someone at once, and an idle child's pipe is watched again within
  `LINGER` (its exit is watched apart, `child_loop._watch_exit`).
* A caller whose request is answered by something else (a timeout, its child lost, a retry
  answered on another child, shutdown) while it waits on the pipe is woken by `notify_closing`
  (`Waiter.answer`): rare, and it stops reading then. Before a process's pipes are closed,
  `closing` ends the reading and forgets the descriptor (its number may be reused).
* A request whose booking raised (a bug of ours) after it was sent is read when LINGER is up.

A caller whose child answered its last request quickly (within `SPIN` of the caller taking the
pipe) polls the pipe for up to `SPIN` before it sleeps on it, as the kernel's busy polling and
KVM's halt polling do: an answer that comes within that is read at once, where a caller asleep
in epoll is woken only after the scheduler brought an idle CPU back (about 9 us on this VM, as
much as the child's whole answer; BENCHMARKS.md). The poll follows a schedule point (every
`submit` lets the other tasks run, answered in the poll or not), is bounded in time, and is not
done for a child whose last answer came later than `SPIN`: a long proof costs one poll at most,
after a quick one, and a machine too busy to answer within it stops the polling by itself.
A front end's batch that sent requests to one child, idle before them, polls its pipe the same
way as the batch ends (`poll_answers`, from the front end's task: the answers go out on its
connection at once); when that child is not quick, its reader says whether the answer came
within `SPIN` (`answered_unpolled`), so that the next batch polls again.

What a child writes unasked while nothing is in flight (after an answer, on its own line) is
read within LINGER, or, when a caller's request comes first, by that caller with its request in
flight: garbage there kills the child with that request on it (charged an attempt), as it did
before whenever the next request was sent before the garbage was read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

import trio

from ..parked import Parked
from .process import ChildProcess

if TYPE_CHECKING:
    from .child_loop import Child, ChildHost, Process
    from .request import Waiter

#: How long after the last answer the reader task stays off an idle child's pipe (seconds):
#: what a child writes unasked while idle is read that much later at most.
LINGER = 0.01
_READ_SIZE = ChildProcess.READ_SIZE
#: How long a caller polls its child's pipe for the answer before it sleeps on it (seconds),
#: when its child's last answer came within that; about three times a trivial request's answer.
SPIN = 50e-6
#: trio's run context (a thread-local; its `runner` is the run's, while one runs), where this
#: trio has it: `tasks_runnable` reads the run queue's length from it.
_RUN_CONTEXT: Any = getattr(getattr(trio, "_core", None), "_run", None)
_RUN_CONTEXT = getattr(_RUN_CONTEXT, "GLOBAL_RUN_CONTEXT", None)
#: Reads in a row, then a wait (a checkpoint): a child that floods us starves no one (its reader
#: task's and a caller's reads alike).
READS_IN_A_ROW = 16


class PipeTurn:
    """A process's stdout: whether its reader is off it, and whether a caller reads it."""

    __slots__ = ("caller", "linger", "quick", "released_at", "sent_at", "wake", "wanted")

    def __init__(self) -> None:
        #: The last request sent was a `submit` caller's, who may read its answer: only then
        #: does the reader leave the pipe (a front end's request wakes it off the pipe each time).
        self.wanted = False
        self.caller: Waiter | None = None  # the caller that reads it (`read_own`), if one
        self.wake: Parked | None = None  # the reader's, while off: set, it takes the pipe
        self.linger: trio.CancelScope | None = None  # its wait while off, till LINGER is up
        self.released_at = 0.0  # when the last caller handed it back (trio's clock)
        #: Its last answer polled for (or timed) came within SPIN: the next one is polled for.
        self.quick = False
        #: When a batch sent requests to it, idle, without polling (perf_counter), else 0.0.
        self.sent_at = 0.0

    @property
    def off(self) -> bool:
        """The reader task is off the pipe (in `off_the_pipe`, whose `wake` it is)."""
        return self.wake is not None


def claim(children: Mapping[str, Child], waiter: Waiter) -> tuple[Child, Process] | None:
    """The child and process whose pipe the caller of `waiter`, its request just sent, reads
    itself; None: it waits to be woken (its request is queued or answered, or the child's
    reader is on the pipe, or a caller reads it and hands the pipe back as `release` says, or
    the child went down, which woke the reader: `child_loop.mark_down`)."""
    req = waiter.tracked
    if req.current is None or req.child is None:
        return None
    child = children[req.child]
    p = child.p
    if p is None:
        return None
    turn = p.turn
    if not turn.off or turn.caller is not None or p.down_reason is not None:  # (EOF: down)
        return None
    return child, p


def wake_reader(p: Process) -> None:
    """Something is in flight on `p` (or it goes down) that no caller reads: its reader takes
    the pipe (if it is off it; a caller reading it hands it back, see `release`)."""
    turn = p.turn
    if turn.wake is not None and turn.caller is None:
        turn.wake.set()


async def off_the_pipe(p: Process) -> None:
    """The reader task, nothing in flight: off the pipe until woken or LINGER after the last
    release (returns: it takes the pipe again)."""
    turn = p.turn
    turn.released_at = trio.current_time()
    try:
        while True:
            turn.wake = wake = Parked()
            deadline = math.inf if turn.caller is not None else turn.released_at + LINGER
            with trio.CancelScope(deadline=deadline) as turn.linger:
                await wake.wait()
            if turn.caller is not None:  # taken before this task ran: its release wakes or times it
                continue
            if wake.is_set or p.read_ended or p.down_reason is not None:
                return
            if trio.current_time() >= turn.released_at + LINGER:
                return
    finally:
        turn.wake = turn.linger = None


async def read_own(host: ChildHost, child: Child, p: Process, waiter: Waiter, on_data: Any) -> None:
    """A caller whose request `p` runs reads `p`'s pipe (`on_data` on what it reads) until its
    request is answered, the pipe ended, or it was woken by an answer given elsewhere."""
    fd = p.proc.stdout.fileno()
    turn = p.turn
    turn.caller = waiter
    began = perf_counter()
    try:
        if turn.quick:
            # The schedule point first (the child works meanwhile), then the poll: a `submit`
            # answered in it still lets the other tasks run.
            await trio.lowlevel.cancel_shielded_checkpoint()
            if not _poll(host, child, p, on_data, began + SPIN, lambda: waiter.tracked.done):
                return
        while not waiter.tracked.done and not p.read_ended:
            waiter.reading_fd = fd
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                return  # answered elsewhere, or the pipe is being closed: no more reading here
            finally:
                waiter.reading_fd = None
            for _ in range(READS_IN_A_ROW):
                if p.read_ended:  # (ended while this task waited to run: its pipe may be closed)
                    return
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not _took(host, child, p, data, on_data):
                    return
                if 0 < len(data) < _READ_SIZE or waiter.tracked.done:
                    break
    finally:
        turn.quick = waiter.tracked.done and perf_counter() - began <= SPIN
        release(host, child, p)


def poll_answers(host: ChildHost, child: Child, p: Process, on_data: Any) -> None:
    """A front end's batch has just sent `p` requests, with nothing else in flight on it: read
    their answers (`on_data` on what comes) for up to SPIN if `p` is quick and no other task
    waits in trio's run queue (one made ready earlier in this pass of the loop, which the poll
    would hold back; the tasks of the pass still to run are not seen, and may wait for the poll,
    SPIN at most), else have its reader time them. Not while a caller reads `p` (its answers are
    that caller's to read), nor before the requests are all written."""
    turn = p.turn
    if turn.caller is not None or p.read_ended or p.down_reason is not None or p.queued_writes:
        return
    if not turn.quick or tasks_runnable():
        turn.sent_at = perf_counter()
        return
    book, name = host.book, child.name
    if _poll(host, child, p, on_data, perf_counter() + SPIN, lambda: not book.in_flight(name)):
        turn.quick = not book.in_flight(name)


def tasks_runnable() -> int:
    """How many tasks wait in trio's run queue: `trio.lowlevel.current_statistics()`'s
    `tasks_runnable`, without the rest of that call, which also counts the waiters of every
    descriptor trio watches (a walk of them all: 8 us a call with 300 connections open, 26 us
    with 1,000, against 2 us with none). Read from the run's own queue where this trio keeps
    one (`trio._core._run.GLOBAL_RUN_CONTEXT.runner.runq`, as trio 0.35 does); else through the
    public call."""
    runq = getattr(getattr(_RUN_CONTEXT, "runner", None), "runq", None)
    if runq is None:
        return trio.lowlevel.current_statistics().tasks_runnable
    return len(runq)


def _poll(
    host: ChildHost,
    child: Child,
    p: Process,
    on_data: Any,
    until: float,
    answered: Callable[[], bool],
) -> bool:
    """Read `p`'s pipe without waiting, `on_data` on what comes, until `answered()`, the pipe's
    end or `until` (perf_counter; also for a child that floods the pipe); False if a bug of
    ours met there ended `p`."""
    fd = p.proc.stdout.fileno()
    while not answered() and not p.read_ended:
        try:
            data: bytes | None = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data is not None and not _took(host, child, p, data, on_data):
            return False
        if perf_counter() >= until:
            break
    return True


def answered_unpolled(p: Process) -> None:
    """`p`'s reader read what `p` wrote after a batch's requests not polled for: `p` is quick
    again if that came within SPIN of the requests."""
    turn = p.turn
    turn.quick = perf_counter() - turn.sent_at <= SPIN
    turn.sent_at = 0.0


def _took(host: ChildHost, child: Child, p: Process, data: bytes, on_data: Any) -> bool:
    """`on_data` on what a caller read from `p`; False if a bug of ours met there ended it."""
    try:
        on_data(host, child, p, data)
    except Exception as exc:  # noqa: BLE001 - a bug of ours ends the child, not the call
        _ended_by_a_bug(host, child, p, exc)
        return False
    return True


def _ended_by_a_bug(host: ChildHost, child: Child, p: Process, exc: Exception) -> None:
    """A bug of ours on what `p` wrote, met by a caller: the child ends, as when its own task
    meets one (`child_loop._run_process`), and a second bug in that is logged, not raised."""
    reason = f"internal error in damocles-ext: {type(exc).__name__}: {exc}"
    child.log.error("%s (pid %s): %s; killing it", child.name, p.proc.pid, reason, exc_info=exc)
    try:
        host.task_failed(child, reason, p)
    except Exception:
        child.log.exception("%s: internal error taking it down", child.name)


def closing(p: Process) -> None:
    """`p`'s pipes are about to be closed: nothing is read from them any more, and a caller
    answered from now on is not woken through a descriptor whose number may be reused."""
    p.read_ended = True
    if p.turn.caller is not None:
        p.turn.caller.reading_fd = None


def release(host: ChildHost, child: Child, p: Process) -> None:
    """The caller hands `p`'s pipe back to its reader (see the module's docstring)."""
    turn = p.turn
    turn.caller = None
    if turn.wake is None:
        return
    if p.read_ended or p.down_reason is not None or host.book.in_flight(child.name):
        turn.wake.set()
        return
    turn.released_at = now = trio.current_time()
    if turn.linger is not None and turn.linger.deadline == math.inf:
        turn.linger.deadline = now + LINGER
