"""The README's main job: `damocles-ext demo` proves, finds the fault, verifies, cleans up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_demo_proves_finds_the_fault_verifies_and_cleans_up():
    proc = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "demo"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    root = Path(re.search(r"damocles-ext demo in (\S+)", out).group(1))
    assert "2 partition proofs, faults []: verified" in out
    assert "1 proof: verified" in out
    assert re.search(r"after corrupting sector (\d+) .* faults \[\1\], 0 proofs", out)
    assert "WindowPoSt again without it (3 sectors)" in out and out.count(": verified") == 3
    assert "CUDA_VISIBLE_DEVICES=0" in out and "CUDA_VISIBLE_DEVICES=1" in out
    assert not root.exists()
    assert "Traceback" not in proc.stderr
