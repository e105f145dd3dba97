"""`damocles-ext check-config`: validate an ext-prover.cfg and show the children it would start."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import TYPE_CHECKING, NamedTuple

from damocles_ext.cli import _Parser

if TYPE_CHECKING:
    from damocles_ext.config import ChildSpec, Config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `check-config` and its options."""
    parser = subparsers.add_parser(
        "check-config",
        help="validate an ext-prover.cfg and list the children it would start",
        description=(
            "Validate an ext-prover.cfg (damocles-manager's format plus damocles-ext's keys) and "
            "print one line per child that would start. Every error in the file is reported, and"
            " whatever would keep a child from starting on this machine (a Bin that is missing or"
            " not executable, a Plugin not installed or refusing its PluginOptions, a Cpuset"
            " beyond the CPUs this process may use; in damocles-manager's file, a serve entry"
            " that serve would refuse at its start: its Args, --listen port, --token-file,"
            " sector-manager.cfg), as serve and run check before they"
            " report ready; the exit code is 2 when there is any, and 75 (EX_TEMPFAIL) when the only"
            ' problem is that Gpus = "all" got no answer from the GPU driver (not loaded yet).'
            " A note says what this user cannot see of what damocles-manager's user will read."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "file", nargs="?", metavar="FILE", help="the config file to read (same as -c FILE)"
    )
    source.add_argument("-c", "--config", metavar="FILE", help="the config file to read")
    source.add_argument(
        "--conf-dir",
        metavar="DIR",
        help="read DIR/ext-prover.cfg, like damocles-manager --conf-dir",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the resolved config as JSON instead"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the config, check it can start here (ConfigError), print its children."""
    import msgspec

    from damocles_ext.config import (
        ConfigError,
        absent_gpu_warnings,
        check_startable,
        load_conf_dir,
        load_config,
    )

    from .common import stdout_to_stderr

    path = args.config if args.config is not None else args.file
    config = load_config(path) if path is not None else load_conf_dir(args.conf_dir)
    # The same checks as serve and run make before they report ready: what passes here starts.
    for warning in config.warnings + config.run_warnings:  # also when a check fails below
        print(f"warning: {warning}", file=sys.stderr)
    with stdout_to_stderr():  # what plugins print as they load and check options is not ours
        check_startable(config)
    entries = serve_entries(config)  # each table's serve arguments, parsed once for both
    if (loop := serves_itself(config, entries=entries)) is not None:
        from damocles_ext.errors import UsageError

        raise UsageError(loop)
    found = manager_entry_findings(config, entries)
    for warning in found.warnings + absent_gpu_warnings(config.children, config.gpus_found):
        print(f"warning: {warning}", file=sys.stderr)
    for note in found.notes:
        print(f"note: {note}", file=sys.stderr)
    if found.errors:  # such a serve will not start: damocles-manager's start of it fails
        raise ConfigError(config.source, found.errors)
    if args.json:
        try:
            text = msgspec.json.format(msgspec.json.encode(config).decode())
        except UnicodeEncodeError:
            # A path or an environment value with bytes that are not UTF-8 (os.fsdecode's lone
            # surrogates), which msgspec cannot write: JSON escapes (\udcff) say them, and give
            # the same bytes back through os.fsencode.
            import json

            text = json.dumps(msgspec.to_builtins(config), indent=2)
        # As bytes: JSON is UTF-8 whatever the locale (whose encoding may lack a lock's name).
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode() + b"\n")
        return 0
    from damocles_ext.logs import controls_escaped

    width = max(len(child.name) for child in config.children)
    for child in config.children:  # one line each: a value's line break or ESC escaped
        print(controls_escaped(describe_child(child, width)))
    return 0


def describe_child(child: ChildSpec, width: int = 0) -> str:
    """One line: name, program or plugin, concurrency, weight, env vars set, locks, cpuset."""
    from damocles_ext import config as cfg

    table = cfg.TABLE_OF_STAGE[child.stage]
    parts = [
        f"{child.name:<{width}}",
        f"({table}[{child.block}])",
        f"run: {cfg.describe_argv(child, values=True)}",
        f"concurrent={child.concurrent}",
        f"weight={child.weight}",
    ]
    envs = " ".join(shlex.quote(f"{k}={v}") for k, v in child.envs.items())
    parts.append(f"env: {envs or '-'}")
    parts.append(f"locks: {','.join(child.locks) or '-'}")
    parts.append(f"cpuset: {cfg.format_cpuset(child.cpuset) if child.cpuset else '-'}")
    extras = []
    if child.protocol != "auto":
        extras.append(f"protocol={child.protocol}")
    if child.ready_timeout != cfg.DEFAULT_READY_TIMEOUT:
        extras.append(f"ready_timeout={child.ready_timeout:g}s")
    if not child.inherit_envs:
        extras.append("inherit_envs=false")
    if not child.auto_restart:
        extras.append("auto_restart=false")
    if child.max_attempts != cfg.DEFAULT_MAX_ATTEMPTS:
        extras.append(f"max_attempts={child.max_attempts}")
    if child.request_timeout is not None:
        extras.append(f"request_timeout={child.request_timeout:g}s")
    if child.heartbeat_timeout is not None:
        extras.append(f"heartbeat_timeout={child.heartbeat_timeout:g}s")
    if child.stdin_timeout is not None:
        extras.append(f"stdin_timeout={child.stdin_timeout:g}s")
    if child.cancel_grace != cfg.DEFAULT_CANCEL_GRACE:
        extras.append(f"cancel_grace={child.cancel_grace:g}s")
    if extras:
        parts.append(" ".join(extras))
    return "  ".join(parts)


# -- damocles-manager's own ext-prover.cfg ------------------------------------------------------
# Given the file damocles-manager reads, whose entries run `damocles-ext serve`, the mistake that
# costs most is quiet: damocles-manager writes at most the entry's `Concurrent` requests (default
# 1) to its processor at once, so a serve supervising several slots proves one request at a time.


class _Refused(Exception):
    """Arguments `damocles-ext serve` would refuse (argparse's message)."""


class _QuietParser(_Parser):  # (refusing what serve's parser refuses, an empty path too)
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Refused(message)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise _Refused(message or "asks for help instead of serving")

    def _print_message(self, message: str, file=None) -> None:
        pass


def _parse_serve(args: list[str]) -> argparse.Namespace:
    """`damocles-ext serve ARGS` as serve parses them; _Refused with argparse's message."""
    from damocles_ext.commands import serve

    parser = _QuietParser(prog="damocles-ext")
    # --token-file kept a path: serve reads it as its argument is parsed, this parse must not
    # (a FIFO, a file only damocles-manager's user reads: see _check_token_file).
    serve.add_parser(parser.add_subparsers(parser_class=_QuietParser), read_token=False)
    return parser.parse_args(["serve", *args])


class ServeEntry(NamedTuple):
    """A table whose children run `damocles-ext serve`: its first child (they share their
    stage, Bin and Args), the arguments after `serve`, and those as serve parses them, or the
    _Refused that says why serve refuses them."""

    child: ChildSpec
    args: list[str]
    parsed: argparse.Namespace | _Refused


def serve_entries(config: Config, stage: str | None = None) -> list[ServeEntry]:
    """The tables of `config` (of `stage`, or any) whose children run `damocles-ext serve`, in
    the file's order, each one's arguments parsed once."""
    from damocles_ext.config import serve_args

    entries: list[ServeEntry] = []
    seen: set[tuple[str, int]] = set()
    for child in config.children:
        args = serve_args(child.argv) if child.kind == "bin" else None
        if args is None or (stage is not None and child.stage != stage):
            continue
        if (child.stage, child.block) in seen:
            continue
        seen.add((child.stage, child.block))
        try:
            parsed: argparse.Namespace | _Refused = _parse_serve(args)
        except _Refused as exc:
            parsed = exc
        entries.append(ServeEntry(child, args, parsed))
    return entries


def serves_itself(
    config: Config, stage: str | None = None, *, entries: list[ServeEntry] | None = None
) -> str | None:
    """Why `config` cannot be served: a table (of `stage`, or any) whose child runs `damocles-ext
    serve` of its own stage on this same file (as damocles-manager's file does when the serve it
    names reads it back), which would start another such serve, and so on without end; or None.
    serve refuses such a config before its ready line, check-config with exit code 2.
    `entries`: serve_entries(config, stage), when already made."""
    from damocles_ext.config import CONF_FILE_NAME, TABLE_OF_STAGE

    here = os.path.realpath(config.source)
    for child, args, parsed in serve_entries(config, stage) if entries is None else entries:
        if isinstance(parsed, _Refused):
            continue  # serve refuses it anyway: no loop
        if parsed.stage != child.stage or parsed.connect is not None or parsed.jobs is not None:
            continue
        named = parsed.config or (
            os.path.join(parsed.conf_dir, CONF_FILE_NAME) if parsed.conf_dir else None
        )
        if named is None or os.path.realpath(named) != here:
            continue
        command = shlex.join(("damocles-ext", "serve", *args))
        return (
            f"{config.source}: {TABLE_OF_STAGE[child.stage]}[{child.block}] runs `{command}`,"
            " which reads this same file: each serve would start another, without end. This is"
            " the file damocles-manager reads; give serve the config that lists your provers"
            " instead (its own file or directory, e.g. --conf-dir /etc/damocles-ext)"
        )
    return None


class EntryFindings(NamedTuple):
    """What check-config says of the entries of damocles-manager's ext-prover.cfg that run
    `damocles-ext serve`: errors (exit code 2: such a serve will exit 2 at its start, as far as
    check-config can know it: not from a relative path), warnings, notes
    (what this user cannot see of what serve, as damocles-manager's user, will read)."""

    errors: list[str]
    warnings: list[str]
    notes: list[str]


def manager_entry_findings(
    config: Config, entries: list[ServeEntry] | None = None
) -> EntryFindings:
    """Findings on entries of damocles-manager's ext-prover.cfg that run `damocles-ext serve`
    (`entries`: serve_entries(config), when already made).

    Each such entry's `Concurrent` should be at least the request slots (the sum of the
    children's `Concurrent`) that the config it names (-c FILE or --conf-dir DIR) supervises for
    its stage; one below that leaves slots idle. An entry with `--connect` names no config: it is
    checked against the `damocles-ext run` answering at its socket, if one does (else nothing is
    said: the service may not be started yet, or be another user's).
    """
    from damocles_ext.commands import common, serve
    from damocles_ext.config import TABLE_OF_STAGE, ConfigError, load_conf_dir, load_config
    from damocles_ext.errors import UsageError

    findings = EntryFindings([], [], [])
    errors, warnings = findings.errors, findings.warnings
    # (stage, the config serve reads, the GPUs it gives) -> the first table that runs serve on it.
    served: dict[tuple[str, str, str | None], str] = {}
    # The ports the `serve --jobs --listen` of earlier tables take: (host, port, table).
    listening: list[tuple[str, int, str]] = []
    for entry, args, parsed in entries if entries is not None else serve_entries(config):
        where = f"{config.source}: {TABLE_OF_STAGE[entry.stage]}[{entry.block}]"
        command = shlex.join(("damocles-ext", "serve", *args))
        if isinstance(parsed, _Refused):  # exit code 2 from serve's parser
            errors.append(f"{where} runs `{command}`, which serve refuses ({parsed}); fix its Args")
            continue
        if parsed.stage != entry.stage:
            warnings.append(
                f"{where} runs `{command}`, but damocles-manager sends this table's processor"
                f" {entry.stage} requests; serve {entry.stage} instead"
            )
            continue
        try:
            serve.check_supervising_options(parsed)
        except UsageError as exc:
            errors.append(f"{where} runs `{command}`, which will exit 2: {exc}; fix its Args")
            continue
        if getattr(parsed, "jobs", None) is not None:
            # Its requests wait on a job store, not on slots of its own: nothing to compare; what
            # it reads before its ready line (damocles-manager's sector-manager.cfg, the
            # --token-file) is checked.
            if parsed.token_file is not None:  # (with --listen: check_supervising_options)
                _check_token_file(parsed.token_file, f"{where} runs `{command}`", findings)
            # A relative --conf-dir was read from check-config's directory: maybe not serve's.
            relative = parsed.conf_dir is not None and not os.path.isabs(parsed.conf_dir)
            told: list[str] = []
            problem = _serve_jobs_problem(parsed, relative, told)
            warnings.extend(f"{where} runs `{command}`, which warns: {w}" for w in told)
            if problem is not None:
                text, denied = problem
                if denied:  # closed to this user; serve runs as damocles-manager's, who may read it
                    from damocles_ext.jobs.manager_config import MANAGER_CONF_FILE

                    what = (
                        "its --conf-dir's sector-manager.cfg"
                        if os.path.basename(denied) == MANAGER_CONF_FILE
                        else "a store of its sector-manager.cfg, whose file"
                    )
                    closed = _closed_to_you(denied, what, "what it holds")
                    findings.notes.append(
                        f"{where} runs `{command}`: {closed}"
                        + (_RELATIVE_CONF_DIR if relative else "")
                    )
                else:  # (only what a relative --conf-dir read from here says may mislead)
                    (warnings if text.endswith(_RELATIVE_CONF_DIR) else errors).append(
                        f"{where} runs `{command}`, which will exit 2: {text}"
                    )
            elif parsed.listen is not None:
                table = f"{TABLE_OF_STAGE[entry.stage]}[{entry.block}]"
                if (taken := _port_taken(parsed.listen, listening)) is not None:
                    errors.append(
                        f"{where} runs `{command}`, which will exit 2: {taken} listens on the"
                        f" same port ({parsed.listen[1]}), and damocles-manager starts a processor"
                        " for each table, so this one cannot listen there and fails to start;"
                        f" keep one table and raise its Concurrent, or give this one another"
                        " --listen port (or none: one coordinator serves the store's workers)"
                    )
                listening.append((*parsed.listen, table))
            continue
        if parsed.connect is not None:
            socket = None if parsed.connect is True else parsed.connect
            found = _running_slots(socket, entry.stage)
            if found is None:
                continue
            run_at, slots = found
            if isinstance(slots, str):  # (serve's words say what to fix)
                errors.append(f"{where} runs `{command}`, which will exit 2: {slots}")
            elif entry.concurrent < slots:
                warnings.append(
                    _idle_slots(where, entry.concurrent, slots, entry.stage,
                                f"the `damocles-ext run` at {run_at} that its"
                                f" `damocles-ext serve {entry.stage} --connect` forwards to")
                )  # fmt: skip
            continue
        ours_path = parsed.config if parsed.config is not None else parsed.conf_dir
        try:
            ours = (
                load_config(parsed.config)
                if parsed.config is not None
                else load_conf_dir(parsed.conf_dir)
            )
            kids = common.children_of(ours, entry.stage)
        except ConfigError as exc:
            warnings.append(
                f"{where} runs `{command}`, but its config cannot be used, so its Concurrent"
                f" cannot be checked: {exc.errors[0]}"
                + (f" (and {len(exc.errors) - 1} more)" if len(exc.errors) > 1 else "")
                + f"; run damocles-ext check-config on {ours_path}"
                + (
                    ""
                    if os.path.isabs(ours_path)
                    else " (a relative path is read from the directory damocles-manager runs in;"
                    " check-config read it from the current directory)"
                )
            )
            continue
        except UsageError as exc:  # (a relative path: read from check-config's directory)
            (errors if os.path.isabs(ours_path) else warnings).append(
                f"{where} runs `{command}`, which will exit 2: {exc}"
            )
            continue
        table = f"{TABLE_OF_STAGE[entry.stage]}[{entry.block}]"
        # Tables that give their serve different GPUs (Envs) whose children pin none share none.
        slots = sum(c.concurrent for c in kids)
        pinned = any(c.gpu is not None or "CUDA_VISIBLE_DEVICES" in c.envs for c in kids)
        gpus = None if pinned else entry.envs.get("CUDA_VISIBLE_DEVICES")
        first = served.setdefault((entry.stage, os.path.realpath(ours.source), gpus), table)
        if first != table:
            # damocles-manager starts a processor per table: each serve starts every child.
            warnings.append(
                f"{where} runs `{command}` on the config {first} serves too ({ours.source}):"
                f" damocles-manager starts a processor for each table, so the children of that"
                f" config ({slots} {entry.stage} slots) start once per table, on the same GPUs,"
                " and neither serve's Locks, GPU lock or queue sees the other's proofs; keep one"
                f" table and set its Concurrent to {slots} (or more)"
            )
        if entry.concurrent < slots:
            warnings.append(
                _idle_slots(where, entry.concurrent, slots, entry.stage,
                            f"the config its `damocles-ext serve {entry.stage}` reads"
                            f" ({ours.source})")
            )  # fmt: skip
    return findings


def _check_token_file(path: str, runs: str, found: EntryFindings) -> None:
    """What serve will find at its --token-file `path`, as serve reads it (an error where it
    will exit 2); never waits on it (a FIFO, a device) and reads at most its first line."""
    import errno

    from damocles_ext.commands.common import TokenFileError, regular_token_file

    if path and not os.path.isabs(path):
        # damocles-manager starts serve in its own working directory (Go's exec.Command, no Dir),
        # which nothing here tells: looking in check-config's would say the wrong thing.
        found.warnings.append(
            f"{runs}, whose --token-file {path!r} is a relative path: serve reads it from"
            " damocles-manager's working directory, which check-config cannot know, so it was"
            " not looked for (not in check-config's own either); write it absolute"
        )
        return
    try:
        regular_token_file(path, wait_for_lease=False)  # serve's own reading, never waiting
    except TokenFileError as e:
        if e.errno == errno.EACCES:  # not for this user: serve, as damocles-manager's, may read it
            found.notes.append(f"{runs}: {_closed_to_you(path, 'its token file', _TOKEN_UNSEEN)}")
        elif e.errno != errno.EAGAIN:  # (EAGAIN: a lease holds it now; serve waits for it)
            found.errors.append(f"{runs}, which will exit 2: {e}")


_TOKEN_UNSEEN = "whether it holds a token"


def _closed_to_you(path: str, what: str, unseen: str) -> str:
    """Why this user cannot read `path` (EACCES), `what` it is, and that serve's user is the one
    to ask; `unseen`: what was therefore not seen of it."""
    import stat

    you = f"you (uid {os.geteuid()})"
    try:
        st = os.stat(path)
    except OSError:
        closed = f"cannot be looked at by {you}: a directory on its path is closed to you"
    else:
        mode = stat.S_IMODE(st.st_mode)
        closed = f"cannot be read by {you}: it is uid {st.st_uid}'s, mode {mode:04o}"
    return (
        f"{what} {path!r} {closed}; serve runs as damocles-manager's user, so check that user can"
        f" read it ({unseen} was not seen here)"
    )


def _port_taken(address: tuple[str, int], taken: list[tuple[str, int, str]]) -> str | None:
    """The table of `taken` whose listening address collides with `address` (the same port on
    the same host, or either host a wildcard that takes every address), or None."""
    host, port = address
    for other_host, other_port, table in taken:
        if port != 0 and port == other_port and _hosts_collide(host, other_host):
            return table
    return None


def _hosts_collide(a: str, b: str) -> bool:
    """Whether listening on one port at hosts `a` and `b` collides, as Linux binds: the same
    address (a name as it resolves, an IPv4-mapped IPv6 address as its IPv4 one), or a
    wildcard of the other's family (0.0.0.0 takes IPv4 addresses, :: every one). A name that
    does not resolve collides with a wildcard and with itself."""
    import ipaddress
    import socket

    def parsed(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            try:  # a name: as serve binds it
                info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
                ip = ipaddress.ip_address(str(info[0][4][0]).split("%", 1)[0])
            except (OSError, ValueError, IndexError):
                return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip

    x, y = parsed(a), parsed(b)
    if x is None or y is None:
        known = x if y is None else y
        return a.lower() == b.lower() or (known is not None and known.is_unspecified)
    if x == y:
        return True
    return any(
        w.is_unspecified and (w.version == 6 or other.version == 4) for w, other in ((x, y), (y, x))
    )


def _serve_jobs_problem(
    parsed: argparse.Namespace, relative: bool, warned: list[str]
) -> tuple[str, str | None] | None:
    """Why `damocles-ext serve --jobs` with these arguments exits 2 before its ready line, as far
    as this machine tells: a stage other than window_post, a --jobs URL it refuses
    (_jobs_url_problem), or its --conf-dir's sector-manager.cfg (and --store) that it cannot use
    (`relative`: its --conf-dir is, said with it); None when none. With it, the file this user
    may not read when that alone is the reason (damocles-manager's user may), else None. What
    serve warns of as it reads them (no sector-manager.cfg: damocles' defaults) goes to
    `warned`."""
    from damocles_ext.jobs.manager_config import ManagerConfigError, read_settings

    if parsed.stage != "window_post":
        from damocles_ext.frontends.producer import WINNING_REFUSED

        return f"serve {parsed.stage} --jobs: {WINNING_REFUSED}", None
    if (problem := _jobs_url_problem(parsed.jobs)) is not None:
        return f"serve --jobs: {problem}", None
    try:
        settings = read_settings(parsed.conf_dir, parsed.store or ())
    except ManagerConfigError as exc:
        return f"{exc}" + (_RELATIVE_CONF_DIR if relative else ""), exc.denied
    warned.extend(w + (_RELATIVE_CONF_DIR if relative else "") for w in settings.warnings)
    return None


def _jobs_url_problem(text: str) -> str | None:
    """What serve says of a --jobs URL before it connects (a scheme it does not take, a
    parameter PostgreSQL has not, no file named), or of a SQLite file whose directory is not
    there (serve makes the store in it); None when neither."""
    from damocles_ext.jobs.database import (
        StoreConfigError,
        is_dir,
        parse_url,
        sqlite_file,
        sqlite_uri,
    )

    try:
        url = parse_url(text)
    except StoreConfigError as exc:
        return str(exc)
    # A relative path is damocles-manager's directory's, not ours; a file: URI's, percent-coded.
    if url.get_backend_name() == "sqlite" and not sqlite_uri(url):
        parent = sqlite_file(url).parent
        # (None: a directory on the way this user may not enter, which serve's may)
        if parent.is_absolute() and is_dir(parent) is False:
            return f"the job store's directory {str(parent)!r} does not exist: create it"
    return None


_RELATIVE_CONF_DIR = (
    " (a relative --conf-dir is read from the directory damocles-manager runs in;"
    " check-config read it from the current directory)"
)


def _idle_slots(where: str, concurrent: int, slots: int, stage: str, supervisor: str) -> str:
    default = " (damocles' default)" if concurrent == 1 else ""
    return (
        f"{where} has Concurrent = {concurrent}{default}, but {supervisor} supervises {slots}"
        f" {stage} slots: damocles-manager sends it at most {concurrent} request(s) at once, so"
        f" {slots - concurrent} slot(s) stay idle; set Concurrent = {slots} (or more) in that"
        f" table"
    )


def _running_slots(socket: str | None, stage: str) -> tuple[str, int | str] | None:
    """(socket path, request slots of `stage` of the `run` answering at `socket`, or why
    `serve <stage> --connect` exits 2 at its start there, in its own words); None when nothing
    (of ours, of a schema we read) answers there."""
    import trio

    from damocles_ext.errors import DextError
    from damocles_ext.frontends.control_socket import default_socket_path
    from damocles_ext.frontends.forwarder import status_and_problem
    from damocles_ext.stages import child_stages
    from damocles_ext.status import StatusError

    path = socket if socket is not None else str(default_socket_path())
    stages = child_stages(stage)

    async def ask() -> int | str | None:
        from damocles_ext.client import connect

        with trio.fail_after(5):
            async with connect(path) as client:
                doc, problem = await status_and_problem(client, stage, warn=False)
        if problem is not None:
            return problem
        return None if doc is None else sum(c.capacity for c in doc.children if c.stage in stages)

    try:
        found = trio.run(ask)
    except (DextError, StatusError, OSError, trio.TooSlowError):
        return None  # nothing (of ours, of a schema we read) answers there: nothing to compare
    return None if found is None else (path, found)
