"""Prometheus metrics of `damocles-ext run --metrics HOST:PORT`.

Two sources, so that an idle supervisor pays nothing between scrapes:

* events (answers by outcome, durations, deadline slack, child exits) come from the observer
  hooks: `SupervisorMetrics` is given to the supervisor as an inline observer
  (`Supervisor(..., inline_observers=[m])`) only when metrics are on, and its methods run as a
  request finishes or a child exits, before the plugins' turn, never on a timer;
* levels (states, queues, memory, and the counters the supervisor keeps anyway: restarts,
  each child's requests done and failed, retries, CPU seconds) are read when Prometheus scrapes: a custom collector asks the supervisor for
  `statistics()` (on the trio thread, through `trio.from_thread`) and reads the children's
  process trees with psutil, in a worker thread.

The HTTP server runs on the supervisor's own trio loop (h11 for HTTP/1.1, no thread per
connection), so that nobody who can reach the port can hold it: at most `max_connections`
connections (over it, the one idle longest is closed), a whole request must arrive within
`idle_timeout` of the previous answer (or of connecting), a request head is at most 16 KiB, and
running out of file descriptors at accept(2) is survived (frontends/listeners.py). The
exposition itself is built by prometheus_client in a worker thread, one scrape at a time, so a
scrape never stalls the supervisor. Every metric is listed, with its labels, in
docs/OBSERVABILITY.md.
"""

from __future__ import annotations

import argparse
import gzip
import ipaddress
import logging
import socket
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from .hookspecs import OUTCOMES, hookimpl
from .stages import POST_STAGES, can_serve

if TYPE_CHECKING:
    import trio

log = logging.getLogger("damocles_ext.metrics")

PREFIX = "damocles_ext"
CHILD_STATES = ("starting", "ready", "busy", "backoff", "fatal", "stopping", "stopped")
# WinningPoSt must finish within seconds, a 32GiB WindowPoSt partition takes minutes on a GPU.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# Negative slack is a missed deadline; a WindowPoSt deadline window is 30 minutes.
SLACK_BUCKETS = (-60, -10, -1, 0, 1, 5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_CONNECTIONS = 16
# Prometheus keeps its connection between scrapes (every 15 s by default) and connects again
# when it finds it closed, so a close after a longer pause costs one reconnect.
DEFAULT_IDLE_TIMEOUT = 60.0
# A scrape request is a GET with a few headers; anything much longer is not one.
MAX_REQUEST_HEAD = 16 * 1024


def parse_listen_address(text: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT', 'PORT' or '[IPv6]:PORT' -> (host, port); host defaults to 127.0.0.1.

    Raises argparse.ArgumentTypeError (argparse turns it into exit 2) naming what is wrong.
    """
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "", value
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9110"
        )
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected HOST:PORT (e.g. 127.0.0.1:9110), the port is not a number"
        ) from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port} is not in 0..65535")
    host = host or DEFAULT_HOST
    if not _valid_host(host):
        raise argparse.ArgumentTypeError(f"{text!r}: {host!r} is not an IP address or host name")
    return host, port


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label[0] != "-"
        for label in labels
    )


class SupervisorMetrics:
    """The metrics of one supervisor; give it to the Supervisor as an inline observer for the
    event part (`inline_observers=[m]`; as a plugin on the plugin manager it works too, behind
    the other plugins' hooks)."""

    def __init__(self, registry: Any = None, *, process_metrics: bool = True) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Histogram,
            ProcessCollector,
            disable_created_metrics,
        )

        # The *_created series double the output and no dashboard of ours reads them.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "Requests answered, by stage and outcome (ok, fault, error, timeout, cancelled).",
            ["stage", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Seconds from submission to answer, by stage (every outcome).",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.slack = Histogram(
            f"{PREFIX}_request_deadline_slack_seconds",
            "Seconds left before the deadline when a request with one was answered (negative:"
            " missed; no _sum, as the buckets go below zero).",
            ["stage"],
            buckets=SLACK_BUCKETS,
            registry=r,
        )
        self.missed = Counter(
            f"{PREFIX}_request_deadlines_missed_total",
            "Requests answered after their deadline (negative slack), by stage.",
            ["stage"],
            registry=r,
        )
        self.exits = Counter(
            f"{PREFIX}_child_exits_total",
            "Child processes that ended, whatever the cause (crash, kill, shutdown).",
            ["stage", "child"],
            registry=r,
        )
        if process_metrics:
            ProcessCollector(registry=r)  # the supervisor's own process_* metrics
        self.collector = _LevelCollector()
        r.register(self.collector)

    # -- wiring ---------------------------------------------------------------------------------

    def attach(
        self, supervisor: Any, trio_token: Any, *, requested: Iterable[str] = POST_STAGES
    ) -> None:
        """Read gauges from `supervisor` at scrape time (call from its trio thread).

        `requested`: the stages requests may come for (`run`: both; a worker: window_post). One
        that no child serves is refused, each request counted under that stage: its series are
        there (at 0) from the start too, so that increase() sees the first refusal.
        """
        stats = supervisor.statistics()
        served = {c.stage for c in stats.children}
        refused = {stage for stage in requested if not can_serve(stage, served)}
        for stage in sorted(served | refused):
            for outcome in OUTCOMES:
                self.requests.labels(stage, outcome)  # present (0) before the first answer
            self.duration.labels(stage)
            self.slack.labels(stage)
            self.missed.labels(stage)
        for c in stats.children:
            self.exits.labels(c.stage, c.name)
        self.collector.attach(supervisor, trio_token)

    # -- observer hooks (event part) ------------------------------------------------------------

    @hookimpl
    def dext_child_exited(self, child: Any, status: Any) -> None:
        """Count child process exits."""
        self.exits.labels(child.stage, child.name).inc()

    @hookimpl
    def dext_request_finished(
        self, request: Any, outcome: str, duration: float, slack: float | None
    ) -> None:
        """Count the answer, observe its duration and its deadline slack."""
        self.requests.labels(request.stage, outcome).inc()
        self.duration.labels(request.stage).observe(duration)
        if slack is not None:
            self.slack.labels(request.stage).observe(slack)
            if slack < 0:
                self.missed.labels(request.stage).inc()


def never_back(seen: dict[str, tuple[int, float]], child: str, pid: int, seconds: float) -> float:
    """A child tree's CPU seconds as a counter: never less than reported before for the same
    process (a process of the tree that exits before its children leaves them out of the walk,
    and their CPU time with them; Prometheus would read the drop as a reset); from the new
    process's own when the child restarted."""
    before = seen.get(child)
    if before is not None and before[0] == pid:
        seconds = max(seconds, before[1])
    seen[child] = (pid, seconds)
    return seconds


class _LevelCollector:
    """Gauges read at scrape time from Supervisor.statistics() and the children's process trees."""

    def __init__(self) -> None:
        self._supervisor: Any = None
        self._token: Any = None
        #: Each child's CPU seconds, the most reported, with its root pid (`never_back`).
        self._cpu_seen: dict[str, tuple[int, float]] = {}

    def attach(self, supervisor: Any, trio_token: Any) -> None:
        self._supervisor = supervisor
        self._token = trio_token

    def describe(self) -> list[Any]:
        # Without describe(), register() would call collect() at once, before attach().
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._snapshot()
        if stats is None:
            return
        from .status import sample_trees

        state = GaugeMetricFamily(
            f"{PREFIX}_child_state",
            "1 for the state each child is in (starting, ready, busy, backoff, fatal, stopping,"
            " stopped), 0 for the others.",
            labels=["stage", "child", "state"],
        )
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_child_requests_in_flight",
            "Requests running on each child.",
            labels=["stage", "child"],
        )
        capacity = GaugeMetricFamily(
            f"{PREFIX}_child_capacity",
            "Requests each child may run at once (Concurrent).",
            labels=["stage", "child"],
        )
        stage_in_flight = GaugeMetricFamily(
            f"{PREFIX}_requests_in_flight",
            "Requests running on the children of each stage.",
            labels=["stage"],
        )
        queued = GaugeMetricFamily(
            f"{PREFIX}_requests_queued",
            "Requests waiting for a child, by stage.",
            labels=["stage"],
        )
        deadline = GaugeMetricFamily(
            f"{PREFIX}_queue_nearest_deadline_timestamp_seconds",
            "Unix time of the nearest deadline among each stage's queued requests (absent when"
            " none has one).",
            labels=["stage"],
        )
        benched = GaugeMetricFamily(
            f"{PREFIX}_child_benched",
            "1 while the child is benched: it failed request after request while a sibling"
            " proved, and no request goes to it while a sibling can serve; else 0.",
            labels=["stage", "child"],
        )
        rss = GaugeMetricFamily(
            f"{PREFIX}_child_resident_memory_bytes",
            "Resident memory of each child's process tree (sum over its processes).",
            labels=["stage", "child"],
        )
        restarts = CounterMetricFamily(
            f"{PREFIX}_child_restarts",
            "Restarts of each child (counted when the restart is decided, as in `status`).",
            labels=["stage", "child"],
        )
        done = CounterMetricFamily(
            f"{PREFIX}_child_requests_done",
            "Requests each child answered with an output (as `status` counts them: DONE).",
            labels=["stage", "child"],
        )
        failed = CounterMetricFamily(
            f"{PREFIX}_child_requests_failed",
            "Requests each child answered with an error, timed out on or lost when it went down,"
            " whether or not a retry elsewhere proved them (as `status` counts them: FAILED).",
            labels=["stage", "child"],
        )
        retries = CounterMetricFamily(
            f"{PREFIX}_request_retries",
            "Requests queued again for another attempt after one failed (an error, a timeout,"
            " its child lost), by stage.",
            labels=["stage"],
        )
        cpu = CounterMetricFamily(
            f"{PREFIX}_child_cpu_seconds",
            "User and system CPU time of each child's current process tree, never less than"
            " reported before for the same process (resets when the child restarts).",
            labels=["stage", "child"],
        )
        per_stage: dict[str, int] = {}
        for c in stats.children:
            for s in CHILD_STATES:
                state.add_metric([c.stage, c.name, s], 1.0 if c.state == s else 0.0)
            in_flight.add_metric([c.stage, c.name], c.in_flight)
            capacity.add_metric([c.stage, c.name], c.capacity)
            restarts.add_metric([c.stage, c.name], c.restarts)
            done.add_metric([c.stage, c.name], c.done)
            failed.add_metric([c.stage, c.name], c.failed)
            benched.add_metric([c.stage, c.name], 0.0 if c.benched_for is None else 1.0)
            per_stage[c.stage] = per_stage.get(c.stage, 0) + c.in_flight
        for stage, s in sorted(stats.stages.items()):
            queued.add_metric([stage], s.queued)
            stage_in_flight.add_metric([stage], per_stage.get(stage, 0))
            retries.add_metric([stage], s.retries)
            if s.nearest_deadline is not None:
                deadline.add_metric([stage], s.nearest_deadline)
        roots = {c.name: c.pid for c in stats.children if c.pid is not None}
        try:
            trees = sample_trees(roots)
        except OSError as exc:  # /proc unread: at the limit of open files, say
            from .supervisor.process import os_reason  # (loaded: a supervisor runs)

            log.warning("cannot read the children's process trees: %s", os_reason(exc))
            trees = {}
        except Exception:  # psutil trouble must not cost the other metrics
            log.exception("cannot read the children's process trees")
            trees = {}
        for c in stats.children:
            tree = trees.get(c.name)
            if tree is not None:
                rss.add_metric([c.stage, c.name], tree.rss_bytes)
                seconds = never_back(self._cpu_seen, c.name, roots[c.name], tree.cpu_seconds)
                cpu.add_metric([c.stage, c.name], seconds)
        yield from (
            state,
            in_flight,
            capacity,
            restarts,
            done,
            failed,
            benched,
            stage_in_flight,
            retries,
            queued,
            deadline,
            rss,
            cpu,
        )

    def _snapshot(self) -> Any:
        if self._supervisor is None:
            return None
        import trio

        try:
            return trio.from_thread.run_sync(self._supervisor.statistics, trio_token=self._token)
        except (trio.RunFinishedError, RuntimeError):
            return None  # the supervisor's loop is gone (shutting down)


class MetricsSource(Protocol):
    """What MetricsServer serves: a prometheus_client registry (the supervisor's metrics, or the
    coordinator's job metrics)."""

    registry: Any


class MetricsServer:
    """The /metrics HTTP endpoint, served from the trio loop by `serve`; `url` is where.

    The port is bound here (UsageError when that fails), before anything is spawned, unless
    `sock` is given: a socket bound already (`bind_metrics`), now the server's.
    """

    def __init__(
        self,
        metrics: MetricsSource,
        host: str,
        port: int,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        sock: socket.socket | None = None,
    ) -> None:
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout}")
        self._metrics = metrics
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._sock = bind_metrics(host, port) if sock is None else sock
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self.address = _join(host, self.port)
        self.url = f"http://{self.address}/metrics"
        self._slots: Any = None
        self._limiter: Any = None

    def statistics(self) -> dict[str, int]:
        """Connections open now, and those closed to make room, refused, or shed at accept."""
        slots = self._slots
        if slots is None:
            return {"connections": 0, "evicted": 0, "refused": 0, "shed": 0}
        return {
            "connections": len(slots),
            "evicted": slots.evicted,
            "refused": slots.refused,
            "shed": slots.shed,
        }

    async def serve(self, *, task_status: trio.TaskStatus[None] | None = None) -> None:
        """Serve scrapes until cancelled; `task_status.started()` once listening."""
        import trio

        from .frontends.listeners import ConnectionSlots, serve_connections

        self._slots = ConnectionSlots(self.max_connections, "metrics port", log)
        # One exposition at a time: a burst of scrapes queues instead of piling up threads.
        self._limiter = trio.CapacityLimiter(1)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        try:
            async with trio.open_nursery() as nursery:
                if task_status is not None:
                    task_status.started()
                await serve_connections(listener, self._slots, nursery, self._serve_connection)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()

    def close(self) -> None:
        """Close the listening socket (when `serve` never ran, or after it)."""
        self._sock.close()

    async def _serve_connection(self, stream: Any) -> None:
        from .frontends.http import serve_http_connection
        from .frontends.metrics_http import ScrapeConnection

        conn = ScrapeConnection(self, stream, MAX_REQUEST_HEAD)
        await serve_http_connection(
            self._slots, conn, stream, busy="too many connections to the metrics port\n"
        )

    def _render(self, target: str, accept: str, accept_encoding: str) -> tuple[bytes, str, bool]:
        """The exposition (in a worker thread): body, content type, gzipped."""
        from prometheus_client.exposition import (
            CONTENT_TYPE_PLAIN_0_0_4,
            choose_encoder,
            generate_latest,
        )

        registry: Any = self._metrics.registry
        names = parse_qs(urlsplit(target).query).get("name[]")
        if names:
            registry = _Only(registry, set(names))
        try:
            encoder, content_type = choose_encoder(accept)
        except Exception:  # noqa: BLE001 - e.g. `version=x`, which prometheus_client cannot compare
            # An Accept header may be ignored (RFC 9110): the text format every scraper reads.
            log.debug("a scrape's Accept header cannot be read, answered as text: %.200r", accept)
            encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
        body = encoder(registry)
        if "gzip" in accept_encoding.lower():
            return gzip.compress(body, compresslevel=6), content_type, True
        return body, content_type, False


class _Only:
    """The samples of `registry` whose names are in `names` (`?name[]=`, as prometheus_client's
    server filters). Its `restricted_registry` knows only the names that collectors describe:
    ours, whose gauges are read at scrape time, and the process collector describe none, and
    every sample of theirs was left out."""

    def __init__(self, registry: Any, names: set[str]) -> None:
        self._registry = registry
        self._names = names

    def collect(self) -> Iterator[Any]:
        from prometheus_client import Metric

        for metric in self._registry.collect():
            samples = [sample for sample in metric.samples if sample.name in self._names]
            if samples:
                only = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                only.samples = samples
                yield only


def bind_metrics(host: str, port: int) -> socket.socket:
    """The metrics endpoint's listening socket, or a UsageError naming --metrics."""
    from .frontends.listeners import bind_tcp

    return bind_tcp(host, port, doing="serve metrics", option="--metrics")


def _join(host: str, port: int) -> str:
    from .frontends.listeners import join_host_port

    return join_host_port(host, port)
