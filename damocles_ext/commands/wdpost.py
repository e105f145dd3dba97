"""`damocles-ext wdpost list|reset|remove|remove-all`: the operator's view of the WindowPoSt job
store, with damocles-manager's `util worker wdpost` columns, formats and behaviour; on the store
itself (`--jobs URL`) or over the worker-prover RPC (`--manager ADDRESS`: our coordinator, or a
damocles-manager run with --worker-prover).

Exit codes: 0 done; 1 the store or the RPC failed (unreachable, a database error); 2 bad
arguments, a bad or missing store, a refused token, an unknown job id for `reset`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .common import positive_int, token_file, utf8_argument

if TYPE_CHECKING:
    from damocles_ext.errors import UsageError
    from damocles_ext.jobs.listing import JobBrief
    from damocles_ext.jobs.model import WdPoStJob

JOBS_HELP = (
    "the job store: sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE "
    "(see docs/JOBS.md)"
)
CONF_DIR_HELP = (
    "damocles-manager's config directory (its --conf-dir): JobMaxTry, HeartbeatTimeout and"
    " JobLifetime are read from [Common.Proving.WorkerProver] in DIR/sector-manager.cfg, and the"
    " stores from its [[Common.PersistStores]] (damocles' defaults when DIR has no such file)"
)


def job_id(text: str) -> str:
    """A job id argument (an argparse type): text a store or an RPC can carry."""
    return utf8_argument(text, "so no job has it; copy the id from `wdpost list --all`")


MANAGER_HELP = (
    "the worker-prover RPC: a damocles-ext coordinator, or a damocles-manager"
    " run with --worker-prover; a multiaddr as damocles-worker's rpc_client.addr"
    " (/ip4/HOST/tcp/1789), http://HOST:PORT, or HOST:PORT"
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `wdpost` and its subcommands."""
    parser = subparsers.add_parser(
        "wdpost",
        help="list, reset and remove the WindowPoSt jobs of a job store",
        description=(
            "The WindowPoSt jobs of worker-prover mode, read from and changed in the job store"
            " itself, with damocles-manager's `util worker wdpost` columns and formats."
        ),
    )
    sub = parser.add_subparsers(dest="wdpost_command", metavar="SUBCOMMAND")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--jobs", metavar="URL", help=JOBS_HELP)
        where.add_argument(
            "--manager", metavar="ADDRESS", help="instead of the store, " + MANAGER_HELP
        )
        p.add_argument(
            "--token-file",
            metavar="FILE",
            type=token_file,
            help="with --manager: send the token on FILE's first line as `Authorization: Bearer"
            " <token>` (the coordinator's --token-file)",
        )

    listing = sub.add_parser(
        "list",
        help="list the jobs (not those that succeeded, without --all)",
        description=(
            "List the jobs, newest first: JobID MinerID DDL Partitions Sectors Worker State Try"
            " CreateAt Elapsed Heartbeat Error (--detail: JobID Prefix Miner DDL Partitions"
            " Sectors Worker State Try CreateAt StartedAt HeartbeatAt FinishedAt UpdatedAt Error)."
            " Jobs that finished without an error (Succeed, Faults(N)) show only with --all."
        ),
    )
    common(listing)
    listing.add_argument("--all", action="store_true", help="include the jobs that succeeded")
    listing.add_argument("--detail", action="store_true", help="show every timestamp")
    listing.add_argument(
        "--max-try",
        type=positive_int,
        metavar="N",
        help="JobMaxTry, for the (Max) mark in the Try column (default: with --manager the"
        " server's own when it sends it, else JobMaxTry from --conf-dir's sector-manager.cfg,"
        " else 2, damocles' default)",
    )
    listing.add_argument("--conf-dir", metavar="DIR", help=CONF_DIR_HELP)
    reset = sub.add_parser(
        "reset",
        help="put jobs back to ready with no tries used, so a worker can take them again",
        description="Reset each job in turn; stop at the first id that does not exist.",
    )
    common(reset)
    reset.add_argument("ids", nargs="+", metavar="ID", type=job_id, help="job ids")
    remove = sub.add_parser(
        "remove",
        help="remove jobs (an unknown id is not an error)",
        description=(
            "Remove each job. A producer still waiting for one creates it again (same id)."
        ),
    )
    common(remove)
    remove.add_argument("ids", nargs="+", metavar="ID", type=job_id, help="job ids")
    remove_all = sub.add_parser(
        "remove-all",
        help="remove every job (only with --really-do-it)",
        description="Remove every job, printing each id; does nothing without --really-do-it.",
    )
    common(remove_all)
    remove_all.add_argument("--really-do-it", action="store_true", help="actually remove every job")
    return parser


def run(args: argparse.Namespace) -> int:
    """Open the store (never creating one) and do the subcommand."""
    from damocles_ext.errors import UsageError
    from damocles_ext.jobs.store import JobNotFound, JobStore
    from damocles_ext.jobs.store_clock import store_clock

    if args.wdpost_command == "remove-all" and not args.really_do_it:
        print("Pass --really-do-it to actually execute this action")
        return 0
    max_try = 2
    if args.wdpost_command == "list":
        from damocles_ext.jobs.manager_config import read_settings

        settings = read_settings(args.conf_dir)
        for warning in settings.warnings:
            print(f"damocles-ext wdpost list: warning: {warning}", file=sys.stderr)
        max_try = args.max_try if args.max_try is not None else settings.limits.max_try
    if args.manager is not None:
        return _run_rpc(args, max_try)
    if args.token_file is not None:
        raise UsageError("--token-file goes with --manager (the store URL carries its own login)")
    # `list` only reads: the schema of a store an older coordinator runs on is left as it is.
    reads_only = args.wdpost_command == "list"
    with JobStore.open(args.jobs, create=False, read_only=reads_only) as store:
        # The clock the coordinators stamp with (a PostgreSQL server's): the ages shown, and
        # the stamps of what is changed, on it rather than on this machine's.
        now = store_clock(store)
        if args.wdpost_command == "list":
            _print_list(args, store.list_jobs(), max_try, now())
        elif args.wdpost_command == "reset":
            done: list[str] = []
            for job_id in args.ids:
                try:
                    job = store.reset(job_id, now())
                except JobNotFound as e:
                    raise _reset_stopped(str(e), done) from None
                done.append(job_id)
                if job.not_after is not None and job.not_after <= now():
                    print(
                        f"damocles-ext wdpost reset: warning: job {job_id} is reset, but its deadline"
                        f" passed {now() - job.not_after:.0f} s ago (damocles-ext's"
                        " not_after): the next sweep cancels it again, and no proof of it can"
                        " count for its deadline",
                        file=sys.stderr,
                    )
        elif args.wdpost_command == "remove":
            for job_id in args.ids:
                store.remove(job_id, now())
        else:
            # Printed as each transaction of them is committed: a failure later leaves the
            # ones removed before it said.
            printer = _RemovedPrinter()
            store.remove_all(now(), removed=printer)
            printer.done()
    return 0


class _RemovedPrinter:
    """Prints each transaction's removed ids; once stdout's reader is gone (`| head`) the
    removal goes on unsaid (a half-done remove-all for a closed pipe would surprise), and the
    command then ends as one whose reader went away does."""

    def __init__(self) -> None:
        from damocles_ext.jobs.listing import removed_line

        self.line = removed_line
        self.broken: BrokenPipeError | None = None

    def __call__(self, job_ids: list[str]) -> None:
        if self.broken is not None:
            return
        try:
            sys.stdout.write("".join(f"{self.line(job_id)}\n" for job_id in job_ids))
            sys.stdout.flush()
        except BrokenPipeError as exc:
            self.broken = exc

    def done(self) -> None:
        """All removed: a reader gone meanwhile ends the command as it ends any (exit 1)."""
        if self.broken is not None:
            raise self.broken


def _print_list(
    args: argparse.Namespace, jobs: Sequence[WdPoStJob | JobBrief], max_try: int, now: float
) -> None:
    """`wdpost list`'s table of store records or RPC briefs alike, their ages at `now`."""
    from damocles_ext.jobs.listing import render_list

    sys.stdout.write(
        render_list(jobs, max_try=max_try, now=now, show_all=args.all, detail=args.detail)
    )


def _reset_stopped(why: str, done: list[str]) -> UsageError:
    """`wdpost reset` stopped at an id that does not exist: `why`, and the ids reset before."""
    from damocles_ext.errors import UsageError

    before = f" (reset before it: {', '.join(done)})" if done else ""
    return UsageError(f"{why}{before}; list the jobs with `wdpost list --all`")


def _run_rpc(args: argparse.Namespace, max_try: int) -> int:
    """The same subcommands over the worker-prover RPC, as damocles-manager's CLI makes them;
    `max_try` marks (Max) when the server does not send its own JobMaxTry."""
    import time

    import msgspec
    import trio

    from damocles_ext.errors import UsageError
    from damocles_ext.jobs import rpc
    from damocles_ext.jobs.client import RpcCallError, RpcClient
    from damocles_ext.jobs.listing import decode_all_jobs
    from damocles_ext.logs import one_line

    try:
        client = RpcClient(args.manager, token=args.token_file)
    except ValueError as e:
        raise UsageError(f"--manager: {e}") from None

    async def all_jobs() -> tuple[list, int | None]:
        result = await client.call("Venus.WdPoStAllJobs")
        try:
            return decode_all_jobs(result)
        except msgspec.ValidationError as e:
            raise UsageError(
                f"{client.url} answered Venus.WdPoStAllJobs with something that is not a job"
                f" list ({e}); check that --manager is a worker-prover RPC"
            ) from None

    printer = _RemovedPrinter()

    async def main() -> None:
        async with client:
            if args.wdpost_command == "list":
                jobs, server_max_try = await all_jobs()
                # Newest first, as both servers send them; sorted here too so that ties (and an
                # older server) give the order the store-side listing gives.
                jobs.sort(key=lambda j: (-j.CreatedAt, j.Id))
                # Ages on the coordinator's clock (the store's server's, which it stamps on):
                # its answer's X-Dext-Clock, else its Date (damocles-manager's; behind a proxy,
                # the proxy's); this machine's only when it sent neither.
                clock = client.answer_clock
                _print_list(args, jobs, max_try if server_max_try is None else server_max_try,
                            time.time() if clock is None else clock.at)  # fmt: skip
            elif args.wdpost_command == "reset":
                done: list[str] = []
                for job_id in args.ids:
                    try:
                        await client.call("Venus.WdPoStResetJob", job_id)
                    except RpcCallError as e:
                        if e.code != rpc.METHOD_ERROR or "does not exist" not in e.message:
                            raise
                        raise _reset_stopped(one_line(e.message), done) from None
                    done.append(job_id)
            elif args.wdpost_command == "remove":
                for job_id in args.ids:
                    await client.call("Venus.WdPoStRemoveJob", job_id)
            else:
                jobs, _ = await all_jobs()
                for job in jobs:
                    await client.call("Venus.WdPoStRemoveJob", job.Id)
                    printer([job.Id])

    try:
        trio.run(main)
    except RpcCallError as e:
        if e.code == rpc.UNAUTHORIZED:
            raise UsageError(f"{e}; give --token-file with the coordinator's token") from None
        raise
    printer.done()
    return 0
