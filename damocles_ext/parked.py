"""One known task waiting for one event: the supervisor's waiting callers and the control
client's waiting requests.

A `trio.Event` per request costs a parking lot and its bookkeeping on the hottest paths, for a
waiter that is known to be one task: `Parked` parks that task and reschedules it directly.
"""

from __future__ import annotations

import trio


class Parked:
    """Set once; `wait` returns once it is set (a checkpoint if it was already)."""

    __slots__ = ("_task", "is_set")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None  # the waiter, while it waits
        self.is_set = False

    def set(self) -> None:
        """Set it and wake the task waiting, if one is."""
        self.is_set = True
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    @property
    def waited_on(self) -> bool:
        """A task is parked in `wait` now."""
        return self._task is not None

    async def wait(self) -> None:
        """Wait until `set` is called (one task at a time)."""
        if self.is_set:
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED
