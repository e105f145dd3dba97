"""Every rule of a WindowPoSt job's life, in one place: events in, the new record and effects out.

`apply(job, event, now, limits)` takes the current record (None when there is no such job), one
event and the time, and returns a `Step`: the record as it must be stored afterwards (None when
the job is gone) and what happened (`effects`). Nothing here reads a clock, a database or a
random source: the store (store.py) reads the rows, calls `apply`, and writes what it returns
in the same transaction; tests call `apply` directly.

damocles' transitions (damocles-manager's kvJobManager), kept:

| event     | from                               | to        | changes                                     |
|-----------|------------------------------------|-----------|---------------------------------------------|
| Create    | no such job                        | ready2run | CreatedAt=UpdatedAt=now, TryNum=0           |
| Create    | any                                | same      | nothing (the id is the input's hash)        |
| Allocate  | ready2run                          | running   | TryNum+1, Started/Heartbeat/UpdatedAt=now, WorkerName |
| Heartbeat | running                            | running   | HeartbeatAt=UpdatedAt=now                   |
| Finish    | running                            | finished  | Output, ErrorReason, FinishedAt=UpdatedAt=now |
| Sweep     | running, HeartbeatAt < now-timeout | finished  | ErrorReason="heartbeat timeout", Output=None |
| Sweep     | finished, error, TryNum < max_try  | ready2run | ErrorReason, Output, StartedAt, FinishedAt cleared |
| Reset     | any                                | ready2run | TryNum=0, CreatedAt=now, the rest cleared   |
| Remove    | any (none: a silent success)       | gone      |                                             |
| Cleanup   | finished, CreatedAt < now-lifetime | gone      |                                             |

What we change and add (damocles' weaknesses):

- Fencing. Each allocation gets a lease token (`Allocate.lease`, made by the caller). A Heartbeat
  or Finish that carries a token is accepted only from the current lease of a running job. One
  without a token (damocles-worker sends none) is accepted only for a running job, and only from
  its WorkerName when the caller knows the worker's name; a failure without either is refused
  for a job given out through Dext (its lease begins SENT_LEASE: its worker sends it). damocles
  accepts a finish from anyone in any state and lets a heartbeat revive a job that was already
  given to another worker; both are refused here, so a worker that lost its job cannot overwrite
  the result.
- A repeated finish. A finished job keeps the lease that finished it, so the same Finish sent
  again (a worker whose answer was lost when the coordinator died after storing it) is
  acknowledged without touching the record (`FinishRepeated`), instead of being refused as late:
  from the same lease, or, without one, from the worker that finished it, or, with neither (a
  damocles-worker's), when it carries the stored result word for word. A job cancelled, or
  taken back for a heartbeat timeout, was finished by nobody: no repeat of it.
- A late proof. A worker whose job was taken back (its heartbeats stopped) may still finish it:
  a proof (an output, no error) for a job that no worker holds and whose outcome is not final
  (ready2run again after a try, or failed with a try left; not one an operator reset) and whose
  deadline has not passed is taken, as damocles takes it, and spares proving it again. A failure from it, or anything for a job running on
  another worker or done, stays refused: no result is overwritten.
- Deadlines. `Create.not_after` (unix seconds): allocation takes the job whose deadline comes
  first (`allocation_key`), never allocates a job whose deadline passed, and a Sweep cancels an
  unfinished job (ready, running, or failed with tries left) once `now >= not_after`: finished,
  ErrorReason says why, `cancelled_at` set, never retried. A Finish after the deadline is refused.
- The limits (`JobLimits`) are passed to every call, so a changed JobMaxTry applies at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import msgspec

from .model import (
    FINISHED,
    HEARTBEAT_TIMEOUT_REASON,
    READY,
    RUNNING,
    JobOutput,
    JobRecord,
    WdPoStInput,
    job_id,
)

# damocles' defaults ([Common.Proving.WorkerProver] and the manager's timers).
DEFAULT_JOB_MAX_TRY: Final = 2
DEFAULT_HEARTBEAT_TIMEOUT: Final = 15.0
DEFAULT_JOB_LIFETIME: Final = 25 * 3600.0
DEFAULT_SWEEP_INTERVAL: Final = 10.0
DEFAULT_CLEANUP_INTERVAL: Final = 30 * 60.0
DEFAULT_POLL_INTERVAL: Final = 3.0
#: damocles' JobMaxTry and TryNum are uint32s.
MAX_JOB_MAX_TRY: Final = 2**32 - 1
#: A stored HeartbeatAt more than this ahead of a heartbeat's time was stamped before the wall
#: clock stepped back: the heartbeat replaces it. A heartbeat delayed by a stalled store is
#: never this late (a store call gives up after 60 s), nor are coordinators this far apart
#: (they warn at 2 s).
STAMP_AHEAD_MAX: Final = 120.0


@dataclass(frozen=True, slots=True)
class JobLimits:
    """The worker-prover settings, with damocles' names in the comments and its defaults."""

    max_try: int = DEFAULT_JOB_MAX_TRY  # JobMaxTry: allocations a job may have in all
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT  # HeartbeatTimeout
    job_lifetime: float = DEFAULT_JOB_LIFETIME  # JobLifetime: finished jobs older are removed
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL  # damocles: 10 s, fixed; see sweep_every
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL  # damocles: 30 min, fixed
    poll_interval: float = DEFAULT_POLL_INTERVAL  # a producer's look for results; damocles: 3 s

    def __post_init__(self) -> None:
        if type(self.max_try) is not int or not 1 <= self.max_try <= MAX_JOB_MAX_TRY:  # (no bool)
            raise ValueError(
                f"JobMaxTry must be a whole number from 1 to {MAX_JOB_MAX_TRY}, not {self.max_try!r}"
            )
        for name in ("heartbeat_timeout", "job_lifetime", "sweep_interval", "cleanup_interval",
                     "poll_interval"):  # fmt: skip
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, not {value!r}")


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Create:
    input: WdPoStInput
    deadline_idx: int = 0
    partitions: tuple[int, ...] | None = None
    not_after: float | None = None


#: How a lease given through `Dext.AllocateJobs` begins: its worker sends it with every call, so
#: a failure without one is not its (`_finish`); damocles-workers never see theirs (Venus').
SENT_LEASE = "dext-"


@dataclass(frozen=True, slots=True)
class Allocate:
    worker: str
    lease: str  # a fresh token, unique to this allocation (the store makes it)
    sent_back: bool = False  # the worker carries the lease (Dext): it is marked SENT_LEASE


@dataclass(frozen=True, slots=True)
class Heartbeat:
    worker: str
    lease: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    output: JobOutput | None
    error_reason: str
    lease: str | None = None
    worker: str | None = None  # for a tokenless finish, when the caller knows who sent it


@dataclass(frozen=True, slots=True)
class Sweep:
    """The periodic pass: cancel past-deadline jobs, time out silent ones, retry failed ones.

    A running job's silence counts from `heard_since` at the earliest (unix seconds): a
    coordinator passes the time it started serving, since no worker could heartbeat to it
    before; its first passes after a restart then take back no job for the outage's silence.
    A running job last heard from before `silent_before` is silent (default: now minus
    HeartbeatTimeout); a coordinator passes an earlier time when some of that time could not be
    heard (silence.Hearing: its store unavailable, its wall clock stepped)."""

    heard_since: float = 0.0
    silent_before: float | None = None


@dataclass(frozen=True, slots=True)
class Cleanup:
    """The rarer pass: forget finished jobs older than JobLifetime."""


@dataclass(frozen=True, slots=True)
class Reset:
    pass


@dataclass(frozen=True, slots=True)
class Remove:
    pass


Event = Create | Allocate | Heartbeat | Finish | Sweep | Cleanup | Reset | Remove


# --- effects ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Created:
    job_id: str


@dataclass(frozen=True, slots=True)
class AlreadyExists:
    job_id: str
    state: str


@dataclass(frozen=True, slots=True)
class Allocated:
    job_id: str
    worker: str
    lease: str
    try_num: int


@dataclass(frozen=True, slots=True)
class HeartbeatAccepted:
    job_id: str


@dataclass(frozen=True, slots=True)
class Finished:
    job_id: str
    error_reason: str  # "" = success


@dataclass(frozen=True, slots=True)
class FinishRepeated:
    """The finish that finished this job, sent again: acknowledged, the record unchanged."""

    job_id: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The event was not applied to this job; `reason` says why, for the one who sent it."""

    job_id: str
    event: str
    reason: str


@dataclass(frozen=True, slots=True)
class TimedOut:
    job_id: str
    worker: str


@dataclass(frozen=True, slots=True)
class Retried:
    job_id: str
    try_num: int  # tries used so far


@dataclass(frozen=True, slots=True)
class JobCancelled:
    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class WasReset:
    job_id: str


@dataclass(frozen=True, slots=True)
class Removed:
    job_id: str


@dataclass(frozen=True, slots=True)
class CleanedUp:
    job_id: str


@dataclass(frozen=True, slots=True)
class NotFound:
    job_id: str
    event: str


Effect = (
    Created | AlreadyExists | Allocated | HeartbeatAccepted | Finished | FinishRepeated | Refused
    | TimedOut | Retried | JobCancelled | WasReset | Removed | CleanedUp | NotFound
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Step:
    """What one event did: the record to store (None: no such job / removed) and the effects."""

    job: JobRecord | None
    effects: tuple[Effect, ...]


# --- the rules ----------------------------------------------------------------------------------


def _seconds(now: float) -> int:
    # damocles keeps unix seconds; a float clock is truncated as Go's time.Now().Unix() is.
    return int(now)


def _when(at: float) -> str:
    try:
        return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # a row's deadline out of the years 1-9999
        return f"{at:.0f} (unix seconds)"


def _replace(job: JobRecord, **changes: object) -> JobRecord:
    return msgspec.structs.replace(job, **changes)


def deadline_passed(job: JobRecord, now: float) -> bool:
    return job.not_after is not None and now >= job.not_after


#: The coordinator sweeps at least this many times per HeartbeatTimeout (sweep_every).
SWEEPS_PER_HEARTBEAT_TIMEOUT: Final = 4
#: The shortest pause between two sweeps (heartbeats are stamped in whole seconds anyway).
MIN_SWEEP_INTERVAL: Final = 0.25


def sweep_every(limits: JobLimits) -> float:
    """Seconds between two sweeps: damocles' 10 s (`sweep_interval`), but at most a quarter of
    HeartbeatTimeout, so that a dead worker's job is given back at most that quarter after its
    timeout (3.75 s with damocles' 15 s; a fixed 10 s would add up to 10 s, more than the
    timeout itself once it is set short); never under MIN_SWEEP_INTERVAL, whatever the timeout
    (a nanosecond one swept without a pause, holding the store's write lock)."""
    every = min(limits.sweep_interval, limits.heartbeat_timeout / SWEEPS_PER_HEARTBEAT_TIMEOUT)
    return max(every, min(limits.sweep_interval, MIN_SWEEP_INTERVAL))


def silent_before(event: Sweep, now: float, limits: JobLimits) -> float:
    """Running jobs last heard from before this are silent (`event.silent_before`, or now
    minus HeartbeatTimeout, whichever is earlier)."""
    limit = now - limits.heartbeat_timeout
    return limit if event.silent_before is None else min(limit, event.silent_before)


def retryable(job: JobRecord, limits: JobLimits) -> bool:
    """A failed job that the next Sweep puts back to ready2run."""
    return (
        job.State == FINISHED
        and job.ErrorReason != ""
        and not job.cancelled
        and job.TryNum < limits.max_try
    )


def is_done(job: JobRecord, limits: JobLimits) -> bool:
    """Whether the job's outcome is final: what a waiting producer answers with.

    damocles' `Finished(maxTry)`: finished with no error, or with an error and no tries left;
    and here also cancelled."""
    return job.State == FINISHED and not retryable(job, limits)


def new_job(
    job_input: WdPoStInput,
    now: float,
    *,
    deadline_idx: int = 0,
    partitions: Sequence[int] | None = None,
    not_after: float | None = None,
) -> JobRecord:
    """A new ready2run record for this input (damocles' Create)."""
    t = _seconds(now)
    return JobRecord(
        Id=job_id(job_input),
        State=READY,
        DeadlineIdx=deadline_idx,
        Partitions=None if partitions is None else tuple(partitions),
        Input=job_input,
        Output=None,
        TryNum=0,
        ErrorReason="",
        WorkerName="",
        StartedAt=0,
        HeartbeatAt=0,
        FinishedAt=0,
        CreatedAt=t,
        UpdatedAt=t,
        # A float, as the store's column reads back: an int here would make equal records differ.
        not_after=None if not_after is None else float(not_after),
    )


def _create(job: JobRecord | None, event: Create, now: float, limits: JobLimits) -> Step:
    if job is not None:
        return Step(job, (AlreadyExists(job.Id, job.State),))
    made = new_job(
        event.input,
        now,
        deadline_idx=event.deadline_idx,
        partitions=event.partitions,
        not_after=event.not_after,
    )
    return Step(made, (Created(made.Id),))


def _allocate(job: JobRecord, event: Allocate, now: float, limits: JobLimits) -> Step:
    if job.State != READY:
        return Step(job, (Refused(job.Id, "allocate", f"the job is {job.State}"),))
    if deadline_passed(job, now):
        return Step(job, (Refused(job.Id, "allocate", "its deadline has passed"),))
    t = _seconds(now)
    allocated = _replace(
        job,
        State=RUNNING,
        TryNum=job.TryNum + 1,
        StartedAt=t,
        HeartbeatAt=t,
        UpdatedAt=t,
        WorkerName=event.worker,
        lease=(lease := (SENT_LEASE if event.sent_back else "") + event.lease),
    )
    return Step(allocated, (Allocated(job.Id, event.worker, lease, allocated.TryNum),))


def _fence(job: JobRecord, lease: str | None, worker: str | None) -> str | None:
    """Why this worker may not touch this job now, or None when it may."""
    if job.State != RUNNING:
        return f"the job is {job.State}, not running: its result is no longer expected from you"
    if lease is not None:
        if lease != job.lease:
            return (
                f"lease {lease!r} is not the job's current one (try {job.TryNum}, "
                f"worker {job.WorkerName!r}): the job was given to another worker"
            )
    elif worker is not None and worker != job.WorkerName:
        return f"the job runs on worker {job.WorkerName!r}, not {worker!r}"
    return None


def _heartbeat(job: JobRecord, event: Heartbeat, now: float, limits: JobLimits) -> Step:
    why = _fence(job, event.lease, event.worker)
    if why is not None:
        return Step(job, (Refused(job.Id, "heartbeat", why),))
    t = _seconds(now)
    # Never back: a heartbeat stamped before one already stored (it waited through a stall)
    # says nothing newer. One stored far ahead of now was stamped before the wall clock
    # stepped back: kept, it would hide every later heartbeat until the clock regained the step.
    heard = t if job.HeartbeatAt > t + STAMP_AHEAD_MAX else max(job.HeartbeatAt, t)
    return Step(_replace(job, HeartbeatAt=heard, UpdatedAt=t), (HeartbeatAccepted(job.Id),))


def _repeated(job: JobRecord, event: Finish, reason: str) -> bool:
    """Whether `event` is the finish that finished `job`, sent again."""
    if job.State != FINISHED or job.cancelled or job.ErrorReason == HEARTBEAT_TIMEOUT_REASON:
        return False
    if event.lease is not None:
        return event.lease == job.lease
    if event.worker is not None:
        return event.worker == job.WorkerName
    # Neither a token nor a name (damocles-worker's finish): the same result, word for word.
    return event.output == job.Output and reason == job.ErrorReason


def _late_but_wanted(job: JobRecord, event: Finish, reason: str, limits: JobLimits) -> bool:
    """A proof from a worker that lost its job, for a job no worker holds and whose outcome is
    not final: ready2run again (its heartbeats stopped, it was taken back), or failed with a try
    left. Taking it spares proving it again; a failure from that worker is not taken (the
    timeout counted its try), nor anything for a job that runs on another worker or is done."""
    # Ready again after a try: not reset by an operator (TryNum 0), nor never given out.
    again = job.State == READY and job.TryNum > 0
    return event.output is not None and reason == "" and (again or retryable(job, limits))


#: The ErrorReason of a finish with neither an output nor an error (a damocles-worker's when its
#: error's text is empty): a failure, tried again while tries are left, not an empty success.
NO_RESULT = "the worker finished it with neither an output nor an error"


def _finish(job: JobRecord, event: Finish, now: float, limits: JobLimits) -> Step:
    # PostgreSQL's text takes no NUL: a prover's message keeps the rest, on either database.
    reason = event.error_reason.replace("\0", "\ufffd")
    if event.output is None and reason == "":
        reason = NO_RESULT
    if _repeated(job, event, reason):
        return Step(job, (FinishRepeated(job.Id),))
    why = _fence(job, event.lease, event.worker)
    if why is not None and _late_but_wanted(job, event, reason, limits):
        why = None
    named = event.lease is not None or event.worker is not None
    if why is None and not named and reason and (job.lease or "").startswith(SENT_LEASE):
        # A damocles-worker's late failure, from a worker the job was taken back from.
        why = (
            f"the job runs on worker {job.WorkerName!r} (try {job.TryNum}), which carries its"
            " lease; a failure without one is from a worker the job was taken back from"
        )
    if why is None and deadline_passed(job, now):
        assert job.not_after is not None
        why = f"its deadline passed at {_when(job.not_after)}"
    if why is not None:
        return Step(job, (Refused(job.Id, "finish", why),))
    t = _seconds(now)
    finished = _replace(
        job, State=FINISHED, Output=event.output, ErrorReason=reason, FinishedAt=t, UpdatedAt=t
    )
    if job.State != RUNNING:  # a late proof: whoever sent it holds the job's result now
        finished = _replace(finished, lease=event.lease, WorkerName=event.worker or job.WorkerName)
    return Step(finished, (Finished(job.Id, reason),))


def cancel_reason(job: JobRecord, limits: JobLimits) -> str:
    """The ErrorReason of a job cancelled because its deadline passed: what a producer answers."""
    assert job.not_after is not None
    where = {
        READY: "it was waiting for a worker",
        RUNNING: f"it was running on worker {job.WorkerName!r}",
        FINISHED: f"its last try failed: {job.ErrorReason}",
    }[job.State]
    return (
        f"cancelled: its deadline passed at {_when(job.not_after)} "
        f"({where}; tries {job.TryNum} of {limits.max_try})"
    )


def _sweep(job: JobRecord, event: Sweep, now: float, limits: JobLimits) -> Step:
    t = _seconds(now)
    effects: list[Effect] = []
    if deadline_passed(job, now) and (job.State != FINISHED or retryable(job, limits)):
        reason = cancel_reason(job, limits)
        job = _replace(
            job,
            State=FINISHED,
            Output=None,
            ErrorReason=reason,
            FinishedAt=t,
            UpdatedAt=t,
            lease=None,
            cancelled_at=t,
        )
        return Step(job, (JobCancelled(job.Id, reason),))
    if (
        job.State == RUNNING
        and job.HeartbeatAt > 0
        and max(job.HeartbeatAt, event.heard_since) < silent_before(event, now, limits)
    ):
        effects.append(TimedOut(job.Id, job.WorkerName))
        job = _replace(
            job,
            State=FINISHED,
            Output=None,
            ErrorReason=HEARTBEAT_TIMEOUT_REASON,
            FinishedAt=t,
            UpdatedAt=t,
            lease=None,
        )
    if retryable(job, limits):
        effects.append(Retried(job.Id, job.TryNum))
        job = _replace(
            job,
            State=READY,
            ErrorReason="",
            Output=None,
            StartedAt=0,
            FinishedAt=0,
            UpdatedAt=t,
            lease=None,
        )
    return Step(job, tuple(effects))


def _cleanup(job: JobRecord, event: Cleanup, now: float, limits: JobLimits) -> Step:
    if job.State == FINISHED and job.CreatedAt < now - limits.job_lifetime:
        return Step(None, (CleanedUp(job.Id),))
    return Step(job, ())


def _reset(job: JobRecord, event: Reset, now: float, limits: JobLimits) -> Step:
    t = _seconds(now)
    reset = _replace(
        job,
        State=READY,
        CreatedAt=t,
        StartedAt=0,
        TryNum=0,
        Output=None,
        ErrorReason="",
        FinishedAt=0,
        HeartbeatAt=0,
        WorkerName="",
        UpdatedAt=t,
        lease=None,
        cancelled_at=0,
    )
    return Step(reset, (WasReset(job.Id),))


def _remove(job: JobRecord, event: Remove, now: float, limits: JobLimits) -> Step:
    return Step(None, (Removed(job.Id),))


_NAMES = {
    Create: "create",
    Allocate: "allocate",
    Heartbeat: "heartbeat",
    Finish: "finish",
    Sweep: "sweep",
    Cleanup: "cleanup",
    Reset: "reset",
    Remove: "remove",
}


def event_name(event: Event) -> str:
    return _NAMES[type(event)]


def apply(
    job: JobRecord | None, event: Event, now: float, limits: JobLimits, *, job_id: str | None = None
) -> Step:
    """One event on one job. `job` None means there is no such job (`job_id` names it then)."""
    if isinstance(event, Create):
        return _create(job, event, now, limits)
    if job is None:
        missing = job_id if job_id is not None else "?"
        if isinstance(event, Sweep | Cleanup | Remove):
            # Remove of an unknown id is a silent success in damocles; passes skip nothing.
            return Step(None, ())
        return Step(None, (NotFound(missing, event_name(event)),))
    match event:
        case Allocate():
            return _allocate(job, event, now, limits)
        case Heartbeat():
            return _heartbeat(job, event, now, limits)
        case Finish():
            return _finish(job, event, now, limits)
        case Sweep():
            return _sweep(job, event, now, limits)
        case Cleanup():
            return _cleanup(job, event, now, limits)
        case Reset():
            return _reset(job, event, now, limits)
        case Remove():
            return _remove(job, event, now, limits)
    raise TypeError(f"not a job event: {event!r}")


# --- allocation order and filters ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllocationSpec:
    """damocles' AllocateWdPoStJobSpec: empty lists mean any."""

    allowed_miners: tuple[int, ...] = ()
    allowed_proof_types: tuple[str, ...] = ()

    def admits(self, job: JobRecord) -> bool:
        if self.allowed_miners and job.Input.MinerId not in self.allowed_miners:
            return False
        return not self.allowed_proof_types or job.Input.ProofType in self.allowed_proof_types


def allocatable(job: JobRecord, spec: AllocationSpec, now: float) -> bool:
    return job.State == READY and not deadline_passed(job, now) and spec.admits(job)


def allocation_key(job: JobRecord) -> tuple[bool, float, int, str]:
    """Earliest deadline first; jobs without one after those with one; then oldest first."""
    return (job.not_after is None, job.not_after or 0.0, job.CreatedAt, job.Id)


def choose(jobs: Iterable[JobRecord], spec: AllocationSpec, n: int, now: float) -> list[JobRecord]:
    """The jobs an allocation of `n` takes, in the order it takes them."""
    return sorted((j for j in jobs if allocatable(j, spec, now)), key=allocation_key)[:n]


# --- what a worker holding a lease must do ------------------------------------------------------

#: Why a worker must stop a job it holds (Dext.HeartbeatJobs' `Reason`).
STOP_REASONS: Final = ("removed", "cancelled", "lease_lost", "reset", "timed_out", "finished")


def allocated(jobs: Iterable[JobRecord]) -> list[Allocated]:
    """The Allocated effects of jobs an allocation gave out (the store returns the records)."""
    return [Allocated(job.Id, job.WorkerName, job.lease or "", job.TryNum) for job in jobs]


def stop_reason(job: JobRecord | None, lease: str, now: float) -> tuple[str, str] | None:
    """Why the holder of `lease` must stop working on this job now, as (reason, text), or None
    when the job is still its own (running under this lease, its deadline not passed)."""
    if job is None:
        return "removed", "the job was removed (an operator's remove): drop it"
    if job.cancelled or (job.State != FINISHED and deadline_passed(job, now)):
        assert job.not_after is not None
        return "cancelled", f"its deadline passed at {_when(job.not_after)}: drop it"
    if job.State == RUNNING:
        if job.lease == lease:
            return None
        return "lease_lost", (
            f"the job was given to worker {job.WorkerName!r} (try {job.TryNum}) after your "
            "lease lapsed: drop it"
        )
    if job.State == READY:
        if job.TryNum == 0:
            return "reset", "the job was reset (or removed and created again): drop it"
        return "timed_out", (
            f"no heartbeat for over the timeout: the job was taken back (try {job.TryNum}) and "
            "waits for a worker: drop it"
        )
    if job.ErrorReason == HEARTBEAT_TIMEOUT_REASON:
        return "timed_out", "no heartbeat for over the timeout: the job was taken back; drop it"
    outcome = "succeeded" if job.ErrorReason == "" else f"failed: {job.ErrorReason}"
    return "finished", f"the job is finished ({outcome}): drop it"
