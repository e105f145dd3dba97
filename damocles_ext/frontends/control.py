"""The control socket of `damocles-ext run`: a private unix socket speaking dext/1 frames.

A client sends `Request{id, task, deadline, priority}` (and may send `Cancel{id}`); it receives the
`Progress` of its requests and exactly one `Response` per request id. Ids belong to the
connection, several requests may be in flight on one connection, and a client that disconnects
takes its queued and running requests with it (they are cancelled). A client may also send
`StatusRequest{id}` (protocol/control.py) and gets `StatusReply{id, status}`: the status document.
An error Response says its `kind` (protocol/control.py): control.USAGE when the request is the
caller's to fix (a UsageError of `submit`, or no child of its stage here), else None.

Who may connect is decided by the file system and SO_PEERCRED (control_socket.py: the socket's
place, its binding and the checks the client makes too; importable from here as well). A peer
whose uid is neither ours nor root's is turned away.

What a client can hold is bounded (frontends/listeners.py has the rules shared with the metrics
port): at most `max_connections` connections (a new one over the cap closes the one idle
longest, or is told "too many connections" when all are busy), a connection idle for
`idle_timeout` is closed (idle: no request in flight and no bytes arriving; a WindowPoSt that
runs for 30 minutes keeps its connection), and the unfinished frames of all connections
together may hold at most `max_buffered` bytes (over it, the connection holding the most is
closed, and the whole frames of the read that put it over are not acted on). A connection
closed while idle first gets Response{id 0, error=why}: nothing it sent after that was read.
One that sent a frame we cannot take gets Refusal{error=why} (protocol/control.py) after what
was answered: it fails the rest (its requests in flight are cancelled), not to be sent again.
Status requests are bounded per connection (MAX_STATUS_IN_FLIGHT: past it, the connection is
not read) and server-wide (MAX_STATUS_IN_FLIGHT_SERVER: past it, an error reply at once).
Running out of file descriptors at accept(2) is survived.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from ..errors import DextError, UsageError
from ..protocol import control as control_protocol
from ..protocol import dext
from ..protocol.control import ControlResponse
from ..scheduling.children import NO_CHILDREN
from ..tasks import Output, Task
from .control_connection import Connection as _Connection
from .control_connection import send_connection_error
from .control_socket import (  # noqa: F401 - the control socket's API, importable from here
    SOCKET_DIR_NAME,
    SOCKET_NAME,
    UntrustedPathError,
    bind_control_socket,
    default_socket_path,
    peer_credentials,
    peer_uid,
    release_control_socket,
    resolve_trusted,
    trusted_uids,
)
from .control_status import (
    MAX_STATUS_IN_FLIGHT_SERVER,
    StatusFn,
    no_child_problem,
    status_reply,
)
from .listeners import ConnectionSlots, ThrottledLog, serve_connections
from .started import (
    Batch,
    InternalError,
    Start,
    said_and_logged,
)

log = logging.getLogger("damocles_ext.control")

DEFAULT_MAX_CONNECTIONS = 256
# A `serve --connect` front end keeps its connection between requests and connects again when
# it finds it closed, so this only has to be long against the time between two proofs.
DEFAULT_IDLE_TIMEOUT = 600.0
# Room for a few of the largest frames a client may send (64 MiB) at once, and no more.
DEFAULT_MAX_BUFFERED = 256 * 1024 * 1024


class ControlSubmit(Protocol):
    """What the control server needs from a supervisor: `Supervisor.submit`'s signature."""

    def __call__(
        self,
        task: Task,
        *,
        deadline: float | None = ...,
        priority: int = ...,
        on_progress: Callable[[dext.Progress], None] | None = ...,
    ) -> Awaitable[Output]: ...


@dataclass(slots=True)
class ControlStats:
    """Counters of the control server."""

    connections: int = 0  # open now
    accepted: int = 0  # connections ever accepted
    rejected: int = 0  # connections turned away (foreign uid)
    requests: int = 0  # requests ever received
    in_flight: int = 0  # requests received and not yet answered
    refused: int = 0  # turned away at the connection cap, every open connection being busy
    evicted: int = 0  # idle connections closed to make room (cap reached, or out of descriptors)
    idle_closed: int = 0  # connections closed after idle_timeout
    over_buffer: int = 0  # connections closed for holding the most when over max_buffered
    shed: int = 0  # accept(2) failures for lack of descriptors or memory, survived
    buffered: int = 0  # bytes of unfinished frames held now, all connections together
    status_refused: int = 0  # status requests answered with an error: too many server-wide


class ControlServer:
    """Serves dext clients on a listening unix socket by calling `submit` for each request.

    `start`, when given, is tried first (`Supervisor.start_nowait`): a request it takes needs no
    task of its own here; one it returns None for goes to `submit`. The requests of one read are
    started within `batch()` (`Supervisor.batch`: they go to the children together).
    `status`, when given, answers `StatusRequest`s: it returns the status document as plain data.
    `serves(stage)`, when given, says whether this supervisor has a child of `stage`: a request
    of a stage it has none of fails saying so, as a usage error (Response.kind).
    `max_connections`, `idle_timeout` (seconds) and `max_buffered` (bytes) bound what clients
    can hold (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        submit: ControlSubmit,
        *,
        start: Start | None = None,
        batch: Batch = contextlib.nullcontext,
        status: StatusFn | None = None,
        serves: Callable[[str], bool] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout}")
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be at least 1 byte, got {max_buffered}")
        self.path = Path(sock.getsockname())
        self._sock = sock
        self._inode: int | None = os.stat(self.path).st_ino  # None once removed
        # What a connection calls (see above).
        self.submit = submit
        self.start = start
        self.batch = batch
        self._status = status
        self._serves = serves
        self._uid = os.geteuid()
        self._accept_scope = trio.CancelScope()
        self._slots = ConnectionSlots(max_connections, "control socket", log)
        self.idle_timeout = idle_timeout
        self.max_buffered = max_buffered
        # A frame longer than everything may hold together could never complete.
        self.max_frame = min(dext.DEFAULT_MAX_FRAME_SIZE, max_buffered)
        self._buffered = 0
        self._status_in_flight = 0  # status requests being answered, all connections
        self._open = 0  # requests and status requests received and not yet answered (wait_idle)
        self._connections: set[_Connection] = set()
        self._stats = ControlStats()
        self._idle: trio.Event | None = None  # a wait_idle's, set once _open falls to 0
        self._log_over_buffer = ThrottledLog(log)
        # A client that breaks the protocol, in a retry loop, must not write a line per try.
        self.client_errors = ThrottledLog(log, logging.ERROR)

    @property
    def max_connections(self) -> int:
        """The connection cap."""
        return self._slots.limit

    def statistics(self) -> ControlStats:
        """A snapshot of the counters."""
        s = self._stats
        slots = self._slots
        return ControlStats(
            len(self._connections),
            s.accepted,
            s.rejected,
            s.requests,
            s.in_flight,
            slots.refused,
            slots.evicted,
            s.idle_closed,
            s.over_buffer,
            slots.shed,
            self._buffered,
            s.status_refused,
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until `stop_accepting()`, then serve the open ones until cancelled."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                with self._accept_scope:
                    await serve_connections(listener, self._slots, nursery, self._serve_connection)
                # Removed before the close, which releases the path's lock (bind_control_socket):
                # until then no other damocles-ext can have put its socket there.
                self._unlink()
                await listener.aclose()
                release_control_socket(self._sock)
        finally:
            self._unlink()
            with trio.CancelScope(shield=True):
                await listener.aclose()
            release_control_socket(self._sock)

    def stop_accepting(self) -> None:
        """Close the listening socket and remove its file; open connections go on."""
        self._accept_scope.cancel()

    async def wait_idle(self) -> None:
        """Wait until every request and status request received so far has been answered (or
        its client is gone): `run` stopping still answers a `status` asked as it stops."""
        while self._open:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    def _unlink(self) -> None:
        # Only remove the file we created, once: after that another damocles-ext may have put
        # its socket there, maybe under the same inode number.
        try:
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None

    def error_response(self, rid: int, error: DextError, stage: str) -> ControlResponse:
        """The Response of request `rid` (of `stage`) that failed with `error`, with its kind:
        not "usage" for a bug of ours (InternalError), whatever the request."""
        said = said_and_logged(rid, error, log)
        if isinstance(error, UsageError):
            return ControlResponse(rid, error=said, kind=control_protocol.USAGE)
        if isinstance(error, InternalError) or self._serves is None or self._serves(stage):
            return ControlResponse(rid, error=said, kind=None)
        problem = no_child_problem(self.path, stage, self._serves)
        # The supervisor's own words for it give way to these, which say what to do.
        tail = NO_CHILDREN.format(stage=stage)
        said = said[: -len(tail)] + problem if said.endswith(tail) else f"{said}: {problem}"
        return ControlResponse(rid, error=said, kind=control_protocol.USAGE)

    # -- what a connection (control_connection.py) sees of its server, besides the above ----

    def count_idle_closed(self) -> None:
        self._stats.idle_closed += 1

    def admit_status(self) -> bool:
        """Whether a status request (received: `opened`) is answered, or refused at once for
        too many in flight server-wide (counted)."""
        if self._status_in_flight >= MAX_STATUS_IN_FLIGHT_SERVER:
            self._stats.status_refused += 1
            return False
        self._status_in_flight += 1
        return True

    async def answer_status(self, request_id: int) -> control_protocol.StatusReply:
        """The reply to a status request `admit_status` admitted."""
        try:
            return await status_reply(self._status, request_id)
        finally:
            self._status_in_flight -= 1

    def request_started(self) -> None:
        self._stats.requests += 1
        self._stats.in_flight += 1
        self._open += 1

    def request_done(self) -> None:
        self._stats.in_flight -= 1
        self.answered()

    def opened(self) -> None:
        self._open += 1

    @property
    def owed(self) -> int:
        """Requests and status requests received and not answered yet, all connections."""
        return self._open

    def answered(self, count: int = 1) -> None:
        self._open -= count
        if self._open == 0 and self._idle is not None:  # (an Event only while one waits)
            self._idle.set()
            self._idle = None

    def buffer_changed(self, conn: _Connection, pending: int) -> bool:
        """Account `conn`'s unfinished frame; False if `conn` itself must go (over the cap)."""
        self._buffered += pending - conn.buffered
        conn.buffered = pending
        keep = True
        while self._buffered > self.max_buffered:
            hog = max(self._connections, key=lambda c: c.buffered)
            self._stats.over_buffer += 1
            reason = (
                f"its unfinished frame holds {hog.buffered / 2**20:.1f} MiB, the most of any"
                f" connection, and all of them together hold {self._buffered / 2**20:.1f} MiB,"
                f" over the limit of {self.max_buffered / 2**20:g} MiB (--max-buffer)"
            )
            self._log_over_buffer("closing a control connection: %s", reason)
            # Its bytes are dropped with it; count them out now so that one over-long read
            # does not close several connections.
            self._buffered -= hog.buffered
            hog.buffered = 0
            hog.evict(reason, log_level=logging.DEBUG)
            if hog is conn:
                keep = False
        return keep

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            uid = peer_uid(stream.socket)
        except OSError:  # gone already
            await trio.aclose_forcefully(stream)
            return
        if uid not in trusted_uids(self._uid):
            self._stats.rejected += 1
            log.warning(
                "refused a control connection from uid %d (only uid %d and root may connect)",
                uid,
                self._uid,
            )
            await trio.aclose_forcefully(stream)
            return
        conn = _Connection(self, stream)
        if not self._slots.add(conn):
            await self._refuse(stream)
            return
        self._stats.accepted += 1
        self._connections.add(conn)
        try:
            await conn.run()
        except Exception:
            # A bug of ours while serving one client ends that connection (its requests are
            # cancelled, as when it hangs up), never `run`.
            log.exception("control connection: internal error; closing it")
        finally:
            self._connections.discard(conn)
            self._slots.discard(conn)
            self.buffer_changed(conn, 0)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            conn.closed.set()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        message = (
            f"the supervisor has too many connections ({self.max_connections} open, all busy;"
            " the limit is run's --max-connections); try again later"
        )
        await send_connection_error(stream, message)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
