"""bellperson's GPU lock files, as bellperson itself takes them, so we can share a TMPDIR with it.

bellperson (filecoin-project/bellperson, src/gpu/locks.rs) serializes GPU use between processes
with flock'ed files in the temp directory (TMPDIR): `bellman.gpu.lock`, held exclusively while a
kernel runs, and `bellman.priority.lock`, held exclusively by a priority proof (WindowPoSt and
WinningPoSt are both priority proofs) for the whole proof. A prover that takes the same locks in
the same way cannot run its heavy phase at the same time as a bellperson prover in that TMPDIR.

`lock_state()` tells whether the locks are held right now, for `status`; it never creates files
and never blocks. Both sides open only regular files (see `_open_regular`): the lock directory
may be /tmp, where anyone can create a FIFO or a symlink to a device under these names.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .regular_file import NotRegularFile, open_regular

GPU_LOCK = "bellman.gpu.lock"
PRIORITY_LOCK = "bellman.priority.lock"

# How often a waiter looks again while the lock is taken, so that a cancelled request stops
# waiting promptly; flock itself cannot be interrupted from another thread.
_POLL_INTERVAL = 0.05


def lock_dir(env: Mapping[str, str] | None = None) -> Path:
    """The directory bellperson puts its lock files in: TMPDIR, else /tmp (Rust's temp_dir())."""
    env = os.environ if env is None else env
    return Path(env.get("TMPDIR") or "/tmp")


class LockFileError(OSError):
    """A lock file we will not open: not a regular file (a FIFO, a device ...), or dangling."""


def _open_regular(path: Path, flags: int, *, create: bool) -> int:
    """Open `path` with `flags` only if it is (or, followed as a symlink, leads to) a regular file.

    The lock directory may be /tmp, where anyone can put something under our name. Opening a FIFO
    blocks until a writer comes, and opening a device runs its driver (a symlink to
    /dev/watchdog...): regular_file.open_regular opens nothing else than a regular file.
    Symlinks are followed as bellperson follows them. With `create`, a missing file is created
    (O_EXCL: never through a dangling symlink). Raises FileNotFoundError if missing and not
    `create`, LockFileError for anything else than a regular file.
    """
    for _ in range(3):
        try:
            return open_regular(path, flags)
        except FileNotFoundError:
            if not create:
                raise
            try:
                return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                continue  # created meanwhile by someone else, or a dangling symlink: look again
        except NotRegularFile as exc:
            raise LockFileError(
                f"{path} is {exc.kind}, not a regular file; remove it (bellperson's"
                " lock files are regular files)",
            ) from None
    raise LockFileError(
        f"{path} is a symlink to a file that does not exist; remove it (bellperson's lock files"
        " are regular files)",
    )


def _is_held(path: Path) -> bool | str | None:
    """True if someone holds `path` locked, False if not, None if the file does not exist.

    A string says why it was not probed (not a regular file, cannot be opened); the probe never
    blocks: no open of a FIFO or device, and a non-blocking shared flock.
    """
    try:
        fd = _open_regular(path, os.O_RDONLY, create=False)
    except FileNotFoundError:
        return None
    except LockFileError as exc:
        return f"{path.name} is not probed: {exc}"
    except OSError as exc:
        return f"{path.name} is not probed: cannot open {path}: {exc.strerror}"
    try:
        try:
            # Shared: only an exclusive holder (a proof on the GPU, a priority proof) makes it
            # fail. An exclusive probe would also fail on a non-priority bellperson proof that
            # checks the priority lock with a shared try-lock, and that proof, failing its own
            # check at the probe's instant, would take it for a priority proof and free the GPU.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_state(directory: str | os.PathLike[str]) -> dict[str, bool | str | None]:
    """{"gpu": held?, "priority": held?} for the lock files in `directory`.

    Each is True (held), False (free), None (no such file), or a string saying why it was not
    probed (e.g. a FIFO planted under that name: it is reported, never opened).
    """
    directory = Path(directory)
    return {"gpu": _is_held(directory / GPU_LOCK), "priority": _is_held(directory / PRIORITY_LOCK)}


class LockCancelled(Exception):
    """Waiting for a GPU lock was given up because the request was cancelled."""


@contextmanager
def _flock(path: Path, cancelled: Callable[[], bool] | None) -> Iterator[None]:
    fd = _open_regular(path, os.O_RDWR, create=True)
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
