"""`damocles-ext run`: the long-running supervisor of both stages, reachable on a control socket."""

from __future__ import annotations

import argparse
import logging
import re

from damocles_ext.logs import add_dump_arg, add_logging_args, setup_from_args

from .common import (
    DeadlineAfter,
    add_config_args,
    add_restart_arg,
    add_shutdown_arg,
    load_config_from_args,
    positive_duration,
    positive_int,
    socket_path,
    supervisor_options,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `run`."""
    parser = subparsers.add_parser(
        "run",
        help="supervise the provers of both stages; take requests on a control socket",
        description=(
            "Start every child the config lists and serve proof requests from `damocles-ext"
            " prove` and damocles_ext.client on a private unix socket (mode 0600 in a 0700"
            " directory). SIGTERM, SIGINT or SIGHUP (unless ignored) shut down gracefully."
        ),
    )
    add_config_args(parser, required=True)
    parser.add_argument(
        "--socket",
        metavar="PATH",
        type=socket_path,
        help="control socket path (default: $XDG_RUNTIME_DIR/damocles-ext/control.sock, else"
        " /run/damocles-ext/control.sock)",
    )
    add_shutdown_arg(parser)
    add_restart_arg(parser)
    parser.add_argument(
        "--deadline-after",
        metavar="[STAGE=]DURATION",
        action=DeadlineAfter,
        convert=_deadline_after,
        append=True,
        help="give each request that comes without a deadline the deadline DURATION after it"
        " arrives (seconds, or with a suffix s, m or h; 0 or off: none), for every stage or for"
        " STAGE (window_post, winning_post); repeat for each, once each (a STAGE's own after"
        " the one for every stage sets that stage's). Default: 40m for window_post, 5m"
        " for winning_post, as serve gives: a prover stuck in a GPU call still sends Progress,"
        " and the deadline is what frees its child",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_listen_address,
        default=None,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (off by default; ':PORT' or"
        " 'PORT' listens on 127.0.0.1 only; give 0.0.0.0:PORT to let other hosts scrape)",
    )
    limits = parser.add_argument_group(
        "connection limits",
        "what clients of the control socket and scrapers of the metrics port may hold open",
    )
    limits.add_argument(
        "--max-connections",
        type=positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="control socket connections open at once; over it, the connection idle longest is"
        " closed, or the new one is told 'too many connections' if all are busy"
        f" (default: {DEFAULT_MAX_CONNECTIONS})",
    )
    limits.add_argument(
        "--idle-timeout",
        type=positive_duration,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="DURATION",
        help="close a control connection with no request in flight that sent nothing for this"
        " long (90, 90s, 10m, 1h; default: 10m); a client connects again when it needs to",
    )
    limits.add_argument(
        "--max-buffer",
        type=parse_size,
        default=DEFAULT_MAX_BUFFERED,
        metavar="SIZE",
        help="bytes of unfinished frames all control connections together may hold (256MiB,"
        " 64M, bytes); over it, the connection holding the most is closed (default: 256MiB)",
    )
    limits.add_argument(
        "--metrics-max-connections",
        type=positive_int,
        default=DEFAULT_METRICS_MAX_CONNECTIONS,
        metavar="N",
        help="metrics connections open at once; over it, the one idle longest is closed"
        f" (default: {DEFAULT_METRICS_MAX_CONNECTIONS})",
    )
    limits.add_argument(
        "--metrics-idle-timeout",
        type=positive_duration,
        default=DEFAULT_METRICS_IDLE_TIMEOUT,
        metavar="DURATION",
        help="close a metrics connection that has not sent a whole request for this long"
        f" (default: {DEFAULT_METRICS_IDLE_TIMEOUT:g}s)",
    )
    add_logging_args(parser, "info")
    add_dump_arg(parser)
    return parser


# Kept here (not imported from the modules that use them) so that `--help` stays fast.
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_MAX_BUFFERED = 256 * 2**20
DEFAULT_METRICS_MAX_CONNECTIONS = 16
DEFAULT_METRICS_IDLE_TIMEOUT = 60.0

_SIZE = re.compile(r"^\s*([0-9]+)\s*([kmg]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "1048576", "512K", "64M", "64MiB", "1G" (powers of 1024); at least 1 MiB."""
    m = _SIZE.match(text)
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; write bytes (1048576) or a number with K, M or G (64M,"
            " 256MiB)"
        )
    value = int(m.group(1)) * 1024 ** "_kmg".index((m.group(2) or "_").lower())
    if value < 2**20:
        raise argparse.ArgumentTypeError(f"{text!r} is under 1 MiB; give at least 1M")
    return value


def _deadline_after(text: str) -> tuple[str | None, float]:
    """A --deadline-after argument: (its stage, or None for every stage; seconds, 0 for none)."""
    from damocles_ext.stages import POST_STAGES

    from .common import deadline_duration

    stage, sep, duration = text.rpartition("=")
    if sep and stage.strip() not in POST_STAGES:
        raise argparse.ArgumentTypeError(
            f"{stage.strip()!r} is not a stage requests come for; give {' or '.join(POST_STAGES)}"
            " (or no STAGE= for both)"
        )
    return (stage.strip() if sep else None), deadline_duration(duration)


def deadlines_after(given: list[tuple[str | None, float]] | None) -> dict[str, float]:
    """Each stage's deadline after a request's arrival (absent: none), from the defaults and
    the --deadline-after arguments in order (a stage's own after the one for every stage)."""
    from .serve import DEFAULT_DEADLINE_AFTER

    after = dict(DEFAULT_DEADLINE_AFTER)
    for stage, seconds in given or ():
        for name in after if stage is None else [stage]:
            after[name] = seconds
    return {stage: seconds for stage, seconds in after.items() if seconds > 0}


def _listen_address(text: str) -> tuple[str, int]:
    from damocles_ext.metrics import parse_listen_address

    return parse_listen_address(text)


def run(args: argparse.Namespace) -> int:
    """Check the config and the socket place (exit 2 on problems), then serve until a signal."""
    from damocles_ext.config import absent_gpu_warnings, check_startable
    from damocles_ext.frontends.control_socket import default_socket_path
    from damocles_ext.frontends.run import serve_control_socket
    from damocles_ext.plugins import get_plugin_manager

    setup_from_args(args)
    config = load_config_from_args(args)
    # Before the socket exists: a client must not find a supervisor whose children cannot start.
    plugin_manager = get_plugin_manager()
    check_startable(config, plugin_manager=plugin_manager)
    for warning in absent_gpu_warnings(config.children, config.gpus_found):
        logging.getLogger("damocles_ext.run").warning("%s", warning)
    path = args.socket if args.socket is not None else default_socket_path()
    return serve_control_socket(
        config,
        path,
        lambda: supervisor_options(args, plugin_manager),
        limits={
            "max_connections": args.max_connections,
            "idle_timeout": args.idle_timeout,
            "max_buffered": args.max_buffer,
        },
        deadline_after=deadlines_after(args.deadline_after),
        metrics_address=args.metrics,
        metrics_limits={
            "max_connections": args.metrics_max_connections,
            "idle_timeout": args.metrics_idle_timeout,
        },
    )
