"""What the job store looks like at one moment, for `status --jobs` and the metrics: the
jobs by state, the oldest ready job, the live workers and the ready jobs none of them may take.

The store (store.py) reads a few aggregate rows (counts by kind, ready jobs grouped by miner
and proof type, the workers' last allocation specs) and `summarize` turns them into a
`JobsSummary`. Nothing here reads a clock or a database, so the rules of "live" and
"unallocatable" are tested with plain values.

A worker is live when it was seen (an allocation, a heartbeat, a ping) within `live_window`
seconds. The default is 2 minutes: an idle damocles-worker asks for a job every
`recover_interval` (60 s by default), so a live idle worker is seen at least once in any
window of 2 minutes, and one that missed two polls in a row is taken for gone. Workers are kept
in the store, not in a coordinator's memory, so several coordinators on one PostgreSQL see the
same workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from .listing import go_duration, tabwrite
from .rules import AllocationSpec

SCHEMA: Final = "damocles-ext/jobs/1"
DEFAULT_LIVE_WINDOW: Final = 120.0

# The kinds a job is counted under: its state, with finished split by how it ended.
KINDS: Final = ("ready2run", "running", "finished-ok", "finished-failed", "cancelled")


class WorkerSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A worker's allocation filters as stored (damocles' AllocateWdPoStJobSpec names)."""

    AllowedMiners: list[int] = []
    AllowedProofTypes: list[str] = []


_spec_encoder = msgspec.json.Encoder()
_spec_decoder = msgspec.json.Decoder(WorkerSpec)


def spec_key(spec: AllocationSpec) -> str:
    """The stored form of a spec: sorted and deduplicated, so the same filters are one row."""
    return _spec_encoder.encode(
        WorkerSpec(sorted(set(spec.allowed_miners)), sorted(set(spec.allowed_proof_types)))
    ).decode()


def spec_digest(key: str) -> str:
    """The stored spec's key in the workers table: SHA-256 of `spec_key`, in hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def spec_of_key(key: str) -> AllocationSpec:
    """The spec a stored key stands for; a damaged one is taken as "any" (counts nothing as
    unallocatable rather than hiding the worker)."""
    try:
        spec = _spec_decoder.decode(key)
    except msgspec.MsgspecError:
        return AllocationSpec()
    return AllocationSpec(tuple(spec.AllowedMiners), tuple(spec.AllowedProofTypes))


@dataclass(frozen=True, slots=True)
class ReadyGroup:
    """Ready jobs of one miner and proof type: how many, and the oldest one's CreatedAt."""

    miner: int
    proof_type: str
    jobs: int
    oldest_created_at: int


@dataclass(frozen=True, slots=True)
class WorkerSeen:
    """One worker's last allocation with one spec (a worker may run threads with different
    filters: each spec is its own row), and when the worker was last seen."""

    worker: str
    spec: AllocationSpec
    last_seen: float


class WorkerStatus(msgspec.Struct, frozen=True):
    """A live worker with one of its specs, as `status --jobs --json` shows it."""

    worker: str
    allowed_miners: list[int]
    allowed_proof_types: list[str]
    last_seen: float
    last_seen_ago: float
    #: Its job slots paused (no job on them: prover failures, an operator) as its last ping
    #: said, and how many slots it has; 0 and 0 when none is; None when the store cannot say.
    paused_slots: int | None = None
    slots: int | None = None


class UnallocatableGroup(msgspec.Struct, frozen=True):
    """Ready jobs of one miner and proof type that no live worker may take."""

    miner: int
    proof_type: str
    jobs: int


class JobsSummary(msgspec.Struct, frozen=True):
    """What `damocles-ext status --jobs URL --json` prints (every field is in docs/STATUS.md)."""

    schema: str
    time: float
    store: str
    jobs: dict[str, int]
    total: int
    oldest_ready_job: str | None
    oldest_ready_created_at: int | None
    oldest_ready_age: float | None
    unallocatable: int
    unallocatable_groups: list[UnallocatableGroup]
    live_window: float
    live_workers: int
    workers: list[WorkerStatus]
    #: Live workers with a job slot paused; None when the store cannot say (before version 5).
    paused_workers: int | None = None


def live(workers: Iterable[WorkerSeen], now: float, window: float) -> list[WorkerSeen]:
    """The workers seen within `window` seconds before `now`. One seen more than `window` after
    `now` was seen before the wall clock stepped back, and not since: it is not counted (a live
    one is seen again, and stamped with the new time, within the window)."""
    return [w for w in workers if now - window <= w.last_seen <= now + window]


def admitted(group: ReadyGroup, specs: Iterable[AllocationSpec]) -> bool:
    """Whether any of these specs lets its worker take the group's jobs (as AllocationSpec.admits
    does for one job: an empty list means any)."""
    return any(
        (not s.allowed_miners or group.miner in s.allowed_miners)
        and (not s.allowed_proof_types or group.proof_type in s.allowed_proof_types)
        for s in specs
    )


def summarize(
    *,
    counts: dict[str, int],
    ready: Sequence[ReadyGroup],
    oldest_ready: tuple[str, int] | None,
    workers: Iterable[WorkerSeen],
    now: float,
    live_window: float = DEFAULT_LIVE_WINDOW,
    store: str = "",
    pauses: Mapping[str, tuple[int, int]] | None = None,
) -> JobsSummary:
    """The summary from the store's aggregate rows. `counts` is by KINDS (a missing kind is 0);
    `oldest_ready` is the (id, CreatedAt) of the ready job created first, if any; `pauses`,
    (paused, slots) by worker as its last ping within the live window said (a worker not in it:
    none said), None when the store cannot say (before schema version 5)."""
    unknown = set(counts) - set(KINDS)
    if unknown:
        raise ValueError(f"not a job kind: {sorted(unknown)} (kinds: {', '.join(KINDS)})")
    alive = sorted(live(workers, now, live_window), key=lambda w: (w.worker, spec_key(w.spec)))
    specs = [w.spec for w in alive]
    lost = [g for g in ready if not admitted(g, specs)]
    jobs = {kind: counts.get(kind, 0) for kind in KINDS}
    return JobsSummary(
        schema=SCHEMA,
        time=now,
        store=store,
        jobs=jobs,
        total=sum(jobs.values()),
        oldest_ready_job=None if oldest_ready is None else oldest_ready[0],
        oldest_ready_created_at=None if oldest_ready is None else oldest_ready[1],
        oldest_ready_age=None if oldest_ready is None else max(0.0, now - oldest_ready[1]),
        unallocatable=sum(g.jobs for g in lost),
        unallocatable_groups=[
            UnallocatableGroup(g.miner, g.proof_type, g.jobs)
            for g in sorted(lost, key=lambda g: (g.miner, g.proof_type))
        ],
        live_window=live_window,
        live_workers=len({w.worker for w in alive}),
        workers=[
            WorkerStatus(
                worker=w.worker,
                allowed_miners=list(w.spec.allowed_miners),
                allowed_proof_types=list(w.spec.allowed_proof_types),
                last_seen=w.last_seen,
                last_seen_ago=max(0.0, now - w.last_seen),
                paused_slots=None if pauses is None else pauses.get(w.worker, (0, 0))[0],
                slots=None if pauses is None else pauses.get(w.worker, (0, 0))[1],
            )
            for w in alive
        ],
        paused_workers=(
            None
            if pauses is None
            else len({w.worker for w in alive if pauses.get(w.worker, (0, 0))[0]})
        ),
    )


# --- the table `damocles-ext status --jobs` prints ----------------------------------------------


def _ago(seconds: float) -> str:
    return go_duration(int(seconds)) + " ago"


def _names(values: Sequence[object]) -> str:
    return ",".join(str(v) for v in values) if values else "any"


def _paused(w: WorkerStatus) -> str:
    """The PAUSED column: "2 of 4 slots", "no", or "?" (a store before version 5)."""
    if w.paused_slots is None:
        return "?"
    return f"{w.paused_slots} of {w.slots} slots" if w.paused_slots else "no"


def render(s: JobsSummary) -> str:
    """The summary for people: jobs by state, the oldest ready job, live workers, and the ready
    jobs no live worker may take (with their miner and proof type, to see which filter lacks)."""
    out = [f"job store {s.store}\n\n"]
    out.append(tabwrite([["STATE", "JOBS"], *([k, str(s.jobs[k])] for k in KINDS),
                         ["total", str(s.total)]]))  # fmt: skip
    out.append("\n")
    if s.oldest_ready_job is None:
        out.append("oldest ready job: none\n")
    else:
        assert s.oldest_ready_age is not None
        out.append(f"oldest ready job: {s.oldest_ready_job}, created {_ago(s.oldest_ready_age)}\n")
    window = go_duration(s.live_window)
    out.append(f"live workers (seen in the last {window}): {s.live_workers}\n")
    if s.paused_workers:
        out.append(
            f"paused workers: {s.paused_workers} (a slot paused takes no job: prover failures"
            " in a row, or an operator; the worker's log or status says which)\n"
        )
    if s.workers:
        out.append("\n")
        rows = [["WORKER", "MINERS", "PROOF TYPES", "LAST SEEN", "PAUSED"]]
        rows += [[w.worker, _names(w.allowed_miners), _names(w.allowed_proof_types),
                  _ago(w.last_seen_ago), _paused(w)] for w in s.workers]  # fmt: skip
        out.append(tabwrite(rows))
    out.append("\n")
    if not s.unallocatable:
        out.append("unallocatable: none (every ready job has a live worker that may take it)\n")
        return "".join(out)
    why = "no worker is live" if not s.live_workers else "no live worker's filters admit them"
    jobs = "job" if s.unallocatable == 1 else "jobs"
    out.append(f"unallocatable: {s.unallocatable} ready {jobs} ({why})\n\n")
    rows = [["MINER", "PROOF TYPE", "JOBS"]]
    rows += [[str(g.miner), g.proof_type, str(g.jobs)] for g in s.unallocatable_groups]
    out.append(tabwrite(rows))
    return "".join(out)
