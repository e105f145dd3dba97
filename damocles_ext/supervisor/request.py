"""A request as the supervisor keeps it, and one attempt of it running on a child (a slot).

Shared by the supervisor (which creates, dispatches and answers them) and the child loop (which
reads the answers of the slots running on its process).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ProverError
from ..protocol import dext
from ..tasks import Output, Task

if TYPE_CHECKING:
    from .child_loop import Child, Process


@dataclass(eq=False)
class Request:
    """A request from submit() until it is answered, across all its attempts."""

    rid: int
    task: Task
    stage: str
    arrival: float
    deadline: float | None  # trio clock
    deadline_unix: float | None
    priority: int
    on_progress: Callable[[dext.Progress], None] | None
    attempts: int = 0  # times sent to a child
    attempt_id: int | None = None  # current scheduler job (queued or running)
    child: str | None = None  # child of the current or last attempt
    history: list[str] = field(default_factory=list)
    done: bool = False
    output: Output | None = None
    error: ProverError | None = None
    event: trio.Event = field(default_factory=trio.Event)
    running_on: tuple[Child, Process] | None = None  # where the current attempt runs


@dataclass(eq=False)
class Slot:
    """One attempt in flight on one child process."""

    attempt_id: int
    child_rid: int
    request: Request
    started: float
    abandoned: bool = False  # its request was answered or moved on; we wait for the child
    timeout: list[Any] | None = None  # its RequestTimeoutSecs timer (cancelled on the answer)
