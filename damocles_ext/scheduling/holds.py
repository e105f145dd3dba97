"""Locks kept for a process that went down but may still be alive, until it exits (sans-IO).

A child killed for hanging, for a Cancel it ignored, or at a shutdown is marked down at once:
it takes no more work, and its requests go on elsewhere. Its process may still be alive for a
while, though: one stuck in a GPU driver call can take seconds to die after SIGKILL, and holds
its GPU's memory until it does. So the locks its running jobs held (`gpu:0`) are not freed with
them: `Scheduler.child_down(..., hold=name)` keeps them under the process's own name, which no
child is (the child's own next process included), until `Scheduler.exited(name)`, which the
supervisor says once the process is reaped. A process still there long after SIGKILL is logged
and shown in `status` (`exiting`); the supervisor's reaper frees its locks after a bound
(`KEEP_LOCKS_FOR`), as if it had exited, so that a process stuck for good holds no GPU for ever.
"""

from __future__ import annotations

from typing import NamedTuple


class Hold(NamedTuple):
    """The locks kept for a process of `child_id` that went down at `since`."""

    child_id: str
    locks: frozenset[str]
    since: float


class LockHolds:
    """The holds, by the name each process was given, over the scheduler's `lock_holders`
    (lock -> holder -> jobs running): a hold is one more holder of each of its locks."""

    def __init__(self, lock_holders: dict[str, dict[str, int]]) -> None:
        self._holders = lock_holders
        self.by_name: dict[str, Hold] = {}

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def take(self, name: str | None, child_id: str, locks: frozenset[str], now: float) -> bool:
        """Keep the locks of `locks` that `child_id` holds now (call it before its jobs are
        dropped) under `name`; False if it held none or `name` is None (nothing is kept)."""
        if name is None or not locks:
            return False
        held = frozenset(lock for lock in locks if child_id in self._holders.get(lock, ()))
        if not held:
            return False
        old = self.by_name.get(name)
        if old is not None:  # the same name twice (no pid known): one hold, the union
            held |= old.locks
        for lock in held:
            self._holders[lock][name] = 1
        self.by_name[name] = Hold(child_id, held, now if old is None else old.since)
        return True

    def release(self, name: str) -> Hold | None:
        """The process `name` exited: its locks are free (None if it held none)."""
        hold = self.by_name.pop(name, None)
        if hold is None:
            return None
        for lock in hold.locks:
            holders = self._holders[lock]
            del holders[name]
            if not holders:
                del self._holders[lock]
        return hold


__all__ = ["Hold", "LockHolds"]
