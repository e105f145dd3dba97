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

With `--jobs URL` (window_post only) we supervise nothing either: each request becomes a
WindowPoSt job in the job store, which workers take through a coordinator, and is answered
from the finished job (frontends/producer.py).
"""

from __future__ import annotations

import argparse

from damocles_ext.logs import add_dump_arg, add_logging_args, setup_from_args
from damocles_ext.stages import POST_STAGES

from .common import (
    RESTART_DEFAULTS,
    DeadlineAfter,
    add_config_args,
    add_restart_arg,
    add_shutdown_arg,
    children_of,
    deadline_duration,
    load_config_from_args,
    positive_duration,
    regular_token_file,
    supervisor_options,
)
from .coordinator import _listen as listen_arg
from .coordinator import _store as store_arg
from .wdpost import JOBS_HELP


def add_parser(
    subparsers: argparse._SubParsersAction, *, read_token: bool = True
) -> argparse.ArgumentParser:
    """Register `serve`. `read_token`: --token-file is read as it is parsed (serve's start);
    False keeps it a path (check-config, which checks the file itself, never waiting on it)."""
    parser = subparsers.add_parser(
        "serve",
        help="be damocles-manager's ext-prover processor for one stage (JSON lines on stdio)",
        description=(
            "Speak damocles' ext-prover protocol (JSON lines) on stdin/stdout and prove each"
            " request with the children the config lists for STAGE, or, with --connect, through"
            " a running `damocles-ext run` (one supervisor for both stages: locks shared between"
            " WindowPoSt and WinningPoSt, WinningPoSt first), or, with --jobs (window_post only),"
            " as jobs in a job store that workers on other machines take. Use it as Bin/Args of a"
            " damocles-manager ext-prover.cfg, with that entry's Concurrent at least the slots"
            " served here (the sum of the children's Concurrent): damocles-manager sends no more"
            " at once (check-config on its file warns). Logs go to stderr; stdin EOF, SIGTERM,"
            " SIGINT or SIGHUP (unless ignored) shut down gracefully."
        ),
    )
    parser.add_argument("stage", choices=POST_STAGES, help="the stage to serve")
    # Not required by argparse: --jobs takes --conf-dir too (damocles' own directory then);
    # check_supervising_options says which is missing.
    source = add_config_args(parser, required=False)
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
        " still open then are answered with an error and cancelled in `run`; one read after a"
        " signal is answered with an error at once, not sent. The options that"
        " tune supervising (--restart-delay, --restart-max-delay, --dump-dir) are refused with"
        " it: give them to `run`",
    )
    parser.add_argument(
        "--deadline-after",
        action=DeadlineAfter,
        convert=deadline_duration,
        append=False,
        metavar="DURATION",
        help="give each request the deadline DURATION after it arrives (seconds, or with a suffix"
        " s, m or h; 0 or off: none), since damocles' JSON lines carry none: queues go earliest"
        " deadline first, a request still queued at its deadline fails at once, and a running"
        " one is cancelled (its child killed CancelGraceSecs later if it goes on). Default: 40m"
        " for window_post (damocles-manager sends a deadline's WindowPoSt once its randomness"
        " is known, at most 40 minutes before the deadline closes: a proof later than that"
        " cannot count), 5m for winning_post (its block has about 20 s; the deadline frees a"
        " stuck child and lets a cold first proof finish). A prover stuck in a GPU call under"
        " the built-in runtime still sends Progress: the deadline is what frees its child",
    )
    jobs = parser.add_argument_group(
        "worker-prover mode (--jobs)",
        "Supervise nothing: each window_post request becomes a WindowPoSt job in the job store at"
        ' URL, which workers (damocles-workers with plan = "wdpost", through a `damocles-ext'
        " coordinator`) take, prove and finish; the request is answered from the finished job:"
        " its proofs and faults, or an error naming the job, the worker, the tries and why. The"
        " job id is the hash of the request (damocles' own), so a serve killed and started again"
        " re-attaches to the jobs of the requests damocles-manager sends again. The paths of the"
        " request become damocles store names through --store and, with --conf-dir DIR, the"
        " [[Common.PersistStores]] of damocles-manager's DIR/sector-manager.cfg (whose"
        " [Common.Proving.WorkerProver] also gives JobMaxTry, HeartbeatTimeout, JobLifetime)."
        " The store URL, the config and the --listen port are checked before the ready line"
        " (the database gets 3 s to answer: damocles-manager waits 5 s for that line)."
        " winning_post is refused: WinningPoSt must stay local. See docs/JOBS.md.",
    )
    jobs.add_argument("--jobs", metavar="URL", help=JOBS_HELP)
    jobs.add_argument(
        "--store",
        metavar="NAME=PATH",
        action="append",
        type=store_arg,
        default=[],
        help="a damocles store: NAME as damocles-manager and the workers name it, PATH where"
        " its sealed/ and cache/ are in the requests' paths; repeat for each",
    )
    jobs.add_argument(
        "--poll-interval",
        type=positive_duration,
        metavar="DURATION",
        help="how often to look for a job's result (default: 3s, damocles'); on PostgreSQL the"
        " store's notifications wake the wait earlier",
    )
    jobs.add_argument(
        "--store-file-check",
        type=positive_duration,
        metavar="DURATION",
        help="how often to check, with no request in flight, that a SQLite store's file is"
        " still the one at its path (default: 10s): one deleted or replaced is said, and the old"
        " file's write-ahead log emptied, within this rather than at the next request; nothing on"
        " PostgreSQL",
    )
    jobs.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=listen_arg,
        help="also serve the workers' RPC (as `damocles-ext coordinator` does) from this"
        " process, for a one-machine setup; default: not served here",
    )
    jobs.add_argument(
        "--token-file",
        metavar="FILE",
        type=regular_token_file if read_token else None,
        help="with --listen: require every RPC request to carry `Authorization: Bearer <token>`,"
        " the token being the first line of FILE, a regular file (not a FIFO or a device: it is"
        " read before the ready line; as `damocles-ext coordinator --token-file`;"
        " `damocles-ext worker` sends it with its own --token-file, a damocles-worker sends no"
        " header). Without it, every local user can take and finish jobs on a loopback port",
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


#: Each request's deadline after its arrival when --deadline-after is not given. A WindowPoSt's
#: randomness is known 20 epochs before its 60-epoch window opens, and damocles-manager waits at
#: least one epoch more: no later proof can count. A WinningPoSt's has about 20 s, but the
#: deadline is there to free a stuck child, and its cancel kills a child that goes on: a cold
#: first proof (parameters loaded, GPU kernels built; damocles-manager's warm-up runs in its own
#: process, not here) must finish, or the child would stay cold for good.
DEFAULT_DEADLINE_AFTER = {"window_post": 40 * 60.0, "winning_post": 5 * 60.0}


def default_deadline(stage: str) -> float:
    """The deadline (unix time) DEFAULT_DEADLINE_AFTER gives a request of `stage` made now: what
    `prove` gives its own request (in-process, or a job) when --deadline is not given."""
    import time

    from damocles_ext.stages import post_stage  # (as serve_jsonl.with_default_deadline reads it)

    return time.time() + DEFAULT_DEADLINE_AFTER[post_stage(stage)]


#: Options of a serve that supervises its own children, and their defaults.
_SUPERVISING_OPTIONS = {**RESTART_DEFAULTS, "dump_dir": None}


def check_supervising_options(args: argparse.Namespace) -> None:
    """Check that one source of proofs is given (children, --connect or --jobs) with only the
    options that apply to it (UsageError otherwise), and fill in the defaults of the supervising
    options and of --deadline-after. check-config applies it to the entries of
    damocles-manager's ext-prover.cfg that run serve."""
    from damocles_ext.errors import UsageError

    jobs = getattr(args, "jobs", None)
    if args.config is None and args.conf_dir is None and args.connect is None and jobs is None:
        raise UsageError(
            "one of the arguments -c/--config --conf-dir --connect --jobs is required: children"
            " of serve's own (-c FILE, --conf-dir DIR), a running `damocles-ext run` (--connect),"
            " or a job store that workers prove from (--jobs URL)"
        )
    if jobs is not None:
        if args.config is not None or args.connect is not None:
            option = "-c/--config" if args.config is not None else "--connect"
            raise UsageError(
                f"{option} does not apply to serve --jobs: it supervises no children, the workers"
                " prove; with --jobs, --conf-dir DIR reads damocles-manager's DIR/sector-manager.cfg"
            )
    else:
        for name in ("store", "poll_interval", "store_file_check", "listen", "token_file"):
            if getattr(args, name, None):
                option = "--" + name.replace("_", "-")
                raise UsageError(f"{option} goes with --jobs URL (worker-prover mode) only")
    if getattr(args, "token_file", None) is not None and args.listen is None:
        raise UsageError(
            "--token-file goes with --listen: it is the token the workers' RPC served there"
            " requires"
        )
    if args.deadline_after is None:
        args.deadline_after = DEFAULT_DEADLINE_AFTER[args.stage]
    elif args.deadline_after == 0:
        args.deadline_after = None  # 0 or off: no deadline
    for name, default in _SUPERVISING_OPTIONS.items():
        option = "--" + name.replace("_", "-")
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif args.connect is not None:
            raise UsageError(
                f"{option} does not apply to serve --connect: the `damocles-ext run` it connects"
                f" to supervises the children; give {option} to that `run` instead"
            )
        elif jobs is not None:
            raise UsageError(
                f"{option} does not apply to serve --jobs: it supervises no children (the"
                " workers prove)"
            )


def run(args: argparse.Namespace) -> int:
    """Load the config (exit 2 on errors), then serve until stdin closes or a signal arrives."""
    setup_from_args(args)  # first: a mistake below is a JSON record with --log-format json
    check_supervising_options(args)
    from damocles_ext.frontends.serve import take_protocol_fds

    # Before any plugin is imported: one that prints would put its line before the ready line.
    fds = take_protocol_fds()
    if args.jobs is not None:
        from damocles_ext.frontends.serve import serve_jobs

        return serve_jobs(
            args.stage,
            args.jobs,
            stores=args.store,
            conf_dir=args.conf_dir,
            deadline_after=args.deadline_after,
            poll_interval=args.poll_interval,
            file_check_every=args.store_file_check,
            listen=args.listen,
            token=args.token_file,
            shutdown_grace=args.shutdown_grace,
            fds=fds,
        )
    if args.connect is not None:
        from damocles_ext.frontends.serve import serve_connected

        socket = None if args.connect is True else args.connect
        return serve_connected(
            args.stage, socket, args.shutdown_grace, args.deadline_after, fds=fds
        )
    config = load_config_from_args(args, args.stage)
    children = children_of(config, args.stage)
    if any(c.kind == "bin" for c in children):  # (a `damocles-ext serve` child is one)
        from damocles_ext.errors import UsageError

        from .check_config import serves_itself

        if (loop := serves_itself(config, args.stage)) is not None:
            raise UsageError(loop)  # before the ready line: the manager's start fails with it
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
        fds=fds,
    )
