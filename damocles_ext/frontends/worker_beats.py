"""The heartbeats of `damocles-ext worker`'s jobs: those held under a lease (our coordinator's,
Dext.HeartbeatJobs) and those held without one (a damocles-manager's, Venus.WdPoStHeartbeatJobs,
by job id and worker name).

They see the worker through `Beating` alone (what they read of it, and what they tell it), and
send on the connection they are given (the heartbeats' own)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import trio

from ..jobs.client import RpcCallError, RpcClientError, RpcConnectionError, manager_down
from ..jobs.worker_rules import job_gone, unheld_stops
from .worker_state import NOT_RUNNING, HeldJob, StopSignal

if TYPE_CHECKING:
    from ..jobs.client import AnswerClock, RpcClient
    from ..jobs.worker_rules import UnheldStops
    from .worker_state import WorkerCounters

log = logging.getLogger("damocles_ext.worker")


class Beating(Protocol):
    """What the heartbeats need of the worker (`Worker` is one), and all they touch of it."""

    @property
    def name(self) -> str | None: ...  # the worker's, as the manager knows it
    @property
    def manager_url(self) -> str: ...
    @property
    def held(self) -> Mapping[str, HeldJob]: ...  # the jobs held now, by id
    @property
    def counters(self) -> WorkerCounters: ...  # (its on_heartbeat: each answered one's time)
    @property
    def unheld_stops(self) -> UnheldStops: ...  # when to say stops for jobs not held here
    @property
    def allocating(self) -> bool: ...  # an allocation's answer is awaited: it may give jobs back
    @property
    def deferred_stops(self) -> dict[str, str | None]: ...  # job -> the lease a stop put off

    def now(self) -> float:
        """The wall clock (a job's last heartbeat)."""
        ...

    def manager_unreachable(self, what: str) -> None:
        """A heartbeat could not connect, or a proxy answered 502 or 503 for the manager: the
        manager's outage (said once), which any answer ends."""
        ...

    def beats_failed(self, what: str) -> None:
        """A heartbeat sent and not answered, or failed by the manager: the heartbeats' own
        outage (said once)."""
        ...

    def beats_answered(self) -> None:
        """A heartbeat answered: the heartbeats' outage ends, and the manager's if a call could
        not connect during it (`heard`)."""
        ...

    def heard_clock(self, clock: AnswerClock | None) -> None:
        """An answer just received gave this clock (its X-Dext-Clock, else its Date; None:
        neither): the manager's, by which job deadlines are read."""
        ...

    def beats_idle(self) -> None:
        """No job is held, so no heartbeat is sent: the heartbeats' outage, if any, does not
        count the time until the next one."""
        ...

    def heard(self) -> None:
        """A whole answer (a JSON-RPC error too): the manager's outage ends if a call could not
        connect during it."""
        ...

    def refused_token(self, exc: RpcCallError) -> bool:
        """Whether the manager refuses this worker's token (said, and the worker stops)."""
        ...

    def stop_job(self, job_id: str, reason: str, why: str) -> None:
        """The manager took the job back: its proof (or delivery) is cancelled."""
        ...


async def heartbeat_forever(worker: Beating, beats: RpcClient, interval: float) -> None:
    """Every `interval`, heartbeat the jobs held: those under a lease in one call, the others in
    another."""
    while True:
        await trio.sleep(interval)
        leased = [h for h in worker.held.values() if h.job.Lease is not None]
        plain = [h for h in worker.held.values() if h.job.Lease is None]
        if leased:
            await heartbeat_leased(worker, beats, leased)
        if plain:
            await heartbeat_plain(worker, beats, plain)
        if not (leased or plain):
            worker.beats_idle()


def failed(worker: Beating, exc: RpcClientError) -> None:
    """A heartbeat failed: with no connection made (refused, unreachable, DNS, connect timeout)
    or a proxy's 502 or 503 for the manager behind it, the manager's outage (every call goes to
    the same host and port); sent and not answered, or refused, the heartbeats' own (a manager
    whose other calls answer is not said unreachable)."""
    if manager_down(exc):
        worker.manager_unreachable(str(exc))
    else:
        worker.beats_failed(str(exc))


async def heartbeat_leased(worker: Beating, beats: RpcClient, held: list[HeldJob]) -> None:
    """Heartbeat `held` (jobs under a lease) in one Dext.HeartbeatJobs; stop those the manager
    signals."""
    sent = {h.job.Id: h.job.Lease for h in held}
    leases = [{"Id": job_id, "Lease": lease} for job_id, lease in sent.items()]
    started = trio.current_time()
    try:
        stop = await beats.call(  # (`null` or no `result`: failed, as no list)
            "Dext.HeartbeatJobs", leases, worker.name, result_type=list[StopSignal]
        )
    except RpcClientError as exc:  # (no answer: the heartbeats' outage, unless none connected)
        if isinstance(exc, RpcCallError):
            worker.refused_token(exc)
            worker.heard()  # (a whole answer)
        failed(worker, exc)
        return
    worker.heard_clock(beats.answer_clock)  # (the deadlines of the jobs held: on its clock)
    beaten(worker, held, started, {s.Id for s in stop})
    if worker.unheld_stops.to_say(unheld := sorted({s.Id for s in stop} - sent.keys())):
        log.warning("%s", unheld_stops(worker.manager_url, unheld))  # (not at each heartbeat)
    for signal in stop:
        current = worker.held.get(signal.Id)
        if current is None or current.job.Lease != sent.get(signal.Id):
            continue  # given to us again meanwhile: the answer was for the old lease
        if current.state == "finishing" and signal.Reason == "finished":
            continue  # our own finish got there first
        if current.state == "finishing" and signal.Reason == "timed_out" and not current.error:
            continue  # a proof, done: taken late by the manager (or refused, and said so)
        if signal.Reason in ("lease_lost", "timed_out") and _put_off(worker, signal.Id):
            continue  # the allocation under way may give it back to us
        worker.stop_job(signal.Id, signal.Reason, f"{signal.Reason}: {signal.Message}")


def _put_off(worker: Beating, job_id: str) -> bool:
    """Whether a stop of `job_id` waits for the allocation whose answer is awaited: once per
    lease (a stop that stands comes again at the next heartbeat, and is acted on then)."""
    lease = worker.held[job_id].job.Lease
    if not worker.allocating or (
        job_id in worker.deferred_stops and worker.deferred_stops[job_id] == lease
    ):
        return False
    worker.deferred_stops[job_id] = lease
    return True


def beaten(worker: Beating, held: list[HeldJob], started: float, refused: set[str]) -> None:
    """A heartbeat of `held` was answered (the jobs in `refused` excepted)."""
    now = worker.now()
    for h in held:
        if h.job.Id not in refused:
            h.last_heartbeat = now
    if worker.counters.on_heartbeat is not None:
        worker.counters.on_heartbeat(trio.current_time() - started)
    worker.beats_answered()


async def heartbeat_plain(worker: Beating, beats: RpcClient, held: list[HeldJob]) -> None:
    """Heartbeat `held` (jobs without a lease) in one call; stop those the manager no longer
    has running. damocles-manager fails the whole batch when one job is no longer running: then
    each job is heartbeated alone to find which."""
    started = trio.current_time()
    try:
        await beats.call("Venus.WdPoStHeartbeatJobs", [h.job.Id for h in held], worker.name)
    except RpcCallError as exc:
        if worker.refused_token(exc):
            return
        worker.heard()
        ids = [h.job.Id for h in held]
        if not job_gone(exc.code, exc.message, ids):  # its store fails: the jobs are there
            worker.beats_failed(str(exc))
            return
    except RpcClientError as exc:  # (no answer: the heartbeats' outage, unless none connected)
        failed(worker, exc)
        return
    else:
        beaten(worker, held, started, set())
        return
    taken, answered = list[HeldJob](), False
    for h in held:
        try:
            await beats.call("Venus.WdPoStHeartbeatJobs", [h.job.Id], worker.name)
        except RpcConnectionError as exc:
            failed(worker, exc)
            return
        except RpcCallError as exc:
            if not job_gone(exc.code, exc.message, [h.job.Id]):
                worker.beats_failed(str(exc))
                return
            answered = True
            if h.state == "proving":  # (a late finish is taken, whatever the job's state)
                why = f"the manager no longer has it running: {exc.message}"
                worker.stop_job(h.job.Id, NOT_RUNNING, why)
        except RpcClientError as exc:
            h.log.warning("heartbeat of job %s failed: %s", h.job.Id, exc)
        else:
            taken.append(h)
    # Taken alone, a heartbeat is one as much as in the batch: the job's last one, and the
    # end of an outage of the heartbeats (a job gone is an answer too).
    if taken:
        beaten(worker, taken, started, set())
    elif answered:
        worker.beats_answered()
