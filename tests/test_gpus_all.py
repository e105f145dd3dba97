"""`Gpus = "all"` when the GPU driver does not answer (yet), against a real (fake) `nvidia-smi` and
`pynvml` in real damocles-ext processes: exit code 75 (EX_TEMPFAIL), which the systemd units
restart, rather than 2, which they never restart (a prover started before the driver after a
boot would stay down); a machine whose driver answers that it has no GPU stays exit code 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from damocles_ext import config
from damocles_ext.config import machine
from damocles_ext.errors import EXIT_TEMPFAIL, EXIT_USAGE

DRIVER_DOWN = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that"
    " the latest NVIDIA driver is installed and running."
)
NOT_READY = "the NVIDIA driver does not answer"
RESTART = "the exit code is 75 (EX_TEMPFAIL), not 2, so that a restart"

# pynvml as nvidia-ml-py has it, as far as probe_gpus uses it.
NVML_DRIVER_NOT_LOADED = """
class NVMLError(Exception):
    pass
def nvmlInit():
    raise NVMLError("Driver Not Loaded")
"""
NVML_NO_DEVICE = """
class NVMLError(Exception):
    pass
def nvmlInit():
    pass
def nvmlDeviceGetCount():
    return 0
def nvmlShutdown():
    pass
"""
NO_NVML = "raise ImportError('nvidia-ml-py is not installed')\n"


def machine_with(tmp_path: Path, nvidia_smi: str | None, pynvml: str = NO_NVML) -> dict[str, str]:
    """The environment of a process on a machine whose `nvidia-smi` runs `nvidia_smi` (a shell
    script's body; None: there is none) and whose pynvml module is `pynvml`'s text."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi is not None:
        program = bin_dir / "nvidia-smi"
        program.write_text("#!/bin/sh\n" + nvidia_smi)
        program.chmod(0o755)
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "pynvml.py").write_text(pynvml)
    env = dict(os.environ)
    env["PATH"] = str(bin_dir)  # no other nvidia-smi than this one
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(modules), env.get("PYTHONPATH")]))
    return env


def commands(tmp_path: Path, cfg: Path) -> dict[str, list[str]]:
    """Each command that reads the config, as an operator or damocles-manager starts it."""
    return {
        "check-config": ["check-config", "-c", str(cfg)],
        "run": ["run", "-c", str(cfg), "--socket", str(tmp_path / "run.sock")],
        "worker": [
            "worker", "-c", str(cfg), "--manager", "127.0.0.1:9",
            "--socket", str(tmp_path / "worker.sock"),
        ],
        "serve": ["serve", "window_post", "-c", str(cfg)],
    }  # fmt: skip


def each_command(
    tmp_path: Path, cfg: Path, env: dict[str, str]
) -> Iterator[tuple[str, subprocess.CompletedProcess[str]]]:
    """Each of `commands` run with `env`: (its name, how it ended), none with a traceback or
    anything on stdout (serve: no ready line)."""
    for name, args in commands(tmp_path, cfg).items():
        proc = damocles_ext(args, env)
        assert "Traceback" not in proc.stderr and proc.stdout == "", (name, proc.stderr)
        yield name, proc


def damocles_ext(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "damocles_ext", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def write_config(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text(text)
    return cfg


GPUS_ALL = '[[WdPost]]\nBin = "/bin/sh"\nGpus = "all"\n'


@pytest.mark.parametrize(
    ("nvidia_smi", "pynvml", "said"),
    [
        (
            f'echo "{DRIVER_DOWN}" >&2\nexit 9\n',
            NO_NVML,
            f"nvidia-smi -L: exit status 9: {DRIVER_DOWN}",
        ),
        (
            f'echo "{DRIVER_DOWN}" >&2\nexit 9\n',
            NVML_DRIVER_NOT_LOADED,
            "NVML: Driver Not Loaded; nvidia-smi -L: exit status 9",
        ),
        (None, NO_NVML, "nvidia-smi: not found on PATH"),
    ],
    ids=["nvidia-smi-fails", "nvml-and-nvidia-smi-fail", "no-nvidia-smi"],
)
def test_a_gpu_driver_that_does_not_answer_yet_exits_75_from_every_command_saying_so(
    tmp_path: Path, nvidia_smi: str | None, pynvml: str, said: str
) -> None:
    cfg = write_config(tmp_path, GPUS_ALL)
    for name, proc in each_command(tmp_path, cfg, machine_with(tmp_path, nvidia_smi, pynvml)):
        assert proc.returncode == EXIT_TEMPFAIL, (name, proc.stderr)
        assert proc.stderr.startswith(
            f'damocles-ext {name}: error: {cfg}: WdPost[0].Gpus: "all" cannot list the GPUs:'
            f" {NOT_READY}"
        ), proc.stderr
        assert said in proc.stderr and RESTART in proc.stderr, proc.stderr
        assert "list the GPUs, e.g. Gpus = [0, 1], or remove Gpus" in proc.stderr
    assert not (tmp_path / "run.sock").exists() and not (tmp_path / "worker.sock").exists()


@pytest.mark.parametrize(
    ("nvidia_smi", "pynvml", "said"),
    [
        ("echo 'No devices were found'\n", NO_NVML, "nvidia-smi -L: listed no GPU"),
        (None, NVML_NO_DEVICE, "NVML: 0 devices; nvidia-smi: not found on PATH"),
    ],
    ids=["nvidia-smi-lists-none", "nvml-counts-none"],
)
def test_a_driver_that_answers_no_gpu_is_still_exit_2_from_every_command(
    tmp_path: Path, nvidia_smi: str | None, pynvml: str, said: str
) -> None:
    cfg = write_config(tmp_path, GPUS_ALL)
    for name, proc in each_command(tmp_path, cfg, machine_with(tmp_path, nvidia_smi, pynvml)):
        assert proc.returncode == EXIT_USAGE, (name, proc.stderr)
        assert 'WdPost[0].Gpus: "all" found no GPU (asked NVML' in proc.stderr, proc.stderr
        assert said in proc.stderr and NOT_READY not in proc.stderr, proc.stderr


def test_a_mistake_in_the_file_is_exit_2_even_while_the_driver_does_not_answer(
    tmp_path: Path,
) -> None:
    # A restart cannot fix the mistake: it is reported with the driver's silence, and exit 2.
    env = machine_with(tmp_path, f'echo "{DRIVER_DOWN}" >&2\nexit 9\n')
    cfg = write_config(tmp_path, GPUS_ALL + '[[WinPost]]\nBin = "/bin/sh"\nConcurent = 2\n')
    for name in ("check-config", "run"):
        proc = damocles_ext(commands(tmp_path, cfg)[name], env)
        assert proc.returncode == EXIT_USAGE, (name, proc.stderr)
        assert f"{cfg} has 2 errors:" in proc.stderr, proc.stderr
        assert "WinPost[0]: unknown key 'Concurent' (did you mean 'Concurrent'?)" in proc.stderr
        assert NOT_READY in proc.stderr


def test_the_driver_answering_later_lets_the_same_command_start(tmp_path: Path) -> None:
    env = machine_with(tmp_path, f'echo "{DRIVER_DOWN}" >&2\nexit 9\n')
    cfg = write_config(tmp_path, GPUS_ALL)
    args = commands(tmp_path, cfg)["check-config"]
    assert damocles_ext(args, env).returncode == EXIT_TEMPFAIL
    # The driver is loaded: the restart finds both GPUs.
    (tmp_path / "bin" / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-a)'\n"
        "echo 'GPU 1: NVIDIA GeForce RTX 3090 (UUID: GPU-b)'\n"
    )
    proc = damocles_ext(args, env)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == [
        "window_post#0",
        "window_post#1",
    ]


def test_nvidia_smi_that_does_not_answer_in_time_is_the_driver_not_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As nvidia-smi can hang while the driver loads; the timeout is shortened, the hang is real.
    env = machine_with(tmp_path, "exec sleep 60\n")
    monkeypatch.setenv("PATH", env["PATH"] + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    monkeypatch.setattr(machine, "_GPU_DETECT_TIMEOUT", 0.5)
    probe = machine.probe_gpus()
    assert probe == config.GpuProbe(
        [],
        ["NVML: nvidia-ml-py is not installed", "nvidia-smi -L: no answer within 0.5s"],
        answered=False,
    )


def test_a_slow_search_for_the_gpus_says_how_to_make_it_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the driver's persistence mode, NVML or nvidia-smi brings the GPUs up each time it
    # starts: seconds, all before serve's ready line, which damocles-manager awaits 5 s.
    env = machine_with(tmp_path, "echo 'GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-a)'\n")
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    quick = config.parse_config(GPUS_ALL, "x.cfg")
    assert [c.gpu for c in quick.children] == ["0"]
    assert not [w for w in quick.warnings if "to find the GPUs" in w]
    monkeypatch.setattr(machine, "SLOW_GPU_PROBE", 0.0)  # every search is slow now
    (warning,) = [w for w in config.parse_config(GPUS_ALL, "x.cfg").warnings if "GPUs," in w]
    assert warning.startswith('WdPost[0].Gpus: "all" took ')
    assert "damocles-manager waits 5 s (its ReadyTimeoutSecs)" in warning
    assert "persistence mode (nvidia-persistenced, or nvidia-smi -pm 1)" in warning


def test_a_gpu_number_the_machine_does_not_have_is_warned_about_by_each_command(
    tmp_path: Path,
) -> None:
    # A config written for a machine of more GPUs: CUDA_VISIBLE_DEVICES=2 on a 2-GPU machine
    # hides every GPU from the child, and bellperson proves on the CPU, hours too late.
    env = machine_with(
        tmp_path,
        "echo 'GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-a)'\n"
        "echo 'GPU 1: NVIDIA GeForce RTX 3090 (UUID: GPU-b)'\n",
    )
    cfg = write_config(
        tmp_path,
        '[[WdPost]]\nBin = "/bin/sh"\nGpus = [0, 1, 2, 3]\n'
        '[[WinPost]]\nBin = "/bin/sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "1,4" }\n'
        '[[WinPost]]\nBin = "/bin/sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "GPU-8932f937" }\n',
    )
    said = [
        (
            "window_post#2: its CUDA_VISIBLE_DEVICES=2 names GPU 2, which this machine does not"
            " have (it has GPUs 0 to 1, as NVML or nvidia-smi -L count them): CUDA hides it, and"
            " every GPU listed after it, from the child, which with no GPU left proves on the"
            " CPU, far too slowly for a deadline; remove it from WdPost[0]'s Gpus or Envs"
        ),
        "window_post#3: its CUDA_VISIBLE_DEVICES=3 names GPU 3,",
        "winning_post#0: its CUDA_VISIBLE_DEVICES=1,4 names GPU 4,",
    ]
    proc = damocles_ext(["check-config", "-c", str(cfg)], env)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "names GPU" in line]
    # Only these: the GPUs it has, and a GPU named by UUID, are not warned about.
    assert len(warned) == 3, warned
    assert [
        w.removeprefix("warning: ")[: len(s)] for w, s in zip(warned, said, strict=True)
    ] == said
    # run and worker say it in their log before they start (here they stop at once after it:
    # their control socket's directory is not private, a usage error).
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    for args in (
        ["run", "-c", str(cfg), "--socket", str(shared / "run.sock")],
        ["worker", "-c", str(cfg), "--manager", "127.0.0.1:9", "--socket", str(shared / "w.sock")],
    ):
        proc = damocles_ext(args, env)
        assert proc.returncode == EXIT_USAGE and "not private" in proc.stderr, proc.stderr
        assert "window_post#3: its CUDA_VISIBLE_DEVICES=3 names GPU 3" in proc.stderr, args


def test_with_gpus_all_each_command_asks_the_driver_once_not_again_for_the_gpu_number_check(
    tmp_path: Path,
) -> None:
    # Without persistence mode each asking takes seconds, before serve's ready line or a
    # worker's first job: the check of the numbers the children were given takes the parse's
    # list instead of asking again.
    asked = tmp_path / "asked"
    env = machine_with(
        tmp_path,
        f"echo asked >> {asked}\n"
        "echo 'GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-a)'\n"
        "echo 'GPU 1: NVIDIA GeForce RTX 3090 (UUID: GPU-b)'\n",
    )
    cfg = write_config(
        tmp_path, GPUS_ALL + '[[WinPost]]\nBin = "/bin/sh"\nEnvs = { CUDA_VISIBLE_DEVICES = "2" }\n'
    )
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    for args in (
        ["check-config", "-c", str(cfg)],
        ["run", "-c", str(cfg), "--socket", str(shared / "run.sock")],
        ["worker", "-c", str(cfg), "--manager", "127.0.0.1:9", "--socket", str(shared / "w.sock")],
    ):
        asked.unlink(missing_ok=True)
        proc = damocles_ext(args, env)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert asked.read_text() == "asked\n", args
        if args[0] != "worker":  # (its WinningPoSt children are not its to start)
            assert "winning_post#0: its CUDA_VISIBLE_DEVICES=2 names GPU 2" in proc.stderr, args


@pytest.mark.parametrize(
    ("status", "said", "advice"),
    [
        (
            4,
            "Failed to initialize NVML: Insufficient Permissions",
            "this user may not use the GPUs: give it the group that owns /dev/nvidia*",
        ),
        (
            15,
            "Unable to determine the device handle for GPU 0000:3B:00.0: GPU is lost.",
            "a GPU is faulty or lost (see `nvidia-smi` and the kernel log",
        ),
    ],
    ids=["no-permission", "gpu-lost"],
)
def test_nvidia_smi_statuses_a_restart_does_not_cure_say_what_to_do_instead_of_wait(
    tmp_path: Path, status: int, said: str, advice: str
) -> None:
    # nvidia-smi's documented exit statuses: 4, this user may not use the GPUs (a unit without
    # the group of /dev/nvidia*); 8, 10, 14, 15, a faulty GPU. Each was told "the driver may
    # not be loaded yet, right after a boot", while systemd restarted it for ever. Still 75:
    # a restart is how the fix (the group, a reboot) is picked up, and it costs nothing.
    env = machine_with(tmp_path, f'echo "{said}" >&2\nexit {status}\n')
    cfg = write_config(tmp_path, GPUS_ALL)
    proc = damocles_ext(["check-config", "-c", str(cfg)], env)
    assert proc.returncode == EXIT_TEMPFAIL, proc.stderr
    assert f"nvidia-smi -L: exit status {status}: {said}" in proc.stderr, proc.stderr
    assert advice in proc.stderr and NOT_READY not in proc.stderr, proc.stderr
    assert "Right after a boot" not in proc.stderr


def test_an_absent_gpu_number_inherited_from_damocles_exts_environment_says_it_is_inherited(
    tmp_path: Path,
) -> None:
    # Neither Gpus nor Envs names the GPU: the child inherits CUDA_VISIBLE_DEVICES from
    # damocles-ext's own environment, so 'remove it from WdPost[0]'s Gpus or Envs' sent the
    # operator to look where it is not.
    env = machine_with(tmp_path, "echo 'GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-a)'\n")
    env["CUDA_VISIBLE_DEVICES"] = "3"
    cfg = write_config(tmp_path, '[[WdPost]]\nBin = "/bin/sh"\n')
    proc = damocles_ext(["check-config", "-c", str(cfg)], env)
    assert proc.returncode == 0, proc.stderr
    assert "window_post#0: its CUDA_VISIBLE_DEVICES=3 names GPU 3" in proc.stderr, proc.stderr
    assert "inherited from damocles-ext's own environment" in proc.stderr, proc.stderr
    assert "remove it from WdPost[0]'s Gpus or Envs" not in proc.stderr


NVML_GPU_1_LOST = """
class NVMLError(Exception):
    pass
def nvmlInit():
    pass
def nvmlDeviceGetCount():
    return 3
def nvmlDeviceGetHandleByIndex(i):
    if i == 1:
        raise NVMLError("GPU is lost")
    return i
def nvmlShutdown():
    pass
"""
NVML_GPU_1_DENIED = NVML_GPU_1_LOST.replace(
    'raise NVMLError("GPU is lost")',
    'e = NVMLError("Insufficient Permissions"); e.value = 4; raise e',
)
NVML_GPU_1_DENIED_2_LOST = NVML_GPU_1_DENIED.replace(
    "    return i\n", '    if i == 2:\n        raise NVMLError("GPU is lost")\n    return i\n'
)
NVML_ALL_LOST = NVML_GPU_1_LOST.replace("if i == 1:", "if True:")
NVIDIA_SMI_GPU_1_LOST = (
    "echo 'GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-a)'\n"
    "echo 'Unable to determine the device handle for GPU 0000:3B:00.0: GPU is lost.' >&2\n"
    "echo 'GPU 2: NVIDIA GeForce RTX 3090 (UUID: GPU-c)'\n"
    "exit 15\n"
)


@pytest.mark.parametrize(
    ("nvidia_smi", "pynvml", "said"),
    [
        (
            NVIDIA_SMI_GPU_1_LOST,
            NO_NVML,
            (
                "nvidia-smi -L: exit status 15: Unable to determine the device handle for GPU"
                " 0000:3B:00.0: GPU is lost.; a GPU is faulty or lost"
            ),
        ),
        # NVML counts the lost GPU: only asking for its handle fails.
        (None, NVML_GPU_1_LOST, "NVML: GPU 1: GPU is lost; a GPU is faulty or lost"),
        # A device node this user may not open: permissions, not a faulty GPU.
        (
            None,
            NVML_GPU_1_DENIED,
            "NVML: GPU 1: Insufficient Permissions; this user may not use the GPUs",
        ),
    ],
    ids=["nvidia-smi", "nvml", "nvml-denied"],
)
def test_gpus_listed_around_a_lost_one_get_children_and_a_warning_but_no_absent_gpu_one(
    tmp_path: Path, nvidia_smi: str | None, pynvml: str, said: str
) -> None:
    # One GPU fallen off the bus among working ones: every command gave up on all of them (exit
    # 75, restarted for ever: no proof at all), or, with NVML, put a child on the lost one.
    env = machine_with(tmp_path, nvidia_smi, pynvml)
    cfg = write_config(tmp_path, GPUS_ALL)
    proc = damocles_ext(["check-config", "-c", str(cfg)], env)
    assert proc.returncode == 0, proc.stderr
    assert f"takes only the GPUs listed, 0, 2, as the driver said ({said}" in proc.stderr, (
        proc.stderr
    )
    assert proc.stderr.count("takes only the GPUs") == 1, proc.stderr
    assert "CUDA_VISIBLE_DEVICES=0" in proc.stdout and "CUDA_VISIBLE_DEVICES=2" in proc.stdout
    assert "CUDA_VISIBLE_DEVICES=1" not in proc.stdout
    # GPU 2 is there: the child on it is not told it names a GPU this machine does not have.
    assert "which this machine does not have" not in proc.stderr, proc.stderr


def test_nvml_counting_gpus_it_can_give_no_handle_for_says_so_not_zero_devices(
    tmp_path: Path,
) -> None:
    env = machine_with(tmp_path, None, NVML_ALL_LOST)
    cfg = write_config(tmp_path, GPUS_ALL)
    proc = damocles_ext(["check-config", "-c", str(cfg)], env)
    assert proc.returncode == EXIT_TEMPFAIL, proc.stderr
    assert "NVML: GPU 0: GPU is lost; GPU 1: GPU is lost; GPU 2: GPU is lost" in proc.stderr
    assert "a GPU is faulty or lost" in proc.stderr and "0 devices" not in proc.stderr


def test_nvml_refusing_one_gpu_for_permissions_and_losing_another_gives_both_advices(
    tmp_path: Path,
) -> None:
    env = machine_with(tmp_path, None, NVML_GPU_1_DENIED_2_LOST)
    cfg = write_config(tmp_path, GPUS_ALL)
    proc = damocles_ext(["check-config", "-c", str(cfg)], env)
    assert proc.returncode == 0, proc.stderr
    assert "takes only the GPUs listed, 0, as the driver said" in proc.stderr, proc.stderr
    assert "a GPU is faulty or lost" in proc.stderr
    assert "this user may not use the GPUs" in proc.stderr
