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
import select
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
from ..tasks import Output, Task, stage_of
from .control_socket import (  # noqa: F401 - the control socket's API, importable from here
    SOCKET_DIR_NAME,
    SOCKET_NAME,
    UntrustedPathError,
    bind_control_socket,
    default_socket_path,
    peer_credentials,
    peer_uid,
    resolve_trusted,
    trusted_uids,
)
from .control_status import (
    MAX_STATUS_IN_FLIGHT,
    MAX_STATUS_IN_FLIGHT_SERVER,
    StatusFn,
    busy_reply,
    no_child_problem,
    status_reply,
)
from .inbox import Inbox, only_sending_closed
from .listeners import ConnectionSlots, ThrottledLog, send_last, serve_connections
from .outbox import stream_fd, write_now
from .started import (
    Batch,
    CancelHandle,
    InternalError,
    Start,
    bug_answer,
    said_and_logged,
    start_or_decline,
)

log = logging.getLogger("damocles_ext.control")

_READ_SIZE = 256 * 1024
DEFAULT_MAX_CONNECTIONS = 256
# A `serve --connect` front end keeps its connection between requests and connects again when
# it finds it closed, so this only has to be long against the time between two proofs.
DEFAULT_IDLE_TIMEOUT = 600.0
# Room for a few of the largest frames a client may send (64 MiB) at once, and no more.
DEFAULT_MAX_BUFFERED = 256 * 1024 * 1024
# The id of a Response that is about the connection, not a request (clients count from 1).
CONNECTION_ERROR_ID = 0


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
        self._inode = os.stat(self.path).st_ino
        self._submit = submit
        self._start = start
        self._batch = batch
        self._status = status
        self._serves = serves
        self._uid = os.geteuid()
        self._accept_scope = trio.CancelScope()
        self._slots = ConnectionSlots(max_connections, "control socket", log)
        self.idle_timeout = idle_timeout
        self.max_buffered = max_buffered
        # A frame longer than everything may hold together could never complete.
        self._max_frame = min(dext.DEFAULT_MAX_FRAME_SIZE, max_buffered)
        self._buffered = 0
        self._status_in_flight = 0  # status requests being answered, all connections
        self._open = 0  # requests and status requests received and not yet answered (wait_idle)
        self._connections: set[_Connection] = set()
        self._stats = ControlStats()
        self._idle: trio.Event | None = None  # a wait_idle's, set once _open falls to 0
        self._log_over_buffer = ThrottledLog(log)

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
                await listener.aclose()
                self._unlink()
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            self._unlink()

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
        # Only remove the file we created: a newer `run` may already have replaced it.
        try:
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _error_response(self, rid: int, error: DextError, stage: str) -> ControlResponse:
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

    def _request_started(self) -> None:
        self._stats.requests += 1
        self._stats.in_flight += 1
        self._open += 1

    def _request_done(self) -> None:
        self._stats.in_flight -= 1
        self._closed()

    def _opened(self) -> None:
        self._open += 1

    def _closed(self, count: int = 1) -> None:
        self._open -= count
        if self._open == 0 and self._idle is not None:  # (an Event only while one waits)
            self._idle.set()
            self._idle = None

    def _buffer_changed(self, conn: _Connection, pending: int) -> bool:
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
            self._buffer_changed(conn, 0)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            conn.closed.set()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        message = (
            f"the supervisor has too many connections ({self.max_connections} open, all busy;"
            " the limit is run's --max-connections); try again later"
        )
        await _send_connection_error(stream, message)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def _send_connection_error(stream: trio.abc.SendStream, message: str) -> None:
    """Tell a client why its connection is closed: `Response{id 0, error=message}`, the one
    frame that is about the connection rather than a request. Given up after a second: a
    client that does not read must not hold the descriptor."""
    await send_last(stream, dext.encode(ControlResponse(CONNECTION_ERROR_ID, error=message)))


class _Connection:
    """One client: a reader, a writer, and one task per request."""

    def __init__(self, server: ControlServer, stream: trio.SocketStream) -> None:
        self._server = server
        self._stream = stream
        self._decoder = control_protocol.frame_decoder(server._max_frame)
        # Each request in flight: its task's scope, or what `start` returned (cancel() both).
        self._scopes: dict[int, CancelHandle] = {}
        self._client_cancelled: set[int] = set()  # ids the client sent a Cancel for
        self._gone = False  # run() ended: what is answered now is nobody's
        self._replies: list[control_protocol.StatusReply] = []
        # Responses are never dropped; Progress is advisory, so only the latest per id is kept
        # and a slow client cannot make us buffer without bound.
        self._responses: list[ControlResponse] = []
        self._progress: dict[int, dext.Progress] = {}
        self._wake = trio.Event()
        # A response written at once by its own task (see _queue_response) that the socket did
        # not take whole: the writer sends the rest first, and counts that response as answered.
        self._head = b""
        self._head_responses = 0
        self._writing = False
        self._fd = stream_fd(stream)
        self._inbox = Inbox(stream, _READ_SIZE)
        self._owned = 0  # requests counted in the server's in_flight that we still owe
        self._status_owed = 0  # status requests not yet answered on the wire
        self._status_drained = trio.Event()
        self._answered_all: trio.Event | None = None  # set once idle (half-closed)
        self.buffered = 0  # bytes of an unfinished frame, as the server accounts them
        self.last_active = trio.current_time()
        self.closed = trio.Event()
        # The reader runs in this scope: cancelling it closes the connection (evict, or
        # _idle_watch once the connection was idle for the server's idle_timeout).
        self._read_scope = trio.CancelScope()
        self._evicted: str | None = None
        # Why the client's frame is refused: said in a Refusal, the connection's last frame,
        # which fails what it had not answered (a client must not send that again).
        self._refusal: str | None = None
        self._refusal_written = trio.Event()  # (or could not be)

    @property
    def idle(self) -> bool:
        return self._owned == 0 and self._status_owed == 0

    def evict(self, reason: str, *, log_level: int = logging.DEBUG) -> None:
        """Close this connection from its own task (its requests, if any, are cancelled)."""
        self._evicted = reason
        log.log(log_level, "closing a control connection: %s", reason)
        self._read_scope.cancel()

    def _activity(self) -> None:
        self.last_active = trio.current_time()

    async def _idle_watch(self) -> None:
        """Close the connection once it has been idle (nothing in flight, no bytes arriving) for
        the server's idle_timeout. Looked at when that long has passed since it was last active,
        so that activity only notes its time: a cancel scope's deadline moved to and from
        infinity on every request costs trio's deadline bookkeeping twice per request."""
        timeout = self._server.idle_timeout
        while True:
            now = trio.current_time()
            due = self.last_active + timeout
            if self.idle and now >= due:
                if not self._unread():
                    self._read_scope.cancel()
                    return
                # Bytes came as the time ran out, not yet read (the reader may be woken for them
                # in this very pass): they are read and acted on, which is activity.
                due = now + timeout
            await trio.sleep_until(due if self.idle else now + timeout)

    def _unread(self) -> bool:
        """Whether the client's bytes (or its hang-up) wait in the socket, unread."""
        if self._fd is None:
            return False
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(0))

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._idle_watch)
                with self._read_scope:
                    await self._read_loop(nursery)
                # Evicted: by another connection, or by the read that put this one over the
                # buffer cap (which returns before any checkpoint, so the scope caught nothing).
                goodbye = self._evicted
                if self._refusal is not None:  # the one goodbye: not the id-0 "send again"
                    goodbye = None
                elif goodbye is None and self._read_scope.cancelled_caught:
                    self._server._stats.idle_closed += 1
                    goodbye = f"idle for {self._server.idle_timeout:g} s (run's --idle-timeout)"
                    log.info("closing a control connection %s", goodbye)
                # The client hung up (or broke the protocol): its requests go with it.
                self._gone = True
                for started in list(self._scopes.values()):
                    started.cancel()  # the task scopes are cancelled twice: harmless
                if self._refusal is not None:  # written after what was (never inside a frame)
                    self._wake.set()
                    with trio.move_on_after(1):  # (a client that does not read)
                        await self._refusal_written.wait()
                nursery.cancel_scope.cancel()
            if goodbye is not None and self.idle:
                await self._say_goodbye(goodbye)
        finally:
            if not self._gone:  # cancelled from outside (the server stops)
                self._gone = True
                for started in list(self._scopes.values()):
                    started.cancel()
            for _ in range(self._owned):
                self._server._request_done()
            self._owned = 0
            if self._status_owed:  # their replies will not be written
                self._server._closed(self._status_owed)
                self._status_owed = 0

    async def _say_goodbye(self, reason: str) -> None:
        # Nothing is in flight, so the writer (cancelled above) was not inside a frame. This
        # frame tells the client that whatever it sent and had no answer to was never read: a
        # request crossing our close can be sent again on a new connection.
        await _send_connection_error(
            self._stream,
            f"the supervisor closed the connection before reading more from it: {reason}",
        )

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data = await self._inbox.receive()
            except trio.BrokenResourceError:
                data = b""
            try:
                messages = self._decoder.receive_data(data)
            except dext.ProtocolError as exc:
                log.error("control client broke the protocol, closing its connection: %s", exc)
                if data:  # (else it hung up inside a frame: nobody to tell)
                    self._refusal = control_protocol.refusal_reason(exc)
                return
            if not self._server._buffer_changed(self, self._decoder.pending):
                # Closed for holding the most: the whole frames of this read go unread with
                # the rest, so the goodbye's word that nothing more was read holds, and the
                # client may send them again on a new connection.
                return
            requests: list[dext.Request] = []  # started together, before what follows them
            for msg in messages:
                if isinstance(msg, dext.Request):
                    requests.append(msg)
                    continue
                if requests:
                    self._start_requests(requests, nursery)
                    requests = []
                if isinstance(msg, dext.Cancel):
                    scope = self._scopes.get(msg.id)
                    if scope is not None:
                        self._client_cancelled.add(msg.id)
                        scope.cancel()
                elif isinstance(msg, control_protocol.StatusRequest):
                    if self._status_owed >= MAX_STATUS_IN_FLIGHT:
                        self._activity()  # not idle: an old idle deadline must not end it here
                    while self._status_owed >= MAX_STATUS_IN_FLIGHT:
                        self._status_drained = trio.Event()
                        await self._status_drained.wait()
                    self._status_owed += 1
                    self._server._opened()
                    if self._server._status_in_flight >= MAX_STATUS_IN_FLIGHT_SERVER:
                        self._server._stats.status_refused += 1
                        self._replies.append(busy_reply(msg.id))
                        self._wake.set()
                    else:
                        self._server._status_in_flight += 1
                        nursery.start_soon(self._answer_status, msg.id)
                else:
                    log.error(
                        "control client sent a %s frame, which only a prover child may"
                        " send; closing its connection",
                        type(msg).__name__,
                    )
                    self._refusal = control_protocol.refusal_reason(type(msg).__name__)
                    return
            if requests:
                self._start_requests(requests, nursery)
            if not data:
                if not self.idle and self._fd is not None and only_sending_closed(self._fd):
                    # shutdown(SHUT_WR), as `nc -N` does: it still reads; answered, then closed.
                    log.info("control client closed its sending side: answering its %d requests"
                             " before closing", self._owned + self._status_owed)  # fmt: skip
                    self._answered_all = trio.Event()
                    await self._answered_all.wait()
                elif self._scopes:
                    log.info(
                        "control client disconnected: cancelling its %d requests", len(self._scopes)
                    )
                return
            self._activity()

    def _start_requests(self, requests: list[dext.Request], nursery: trio.Nursery) -> None:
        with self._server._batch():
            for req in requests:
                self._start_request(req, nursery)

    def _start_request(self, req: dext.Request, nursery: trio.Nursery) -> None:
        if req.id in self._scopes:
            # Answers are routed by id: any answer to this one would reach the caller of the
            # request in flight, which would take it for its own.
            log.error(
                "control client sent request id %d while it is in flight; the second request is"
                " not answered (use a new id for each request)",
                req.id,
            )
            return
        self._server._request_started()
        self._owned += 1
        start = self._server._start
        if start is not None and start_or_decline(
            start,
            self._scopes,
            req.id,
            req.task,
            lambda output, error: self._done(req.id, output, error, req.task),
            deadline=req.deadline,
            priority=req.priority,
            on_progress=self._progress_of(req.id),
        ):
            return  # answered by a callback: no task, no cancel scope, no wake-up of a task
        scope = trio.CancelScope()
        self._scopes[req.id] = scope
        nursery.start_soon(self._run_request, req, scope)

    def _progress_of(self, rid: int) -> Callable[[dext.Progress], None]:
        def on_progress(progress: dext.Progress) -> None:
            # The supervisor numbers requests its own way; the client knows only its id.
            if rid in self._scopes:
                self._progress[rid] = dext.Progress(
                    rid, progress.phase, progress.done, progress.total
                )
                self._wake.set()

        return on_progress

    def _done(self, rid: int, output: Output | None, error: DextError | None, task: Task) -> None:
        """Request `rid` was answered, refused, or (neither output nor error) cancelled at the
        client's request: its one Response. Also called from within the supervisor (for what
        `start` took): a bug of ours here must still answer the request, and not reach it."""
        self._scopes.pop(rid, None)
        if self._gone:
            return  # the client is gone; run() counted it
        try:
            if rid in self._client_cancelled:
                self._client_cancelled.discard(rid)
                response = ControlResponse(
                    rid, error="cancelled at the client's request", kind=None
                )
            elif error is not None:
                response = self._server._error_response(rid, error, stage_of(task))
            else:
                response = ControlResponse(rid, output=output)
            self._queue_response(response)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: answered, logged by bug_answer
            error = bug_answer(log, rid, exc, "control request %d: internal error on its answer")
            self._queue_response(ControlResponse(rid, error=str(error), kind=None))

    async def _run_request(self, req: dext.Request, scope: trio.CancelScope) -> None:
        on_progress = self._progress_of(req.id)
        output: Output | None = None
        error: DextError | None = None
        with scope:
            try:
                output = await self._server._submit(
                    req.task, deadline=req.deadline, priority=req.priority, on_progress=on_progress
                )
            except DextError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - a bug of ours must still answer the request
                # The caller's id: the answer's one record.
                error = bug_answer(log, req.id, exc, "control request %d: internal error")
        if scope.cancelled_caught:  # by the client's Cancel (a hang-up: _done answers nobody)
            self._client_cancelled.add(req.id)
        else:  # answered: a Cancel that came after it changes nothing
            self._client_cancelled.discard(req.id)
        self._done(req.id, output, error, req.task)

    async def _answer_status(self, request_id: int) -> None:
        try:
            reply = await status_reply(self._server._status, request_id)
        finally:
            self._server._status_in_flight -= 1
        self._replies.append(reply)
        self._wake.set()

    def _queue_response(self, response: ControlResponse) -> None:
        # A progress still waiting goes first, with it (the writer sends progress before
        # answers): the last phase a prover reported, often its end, is not lost.
        if (
            self._owned == 1
            and self._fd is not None
            and not (self._writing or self._head or self._progress)
            and not (self._responses or self._replies)
        ):
            # The one request in flight, and the writer has nothing: written now, without
            # waking the writer (one task switch and one checkpoint less per request).
            frame = dext.encode(response)
            done = write_now(self._fd, frame)
            if done == len(frame):
                self._answered(1)
                self._activity()
                return
            self._head, self._head_responses = frame[done:], 1
        else:
            self._responses.append(response)
        self._wake.set()

    def _answered(self, count: int) -> None:
        for _ in range(count):
            self._owned -= 1
            self._server._request_done()
        if self.idle and self._answered_all is not None:
            self._answered_all.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            progress = list(self._progress.values())
            self._progress.clear()
            responses = self._responses
            self._responses = []
            replies = self._replies
            self._replies = []
            answered = len(responses) + self._head_responses
            last = () if self._refusal is None else (control_protocol.Refusal(self._refusal),)
            data = self._head + b"".join(
                dext.encode(m) for m in (*progress, *responses, *replies, *last)
            )
            self._head, self._head_responses = b"", 0
            self._writing = True
            try:
                # What the socket takes at once goes straight in (no send_all, its checkpoint and
                # its wrappers); the rest, or an error, through send_all.
                done = write_now(self._fd, data) if self._fd is not None else 0
                if done < len(data):
                    await self._stream.send_all(memoryview(data)[done:])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.info("control client went away; %d answers dropped", answered)
                # The reader sees EOF next and cancels what is left.
            finally:
                self._writing = False
            self._status_owed -= len(replies)  # (before _answered: idle once both are 0)
            self._answered(answered)
            if replies:
                self._server._closed(len(replies))
                self._status_drained.set()
            if last:
                self._refusal_written.set()
                return
            self._activity()
