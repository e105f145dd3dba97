"""SIGTERM, SIGINT and SIGHUP (the terminal that started it closed; not when it is ignored, as
under `nohup`), read the same way by every front end: the first asks for a graceful stop, a
second SIGTERM or SIGINT stops at once."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("damocles_ext.serve")


#: After a second signal, how long the error answers it made get to be written out.
ANSWERS_GRACE = 1.0


def end_soon(scope: trio.CancelScope) -> None:
    """A second signal: `scope` ends within ANSWERS_GRACE, time for the answers just made to
    reach their readers; a reader that is stuck does not hold it longer. The children are
    killed as the supervisor's run is cancelled."""
    scope.deadline = min(scope.deadline, trio.current_time() + ANSWERS_GRACE)


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops a front end (their default action would kill it at once, leaving its requests
    unanswered and its control socket behind): SIGTERM, SIGINT, and SIGHUP unless it is ignored
    (`nohup`, or a parent that ignores it for its children: they must outlive the terminal)."""
    hup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, signal.SIGINT, *hup)


async def watch_signals(
    signals,
    cancel_scope,
    shut_down,
    logger: logging.Logger = log,
    at_once: Callable[[], None] | None = None,
) -> None:
    """First of stop_signals(): call `shut_down()` (graceful); a second SIGTERM or SIGINT
    cancels `cancel_scope`, or calls `at_once()` when given. A second SIGHUP changes nothing: a
    closing terminal may send two (the shell's, and the kernel's when its session ends)."""
    count = 0
    async for signum in signals:
        count += 1
        name = signal.Signals(signum).name
        if count == 1:
            logger.info("%s: shutting down gracefully (again to stop at once)", name)
            shut_down()
        elif signum == signal.SIGHUP:
            logger.info("SIGHUP again: still shutting down gracefully")
        else:
            logger.warning("%s again: stopping at once", name)
            if at_once is not None:
                at_once()
            else:
                cancel_scope.cancel()


async def until_stopped(
    scope: trio.CancelScope,
    serve: Callable[..., Awaitable[object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve(task_status=...)` inside `scope`, which a stop cancels: started when it says so,
    or when it ends before (a stop that came while it started: `nursery.start` returns, where
    trio would raise RuntimeError for a task that ended without starting)."""
    once = _StartedOnce(task_status)
    with scope:
        await serve(task_status=once)
    once.started()


class _StartedOnce:
    """A task status that passes on the first `started()` and ignores the rest."""

    def __init__(self, status: trio.TaskStatus[None]) -> None:
        self._status: trio.TaskStatus[None] | None = status

    def started(self, value: None = None) -> None:
        if self._status is not None:
            status, self._status = self._status, None
            status.started(value)
