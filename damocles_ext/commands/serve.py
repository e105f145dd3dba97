"""`damocles-ext serve <stage>`: a drop-in ext-prover processor for damocles-manager.

damocles-manager's ext-prover.cfg then says:

    [[WdPost]]
    Bin = "damocles-ext"
    Args = ["serve", "window_post", "--conf-dir", "/etc/damocles-ext"]

and we speak damocles' JSON lines on our stdin/stdout while supervising the children that our own
config lists for that stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from damocles_ext.config import ChildSpec, Config

#: The PoSt stages a request names (damocles_ext.tasks.POST_STAGES; kept here so that the CLI
#: starts without importing msgspec; tests/test_repo.py checks they agree).
STAGES = ("window_post", "winning_post")
DEFAULT_SHUTDOWN_GRACE = 30.0
log = logging.getLogger("damocles_ext.serve")


def add_config_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """-c FILE | --conf-dir DIR, as check-config takes them."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("-c", "--config", metavar="FILE", help="the ext-prover.cfg to read")
    source.add_argument(
        "--conf-dir",
        metavar="DIR",
        help="read DIR/ext-prover.cfg, like damocles-manager --conf-dir",
    )


def add_common_args(parser: argparse.ArgumentParser, default_level: str) -> None:
    """--log-level and --log-format (damocles_ext.logs)."""
    from damocles_ext.logs import add_logging_args

    add_logging_args(parser, default_level)


def add_shutdown_arg(parser: argparse.ArgumentParser) -> None:
    """--shutdown-grace SECONDS."""
    parser.add_argument(
        "--shutdown-grace",
        type=_non_negative_float,
        default=DEFAULT_SHUTDOWN_GRACE,
        metavar="SECONDS",
        help="on shutdown, how long in-flight proofs may take to finish before their children are"
        f" stopped (default: {DEFAULT_SHUTDOWN_GRACE:g})",
    )


def add_restart_arg(parser: argparse.ArgumentParser) -> None:
    """--restart-delay SECONDS."""
    parser.add_argument(
        "--restart-delay",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="wait this long before restarting a child that stopped; the wait doubles for each"
        " stop in a row, up to --restart-max-delay, and starts over once the child stayed ready"
        " 60 s (default: 1)",
    )
    parser.add_argument(
        "--restart-max-delay",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="the longest wait before a restart (default: 60)",
    )


def supervisor_options(args: argparse.Namespace) -> dict:
    """Supervisor keyword arguments from the shared options (observer plugins included)."""
    from damocles_ext.plugins import get_plugin_manager
    from damocles_ext.supervisor.restart import BackoffPolicy

    return {
        "plugin_manager": get_plugin_manager(),
        "shutdown_grace": args.shutdown_grace,
        # This process is ours: become the parent of what children leave behind (setsid).
        "adopt_orphans": True,
        "backoff": BackoffPolicy(
            base=args.restart_delay, cap=max(args.restart_max_delay, args.restart_delay)
        ),
    }


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0 seconds")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def setup_logging(args: argparse.Namespace) -> None:
    """Log to stderr only (in `serve`, stdout carries the protocol): damocles_ext.logs."""
    from damocles_ext.logs import setup_from_args

    setup_from_args(args)


def load_config_from_args(args: argparse.Namespace) -> Config:
    """The config named by -c/--conf-dir; its warnings are logged."""
    from damocles_ext.config import load_conf_dir, load_config

    config = load_config(args.config) if args.config is not None else load_conf_dir(args.conf_dir)
    for warning in config.warnings:
        log.warning("%s: %s", config.source, warning)
    return config


def children_of(config: Config, stage: str) -> list[ChildSpec]:
    """The config's children of `stage`; UsageError when there is none."""
    from damocles_ext.config import TABLE_OF_STAGE
    from damocles_ext.errors import UsageError
    from damocles_ext.tasks import WINDOW_POST_SPLIT

    # A window_post served split runs on the children of both split tables (config.py).
    stages = {stage, *WINDOW_POST_SPLIT} if stage == "window_post" else {stage}
    children = [c for c in config.children if c.stage in stages]
    if not children:
        table = TABLE_OF_STAGE[stage]
        split = " (or [[WdPostVanilla]] and [[WdPostSnark]])" if stage == "window_post" else ""
        raise UsageError(
            f"{config.source} has no [[{table}]] table{split}, so there is no child to serve"
            f' {stage}; add one (e.g. [[{table}]] with Plugin = "..." or Bin = "...")'
        )
    return children


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve`."""
    parser = subparsers.add_parser(
        "serve",
        help="be damocles-manager's ext-prover processor for one stage (JSON lines on stdio)",
        description=(
            "Speak damocles' ext-prover protocol (JSON lines) on stdin/stdout and prove each"
            " request with the children the config lists for STAGE. Use it as Bin/Args of a"
            " damocles-manager ext-prover.cfg. Logs go to stderr; stdin EOF, SIGTERM or SIGINT"
            " shut down gracefully."
        ),
    )
    parser.add_argument("stage", choices=STAGES, help="the stage to serve")
    add_config_args(parser, required=True)
    add_shutdown_arg(parser)
    add_restart_arg(parser)
    add_common_args(parser, "info")
    add_dump_arg(parser)
    return parser


def add_dump_arg(parser: argparse.ArgumentParser) -> None:
    """--dump-dir DIR (damocles_ext.logs)."""
    from damocles_ext.logs import add_dump_arg as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    """Load the config (exit 2 on errors), then serve until stdin closes or a signal arrives."""
    setup_logging(args)
    config = load_config_from_args(args)
    children = children_of(config, args.stage)

    # Keep the protocol pipes for ourselves and point fds 0/1 elsewhere, so that nothing else in
    # this process (a print, a C library) can read a request or write a stray byte to stdout.
    # os.dup's copies are not inherited by children.
    protocol_in = os.dup(0)
    protocol_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    # The config is good: say ready now, before the heavier imports, so that a loaded machine
    # still makes damocles-manager's 5 s limit. Requests wait in the pipe, then in the queue.
    from damocles_ext.protocol.jsonl import ready_line

    _write_all(protocol_out, ready_line(args.stage))

    from damocles_ext.supervisor.core import Supervisor

    supervisor = Supervisor(children, **supervisor_options(args))

    import trio

    return trio.run(_serve, args.stage, supervisor, protocol_in, protocol_out)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _serve(stage: str, supervisor, protocol_in: int, protocol_out: int) -> int:
    import signal

    import trio

    from damocles_ext.supervisor.serve import JsonLineServer

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        receive = trio.lowlevel.FdStream(protocol_in)
        send = trio.lowlevel.FdStream(protocol_out)
        async with trio.open_nursery() as nursery:
            server = JsonLineServer(
                stage,
                supervisor.submit,
                receive_stream=receive,
                send_stream=send,
                on_input_closed=lambda: nursery.start_soon(
                    _finish_then_stop, server, supervisor, send.fileno()
                ),
                ready_line_sent=True,
            )
            log.info("serving %s (pid %d)", stage, os.getpid())
            # Reading goes on after the first signal: a request already in the pipe still gets
            # its (error) answer.
            nursery.start_soon(
                watch_signals, signals, nursery.cancel_scope, supervisor.request_shutdown
            )
            server_done = trio.Event()

            async def serve_requests() -> None:
                await server.run()
                server_done.set()

            nursery.start_soon(serve_requests)
            await supervisor.run()
            # The supervisor has answered everything it accepted; let the answers reach stdout.
            server.stop_reading()
            with trio.move_on_after(5):
                await server_done.wait()
            if not server_done.is_set():
                log.error("answers still unwritten 5 s after the supervisor stopped")
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await receive.aclose()
            await send.aclose()
        stats = server.statistics()
        log.info(
            "stopped: %d requests read, %d answered (%d with an error), %d unreadable",
            stats.received,
            stats.answered,
            stats.failed,
            stats.unreadable,
        )
    return 0


async def _finish_then_stop(server, supervisor, out_fd: int) -> None:
    # stdin EOF: the requests already read were taken, so they are proved (the supervisor would
    # refuse the ones still queued if asked to stop now); then the supervisor stops, which
    # bounds the wait by its shutdown grace once more. If our stdout is closed as well, the
    # manager is gone (it was killed) and nobody can read an answer: stop at once.
    import trio

    if _reader_gone(out_fd):
        log.info("stdout is closed as well: the reader is gone, stopping now")
        supervisor.shutdown_grace = 0.0  # an answer could not reach anyone
    else:
        with trio.move_on_after(supervisor.shutdown_grace):
            await server.wait_idle()
    supervisor.request_shutdown()


def _reader_gone(fd: int) -> bool:
    """True when the read end of the pipe `fd` writes to is closed (poll reports POLLERR)."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


async def watch_signals(signals, cancel_scope, shut_down, logger: logging.Logger = log) -> None:
    """First SIGTERM/SIGINT: call `shut_down()` (graceful); a second one cancels `cancel_scope`."""
    import signal

    count = 0
    async for signum in signals:
        count += 1
        name = signal.Signals(signum).name
        if count == 1:
            logger.info("%s: shutting down gracefully (again to stop at once)", name)
            shut_down()
        else:
            logger.warning("%s again: stopping at once", name)
            cancel_scope.cancel()
