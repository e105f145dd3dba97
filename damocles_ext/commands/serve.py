"""`damocles-ext serve <stage>`: a drop-in ext-prover processor for damocles-manager.

damocles-manager's ext-prover.cfg then says:

    [[WdPost]]
    Bin = "damocles-ext"
    Args = ["serve", "window_post", "--conf-dir", "/etc/damocles-ext"]
    Concurrent = 8   # damocles-manager's own limit: at least the slots we supervise

and we speak damocles' JSON lines on our stdin/stdout while supervising the children that our own
config lists for that stage.

With `--connect [SOCKET]` instead of a config, we supervise nothing: each request is forwarded to
a running `damocles-ext run` through its control socket, so that one supervisor serves both
damocles-manager entries (`serve window_post --connect` and `serve winning_post --connect`) and
its locks and stage priority act between the two stages.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from damocles_ext.stages import POST_STAGES, can_serve

from .common import (
    add_common_args,
    add_config_args,
    add_dump_arg,
    add_restart_arg,
    add_shutdown_arg,
    children_of,
    load_config_from_args,
    positive_duration,
    setup_logging,
    supervisor_options,
)

log = logging.getLogger("damocles_ext.serve")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve`."""
    parser = subparsers.add_parser(
        "serve",
        help="be damocles-manager's ext-prover processor for one stage (JSON lines on stdio)",
        description=(
            "Speak damocles' ext-prover protocol (JSON lines) on stdin/stdout and prove each"
            " request with the children the config lists for STAGE, or, with --connect, through"
            " a running `damocles-ext run` (one supervisor for both stages: locks shared between"
            " WindowPoSt and WinningPoSt, WinningPoSt first). Use it as Bin/Args of a"
            " damocles-manager ext-prover.cfg, with that entry's Concurrent at least the slots"
            " served here (the sum of the children's Concurrent): damocles-manager sends no more"
            " at once (check-config on its file warns). Logs go to stderr; stdin EOF, SIGTERM"
            " or SIGINT shut down gracefully."
        ),
    )
    parser.add_argument("stage", choices=POST_STAGES, help="the stage to serve")
    source = add_config_args(parser, required=True)
    source.add_argument(
        "--connect",
        nargs="?",
        const=True,
        type=_socket_path,
        metavar="SOCKET",
        help="supervise nothing: forward each request to the `damocles-ext run` listening on"
        " SOCKET (default: the default of `run --socket`). Put it after STAGE. Exits 2 before the"
        " ready line when nothing listens there; if that supervisor goes away later, the"
        " requests in flight get an error answer and the next request connects again. On stdin"
        " EOF or a signal, --shutdown-grace bounds the wait for the answers in flight; those"
        " still open then are answered with an error and cancelled in `run`. The options that"
        " tune supervising (--restart-delay, --restart-max-delay, --dump-dir) are refused with"
        " it: give them to `run`",
    )
    parser.add_argument(
        "--deadline-after",
        type=positive_duration,
        metavar="DURATION",
        help="give each request the deadline DURATION after it arrives (seconds, or with a suffix"
        " s, m or h), since damocles' JSON lines carry none: queues go earliest deadline first, a"
        " request still queued at its deadline fails at once, and a running one is cancelled."
        " damocles-manager sends a deadline's WindowPoSt when its randomness is known, about 35"
        " minutes before its proofs are due (less its ChallengeConfidence and the submit margin"
        " you want); a WinningPoSt has its block's ~20-30 s. Default: no deadline",
    )
    add_shutdown_arg(parser)
    add_restart_arg(parser)
    add_common_args(parser, "info")
    add_dump_arg(parser)
    # None = not given: with --connect a given one is refused, without it the default applies.
    parser.set_defaults(restart_delay=None, restart_max_delay=None)
    return parser



def _with_deadline(submit, after: float | None):
    """`submit(task)` that gives each request the deadline `after` seconds from now (if set)."""
    if after is None:
        return submit

    async def submit_with_deadline(task):
        import time

        return await submit(task, deadline=time.time() + after)

    return submit_with_deadline


def _socket_path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("empty socket path; leave the value out for the default")
    if text in POST_STAGES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a stage, not a socket path: put --connect after the stage"
            f" (serve {text} --connect [SOCKET])"
        )
    return text


#: Options of a serve that supervises its own children, and their defaults (add_restart_arg).
_SUPERVISING_OPTIONS = {"restart_delay": 1.0, "restart_max_delay": 60.0, "dump_dir": None}


def _check_supervising_options(args: argparse.Namespace) -> None:
    """With --connect, refuse the options only a supervisor uses; otherwise fill in defaults."""
    from damocles_ext.errors import UsageError

    for name, default in _SUPERVISING_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif args.connect is not None:
            option = "--" + name.replace("_", "-")
            raise UsageError(
                f"{option} does not apply to serve --connect: the `damocles-ext run` it connects"
                f" to supervises the children; give {option} to that `run` instead"
            )



def run(args: argparse.Namespace) -> int:
    """Load the config (exit 2 on errors), then serve until stdin closes or a signal arrives."""
    _check_supervising_options(args)
    setup_logging(args)
    if args.connect is not None:
        return _run_connected(args)
    config = load_config_from_args(args)
    children = children_of(config, args.stage)
    # damocles' own processor never says ready when its prover cannot load, and then the
    # manager's start fails; so do we, for whatever can be checked without starting a child.
    from damocles_ext.config import check_startable
    from damocles_ext.plugins import get_plugin_manager

    plugin_manager = get_plugin_manager()
    check_startable(config, children, plugin_manager=plugin_manager)

    protocol_in, protocol_out = _take_protocol_fds()

    # The config is good: say ready now, before the heavier imports, so that a loaded machine
    # still makes damocles-manager's 5 s limit. Requests wait in the pipe, then in the queue.
    from damocles_ext.protocol.jsonl import ready_line

    _write_all(protocol_out, ready_line(args.stage))

    from damocles_ext.supervisor.core import Supervisor

    supervisor = Supervisor(children, **supervisor_options(args, plugin_manager))

    import trio

    submit = _with_deadline(supervisor.submit, args.deadline_after)
    return trio.run(_serve, args.stage, supervisor, submit, protocol_in, protocol_out)


def _take_protocol_fds() -> tuple[int, int]:
    """Keep the protocol pipes for ourselves and point fds 0/1 elsewhere, so that nothing else in
    this process (a print, a C library) can read a request or write a stray byte to stdout.
    os.dup's copies are not inherited by children. Returns (protocol in, protocol out)."""
    protocol_in = os.dup(0)
    protocol_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol_in, protocol_out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _serve(stage: str, supervisor, submit, protocol_in: int, protocol_out: int) -> int:
    import signal

    import trio

    from damocles_ext.supervisor.serve import JsonLineServer

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        receive = trio.lowlevel.FdStream(protocol_in)
        send = trio.lowlevel.FdStream(protocol_out)
        async with trio.open_nursery() as nursery:
            server = JsonLineServer(
                stage,
                submit,
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
        _log_stopped(server)
    return 0


def _log_stopped(server) -> None:
    stats = server.statistics()
    log.info(
        "stopped: %d requests read, %d answered (%d with an error), %d unreadable",
        stats.received,
        stats.answered,
        stats.failed,
        stats.unreadable,
    )


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


async def watch_signals(
    signals, cancel_scope, shut_down, logger: logging.Logger = log, at_once=None
) -> None:
    """First SIGTERM/SIGINT: call `shut_down()` (graceful); a second one cancels `cancel_scope`,
    or calls `at_once()` when given."""
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
            if at_once is not None:
                at_once()
            else:
                cancel_scope.cancel()


# -- serve --connect: forward to a running `damocles-ext run` ---------------------------------

#: What to do when nothing listens, as serve --connect says it.
CONNECT_HINT = (
    "start `damocles-ext run` first (it supervises the provers of both stages), or give"
    " --connect the --socket path of the one running"
)


def _run_connected(args: argparse.Namespace) -> int:
    """serve --connect: connect (exit 2 before the ready line if nobody listens), then forward."""
    import trio

    from damocles_ext.client import ReconnectingClient

    remote = ReconnectingClient(None if args.connect is True else args.connect, hint=CONNECT_HINT)
    protocol_in, protocol_out = _take_protocol_fds()
    return trio.run(
        _serve_connected,
        args.stage,
        remote,
        protocol_in,
        protocol_out,
        args.shutdown_grace,
        args.deadline_after,
    )


async def _stage_problem(remote, stage: str) -> str | None:
    """Why the supervisor at the other end cannot serve `stage` (it has no child of it), or None.

    Checked once, before the ready line, so that a `run` whose config lacks the stage's table
    makes damocles-manager's start fail instead of every request of that stage.
    """
    import trio

    from damocles_ext.config import TABLE_OF_STAGE
    from damocles_ext.errors import ProverError

    try:
        with trio.fail_after(3):
            doc = await remote.status()
    except (ProverError, trio.TooSlowError) as exc:
        log.warning("could not check that %s serves %s (going on): %s", remote.path, stage, exc)
        return None
    if can_serve(stage, (c.stage for c in doc.children)):
        return None
    table = TABLE_OF_STAGE[stage]
    return (
        f"the supervisor at {remote.path} has no [[{table}]] child, so it cannot prove {stage}"
        f" requests; add a [[{table}]] table to the config of that `damocles-ext run` and"
        " restart it"
    )


class _Forwarder:
    """submit(task) for JsonLineServer that proves through the remote supervisor, and can give up
    on what is in flight (each then gets an error answer, and the supervisor a Cancel)."""

    def __init__(self, stage: str, remote, deadline_after: float | None = None) -> None:
        self.stage = stage
        self.remote = remote
        self._submit = _with_deadline(remote.submit, deadline_after)
        self._scopes: set = set()
        self._abandoned: str | None = None

    async def submit(self, task):
        import trio

        from damocles_ext.errors import ProverError
        from damocles_ext.tasks import stage_of

        if self._abandoned is not None:
            raise ProverError(self._abandoned)
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                output = await self._submit(task)
            finally:
                self._scopes.discard(scope)
            # The task went out typed by our stage, so the supervisor chose a child of it; an
            # output of another stage would be its bug, and must not reach damocles as a proof.
            if stage_of(output) != self.stage:
                raise ProverError(
                    f"the supervisor at {self.remote.path} answered a {self.stage} task with a"
                    f" {stage_of(output)} output; not passed on"
                )
            return output
        assert self._abandoned is not None
        raise ProverError(self._abandoned)

    def abandon(self, reason: str) -> None:
        """Answer every request in flight with `reason` now (and every later one)."""
        if self._abandoned is None:
            self._abandoned = reason
        for scope in self._scopes:
            scope.cancel()


async def _serve_connected(
    stage: str,
    remote,
    protocol_in: int,
    protocol_out: int,
    shutdown_grace: float,
    deadline_after: float | None = None,
) -> int:
    import signal

    import trio

    from damocles_ext.supervisor.serve import JsonLineServer

    # Before the ready line: damocles-manager's start check must fail when nobody listens.
    await remote.connect()
    log.info("connected to the supervisor at %s", remote.path)
    forwarder = _Forwarder(stage, remote, deadline_after)
    problem: str | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        receive = trio.lowlevel.FdStream(protocol_in)
        send = trio.lowlevel.FdStream(protocol_out)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(remote.run)
                problem = await _stage_problem(remote, stage)
                if problem is not None:  # leave the nursery (raised below, outside of it)
                    nursery.cancel_scope.cancel()
                    await trio.lowlevel.checkpoint()

                async def drain() -> None:
                    # stdin EOF or the first signal: wait for the answers in flight, within the
                    # grace; what is left then is answered with an error (and cancelled there).
                    if _reader_gone(send.fileno()):
                        log.info("stdout is closed as well: the reader is gone, stopping now")
                        forwarder.abandon("damocles-ext serve stopped: its reader is gone")
                        return
                    with trio.move_on_after(shutdown_grace):
                        await server.wait_idle()
                    forwarder.abandon(
                        f"damocles-ext serve stopped: no answer from the supervisor at"
                        f" {remote.path} within the shutdown grace ({shutdown_grace:g} s); the"
                        " request was cancelled there"
                    )

                def at_once() -> None:
                    server.stop_reading()
                    forwarder.abandon(
                        "damocles-ext serve stopped at once (second signal); the request was"
                        " cancelled at the supervisor"
                    )
                    # The error answers need a moment to be written; a stuck stdout does not.
                    nursery.cancel_scope.deadline = min(
                        nursery.cancel_scope.deadline, trio.current_time() + 1.0
                    )

                server = JsonLineServer(
                    stage,
                    forwarder.submit,
                    receive_stream=receive,
                    send_stream=send,
                    on_input_closed=lambda: nursery.start_soon(drain),
                )
                log.info("serving %s through %s (pid %d)", stage, remote.path, os.getpid())
                nursery.start_soon(
                    watch_signals, signals, nursery.cancel_scope, server.stop_reading, log, at_once
                )
                await server.run()  # writes the ready line first
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await remote.aclose()
                await receive.aclose()
                await send.aclose()
    if problem is not None:
        from damocles_ext.errors import UsageError

        raise UsageError(problem)
    _log_stopped(server)
    return 0
