"""The HTTP/1.1 connection the project's small servers share (the coordinator's RPC, the metrics
endpoint): h11 on the trio loop, requests one after another on a kept-alive connection, each read
whole within the idle timeout, a bounded head, and one answer each.

A server subclasses `HttpConnection` with what differs: what it keeps of a body
(`on_head`/`on_data`, which may raise `Refuse` to answer at once and close) and how it answers
(`answer`). `serve_http_connection` runs one connection under the server's `ConnectionSlots`
(503 when they are full; a bug of ours costs that connection, never the server).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from email.utils import formatdate

import h11
import trio

from ..jobs.client import CLOCK_HEADER
from .listeners import ConnectionSlots

TEXT = "text/plain; charset=utf-8"


class Refuse(Exception):
    """Raised while a request is read: send this answer, then close the connection."""

    def __init__(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = TEXT,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type
        self.extra = extra


def head_size(request: h11.Request) -> int:
    """The bytes of `request`'s head as it came (h11 drops only spaces around header values)."""
    line = len(request.method) + len(request.target) + len(b" HTTP/1.1\r\n") + 1
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


class HttpConnection:
    """One client's keep-alive connection: whole requests, one after another."""

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        idle_timeout: float,
        max_head: int,
        log: logging.Logger,
        what: str,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self._stream = stream
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        # h11 holds a head to its limit only while it is incomplete: a head that arrives whole
        # in a read, up to twice as long, passes it; `_read_request` measures what it parsed.
        self._max_head = max_head
        self._read_size = max_head
        self._idle_timeout = idle_timeout
        self._log = log
        self._what = what
        self._stopping = stopping
        self.last_active = trio.current_time()
        self.closed = trio.Event()
        self._reading = True  # waiting for a request (not building or sending an answer)
        # An answer built and waiting for the client to read it (`send`); evict() cancels it.
        self._send_scope: trio.CancelScope | None = None
        self._answering_head = False  # the request being answered is a HEAD: no body goes back
        self._wait_scope = trio.CancelScope()
        self._evicted = False  # closed by the server (room for another, a stop): no 408
        #: The clock of the answers' Date and CLOCK_HEADER (a coordinator's: its store's, which
        #: workers compare theirs with); None: this machine's, in the Date only.
        self.date_clock: Callable[[], float] | None = None

    @property
    def idle(self) -> bool:
        """Waiting for a request, or for the client to read an answer: a client that sends
        requests and never reads their answers holds its connection as one that sends nothing
        does, and makes room for a new one as that one does (but for a stopping server, which
        lets every answer being sent go out)."""
        return self._reading or (self._send_scope is not None and not self._stopping())

    # --- what a server says -----------------------------------------------------------------

    def on_head(self, request: h11.Request) -> None:
        """A request's head has come (before its body); raise `Refuse` to refuse it."""

    def on_data(self, request: h11.Request, data: bytes, size: int) -> bool:
        """A piece of the body (`size` read so far, this piece included): whether to keep it;
        raise `Refuse` to stop reading."""
        return True

    async def answer(self, request: h11.Request, body: bytes) -> None:
        raise NotImplementedError

    # --- the loop ---------------------------------------------------------------------------

    def evict(self, reason: str) -> None:
        self._log.debug("closing a %s connection: %s", self._what, reason)
        self._evicted = True
        self._wait_scope.cancel()
        if self._send_scope is not None:
            self._send_scope.cancel()

    async def run(self) -> None:
        while True:
            self._reading = True
            if self._wait_scope.cancel_called or self._stopping():
                return
            self._wait_scope = trio.CancelScope(deadline=trio.current_time() + self._idle_timeout)
            with self._wait_scope:
                try:
                    got = await self._read_request()
                except h11.RemoteProtocolError as exc:
                    self._log.debug("%s client sent a bad request: %s", self._what, exc)
                    refusal = Refuse(exc.error_status_hint, f"bad request: {exc}\n".encode())
                    with trio.move_on_after(1):
                        await self.refuse(refusal)
                    return
                except Refuse as refusal:
                    with trio.move_on_after(1):
                        await self.refuse(refusal)
                    return
            if self._wait_scope.cancelled_caught and self._body_cut_off():
                with trio.move_on_after(1):
                    await self.refuse(self._timed_out())
                return
            if self._wait_scope.cancelled_caught or got is None:
                return
            request, body = got
            self._reading = False
            with trio.move_on_after(self._idle_timeout) as sending:
                await self.answer(request, body)
            if sending.cancelled_caught or self._h11.our_state is not h11.DONE:
                return
            if self._stopping():
                return  # answered; the client opens a new connection (to another server)
            try:
                self._h11.start_next_cycle()
            except h11.LocalProtocolError:  # the client asked to close
                return

    def _body_cut_off(self) -> bool:
        """The idle timeout came after a request's head, before the end of its body (its
        client stopped halfway): it is told so, where a connection idle between requests, or
        with half a head (not HTTP, likely), or evicted, is closed without a word."""
        return not self._evicted and self._h11.their_state is h11.SEND_BODY

    def _timed_out(self) -> Refuse:
        return Refuse(
            408,
            f"the request body did not come whole within {self._idle_timeout:g} s (of connecting,"
            " or of the last answer on this connection); send each request whole, at once\n".encode(),
        )

    async def _read_request(self) -> tuple[h11.Request, bytes] | None:
        """The next request and its kept body, or None at EOF."""
        request: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self._stream.receive_some(self._read_size)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                self._h11.receive_data(data)
                if data:
                    self.last_active = trio.current_time()
            elif isinstance(event, h11.Request):
                # (Not `size`: that counts the body's bytes, from 0.)
                if (head := head_size(event)) > self._max_head:
                    raise h11.RemoteProtocolError(
                        f"the request head is {head} bytes, over the {self._max_head} this"
                        " server reads",
                        error_status_hint=431,
                    )
                request = event
                self._answering_head = event.method == b"HEAD"
                self.on_head(event)
            elif isinstance(event, h11.Data):
                assert request is not None
                size += len(event.data)
                if self.on_data(request, event.data, size):
                    chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, b"".join(chunks)
            else:  # ConnectionClosed, or PAUSED (the previous cycle was not finished)
                return None

    # --- answers ----------------------------------------------------------------------------

    async def refuse(self, refusal: Refuse) -> None:
        await self.send(refusal.status, refusal.body, content_type=refusal.content_type,
                        close=True, extra=refusal.extra)  # fmt: skip

    async def send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = TEXT,
        close: bool = False,
        head: bool = False,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        """One whole answer (`head`: without its body, as to a HEAD request; to one, every
        answer goes without it: h11 refuses to send a body there)."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        # As HTTP servers do (workers read it); a coordinator's clock, to the millisecond, in
        # a header of its own too: a proxy replaces the Date with its own, and passes it on.
        date = None if self.date_clock is None else self.date_clock()
        headers.append(("Date", formatdate(date, usegmt=True)))
        if date is not None:
            headers.append((CLOCK_HEADER, f"{date:.3f}"))
        if close:
            headers.append(("Connection", "close"))
        headers += extra or []
        h = self._h11
        try:
            data = h.send(h11.Response(status_code=status, headers=headers))
            if not (head or self._answering_head):
                data += h.send(h11.Data(data=body))
            data += h.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        self._send_scope = trio.CancelScope()
        try:
            with self._send_scope:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self._send_scope = None
        self.last_active = trio.current_time()


async def serve_http_connection(
    slots: ConnectionSlots, conn: HttpConnection, stream: trio.SocketStream, *, busy: str
) -> None:
    """Run `conn` in a slot, or answer 503 `busy` when none is free; always close `stream`."""
    if not slots.add(conn):
        with trio.move_on_after(1):
            await conn.send(503, busy.encode(), close=True)
        await trio.aclose_forcefully(stream)
        return
    log = conn._log
    try:
        await conn.run()
    except Exception:  # a bug of ours must cost one connection, not the server
        log.exception("%s connection: internal error", conn._what)
    finally:
        slots.discard(conn)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        conn.closed.set()
