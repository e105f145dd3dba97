"""Logging for the commands: one format, a level and a format from flags or the environment, and
what to do with a child's output that cannot be decoded.

Every command logs to stderr only (in `serve`, stdout carries the protocol). Text lines look like

    2026-01-31 12:00:00,123 INFO damocles_ext.supervisor: window_post#0: started pid 4242: ...

and `--log-format json` (or `DAMOCLES_EXT_LOG_FORMAT=json`) writes one JSON object a line with
`time`, `level`, `logger`, `message`, and the record's extra fields: a child's stderr lines carry
`child`, `stage`, `index` and `pid`, so they can be filtered without parsing the message.

Undecodable output of a child (a bad JSON line, a broken dext frame, a wrong ready message) is
logged with the child's name and pid, truncated to 100 bytes; with `--dump-dir DIR`
(`DAMOCLES_EXT_DUMP_DIR`), or vc-processors' `DUMP_ERR_RESP_<pid>` naming a directory for that
child pid, the whole of it is written to `DIR/dext-bad-output-<child pid>-<our pid>-<n>.bin`
instead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import UsageError
from .trusted_path import UntrustedPathError, make_trusted_dirs

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
LEVEL_ENV = "DAMOCLES_EXT_LOG_LEVEL"
FORMAT_ENV = "DAMOCLES_EXT_LOG_FORMAT"
DUMP_DIR_ENV = "DAMOCLES_EXT_DUMP_DIR"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PREVIEW_BYTES = 100  # as vc-processors truncates an unparsable response in its log
#: A message whose logged form (escaped, in UTF-8) is longer than this many bytes is logged cut
#: (a child's error answer may be megabytes; it still goes whole to the caller): journald
#: splits a line past its LineMax (48 KiB), Loki refuses one past its max_line_size (256 KiB)
#: by default. A child's stderr line is cut into pieces of 8 KiB before it gets here.
MESSAGE_LIMIT = 16384

# Attributes every LogRecord has; anything else on a record came through `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}

log = logging.getLogger("damocles_ext.supervisor")

# What a log line never carries raw, since much of what is logged comes from children (their
# stderr lines, their error answers): line breaks (a child's "\n" would start a record of its
# own, in our format), the controls that move a terminal's cursor or start an escape sequence
# (a "\r" or an ANSI sequence would overwrite the line's own start with a forged one), DEL, the
# C1 controls, the Unicode line and paragraph separators, and lone surrogates (undecodable
# bytes of a file name). Tabs stay.
_CONTROL_CLASS = "\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029"
_UNSAFE = re.compile(f"[{_CONTROL_CLASS}\ud800-\udfff]")
# The same, less what json.dumps escapes itself: what is left could break a line for a reader
# splitting on Unicode line boundaries, or reach a terminal raw.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# The same, less the lone surrogates: what the CLI's text output escapes (controls_escaped).
_CONTROLS = re.compile(f"[{_CONTROL_CLASS}]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def capped(text: str, shown: Callable[[str], str], limit: int = MESSAGE_LIMIT) -> str:
    """`text`, or as much of its start as `shown` (how it is written: escaped) makes at most
    `limit` bytes of UTF-8, and how many more characters were cut. Measured after the escaping:
    a character is written as at most six bytes (a control escaped as \\u2028)."""
    if len(text) <= limit // 6 or len(shown(text).encode()) <= limit:  # (the common case)
        return text
    # The most kept so far, and the least found too long (a character is a byte at least).
    keep, over = 0, min(len(text), limit + 1)
    while over - keep > 1:
        mid = (keep + over) // 2
        if len(shown(text[:mid]).encode()) <= limit:
            keep = mid
        else:
            over = mid
    return f"{text[:keep]}... ({len(text) - keep} more characters not logged)"


def _json_shown(text: str) -> str:
    return _JSON_UNSAFE.sub(
        lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False)
    )


def one_line(text: str) -> str:
    """`text` with its line breaks and control characters escaped (\\n, \\r, \\x1b, \\u2028)."""
    return _UNSAFE.sub(_escaped, text)


def controls_escaped(text: str) -> str:
    """As one_line, but a path's bytes that are not UTF-8 (os.fsdecode's lone surrogates) left
    for stdout to write as those bytes (the CLI's text output, cli._guard_stdio)."""
    return _CONTROLS.sub(_escaped, text)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, each record's line kept to one line whatever its message holds (a traceback
    still follows it on lines of its own), and to MESSAGE_LIMIT characters or so."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The record's line, its message escaped by one_line() and capped()."""
        return one_line(capped(super().formatMessage(record), one_line))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message (capped()),
    extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        doc: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": capped(record.getMessage(), _json_shown),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = (
                    value if isinstance(value, str | int | float | bool | None) else str(value)
                )
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return _JSON_UNSAFE.sub(
            lambda m: f"\\u{ord(m.group()):04x}", json.dumps(doc, ensure_ascii=False)
        )


def add_logging_args(parser: argparse.ArgumentParser, default_level: str) -> None:
    """--log-level and --log-format (their defaults come from the environment, then the command)."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help=f"how much to log on stderr (default: ${LEVEL_ENV}, else {default_level})",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help=f"text lines or JSON lines on stderr (default: ${FORMAT_ENV}, else text)",
    )
    parser.set_defaults(_default_log_level=default_level)


def add_dump_arg(parser: argparse.ArgumentParser) -> None:
    """--dump-dir DIR."""
    parser.add_argument(
        "--dump-dir",
        metavar="DIR",
        default=None,
        help="write a child's undecodable output whole to files in DIR (created if missing)"
        f" instead of logging its first {PREVIEW_BYTES} bytes (default: ${DUMP_DIR_ENV})",
    )


def _from_env(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    if value.lower() not in choices:
        raise UsageError(f"{name}={value!r} is not one of {', '.join(choices)}; fix or unset it")
    return value.lower()


def resolve(
    level: str | None,
    fmt: str | None,
    default_level: str = "info",
    env: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """(level, format): the flag, else the environment variable, else the default."""
    env = os.environ if env is None else env
    level = level or _from_env(env, LEVEL_ENV, LOG_LEVELS) or default_level
    fmt = fmt or _from_env(env, FORMAT_ENV, LOG_FORMATS) or "text"
    return level, fmt


def setup_logging(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Send every log record to stderr (or `stream`) in one format, from `level` up."""
    if fmt not in LOG_FORMATS:
        raise UsageError(f"unknown log format {fmt!r}; use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def json_logging() -> bool:
    """Whether setup_logging() last sent the records to JSON lines."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def setup_from_args(args: argparse.Namespace) -> None:
    """setup_logging() as the command's flags and the environment say; --dump-dir too."""
    level, fmt = resolve(
        getattr(args, "log_level", None),
        getattr(args, "log_format", None),
        getattr(args, "_default_log_level", "info"),
    )
    setup_logging(level, fmt)
    if hasattr(args, "dump_dir"):
        if args.dump_dir:
            set_dump_dir(args.dump_dir)
        else:
            set_dump_dir(os.environ.get(DUMP_DIR_ENV) or None, given_by=DUMP_DIR_ENV)


# -- undecodable child output -----------------------------------------------------------------

_dump_dir: Path | None = None
_dump_seq = itertools.count(1)


def set_dump_dir(directory: str | os.PathLike[str] | None, *, given_by: str = "--dump-dir") -> None:
    """Where report_bad_output() writes dumps (None: log a preview only); created 0700 if missing.
    `given_by` names where the directory came from (the option, or DUMP_DIR_ENV) in errors.

    Raises UsageError when the directory cannot be used, so a command can fail before it starts.
    """
    global _dump_dir
    if directory is None:
        _dump_dir = None
        return
    path = Path(directory).absolute()
    where = f"{given_by} {directory}" if given_by.startswith("-") else f"{given_by}={directory}"
    fix = "choose another directory" if given_by.startswith("-") else "fix or unset it"
    try:
        # A directory of another user's on the way (their symlink or directory at the name in
        # /tmp, say) would send the dumps wherever they choose, into a directory of ours too:
        # checked before anything is made through it.
        make_trusted_dirs(path)
    except UntrustedPathError as exc:
        raise UsageError(
            f"{where}: {exc}, so the dumps could be sent elsewhere; {fix} (one only you or root"
            " can change)"
        ) from None
    except NotADirectoryError as exc:
        what = "exists" if exc.filename == str(path) else f"{exc.filename}, on its way, exists"
        raise UsageError(f"{where}: {what} and is not a directory; {fix}") from None
    except OSError as exc:
        part = f"{exc.filename}: " if exc.filename else ""
        raise UsageError(
            f"{where}: cannot create or check it: {part}{exc.strerror or exc}; {fix}"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{where}: not writable by us; {fix}")
    _dump_dir = path


def dump_dir_for(pid: int | None) -> Path | None:
    """The dump directory for a child: --dump-dir, else vc-processors' DUMP_ERR_RESP_<pid>."""
    if _dump_dir is not None:
        return _dump_dir
    if pid is not None:
        named = os.environ.get(f"DUMP_ERR_RESP_{pid}")
        if named:
            return Path(named)
    return None


def truncate(data: bytes, limit: int = PREVIEW_BYTES) -> str:
    """The first `limit` bytes as readable text ('...' when cut): what the log shows."""
    text = data[:limit].decode("utf-8", "backslashreplace")
    return repr(text + ("..." if len(data) > limit else ""))


def report_bad_output(
    child: str,
    pid: int | None,
    data: bytes,
    what: str,
    logger: logging.Logger = log,
    level: int = logging.ERROR,
) -> Path | None:
    """Log a child's undecodable output (truncated), or dump it whole; returns the dump's path."""
    fields = {"child": child, "pid": pid, "bytes": len(data)}
    directory = dump_dir_for(pid)
    if directory is not None and data:
        path = directory / f"dext-bad-output-{pid}-{os.getpid()}-{next(_dump_seq)}.bin"
        made = False
        try:
            # Checked again (dumps are rare): it may have gone since (a tmpfiles cleanup), and
            # another user put their own directory, or their symlink, at its name.
            make_trusted_dirs(directory)
            # Exclusive create: never follow a symlink someone planted under our name. A name
            # taken already (the same pids in an earlier run: a container's pids repeat, the
            # directory stays) is passed over for the next one.
            for _ in range(1000):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    break
                except FileExistsError:
                    path = path.with_name(
                        f"dext-bad-output-{pid}-{os.getpid()}-{next(_dump_seq)}.bin"
                    )
            else:
                raise FileExistsError(errno.EEXIST, "1,000 names in a row taken", str(path))
            made = True
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        except (OSError, UntrustedPathError) as exc:
            if made:  # a full disk: what was written would pass for the whole output
                with contextlib.suppress(OSError):
                    path.unlink()
            logger.log(
                level,
                "%s (pid %s): %s; %d bytes not dumped to %s (%s): %s",
                child,
                pid,
                what,
                len(data),
                directory,
                exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
                truncate(data),
                extra=fields,
            )
            return None
        logger.log(
            level,
            "%s (pid %s): %s; its %d bytes were dumped to %s",
            child,
            pid,
            what,
            len(data),
            path,
            extra={**fields, "dump": str(path)},
        )
        return path
    logger.log(
        level,
        "%s (pid %s): %s; it wrote %d bytes: %s",
        child,
        pid,
        what,
        len(data),
        truncate(data),
        extra=fields,
    )
    return None
