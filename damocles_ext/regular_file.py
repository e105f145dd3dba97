"""Open a file only if it is a regular file, never blocking on, or opening, what is not one.

A path someone else could write to (a lock file in /tmp, a program named in a config, a token
file) may name a FIFO, whose open() waits for a writer for ever, or a device, whose open() runs
its driver (a symlink to /dev/watchdog ...). `open_regular` reaches the file with O_PATH, which
opens nothing, looks at what that inode is, and only then opens it, through /proc/self/fd so
that it is the inode just looked at: no window in which another file put under the name is
opened instead. Without /proc (a chroot, a sandbox) it opens the name again, O_NONBLOCK, and
looks at what it opened: see `open_regular`. `file_kind` says in words what a file that is not a
regular file is.
Used by gpulock.py (bellperson's lock files), config/startup.py (a program's first bytes),
config/load.py (every config file: ext-prover.cfg, sector-manager.cfg, damocles-worker.toml ...),
commands/common.py (serve's --token-file) and post/reference.py (the Python reference prover's
sealed, p_aux and tree files, and build_tree's sealed file); `file_kind` also by
supervisor/process.py and sectors/snapshot.py. It imports nothing of the package.
"""

from __future__ import annotations

import os
import stat
import time

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words: "a directory", "a FIFO (named
    pipe)" ..."""
    return next(
        (what for test, what in _KINDS if test(mode)), f"a file of type {stat.S_IFMT(mode):o}"
    )


class NotRegularFile(OSError):
    """A path that names a directory, a FIFO, a socket or a device: its `.mode` (st_mode) and
    `.kind`, what that is in words (file_kind)."""

    def __init__(self, path: str | os.PathLike[str], mode: int) -> None:
        self.kind = file_kind(mode)
        super().__init__(f"{os.fspath(path)} is {self.kind}, not a regular file")
        self.path = os.fspath(path)
        self.mode = mode


#: Flags that open_regular cannot honour: O_NOFOLLOW would refuse the /proc/self/fd link it
#: opens the inode by (ELOOP); O_CREAT and O_EXCL mean nothing for a file that must exist.
_REFUSED_FLAGS = (("O_NOFOLLOW", os.O_NOFOLLOW), ("O_CREAT", os.O_CREAT), ("O_EXCL", os.O_EXCL))


#: Where a process's fds are links to the inodes they are open on; not there without /proc.
_PROC_FDS = "/proc/self/fd"
#: Without /proc, how long a file a lease holds is tried again (past the kernel's default
#: /proc/sys/fs/lease-break-time, 45 s, after which it breaks the lease itself), and how often.
_LEASE_WAIT = 60.0
_LEASE_TRY_EVERY = 0.05


def open_regular(
    path: str | os.PathLike[str], flags: int = os.O_RDONLY, *, wait_for_lease: bool = False
) -> int:
    """`path` (a symlink followed) opened with `flags` if it is a regular file; never blocks
    on a FIFO and never opens a device. NotRegularFile for anything else than a regular file,
    OSError as open() raises it (FileNotFoundError, PermissionError ...), naming `path`. The fd
    returned is O_CLOEXEC and blocking: the O_NONBLOCK of the open (what makes a lease an
    error, not a wait) is cleared, since a FUSE daemon sees it on every read and may answer
    EAGAIN where a local file never would.

    A regular file that a lease holds: BlockingIOError, or with `wait_for_lease` an open that
    waits for the lease to break (as a plain open() does, at most /proc/sys/fs/lease-break-time)
    — of that same inode, never of what the name may lead to by then.

    Without /proc mounted (a chroot, a sandbox: /proc/self/fd is not there), the name is opened
    again, with O_NONBLOCK (a FIFO put there meanwhile opens at once, never waits for a writer),
    and what that opened is looked at: NotRegularFile if it is not a regular file. A device put
    under the name between the two opens is the one thing left: its open, which runs its
    driver, is done before it is refused. A lease is then waited for by trying again (a
    non-blocking open asks the holder to break it) for at most a minute, never by an open of
    the name that could block.

    ValueError for flags it cannot honour: O_NOFOLLOW (lstat the name first to refuse a
    symlink), O_CREAT, O_EXCL (create the file with a plain open, then open_regular it).
    """
    refused = [name for name, bit in _REFUSED_FLAGS if flags & bit]
    if refused:
        raise ValueError(f"open_regular cannot open with {' or '.join(refused)}")
    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        mode = os.fstat(pfd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
        fd = _open_same_inode(pfd, path, flags, wait_for_lease)
    finally:
        os.close(pfd)
    if fd is None:  # no /proc: the name is opened again
        fd = _open_by_name(path, flags, wait_for_lease=wait_for_lease)
    try:
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_same_inode(
    pfd: int, path: str | os.PathLike[str], flags: int, wait_for_lease: bool
) -> int | None:
    """The file of O_PATH descriptor `pfd` (of `path`) opened through /proc/self/fd: that inode,
    whatever the name leads to by then; None without /proc."""
    same = f"{_PROC_FDS}/{pfd}"
    try:
        try:
            return os.open(same, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except BlockingIOError:
            if not wait_for_lease:
                raise
            return os.open(same, flags | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        if not os.path.isdir(_PROC_FDS):
            return None
        exc.filename = os.fspath(path)
        raise
    except OSError as exc:
        exc.filename = os.fspath(path)  # the file, not /proc/self/fd/N, in what it says
        raise


def _open_by_name(path: str | os.PathLike[str], flags: int, *, wait_for_lease: bool) -> int:
    """open_regular without /proc: the name opened again, O_NONBLOCK (a FIFO opens at once),
    and refused by what it opened when that is not a regular file."""
    deadline = None
    while True:
        try:
            fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            break
        except BlockingIOError:  # a lease: this open asked its holder to break it
            now = time.monotonic()
            deadline = now + _LEASE_WAIT if deadline is None else deadline
            if not wait_for_lease or now >= deadline:
                raise
            time.sleep(_LEASE_TRY_EVERY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd
