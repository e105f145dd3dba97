"""The file system that holds a SQLite store, as far as it explains a failure no file mode
tells (no room left on it, a read-only mount) or makes the store unsafe (a network file system,
where SQLite's locks and write-ahead log do not hold)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import FILES_ADVICE

#: What to do about a SQLite store on a full file system, when even reading it failed.
FULL_FIX_READING = (
    "the file system that holds it is full, and SQLite needs room beside the file for its -shm"
    " file even to read it: free some space there"
)


def _file_system(path: Path) -> tuple[Path, os.statvfs_result | None]:
    """The directory SQLite's files of `path` are in (a symlink's target's) and statvfs of it
    (None when it cannot be had)."""
    directory = Path(os.path.realpath(path)).parent
    try:
        return directory, os.statvfs(directory)
    except OSError:
        return directory, None


#: What to do when the system as a whole has no file left to open (ENFILE).
SYSTEM_FILES_ADVICE = (
    "the system has as many files open as its limit allows (sysctl fs.file-max): raise it, or"
    " stop what holds them"
)


def out_of_descriptors(path: Path) -> str | None:
    """What to do when this process (or the system) has no file descriptor left to open the
    SQLite store at `path` with, which SQLite reports as a file it cannot open (SQLITE_CANTOPEN,
    as for a permission): found by opening its directory; None when that takes a descriptor."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        os.close(os.open(Path(os.path.realpath(path)).parent, flags))
    except OSError as error:
        return {errno.EMFILE: FILES_ADVICE, errno.ENFILE: SYSTEM_FILES_ADVICE}.get(error.errno or 0)
    return None


def no_space_left(path: Path) -> bool:
    """Whether the file system of the file `path` has no block or no inode left for this user."""
    st = _file_system(path)[1]
    return st is not None and (st.f_bavail == 0 or (st.f_files > 0 and st.f_favail == 0))


def read_only_mount(path: Path) -> str | None:
    """What to do about a SQLite store at `path` on a file system mounted read-only (which no
    file mode tells, and root's writes fail on too), or None when it is not."""
    directory, st = _file_system(path)
    if st is None or not st.f_flag & os.ST_RDONLY:
        return None
    return (
        f"the file system that holds {str(directory)!r} is mounted read-only, and a store in"
        " WAL mode needs to write its -wal and -shm files beside the file even to be read:"
        " mount it read-write, or copy the store to a writable directory"
    )


#: The kernel's table of this process's mounts (their device numbers and file system types).
MOUNTINFO = Path("/proc/self/mountinfo")

#: File systems shared over a network (and FUSE ones that are): SQLite's locks and the shared
#: memory of its write-ahead log do not hold there (sqlite.org: "WAL does not work over a
#: network filesystem"), so two processes may both write and damage the store.
NETWORK_FILE_SYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "ceph", "glusterfs",
        "lustre", "beegfs", "gpfs", "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.s3fs",
        "fuse.rclone", "fuse.juicefs", "fuse.davfs", "davfs",
    }
)  # fmt: skip


def network_file_system(path: Path) -> str | None:
    """The type of the network file system that holds the SQLite file `path` (or would: its
    directory), or None for a local one or one that cannot be told. (Not 9p: the root file
    system of gVisor's containers and WSL2's Windows drives, one kernel's, where locks hold.)"""
    path = Path(os.path.realpath(path))  # a symlink's target, made there if it is dangling
    try:
        try:
            device = os.stat(path).st_dev
        except FileNotFoundError:  # not made yet: where it will be
            device = os.stat(path.parent).st_dev
        mounts = MOUNTINFO.read_text(errors="replace")
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    for line in mounts.splitlines():
        # ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [TAGS...] - TYPE SOURCE SUPEROPTIONS
        fields, _, tail = line.partition(" - ")
        if fields.split()[2:3] == [wanted] and tail:
            kind = tail.split()[0]
            return kind if kind in NETWORK_FILE_SYSTEMS else None
    return None
