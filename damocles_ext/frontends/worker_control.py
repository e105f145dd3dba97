"""`damocles-ext worker --socket PATH --metrics HOST:PORT`: the worker's supervisor behind a
control socket (for `damocles-ext status`: the supervisor's document plus a `worker` part) and
its Prometheus metrics (the supervisor's plus the worker's counters), as `run` serves them.

Both are bound before any child is spawned, so a taken place is an exit 2 with nothing started.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import trio

from ..errors import NotStartedError, UsageError
from ..jobs.rules import STOP_REASONS
from ..jobs.worker_status import WorkerJobStatus, WorkerPart, lease_state
from .listeners import ThrottledLog
from .worker_state import (
    LOST_REASONS,
    NOT_RUNNING,
    OTHER_REASON,
    PROVER_FAILURES,
    UNPROVED_JOBS,
)

if TYPE_CHECKING:
    import socket

    from ..metrics import MetricsServer, SupervisorMetrics
    from .worker import Worker

log = logging.getLogger("damocles_ext.worker")

PREFIX = "damocles_ext_worker"
#: Heartbeat round trips: a call of a few ms on a LAN, seconds when the manager's store is slow;
#: past 15 s (damocles' HeartbeatTimeout) the jobs are lost anyway.
RTT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, math.inf)


def not_started(worker: Worker) -> str:
    """What `status` is told before the worker has started its children."""
    why = "" if worker.manager_reachable else ", which has not answered so far (its log says why)"
    return (
        f"the worker has not started its children yet: it waits for its manager at"
        f" {worker.manager_url}{why}, to name itself and check its --attached stores; they start"
        " once the manager answers"
    )


def worker_part(worker: Worker, now: float | None = None) -> WorkerPart:
    """What the worker adds to the status document, as it is now."""
    now = time.time() if now is None else now
    c = worker.counters
    pause = worker.paused(now)
    jobs = [
        WorkerJobStatus(
            id=h.job.Id,
            miner=h.job.Input.MinerId,
            deadline_idx=h.job.DeadlineIdx,
            partitions=list(h.job.Partitions or ()),
            sectors=len(h.job.Input.Sectors or ()),
            try_num=h.job.TryNum,
            state=h.state,
            child=h.child,
            elapsed=max(0.0, now - h.allocated_at),
            heartbeat_age=None if h.last_heartbeat is None else max(0.0, now - h.last_heartbeat),
            lease=lease_state(h.job.Lease, h.stop_reason),
            delivery_failures=h.delivery_failures,
        )
        for h in sorted(worker.held.values(), key=lambda h: h.allocated_at)
    ]
    return WorkerPart(
        manager=worker.manager_url,
        name=worker.name,
        api=worker.api.value,
        manager_reachable=worker.manager_reachable,
        max_jobs=worker.settings.max_jobs,
        pulled=c.pulled,
        delivered=c.delivered,
        failed=c.failed,
        stopped=c.stopped,
        given_up=c.given_up,
        jobs=jobs,
        sectors=None if worker.locator is None else worker.locator.status(),
        pauses=c.pauses + c.unproved_pauses,
        paused_until=None if pause is None else pause.until_unix,
        paused_for=None if pause is None else max(0.0, pause.until_unix - now),
        paused_reason=None if pause is None else pause.reason,
        paused_why=None if pause is None else pause.why,
    )


class WorkerMetrics:
    """The worker's counters as Prometheus metrics, read from `worker.counters` at scrape time
    (nothing to keep in step), and the heartbeat round-trip histogram, observed per call."""

    def __init__(self, worker: Worker, registry: Any) -> None:
        from prometheus_client import Histogram

        self.worker = worker
        self.registry = registry
        self.heartbeat = Histogram(
            f"{PREFIX}_heartbeat_seconds",
            "Round trip of each heartbeat call to the manager (all held jobs in one call).",
            buckets=RTT_BUCKETS,
            registry=registry,
        )
        worker.counters.on_heartbeat = self.heartbeat.observe
        registry.register(self)

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.worker.counters
        for name, doc, value in (
            ("jobs_pulled", "Jobs the manager gave this worker.", c.pulled),
            ("jobs_finished", "Results the manager took (proofs, faults or an error).", c.delivered),
            ("jobs_failed", "Of the results taken, errors (no proof).", c.failed),
            ("finish_retries", "Finish calls that did not get the result taken.", c.finish_retries),
            ("finish_given_up", "Results never delivered (past the deadline or lifetime).",
             c.given_up),
            ("allocations", "Allocation calls the manager answered.", c.allocations),
            ("allocations_empty", "Of those, answers with no new job.", c.empty_allocations),
            ("pings", "Venus.WorkerPing calls the manager took.", c.pings),
        ):  # fmt: skip
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        lost = CounterMetricFamily(
            f"{PREFIX}_leases_lost",
            "Jobs the manager took back while this worker held them, by its reason (our"
            " coordinator's: " + ", ".join(STOP_REASONS) + f"; {NOT_RUNNING}: damocles-manager"
            f" refused the heartbeat; {OTHER_REASON}: any other a manager gave).",
            labels=["reason"],
        )
        # Every reason from the start (at 0), so increase() works from the first scrape; one a
        # newer manager sends is counted as OTHER_REASON (the log line names it).
        for reason in sorted(LOST_REASONS):
            lost.add_metric([reason], c.stopped_by.get(reason, 0))
        yield lost
        held = GaugeMetricFamily(
            f"{PREFIX}_jobs_held", "Jobs this worker holds, by state.", labels=["state"]
        )
        # Rendered on a thread while trio's changes `held`: a copy (made in C, under the GIL).
        states = [h.state for h in list(self.worker.held.values())]
        for state in ("proving", "finishing"):
            held.add_metric([state], states.count(state))
        yield held
        pauses = CounterMetricFamily(
            f"{PREFIX}_pauses",
            f"Pauses in taking jobs, by why: {PROVER_FAILURES} (proofs failed here in a row),"
            f" {UNPROVED_JOBS} (allocations brought only jobs that fail before a prover).",
            labels=["reason"],
        )
        pauses.add_metric([PROVER_FAILURES], c.pauses)
        pauses.add_metric([UNPROVED_JOBS], c.unproved_pauses)
        yield pauses
        pause = self.worker.paused()
        yield GaugeMetricFamily(
            f"{PREFIX}_paused_until_timestamp_seconds",
            "Unix time the worker's pause in taking jobs ends; 0 while it is not paused.",
            value=0.0 if pause is None else pause.until_unix,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_manager_reachable",
            "1 while the manager answers, 0 during an outage.",
            value=1.0 if self.worker.manager_reachable else 0.0,
        )


class _NotAProverSocket(UsageError):
    logged = True  # through the refusals' throttle: not warned about once per request


def _no_proofs(refusals: ThrottledLog, path: str) -> Callable[..., Awaitable[Any]]:
    """The worker's control socket's `submit` (the socket at `path`): it refuses every proof
    request, as a usage error (the client's --socket is wrong), logged through `refusals` (a
    client sent here by mistake would flood the log, a warning per request)."""

    async def submit(task: Any, **_: Any) -> Any:
        # A proof sent here would take a slot the worker counts as its own, and a pulled job
        # would wait behind it: the worker's slots are the manager's to fill.
        refusals(
            "a control client sent a proof request to the worker's control socket, which answers"
            " status only: refused (proofs go to a `damocles-ext run` socket)"
        )
        raise _NotAProverSocket(
            f"{path} is the control socket of a `damocles-ext worker`, which answers status only"
            " and proves the jobs it pulls from its manager, not requests; send proofs to the"
            " control socket of a `damocles-ext run` instead (prove's --socket)"
        )

    return submit


async def run_worker(
    worker: Worker,
    *,
    sock: socket.socket | None,
    limits: Mapping[str, Any],
    metrics: SupervisorMetrics | None,
    metrics_server: MetricsServer | None,
    on_started: Callable[[], None] = lambda: None,
) -> None:
    """Run `worker` until it ends, serving its control socket and metrics while it runs."""
    from ..status import StatusSource, reply_data
    from .control import ControlServer

    done = trio.Event()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await worker.run(task_status=task_status)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        if metrics_server is not None:
            # Served from the start: a worker waiting for its manager shows it (the worker's
            # gauges); the supervisor's come once it runs.
            await nursery.start(metrics_server.serve)
            log.info("metrics on %s", metrics_server.url)
        source: StatusSource | None = None
        server = None
        if sock is not None:

            async def status() -> dict[str, object]:
                if source is None:  # the socket is served while the worker waits to start
                    part = reply_data(worker_part(worker))
                    raise NotStartedError(not_started(worker), part)
                return await source.as_data(worker=worker_part(worker))

            # Answered from the start: else `status` met a socket nobody answered, and said the
            # worker may be stopped (SIGSTOP) or stuck while it waited for its manager.
            server = ControlServer(
                sock, _no_proofs(ThrottledLog(log), sock.getsockname()), status=status, **limits
            )
            await nursery.start(server.serve)
            log.info("control socket listening on %s", server.path)
        await nursery.start(run)
        if done.is_set():  # stopped before it started (while waiting for its manager)
            nursery.cancel_scope.cancel()
            return
        sup = worker.supervisor
        if metrics is not None and metrics_server is not None:
            # Its supervisor proves the jobs it pulls: WindowPoSts only.
            metrics.attach(sup, trio.lowlevel.current_trio_token(), requested=("window_post",))
        if sock is not None:
            source = StatusSource(
                sup,
                socket=str(sock.getsockname()),
                metrics=(lambda: metrics_server.url) if metrics_server is not None else None,
            )
        on_started()
        await done.wait()
        if server is not None:
            server.stop_accepting()
        nursery.cancel_scope.cancel()
