"""What a parsed ext-prover.cfg is: `ChildSpec`, `Config`, `ConfigError`; the table names,
damocles' defaults and our upper bounds; how a child is shown to people.
"""

from __future__ import annotations

import os
import shlex
from errno import EACCES, EPERM

import msgspec

from ..errors import EXIT_TEMPFAIL, UsageError
from ..options import OptionValue  # a PluginOptions value

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
# WinningPoSt has about 20 s (a block's time) to be answered: a hung child found after a minute
# loses the block while its sibling sits idle. 10 s is two of the 5 s Progress intervals a dext
# child may leave (five of the runtime's 2 s), and leaves the retry on a sibling half the budget.
DEFAULT_WINNING_POST_HEARTBEAT_TIMEOUT = 10.0
# A child's stdin is read by a thread that does nothing else (the runtime; damocles-worker's
# processors): requests that sit for a minute in a full 1 MiB pipe mean it stopped reading.
DEFAULT_STDIN_TIMEOUT = 60.0


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

    def __init__(self, source: str, errors: list[str], *, errno: int | None = None) -> None:
        self.source = source
        self.errors = list(errors)
        self.errno = errno  # that of the OSError that kept the file from being read, else None
        super().__init__(self._message())

    @property
    def denied(self) -> bool:
        """Whether the file could not be read for want of permission (EACCES, EPERM)."""
        return self.errno in (EACCES, EPERM)

    def _message(self) -> str:
        if len(self.errors) == 1:
            only = self.errors[0]
            # Syntax and file errors already start with the file name.
            return only if only.startswith(self.source) else f"{self.source}: {only}"
        lines = "\n".join(f"  {e}" for e in self.errors)
        return f"{self.source} has {len(self.errors)} errors:\n{lines}"


class ClosedOnTheWay(ConfigError):
    """A config file this user may not reach: a directory on its path is closed to it (not
    the file's own mode)."""


class NotRegularConfig(ConfigError):
    """A config path that names a directory, a FIFO, a socket or a device, not a file that
    could not be read."""


class GpuDriverNotReady(ConfigError):
    """A config whose only problem is that `Gpus = "all"` got no answer from the GPU driver (not
    loaded yet after a boot, nvidia-smi failing or hanging): exit code 75, EX_TEMPFAIL, since a
    later start may find the GPUs, where a genuine mistake in the file is exit code 2."""

    exit_code = EXIT_TEMPFAIL


def device_locks(gpu: str | None) -> list[str]:
    """The lock of each device a child's CUDA_VISIBLE_DEVICES names (`gpu:<i>`): one per device,
    so "0,1" and "1" still exclude each other on GPU 1."""
    return [f"gpu:{d.strip()}" for d in (gpu or "").split(",") if d.strip()]


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
    #: None: the stage's default (default_heartbeat_timeout); 0: off (see effective_timeouts)
    heartbeat_timeout: float | None
    cancel_grace: float
    locks: tuple[str, ...]
    gpu: str | None
    #: TMPDIR is the private `<tmp root>/<stage>-gpu<i>/` that Gpus gave it (not one from Envs):
    #: the supervisor makes it 0700 and refuses one that others could reach (process.py).
    private_tmpdir: bool = False
    #: None: DEFAULT_STDIN_TIMEOUT; 0: off
    stdin_timeout: float | None = None


def default_heartbeat_timeout(stage: str) -> float:
    """HeartbeatTimeoutSecs of a child of `stage` whose block does not set it."""
    if stage == "winning_post":
        return DEFAULT_WINNING_POST_HEARTBEAT_TIMEOUT
    return DEFAULT_HEARTBEAT_TIMEOUT


def effective_timeouts(child: ChildSpec) -> tuple[float, float]:
    """(heartbeat, stdin) timeouts in seconds a child runs with, 0 when off: unset keys (None)
    take the defaults (the heartbeat's is its stage's), so a ChildSpec built by hand is watched
    as one from a config file is."""
    hb = child.heartbeat_timeout
    if hb is None:
        hb = default_heartbeat_timeout(child.stage)
    stdin = DEFAULT_STDIN_TIMEOUT if child.stdin_timeout is None else child.stdin_timeout
    return hb, stdin


class Config(msgspec.Struct):
    """A parsed ext-prover.cfg: the children to start, in file order, and non-fatal warnings.
    `run_warnings` hold only where one supervisor runs every stage's children (`run`), not
    where each process serves one stage (`serve <stage>`, `prove -c`, `worker`)."""

    source: str
    children: list[ChildSpec]
    warnings: list[str]
    tmp_root: str  # where Gpus puts its TMPDIRs: $DAMOCLES_EXT_TMP_ROOT or default_tmp_root()
    run_warnings: list[str] = msgspec.field(default_factory=list)
    #: The warnings of `warnings` about the file's tables and keys (the others are what its
    #: children share through their GPUs), each with the (stage, block) of the table it is
    #: about, or None for the whole file's: load.warnings_for picks from them.
    scoped_warnings: list[tuple[tuple[str, int] | None, str]] = msgspec.field(default_factory=list)
    #: The GPUs found for `Gpus = "all"` (NVML or nvidia-smi -L), as the children were given
    #: them; None when no table asked.
    gpus_found: list[int] | None = None
    #: The file's format, whose table and key names the messages use: "ext-prover.cfg", or
    #: "damocles-worker.toml" (`worker --worker-config`: [[processors.window_post]], bin, ...).
    dialect: str = "ext-prover.cfg"


def serve_args(argv: tuple[str, ...]) -> list[str] | None:
    """The arguments after `serve` when `argv` runs `damocles-ext serve` (damocles-manager's
    entry for us), else None. Such a child is a supervisor: its provers are the children of the
    config it reads, with their own environment."""
    program = os.path.basename(argv[0]) if argv else ""
    if program == "damocles-ext":
        rest = list(argv[1:])
    elif len(argv) >= 3 and argv[1:3] == ("-m", "damocles_ext"):
        rest = list(argv[3:])
    else:
        return None
    return rest[1:] if rest[:1] == ["serve"] else None


def _option_text(value: OptionValue) -> str:
    """A PluginOptions value as a person writes it in `--option K=V`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def describe_argv(child: ChildSpec, *, values: bool = False) -> str:
    """What a child runs, for people: the command line, or the plugin and its options' names
    (with `values`, as check-config shows its operator: an option may be a secret, and the logs
    and request errors this text goes to are read by others)."""
    if child.kind == "plugin":
        if values:
            options = " ".join(
                shlex.quote(f"{k}={_option_text(v)}") for k, v in child.plugin_options.items()
            )
        else:
            options = f"options {', '.join(child.plugin_options)}" if child.plugin_options else ""
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
