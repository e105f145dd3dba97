"""Paths no other user can redirect: walked from /, every directory on the way ours or root's
and closed to others' writes (or sticky, with our entry in it), every symlink ours or root's.

The control socket's place (frontends/control_socket.py, and its client), the tmp root of
Gpus' TMPDIRs (supervisor/process.py, config/startup.py) and --dump-dir (logs.py, at the start
and before each dump) are checked with it; make_trusted_dirs makes what is missing of one.
foreign_symlink is the lighter rule for a file the user names anywhere (prove --output).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from .errors import UsageError


def describe_mode(mode: int) -> str:
    """A file's permission bits as chmod takes them: 0700."""
    return f"{stat.S_IMODE(mode):04o}"


class UntrustedPathError(UsageError):
    """A path that another user could redirect; the message says which part and why."""


#: Symlinks followed while resolving one path, as the kernel's own limit (ELOOP).
_MAX_SYMLINKS = 40


def trusted_uids(uid: int | None = None) -> frozenset[int]:
    """The users whose files and processes we rely on: ourselves and root (root: root only)."""
    return frozenset({os.geteuid() if uid is None else uid, 0})


def _check_container(directory: str, st: os.stat_result, trusted: frozenset[int]) -> None:
    # Whoever owns a directory, or may write to it, can rename what is in it away and put their
    # own in its place; a sticky directory (like /tmp) stops them only for entries they do not
    # own, which _check_entry sees to.
    if st.st_uid not in trusted:
        raise UntrustedPathError(
            f"directory {directory} is owned by uid {st.st_uid}, not by us or root, so its owner"
            " could replace what is in it"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UntrustedPathError(
            f"directory {directory} (mode {describe_mode(st.st_mode)}) may be written by other"
            " users and has no sticky bit, so they could replace what is in it"
        )


def _check_entry(
    directory: str, dir_st: os.stat_result, entry: str, st: os.stat_result, trusted: frozenset[int]
) -> None:
    if dir_st.st_mode & 0o022 and st.st_uid not in trusted:
        raise UntrustedPathError(
            f"{entry} is owned by uid {st.st_uid}, not by us or root, in {directory}, which other"
            " users may write to"
        )
    if stat.S_ISLNK(st.st_mode) and st.st_uid not in trusted:
        raise UntrustedPathError(
            f"{entry} is a symlink owned by uid {st.st_uid}, not by us or root"
        )


def resolve_trusted(path: str | os.PathLike[str], *, uid: int | None = None) -> Path:
    """`path` with its symlinks resolved, walked from / so that no other user can change where
    it leads: every directory on the way (the last one too, when `path` is one) is owned by us
    or root and not writable by others, unless it is sticky (like /tmp) and the entry we take
    in it is ours or root's; every symlink on the way is ours or root's.

    Raises UntrustedPathError saying which part fails, or the OSError of a part that is missing
    (FileNotFoundError) or cannot be examined.
    """
    return _walk(path, trusted_uids(uid), None)


def make_trusted_dirs(path: str | os.PathLike[str], mode: int = 0o700) -> Path:
    """resolve_trusted(path) of a directory, made with what is missing of it: each part only
    once the directories it goes in have passed, so that nothing is made where another user
    leads. The last part is made `mode`, the ones above it 0755 less the umask, never writable
    by others (os.makedirs gives them 0777 less the umask: 0775 under a umask of 002, which
    resolve_trusted would then refuse as writable by others).

    Raises as resolve_trusted does, and NotADirectoryError when `path` is not a directory.
    """
    resolved = _walk(path, trusted_uids(), mode)
    if not stat.S_ISDIR(os.stat(resolved).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fspath(path))
    return resolved


def _walk(path: str | os.PathLike[str], trusted: frozenset[int], make_mode: int | None) -> Path:
    todo = list(reversed(Path(path).absolute().parts[1:]))
    current = "/"
    current_st = os.lstat(current)
    followed = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            # `current` holds no symlink, so its parent is the kernel's ".." too (and checked).
            current = os.path.dirname(current)
            current_st = os.lstat(current)
            continue
        if not stat.S_ISDIR(current_st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), current)
        _check_container(current, current_st, trusted)
        entry = os.path.join(current, name)
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            if make_mode is None:
                raise
            with contextlib.suppress(FileExistsError):  # made meanwhile: checked as it is
                os.mkdir(entry, 0o755 if todo else make_mode)
            st = os.lstat(entry)
        _check_entry(current, current_st, entry, st, trusted)
        if stat.S_ISLNK(st.st_mode):
            followed += 1
            if followed > _MAX_SYMLINKS:
                raise UntrustedPathError(f"{path}: more than {_MAX_SYMLINKS} symlinks (a loop?)")
            target = Path(os.readlink(entry))
            if target.is_absolute():
                current = "/"
                current_st = os.lstat(current)
            todo.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
            continue
        current, current_st = entry, st
    if stat.S_ISDIR(current_st.st_mode):
        _check_container(current, current_st, trusted)
    return Path(current)


def foreign_symlink(path: str | os.PathLike[str], *, uid: int | None = None) -> str | None:
    """The first symlink on the way to `path` owned by neither us, root, nor the owner of the
    directory it is in, said as "<link> is a symlink owned by uid N in <directory> (owned by
    uid M)"; None when there is none. The kernel's protected_symlinks rule, for any directory:
    in one others may write to (/tmp), a symlink someone planted at a name we are given could
    send what we write to a device or a FIFO of their choosing.

    Nothing else is checked (a directory on the way may be anyone's), and the walk ends where
    a part cannot be examined: the open that follows says what it finds (past /proc's links to
    open files, as /dev/stdout leads to, lies no path).
    """
    trusted = trusted_uids(uid)
    todo = list(reversed(Path(path).absolute().parts[1:]))
    current = "/"
    followed = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)  # holds no symlink: the kernel's ".." too
            continue
        entry = os.path.join(current, name)
        try:
            st = os.lstat(entry)
            if not stat.S_ISLNK(st.st_mode):
                current = entry
                continue
            owner = os.stat(current).st_uid
            if st.st_uid not in trusted and st.st_uid != owner:
                return (
                    f"{entry} is a symlink owned by uid {st.st_uid} in {current} (owned by uid"
                    f" {owner})"
                )
            target = Path(os.readlink(entry))
        except OSError:
            return None
        followed += 1
        if followed > _MAX_SYMLINKS:
            return None  # the kernel's ELOOP
        if target.is_absolute():
            current = "/"
        todo.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
    return None
