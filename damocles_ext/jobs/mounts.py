"""The file system that holds a SQLite store, as far as it explains a failure no file mode
tells: no room left on it, a read-only mount."""

from __future__ import annotations

import os
from pathlib import Path

#: What to do about a SQLite store on a full file system, when even reading it failed.
FULL_FIX_READING = (
    "the file system that holds it is full, and SQLite needs room beside the file for its -shm"
    " file even to read it: free some space there"
)


def no_space_left(path: Path) -> bool:
    """Whether the file system of the file `path` has no block or no inode left for this user."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail == 0 or (st.f_files > 0 and st.f_favail == 0)


def read_only_mount(path: Path) -> str | None:
    """What to do about a SQLite store at `path` on a file system mounted read-only (which no
    file mode tells, and root's writes fail on too), or None when it is not."""
    try:
        read_only = bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        return None
    if not read_only:
        return None
    return (
        f"the file system that holds {str(path.parent)!r} is mounted read-only, and a store in"
        " WAL mode needs to write its -wal and -shm files beside the file even to be read:"
        " mount it read-write, or copy the store to a writable directory"
    )
