"""Where `run`'s control socket lives and who may use it: its default path, its binding, and the
trust checks the server and the client (client.py) both make.

Who may connect is decided by the file system: the socket has mode 0600 inside a directory of
mode 0700 that we own, and neither may be a symlink; on top of that, a peer whose uid is neither
ours nor root's (SO_PEERCRED) is turned away. The directories above that one must be such that no
other user can replace them (resolve_trusted). These checks run before anything is spawned, so a
bad path is a usage error (exit 2), not a half-started supervisor.

Two starts on one path are kept apart by a lock file beside the socket (`.NAME.lock`, mode 0600
in the same private directory), held from before the old socket is probed until the listening
socket is closed (and removed then): the one that does not get it stops at once, saying so; without it, both could
find a stale socket, and the second remove the first's fresh one and bind its own, leaving the
first listening where nobody can reach it.

The client makes the same checks from its side, with the same helpers: the path must lead,
through directories no other user can change, to a socket in a private directory, and the
process listening on it must run as the client's uid or root.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import weakref
from collections.abc import Mapping
from pathlib import Path

import trio

from ..errors import UsageError
from ..trusted_path import (  # noqa: F401 - importable from here, as before
    UntrustedPathError,
    describe_mode,
    resolve_trusted,
    trusted_uids,
)

# The logger these messages have always had, as part of the control socket.
log = logging.getLogger("damocles_ext.control")

SOCKET_DIR_NAME = "damocles-ext"
SOCKET_NAME = "control.sock"
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SUN_PATH = 107


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_RUNTIME_DIR/damocles-ext/control.sock`, else `/run/damocles-ext/control.sock`. A
    relative XDG_RUNTIME_DIR is ignored, as the XDG spec says: `run` and its clients would each
    take it from the directory they run in, and miss each other."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_RUNTIME_DIR", "")
    base = xdg if os.path.isabs(xdg) else "/run"
    return Path(base) / SOCKET_DIR_NAME / SOCKET_NAME


def not_private(directory: Path, st: os.stat_result) -> str | None:
    """Why the socket's directory (`st`: its lstat) lets others reach the socket, or None: `run`
    keeps its socket in a directory of mode 0700, and the client refuses one that is not."""
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"{directory} has mode {describe_mode(st.st_mode)}, not private (0700)"
    return None


def _check_private_dir(directory: Path, *, create: bool) -> None:
    uid = os.geteuid()
    try:
        st = os.lstat(directory)
    except NotADirectoryError:
        # A file where a directory above it should be ($XDG_RUNTIME_DIR, or --socket's path).
        blocker = next(p for p in reversed(directory.parents) if p.exists() and not p.is_dir())
        raise UsageError(
            f"cannot create control socket directory {directory}: {blocker} is a file, not a"
            " directory; choose another path with --socket"
        ) from None
    except PermissionError:  # a directory above it this user may not enter
        raise UsageError(
            f"cannot look at control socket directory {directory}: permission denied (a"
            " directory above it is closed to this user); choose a path you own with --socket"
        ) from None
    except FileNotFoundError:
        if not create:
            raise UsageError(f"control socket directory {directory} does not exist") from None
        try:
            os.mkdir(directory, 0o700)
        except FileNotFoundError:
            raise UsageError(
                f"cannot create control socket directory {directory}: {directory.parent} does not"
                " exist; create it or choose another path with --socket"
            ) from None
        except PermissionError:
            raise UsageError(
                f"cannot create control socket directory {directory}: permission denied; set"
                " XDG_RUNTIME_DIR or choose a path you own with --socket"
            ) from None
        except FileExistsError:
            pass  # someone raced us; the checks below decide whether it is usable
        except OSError as exc:  # its file system full or read-only, say
            raise UsageError(
                f"cannot create control socket directory {directory}: {_what_to_do(exc)}"
            ) from None
        else:
            os.chmod(directory, 0o700)  # mkdir's mode is filtered through the umask
        st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(
            f"control socket directory {directory} is a symlink; refusing to use it (a symlink"
            " could point the socket at a directory others control). Use a real directory."
        )
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"control socket directory {directory} exists and is not a directory")
    # A shared directory (/tmp, sticky) or the root is others' too: no chmod there, but a
    # directory of the socket's own in it.
    top = directory == Path(directory.anchor)
    shared = bool(st.st_mode & stat.S_ISVTX) or top
    suggested = default_socket_path() if top else directory / "damocles-ext" / "control.sock"
    own_fix = f"give the socket a directory of its own, e.g. --socket {suggested} (made 0700)"
    if st.st_uid != uid:
        fix = own_fix if shared else "Choose a directory you own with --socket."
        raise UsageError(
            f"control socket directory {directory} is owned by uid {st.st_uid}, not by us"
            f" (uid {uid}); refusing to use it. {fix[0].upper()}{fix[1:]}"
        )
    problem = not_private(directory, st)
    if problem is not None:
        fix = own_fix if shared else f"chmod 700 {directory}, or choose another path with --socket"
        raise UsageError(
            f"control socket directory {problem}: only you may reach the socket; {fix}"
        )


def _someone_listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a full backlog: alive but busy
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return True
        raise
    finally:
        probe.close()
    return True


def _taken(path: Path, pid: int | None = None) -> str:
    whose = "" if pid is None else f" (pid {pid})"
    return (
        f"another damocles-ext (run or worker) is listening on {path}{whose}; stop it first or"
        " choose another path with --socket"
    )


class _Hold:
    """What a socket of bind_control_socket's holds: its path's lock, and its file's inode."""

    def __init__(self, sock: socket.socket, lock: Path, lock_fd: int) -> None:
        # At once, or when the socket is collected, or at exit.
        self.release = weakref.finalize(sock, _unlock, lock, lock_fd)
        self.inode: int | None = None


# Kept beside the sockets, not in them: trio wraps only a plain socket.socket.
_holds: weakref.WeakKeyDictionary[socket.socket, _Hold] = weakref.WeakKeyDictionary()


def release_control_socket(sock: socket.socket) -> None:
    """Release the path's lock of a control socket of bind_control_socket's, once it is closed
    (and its file removed): another damocles-ext may then take the path."""
    hold = _holds.pop(sock, None)
    if hold is not None:
        hold.release()


def bound_inode(sock: socket.socket) -> int | None:
    """The inode of the socket file bind_control_socket made for `sock`."""
    hold = _holds.get(sock)
    return None if hold is None else hold.inode


def _release_closed() -> None:
    # Those of this process's control sockets closed without release_control_socket.
    for sock in list(_holds):
        if sock.fileno() == -1:
            release_control_socket(sock)


def _take_lock(lock: Path, path: Path) -> int:
    """The lock file's descriptor, locked, with our pid in it; UsageError if another process
    holds it. It is in the socket's directory, already checked private and ours, and is held
    to the same rules: not followed if a symlink, a regular file of ours, mode 0600. Its holder
    removes it before it lets it go (_unlock): a lock taken on a file removed meanwhile is let
    go, and the new file's tried."""
    _release_closed()
    while True:
        fd = _open_lock(lock)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held_by = os.pread(fd, 32, 0).strip()  # empty while its holder just took it
                pid = int(held_by) if held_by.isdigit() else None
                raise UsageError(_taken(path, pid)) from None
            try:
                current = os.lstat(lock).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except UsageError:
            os.close(fd)
            raise
        except OSError as exc:
            os.close(fd)
            raise UsageError(
                f"cannot lock control socket lock file {lock}: {_what_to_do(exc)}"
            ) from None
        return fd


def _open_lock(lock: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(lock, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(
                f"control socket lock file {lock} is a symlink; refusing to use it: remove it"
                " or choose another path with --socket"
            ) from None
        raise UsageError(
            f"cannot open control socket lock file {lock}: {_what_to_do(exc)}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(
                f"control socket lock file {lock} exists and is not a regular file; remove it or"
                " choose another path with --socket"
            )
        if st.st_uid != os.geteuid():
            raise UsageError(
                f"control socket lock file {lock} is owned by uid {st.st_uid}, not by us (uid"
                f" {os.geteuid()}); remove it or choose another path with --socket"
            )
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(lock: Path, fd: int) -> None:
    """Remove the lock file (still ours: nobody else took it meanwhile), then let it go."""
    try:
        if os.lstat(lock).st_ino == os.fstat(fd).st_ino:
            os.unlink(lock)
    except OSError:
        pass  # gone, or its directory with it: nothing left to remove
    finally:
        os.close(fd)


def _clear_old_socket(path: Path) -> None:
    uid = os.geteuid()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(
            f"control socket path {path} is a symlink; refusing to use it: remove it or choose"
            " another path with --socket"
        )
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(
            f"control socket path {path} exists and is not a socket; remove it or choose another"
            " path with --socket"
        )
    if st.st_uid != uid:
        raise UsageError(
            f"control socket {path} is owned by uid {st.st_uid}, not by us (uid {uid});"
            " refusing to replace it: remove it or choose another path with --socket"
        )
    if _someone_listening(path):
        raise UsageError(_taken(path))
    log.info("removing stale control socket %s (nobody is listening on it)", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # removed meanwhile
    except OSError as exc:
        raise UsageError(f"cannot remove stale control socket {path}: {_what_to_do(exc)}") from None


def _what_to_do(exc: OSError) -> str:
    """Why a file could not be made or removed where the socket goes, and what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{exc.strerror}: free some space there, or choose another path with --socket"
    return f"{exc.strerror}; choose another path with --socket"


def _check_ancestors(path: Path) -> None:
    # The socket's own directory is checked (and made) by _check_private_dir; the ones above it
    # must not let another user swap that directory for theirs, with a socket of theirs in it.
    try:
        resolve_trusted(path.parent.parent)
    except UntrustedPathError as exc:
        raise UntrustedPathError(
            f"control socket path {path}: {exc}; clients would then reach another user's"
            " socket instead of ours. Choose a path whose directories only you or root can"
            " write with --socket (the default is in $XDG_RUNTIME_DIR or /run)"
        ) from None
    except FileNotFoundError:
        pass  # _check_private_dir says which directory is missing
    except OSError as exc:
        raise UsageError(
            f"cannot check the directories of control socket path {path}: {exc}; choose"
            " another path with --socket"
        ) from None


def bind_control_socket(path: str | os.PathLike[str], *, create_dir: bool = True) -> socket.socket:
    """Check `path`, its directory and the ones above it, take the path's lock, replace a stale
    socket, and return a listening socket. The lock is held until release_control_socket, or
    until this process binds again once the socket is closed, or exits.

    Raises UsageError (exit 2) when the place is unsafe or taken.
    """
    path = Path(path).absolute()
    if len(os.fsencode(path)) > _MAX_SUN_PATH:
        raise UsageError(
            f"control socket path {path} is {len(os.fsencode(path))} bytes long; unix sockets"
            f" allow at most {_MAX_SUN_PATH}. Choose a shorter path with --socket."
        )
    try:
        given_dir = stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:  # missing, or under a directory closed to us: the checks below say which
        given_dir = False
    if given_dir:
        # A directory given for the socket (its default's, /run/damocles-ext): the checks of
        # its parent would advise a chmod 700 of /run, or removing the directory.
        raise UsageError(
            f"control socket path {path} is a directory; --socket takes the socket's own path,"
            f" e.g. --socket {path / 'control.sock'}"
        )
    _check_ancestors(path)
    _check_private_dir(path.parent, create=create_dir)
    lock = path.parent / f".{path.name}.lock"
    lock_fd = _take_lock(lock, path)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except BaseException:
        _unlock(lock, lock_fd)
        raise
    hold = _holds[sock] = _Hold(sock, lock, lock_fd)
    try:
        _clear_old_socket(path)
        try:
            sock.bind(os.fspath(path))
            hold.inode = os.lstat(path).st_ino
            # The directory is 0700, so nobody can reach the socket before this chmod.
            os.chmod(path, 0o600)
            sock.listen(128)
        except OSError as exc:
            raise UsageError(
                f"cannot listen on control socket {path}: {_what_to_do(exc)}"
            ) from None
    except BaseException:
        sock.close()
        release_control_socket(sock)
        raise
    return sock


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket
    (SO_PEERCRED: for a client, the listener's as it was when it called listen())."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def peer_uid(sock: socket.socket | trio.socket.SocketType) -> int:
    """The uid of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    return peer_credentials(sock)[1]
