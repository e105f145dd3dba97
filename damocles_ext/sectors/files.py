"""Looking at sector files on storage that may stall: every look runs in a worker thread that is
abandoned when its time is up, so a hung mount costs the caller its timeout, never the loop.

A thread stuck in a stat(2) on a dead NFS server cannot be stopped; at most `limiter`'s tokens
of them are outstanding at once, so a stalled store cannot pile threads up either: the next
looks wait for a token, time out, and say the storage did not answer.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import TypeVar

import trio

from ..threads import NoThreadError, run_in_thread
from .model import SectorLocation

T = TypeVar("T")

#: Threads that look at sector files at once (across the locator).
DEFAULT_THREADS = 16


def path_problem(path: str, want_dir: bool) -> str:
    """'' when `path` is a regular file (a directory when `want_dir`), else why not."""
    return look_at(path, want_dir)[0]


#: What `stat.S_IFMT` of a path that is not what a sector's file should be says it is.
_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def look_at(path: str, want_dir: bool) -> tuple[str, bool | None]:
    """(`path_problem`, whether something is at `path`): '' and True when it is what it should
    be; a why and True when something else is there (another type of file, a symlink that
    loops or whose target does not exist); a why and False when nothing is there; a why and
    None when what is there cannot be told (a directory on the way that cannot be searched or
    is no directory, an I/O error). One lstat(2), and one stat(2) for a symlink."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return f"{path} does not exist", False
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}", None
    except ValueError:  # a NUL character (a plugin's provider gave such a path)
        return f"{path!r} is not a path: it has a NUL character", False
    if stat.S_ISLNK(mode):  # what it names
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return f"{path} is a symlink to {_target(path)}, which does not exist", True
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{path} is a symlink loop (too many levels of symbolic links)", True
            return f"{path}: {exc.strerror or exc}", None
    if want_dir and not stat.S_ISDIR(mode):
        return f"{path} is {_kind(mode)}, not a directory", True
    if not want_dir and not stat.S_ISREG(mode):
        return f"{path} is {_kind(mode)}, not a regular file", True
    return "", True


def _target(link: str) -> str:
    """What the symlink `link` names (as it is written), or why that cannot be read."""
    try:
        return os.readlink(link)
    except OSError as exc:  # gone or changed since the look
        return f"a target that cannot be read ({exc.strerror or exc})"


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "of another type")


def location_problem(location: SectorLocation) -> str:
    """'' when the sealed file and the cache directory are there, else what is wrong
    (blocking)."""
    return path_problem(location.sealed_file, False) or path_problem(location.cache_dir, True)


async def in_thread(
    function: Callable[..., T],
    *args: object,
    limiter: trio.CapacityLimiter,
    timeout: float,  # noqa: ASYNC109 - on timeout the thread is abandoned, not cancelled
) -> T:
    """`function(*args)` in a worker thread; raises TimeoutError when it took over `timeout`
    (the thread is left to finish on its own), NoThreadError when no thread could be started
    (at the limit of tasks)."""
    with trio.move_on_after(timeout) as scope:
        return await run_in_thread(function, *args, limiter=limiter, abandon_on_cancel=True)
    assert scope.cancelled_caught
    raise TimeoutError(f"the storage did not answer within {timeout:g} s")


def _problems(locations: list[SectorLocation]) -> list[str]:
    return [location_problem(location) for location in locations]


async def check_locations(
    locations: list[SectorLocation],
    *,
    limiter: trio.CapacityLimiter,
    timeout: float,  # noqa: ASYNC109 - the check's own bound, not the caller's
) -> list[str]:
    """For each location, '' when its files are there, else why not; in one worker thread, so
    give locations on the same storage together: when it stalls, they all say it did not
    answer."""
    try:
        return await in_thread(_problems, locations, limiter=limiter, timeout=timeout)
    except (TimeoutError, NoThreadError) as exc:
        return [f"{location.sealed_file}: {exc}" for location in locations]
