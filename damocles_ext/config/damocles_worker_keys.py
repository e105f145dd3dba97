"""damocles-worker.toml's vocabulary: which keys damocles-worker has, which of them the worker
reads, and the value forms it writes (humantime durations, byte-unit sector sizes).

Sans-IO: values in, values or ValueErrors that say what is wrong out. The key table follows
damocles-worker's `src/config.rs` and its processor config (`sealing/processor/external/
config.rs`); damocles-worker itself ignores keys it does not know (serde's default), so a key
unknown here is reported, never an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Final

from ..tasks import SECTOR_SIZE_BYTES, SECTOR_SIZES
from .messages import _show, _suggest, _toml_key

#: The worker reads this key (its value is checked where it is used).
USED: Final = "used"
#: damocles-worker reads this key for its sealing work; the worker has no use for it.
NOT_USED: Final = "not used"

_SEALING: Final[dict[str, Any]] = {
    "allowed_miners": USED,
    "allowed_sizes": USED,
    "recover_interval": USED,
    "enable_deals": NOT_USED,
    "disable_cc": NOT_USED,
    "max_deals": NOT_USED,
    "min_deal_space": NOT_USED,
    "max_retries": NOT_USED,
    "seal_interval": NOT_USED,
    "rpc_polling_interval": NOT_USED,
    "ignore_proof_check": NOT_USED,
    "request_task_max_retries": NOT_USED,
    "verify_after_pc2": NOT_USED,
}

#: One [[sealing_thread]] of plan "wdpost" (or its `<location>/config.toml`).
THREAD: Final[dict[str, Any]] = {"location": USED, "plan": USED, "sealing": _SEALING}

#: One [[attached]].
ATTACHED: Final[dict[str, Any]] = {"name": USED, "location": USED, "readonly": USED}

#: One [[processors.window_post]].
PROCESSOR: Final[dict[str, Any]] = {
    "bin": USED,
    "args": USED,
    "stable_wait": USED,
    "cgroup": {"group_name": USED, "cpuset": USED},
    "envs": USED,
    "numa_preferred": USED,
    "concurrent": USED,
    "locks": USED,
    "auto_restart": USED,
    "inherit_envs": USED,
}

#: damocles-worker's processor tables other than window_post: sealing work, not ours.
SEALING_PROCESSORS: Final = (
    "add_pieces",
    "tree_d",
    "pc1",
    "pc2",
    "c2",
    "snap_encode",
    "snap_prove",
    "transfer",
    "unseal",
    "sealing_daemons",
)

#: The whole file. [[sealing_thread]] and [[processors.window_post]] are walked table by table
#: by the loader (only the wdpost threads are ours), hence USED here.
SCHEMA: Final[dict[str, Any]] = {
    "worker": {
        "name": USED,
        "scan_persist_stores": USED,
        "ScanPersistStores": USED,
        "rpc_server": NOT_USED,
        "ping_interval": NOT_USED,
        "local_pieces_dir": NOT_USED,
        "local_pieces_dirs": NOT_USED,
    },
    "metrics": {"enable": NOT_USED, "http_listen": NOT_USED},
    "sector_manager": {"rpc_client": {"addr": USED, "headers": USED}, "piece_token": NOT_USED},
    "sealing": _SEALING,
    "sealing_thread": USED,
    "attached": USED,
    "processors": {
        "limit": USED,
        "limitation": {"concurrent": USED, "staggered": NOT_USED},
        "ext_locks": USED,
        "static_tree_d": NOT_USED,
        "window_post": USED,
        **dict.fromkeys(SEALING_PROCESSORS, NOT_USED),
    },
}


# Top-level tables damocles-worker once read and now ignores.
_RETIRED: Final = {
    "remote_store": "damocles-worker no longer reads it; write [[attached]] name, location",
    "attached_selection": "damocles-worker does not read it",
}


def unread_keys(value: Any, schema: Any, path: str) -> Iterator[tuple[str, str, str]]:
    """(table, key, why) for every key under `value` the worker does not read: `why` is NOT_USED
    or a note on a key damocles-worker does not know either (with a 'did you mean')."""
    if not isinstance(schema, dict) or not isinstance(value, dict):
        return
    for key, sub in value.items():
        rule = schema.get(key)
        if rule is None and key in _RETIRED and path == "":
            yield path, key, _RETIRED[key]
        elif rule is None:
            hint = _suggest(key, tuple(schema))
            note = "unknown to damocles-worker too" + (f"; {hint}" if hint else "")
            yield path, key, note
        elif rule == NOT_USED:
            yield path, key, NOT_USED
        elif isinstance(rule, dict):
            yield from unread_keys(sub, rule, f"{path}.{_toml_key(key)}" if path else key)


def unread_key_warnings(source: str, found: list[tuple[str, str, str]]) -> list[str]:
    """One warning per table, listing its keys the worker leaves to damocles-worker and the ones
    nobody reads (a typo, most likely)."""
    tables: dict[str, tuple[list[str], list[str]]] = {}
    for table, key, why in found:
        not_used, unknown = tables.setdefault(table, ([], []))
        if why == NOT_USED:
            not_used.append(_toml_key(key))
        else:
            unknown.append(f"'{key}' ({why})")
    warnings = []
    for table, (not_used, unknown) in tables.items():
        where = f"[{table}]" if table else "top level"
        if not_used:
            warnings.append(
                f"{source}: {where}: {', '.join(not_used)}: damocles-worker settings that "
                f"damocles-ext worker does not use (ignored)"
            )
        if unknown:
            warnings.append(f"{source}: {where}: ignored: {', '.join(unknown)}")
    return warnings


# humantime (the Rust crate damocles-worker reads durations with): whole numbers, each followed by
# one of these units, optionally separated by spaces: "15s", "1m 30s", "1min", "2h30m".
_HUMANTIME_UNITS: Final = {
    **dict.fromkeys(("nanos", "nsec", "ns"), 1e-9),
    **dict.fromkeys(("usec", "us"), 1e-6),
    **dict.fromkeys(("millis", "msec", "ms"), 1e-3),
    **dict.fromkeys(("seconds", "second", "secs", "sec", "s"), 1.0),
    **dict.fromkeys(("minutes", "minute", "min", "mins", "m"), 60.0),
    **dict.fromkeys(("hours", "hour", "hr", "hrs", "h"), 3600.0),
    **dict.fromkeys(("days", "day", "d"), 86400.0),
    **dict.fromkeys(("weeks", "week", "w"), 604800.0),
    **dict.fromkeys(("months", "month", "M"), 2_630_016.0),  # 30.44 days, as humantime
    **dict.fromkeys(("years", "year", "y"), 31_557_600.0),  # 365.25 days
}
_HUMANTIME_PART = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)")
_DURATION_EXAMPLE = 'a duration such as "15s", "1m" or "1m 30s"'


def parse_humantime(text: str) -> float:
    """Seconds from a humantime duration ("15s", "1min", "1h 30m"); ValueError says why not."""
    if not text.strip():
        raise ValueError(f"expected {_DURATION_EXAMPLE}, found {_show(text)}")
    seconds = 0.0
    pos = 0
    while pos < len(text.rstrip()):
        m = _HUMANTIME_PART.match(text, pos)
        if m is None:
            raise ValueError(
                f"expected {_DURATION_EXAMPLE}, found {_show(text)} (a number was expected at "
                f"{_show(text[pos:].strip())})"
            )
        number, unit = m.groups()
        if text[m.end() : m.end() + 1] == ".":
            raise ValueError(
                f"expected {_DURATION_EXAMPLE}, found {_show(text)}: damocles-worker takes whole "
                f'numbers only (write "1500ms", not "1.5s")'
            )
        if not unit:
            raise ValueError(
                f"expected {_DURATION_EXAMPLE}, found {_show(text)}: {number} has no unit "
                f'(damocles-worker needs one: "{number}s" for seconds)'
            )
        if unit not in _HUMANTIME_UNITS:
            hint = _suggest(unit, ("s", "ms", "min", "h", "d"))
            raise ValueError(
                f"expected {_DURATION_EXAMPLE}, found {_show(text)}: unknown unit "
                f"{_show(unit)}" + (f" ({hint})" if hint else "")
            )
        if len(number) > 20:  # humantime's u64 overflows long before
            raise ValueError(f"{_show(text)} is too long a duration")
        seconds += int(number) * _HUMANTIME_UNITS[unit]
        pos = m.end()
    return seconds


# byte-unit 4 (what damocles-worker reads allowed_sizes with): a number, optional spaces, and a
# unit: B, or K/M/G/T/P/E/Z (either case) followed by nothing or B (powers of 1000), i or iB
# (powers of 1024), or b (bits).
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(?:(B)|([KkMmGgTtPpEeZz])(iB|IB|i|I|B|b)?)?\s*$")
_PREFIX_POWER: Final = {p: i + 1 for i, p in enumerate("KMGTPEZ")}
SIZES_HINT: Final = "one of " + ", ".join(f'"{s}"' for s in SECTOR_SIZES)


def sector_size(text: str) -> str:
    """The sector size a byte-unit string names, as our tasks spell it ("32GiB"); ValueError
    when it is not a size or not one of Filecoin's sector sizes."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"expected a sector size ({SIZES_HINT}), found {_show(text)}")
    number, _, prefix, suffix = m.groups()
    if prefix is None:
        factor = 1.0
    else:
        power = _PREFIX_POWER[prefix.upper()]
        if suffix and suffix[0] in "iI":
            factor = float(1 << (10 * power))
        else:
            factor = 1000.0**power / (8 if suffix == "b" else 1)
    size = float(number) * factor
    for name, size_bytes in SECTOR_SIZE_BYTES.items():
        if size == size_bytes:
            return name
    raise ValueError(
        f'{_show(text)} is not a sector size; expected {SIZES_HINT} (note that "32GB" is '
        f"32 * 1000^3 bytes, not 32GiB)"
    )
