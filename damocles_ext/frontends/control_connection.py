"""One connection to `damocles-ext run`'s control socket (control.py's ControlServer accepts
them): its reader (requests, cancels, status requests, each frame acted on as it comes), one task
per request not taken by the supervisor's callback, and its writer (Progress, Responses and
StatusReplies in one write; a lone answer written at once by its own task). Its limits are the
server's (control.py's module docstring says what a client can hold).

A client that sends its next request within `SPIN` (supervisor/pipe_turns.py) of its last lone
answer being written has that request looked for without blocking, for up to SPIN, before the
reader sleeps on the socket (`Inbox.receive`'s poll): only when the reader's own task wrote
that answer (the batch that sent its request read the child's answer in its own poll: a child
that answers within SPIN), and nothing is owed on any connection (another connection's answer
would wait). A request that comes later turns it off until a next one comes within SPIN again,
so an idle connection costs one poll at most.

It sees its server through the server's public members (`ControlServer`'s connection-facing
part) and nothing else."""

from __future__ import annotations

import logging
import select
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

import trio

from ..errors import DextError
from ..protocol import control as control_protocol
from ..protocol import dext
from ..protocol.control import ControlResponse
from ..supervisor import pipe_turns
from ..tasks import Output, Task, stage_of
from .control_status import MAX_STATUS_IN_FLIGHT, busy_reply
from .inbox import Inbox, only_sending_closed
from .listeners import send_last
from .outbox import stream_fd, write_now
from .started import CancelHandle, bug_answer, start_or_decline

if TYPE_CHECKING:
    from .control import ControlServer

log = logging.getLogger("damocles_ext.control")

_READ_SIZE = 256 * 1024
# The id of a Response that is about the connection, not a request (clients count from 1).
CONNECTION_ERROR_ID = 0


async def send_connection_error(stream: trio.abc.SendStream, message: str) -> None:
    """Tell a client why its connection is closed: `Response{id 0, error=message}`, the one
    frame that is about the connection rather than a request. Given up after a second: a
    client that does not read must not hold the descriptor."""
    await send_last(stream, dext.encode(ControlResponse(CONNECTION_ERROR_ID, error=message)))


class Connection:
    """One client: a reader, a writer, and one task per request."""

    def __init__(self, server: ControlServer, stream: trio.SocketStream) -> None:
        self._server = server
        self._stream = stream
        self._decoder = control_protocol.frame_decoder(server.max_frame)
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
        self._head: bytes | bytearray = b""
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
        self._answered_at: float | None = None  # (perf_counter) a lone answer was written
        self._next_quick = False  # the client's next bytes came within SPIN of that

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
                elif goodbye is None and self._read_scope.cancel_called:
                    self._server.count_idle_closed()
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
                self._server.request_done()
            self._owned = 0
            if self._status_owed:  # their replies will not be written
                self._server.answered(self._status_owed)
                self._status_owed = 0

    async def _say_goodbye(self, reason: str) -> None:
        # Nothing is in flight, so the writer (cancelled above) was not inside a frame. This
        # frame tells the client that whatever it sent and had no answer to was never read: a
        # request crossing our close can be sent again on a new connection.
        await send_connection_error(
            self._stream,
            f"the supervisor closed the connection before reading more from it: {reason}",
        )

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            poll = 0.0
            if self._answered_at is not None and self._next_quick and not self._server.owed:
                poll = pipe_turns.SPIN
            try:
                data = await self._inbox.receive(poll)
            except trio.BrokenResourceError:
                data = b""
            if self._answered_at is not None:  # the client's next bytes after a lone answer
                self._next_quick = perf_counter() - self._answered_at <= pipe_turns.SPIN
                self._answered_at = None
            if self._read_scope.cancel_called:
                # Closed (evicted, idle) as these bytes came: a read that needs no wait is no
                # checkpoint, so they would be acted on before the cancel. Not acted on, the
                # goodbye's word that nothing more was read holds: the client sends them again.
                return
            try:
                messages = self._decoder.receive_data(data)
            except dext.ProtocolError as exc:
                if not data:  # it hung up inside a frame (killed as it wrote): nobody to tell
                    log.info("control client hung up inside a frame: %s", exc)
                    return
                self._server.client_errors(
                    "control client broke the protocol, closing its connection: %s", exc
                )
                self._refusal = control_protocol.refusal_reason(exc)
                return
            if not self._server.buffer_changed(self, self._decoder.pending):
                # Closed for holding the most: the whole frames of this read go unread with
                # the rest, so the goodbye's word that nothing more was read holds, and the
                # client may send them again on a new connection.
                return
            requests: list[dext.Request] = []  # started together, before what follows them
            for msg in messages:
                if isinstance(msg, dext.Request) and msg.id > CONNECTION_ERROR_ID:
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
                    self._server.opened()
                    if not self._server.admit_status():  # (too many server-wide: refused)
                        self._replies.append(busy_reply(msg.id))
                        self._wake.set()
                    else:
                        nursery.start_soon(self._answer_status, msg.id)
                elif isinstance(msg, dext.Request):  # id 0 or below: 0 is the connection's own
                    self._server.client_errors(
                        "control client sent request id %d; closing its connection", msg.id
                    )
                    self._refusal = (
                        f"the client sent a request with id {msg.id}: request ids are from 1 (a"
                        " Response with id 0 is about the connection, not a request); number"
                        " them from 1"
                    )
                    return
                else:
                    self._server.client_errors(
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
        with self._server.batch():
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
        self._server.request_started()
        self._owned += 1
        start = self._server.start
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
                response = self._server.error_response(rid, error, stage_of(task))
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
                output = await self._server.submit(
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
        reply = await self._server.answer_status(request_id)
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
            written_at = perf_counter()  # (before: the client may answer as the write returns)
            done = write_now(self._fd, frame)
            if done == len(frame):
                self._answered_at = written_at
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
            self._server.request_done()
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
                self._server.answered(len(replies))
                self._status_drained.set()
            if last:
                self._refusal_written.set()
                return
            self._activity()
