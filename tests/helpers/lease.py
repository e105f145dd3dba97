"""Something opened while a kernel lease (F_SETLEASE) holds the file, in a child process of its
own: there SIGIO is blocked in every thread and taken by the main one, the lease's holder, with
sigtimedwait (in pytest's worker a thread of xdist's could take it), and the opening runs in a
thread; the holder lets go when the kernel asks (the open waits for that, as a plain open does)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_HOLDER = r"""
import fcntl, os, signal, sys, threading

path, args = sys.argv[1], sys.argv[2:]
holder = os.open(path, os.O_WRONLY)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})
try:
    fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_WRLCK)
except OSError as exc:
    print("no lease", exc)
    sys.exit(0)
done = []
def opening():
    try:
        done.append(open_it(path, *args))
    except Exception as exc:
        done.append(f"{type(exc).__name__}: {exc}")
thread = threading.Thread(target=opening)
thread.start()
asked = signal.sigtimedwait({signal.SIGIO}, 30)  # the open asks the holder to let go
fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_UNLCK)
thread.join(60)
print("asked", asked is not None, *done)
"""


def run_holding_a_lease(open_it: str, path: str, *args: str) -> str:
    """`open_it` (Python source defining `open_it(path, *args)`, its result printed) run in a
    thread while the main one holds a write lease on `path`; what was printed: "asked True
    <result>" when the open waited for the lease. Skips the test where no lease can be taken."""
    run = subprocess.run(
        [sys.executable, "-c", open_it + _HOLDER, path, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stderr
    if run.stdout.startswith("no lease"):
        pytest.skip(f"no lease can be taken here: {run.stdout.strip()}")
    return run.stdout.strip()
