"""A damocles-manager run with `--worker-prover`, as a peer for our worker and CLI in tests: its
jobs in memory the way its kv job manager keeps them (modules/impl/prover/worker/job_mgr_kv.go),
served over go-jsonrpc's forms (a `GoJsonRpcServer`: `start()`, `stop()`, `url`, `calls`). Built apart from our coordinator, store and
rules on purpose; only the record's JSON form and the job id come from jobs/model.py (the wire
contract).

What it does as damocles does:
- a job is the value of key `<state>:<id>`; a state's jobs are scanned in key order, so
  allocation goes in id order (not by deadline), at most `num` jobs matching the filters
  (empty or null filters: any);
- heartbeat: every id must be running or ready2run (a ready one becomes running), else the
  whole batch fails with `key not found` and nothing changes;
- finish: from anyone, in any state, overwriting (no fencing); an unknown id: `key not found`;
- reset: `job '<id>' does not exist` for an unknown id; remove: an unknown id is a success;
- `sweep()` is its 10 s pass: running jobs whose heartbeat is older than `heartbeat_timeout`
  finish with `heartbeat timeout`, then failed jobs under `job_max_try` tries are ready again;
- `Venus.StoreBasicInfo` answers null for a store it does not have; `Venus.WorkerPing` refuses
  an empty Name or Dest; any other method (our `Dext.*`) is go-jsonrpc's -32601 over HTTP 500.

`kv_down`: a text, while set, is the error of every call that reads or writes the kv store (the
job methods, `Venus.WorkerPing`), as damocles answers while its store fails: a MongoDB kv out of
reach or electing a primary, or badger's `DB Closed` in the moment its shutdown closes the store
before the HTTP server. go-jsonrpc sends it as any method error: HTTP 200, code 1, its text.

`added_fields`: allocations answer with fields a newer damocles might add (to the job, its input,
each sector and its accesses), which a reader must skip as Go, serde and damocles-worker do.

`calls` is the server's record of (method, params) in order; `wait_for(predicate)` waits (in a
thread) until a call makes `predicate(self)` hold.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Self

import msgspec

from damocles_ext.jobs.model import (
    FINISHED,
    HEARTBEAT_TIMEOUT_REASON,
    READY,
    RUNNING,
    JobOutput,
    WdPoStInput,
    WdPoStJob,
    job_id,
)
from helpers.gojsonrpc import GoJsonRpcServer, MethodError

_replace = msgspec.structs.replace
KEY_NOT_FOUND = "key not found"  # kvstore.ErrKeyNotFound's text


class DamoclesManager(GoJsonRpcServer):
    def __init__(
        self,
        stores: dict[str, str] | None = None,
        *,
        job_max_try: int = 2,
        heartbeat_timeout: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stores = {"store-a": "/mnt/store-a"} if stores is None else dict(stores)
        self.job_max_try = job_max_try
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock
        self.kv: dict[str, WdPoStJob] = {}
        self.pings: dict[str, dict[str, Any]] = {}  # WorkerPingInfo by worker name
        self.added_fields = False
        self.kv_down: str | None = None
        self._changed = threading.Condition()
        methods = {
            "WdPoStAllocateJobs": self._allocate,
            "WdPoStHeartbeatJobs": self._heartbeat,
            "WdPoStFinishJob": self._finish,
            "WdPoStResetJob": self._reset,
            "WdPoStRemoveJob": self._remove,
            "WdPoStAllJobs": self._all_jobs,
            "StoreBasicInfo": self._store_basic_info,
            "WorkerPing": self._worker_ping,
        }
        methods = {m: self._txn(f) for m, f in methods.items()}
        methods["StoreBasicInfo"] = self._store_basic_info  # the stores' config, no kv
        super().__init__({f"Venus.{m}": f for m, f in methods.items()})

    # --- for tests -----------------------------------------------------------------------------

    def call(self, method: str, *params: Any) -> Any:
        """Run `Venus.<method>` here as the server would (an operator's CLI), unrecorded."""
        return self.methods[f"Venus.{method}"](*params)

    def forget_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    def params_of(self, method: str) -> list[list[Any]]:
        with self._lock:
            return [p for m, p in self.calls if m == method]

    def wait_for(self, predicate: Callable[[Self], bool], timeout: float = 30.0) -> None:
        """Block until a call (or a change made here) makes `predicate(self)` hold."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(
                    f"not reached within {timeout} s; calls: {self.methods_called()}"
                )

    def recorded(self) -> None:  # a call the proxy in front answered (`gateway`)
        with self._changed:
            self._changed.notify_all()

    def _txn(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """One call as one transaction: all of it or (on an error) nothing."""

        def call(*params: Any) -> Any:
            with self._changed:
                if self.kv_down is not None:
                    raise MethodError(self.kv_down)
                saved = dict(self.kv)
                try:
                    return method(*params)
                except MethodError:
                    self.kv = saved
                    raise
                finally:
                    self._changed.notify_all()

        return call

    # --- the kv store --------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock())

    def _scan(self, state: str, limit: int, keep: Callable[[WdPoStJob], bool]) -> list[WdPoStJob]:
        found = [self.kv[k] for k in sorted(self.kv) if k.startswith(state + ":")]
        return [j for j in found if keep(j)][:limit]

    def _peek_any(self, jid: str, *states: str) -> WdPoStJob:
        for state in states:
            if (job := self.kv.get(f"{state}:{jid}")) is not None:
                return job
        raise MethodError(KEY_NOT_FOUND)

    def _move(self, job: WdPoStJob, **changes: Any) -> WdPoStJob:
        del self.kv[f"{job.State}:{job.Id}"]
        moved = _replace(job, **changes)
        self.kv[f"{moved.State}:{moved.Id}"] = moved
        return moved

    def job(self, jid: str) -> WdPoStJob | None:
        with self._changed:
            return next((j for j in self.kv.values() if j.Id == jid), None)

    # --- what the manager does itself ------------------------------------------------------------

    def create(
        self, job_input: WdPoStInput, deadline_idx: int = 0, partitions: tuple[int, ...] = (0,)
    ) -> str:
        """The producer's Create: a new job ready to run, or nothing when the id exists."""
        jid = job_id(job_input)
        with self._changed:
            if not any(f"{s}:{jid}" in self.kv for s in (READY, RUNNING, FINISHED)):
                now = self._now()
                self.kv[f"{READY}:{jid}"] = WdPoStJob(
                    Id=jid, State=READY, DeadlineIdx=deadline_idx, Partitions=partitions,
                    Input=job_input, Output=None, TryNum=0, ErrorReason="", WorkerName="",
                    StartedAt=0, HeartbeatAt=0, FinishedAt=0, CreatedAt=now, UpdatedAt=now,
                )  # fmt: skip
            self._changed.notify_all()
        return jid

    def sweep(self) -> None:
        """MakeJobsDie then RetryFailedJobs, as its 10 s ticker runs them (128 at most each)."""
        with self._changed:
            now = self._now()
            for job in self._scan(
                RUNNING,
                128,
                lambda j: j.HeartbeatAt > 0 and j.HeartbeatAt < now - self.heartbeat_timeout,
            ):
                self._move(job, State=FINISHED, FinishedAt=now, Output=None,
                           ErrorReason=HEARTBEAT_TIMEOUT_REASON, UpdatedAt=now)  # fmt: skip
            for job in self._scan(
                FINISHED, 128, lambda j: j.ErrorReason != "" and j.TryNum < self.job_max_try
            ):
                self._move(job, State=READY, ErrorReason="", Output=None, StartedAt=0,
                           FinishedAt=0, UpdatedAt=now)  # fmt: skip
            self._changed.notify_all()

    # --- the RPC methods -----------------------------------------------------------------------

    def _allocate(self, spec: dict[str, Any], num: int, worker: str) -> list[dict[str, Any]]:
        miners = spec.get("AllowedMiners") or []
        types = spec.get("AllowedProofTypes") or []
        now = self._now()
        allocated = []
        for job in self._scan(
            READY,
            num,
            lambda j: (
                (not miners or j.Input.MinerId in miners)
                and (not types or j.Input.ProofType in types)
            ),
        ):
            self._move(job, State=RUNNING, TryNum=job.TryNum + 1, StartedAt=now,
                       WorkerName=worker, HeartbeatAt=now, UpdatedAt=now)  # fmt: skip
            allocated.append({"Id": job.Id, "Input": msgspec.to_builtins(job.Input)})
            if self.added_fields:
                _add_fields(allocated[-1])
        return allocated

    def _heartbeat(self, ids: list[str], worker: str) -> None:
        now = self._now()
        for jid in ids:
            job = self._peek_any(jid, RUNNING, READY)
            self._move(job, StartedAt=job.StartedAt or now, HeartbeatAt=now, WorkerName=worker,
                       State=RUNNING, UpdatedAt=now)  # fmt: skip

    def _finish(self, jid: str, output: Any, error_reason: str) -> None:
        job = self._peek_any(jid, RUNNING, READY, FINISHED)
        now = self._now()
        self._move(job, State=FINISHED, Output=msgspec.convert(output, JobOutput | None),
                   ErrorReason=error_reason, FinishedAt=now, UpdatedAt=now)  # fmt: skip

    def _reset(self, jid: str) -> None:
        try:
            job = self._peek_any(jid, READY, RUNNING, FINISHED)
        except MethodError:
            raise MethodError(f"job '{jid}' does not exist") from None
        now = self._now()
        self._move(job, State=READY, CreatedAt=now, StartedAt=0, TryNum=0, Output=None,
                   ErrorReason="", FinishedAt=0, HeartbeatAt=0, WorkerName="",
                   UpdatedAt=now)  # fmt: skip

    def _remove(self, jid: str) -> None:
        for state in (READY, RUNNING, FINISHED):
            if self.kv.pop(f"{state}:{jid}", None) is not None:
                return

    def _all_jobs(self) -> dict[str, Any]:
        jobs = [j for s in (READY, RUNNING, FINISHED) for j in self._scan(s, 2**32, bool)]
        jobs.sort(key=lambda j: -j.CreatedAt)
        briefs = []
        for job in jobs:
            brief = msgspec.to_builtins(job)
            # WdPoStJobBrief.MarshalJSON: the input cut to its miner, the output emptied.
            brief["Input"] = msgspec.to_builtins(
                WdPoStInput(Sectors=None, MinerId=job.Input.MinerId, ProofType="", Seed=(0,) * 32)
            )
            brief["Output"] = {"proofs": None, "faults": None}
            brief["Sectors"] = len(job.Input.Sectors or ())
            brief["Faults"] = len(job.Output.faults or ()) if job.Output is not None else 0
            briefs.append(brief)
        return {"Jobs": briefs, "MaxTry": self.job_max_try}

    def _store_basic_info(self, name: str) -> dict[str, Any] | None:
        if name not in self.stores:
            return None
        return {"Name": name, "Path": self.stores[name], "Strict": False, "ReadOnly": False,
                "Weight": 1, "Meta": None}  # fmt: skip

    def _worker_ping(self, info: dict[str, Any]) -> None:
        if not info.get("Name"):
            raise MethodError("worker name is required")
        if not info.get("Dest"):
            raise MethodError("worker dest is required")
        self.pings[info["Name"]] = {"Info": info, "LastPing": self._now()}


def _add_fields(job: dict[str, Any]) -> None:
    job["Deadline"] = {"Index": 3}
    job["Input"]["PartitionIndex"] = 0
    for sector in job["Input"]["Sectors"] or ():
        sector["SealProof"] = "StackedDrg2KiBV1_1"
        sector["Accesses"]["UpdateFile"] = None
