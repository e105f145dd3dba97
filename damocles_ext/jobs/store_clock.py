"""The clock an operator's command reads a job store's stamps with (`status --jobs`, `wdpost`):
on PostgreSQL the coordinators stamp heartbeats, sightings and times on the server's clock
(frontends/coordinator_clock.py), so a command compares them with the server's too, and stamps
what it changes on it: this machine's clock plus the offset read once as it starts. SQLite is one
machine: its clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .database import clock_skew
from .retry import database_errors

if TYPE_CHECKING:
    from .store import JobStore


def store_clock(store: JobStore, clock: Callable[[], float] = time.time) -> Callable[[], float]:
    """`clock` (this machine's) on the store's server's: a StoreError when it cannot be read."""
    offset = _server_offset(store, clock)
    if offset == 0.0:
        return clock
    return lambda: clock() + offset


@database_errors(replayable=True, name="the reading of its server's clock")
def _server_offset(store: JobStore, clock: Callable[[], float]) -> float:
    """Seconds the store's PostgreSQL server's clock is ahead of `clock` (0: SQLite)."""
    skew = clock_skew(store.engine, clock)
    return 0.0 if skew is None else -skew
