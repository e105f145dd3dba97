"""Reading ext-prover.cfg: the file, its TOML, and each table into `ChildSpec`s."""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import time
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from ..regular_file import NotRegularFile, open_regular
from . import machine
from .gpu_checks import ORDER, gpu_warnings, winning_waits_for_window
from .keys import _RULES, VALID_KEYS, _Block, _check_block, _check_key, _parse_cpuset
from .messages import _TABLE_ALIASES, _show, _suggest, _syntax_error
from .spec import (
    _SPLIT_TABLES,
    CONF_FILE_NAME,
    DAMOCLES_WORKER,
    DEFAULT_CONCURRENT,
    DEFAULT_READY_TIMEOUT,
    DEFAULT_WEIGHT,
    MAX_CHILDREN,
    MAX_CONFIG_BYTES,
    STAGE_OF_TABLE,
    TMP_ROOT_ENV,
    ChildSpec,
    ClosedOnTheWay,
    Config,
    ConfigError,
    GpuDriverNotReady,
    NotRegularConfig,
    device_locks,
)
from .startup import env_value


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate an ext-prover.cfg file; raise ConfigError listing every problem."""
    source = os.fspath(path)
    return parse_config(read_config_text(source, CONF_FILE_NAME), source)


def read_config_text(
    source: str, kind: str, limit: int = MAX_CONFIG_BYTES, *, what: str = "the config file"
) -> str:
    """A config file's text, at most `limit` bytes of UTF-8; ConfigError says why not (its
    `errno`: that of the OSError that kept the file from being read, if one did;
    NotRegularConfig for a path that is not a regular file).
    `kind` names the file people meant (e.g. "ext-prover.cfg") in the messages, `what` the file
    it could not read ("the store's sectorstore.json"). Only a regular
    file is read (regular_file.open_regular): a FIFO without a writer would hold check-config,
    or serve before its ready line, for ever, and a device's open runs its driver. A lease on it
    (Samba, an NFS delegation) is waited for, as a plain open does (lease-break-time)."""
    try:
        with open(open_regular(source, wait_for_lease=True), "rb") as f:
            # Bounded: a runaway file must not fill the memory.
            data = f.read(limit + 1)
    except NotRegularFile as exc:
        if not stat.S_ISDIR(exc.mode):
            pipe = (
                " (a pipe such as <(command) or /dev/stdin is one)"
                if stat.S_ISFIFO(exc.mode)
                else ""
            )
            message = (
                f"{source}: is {exc.kind}{pipe}, not a regular file, so it is not read (it could"
                f" block or never end); write the {kind} to a file and give its path"
            )
        else:
            hint = (
                f"; to read {os.path.join(source, CONF_FILE_NAME)} use --conf-dir {source}"
                if kind == CONF_FILE_NAME
                else f"; give the path of the {kind} file"
            )
            message = f"{source}: is a directory, not a config file{hint}"
        raise NotRegularConfig(source, [message]) from None
    except FileNotFoundError as exc:
        raise ConfigError(
            source,
            [f"{source}: cannot read {what}: no such file (check the path)"],
            errno=exc.errno,
        ) from None
    except PermissionError as exc:
        if _closed_on_the_way(source):
            why = (
                "a directory on its path is closed to this user (check the mode and owner of"
                " the directories above it)"
            )
            raise ClosedOnTheWay(
                source, [f"{source}: cannot read {what}: {why}"], errno=exc.errno
            ) from None
        why = "permission denied (check its mode and owner)"
        raise ConfigError(
            source, [f"{source}: cannot read {what}: {why}"], errno=exc.errno
        ) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            source, [f"{source}: cannot read {what}: {reason}"], errno=exc.errno
        ) from None
    if len(data) > limit:
        raise ConfigError(
            source,
            [
                (
                    f"{source}: larger than {limit // 1024} KiB, which no {kind} "
                    f"needs; is it the right file?"
                )
            ],
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source,
            [f"{source}: not UTF-8 text (bad byte at offset {exc.start}); TOML files are UTF-8"],
        ) from None


def _closed_on_the_way(path: str) -> bool:
    """Whether a directory on the way to `path` keeps this user out, rather than the file's own
    mode (asked once its open was refused, for what the message says)."""
    try:
        os.stat(path)
    except PermissionError:
        return True
    except OSError:
        pass
    return False


def load_conf_dir(directory: str | os.PathLike[str]) -> Config:
    """Read DIR/ext-prover.cfg, as damocles-manager does with `--conf-dir DIR`. The file is opened
    once, not looked at first; a ConfigError carries the errno of what kept DIR or the file from
    being read."""
    source = os.fspath(directory)
    path = os.fspath(Path(source) / CONF_FILE_NAME)
    try:
        is_dir = stat.S_ISDIR(os.stat(source).st_mode)
    except FileNotFoundError as exc:
        raise ConfigError(
            source, [f"{source}: config directory does not exist (check the path)"], errno=exc.errno
        ) from None
    except OSError as exc:  # a directory above it this user may not enter
        raise ConfigError(
            source,
            [f"{source}: cannot look at the config directory: {_unusable(exc)}"],
            errno=exc.errno,
        ) from None
    if not is_dir:
        raise ConfigError(
            source, [f"{source}: is a file, not a directory; to read this file use -c {source}"]
        )
    try:
        text = read_config_text(path, CONF_FILE_NAME)
    except ConfigError as exc:
        if exc.errno != errno.ENOENT:  # (DIR closed to this user: said by read_config_text)
            raise
        missing = f"no such file (--conf-dir DIR reads DIR/{CONF_FILE_NAME})"
        raise ConfigError(
            path, [f"{path}: cannot read the config file: {missing}"], errno=exc.errno
        ) from None
    return parse_config(text, path)


def _unusable(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied (check the mode and owner of its directories)"
    return exc.strerror or str(exc)


def strip_bom(text: str) -> str:
    """`text` without a leading UTF-8 byte order mark, which an editor may put there: damocles'
    TOML readers (BurntSushi's in damocles-manager, toml_edit in damocles-worker) skip it, while
    tomllib would refuse the file on its first character."""
    return text.removeprefix("\ufeff")


def parse_toml(text: str, source: str, *, nested_hint: str = "") -> dict[str, Any]:
    """A config file's TOML document; ConfigError saying where it is not TOML, or what cannot be
    read (`nested_hint` follows the message about arrays nested too deep)."""
    try:
        return tomllib.loads(strip_bom(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [_syntax_error(text, source, exc)]) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(
            source, [f"{source}: arrays or inline tables are nested too deep to read{nested_hint}"]
        ) from None
    except ValueError as exc:  # tomllib's int() of a number of thousands of digits
        what = (
            "a number has thousands of digits; no key takes one so large"
            if "digits" in str(exc)
            else f"a value cannot be read: {exc}"
        )
        raise ConfigError(source, [f"{source}: {what}"]) from None


def parse_config(text: str, source: str, *, tmp_root: str | None = None) -> Config:
    """Validate ext-prover.cfg text; `source` names it in messages. Raises ConfigError."""
    doc = parse_toml(
        text,
        source,
        nested_hint=(
            ' (hundreds of levels); an ext-prover.cfg needs two at most (e.g. Envs = { A = "1" }).'
            " Look for a run of [ or {"
        ),
    )

    errors: list[str] = []
    if tmp_root is None:
        tmp_root = os.environ.get(TMP_ROOT_ENV) or machine.default_tmp_root()
        if not os.path.isabs(tmp_root):
            errors.append(
                f"environment variable {TMP_ROOT_ENV}: expected an absolute path, "
                f"found {_show(tmp_root)}"
            )
    builder = _Builder(tmp_root=tmp_root.rstrip("/") or "/")

    doc, folding = _fold_case(doc, STAGE_OF_TABLE, "the file")
    errors.extend(folding)
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
            if (
                blocks
                and all(isinstance(v, dict) for v in blocks.values())
                and not _has_header(text, table)  # ([WdPost] then [WdPost.Envs]: single table)
            ):
                # Only [WdPost.Envs]-like sub-tables: their [[WdPost]] line is missing, and
                # TOML made [WdPost] of them.
                names = ", ".join(f"[{table}.{key}]" for key in blocks)
                errors.append(
                    f"{table}: {names} with no [[{table}]] before it; a sub-table belongs to"
                    f" the [[{table}]] table above it: add that line"
                )
                continue
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
    if errors and all(e in builder.not_ready for e in errors):
        raise GpuDriverNotReady(source, errors)  # nothing to fix in the file: exit 75, not 2
    if errors:
        raise ConfigError(source, errors)
    return Config(
        source=source,
        children=builder.children,
        warnings=[w for _, w in builder.warnings] + gpu_warnings(builder.children),
        scoped_warnings=builder.warnings,
        tmp_root=tmp_root,
        run_warnings=winning_waits_for_window(builder.children),
        gpus_found=None if builder.gpus is None else list(builder.gpus.gpus),
    )


def warnings_for(config: Config, children: list[ChildSpec]) -> list[str]:
    """`config.warnings` as they are for a process that starts only `children` of it (`worker`
    starts no [[WinPost]] child): those about the other tables left out, and what children share
    through their GPUs found among these children only."""
    started = {(child.stage, child.block) for child in children}
    kept = [w for scope, w in config.scoped_warnings if scope is None or scope in started]
    return kept + gpu_warnings(children)


def _has_header(text: str, table: str) -> bool:
    """Whether `text` has a [table] header line (single brackets), in any case."""
    header = rf"^[ \t]*\[[ \t]*{re.escape(table)}[ \t]*\]"
    return re.search(header, strip_bom(text), re.MULTILINE | re.IGNORECASE) is not None


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


def _fold_case(
    raw: dict[str, Any], names: Iterable[str], where: str
) -> tuple[dict[str, Any], list[str]]:
    """`raw` with each key that is one of `names` but for its case written as that name, as
    damocles' TOML decoder (BurntSushi's) matches a key to a field: `bin` is `Bin`. A name
    written twice (`Bin` and `bin`) is an error: damocles would keep one of them."""
    canonical = {name.lower(): name for name in names}
    folded: dict[str, Any] = {}
    spelt: dict[str, str] = {}
    errors: list[str] = []
    for key, value in raw.items():
        name = key if key in canonical.values() else canonical.get(key.lower(), key)
        if name in spelt:
            errors.append(
                f"{where}: '{name}' written twice, as '{spelt[name]}' and '{key}' (key names do not"
                " depend on case, as damocles reads them): keep one"
            )
            continue
        spelt[name] = key
        folded[name] = value
    return folded, errors


class _Builder:
    def __init__(self, tmp_root: str) -> None:
        self.tmp_root = tmp_root
        self.children: list[ChildSpec] = []
        # Each with the (stage, block) of the table it is about, None for the file's.
        self.warnings: list[tuple[tuple[str, int] | None, str]] = []
        self._next_index = dict.fromkeys(STAGE_OF_TABLE.values(), 0)
        self.gpus: machine.GpuProbe | None = None
        self.partial_said = False  # a GPU listing cut short by an error, warned once
        # The errors that only say the GPU driver did not answer (yet): a later start may pass.
        self.not_ready: list[str] = []

    def _warn(self, scope: tuple[str, int] | None, text: str) -> None:
        """Keep `text`, a warning about the table of (stage, block) `scope`, or the file's."""
        self.warnings.append((scope, text))

    def _detected_gpus(self, where: str) -> machine.GpuProbe:
        if self.gpus is None:  # once per file: nvidia-smi is slow
            started = time.monotonic()
            self.gpus = machine.probe_gpus()
            took = time.monotonic() - started
            if took > machine.SLOW_GPU_PROBE:
                # Without the driver's persistence mode, each start of NVML or nvidia-smi brings
                # the GPUs up: seconds per machine, before `serve`'s ready line.
                self._warn(
                    None,
                    f'{where}.Gpus: "all" took {took:.1f} s to find the GPUs, and `serve` says'
                    " ready only after it: damocles-manager waits 5 s (its ReadyTimeoutSecs) and"
                    " fails its start past that. Turn on the driver's persistence mode"
                    " (nvidia-persistenced, or nvidia-smi -pm 1), which makes it quick, or list"
                    " the GPUs, e.g. Gpus = [0, 1]",
                )
        return self.gpus

    def add_block(self, table: str, stage: str, block_index: int, raw: dict[str, Any]) -> list[str]:
        where = f"{table}[{block_index}]"
        scope = (stage, block_index)
        raw, errors = _fold_case(raw, _RULES, where)
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
        argv, kind = self._program(where, scope, block)
        gpus: list[int | None] = [None]
        if block.gpus == "all":
            probe = self._detected_gpus(where)
            asked = "".join("; " + r for r in probe.reasons)
            if not probe.gpus and probe.answered:
                return [
                    (
                        f'{where}.Gpus: "all" found no GPU (asked NVML and `nvidia-smi -L`{asked});'
                        f" list the GPUs, e.g. Gpus = [0, 1], or remove Gpus"
                    )
                ]
            if not probe.gpus:
                if probe.advice is not None:  # not a driver still loading: say what is
                    self.not_ready.append(
                        f'{where}.Gpus: "all" cannot list the GPUs (asked NVML and `nvidia-smi'
                        f" -L`{asked}): {probe.advice}. The exit code is 75 (EX_TEMPFAIL), so"
                        " that a restart (Restart=on-failure in the systemd units) tries again"
                    )
                    return self.not_ready[-1:]
                self.not_ready.append(
                    f'{where}.Gpus: "all" cannot list the GPUs: the NVIDIA driver does not answer'
                    f" (asked NVML and `nvidia-smi -L`{asked}). Right after a boot it may not be"
                    " loaded yet: the exit code is 75 (EX_TEMPFAIL), not 2, so that a restart"
                    " (Restart=on-failure in the systemd units) tries again until it answers."
                    " If this machine has no NVIDIA driver or GPU, list the GPUs, e.g."
                    " Gpus = [0, 1], or remove Gpus"
                )
                return self.not_ready[-1:]
            gpus = list(probe.gpus)
            if probe.partial is not None and not self.partial_said:
                self.partial_said = True
                self._warn(
                    scope,  # (said once, for the first table of Gpus = "all")
                    f'{where}.Gpus: "all" takes only the GPUs listed,'
                    f" {', '.join(map(str, gpus))}, as the driver said ({probe.partial})",
                )
        elif block.gpus is not None:
            gpus = list(block.gpus)
        if block.gpus is not None and "CUDA_VISIBLE_DEVICES" in block.envs:
            self._warn(
                scope,
                f"{where}: Envs sets CUDA_VISIBLE_DEVICES, which overrides Gpus: all "
                f"{len(gpus)} children get CUDA_VISIBLE_DEVICES="
                f"{block.envs['CUDA_VISIBLE_DEVICES']}; remove one of the two",
            )
        if block.heartbeat_timeout_secs and block.protocol == "jsonl":
            self._warn(
                scope,
                f'{where}: HeartbeatTimeoutSecs has no effect with Protocol = "jsonl" '
                f"(damocles' JSON lines carry no progress)",
            )

        for gpu in gpus:
            envs = dict(block.envs)
            private_tmpdir = gpu is not None and "TMPDIR" not in envs
            if gpu is not None:
                if "CUDA_VISIBLE_DEVICES" not in envs and (
                    env_value(block.inherit_envs, envs, ORDER) is None
                ):
                    # Gpus numbers the GPUs as nvidia-smi and NVML do, by PCI bus; CUDA's own
                    # default numbers them fastest first, another GPU on a mixed machine.
                    envs[ORDER] = "PCI_BUS_ID"
                envs.setdefault("CUDA_VISIBLE_DEVICES", str(gpu))
                envs.setdefault("TMPDIR", os.path.join(self.tmp_root, f"{stage}-gpu{gpu}") + "/")
            child = self._child(stage, block_index, block, argv, kind, envs, cpuset)
            if private_tmpdir:
                child = msgspec.structs.replace(child, private_tmpdir=True)
            self.children.append(child)
        return []

    def _program(
        self, where: str, scope: tuple[str, int], block: _Block
    ) -> tuple[tuple[str, ...], str]:
        stage = scope[0]
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
            # PluginOptions go in the child's environment (options.OPTIONS_ENV, startup's
            # child_env), not here: anyone may read a command line, and an option may be a secret.
            return tuple(argv), "plugin"
        # damocles' default. damocles looks next to its own binary; we have none, so PATH.
        if block.args is not None:
            self._warn(
                scope,
                f"{where}: Args is ignored because Bin is not set (damocles does the same and "
                f"runs `{DAMOCLES_WORKER} processor {stage}`); set Bin to use Args",
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
        if block.gpu_lock:
            locks += device_locks(gpu)
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
