"""jobs/worker_rules.py stays sans-IO through its imports too (its rules are tested in
test_worker.py, beside the worker that follows them)."""

from __future__ import annotations

import subprocess
import sys


def test_the_worker_rules_import_no_config_module_that_reads_files():
    # config/__init__ pulls machine and startup, which import os, subprocess and tempfile (and run
    # nvidia-smi): the sans-IO rules must reach the proof type names without that package.
    code = (
        "import sys\n"
        "import damocles_ext.jobs.worker_rules\n"
        "print(sorted(m for m in sys.modules if m.startswith('damocles_ext.config')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert done.stdout.decode().splitlines()[-1] == "[]", done.stdout.decode()
