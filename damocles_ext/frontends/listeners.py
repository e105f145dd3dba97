"""What keeps a listening socket of `run` (the control socket, the metrics port) from being held
hostage: a cap on open connections, the longest-idle connection making room for a new one, and
an accept loop that survives running out of file descriptors.

The rules, in one place:

* at most `limit` connections are open; a new one over the cap closes the connection that has
  been idle longest (no request in flight, no bytes arriving; for HTTP, an answer its client
  does not read is none in flight). If every open connection is busy, the new one is turned
  away (`refuse`: a short error if the protocol has one);
* accept(2) failing for lack of descriptors or memory (EMFILE, ENFILE, ENOMEM, ENOBUFS) does
  not end the server, as in trio's `serve_listeners`: the longest-idle connection is closed to
  free its descriptor, or, with none idle, the loop waits a moment and accepts again;
* the connection handlers themselves close a connection that stays idle past their idle timeout.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from ..errors import EXIT_TEMPFAIL, UsageError

# accept(2) errors that say the system or the process is out of something, not that the
# listener is broken (the list trio's serve_listeners uses).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# trio's serve_listeners waits this long before accepting again after such an error.
SHED_PAUSE = 0.1
# An evicted connection closes its descriptor from its own task; accept again once it did.
_EVICT_WAIT = 1.0
# A flood would otherwise log one line per connection.
_LOG_EVERY = 10.0


class Evictable(Protocol):
    """A served connection as the slot table sees it."""

    @property
    def idle(self) -> bool:
        """No request in flight (bytes may be arriving: `last_active` tells)."""
        ...

    @property
    def last_active(self) -> float:
        """trio.current_time() of the last bytes received or answer sent."""
        ...

    @property
    def closed(self) -> trio.Event:
        """Set once the connection's descriptor is closed."""
        ...

    def evict(self, reason: str) -> None:
        """Close the connection soon (from its own task), logging `reason`."""
        ...


class ThrottledLog:
    """Logs a line at most every 10 s, saying how many were left out in between."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING) -> None:
        self._log = logger
        self._level = level
        self._next = -float("inf")
        self._skipped = 0

    def __call__(self, message: str, *args: object) -> None:
        now = trio.current_time()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            message += f" ({self._skipped} more like it in the last {_LOG_EVERY:g} s)"
        self._skipped = 0
        self._next = now + _LOG_EVERY
        self._log.log(self._level, message, *args)


class ConnectionSlots:
    """The open connections of one listener, at most `limit` of them."""

    def __init__(self, limit: int, what: str, logger: logging.Logger) -> None:
        if limit < 1:
            raise ValueError(f"the connection limit must be at least 1, got {limit}")
        self.limit = limit
        self.what = what
        self._open: set[Evictable] = set()
        self.evicted = 0  # idle connections closed to make room
        self.refused = 0  # connections turned away, every open one being busy
        self.shed = 0  # accept(2) failures for lack of descriptors or memory
        self._log = ThrottledLog(logger)

    def __len__(self) -> int:
        return len(self._open)

    def add(self, conn: Evictable) -> bool:
        """Take `conn` in, closing the longest-idle one if at the cap; False: no room (all busy)."""
        if (
            len(self._open) >= self.limit
            and self._evict_idlest(
                f"{self.what}: {self.limit} connections are open (the limit); closing the one idle"
                " longest to make room for a new one"
            )
            is None
        ):
            self.refused += 1
            self._log(
                "%s: %d connections are open (the limit) and all are busy; turning a new one away",
                self.what,
                self.limit,
            )
            return False
        self._open.add(conn)
        return True

    def discard(self, conn: Evictable) -> None:
        """`conn` is gone."""
        self._open.discard(conn)

    def evict_idle(self, reason: str) -> int:
        """Close every idle connection (shutting down); the busy ones finish what they do."""
        idle = [c for c in self._open if c.idle]
        for conn in idle:
            conn.evict(reason)
        return len(idle)

    def _evict_idlest(self, reason: str) -> Evictable | None:
        idle = [c for c in self._open if c.idle]
        if not idle:
            return None
        victim = min(idle, key=lambda c: c.last_active)
        self._open.discard(victim)
        self.evicted += 1
        self._log("%s", reason)
        victim.evict(reason)
        return victim

    async def accept(self, listener: trio.SocketListener) -> trio.SocketStream:
        """The next connection; out of descriptors, make room (or wait a moment) and go on."""
        while True:
            try:
                return await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                self.shed += 1
                name = errno.errorcode.get(exc.errno, str(exc.errno))
                victim = self._evict_idlest(
                    f"{self.what}: accept failed with {name} ({os.strerror(exc.errno)}); closing"
                    " the connection idle longest to free its descriptor"
                )
                if victim is not None:
                    with trio.move_on_after(_EVICT_WAIT):
                        await victim.closed.wait()
                    continue
                self._log(
                    "%s: accept failed with %s (%s) and no connection is idle; accepting again"
                    " in %g s (raise the open-file limit, `ulimit -n`, or lower the connection"
                    " limits)",
                    self.what,
                    name,
                    os.strerror(exc.errno),
                    SHED_PAUSE,
                )
                await trio.sleep(SHED_PAUSE)


async def serve_connections(
    listener: trio.SocketListener,
    slots: ConnectionSlots,
    nursery: trio.Nursery,
    handle: Callable[[trio.SocketStream], Awaitable[None]],
) -> None:
    """Accept forever, starting `handle(stream)` in `nursery` for each connection."""
    while True:
        stream = await slots.accept(listener)
        nursery.start_soon(handle, stream)


async def send_last(stream: trio.abc.SendStream, data: bytes | bytearray) -> None:
    """Write a connection's last words (why it is closed), given up after a second: a peer
    that does not read must not hold the descriptor."""
    with trio.move_on_after(1):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def bind_tcp(host: str, port: int, *, doing: str, option: str) -> socket.socket:
    """A listening TCP socket at host:port, or a UsageError saying what could not be done
    (`doing`, e.g. "serve metrics") and which option to change (`option`, e.g. "--metrics")."""
    sock = None
    try:
        family, kind, proto, _name, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
    except OSError as exc:  # an unknown host, no such address here, the port taken
        if sock is not None:
            sock.close()
        said = f"cannot {doing} on {join_host_port(host, port)}: {exc.strerror or exc}"
        if _not_yet(exc):  # (at boot: the address not assigned yet, the resolver not up yet)
            raise AddressNotReady(
                f"{said}; not up on this machine yet? (exit code 75: the systemd units start"
                f" it again); else choose another {option} HOST:PORT"
            ) from None
        raise UsageError(f"{said}; choose another {option} HOST:PORT") from None
    return sock


class AddressNotReady(UsageError):
    """An address to listen on that this machine does not have yet, or a name its resolver
    could not look up yet: exit code 75 (EX_TEMPFAIL), which a systemd unit restarts, where a
    port taken or a name that is none is exit code 2, which it does not."""

    exit_code = EXIT_TEMPFAIL


def _not_yet(exc: OSError) -> bool:
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN
    return exc.errno == errno.EADDRNOTAVAIL


def join_host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_address(stream: trio.SocketStream) -> str:
    """The address of a TCP connection's peer, host:port (`?` if it cannot be read)."""
    try:
        host, port = stream.socket.getpeername()[:2]
    except (OSError, TypeError, ValueError):
        return "?"
    return join_host_port(str(host), int(port))
