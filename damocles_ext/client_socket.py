"""Reaching the control socket of a supervisor of ours (`client.py` connects through it): the
trust checks made before a byte is sent, the connect, and a full backlog asked again."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import trio

from .errors import UsageError
from .frontends.control_socket import (
    UntrustedPathError,
    not_private,
    peer_credentials,
    resolve_trusted,
    trusted_uids,
)


class NoSupervisorError(UsageError):
    """Nothing (usable) is listening at the socket path: a usage problem, exit code 2."""


#: How long a supervisor whose backlog of connections is full is asked again.
BUSY_FOR = 10.0

#: What to do when no supervisor answers, as `prove` says it.
PROVE_HINT = (
    "start one with `damocles-ext run`, or pass the --socket of the one running"
    " (`prove` can also prove in-process with -c/--conf-dir)"
)


#: What to do when what is at the socket path is not a supervisor of ours.
_UNTRUSTED_HINT = (
    "nothing was sent to it. Give --socket (the Python API: socket_path) the path of your own"
    " `damocles-ext run`, whose socket is in a directory only you or root can write"
)


def _check_socket_place(path: Path, hint: str) -> None:
    """Refuse a socket another user could have put there, before connecting to it.

    `run` makes its socket in a private directory (0700, ours) reached through directories no
    other user can change (control_socket.bind_control_socket); anything else may be an impostor's.
    """
    try:
        real = resolve_trusted(path)
    except UntrustedPathError as exc:
        raise NoSupervisorError(
            f"refusing to connect to {path}: {exc}; it may be another user's socket:"
            f" {_UNTRUSTED_HINT}"
        ) from None
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return  # connecting fails the same way, and open_stream words it
    except OSError as exc:
        raise NoSupervisorError(f"cannot check the socket path {path}: {exc}") from None
    try:
        st = os.lstat(real)
        dir_st = os.lstat(real.parent)
    except OSError:
        return  # gone meanwhile: connecting says so
    if stat.S_ISDIR(st.st_mode):  # its directory given (/run/damocles-ext), not the socket
        raise NoSupervisorError(
            f"no supervisor at {path}: it is a directory, not the socket; give the socket's own"
            f" path, e.g. {path / 'control.sock'}"
        )
    if not stat.S_ISSOCK(st.st_mode):
        raise NoSupervisorError(
            f"no supervisor at {path}: {real if real != path else 'it'} is not a socket; {hint}"
        )
    problem = not_private(real.parent, dir_st)
    if problem is not None:
        raise NoSupervisorError(
            f"refusing to connect to {path}: the socket's directory {problem} as `damocles-ext"
            f" run` makes it; it may be another user's socket: {_UNTRUSTED_HINT}"
        )


def _check_peer(pid: int, uid: int, path: Path) -> None:
    trusted = trusted_uids()
    if uid not in trusted:
        us = "root" if trusted == {0} else f"us (uid {os.geteuid()}) or root"
        raise NoSupervisorError(
            f"refusing the server at {path}: the process listening there (pid {pid}) runs as"
            f" uid {uid}, not as {us}, so it may be another user's impostor; {_UNTRUSTED_HINT}"
        )


async def open_stream(
    path: Path, hint: str = PROVE_HINT, *, busy_for: float = BUSY_FOR
) -> trio.SocketStream:
    """Connect to the control socket of a supervisor of ours; NoSupervisorError says why nothing
    could be reached (and ends with `hint`, what to do about it), or why what is there is not
    trusted: a socket in a place another user could have put it, or a server that runs as
    another user (neither our uid nor root). Nothing is sent before these checks. A supervisor
    whose backlog of connections is full is asked again for `busy_for` seconds."""
    _check_socket_place(path, hint)
    deadline = trio.current_time() + busy_for
    delay = 0.01
    while True:
        stream = await _open_unix(path, hint)
        pid, uid, _gid = peer_credentials(stream.socket)
        if (pid, uid) != (0, -1):
            break
        # No peer: the connect found the backlog full (EAGAIN) and trio handed back a socket
        # that never connected. A supervisor busy (or stopped with SIGSTOP), not an impostor.
        with trio.CancelScope(shield=True):
            await stream.aclose()
        if trio.current_time() + delay > deadline:
            raise NoSupervisorError(
                f"the supervisor at {path} takes no more connections (its backlog stayed full for"
                f" {busy_for:g} s: overloaded, or stopped?); {hint}"
            )
        await trio.sleep(delay)
        delay = min(delay * 2, 0.5)
    try:
        _check_peer(pid, uid, path)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return stream


async def _open_unix(path: Path, hint: str) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(os.fspath(path))
    except FileNotFoundError:
        raise NoSupervisorError(
            f"no supervisor at {path}: the socket does not exist; {hint}"
        ) from None
    except ConnectionRefusedError:
        raise NoSupervisorError(
            f"no supervisor at {path}: nobody is listening (a stale socket of a stopped run?);"
            f" {hint}"
        ) from None
    except PermissionError:
        raise NoSupervisorError(
            f"cannot connect to {path}: permission denied (it belongs to another user?)"
        ) from None
    except OSError as exc:
        raise NoSupervisorError(
            f"cannot connect to the supervisor at {path}: {exc.strerror or exc}"
        ) from None
