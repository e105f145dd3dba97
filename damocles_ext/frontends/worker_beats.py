"""The heartbeats of `damocles-ext worker`'s jobs: those held under a lease (our coordinator's,
Dext.HeartbeatJobs) and those held without one (a damocles-manager's, Venus.WdPoStHeartbeatJobs,
by job id and worker name)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..jobs.client import RpcCallError, RpcClientError, RpcConnectionError, manager_down
from ..jobs.worker_rules import job_gone, unheld_stops
from .worker_state import NOT_RUNNING, HeldJob, StopSignal

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("damocles_ext.worker")


def failed(worker: Worker, exc: RpcClientError) -> None:
    """A heartbeat failed: with no connection made (refused, unreachable, DNS, connect timeout)
    or a proxy's 502 or 503 for the manager behind it, the manager's outage (every call goes to
    the same host and port); sent and not answered, or refused, the heartbeats' own (a manager
    whose other calls answer is not said unreachable)."""
    if manager_down(exc):
        worker._unreachable(str(exc), connect=True)
    else:
        worker._unreachable(str(exc), worker._beats_failing)


async def heartbeat_leased(worker: Worker, held: list[HeldJob]) -> None:
    """Heartbeat `held` (jobs under a lease) in one Dext.HeartbeatJobs; stop those the manager
    signals."""
    sent = {h.job.Id: h.job.Lease for h in held}
    leases = [{"Id": job_id, "Lease": lease} for job_id, lease in sent.items()]
    started = trio.current_time()
    try:
        stop = await worker._beats.call(  # (`null` or no `result`: failed, as no list)
            "Dext.HeartbeatJobs", leases, worker.name, result_type=list[StopSignal]
        )
    except RpcClientError as exc:  # (no answer: the heartbeats' outage, unless none connected)
        if isinstance(exc, RpcCallError):
            worker._refused_token(exc)
            worker.heard()  # (a whole answer)
        failed(worker, exc)
        return
    beaten(worker, held, started, {s.Id for s in stop})
    if worker._unheld_stops.to_say(unheld := sorted({s.Id for s in stop} - sent.keys())):
        log.warning("%s", unheld_stops(worker.manager_url, unheld))  # (not at each heartbeat)
    for signal in stop:
        current = worker.held.get(signal.Id)
        if current is None or current.job.Lease != sent.get(signal.Id):
            continue  # given to us again meanwhile: the answer was for the old lease
        if current.state == "finishing" and signal.Reason == "finished":
            continue  # our own finish got there first
        worker._stop_job(signal.Id, signal.Reason, f"{signal.Reason}: {signal.Message}")


def beaten(worker: Worker, held: list[HeldJob], started: float, refused: set[str]) -> None:
    """A heartbeat of `held` was answered (the jobs in `refused` excepted)."""
    now = worker._clock()
    for h in held:
        if h.job.Id not in refused:
            h.last_heartbeat = now
    worker._answered(worker._beats_failing)
    worker.heard()
    if worker.counters.on_heartbeat is not None:
        worker.counters.on_heartbeat(trio.current_time() - started)
    worker._touch()


async def heartbeat_plain(worker: Worker, held: list[HeldJob]) -> None:
    """Heartbeat `held` (jobs without a lease) in one call; stop those the manager no longer
    has running. damocles-manager fails the whole batch when one job is no longer running: then
    each job is heartbeated alone to find which."""
    started = trio.current_time()
    try:
        await worker._beats.call("Venus.WdPoStHeartbeatJobs", [h.job.Id for h in held], worker.name)
    except RpcCallError as exc:
        worker._refused_token(exc)
        if worker._refused is not None:
            return
        worker.heard()
        ids = [h.job.Id for h in held]
        if not job_gone(exc.code, exc.message, ids):  # its store fails: the jobs are there
            worker._unreachable(str(exc), worker._beats_failing)
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
            await worker._beats.call("Venus.WdPoStHeartbeatJobs", [h.job.Id], worker.name)
        except RpcConnectionError as exc:
            failed(worker, exc)
            return
        except RpcCallError as exc:
            if not job_gone(exc.code, exc.message, [h.job.Id]):
                worker._unreachable(str(exc), worker._beats_failing)
                return
            answered = True
            if h.state == "proving":  # (a late finish is taken, whatever the job's state)
                why = f"the manager no longer has it running: {exc.message}"
                worker._stop_job(h.job.Id, NOT_RUNNING, why)
        except RpcClientError as exc:
            h.log.warning("heartbeat of job %s failed: %s", h.job.Id, exc)
        else:
            taken.append(h)
    # Taken alone, a heartbeat is one as much as in the batch: the job's last one, and the
    # end of an outage of the heartbeats (a job gone is an answer too).
    if taken:
        beaten(worker, taken, started, set())
    elif answered:
        worker._answered(worker._beats_failing)
        worker.heard()
