"""`damocles-ext worker --manager ADDRESS -c ext-prover.cfg`, or `damocles-ext worker
--worker-config damocles-worker.toml`: pull WindowPoSt jobs from a manager (damocles-ext
coordinator, or damocles-manager --worker-prover) and prove them on the config's [[WdPost]]
children, or the toml's [[processors.window_post]] (docs/WORKER.md).

Exit codes: 0 stopped by SIGTERM, SIGINT or SIGHUP (unless ignored, as under nohup); 1 the
children or the worker failed; 2 bad options or config, a store the manager does not know, a
refused token.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from damocles_ext.logs import add_logging_args, setup_from_args

from .common import (
    add_config_args,
    add_header_arg,
    add_restart_arg,
    add_sector_cache_args,
    add_shutdown_arg,
    check_proxy_headers,
    check_sector_cache,
    not_empty,
    positive_duration,
    proxy_address,
    socket_path,
    token_file,
    utf8_argument,
)
from .wdpost import MANAGER_HELP

if TYPE_CHECKING:
    from damocles_ext.jobs.worker_settings import WorkerSettings
    from damocles_ext.sectors.locator import SectorLocator

    from .common import SupervisorOptions


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `worker`."""
    parser = subparsers.add_parser(
        "worker",
        help="pull WindowPoSt jobs from a coordinator or damocles-manager and prove them",
        description=(
            "A GPU machine of worker-prover mode: ask the manager for WindowPoSt jobs as the"
            " config's [[WdPost]] children have free slots, prove them, heartbeat them while they"
            " run and deliver the results. SIGTERM, SIGINT or SIGHUP (unless ignored): ask for no"
            " more jobs, let running proofs finish (--shutdown-grace), deliver them, exit."
        ),
    )
    parser.add_argument(
        "--worker-config",
        metavar="FILE",
        help="take everything from a damocles-worker.toml: the manager (rpc_client.addr and"
        " headers), the name, the wdpost threads' allowed miners and sizes and recover_interval,"
        " the [[attached]] stores, at most as many jobs at once as wdpost threads (and"
        " [processors.limitation.concurrent] window_post), and [[processors.window_post]] as the"
        " children. Instead of -c/--conf-dir; the options below, given beside it, override the"
        " file's value",
    )
    parser.add_argument(
        "--manager",
        metavar="ADDRESS",
        help=MANAGER_HELP + " (required unless --worker-config gives it)",
    )
    add_config_args(parser, required=False)
    parser.add_argument(
        "--name",
        type=_name,
        help="the worker's name, as the manager shows it (default: the address of the local"
        " interface that reaches the manager, as damocles-worker names itself)",
    )
    parser.add_argument(
        "--allowed-miners",
        metavar="ID,...",
        type=_miners,
        help="take only these miners' jobs (default: any), e.g. 1000,1001",
    )
    parser.add_argument(
        "--allowed-sizes",
        metavar="SIZE,...",
        type=_sizes,
        help="take only jobs of these sector sizes (default: any), e.g. 32GiB,64GiB; as"
        " damocles-worker's allowed_sizes",
    )
    parser.add_argument(
        "--attached",
        metavar="NAME=PATH",
        action="append",
        type=_store,
        default=[],
        help="a store the jobs name (as damocles-manager names it) and where it is mounted here;"
        " repeat for each. Sectors are at PATH/sealed/s-t0<miner>-<num> and PATH/cache/… The"
        " manager must know each one, or the worker does not start",
    )
    add_header_arg(
        parser,
        "--header",
        "an HTTP header sent with every call to the manager (as damocles-worker's"
        " rpc_client.headers); repeat for each. `Authorization: Bearer TOKEN` is the token (as"
        " --token-file). With --worker-config, one named as a header of the file replaces it",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        type=token_file,
        help="send the token on FILE's first line as `Authorization: Bearer <token>` (the"
        " coordinator's --token-file)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        metavar="DURATION",
        type=positive_duration,
        default=3.0,
        help="how often running jobs are heartbeated, all in one call (default: 3s, as"
        " damocles-worker; keep it well below the manager's HeartbeatTimeout, 15s by default)",
    )
    parser.add_argument(
        "--idle-poll",
        metavar="DURATION",
        type=positive_duration,
        help="after the manager had no job, ask again this much later, or when a slot frees"
        " (default: 15s, the recover_interval damocles advises for wdpost workers; with"
        " --worker-config, the shortest recover_interval of its wdpost threads)",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        type=socket_path,
        help="serve a control socket at PATH for `damocles-ext status --socket PATH`: the"
        " supervisor's status plus the worker's (the manager, its name, the jobs it holds);"
        " off by default",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_listen_address,
        help="serve Prometheus metrics on http://HOST:PORT/metrics: the supervisor's (as `run`)"
        " and the worker's (jobs pulled, finished, failed, leases lost, finish retries,"
        " heartbeat round trips, allocations); off by default; ':PORT' listens on 127.0.0.1",
    )
    parser.add_argument(
        "--proxy",
        metavar="ADDR",
        type=proxy_address,
        help="a damocles source node's RPC (IP:PORT, a URL or a multiaddr): a job's sector in a"
        " store not attached here is located through the sector-location service (this source"
        " node, read-only, then a scan of the attached stores), and a sector it does not locate"
        " is a fault of the job, not an error",
    )
    add_header_arg(
        parser, "--proxy-header", "an HTTP header sent to the --proxy source node; repeat for each"
    )
    add_sector_cache_args(parser)
    add_shutdown_arg(parser)
    add_restart_arg(parser)
    add_logging_args(parser, "info")
    return parser


_named = not_empty("give the worker a name, or leave --name out")  # else no one, never live


def _name(text: str) -> str:
    """--name: sent to the manager as text, and shown by `wdpost list`."""
    return utf8_argument(_named(text), "and the manager takes names as text: give a UTF-8 one")


def _store(text: str) -> tuple[str, str]:
    from .common import store_pair

    return store_pair(text, "a store's name as the manager names it, and its local path")


def _listen_address(text: str) -> tuple[str, int]:
    from damocles_ext.metrics import parse_listen_address

    return parse_listen_address(text)


def _header(text: str) -> tuple[str, str]:
    from damocles_ext.jobs.endpoint import HEADER_NAME, header_name_problem, header_value_problem

    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not HEADER_NAME.fullmatch(name):
        # Not a word of it, bound for the journal: it may hold a token (alone, or after a
        # word: 'Authorization Bearer TOKEN'; a token may look like a header's name).
        shown = "a text with no ':'" if not sep else "no header name before its ':'"
        raise argparse.ArgumentTypeError(
            f"expected 'NAME: VALUE' (an HTTP header, e.g. 'X-Site: lab-3'; its name ASCII"
            f" letters, digits and -), got {shown} (not shown: it may hold a token)"
        )
    if (problem := header_name_problem(name)) is not None:
        raise argparse.ArgumentTypeError(problem)
    if (problem := header_value_problem(value)) is not None:
        raise argparse.ArgumentTypeError(f"{problem} (in the value of {name}, not shown)")
    return name, value


def _miners(text: str) -> tuple[int, ...]:
    miners = []
    for given in text.split(","):
        part = given.strip().removeprefix("f0").removeprefix("t0")
        if not (part.isascii() and part.isdigit()):
            raise argparse.ArgumentTypeError(
                f"{text!r}: miner ids are numbers separated by commas (e.g. 1000,1001)"
            )
        if int(part) >= 2**63:  # damocles' AllowedMiners are int64s (abi.ActorID as JSON)
            raise argparse.ArgumentTypeError(f"{text!r}: miner id {part} is over 2**63 - 1")
        miners.append(int(part))
    return tuple(miners)


def _attached(given: list[tuple[str, str]]) -> dict[str, str]:
    """--attached NAME=PATH, each name once (damocles-worker refuses a name given twice)."""
    from damocles_ext.errors import UsageError
    from damocles_ext.jobs.paths import merge_stores

    try:
        return merge_stores(given)
    except ValueError as exc:
        raise UsageError(f"--attached: {exc}") from None


def _sizes(text: str) -> tuple[str, ...]:
    from damocles_ext.tasks import proof_types_for_sizes

    try:
        return proof_types_for_sizes(s.strip() for s in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Build the settings, start the worker, run until a signal."""

    import trio

    from damocles_ext.errors import DextError
    from damocles_ext.frontends.control_socket import bind_control_socket
    from damocles_ext.frontends.run import _discard
    from damocles_ext.frontends.signals import stop_signals, watch_signals
    from damocles_ext.frontends.watchdog import start_watchdog
    from damocles_ext.frontends.worker import Worker
    from damocles_ext.frontends.worker_control import WorkerMetrics, run_worker

    from .common import supervisor_options

    setup_from_args(args)
    log = logging.getLogger("damocles_ext.worker")
    options = supervisor_options(args)
    settings = _settings(args, options, log)
    locator = _locator(args, settings, options)
    metrics = metrics_server = None
    if args.metrics is not None:
        from damocles_ext.metrics import MetricsServer, SupervisorMetrics

        metrics = SupervisorMetrics()
        # At once, not behind plugins' hooks; given before the Worker copies the options.
        options["inline_observers"] = [metrics]
    worker = Worker(
        settings,
        plugin_manager=options["plugin_manager"],
        supervisor_options=options,
        locator=locator,
    )
    # Bound before any child is spawned: a taken place is an exit 2 with nothing started.
    sock = bind_control_socket(args.socket) if args.socket is not None else None
    if metrics is not None:
        WorkerMetrics(worker, metrics.registry)
        if locator is not None:
            from damocles_ext.sectors.metrics import SectorMetrics

            locator.metrics = SectorMetrics(metrics.registry)
        try:
            metrics_server = MetricsServer(metrics, *args.metrics)
        except BaseException:
            if sock is not None:
                _discard(sock)  # no socket file left behind by a worker that did not start
            raise

    async def main() -> None:
        start_watchdog()
        with trio.open_signal_receiver(*stop_signals()) as signals:
            async with trio.open_nursery() as nursery:

                def at_once() -> None:  # a second signal: the jobs held are left, named
                    if worker.held:
                        log.warning(
                            "stopping at once: the manager gives the %d jobs held here to"
                            " another worker after its heartbeat timeout: %s",
                            len(worker.held),
                            ", ".join(worker.held),
                        )
                    nursery.cancel_scope.cancel()

                nursery.start_soon(
                    watch_signals, signals, nursery.cancel_scope, worker.stop, log, at_once
                )
                await run_worker(
                    worker, sock=sock, limits={}, metrics=metrics, metrics_server=metrics_server
                )
                if locator is not None:
                    await locator.aclose()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # Raised inside nurseries: the operator's error is the message, not the group.
        found = group.subgroup(lambda e: isinstance(e, DextError))
        if found is None:
            raise
        first: BaseException = found
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    finally:
        if metrics_server is not None:
            metrics_server.close()
        if sock is not None and sock.fileno() != -1:  # the control server never took it
            _discard(sock)
    log.info("stopped")
    return 0


def _locator(
    args: argparse.Namespace, settings: WorkerSettings, options: SupervisorOptions
) -> SectorLocator | None:
    """The sector-location service over --proxy and the attached stores (None without
    --proxy); UsageError for a bad address or no attached store to turn names into paths."""
    check_proxy_headers(args.proxy, args.proxy_header, "--proxy-header")
    check_sector_cache(args)
    if args.proxy is None:
        return None
    from damocles_ext.sectors import SectorSettings
    from damocles_ext.sectors.locator import SectorLocator
    from damocles_ext.sectors.providers import SourceNode, StoreScan, build_providers

    from .common import check_sector_sources, sector_snapshot

    stores = dict(settings.attached)
    check_sector_sources(args.proxy, stores, "--attached NAME=PATH for each store")
    sector_settings = SectorSettings(
        proxy=args.proxy, stores=stores, headers=tuple(args.proxy_header)
    )
    providers = build_providers(sector_settings, options["plugin_manager"])
    # The providers whose paths are made from the stores attached here: their entries of the
    # snapshot are rebuilt under where the stores are now (snapshot.rerooted).
    built_in = frozenset(p.name for p in providers if isinstance(p, SourceNode | StoreScan))
    log = logging.getLogger("damocles_ext.worker")
    return SectorLocator(providers, snapshot=sector_snapshot(args, log, (stores, built_in)))


def _settings(
    args: argparse.Namespace, options: SupervisorOptions, log: logging.Logger
) -> WorkerSettings:
    """The WorkerSettings from the options, or from --worker-config with the options given beside
    it overriding the file's values."""
    import os

    from damocles_ext.config import absent_gpu_warnings, check_startable
    from damocles_ext.errors import UsageError
    from damocles_ext.jobs.rules import DEFAULT_HEARTBEAT_TIMEOUT
    from damocles_ext.jobs.worker_settings import DEFAULT_IDLE_POLL, WorkerSettings

    from .common import children_of, load_config_from_args

    from_file = args.worker_config is not None
    if from_file and (args.config is not None or args.conf_dir is not None):
        raise UsageError(
            "--worker-config names the children ([[processors.window_post]]) already; give it"
            " or -c/--conf-dir, not both"
        )
    if not from_file and args.config is None and args.conf_dir is None:
        raise UsageError(
            "give -c ext-prover.cfg (or --conf-dir DIR) for the children, or --worker-config"
            " damocles-worker.toml for everything"
        )
    if not from_file and args.manager is None:
        raise UsageError(
            "--manager ADDRESS is required (the coordinator's or damocles-manager's RPC), unless"
            " --worker-config gives it"
        )
    token, headers = _split_token(args.header)
    if token is not None and args.token_file is not None:
        raise UsageError(
            "--header 'Authorization: Bearer …' and --token-file both give the token; keep one"
        )
    token = args.token_file if token is None else token
    base: dict[str, Any] = {}
    if from_file:
        from damocles_ext.config.damocles_worker import load_damocles_worker_config

        file = load_damocles_worker_config(args.worker_config)
        for warning in file.warnings:
            log.warning("%s", warning)
        children = list(file.children)
        config = file.to_config()
        base = {
            "manager": file.manager,
            "name": file.name,
            "token": file.token,
            "headers": tuple(file.headers.items()),
            "allowed_miners": file.allowed_miners,
            "allowed_proof_types": file.allowed_proof_types,
            "attached": {a.name: a.location for a in file.attached},
            "idle_poll": file.idle_poll,
            "max_jobs": file.max_jobs,
            "source": file.source,
        }
    else:
        # (not warning about the children it does not start)
        config = load_config_from_args(args, "window_post", started_only=True)
        children = children_of(config, "window_post")
        ignored = [c for c in config.children if c not in children]
        if ignored:
            # An operator may point the worker at the ext-prover.cfg its manager uses: its
            # [[WinPost]] children are the manager's business, and starting them here would only
            # hold GPUs no job ever uses.
            log.warning(
                "%s: the worker proves WindowPoSt only; %d children of other tables are not"
                " started (%s)",
                config.source,
                len(ignored),
                ", ".join(c.name for c in ignored),
            )
    check_startable(config, children, plugin_manager=options["plugin_manager"])
    for warning in absent_gpu_warnings(children, config.gpus_found, dialect=config.dialect):
        log.warning("%s", warning)
    given = {
        "manager": args.manager,
        "name": args.name,
        "token": token,
        "allowed_miners": args.allowed_miners,
        "allowed_proof_types": args.allowed_sizes,
        "attached": _attached(args.attached) if args.attached else None,
        "idle_poll": args.idle_poll,
    }
    merged = {**base, **{k: v for k, v in given.items() if v is not None}}
    merged["headers"] = _merge_headers(base.get("headers", ()), headers)
    merged.setdefault("idle_poll", DEFAULT_IDLE_POLL)
    for name, path in merged.get("attached", {}).items():
        if not os.path.isdir(path):
            log.warning("attached store %s: %s is not a directory here (yet)", name, path)
    try:
        settings = WorkerSettings(
            children=tuple(children),
            heartbeat_interval=args.heartbeat_interval,
            shutdown_grace=args.shutdown_grace,
            **merged,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        settings.endpoint  # noqa: B018 - a bad address is a usage error before anything starts
    except ValueError as exc:
        where = "--manager" if args.manager is not None else "[sector_manager] rpc_client.addr"
        raise UsageError(f"{where}: {exc}") from None
    if settings.heartbeat_interval > DEFAULT_HEARTBEAT_TIMEOUT / 3:
        # damocles-worker heartbeats every 3 s against the manager's 15 s: four may go astray.
        log.warning(
            "--heartbeat-interval %gs: damocles-manager gives a job to another worker once its"
            " heartbeats stop for HeartbeatTimeout, 15s by default, so at this interval %s;"
            " keep it at most a third of the manager's HeartbeatTimeout (its"
            " [Common.Proving.WorkerProver]), e.g. the default 3s",
            settings.heartbeat_interval,
            "every job is taken back before its first heartbeat"
            if settings.heartbeat_interval >= DEFAULT_HEARTBEAT_TIMEOUT
            else "one late or lost heartbeat costs the job",
        )
    return settings


def _split_token(
    headers: list[tuple[str, str]],
) -> tuple[str | None, list[tuple[str, str]]]:
    """An `Authorization: Bearer` header is the token, as the damocles-worker.toml reader takes
    it; the others are sent as given."""
    token = None
    rest = []
    for name, value in headers:
        scheme, _, credentials = value.partition(" ")
        if name.lower() == "authorization" and scheme.lower() == "bearer" and credentials.strip():
            token = credentials.strip()
        else:
            rest.append((name, value))
    return token, rest


def _merge_headers(
    base: tuple[tuple[str, str], ...], given: list[tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    # HTTP header names are case-insensitive: a given one replaces the file's of that name.
    names = {name.lower() for name, _ in given}
    return (*((n, v) for n, v in base if n.lower() not in names), *given)
