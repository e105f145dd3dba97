"""What reading a config asks of this machine: where Gpus' TMPDIRs go, and which GPUs exist.

Nothing here creates a directory or starts a child.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from typing import NamedTuple

from .spec import TMP_ROOT_NAME

_GPU_DETECT_TIMEOUT = 10.0
#: Seconds of finding the GPUs past which a config says how to make it quick: damocles-manager
#: gives `serve` 5 s for its ready line, and `Gpus = "all"` is found before it.
SLOW_GPU_PROBE = 2.0

_per_run_tmp_root: str | None = None
_per_run_owner: int | None = None  # the process that chose it (a forked copy is not it)


def untrusted_problem(st: os.stat_result, euid: int, *, link: bool = False) -> str | None:
    """Why a tmp root (`st`: its stat; `link`: the lstat of a symlink to it) would let another
    user replace what we put there, or None: it must be ours or root's, and others may not write
    to it unless it has the sticky bit (as /tmp has). One rule for the spawn and check-config."""
    if st.st_uid not in (0, euid):
        return f"is {'a symlink ' if link else ''}owned by uid {st.st_uid}, not by us or root"
    if not link and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return "may be written by other users and has no sticky bit (chmod go-w or +t it)"
    return None


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
    global _per_run_tmp_root, _per_run_owner
    if _per_run_tmp_root is None:
        _per_run_owner = os.getpid()
        # Random, so that nobody can make it first; one per process, so that each parse agrees.
        name = f"{TMP_ROOT_NAME}-{euid}-{secrets.token_hex(8)}"
        _per_run_tmp_root = os.path.join(tempfile.gettempdir(), name)
        atexit.register(_remove_per_run_root)
    return _per_run_tmp_root


def per_run_tmp_root() -> str | None:
    """This process's own root of Gpus' TMPDIRs, when default_tmp_root chose one (None in a
    forked copy: the root is its parent's, removed when the parent goes)."""
    return _per_run_tmp_root if _per_run_owner == os.getpid() else None


def _remove_per_run_root() -> None:
    path = per_run_tmp_root()
    if path is None:
        return  # a forked copy of us exiting: the directory is still in use
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
        shutil.rmtree(path, ignore_errors=True)


class GpuProbe(NamedTuple):
    """What asking this machine for its GPUs gave."""

    gpus: list[int]  # their indices; [] when none was found
    reasons: list[str]  # when none was found: one line per way tried, saying what it answered
    # Whether the driver answered one of the ways (NVML initialised, or `nvidia-smi -L` exited
    # 0): then no GPU means this machine has none. When none answered (the driver not loaded
    # yet after a boot, nvidia-smi failing, missing or hanging), a later ask may find them.
    answered: bool
    # What to do, when nvidia-smi's exit status says the cause is not a driver still loading:
    # this user may not use the GPUs, or a GPU is faulty (its documented statuses 4, 8, 10, 14,
    # 15). None otherwise.
    advice: str | None = None
    # When `nvidia-smi -L` listed GPUs but exited with an error (a GPU fallen off the bus among
    # working ones): what it said, and what to do. The GPUs it listed are in `gpus`.
    partial: str | None = None


#: nvidia-smi's documented exit statuses whose cause a restart does not fix, and what to do.
_NO_PERMISSION = (
    "this user may not use the GPUs: give it the group that owns /dev/nvidia* (`ls -l"
    " /dev/nvidia*`; SupplementaryGroups= in its systemd unit)"
)
_FAULTY = (
    "a GPU is faulty or lost (see `nvidia-smi` and the kernel log, `dmesg | grep -i xid`):"
    " until it is repaired, list the GPUs that work, e.g. Gpus = [0, 2]"
)
#: NVML's NVML_ERROR_NO_PERMISSION.
_NVML_NO_PERMISSION = 4
_ADVICE = {4: _NO_PERMISSION, 8: _FAULTY, 10: _FAULTY, 14: _FAULTY, 15: _FAULTY}


def probe_gpus() -> GpuProbe:
    """The GPUs of this machine, via NVML or `nvidia-smi -L`, and whether the driver answered."""
    reasons: list[str] = []
    answered = False
    advice = None
    try:
        import pynvml  # nvidia-ml-py, optional
    except ImportError:
        pynvml = None
        reasons.append("NVML: nvidia-ml-py is not installed")
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                found, lost, why = [], [], set()
                for i in range(pynvml.nvmlDeviceGetCount()):  # a lost GPU is counted too
                    try:
                        pynvml.nvmlDeviceGetHandleByIndex(i)
                        found.append(i)
                    except pynvml.NVMLError as exc:
                        lost.append(f"GPU {i}: {exc}")
                        # A device node this user may not open (or a container's cgroup
                        # denies) is a matter of permissions, not a faulty GPU.
                        denied = getattr(exc, "value", None) == _NVML_NO_PERMISSION
                        why.add(_NO_PERMISSION if denied else _FAULTY)
            finally:
                pynvml.nvmlShutdown()
            if lost:
                advice = "; and ".join(sorted(why))
                if found:
                    partial = f"NVML: {'; '.join(lost)}; {advice}"
                    return GpuProbe(found, [], answered=True, partial=partial)
                reasons.append(f"NVML: {'; '.join(lost)}")
            elif found:
                return GpuProbe(found, [], answered=True)
            else:
                answered = True
                reasons.append("NVML: 0 devices")
        except (pynvml.NVMLError, OSError) as exc:
            # No driver or library (yet): nvidia-smi may still answer, or say why not.
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
            return GpuProbe(found, [], answered=True)
        said = (out.stderr.strip() or out.stdout.strip()).splitlines()
        if found:
            # One GPU lost among working ones: proving on those listed beats proving on none
            # (a restart would find the same) until the lost one is repaired.
            said = [line for line in said if not line.startswith("GPU ")]
            what = f": {said[0][:200]}" if said else ""
            partial = f"nvidia-smi -L: exit status {out.returncode}{what}"
            advice = _ADVICE.get(out.returncode)
            if advice is not None:
                partial += f"; {advice}"
            return GpuProbe(found, [], answered=True, partial=partial)
        what = f": {said[0][:200]}" if said else ""
        if out.returncode != 0:
            # 9 is "could not communicate with the NVIDIA driver"; whatever the status, the
            # driver gave no list: asking again later may get one.
            reasons.append(f"nvidia-smi -L: exit status {out.returncode}{what}")
            advice = _ADVICE.get(out.returncode, advice)
        else:
            answered = True
            reasons.append(f"nvidia-smi -L: listed no GPU{what}")
    return GpuProbe([], reasons, answered, advice)


def detect_gpus(why: list[str] | None = None) -> list[int]:
    """Indices of the GPUs on this machine, via NVML or `nvidia-smi -L`; [] when none are found.

    When none are found, `why` (if given) gets one line per way tried, saying what it answered.
    probe_gpus also says whether the driver answered at all.
    """
    probe = probe_gpus()
    if why is not None and not probe.gpus:
        why.extend(probe.reasons)
    return probe.gpus
