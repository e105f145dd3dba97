"""The clock an operator's command reads a job store's stamps with (`status --jobs`, `wdpost`):
on PostgreSQL the coordinators stamp heartbeats, sightings and times on the server's clock
(frontends/coordinator_clock.py), so a command compares them with the server's too, and stamps
what it changes on it: this machine's clock plus the offset read once as it starts. SQLite is one
machine: its clock. `clock_skew` reads the server's clock (for the coordinators' and producers'
TrioJobStore too)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import sqlalchemy as sa

from .retry import database_errors

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .store import JobStore


class ClockReading(NamedTuple):
    """A reading of the PostgreSQL server's clock (`clock_skew`)."""

    #: Seconds `clock()` runs ahead of the server's clock (negative: behind).
    skew: float
    #: Seconds the query took on `clock`, there and back: the server read its clock somewhere
    #: in it, taken as halfway, so `skew` is off by up to half of it.
    round_trip: float


def clock_skew(engine: Engine, clock: Any) -> ClockReading | None:
    """How far `clock()` (unix time) runs ahead of the PostgreSQL server's clock, read halfway
    through the query's round trip (timed too); None for SQLite (one machine)."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        before = clock()
        server = conn.execute(sa.text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar_one()
        after = clock()
    return ClockReading((before + after) / 2 - float(server), after - before)


def store_clock(store: JobStore, clock: Callable[[], float] | None = None) -> Callable[[], float]:
    """`clock` (this machine's: time.time, as it is at the call) on the store's server's: a
    StoreError when it cannot be read."""
    if clock is None:
        clock = time.time
    offset = _server_offset(store, clock)
    if offset == 0.0:
        return clock
    return lambda: clock() + offset


@database_errors(replayable=True, name="the reading of its server's clock")
def _server_offset(store: JobStore, clock: Callable[[], float]) -> float:
    """Seconds the store's PostgreSQL server's clock is ahead of `clock` (0: SQLite)."""
    reading = clock_skew(store.engine, clock)
    return 0.0 if reading is None else -reading.skew
