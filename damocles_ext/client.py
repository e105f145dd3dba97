"""Client of the control socket of `damocles-ext run`.

    async with connect() as client:                 # trio
        output = await client.submit(task, deadline=time.time() + 600)

    output = submit_sync(task)                       # from a plain script

Requests on one connection run concurrently; each `submit` returns its own output or raises
ProverError. Cancelling a `submit` (e.g. with `trio.move_on_after`) cancels the request in the
supervisor (a caller already cancelled sends nothing), and closing the connection cancels every request still open on it. A request with
a deadline that has no answer `LATE_ANSWER` seconds after it (a supervisor stopped or hung)
raises ProverError then. An error answer the supervisor says is the caller's to fix (no child
of the task's stage there, a worker's socket: Response.kind) raises ProverUsageError, a
UsageError (exit code 2) that is a ProverError too.

The caller of a lone request (nothing else in flight on the connection) whose last lone answer
came within `ANSWER_POLL` reads the socket itself for up to that long before it sleeps, as the
supervisor's callers poll their children's pipes (supervisor/pipe_turns.py says why): a quick
answer is read at once, not after the kernel woke a sleeping process.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from . import __version__
from .client_socket import PROVE_HINT, NoSupervisorError, open_stream
from .errors import NotStartedError, ProverError, ProverUsageError, UsageError, check_trio_run
from .frontends.control_socket import default_socket_path
from .frontends.inbox import Inbox
from .frontends.outbox import Outbox, stream_fd
from .parked import Parked
from .protocol import control as control_protocol
from .protocol import dext
from .tasks import Output, Task, request_problem, task_check

if TYPE_CHECKING:
    from .status import StatusDocument

log = logging.getLogger("damocles_ext.client")

#: How long after a request's deadline its answer is waited for: the supervisor answers at the
#: deadline; silent this long after it, it is stopped (SIGSTOP) or hung.
LATE_ANSWER = 15.0

#: How long a request whose write failed waits for the supervisor's Refusal that may explain it
#: (the supervisor closed the connection on a frame it refused while the request was written).
REFUSAL_WAIT = 2.0

#: How long the caller of a lone request reads the socket for its answer before it sleeps
#: (seconds), when the last lone answer came within that: a trivial request through `run` is
#: answered about 100 us after it is sent on a 2-core VM.
ANSWER_POLL = 250e-6
_READ_SIZE = 256 * 1024

#: Called with each Progress of a request (its `id` is the client's request id).
ProgressCallback = Callable[[dext.Progress], None]


class KindUnsaidError(ProverError):
    """An error answer without a kind (Response.kind): from a supervisor older than it, which
    does not say whether the request was the caller's to fix; its status can tell (`prove`)."""


class _NotSent(ProverError):
    """The request could not be written: the supervisor cannot have started it."""


class _Unread(ProverError):
    """The supervisor closed the connection and said it read nothing more from it."""


class _Pending(Parked):
    """A request waiting for its answer (`set` once answered, failed or not sent)."""

    __slots__ = ("error", "not_sent", "on_progress", "response")

    def __init__(self, on_progress: ProgressCallback | None) -> None:
        super().__init__()
        self.response: control_protocol.ControlResponse | None = None
        self.error: str | None = None
        self.not_sent = False  # the request could not be written
        self.on_progress = on_progress


class Client:
    """A connection to a running supervisor; make one with `connect()`."""

    def __init__(self, stream: trio.SocketStream, path: Path) -> None:
        self.path = path
        self._stream = stream
        # Requests go out in order, at once when alone, else joined per pass of the loop.
        self._outbox = Outbox(stream)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._status_pending: dict[int, tuple[trio.Event, list[control_protocol.StatusReply]]] = {}
        self._status_unsent: dict[int, str] = {}
        self._lost: str | None = None
        self._refused: str | None = None  # why the supervisor is closing this connection
        # Why the supervisor refused what we sent (a Refusal): nothing unanswered is sent again.
        self._refusal: str | None = None
        self._ended = trio.Event()  # the connection is lost (_lost is set)
        self._token = trio.lowlevel.current_trio_token()  # its reader's trio run
        self._fd = stream_fd(stream)  # (None: a stream without one, never polled)
        self._decoder = control_protocol.frame_decoder()  # the reader's, and a polling caller's
        self._quick = False  # the last lone request was answered within ANSWER_POLL
        self._poll_error: Exception | None = None  # what a polling caller met, for the reader

    async def submit(
        self,
        task: Task,
        *,
        deadline: float | None = None,
        priority: int = 0,
        on_progress: ProgressCallback | None = None,
    ) -> Output:
        """Prove `task` (deadline: unix time); returns the output or raises ProverError, a
        ProverUsageError (also a UsageError) when the supervisor says it is the caller's to fix."""
        check_trio_run("Client.submit()", self._token)
        self._check_open()
        request_id = next(self._ids)
        checked = request_problem(task, deadline, priority) or task_check(task)
        if isinstance(checked, str):
            # Sent, it would break the protocol: the supervisor would drop the connection.
            raise UsageError(f"request {request_id} {checked}")
        try:  # (the task as its check encoded it, not encoded again)
            request = dext.RawRequest(request_id, msgspec.Raw(checked), deadline, priority)
            frame = dext.encode(request)
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as exc:
            # E.g. a number over 64 bits: the caller's mistake, before anything was sent.
            raise UsageError(f"request {request_id} cannot be sent: {exc}") from None
        if len(frame) - dext.HEADER_SIZE > dext.DEFAULT_MAX_FRAME_SIZE:
            # The supervisor would close the connection on it, failing every other request.
            raise UsageError(
                f"request {request_id}: the task is {len(frame) / 2**20:.1f} MiB as a request"
                f" ({len(task.replicas)} replicas), over the"
                f" {dext.DEFAULT_MAX_FRAME_SIZE / 2**20:.0f} MiB limit of a dext frame; split it"
            )
        # A caller already cancelled gets Cancelled before anything is sent (trio's rule).
        await trio.lowlevel.checkpoint_if_cancelled()
        pending = _Pending(on_progress)
        self._pending[request_id] = pending

        def written(error: BaseException | None) -> None:
            if error is not None and not pending.is_set:
                pending.error = self._lost_text(error)
                pending.not_sent = True
                pending.set()

        try:
            lone = len(self._pending) == 1 and self._fd is not None
            self._outbox.send(frame, written, at_once=lone)
            sent = time.perf_counter()
            if lone and self._quick:
                await trio.lowlevel.cancel_shielded_checkpoint()  # (the other tasks run first)
                if stream_fd(self._stream) == self._fd and not pending.is_set:  # (not closed)
                    self._poll(pending, sent + ANSWER_POLL)
            if pending.is_set:
                pass
            elif deadline is None:
                await pending.wait()
            else:
                late = trio.current_time() + max(0.0, deadline - time.time()) + LATE_ANSWER
                with trio.move_on_at(late):
                    await pending.wait()
                if not pending.is_set:  # cancelled in the supervisor below, if it wakes up
                    raise ProverError(
                        f"request {request_id}: the supervisor at {self.path} did not answer by"
                        f" the request's deadline nor {LATE_ANSWER:g} s after it (stopped, e.g."
                        " by SIGSTOP, or hung?); not proved in time, cancelled"
                    )
            if lone:
                self._quick = time.perf_counter() - sent <= ANSWER_POLL
        except BaseException:
            if not pending.is_set and self._lost is None:
                # Tell the supervisor to stop working on it; the connection may be gone already.
                self._outbox.send(dext.encode(dext.Cancel(request_id)))
            raise
        finally:
            del self._pending[request_id]
        if pending.not_sent:
            if self._refusal is None:  # it may be on its way: the write broke as it closed
                with trio.move_on_after(REFUSAL_WAIT):
                    await self._ended.wait()
            if self._refusal is not None:  # refused, not unread: not to be sent again
                raise ProverError(self._lost or self._refusal)
            raise _NotSent(pending.error or "")
        if pending.error is not None:
            raise ProverError(pending.error)
        response = pending.response
        assert response is not None
        if response.error is not None:
            if response.kind == control_protocol.USAGE:
                raise ProverUsageError(response.error)
            if response.kind is msgspec.UNSET:  # a supervisor older than kinds
                raise KindUnsaidError(response.error)
            raise ProverError(response.error)
        if response.output is None:
            raise ProverError(
                f"request {request_id}: the supervisor answered with neither an output nor an error"
            )
        return response.output

    async def status(self) -> StatusDocument:
        """The supervisor's status document (`damocles_ext.status.StatusDocument`).

        Raises ProverError if the connection is lost or the supervisor cannot report it.
        """
        from .status import StatusError, parse_document

        check_trio_run("Client.status()", self._token)
        self._check_open()
        request_id = next(self._ids)
        done = trio.Event()
        box: list[control_protocol.StatusReply] = []
        self._status_pending[request_id] = (done, box)

        def written(error: BaseException | None) -> None:
            if error is not None:
                self._status_unsent[request_id] = self._lost_text(error)
                done.set()

        try:
            self._outbox.send(
                control_protocol.encode(control_protocol.StatusRequest(request_id)), written
            )
            await done.wait()
        finally:
            del self._status_pending[request_id]
            unsent = self._status_unsent.pop(request_id, None)
        if unsent is not None:
            raise ProverError(unsent)
        if not box:
            older = " (a supervisor older than the status command closes the connection)"
            raise ProverError(
                f"cannot get the status from {self.path}: {self._lost or 'no reply'}"
                f"{older if self._refusal is None else ''}"
            )
        reply = box[0]
        if reply.error is not None or reply.status is None:
            said = f"the supervisor at {self.path} sent no status: {reply.error}"
            if reply.worker is not None:  # a worker waiting for its manager: its part alone
                raise NotStartedError(said, reply.worker)
            raise ProverError(said)
        try:
            return parse_document(reply.status)
        except StatusError as exc:
            raise ProverError(str(exc)) from None

    @property
    def open(self) -> bool:
        """Neither lost nor refused: a request sent on it may be read."""
        return self._lost is None and self._refusal is None

    def _check_open(self) -> None:
        if self._lost is not None:
            raise ProverError(self._lost)
        if self._refusal is not None:  # the close is on its way: nothing more is read
            raise ProverError(
                f"the supervisor at {self.path} refused an earlier frame of this connection and"
                f" is closing it ({self._refusal}); nothing was sent on it"
            )

    def _lost_text(self, error: BaseException) -> str:
        return f"lost the connection to the supervisor at {self.path}: {error}"

    async def _run(self) -> None:
        """Read the answers and write the requests of this connection, until it is lost."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._outbox.run)
            await self._read_loop()
            nursery.cancel_scope.cancel()

    def _poll(self, pending: _Pending, until: float) -> None:
        """The caller of a lone request reads the answers itself until its own came or `until`
        (perf_counter), acting on each frame as the reader does. The end of the stream is left
        to the reader (it reads it too); a read error is kept for the reader to say (it meets
        the end of the stream next); a frame that breaks the protocol is kept for it too, and
        the connection shut down, so that the reader wakes to its end and decodes nothing more."""
        fd = self._fd
        assert fd is not None
        while not pending.is_set:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                data = None
            except OSError as exc:
                self._poll_error = exc
                return
            if data == b"":
                return
            if data:
                try:
                    messages = self._decoder.receive_data(data)
                except dext.ProtocolError as exc:
                    self._poll_error = exc
                    with contextlib.suppress(OSError):
                        self._stream.socket.shutdown(socket.SHUT_RDWR)
                    return
                for msg in messages:
                    self._dispatch(msg)
            if time.perf_counter() >= until:
                return

    async def _read_loop(self) -> None:
        decoder = self._decoder
        inbox = Inbox(self._stream, _READ_SIZE)
        reason = "the supervisor closed the connection"
        try:
            while True:
                try:
                    data = await inbox.receive()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    reason = f"the connection broke: {exc}"
                    data = b""
                if self._poll_error is not None:  # a polling caller met the end: nothing more
                    break
                for msg in decoder.receive_data(data):
                    self._dispatch(msg)
                if not data:
                    break
        except dext.ProtocolError as exc:
            reason = _broke(exc)
        if isinstance(self._poll_error, dext.ProtocolError):  # met by a polling caller
            reason = _broke(self._poll_error)
        elif self._poll_error is not None:
            reason = f"the connection broke: cannot read the stream: {self._poll_error}"
        if self._refused is not None:
            reason = self._refused
        if self._refusal is not None:
            self._fail_all(
                f"the supervisor at {self.path} refused what this client sent and closed the"
                f" connection: {self._refusal}. What it had not answered on that connection was"
                " not proved, and is not sent again"
            )
            return
        self._fail_all(f"lost the connection to the supervisor at {self.path}: {reason}")

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, control_protocol.ControlResponse) and msg.id == 0:
            # Request ids count from 1: id 0 is the supervisor saying why it closes the connection.
            self._refused = msg.error or "the supervisor closed the connection"
        elif isinstance(msg, control_protocol.Refusal):
            # Its last frame: it fails what was not answered, and must not be taken for id 0.
            self._refusal = msg.error
        elif isinstance(msg, control_protocol.ControlResponse):
            pending = self._pending.get(msg.id)
            if pending is None:
                log.debug("response to request %d nobody waits for (cancelled?)", msg.id)
                return
            pending.response = msg
            pending.set()
        elif isinstance(msg, dext.Progress):
            pending = self._pending.get(msg.id)
            if pending is not None and pending.on_progress is not None:
                try:
                    pending.on_progress(msg)
                except Exception:  # the caller's callback must not take the connection down
                    log.exception("on_progress callback of request %d failed", msg.id)
        elif isinstance(msg, control_protocol.StatusReply):
            waiter = self._status_pending.get(msg.id)
            if waiter is not None:
                waiter[1].append(msg)
                waiter[0].set()
        else:
            log.warning("ignoring an unexpected %s frame from the supervisor", type(msg).__name__)

    def _fail_all(self, reason: str) -> None:
        self._lost = reason
        self._ended.set()
        for done, _box in self._status_pending.values():
            done.set()
        for pending in self._pending.values():
            if not pending.is_set:
                pending.error = reason
                pending.set()


def _broke(exc: dext.ProtocolError) -> str:
    return (
        f"the supervisor broke the protocol: {exc} (is it another version of damocles-ext than"
        f" this client's, {__version__}? Their control messages differ between versions: use"
        " the client of the version `run` runs)"
    )


@asynccontextmanager
async def connect(socket_path: str | os.PathLike[str] | None = None) -> AsyncIterator[Client]:
    """Connect to a running `damocles-ext run` (default socket path if None)."""
    check_trio_run("damocles_ext.client.connect()")
    path = Path(socket_path) if socket_path is not None else default_socket_path()
    stream = await open_stream(path)
    client = Client(stream, path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run)
            try:
                yield client
            finally:
                # A call made after the block: said at once, not waited on for ever.
                client._fail_all(
                    f"the connection to the supervisor at {path} was closed (its connect() block ended)"
                )
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader never raises, so a group holds what the caller's block raised: give the
        # caller back its own exception (a ProverError stays a ProverError).
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


class ReconnectingClient:
    """A connection to a supervisor that is made again after it was lost, for a front end that
    outlives restarts of `damocles-ext run` (`serve --connect`).

        remote = ReconnectingClient(path)
        await remote.connect()                       # NoSupervisorError if nobody listens
        async with trio.open_nursery() as nursery:
            nursery.start_soon(remote.run)           # writes the requests, reads the answers
            output = await remote.submit(task)

    When the connection is lost (the supervisor stopped or restarted), the requests in flight on
    it fail with a ProverError that says so; each later `submit` first tries once to connect
    again and fails with the unreachable reason if that does not work. Nothing is retried: a
    request that may have reached a prover is never sent twice.
    """

    #: How long connecting may take (a live supervisor with a full backlog).
    CONNECT_TIMEOUT = 5.0

    def __init__(
        self, socket_path: str | os.PathLike[str] | None = None, *, hint: str = PROVE_HINT
    ) -> None:
        self.path = Path(socket_path) if socket_path is not None else default_socket_path()
        self._hint = hint
        self._client: Client | None = None
        self._connected = trio.Event()
        self._lock = trio.Lock()
        self.connections = 0  # made so far, the first one included
        self._token: trio.lowlevel.TrioToken | None = None  # the trio run of the first connect
        self._runs = 0  # run() tasks going: without one, nothing is written nor read
        self._run_began = trio.Event()

    async def connect(self) -> None:
        """Connect now; NoSupervisorError says why nothing could be reached."""
        check_trio_run("ReconnectingClient.connect()", self._token)
        try:
            with trio.fail_after(self.CONNECT_TIMEOUT):
                stream = await open_stream(self.path, self._hint)
        except trio.TooSlowError:
            raise NoSupervisorError(
                f"the supervisor at {self.path} did not accept a connection within"
                f" {self.CONNECT_TIMEOUT:g} s (overloaded or hung?); {self._hint}"
            ) from None
        self._client = Client(stream, self.path)
        self._token = self._client._token
        self.connections += 1
        if self.connections > 1:
            log.info("connected to the supervisor at %s again", self.path)
        self._connected.set()

    async def run(self) -> None:
        """Read the answers of the current connection, and of each new one; until cancelled."""
        self._runs += 1
        self._run_began.set()
        try:
            await self._read_connections()
        finally:
            self._runs -= 1
            if not self._runs:  # a run() started later is waited for again
                self._run_began = trio.Event()

    async def _read_connections(self) -> None:
        while True:
            client = self._client
            if client is None or client._lost is not None:
                self._connected = trio.Event()
                await self._connected.wait()
                continue
            try:
                await client._run()
            finally:
                with trio.CancelScope(shield=True):
                    await client._stream.aclose()
            # A supervisor closing an idle connection says so: routine, not a warning.
            level = logging.INFO if client._refused is not None else logging.WARNING
            log.log(level, "%s; the next request will try to connect again", client._lost)
            if self._client is client:
                self._client = None

    async def submit(
        self,
        task: Task,
        *,
        deadline: float | None = None,
        priority: int = 0,
        on_progress: ProgressCallback | None = None,
    ) -> Output:
        """`Client.submit` on the current connection, connecting again first if it was lost.

        A request the supervisor provably never read (the connection was closed under it, idle
        or to make room, and the supervisor said so; or it could not even be written) is sent
        once more on a new connection.
        """
        check_trio_run("ReconnectingClient.submit()", self._token)
        for attempt in (1, 2):
            client = await self._current()
            try:
                return await self._submit_on(client, task, deadline, priority, on_progress)
            except (_NotSent, _Unread) as exc:
                if attempt == 2:
                    raise
                if client._lost is None:  # the reader has not seen the close yet
                    client._lost = str(exc)
                log.info("the supervisor closed the connection before reading a request (%s);"
                         " sending it again on a new connection", exc)  # fmt: skip
        raise AssertionError("unreachable")

    async def _submit_on(self, client, task, deadline, priority, on_progress) -> Output:
        try:
            return await client.submit(
                task, deadline=deadline, priority=priority, on_progress=on_progress
            )
        except _NotSent:
            raise
        except ProverError as exc:
            if client._refusal is not None:  # refused: said as it is, never sent again
                raise
            if client._lost is not None and str(exc) == client._lost:
                reason = client._lost.removeprefix(
                    f"lost the connection to the supervisor at {self.path}: "
                )
                # A supervisor that says why it closed has read nothing more: safe to resend.
                error: type[ProverError]
                if client._refused is not None:
                    error, how, guess = _Unread, "closed the connection", ""
                else:
                    error, how, guess = ProverError, "went away", ": stopped or restarted?"
                raise error(
                    f"the supervisor at {self.path} {how} before it answered ({reason}{guess});"
                    " this request was not proved, the next one will try to connect again"
                ) from None
            raise

    async def status(self) -> StatusDocument:
        """`Client.status` on the current connection, connecting again first if it was lost."""
        return await (await self._current()).status()

    async def aclose(self) -> None:
        """Close the connection: the supervisor cancels what is still open on it."""
        client, self._client = self._client, None
        if client is not None:
            await client._stream.aclose()

    async def _current(self) -> Client:
        if not self._runs:
            # Without run(), a request waited for ever, never even written. One started just
            # before (nursery.start_soon) may not have begun yet.
            with trio.move_on_after(self.CONNECT_TIMEOUT):
                await self._run_began.wait()
            if not self._runs:
                raise UsageError(
                    f"ReconnectingClient({os.fspath(self.path)!r}): no run() is going, which"
                    " writes the requests and reads the answers: start it beside the requests,"
                    " nursery.start_soon(remote.run)"
                )
        client = self._client
        if client is not None and client.open:
            return client
        # One attempt per request; a request that waited here for another's attempt takes the
        # connection that one made, or tries again itself.
        async with self._lock:
            client = self._client
            if client is not None and client.open:
                return client
            try:
                await self.connect()
            except NoSupervisorError as exc:
                raise ProverError(f"cannot reach the supervisor: {exc}") from None
            assert self._client is not None
            return self._client


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def submit_sync(
    task: Task,
    *,
    socket_path: str | os.PathLike[str] | None = None,
    deadline: float | None = None,
    priority: int = 0,
    on_progress: ProgressCallback | None = None,
) -> Output:
    """Blocking one-shot `submit` for scripts: connect, prove `task`, disconnect. Not from
    within a trio run (it would block it): there, `async with connect() as client`."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        pass
    else:
        raise UsageError(
            "submit_sync() was called from within a trio run, which it would block until the"
            " proof came: in a trio program use `async with damocles_ext.client.connect() as"
            " client: output = await client.submit(task)`"
        )

    async def one() -> Output:
        async with connect(socket_path) as client:
            return await client.submit(
                task, deadline=deadline, priority=priority, on_progress=on_progress
            )

    return trio.run(one)
