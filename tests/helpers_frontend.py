"""Shared helpers of the front-end tests (serve, run/prove, stress): tasks, configs, processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt, WinningPoSt

DEXT = [sys.executable, "-m", "damocles_ext"]


def make_task(miner: int = 1000, replicas: int = 1, stage: str = "window_post"):
    """A small task whose miner id tells requests apart (echo/sleep outputs depend on it)."""
    infos = [
        PoStReplicaInfo(sector_id=i, comm_r=bytes([i % 256]) * 32, cache_dir=f"/c/{i}",
                        sealed_file=f"/s/{i}")
        for i in range(replicas)
    ]
    seed = bytes([miner % 256] * 31 + [miner % 64])
    if stage == "window_post":
        return WindowPoSt(miner_id=miner, proof_type="StackedDrgWindow2KiBV1_2", replicas=infos,
                          seed=seed)
    return WinningPoSt(miner_id=miner, proof_type="StackedDrgWinning2KiBV1", replicas=infos,
                       seed=seed)


def plugin_block(table: str, plugin: str, *, concurrent: int = 1, **options) -> str:
    """One [[WdPost]]/[[WinPost]] table running a built-in test prover."""
    lines = [f"[[{table}]]", f'Plugin = "{plugin}"', f"Concurrent = {concurrent}"]
    if options:
        opts = ", ".join(
            f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else v}"
            for k, v in options.items()
        )
        lines.append(f"PluginOptions = {{ {opts} }}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def write_config(directory: Path, text: str) -> Path:
    """DIR/ext-prover.cfg with `text`."""
    path = directory / "ext-prover.cfg"
    path.write_text(text)
    return path


def dext_env() -> dict[str, str]:
    """The environment for a damocles-ext subprocess: unbuffered, this checkout importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def dext_run(*args: str, input: bytes | None = None, timeout: float = 60,
             cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `damocles-ext ARGS...` to completion."""
    return subprocess.run([*DEXT, *args], input=input, capture_output=True, timeout=timeout,
                          env=dext_env(), cwd=cwd)
