"""`damocles-ext run`: the long-running supervisor of both stages, reachable on a control socket."""

from __future__ import annotations

import argparse
import logging

from .serve import (
    add_common_args,
    add_config_args,
    add_restart_arg,
    add_shutdown_arg,
    load_config_from_args,
    supervisor_options,
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
    add_common_args(parser, "info")
    return parser


def run(args: argparse.Namespace) -> int:
    """Check the config and the socket place (exit 2 on problems), then serve until a signal."""
    from damocles_ext.commands.serve import setup_logging
    from damocles_ext.supervisor.control import bind_control_socket, default_socket_path

    setup_logging(args.log_level)
    config = load_config_from_args(args)
    path = args.socket if args.socket is not None else default_socket_path()
    # The socket is checked and bound before any child is spawned: a taken or unsafe path is a
    # usage error, not a half-started supervisor.
    sock = bind_control_socket(path)
    try:
        from damocles_ext.supervisor.core import Supervisor

        supervisor = Supervisor(config, **supervisor_options(args))
    except BaseException:
        _discard(sock)
        raise

    import trio

    return trio.run(_run, supervisor, sock)


def _discard(sock) -> None:
    import contextlib
    import os

    path = sock.getsockname()
    sock.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _run(supervisor, sock) -> int:
    import signal

    import trio

    from damocles_ext.supervisor.control import ControlServer

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        server = ControlServer(sock, supervisor.submit)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, server, supervisor, nursery.cancel_scope)
            await nursery.start(server.serve)
            log.info("control socket listening on %s", server.path)
            await supervisor.run()
            # Every accepted request has its answer by now; give the clients time to read it.
            server.stop_accepting()
            with trio.move_on_after(5):
                await server.wait_idle()
            nursery.cancel_scope.cancel()
    return 0


async def _watch_signals(signals, server, supervisor, cancel_scope) -> None:
    import signal

    count = 0
    async for signum in signals:
        count += 1
        name = signal.Signals(signum).name
        if count == 1:
            log.info("%s: shutting down gracefully (again to stop at once)", name)
            server.stop_accepting()
            supervisor.request_shutdown()
        else:
            log.warning("%s again: stopping at once", name)
            cancel_scope.cancel()
