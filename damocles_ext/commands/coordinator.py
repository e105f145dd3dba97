"""`damocles-ext coordinator --jobs URL [--listen HOST:PORT] [--metrics HOST:PORT]`: serve
damocles' worker-prover RPC (POST /rpc/v0) from a job store, for damocles-workers with
`plan = "wdpost"`, and optionally the job store's Prometheus metrics (jobs/metrics.py).

Exit codes: 0 stopped by SIGTERM, SIGINT or SIGHUP (unless ignored, as under nohup); 1 the store
failed (at start, or its SQLite file deleted or replaced while it ran); 2 a bad URL or address, a
port that cannot be listened on.
"""

from __future__ import annotations

import argparse
import socket
from contextlib import closing, nullcontext
from typing import TYPE_CHECKING

from damocles_ext.logs import add_logging_args, setup_from_args

from .common import (
    _non_negative_float,
    add_sector_cache_args,
    add_sector_source_args,
    check_proxy_headers,
    check_sector_cache,
    sector_snapshot,
    token_file,
)
from .wdpost import CONF_DIR_HELP, JOBS_HELP

if TYPE_CHECKING:
    from damocles_ext.frontends.sector_index import SectorIndex
    from damocles_ext.sectors.snapshot import CacheSnapshot


def _listen(text: str) -> tuple[str, int]:
    from damocles_ext.metrics import parse_listen_address

    return parse_listen_address(text)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `coordinator`."""
    parser = subparsers.add_parser(
        "coordinator",
        help="serve damocles' worker-prover RPC (Venus.WdPoSt*) from a job store",
        description=(
            "Serve damocles-manager's worker-prover RPC at http://HOST:PORT/rpc/v0 (JSON-RPC 2.0:"
            " Venus.WdPoStAllocateJobs, WdPoStHeartbeatJobs, WdPoStFinishJob, WdPoStResetJob,"
            " WdPoStRemoveJob, WdPoStAllJobs, StoreBasicInfo, WorkerPing) from the job store, so"
            ' damocles-workers with plan = "wdpost" take their jobs here; and'
            " Venus.SectorIndexerFind, read-only, from the sectors of the jobs it has seen and the"
            " source node of --proxy. SIGTERM, SIGINT or SIGHUP (unless ignored) stops it."
        ),
    )
    parser.add_argument("--jobs", metavar="URL", required=True, help=JOBS_HELP)
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=_listen,
        default=("127.0.0.1", 1789),
        help="where to listen (default: 127.0.0.1:1789, damocles-manager's port; loopback only"
        " unless you give another address)",
    )
    parser.add_argument(
        "--metrics",
        "--metrics-listen",
        metavar="HOST:PORT",
        type=_listen,
        default=None,
        help="serve Prometheus metrics of the job store on http://HOST:PORT/metrics (jobs by"
        " state, the oldest ready job, unallocatable jobs, live workers, allocations, timeouts,"
        " retries, cancellations; off by default; ':PORT' alone listens on 127.0.0.1)",
    )
    parser.add_argument(
        "--store",
        metavar="NAME=PATH",
        action="append",
        type=_store,
        default=[],
        help="a store the workers attach ([[attached]] name and location), for"
        " Venus.StoreBasicInfo; repeat for each (damocles-worker refuses to start without it)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        type=token_file,
        help="require every request to carry `Authorization: Bearer <token>`, the token being"
        " the first line of FILE (keep it readable by this user only); `damocles-ext worker`"
        " sends it with its own --token-file. A damocles-worker sends no header (it reads"
        " rpc_client.headers but does not send them): a coordinator it pulls from runs without"
        " --token-file. Without it, anyone who reaches the port may take and finish jobs",
    )
    parser.add_argument(
        "--index-without-token",
        action="store_true",
        help="with --token-file, answer Venus.SectorIndexerFind (read-only: which store holds a"
        " sector) without the token: a damocles proxy node (damocles-manager --proxy) calls its"
        " source without one; every other method still needs it",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=_non_negative_float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM, SIGINT or SIGHUP (unless ignored), how long the requests being answered"
        " may take to get their answer before their connections are closed (default: 10); keep"
        " systemd's TimeoutStopSec above it",
    )
    parser.add_argument("--conf-dir", metavar="DIR", help=CONF_DIR_HELP)
    # Venus.SectorIndexerFind: for a sector no job input named, ask this source node (its store
    # names become paths through --store and --conf-dir's stores).
    add_sector_source_args(parser, conf_dir=False, attached=False)
    add_sector_cache_args(parser)
    add_logging_args(parser, "info")
    return parser


def _store(text: str) -> tuple[str, str]:
    from .common import store_pair

    return store_pair(text, "a store as the workers' [[attached]] name it")


def _sector_index(
    args: argparse.Namespace, stores: dict[str, str], snapshot: CacheSnapshot | None
) -> SectorIndex:
    """The coordinator's sector index, over a locator of --proxy when given."""
    from damocles_ext.frontends.sector_index import SectorIndex

    if args.proxy is None:
        return SectorIndex()
    from damocles_ext.plugins import get_plugin_manager
    from damocles_ext.sectors import SectorSettings
    from damocles_ext.sectors.locator import SectorLocator
    from damocles_ext.sectors.providers import build_providers

    settings = SectorSettings(
        proxy=args.proxy, stores=stores, headers=tuple(args.header), relay_names=True
    )
    locator = SectorLocator(build_providers(settings, get_plugin_manager()), snapshot=snapshot)
    return SectorIndex(locator)


def _bind_ports(args: argparse.Namespace) -> tuple[socket.socket, socket.socket | None]:
    """--listen's socket and --metrics' (None without it), bound before the store is opened: a
    port taken fails the start (exit 2) without leaving a new SQLite store behind."""
    from damocles_ext.errors import UsageError
    from damocles_ext.frontends.listeners import AddressNotReady, bind_tcp
    from damocles_ext.metrics import bind_metrics

    port = args.listen[1]
    listening = bind_tcp(*args.listen, doing="listen", option="--listen")
    if args.metrics is None:
        return listening, None
    try:
        return listening, bind_metrics(*args.metrics)
    except UsageError as exc:
        listening.close()
        if args.metrics[1] != port or isinstance(exc, AddressNotReady):  # (not up yet: 75)
            raise
        # The port the system refused is --listen's own, bound just above.
        raise UsageError(
            f"{exc}: it is the port --listen serves the RPC on; give the metrics a"
            " port of their own, e.g. --metrics 127.0.0.1:9111 (the unit's)"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Open the store (creating it when missing), listen, serve until a signal."""
    import logging

    import trio

    from damocles_ext.errors import DextError, UsageError
    from damocles_ext.frontends.coordinator import STOP_GRACE, Coordinator, CoordinatorServer
    from damocles_ext.frontends.signals import stop_signals, until_stopped, watch_signals
    from damocles_ext.frontends.watchdog import start_watchdog
    from damocles_ext.jobs.manager_config import read_settings
    from damocles_ext.jobs.pings import PausedWorkers
    from damocles_ext.jobs.store import JobStore, StoreLost, TrioJobStore

    log = logging.getLogger("damocles_ext.coordinator")
    setup_from_args(args)
    grace = STOP_GRACE if args.shutdown_grace is None else args.shutdown_grace
    if args.index_without_token and args.token_file is None:
        raise UsageError(
            "--index-without-token goes with --token-file: without a token every method is"
            " answered without one already"
        )
    check_proxy_headers(args.proxy, args.header, "--header")
    check_sector_cache(args)
    # Before the store is opened (a new SQLite file): a bad --sector-cache leaves nothing behind.
    snapshot = sector_snapshot(args, log) if args.proxy is not None else None
    settings = read_settings(args.conf_dir, args.store)
    for warning in settings.warnings:
        log.warning("%s", warning)
    host, port = args.listen
    listening, scraped = _bind_ports(args)
    # With --proxy no store is needed here: the source's store names are passed on as they are
    # (relay_names), as a damocles proxy node does.
    with (
        closing(listening),
        nullcontext() if scraped is None else closing(scraped),
        JobStore.open(args.jobs, limits=settings.limits, writable=True) as store,
    ):
        metrics = metrics_server = None
        jobs = TrioJobStore(store)  # its clock kept on a PostgreSQL server's: the metrics' too
        # The workers whose pings say they are paused: the coordinator and the metrics show them.
        paused = PausedWorkers(jobs.clock)
        if args.metrics is not None:
            from damocles_ext.jobs.metrics import JobMetrics
            from damocles_ext.metrics import MetricsServer

            metrics = JobMetrics(store, paused_workers=paused, clock=jobs.clock)
        coordinator = Coordinator(
            jobs,
            settings.stores,
            observe=None if metrics is None else metrics.observe,
            sector_index=_sector_index(args, settings.stores, snapshot),
            paused_workers=paused,
        )
        locator = coordinator.sector_index.locator
        if metrics is not None and locator is not None:
            from damocles_ext.sectors.metrics import SectorMetrics

            # Venus.SectorIndexerFind's lookups through --proxy: hits, source errors, stale.
            locator.metrics = SectorMetrics(metrics.registry)
        server = CoordinatorServer(
            coordinator,
            host,
            port,
            token=args.token_file,
            index_without_token=args.index_without_token,
            sock=listening,
        )
        lost: list[StoreLost] = []
        failed: list[DextError] = []  # the store failing already as the coordinator starts
        try:
            if metrics is not None:
                metrics_server = MetricsServer(metrics, *args.metrics, sock=scraped)

            async def main() -> None:
                start_watchdog()
                # Signals are read from the start: a store that stalls while the coordinator
                # starts (learning its sectors, the first sweep: each call up to a minute) held
                # SIGTERM, and a second SIGTERM was lost (trio says a signal pending once).
                with trio.open_signal_receiver(*stop_signals()) as signals:
                    async with trio.open_nursery() as nursery:
                        learning, sweeping = trio.CancelScope(), trio.CancelScope()
                        scraping, refreshing = trio.CancelScope(), trio.CancelScope()
                        stopping = False

                        def shut_down() -> None:
                            # Requests being answered get their answer (within the grace);
                            # nothing new is taken. A second signal stops at once.
                            nonlocal stopping
                            if stopping:
                                return
                            stopping = True
                            learning.cancel()
                            sweeping.cancel()
                            scraping.cancel()
                            refreshing.cancel()  # the --proxy locator's refresh of its sources
                            server.stop()
                            nursery.cancel_scope.deadline = trio.current_time() + grace

                        def store_lost(exc: StoreLost) -> None:
                            # Its file deleted or replaced: every call would fail from now on.
                            # Started again (systemd's Restart=on-failure), it opens the file now
                            # at the path; what the old file held is not this process's to keep.
                            if not lost:
                                lost.append(exc)
                                log.error("stopping: %s", exc)
                                shut_down()

                        watcher = trio.CancelScope()

                        async def watch() -> None:
                            with watcher:
                                await watch_signals(signals, nursery.cancel_scope, shut_down, log)

                        nursery.start_soon(watch)
                        with learning:
                            # On the server's clock before the first job is given out.
                            await coordinator.server_clock.read_server()
                            try:
                                await coordinator.learn_sectors()
                            except DextError as exc:  # the command's error, said as such
                                failed.append(exc)
                                nursery.cancel_scope.cancel()
                        if not (failed or stopping):
                            coordinator.on_store_lost = store_lost
                            if locator is not None:

                                async def refresh() -> None:
                                    assert locator is not None
                                    with refreshing:
                                        await locator.refresh_forever()

                                nursery.start_soon(refresh)
                            await nursery.start(server.serve)
                            # Started after its first pass, or at once if stopped during it.
                            await nursery.start(until_stopped, sweeping, coordinator.sweep_forever)
                            if metrics_server is not None:
                                await nursery.start(until_stopped, scraping, metrics_server.serve)
                                if not stopping:
                                    log.info("metrics on %s", metrics_server.url)
                            if not stopping:
                                log.info("serving the worker-prover RPC at %s", server.url)
                            await server.stopped.wait()
                        watcher.cancel()
                    if locator is not None:  # its snapshot saved, its connections closed
                        await locator.aclose()

            trio.run(main)
            if failed:
                raise failed[0]
            if lost:
                raise lost[0]  # exit code 1, saying why
        finally:
            server.close()
            if metrics_server is not None:
                metrics_server.close()
    log.info("stopped")
    return 0
