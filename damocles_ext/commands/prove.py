"""`damocles-ext prove <stage> --request TASK.json`: one proof, from a running or embedded supervisor.

Exit codes: 0 the prover answered: with a proof, or with faulty sectors and no proof (they are
listed on stderr), 1 the prover could not produce one, 2 bad input (arguments, the task file, no
supervisor at the socket, a worker's socket, a `run` with no child of the task's stage).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import string
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from damocles_ext.errors import DextError, UsageError
from damocles_ext.logs import (
    add_dump_arg,
    add_logging_args,
    json_logging,
    one_line,
    setup_from_args,
)
from damocles_ext.stages import POST_STAGES

from .common import (
    add_sector_source_args,
    int64,
    positive_duration,
    socket_path,
    stdout_to_stderr,
)
from .inputs import check_request_size, read_task

if TYPE_CHECKING:
    import datetime

    from damocles_ext.tasks import Output, PoStTask

log = logging.getLogger("damocles_ext.prove")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `prove`."""
    parser = subparsers.add_parser(
        "prove",
        help="prove one damocles task (through `run`'s socket, or in-process with a config)",
        description=(
            "Submit one task to a running `damocles-ext run` (through its control socket), or,"
            " given -c/--conf-dir, start the config's children of STAGE in-process for this one"
            " request. Prints the output in damocles' JSON form. Exit code 0: the prover answered,"
            " with a proof or with faulty sectors and no proof (listed on stderr; prove again"
            " without them); 1: the prover failed; 2: bad input."
        ),
    )
    parser.add_argument("stage", choices=POST_STAGES, help="the stage of the task")
    task_source = parser.add_mutually_exclusive_group(required=True)
    task_source.add_argument(
        "--request",
        metavar="TASK.json",
        help="the task in damocles' JSON form (the wire's `task` field; '-' reads stdin)",
    )
    task_source.add_argument(
        "--comm-r",
        metavar="FILE",
        help="window_post: build the task from --sectors MINER:NUMBER,… located through the"
        " sector-location service (--proxy, --conf-dir, --attached), their on-chain comm_r"
        ' read from FILE ({"MINER:NUMBER": CID or hex}); needs --seed and --proof-type. A'
        " sector not located is skipped and listed in the output's faults",
    )
    task_source.add_argument(
        "--manifest",
        metavar="MANIFEST.json",
        help="build the task from a `damocles-ext sectors create` manifest (needs --seed)",
    )
    parser.add_argument(
        "--seed",
        metavar="HEX",
        help="with --manifest or --comm-r: the 32-byte randomness as 64 hex digits (byte 31's top two bits"
        " are cleared, as damocles-manager does)",
    )
    parser.add_argument(
        "--sectors",
        help="with --manifest: prove only these sector ids, ID,ID,… (default: all in the"
        " manifest); with --comm-r: the sectors to prove, MINER:NUMBER[:upgrade],…, a NUMBER"
        " also a range FIRST-LAST (1000:0-2348, as `sectors find` takes it), or @LIST: the"
        " file LIST holds them, one a line or comma-separated ('@-': stdin)",
    )
    parser.add_argument(
        "--save-request",
        metavar="TASK.json",
        help="with --manifest: also write the task built in damocles' JSON form (for `verify`)",
    )
    parser.add_argument(
        "--proof-type",
        metavar="TYPE",
        help="with --manifest: the proof type (default: from the manifest's sector size);"
        " with --comm-r: the proof type (required)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        metavar="PATH",
        type=socket_path,
        help="control socket of a running `damocles-ext run` (the default when no"
        " config is given: its default path)",
    )
    where.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="prove in-process with the children of this ext-prover.cfg",
    )
    where.add_argument(
        "--conf-dir",
        metavar="DIR",
        help="prove in-process with DIR/ext-prover.cfg (with --jobs: damocles-manager's"
        " DIR/sector-manager.cfg, for its stores and limits)",
    )
    parser.add_argument(
        "--jobs",
        metavar="URL",
        help="window_post only: submit the task as a job of the job store at URL and wait for a"
        " worker to prove it, as `serve window_post --jobs` does (the same task is the same job:"
        " proving it again answers from the job); --deadline becomes the job's deadline. The"
        " task's paths become store names through --store and --conf-dir",
    )
    parser.add_argument(
        "--poll-interval",
        type=positive_duration,
        metavar="DURATION",
        help="with --jobs: how often to look for the job's result (default: 3s, damocles', as"
        " `serve --jobs`); on PostgreSQL the store's notifications wake the wait earlier",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT.json",
        help="write the output JSON here instead of stdout (- is stdout)",
    )
    parser.add_argument(
        "--deadline",
        metavar="SECONDS|ISO-TIME",
        help="give up after this many seconds from now, or at this time (ISO 8601; without a"
        " zone it is local time; one that daylight saving time skips or repeats is refused). The"
        " supervisor answers by then; through --socket, one that is stopped or hung is given up"
        " on 15 s after it. Default: serve's, 40m for window_post, 5m for winning_post (through"
        " --socket, run's --deadline-after, the same unless changed; a run that stops answering"
        " is then given up once it does not answer a status request within 10 s, asked every"
        " 60 s: frontends/prove.py's ALIVE_*)",
    )
    parser.add_argument(
        "--priority",
        type=int64,
        default=0,
        help="among queued requests of the same deadline, higher goes first (default: 0;"
        " the queue is ordered by deadline first, earliest first)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="do not show the prover's progress on stderr (a bar on a terminal, else a line"
        " every 5 s)",
    )
    add_sector_source_args(parser, conf_dir=False)
    add_logging_args(parser, "warning")
    add_dump_arg(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Read and check everything first (exit 2), then prove (exit 0 or 1)."""
    setup_from_args(args)
    # Until the output is written, stdout is stderr (plugins are imported to find sectors or to
    # prove, observers called as a request ends).
    with stdout_to_stderr():
        output, output_path = _prove(args)
    _emit(output, output_path, args)
    return 0


def _prove(args: argparse.Namespace) -> tuple[Output, Path | None]:
    """The output of the task the arguments say, and where it goes (None: stdout)."""
    from .common import children_of, load_config_from_args

    if args.poll_interval is not None and args.jobs is None:
        raise UsageError(
            "--poll-interval goes with --jobs URL: it is how often the job is looked at"
        )
    deadline = parse_deadline(args.deadline) if args.deadline is not None else None
    skipped: list[int] = []
    task: PoStTask | None
    if args.comm_r is None:
        # (--attached also names the stores of a job sent with --jobs.)
        for flag, value in (("--proxy", args.proxy), ("--header", args.header),
                            ("--attached", args.jobs is None and args.attached)):  # fmt: skip
            if value:
                raise UsageError(f"{flag} goes with --comm-r FILE and --sectors MINER:NUMBER,…")
    if args.save_request == "-":  # was a file named -, where `-o -` is stdout
        raise UsageError("--save-request -: give a file name (the request is written to a file)")
    # Before the task is built (a provider asked, --save-request written): paths only.
    output_path = _check_output_path(args.output) if args.output not in (None, "-") else None
    if output_path is not None:
        for flag in ("request", "save_request", "manifest", "comm_r"):  # files of the task
            other = getattr(args, flag, None)
            if other not in (None, "-") and _same_file(output_path, Path(other)):
                raise UsageError(
                    f"--output {args.output} is the --{flag.replace('_', '-')} file: the proof"
                    " would overwrite that file; give another one"
                )
    if args.manifest is not None:
        task = task_from_manifest(args)
    elif args.comm_r is not None:
        from .prove_sectors import task_from_sectors

        task, skipped = task_from_sectors(args, deadline)
    else:
        for flag in ("seed", "sectors", "proof_type", "save_request"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} goes with --manifest, not --request")
        task = read_task(args.request, args.stage)

    if deadline is None and (args.jobs, args.config, args.conf_dir) != (None, None, None):
        # Serve's: else a hung prover, a job no worker takes, was waited for for ever. (Through
        # --socket, run gives its own --deadline-after.)
        from .serve import default_deadline

        deadline = default_deadline(args.stage)
    from damocles_ext.progress import ProgressRenderer

    renderer = None if args.no_progress else ProgressRenderer(sys.stderr, label=args.stage)

    def on_progress(progress) -> None:
        log.info("progress: %s %d/%d", progress.phase, progress.done, progress.total)
        if renderer is not None:
            renderer.update(progress.phase, progress.done, progress.total)

    try:
        if task is None:  # no sector located: nothing to prove, each is a fault
            from damocles_ext.tasks import WindowPoStOutput

            output: Output = WindowPoStOutput(proofs=[], faults=skipped)
        elif args.jobs is not None:
            from damocles_ext.frontends.prove import prove_through_jobs

            _check_jobs_args(args)
            with _one_line_errors():
                output = prove_through_jobs(
                    args.jobs, task, stores=args.attached, conf_dir=args.conf_dir,
                    **_job_deadline(args, deadline), poll_interval=args.poll_interval,
                )  # fmt: skip
        elif args.config is not None or args.conf_dir is not None:
            from damocles_ext.config import check_startable
            from damocles_ext.plugins import get_plugin_manager

            config = load_config_from_args(args, args.stage)
            children = children_of(config, args.stage)
            # A child that cannot start would fail the proof only after its restarts' backoff.
            plugin_manager = get_plugin_manager()
            check_startable(config, children, plugin_manager=plugin_manager)
            from damocles_ext.frontends.prove import prove_in_process

            with _one_line_errors():
                output = prove_in_process(
                    children,
                    task,
                    plugin_manager=plugin_manager,
                    deadline=deadline,
                    priority=args.priority,
                    on_progress=on_progress,
                )
        else:
            from damocles_ext.frontends.prove import prove_through_socket

            with _one_line_errors():
                output = prove_through_socket(
                    args.socket,
                    task,
                    deadline=deadline,
                    priority=args.priority,
                    on_progress=on_progress,
                )
    finally:
        if renderer is not None:
            renderer.close()
    if skipped and task is not None:
        from .prove_sectors import with_skipped

        output = with_skipped(output, skipped)
    return output, output_path


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A proof's error with its line breaks and terminal controls escaped, as the logs escape a
    message (one_line): it may hold a child's, a supervisor's or a worker's error answer, whose
    "\n", "\r" or ANSI sequence would otherwise reach the terminal raw (a forged line, a line
    rewritten). With --log-format json the error is a record whose JSON escapes it already."""
    try:
        yield
    except DextError as exc:
        said = str(exc)
        if json_logging():
            raise
        if (escaped := one_line(said)) != said:
            exc.args = (escaped,)  # its type, exit code and fields kept
        raise


def _job_deadline(args: argparse.Namespace, deadline: float | None) -> dict[str, float | None]:
    """The deadline of the job --jobs makes: what is left now of the seconds asked (--deadline
    SECONDS, or the default, both counted from the command's start: the sectors' lookup took
    some of them) as `deadline_after`, counted by the producer on the store's clock (its
    PostgreSQL server's: this machine's may be off it, and a job given a deadline 60 s early by
    a clock 60 s behind was cancelled at once); an ISO time as the `deadline` it is."""
    assert deadline is not None  # (the default is given before)
    if args.deadline is not None:
        try:
            float(args.deadline)
        except ValueError:  # an ISO time: parse_deadline read it
            return {"deadline": deadline, "deadline_after": None}
    # (Only a difference of this machine's clock: right whatever its offset to the server's.)
    return {"deadline": None, "deadline_after": max(0.0, deadline - time.time())}


def _check_jobs_args(args: argparse.Namespace) -> None:
    """--jobs with only the options that apply to it; UsageError naming the one that does not."""
    if args.stage != "window_post":
        from damocles_ext.frontends.producer import WINNING_REFUSED

        raise UsageError(f"prove {args.stage} --jobs: {WINNING_REFUSED}")
    for option, given in (("-c/--config", args.config), ("--socket", args.socket)):
        if given is not None:
            raise UsageError(
                f"{option} does not apply with --jobs: the job goes to the store's workers"
            )
    if args.priority:
        raise UsageError(
            "--priority does not apply with --jobs: workers take jobs earliest deadline first"
            " (give --deadline)"
        )


def _reasons_not_shown(args: argparse.Namespace) -> bool:
    """Whether the children proved here and their log, where the provers say why each sector
    is faulty (the output has their numbers only), is below the level logged."""
    in_process = getattr(args, "config", None) is not None or getattr(args, "conf_dir", None)
    return (
        bool(in_process)
        and getattr(args, "jobs", None) is None
        and not logging.getLogger("damocles_ext.child").isEnabledFor(logging.INFO)
    )


def _emit(output: Output, path: Path | None, args: argparse.Namespace) -> None:
    from damocles_ext.protocol.jsonl import output_to_json
    from damocles_ext.wording import SECTORS_NAMED, sector_list

    data = output_to_json(output) + b"\n"
    faults = list(getattr(output, "faults", ()))
    if faults:
        noun = "faulty sector" if len(faults) == 1 else "faulty sectors"
        listed = sector_list(faults)
        if len(faults) > SECTORS_NAMED:
            listed += " (all of them in the output's faults)"
        if not getattr(output, "proofs", True):
            # Exit 0 all the same: the prover answered, as damocles' processor does with faults;
            # damocles-manager then proves again without them, and so must the user.
            how = (
                "--sectors with --manifest"
                if args.manifest is not None
                else "leave them out of --sectors"
                if args.comm_r is not None
                else "leave them out of the task's replicas"
            )
            listed += f"; no proof: prove again without them ({how})"
        if _reasons_not_shown(args):
            listed += "; --log-level info shows why (the prover's log)"
        print(f"{len(faults)} {noun}: {listed}", file=sys.stderr)
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    # Checked again: the file may have been missing at the start, and a symlink planted since.
    _refuse_foreign_symlink(path, "; the proof was made but is lost")
    try:
        write_file(path, data)
    except OSError as exc:
        raise UsageError(
            f"--output {path}: cannot write the output there: {exc.strerror or exc}; the proof"
            " was made but is lost: give a writable file and prove again"
        ) from None


def write_file(path: Path, data: bytes) -> None:
    """Writes `data` to the file `path` (--output, --save-request) whole or not at all: a new or
    regular file by write-then-rename, so a failure (a full disk) leaves no stub and keeps the
    file that was there; a device, a FIFO or an open file written where it stands. OSError when
    it cannot."""
    import secrets
    import stat

    open_file = _open_file_link(path)
    if open_file is not None and open_file >= 0:
        # /dev/stdout, /dev/fd/1: one of our open files, written where it stands (a file
        # the shell opened, appended to or not, a pipe, a terminal). Renaming over the path
        # replaced the link itself (as root, the system's /dev/stdout) and wrote nothing.
        with open(os.dup(open_file), "wb") as out:
            out.write(data)
        return
    try:
        # Another process's open file (/proc/<pid>/fd/N): written through, not renamed over.
        special = open_file is not None or not stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        special = False
    if special:
        # A device or a FIFO (-o /dev/null, a pipe to a reader), another process's open file:
        # renaming over it would replace it with a regular file, so write into it (a regular
        # file emptied first, as a shell's > does).
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)
        with open(fd, "wb") as out:
            out.write(data)
        return
    # Write-then-rename: a reader never sees half an output, and a failure leaves no stub.
    # The directory may be one others write to (/tmp): the temporary name is random and
    # made afresh (O_EXCL, no symlink followed), so that nobody can plant a symlink or a
    # file of theirs under it for the data to be written through.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with open(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _open_file_link(path: Path) -> int | None:
    """Whether `path` leads through /proc/.../fd/N (as /dev/stdout and /dev/fd/1 do): N when it
    is an open file of this process, -1 when of another, None when it does not."""

    here = str(path.absolute())
    for _ in range(40):  # the kernel's own limit of links followed
        head, name = os.path.split(here)
        here = os.path.join(os.path.realpath(head), name)
        found = re.fullmatch(r"/proc/(self|thread-self|\d+)(?:/task/\d+)?/fd/(\d+)", here)
        if found is not None:
            try:  # our pid as this /proc knows it (another pid namespace's)
                me = os.readlink("/proc/self")
            except OSError:
                me = str(os.getpid())
            return int(found[2]) if found[1] in ("self", "thread-self", me) else -1
        try:
            target = os.readlink(here)
        except OSError:  # not a link (or not there): no open file
            return None
        here = os.path.join(head if not os.path.isabs(target) else "/", target)
    return None


def task_from_manifest(args: argparse.Namespace) -> PoStTask:
    """The task for args.stage over a fixtures manifest, with --seed/--sectors/--proof-type."""
    from damocles_ext.post import fixtures

    seed = parse_seed(args.seed, "--manifest")
    sector_ids = None
    if args.sectors is not None:
        try:
            sector_ids = [int(x) for x in args.sectors.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--sectors {args.sectors!r}: expected ids like 1,2,3") from None
    manifest = fixtures.load_manifest(args.manifest)
    build = fixtures.window_task if args.stage == "window_post" else fixtures.winning_task
    task = build(manifest, seed, proof_type=args.proof_type, sector_ids=sector_ids)
    check_request_size(task, args.manifest)
    if args.save_request is not None:
        from damocles_ext.protocol.jsonl import task_to_json

        try:
            write_file(Path(args.save_request), task_to_json(task) + b"\n")
        except OSError as exc:
            raise UsageError(
                f"--save-request {args.save_request}: cannot write the request there:"
                f" {exc.strerror or exc}; give a file you may write, on a file system with room"
            ) from None
    return task


def parse_seed(text: str | None, needed_by: str) -> bytes:
    """--seed's 32 bytes, byte 31's top two bits cleared; UsageError saying what is wrong."""
    if text is None:
        raise UsageError(f"{needed_by} needs --seed HEX (64 hex digits, the 32-byte randomness)")
    try:
        seed = bytearray(bytes.fromhex(text))
    except ValueError:
        # It said "is not hexadecimal" of 63 hex digits, and of 0x and 64 of them.
        bad = next((c for c in text if c not in string.hexdigits + " "), None)
        if text.strip()[:2].lower() == "0x":
            why = "leave out the 0x"
        elif bad is not None:
            why = f"{bad!r} is not a hex digit"
        else:
            why = f"{len(text.replace(' ', ''))} hex digits, an odd number"
        raise UsageError(
            f"--seed {text[:80]!r}: {why}; give the 32-byte randomness as 64 hex digits"
        ) from None
    if len(seed) != 32:
        raise UsageError(f"--seed must be 32 bytes (64 hex digits), got {len(seed)} bytes")
    seed[31] &= 0x3F
    return bytes(seed)


_DEADLINE_FORMS = (
    "give seconds from now (e.g. 600) or an ISO 8601 time (e.g. 2026-01-31T12:00:00+00:00;"
    " without a zone it is local time)"
)


def parse_deadline(text: str, now: float | None = None) -> float:
    """Seconds from now, or an ISO 8601 time (local time without a zone), as a unix time."""
    import datetime as dt
    import time

    from damocles_ext.errors import UsageError
    from damocles_ext.tasks import DEADLINE_MAX

    now = time.time() if now is None else now
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise UsageError(
                f"--deadline {text!r} is neither a number of seconds nor an ISO 8601 time;"
                f" {_DEADLINE_FORMS}"
            ) from None
        try:
            # A local time near the ends of the calendar may not exist in UTC (year 0 or 10000).
            deadline = when.astimezone().timestamp() if when.tzinfo is None else when.timestamp()
            if when.tzinfo is None:
                _check_local_time(text, when)
        except (ValueError, OverflowError, OSError) as exc:
            raise UsageError(
                f"--deadline {text!r} cannot be turned into a time ({exc}); {_DEADLINE_FORMS}"
            ) from None
        if deadline <= now:
            raise UsageError(f"--deadline {text} is in the past") from None
    else:
        if not seconds > 0 or seconds == float("inf"):
            raise UsageError(
                f"--deadline {text}: the number of seconds must be positive and finite;"
                f" {_DEADLINE_FORMS}"
            )
        deadline = now + seconds
    if deadline > DEADLINE_MAX:
        raise UsageError(
            f"--deadline {text!r} is too far ahead: the latest deadline a request takes is"
            f" 9999-12-31T00:00:00+00:00; {_DEADLINE_FORMS}"
        )
    return deadline


def _check_local_time(text: str, when: datetime.datetime) -> None:
    """Refuse a local time (no zone) that this machine's clocks skip or show twice (daylight
    saving time begins or ends): it would be read as one of two times an hour apart, silently."""
    try:
        first, second = when.replace(fold=0).astimezone(), when.replace(fold=1).astimezone()
    except (ValueError, OverflowError, OSError):  # at the ends of the calendar: no such change
        return
    if first.utcoffset() == second.utcoffset():
        return
    if first.replace(tzinfo=None) != when:
        what = "is skipped by this machine's local time (its clocks go forward then)"
    else:
        what = "comes twice in this machine's local time (its clocks go back then)"
    offsets = " or ".join(when.replace(tzinfo=at.tzinfo).isoformat() for at in (first, second))
    raise UsageError(f"--deadline {text} {what}: give it with its UTC offset, e.g. {offsets}")


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file (one that is not there yet is no other's)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _check_output_path(text: str) -> Path:
    from damocles_ext.errors import UsageError

    path = Path(text)
    try:
        if path.is_dir():
            raise UsageError(f"--output {text} is a directory; give a file name")
        if not path.parent.is_dir():
            raise UsageError(f"--output {text}: directory {path.parent} does not exist")
    except PermissionError:  # a directory on the way this user may not enter
        raise UsageError(
            f"--output {text}: permission denied (its directory, or one above it, is closed to"
            " this user); give a file you may write"
        ) from None
    _refuse_foreign_symlink(path, "")
    return path


def _refuse_foreign_symlink(path: Path, lost: str) -> None:
    """UsageError if writing to `path` would follow another user's symlink (see
    trusted_path.foreign_symlink); `lost`: what it means for the proof, if anything."""
    from damocles_ext.errors import UsageError
    from damocles_ext.trusted_path import foreign_symlink

    if (problem := foreign_symlink(path)) is not None:
        raise UsageError(
            f"--output {path}: {problem}, neither ours, root's nor the directory owner's:"
            f" refusing to write through it (it could lead to a device or a FIFO of its owner's"
            f" choosing){lost}; remove it, or give another file"
        )
