"""What worker-prover mode takes from damocles-manager's own `sector-manager.cfg`.

damocles-manager reads its config files from `--conf-dir DIR` (a source node and a proxy node
share one such directory); reading the same file here keeps one place for two facts:

- `[[Common.PersistStores]]`: the stores, `Name` and `Path`. A store without `Name` is named by
  its `Path` as written (damocles' `GetPersistStores`); one with neither, the template that
  `damocles-manager daemon init` writes, is skipped with a warning. `Common.ScanPersistStores`
  adds each directory its glob patterns match that holds a sectorstore.json, named by its
  `Name`, else its `ID`, else its path, as damocles-manager scans them at start. Jobs name
  stores, not paths, so a producer maps the paths damocles-manager sends to these names, and a
  coordinator answers `Venus.StoreBasicInfo` for them.
- `[Common.Proving.WorkerProver]`: `JobMaxTry`, `HeartbeatTimeout`, `JobLifetime`, with
  damocles' defaults (2, "15s", "25h0m0s"). damocles declares the two durations as Go's
  `time.Duration`, which its TOML reader takes as a Go duration string; a bare number would be
  nanoseconds there, which is never what was meant, so it is refused here.

The rest of the file is damocles-manager's business and is not looked at. Keys are matched
whatever their case, as damocles' TOML reader (BurntSushi's) matches them (`jobmaxtry` is
`JobMaxTry`). Unknown keys inside the two tables are warned about (a misspelt `JobMaxTries` must
not be dropped silently).
"""

from __future__ import annotations

import datetime
import errno
import glob
import json
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..config.load import read_config_text, strip_bom
from ..config.messages import _show
from ..config.spec import ClosedOnTheWay, ConfigError
from ..errors import UsageError
from .paths import StoreMap, merge_stores
from .rules import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_JOB_LIFETIME,
    DEFAULT_JOB_MAX_TRY,
    MAX_JOB_MAX_TRY,
    JobLimits,
)
from .worker_settings import DEFAULT_HEARTBEAT_INTERVAL as WORKER_HEARTBEAT_EVERY

MANAGER_CONF_FILE: Final = "sector-manager.cfg"
SECTORSTORE_JSON: Final = "sectorstore.json"  # what Common.ScanPersistStores looks for
#: damocles' own config files are small; a device or a runaway file must not fill the memory.
MAX_MANAGER_CONF_BYTES: Final = 16 * 1024 * 1024

# The keys damocles-manager knows in each table (objstore.Config, StoreSelectPolicy, the plugin
# names; WorkerProverConfig).
PERSIST_STORE_KEYS: Final = frozenset(
    {"Name", "Path", "Meta", "Strict", "ReadOnly", "Weight", "AllowMiners", "DenyMiners",
     "Plugin", "PluginName"}
)  # fmt: skip
WORKER_PROVER_KEYS: Final = frozenset({"JobMaxTry", "HeartbeatTimeout", "JobLifetime"})

_WORKER_PROVER = "[Common.Proving.WorkerProver]"


class ManagerConfigError(UsageError):
    """sector-manager.cfg cannot be used as it is: exit code 2; the message names file and key.
    `denied`: the file this user may not read (or reach: a directory on its way is closed), which
    another user, damocles-manager's, may; None when that is not why."""

    def __init__(self, message: str, *, denied: str | None = None) -> None:
        super().__init__(message)
        self.denied = denied

    @classmethod
    def unread(cls, exc: ConfigError, path: str, message: str | None = None) -> ManagerConfigError:
        """`path` could not be read (`exc`): its message, or `message`, denied if it was."""
        return cls(str(exc) if message is None else message, denied=path if exc.denied else None)


@dataclass(frozen=True, slots=True)
class ManagerConfig:
    """What was read: the stores (name -> path, in file order), the limits, and warnings."""

    source: str
    stores: dict[str, str] = field(default_factory=dict)
    limits: JobLimits = field(default_factory=JobLimits)
    #: The limits the file set, by damocles' key name (for messages: "JobMaxTry from ...").
    given: frozenset[str] = frozenset()
    warnings: tuple[str, ...] = ()


# --- Go durations -------------------------------------------------------------------------------

# Go's time.ParseDuration units, in nanoseconds ("µs" and "μs" are the micro sign and mu).
_GO_UNITS: Final = {
    "ns": 1, "us": 10**3, "\u00b5s": 10**3, "\u03bcs": 10**3, "ms": 10**6, "s": 10**9,
    "m": 60 * 10**9, "h": 3600 * 10**9,
}  # fmt: skip
#: The longest Go duration: an int64 of nanoseconds (a negative one goes one further).
_GO_MAX_NANOS: Final = 2**63 - 1
# A number and what Go takes as its unit: everything up to the next digit or ".".
_GO_UNIT_WRITTEN = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)([^0-9.]*)")


def parse_go_duration(text: str) -> float:
    """Seconds from a Go duration string ("15s", "25h0m0s", "1.5h", "300ms"), as Go's
    time.ParseDuration reads it; ValueError saying what is wrong."""
    body = text
    sign = 1
    if body[:1] in ("+", "-"):
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f'{text!r} is not a Go duration (e.g. "15s", "25h0m0s")')
    nanos = 0
    pos = 0
    while pos < len(body):
        # A number, then its unit: everything up to the next digit or ".", as Go reads it
        # ("1hr" has the unit "hr", not "h" and then "r").
        match = _GO_UNIT_WRITTEN.match(body, pos)
        if match is None or not match.group(1):
            raise ValueError(
                f"{text!r} is not a Go duration: each number needs a unit (ns, us, ms, s, m, h),"
                ' e.g. "15s" or "25h0m0s"'
            )
        unit = match.group(1)
        if unit not in _GO_UNITS:  # as Go says it: unknown unit "d"
            day = '; write "24h" for a day' if unit.lower() in ("d", "day", "days") else ""
            raise ValueError(
                f"{text!r} is not a Go duration: unknown unit {unit!r} (Go's units: ns, us, ms,"
                f' s, m, h{day}), e.g. "15s" or "25h0m0s"'
            )
        nanos += _go_nanos(match.group(0)[: -len(unit)], _GO_UNITS[unit])
        pos = match.end()
    if nanos > _GO_MAX_NANOS + (sign < 0):
        # Go's time.ParseDuration refuses what an int64 of nanoseconds cannot hold.
        raise ValueError(
            f"{text!r} is longer than a Go duration can be (at most 2562047h47m16s, about 292"
            " years), which damocles-manager refuses too"
        )
    return sign * nanos / 10**9  # exact nanoseconds, rounded once


def _go_nanos(number: str, unit: int) -> int:
    """The nanoseconds of `number` (digits, with a "." or not) of `unit` nanoseconds, as Go's
    time.ParseDuration counts them: the whole part exactly, the fraction's digits while they fit
    in an int64 (the rest ignored), scaled through a float64 and truncated, as Go does."""
    whole, _, fraction = number.partition(".")
    if len(whole.lstrip("0")) > 19:  # past any int64 (and Python's limit of digits to read)
        return 2**64
    digits, scale = 0, 1.0
    for digit in fraction:
        if digits > _GO_MAX_NANOS // 10 or digits * 10 + int(digit) > 2**63:
            break  # Go skips every later digit once one overflows
        digits, scale = digits * 10 + int(digit), scale * 10
    return int(whole.lstrip("0") or "0") * unit + (
        int(float(digits) * (unit / scale)) if digits else 0
    )


# --- the file -----------------------------------------------------------------------------------


def load_manager_conf_dir(directory: str | os.PathLike[str]) -> ManagerConfig | None:
    """DIR/sector-manager.cfg read, or None when DIR has no such file (DIR itself must exist).
    The file is opened once, not looked at first: one deleted meanwhile is none, not an error."""
    source = os.fspath(Path(directory) / MANAGER_CONF_FILE)
    what = denied = None
    closed = "permission denied (check the mode and owner of it and of the directories above)"
    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            what = "is not a directory"
        else:
            text = read_config_text(source, MANAGER_CONF_FILE, limit=MAX_MANAGER_CONF_BYTES)
    except ConfigError as exc:
        if exc.errno == errno.ENOENT:  # (DIR was there just now)
            return None
        if not isinstance(exc, ClosedOnTheWay):
            raise ManagerConfigError.unread(exc, source) from None
        what, denied = closed, source  # DIR itself, not the file: this user may not enter it
    except FileNotFoundError:
        what = "does not exist"
    except PermissionError:  # a directory above DIR this user may not enter
        what, denied = closed, source
    except OSError as exc:
        what = exc.strerror or str(exc)
    if what is not None:
        raise ManagerConfigError(
            f"--conf-dir {os.fspath(directory)}: {what}; give damocles-manager's config"
            " directory (the one its --conf-dir names, or its home)",
            denied=denied,
        )
    return parse_manager_config(text, source)


def load_manager_config(path: str | os.PathLike[str]) -> ManagerConfig:
    """sector-manager.cfg read and checked; raises ManagerConfigError."""
    source = os.fspath(path)
    try:
        text = read_config_text(source, MANAGER_CONF_FILE, limit=MAX_MANAGER_CONF_BYTES)
    except ConfigError as exc:
        raise ManagerConfigError.unread(exc, source) from None
    return parse_manager_config(text, source)


def parse_manager_config(text: str, source: str) -> ManagerConfig:
    """The stores and limits in sector-manager.cfg text; `source` names it in messages."""
    try:
        doc = tomllib.loads(strip_bom(text))
    except tomllib.TOMLDecodeError as exc:
        raise ManagerConfigError(f"{source}: not valid TOML: {exc}") from None
    except (RecursionError, ValueError) as exc:
        raise ManagerConfigError(f"{source}: cannot be read as TOML: {exc}") from None
    warnings: list[str] = []
    doc = _folded(doc, ("Common",), source)
    common = _table(doc.get("Common", {}), source, "[Common]")
    common = _folded(
        common, ("PersistStores", "ScanPersistStores", "Proving"), f"{source}: [Common]"
    )
    stores = _stores(common.get("PersistStores", []), source, warnings)
    _scanned(common.get("ScanPersistStores", []), source, stores, warnings)
    proving = _table(common.get("Proving", {}), source, "[Common.Proving]")
    proving = _folded(proving, ("WorkerProver",), f"{source}: [Common.Proving]")
    limits, given = _limits(proving.get("WorkerProver", {}), source, warnings)
    return ManagerConfig(source, stores, limits, given, tuple(warnings))


def _folded(table: Mapping[str, Any], names: Iterable[str], where: str) -> dict[str, Any]:
    """`table` with its keys among `names` but for their case spelt as those names: damocles'
    TOML reader (BurntSushi's) matches a key to a field whatever its case. Two spellings of one
    table are one table, as that reader fills one field from both; a value given twice is an
    error (damocles would keep either)."""
    canonical = {name.lower(): name for name in names}
    folded: dict[str, Any] = {}
    spelt: dict[str, str] = {}
    for key, value in table.items():
        name = key if key in canonical.values() else canonical.get(key.lower(), key)
        if name not in folded:
            folded[name], spelt[name] = value, key
        elif isinstance(folded[name], dict) and isinstance(value, dict):
            folded[name] = _merged(folded[name], value, f"{where}: [{name}]")
        else:
            raise ManagerConfigError(
                f"{where}: '{name}' written twice, as '{spelt[name]}' and '{key}' (key names do"
                " not depend on case, as damocles reads them): keep one"
            )
    return folded


def _merged(first: dict[str, Any], second: dict[str, Any], where: str) -> dict[str, Any]:
    """One table written twice (in two cases): its keys from both, their tables merged too."""
    merged = dict(first)
    for key, value in second.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = _merged(merged[key], value, f"{where}.{key}")
        else:
            raise ManagerConfigError(
                f"{where}: '{key}' written twice (in two spellings of the table): keep one"
            )
    return merged


def _table(value: Any, source: str, name: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ManagerConfigError(f"{source}: {name} must be a table, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, datetime.date | datetime.time):  # TOML's dates and times
        return "a date or time"
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean",
            list: "an array", dict: "a table", _Pairs: "an object"}.get(type(value),
                                                                       type(value).__name__)  # fmt: skip


def _stores(entries: Any, source: str, warnings: list[str]) -> dict[str, str]:
    if not isinstance(entries, list):
        raise ManagerConfigError(
            f"{source}: Common.PersistStores must be an array of tables ([[Common.PersistStores]]),"
            f" not {_kind(entries)}"
        )
    stores: dict[str, str] = {}
    template = False  # an entry with no Path and no Name was skipped
    for i, raw in enumerate(entries):
        where = f"{source}: [[Common.PersistStores]] #{i + 1}"
        if not isinstance(raw, dict):
            raise ManagerConfigError(f"{where} must be a table, not {_kind(raw)}")
        entry = _folded(raw, PERSIST_STORE_KEYS, where)
        for key in sorted(set(entry) - PERSIST_STORE_KEYS):
            warnings.append(f"{where}: unknown key {key!r} ignored (damocles knows "
                            f"{', '.join(sorted(PERSIST_STORE_KEYS))})")  # fmt: skip
        _check_store_types(entry, where)
        path = entry.get("Path")
        if path in (None, "") and entry.get("Name") in (None, ""):
            # `damocles-manager daemon init` writes one such entry (its keys commented out);
            # damocles-manager opens its own working directory as that store (or its plugin's).
            if template:  # both named "" by damocles' GetPersistStores
                raise ManagerConfigError(
                    f"{where}: a second entry with no Path and no Name: a duplicate persist store"
                    " name '' (damocles-manager refuses it too); remove it, or give it Path"
                )
            template = True
            opened = (
                "a store of its plugin, which damocles-ext cannot read"
                if entry.get("PluginName")
                else "its own working directory as that store, which damocles-ext cannot know"
            )
            warnings.append(
                f"{where} has no Path and no Name (the template `damocles-manager daemon init`"
                f" writes, its keys commented out): damocles-manager opens {opened}, so it is"
                " skipped; remove that entry, or give it Path"
            )
            continue
        if not isinstance(path, str) or not path.strip():
            raise ManagerConfigError(
                f"{where}: Path must be the store's directory (a non-empty string), not"
                f" {_kind(path) if path is not None else 'missing'}"
            )
        if not os.path.isabs(path):
            # damocles-manager makes it absolute from its own working directory, unknown here.
            try:
                here = f" ({os.getcwd()})"
            except OSError:  # this process's own working directory was removed
                here = ""
            warnings.append(
                f"{where}: Path {path!r} is relative: damocles-manager reads it from its own"
                f" working directory, and damocles-ext from this one{here}, which may be another"
                " place; write it absolute"
            )
        name = entry.get("Name", "")
        if not isinstance(name, str):
            raise ManagerConfigError(f"{where}: Name must be a string, not {_kind(name)}")
        # damocles' GetPersistStores: a store without a name is named by its path as written.
        name = name or path
        if name in stores:
            raise ManagerConfigError(
                f"{where}: duplicate persist store name {name!r} (damocles-manager refuses it"
                " too); give each store its own Name"
            )
        stores[name] = path
    return stores


def _is_u64(value: Any) -> bool:
    # BurntSushi's toml takes any int64 into a uint or uint64 (a negative one wraps): so do we.
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


# The types damocles' store config gives its keys (objstore.Config, StoreSelectPolicy), as
# (check, what to write): a value of another type makes damocles-manager refuse the file.
_STORE_KEY_TYPES: Final = {
    "Strict": (lambda v: isinstance(v, bool), "true or false"),
    "ReadOnly": (lambda v: isinstance(v, bool), "true or false"),
    "Weight": (_is_u64, "a whole number"),
    "Meta": (
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        'a table of strings, e.g. { Key = "value" }',
    ),
    "AllowMiners": (
        lambda v: isinstance(v, list) and all(_is_u64(x) for x in v),
        "a list of miner actor ids, e.g. [1000, 1001]",
    ),
    "DenyMiners": (
        lambda v: isinstance(v, list) and all(_is_u64(x) for x in v),
        "a list of miner actor ids, e.g. [1000, 1001]",
    ),
    "Plugin": (lambda v: isinstance(v, str), "a string"),
    "PluginName": (lambda v: isinstance(v, str), "a string"),
}


def _check_store_types(entry: Mapping[str, Any], where: str) -> None:
    """A store key damocles-manager knows, of a type it cannot read, is an error: damocles-manager
    refuses the whole file (ReadOnly = "yes"), so it is no config it runs with."""
    for key, (fits, expected) in _STORE_KEY_TYPES.items():
        if key in entry and not fits(entry[key]):
            raise ManagerConfigError(
                f"{where}: {key} must be {expected}, not {_show(entry[key])}; damocles-manager"
                " refuses this file too"
            )


def _scanned(patterns: Any, source: str, stores: dict[str, str], warnings: list[str]) -> None:
    """Add to `stores` the ones `Common.ScanPersistStores` finds, as damocles-manager's
    ScanPersistStores does at start: each directory a glob pattern matches that holds a
    sectorstore.json is a store named by its Name, else its ID, else its path."""
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ManagerConfigError(
            f"{source}: Common.ScanPersistStores must be a list of glob patterns, e.g."
            f' ["/mnt/*/store"], not {_kind(patterns)}'
        )
    for i, pattern in enumerate(patterns):
        where = f"{source}: Common.ScanPersistStores[{i}] {pattern!r}"
        if "\0" in pattern:  # (glob raised ValueError for it: a traceback)
            raise ManagerConfigError(
                f"{where} holds a NUL character, which no path can hold; write the pattern of the"
                " store directories as it is"
            )
        if pattern and not os.path.isabs(pattern):
            warnings.append(
                f"{where} is relative: damocles-manager matches it from its own working"
                " directory, and damocles-ext from this one, which may be another place; write"
                " it absolute"
            )
        # Go's filepath.Glob: "*" also matches a name starting with "." and "**" is "*"; its
        # negated class is [^...], Python's [!...].
        found = 0
        for path in sorted(glob.glob(pattern.replace("[^", "[!"), include_hidden=True)):
            name = _sector_store_name(os.path.join(path, SECTORSTORE_JSON), where)
            if name is None:
                continue
            found += 1
            name = name or path  # GetPersistStores: no name, named by its path
            if name in stores:
                raise ManagerConfigError(
                    f"{where}: found {path!r}, named {name!r} like the store at"
                    f" {stores[name]!r}: a duplicate persist store name (damocles-manager refuses"
                    " it too); give each store its own Name"
                )
            stores[name] = path
        if not found:
            # Its stores are not known here: each job naming one fails ("store not known").
            warnings.append(
                f"{where} finds no directory with a {SECTORSTORE_JSON} on this machine (are its"
                " stores mounted here?)"
            )


class _Pairs(list[tuple[str, Any]]):
    """A JSON object's key and value pairs, in file order."""


def _sector_store_name(meta_path: str, where: str) -> str | None:
    """The Name (else ID, else "") in a store's sectorstore.json, read as Go's encoding/json
    fills damocles' struct (keys whatever their case, the last one written wins); None when
    there is no such file, as damocles skips the directory. The file is opened once, not looked
    at first: one deleted meanwhile is none, not an error."""
    try:
        text = read_config_text(meta_path, SECTORSTORE_JSON, what="the store's sectorstore.json")
        # Key and value pairs in file order: a key given twice, whatever its case, is the last.
        meta = json.loads(text, object_pairs_hook=_Pairs)
    except ConfigError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        # Denied to this user: damocles-manager's may read it. Another error of the open or the
        # read: damocles-manager meets it too.
        cannot = exc.errno is not None and not exc.denied
        also = " (damocles-manager cannot either, and refuses to start)" if cannot else ""
        raise ManagerConfigError.unread(exc, meta_path, f"{where}: {exc}{also}") from None
    except (ValueError, RecursionError) as exc:
        raise ManagerConfigError(
            f"{where}: {meta_path} is not JSON ({exc}); damocles-manager refuses it too: fix or"
            " remove it"
        ) from None
    if meta is None:  # Go's json.Unmarshal of null leaves the struct empty: named by its path
        return ""
    if not isinstance(meta, _Pairs):
        raise ManagerConfigError(f"{where}: {meta_path} is not a JSON object; fix or remove it")
    found = {"name": "", "id": ""}
    for key, value in meta:
        if key.lower() not in found or value is None:
            continue
        if not isinstance(value, str):
            raise ManagerConfigError(
                f"{where}: {meta_path}: {key} must be a string, not {_kind(value)}"
                " (damocles-manager refuses it too)"
            )
        found[key.lower()] = value
    return found["name"] or found["id"]


def _limits(table: Any, source: str, warnings: list[str]) -> tuple[JobLimits, frozenset[str]]:
    where = f"{source}: {_WORKER_PROVER}"
    table = _folded(_table(table, source, _WORKER_PROVER), WORKER_PROVER_KEYS, where)
    for key in sorted(set(table) - WORKER_PROVER_KEYS):
        warnings.append(f"{source}: {_WORKER_PROVER}: unknown key {key!r} ignored (damocles "
                        f"knows {', '.join(sorted(WORKER_PROVER_KEYS))})")  # fmt: skip
    max_try = table.get("JobMaxTry", DEFAULT_JOB_MAX_TRY)
    if (
        isinstance(max_try, bool)
        or not isinstance(max_try, int)
        or not (0 <= max_try <= MAX_JOB_MAX_TRY)
    ):
        raise ManagerConfigError(
            f"{source}: {_WORKER_PROVER} JobMaxTry must be a whole number from 0 to"
            f" {MAX_JOB_MAX_TRY} (the allocations a job may have in all; damocles' default is 2),"
            f" not {max_try!r}"
        )
    # damocles-manager takes 0 and retries no job (a failed one is final at its first try, as
    # with 1: `TryNum < JobMaxTry` never holds): so do we.
    max_try = max(max_try, 1)
    heartbeat = _duration(table, "HeartbeatTimeout", DEFAULT_HEARTBEAT_TIMEOUT, source)
    if heartbeat < WORKER_HEARTBEAT_EVERY:
        warnings.append(
            f"{source}: {_WORKER_PROVER} HeartbeatTimeout {table['HeartbeatTimeout']!r} is shorter"
            f" than the {WORKER_HEARTBEAT_EVERY:g} s between a damocles-worker's heartbeats: every"
            " running job will time out; give it several times that (damocles' default is 15s)"
        )
    lifetime = _duration(table, "JobLifetime", DEFAULT_JOB_LIFETIME, source)
    given = frozenset(WORKER_PROVER_KEYS & set(table))
    limits = JobLimits(max_try=max_try, heartbeat_timeout=heartbeat, job_lifetime=lifetime)
    return limits, given


def _duration(table: Mapping[str, Any], key: str, default: float, source: str) -> float:
    if key not in table:
        return default
    value = table[key]
    where = f"{source}: {_WORKER_PROVER} {key}"
    example = '"15s"' if key == "HeartbeatTimeout" else '"25h0m0s"'
    if not isinstance(value, str):
        nanoseconds = " (damocles-manager would read a bare number as nanoseconds)"
        found = _show(value)  # a date or time says so itself: 00:00:15 (a date/time)
        if not isinstance(value, datetime.date | datetime.time):
            found = f"{_kind(value)} {found}"
        raise ManagerConfigError(
            f"{where} must be a Go duration string such as {example}, not {found}"
            f"{nanoseconds if isinstance(value, int) else ''}"
        )
    try:
        seconds = parse_go_duration(value)
    except ValueError as exc:
        raise ManagerConfigError(f"{where}: {exc}") from None
    if seconds <= 0:
        raise ManagerConfigError(f"{where} must be longer than 0, not {value!r}; e.g. {example}")
    return seconds


def read_settings(conf_dir: str | None, stores: Iterable[tuple[str, str]] = ()) -> ManagerConfig:
    """The limits and stores a command uses: DIR/sector-manager.cfg when `conf_dir` names a
    directory that has one (damocles' defaults otherwise), its stores merged with `stores`
    (--store NAME=PATH). ManagerConfigError for a bad file or a store given twice."""
    found = load_manager_conf_dir(conf_dir) if conf_dir is not None else None
    if found is None:
        warnings: tuple[str, ...] = ()
        if conf_dir is not None:
            missing = (
                f"--conf-dir {conf_dir}: there is no {MANAGER_CONF_FILE} in it; damocles'"
                " defaults apply (JobMaxTry 2, HeartbeatTimeout 15s, JobLifetime 25h)"
            )
            warnings = (missing,)
        found = ManagerConfig(source="", warnings=warnings)
    try:
        merged = merge_stores(found.stores.items(), stores)
        StoreMap(merged)
    except ValueError as exc:
        where = f" ({found.source} and --store)" if found.source else " (--store)"
        raise ManagerConfigError(f"{exc}{where}") from None
    return ManagerConfig(found.source, merged, found.limits, found.given, found.warnings)
