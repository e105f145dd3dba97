"""ext-prover.cfg -> validated `ChildSpec`s, one per child process to start.

The file is damocles-manager's own ext-prover config (TOML: `[[WdPost]]` and `[[WinPost]]` arrays
of tables), read exactly as damocles reads it, plus our optional PascalCase extensions. Every key
is checked on its own so that one run reports all the mistakes in a file, each with its place
(`WdPost[1].Concurrent`), what was expected and what was found. Nothing here starts processes or
creates directories: that is the supervisor's job.
"""

from __future__ import annotations

import atexit
import difflib
import json
import math
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from .errors import UsageError
from .options import format_option

if TYPE_CHECKING:
    from .plugins import DextPluginManager

__all__ = [
    "CONF_FILE_NAME",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_STDIN_TIMEOUT",
    "TMP_ROOT_ENV",
    "ChildSpec",
    "Config",
    "ConfigError",
    "check_startable",
    "default_tmp_root",
    "describe_argv",
    "detect_gpus",
    "effective_timeouts",
    "format_cpuset",
    "load_conf_dir",
    "load_config",
    "parse_config",
    "program_problem",
    "startup_problems",
]

#: The file damocles-manager reads from its home or `--conf-dir` directory.
CONF_FILE_NAME = "ext-prover.cfg"
#: Where per-GPU TMPDIRs go when `Gpus` expands a table, instead of default_tmp_root().
TMP_ROOT_ENV = "DAMOCLES_EXT_TMP_ROOT"
TMP_ROOT_NAME = "damocles-ext"

#: Top-level table name -> stage name used on the wire and in child names. damocles-manager knows
#: the first two; the split WindowPoSt tables are damocles-ext's own: with them,
#: window_post requests run a vanilla step on a [[WdPostVanilla]] child (CPU, disk) and a SNARK
#: step on a [[WdPostSnark]] child (GPU), instead of a whole proof on a [[WdPost]] child.
STAGE_OF_TABLE = {
    "WdPost": "window_post",
    "WinPost": "winning_post",
    "WdPostVanilla": "window_post_vanilla",
    "WdPostSnark": "window_post_snark",
}
TABLE_OF_STAGE = {stage: table for table, stage in STAGE_OF_TABLE.items()}
_SPLIT_TABLES = ("WdPostVanilla", "WdPostSnark")

DAMOCLES_WORKER = "damocles-worker"

# damocles' defaults, applied when a key is absent or 0 (damocles treats 0 as "unset").
DEFAULT_CONCURRENT = 1
DEFAULT_WEIGHT = 1
DEFAULT_READY_TIMEOUT = 5.0
DEFAULT_MAX_ATTEMPTS = 2
DEFAULT_CANCEL_GRACE = 10.0
# Hung-child detection, on unless a key says 0. A dext child that works on a request must send a
# Progress at least every 5 s (the built-in runtime sends one every 2 s): a minute of silence is
# a dozen missed ones, so only a hung child (stalled in a frame, a deadlock, a lost GPU) is hit.
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
# A child's stdin is read by a thread that does nothing else (the runtime; damocles-worker's
# processors): requests that sit for a minute in a full 1 MiB pipe mean it stopped reading.
DEFAULT_STDIN_TIMEOUT = 60.0

_GPU_DETECT_TIMEOUT = 10.0

# Upper bounds. Values beyond them are mistakes (a digit too many, a unit mixed up), and taken as
# given some would exhaust the machine: a thread per Concurrent slot in the plugin runtime, a set
# of every CPU number in a Cpuset range, a child per table.
MAX_CONFIG_BYTES = 1024 * 1024  # the seed's files are under 2 KiB
MAX_CONCURRENT = 1024
MAX_WEIGHT = 10_000
MAX_SECONDS = 86_400  # one day: a PoSt deadline's whole proving window is 30 minutes
MAX_ATTEMPTS = 100
MAX_GPU_INDEX = 1023
MAX_CPU = 8191  # Linux numbers at most 8192 CPUs (NR_CPUS)
MAX_CHILDREN = 1024


class ConfigError(UsageError):
    """An ext-prover.cfg that cannot be used; `.errors` lists every problem found in the file."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = list(errors)
        super().__init__(self._message())

    def _message(self) -> str:
        if len(self.errors) == 1:
            only = self.errors[0]
            # Syntax and file errors already start with the file name.
            return only if only.startswith(self.source) else f"{self.source}: {only}"
        lines = "\n".join(f"  {e}" for e in self.errors)
        return f"{self.source} has {len(self.errors)} errors:\n{lines}"


class ChildSpec(msgspec.Struct, frozen=True):
    """One child process to start, fully resolved (see docs/DESIGN.md for each field)."""

    stage: str
    index: int
    block: int
    name: str
    argv: tuple[str, ...]
    kind: str
    envs: dict[str, str]
    inherit_envs: bool
    concurrent: int
    weight: int
    ready_timeout: float
    protocol: str
    plugin: str | None
    plugin_options: dict[str, str | int | float | bool]
    cpuset: frozenset[int] | None
    auto_restart: bool
    max_attempts: int
    request_timeout: float | None
    #: None: DEFAULT_HEARTBEAT_TIMEOUT; 0: off (see effective_timeouts)
    heartbeat_timeout: float | None
    cancel_grace: float
    locks: tuple[str, ...]
    gpu: str | None
    #: TMPDIR is the private `<tmp root>/<stage>-gpu<i>/` that Gpus gave it (not one from Envs):
    #: the supervisor makes it 0700 and refuses one that others could reach (process.py).
    private_tmpdir: bool = False
    #: None: DEFAULT_STDIN_TIMEOUT; 0: off
    stdin_timeout: float | None = None


def effective_timeouts(child: ChildSpec) -> tuple[float, float]:
    """(heartbeat, stdin) timeouts in seconds a child runs with, 0 when off: unset keys (None)
    take the defaults, so a ChildSpec built by hand is watched as one from a config file is."""
    hb = DEFAULT_HEARTBEAT_TIMEOUT if child.heartbeat_timeout is None else child.heartbeat_timeout
    stdin = DEFAULT_STDIN_TIMEOUT if child.stdin_timeout is None else child.stdin_timeout
    return hb, stdin


class Config(msgspec.Struct):
    """A parsed ext-prover.cfg: the children to start, in file order, and non-fatal warnings."""

    source: str
    children: list[ChildSpec]
    warnings: list[str]
    tmp_root: str  # where Gpus puts its TMPDIRs: $DAMOCLES_EXT_TMP_ROOT or default_tmp_root()


# ---------------------------------------------------------------------------------------------
# The typed table. msgspec does the type checking; the per-key loop below turns its verdicts
# into messages that name the key, the expectation and the value found.

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
OptionValue = str | int | float | bool


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


# ---------------------------------------------------------------------------------------------
# Public entry points


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate an ext-prover.cfg file; raise ConfigError listing every problem."""
    source = os.fspath(path)
    p = Path(source)
    try:
        with p.open("rb") as f:
            # Bounded: a device or a runaway file (-c /dev/zero) must not fill the memory.
            data = f.read(MAX_CONFIG_BYTES + 1)
    except IsADirectoryError:
        raise ConfigError(
            source,
            [
                (
                    f"{source}: is a directory, not a config file; to read "
                    f"{os.path.join(source, CONF_FILE_NAME)} use --conf-dir {source}"
                )
            ],
        ) from None
    except FileNotFoundError:
        raise ConfigError(
            source, [f"{source}: cannot read the config file: no such file (check the path)"]
        ) from None
    except PermissionError:
        raise ConfigError(
            source,
            [
                f"{source}: cannot read the config file: permission denied (check its mode and owner)"
            ],
        ) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(source, [f"{source}: cannot read the config file: {reason}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            source,
            [
                (
                    f"{source}: larger than {MAX_CONFIG_BYTES // 1024} KiB, which no ext-prover.cfg "
                    f"needs; is it the right file?"
                )
            ],
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source,
            [f"{source}: not UTF-8 text (bad byte at offset {exc.start}); TOML files are UTF-8"],
        ) from None
    return parse_config(text, source)


def load_conf_dir(directory: str | os.PathLike[str]) -> Config:
    """Read DIR/ext-prover.cfg, as damocles-manager does with `--conf-dir DIR`."""
    source = os.fspath(directory)
    d = Path(source)
    if not d.exists():
        raise ConfigError(source, [f"{source}: config directory does not exist (check the path)"])
    if not d.is_dir():
        raise ConfigError(
            source, [f"{source}: is a file, not a directory; to read this file use -c {source}"]
        )
    path = d / CONF_FILE_NAME
    if not path.exists():
        raise ConfigError(
            str(path),
            [
                (
                    f"{path}: cannot read the config file: no such file "
                    f"(--conf-dir DIR reads DIR/{CONF_FILE_NAME})"
                )
            ],
        )
    return load_config(path)


_per_run_tmp_root: str | None = None


def default_tmp_root(env: Mapping[str, str] | None = None, *, euid: int | None = None) -> str:
    """The tmp root Gpus uses when DAMOCLES_EXT_TMP_ROOT is unset: a place no other user can
    make first (a fixed name in /tmp could be taken by anyone, and every Gpus child would then
    refuse to start).

    `/run/damocles-ext` for root; `$XDG_RUNTIME_DIR/damocles-ext` for others (or for root
    when /run is unusable), if that directory is theirs; otherwise a directory for this process
    alone, `<tempdir>/damocles-ext-<uid>-<random>`, removed when the process exits. Nothing is
    created here: the supervisor makes the directory (0700) when it starts a child.
    """
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    if euid == 0 and _private_runtime_dir("/run", euid):
        return os.path.join("/run", TMP_ROOT_NAME)
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg) and _private_runtime_dir(xdg, euid):
        return os.path.join(xdg, TMP_ROOT_NAME)
    return _per_run_root(euid)


def _private_runtime_dir(path: str, uid: int) -> bool:
    # A runtime directory that `uid` owns and only it may write to, on a writable file system:
    # an XDG_RUNTIME_DIR kept across sudo or su belongs to the user before, not to us.
    try:
        st = os.stat(path)
        read_only = os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == uid
        and bool(st.st_mode & stat.S_IWUSR)
        and not st.st_mode & 0o022
        and not read_only
    )


def _per_run_root(euid: int) -> str:
    global _per_run_tmp_root
    if _per_run_tmp_root is None:
        # Random, so that nobody can make it first; one per process, so that each parse agrees.
        name = f"{TMP_ROOT_NAME}-{euid}-{secrets.token_hex(8)}"
        _per_run_tmp_root = os.path.join(tempfile.gettempdir(), name)
        atexit.register(_remove_per_run_root, _per_run_tmp_root, os.getpid())
    return _per_run_tmp_root


def _remove_per_run_root(path: str, pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked copy of us exiting: the directory is still in use
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
        shutil.rmtree(path, ignore_errors=True)


def parse_config(text: str, source: str, *, tmp_root: str | None = None) -> Config:
    """Validate ext-prover.cfg text; `source` names it in messages. Raises ConfigError."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [_syntax_error(text, source, exc)]) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(
            source,
            [
                (
                    f"{source}: arrays or inline tables are nested too deep to read (hundreds of "
                    f'levels); an ext-prover.cfg needs two at most (e.g. Envs = {{ A = "1" }}). '
                    f"Look for a run of [ or {{"
                )
            ],
        ) from None
    except ValueError as exc:  # tomllib's int() of a number of thousands of digits
        what = (
            "a number has thousands of digits; no key takes one so large"
            if "digits" in str(exc)
            else f"a value cannot be read: {exc}"
        )
        raise ConfigError(source, [f"{source}: {what}"]) from None

    errors: list[str] = []
    if tmp_root is None:
        tmp_root = os.environ.get(TMP_ROOT_ENV) or default_tmp_root()
        if not os.path.isabs(tmp_root):
            errors.append(
                f"environment variable {TMP_ROOT_ENV}: expected an absolute path, "
                f"found {_show(tmp_root)}"
            )
    builder = _Builder(tmp_root=tmp_root.rstrip("/") or "/")

    for key, value in doc.items():
        if key in STAGE_OF_TABLE:
            continue
        if key in _RULES:
            hint = "it belongs inside a [[WdPost]] or [[WinPost]] table"
        else:
            hint = _suggest(key, tuple(STAGE_OF_TABLE), _TABLE_ALIASES)
            hint = hint or (
                "the file holds only [[WdPost]] and [[WinPost]] tables, or [[WdPostVanilla]] and "
                "[[WdPostSnark]] for a split WindowPoSt"
            )
        kind = "table" if isinstance(value, (dict, list)) else "key"
        errors.append(f"unknown top-level {kind} '{key}' ({hint})")

    for table, stage in STAGE_OF_TABLE.items():
        if table not in doc:
            continue
        blocks = doc[table]
        if isinstance(blocks, dict):
            errors.append(
                f"{table}: written as a single table [{table}]; write [[{table}]] "
                f"(double brackets), one per child"
            )
            blocks = [blocks]
        elif not isinstance(blocks, list):
            errors.append(
                f"{table}: expected an array of tables written [[{table}]], found {_show(blocks)}"
            )
            continue
        for block_index, raw in enumerate(blocks):
            where = f"{table}[{block_index}]"
            if not isinstance(raw, dict):
                errors.append(f"{where}: expected a table [[{table}]], found {_show(raw)}")
                continue
            errors.extend(builder.add_block(table, stage, block_index, raw))

    errors.extend(_check_split_tables(doc))
    if not errors and len(builder.children) > MAX_CHILDREN:
        errors.append(
            f"the file starts {len(builder.children)} children; at most {MAX_CHILDREN} are "
            f"supported. Use Concurrent for more requests per child"
        )
    if not errors and not builder.children:
        errors.append(
            "no [[WdPost]] or [[WinPost]] table, so there is no child to start; "
            "add at least one (see ext-prover.cfg.example)"
        )
    if errors:
        raise ConfigError(source, errors)
    return Config(
        source=source, children=builder.children, warnings=builder.warnings, tmp_root=tmp_root
    )


def _check_split_tables(doc: dict[str, Any]) -> list[str]:
    """A split WindowPoSt needs both of its tables, and replaces [[WdPost]]."""
    present = [t for t in _SPLIT_TABLES if doc.get(t)]  # an empty array starts no child
    if not present:
        return []
    if len(present) == 1:
        missing = next(t for t in _SPLIT_TABLES if t not in present)
        return [
            (
                f"[[{present[0]}]] without [[{missing}]]: a split WindowPoSt runs its vanilla "
                f"step on [[WdPostVanilla]] children and its SNARK step on [[WdPostSnark]] "
                f"children; add [[{missing}]], or use [[WdPost]] for whole proofs"
            )
        ]
    if doc.get("WdPost"):
        return [
            (
                "[[WdPost]] and [[WdPostVanilla]]/[[WdPostSnark]] both serve window_post: keep "
                "[[WdPost]] for whole proofs on one child, or the two split tables to run the "
                "vanilla and SNARK steps on different children, not both"
            )
        ]
    return []


def detect_gpus(why: list[str] | None = None) -> list[int]:
    """Indices of the GPUs on this machine, via NVML or `nvidia-smi -L`; [] when none are found.

    When none are found, `why` (if given) gets one line per way tried, saying what it answered.
    """
    reasons: list[str] = []
    try:
        import pynvml  # nvidia-ml-py, optional
    except ImportError:
        pynvml = None
        reasons.append("NVML: nvidia-ml-py is not installed")
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                found = list(range(pynvml.nvmlDeviceGetCount()))
            finally:
                pynvml.nvmlShutdown()
            if found:
                return found
            reasons.append("NVML: 0 devices")
        except (pynvml.NVMLError, OSError) as exc:
            # No driver or library: nvidia-smi may still answer, or say why not.
            reasons.append(f"NVML: {exc}")
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"],
            capture_output=True,
            text=True,
            timeout=_GPU_DETECT_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        reasons.append("nvidia-smi: not found on PATH")
    except subprocess.TimeoutExpired:
        reasons.append(f"nvidia-smi -L: no answer within {_GPU_DETECT_TIMEOUT:g}s")
    except (OSError, subprocess.SubprocessError) as exc:
        reasons.append(f"nvidia-smi -L: {exc}")
    else:
        found = [int(m.group(1)) for m in re.finditer(r"^GPU (\d+):", out.stdout, re.MULTILINE)]
        if out.returncode == 0 and found:
            return found
        said = (out.stderr.strip() or out.stdout.strip()).splitlines()
        what = f": {said[0][:200]}" if said else ""
        if out.returncode != 0:
            reasons.append(f"nvidia-smi -L: exit status {out.returncode}{what}")
        else:
            reasons.append(f"nvidia-smi -L: listed no GPU{what}")
    if why is not None:
        why.extend(reasons)
    return []


# ---------------------------------------------------------------------------------------------
# Can the children start here?


def program_problem(program: str, search_path: str | None = None) -> str | None:
    """Why `program` (argv[0]) cannot be executed on this machine, and what to do; None if it can.

    A name without '/' is looked up in `search_path` (a PATH value; default: ours), as exec does.
    """
    fix = "give the path of the prover program"
    shown = _show(program, limit=1000)  # a path is no use cut short
    if "/" not in program:
        search_path = os.defpath if search_path is None else search_path
        if shutil.which(program, path=search_path) is not None:
            return None
        return (
            f"{shown} is not found on PATH ({search_path}); give its path, or put its "
            f"directory on PATH"
        )
    try:
        st = os.stat(program)
    except FileNotFoundError:
        return f"{shown} does not exist; {fix}"
    except OSError as exc:  # a path component that is a file, or a directory we may not enter
        return f"{shown} cannot be reached: {exc.strerror or exc}; {fix}"
    if stat.S_ISDIR(st.st_mode):
        return f"{shown} is a directory, not a program; {fix}"
    if not stat.S_ISREG(st.st_mode):
        return f"{shown} is not a regular file, so it cannot be run; {fix}"
    if not os.access(program, os.X_OK):
        return (
            f"{shown} is not executable (mode {stat.S_IMODE(st.st_mode):04o}); make it "
            f"executable (chmod +x) or {fix}"
        )
    return None


def _search_path(child: ChildSpec) -> str:
    """The PATH the child's program is looked up in: its Envs', else ours if inherited."""
    if "PATH" in child.envs:
        return child.envs["PATH"]
    if child.inherit_envs and "PATH" in os.environ:
        return os.environ["PATH"]
    return os.defpath


def _exec_size_problems(where: str, child: ChildSpec) -> list[str]:
    """Args or Envs too big for exec (E2BIG), which would fail every start of the child."""
    # Linux's MAX_ARG_STRLEN: 32 pages for one argument or variable, its NUL included.
    most = 32 * os.sysconf("SC_PAGESIZE")
    problems: list[str] = []
    if child.kind == "plugin":  # the options are the only long arguments of a plugin child
        named = [(f"{where}.PluginOptions", a) for a in child.argv[1:]]
    else:
        named = [(f"{where}.Args[{i}]", a) for i, a in enumerate(child.argv[1:])]
    named += [(f"{where}.Envs.{_toml_key(k)}", f"{k}={v}") for k, v in child.envs.items()]
    for name, text in named:
        size = len(os.fsencode(text)) + 1
        if size > most:
            problems.append(
                f"{name}: {size} bytes, but exec takes at most {most} per argument or "
                f"environment variable (Linux's MAX_ARG_STRLEN); pass it in a file instead"
            )
    inherited = os.environ if child.inherit_envs else {}
    env = {**inherited, **child.envs}
    strings = [*child.argv, *(f"{k}={v}" for k, v in env.items())]
    total = sum(len(os.fsencode(t)) + 1 + 8 for t in strings)  # and a pointer to each
    try:
        limit = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        limit = -1
    if not problems and 0 < limit < total:
        problems.append(
            f"{where}: the command line and environment take {total} bytes (Args, Envs and the "
            f"inherited environment), more than exec takes here ({limit}, ARG_MAX); shorten them"
        )
    return problems


def startup_problems(
    children: list[ChildSpec], *, plugin_manager: DextPluginManager | None = None
) -> list[str]:
    """Why some of `children` could not start on this machine, each naming its table and key.

    What is checked needs no child started: the program (Bin, or damocles-worker) exists and is
    executable, the command line and environment fit exec's limits, the Cpuset's CPUs are ours
    to use, and a Plugin is installed and accepts its PluginOptions (its validate_options and the
    dext_validate_plugin_options hooks). A Gpus table's children share one table, so each table
    is checked once.
    """
    problems: list[str] = []
    blocks: dict[tuple[str, int], ChildSpec] = {}
    for child in children:
        blocks.setdefault((child.stage, child.block), child)
    try:
        usable = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux: prepare_spawn's check is the only one
        usable = None
    for (stage, block), child in blocks.items():
        where = f"{TABLE_OF_STAGE[stage]}[{block}]"
        if child.kind != "plugin":
            search_path = _search_path(child)
            problem = program_problem(child.argv[0], search_path)
            if problem is not None and child.kind == "bin":
                problems.append(f"{where}.Bin: {problem}")
            elif problem is not None:
                problems.append(
                    f"{where}: no Bin or Plugin, so the child runs damocles' default "
                    f"`{DAMOCLES_WORKER} processor {stage}`, but {DAMOCLES_WORKER} is not found "
                    f"on PATH ({search_path}); set Bin or Plugin, or put {DAMOCLES_WORKER} on PATH"
                )
        problems.extend(_exec_size_problems(where, child))
        if child.cpuset and usable is not None and not child.cpuset <= usable:
            missing = format_cpuset(child.cpuset - usable)
            problems.append(
                f"{where}.Cpuset: CPUs {missing} are not ones this process may use (this "
                f"machine gives it {format_cpuset(frozenset(usable))}); use those"
            )
    plugin_blocks = [c for c in blocks.values() if c.kind == "plugin"]
    if plugin_blocks:
        from .plugins import get_plugin_manager, prover_problems

        pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        for child in plugin_blocks:
            where = f"{TABLE_OF_STAGE[child.stage]}[{child.block}]"
            assert child.plugin is not None
            for problem in prover_problems(
                pm, child.plugin, dict(child.plugin_options), child.stage
            ):
                problems.append(f"{where}.Plugin: {problem}")
    return problems


def check_startable(
    config: Config,
    children: list[ChildSpec] | None = None,
    *,
    plugin_manager: DextPluginManager | None = None,
) -> None:
    """Raise ConfigError listing startup_problems of `children` (default: all the config's).

    `serve`, `run` and `prove -c` call it before they report ready, so that a child that could
    never start fails the start, as damocles' own processor does, instead of each request.
    """
    problems = startup_problems(
        config.children if children is None else children, plugin_manager=plugin_manager
    )
    if problems:
        raise ConfigError(config.source, problems)


# ---------------------------------------------------------------------------------------------
# Building children


class _Builder:
    def __init__(self, tmp_root: str) -> None:
        self.tmp_root = tmp_root
        self.children: list[ChildSpec] = []
        self.warnings: list[str] = []
        self._next_index = {stage: 0 for stage in STAGE_OF_TABLE.values()}
        self._gpus: list[int] | None = None
        self._gpu_problems: list[str] = []  # why detect_gpus found none

    def _detected_gpus(self) -> list[int]:
        if self._gpus is None:  # once per file: nvidia-smi is slow
            self._gpus = detect_gpus(self._gpu_problems)
        return self._gpus

    def add_block(self, table: str, stage: str, block_index: int, raw: dict[str, Any]) -> list[str]:
        where = f"{table}[{block_index}]"
        errors: list[str] = []
        good: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in _RULES:
                hint = _suggest(key, VALID_KEYS) or "valid keys: " + ", ".join(VALID_KEYS)
                errors.append(f"{where}: unknown key '{key}' ({hint})")
                continue
            key_errors = _check_key(where, key, value)
            errors.extend(key_errors)
            if not key_errors:
                good[key] = value
        # The keys that passed on their own still get the content and cross-key checks, so one
        # run reports everything; cross-key rules look at which keys were written at all.
        block = msgspec.convert(good, _Block)
        errors.extend(_check_block(where, block, set(raw)))
        cpuset, cpu_errors = _parse_cpuset(where, block.cpuset)
        errors.extend(cpu_errors)
        if errors:
            return errors

        if table in _SPLIT_TABLES:
            if block.plugin is None and block.bin is None:
                return [
                    (
                        f"{where}: no Plugin or Bin; damocles-worker has no split WindowPoSt "
                        f'steps. Set Plugin (e.g. Plugin = "native") or a Bin that speaks dext'
                    )
                ]
            if block.protocol == "jsonl":
                return [
                    (
                        f'{where}.Protocol: "jsonl" cannot carry a split WindowPoSt step '
                        f"(damocles' JSON lines know only window_post and winning_post); use "
                        f'"dext" or "auto"'
                    )
                ]
        argv, kind = self._program(where, stage, block)
        gpus: list[int | None] = [None]
        if block.gpus == "all":
            found = self._detected_gpus()
            if not found:
                return [
                    (
                        f'{where}.Gpus: "all" found no GPU (asked NVML and `nvidia-smi -L`'
                        f"{''.join('; ' + r for r in self._gpu_problems)}); "
                        f"list the GPUs, e.g. Gpus = [0, 1], or remove Gpus"
                    )
                ]
            gpus = list(found)
        elif block.gpus is not None:
            gpus = list(block.gpus)
        if block.gpus is not None and "CUDA_VISIBLE_DEVICES" in block.envs:
            self.warnings.append(
                f"{where}: Envs sets CUDA_VISIBLE_DEVICES, which overrides Gpus: all "
                f"{len(gpus)} children get CUDA_VISIBLE_DEVICES="
                f"{block.envs['CUDA_VISIBLE_DEVICES']}; remove one of the two"
            )
        if block.heartbeat_timeout_secs and block.protocol == "jsonl":
            self.warnings.append(
                f'{where}: HeartbeatTimeoutSecs has no effect with Protocol = "jsonl" '
                f"(damocles' JSON lines carry no progress)"
            )

        for gpu in gpus:
            envs = dict(block.envs)
            private_tmpdir = gpu is not None and "TMPDIR" not in envs
            if gpu is not None:
                envs.setdefault("CUDA_VISIBLE_DEVICES", str(gpu))
                envs.setdefault("TMPDIR", os.path.join(self.tmp_root, f"{stage}-gpu{gpu}") + "/")
            child = self._child(stage, block_index, block, argv, kind, envs, cpuset)
            if private_tmpdir:
                child = msgspec.structs.replace(child, private_tmpdir=True)
            self.children.append(child)
        return []

    def _program(self, where: str, stage: str, block: _Block) -> tuple[tuple[str, ...], str]:
        if block.bin is not None:
            # Kept as written: a bare name is looked up on PATH and a relative path is taken from
            # the supervisor's working directory, as Go's exec.Command does for damocles. Whether
            # it can run here is check_startable's question, not the file's.
            return (block.bin, *(block.args or ())), "bin"
        if block.plugin is not None:
            argv = [sys.executable, "-m", "damocles_ext", "child", stage, "--plugin", block.plugin]
            if block.protocol != "auto":  # the runtime speaks dext unless told otherwise
                argv += ["--protocol", block.protocol]
            if block.concurrent > 1:  # the runtime proves one at a time unless told otherwise
                argv += ["--capacity", str(block.concurrent)]
            hb = block.heartbeat_timeout_secs
            if hb and hb < 6:  # its 2 s keep-alive would read as a hang
                argv += ["--heartbeat", f"{hb / 3:g}"]
            for key, value in (block.plugin_options or {}).items():
                # format_option quotes values whose type would otherwise change ("123" stays text)
                argv += ["--option", format_option(key, value)]
            return tuple(argv), "plugin"
        # damocles' default. damocles looks next to its own binary; we have none, so PATH.
        if block.args is not None:
            self.warnings.append(
                f"{where}: Args is ignored because Bin is not set (damocles does the same and "
                f"runs `{DAMOCLES_WORKER} processor {stage}`); set Bin to use Args"
            )
        return (DAMOCLES_WORKER, "processor", stage), "damocles-worker"

    def _child(
        self,
        stage: str,
        block_index: int,
        block: _Block,
        argv: tuple[str, ...],
        kind: str,
        envs: dict[str, str],
        cpuset: frozenset[int] | None,
    ) -> ChildSpec:
        index = self._next_index[stage]
        self._next_index[stage] += 1
        gpu = envs.get("CUDA_VISIBLE_DEVICES") or None
        locks = list(dict.fromkeys(block.locks))
        if gpu is not None and block.gpu_lock:
            # One lock per device, so "0,1" and "1" still exclude each other on GPU 1.
            for device in gpu.split(","):
                if device.strip():
                    locks.append(f"gpu:{device.strip()}")
        return ChildSpec(
            stage=stage,
            index=index,
            block=block_index,
            name=f"{stage}#{index}",
            argv=argv,
            kind=kind,
            envs=envs,
            inherit_envs=block.inherit_envs,
            concurrent=block.concurrent or DEFAULT_CONCURRENT,
            weight=block.weight or DEFAULT_WEIGHT,
            ready_timeout=float(block.ready_timeout_secs) or DEFAULT_READY_TIMEOUT,
            protocol=block.protocol,
            plugin=block.plugin,
            plugin_options=dict(block.plugin_options or {}),
            cpuset=cpuset,
            auto_restart=block.auto_restart,
            max_attempts=block.max_attempts,
            request_timeout=block.request_timeout_secs,
            heartbeat_timeout=block.heartbeat_timeout_secs,
            cancel_grace=block.cancel_grace_secs,
            locks=tuple(dict.fromkeys(locks)),
            gpu=gpu,
            stdin_timeout=block.stdin_timeout_secs,
        )


# ---------------------------------------------------------------------------------------------
# Checks


def _converts(value: Any, typ: Any) -> bool:
    try:
        msgspec.convert(value, typ)
    except msgspec.ValidationError:
        return False
    return True


def _check_key(where: str, key: str, value: Any) -> list[str]:
    """Type and range of one key; a bad list item or table entry is named by its own path."""
    rule = _RULES[key]
    path = f"{where}.{key}"
    if _converts({key: value}, _Block):
        return _check_strings(path, value)
    if rule.container is list and isinstance(value, list):
        bad = [
            f"{path}[{i}]: expected {rule.item_expected}, found {_show(item)}"
            for i, item in enumerate(value)
            if not _converts(item, rule.item_type)
        ]
        if bad:
            return bad
    if rule.container is dict and isinstance(value, dict):
        bad = [
            f"{path}.{_toml_key(k)}: expected {rule.item_expected}, found {_show(v)}"
            for k, v in value.items()
            if not _converts(v, rule.item_type)
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


_CPU_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


def _parse_cpuset(where: str, text: str | None) -> tuple[frozenset[int] | None, list[str]]:
    """Linux cpuset list syntax ("10-19,24") -> the set of CPU numbers."""
    if text is None:
        return None, []
    path = f"{where}.Cpuset"
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


# ---------------------------------------------------------------------------------------------
# Messages

_TABLE_ALIASES = {
    "wdpost": "WdPost",
    "windowpost": "WdPost",
    "window": "WdPost",
    "wdposts": "WdPost",
    "winpost": "WinPost",
    "winningpost": "WinPost",
    "winning": "WinPost",
    "winposts": "WinPost",
}


def _normal(name: str) -> str:
    return re.sub(r"[_\-\s]", "", name).lower()


def _suggest(word: str, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
    """'did you mean ...?' for a misspelt key, or '' when nothing is close."""
    by_normal = {_normal(c): c for c in choices}
    match = by_normal.get(_normal(word)) or (aliases or {}).get(_normal(word))
    if match is None:
        close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
        if not close:
            close = [
                by_normal[c]
                for c in difflib.get_close_matches(_normal(word), list(by_normal), n=1, cutoff=0.6)
            ]
        match = close[0] if close else None
    return f"did you mean '{match}'?" if match else ""


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _show(value: Any, limit: int = 60) -> str:
    """A value as it would be written in TOML, shortened for messages."""
    text = _toml(value, limit)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _toml(value: Any, limit: int = 60, depth: int = 0) -> str:
    # `limit` and `depth` bound the work: a value may be a huge or deeply nested list.
    if depth > 8:
        return "[...]" if isinstance(value, list) else "{...}" if isinstance(value, dict) else "..."
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 13_000:  # str() refuses more than 4300 digits
            return "(a number of thousands of digits)"
        text = str(value)
        return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} digits)"
    if isinstance(value, list | dict):
        items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
        parts: list[str] = []
        size = 0
        for k, v in items:
            if size > limit:
                parts.append("...")
                break
            part = _toml(v, limit, depth + 1)
            if k is not None:
                part = f"{_toml_key(k)} = {part}"
            parts.append(part)
            size += len(part) + 2
        inner = ", ".join(parts)
        return f"[{inner}]" if isinstance(value, list) else "{" + inner + "}"
    if isinstance(value, (datetime, date, time)):
        return f"{value.isoformat()} (a date/time)"
    return repr(value)


def _option_text(value: OptionValue) -> str:
    """A PluginOptions value as the child runtime receives it in `--option K=V`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")


def _syntax_error(text: str, source: str, exc: Exception) -> str:
    message = str(exc)
    m = _TOML_POSITION.search(message)
    if m:
        line, col = int(m.group(1)), int(m.group(2))
        message = message[: m.start()]
    else:
        lines = text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
        message = _TOML_END.sub("", message)
        message += " (at end of file)"
    message = message[:1].lower() + message[1:]
    for known, hint in _SYNTAX_HINTS.items():
        if message.startswith(known):
            message += f" ({hint})"
            break
    return f"{source}:{line}:{col}: invalid TOML: {message}"


# tomllib's wording for the mistakes people make most, and what they usually mean.
_SYNTAX_HINTS = {
    "cannot overwrite a value": "is a key given twice in one table?",
    "cannot declare": "is a table header given twice? use [[...]] for one table per child",
    "illegal character '\\n'": "is a string missing its closing quote?",
    "unterminated string": "is a string missing its closing quote?",
    "expected '=' after a key": "write Key = value",
}


def describe_argv(child: ChildSpec) -> str:
    """What a child runs, for people: the command line, or the plugin and its options."""
    if child.kind == "plugin":
        options = " ".join(
            shlex.quote(f"{k}={_option_text(v)}") for k, v in child.plugin_options.items()
        )
        return f"plugin {child.plugin}" + (f" ({options})" if options else "")
    return shlex.join(child.argv)


def format_cpuset(cpus: frozenset[int]) -> str:
    """{10..19, 24} -> "10-19,24"."""
    parts: list[str] = []
    ordered = sorted(cpus)
    start = prev = ordered[0] if ordered else 0
    for cpu in ordered[1:]:
        if cpu != prev + 1:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = cpu
        prev = cpu
    if ordered:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)
