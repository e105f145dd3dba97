"""What several commands parse the same way: config and logging arguments, durations, supervisor
options, and the children of a stage in a config.

Light to import (argparse and the standard library at the top; the rest inside the functions) so
that building the CLI's parsers stays fast: `serve` is timed by damocles-manager's ready check.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, NotRequired, TypedDict

from damocles_ext.stages import child_stages

if TYPE_CHECKING:
    from damocles_ext.config import ChildSpec, Config
    from damocles_ext.plugins import DextPluginManager
    from damocles_ext.sectors.snapshot import CacheSnapshot
    from damocles_ext.supervisor.restart import BackoffPolicy

DEFAULT_SHUTDOWN_GRACE = 30.0


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """While it lasts stdout is stderr, fd 1 and sys.stdout: a plugin or an observer that prints
    (as it is imported, or as its hooks are called) must not put its line into the output a
    command writes after it (JSON, most of the time)."""
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout, python_stdout = sys.stderr, sys.stdout
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
        sys.stdout = python_stdout


#: --restart-delay and --restart-max-delay when not given (seconds).
RESTART_DEFAULTS = {"restart_delay": 1.0, "restart_max_delay": 60.0}


def add_config_args(
    parser: argparse.ArgumentParser, *, required: bool
) -> argparse._MutuallyExclusiveGroup:
    """-c FILE | --conf-dir DIR, as check-config takes them; returns their group."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("-c", "--config", metavar="FILE", help="the ext-prover.cfg to read")
    source.add_argument(
        "--conf-dir",
        metavar="DIR",
        help="read DIR/ext-prover.cfg, like damocles-manager --conf-dir",
    )
    return source


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
        default=RESTART_DEFAULTS["restart_delay"],
        metavar="SECONDS",
        help="wait this long before restarting a child that stopped; the wait doubles for each"
        " stop in a row, up to --restart-max-delay, and starts over once the child stayed ready"
        f" 60 s (default: {RESTART_DEFAULTS['restart_delay']:g})",
    )
    parser.add_argument(
        "--restart-max-delay",
        type=_positive_float,
        default=RESTART_DEFAULTS["restart_max_delay"],
        metavar="SECONDS",
        help="the longest wait before a restart; a child that failed 5 starts in a row is FATAL"
        " and tried again this often until it starts"
        f" (default: {RESTART_DEFAULTS['restart_max_delay']:g})",
    )


class SupervisorOptions(TypedDict):
    """The Supervisor keyword arguments `run` and `serve` pass (mypy checks them against it)."""

    plugin_manager: DextPluginManager
    shutdown_grace: float
    adopt_orphans: bool
    backoff: BackoffPolicy
    inline_observers: NotRequired[list[object]]  # the metrics, when served


def supervisor_options(
    args: argparse.Namespace, plugin_manager: DextPluginManager | None = None
) -> SupervisorOptions:
    """Supervisor keyword arguments from the shared options (observer plugins included)."""
    from damocles_ext.plugins import get_plugin_manager
    from damocles_ext.supervisor.restart import BackoffPolicy

    return {
        "plugin_manager": plugin_manager if plugin_manager is not None else get_plugin_manager(),
        "shutdown_grace": args.shutdown_grace,
        # This process is ours: become the parent of what children leave behind (setsid).
        "adopt_orphans": True,
        # These commands run for months: a FATAL child is tried again at the cap, since what
        # stops it may pass (a GPU driver loaded after damocles-ext started).
        "backoff": BackoffPolicy(
            base=args.restart_delay,
            cap=max(args.restart_max_delay, args.restart_delay),
            retry_fatal=True,
        ),
    }


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def positive_int(text: str) -> int:
    """A count of at least 1 (an argparse type)."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def not_empty(fix: str) -> Callable[[str], str]:
    """An argparse type that refuses an empty (or blank) value, saying `fix`."""

    def check(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"empty; {fix}")
        return text

    return check


def utf8_argument(text: str, why: str) -> str:
    """`text`, an argument sent as text (a name, an id); ArgumentTypeError saying `why` it must
    be UTF-8 when it has bytes that are not (os.fsdecode made them lone surrogates)."""
    from damocles_ext.errors import not_utf8

    if (bad := not_utf8(text)) is not None:
        shown = text.encode("utf-8", "replace").decode()
        raise argparse.ArgumentTypeError(f"{shown!r} is not UTF-8 text: {bad} is not, {why}")
    return text


#: A --socket PATH: an empty one would be the current directory.
socket_path = not_empty("give the control socket's path")


def int64(text: str) -> int:
    """A whole number that a dext frame carries: a signed 64-bit one (an argparse type)."""
    value = _whole(text)
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be within -2**63 .. 2**63 - 1, got {value}")
    return value


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
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, got {text}")
    return value


def load_config_from_args(
    args: argparse.Namespace, stage: str | None = None, *, started_only: bool = False
) -> Config:
    """The config named by -c/--conf-dir; its warnings are logged (for the children of `stage`
    only: not those that hold where one supervisor runs every stage), under the logger of the
    command that loads it (`damocles_ext.run`, `damocles_ext.prove`, ...). `started_only`: the
    command starts only the children of `stage` (`worker`): the warnings about the others are
    not logged either."""
    from damocles_ext.config import load_conf_dir, load_config, warnings_for

    config = load_config(args.config) if args.config is not None else load_conf_dir(args.conf_dir)
    command = getattr(args, "command", None) or "cli"
    log = logging.getLogger(f"damocles_ext.{command.replace('-', '_')}")
    if stage is None:
        warnings = config.warnings + config.run_warnings
    elif started_only:
        stages = child_stages(stage)
        warnings = warnings_for(config, [c for c in config.children if c.stage in stages])
    else:
        warnings = config.warnings
    for warning in warnings:
        log.warning("%s: %s", config.source, warning)
    return config


def children_of(config: Config, stage: str) -> list[ChildSpec]:
    """The config's children of `stage`; UsageError when there is none."""
    from damocles_ext.config import TABLE_OF_STAGE
    from damocles_ext.errors import UsageError

    stages = child_stages(stage)
    children = [c for c in config.children if c.stage in stages]
    if not children:
        table = TABLE_OF_STAGE[stage]
        split = " (or [[WdPostVanilla]] and [[WdPostSnark]])" if stage == "window_post" else ""
        raise UsageError(
            f"{config.source} has no [[{table}]] table{split}, so there is no child to serve"
            f' {stage}; add one (e.g. [[{table}]] with Plugin = "..." or Bin = "...")'
        )
    return children


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smh]?)\s*$")
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "3m" or "1h"; ValueError says what is wrong (finite, >= 0)."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a duration; write seconds (90 or 90s), minutes (3m) or hours (1h)"
        )
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_DURATION:  # digits enough overflow to inf
        raise ValueError(
            f"{text!r} is too long a duration: at most {MAX_DURATION // 3600:.0f}h (ten years)"
        )
    return seconds


#: The longest duration an option takes: ten years (a deadline that far is no deadline, and one
#: a few thousand years away is no time at all).
MAX_DURATION = 10 * 365 * 24 * 3600.0


def positive_duration(text: str) -> float:
    """An argparse type: a parse_duration > 0 (e.g. --idle-timeout, --poll-interval)."""
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {text!r}")
    return value


def deadline_duration(text: str) -> float:
    """An argparse type: a parse_duration, or "off" (0: no deadline)."""
    if text.strip().lower() == "off":
        return 0.0
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, or 0 or off for none") from None


class DeadlineAfter(argparse.Action):
    """--deadline-after: each text converted by `type` (a text is what `convert` takes: serve's
    DURATION, run's [STAGE=]DURATION as (stage or None, seconds)), where argparse would keep the
    last of a repeated option silently. A stage's deadline given twice, or one for every stage
    given after a stage's own (which it would override), is refused (exit 2) naming both; a
    stage's own after the one for every stage sets that stage's. `append`: the value is the
    list of the conversions in order (run), else the one conversion (serve)."""

    def __init__(
        self, *args: object, convert: Callable[[str], object], append: bool, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]  # argparse's own keywords
        self.convert = convert
        self.append = append

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        text = str(values)
        try:
            value = self.convert(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        stage = value[0] if isinstance(value, tuple) else None
        given: list[tuple[str, str | None]] = getattr(namespace, "_deadline_after_given", [])
        for earlier, earlier_stage in given:
            if earlier_stage == stage:
                both = f"{earlier!r} and {text!r}"
                if not self.append:  # serve: one stage, one value
                    raise argparse.ArgumentError(self, f"given twice, {both}: give it once")
                scope = "every stage" if stage is None else stage
                raise argparse.ArgumentError(
                    self, f"{both} both give {scope}'s deadline: give it once"
                )
            if stage is None:
                raise argparse.ArgumentError(
                    self,
                    f"{text!r}, for every stage, would override {earlier!r} given before it:"
                    " give the one for every stage first, then each stage's own",
                )
        namespace._deadline_after_given = [*given, (text, stage)]
        if self.append:
            value = [*(getattr(namespace, self.dest, None) or []), value]
        setattr(namespace, self.dest, value)


#: The longest first line (bytes) a token file may have (a JWT with many claims is under 4 KiB).
MAX_TOKEN_CHARS = 64 * 1024


class TokenFileError(argparse.ArgumentTypeError):
    """Why a --token-file gives no token (argparse makes it exit code 2 with the message);
    `errno`: that of the OSError that kept the file from being read, else None."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def token_file(path: str) -> str:
    """A --token-file argument: the token on the file's first line (argparse turns the error into
    exit code 2 with its message). Any file that opens: `<(command)` gives a pipe."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _unreadable_token_file(path, e) from None
    return _read_token(fd, path)


def regular_token_file(path: str, *, wait_for_lease: bool = True) -> str:
    """serve's --token-file: as token_file, of a regular file only. serve reads it before its
    ready line, started by damocles-manager: a FIFO without a writer would hold that start
    for ever, so a FIFO, a socket or a device is refused by what it is, never opened to wait.
    check-config reads it so too, without `wait_for_lease` (a lease held: errno EAGAIN)."""
    from damocles_ext.regular_file import NotRegularFile, open_regular

    try:
        fd = open_regular(path, wait_for_lease=wait_for_lease)
    except NotRegularFile as e:
        raise TokenFileError(
            f"the token file {path!r} is {e.kind}, not a regular file: serve needs a regular file"
            " whose first line is the token"
        ) from None
    except OSError as e:
        raise _unreadable_token_file(path, e) from None
    return _read_token(fd, path)


def _read_token(fd: int, path: str) -> str:
    """The token on the first line of `path`, open as `fd` (closed here). Read as bytes: only
    that line is decoded (what follows it is none of the token's business)."""
    try:
        with open(fd, "rb") as f:
            first = f.readline(MAX_TOKEN_CHARS + 1)  # bounded: /dev/zero must not fill memory
    except OSError as e:
        raise _unreadable_token_file(path, e) from None
    if len(first) > MAX_TOKEN_CHARS:
        raise TokenFileError(
            f"the first line of the token file {path!r} is over {MAX_TOKEN_CHARS} bytes,"
            " longer than any token: is it the right file?"
        )
    try:
        return token_on_first_line(first.decode("utf-8"), path)
    except UnicodeDecodeError as e:
        raise _unreadable_token_file(path, e) from None


def _unreadable_token_file(path: str, e: OSError | UnicodeDecodeError) -> TokenFileError:
    if isinstance(e, FileNotFoundError):
        return TokenFileError(
            f"the token file {path!r} does not exist; create it (the token on its first line,"
            " e.g. `openssl rand -hex 32 > FILE`) or fix the path",
            e.errno,
        )
    if isinstance(e, NotADirectoryError):
        return TokenFileError(
            f"the token file {path!r} cannot be there: a part of its path before it is a file,"
            " not a directory; fix the path",
            e.errno,
        )
    if isinstance(e, PermissionError):
        uid = os.geteuid()
        return TokenFileError(
            f"the token file {path!r} cannot be read by uid {uid}, which this command runs as"
            f" (permission denied); fix its permissions, or those of a directory on its path, so"
            f" that uid {uid} may read it",
            e.errno,
        )
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    if isinstance(e, UnicodeDecodeError):
        why = f"its first line is not UTF-8 ({e})"
    return TokenFileError(
        f"cannot read the token file {path!r}: {why}; give a file whose first line is the token",
        e.errno if isinstance(e, OSError) else None,
    )


def token_on_first_line(first: str, path: str) -> str:
    """The token that `first`, the first line of the token file `path` (of
    MAX_TOKEN_CHARS bytes at most, decoded), gives; TokenFileError if none."""
    token = first.strip()
    from damocles_ext.jobs.endpoint import header_value_problem

    if (problem := header_value_problem(token)) is not None:
        raise TokenFileError(
            f"the token in the token file {path!r} cannot be sent in an HTTP header: {problem}"
        )
    if not token:
        raise TokenFileError(
            f"the token file {path!r} has no token on its first line; write the token there"
            " (e.g. `openssl rand -hex 32 > FILE`)"
        )
    return token


# --- where sectors are: the sector-location service's sources (sectors find, prove, worker) ------


#: The forms `--proxy` takes, as its errors say them: damocles-manager's --proxy takes HOST:PORT.
PROXY_FORMS = (
    "HOST:PORT (as damocles-manager --proxy takes it), http://HOST:PORT[/rpc/v0] or a multiaddr"
    " such as /ip4/1.2.3.4/tcp/1789"
)


def proxy_address(text: str) -> str:
    """An argparse type: a source node's address (`--proxy`), kept as given once it is one."""
    from damocles_ext.jobs.endpoint import parse_endpoint

    try:
        parse_endpoint(text, PROXY_FORMS)
    except ValueError as exc:
        why, forms = str(exc), f"; give {PROXY_FORMS}"
        raise argparse.ArgumentTypeError(why if why.endswith(forms) else why + forms) from None
    return text


def add_sector_source_args(
    parser: argparse.ArgumentParser,
    *,
    conf_dir: bool = True,
    attached: bool = True,
    header: bool = True,
) -> None:
    """--proxy ADDR, --conf-dir DIR, --attached/--store NAME=PATH and --header 'NAME: VALUE',
    as `sectors find` takes them; a command that has one of them already leaves it out."""
    parser.add_argument(
        "--proxy",
        metavar="ADDR",
        type=proxy_address,
        help="a damocles source node's RPC: IP:PORT, http://HOST:PORT[/rpc/v0] or a multiaddr"
        " (as damocles-manager --proxy); asked Venus.SectorIndexerFind, read-only",
    )
    if conf_dir:
        parser.add_argument(
            "--conf-dir",
            metavar="DIR",
            help="damocles-manager's config directory: its sector-manager.cfg's"
            " [[Common.PersistStores]] name the stores (shared with the source node, as a"
            " damocles proxy node shares it)",
        )
    if attached:
        from .coordinator import _store

        parser.add_argument(
            "--attached",
            "--store",
            dest="attached",
            metavar="NAME=PATH",
            action="append",
            type=_store,
            default=[],
            help="a store as damocles names it and where it is mounted here; repeat for each",
        )
    if header:
        add_header_arg(
            parser, "--header", "an HTTP header sent to the source node (e.g. 'Authorization:"
            " Bearer TOKEN'); repeat for each",
        )  # fmt: skip


def store_pair(text: str, what: str) -> tuple[str, str]:
    """NAME=PATH of a store (`what` says what it is, for the error); PATH must be absolute: it is
    where the store is mounted, and a relative one would name another place in each process."""
    name, sep, path = (part.strip() for part in text.partition("="))
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH ({what}), got {text!r}")
    # The name is damocles' (its configs are UTF-8), sent and matched as text; PATH is a local
    # file name, whatever its bytes.
    utf8_argument(
        name, "and damocles' store names are text: give the name as damocles' config writes it"
    )
    if not path.startswith("/"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: PATH must be absolute, where the store is mounted (e.g. /mnt/{name})"
        )
    return name, path


def add_header_arg(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    """A repeatable 'NAME: VALUE' HTTP header option (a list of (name, value))."""
    from .worker import _header

    parser.add_argument(
        flag, metavar="'NAME: VALUE'", action="append", type=_header, default=[], help=text
    )


def sector_stores(args: argparse.Namespace, *, conf_dir_needs_file: bool = True) -> dict[str, str]:
    """--conf-dir's sector-manager.cfg PersistStores merged with --attached; UsageError
    (ManagerConfigError) naming what is wrong. `conf_dir_needs_file=False`: a --conf-dir without
    sector-manager.cfg (`prove`'s, which holds ext-prover.cfg) gives no stores, not an error."""
    from damocles_ext.jobs.manager_config import (
        MANAGER_CONF_FILE,
        ManagerConfigError,
        load_manager_conf_dir,
    )
    from damocles_ext.jobs.paths import StoreMap, merge_stores

    from_file: dict[str, str] = {}
    source = "--attached"
    given_dir = getattr(args, "conf_dir", None)
    if given_dir is not None:
        config = load_manager_conf_dir(given_dir)
        if config is None and conf_dir_needs_file:
            raise ManagerConfigError(
                f"--conf-dir {given_dir}: there is no {MANAGER_CONF_FILE} in it; give the"
                " directory of the sector-manager.cfg that lists the stores, or --attached"
            )
        if config is not None:
            for warning in config.warnings:
                logging.getLogger("damocles_ext.sectors").warning("%s", warning)
            from_file = config.stores
            source = f"{config.source} and --attached"
    try:
        merged = merge_stores(from_file.items(), args.attached)
        StoreMap(merged)
    except ValueError as exc:
        raise ManagerConfigError(f"{exc} ({source})") from None
    return merged


STORES_HINT = (
    "--conf-dir DIR (the sector-manager.cfg the source node shares) or --attached NAME=PATH for"
    " each store"
)


def check_proxy_headers(proxy: str | None, headers: list[tuple[str, str]], flag: str) -> None:
    """UsageError for headers of the source node (`flag`) given without --proxy: there is no
    source node to send them to, and an operator would believe them sent."""
    from damocles_ext.errors import UsageError

    if headers and proxy is None:
        raise UsageError(
            f"{flag} goes with --proxy ADDR: it is sent to that source node, and without --proxy"
            " no source node is asked"
        )


def check_sector_sources(
    proxy: str | None, stores: dict[str, str], stores_hint: str = STORES_HINT
) -> None:
    """UsageError when there is nothing to find sectors with, or a --proxy whose store names
    cannot become paths here."""
    from damocles_ext.errors import UsageError

    if proxy is None and not stores:
        raise UsageError(
            "nothing to find sectors with: give --proxy ADDR (a damocles source node),"
            " --conf-dir DIR (a sector-manager.cfg with [[Common.PersistStores]]) or"
            " --attached NAME=PATH"
        )
    if proxy is not None and not stores:
        raise UsageError(
            f"--proxy {proxy}: the source node answers store names, and no store is known"
            f" here to turn them into paths; give {stores_hint}"
        )


# --- the sector locator's cache kept across restarts (worker --proxy, coordinator --proxy) -------

SECTOR_CACHE_HELP = (
    "keep the sector locations learned through --proxy in FILE across restarts (a snapshot"
    " written every 5 minutes and at a clean stop, read at start), so that started again while"
    " the source node is down the last known locations still answer (default:"
    " $STATE_DIRECTORY/sector-locations.snapshot when systemd gives a state directory, as the"
    " units in deploy/ do; else in memory only)"
)


def add_sector_cache_args(parser: argparse.ArgumentParser) -> None:
    """--sector-cache FILE and --no-sector-cache."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sector-cache", metavar="FILE", help=SECTOR_CACHE_HELP)
    group.add_argument(
        "--no-sector-cache",
        action="store_true",
        help="keep sector locations in memory only, also where a state directory is given",
    )


def check_sector_cache(args: argparse.Namespace) -> None:
    """UsageError for --sector-cache without --proxy: only the locator of --proxy has a cache."""
    from damocles_ext.errors import UsageError

    if args.sector_cache is not None and args.proxy is None:
        raise UsageError(
            "--sector-cache goes with --proxy ADDR: it keeps the locations learned through"
            " that source node, and without --proxy none is learned"
        )


def sector_snapshot(
    args: argparse.Namespace,
    log: logging.Logger,
    reroot: tuple[Mapping[str, str], frozenset[str]] | None = None,
) -> CacheSnapshot | None:
    """The CacheSnapshot of --sector-cache FILE, else of the state directory systemd gives
    ($STATE_DIRECTORY), else None. UsageError for a FILE whose directory is missing, not
    writable here or open to other users, or that is there and not a snapshot (a device, a
    FIFO, a symlink, someone's file: the snapshot would replace it); the same of the state
    directory is a warning (and no snapshot): a cache must not keep a service from starting."""
    from damocles_ext.errors import UsageError
    from damocles_ext.sectors.snapshot import FILE_NAME, CacheSnapshot, not_a_snapshot
    from damocles_ext.trusted_path import resolve_trusted

    if args.no_sector_cache:
        return None
    given = args.sector_cache
    if given is not None:
        path, what = os.path.abspath(given), f"--sector-cache {given}"
    else:
        state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if not os.path.isabs(state):
            return None
        path = os.path.join(state, FILE_NAME)
        what = f"the sector-location snapshot {path} (in $STATE_DIRECTORY)"
    directory = os.path.dirname(path)
    try:
        resolve_trusted(directory)
        if not os.path.isdir(directory):
            problem = f"{directory} is not a directory"
        elif os.path.isdir(path):
            problem = "it is a directory; give a file's path"
        elif not os.access(directory, os.W_OK | os.X_OK):
            problem = f"its directory {directory} is not writable by this user"
        elif (there := not_a_snapshot(path)) is not None:
            problem = f"it is {there}, which each save would replace"
        else:
            problem = ""
    except FileNotFoundError:
        problem = f"its directory {directory} does not exist (make it, mode 0700)"
    except (OSError, UsageError) as exc:  # UntrustedPathError: which part, and why
        problem = str(exc) if isinstance(exc, UsageError) else f"{directory}: {exc.strerror}"
    if not problem:
        return CacheSnapshot(path, reroot=reroot)
    if given is not None:
        raise UsageError(f"{what}: {problem}; give another path, or --no-sector-cache")
    log.warning("%s is not used: %s; sector locations are kept in memory only", what, problem)
    return None
