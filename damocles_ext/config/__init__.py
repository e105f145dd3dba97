"""ext-prover.cfg -> validated `ChildSpec`s, one per child process to start.

The file is damocles-manager's own ext-prover config (TOML: `[[WdPost]]` and `[[WinPost]]` arrays
of tables), read exactly as damocles reads it, plus our optional PascalCase extensions. Every key
is checked on its own so that one run reports all the mistakes in a file, each with its place
(`WdPost[1].Concurrent`), what was expected and what was found. Nothing here starts processes or
creates directories: that is the supervisor's job.

This package's names are its API; its modules are where each part lives:
spec (ChildSpec, Config, ConfigError, defaults and bounds), load (the file and the TOML into
children), keys (each key's type and checks), messages (error wording), machine (the tmp root,
the GPUs), startup (can the children start here). damocles_worker reads damocles-worker.toml for
`damocles-ext worker` (its key table and value forms: damocles_worker_keys; typed reads of its
tables: damocles_worker_values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .keys import VALID_KEYS, NonNegFloat, NonNegInt, PosFloat, PosInt
from .load import load_conf_dir, load_config, parse_config, warnings_for
from .machine import GpuProbe, default_tmp_root, detect_gpus, probe_gpus
from .spec import (
    CONF_FILE_NAME,
    DAMOCLES_WORKER,
    DEFAULT_CANCEL_GRACE,
    DEFAULT_CONCURRENT,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_READY_TIMEOUT,
    DEFAULT_STDIN_TIMEOUT,
    DEFAULT_WEIGHT,
    DEFAULT_WINNING_POST_HEARTBEAT_TIMEOUT,
    MAX_ATTEMPTS,
    MAX_CHILDREN,
    MAX_CONCURRENT,
    MAX_CONFIG_BYTES,
    MAX_CPU,
    MAX_GPU_INDEX,
    MAX_SECONDS,
    MAX_WEIGHT,
    STAGE_OF_TABLE,
    TABLE_OF_STAGE,
    TMP_ROOT_ENV,
    TMP_ROOT_NAME,
    ChildSpec,
    Config,
    ConfigError,
    GpuDriverNotReady,
    OptionValue,
    default_heartbeat_timeout,
    describe_argv,
    effective_timeouts,
    format_cpuset,
    serve_args,
)
from .startup import (
    absent_gpu_warnings,
    build_env,
    check_startable,
    child_env,
    program_problem,
    startup_problems,
)

if TYPE_CHECKING:
    from .damocles_worker import (
        AttachedStore,
        DamoclesWorkerConfig,
        WdPostThread,
        load_damocles_worker_config,
        parse_damocles_worker_config,
    )

#: Read only by `damocles-ext worker`: imported on first use, so that `run` and `serve` (whose
#: ready line has damocles-manager's 5 s to beat) do not load its reader and what it pulls in.
_DAMOCLES_WORKER_NAMES = frozenset(
    {
        "AttachedStore",
        "DamoclesWorkerConfig",
        "WdPostThread",
        "load_damocles_worker_config",
        "parse_damocles_worker_config",
    }
)


def __getattr__(name: str) -> object:
    if name in _DAMOCLES_WORKER_NAMES:
        from . import damocles_worker

        return getattr(damocles_worker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CONF_FILE_NAME",
    "DAMOCLES_WORKER",
    "DEFAULT_CANCEL_GRACE",
    "DEFAULT_CONCURRENT",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_READY_TIMEOUT",
    "DEFAULT_STDIN_TIMEOUT",
    "DEFAULT_WEIGHT",
    "DEFAULT_WINNING_POST_HEARTBEAT_TIMEOUT",
    "MAX_ATTEMPTS",
    "MAX_CHILDREN",
    "MAX_CONCURRENT",
    "MAX_CONFIG_BYTES",
    "MAX_CPU",
    "MAX_GPU_INDEX",
    "MAX_SECONDS",
    "MAX_WEIGHT",
    "STAGE_OF_TABLE",
    "TABLE_OF_STAGE",
    "TMP_ROOT_ENV",
    "TMP_ROOT_NAME",
    "VALID_KEYS",
    "AttachedStore",
    "ChildSpec",
    "Config",
    "ConfigError",
    "DamoclesWorkerConfig",
    "GpuDriverNotReady",
    "GpuProbe",
    "NonNegFloat",
    "NonNegInt",
    "OptionValue",
    "PosFloat",
    "PosInt",
    "WdPostThread",
    "absent_gpu_warnings",
    "build_env",
    "check_startable",
    "child_env",
    "default_heartbeat_timeout",
    "default_tmp_root",
    "describe_argv",
    "detect_gpus",
    "effective_timeouts",
    "format_cpuset",
    "load_conf_dir",
    "load_config",
    "load_damocles_worker_config",
    "parse_config",
    "parse_damocles_worker_config",
    "probe_gpus",
    "program_problem",
    "serve_args",
    "startup_problems",
    "warnings_for",
]
