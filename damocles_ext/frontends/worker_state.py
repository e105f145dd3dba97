"""What `damocles-ext worker` keeps per job it holds, and its counters (read by the status
document and the metrics in worker_control.py); and what an allocation's answer brings
(read_answer, one_per_job) and the lines that say it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from ..jobs.log_lines import job_fields
from ..jobs.model import WdPoStInput
from ..jobs.rules import STOP_REASONS
from ..jobs.worker_rules import PulledJob
from ..wording import some_and_more

_log = logging.getLogger("damocles_ext.worker")

# Stands in for the input of a job whose own could not be read, so that it can still be failed.
EMPTY_INPUT = WdPoStInput(Sectors=None, MinerId=0, ProofType="", Seed=(0,) * 32)

#: Why a worker stops a job it holds when damocles-manager refuses its heartbeat (no longer
#: running there); our coordinator says why itself (STOP_REASONS).
NOT_RUNNING = "not_running"
#: A reason a manager gave that is none of those: counted under one label, whatever its text (a
#: label per text would grow the metrics for as long as a manager makes new ones).
OTHER_REASON = "other"
#: Every reason the worker counts a job taken back by (`WorkerCounters.stopped_by`).
LOST_REASONS = (*STOP_REASONS, NOT_RUNNING, OTHER_REASON)

#: Why a worker takes no job for a while (`Pause.reason`, the pauses' metric label): its prover
#: failed jobs one after another (worker_rules.Breaker), or its allocations brought only jobs
#: that fail before a prover (worker_rules.UnprovedRounds).
PROVER_FAILURES, UNPROVED_JOBS = "prover_failures", "unproved_jobs"
PAUSE_REASONS = (PROVER_FAILURES, UNPROVED_JOBS)
#: The `why` of an UNPROVED_JOBS pause (its log line is said once a spell: this, each pause).
UNPROVED_PAUSED = (
    "{n} allocations in a row brought only jobs that fail before a prover here (last: {why});"
    " taking no job for {wait:.0f} s (growing to --idle-poll) until one reaches a prover"
)


@dataclass(frozen=True, slots=True)
class Pause:
    """A pause in taking jobs, as status and the metrics show it: no job is asked for before
    `until_unix` while the rule that set it (`reason`) still holds it until `until` (trio time:
    an UNPROVED_JOBS pause ends early when a job reaches a prover); `why`: what to tell."""

    reason: str
    why: str
    until: float
    until_unix: float


def pause_in_force(
    pauses: Sequence[Pause], untils: Mapping[str, float], now_unix: float
) -> Pause | None:
    """Of `pauses` (the latest of each reason), the one in force at `now_unix` that ends last, or
    None; `untils`: each reason's rule's own `until` now."""
    live = [p for p in pauses if untils.get(p.reason) == p.until and p.until_unix > now_unix]
    return max(live, key=lambda p: p.until_unix, default=None)


class StopSignal(msgspec.Struct, frozen=True):
    """One entry of Dext.HeartbeatJobs' answer: a job to stop, and why."""

    Id: str
    Reason: str
    Message: str = ""


@dataclass(eq=False)
class HeldJob:
    """A job this worker holds: proving, then finishing (its result being delivered)."""

    job: PulledJob
    allocated_at: float  # unix seconds
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    state: str = "proving"
    stop_reason: str | None = None
    delivery_failures: int = 0  # finish calls that did not get the result taken
    last_heartbeat: float | None = None  # unix seconds the manager last took its heartbeat
    child: str | None = None  # the child its current attempt runs on (the supervisor says)
    prover_failed: bool = False  # no proof, for a failure of the prover (the breaker counts it)
    error: str = ""  # finishing with this error (no proof)
    delivery_error: str = ""  # why the last finish call did not get the result taken
    round: int = 0  # the allocation round that brought it (worker_rules.UnprovedRounds)
    reached_prover: bool = False  # dispatched to a child: it did not fail before a prover
    #: Its sectors' (sealed_file, cache_dir) by number, once found and sent to a prover.
    sector_paths: dict[int, tuple[str, str]] | None = None
    delivered: bool = False  # the manager took its result

    def fields(self, error: BaseException | None = None) -> dict[str, Any]:
        """The fields of a record about the job (JSON logs): `job_id`, and `request_id` when
        `error` is the supervisor's answer to its request (a ProverError)."""
        return job_fields(self.job.Id, request_id=getattr(error, "request_id", None))

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """The worker's logger, its records carrying the job's id (`job_id`)."""
        return logging.LoggerAdapter(_log, self.fields())


@dataclass
class WorkerCounters:
    pulled: int = 0
    delivered: int = 0  # results the manager took (proofs, faults or an error)
    failed: int = 0  # of those, errors (no proof)
    given_up: int = 0  # results never delivered
    allocations: int = 0  # allocation calls that got an answer
    pings: int = 0  # Venus.WorkerPing calls the manager took
    empty_allocations: int = 0  # of the allocations, those that gave no new job
    finish_retries: int = 0  # finish calls that did not get a result taken (sent again or not)
    pauses: int = 0  # pauses taken after jobs failed here in a row (worker_rules.Breaker)
    #: Waits taken after allocations whose jobs all failed before a prover (UnprovedRounds).
    unproved_pauses: int = 0
    stopped_by: dict[str, int] = field(default_factory=dict)  # `stopped` by the manager's reason
    #: Called with each heartbeat call's round trip in seconds (the metrics' histogram).
    on_heartbeat: Callable[[float], None] | None = None

    @property
    def stopped(self) -> int:
        """Jobs the manager took back while we held them."""
        return sum(self.stopped_by.values())

    def count_stop(self, reason: str) -> None:
        """A job the manager took back, by its `reason`: one of LOST_REASONS, else OTHER_REASON."""
        key = reason if reason in LOST_REASONS else OTHER_REASON
        self.stopped_by[key] = self.stopped_by.get(key, 0) + 1


def taken_back_line(held: HeldJob, why: str) -> str:
    """The line for a job the manager took back (`why`: its reason and text): its proof
    cancelled; or, done and not delivered yet, its result dropped, and why it was not delivered
    (the last finish call's error)."""
    job_id, n = held.job.Id, held.delivery_failures
    if held.state != "finishing":
        return f"job {job_id}: the manager took it back ({why}); its proof is cancelled"
    what = "its result (an error)" if held.error else "its proof, done,"
    undelivered = "its first delivery was under way" if n == 0 else (
        f"{n} {'delivery' if n == 1 else 'deliveries'} failed, the last: {held.delivery_error}"
    )  # fmt: skip
    return (
        f"job {job_id}: the manager took it back ({why}) before {what} could be delivered"
        f" ({undelivered}); it is dropped"
    )


#: What becomes of a job held when the manager gives it again (`given_again`).
SAME, ADOPTED, AFRESH = "same", "adopted", "afresh"


def given_again(held: HeldJob, job: PulledJob, now: float) -> str:
    """The manager gave `job` again while this worker holds it: SAME (the same allocation told
    twice, or a damocles-manager's, whose heartbeat by name takes the job back: nothing new),
    ADOPTED (`held` now carries the new allocation: its lease, try and time), or AFRESH (the
    caller stops the job held and proves the new allocation from the start).

    Our coordinator gives only a job that is ready. At a later try, the old lease lapsed (the
    heartbeats did not get through for HeartbeatTimeout, and the worker asked for its free
    slots first): the proof running, or the result being delivered, is the new allocation's,
    instead of being stopped by the old lease's refusals while the new one times out unheard.
    At a first try, an operator reset the job (or removed it and it was created again) to have
    it proved afresh; so is a job already being stopped, and one whose error was being
    delivered (it may have been taken, its answer lost: the new try deserves a proof)."""
    if held.stop_reason is not None:
        return AFRESH
    if held.state == "finishing" and held.error:
        return AFRESH  # the error delivered for the last try is no answer for this one
    if job.Lease is None or job.Lease == held.job.Lease:
        return SAME
    if job.TryNum <= 1:
        return AFRESH
    held.job, held.allocated_at = job, now
    return ADOPTED


def read_entry(entry: Any) -> tuple[PulledJob | None, str | None]:
    """One entry of an allocation's answer: (the job, None); (a job standing for it, why it
    cannot be read) when it has an id to fail it by; (None, why) when it has none, or is no
    object at all (it is left to the manager's heartbeat timeout)."""
    if not isinstance(entry, dict):
        # As it was sent (null, 5, "x"), not as Python writes it (None).
        text = msgspec.json.encode(entry).decode()
        return None, f"an entry that is no job ({text[:100]}{' ...' if len(text) > 100 else ''})"
    try:
        return msgspec.convert(entry, PulledJob), None
    except msgspec.ValidationError as exc:
        job_id, lease = entry.get("Id"), entry.get("Lease")
        if not isinstance(job_id, str):
            return None, f"a job without an id ({exc})"
        lease = lease if isinstance(lease, str) else None
        return PulledJob(Id=job_id, Input=EMPTY_INPUT, Lease=lease), str(exc)


def read_answer(got: Sequence[Any]) -> tuple[list[tuple[PulledJob, str | None]], int, list[str]]:
    """An allocation's answer, read entry by entry (`read_entry`): its jobs (each with why it
    cannot be read, or None), how many entries were no job, and why, for the first 3 of those."""
    jobs: list[tuple[PulledJob, str | None]] = []
    bad, first_bad = 0, list[str]()
    for entry in got:
        job, problem = read_entry(entry)
        if job is not None:
            jobs.append((job, problem))
            continue
        bad += 1
        if len(first_bad) < 3:
            first_bad.append(problem or "")
    return jobs, bad, first_bad


def no_jobs_line(manager: str, bad: int, first_bad: Sequence[str]) -> str:
    """The one line for the entries of an allocation's answer that are no job (`read_answer`):
    one line for the answer, however many there are."""
    if bad == 1:
        left = "it is left to time out there"
        return f"the manager at {manager} gave {first_bad[0]} in an allocation; {left}"
    return (
        f"the manager at {manager} gave {bad} entries that are no job in an allocation"
        f" ({some_and_more(first_bad, bad, '; ')}); whatever they stand for is left to time out"
        " there"
    )


def one_per_job(
    jobs: Sequence[tuple[PulledJob, str | None]],
) -> tuple[list[tuple[PulledJob, str | None]], dict[str, list[str | None]]]:
    """An allocation's jobs (`read_answer`) with each id once, and the leases of each id the
    answer gave more than once. The last entry of an id is kept, its input too (an earlier
    entry's is not read in its place, readable or not): a manager that allocated a job twice
    over holds the last lease it gave; an earlier one is not heartbeated nor answered."""
    kept: dict[str, tuple[PulledJob, str | None]] = {}
    leases: dict[str, list[str | None]] = {}
    for job, problem in jobs:
        kept[job.Id] = (job, problem)  # (at the place of its first entry, the last one's value)
        leases.setdefault(job.Id, []).append(job.Lease)
    return list(kept.values()), {i: given for i, given in leases.items() if len(given) > 1}


def given_twice_line(manager: str, twice: Mapping[str, Sequence[str | None]]) -> str:
    """The one line for the jobs an allocation's answer gave more than once (`one_per_job`)."""
    named = []
    for job_id, leases in list(twice.items())[:3]:
        times = "twice" if len(leases) == 2 else f"{len(leases)} times"
        if len(set(leases)) == 1:
            under = f", under lease {leases[0]} each time" if leases[0] else ""
        else:
            shown = [lease or "none" for lease in leases[:5]]  # (an answer may repeat it often)
            under = f", under leases {some_and_more(shown, len(leases))}"
        named.append(f"job {job_id!r} {times}{under}")
    leased = any(lease for leases in twice.values() for lease in leases)
    return (
        f"the manager at {manager} gave the same job more than once in one allocation answer"
        f" ({some_and_more(named, len(twice), '; ')}): each is proved once and its result sent once"
        + (", under the last lease given (the earlier ones are not heartbeated)" if leased else "")
        + "; a manager gives a job once per answer"
    )
