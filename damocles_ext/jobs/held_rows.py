"""A running job whose heartbeats are passed over because another session holds its row, seen at
two heartbeats at least while its last stored heartbeat aged to half its HeartbeatTimeout: when
its coordinator warns of it (the threshold is the time without a stored heartbeat, not the
hold's length), and the warning's words. Sans-IO: the caller gives the time, looks the holders
up and logs.

A heartbeat does not wait for a job's row that another session holds (store.py `heartbeat`:
`Outcome.skipped`): that job gets no heartbeat stored, and its next one tries again. A
transaction of damocles-ext holds a row for milliseconds (a sweep pass about a second), so a
skip is mostly one of ours, and the worker's next heartbeat, 3 s later, lands: nothing is said
of it. A hold is one job's row held under one lease (a job given to another worker since is
another hold). The first heartbeat passed over only records when the hold was first seen; a
warning comes at a later one passed over, once the job's last stored heartbeat is WARN_AFTER of
its HeartbeatTimeout old or more: two heartbeats at least, so that a row held for a moment (our
own sweep taking the job back, a reset) is not warned of, unless two such moments fall on two
heartbeats in a row. A skip after none for SEEN_AGAIN_AFTER of the HeartbeatTimeout (heartbeats
that did not come, or landed), or twice the worker's interval if longer, is first seen again:
two brief holds far apart are not one long one. It is warned of once per hold: not again at
the job's next skipped heartbeats, but again only after one of its heartbeats landed (or was
refused, or found no job: it is no longer this worker's) and a new hold began. The caller hands the
warnings out (`heard`), and says which were logged (`said`), could not be (`not_said`: a later skip
tries again), or were of a row found free by then (`ended`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ..wording import some_and_more
from . import rules
from .model import RUNNING, JobRecord

#: The part of HeartbeatTimeout a job's last stored heartbeat must be old, its row held at two
#: heartbeats at least, for a warning: 7.5 s of damocles' 15 s.
WARN_AFTER: Final = 0.5
#: The part of HeartbeatTimeout after which a hold not seen since is first seen again at its
#: next skip: 7.5 s of 15 s, two heartbeats of damocles' 3 s lost; or, for a worker whose
#: heartbeats came further apart (its interval, as last seen, over half that), twice its
#: interval: else each of its skips would be first seen again, and never warned of.
SEEN_AGAIN_AFTER: Final = 0.5
#: Seconds within which a worker's heartbeat call is part of its last one, not its next (a
#: hold seen again then is not seen at a second heartbeat).
SAME_BEAT: Final = 1.0
#: Holds kept at most (one per job held, with its lease): at it, a new hold is not recorded
#: (nor warned of) until one ends, so that those kept go on to their warning, and are not
#: forgotten and warned of again.
MAX_HOLDS: Final = 10_000
#: Jobs named at most in one warning (the others counted).
NAMED: Final = 10

_SEEN, _HANDED, _SAID = "seen", "handed", "said"


@dataclass(frozen=True, slots=True)
class HeldTooLong:
    """A job of `worker` under `lease` whose heartbeats are passed over: `silent_for` seconds
    since its last stored one, and `taken_back_in` until a sweep may take it back at the
    earliest (0: once its row is freed)."""

    job_id: str
    lease: str
    worker: str
    silent_for: float
    taken_back_in: float
    heartbeat_timeout: float


@dataclass(slots=True)
class _Hold:
    """When a hold was last seen (on the monotonic clock) and whether warned of."""

    last_seen: float
    state: str = _SEEN


class HeldRows:
    """The holds a coordinator saw, by (job id, lease), each until one of the job's heartbeats
    lands (or is refused, or finds no job), or a HeartbeatTimeout after it was last seen."""

    def __init__(self, max_holds: int = MAX_HOLDS) -> None:
        self.max_holds = max_holds
        self._holds: dict[tuple[str, str], _Hold] = {}
        self._leases: dict[str, set[str]] = {}  # job id -> the leases of its holds
        #: Worker -> its last heartbeat (monotonic) and the interval before it (None: not
        #: seen), as many as max_holds, each until a HeartbeatTimeout without one.
        self._heard: dict[str, tuple[float, float | None]] = {}
        self._next_expiry = -math.inf

    def __len__(self) -> int:
        return len(self._holds)

    def heard(
        self,
        worker: str,
        jobs: Iterable[JobRecord],
        skipped: Iterable[str],
        effects: Iterable[rules.Effect],
        now: float,
        monotonic: float,
        heartbeat_timeout: float,
        leases: Mapping[str, str] | None = None,
    ) -> list[HeldTooLong]:
        """A heartbeat of `worker` answered at `now` (the wall clock, as the jobs' heartbeat times;
        `monotonic` on a clock that only moves forward, for the holds' own times): the jobs it
        gave (`jobs`, as stored), those passed over (`skipped`), its effects, and the leases it
        sent (Dext's; None: Venus' sends none); the holds to warn of now, handed out until
        `said`, `not_said` or `ended`."""
        for effect in effects:
            if isinstance(effect, rules.HeartbeatAccepted | rules.Refused | rules.NotFound):
                self._forget_job(effect.job_id)  # landed, or not this worker's any more
        self._expire(monotonic, heartbeat_timeout)
        seen_again_after = self._seen_again_after(worker, monotonic, heartbeat_timeout)
        if not (skipped := set(skipped)):
            return []  # (every heartbeat but one passed over: nothing more to look at)
        stored = {job.Id: job for job in jobs}
        warn = []
        for job_id in sorted(skipped):
            job = stored.get(job_id)
            if job is None or job.State != RUNNING or job.WorkerName != worker:
                continue  # its heartbeat would be refused: nothing is lost by the hold
            if job.lease is None or (leases is not None and leases.get(job_id) != job.lease):
                continue  # an old lease's heartbeat: refused once the row is freed
            key = (job_id, job.lease)
            hold = self._holds.get(key)
            if hold is None or monotonic - hold.last_seen > seen_again_after:
                self._forget(key)
                self._add(key, _Hold(monotonic))  # first seen: said nothing yet
                continue
            if monotonic - hold.last_seen < SAME_BEAT:
                continue  # seen again in the same beat (job by job): not a second sighting
            hold.last_seen = monotonic
            silent = now - job.HeartbeatAt
            if hold.state != _SEEN or silent < WARN_AFTER * heartbeat_timeout:
                continue
            hold.state = _HANDED
            taken_back_in = max(0.0, job.HeartbeatAt + heartbeat_timeout - now)
            warn.append(
                HeldTooLong(job_id, job.lease, worker, silent, taken_back_in, heartbeat_timeout)
            )
        return warn

    def said(self, held: Iterable[HeldTooLong]) -> None:
        """These were logged: not said again for their holds."""
        self._set(held, _SAID)

    def not_said(self, held: Iterable[HeldTooLong]) -> None:
        """These could not be said (dropped, the look failed): a later skip hands them again."""
        self._set(held, _SEEN)

    def ended(self, held: Iterable[HeldTooLong]) -> None:
        """These rows were found free: their holds are over (a new one is first seen again)."""
        for h in held:
            self._forget((h.job_id, h.lease))

    def _seen_again_after(self, worker: str, now: float, heartbeat_timeout: float) -> float:
        """How long a hold of `worker`'s not seen since is the same hold (SEEN_AGAIN_AFTER), by
        the interval between its two heartbeats before this one at `now`; records this one."""
        last = self._heard.get(worker)
        interval = None if last is None else last[1]
        # A call within SAME_BEAT of the last is no interval of the worker's heartbeats: its
        # one-job-at-a-time fallback right after a batch that failed, or another worker of
        # that name. Recorded, it would shrink the interval to nothing, and a slow worker's
        # holds would all be first seen again.
        if last is None and len(self._heard) < self.max_holds:
            self._heard[worker] = (now, None)
        elif last is not None and now - last[0] >= SAME_BEAT:
            self._heard[worker] = (now, now - last[0])
        return max(SEEN_AGAIN_AFTER * heartbeat_timeout, 2 * (interval or 0.0))

    def _set(self, held: Iterable[HeldTooLong], state: str) -> None:
        for h in held:
            if (hold := self._holds.get((h.job_id, h.lease))) is not None:
                hold.state = state

    def _add(self, key: tuple[str, str], hold: _Hold) -> None:
        if len(self._holds) >= self.max_holds:
            return  # recorded at a skip once one of those kept ended
        self._holds[key] = hold
        self._leases.setdefault(key[0], set()).add(key[1])

    def _forget_job(self, job_id: str) -> None:
        for lease in list(self._leases.get(job_id, ())):
            self._forget((job_id, lease))

    def _forget(self, key: tuple[str, str]) -> None:
        if self._holds.pop(key, None) is not None:
            leases = self._leases[key[0]]
            leases.discard(key[1])
            if not leases:
                del self._leases[key[0]]

    def _expire(self, now: float, heartbeat_timeout: float) -> None:
        """A hold last seen over a HeartbeatTimeout ago (its worker stopped sending heartbeats
        while it was held) is forgotten; looked for a few times per HeartbeatTimeout, on the
        monotonic clock (`now`: a step back of the wall clock does not hold it up)."""
        if not (self._holds or self._heard) or now < self._next_expiry:
            return
        self._next_expiry = now + heartbeat_timeout / 4
        for key in [k for k, h in self._holds.items() if now - h.last_seen > heartbeat_timeout]:
            self._forget(key)
        for worker in [w for w, (at, _) in self._heard.items() if now - at > heartbeat_timeout]:
            del self._heard[worker]  # its next interval is not known: SEEN_AGAIN_AFTER


def said_of(held: Sequence[HeldTooLong], advice: str) -> str:
    """The one warning of the jobs `held` (of one worker, whose rows one session holds, or none
    named), naming NAMED of them at most; `advice`: who holds the rows and what to do
    (lock_waits.py `row_advice`)."""
    first = held[0]
    rule = f"HeartbeatTimeout {first.heartbeat_timeout:g} s; unless a heartbeat lands first"
    if any(h.taken_back_in > 0 for h in held):  # (else said by each: once its row is freed)
        rule = (
            f"HeartbeatTimeout {first.heartbeat_timeout:g} s; a job is not taken back while its"
            " row is held, but may be once it is freed, unless a heartbeat lands first"
        )
    if len(held) == 1:
        return (
            f"job {first.job_id} of worker {first.worker!r}: its heartbeats are not stored while"
            " another session holds its row in the job store: its last stored heartbeat is"
            f" {first.silent_for:.0f} s old, and a sweep may take the job back from its worker"
            f" {_when(first)} ({rule}). {advice}. Said once for this hold"
        )
    shown = some_and_more(
        [
            f"{h.job_id} (its last stored heartbeat {h.silent_for:.0f} s old, taken back"
            f" {_when(h)})"
            for h in held[:NAMED]
        ],
        len(held),
        "; ",
    )
    return (
        f"{len(held)} jobs of worker {first.worker!r}: their heartbeats are not stored while"
        f" another session holds their rows in the job store: {shown} ({rule})."
        f" {advice}. Said once for these holds"
    )


def _when(held: HeldTooLong) -> str:
    """When a sweep may take `held` back, at the earliest: the coordinator also leaves out the
    time it could not hear heartbeats (silence.py), which may make it later."""
    if held.taken_back_in > 0:
        return f"in {math.ceil(held.taken_back_in)} s at the earliest"
    return "as soon as its row is freed, at the earliest"
