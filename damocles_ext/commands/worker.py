"""`damocles-ext worker --manager ADDRESS -c ext-prover.cfg`: pull WindowPoSt jobs from a manager
(damocles-ext coordinator, or damocles-manager --worker-prover) and prove them on the config's
[[WdPost]] children (docs/WORKER.md).

Exit codes: 0 stopped by SIGTERM/SIGINT; 1 the children or the worker failed; 2 bad options or
config, a store the manager does not know, a refused token.
"""

from __future__ import annotations

import argparse

from damocles_ext.logs import add_logging_args, setup_from_args

from .common import (
    add_config_args,
    add_restart_arg,
    add_shutdown_arg,
    positive_duration,
    token_file,
)
from .wdpost import MANAGER_HELP


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `worker`."""
    parser = subparsers.add_parser(
        "worker",
        help="pull WindowPoSt jobs from a coordinator or damocles-manager and prove them",
        description=(
            "A GPU machine of worker-prover mode: ask the manager for WindowPoSt jobs as the"
            " config's [[WdPost]] children have free slots, prove them, heartbeat them while they"
            " run and deliver the results. SIGTERM or SIGINT: ask for no more jobs, let running"
            " proofs finish (--shutdown-grace), deliver them, exit."
        ),
    )
    parser.add_argument("--manager", metavar="ADDRESS", required=True, help=MANAGER_HELP)
    add_config_args(parser, required=True)
    parser.add_argument(
        "--name",
        help="the worker's name, as the manager shows it (default: the address of the local"
        " interface that reaches the manager, as damocles-worker names itself)",
    )
    parser.add_argument(
        "--allowed-miners",
        metavar="ID,...",
        type=_miners,
        default=(),
        help="take only these miners' jobs (default: any), e.g. 1000,1001",
    )
    parser.add_argument(
        "--allowed-sizes",
        metavar="SIZE,...",
        type=_sizes,
        default=(),
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
        default=15.0,
        help="after the manager had no job, ask again this much later, or when a slot frees"
        " (default: 15s, the recover_interval damocles advises for wdpost workers)",
    )
    add_shutdown_arg(parser)
    add_restart_arg(parser)
    add_logging_args(parser, "info")
    return parser


def _store(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(
            f"expected NAME=PATH (a store's name as the manager names it, and its local path),"
            f" got {text!r}"
        )
    return name.strip(), path.strip()


def _miners(text: str) -> tuple[int, ...]:
    miners = []
    for given in text.split(","):
        part = given.strip().removeprefix("f0").removeprefix("t0")
        if not part.isdigit():
            raise argparse.ArgumentTypeError(
                f"{text!r}: miner ids are numbers separated by commas (e.g. 1000,1001)"
            )
        miners.append(int(part))
    return tuple(miners)


def _sizes(text: str) -> tuple[str, ...]:
    from damocles_ext.jobs.worker_rules import proof_types_for_sizes

    try:
        return proof_types_for_sizes(s.strip() for s in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Build the settings, start the worker, run until a signal."""
    import logging
    import os
    import signal

    import trio

    from damocles_ext.config import check_startable
    from damocles_ext.errors import DextError, UsageError
    from damocles_ext.frontends.signals import watch_signals
    from damocles_ext.frontends.worker import Worker
    from damocles_ext.jobs.worker_settings import WorkerSettings

    from .common import children_of, load_config_from_args, supervisor_options

    setup_from_args(args)
    log = logging.getLogger("damocles_ext.worker")
    config = load_config_from_args(args)
    children = children_of(config, "window_post")
    ignored = [c for c in config.children if c not in children]
    if ignored:
        # An operator may point the worker at the ext-prover.cfg its manager uses: its
        # [[WinPost]] children are the manager's business, and starting them here would only
        # hold GPUs no job ever uses.
        log.warning(
            "%s: the worker proves WindowPoSt only; %d children of other tables are not started"
            " (%s)",
            config.source,
            len(ignored),
            ", ".join(c.name for c in ignored),
        )
    options = supervisor_options(args)
    check_startable(config, children, plugin_manager=options["plugin_manager"])
    for name, path in args.attached:
        if not os.path.isdir(path):
            log.warning("attached store %s: %s is not a directory here (yet)", name, path)
    try:
        settings = WorkerSettings(
            manager=args.manager,
            children=tuple(children),
            name=args.name,
            token=args.token_file,
            allowed_miners=args.allowed_miners,
            allowed_proof_types=args.allowed_sizes,
            attached=dict(args.attached),
            heartbeat_interval=args.heartbeat_interval,
            idle_poll=args.idle_poll,
            shutdown_grace=args.shutdown_grace,
        )
        settings.endpoint  # noqa: B018 - a bad address is a usage error before anything starts
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    worker = Worker(settings, plugin_manager=options["plugin_manager"], supervisor_options=options)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_signals, signals, nursery.cancel_scope, worker.stop, log)
                await worker.run()
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
    log.info("stopped")
    return 0
