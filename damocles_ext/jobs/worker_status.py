"""The `worker` part of a status document (`damocles-ext status` against a worker's control
socket): the manager it pulls from, its name, its counters and the jobs it holds; and how
`status` prints it. Sans-IO: times come in as arguments.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable

import msgspec

from ..logs import controls_escaped
from .listing import tabwrite


class WorkerJobStatus(msgspec.Struct, frozen=True):
    """One job the worker holds. `elapsed` is seconds since it was allocated; `heartbeat_age`
    seconds since the manager last took its heartbeat (None: not yet); `lease` is "leased"
    (our coordinator's fencing token), "none" (damocles-manager gives no lease) or
    "stopped: REASON" once the manager took the job back."""

    id: str
    miner: int
    deadline_idx: int
    partitions: list[int]
    sectors: int
    try_num: int
    state: str  # proving | finishing (its result being delivered)
    child: str | None  # the child its current attempt runs on; None while it waits for one
    elapsed: float
    heartbeat_age: float | None
    lease: str
    delivery_failures: int


class WorkerPart(msgspec.Struct, frozen=True):
    """What a worker adds to the supervisor's status document."""

    manager: str  # the RPC URL
    name: str | None
    api: str  # "Dext" (our coordinator) or "Venus" (damocles-manager)
    manager_reachable: bool
    max_jobs: int | None
    pulled: int
    delivered: int
    failed: int
    stopped: int
    given_up: int
    jobs: list[WorkerJobStatus]
    #: The sector-location service's section (`worker --proxy`; docs/SECTORS.md), or None.
    sectors: dict[str, object] | None = None
    #: Pauses in taking jobs since it started (after prover failures in a row, and after
    #: allocations whose jobs all failed before a prover).
    pauses: int = 0
    #: While it takes no job: until when (unix seconds), for how many seconds more, the rule
    #: (`prover_failures`, `unproved_jobs`) and why; all None when it is not paused.
    paused_until: float | None = None
    paused_for: float | None = None
    paused_reason: str | None = None
    paused_why: str | None = None


def lease_state(lease: str | None, stop_reason: str | None) -> str:
    """The LEASE column: what the worker knows of its hold on the job."""
    if stop_reason is not None:
        return f"stopped: {stop_reason}"
    return "none" if lease is None else "leased"


def render_worker(part: WorkerPart, fmt: Callable[[float | None], str]) -> list[str]:
    """The worker's lines of `damocles-ext status` (after the supervisor's tables); `fmt`
    writes a duration."""
    head = (
        f"worker {part.name or '-'} pulls from {part.manager} ({part.api}"
        f"{'' if part.manager_reachable else ', UNREACHABLE'}): {part.pulled} pulled,"
        f" {part.delivered} delivered, {part.failed} failed, {part.stopped} stopped by the"
        f" manager, {part.given_up} given up"
    )
    if part.max_jobs is not None:
        head += f", at most {part.max_jobs} at once"
    lines = ["", head]
    if part.paused_until is not None:
        # Shown in the reader's local time, as the supervisor's tables.
        at = _dt.datetime.fromtimestamp(part.paused_until, _dt.UTC).astimezone()
        left = "" if part.paused_for is None else f" (in {fmt(part.paused_for)})"
        why = controls_escaped(part.paused_why or "")  # (a manager's or a prover's words)
        lines.append(f"PAUSED until {at:%H:%M:%S}{left}: {why}")
    if not part.jobs:
        return [*lines, "no job held"]
    headers = ["JOB", "MINER", "DDL", "PARTITIONS", "SECTORS", "TRY", "STATE", "CHILD", "ELAPSED",
               "HEARTBEAT", "LEASE"]  # fmt: skip
    rows = [
        [
            j.id,
            str(j.miner),
            str(j.deadline_idx),
            ",".join(map(str, j.partitions)) or "-",
            str(j.sectors),
            str(j.try_num),
            j.state,
            j.child or "-",
            fmt(j.elapsed),
            f"{fmt(j.heartbeat_age)} ago" if j.heartbeat_age is not None else "-",
            j.lease,
        ]
        for j in part.jobs
    ]
    rows = [[controls_escaped(cell) for cell in row] for row in rows]  # (a manager's words)
    return [*lines, *(line.rstrip() for line in tabwrite([headers, *rows]).splitlines())]
