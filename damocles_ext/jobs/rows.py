"""A job's row and its record, both ways; a row that cannot be read back (damaged: edited by
hand, written by another program) named, and passed over by what reads many jobs (the store
removes it: JobStore._apply)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import msgspec

from .database import StoreError
from .model import JobOutput, JobRecord, WdPoStInput

log = logging.getLogger("damocles_ext.jobs")

_encoder = msgspec.json.Encoder()


class DamagedJob(StoreError):
    """A job's row that does not read back as a job; `remove` takes it out."""

    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(
            f"job {job_id!r} in the store is damaged ({why}): remove it"
            f" (damocles-ext wdpost remove {job_id})"
        )
        self.job_id = job_id


def row_values(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.Id,
        "state": job.State,
        "deadline_idx": job.DeadlineIdx,
        "partitions": _encoder.encode(job.Partitions).decode(),
        "input": _encoder.encode(job.Input).decode(),
        "miner_id": job.Input.MinerId,
        "proof_type": job.Input.ProofType,
        "output": None if job.Output is None else _encoder.encode(job.Output).decode(),
        "try_num": job.TryNum,
        "error_reason": job.ErrorReason,
        "worker_name": job.WorkerName,
        "started_at": job.StartedAt,
        "heartbeat_at": job.HeartbeatAt,
        "finished_at": job.FinishedAt,
        "created_at": job.CreatedAt,
        "updated_at": job.UpdatedAt,
        "lease": job.lease,
        "not_after": job.not_after,
        "cancelled_at": job.cancelled_at,
    }


def job_of_row(row: Any) -> JobRecord:
    try:
        return JobRecord(
            Id=row.id,
            State=row.state,
            DeadlineIdx=row.deadline_idx,
            Partitions=msgspec.json.decode(row.partitions, type=tuple[int, ...] | None),
            Input=msgspec.json.decode(row.input, type=WdPoStInput),
            Output=None if row.output is None else msgspec.json.decode(row.output, type=JobOutput),
            TryNum=row.try_num,
            ErrorReason=row.error_reason,
            WorkerName=row.worker_name,
            StartedAt=row.started_at,
            HeartbeatAt=row.heartbeat_at,
            FinishedAt=row.finished_at,
            CreatedAt=row.created_at,
            UpdatedAt=row.updated_at,
            lease=row.lease,
            not_after=row.not_after,
            cancelled_at=row.cancelled_at,
        )
    except msgspec.MsgspecError as e:
        raise DamagedJob(row.id, str(e)) from None


def readable_jobs(rows: Iterable[Any], reported: set[str]) -> list[JobRecord]:
    """The jobs of `rows` that read back; each damaged one is passed over, and warned of once
    (`reported`: the ids warned of), so that one damaged row does not stop allocation or the
    sweep for all."""
    out = []
    for row in rows:
        try:
            out.append(job_of_row(row))
        except DamagedJob as e:
            if e.job_id not in reported:
                reported.add(e.job_id)
                log.warning("%s; passed over meanwhile", e)
    return out
