"""The keys of a [[WdPost]]/[[WinPost]] table, their types, and the checks of their values.

msgspec does the type checking; the per-key loop turns its verdicts into messages that name the
key, the expectation and the value found.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import msgspec

from ..options import OPTIONS_ENV
from .messages import _show, _toml_key
from .spec import (
    DEFAULT_CANCEL_GRACE,
    DEFAULT_MAX_ATTEMPTS,
    MAX_ATTEMPTS,
    MAX_CONCURRENT,
    MAX_CPU,
    MAX_GPU_INDEX,
    MAX_SECONDS,
    MAX_WEIGHT,
    OptionValue,
)

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class _Block(msgspec.Struct, rename="pascal", forbid_unknown_fields=True, kw_only=True):
    # damocles' keys
    bin: str | None = None
    args: list[str] | None = None
    envs: dict[str, str] = {}
    concurrent: NonNegInt = 0
    weight: NonNegInt = 0
    ready_timeout_secs: NonNegInt = 0
    # ours
    protocol: Literal["auto", "dext", "jsonl"] = "auto"
    plugin: str | None = None
    plugin_options: dict[str, OptionValue] | None = None
    cpuset: str | None = None
    inherit_envs: bool = True
    auto_restart: bool = True
    max_attempts: PosInt = DEFAULT_MAX_ATTEMPTS
    request_timeout_secs: PosFloat | None = None
    heartbeat_timeout_secs: NonNegFloat | None = None
    stdin_timeout_secs: NonNegFloat | None = None
    cancel_grace_secs: NonNegFloat = DEFAULT_CANCEL_GRACE
    locks: list[str] = []
    gpus: list[NonNegInt] | Literal["all"] | None = None
    gpu_lock: bool = True


class _KeyRule(msgspec.Struct, frozen=True):
    expected: str  # what the whole value must be, for people
    container: type | None = None  # list or dict: check items one by one to name the bad ones
    item_type: Any = None
    item_expected: str = ""


_RULES: dict[str, _KeyRule] = {
    "Bin": _KeyRule("a string (the program to run)"),
    "Args": _KeyRule("a list of strings", list, str, "a string"),
    "Envs": _KeyRule("a table of environment variables", dict, str, "a string"),
    "Concurrent": _KeyRule("a non-negative integer"),
    "Weight": _KeyRule("a non-negative integer"),
    "ReadyTimeoutSecs": _KeyRule("a non-negative integer (seconds)"),
    "Protocol": _KeyRule('one of "auto", "dext", "jsonl"'),
    "Plugin": _KeyRule("a string (the name of a prover plugin)"),
    "PluginOptions": _KeyRule(
        "a table of plugin options", dict, OptionValue, "a string, integer, float or boolean"
    ),
    "Cpuset": _KeyRule('a string of CPU numbers and ranges, e.g. "10-19,24"'),
    "InheritEnvs": _KeyRule("a boolean (true or false)"),
    "AutoRestart": _KeyRule("a boolean (true or false)"),
    "MaxAttempts": _KeyRule("a positive integer"),
    "RequestTimeoutSecs": _KeyRule("a positive number (seconds)"),
    "HeartbeatTimeoutSecs": _KeyRule("a non-negative number (seconds; 0 turns it off)"),
    "StdinTimeoutSecs": _KeyRule("a non-negative number (seconds; 0 turns it off)"),
    "CancelGraceSecs": _KeyRule("a non-negative number (seconds)"),
    "Locks": _KeyRule("a list of lock names", list, str, "a string"),
    "Gpus": _KeyRule(
        'a list of GPU indices (e.g. [0, 1]) or "all"', list, NonNegInt, "a non-negative integer"
    ),
    "GpuLock": _KeyRule("a boolean (true or false)"),
}

VALID_KEYS: tuple[str, ...] = tuple(f.encode_name for f in msgspec.structs.fields(_Block))
assert set(VALID_KEYS) == set(_RULES), "every key needs a rule"


def converts(value: Any, typ: Any) -> bool:
    """`value` is of type `typ` as msgspec checks it (a whole number is not a float's 2.0)."""
    try:
        msgspec.convert(value, typ)
    except msgspec.ValidationError:
        return False
    return True


def _check_key(where: str, key: str, value: Any) -> list[str]:
    """Type and range of one key; a bad list item or table entry is named by its own path."""
    rule = _RULES[key]
    path = f"{where}.{key}"
    if converts({key: value}, _Block):
        return _check_strings(path, value)
    if rule.container is list and isinstance(value, list):
        bad = [
            f"{path}[{i}]: expected {rule.item_expected}, found {_show(item)}"
            for i, item in enumerate(value)
            if not converts(item, rule.item_type)
        ]
        if bad:
            return bad
    if rule.container is dict and isinstance(value, dict):
        bad = [
            f"{path}.{_toml_key(k)}: expected {rule.item_expected}, found {_show(v)}"
            for k, v in value.items()
            if not converts(v, rule.item_type)
        ]
        if bad:
            return bad
    return [f"{path}: expected {rule.expected}, found {_show(value)}"]


def _check_strings(path: str, value: Any) -> list[str]:
    # A NUL cannot reach exec(): catch it here rather than as a spawn failure.
    if isinstance(value, str) and "\x00" in value:
        return [f"{path}: contains a NUL character (\\u0000), which a program cannot receive"]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _check_strings(f"{path}[{i}]", v)]
    if isinstance(value, dict):
        errors = [
            f"{path}: name {_show(k)} contains a NUL character (\\u0000), which a program "
            f"cannot receive"
            for k in value
            if "\x00" in k
        ]
        return errors + [
            e for k, v in value.items() for e in _check_strings(f"{path}.{_toml_key(k)}", v)
        ]
    return []


def _check_block(where: str, b: _Block, written: set[str]) -> list[str]:
    """Rules that involve a value's content or several keys at once."""
    errors: list[str] = []
    if "Bin" in written and "Plugin" in written:
        errors.append(
            f"{where}: Bin and Plugin are both set; set Bin to run your own program, or Plugin "
            f"to run a prover plugin in damocles-ext's child runtime, not both"
        )
    if b.bin is not None and not b.bin.strip():
        errors.append(f'{where}.Bin: expected a program path or name, found ""')
    if b.plugin is not None:
        if not b.plugin.strip():
            errors.append(f'{where}.Plugin: expected a plugin name, found ""')
        elif b.plugin.startswith("-") or b.plugin != b.plugin.strip():
            errors.append(
                f"{where}.Plugin: expected a plugin name (no leading '-' or spaces), "
                f"found {_show(b.plugin)}"
            )
        if "Args" in written and "Bin" not in written:
            errors.append(
                f"{where}: Args is only used with Bin; a plugin takes its settings from "
                f"PluginOptions"
            )
        if OPTIONS_ENV in b.envs:
            errors.append(
                f"{where}.Envs.{OPTIONS_ENV}: this variable carries the child's PluginOptions;"
                " set them in PluginOptions instead"
            )
    if b.plugin_options is not None:
        if "Plugin" not in written:
            errors.append(f"{where}: PluginOptions is set but Plugin is not; set Plugin too")
        for name, value in b.plugin_options.items():
            if not name or "=" in name or name.startswith("-"):
                errors.append(
                    f"{where}.PluginOptions: option name {_show(name)} must be non-empty and "
                    f"contain no '=' nor start with '-'"
                )
            if isinstance(value, float) and not math.isfinite(value):
                errors.append(
                    f"{where}.PluginOptions.{_toml_key(name)}: expected a finite number, "
                    f"found {_show(value)}"
                )
    for name in b.envs:
        if not name or "=" in name:
            errors.append(
                f"{where}.Envs: environment variable name {_show(name)} must be non-empty and "
                f"contain no '='"
            )
    if "TMPDIR" in b.envs and not b.envs["TMPDIR"].strip():
        # bellperson's Rust would then keep its GPU lock files in the prover's working
        # directory, our native prover and status in /tmp: the locks would guard nothing.
        errors.append(
            f"{where}.Envs.TMPDIR: empty; give a directory (each GPU's own, for bellperson's GPU"
            f" lock files) or leave TMPDIR out"
        )
    for key, seconds in (
        ("RequestTimeoutSecs", b.request_timeout_secs),
        ("HeartbeatTimeoutSecs", b.heartbeat_timeout_secs),
        ("StdinTimeoutSecs", b.stdin_timeout_secs),
        ("CancelGraceSecs", b.cancel_grace_secs),
    ):
        if seconds is not None and not math.isfinite(seconds):
            errors.append(f"{where}.{key}: expected a finite number of seconds, found {seconds}")
    for key, number, most, what in (
        ("Concurrent", b.concurrent, MAX_CONCURRENT, "requests in flight on one child"),
        ("Weight", b.weight, MAX_WEIGHT, "a share of the traffic"),
        ("ReadyTimeoutSecs", b.ready_timeout_secs, MAX_SECONDS, "seconds: one day"),
        ("MaxAttempts", b.max_attempts, MAX_ATTEMPTS, "attempts per request"),
        ("RequestTimeoutSecs", b.request_timeout_secs, MAX_SECONDS, "seconds: one day"),
        ("HeartbeatTimeoutSecs", b.heartbeat_timeout_secs, MAX_SECONDS, "seconds: one day"),
        ("StdinTimeoutSecs", b.stdin_timeout_secs, MAX_SECONDS, "seconds: one day"),
        ("CancelGraceSecs", b.cancel_grace_secs, MAX_SECONDS, "seconds: one day"),
    ):
        if number is None or (isinstance(number, float) and not math.isfinite(number)):
            continue  # said above
        if number > most:
            errors.append(f"{where}.{key}: expected at most {most} ({what}), found {_show(number)}")
    for i, lock in enumerate(b.locks):
        if not lock.strip():
            errors.append(
                f"{where}.Locks[{i}]: expected a non-empty lock name, found {_show(lock)}"
            )
    if isinstance(b.gpus, list):
        if not b.gpus:
            errors.append(
                f'{where}.Gpus: expected at least one GPU index (or "all"), found []; '
                f"remove Gpus for a child without GPU expansion"
            )
        seen: set[int] = set()
        for i, gpu in enumerate(b.gpus):
            if gpu > MAX_GPU_INDEX:
                errors.append(
                    f"{where}.Gpus[{i}]: expected a GPU index from 0 to {MAX_GPU_INDEX}, found "
                    f"{_show(gpu)}"
                )
            elif gpu in seen:
                errors.append(
                    f"{where}.Gpus[{i}]: GPU {gpu} is listed twice; list each GPU once "
                    f"(use Concurrent for more work per GPU)"
                )
            seen.add(gpu)
    return errors


_CPU_ITEM = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")  # ASCII digits only: \d takes "٣" for 3


def _parse_cpuset(
    where: str, text: str | None, key: str = "Cpuset"
) -> tuple[frozenset[int] | None, list[str]]:
    """Linux cpuset list syntax ("10-19,24") -> the set of CPU numbers; `key` names the value in
    messages (damocles-worker.toml calls it cgroup.cpuset)."""
    if text is None:
        return None, []
    path = f"{where}.{key}"
    if not text.strip():
        return None, [f'{path}: expected CPU numbers and ranges, e.g. "10-19,24", found ""']
    cpus: set[int] = set()
    errors: list[str] = []
    for item in text.split(","):
        m = _CPU_ITEM.match(item.strip())
        if m is None:
            errors.append(
                f"{path}: {_show(item.strip())} in {_show(text)} is not a CPU number or a range "
                f'like "10-19"'
            )
            continue
        numbers = [t.lstrip("0") or "0" for t in m.groups() if t is not None]
        # Bounded by length before int(), and before a range becomes a set: "0-99999999999"
        # would fill the memory. CPUs this machine lacks are refused at start-up, not here.
        big = next((n for n in numbers if len(n) > len(str(MAX_CPU)) or int(n) > MAX_CPU), None)
        if big is not None:
            errors.append(
                f"{path}: CPU {big if len(big) <= 20 else big[:17] + '...'} in {_show(text)} is "
                f"beyond Linux's largest CPU number, {MAX_CPU}; use this machine's CPU numbers "
                f"(see lscpu)"
            )
            continue
        lo, hi = int(numbers[0]), int(numbers[-1])
        if hi < lo:
            errors.append(f'{path}: range "{item.strip()}" goes down; write it as "{hi}-{lo}"')
            continue
        cpus.update(range(lo, hi + 1))
    return (frozenset(cpus) if not errors else None), errors
