"""A user at its limit of tasks (RLIMIT_NPROC, as `ulimit -u` or systemd's LimitNPROC set it):
commands run as a uid of their own whose processes and threads a filler holds all but a few of,
so that fork(2) and thread starts fail with EAGAIN as on a busy machine.

The limit is not enforced for root, hence another uid (one no other process uses); `setpriv`
gives the commands CAP_DAC_READ_SEARCH only (not CAP_SYS_RESOURCE, which would lift the limit),
so that they may read this checkout and its Python wherever they are."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

#: The limit the commands and the filler run under: far above what a command needs.
NPROC = 60

_FILLER = """
import ctypes, os, signal, sys
leave, held = int(sys.argv[1]), []
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: gone with us
        signal.pause()
        os._exit(0)
    held.append(pid)
for pid in held[len(held) - leave:]:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(len(held) - leave, flush=True)
sys.stdin.read()
for pid in held[:len(held) - leave]:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


def skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run commands as another uid (RLIMIT_NPROC spares root)")
    if shutil.which("setpriv") is None:
        pytest.skip("needs util-linux's setpriv")


def a_uid_of_its_own() -> int:
    """A uid no process and no account uses (the limit counts every task of the uid)."""
    import psutil

    # With attrs, process_iter skips a process that exits while it is read (another test's).
    procs = psutil.process_iter(["uids"])
    used = {p.info["uids"].real for p in procs if p.info["uids"] is not None}
    for uid in range(200_000 + os.getpid() % 50_000, 300_000):
        if uid not in used:
            return uid
    raise AssertionError("no free uid")


def as_user(uid: int, argv: Sequence[str], nproc: int = NPROC) -> list[str]:
    """`argv` run as `uid` (and its own gid) under RLIMIT_NPROC `nproc`."""
    return [
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
        "prlimit", f"--nproc={nproc}:{nproc}", *argv,
    ]  # fmt: skip


def own_dir(path: Path, uid: int) -> Path:
    """`path`, made and given to `uid` (the directories above need only be searched)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path


@contextlib.contextmanager
def tasks_held(uid: int, leave: int) -> Iterator[Callable[[], None]]:
    """All tasks `uid` may have but `leave` are held until the block ends, or until the function
    it gives is called."""
    filler = subprocess.Popen(
        as_user(uid, [sys.executable, "-I", "-c", _FILLER, str(leave)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )

    def release() -> None:
        if filler.stdin is not None and not filler.stdin.closed:
            filler.stdin.close()
        try:
            filler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            filler.send_signal(signal.SIGKILL)
            filler.wait()

    try:
        assert filler.stdout is not None
        held = filler.stdout.readline()
        assert int(held) > 0, held
        yield release
    finally:
        release()


def run_at_the_limit(uid: int, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Python `code` run as `uid` with no task to spare (its own process only: no thread can be
    started), its output captured; it must end within `timeout` seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tasks_held(uid, leave=1):
        return subprocess.run(
            as_user(uid, [sys.executable, "-c", code]),
            capture_output=True, text=True, timeout=timeout, env=env, check=False,
        )  # fmt: skip


def run_cleanly_at_the_limit(uid: int, code: str) -> tuple[list[str], str]:
    """run_at_the_limit, which must end with exit code 0 and no traceback: (the lines of its
    stdout, its stderr)."""
    done = run_at_the_limit(uid, code)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout.splitlines(), done.stderr
