"""`damocles-ext demo`: the whole path on real files, in a temporary directory, in seconds.

It writes sector fixtures (sealed files, Merkle trees, p_aux), starts an embedded supervisor with
two WindowPoSt children (CUDA_VISIBLE_DEVICES 0 and 1, each its own TMPDIR) and one WinningPoSt
child, all running the native reference prover; proves a WindowPoSt of two partitions and a
WinningPoSt; corrupts one sector and shows it reported as a fault; proves again without it, as
damocles-manager does; verifies every proof; and prints what happened.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import trio

from .errors import ProverError
from .tasks import PoStTask, WindowPoSt, WindowPoStOutput, WinningPoStOutput, stage_of

if TYPE_CHECKING:
    from .supervisor import Supervisor

SECTOR_PROOF_TYPE = "StackedDrgWindow8MiBV1_2"
WINNING_PROOF_TYPE = "StackedDrgWinning8MiBV1"
MINER_ID = 1000
SECTORS = 4  # two partitions of two 8MiB sectors


@dataclass
class DemoReport:
    children: list[tuple[str, int | None, str, str]] = field(default_factory=list)
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _config_text(root: Path) -> str:
    blocks = []
    for gpu in (0, 1):
        blocks.append(
            f'[[WdPost]]\nPlugin = "native"\nConcurrent = 1\n'
            f'[WdPost.Envs]\nCUDA_VISIBLE_DEVICES = "{gpu}"\nTMPDIR = "{root}/tmp-wdpost-gpu{gpu}/"\n'
        )
    blocks.append(
        f'[[WinPost]]\nPlugin = "native"\n'
        f'[WinPost.Envs]\nCUDA_VISIBLE_DEVICES = "0"\nTMPDIR = "{root}/tmp-winpost-gpu0/"\n'
    )
    return "\n".join(blocks)


def _seed(label: int) -> bytes:
    seed = bytearray(os.urandom(32))
    seed[0] = label
    seed[31] &= 0x3F  # a field element, as damocles-manager sends it
    return bytes(seed)


def _overwrite_with_noise(path: str) -> None:
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        f.write(os.urandom(size))


_Out = TypeVar("_Out", WindowPoStOutput, WinningPoStOutput)


async def _prove(sup: Supervisor, task: PoStTask, expected: type[_Out]) -> _Out:
    """The output of `task`, of the type its stage answers with (the supervisor checks it too)."""
    output = await sup.submit(task)
    if not isinstance(output, expected):
        raise ProverError(
            f"a {stage_of(task)} request was answered with a {type(output).__name__}, "
            f"not a {expected.__name__}"
        )
    return output


async def _prove_window(sup: Supervisor, task: WindowPoSt) -> WindowPoStOutput:
    return await _prove(sup, task, WindowPoStOutput)


async def _run(root: Path, say: Callable[[str], None]) -> DemoReport:
    from .api import open_supervisor
    from .config import parse_config
    from .post.fixtures import create_sectors, load_manifest, window_task, winning_task
    from .post.verify import VerifyError, verify_window_post, verify_winning_post

    report = DemoReport()

    def step(name: str, started: float, result: str) -> None:
        elapsed = time.perf_counter() - started
        report.steps.append((name, elapsed, result))
        say(f"  {name:<44} {elapsed * 1e3:8.1f} ms  {result}")

    t = time.perf_counter()
    manifest_path = await trio.to_thread.run_sync(
        lambda: create_sectors(root / "sectors", SECTOR_PROOF_TYPE, SECTORS, MINER_ID)
    )
    manifest = load_manifest(manifest_path)
    step(f"create {SECTORS} 8MiB sectors (sealed file + tree)", t, f"{manifest_path}")

    config = parse_config(_config_text(root), "<demo>")
    t = time.perf_counter()
    async with open_supervisor(config, shutdown_grace=10.0) as sup:
        await sup.wait_ready("window_post", count=2)
        await sup.wait_ready("winning_post", count=1)
        step("start 3 native prover children", t, "2 window_post + 1 winning_post ready")
        for c in sup.statistics().children:
            spec = next(s for s in config.children if s.name == c.name)
            report.children.append((c.name, c.pid, c.gpu or "-", spec.envs.get("TMPDIR", "-")))

        def check(name: str, verify: Callable[[], None]) -> str:
            try:
                verify()
                return "verified"
            except VerifyError as exc:
                report.failures.append(f"{name}: {exc}")
                return f"INVALID: {exc}"

        # WindowPoSt of two partitions and a WinningPoSt, at the same time on different children.
        wd_task = window_task(manifest, _seed(1))
        win_task = winning_task(manifest, _seed(2))
        wd_out: list[WindowPoStOutput] = []
        win_out: list[WinningPoStOutput] = []

        async def prove_window_meanwhile() -> None:
            wd_out.append(await _prove_window(sup, wd_task))

        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prove_window_meanwhile)
            win_out.append(await _prove(sup, win_task, WinningPoStOutput))
        wd, win = wd_out[0], win_out[0]
        verdict = check("WindowPoSt", lambda: verify_window_post(wd_task, wd))
        step(
            "WindowPoSt, 2 partitions  + WinningPoSt",
            t,
            f"{len(wd.proofs)} partition proofs, faults {wd.faults}: {verdict}",
        )
        verdict = check("WinningPoSt", lambda: verify_winning_post(win_task, win))
        report.steps.append(("  WinningPoSt", 0.0, verdict))
        say(f"  {'  WinningPoSt proof':<44} {'':>11}  {len(win.proofs)} proof: {verdict}")

        # Corrupt one sector's sealed data where a challenge will find it: all of it.
        victim = manifest.replicas[1]
        await trio.to_thread.run_sync(_overwrite_with_noise, victim.sealed_file)
        t = time.perf_counter()
        faulty = await _prove_window(sup, window_task(manifest, _seed(3)))
        expected = [victim.sector_id]
        if faulty.faults != expected or faulty.proofs:
            report.failures.append(
                f"corrupt sector {victim.sector_id}: expected faults {expected} and no proofs, "
                f"got faults {faulty.faults} and {len(faulty.proofs)} proofs"
            )
        step(
            f"WindowPoSt after corrupting sector {victim.sector_id}",
            t,
            f"faults {faulty.faults}, {len(faulty.proofs)} proofs",
        )

        # damocles-manager then proves again without the faulty sectors.
        good = [r.sector_id for r in manifest.replicas if r.sector_id not in faulty.faults]
        retry_task = window_task(manifest, _seed(4), sector_ids=good)
        t = time.perf_counter()
        retry = await _prove_window(sup, retry_task)
        verdict = check(
            "WindowPoSt without the fault", lambda: verify_window_post(retry_task, retry)
        )
        step(
            f"WindowPoSt again without it ({len(good)} sectors)",
            t,
            f"{len(retry.proofs)} partition proofs: {verdict}",
        )
        t = time.perf_counter()
    step("shut down (every child reaped)", t, "done")
    return report


def run_demo(keep: bool = False, say: Callable[[str], None] = print) -> DemoReport:
    """Run the demo in a fresh temporary directory (removed afterwards unless `keep`)."""
    root = Path(tempfile.mkdtemp(prefix="damocles-ext-demo-"))
    started = time.perf_counter()
    try:
        say(f"damocles-ext demo in {root}")
        report = trio.run(_run, root, say)
        say("children:")
        for name, pid, gpu, tmpdir in report.children:
            say(f"  {name:<16} pid {pid!s:<8} CUDA_VISIBLE_DEVICES={gpu:<3} TMPDIR={tmpdir}")
        total = time.perf_counter() - started
        if report.failures:
            raise ProverError("demo failed: " + "; ".join(report.failures))
        say(
            f"all proofs verified; the corrupted sector was reported as a fault; {total:.1f} s in all"
        )
        return report
    finally:
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
