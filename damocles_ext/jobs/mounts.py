"""The file system that holds a SQLite store, as far as it explains a failure no file mode
tells: no room left on it."""

from __future__ import annotations

import os
from pathlib import Path


def no_space_left(path: Path) -> bool:
    """Whether the file system of the file `path` has no block or no inode left for this user."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail == 0 or (st.f_files > 0 and st.f_favail == 0)
