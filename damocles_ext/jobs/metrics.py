"""Prometheus metrics of the job store, served by `damocles-ext coordinator --metrics HOST:PORT`.

Two sources, as for the supervisor's metrics (damocles_ext/metrics.py):

* events: allocations, heartbeat timeouts, retries, cancellations, finishes and refusals are
  counted from the store's effects (rules.py) as this process's coordinator causes them
  (`JobMetrics.observe`). Prometheus counters are per process: with several coordinators on
  one PostgreSQL, each counts what it did (the sweeps of each count the jobs they changed), and
  `sum()` over the instances gives the whole;
* levels: the store's summary (jobs by kind, the oldest ready job, live workers, unallocatable
  jobs; jobs/summary.py) is read when Prometheus scrapes. Those are the store's, the same from
  every coordinator; but for the live workers that said in their last ping to this coordinator
  that they are paused (jobs/pings.py: kept in its memory). The query runs in a thread of its own
  with a short timeout, one at a time; a failing or slow store is `damocles_ext_jobs_store_up 0`,
  never a failed scrape or a crash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..metrics import PREFIX
from ..threads import no_thread
from . import rules, summary
from .store import JobStore

if TYPE_CHECKING:
    from .pings import PausedWorkers

log = logging.getLogger("damocles_ext.coordinator.metrics")

# A scrape times out after 10 s by default in Prometheus: the query must give up well before.
DEFAULT_QUERY_TIMEOUT = 5.0
REFUSED_EVENTS = ("heartbeat", "finish")


class JobMetrics:
    """The job store's metrics in one registry (`registry`, for metrics.MetricsServer)."""

    def __init__(
        self,
        store: JobStore,
        *,
        registry: Any = None,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
        live_window: float = summary.DEFAULT_LIVE_WINDOW,
        clock: Callable[[], float] = time.time,
        process_metrics: bool = True,
        paused_workers: PausedWorkers | None = None,
    ) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            ProcessCollector,
            disable_created_metrics,
        )

        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.allocations = Counter(
            f"{PREFIX}_job_allocations_total",
            "Jobs this coordinator gave to a worker.",
            registry=r,
        )
        self.timeouts = Counter(
            f"{PREFIX}_job_heartbeat_timeouts_total",
            "Running jobs this coordinator's sweep ended because their worker went silent.",
            registry=r,
        )
        self.retries = Counter(
            f"{PREFIX}_job_retries_total",
            "Failed jobs this coordinator's sweep put back to ready2run (tries left).",
            registry=r,
        )
        self.cancellations = Counter(
            f"{PREFIX}_job_cancellations_total",
            "Jobs this coordinator's sweep cancelled because their deadline passed.",
            registry=r,
        )
        self.finishes = Counter(
            f"{PREFIX}_job_finishes_total",
            "Finishes accepted from workers, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.refusals = Counter(
            f"{PREFIX}_job_refusals_total",
            "Heartbeats and finishes refused (the job is not running on that worker, its lease"
            " or deadline passed, or it does not exist), by event.",
            ["event"],
            registry=r,
        )
        for result in ("ok", "failed"):
            self.finishes.labels(result)  # present (0) before the first finish
        for event in REFUSED_EVENTS:
            self.refusals.labels(event)
        if process_metrics:
            ProcessCollector(registry=r)
        self.collector = _SummaryCollector(store, query_timeout, live_window, clock, paused_workers)
        r.register(self.collector)

    def observe(self, effects: Iterable[rules.Effect]) -> None:
        """Count what the store did (the effects of one call)."""
        for e in effects:
            if isinstance(e, rules.Allocated):
                self.allocations.inc()
            elif isinstance(e, rules.TimedOut):
                self.timeouts.inc()
            elif isinstance(e, rules.Retried):
                self.retries.inc()
            elif isinstance(e, rules.JobCancelled):
                self.cancellations.inc()
            elif isinstance(e, rules.Finished):
                self.finishes.labels("ok" if e.error_reason == "" else "failed").inc()
            elif isinstance(e, rules.Refused | rules.NotFound) and e.event in REFUSED_EVENTS:
                self.refusals.labels(e.event).inc()


class _SummaryCollector:
    """The summary's gauges, read from the store at scrape time."""

    def __init__(self, store: JobStore, timeout: float, live_window: float,
                 clock: Callable[[], float],
                 paused_workers: PausedWorkers | None = None) -> None:  # fmt: skip
        self._store = store
        self._timeout = timeout
        self._live_window = live_window
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: threading.Thread | None = None
        self._was_up = True
        #: The workers that said they are paused (the coordinator's `paused_workers`): counted
        #: among the live ones when given.
        self.paused_workers = paused_workers

    def describe(self) -> list[Any]:
        # Without describe(), register() would call collect() at once: a query at start.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            f"{PREFIX}_jobs_store_up",
            "1 when the job store answered this scrape's summary query in time, else 0 (the"
            " other job gauges are then absent).",
        )
        try:
            s = self._query()
        except Exception as exc:  # noqa: BLE001 - any failure of the store is a 0, not a crash
            if self._was_up:
                log.warning("the job store summary for the metrics failed: %s", exc)
            else:
                log.debug("the job store summary for the metrics failed: %s", exc)
            self._was_up = False
            up.add_metric([], 0)
            yield up
            return
        if not self._was_up:
            log.info("the job store answers the metrics' summary query again")
        self._was_up = True
        up.add_metric([], 1)
        yield up
        by_kind = GaugeMetricFamily(
            f"{PREFIX}_jobs",
            "Jobs in the store by state: ready2run, running, finished-ok, finished-failed (may"
            " still be retried), cancelled (deadline passed).",
            labels=["state"],
        )
        for kind, n in s.jobs.items():
            by_kind.add_metric([kind], n)
        yield by_kind
        yield GaugeMetricFamily(
            f"{PREFIX}_jobs_oldest_ready_seconds",
            "Age (now - CreatedAt) of the oldest ready2run job; 0 when none is ready.",
            value=s.oldest_ready_age or 0.0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_jobs_unallocatable",
            "Ready jobs that no live worker's filters (AllowedMiners, AllowedProofTypes) admit;"
            " every ready job when no worker is live.",
            value=s.unallocatable,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_job_workers_live",
            "Workers that asked for jobs, heartbeated or pinged within the live window.",
            value=s.live_workers,
        )
        if self.paused_workers is not None:
            paused = self.paused_workers.names(s.time, self._live_window)
            yield GaugeMetricFamily(
                f"{PREFIX}_job_workers_paused",
                "Live workers whose last Venus.WorkerPing to this coordinator said job slots"
                " Paused (they take no job on them: prover failures, or paused by an operator).",
                value=len({w.worker for w in s.workers} & paused),
            )

    def _query(self) -> summary.JobsSummary:
        # A thread of its own, so that a store stuck past the timeout costs this scrape, not
        # the exposition thread; and one at a time, so that stuck queries do not pile up.
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["summary"] = self._store.summary(
                    self._clock(), live_window=self._live_window
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the scrape below
                result["error"] = exc

        with self._lock:
            if self._pending is not None and self._pending.is_alive():
                raise TimeoutError("the previous summary query is still waiting for the store")
            thread = threading.Thread(target=run, name="dext-jobs-summary", daemon=True)
            self._pending = thread
            try:
                thread.start()
            except RuntimeError as exc:  # at the limit of tasks: say what ran out
                if (failed := no_thread(exc)) is None:
                    raise
                raise failed from None
        thread.join(self._timeout)
        if thread.is_alive():
            raise TimeoutError(f"the job store did not answer within {self._timeout:g}s")
        if "error" in result:
            raise result["error"]
        value: summary.JobsSummary = result["summary"]
        return value
