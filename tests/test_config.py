"""ext-prover.cfg parsing, validation, Gpus expansion and `damocles-ext check-config`.

Fixtures live in tests/configs/: the seed's configs (which must parse unchanged) and, in bad/,
one malformed config per file with the message it must produce (BAD_CONFIGS below).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers.kept_out import a_closed_directory, said_when_kept_out

from damocles_ext import cli, config
from damocles_ext.config import (
    ChildSpec,
    ConfigError,
    format_cpuset,
    load_conf_dir,
    load_config,
    parse_config,
    startup,
)
from damocles_ext.config.startup import format_problem
from damocles_ext.errors import EXIT_USAGE, UsageError

CONFIGS = Path(__file__).parent / "configs"
BAD = CONFIGS / "bad"
EXAMPLE = Path(__file__).parent.parent / "ext-prover.cfg.example"


@pytest.fixture(autouse=True)
def _no_gpus_and_default_tmp_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # GPU detection is the one thing replaced: the machine's GPUs must not change the results.
    no_gpu = config.GpuProbe([], [], answered=True)
    monkeypatch.setattr(config.machine, "probe_gpus", lambda: no_gpu)
    monkeypatch.delenv(config.TMP_ROOT_ENV, raising=False)


@pytest.fixture
def damocles_worker_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `damocles-worker` first on PATH, for the seed configs that run damocles' default."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    worker = bin_dir / "damocles-worker"
    worker.write_text("#!/bin/sh\nexit 0\n")
    worker.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return worker


def parse(text: str, **kw: object) -> config.Config:
    return parse_config(text, "test.cfg", **kw)  # type: ignore[arg-type]


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.errors


def run_cli_subprocess(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "damocles_ext", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


# ---------------------------------------------------------------------------------------------
# The seed's configs parse unchanged


def test_seed_8gpu_deployment_gives_8_window_post_children_one_per_gpu() -> None:
    cfg = load_config(CONFIGS / "seed-8gpu.cfg")
    assert [c.name for c in cfg.children] == [f"window_post#{i}" for i in range(8)]
    for i, child in enumerate(cfg.children):
        assert child.stage == "window_post"
        assert (child.index, child.block) == (i, i)
        assert child.envs == {"CUDA_VISIBLE_DEVICES": str(i), "TMPDIR": f"/tmp/ext-prover{i}/"}
        assert child.argv == ("damocles-worker", "processor", "window_post")
        assert child.kind == "damocles-worker"
        assert (child.concurrent, child.weight, child.ready_timeout) == (1, 1, 5.0)
        assert child.gpu == str(i)
        assert child.locks == (f"gpu:{i}",)


def test_seed_commented_default_file_starts_one_default_child_per_stage() -> None:
    cfg = load_config(CONFIGS / "seed-default-commented.cfg")
    assert [(c.stage, c.kind, c.argv) for c in cfg.children] == [
        ("window_post", "damocles-worker", ("damocles-worker", "processor", "window_post")),
        ("winning_post", "damocles-worker", ("damocles-worker", "processor", "winning_post")),
    ]
    for child in cfg.children:
        assert child.envs == {}
        assert (child.concurrent, child.weight, child.ready_timeout) == (1, 1, 5.0)
        assert (child.protocol, child.inherit_envs, child.auto_restart) == ("auto", True, True)
        assert (child.max_attempts, child.cancel_grace) == (2, 10.0)
        assert (child.request_timeout, child.heartbeat_timeout, child.cpuset) == (None, None, None)
        assert (child.locks, child.gpu, child.plugin, child.plugin_options) == ((), None, None, {})


def test_seed_venus_default_file_parses() -> None:
    cfg = load_config(CONFIGS / "seed-default-venus.cfg")
    assert [c.name for c in cfg.children] == ["window_post#0"]


def test_seed_default_file_with_every_damocles_key_set() -> None:
    cfg = load_config(CONFIGS / "seed-default-set.cfg")
    assert len(cfg.children) == 2
    for child, stage in zip(cfg.children, ("window_post", "winning_post"), strict=True):
        assert child.stage == stage
        assert child.kind == "bin"
        assert child.argv == ("/path/to/custom/bin", "args1", "args2", "args3")
        assert child.envs == {"ENV_KEY": "ENV_VAL"}
        assert (child.concurrent, child.weight, child.ready_timeout) == (1, 1, 5.0)
    # The example path does not exist here: the file is good, but its children cannot start.
    # Both keep bellperson's lock files in one TMPDIR (neither sets it): only that is said.
    assert [w.split(" and ")[0] for w in cfg.warnings] == ["WinPost[0]: winning_post#0"]
    assert config.startup_problems(cfg.children) == [
        f'{table}[0].Bin: "/path/to/custom/bin" does not exist; give the path of the prover program'
        for table in ("WdPost", "WinPost")
    ]


def test_seed_wdpost_master_deployment_keeps_its_values() -> None:
    (child,) = load_config(CONFIGS / "seed-wdpost-master.cfg").children
    assert child.argv == (
        "/root/venus-cluster/dist/bin/wdpost-master-daemon",
        "-c",
        "/root/venus-cluster/dist/bin/wdpost_master.toml",
    )
    assert child.concurrent == 50
    assert child.envs == {"RUST_LOG": "info"}


# ---------------------------------------------------------------------------------------------
# damocles' keys and defaults


def test_zero_means_damocles_default_for_concurrent_weight_and_ready_timeout() -> None:
    (child,) = parse("[[WdPost]]\nConcurrent = 0\nWeight = 0\nReadyTimeoutSecs = 0\n").children
    assert (child.concurrent, child.weight, child.ready_timeout) == (1, 1, 5.0)


def test_a_file_starting_with_a_utf8_byte_order_mark_is_read_as_damocles_reads_it(
    tmp_path: Path,
) -> None:
    # An editor that writes a BOM: damocles-manager's TOML reader skips it, so must we.
    path = tmp_path / "ext-prover.cfg"
    path.write_bytes(b'\xef\xbb\xbf[[WdPost]]\nBin = "/bin/true"\nConcurrent = 2\n')
    (child,) = load_config(path).children
    assert (child.argv, child.concurrent) == (("/bin/true",), 2)


def test_a_conf_dir_this_user_may_not_enter_is_a_config_error_not_a_traceback() -> None:
    with a_closed_directory() as closed:
        inside = said_when_kept_out(lambda: config.load_conf_dir(closed))
        below = said_when_kept_out(lambda: config.load_conf_dir(closed / "sub"))
    assert inside == (  # (a ConfigError that says so)
        f"ClosedOnTheWay: {closed}/ext-prover.cfg: cannot read the config file: a directory on its"
        " path is closed to this user (check the mode and owner of the directories above it)"
    )
    assert below == (
        f"ConfigError: {closed}/sub: cannot look at the config directory: permission denied"
        " (check the mode and owner of its directories)"
    )


def test_a_conf_dir_error_carries_the_errno_of_what_kept_the_file_from_being_read(
    tmp_path: Path,
) -> None:
    # ConfigError says it carries the errno of the OSError that kept its file from being read;
    # load_conf_dir's own look at DIR and at DIR/ext-prover.cfg gave none.
    def errno_of(directory: Path) -> str:
        try:
            load_conf_dir(directory)
        except ConfigError as exc:
            raise LookupError(errno.errorcode.get(exc.errno or 0, exc.errno)) from None
        return "read"

    for directory in (tmp_path / "missing", tmp_path):
        with pytest.raises(LookupError, match=r"^ENOENT$"):
            errno_of(directory)
    with a_closed_directory() as closed:
        for directory in (closed, closed / "sub"):
            said = said_when_kept_out(lambda d=directory: errno_of(d))
            assert said == "LookupError: EACCES", said


def test_a_sub_table_without_its_array_table_line_says_that_line_is_missing() -> None:
    # Before: "written as a single table [WdPost]", a table the file does not hold.
    assert errors_of('[WdPost.Envs]\nA = "1"\n[[WinPost]]\nPlugin = "echo"\n') == [
        (
            "WdPost: [WdPost.Envs] with no [[WdPost]] before it; a sub-table belongs to the"
            " [[WdPost]] table above it: add that line"
        )
    ]


@pytest.mark.parametrize(
    "text", ['[WdPost]\n[WdPost.Envs]\nA = "1"\n', '[WdPost]\nEnvs = { A = "1" }\n']
)
def test_a_single_table_holding_only_envs_is_told_to_use_double_brackets(text: str) -> None:
    # Its [WdPost] line is there: "add a [[WdPost]] line" would give a file TOML refuses.
    assert errors_of(text) == [
        (
            "WdPost: written as a single table [WdPost]; write [[WdPost]] (double brackets), one"
            " per child"
        )
    ]


def test_damocles_keys_take_their_values() -> None:
    (child,) = parse(
        '[[WinPost]]\nBin = "/bin/true"\nArgs = ["a", "b c"]\nConcurrent = 3\nWeight = 7\n'
        'ReadyTimeoutSecs = 12\nEnvs = { RUST_LOG = "debug" }\n'
    ).children
    assert child.name == "winning_post#0"
    assert child.argv == ("/bin/true", "a", "b c")
    assert (child.concurrent, child.weight, child.ready_timeout) == (3, 7, 12.0)
    assert child.envs == {"RUST_LOG": "debug"}


def test_bin_without_args_runs_bare_program_and_relative_bin_is_kept_as_written() -> None:
    cfg = parse('[[WdPost]]\nBin = "./my-prover"\n[[WdPost]]\nBin = "sh"\n')
    assert [c.argv for c in cfg.children] == [("./my-prover",), ("sh",)]
    (problem,) = config.startup_problems(cfg.children)  # sh is on PATH
    assert problem.startswith('WdPost[0].Bin: "./my-prover" does not exist')


def test_indices_count_within_each_stage_in_file_order() -> None:
    cfg = parse(
        '[[WinPost]]\nBin = "sh"\n[[WdPost]]\nBin = "sh"\n[[WinPost]]\nBin = "sh"\n'
        '[[WdPost]]\nBin = "sh"\n'
    )
    names = sorted((c.stage, c.index, c.block) for c in cfg.children)
    assert names == [
        ("window_post", 0, 0),
        ("window_post", 1, 1),
        ("winning_post", 0, 0),
        ("winning_post", 1, 1),
    ]


# ---------------------------------------------------------------------------------------------
# Program resolution


def test_plugin_child_runs_builtin_runtime_with_options_as_text() -> None:
    (child,) = parse(
        '[[WdPost]]\nPlugin = "sleep"\n'
        '[WdPost.PluginOptions]\nseconds = 0.5\nfail = "every:3"\nload_fail = false\nn = 4\n'
    ).children
    assert child.kind == "plugin"
    assert child.plugin == "sleep"
    assert child.plugin_options == {"seconds": 0.5, "fail": "every:3", "load_fail": False, "n": 4}
    assert child.argv == (
        sys.executable, "-m", "damocles_ext", "child", "window_post", "--plugin", "sleep",
    )  # fmt: skip
    # The options go in its environment: JSON, typed, ASCII whatever the locale.
    from damocles_ext.config.startup import child_env
    from damocles_ext.options import OPTIONS_ENV

    assert json.loads(child_env(child)[OPTIONS_ENV]) == child.plugin_options


def test_plugin_child_is_told_its_protocol_unless_auto() -> None:
    cfg = parse('[[WinPost]]\nPlugin = "echo"\nProtocol = "jsonl"\n[[WinPost]]\nPlugin = "echo"\n')
    jsonl, auto = cfg.children
    assert jsonl.argv[-2:] == ("--protocol", "jsonl")
    assert jsonl.protocol == "jsonl"
    assert "--protocol" not in auto.argv


def test_plugin_argv_runs_the_child_subcommand_of_this_package() -> None:
    (child,) = parse('[[WdPost]]\nPlugin = "echo"\n').children
    # The argv is runnable as is: `-m damocles_ext` reaches the CLI, whose parser knows `child`
    # once it exists; here check only that the interpreter and module are ours.
    assert child.argv[:4] == (sys.executable, "-m", "damocles_ext", "child")
    assert os.path.exists(child.argv[0])


def test_no_bin_nor_plugin_runs_damocles_worker_and_cannot_start_when_it_is_not_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = parse("[[WdPost]]\n[[WinPost]]\n")
    assert [c.argv for c in cfg.children] == [
        ("damocles-worker", "processor", "window_post"),
        ("damocles-worker", "processor", "winning_post"),
    ]
    assert [w.split(" keep ")[1][:28] for w in cfg.warnings] == ["bellperson's GPU lock files "]
    problems = config.startup_problems(cfg.children)
    assert [p.split(":")[0] for p in problems] == ["WdPost[0]", "WinPost[0]"]
    assert problems[0] == (
        "WdPost[0]: no Bin or Plugin, so the child runs damocles' default `damocles-worker "
        f"processor window_post`, but damocles-worker is not found on PATH ({tmp_path}); set "
        "Bin or Plugin, or put damocles-worker on PATH"
    )


def test_no_warning_when_damocles_worker_is_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = tmp_path / "damocles-worker"
    worker.write_text("#!/bin/sh\nexit 0\n")
    worker.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert parse("[[WdPost]]\n").warnings == []


def test_args_without_bin_is_ignored_like_damocles_with_a_warning() -> None:
    cfg = parse('[[WdPost]]\nArgs = ["--fast"]\n')
    assert cfg.children[0].argv == ("damocles-worker", "processor", "window_post")
    assert any("WdPost[0]: Args is ignored because Bin is not set" in w for w in cfg.warnings)


# ---------------------------------------------------------------------------------------------
# Our keys


def test_our_keys_are_parsed_into_the_child_spec() -> None:
    (child,) = parse(
        '[[WdPost]]\nBin = "sh"\nProtocol = "dext"\nCpuset = "10-19,24"\nInheritEnvs = false\n'
        "AutoRestart = false\nMaxAttempts = 5\nRequestTimeoutSecs = 1800\n"
        'HeartbeatTimeoutSecs = 2.5\nCancelGraceSecs = 0\nLocks = ["nvme0", "nvme0", "net"]\n'
    ).children
    assert child.protocol == "dext"
    assert child.cpuset == frozenset([*range(10, 20), 24])
    assert (child.inherit_envs, child.auto_restart, child.max_attempts) == (False, False, 5)
    assert (child.request_timeout, child.heartbeat_timeout, child.cancel_grace) == (
        1800.0,
        2.5,
        0.0,
    )
    assert child.locks == ("nvme0", "net")


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("0-3", {0, 1, 2, 3}), ("10-19,24", {*range(10, 20), 24}), ("5-5, 7", {5, 7})],
)
def test_cpuset_syntax(text: str, cpus: set[int]) -> None:
    (child,) = parse(f'[[WdPost]]\nBin = "sh"\nCpuset = "{text}"\n').children
    assert child.cpuset == frozenset(cpus)


def test_format_cpuset_writes_ranges() -> None:
    assert format_cpuset(frozenset([*range(10, 20), 24, 0, 2, 3])) == "0,2-3,10-19,24"


def test_heartbeat_timeout_with_jsonl_is_a_warning() -> None:
    cfg = parse('[[WdPost]]\nBin = "sh"\nProtocol = "jsonl"\nHeartbeatTimeoutSecs = 10\n')
    assert any("HeartbeatTimeoutSecs has no effect" in w for w in cfg.warnings)


# ---------------------------------------------------------------------------------------------
# Gpus expansion and GPU locks


def test_gpus_in_three_lines_expands_like_the_seed_8gpu_deployment() -> None:
    seed = load_config(CONFIGS / "seed-8gpu.cfg").children
    short = load_config(CONFIGS / "seed-8gpu-gpus.cfg").children
    assert len(short) == 8

    def without_tmpdir_and_block(c: ChildSpec) -> dict:
        d = {f: getattr(c, f) for f in c.__struct_fields__ if f not in ("block", "private_tmpdir")}
        d["envs"] = {k: v for k, v in c.envs.items() if k not in ("TMPDIR", "CUDA_DEVICE_ORDER")}
        return d

    assert [without_tmpdir_and_block(c) for c in short] == [
        without_tmpdir_and_block(c) for c in seed
    ]
    assert [c.envs["TMPDIR"] for c in short] == [
        f"{config.default_tmp_root()}/window_post-gpu{i}/" for i in range(8)
    ]
    assert {c.block for c in short} == {0}
    # Gpus number the GPUs as nvidia-smi does; the seed's Envs leave CUDA's order, as damocles.
    assert [c.envs.get("CUDA_DEVICE_ORDER") for c in short] == ["PCI_BUS_ID"] * 8
    assert [c.envs.get("CUDA_DEVICE_ORDER") for c in seed] == [None] * 8
    # The TMPDIRs Gpus made are the supervisor's to keep private; the seed's, from Envs, are not.
    assert [c.private_tmpdir for c in short] == [True] * 8
    assert [c.private_tmpdir for c in seed] == [False] * 8


def test_gpus_tmp_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.TMP_ROOT_ENV, "/var/tmp/dext/")
    cfg = parse('[[WinPost]]\nBin = "sh"\nGpus = [3]\n')
    assert cfg.tmp_root == "/var/tmp/dext/"
    assert cfg.children[0].envs["TMPDIR"] == "/var/tmp/dext/winning_post-gpu3/"
    assert cfg.children[0].private_tmpdir


def test_the_default_tmp_root_is_one_no_other_user_can_make_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not the fixed /tmp/damocles-ext that anyone could create before us: root's is in /run;
    # another user's in their own XDG_RUNTIME_DIR, if it is theirs (not one kept across sudo).
    if config.machine._private_runtime_dir("/run", 0):
        assert config.default_tmp_root({}, euid=0) == "/run/damocles-ext"
    uid = os.geteuid()
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    not_ours = config.default_tmp_root({"XDG_RUNTIME_DIR": str(xdg)}, euid=uid + 1)
    assert not_ours != f"{xdg}/damocles-ext"
    if uid != 0:
        assert config.default_tmp_root({"XDG_RUNTIME_DIR": str(xdg)}) == f"{xdg}/damocles-ext"
    else:
        os.chown(xdg, 1000, 1000)
        assert config.default_tmp_root({"XDG_RUNTIME_DIR": str(xdg)}, euid=1000) == (
            f"{xdg}/damocles-ext"
        )
        os.chmod(xdg, 0o777)  # theirs, but others may write to it
        assert config.default_tmp_root({"XDG_RUNTIME_DIR": str(xdg)}, euid=1000) != (
            f"{xdg}/damocles-ext"
        )


def test_without_a_runtime_directory_the_tmp_root_is_a_random_one_for_this_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config.machine, "_per_run_tmp_root", None)
    first = config.default_tmp_root({}, euid=4242)
    again = config.default_tmp_root({"XDG_RUNTIME_DIR": "relative/dir"}, euid=4242)
    assert first == again  # every parse of one process agrees
    assert os.path.dirname(first) == tempfile.gettempdir()
    assert re.fullmatch(r"damocles-ext-4242-[0-9a-f]{16}", os.path.basename(first))
    assert not os.path.exists(first)  # made by the supervisor, 0700, when a child needs it
    monkeypatch.setattr(config.machine, "_per_run_tmp_root", None)
    assert config.default_tmp_root({}, euid=4242) != first


def test_relative_tmp_root_in_the_environment_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.TMP_ROOT_ENV, "tmp/dext")
    (error,) = errors_of('[[WinPost]]\nBin = "sh"\nGpus = [3]\n')
    assert 'DAMOCLES_EXT_TMP_ROOT: expected an absolute path, found "tmp/dext"' in error


def test_gpus_keep_envs_values_when_envs_sets_them() -> None:
    cfg = parse(
        '[[WdPost]]\nBin = "sh"\nGpus = [0, 1]\n'
        '[WdPost.Envs]\nTMPDIR = "/scratch/shared/"\nRUST_LOG = "info"\n'
    )
    kept = {"TMPDIR": "/scratch/shared/", "RUST_LOG": "info", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert [c.envs for c in cfg.children] == [
        {**kept, "CUDA_VISIBLE_DEVICES": "0"},
        {**kept, "CUDA_VISIBLE_DEVICES": "1"},
    ]
    assert not any(c.private_tmpdir for c in cfg.children)  # shared on purpose: left as it is
    [warning] = cfg.warnings  # and what it costs is said: the GPUs' WindowPoSts take turns
    assert "run on different GPUs" in warning and "TMPDIR /scratch/shared/" in warning


def test_gpus_number_the_gpus_as_nvidia_smi_does_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CUDA numbers GPUs fastest first unless CUDA_DEVICE_ORDER says PCI_BUS_ID; nvidia-smi and
    # NVML (where Gpus = "all" and an operator's list come from) number them by PCI bus. On a
    # machine with two GPU models, Gpus = [1] would otherwise run on nvidia-smi's GPU 0.
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)

    def orders(text: str) -> list[str | None]:
        return [c.envs.get("CUDA_DEVICE_ORDER") for c in parse(text).children]

    assert orders('[[WdPost]]\nBin = "sh"\nGpus = [0, 1]\n') == ["PCI_BUS_ID"] * 2
    # The operator's own order, in Envs or in the environment damocles-ext runs with, is kept.
    assert orders(
        '[[WdPost]]\nBin = "sh"\nGpus = [0]\nEnvs = { CUDA_DEVICE_ORDER = "FASTEST_FIRST" }\n'
    ) == ["FASTEST_FIRST"]
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    assert orders('[[WdPost]]\nBin = "sh"\nGpus = [0]\n') == [None]  # inherited
    assert orders('[[WdPost]]\nBin = "sh"\nGpus = [0]\nInheritEnvs = false\n') == ["PCI_BUS_ID"]
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    # damocles' own way (an index in Envs) runs as damocles runs it; so does no GPU at all.
    assert orders('[[WdPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "1" }\n') == [None]
    assert orders('[[WdPost]]\nBin = "sh"\n') == [None]


def test_an_index_in_envs_beside_gpus_is_warned_to_number_the_gpus_the_same_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    text = (
        '[[WdPost]]\nBin = "sh"\nGpus = [0, 1]\n'
        '[[WinPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "1" }\n'
    )
    (warning,) = [w for w in parse(text).warnings if "CUDA_DEVICE_ORDER" in w]
    assert warning.startswith("winning_post#0: its CUDA_VISIBLE_DEVICES=1 counts the GPUs in")
    assert "window_post#0's Gpus count them as nvidia-smi does" in warning
    assert 'add CUDA_DEVICE_ORDER = "PCI_BUS_ID" to its Envs, or give it Gpus instead' in warning
    # Numbered the same way (in Envs or inherited), by UUID, or without Gpus beside: nothing said.
    for quiet in (
        text.replace('"1" }', '"1", CUDA_DEVICE_ORDER = "PCI_BUS_ID" }'),
        text.replace('"1" }', '"GPU-8932f937" }'),
        text.replace("Gpus = [0, 1]", 'Envs = { CUDA_VISIBLE_DEVICES = "0" }'),
    ):
        assert not [w for w in parse(quiet).warnings if "CUDA_DEVICE_ORDER" in w], quiet
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert not [w for w in parse(text).warnings if "CUDA_DEVICE_ORDER" in w]


def test_gpus_with_cuda_visible_devices_in_envs_warns_that_envs_wins() -> None:
    cfg = parse('[[WdPost]]\nBin = "sh"\nGpus = [0, 1]\nEnvs = { CUDA_VISIBLE_DEVICES = "5" }\n')
    assert [c.gpu for c in cfg.children] == ["5", "5"]
    assert any("Envs sets CUDA_VISIBLE_DEVICES, which overrides Gpus" in w for w in cfg.warnings)


def test_a_winning_post_table_sharing_a_gpu_lock_with_window_post_is_warned_about() -> None:
    # With both GPUs busy proving WindowPoSt, a WinningPoSt waited for a GPU past its ~20 s
    # budget, and check-config said nothing; the advice (GpuLock = false) was only in the docs.
    text = '[[WdPost]]\nBin = "sh"\nGpus = [0, 1]\n[[WinPost]]\nBin = "sh"\nGpus = [1, 2]\n'
    # The lock is the supervisor's: said for `run`, which runs both stages in one supervisor.
    assert parse(text).run_warnings == [
        (
            "WinPost[0]: winning_post#0 shares the lock gpu:1 with window_post#1 in `run` (one"
            " supervisor for both stages; each `serve` has its own locks), so a WinningPoSt waits"
            " for the WindowPoSt requests on that GPU, past its ~20 s budget when they are long;"
            " set GpuLock = false in this table if the GPU's memory holds both proofs, or give"
            " WinningPoSt a GPU of its own"
        )
    ]
    assert parse(text).warnings == []
    assert parse(text + "GpuLock = false\n").run_warnings == []
    assert parse(text.replace("[1, 2]", "[2, 3]")).run_warnings == []


def test_the_gpu_lock_warning_is_logged_by_run_not_by_a_serve_of_one_stage(tmp_path, caplog):
    # damocles-manager starts one `serve` per stage: each has a scheduler (and its locks) of its
    # own, and each logged this warning at every start, though it could not happen there.
    import argparse

    from damocles_ext.commands.common import load_config_from_args

    path = tmp_path / "ext-prover.cfg"
    path.write_text(
        '[[WdPost]]\nPlugin = "echo"\nGpus = [0]\n[[WinPost]]\nPlugin = "echo"\nGpus = [0]\n'
    )
    args = argparse.Namespace(config=str(path), conf_dir=None)
    caplog.set_level(logging.WARNING)
    for stage in ("window_post", "winning_post"):
        load_config_from_args(args, stage)
    assert "shares the lock gpu:0" not in caplog.text
    load_config_from_args(args)  # run: every stage in one supervisor
    assert "winning_post#0 shares the lock gpu:0 with window_post#0 in `run`" in caplog.text


def test_the_configs_warnings_are_logged_by_the_command_that_loads_it(tmp_path, caplog):
    # They were all logged as damocles_ext.serve's, also by run, prove and worker (a JSON log's
    # "logger" field, or a filter on it, named the wrong command).
    import argparse

    from damocles_ext.commands.common import load_config_from_args

    path = tmp_path / "ext-prover.cfg"
    path.write_text('[[WdPost]]\nBin = "sh"\nGpus = [0]\nEnvs = { CUDA_VISIBLE_DEVICES = "5" }\n')
    caplog.set_level(logging.WARNING)
    for command in ("run", "prove", "worker", "serve"):
        caplog.clear()
        load_config_from_args(argparse.Namespace(command=command, config=str(path), conf_dir=None))
        said = [r for r in caplog.records if "overrides Gpus" in r.getMessage()]
        assert [r.name for r in said] == [f"damocles_ext.{command}"], command


def test_a_winning_post_table_sharing_bellpersons_lock_dir_with_window_post_is_warned_about(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # damocles' own way to put each processor on a GPU: CUDA_VISIBLE_DEVICES in Envs, TMPDIR
    # left as it is. Both provers then keep bellman.priority.lock in one directory, and a
    # WinningPoSt waits for a 30-minute WindowPoSt to end, even in two `serve` processes and with
    # GpuLock = false; check-config said nothing.
    monkeypatch.delenv("TMPDIR", raising=False)
    text = (
        '[[WdPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "0" }\n'
        '[[WinPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "1" }\nGpuLock = false\n'
    )
    assert parse(text).warnings == [
        (
            "WinPost[0]: winning_post#0 and window_post#0 keep bellperson's GPU lock files in the"
            " same TMPDIR /tmp (not in its Envs: the one damocles-ext runs with, or /tmp), so a"
            " WinningPoSt waits for a running WindowPoSt to end (both hold bellman.priority.lock"
            " for the whole proof), past its ~20 s budget, even with one `serve` per stage and"
            " with GpuLock = false; give this table a TMPDIR of its own in Envs (Gpus gives each"
            " child one)"
        )
    ]
    # One TMPDIR written two ways is one directory.
    same = text.replace('"0" }', '"0", TMPDIR = "/scratch/gpu/" }').replace(
        '"1" }', '"1", TMPDIR = "/scratch//gpu" }'
    )
    assert "the same TMPDIR /scratch//gpu, so" in parse(same).warnings[0]
    # A TMPDIR of its own, Gpus' private ones, or a prover that takes no such lock: nothing said.
    assert parse(text.replace('"1" }', '"1", TMPDIR = "/scratch/win/" }')).warnings == []
    with_gpus = parse(text.replace('Envs = { CUDA_VISIBLE_DEVICES = "1" }', "Gpus = [1]"))
    assert [w for w in with_gpus.warnings if "bellperson" in w] == []
    native = 'Plugin = "native"\nPluginOptions = { gpu_lock = false }'
    assert parse(text.replace('Bin = "sh"', native)).warnings == []


def test_window_post_children_on_different_gpus_sharing_bellpersons_lock_dir_are_warned_about(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each WindowPoSt holds bellman.priority.lock for its whole proof: on GPUs 0 and 1 with one
    # TMPDIR, they take turns, and the GPUs prove one at a time; nothing was said.
    monkeypatch.delenv("TMPDIR", raising=False)
    two_tables = (
        '[[WdPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "0" }\n'
        '[[WdPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "1" }\n'
    )
    one_tmpdir = '[[WdPost]]\nBin = "sh"\nGpus = [0, 1, 2]\nEnvs = { TMPDIR = "/var/tmp/p/" }\n'
    for text, where in (
        (two_tables, "TMPDIR /tmp (not in its Envs"),
        (one_tmpdir, "TMPDIR /var/tmp/p/"),
    ):
        [warning] = parse(text).warnings
        assert warning.startswith("window_post#0 and window_post#1 run on different GPUs"), warning
        assert f"lock files in the same {where}" in warning and "take turns" in warning
    # A TMPDIR each (Gpus' own), or one GPU (they share it anyway): nothing said.
    assert parse('[[WdPost]]\nBin = "sh"\nGpus = [0, 1]\n').warnings == []
    assert parse(two_tables.replace('"1" }', '"0" }')).warnings == []
    # A vendor library takes bellperson's locks itself, whatever gpu_lock says: still warned.
    vendor = 'Plugin = "native"\nPluginOptions = { library = "/opt/v/libv.so", gpu_lock = false }'
    with_vendor = parse(two_tables.replace('Bin = "sh"', vendor))
    assert [w for w in with_vendor.warnings if "run on different GPUs" in w]
    # No GPU at all (CUDA_VISIBLE_DEVICES empty: proving on the CPU) is no "different GPUs".
    assert parse(two_tables.replace('"0" }', '"" }').replace('"1" }', '"" }')).warnings == []


def test_a_winning_post_sharing_the_lock_dir_and_a_gpu_is_not_told_a_tmpdir_of_its_own_suffices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On one GPU (the same CUDA_VISIBLE_DEVICES, or none: every GPU), a TMPDIR of its own lets a
    # WinningPoSt run at the same time as the WindowPoSt on that GPU: both proofs' GPU memory at
    # once, which a card may not have (a failed WindowPoSt). The warning advised it anyway.
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    same_gpu = (
        '[[WdPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "0" }\n'
        '[[WinPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "0" }\nGpuLock = false\n'
    )
    every_gpu = '[[WdPost]]\nPlugin = "native"\n[[WinPost]]\nPlugin = "native"\n'  # README's
    for text in (same_gpu, every_gpu):
        [warning] = parse(text).warnings
        assert "bellman.priority.lock" in warning
        assert "give this table a TMPDIR of its own in Envs" not in warning
        assert "a GPU of its own" in warning and "memory" in warning
    # The supervisor's CUDA_VISIBLE_DEVICES, inherited by both, is one GPU too.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    inherited = '[[WdPost]]\nBin = "sh"\n[[WinPost]]\nBin = "sh"\nGpuLock = false\n'
    assert "a GPU of its own" in parse(inherited).warnings[0]


@pytest.mark.parametrize("program", ["damocles-ext", "/opt/damocles-ext/bin/damocles-ext"])
def test_damocles_managers_entries_that_run_serve_are_not_told_they_share_bellpersons_lock_dir(
    monkeypatch: pytest.MonkeyPatch, program: str
) -> None:
    # damocles-manager's file as the README writes it: each entry runs `damocles-ext serve`, a
    # supervisor whose provers are the children of its own config, with their own TMPDIRs.
    # check-config and serve warned that the two serves share bellperson's lock files in /tmp
    # and should each get a GPU and a TMPDIR of their own.
    monkeypatch.delenv("TMPDIR", raising=False)
    text = (
        f'[[WdPost]]\nBin = "{program}"\n'
        'Args = ["serve", "window_post", "--conf-dir", "/etc/damocles-ext"]\nConcurrent = 8\n'
        f'[[WinPost]]\nBin = "{program}"\n'
        'Args = ["serve", "winning_post", "--conf-dir", "/etc/damocles-ext"]\n'
    )
    assert parse(text).warnings == []
    # A prover of another name beside a serve is still warned about.
    other = text.replace(
        f'Bin = "{program}"\nArgs = ["serve", "winning_post"', 'Bin = "sh"\nArgs = ["x"'
    )
    assert parse(other).warnings == []  # its WindowPoSt is a serve: no prover of its own here
    both = other.replace(
        f'Bin = "{program}"\nArgs = ["serve", "window_post"', 'Bin = "sh"\nArgs = ["y"'
    )
    assert "bellman.priority.lock" in parse(both).warnings[0]


def test_expansion_indices_continue_across_tables() -> None:
    cfg = parse(
        '[[WdPost]]\nBin = "sh"\nGpus = [0, 1]\n[[WdPost]]\nBin = "sh"\n'
        '[[WinPost]]\nBin = "sh"\nGpus = [1, 0]\n'
    )
    got = [(c.name, c.block, c.gpu) for c in cfg.children]
    assert got == [
        ("window_post#0", 0, "0"),
        ("window_post#1", 0, "1"),
        ("window_post#2", 1, None),
        ("winning_post#0", 0, "1"),
        ("winning_post#1", 0, "0"),
    ]


def test_gpus_all_uses_detected_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def two_gpus() -> config.GpuProbe:
        calls.append(1)
        return config.GpuProbe([0, 2], [], answered=True)

    monkeypatch.setattr(config.machine, "probe_gpus", two_gpus)
    cfg = parse('[[WdPost]]\nBin = "sh"\nGpus = "all"\n[[WinPost]]\nBin = "sh"\nGpus = "all"\n')
    assert [(c.name, c.envs["CUDA_VISIBLE_DEVICES"]) for c in cfg.children] == [
        ("window_post#0", "0"),
        ("window_post#1", "2"),
        ("winning_post#0", "0"),
        ("winning_post#1", "2"),
    ]
    assert len(calls) == 1  # detected once per file


def test_children_on_one_gpu_share_the_implicit_gpu_lock_across_stages() -> None:
    cfg = parse(
        '[[WdPost]]\nBin = "sh"\nGpus = [0]\nLocks = ["nvme0"]\n'
        '[[WinPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "0" }\n'
    )
    wd, win = cfg.children
    assert wd.locks == ("nvme0", "gpu:0")
    assert win.locks == ("gpu:0",)


def test_gpu_lock_false_opts_out_of_the_implicit_lock() -> None:
    (child,) = parse('[[WdPost]]\nBin = "sh"\nGpus = [0]\nGpuLock = false\n').children
    assert child.gpu == "0"
    assert child.locks == ()


def test_a_child_on_several_gpus_holds_a_lock_per_gpu() -> None:
    (child,) = parse('[[WdPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "0,1" }\n').children
    assert child.gpu == "0,1"
    assert child.locks == ("gpu:0", "gpu:1")


def test_empty_cuda_visible_devices_means_no_gpu() -> None:
    (child,) = parse('[[WdPost]]\nBin = "sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "" }\n').children
    assert (child.gpu, child.locks) == (None, ())


# detect_gpus itself, against a real (fake) nvidia-smi program on PATH.


def _fake_nvidia_smi(tmp_path: Path, body: str) -> None:
    program = tmp_path / "nvidia-smi"
    program.write_text("#!/bin/sh\n" + body)
    program.chmod(0o755)


@pytest.fixture
def real_detect_gpus(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.undo()  # undo the autouse replacement for these tests
    monkeypatch.setitem(sys.modules, "pynvml", None)  # force the nvidia-smi path
    return config.detect_gpus


def test_detect_gpus_reads_nvidia_smi_list(
    real_detect_gpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_nvidia_smi(
        tmp_path,
        "echo 'GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-aaaa)'\n"
        "echo 'GPU 1: NVIDIA GeForce RTX 3090 (UUID: GPU-bbbb)'\n"
        "echo '  MIG 1g.5gb Device 0: (UUID: MIG-cccc)'\n",
    )
    monkeypatch.setenv("PATH", str(tmp_path))
    assert real_detect_gpus() == [0, 1]


def test_detect_gpus_is_empty_when_nvidia_smi_fails_or_is_missing(
    real_detect_gpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    why: list[str] = []
    assert real_detect_gpus(why) == []
    assert why == ["NVML: nvidia-ml-py is not installed", "nvidia-smi: not found on PATH"]
    _fake_nvidia_smi(
        tmp_path,
        "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'"
        " >&2\nexit 9\n",
    )
    why = []
    assert real_detect_gpus(why) == []
    assert why[1] == (
        "nvidia-smi -L: exit status 9: NVIDIA-SMI has failed because it could not communicate"
        " with the NVIDIA driver."
    )


def test_gpus_all_says_why_no_gpu_was_found(
    real_detect_gpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_nvidia_smi(tmp_path, "echo 'No devices were found'\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(config.ConfigError) as info:
        parse('[[WdPost]]\nBin = "sh"\nGpus = "all"\n')
    assert (
        'Gpus: "all" found no GPU (asked NVML and `nvidia-smi -L`; NVML: nvidia-ml-py is not'
        " installed; nvidia-smi -L: listed no GPU: No devices were found); list the GPUs"
    ) in str(info.value)


def test_key_and_table_names_in_any_case_are_read_as_damocles_reads_them() -> None:
    # damocles-manager's TOML decoder (BurntSushi's) matches a key to its field whatever its
    # case: a file it runs with must run here too.
    lower = parse('[[wdpost]]\nbin = "/bin/cat"\nconcurrent = 2\nweight = 3\n'
                  'ENVS = { A = "x" }\n[[WINPOST]]\nBIN = "/bin/cat"\n')  # fmt: skip
    written = parse('[[WdPost]]\nBin = "/bin/cat"\nConcurrent = 2\nWeight = 3\n'
                    'Envs = { A = "x" }\n[[WinPost]]\nBin = "/bin/cat"\n')  # fmt: skip
    assert lower.children == written.children
    # The same key twice, in two cases: which one damocles would keep is not said; an error.
    assert errors_of('[[WdPost]]\nBin = "/bin/cat"\nbin = "/bin/sh"\n') == [
        (
            "WdPost[0]: 'Bin' written twice, as 'Bin' and 'bin' (key names do not depend on case, as"
            " damocles reads them): keep one"
        )
    ]
    [error] = errors_of('[[WdPost]]\nBin = "/bin/cat"\n[[wdpost]]\nBin = "/bin/cat"\n')
    assert "'WdPost' written twice, as 'WdPost' and 'wdpost'" in error


# ---------------------------------------------------------------------------------------------
# The malformed corpus: one file each, with the message it must produce.

BAD_CONFIGS: dict[str, list[str]] = {
    "unknown-key-suggestion.cfg": [
        "WdPost[1]: unknown key 'Concurent' (did you mean 'Concurrent'?)"
    ],
    "unknown-key-no-suggestion.cfg": [
        "WinPost[0]: unknown key 'Frobnicate' (valid keys: Bin, Args, Envs, Concurrent"
    ],
    "unknown-key-snake-case.cfg": [
        "WdPost[0]: unknown key 'ready_timeout_secs' (did you mean 'ReadyTimeoutSecs'?)"
    ],
    "multiple-errors.cfg": [
        "has 4 errors",
        "WdPost[0]: unknown key 'Concurent' (did you mean 'Concurrent'?)",
        "WdPost[0].Weight: expected a non-negative integer, found -1",
        'WinPost[0].Protocol: expected one of "auto", "dext", "jsonl", found "grpc"',
        'WinPost[0].Cpuset: range "3-1" goes down',
    ],
    "syntax-missing-equals.cfg": [
        "syntax-missing-equals.cfg:3:8: invalid TOML: expected '=' after a key"
    ],
    "syntax-unterminated-string.cfg": [
        "syntax-unterminated-string.cfg:2:29: invalid TOML",
        "missing its closing quote",
    ],
    "syntax-duplicate-key.cfg": [
        "syntax-duplicate-key.cfg:3:15: invalid TOML: cannot overwrite a value",
        "key given twice",
    ],
    "concurrent-string.cfg": ['WdPost[0].Concurrent: expected a non-negative integer, found "2"'],
    "concurrent-negative.cfg": ["WinPost[0].Concurrent: expected a non-negative integer, found -1"],
    "weight-float.cfg": ["WdPost[0].Weight: expected a non-negative integer, found 1.5"],
    "weight-date.cfg": ["WdPost[0].Weight: expected a non-negative integer, found 1979-05-27"],
    "ready-timeout-bool.cfg": [
        "WdPost[0].ReadyTimeoutSecs: expected a non-negative integer (seconds), found true"
    ],
    "bad-protocol.cfg": [
        'WdPost[0].Protocol: expected one of "auto", "dext", "jsonl", found "grpc"'
    ],
    "cpuset-not-a-number.cfg": ['WdPost[0].Cpuset: "a" in "0-3,a" is not a CPU number'],
    "cpuset-not-ascii.cfg": ['WdPost[0].Cpuset: "\u0663" in "0,\u0663" is not a CPU number'],
    "cpuset-descending.cfg": ['WdPost[0].Cpuset: range "19-10" goes down; write it as "10-19"'],
    "cpuset-empty.cfg": ['WdPost[0].Cpuset: expected CPU numbers and ranges, e.g. "10-19,24"'],
    "cpuset-list.cfg": ["WdPost[0].Cpuset: expected a string of CPU numbers", "found [0, 1]"],
    "bin-and-plugin.cfg": ["WdPost[0]: Bin and Plugin are both set"],
    "bin-empty.cfg": ['WdPost[0].Bin: expected a program path or name, found ""'],
    "plugin-with-args.cfg": ["WdPost[0]: Args is only used with Bin"],
    "plugin-options-without-plugin.cfg": ["WdPost[0]: PluginOptions is set but Plugin is not"],
    "plugin-options-nested.cfg": [
        (
            "WdPost[0].PluginOptions.fail: expected a string, integer, float or boolean, "
            'found ["always"]'
        )
    ],
    "gpus-negative.cfg": ["WdPost[0].Gpus[1]: expected a non-negative integer, found -1"],
    "gpus-bad-string.cfg": [
        'WdPost[0].Gpus: expected a list of GPU indices (e.g. [0, 1]) or "all", found "ALL"'
    ],
    "gpus-duplicate.cfg": ["WdPost[0].Gpus[2]: GPU 1 is listed twice"],
    "gpus-empty.cfg": ["WdPost[0].Gpus: expected at least one GPU index", "found []"],
    "gpus-all-none-found.cfg": ['WinPost[0].Gpus: "all" found no GPU'],
    "gpu-lock-string.cfg": ['WdPost[0].GpuLock: expected a boolean (true or false), found "no"'],
    "unknown-top-level-table.cfg": [
        "unknown top-level table 'WindowPost' (did you mean 'WdPost'?)"
    ],
    "top-level-key.cfg": [
        "unknown top-level key 'Concurrent' (it belongs inside a [[WdPost]] or [[WinPost]] table)"
    ],
    "single-bracket-table.cfg": ["WdPost: written as a single table [WdPost]; write [[WdPost]]"],
    "wdpost-not-a-table.cfg": ["WdPost: expected an array of tables written [[WdPost]], found 3"],
    "envs-non-string.cfg": ["WdPost[0].Envs.CUDA_VISIBLE_DEVICES: expected a string, found 0"],
    "envs-name-with-equals.cfg": ['WdPost[0].Envs: environment variable name "A=B"'],
    # bellperson would keep its GPU lock files in the working directory, we in /tmp.
    "envs-tmpdir-empty.cfg": ["WdPost[0].Envs.TMPDIR: empty; give a directory"],
    "args-non-string.cfg": ["WdPost[0].Args[1]: expected a string, found 3"],
    "max-attempts-zero.cfg": ["WdPost[0].MaxAttempts: expected a positive integer, found 0"],
    "request-timeout-zero.cfg": [
        "WdPost[0].RequestTimeoutSecs: expected a positive number (seconds), found 0"
    ],
    "request-timeout-inf.cfg": [
        "WdPost[0].RequestTimeoutSecs: expected a finite number of seconds, found inf"
    ],
    "heartbeat-timeout-negative.cfg": [
        (
            "WdPost[0].HeartbeatTimeoutSecs: expected a non-negative number"
            " (seconds; 0 turns it off), found -5.0"
        )
    ],
    "cancel-grace-negative.cfg": [
        "WinPost[0].CancelGraceSecs: expected a non-negative number (seconds), found -1"
    ],
    "locks-empty-name.cfg": ['WdPost[0].Locks[1]: expected a non-empty lock name, found ""'],
    "locks-not-a-list.cfg": ['WdPost[0].Locks: expected a list of lock names, found "nvme0"'],
    "inherit-envs-string.cfg": [
        'WdPost[0].InheritEnvs: expected a boolean (true or false), found "yes"'
    ],
    "auto-restart-int.cfg": ["WdPost[0].AutoRestart: expected a boolean (true or false), found 1"],
    "no-tables.cfg": ["no [[WdPost]] or [[WinPost]] table, so there is no child to start"],
    "not-utf8.cfg": ["not-utf8.cfg: not UTF-8 text (bad byte at offset 5)"],
}


def test_every_bad_config_file_has_an_expected_message() -> None:
    files = sorted(p.name for p in BAD.glob("*.cfg"))
    assert files == sorted(BAD_CONFIGS)
    assert len(files) >= 25


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_with_its_specific_message(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(BAD / name)
    message = str(info.value)
    for expected in BAD_CONFIGS[name]:
        assert expected in message
    assert info.value.errors and all(isinstance(e, str) for e in info.value.errors)


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_check_config_exits_2_with_the_message_for_bad_config(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", "-c", str(BAD / name)]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("damocles-ext check-config: error: ")
    for expected in BAD_CONFIGS[name]:
        assert expected in err


def test_all_errors_of_a_file_are_reported_together() -> None:
    errors = errors_of(
        '[[WdPost]]\nConcurent = 2\nWeight = -1\nGpus = [0, 0]\nCpuset = "x"\n'
        '[[WinPost]]\nBin = "sh"\nPlugin = "echo"\nLocks = [1]\n[Bogus]\n'
    )
    assert errors == [
        (
            "unknown top-level table 'Bogus' (the file holds only [[WdPost]] and [[WinPost]] "
            "tables, or [[WdPostVanilla]] and [[WdPostSnark]] for a split WindowPoSt)"
        ),
        "WdPost[0]: unknown key 'Concurent' (did you mean 'Concurrent'?)",
        "WdPost[0].Weight: expected a non-negative integer, found -1",
        (
            "WdPost[0].Gpus[1]: GPU 0 is listed twice; list each GPU once (use Concurrent for "
            "more work per GPU)"
        ),
        'WdPost[0].Cpuset: "x" in "x" is not a CPU number or a range like "10-19"',
        "WinPost[0].Locks[0]: expected a string, found 1",
        (
            "WinPost[0]: Bin and Plugin are both set; set Bin to run your own program, or Plugin "
            "to run a prover plugin in damocles-ext's child runtime, not both"
        ),
    ]


def test_each_bad_item_of_a_list_or_table_is_named() -> None:
    errors = errors_of(
        '[[WdPost]]\nBin = "sh"\nArgs = [1, "ok", false]\nEnvs = { A = 1, B = "ok", C = [] }\n'
    )
    assert errors == [
        "WdPost[0].Args[0]: expected a string, found 1",
        "WdPost[0].Args[2]: expected a string, found false",
        "WdPost[0].Envs.A: expected a string, found 1",
        "WdPost[0].Envs.C: expected a string, found []",
    ]


def test_nul_character_in_an_argument_is_refused() -> None:
    (error,) = errors_of('[[WdPost]]\nBin = "sh"\nArgs = ["a\\u0000b"]\n')
    assert error.startswith("WdPost[0].Args[0]: contains a NUL character")


@pytest.mark.parametrize(
    ("block", "where"),
    [
        ('Bin = "sh"\nEnvs = { "A\\u0000B" = "x" }', 'WdPost[0].Envs: name "A\\u0000B"'),
        ('Bin = "sh"\nEnvs = { A = "x\\u0000y" }', "WdPost[0].Envs.A: contains"),
        ('Bin = "s\\u0000h"', "WdPost[0].Bin: contains"),
        ('Plugin = "echo"\nPluginOptions = { "k\\u0000" = 1 }', "WdPost[0].PluginOptions: name"),
        (
            'Plugin = "echo"\nPluginOptions = { k = "\\u0000" }',
            "WdPost[0].PluginOptions.k: contains",
        ),
        ('Plugin = "ec\\u0000ho"', "WdPost[0].Plugin: contains"),
    ],
)
def test_a_nul_character_in_anything_a_program_receives_is_refused(block: str, where: str) -> None:
    # Before, a NUL in an Envs name passed and then killed `run` when the child was spawned.
    errors = errors_of(f"[[WdPost]]\n{block}\n")
    assert any(e.startswith(where) and "NUL character" in e for e in errors), errors


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "Concurrent = 100000000000000000",
            (
                "WdPost[0].Concurrent: expected at most 1024 (requests in flight on one child), "
                "found 100000000000000000"
            ),
        ),
        ("Weight = 10001", "WdPost[0].Weight: expected at most 10000 (a share of the traffic)"),
        (
            "ReadyTimeoutSecs = 86401",
            "WdPost[0].ReadyTimeoutSecs: expected at most 86400 (seconds: one day), found 86401",
        ),
        (
            "ReadyTimeoutSecs = " + "9" * 400,
            (
                "WdPost[0].ReadyTimeoutSecs: expected at most 86400 (seconds: one day), found "
                "99999999999999999999... (400 digits)"
            ),
        ),
        ("MaxAttempts = 101", "WdPost[0].MaxAttempts: expected at most 100 (attempts per request)"),
        ("RequestTimeoutSecs = 1e300", "WdPost[0].RequestTimeoutSecs: expected at most 86400"),
        ("HeartbeatTimeoutSecs = 90000", "WdPost[0].HeartbeatTimeoutSecs: expected at most 86400"),
        ("CancelGraceSecs = 86400.5", "WdPost[0].CancelGraceSecs: expected at most 86400"),
        (
            "Gpus = [0, 1024]",
            "WdPost[0].Gpus[1]: expected a GPU index from 0 to 1023, found 1024",
        ),
        (
            'Cpuset = "0-99999999999"',
            (
                'WdPost[0].Cpuset: CPU 99999999999 in "0-99999999999" is beyond Linux\'s largest '
                "CPU number, 8191"
            ),
        ),
        ('Cpuset = "8192"', "WdPost[0].Cpuset: CPU 8192 in"),
        ('Cpuset = "0-' + "9" * 5000 + '"', "WdPost[0].Cpuset: CPU 99999999999999999... in"),
    ],
)
def test_absurd_values_are_refused_with_the_bound(line: str, expected: str) -> None:
    # Taken as given they exhausted the machine: a plugin child started a thread per Concurrent
    # slot, a Cpuset range became a set of every CPU number in it.
    (error,) = errors_of(f'[[WdPost]]\nBin = "sh"\n{line}\n')
    assert error.startswith(expected), error


def test_the_bounds_themselves_are_accepted() -> None:
    (child,) = parse(
        '[[WdPost]]\nBin = "sh"\nConcurrent = 1024\nWeight = 10000\nReadyTimeoutSecs = 86400\n'
        "MaxAttempts = 100\nRequestTimeoutSecs = 86400\nCancelGraceSecs = 86400\n"
        'Cpuset = "8191"\nGpus = [1023]\n'
    ).children
    assert (child.concurrent, child.weight, child.max_attempts) == (1024, 10000, 100)
    assert child.cpuset == frozenset({8191}) and child.gpu == "1023"


def test_more_children_than_the_bound_is_refused() -> None:
    (error,) = errors_of('[[WinPost]]\nBin = "sh"\n' * 1025)
    assert error.startswith("the file starts 1025 children; at most 1024 are supported")


@pytest.mark.parametrize(
    "text",
    [
        '[[WdPost]]\nBin = "sh"\nArgs = ' + "[" * 500 + "]" * 500 + "\n",
        '[[WdPost]]\nBin = "sh"\nEnvs = ' + "{ a = " * 500 + '"x"' + " }" * 500 + "\n",
    ],
)
def test_toml_nested_hundreds_deep_is_a_config_error_naming_the_file(text: str) -> None:
    (error,) = errors_of(text)
    assert error.startswith("test.cfg: arrays or inline tables are nested too deep to read")


def test_a_deep_value_tomllib_reads_is_shown_shortened() -> None:
    # Dotted keys nest without recursion in tomllib; the message must not recurse either.
    (error,) = errors_of('[[WdPost]]\nBin = "sh"\n[WdPost.Envs.' + ".".join(["a"] * 5000) + "]\n")
    assert error.startswith("WdPost[0].Envs.a: expected a string, found {a = {a = ")
    assert len(error) < 200


def test_an_integer_of_thousands_of_digits_is_a_config_error() -> None:
    (error,) = errors_of('[[WdPost]]\nBin = "sh"\nWeight = ' + "9" * 5000 + "\n")
    assert error == "test.cfg: a number has thousands of digits; no key takes one so large"


def test_a_config_file_larger_than_a_mebibyte_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "ext-prover.cfg"
    path.write_text('[[WdPost]]\nBin = "sh"\n' + "#" * config.MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        f"{path}: larger than 1024 KiB, which no ext-prover.cfg needs; is it the right file?"
    ]


def test_a_device_is_refused_by_what_it_is_never_opened() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("/dev/zero")
    assert str(info.value) == (
        "/dev/zero: is a character device, not a regular file, so it is not read (it could"
        " block or never end); write the ext-prover.cfg to a file and give its path"
    )


def test_check_config_given_a_fifo_exits_2_saying_what_it_is_never_waiting_on_it(
    tmp_path: Path,
) -> None:
    # check-config (and serve, before its ready line) opened it as a file: a FIFO without a
    # writer held that open for ever.
    fifo = tmp_path / "ext-prover.cfg"
    os.mkfifo(fifo)
    for args in (["-c", str(fifo)], ["--conf-dir", str(tmp_path)]):
        proc = run_cli_subprocess("check-config", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert (
            f"{fifo}: is a FIFO (named pipe) (a pipe such as <(command) or /dev/stdin is one), not"
            " a regular file, so it is not read (it could block or never end); write the"
            " ext-prover.cfg to a file and give its path"
        ) in proc.stderr


def test_config_error_is_a_usage_error_with_exit_code_2() -> None:
    with pytest.raises(UsageError) as info:
        parse("[[WdPost]]\nWeight = -1\n")
    assert info.value.exit_code == EXIT_USAGE
    assert isinstance(info.value, ConfigError)
    assert info.value.source == "test.cfg"


# ---------------------------------------------------------------------------------------------
# Files and directories


def test_missing_file_says_which_and_why(tmp_path: Path) -> None:
    missing = tmp_path / "nope.cfg"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert (
        str(info.value) == f"{missing}: cannot read the config file: no such file (check the path)"
    )


def test_unreadable_file_a_directory_given_as_file_says_so(tmp_path: Path) -> None:
    # Tests run as root here, so chmod 000 would not make a file unreadable; a directory given
    # where a file is expected is the unreadable case we can always produce.
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert f"{tmp_path}: is a directory, not a config file" in message
    assert f"use --conf-dir {tmp_path}" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission_says_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "ext-prover.cfg"
    path.write_text("[[WdPost]]\n")
    path.chmod(0)
    try:
        with pytest.raises(ConfigError, match="permission denied"):
            load_config(path)
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_conf_dir_reads_ext_prover_cfg_in_it(tmp_path: Path) -> None:
    (tmp_path / "ext-prover.cfg").write_text((CONFIGS / "seed-8gpu.cfg").read_text())
    cfg = load_conf_dir(tmp_path)
    assert cfg.source == str(tmp_path / "ext-prover.cfg")
    assert len(cfg.children) == 8


def test_conf_dir_errors_name_the_directory_or_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config directory does not exist"):
        load_conf_dir(tmp_path / "missing")
    with pytest.raises(ConfigError) as info:
        load_conf_dir(tmp_path)
    assert f"{tmp_path / 'ext-prover.cfg'}: cannot read the config file: no such file" in str(
        info.value
    )
    a_file = tmp_path / "x.cfg"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=r"is a file, not a directory; to read this file use -c"):
        load_conf_dir(a_file)


# ---------------------------------------------------------------------------------------------
# ext-prover.cfg.example


def test_example_config_parses_without_damocles_worker_or_gpu() -> None:
    cfg = load_config(EXAMPLE)
    assert {c.kind for c in cfg.children} == {"plugin"}
    assert {c.stage for c in cfg.children} == {"window_post", "winning_post"}
    assert cfg.warnings == []


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in config.VALID_KEYS:
        assert f"# {key} (" in text, f"{key} is not documented in ext-prover.cfg.example"


def test_example_config_says_how_a_plugin_child_gets_its_options_as_the_supervisor_passes_them():
    from damocles_ext.config.startup import child_env
    from damocles_ext.options import OPTIONS_ENV

    text = EXAMPLE.read_text()
    # The command line the example shows for a Plugin child has the options of the real one.
    [shown] = re.findall(r"`python -m damocles_ext child ([^`]*)`", text)
    child = parse_config(
        '[[WdPost]]\nPlugin = "sleep"\nPluginOptions = { seconds = 1 }\n', "t.cfg"
    ).children[0]
    real = child.argv[child.argv.index("child") + 1 :]
    assert [w for w in shown.split() if w.startswith("--")] == [
        w for w in real if w.startswith("--")
    ], shown
    # Its PluginOptions travel in the environment variable the example names.
    assert OPTIONS_ENV in child_env(child)
    said = text[text.index("# PluginOptions (") :].split("\n\n")[0]
    assert OPTIONS_ENV in said and "JSON" in said, said


# ---------------------------------------------------------------------------------------------
# check-config


def test_check_config_on_the_seed_8gpu_config_prints_8_children_subprocess(
    damocles_worker_on_path: Path,
) -> None:
    proc = run_cli_subprocess("check-config", "-c", str(CONFIGS / "seed-8gpu.cfg"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 8
    for i, line in enumerate(lines):
        assert line.startswith(f"window_post#{i} ")
        assert "(WdPost[" in line
        assert f"CUDA_VISIBLE_DEVICES={i} TMPDIR=/tmp/ext-prover{i}/" in line
        assert "run: damocles-worker processor window_post" in line
        assert "concurrent=1" in line and "weight=1" in line


def test_check_config_with_an_unknown_key_exits_2_with_the_suggestion_subprocess() -> None:
    proc = run_cli_subprocess("check-config", "-c", str(BAD / "unknown-key-suggestion.cfg"))
    assert proc.returncode == 2
    assert "WdPost[1]: unknown key 'Concurent' (did you mean 'Concurrent'?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_check_config_with_a_missing_file_exits_2_without_traceback_subprocess(
    tmp_path: Path,
) -> None:
    proc = run_cli_subprocess("check-config", "-c", str(tmp_path / "ext-prover.cfg"))
    assert proc.returncode == 2
    assert "cannot read the config file: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_config_conf_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ext-prover.cfg").write_text('[[WinPost]]\nPlugin = "echo"\nConcurrent = 4\n')
    assert cli.main(["check-config", "--conf-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        (
            "winning_post#0  (WinPost[0])  run: plugin echo  concurrent=4  weight=1  env: -  "
            "locks: -  cpuset: -"
        )
    ]
    assert err == ""


def test_check_config_line_shows_env_locks_cpuset_and_non_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.cfg"
    path.write_text(
        '[[WdPost]]\nBin = "sh"\nArgs = ["-c", "exec my prover"]\nGpus = [1]\nCpuset = "0"\n'
        'Locks = ["nvme0"]\nProtocol = "jsonl"\nMaxAttempts = 3\nRequestTimeoutSecs = 90\n'
        'Envs = { NOTE = "two words" }\n'
    )
    assert cli.main(["check-config", "-c", str(path)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line == (
        "window_post#0  (WdPost[0])  run: sh -c 'exec my prover'  concurrent=1  weight=1  "
        "env: 'NOTE=two words' CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=1"
        f" TMPDIR={config.default_tmp_root()}/window_post-gpu1/"
        "  locks: nvme0,gpu:1  cpuset: 0  protocol=jsonl max_attempts=3 request_timeout=90s"
    )


def test_check_config_prints_warnings_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.cfg"
    path.write_text('[[WdPost]]\nBin = "sh"\nProtocol = "jsonl"\nHeartbeatTimeoutSecs = 9\n')
    assert cli.main(["check-config", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("window_post#0  (WdPost[0])  run: sh")
    assert err.startswith("warning: WdPost[0]: HeartbeatTimeoutSecs has no effect")


def test_check_config_json_is_the_resolved_config(
    damocles_worker_on_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", "-c", str(CONFIGS / "seed-8gpu-gpus.cfg"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == str(CONFIGS / "seed-8gpu-gpus.cfg")
    assert [c["envs"]["CUDA_VISIBLE_DEVICES"] for c in data["children"]] == [
        str(i) for i in range(8)
    ]
    assert data["children"][0]["locks"] == ["gpu:0"]


def test_check_config_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "-c", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "window_post#0" in out and "winning_post#0" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["check-config"],
        ["check-config", "-c", "a.cfg", "--conf-dir", "dir"],
    ],
)
def test_check_config_needs_exactly_one_of_file_or_conf_dir(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "-c/--config" in err and "--conf-dir" in err


def test_plugin_option_values_reach_the_child_with_their_types(monkeypatch):
    from damocles_ext.config.startup import child_env
    from damocles_ext.options import OPTIONS_ENV, options_from_env

    monkeypatch.setenv(OPTIONS_ENV, '{"inherited":"from the supervisor\'s own environment"}')

    config = parse_config(
        '[[WdPost]]\nPlugin = "sleep"\n'
        '[WdPost.PluginOptions]\ntag = "123"\nflag = "true"\nseconds = 1.5\nn = 3\non = true\n',
        "t.cfg",
    )
    child = config.children[0]
    # In the child's environment, not on its command line (which every local user can read).
    assert "--option" not in child.argv and not any("123" in a for a in child.argv)
    options = options_from_env(child_env(child)[OPTIONS_ENV])
    assert options == {"tag": "123", "flag": "true", "seconds": 1.5, "n": 3, "on": True}
    assert [type(v) for v in options.values()] == [str, str, float, int, bool]
    # A child without options gets none, not what the supervisor's environment held.
    bare = parse_config('[[WdPost]]\nPlugin = "sleep"\n', "t.cfg").children[0]
    assert OPTIONS_ENV not in child_env(bare)


def test_a_plugin_child_takes_its_options_out_of_its_environment_and_checks_them():
    from damocles_ext.options import OPTIONS_ENV, child_options, options_env_value

    env = {OPTIONS_ENV: '{"seconds":0.5,"fail":"never"}', "PATH": "/bin"}
    assert child_options(["n=3"], env) == {"seconds": 0.5, "fail": "never", "n": 3}
    assert env == {"PATH": "/bin"}  # what the prover starts does not inherit them
    # ASCII JSON: a locale of another script passes any option to exec.
    text = options_env_value({"k": "\u4e2d", "n": 1.5})
    assert text.isascii() and child_options([], {OPTIONS_ENV: text}) == {"k": "\u4e2d", "n": 1.5}
    for text, words in [
        ("{", "is not JSON"),
        ("[" * 100_000, "is not JSON"),  # deeper than json nests: RecursionError, not ValueError
        ("[1]", "holds a JSON array, not an object"),
        ('{"k":[1]}', "option 'k' is a JSON array"),
        ('{"k":null}', "option 'k' is a JSON null"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            child_options([], {OPTIONS_ENV: text})
    with pytest.raises(ValueError, match="given on the command line and in"):
        child_options(["seconds=1"], {OPTIONS_ENV: '{"seconds":2}'})


def test_check_config_names_an_unknown_plugin_and_refused_options(tmp_path, capsys):
    path = tmp_path / "ext-prover.cfg"
    path.write_text(
        '[[WdPost]]\nPlugin = "nope"\n'
        '[[WinPost]]\nPlugin = "sleep"\n[WinPost.PluginOptions]\nfail = "sometimes"\n'
    )
    assert cli.main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "WdPost[0].Plugin: unknown prover 'nope'; available provers: echo" in err
    assert "WinPost[0].Plugin: prover 'sleep'" in err and "'sometimes'" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# What keeps a child from starting on this machine: check-config refuses it as serve/run do


def _bin_problem(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "ext-prover.cfg"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.check_startable(load_config(path))
    assert str(path) in str(info.value)
    return info.value.errors


def test_plugin_options_over_exec_s_limit_name_the_longest(tmp_path: Path) -> None:
    big = "x" * 140_000
    text = f'[[WdPost]]\nPlugin = "sleep"\nPluginOptions = {{ seconds = 1, fail = "{big}" }}\n'
    problem = _bin_problem(tmp_path, text)[0]  # (then sleep's own check of the value)
    assert problem.startswith(
        "WdPost[0].PluginOptions (all of them, in one variable; the longest: fail): "
    ), problem
    assert "exec takes at most" in problem


def test_the_plugin_options_variable_is_neither_set_in_envs_nor_passed_on_from_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from damocles_ext.config.startup import child_env
    from damocles_ext.options import OPTIONS_ENV

    with pytest.raises(ConfigError) as info:
        parse(f'[[WdPost]]\nPlugin = "sleep"\nEnvs = {{ {OPTIONS_ENV} = "{{}}" }}\n')
    assert (
        f"WdPost[0].Envs.{OPTIONS_ENV}: this variable carries the child's PluginOptions;"
        " set them in PluginOptions instead"
    ) in str(info.value)
    # The supervisor's own is no child's: a Bin child running our runtime would take it for
    # its options. A Bin child's own Envs may still set it.
    monkeypatch.setenv(OPTIONS_ENV, '{"fail":"always"}')
    bin_child, own = parse(
        '[[WdPost]]\nBin = "/bin/true"\n'
        f'[[WdPost]]\nBin = "/bin/true"\nEnvs = {{ {OPTIONS_ENV} = "{{}}" }}\n'
    ).children
    assert OPTIONS_ENV not in child_env(bin_child)
    assert child_env(own)[OPTIONS_ENV] == "{}"


def test_a_plugin_childs_description_names_its_options_and_shows_values_only_when_asked() -> None:
    (child,) = parse(
        '[[WdPost]]\nPlugin = "sleep"\nPluginOptions = { seconds = 0, fail = "api-key-1" }\n'
    ).children
    # Logs, status and request errors show it: an option may be a secret.
    assert config.describe_argv(child) == "plugin sleep (options seconds, fail)"
    assert config.describe_argv(child, values=True) == "plugin sleep (seconds=0 fail=api-key-1)"


def test_a_bin_that_is_not_executable_says_its_mode(tmp_path: Path) -> None:
    program = tmp_path / "prover"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o644)
    (problem,) = _bin_problem(tmp_path, f'[[WdPost]]\nBin = "{program}"\n')
    assert problem == (
        f'WdPost[0].Bin: "{program}" is not executable (mode 0644); make it executable '
        f"(chmod +x) or give the path of the prover program"
    )


def test_a_bin_whose_interpreter_is_missing_names_it(tmp_path: Path) -> None:
    program = tmp_path / "prover.sh"
    program.write_text("#!/opt/vendor/bin/python3\nprint('hi')\n")
    program.chmod(0o755)
    (problem,) = _bin_problem(tmp_path, f'[[WdPost]]\nBin = "{program}"\n')
    assert problem == (
        f'WdPost[0].Bin: "{program}" exists, but the interpreter its #! line names,'
        " '/opt/vendor/bin/python3', was not found; install it or fix the #! line"
    )


def _elf_like_ours(path: Path, *, machine: int | None = None, kind: int | None = None) -> None:
    """An executable file with this interpreter's ELF header, its e_machine or e_type changed."""
    head = bytearray(Path("/proc/self/exe").read_bytes()[:64])
    order = "little" if head[5] == 1 else "big"
    if machine is not None:
        head[18:20] = machine.to_bytes(2, order)
    if kind is not None:
        head[16:18] = kind.to_bytes(2, order)
    path.write_bytes(bytes(head))
    path.chmod(0o755)


def test_a_bin_exec_would_refuse_for_its_format_says_why_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Exec fails on each with ENOEXEC ("Exec format error"): every start of the child would.
    # As on a machine without binfmt_misc formats (with them, nothing is judged: tested below).
    monkeypatch.setattr("damocles_ext.config.startup.other_formats", lambda: False)
    script = tmp_path / "prover.sh"
    script.write_text("echo no '#!' line\n")
    script.chmod(0o755)
    ours = int.from_bytes(Path("/proc/self/exe").read_bytes()[18:20], "little")
    foreign = tmp_path / "prover-other-arch"
    _elf_like_ours(foreign, machine=183 if ours != 183 else 62)
    foreign_name = "AArch64 (arm64)" if ours != 183 else "x86-64"
    obj = tmp_path / "prover.o"
    _elf_like_ours(obj, kind=1)
    bom = tmp_path / "prover-bom.sh"
    bom.write_bytes(b"\xef\xbb\xbf#!/bin/sh\necho saved by an editor that adds a BOM\n")
    bom.chmod(0o755)
    config = "".join(f'[[WdPost]]\nBin = "{p}"\n' for p in (script, foreign, obj, bom))
    this = "x86-64" if ours == 62 else "AArch64 (arm64)"
    script_problem = (
        f'WdPost[0].Bin: "{script}" is neither a program for this machine nor a script with a'
        " #! line, so exec refuses it (Exec format error); add a #! line naming its interpreter"
        " (e.g. #!/bin/sh), or give the path of the prover program"
    )
    foreign_problem = (
        f'WdPost[1].Bin: "{foreign}" is a program for {foreign_name}, and this machine is'
        f" {this}, so exec refuses it (Exec format error); install the prover built for this"
        " machine"
    )
    obj_problem = (
        f'WdPost[2].Bin: "{obj}" is an ELF file but not a program (an object file or a core'
        " dump?); give the path of the prover program"
    )
    bom_problem = (
        f'WdPost[3].Bin: "{bom}" starts with a UTF-8 byte order mark (BOM) before its #! line,'
        " so exec does not see the line and refuses it (Exec format error); save it without the"
        " BOM (e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' on it)"
    )
    problems = _bin_problem(tmp_path, config)
    assert problems == [script_problem, foreign_problem, obj_problem, bom_problem]
    # With binfmt_misc formats registered (qemu-user, wine...), exec may run any of them.
    monkeypatch.setattr("damocles_ext.config.startup.other_formats", lambda: True)
    assert [format_problem(str(p)) for p in (script, foreign, obj, bom)] == [None] * 4


def test_a_32_bit_python_on_a_64_bit_kernel_passes_a_64_bit_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /proc/self/exe is this Python, not the kernel: a 32-bit Python (an armhf or i386 userland
    # on a 64-bit kernel) runs a 64-bit prover all the same.
    ours = int.from_bytes(Path("/proc/self/exe").read_bytes()[18:20], "little")
    if ours not in (62, 183):
        pytest.skip("the test knows the 32-bit kinds of x86-64 and AArch64 only")
    monkeypatch.setattr("damocles_ext.config.startup.other_formats", lambda: False)
    program = tmp_path / "prover"
    _elf_like_ours(program)
    python32 = tmp_path / "python32"
    _elf_like_ours(python32, machine=3 if ours == 62 else 40)
    real_head = startup._head
    monkeypatch.setattr(
        startup, "_head", lambda p: real_head(str(python32) if p == "/proc/self/exe" else p)
    )
    startup._our_machine.cache_clear()  # this machine is read once: as the 32-bit Python's now
    try:
        assert startup._our_machine() == (3 if ours == 62 else 40)
        assert format_problem(str(program)) is None
        foreign = tmp_path / "prover-other-arch"
        _elf_like_ours(foreign, machine=20)  # PowerPC: still refused
        problem = format_problem(str(foreign)) or ""
        assert "is a program for PowerPC, and this machine is x86 (32-bit)" in problem or (
            "and this machine is ARM (32-bit)" in problem
        )
    finally:
        startup._our_machine.cache_clear()


def test_a_bin_for_this_machine_or_its_32_bit_kind_passes(tmp_path: Path) -> None:
    program = tmp_path / "prover"
    _elf_like_ours(program)
    assert format_problem(str(program)) is None
    ours = int.from_bytes(Path("/proc/self/exe").read_bytes()[18:20], "little")
    if ours in (62, 183):
        _elf_like_ours(program, machine=3 if ours == 62 else 40)
        assert format_problem(str(program)) is None


def test_a_bin_that_is_a_fifo_says_so(tmp_path: Path) -> None:
    program = tmp_path / "prover"
    os.mkfifo(program, 0o755)
    (problem,) = _bin_problem(tmp_path, f'[[WdPost]]\nBin = "{program}"\n')
    assert problem == (
        f'WdPost[0].Bin: "{program}" is a FIFO (named pipe), not a program; give the path of'
        " the prover program"
    )


def test_a_bin_name_is_looked_up_in_the_path_the_child_gets(tmp_path: Path) -> None:
    program = tmp_path / "my-prover"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    (problem,) = _bin_problem(tmp_path, '[[WdPost]]\nBin = "my-prover"\n')
    assert problem.startswith('WdPost[0].Bin: "my-prover" is not found on PATH (')
    cfg = parse(f'[[WdPost]]\nBin = "my-prover"\nEnvs = {{ PATH = "{tmp_path}" }}\n')
    config.check_startable(cfg)  # found through Envs' PATH, as exec will look it up


def test_a_cpuset_beyond_the_cpus_this_process_may_use_cannot_start(tmp_path: Path) -> None:
    beyond = max(os.sched_getaffinity(0)) + 1
    (problem,) = _bin_problem(tmp_path, f'[[WdPost]]\nBin = "sh"\nCpuset = "0,{beyond}"\n')
    assert problem.startswith(f"WdPost[0].Cpuset: CPUs {beyond} are not ones this process may use")


@pytest.mark.parametrize(
    ("root", "words"),
    [
        ("{tmp}/file", "is not a directory"),
        ("{tmp}/file/below", "cannot be made: a part of its path is not a directory"),
        ("{tmp}/open", "may be written by other users and has no sticky bit (chmod go-w or +t it)"),
        ("{tmp}/new/deeper", None),  # made at the first spawn
        ("{tmp}/sticky", None),  # as /tmp: what is put there cannot be replaced by others
        ("{tmp}/theirs", "is a symlink owned by uid 65534, not by us or root"),
    ],
)
def test_a_tmp_root_the_gpu_children_could_not_use_cannot_start(
    tmp_path: Path, monkeypatch, root: str, words: str | None
) -> None:
    # Before, check-config passed it and serve restarted each child in a loop.
    (tmp_path / "file").write_text("")
    for name, mode in (("open", 0o777), ("sticky", 0o1777)):
        (tmp_path / name).mkdir()
        os.chmod(tmp_path / name, mode)
    if root.endswith("theirs"):  # another user's link to a good directory: the spawn refuses it
        if os.geteuid() != 0:
            pytest.skip("needs root to give a symlink to another user")
        (tmp_path / "theirs").symlink_to(tmp_path / "sticky")
        os.lchown(tmp_path / "theirs", 65534, 65534)
    monkeypatch.setenv(config.TMP_ROOT_ENV, root.format(tmp=tmp_path))
    problems = config.startup_problems(parse('[[WdPost]]\nBin = "sh"\nGpus = [0, 1]\n').children)
    if words is None:
        assert problems == []
    else:
        expected = (
            f"the tmp root {root.format(tmp=tmp_path)}, where Gpus puts each child's TMPDIR,"
            f" {words}; set DAMOCLES_EXT_TMP_ROOT to a directory of your own (or unset it for"
            " the default)"
        )
        assert problems == [expected]


def test_a_tmp_root_under_a_directory_another_user_owns_cannot_start(
    tmp_path: Path, monkeypatch
) -> None:
    # Its owner could swap our root for theirs once it is made: the spawn refuses it, and so
    # does the check before the ready line.
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    monkeypatch.setenv(config.TMP_ROOT_ENV, f"{theirs}/root")
    problems = config.startup_problems(parse('[[WdPost]]\nBin = "sh"\nGpus = [0, 1]\n').children)
    expected = (
        f"the tmp root {theirs}/root, where Gpus puts each child's TMPDIR, is under a directory"
        f" another user could change: directory {theirs} is owned by uid 65534, not by us or"
        " root, so its owner could replace what is in it; set DAMOCLES_EXT_TMP_ROOT to a"
        " directory of your own (or unset it for the default)"
    )
    assert problems == [expected]


def test_a_tmp_root_linked_from_a_directory_another_user_owns_cannot_start(
    tmp_path: Path, monkeypatch
) -> None:
    # Our link to our own directory, in theirs: its owner could swap the link, through which
    # the children reach their TMPDIRs. Before, only where it leads was checked: OK.
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    (theirs / "root").symlink_to(ours)
    os.chown(theirs, 65534, 65534)
    monkeypatch.setenv(config.TMP_ROOT_ENV, f"{theirs}/root")
    problems = config.startup_problems(parse('[[WdPost]]\nBin = "sh"\nGpus = [0, 1]\n').children)
    expected = (
        f"the tmp root {theirs}/root, where Gpus puts each child's TMPDIR, is under a directory"
        f" another user could change: directory {theirs} is owned by uid 65534, not by us or"
        " root, so its owner could replace what is in it; set DAMOCLES_EXT_TMP_ROOT to a"
        " directory of your own (or unset it for the default)"
    )
    assert problems == [expected]


def test_a_tmp_root_under_a_directory_this_user_may_not_write_cannot_start() -> None:
    # Before, serve reported ready and then restarted each GPU child in a loop, each spawn
    # failing to make the tmp root.
    from damocles_ext.config.startup import tmp_root_problem

    with a_closed_directory() as closed:
        closed.chmod(0o555)  # may enter and list, not create
        problem = said_when_kept_out(lambda: _raise_if(tmp_root_problem(f"{closed}/tmp/root")))
    assert problem == f"ValueError: cannot be made: this user may not create anything in {closed}"


def test_a_tmp_root_linked_from_a_directory_this_user_may_not_write_starts_where_it_leads() -> None:
    # An operator's link (DAMOCLES_EXT_TMP_ROOT=/srv/tmp-root -> /scratch/dext, not made yet):
    # the spawn makes the link's target, so only where it leads must let this user create.
    from damocles_ext.config.startup import tmp_root_problem
    from damocles_ext.supervisor.process import _open_tmp_root

    def check_then_make(root: str) -> None:
        _raise_if(tmp_root_problem(root))
        os.close(_open_tmp_root(root))  # as the spawn makes it

    with a_closed_directory() as closed:
        scratch = closed.parent / "scratch"
        scratch.mkdir(mode=0o1777)
        scratch.chmod(0o1777)  # anyone may create there, as in /tmp
        closed.chmod(0o755)
        (closed / "tmp-root").symlink_to(scratch / "dext")
        closed.chmod(0o555)  # may enter and list, not create
        said = said_when_kept_out(lambda: check_then_make(f"{closed}/tmp-root"))
        made = (scratch / "dext").is_dir()
    assert said == ""
    assert made


def _raise_if(problem: str | None) -> None:
    if problem is not None:
        raise ValueError(problem)


def test_a_gpus_table_is_checked_once_for_all_its_children(tmp_path: Path) -> None:
    problems = _bin_problem(tmp_path, '[[WdPost]]\nBin = "/nonexistent"\nGpus = [0, 1, 2]\n')
    assert len(problems) == 1


ITEM_CONFIGS = {
    "envs-name-nul": ('[[WdPost]]\nBin = "sh"\nEnvs = { "A\\u0000B" = "1" }\n', "WdPost[0].Envs"),
    "envs-value-nul": ('[[WdPost]]\nBin = "sh"\nEnvs = { A = "\\u0000" }\n', "WdPost[0].Envs.A"),
    "args-nul": ('[[WdPost]]\nBin = "sh"\nArgs = ["\\u0000"]\n', "WdPost[0].Args[0]"),
    "bin-nul": ('[[WdPost]]\nBin = "s\\u0000h"\n', "WdPost[0].Bin"),
    "cpuset-huge": ('[[WdPost]]\nBin = "sh"\nCpuset = "0-99999999999"\n', "WdPost[0].Cpuset"),
    "concurrent-huge": (
        '[[WdPost]]\nPlugin = "echo"\nConcurrent = 100000000000000000\n',
        "WdPost[0].Concurrent",
    ),
    "ready-timeout-huge": (
        '[[WdPost]]\nBin = "sh"\nReadyTimeoutSecs = 100000000000\n',
        "WdPost[0].ReadyTimeoutSecs",
    ),
    "max-attempts-huge": (
        '[[WdPost]]\nBin = "sh"\nMaxAttempts = 1000000\n',
        "WdPost[0].MaxAttempts",
    ),
    "bin-directory": ('[[WdPost]]\nBin = "/tmp"\n', 'WdPost[0].Bin: "/tmp" is a directory'),
    "nested-deep": (
        '[[WdPost]]\nBin = "sh"\nArgs = ' + "[" * 600 + "]" * 600 + "\n",
        "nested too deep to read",
    ),
}


@pytest.mark.parametrize("name", sorted(ITEM_CONFIGS))
def test_bad_values_exit_2_from_check_config_and_from_run_naming_file_and_key(
    tmp_path: Path, name: str
) -> None:
    text, where = ITEM_CONFIGS[name]
    path = tmp_path / "ext-prover.cfg"
    path.write_text(text)
    socket = tmp_path / "s.sock"
    run = ["run", "-c", str(path), "--socket", str(socket)]
    for command in (["check-config", "-c", str(path)], run):
        proc = run_cli_subprocess(*command)
        assert proc.returncode == 2, (command, proc.stderr)
        assert f"damocles-ext {command[0]}: error: {path}" in proc.stderr, proc.stderr
        assert where in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout == ""
    assert not socket.exists()


LONG = 32 * os.sysconf("SC_PAGESIZE") + 100  # over Linux's MAX_ARG_STRLEN
TOO_LONG = "x" * LONG


@pytest.mark.parametrize(
    ("block", "where"),
    [
        ('Bin = "sh"\nArgs = ["ok", "' + TOO_LONG + '"]', f"WdPost[0].Args[1]: {LONG + 1} bytes"),
        ('Bin = "sh"\nEnvs = { BIG = "' + TOO_LONG + '" }', f"WdPost[0].Envs.BIG: {LONG + 5} "),
        ('Plugin = "echo"\nPluginOptions = { k = "' + TOO_LONG + '" }', "WdPost[0].Plugin"),
    ],
)
def test_an_argument_or_variable_too_long_for_exec_cannot_start(
    tmp_path: Path, block: str, where: str
) -> None:
    # exec refuses it (E2BIG), so every start of the child would fail.
    most = 32 * os.sysconf("SC_PAGESIZE")  # 131072 with 4 KiB pages
    problems = _bin_problem(tmp_path, f"[[WdPost]]\n{block}\n")
    assert any(
        p.startswith(where) and f"exec takes at most {most} per argument" in p for p in problems
    ), problems


def test_a_command_line_and_environment_over_arg_max_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file is bounded to 1 MiB; what it adds to a large inherited environment still counts.
    for i in range(os.sysconf("SC_ARG_MAX") // 100_000 + 1):
        monkeypatch.setenv(f"DEXT_TEST_BIG_{i}", "x" * 100_000)
    (problem,) = _bin_problem(tmp_path, '[[WdPost]]\nBin = "sh"\n')
    assert problem.startswith("WdPost[0]: the command line and environment take ")
    assert f"more than exec takes here ({os.sysconf('SC_ARG_MAX')}, ARG_MAX)" in problem
    # Without the inherited environment it fits.
    config.check_startable(parse('[[WdPost]]\nBin = "/bin/sh"\nInheritEnvs = false\n'))


@pytest.mark.parametrize(
    ("block", "where"),
    [
        ('Bin = "/opt/\u4e2d/prover"', "WdPost[0].Bin"),
        ('Bin = "sh"\nArgs = ["\u4e2d"]', "WdPost[0].Args[0]"),
        ('Bin = "sh"\nEnvs = { NAME = "\u4e2d" }', "WdPost[0].Envs.NAME"),
    ],
)
def test_a_value_the_locale_cannot_pass_to_exec_is_refused_saying_to_use_utf8(
    tmp_path: Path, block: str, where: str
) -> None:
    # An ASCII locale (LC_ALL=C without Python's UTF-8 mode) stands for any locale of another
    # script (Latin-1, say): exec takes bytes, and the character has none there.
    path = tmp_path / "ext-prover.cfg"
    path.write_text(f"[[WdPost]]\n{block}\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    for command in ("check-config", "run"):
        proc = run_cli_subprocess(command, "-c", str(path), env=env)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert (
            f"{where}: '\\u4e2d' cannot be passed to the child in this locale's encoding (ascii);"
            " run damocles-ext in a UTF-8 locale (LANG=C.UTF-8, say)"
        ) in proc.stderr, proc.stderr
