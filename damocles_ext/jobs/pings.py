"""What the coordinator keeps of the workers' `Venus.WorkerPing`s beyond their name: which ones
said in their last ping that they take no job now (damocles' WorkerInfoSummary with `Paused`
above 0: our worker pausing after prover failures, a damocles-worker whose threads an operator
paused), for the coordinator's log and its metrics (`damocles_ext_job_workers_paused`), kept in
its memory; and what the job store keeps of it for `status --jobs` (`pause_of`; workers.pinged),
so that whichever coordinator took a worker's pings, the summary shows it. The two read a ping
alike: what one counts paused, the other does.

The ping's Summary is read leniently: keys in any case (as Go reads them, gojson.py), and a
Summary that is absent or malformed, a count that is not a whole number, or counts that cannot
be (more slots paused than the worker has), count as not paused: it never fails the ping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from .gojson import go_shaped
from .rpc import worker_name_problem
from .summary import DEFAULT_LIVE_WINDOW

log = logging.getLogger("damocles_ext.coordinator")

#: Paused workers kept at most: past it, the one heard from longest ago is forgotten (a flood
#: of made-up names must not grow the coordinator without limit; each is at most
#: rpc.MAX_WORKER_NAME bytes).
MAX_PAUSED = 10_000


#: A paused worker not heard from for this long is forgotten (two live windows; the one a
#: summary counts it in may be longer).
KEEP = 2 * DEFAULT_LIVE_WINDOW


class _Summary(msgspec.Struct):
    Threads: Any = 0
    Paused: Any = 0


class _Info(msgspec.Struct):
    Summary: Any = None


def _count(value: Any) -> int:
    """A count of the Summary: a whole number from 0 to a uint64's top, else 0."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        return 0
    return value


def paused_of(info: Any) -> tuple[int, int]:
    """(Paused, Threads) of a WorkerPing's workerInfo; (0, 0) when it has no Summary that says."""
    try:
        shaped = go_shaped(info, _Info) if isinstance(info, dict) else {}
        summary = shaped.get("Summary")
        if not isinstance(summary, dict):
            return 0, 0
        counts = go_shaped(summary, _Summary)
        return _count(counts.get("Paused")), _count(counts.get("Threads"))
    except Exception:  # a ping is never refused for its Summary
        log.debug("a worker ping's Summary could not be read: %.200r", info, exc_info=True)
        return 0, 0


#: Job slots a worker may say it has, at most, for the store (a count past it is no count).
MAX_SLOTS = 2**31


def pause_of(info: Any) -> tuple[int, int]:
    """(paused, slots) of a WorkerPing's workerInfo, as the coordinator's memory and the store
    keep it; (0, 0) when it says nothing of it (no Summary), or what cannot be (more slots
    paused than it has, or more slots than MAX_SLOTS): not paused."""
    paused, threads = paused_of(info)
    if not 0 <= paused <= threads < MAX_SLOTS:
        return 0, 0
    return paused, threads


class PausedWorkers:
    """The workers whose last ping said Paused > 0, and when; `heard` on the coordinator's
    loop, `names` from any thread (the metrics' scrape)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._paused: dict[str, float] = {}  # name -> its last ping (paused), on `clock`

    def heard(self, name: str, pause: tuple[int, int]) -> None:
        """Worker `name` pinged saying (paused, slots) (`pause_of`): said when it begins or ends
        a pause. A name no allocation takes (too long) is no worker's: not kept."""
        if worker_name_problem(name) is not None:
            return
        paused, threads = pause
        now = self._clock()
        with self._lock:
            at = self._paused.pop(name, None)  # (one not heard from for long: a new pause)
            was = at is not None and _within(at, now, KEEP)
            if paused:
                self._forget(now)
                self._paused[name] = now
        if paused and not was:
            log.warning(
                "worker %s says %d of its %d job slots are paused (its Venus.WorkerPing): it"
                " takes no job on them until it says otherwise; see its log or status",
                name, paused, threads,
            )  # fmt: skip
        elif was and not paused:
            log.info("worker %s says no job slot is paused any more (its Venus.WorkerPing)", name)

    def _forget(self, now: float) -> None:
        """Forget the ones not heard in KEEP (gone, or pinging another coordinator), and the
        oldest past MAX_PAUSED (under the lock)."""
        for name, at in list(self._paused.items()):
            if not _within(at, now, KEEP):
                del self._paused[name]
        while len(self._paused) >= MAX_PAUSED:
            del self._paused[min(self._paused, key=self._paused.__getitem__)]

    def names(self, now: float, window: float = DEFAULT_LIVE_WINDOW) -> set[str]:
        """The workers whose last ping, within `window` seconds of `now`, said Paused > 0."""
        with self._lock:
            return {n for n, at in self._paused.items() if _within(at, now, window)}


def _within(at: float, now: float, span: float) -> bool:
    """Whether `at` is within `span` seconds of `now`, either way (a clock may step back)."""
    return now - span <= at <= now + span
