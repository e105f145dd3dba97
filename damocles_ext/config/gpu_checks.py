"""What a config's children share through their GPUs that costs time, said as warnings: the
supervisor's GPU locks (`run`), bellperson's lock files in one TMPDIR, GPUs numbered two ways."""

from __future__ import annotations

import os

from .spec import ChildSpec, serve_args
from .startup import env_value, gpu_numbers


def gpu_warnings(children: list[ChildSpec]) -> list[str]:
    """What `children` share through their GPUs that costs time wherever each stage has its own
    supervisor: bellperson's lock files in one TMPDIR, GPUs numbered two ways."""
    return (
        winning_shares_lock_dir(children)
        + window_shares_lock_dir(children)
        + gpu_numbered_two_ways(children)
    )


def winning_waits_for_window(children: list[ChildSpec]) -> list[str]:
    """A WinningPoSt child holding a GPU's lock that WindowPoSt children hold too waits for their
    requests on that GPU (long ones: minutes), past its ~20 s budget: said once per table. The
    lock is the supervisor's own: only where one runs both stages (`run`)."""
    window = {
        lock: child.name
        for child in children
        if child.stage in ("window_post", "window_post_snark")
        for lock in child.locks
        if lock.startswith("gpu:")
    }
    said: set[int] = set()
    out = []
    for child in children:
        if child.stage != "winning_post" or child.block in said:
            continue
        shared = [lock for lock in child.locks if lock in window]
        if shared:
            said.add(child.block)
            out.append(
                f"WinPost[{child.block}]: {child.name} shares the lock {shared[0]} with"
                f" {window[shared[0]]} in `run` (one supervisor for both stages; each `serve`"
                " has its own locks), so a WinningPoSt waits for the WindowPoSt requests on"
                " that GPU, past its ~20 s budget when they are long; set GpuLock = false in"
                " this table if the GPU's memory holds both proofs, or give WinningPoSt a GPU"
                " of its own"
            )
    return out


# Built-in provers that never take bellperson's lock files (and `native`'s reference prover with
# gpu_lock = false; a vendor `library` may take them itself, whatever gpu_lock says).
_LOCKLESS_PLUGINS = frozenset({"echo", "sleep", "python-ref"})


def _bellperson_lock_dir(child: ChildSpec) -> tuple[str, str] | None:
    """(directory, how it is said) where `child`'s prover keeps bellperson's GPU lock files, as
    bellperson finds it (TMPDIR, else /tmp); None for a prover known to take no such lock, and
    for a `damocles-ext serve` (damocles-manager's entry for us: its provers, the children of
    the config it reads, are checked there, with their own TMPDIR)."""
    if child.kind == "bin" and serve_args(child.argv) is not None:
        return None
    if child.kind == "plugin" and (
        child.plugin in _LOCKLESS_PLUGINS
        or (
            child.plugin == "native"
            and child.plugin_options.get("gpu_lock") is False
            and "library" not in child.plugin_options
        )
    ):
        return None
    tmpdir = env_value(child.inherit_envs, child.envs, "TMPDIR") or "/tmp"
    if "TMPDIR" in child.envs:
        said = f"TMPDIR {tmpdir}"
    elif child.inherit_envs:
        said = f"TMPDIR {tmpdir} (not in its Envs: the one damocles-ext runs with, or /tmp)"
    else:
        said = "TMPDIR /tmp (not in its Envs, and InheritEnvs = false)"
    return os.path.normpath(tmpdir), said


def _devices(child: ChildSpec) -> frozenset[str] | None:
    """The GPUs `child` sees (its CUDA_VISIBLE_DEVICES, from Envs or inherited); None: all."""
    value = env_value(child.inherit_envs, child.envs, "CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return frozenset(d.strip() for d in value.split(",") if d.strip())


#: How CUDA numbers the GPUs that CUDA_VISIBLE_DEVICES names by index.
ORDER = "CUDA_DEVICE_ORDER"


def gpu_numbered_two_ways(children: list[ChildSpec]) -> list[str]:
    """Children pinned to GPUs by number in CUDA's default order (fastest first) beside children
    of Gpus, which number them by PCI bus as nvidia-smi does: on a machine with GPUs of different
    models one number names two GPUs, and the lock gpu:<i> does not keep their proofs apart.
    Said once per table."""
    by_bus = [c for c in children if c.gpu is not None and c.envs.get(ORDER) == "PCI_BUS_ID"]
    if not by_bus:
        return []
    said: set[tuple[str, int]] = set()
    out = []
    for child in children:
        numbers = gpu_numbers(child)
        if not numbers or (child.stage, child.block) in said:
            continue
        if env_value(child.inherit_envs, child.envs, ORDER) == "PCI_BUS_ID":
            continue
        said.add((child.stage, child.block))
        out.append(
            f"{child.name}: its CUDA_VISIBLE_DEVICES={','.join(map(str, numbers))} counts the GPUs"
            f" in CUDA's default order (fastest first), while {by_bus[0].name}'s Gpus count them"
            " as nvidia-smi does (by PCI bus): on a machine with different GPU models one number"
            " may name two GPUs, and their GPU lock then does not keep the proofs apart; add"
            f' {ORDER} = "PCI_BUS_ID" to its Envs, or give it Gpus instead'
        )
    return out


def _window_by_lock_dir(children: list[ChildSpec]) -> dict[str, list[ChildSpec]]:
    """The WindowPoSt children (and SNARK steps) whose provers keep bellperson's lock files, by
    the directory they keep them in."""
    by_dir: dict[str, list[ChildSpec]] = {}
    for child in children:
        found = _bellperson_lock_dir(child)
        if child.stage in ("window_post", "window_post_snark") and found is not None:
            by_dir.setdefault(found[0], []).append(child)
    return by_dir


def winning_shares_lock_dir(children: list[ChildSpec]) -> list[str]:
    """A WinningPoSt child whose prover keeps bellperson's lock files where a WindowPoSt child's
    does waits for each running WindowPoSt to end: both are priority proofs, and each holds
    bellman.priority.lock for its whole proof. That is a file lock: it acts across processes
    (one `serve` per stage) and whatever GpuLock says. Said once per table. A TMPDIR of its own
    is the cure only on a GPU of its own: on a GPU both see, it runs both proofs there at once."""
    window = _window_by_lock_dir(children)
    said: set[int] = set()
    out = []
    for child in children:
        if child.stage != "winning_post" or child.block in said:
            continue
        found = _bellperson_lock_dir(child)
        if found is None or found[0] not in window:
            continue
        said.add(child.block)
        mine = _devices(child)
        shared = [
            w for w in window[found[0]] if mine is None or (d := _devices(w)) is None or mine & d
        ]
        other = (shared or window[found[0]])[0].name
        if shared:
            cure = (
                f"; it also runs on a GPU that {other} uses: give this table a GPU of its own"
                " (CUDA_VISIBLE_DEVICES, or Gpus) and a TMPDIR of its own; a TMPDIR of its own"
                " alone would run both proofs on that GPU at once, which needs its memory for both"
            )
        else:
            cure = "; give this table a TMPDIR of its own in Envs (Gpus gives each child one)"
        out.append(
            f"WinPost[{child.block}]: {child.name} and {other} keep bellperson's GPU"
            f" lock files in the same {found[1]}, so a WinningPoSt waits for a running WindowPoSt"
            " to end (both hold bellman.priority.lock for the whole proof), past its ~20 s"
            f" budget, even with one `serve` per stage and with GpuLock = false{cure}"
        )
    return out


def window_shares_lock_dir(children: list[ChildSpec]) -> list[str]:
    """WindowPoSt children on different GPUs whose provers keep bellperson's lock files in one
    directory take turns across those GPUs: a WindowPoSt is a priority proof, and holds
    bellman.priority.lock for its whole proof (a file lock: across processes, whatever GpuLock
    says). Said once per directory."""
    out = []
    for group in _window_by_lock_dir(children).values():
        devices = [(child, _devices(child)) for child in group]
        apart = next(
            ((a, b) for i, (a, da) in enumerate(devices) for b, db in devices[i + 1 :]
             if da and db and not da & db),  # (None: every GPU; empty: none, the CPU)
            None,
        )  # fmt: skip
        if apart is None:
            continue
        a, b = apart
        found = _bellperson_lock_dir(a)
        assert found is not None
        out.append(
            f"{a.name} and {b.name} run on different GPUs but keep bellperson's GPU lock files in"
            f" the same {found[1]}, so their WindowPoSts take turns instead of running at once"
            " (each holds bellman.priority.lock for its whole proof): give each GPU's children a"
            " TMPDIR of their own in Envs (Gpus gives each child one when Envs has no TMPDIR)"
        )
    return out
