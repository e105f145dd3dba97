"""One known task waiting for one event: the supervisor's waiting callers and the control
client's waiting requests.

A `trio.Event` per request costs a parking lot and its bookkeeping on the hottest paths, for a
waiter that is known to be one task: `Parked` parks that task and reschedules it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio


@dataclass(eq=False, slots=True)
class Parked:
    """Set once; `wait` returns once it is set (a checkpoint if it was already).

    A dataclass whose fields are set by `__init__` itself (not arguments of it): a dataclass
    subclass's generated `__init__` sets them too, with no call of this one (per request)."""

    _task: trio.lowlevel.Task | None = field(default=None, init=False)  # the waiter, while it waits
    is_set: bool = field(default=False, init=False)

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
