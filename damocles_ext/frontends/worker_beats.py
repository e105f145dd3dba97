"""The heartbeats of `damocles-ext worker`'s jobs held without a lease (a damocles-manager's,
Venus.WdPoStHeartbeatJobs, by job id and worker name); Dext.HeartbeatJobs' are in worker.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ..jobs.client import RpcCallError, RpcClientError, RpcConnectionError
from ..jobs.worker_rules import job_gone
from .worker_state import NOT_RUNNING, HeldJob

if TYPE_CHECKING:
    from .worker import Worker


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
        ids = [h.job.Id for h in held]
        if not job_gone(exc.code, exc.message, ids):  # its store fails: the jobs are there
            worker._unreachable(str(exc), worker._beats_failing)
            return
    except RpcClientError as exc:  # (no answer too: the heartbeats' outage, not the manager's)
        worker._unreachable(str(exc), worker._beats_failing)
        return
    else:
        worker._beaten(held, started, set())
        return
    beaten, answered = list[HeldJob](), False
    for h in held:
        try:
            await worker._beats.call("Venus.WdPoStHeartbeatJobs", [h.job.Id], worker.name)
        except RpcConnectionError as exc:
            worker._unreachable(str(exc), worker._beats_failing)
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
            beaten.append(h)
    # Taken alone, a heartbeat is one as much as in the batch: the job's last one, and the
    # end of an outage of the heartbeats (a job gone is an answer too).
    if beaten:
        worker._beaten(beaten, started, set())
    elif answered:
        worker._answered(worker._beats_failing)
