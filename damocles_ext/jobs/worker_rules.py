"""What `damocles-ext worker` decides, apart from doing it: how many jobs to ask for, what an
answer or a failed call means, when to try again and when to give up, which proof types a size
allows, where a sector's files are, and what a pulled job becomes as a task for a child.

The worker's trio driver (frontends/worker.py and its worker_*.py parts) makes the calls and
waits; its rules are functions or small values here, but for the manager's outages
(jobs/outage.py, which the coordinator and the producer follow too) and what an allocation's
answer holds (frontends/worker_state.py's one_per_job), so they are read (and tested) apart.

Sans-IO: no clock (times come in as arguments), no socket, no file.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..stages import WINDOW_POST_SPLIT
from ..tasks import PoStReplicaInfo, WindowPoSt, WindowPoStOutput, over_64_bits

# Lives beside SECTOR_SIZES; kept importable from here, with the other rules.
from ..tasks import proof_types_for_sizes as proof_types_for_sizes
from ..wording import sector_list, some_and_more
from . import rpc
from .model import JobOutput, WdPoStInput, WdPoStSectorInfo
from .paths import sector_path

# --- which RPC the manager speaks ---------------------------------------------------------------


class Api(enum.Enum):
    """DEXT: our coordinator (leases, stop signals, as many jobs as free slots in one call).
    VENUS: damocles-manager --worker-prover (one job per call, no leases)."""

    DEXT = "Dext"
    VENUS = "Venus"


def jobs_to_ask(api: Api, free_slots: int) -> int:
    """How many jobs one allocation call asks for: every free slot at once from our coordinator;
    one from damocles-manager, whose allocation is damocles-worker's (one job per call)."""
    if free_slots <= 0:
        return 0
    return free_slots if api is Api.DEXT else 1


def free_slots(ready_capacity: int, held: int, max_jobs: int | None = None) -> int:
    """Slots no job of ours occupies: the capacity of the children ready now (ready_slots: what
    they can run at once, children that share a lock taking turns), at most `max_jobs`
    (damocles-worker's wdpost threads and window_post limit), less the jobs held (proving, or
    whose result is not delivered yet). Never asking beyond it is what keeps a job from waiting
    on this worker while another worker has a free GPU."""
    if max_jobs is not None:
        ready_capacity = min(ready_capacity, max_jobs)
    return max(0, ready_capacity - held)


# --- what a failed call means -------------------------------------------------------------------


class Failure(enum.Enum):
    UNREACHABLE = "unreachable"  # no answer: the manager is down, restarting, or the net is
    NO_METHOD = "no_method"  # -32601: a damocles-manager, which has no Dext.* methods
    REFUSED = "refused"  # the manager answered no: repeating the same call cannot help
    ERROR = "error"  # the manager answered with an error of its own (its store failed)


def failure_of(api: Api, code: int | None, message: str = "") -> Failure:
    """What a failed call means; `code` is the JSON-RPC error code, None when no answer came.

    From our coordinator, code 2 (rpc.REFUSED) says the job is no longer ours and code 1 that its
    store failed for a while; its Venus.WdPoStFinishJob refused is code 11001 (rpc.ABORT).
    damocles-manager answers every method's error with code 1: its finish and heartbeat refuse a
    job it no longer has with its kv store's `key not found` (`job_gone`); any other text is its
    store failing (a MongoDB out of reach, badger closed while it shuts down), for a while."""
    if code is None:
        return Failure.UNREACHABLE
    if code == rpc.METHOD_NOT_FOUND:
        return Failure.NO_METHOD
    if code in (rpc.REFUSED, rpc.ABORT, rpc.UNAUTHORIZED) or (
        api is Api.VENUS and job_gone(code, message)
    ):
        return Failure.REFUSED  # (a refused token: no call will get through, the worker stops)
    if code in (rpc.INVALID_REQUEST, rpc.INVALID_PARAMS) or (
        # go-jsonrpc's -32700 is also a body it could not read off the connection (`message`).
        code == rpc.PARSE_ERROR and "reading request" not in message
    ):
        return Failure.REFUSED  # the call itself is wrong: the same call is refused again
    return Failure.ERROR


#: The text of damocles' kvstore.ErrKeyNotFound, which its heartbeat and finish return for a job
#: it does not have (removed, cleaned up, or, for a heartbeat, finished).
KEY_NOT_FOUND = "key not found"


def job_gone(code: int, message: str, job_ids: Iterable[str] = ()) -> bool:
    """Whether a Venus.* error says that the manager no longer has the job running (rather than
    that its store failed: then the job is still there, and the call may pass later):
    damocles-manager's `key not found`, or our coordinator's refusal of one of `job_ids` (its
    Venus.* errors name each refused job, "job ID: why"; a worker that found a damocles-manager
    speaks Venus.* to whatever later serves that address)."""
    if code != rpc.METHOD_ERROR:
        return False
    return KEY_NOT_FOUND in message or any(f"job {job_id}: " in message for job_id in job_ids)


def unheld_stops(manager: str, job_ids: Sequence[str]) -> str:
    """The line for a heartbeat's answer that says to stop jobs this worker does not hold (it
    never had them, or they are done and delivered): nothing to stop, the manager's mistake."""
    shown = some_and_more(job_ids[:5], len(job_ids))
    jobs = "1 job" if len(job_ids) == 1 else f"{len(job_ids)} jobs"
    return (
        f"the manager at {manager} says to stop {jobs} this worker does not hold"
        f" ({shown}): nothing of theirs runs here; ignored (the manager's heartbeat answers"
        " should name only the jobs heartbeated)"
    )


@dataclass(slots=True)
class UnheldStops:
    """When to say the stops of a heartbeat's answer for jobs not held (`unheld_stops`): once
    while answers in a row name some, and then only if a job is named that was not before (the
    last `remembered` are kept). A manager naming a rotating set at each heartbeat is said once,
    not at each; one naming the same job again after an answer without it, once at all."""

    remembered: int = 1000
    said: bool = False  # since the last answer that named none
    named: dict[str, None] = field(default_factory=dict)  # (insertion order: oldest first)

    def to_say(self, job_ids: Sequence[str]) -> bool:
        """Whether to say this answer's stops for jobs not held (`job_ids`, maybe none)."""
        if not job_ids:
            self.said = False
            return False
        new = [job_id for job_id in job_ids if job_id not in self.named]
        for job_id in new[-self.remembered :]:
            self.named[job_id] = None
        while len(self.named) > self.remembered:
            del self.named[next(iter(self.named))]
        say = bool(new) and not self.said
        self.said = self.said or say
        return say


#: Why a damocles-manager has no Venus.WdPoStAllocateJobs (-32601), and what to do.
NO_WORKER_PROVER = (
    "a damocles-manager started without --worker-prover (or with --ext-prover) has no job for"
    " a worker; start it with `damocles-manager daemon run --worker-prover`"
)


def failure_of_answer(status: int | None) -> Failure:
    """What an answer that is no JSON-RPC answer means (`status`: its HTTP status, None when it
    was not HTTP): a request refused as sent (413: too large, say) is refused again; anything
    else (a proxy in front of the manager, restarting, a garbled answer) may pass."""
    if status in REFUSED_AS_SENT:
        return Failure.REFUSED
    return Failure.ERROR


def passing_answer(status: int | None) -> bool:
    """Whether an answer that is no JSON-RPC answer says the server is away for a while: a 5xx
    (go-jsonrpc's own carry a JSON-RPC error), 408 or 429 from a proxy in front (nginx's 502
    while the manager restarts): waited out, where a 401, 403 or 404 is the operator's to fix,
    and a 501 or 505 (a server that does not take the RPC's POST at all) too."""
    if status is None:
        return False
    return (status >= 500 and status not in (501, 505)) or status in (408, 429)


#: The HTTP statuses that refuse a request for what it is (malformed, too large), whoever sends
#: them; a 401, 403 or 404 that is no JSON-RPC answer may be a proxy in front, in maintenance.
REFUSED_AS_SENT = frozenset({400, 413, 414, 431})


#: Seconds before a job's deadline from which a proof that failed counts as cut short by it: the
#: supervisor's deadline is kept on the monotonic clock, which may run a little apart from the
#: wall clock it was read off.
DEADLINE_SLACK = 1.0


def deadline_reached(not_after: float | None, now: float) -> bool:
    """Whether a job's proof that failed at `now` was cut short by its deadline (`not_after`, on
    the clock of `now`; then the prover is not to blame: the breaker does not count it)."""
    return not_after is not None and now >= not_after - DEADLINE_SLACK


#: A result whose job has a deadline is tried again this long before it at the latest, whatever
#: its backoff (`finish_wait`): our coordinator cancels the job at its deadline and refuses a finish
#: after it. It covers the deadline read on the manager's clock to within a second or so (the
#: worker's clock corrected by the clock of its answers, worker_ping.manager_offset) and the
#: finish's round trip and store write (well under 2 s).
LAST_TRY_MARGIN = 5.0


def finish_wait(delay: float, now: float, not_after: float | None) -> float:
    """The wait before a result's next try: the backoff's `delay`, but never past LAST_TRY_MARGIN
    before the job's deadline (`not_after`, on the clock of `now`); once that is past, never
    past the deadline itself (one more try then: a deadline read a little early may still be in
    time; after it the result is given up)."""
    if not_after is None:
        return delay
    last = not_after - LAST_TRY_MARGIN
    return max(0.0, min(delay, last - now if now < last else not_after - now))


class FinishVerdict(enum.Enum):
    RETRY = "retry"
    GIVE_UP = "give_up"


def finish_verdict(
    failure: Failure,
    now: float,
    *,
    not_after: float | None,
    allocated_at: float,
    lifetime: float,
) -> tuple[FinishVerdict, str]:
    """Whether to call the finish again, and why not when not.

    Retried while the manager is unreachable or its store fails, until the job's deadline (its
    result is useless after it, and our coordinator refuses it) or `lifetime` after the job was
    allocated (the manager has forgotten it by then)."""
    if failure is Failure.REFUSED:
        return FinishVerdict.GIVE_UP, "the manager refused it"
    if failure is Failure.NO_METHOD:
        return FinishVerdict.GIVE_UP, "the manager has no such method"
    if not_after is not None and now >= not_after:
        return FinishVerdict.GIVE_UP, "the job's deadline passed before it could be delivered"
    if now >= allocated_at + lifetime:
        return FinishVerdict.GIVE_UP, (
            f"it could not be delivered within {lifetime:g} s of the job's allocation"
        )
    return FinishVerdict.RETRY, ""


@dataclass(slots=True)
class Backoff:
    """Exponential waits between calls to an unreachable manager: base, 2·base, … up to cap;
    `reset()` after a call that got an answer."""

    base: float
    cap: float
    failures: int = 0

    def next_delay(self) -> float:
        delay: float = min(self.cap, self.base * 2.0 ** min(self.failures, 62))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


#: The unproved rounds of a spell asked again at once (`UnprovedRounds`), at least: a deadline's
#: usual partition batches, or a backlog of jobs whose stores are not attached here, from a
#: damocles-manager (one job per allocation, each bad job a round of its own).
UNPROVED_BURST = 8

UNPROVED_BEGINS = (
    "{n} allocations from {url} {lasted} brought only jobs that fail before a prover"
    " here ({why}); each is answered at once with its error, and the manager is asked again after"
    " {wait:.0f} s (growing to --idle-poll) until one reaches a prover; check the jobs it gives"
    " this worker: their input, whether the stores of their sectors are attached here"
    " (--attached), and --allowed-miners"
)
UNPROVED_QUIET = (
    "no allocation from {url} brought only jobs that fail before a prover here for"
    " {quiet:.0f} s (after {n} that did): the next {burst} such are followed at once again"
)
UNPROVED_ENDS = (
    "a job reaches a prover again, after {n} allocations of jobs that all failed before one,"
    " {lasted}"
)


def spell_time(lasted: float) -> str:
    """How long a spell of unproved allocations lasted, for its lines: a burst of them (one
    instant, or a few milliseconds) is "in under a second", not "in 0 s"."""
    return "in under a second" if lasted < 1 else f"in {lasted:.0f} s"


@dataclass(slots=True)
class UnprovedRounds:
    """When to ask again after an allocation round whose jobs all failed before a prover ran
    (their input cannot be read, they are no WindowPoSt this worker can prove, a store is
    missing, too late to start): each is answered at once with its error, which frees its slot
    at once, and a manager that gives only such jobs would be asked again at full speed
    (thousands of calls a second, a line each). The breaker counts the prover's failures only:
    these are none. So when the last of a round's new jobs ends, none having reached a prover
    and each with an error, the round is unproved: the first `burst` of a spell are asked again
    at once (a backlog of bad jobs ahead of good ones, as a real manager has, costs no wait),
    then the worker waits `backoff` (from its base, doubling up to --idle-poll), said in one
    warning. A job that reaches a prover, or is answered with its faults, ends the spell (the
    burst and the doubling come back); so does a quiet stretch of `burst` times --idle-poll with
    no unproved round. A round with a job that reached a prover, or a job ended without an
    error or stopped by the manager, asks again at once."""

    backoff: Backoff
    burst: int = UNPROVED_BURST  # (the worker sets it at each round: max(8, 2 * its slots))
    #: Each round's jobs not ended yet, and whether one reached a prover or ended without error.
    rounds: dict[int, tuple[int, bool]] = field(default_factory=dict)
    last: int = 0
    until: float = -math.inf  # no allocation before then (only raised by `ended`)
    spell: int = 0  # unproved rounds since a job last reached a prover
    since: float = 0.0  # when the spell's first one ended
    latest: float = -math.inf  # when the latest one ended
    said: bool = False  # the spell's warning was said (a line `ended` gives is it, if set)

    def round(self, jobs: int) -> int:
        """A round that brought `jobs` new jobs (> 0): its number, given back at each end."""
        self.last += 1
        self.rounds[self.last] = (jobs, False)
        return self.last

    def reached(self, now: float) -> str | None:
        """A job reached a prover at `now`: the spell ends; the line to log, if one was said."""
        lasted = spell_time(now - self.since)
        line = UNPROVED_ENDS.format(n=self.spell, lasted=lasted) if self.said else None
        self._reset()
        return line

    def _reset(self) -> None:
        self.backoff.reset()
        self.until, self.spell, self.said = -math.inf, 0, False

    def ended(
        self,
        round_: int,
        now: float,
        *,
        unproved: bool,
        why: str,
        url: str,
        answered: bool = False,
        stopping: bool = False,
    ) -> str | None:
        """A job of round `round_` ended at `now` (`unproved`: it failed before reaching a
        prover, with `why`; `url`: the manager's; `answered`: with a result though no prover ran,
        its faults, which ends the spell as a prover reached does; `stopping`: the worker stops,
        nothing is waited or said). Raises `until` when its round ends unproved past the burst;
        the line to log, or None: a warning if `said` is now set (the spell's), else the end of
        one (a prover reached, or a quiet stretch)."""
        line = self.reached(now) if answered and not stopping else None
        if round_ not in self.rounds:
            return line
        left, proved = self.rounds[round_]
        left, proved = left - 1, proved or not unproved
        if left > 0:
            self.rounds[round_] = (left, proved)
            return line
        del self.rounds[round_]
        if proved or stopping:
            return line
        if (quiet := now - self.latest) >= self.burst * self.backoff.cap:  # a new spell
            if self.said:  # (its warning promised a wait until a prover is reached: not so)
                line = UNPROVED_QUIET.format(url=url, quiet=quiet, n=self.spell, burst=self.burst)
            self._reset()
        self.latest = now
        self.spell += 1
        if self.spell == 1:
            self.since = now
        if self.spell <= self.burst:
            return line
        wait = self.backoff.next_delay()
        self.until = max(self.until, now + wait)
        if self.said:
            return None
        self.said = True
        lasted = spell_time(now - self.since)
        return UNPROVED_BEGINS.format(n=self.spell, url=url, lasted=lasted, why=why, wait=wait)


# --- Venus.WorkerPing ---------------------------------------------------------------------------

#: The port of a Dest that serves no damocles-worker RPC (damocles-manager requires a Dest, and
#: `util worker pause/resume` dial it): ours has none, and port 0 says so rather than pointing
#: at a port where something else may listen.
NO_WORKER_RPC_PORT = 0


class WorkerInfoSummary(msgspec.Struct, frozen=True):
    """damocles' WorkerInfoSummary, as its worker list shows it. damocles-worker counts sealing
    threads; here a thread is a job slot: Running proving, Waiting a result being delivered,
    Empty free, Paused free but not taking jobs (the worker pauses after prover failures or
    allocations of jobs that all failed before a prover: its free slots are Paused, not Empty,
    while it lasts), Errors a WindowPoSt child that is down."""

    Threads: int
    Empty: int
    Paused: int
    Running: int
    Waiting: int
    Errors: int


class WorkerInfo(msgspec.Struct, frozen=True):
    """damocles' WorkerInfo, the param of Venus.WorkerPing (damocles-worker sends it every
    30 s; damocles-manager refuses an empty Name or Dest)."""

    Name: str
    Dest: str
    Version: str
    Summary: WorkerInfoSummary


def worker_info(
    name: str, address: str, version: str, *, slots: int, proving: int, finishing: int,
    children_down: int, paused: bool = False,
) -> WorkerInfo:  # fmt: skip
    """The ping of a worker with `slots` job slots holding `proving` + `finishing` jobs; while
    it is `paused` (takes no job), its free slots are Paused."""
    host = f"[{address}]" if ":" in address else address
    free = max(0, slots - proving - finishing)
    summary = WorkerInfoSummary(
        Threads=slots,
        Empty=0 if paused else free,
        Paused=free if paused else 0,
        Running=proving,
        Waiting=finishing,
        Errors=children_down,
    )
    return WorkerInfo(name, f"{host}:{NO_WORKER_RPC_PORT}", f"damocles-ext v{version}", summary)


# --- what the manager is asked for --------------------------------------------------------------


def allocate_params(
    api: Api, miners: tuple[int, ...], proof_types: tuple[str, ...], n: int, worker: str
) -> tuple[str, tuple[object, ...]]:
    """The method and params of an allocation of `n` jobs; empty filters are sent as `[]`, as
    damocles-worker's wdpost threads send them (both servers read null and [] as any)."""
    spec = {"AllowedMiners": list(miners), "AllowedProofTypes": list(proof_types)}
    method = "Dext.AllocateJobs" if api is Api.DEXT else "Venus.WdPoStAllocateJobs"
    return method, (spec, n, worker)


class PulledJob(msgspec.Struct, frozen=True):
    """A job as either allocation gives it; the lease and the rest only from Dext.AllocateJobs."""

    Id: str
    Input: WdPoStInput
    Lease: str | None = None
    NotAfter: float | None = None
    DeadlineIdx: int = 0
    Partitions: list[int] | None = None
    TryNum: int = 0


# --- sector paths and the task ------------------------------------------------------------------


class MissingStore(LookupError):
    """A job names a store this worker has not attached; the message names store and job."""


def default_sector_paths(
    job: PulledJob, sector: WdPoStSectorInfo, attached: Mapping[str, str]
) -> tuple[str, str]:
    """(sealed_file, cache_dir) of `sector` in damocles' layout under the attached stores
    (`sealed/s-t0<miner>-<num>`, `cache/…`; `update/`, `update-cache/` when upgraded). Two
    names may share a directory, as damocles-worker allows."""
    miner, number = job.Input.MinerId, sector.SectorId
    paths = []
    for kind, store in (("sealed", sector.Accesses.SealedFile),
                        ("cache", sector.Accesses.CacheDir)):  # fmt: skip
        if store not in attached:
            known = ", ".join(sorted(attached)) or "none"
            raise MissingStore(
                f"job {job.Id}: sector {number} of miner {miner} is in store {store!r}, which"
                f" this worker has not attached (attached: {known}); attach it with"
                f" --attached {store}=PATH, or keep this miner's jobs off this worker"
                " (--allowed-miners)"
            )
        paths.append(sector_path(attached[store], kind, miner, number, sector.Upgrade))
    return paths[0], paths[1]


def window_post_task(job: PulledJob, paths: list[tuple[str, str]]) -> WindowPoSt:
    """The child's task for `job`, with each sector's (sealed_file, cache_dir); ValueError naming
    the job when its input is not a WindowPoSt a child can take (e.g. a WinningPoSt type)."""
    sectors = job.Input.Sectors or ()
    replicas = [
        PoStReplicaInfo(s.SectorId, bytes(s.CommR), cache_dir=cache, sealed_file=sealed)
        for s, (sealed, cache) in zip(sectors, paths, strict=True)
    ]
    try:
        task = msgspec.convert(
            {
                "miner_id": job.Input.MinerId,
                "proof_type": job.Input.ProofType,
                "replicas": replicas,
                "seed": bytes(job.Input.Seed),
            },
            WindowPoSt,
            from_attributes=True,
        )
    except msgspec.ValidationError as exc:
        raise ValueError(f"job {job.Id} is not a WindowPoSt this worker can prove: {exc}") from None
    if (too_big := over_64_bits(task)) is not None:
        raise ValueError(f"job {job.Id} is not a WindowPoSt this worker can prove: {too_big}")
    return task


def job_output(output: WindowPoStOutput) -> JobOutput:
    """The job's Output from a child's answer: the proofs, and the faulty sectors."""
    return JobOutput(proofs=tuple(output.proofs), faults=tuple(output.faults))


#: The stages whose children's slots a pulled WindowPoSt takes (the split tables: its first step).
SLOT_STAGES = ("window_post", "window_post_vanilla")
#: The states of a child that takes requests.
UP = ("ready", "busy")


#: Past this many children in one group that share locks, runnable_capacity counts that group as
#: its least child instead of trying every set of them (2**n): a group is a GPU's few children.
MAX_EXACT_LOCKED = 12


def lock_groups(
    locked: Sequence[tuple[int, frozenset[str]]],
) -> list[list[tuple[int, frozenset[str]]]]:
    """The children (capacity, locks) in groups that share locks, transitively (union-find over
    the lock names): no child of one group shares a lock with a child of another."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for _, locks in locked:
        first, *rest = locks
        for name in rest:
            parent[root(name)] = root(first)
    groups: dict[str, list[tuple[int, frozenset[str]]]] = {}
    for child in locked:
        groups.setdefault(root(next(iter(child[1]))), []).append(child)
    return list(groups.values())


def _surely_runnable(group: Sequence[tuple[int, frozenset[str]]]) -> int:
    """The least total capacity of a set of these children that hold their locks together and
    leave every other one blocked (a maximal set): what runs at once whichever child the
    scheduler gives a free lock to."""
    if len(group) > MAX_EXACT_LOCKED:
        return min(capacity for capacity, _ in group)  # every maximal set holds one child

    def maximal(
        i: int, taken: frozenset[str], total: int, left_out: tuple[int, ...]
    ) -> Iterator[int]:
        if i == len(group):  # maximal: every child left out shares a lock with one taken
            if all(group[j][1] & taken for j in left_out):
                yield total
            return
        capacity, locks = group[i]
        if not locks & taken:
            yield from maximal(i + 1, taken | locks, total + capacity, left_out)
        yield from maximal(i + 1, taken, total, (*left_out, i))

    return min(maximal(0, frozenset(), 0, ()))


def runnable_capacity(children: Sequence[tuple[int, Sequence[str]]]) -> int:
    """How many proofs these children ((capacity, locks) each) surely can run at once: a lock is
    held by one child at a time, which runs its proofs under it, so children that share one take
    turns. The scheduler gives a free lock to whichever child it sends a proof to, not to the one
    that runs the most under it: so each group of children sharing locks counts as the least it
    may run at once (a GPU's two children of Concurrent 1 and 3 count 1, not 3; that is their
    best set too when they are alike), and a pulled job never waits for a lock here while another
    worker may be idle. Children without locks count in full."""
    free = sum(capacity for capacity, locks in children if not locks)
    locked = [(capacity, frozenset(locks)) for capacity, locks in children if locks]
    return free + sum(_surely_runnable(group) for group in lock_groups(locked))


def ready_slots(children: Sequence[tuple[str, str, int, Sequence[str]]]) -> int:
    """The slots a pulled job may take now, from the children's (stage, state, capacity, locks):
    what the [[WdPost]] or vanilla children up (ready or busy) can run at once
    (runnable_capacity); none while a split worker has no SNARK child up (starting, restarting:
    its vanilla steps could not be finished yet)."""
    up = [(stage, capacity, locks) for stage, state, capacity, locks in children if state in UP]
    if any(child[0] == "window_post_snark" for child in children) and not any(
        stage == "window_post_snark" for stage, _, _ in up
    ):
        return 0
    return runnable_capacity(
        [(capacity, locks) for stage, capacity, locks in up if stage in SLOT_STAGES]
    )


def ready_slots_of(children: Sequence[Any]) -> int:
    """ready_slots of the supervisor's children (its ChildStats): one that needs a lock kept for
    a killed process not exited yet (`exiting`: stuck in a GPU driver call, its GPU may still be
    taken) counts as not up, so no job is pulled that would wait there for that process."""
    kept = {lock for c in children for gone in c.exiting for lock in gone.locks}
    return ready_slots(
        [
            (c.stage, "held" if kept.intersection(c.locks) else c.state, c.capacity, c.locks)
            for c in children
        ]
    )


def no_child_can_prove(children: Sequence[tuple[str, str, str, str | None]]) -> str | None:
    """Why no job could ever be proved by these children ((name, stage, state, last exit)
    each), or None: every child of a stage a job needs gave up for good ([[WdPost]], or either
    split table: vanilla steps no SNARK child could finish must not be pulled)."""
    by_stage: dict[str, list[tuple[str, str, str, str | None]]] = {}
    for child in children:
        by_stage.setdefault(child[1], []).append(child)
    needed = ["window_post"] if "window_post" in by_stage else list(WINDOW_POST_SPLIT)
    for stage in needed:
        pool = by_stage.get(stage, [])
        if pool and all(state in ("fatal", "stopped") for _, _, state, _ in pool):
            what = {"window_post_vanilla": " vanilla", "window_post_snark": " SNARK"}
            return (
                f"no WindowPoSt{what.get(stage, '')} child can prove any more ("
                + "; ".join(f"{name} is {state}, last: {last}" for name, _, state, last in pool)
                + ")"
            )
    return None


def faults_text(job: PulledJob, faults: Sequence[int]) -> str:
    """The log line for a proof that found some of the job's sectors faulty. Why each one is,
    the answer does not say (sector numbers only): the prover's log lines do, where it writes
    any (the built-in provers one a sector; a C or `Bin` prover may write none), and the
    worker's look at their files once the result is delivered (`faults_seen_text`)."""
    shown = sector_list(faults)
    return (
        f"job {job.Id}: {len(faults)} of its {len(job.Input.Sectors or ())} sectors are faulty:"
        f" {shown}; the prover's log lines say why, where it writes any (a file missing or"
        " unreadable here, or data that does not check out against the sector's comm_r); what"
        " this worker sees of their files is said once the result is delivered"
    )


class Breaker:
    """Proofs failing here one after another (a child that fails at once, a broken GPU, a lock
    file it cannot take; the caller counts only the prover's failures): after `limit` in a row
    the worker takes no job until `paused_until`, `pause` seconds later, doubling up to
    `max_pause` while they go on, so that its jobs go to other workers instead of spending their
    tries here. A proof (or faults) resets the count and the doubling; failures of jobs already
    held when a pause began do not start another."""

    def __init__(self, limit: int = 3, pause: float = 30.0, max_pause: float = 600.0) -> None:
        self.limit, self.first_pause, self.max_pause = limit, pause, max_pause
        self.in_a_row = 0
        self.paused_until = -math.inf
        self._pause = pause

    def outcome(self, failed: bool, now: float, error: str = "") -> str | None:
        """One job's outcome at `now` (a monotonic clock; `error`: why it failed); when a pause
        starts, the log line."""
        if not failed:
            self.in_a_row, self._pause = 0, self.first_pause
            return None
        if now < self.paused_until:
            return None
        self.in_a_row += 1
        if self.in_a_row < self.limit:
            return None
        self.in_a_row = 0  # the next `limit` failures after the pause start the next one
        pause, self._pause = self._pause, min(self._pause * 2, self.max_pause)
        self.paused_until = now + pause
        return (
            f"{self.limit} proofs failed here in a row (last: {error}); taking no job for"
            f" {pause:.0f} s, so that other workers take them"
        )
