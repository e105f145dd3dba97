"""What the command line prints and how it ends when its reader goes away."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "ext-prover.cfg.example")


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["plugins"],
        ["check-config", "-c", EXAMPLE],
        ["check-config", "--json", EXAMPLE],
        ["simulate", "--hours", "1", "--policies", "a,c"],
    ],
    ids=["help", "plugins", "check-config", "check-config-json", "simulate"],
)
def test_a_closed_stdout_ends_a_command_quietly_without_a_traceback(args: list[str]):
    # `damocles-ext ... | head -0`: the reader is gone before the first write.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "damocles_ext", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == b"", done.stderr.decode()
    assert done.returncode in (0, 1)
