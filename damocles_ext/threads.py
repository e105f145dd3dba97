"""Running blocking calls on trio's worker threads when the process may not get one.

A thread, like a process, counts against the user's limit of tasks (`ulimit -u`, RLIMIT_NPROC)
and the service's (systemd's TasksMax, the cgroup's pids.max): on a busy machine at that limit,
starting a thread fails with a RuntimeError ("can't start new thread") that says neither what
ran out nor what to do, and that the callers of a job store or of a metrics exposition took for
a bug of ours (a traceback; a coordinator that stopped). `run_in_thread` raises `NoThreadError`
instead, which says both; a failure of the called function itself passes through unchanged.
Where trio starts the thread itself (a host name's lookup), `no_thread` tells its RuntimeError
from another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

from .errors import TASKS_ADVICE, DextError

R = TypeVar("R")

#: CPython's words when a thread cannot be started (threading.Thread.start).
_CANNOT_START = "can't start new thread"


class NoThreadError(DextError):
    """A worker thread could not be started (the process is at its limit of tasks)."""


def no_thread(exc: BaseException) -> NoThreadError | None:
    """The NoThreadError that `exc` means, when it is the failure to start a thread (raised by
    trio, or by threading.Thread.start); None for anything else."""
    if isinstance(exc, RuntimeError) and _CANNOT_START in str(exc):
        return _no_thread_error(exc)
    return None


def _no_thread_error(exc: RuntimeError) -> NoThreadError:
    return NoThreadError(f"cannot start a thread ({exc}): {TASKS_ADVICE}")


async def run_in_thread(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """`trio.to_thread.run_sync(fn, *args, **kwargs)`, but NoThreadError when no thread could be
    started for it (keyword arguments are trio's: limiter, abandon_on_cancel)."""
    started = False

    def call() -> R:
        nonlocal started
        started = True
        return fn(*args)

    try:
        return await trio.to_thread.run_sync(call, **kwargs)
    except RuntimeError as exc:
        # Raised by `fn` itself, or not a thread refused (trio's "must be called from async
        # context", outside trio: not the limit of tasks).
        if started or (refused := no_thread(exc)) is None:
            raise
        raise refused from None
