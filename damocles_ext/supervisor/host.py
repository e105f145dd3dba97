"""The supervisor's side of `child_loop.ChildHost`: what a child's task may ask of it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .child_loop import Child, Process
from .orphans import GroupGuardian

if TYPE_CHECKING:
    from .core import Supervisor


class SupervisorHost:
    """What a child's task (`child_loop`) may ask of the supervisor: its events go to the book,
    and the shared services (reaper, guardian, observers)."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self.book = sup._book
        self.reaper = sup._reaper
        self.observers = sup._observers
        self.stop_timeout = sup.stop_timeout
        # The supervisor's own methods, bound once: what a child writes reaches the book with
        # no trampoline call on the hot path.
        self.tell = sup._tell
        self.output = sup._on_events

    @property
    def guardian(self) -> GroupGuardian | None:
        return self._sup._guardian

    def task_failed(self, child: Child, reason: str, p: Process | None = None) -> None:
        self._sup._child_task_failed(child, reason, p)

    def changed(self) -> None:
        self._sup._notify()


__all__ = ["SupervisorHost"]
