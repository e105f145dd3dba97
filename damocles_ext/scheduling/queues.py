"""Every stage's queue of jobs waiting for a child, in the order the dispatch policy
(`policy.Scheduler`) starts them: earliest deadline first (none last), then the highest
priority, a retry before a fresh job, then the earliest arrival; ties go first in, first out.

Most jobs carry no deadline, the default priority and their first attempt, and arrive in
order: those wait in a plain first-in-first-out lane, the others in a heap ordered by that key,
and the head of the queue is the earlier of the two lanes' heads. Both lanes delete lazily: an
entry is live while `queued[request_id]` carries its token, so a removed job costs nothing
until it reaches a head. The order is the one a single heap of every job gives (a property
test compares them).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque

from mypy_extensions import mypyc_attr

from .decisions import Job

FRESH, RETRY = 1, 0  # retries sort first among equal deadline and priority

_Key = tuple[float, int, int, float]  # (deadline or inf, -priority, FRESH or RETRY, arrival)


class StageQueue:
    """One stage's two lanes (see the module's docstring)."""

    __slots__ = ("fifo", "heap", "last_arrival")

    def __init__(self) -> None:
        self.heap: list[tuple[_Key, int, int]] = []  # (key, token, request id)
        self.fifo: deque[tuple[int, int]] = deque()  # (token, request id), keys in order
        self.last_arrival = -math.inf  # of the latest job in the fifo lane


@mypyc_attr(allow_interpreted_subclasses=True)  # (tests derive from it)
class JobQueues:
    """The stages' queues and what the policy asks of them at once: is a job queued, how many
    wait per stage, how many of them have a deadline."""

    __slots__ = ("_tokens", "length", "queued", "stages", "with_deadline")

    def __init__(self) -> None:
        self.stages: dict[str, StageQueue] = {}
        self.queued: dict[int, tuple[int, Job]] = {}  # request id -> (token, job)
        self.length: dict[str, int] = {}  # live jobs per stage
        self.with_deadline = 0  # queued jobs with a deadline
        self._tokens = itertools.count()

    def push(self, job: Job, tier: int) -> bool:
        """Queue `job` (tier FRESH or RETRY); True if its stage had no queue before."""
        stage = job.stage
        q = self.stages.get(stage)
        new = q is None
        if q is None:
            q = self.stages[stage] = StageQueue()
        token = next(self._tokens)
        rid = job.request_id
        self.queued[rid] = (token, job)
        self.length[stage] = self.length.get(stage, 0) + 1
        if job.deadline is None and job.priority == 0 and tier == FRESH and not job.avoid:
            if job.arrival >= q.last_arrival:
                q.last_arrival = job.arrival
                q.fifo.append((token, rid))
                return new
            key: _Key = (math.inf, 0, tier, job.arrival)
        else:
            self.with_deadline += job.deadline is not None
            deadline = math.inf if job.deadline is None else job.deadline
            key = (deadline, -job.priority, tier, job.arrival)
        heapq.heappush(q.heap, (key, token, rid))
        return new

    def peek(self, q: StageQueue) -> Job | None:
        """The job at the head of the stage's queue, or None if it is empty."""
        queued = self.queued
        fifo, heap = q.fifo, q.heap
        while fifo:
            token, rid = fifo[0]
            live = queued.get(rid)
            if live is not None and live[0] == token:
                if not heap:
                    return live[1]
                break
            fifo.popleft()
        while heap:
            _, token, rid = heap[0]
            live = queued.get(rid)
            if live is not None and live[0] == token:
                break
            heapq.heappop(heap)
        if not heap:
            return queued[fifo[0][1]][1] if fifo else None
        key, token, rid = heap[0]
        if fifo:
            f_token, f_rid = fifo[0]
            f_job = queued[f_rid][1]
            if ((math.inf, 0, FRESH, f_job.arrival), f_token) < (key, token):
                return f_job
        return queued[rid][1]

    def deadline_due(self, now: float) -> bool:
        """Whether a queued job's deadline may be due by `now`: the earliest in a stage's heap
        lane (its removed jobs' entries go lazily: due, maybe, sooner)."""
        for q in self.stages.values():  # noqa: SIM110  (a plain loop: per decision)
            if q.heap and q.heap[0][0][0] <= now:
                return True
        return False

    def pop(self, q: StageQueue, job: Job) -> None:
        """Take `job`, which `peek` just returned, off the head of its stage's queue."""
        if q.fifo and q.fifo[0][1] == job.request_id:
            q.fifo.popleft()
        else:
            heapq.heappop(q.heap)
        self._forget(job)

    def set_aside(self, q: StageQueue) -> tuple[_Key, int, int]:
        """Take the head of the heap lane, which `peek` just returned (a job with `avoid`, so in
        the heap), off it for a while, still queued: `put_back` returns it to its place."""
        return heapq.heappop(q.heap)

    def put_back(self, q: StageQueue, entry: tuple[_Key, int, int]) -> None:
        """Return what `set_aside` took, in its place (its token kept)."""
        heapq.heappush(q.heap, entry)

    def remove(self, request_id: int) -> Job | None:
        """Take the job out wherever it waits (lazily); None if it is not queued."""
        entry = self.queued.get(request_id)
        if entry is None:
            return None
        self._forget(entry[1])
        return entry[1]

    def _forget(self, job: Job) -> None:
        del self.queued[job.request_id]
        self.length[job.stage] -= 1
        self.with_deadline -= job.deadline is not None
