"""`damocles-ext run`: the long-running supervisor of both stages, reachable on a control socket."""

from __future__ import annotations

import argparse
import logging

from .serve import (
    add_common_args,
    add_config_args,
    add_dump_arg,
    add_restart_arg,
    add_shutdown_arg,
    load_config_from_args,
    supervisor_options,
    watch_signals,
)

log = logging.getLogger("damocles_ext.run")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `run`."""
    parser = subparsers.add_parser(
        "run",
        help="supervise the provers of both stages; take requests on a control socket",
        description=(
            "Start every child the config lists and serve proof requests from `damocles-ext"
            " prove` and damocles_ext.client on a private unix socket (mode 0600 in a 0700"
            " directory). SIGTERM or SIGINT shut down gracefully."
        ),
    )
    add_config_args(parser, required=True)
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="control socket path (default: $XDG_RUNTIME_DIR/damocles-ext/control.sock, else"
        " /run/damocles-ext/control.sock)",
    )
    add_shutdown_arg(parser)
    add_restart_arg(parser)
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_listen_address,
        default=None,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (off by default; ':PORT' or"
        " 'PORT' listens on 127.0.0.1 only; give 0.0.0.0:PORT to let other hosts scrape)",
    )
    add_common_args(parser, "info")
    add_dump_arg(parser)
    return parser


def _listen_address(text: str) -> tuple[str, int]:
    from damocles_ext.metrics import parse_listen_address

    return parse_listen_address(text)


def run(args: argparse.Namespace) -> int:
    """Check the config and the socket place (exit 2 on problems), then serve until a signal."""
    from damocles_ext.commands.serve import setup_logging
    from damocles_ext.config import check_startable
    from damocles_ext.plugins import get_plugin_manager
    from damocles_ext.supervisor.control import bind_control_socket, default_socket_path

    setup_logging(args)
    config = load_config_from_args(args)
    # Before the socket exists: a client must not find a supervisor whose children cannot start.
    plugin_manager = get_plugin_manager()
    check_startable(config, plugin_manager=plugin_manager)
    path = args.socket if args.socket is not None else default_socket_path()
    # The socket and the metrics port are bound before any child is spawned: a taken or unsafe
    # place is a usage error, not a half-started supervisor.
    sock = bind_control_socket(path)
    metrics = server = None
    try:
        from damocles_ext.supervisor.core import Supervisor

        options = supervisor_options(args, plugin_manager)
        if args.metrics is not None:
            from damocles_ext.metrics import MetricsServer, SupervisorMetrics

            metrics = SupervisorMetrics()
            options["plugin_manager"].register(metrics, name="damocles_ext.metrics")
            server = MetricsServer(metrics, *args.metrics)
        supervisor = Supervisor(config, **options)
    except BaseException:
        _discard(sock)
        if server is not None:
            server.close()
        raise

    import trio

    try:
        return trio.run(_run, supervisor, sock, metrics, server)
    finally:
        if server is not None:
            server.close()


def _discard(sock) -> None:
    import contextlib
    import os

    path = sock.getsockname()
    sock.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _run(supervisor, sock, metrics=None, metrics_server=None) -> int:
    import signal

    import trio

    from damocles_ext.status import StatusSource
    from damocles_ext.supervisor.control import ControlServer

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        status = StatusSource(
            supervisor,
            socket=str(sock.getsockname()),
            metrics=(lambda: metrics_server.url) if metrics_server is not None else None,
        )
        server = ControlServer(sock, supervisor.submit, status=status.as_data)
        async with trio.open_nursery() as nursery:
            def shut_down() -> None:
                server.stop_accepting()
                supervisor.request_shutdown()

            nursery.start_soon(watch_signals, signals, nursery.cancel_scope, shut_down, log)
            await nursery.start(server.serve)
            log.info("control socket listening on %s", server.path)
            if metrics is not None:
                metrics.attach(supervisor, trio.lowlevel.current_trio_token())
                log.info("metrics on %s", metrics_server.url)
            await supervisor.run()
            # Every accepted request has its answer by now; give the clients time to read it.
            server.stop_accepting()
            with trio.move_on_after(5):
                await server.wait_idle()
            nursery.cancel_scope.cancel()
    return 0

