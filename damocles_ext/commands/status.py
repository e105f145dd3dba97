"""`damocles-ext status`: what every child of a running `damocles-ext run` is doing; with
`--jobs URL`, the WindowPoSt job store's summary (read from the store: no supervisor needed).

Exit codes: 0 the status was printed, 1 the supervisor could not send it or the store failed,
2 no supervisor at the socket, no job store at the URL, a store of a schema this damocles-ext
cannot read without upgrading it (or bad arguments).
"""

from __future__ import annotations

import argparse
import sys

from .common import positive_duration, socket_path

#: Seconds `status` waits for the supervisor's answer by default: a `run` that is stopped
#: (SIGSTOP) or stuck still takes the connection (the kernel does), and would never answer.
STATUS_TIMEOUT = 10.0


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
            " at the socket. With --jobs URL it reads the WindowPoSt job store instead (no"
            " supervisor needed): jobs by state, the oldest ready job, live workers and the ready"
            " jobs none of them may take; with --socket as well, both."
        ),
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        type=socket_path,
        help="control socket of the running `damocles-ext run` (default: $XDG_RUNTIME_DIR/"
        "damocles-ext/control.sock, else /run/damocles-ext/control.sock)",
    )
    parser.add_argument(
        "--jobs",
        metavar="URL",
        help="summarize the job store at URL (sqlite:///PATH or postgresql://...), as a"
        " coordinator sees it; asks no supervisor unless --socket is given too",
    )
    parser.add_argument(
        "--upgrade",
        action="store_true",
        help="with --jobs: upgrade the store's schema to this damocles-ext's first, when it is"
        " older (without it, status only reads, and refuses what an older schema cannot answer)",
    )
    parser.add_argument(
        "--timeout",
        metavar="DURATION",
        type=positive_duration,
        default=STATUS_TIMEOUT,
        help="give up when the supervisor has not answered after this long (exit code 1; default:"
        f" {STATUS_TIMEOUT:g}s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print the status document as JSON (schema "damocles-ext/status/1"; with --jobs'
        ' alone the jobs summary, schema "damocles-ext/jobs/1")',
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Fetch the document and print it as a table or as JSON."""
    import trio

    from damocles_ext.status import render_table, to_json

    if args.jobs is not None:
        return _jobs(args)
    if args.upgrade:
        from damocles_ext.errors import UsageError

        raise UsageError("--upgrade goes with --jobs URL (it upgrades that job store's schema)")
    doc = trio.run(_fetch, args.socket, args.timeout)
    if args.json:
        sys.stdout.buffer.write(to_json(doc))
    else:
        sys.stdout.write(render_table(doc))
    sys.stdout.flush()
    return 0


def _jobs(args: argparse.Namespace) -> int:
    import msgspec
    import trio

    from damocles_ext.jobs.store import JobStore
    from damocles_ext.jobs.store_clock import store_clock
    from damocles_ext.jobs.summary import render
    from damocles_ext.status import render_table, to_json

    # create=False: a mistyped URL must be an error, not an empty store made on the spot.
    # read_only: the schema of a store an older coordinator runs on is left as it is.
    with JobStore.open(args.jobs, create=False, read_only=not args.upgrade, pool_size=1) as store:
        # The sightings' ages and who is live on the clock the coordinators stamp them with
        # (a PostgreSQL server's), not on this machine's, which may be off it.
        summary = store.summary(store_clock(store)())
    doc = None if args.socket is None else trio.run(_fetch, args.socket, args.timeout)
    if args.json:
        if doc is None:
            data = msgspec.json.encode(summary)
        else:
            # The supervisor's document as it is, the jobs summary beside it in "jobs".
            combined = msgspec.json.decode(to_json(doc))
            combined["jobs"] = msgspec.to_builtins(summary)
            data = msgspec.json.encode(combined)
        sys.stdout.buffer.write(msgspec.json.format(data, indent=2) + b"\n")
    else:
        if doc is not None:
            sys.stdout.write(render_table(doc) + "\n")
        sys.stdout.write(render(summary))
    sys.stdout.flush()
    return 0


async def _fetch(socket: str | None, answer_within: float):
    import trio

    from damocles_ext.client import connect, default_socket_path
    from damocles_ext.errors import ProverError

    with trio.move_on_after(answer_within):
        async with connect(socket) as client:
            return await client.status()
    where = socket if socket is not None else default_socket_path()
    raise ProverError(
        f"the supervisor at {where} did not answer within {answer_within:g} s: it may be stopped"
        " (SIGSTOP: see `ps -o pid,stat,cmd -C damocles-ext`) or stuck; give it longer with"
        " --timeout"
    )
