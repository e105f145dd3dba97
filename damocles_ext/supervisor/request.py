"""A caller of `Supervisor.submit` waiting for its request's one answer (the driver's side).

The request itself, its attempts and the rules are the request book's
(`lifecycle.book.TrackedRequest`); this is what only the trio driver needs: the event the caller
waits on, the answer, and the progress and dispatch callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..errors import ProverError
from ..protocol import dext
from ..tasks import Output

if TYPE_CHECKING:
    from ..lifecycle import TrackedRequest


@dataclass(eq=False)
class Waiter:
    """One caller of submit(), from submission until its request is answered."""

    tracked: TrackedRequest
    on_progress: Callable[[dext.Progress], None] | None
    on_dispatch: Callable[[str | None], None] | None = None  # a child's name, or None: waiting
    output: Output | None = None
    error: ProverError | None = None
    event: trio.Event = field(default_factory=trio.Event)

    @property
    def rid(self) -> int:
        return self.tracked.rid

    @property
    def done(self) -> bool:
        """Answered: the book resolved it (its Resolve is carried out before anything awaits)."""
        return self.tracked.done
