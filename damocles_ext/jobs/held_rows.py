"""A running job whose heartbeats are passed over because another session holds its row, held
long enough to matter: when its coordinator warns of it, and the warning's words. Sans-IO: the
caller gives the time, names the holder and logs.

A heartbeat does not wait for a job's row that another session holds (store.py `heartbeat`:
`Outcome.skipped`): that job gets no heartbeat stored, and its next one tries again. A
transaction of damocles-ext holds a row for milliseconds (a sweep pass about a second), so a
skip is mostly one of ours, and the worker's next heartbeat, 3 s later, lands: nothing is said
of it. A hold is warned of once the job's last stored heartbeat is WARN_AFTER of its
HeartbeatTimeout old or more, while a sweep may not take the job back yet (it may from a
HeartbeatTimeout on, once the row is freed), and once per hold: not again at the job's next
skipped heartbeats, but again only after one of its heartbeats landed (or was refused: the job
is no longer this worker's) and a new hold began."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from . import rules
from .model import RUNNING, JobRecord

#: The part of HeartbeatTimeout a job's last stored heartbeat must be old, its row held, for a
#: warning: 7.5 s of damocles' 15 s, two heartbeats passed over at least.
WARN_AFTER: Final = 0.5


@dataclass(frozen=True, slots=True)
class HeldTooLong:
    """A job of `worker` whose heartbeats are passed over: `silent_for` seconds since its last
    stored one, `taken_back_in` until a sweep may take it back (0: once its row is freed)."""

    job_id: str
    worker: str
    silent_for: float
    taken_back_in: float
    heartbeat_timeout: float


class HeldRows:
    """The jobs a coordinator warned of, each until one of its heartbeats lands."""

    def __init__(self) -> None:
        self._warned: dict[str, float] = {}  # job id -> when its heartbeat was last passed over

    def heard(
        self,
        worker: str,
        jobs: Iterable[JobRecord],
        skipped: Iterable[str],
        effects: Iterable[rules.Effect],
        now: float,
        heartbeat_timeout: float,
    ) -> list[HeldTooLong]:
        """A heartbeat of `worker` answered at `now`: the jobs it gave (`jobs`, as stored), those
        passed over (`skipped`) and its effects; the holds to warn of now."""
        for effect in effects:
            if isinstance(effect, rules.HeartbeatAccepted | rules.Refused | rules.NotFound):
                self._warned.pop(effect.job_id, None)  # landed, or not this worker's any more
        if self._warned:
            # A job whose worker stopped sending heartbeats while it was held is forgotten.
            self._warned = {j: t for j, t in self._warned.items() if now - t <= heartbeat_timeout}
        stored = {job.Id: job for job in jobs}
        warn = []
        for job_id in sorted(set(skipped)):
            job = stored.get(job_id)
            if job is None or job.State != RUNNING or job.WorkerName != worker:
                continue  # its heartbeat would be refused: nothing is lost by the hold
            silent = now - job.HeartbeatAt
            if job_id not in self._warned and silent < WARN_AFTER * heartbeat_timeout:
                continue
            if job_id not in self._warned:
                taken_back_in = max(0.0, job.HeartbeatAt + heartbeat_timeout - now)
                warn.append(HeldTooLong(job_id, worker, silent, taken_back_in, heartbeat_timeout))
            self._warned[job_id] = now
        return warn


def said_of(held: HeldTooLong, advice: str) -> str:
    """The warning of `held`; `advice`: who holds the row and what to do (lock_waits.py
    `row_advice`)."""
    if held.taken_back_in > 0:
        when = f"in {held.taken_back_in:.0f} s"
    else:
        when = "as soon as its row is freed"
    return (
        f"job {held.job_id} of worker {held.worker!r}: its heartbeats are not stored while"
        " another session holds its row in the job store (a SELECT ... FOR UPDATE or an UPDATE"
        " left inside its transaction): its last stored heartbeat is"
        f" {held.silent_for:.0f} s old, and a sweep may take the job back from its worker {when}"
        f" (HeartbeatTimeout {held.heartbeat_timeout:g} s; not while the row is held, but once"
        f" it is freed, unless a heartbeat lands first). {advice}. Said once for this hold"
    )
