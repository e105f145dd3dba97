"""bellperson's GPU lock files, as bellperson itself takes them, so we can share a TMPDIR with it.

bellperson (filecoin-project/bellperson, src/gpu/locks.rs) serializes GPU use between processes
with flock'ed files in the temp directory (TMPDIR): `bellman.gpu.lock`, held exclusively while a
kernel runs, and `bellman.priority.lock`, held exclusively by a priority proof (WindowPoSt and
WinningPoSt are both priority proofs) for the whole proof. A prover that takes the same locks in
the same way cannot run its heavy phase at the same time as a bellperson prover in that TMPDIR.

`lock_state()` tells whether the locks are held right now, for `status`; it never creates files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

GPU_LOCK = "bellman.gpu.lock"
PRIORITY_LOCK = "bellman.priority.lock"

# How often a waiter looks again while the lock is taken, so that a cancelled request stops
# waiting promptly; flock itself cannot be interrupted from another thread.
_POLL_INTERVAL = 0.05


def lock_dir(env: Mapping[str, str] | None = None) -> Path:
    """The directory bellperson puts its lock files in: TMPDIR, else /tmp (Rust's temp_dir())."""
    env = os.environ if env is None else env
    return Path(env.get("TMPDIR") or "/tmp")


def _is_held(path: Path) -> bool | None:
    """True if someone holds `path` locked, False if not, None if the file does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_state(directory: str | os.PathLike[str]) -> dict[str, bool | None]:
    """{"gpu": held?, "priority": held?} for the lock files in `directory` (None: no such file)."""
    directory = Path(directory)
    return {"gpu": _is_held(directory / GPU_LOCK), "priority": _is_held(directory / PRIORITY_LOCK)}


class LockCancelled(Exception):
    """Waiting for a GPU lock was given up because the request was cancelled."""


@contextmanager
def _flock(path: Path, cancelled: Callable[[], bool] | None) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        if cancelled is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            wait = threading.Event()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                if cancelled():
                    raise LockCancelled(f"cancelled while waiting for {path}")
                wait.wait(_POLL_INTERVAL)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def priority_gpu_lock(
    directory: str | os.PathLike[str], cancelled: Callable[[], bool] | None = None
) -> Iterator[None]:
    """Hold bellperson's priority lock, then its GPU lock, as a priority proof does.

    `cancelled` is polled while waiting, so a cancelled request does not wait for the GPU forever.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _flock(directory / PRIORITY_LOCK, cancelled), _flock(directory / GPU_LOCK, cancelled):
        yield
