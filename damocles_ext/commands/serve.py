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

from damocles_ext.logs import add_dump_arg, add_logging_args, setup_from_args
from damocles_ext.stages import POST_STAGES

from .common import (
    RESTART_DEFAULTS,
    add_config_args,
    add_restart_arg,
    add_shutdown_arg,
    children_of,
    load_config_from_args,
    positive_duration,
    supervisor_options,
)


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
    add_logging_args(parser, "info")
    add_dump_arg(parser)
    # None = not given: with --connect a given one is refused, without it the default applies.
    parser.set_defaults(restart_delay=None, restart_max_delay=None)
    return parser


def _socket_path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("empty socket path; leave the value out for the default")
    if text in POST_STAGES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a stage, not a socket path: put --connect after the stage"
            f" (serve {text} --connect [SOCKET])"
        )
    return text


#: Options of a serve that supervises its own children, and their defaults.
_SUPERVISING_OPTIONS = {**RESTART_DEFAULTS, "dump_dir": None}


def check_supervising_options(args: argparse.Namespace) -> None:
    """With --connect, refuse (UsageError) the options only a supervisor uses; otherwise fill in
    their defaults. check-config applies it to the entries of damocles-manager's ext-prover.cfg
    that run serve."""
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
    check_supervising_options(args)
    setup_from_args(args)
    if args.connect is not None:
        from damocles_ext.frontends.serve import serve_connected

        socket = None if args.connect is True else args.connect
        return serve_connected(args.stage, socket, args.shutdown_grace, args.deadline_after)
    config = load_config_from_args(args)
    children = children_of(config, args.stage)
    # damocles' own processor never says ready when its prover cannot load, and then the
    # manager's start fails; so do we, for whatever can be checked without starting a child.
    from damocles_ext.config import check_startable
    from damocles_ext.frontends.serve import serve_children
    from damocles_ext.plugins import get_plugin_manager

    # Loading the plugins takes tens of ms before the ready line: only when a child needs them
    # (supervisor_options loads them after the ready line otherwise, for observer plugins).
    needs_plugins = any(child.kind == "plugin" for child in children)
    plugin_manager = get_plugin_manager() if needs_plugins else None
    check_startable(config, children, plugin_manager=plugin_manager)
    return serve_children(
        args.stage,
        children,
        lambda: supervisor_options(args, plugin_manager),
        args.deadline_after,
    )
