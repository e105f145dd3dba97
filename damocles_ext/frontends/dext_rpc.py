"""Our extensions of the worker-prover RPC, under the `Dext.` namespace so that the `Venus.*`
methods stay exactly damocles': what a worker that knows leases and free slots calls instead.

- `Dext.AllocateJobs(spec, freeSlots, worker)`: as damocles' allocation, for as many jobs as the
  worker has free slots (so no job waits on a busy worker), each with the lease it must carry,
  its deadline and its try;
- `Dext.HeartbeatJobs([{Id, Lease}], worker)`: the heartbeats of the jobs still the worker's are
  stored (but a job whose row another session holds: not this time, answered from its last
  stored state; a hold seen at two heartbeats, the job's last stored heartbeat half its
  HeartbeatTimeout old, is warned of, for Venus' heartbeat too, off the answer's path:
  held_warnings.py); the answer lists the jobs it must stop now and why (the cancellation
  signal);
- `Dext.FinishJob(id, lease, output, errorReason)`: stored only from the current lease of a
  running job whose deadline has not passed; otherwise refused with code rpc.REFUSED.

docs/JOBS.md has each method's params and results.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ..jobs import rpc, rules
from ..jobs.model import JobOutput, WdPoStInput
from ..jobs.store import TrioJobStore
from .held_warnings import HeldWarnings


class DextMethods:
    """The Dext.* methods on a TrioJobStore; `await call(name, params)` gives the result or
    raises rpc.RpcError (without the request's id: the caller knows it)."""

    def __init__(
        self,
        store: TrioJobStore,
        held: HeldWarnings,
        observe: Callable[[Iterable[rules.Effect]], None] = lambda effects: None,
        learn: Callable[[Iterable[WdPoStInput]], None] = lambda inputs: None,
    ) -> None:
        self.store = store
        #: Told the inputs of the jobs allocated (the coordinator's sector index learns them).
        self.learn = learn
        #: Told the effects of each store call (the coordinator's metrics count them).
        self.observe = observe
        #: The coordinator's warnings of jobs whose heartbeats were passed over, their row held
        #: (`Coordinator.held`: Venus' heartbeats are told them too).
        self.held = held
        #: The methods by name, for the names rpc.METHODS lists under `Dext.`.
        self._methods: dict[str, Callable[..., Awaitable[Any]]] = {
            "AllocateJobs": self.allocate_jobs,
            "HeartbeatJobs": self.heartbeat_jobs,
            "FinishJob": self.finish_job,
        }

    async def call(self, name: str, params: tuple[Any, ...]) -> Any:
        return await self._methods[name](*params)

    async def allocate_jobs(
        self, spec: rpc.AllocateSpec, free_slots: int, worker: str
    ) -> list[dict[str, Any]]:
        allocation = rules.AllocationSpec(
            tuple(spec.AllowedMiners or ()), tuple(spec.AllowedProofTypes or ())
        )
        jobs = await self.store.allocate(allocation, free_slots, worker, sent_back=True)
        self.observe(rules.allocated(jobs))
        self.learn(job.Input for job in jobs)
        return [rpc.leased_job(job) for job in jobs]

    async def heartbeat_jobs(self, held: list[rpc.JobLease], worker: str) -> list[dict[str, str]]:
        leases = {h.Id: h.Lease for h in held}
        outcome = await self.store.heartbeat(list(leases), worker, leases=leases)
        self.observe(outcome.effects)
        self.held.heard(outcome, worker, leases)
        now = self.store.clock()
        current = {job.Id: job for job in outcome.jobs}
        stop = []
        for job_id, lease in sorted(leases.items()):
            why = rules.stop_reason(current.get(job_id), lease, now)
            if why is not None:
                stop.append({"Id": job_id, "Reason": why[0], "Message": why[1]})
        return stop

    async def finish_job(
        self, job_id: str, lease: str, output: JobOutput | None, error_reason: str
    ) -> None:
        outcome = await self.store.finish(job_id, output, error_reason, lease=lease)
        self.observe(outcome.effects)
        for effect in outcome.effects:
            if isinstance(effect, rules.Refused):
                raise rpc.RpcError(rpc.REFUSED, f"job {job_id}: {effect.reason}")
            if isinstance(effect, rules.NotFound):
                raise rpc.RpcError(rpc.REFUSED, f"job {job_id} does not exist: it was removed")
