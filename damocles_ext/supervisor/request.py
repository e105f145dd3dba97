"""A caller of `Supervisor.submit` waiting for its request's one answer (the driver's side).

The request itself, its attempts and the rules are the request book's
(`lifecycle.book.TrackedRequest`); this is what only the trio driver needs: the event the caller
waits on, the answer, and the progress and dispatch callbacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import ProverError
from ..protocol import dext
from ..tasks import Output

if TYPE_CHECKING:
    from ..lifecycle import TrackedRequest
    from .core import Supervisor

log = logging.getLogger("damocles_ext.supervisor")


@dataclass(eq=False, slots=True)
class Waiter:
    """One caller of submit(), from submission until its request is answered."""

    tracked: TrackedRequest
    on_progress: Callable[[dext.Progress], None] | None
    on_dispatch: Callable[[str | None], None] | None = None  # a child's name, or None: waiting
    output: Output | None = None
    error: ProverError | None = None
    answered: bool = False  # `answer` was called
    _task: trio.lowlevel.Task | None = None  # the caller, while it waits in `wait`
    #: Called once with (output, error) instead of waking a task (`Supervisor.start_nowait`).
    on_done: Callable[[Output | None, ProverError | None], None] | None = None

    @property
    def rid(self) -> int:
        return self.tracked.rid

    @property
    def done(self) -> bool:
        """Answered: the book resolved it (its Resolve is carried out before anything awaits)."""
        return self.tracked.done

    async def wait(self) -> None:
        """Wait until `answer` is called (a checkpoint if it was already).

        The caller's task is parked and woken directly: a trio.Event per request would cost a
        parking lot and its bookkeeping on the hottest path for one waiter that is known."""
        if self.answered:
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def answer(self) -> None:
        """The output or error is set: wake the caller, or call its `on_done`."""
        self.answered = True
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)
        elif self.on_done is not None:
            try:
                self.on_done(self.output, self.error)
            except Exception:  # the caller's callback must not take the supervisor down
                log.exception("the answer callback of request %d raised; ignored", self.rid)


class Started:
    """A request started by `Supervisor.start_nowait`; `cancel()` abandons it, as a cancelled
    caller of `submit` does (its `on_done` is called at once, with the error that says so)."""

    __slots__ = ("_sup", "_waiter")

    def __init__(self, sup: Supervisor, waiter: Waiter) -> None:
        self._sup = sup
        self._waiter = waiter

    def cancel(self) -> None:
        self._sup._abandon(self._waiter)
