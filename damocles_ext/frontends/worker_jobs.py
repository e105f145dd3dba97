"""One job of `damocles-ext worker`: its proof on the supervisor's children (where its sectors
are, whether their store can be read, the task submitted) and the delivery of its result to the
manager (sent again until taken, refused, or too late).

They see the worker through `Proving` alone (what they read of it, and what they tell it), and
send on the connection they are given (the worker's calls: allocations and finishes)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import trio

from ..errors import DeadlineError, ProverError, UnsendableTask, UsageError
from ..jobs.client import RpcCallError, RpcClientError, RpcConnectionError
from ..jobs.model import JobOutput
from ..jobs.worker_rules import (
    Api,
    Backoff,
    Failure,
    FinishVerdict,
    failure_of,
    failure_of_answer,
    faults_text,
    finish_verdict,
    finish_wait,
    job_output,
    window_post_task,
)
from ..status import utf8_text
from .worker_sectors import faults_seen, job_sector_paths, store_problem

if TYPE_CHECKING:
    import pluggy

    from ..jobs.client import RpcClient
    from ..jobs.worker_rules import PulledJob
    from ..jobs.worker_settings import WorkerSettings
    from ..sectors.locator import SectorLocator
    from ..supervisor.core import Supervisor
    from .worker_state import HeldJob, WorkerCounters

log = logging.getLogger("damocles_ext.worker")


class Proving(Protocol):
    """What a job's proof and delivery need of the worker (`Worker` is one), and all they touch
    of it."""

    @property
    def settings(self) -> WorkerSettings: ...
    @property
    def pm(self) -> pluggy.PluginManager | None: ...  # (sector paths from a plugin)
    @property
    def locator(self) -> SectorLocator | None: ...  # sectors in stores not attached
    @property
    def supervisor(self) -> Supervisor: ...
    @property
    def counters(self) -> WorkerCounters: ...

    def now(self) -> float:
        """The wall clock (a job's deadline, a result's lifetime)."""
        ...

    def deadline_of(self, job: PulledJob) -> float | None:
        """The job's deadline (NotAfter, on the manager's clock) on the wall clock, or None."""
        ...

    def touch(self) -> None:
        """Something changed: the worker's waiters look again."""
        ...

    def prover_reached(self) -> None:
        """A job reached a prover: a spell of jobs failed before any did ends."""
        ...

    def unanswered(self, exc: RpcClientError) -> None:
        """A finish got no answer: the manager's outage (said once)."""
        ...

    def answered(self) -> None:
        """A finish was answered (a JSON-RPC error too): the manager's outage ends."""
        ...

    def refused_token(self, exc: RpcCallError) -> bool:
        """Whether the manager refuses this worker's token (said, and the worker stops)."""
        ...

    async def retry_wait(self, seconds: float) -> None:
        """Wait `seconds` before calling the manager again, less if it (or its job store) comes
        back meanwhile."""
        ...


async def proof_of(
    worker: Proving, held: HeldJob, look_limiters: dict[str, trio.CapacityLimiter]
) -> tuple[JobOutput | None, str]:
    """The job's output, or the error to report instead (cancellation passes through);
    `look_limiters`: the worker's, one per store directory."""
    job = held.job

    def dispatched(child: str | None) -> None:
        held.child = child
        if child is not None and not held.reached_prover:  # a spell of unproved jobs ends
            held.reached_prover = True
            worker.prover_reached()
        worker.touch()

    deadline = worker.deadline_of(job)  # (on this machine's clock, as the supervisor's)
    try:
        paths, faults = await job_sector_paths(
            job,
            attached=worker.settings.attached,
            plugin_manager=worker.pm,
            locator=worker.locator,
            time_left=None if deadline is None else deadline - worker.now(),
        )
        task = window_post_task(job, paths)
    except Exception as exc:  # noqa: BLE001 - a missing store or a plugin's bug fails that job only
        error = str(exc) or type(exc).__name__
        held.log.error("job %s cannot be proved here: %s", job.Id, error)
        return None, error
    if faults:  # as a prover answers for sectors it cannot read: the manager drops them
        return JobOutput(proofs=(), faults=tuple(faults)), ""
    if (problem := await store_problem(job, paths, look_limiters)) is not None:
        held.log.error("%s", problem)
        if job.TryNum == 1:  # a later try may land on a worker that has the store
            return None, problem
    # (its faulty sectors' files are looked at once delivered: say_faults_seen)
    held.sector_paths = dict(zip((s.SectorId for s in job.Input.Sectors or ()), paths, strict=True))
    try:
        answer = await worker.supervisor.submit(task, deadline=deadline, on_dispatch=dispatched)
    except (ProverError, UsageError) as exc:
        log.warning("job %s: no proof: %s", job.Id, exc, extra=held.fields(exc))
        # Cut by the job's deadline, or not started as too late, or its task refused before any
        # prover saw it for its own input (a sector twice, none): no failure of its prover's.
        # A task that cannot be sent at all is this worker's paths' (an --attached path that is
        # no text): counted, so that the worker pauses and its jobs go elsewhere.
        own = isinstance(exc, UsageError) and not isinstance(exc, UnsendableTask)
        held.prover_failed = not (isinstance(exc, DeadlineError) or own)
        return None, str(exc)
    output = job_output(answer)  # type: ignore[arg-type]
    if output.faults:
        held.log.warning("%s", faults_text(job, output.faults))
    return output, ""


async def deliver(
    worker: Proving, calls: RpcClient, held: HeldJob, output: JobOutput | None, error: str
) -> None:
    """Send the result until the manager takes it, refuses it, or it is too late."""
    backoff = Backoff(worker.settings.retry_base, worker.settings.retry_cap)
    # JSON carries text only: a path that is no text (lone surrogates) in the error escaped.
    error = utf8_text(error)
    what = "an error" if error else f"{len(output.proofs or ()) if output else 0} proofs"
    attempts, maybe_done = 0, False  # maybe_done: a call that may have been done, unanswered
    while True:
        attempts += 1
        job = held.job  # (under the lease it has now: it may have been given to us again)
        params: tuple[object, ...]
        if job.Lease is not None:
            method, params = "Dext.FinishJob", (job.Id, job.Lease, output, error)
        else:
            method, params = "Venus.WdPoStFinishJob", (job.Id, output, error)
        try:
            await calls.call(method, *params)
        except RpcConnectionError as exc:
            worker.unanswered(exc)
            failure, reason = Failure.UNREACHABLE, str(exc)
            maybe_done = maybe_done or exc.sent
        except RpcCallError as exc:
            worker.answered()
            worker.refused_token(exc)  # (a refusal: the result is given up below)
            api = Api.VENUS if job.Lease is None else Api.DEXT
            failure, reason = failure_of(api, exc.code, exc.message), exc.message
        except RpcClientError as exc:  # an answer that is none (HTTP 413: too large)
            failure, reason = failure_of_answer(getattr(exc, "status", None)), str(exc)
        else:
            worker.answered()
            worker.counters.delivered += 1
            held.delivered = True
            worker.counters.failed += bool(error)
            held.log.info("job %s: delivered %s (attempt %d)", job.Id, what, attempts)
            break
        held.delivery_failures, held.delivery_error = held.delivery_failures + 1, reason
        worker.counters.finish_retries += 1
        worker.touch()
        if held.job.Lease != job.Lease:
            continue  # given to us again while this call went: sent under the new lease
        deadline = worker.deadline_of(job)  # (on the manager's clock as last heard)
        verdict, why = finish_verdict(
            failure,
            worker.now(),
            not_after=deadline,
            allocated_at=held.allocated_at,
            lifetime=worker.settings.result_lifetime,
        )
        if verdict is FinishVerdict.GIVE_UP:
            worker.counters.given_up += 1
            maybe = (
                " (an earlier attempt whose answer was lost may have delivered it)"
                if maybe_done and failure is Failure.REFUSED
                else ""
            )
            held.log.error("job %s: its result (%s) is given up after %d attempts: %s%s:"
                           " %s", job.Id, what, attempts, why, maybe, reason)  # fmt: skip
            break
        # Never past shortly before the job's deadline: the try then is its last chance.
        delay = finish_wait(backoff.next_delay(), worker.now(), deadline)
        if attempts & (attempts - 1) == 0:  # attempts 1, 2, 4, 8...: seen, not a flood
            held.log.warning("job %s: result (%s) not delivered yet (attempt %d): %s;"
                             " trying again in %.1f s", job.Id, what, attempts, reason,
                             delay)  # fmt: skip
        await worker.retry_wait(delay)


async def say_faults_seen(
    held: HeldJob,
    faults: tuple[int, ...],
    threads: trio.CapacityLimiter,
    looks: set[trio.CancelScope],
) -> None:
    """Once a result with faulty sectors was delivered: log what this machine sees of their
    files (worker_sectors.faults_seen). A cancel scope in `looks` for the worker's stop to
    cancel (a stalled mount must not hold it); a bug of ours there is logged, not raised."""
    if held.sector_paths is None:
        return
    with trio.CancelScope() as look:
        looks.add(look)
        try:
            seen = await faults_seen(held.job.Id, held.sector_paths, faults, threads)
        except Exception:  # a bug of ours in a log line: not the worker's end
            log.exception("job %s: looking at its faulty sectors' files failed", held.job.Id)
        else:
            held.log.warning("%s", seen)
        finally:
            looks.discard(look)
