"""The dispatch policy's vocabulary: a child's slots, a job, the decisions, the statistics.

`policy.Scheduler` takes and returns these (and re-exports them); the supervisor's request book
and the simulator build and read them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from .children import _Child
    from .queues import JobQueues


@dataclass(frozen=True, slots=True)
class ChildSlots:
    """One child as the policy sees it (from its ChildSpec): `capacity` slots for `stage`, its
    share of the traffic (`weight`) and the locks a job on it holds."""

    child_id: str
    stage: str
    capacity: int = 1
    weight: int = 1
    locks: frozenset[str] = frozenset()


class Job(msgspec.Struct):
    """A request waiting for or running on a child; `deadline` is on the caller's clock."""

    request_id: int
    stage: str
    arrival: float
    deadline: float | None = None
    priority: int = 0
    key: int | None = None  # what the breaker compares across children (the book: the miner)
    avoid: frozenset[str] | None = None  # children not to send it to (policy.py's "Errors")
    back: bool = True  # an URGENT job may go back to a child it avoids (policy.py's "Errors")
    #: How much proving it is (a whole WindowPoSt's replicas) and of what (its proof type):
    #: doomed.py compares it with runs as big or smaller. 0: unknown, never refused as doomed.
    size: int = 0
    kind: str = ""


class Start(msgspec.Struct, frozen=True):
    """Send request `request_id` to child `child_id` now."""

    request_id: int
    child_id: str


class Fail(msgspec.Struct, frozen=True):
    """Answer request `request_id` with an error; it was never (or is no longer) on a child."""

    request_id: int
    reason: str
    #: Refused as unable to finish before its deadline (doomed.py): answered as a timeout.
    late: bool = False


class CancelRunning(msgspec.Struct, frozen=True):
    """Cancel running request `request_id` on child `child_id` (it passed its deadline)."""

    request_id: int
    child_id: str
    reason: str


class TakeBack(msgspec.Struct, frozen=True):
    """Request `request_id` waits in child `child_id` behind work that runs long (`reason`):
    cancel it there and queue it again; it has not started, so this costs it no attempt."""

    request_id: int
    child_id: str
    reason: str


Decision = Start | Fail | CancelRunning | TakeBack


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    """A snapshot for `status`: queues, children, locks."""

    queued: dict[str, int]
    nearest_deadline: dict[str, float | None]
    running: dict[str, int]
    children: dict[str, str]
    locks_held: dict[str, str]
    waiting_for_lock: dict[str, tuple[str, ...]]


def statistics_of(
    queues: JobQueues,
    children: Mapping[str, _Child],
    lock_holders: Mapping[str, Mapping[str, int]],
    blocking_locks: Callable[[str], set[str]],
) -> SchedulerStatistics:
    """The Scheduler's statistics from its queues, children and locks."""
    queued: dict[str, int] = dict.fromkeys(queues.stages, 0)
    for _, job in queues.queued.values():
        queued[job.stage] = queued.get(job.stage, 0) + 1
    heads = {stage: queues.peek(queue) for stage, queue in queues.stages.items()}
    nearest = {stage: None if head is None else head.deadline for stage, head in heads.items()}
    waiting = {stage: blocking_locks(stage) for stage, head in heads.items() if head is not None}
    return SchedulerStatistics(
        queued=queued,
        nearest_deadline=nearest,
        running={cid: len(c.running) for cid, c in children.items()},
        children={cid: c.state for cid, c in children.items()},
        locks_held={lock: ",".join(sorted(holders)) for lock, holders in lock_holders.items()},
        waiting_for_lock={stage: tuple(sorted(locks)) for stage, locks in waiting.items() if locks},
    )
