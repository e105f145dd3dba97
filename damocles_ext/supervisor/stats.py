"""What `Supervisor.statistics()` returns, and how it is put together from the live objects.

The structs are the public shape (`damocles-ext status`, the metrics and the control socket's
Stats read them); `build_statistics` is the only code that knows how a child's record, its
process and the scheduler's own statistics turn into them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec
import trio

from ..config.startup import env_value

if TYPE_CHECKING:
    from ..lifecycle import RequestBook
    from .child_loop import Child

# The states a child is reported in: ChildState's values, and "busy" (ready, with work).
CHILD_STATES = ("starting", "ready", "busy", "backoff", "fatal", "stopping", "stopped")


class ExitingProcess(msgspec.Struct, frozen=True):
    """A process of a child that went down still alive (killed) and has not exited yet: the
    scheduler locks it held (its GPU) stay held until it does (scheduling/holds.py)."""

    pid: int | None
    locks: tuple[str, ...]
    since: float  # unix seconds: when it went down


class ChildStats(msgspec.Struct, frozen=True):
    """One child as `statistics()` sees it (times: unix seconds; durations: seconds)."""

    name: str
    stage: str
    index: int
    pid: int | None
    gpu: str | None
    state: str  # one of CHILD_STATES
    next_start_in: float | None  # seconds until the next start, in "backoff" (or a retried "fatal")
    in_flight: int
    capacity: int
    done: int  # requests answered with an output
    failed: int  # requests answered with an error, or lost with the child
    restarts: int
    last_exit: str | None  # e.g. "killed by SIGKILL (request 7 timed out)"
    started_at: float | None  # when the current (or last) process was spawned
    protocol: str | None
    locks: tuple[str, ...] = ()  # the locks it needs to run a request (config: Locks, GpuLock)
    locks_held: tuple[str, ...] = ()  # those the scheduler holds for its running requests now
    # The TMPDIR it runs with (its Envs', else ours unless InheritEnvs = false), None without
    # one: where bellperson keeps its lock files (/tmp without one).
    tmpdir: str | None = None
    start_refused: bool = False  # its last start ended in exit code 2: its prover cannot load
    benched_for: float | None = None  # seconds left of its bench (scheduling/breaker.py)
    on_probation: bool = False  # benched before, one request at a time until a proof
    exiting: tuple[ExitingProcess, ...] = ()  # its processes killed and not exited yet


class StageStats(msgspec.Struct, frozen=True):
    """One stage's queue."""

    stage: str
    queued: int
    nearest_deadline: float | None  # unix seconds
    waiting_for_lock: tuple[str, ...] = ()  # locks its queue head waits for
    retries: int = 0  # requests queued again after an attempt failed (error, timeout, child lost)


class SupervisorStats(msgspec.Struct, frozen=True):
    """A snapshot of the whole supervisor."""

    children: list[ChildStats]
    stages: dict[str, StageStats]
    requests: int  # submitted and not yet answered
    shutting_down: bool


def _bench(book: RequestBook, name: str, now: float) -> tuple[float | None, bool]:
    """(seconds left of the child's bench or None, whether it is on probation)."""
    streak = book.scheduler.breaker.streak(name)
    if streak.benched_until > now:
        return streak.benched_until - now, False
    return None, streak.benches > 0


def build_statistics(
    children: Iterable[Child], book: RequestBook, shutting_down: bool
) -> SupervisorStats:
    """The snapshot of `children` and of `book`: its queues, its requests not yet answered."""
    now = trio.current_time()
    to_unix = time.time() - now
    sched = book.scheduler.statistics()
    held_by: dict[str, list[str]] = {}
    for lock, holders in sched.locks_held.items():
        for holder in holders.split(","):
            held_by.setdefault(holder, []).append(lock)
    children = list(children)
    child_stats = []
    for c in children:
        p = c.p
        in_flight = book.in_flight(c.name)
        done, failed = book.counters(c.name)
        state = c.state.value
        if state == "ready" and in_flight:
            state = "busy"
        benched_for, on_probation = _bench(book, c.name, now)
        child_stats.append(
            ChildStats(
                name=c.name,
                stage=c.spec.stage,
                index=c.spec.index,
                pid=c.pid if p is not None else None,
                gpu=c.spec.gpu,
                state=state,
                next_start_in=(
                    max(0.0, c.next_start_at - now)
                    if state in ("backoff", "fatal") and c.next_start_at is not None
                    else None
                ),
                in_flight=in_flight,
                capacity=c.capacity,
                done=done,
                failed=failed,
                restarts=c.tracker.restarts,
                last_exit=c.last_exit,
                started_at=c.started_at,
                protocol=c.protocol,
                locks=tuple(c.spec.locks),
                locks_held=tuple(sorted(held_by.get(c.name, ()))),
                tmpdir=env_value(c.spec.inherit_envs, c.spec.envs, "TMPDIR"),
                start_refused=c.start_refused,
                benched_for=benched_for,
                on_probation=on_probation,
                exiting=tuple(
                    ExitingProcess(pid, tuple(sorted(locks)), since + to_unix)
                    for pid, locks, since in book.exiting(c.name)
                ),
            )
        )
    stage_names = sorted({c.spec.stage for c in children} | set(sched.queued))
    stages = {}
    for stage in stage_names:
        nearest = sched.nearest_deadline.get(stage)
        stages[stage] = StageStats(
            stage=stage,
            queued=sched.queued.get(stage, 0),
            nearest_deadline=None if nearest is None else nearest + to_unix,
            waiting_for_lock=tuple(sched.waiting_for_lock.get(stage, ())),
            retries=book.retried.get(stage, 0),
        )
    return SupervisorStats(
        children=child_stats,
        stages=stages,
        requests=book.unanswered,
        shutting_down=shutting_down,
    )
