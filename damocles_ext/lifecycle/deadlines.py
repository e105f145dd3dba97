"""The book's alarm clock: a heap of (when, what) it must look at again, with lazy deletion.

Entries carry data, not callbacks: the book checks, when one comes due, whether it still applies
(the request may have been answered, the process may be gone). Cancelled entries drop their
payload at once, so an answered request with an hour-long RequestTimeoutSecs is not kept alive
for that hour; they leave the heap when they reach the top, or all at once when they are most
of it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

_REBUILD_AFTER = 64  # cancelled entries before a rebuild is worth it (and only if most are)


@dataclass(order=True, slots=True)
class Alarm(Generic[T]):
    """One entry: `payload` is None once cancelled or fired."""

    when: float
    seq: int
    payload: T | None = field(compare=False)


class Alarms(Generic[T]):
    """A min-heap of `Alarm`s; `pop_due(now)` returns the payloads due at `now`, in time order."""

    def __init__(self) -> None:
        self._heap: list[Alarm[T]] = []
        self._seq = itertools.count()
        self._cancelled = 0

    def __len__(self) -> int:
        """Live (not cancelled, not fired) entries."""
        return len(self._heap) - self._cancelled

    def add(self, when: float, payload: T) -> Alarm[T]:
        alarm = Alarm(when, next(self._seq), payload)
        heapq.heappush(self._heap, alarm)
        return alarm

    def cancel(self, alarm: Alarm[T] | None) -> None:
        if alarm is None or alarm.payload is None:
            return
        alarm.payload = None
        self._cancelled += 1
        if self._cancelled > _REBUILD_AFTER and 2 * self._cancelled > len(self._heap):
            self._heap = [a for a in self._heap if a.payload is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def pop_due(self, now: float) -> list[T]:
        due: list[T] = []
        while self._heap and self._heap[0].when <= now:
            alarm = heapq.heappop(self._heap)
            payload = alarm.payload
            alarm.payload = None  # fired: a later cancel() of it is a no-op, not a miscount
            if payload is None:
                self._cancelled -= 1
            else:
                due.append(payload)
        return due

    def due(self, now: float) -> bool:
        """Whether an entry is due at `now` (maybe a cancelled one, which pop_due drops)."""
        heap = self._heap
        return bool(heap) and heap[0].when <= now

    def next(self) -> float:
        """When the earliest live entry is due (inf if none)."""
        heap = self._heap
        while heap and heap[0].payload is None:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0].when if heap else math.inf
