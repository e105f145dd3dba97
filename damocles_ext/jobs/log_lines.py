"""What the log says about one job: a sweep's effect as its line says it, and the fields of a
record about one job (JSON logs; the text format shows the message only): `job_id`, and
`worker` where the record names a worker. Sans-IO: the callers log.
"""

from __future__ import annotations

from typing import Any

from . import rules


def job_fields(
    job_id: str, worker: str | None = None, request_id: int | None = None
) -> dict[str, Any]:
    """The fields of a record about job `job_id` (and the worker it names; the supervisor's
    request that proved it, in a worker)."""
    fields: dict[str, Any] = {"job_id": job_id}
    if worker is not None:
        fields["worker"] = worker
    if request_id is not None:
        fields["request_id"] = request_id
    return fields


def said_of(effect: rules.Effect) -> str:
    """What a sweep did to a job, as its log line says it."""
    match effect:
        case rules.TimedOut(job_id, worker):
            return (
                f"job {job_id} timed out: worker {worker!r} sent no heartbeat for its"
                " HeartbeatTimeout"
            )
        case rules.Retried(job_id, try_num):
            return f"job {job_id} is given to the workers again (tries so far: {try_num})"
        case rules.JobCancelled(job_id, reason):
            return f"job {job_id} cancelled: {reason}"
        case rules.CleanedUp(job_id):
            return f"job {job_id} forgotten (finished longer ago than JobLifetime)"
    return str(effect)


def fields_of(effect: rules.Effect) -> dict[str, Any]:
    """The fields of a sweep's record of `effect`: its job, and the worker a timeout names."""
    job_id = getattr(effect, "job_id", None)
    if not isinstance(job_id, str):
        return {}
    return job_fields(job_id, effect.worker if isinstance(effect, rules.TimedOut) else None)
