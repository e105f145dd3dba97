"""The supervisor's timers: one heap of callbacks, run by its driver task at their time.

Request timeouts, cancel graces, heartbeats and the stdin watch are entries here; each callback
checks on its own that it is still relevant when it runs.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

import trio


class Timers:
    """A heap of [when, seq, fn]; each fn checks on its own that it is still relevant.

    A timer can also be cancelled (fn set to None): the request timeout of an answered request
    would otherwise keep its closure, and the request's task with it, until it expires, which
    with a long RequestTimeoutSecs is a lot of memory. Cancelled entries are dropped when they
    reach the top, and the heap is rebuilt once they are most of it.
    """

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self.armed = math.inf
        self.wake = trio.Event()

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def add(self, when: float, fn: Callable[[float], None]) -> list[Any]:
        entry = [when, next(self._seq), fn]
        heapq.heappush(self._heap, entry)
        if when < self.armed:
            self.wake.set()
        return entry

    def cancel(self, entry: list[Any] | None) -> None:
        if entry is None or entry[2] is None:
            return
        entry[2] = None
        self._cancelled += 1
        if self._cancelled > 64 and 2 * self._cancelled > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def pop_due(self, now: float) -> list[Callable[[float], None]]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            fn = entry[2]
            entry[2] = None  # fired: a later cancel() of it is a no-op, not a miscount
            if fn is None:
                self._cancelled -= 1
            else:
                due.append(fn)
        return due

    def next(self) -> float:
        while self._heap and self._heap[0][2] is None:
            heapq.heappop(self._heap)
            self._cancelled -= 1
        return self._heap[0][0] if self._heap else math.inf
