"""`damocles-ext child`: run one prover plugin as a child speaking dext/1 or damocles JSON lines."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from damocles_ext.commands.common import positive_int
from damocles_ext.stages import POST_STAGES, STAGES


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _capacity(text: str) -> int:
    """--capacity: 1 to the most a config's Concurrent may be (a worker thread per slot)."""
    from damocles_ext.config.spec import MAX_CONCURRENT

    value = positive_int(text)
    if value > MAX_CONCURRENT:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_CONCURRENT} (a config's largest Concurrent), got {value}"
        )
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `child` and its options."""
    parser = subparsers.add_parser(
        "child",
        help="run a prover plugin as a prover child (started by the supervisor)",
        description=(
            "Load the prover NAME from the installed plugins and serve proof requests for STAGE on "
            "stdin/stdout: dext/1 frames (default) or damocles' JSON lines. Logs go to stderr. "
            "Exit code 2, before the ready message, when the prover cannot be loaded."
        ),
    )
    parser.add_argument("stage", choices=STAGES, help="the PoSt stage this child serves")
    parser.add_argument(
        "--plugin",
        required=True,
        metavar="NAME",
        help="the prover's name (see `damocles-ext plugins`)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a prover option (repeatable); numbers and true/false are typed, "
        "a value in double quotes stays a string. The supervisor passes a child's PluginOptions"
        " in the environment variable DAMOCLES_EXT_PLUGIN_OPTIONS (a JSON object) instead, out"
        " of the command line that every local user can read",
    )
    parser.add_argument(
        "--protocol",
        choices=("dext", "jsonl"),
        default="dext",
        help="wire protocol on stdin/stdout (default: dext)",
    )
    parser.add_argument(
        "--capacity",
        type=_capacity,
        default=1,
        metavar="N",
        help="requests proved at once on worker threads (default: 1)",
    )
    parser.add_argument(
        "--heartbeat",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="re-send progress of a silent prover this often (default: 2; dext only)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Configure logging to stderr, then hand over to damocles_ext.child.main."""
    from damocles_ext import child
    from damocles_ext.errors import UsageError

    if args.protocol == "jsonl" and args.stage not in POST_STAGES:
        raise UsageError(
            f"stage {args.stage}: damocles' JSON lines carry only {' and '.join(POST_STAGES)};"
            " a split WindowPoSt step needs --protocol dext"
        )
    from damocles_ext.logs import LEVEL_ENV, LOG_LEVELS, _from_env

    try:
        level, unknown = _from_env(os.environ, LEVEL_ENV, LOG_LEVELS) or "info", None
    except UsageError as exc:  # a child still starts: its log level is no reason to lose a GPU
        level, unknown = "info", exc
    logging.basicConfig(
        stream=sys.stderr, level=level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    if unknown is not None:
        logging.getLogger("damocles_ext.child").warning("%s (logging at info)", unknown)
    return child.main(
        args.stage,
        args.plugin,
        args.option,
        protocol=args.protocol,
        capacity=args.capacity,
        heartbeat=args.heartbeat or child.DEFAULT_HEARTBEAT,
    )
