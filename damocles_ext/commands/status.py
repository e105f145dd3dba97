"""`damocles-ext status`: what every child of a running `damocles-ext run` is doing.

Exit codes: 0 the status was printed, 1 the supervisor could not send it, 2 no supervisor at the
socket (or bad arguments).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `status`."""
    parser = subparsers.add_parser(
        "status",
        help="show the children, queues and locks of a running `damocles-ext run`",
        description=(
            "Ask a running `damocles-ext run` (through its control socket) for the state of each"
            " child: stage, index, pid, GPU, state, requests in flight/capacity, done and failed,"
            " restarts and the last exit, uptime, memory and CPU% of its process tree, the locks"
            " it holds; and per stage the queue and its nearest deadline. --json prints the"
            " versioned document described in docs/STATUS.md. Exit code 2 when nothing listens"
            " at the socket."
        ),
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="control socket of the running `damocles-ext run` (default: $XDG_RUNTIME_DIR/"
        "damocles-ext/control.sock, else /run/damocles-ext/control.sock)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print the status document as JSON (schema "damocles-ext/status/1")',
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Fetch the document and print it as a table or as JSON."""
    import trio

    from damocles_ext.status import render_table, to_json

    doc = trio.run(_fetch, args.socket)
    if args.json:
        sys.stdout.buffer.write(to_json(doc))
    else:
        sys.stdout.write(render_table(doc))
    sys.stdout.flush()
    return 0


async def _fetch(socket: str | None):
    from damocles_ext.client import connect

    async with connect(socket) as client:
        return await client.status()
