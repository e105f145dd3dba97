"""A JSON-RPC 2.0 client for the worker-prover RPC, as go-jsonrpc's HTTP client speaks it: one POST
to /rpc/v0 per call, positional params, one kept-alive connection.

It talks to our coordinator and to damocles-manager `--worker-prover` alike (the operator's
`wdpost --manager`, and the worker). What it does that a plain HTTP client would not:

- an HTTP 500 carries a JSON-RPC error in its body (go-jsonrpc's unknown method, wrong params):
  the body is read and raised as `RpcCallError` with its code and message, whatever the status;
- a connection the server closed while idle (its keep-alive timeout, a restart) is noticed before
  the next call and opened again; a call is never sent twice, because the server may have done it
  (an allocation) before the connection broke: that is `RpcConnectionError`, for the caller to
  decide;
- every failure to reach the server or to get an answer is an `RpcConnectionError` that names the
  URL and the method, never an OSError with a traceback; a call that gets no answer within its
  timeout is an `RpcTimeout` (and its connection is dropped: its state is unknown).

Calls made from several tasks at once take turns on the one connection.
"""

from __future__ import annotations

import errno
import itertools
import math
from collections.abc import Iterable
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, Self

import h11
import msgspec
import trio

from ..errors import DextError
from ..logs import one_line
from ..threads import no_thread
from .endpoint import Endpoint, parse_endpoint
from .silence import SLOW_CALL

DEFAULT_TIMEOUT = 30.0
#: An answer larger than this is refused: `Venus.WdPoStAllJobs` of a busy store is the largest.
DEFAULT_MAX_ANSWER = 64 * 1024 * 1024
_READ_SIZE = 64 * 1024
_USER_AGENT = "damocles-ext"


class RpcClientError(DextError):
    """A call that did not give a result; `url` and `method` say which."""

    def __init__(self, message: str, *, url: str, method: str) -> None:
        super().__init__(message)
        self.url = url
        self.method = method


class RpcConnectionError(RpcClientError):
    """The server could not be reached, or the connection broke before the answer. `sent`:
    the request may have reached the server (which may have done the call); False when no
    connection was made."""

    def __init__(self, message: str, *, url: str, method: str, sent: bool = True) -> None:
        super().__init__(message, url=url, method=method)
        self.sent = sent


class RpcTimeout(RpcConnectionError):
    """No whole answer within the call's timeout."""


class RpcProtocolError(RpcClientError):
    """The server answered, but not with a JSON-RPC answer to this call (not an RPC endpoint);
    `status`: the answer's HTTP status, when it had one."""

    def __init__(self, message: str, *, url: str, method: str, status: int | None = None) -> None:
        super().__init__(message, url=url, method=method)
        self.status = status


def manager_down(exc: RpcClientError) -> bool:
    """Whether `exc` says the server is down, not slow or stuck: no connection made (refused,
    unreachable, DNS, connect timeout), or a proxy in front answering 502 or 503 for it (down or
    restarting behind it; a 504 is a server too slow, as a timeout is)."""
    if isinstance(exc, RpcConnectionError):
        return not exc.sent
    return isinstance(exc, RpcProtocolError) and exc.status in (502, 503)


class RpcCallError(RpcClientError):
    """The server answered the call with a JSON-RPC error: `code` and `message` are its own."""

    def __init__(self, code: int, message: str, *, url: str, method: str, status: int) -> None:
        # Said as the server wrote it, its controls escaped: no escape sequence or line break of
        # a server's (or a proxy's) reaches the operator's terminal or log raw.
        said = one_line(message)
        super().__init__(f"{method} at {url}: {said} (code {code})", url=url, method=method)
        self.code = code
        self.message = message
        self.status = status


class _Error(msgspec.Struct):
    code: int
    message: str = ""


class _Answer(msgspec.Struct):
    jsonrpc: str = ""
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: _Error | None = None
    id: int | str | None = None


_answer_decoder = msgspec.json.Decoder(_Answer)
_encoder = msgspec.json.Encoder()


def _why(exc: OSError) -> str:
    # trio's "all attempts to connect failed" hides each address's own error in its cause.
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        reasons = {_why(e) for e in cause.exceptions if isinstance(e, OSError)}
        if reasons:
            return "; ".join(sorted(reasons))
    return exc.strerror or str(exc) or type(exc).__name__


#: What a worker-prover client's address should be (RpcClient's `serves`).
WORKER_PROVER_RPC = (
    "a worker-prover RPC (damocles-ext coordinator, or damocles-manager --worker-prover)"
)


#: What to check when a worker-prover RPC takes a call and does not answer it in time (RpcClient's
#: `stuck_hint`): the server itself, or what it waits on (a coordinator's job store that stalls).
WORKER_PROVER_STUCK = (
    "check that the server is not overloaded or stuck; a damocles-ext coordinator may be waiting"
    f" on its job store (its log warns of a store call that has waited {SLOW_CALL:g} s): then"
    " check the database"
)
#: The same for any other RPC server.
SERVER_STUCK = "check that the server is not overloaded or stuck"


#: How to give an RpcClient's token (its `token_hint`), for the error of an HTTP 401 or 403.
TOKEN_HINT = "give the one it takes: an 'Authorization: Bearer TOKEN' header, or --token-file"


class RpcClient:
    """`await client.call("Venus.WdPoStAllJobs")`; use it as `async with RpcClient(url) as c`."""

    def __init__(
        self,
        address: str | Endpoint,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_answer: int = DEFAULT_MAX_ANSWER,
        headers: list[tuple[str, str]] | None = None,
        serves: str = WORKER_PROVER_RPC,
        token_hint: str = TOKEN_HINT,
        stuck_hint: str = WORKER_PROVER_STUCK,
    ) -> None:
        """`address` in any form `endpoint.parse_endpoint` takes (ValueError when it is none);
        `token` is sent as `Authorization: Bearer <token>`; `headers` are sent as given (as a
        damocles-worker's `rpc_client.headers`); `serves` names what should answer there, for
        the error when something else does; `token_hint` how to give the token, for the error
        when the answer is HTTP 401 or 403; `stuck_hint` what to check when a call sent gets no
        answer in time."""
        self.serves = serves
        self.token_hint = token_hint
        self.stuck_hint = stuck_hint
        self.endpoint = address if isinstance(address, Endpoint) else parse_endpoint(address)
        self.url = self.endpoint.url
        self.timeout = timeout
        self.max_answer = max_answer
        self._headers = [
            ("Host", self.endpoint.host_header),
            ("User-Agent", _USER_AGENT),
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            *(headers or []),
        ]
        if token is not None:
            self._headers.append(("Authorization", f"Bearer {token}"))
        self._ids = itertools.count(1)
        self._lock = trio.Lock()
        self._stream: trio.SocketStream | None = None
        self._h11: h11.Connection | None = None
        self._connected = False  # the call under the lock has a connection to send on
        #: Connections opened so far (a test sees the reconnects).
        self.connections_opened = 0
        #: The headers of the last answer (its clock is read only when asked: `answer_clock`).
        self._last_headers: Iterable[tuple[bytes, bytes]] = ()

    @property
    def server_date(self) -> float | None:
        """The Date of the last answer (unix time, to the second; None: none, or unreadable):
        what `answer_clock` falls back to when the answer has no CLOCK_HEADER."""
        return _http_date(self._last_headers)

    @property
    def answer_clock(self) -> AnswerClock | None:
        """The server's clock as the last answer gave it: its CLOCK_HEADER (a damocles-ext
        coordinator's, to the millisecond), else its Date (damocles-manager's, and any proxy's
        own: to the second, read as the middle of it); None: neither, or unreadable."""
        return answer_clock(self._last_headers)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (the next call opens a new one)."""
        stream, self._stream, self._h11 = self._stream, None, None
        if stream is not None:
            await trio.aclose_forcefully(stream)

    async def call(
        self,
        method: str,
        *params: Any,
        result_type: Any = Any,
        timeout: float | None = None,  # noqa: ASYNC109 - a timeout also drops the connection
    ) -> Any:
        """The result of `method(*params)`, converted to `result_type` (msgspec); raises
        RpcCallError for the server's JSON-RPC error, RpcConnectionError (RpcTimeout) when
        there is no answer, RpcProtocolError when the answer is not JSON-RPC."""
        request_id = next(self._ids)
        body = _encoder.encode(
            {"jsonrpc": "2.0", "method": method, "params": list(params), "id": request_id}
        )
        limit = self.timeout if timeout is None else timeout
        async with self._lock:
            done = self._connected = False
            try:
                with trio.move_on_after(limit):
                    status, answer = await self._exchange(method, body)
                    done = True
            finally:
                connected = self._connected
                if not done:
                    # Cancelled or failed half-way: what the connection holds is unknown.
                    await self.aclose()
        if not done:
            raise RpcTimeout(
                f"no answer from {self.url} to {method} within {limit:g} s; {self.stuck_hint}"
                if connected
                else f"no connection to {self.url} (for {method}) within {limit:g} s; check that"
                f" {self.serves} runs there, the address, and that no firewall drops the packets",
                url=self.url,
                method=method,
                sent=connected,  # (not when the time ran out connecting)
            )
        return self._result(method, request_id, status, answer, result_type)

    def _result(
        self, method: str, request_id: int, status: int, body: bytes, result_type: Any
    ) -> Any:
        try:
            answer = _answer_decoder.decode(body)
        except (msgspec.DecodeError, RecursionError):  # msgspec nests up to the recursion limit
            raise self._not_rpc(method, status, body) from None
        if answer.error is not None:
            raise RpcCallError(
                answer.error.code, answer.error.message, url=self.url, method=method, status=status
            )
        if answer.id is None or not 200 <= status < 300:
            # JSON, but no JSON-RPC answer: a gateway's `{"message": "Unauthorized"}`, `{}`.
            raise self._not_rpc(method, status, body)
        if answer.id != request_id:
            raise RpcProtocolError(
                f"{self.url} answered {method} with the id {answer.id!r}, not {request_id}",
                url=self.url,
                method=method,
            )
        try:
            return msgspec.json.decode(answer.result, type=result_type)
        # DecodeError too: the envelope's decode leaves the result raw, its UTF-8 unchecked.
        except (msgspec.DecodeError, RecursionError) as exc:
            raise RpcProtocolError(
                f"{self.url} answered {method} with an unexpected result: {exc}",
                url=self.url,
                method=method,
            ) from None

    def _not_rpc(self, method: str, status: int, body: bytes) -> RpcProtocolError:
        text = repr(body[:200].decode("utf-8", "replace").strip())  # escaped: \n, \x1b, ...
        if len(body) > 200:
            text += f" (the first 200 of {len(body)} bytes)"
        moved = _header(self._last_headers, b"location") if 300 <= status < 400 else None
        if status in (401, 403):
            # The server's own refusal, or a reverse proxy's or a firewall's deny page in front
            # of it (which says nothing of the token): the body above says which.
            sent = any(name.lower() == "authorization" for name, _ in self._headers)
            check = (
                "if the server itself refused it, it does not take the token sent"
                if sent
                else "if the server itself refused it, it wants a token and none was sent"
            )
            check += (
                f" ({self.token_hint}); if something in front of it did (a reverse proxy, a"
                " firewall rule), its rules must let this machine through"
            )
        elif moved is not None:  # not followed: a POST is not sent on to another address
            check = f"it redirects to {moved[:200]!r}: give the address of {self.serves} there"
        elif status in (502, 503, 504):  # a proxy's page while the server behind it is away
            check = (
                "a proxy in front answered for the server behind it, which is down, restarting"
                f" or too slow; if it lasts, check that server and that the address is {self.serves}"
            )
        else:
            check = f"check that the address is {self.serves}"
        return RpcProtocolError(
            f"{self.url} answered {method} with HTTP {status} and a body that is not a "
            f"JSON-RPC answer ({text}); {check}",
            url=self.url,
            method=method,
            status=status,
        )

    async def _connect(self, method: str) -> tuple[trio.SocketStream, h11.Connection]:
        if self._stream is not None and self._h11 is not None:
            if self._h11.our_state is h11.IDLE and not self._stream.socket.is_readable():
                return self._stream, self._h11
            # Readable while idle: the server closed it (or broke the protocol); start over.
            await self.aclose()
        try:
            stream = await trio.open_tcp_stream(self.endpoint.host, self.endpoint.port)
        except OSError as exc:
            why = _why(exc)
        except RuntimeError as exc:  # a host name is looked up on a thread: none could start
            if (failed := no_thread(exc)) is None:
                raise
            why = f"cannot look {self.endpoint.host} up: {failed}"
        else:
            self.connections_opened += 1
            self._stream, self._h11 = stream, h11.Connection(h11.CLIENT)
            return stream, self._h11
        raise RpcConnectionError(
            f"cannot connect to {self.url} (for {method}): {why}; check that"
            f" {self.serves} runs there, and the address",
            url=self.url,
            method=method,
            sent=False,
        ) from None

    def _lost(self, method: str, what: str) -> RpcConnectionError:
        return RpcConnectionError(
            f"the connection to {self.url} broke {what} ({method}); the server stopped or "
            "restarted: try again (it may have done the call)",
            url=self.url,
            method=method,
        )

    async def _exchange(self, method: str, body: bytes) -> tuple[int, bytes]:
        stream, conn = await self._connect(method)
        self._connected = True
        headers = [*self._headers, ("Content-Length", str(len(body)))]
        data = conn.send(h11.Request(method="POST", target=self.endpoint.path, headers=headers))
        data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # It may have refused the request before reading it all: its answer is still there.
            pass
        status = 0
        chunks: list[bytes] = []
        size = 0
        closed = False  # the server closed its side
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if closed:  # h11's word for a close before the answer ends
                    when = "before its answer" if status == 0 else "mid-answer"
                    raise self._lost(method, when) from None
                raise RpcProtocolError(
                    f"{self.url} answered {method} with something that is not HTTP/1.1: {exc}",
                    url=self.url,
                    method=method,
                ) from None
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                closed = not data
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                self._last_headers = event.headers
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_answer:
                    raise RpcProtocolError(
                        f"the answer of {self.url} to {method} is larger than "
                        f"{self.max_answer} bytes, more than such an answer takes: it was not "
                        f"read further; check that the address is {self.serves}",
                        url=self.url,
                        method=method,
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise self._lost(method, "before its answer" if status == 0 else "mid-answer")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:  # the server said Connection: close, or we did not send it all
            await self.aclose()
        return status, b"".join(chunks)


def _header(headers: Iterable[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    """The value of a response's header (h11 gives names in lower case), or None."""
    for name, value in headers:
        if name == wanted:
            return value.decode("latin-1")
    return None


#: The header a damocles-ext coordinator gives its clock in (unix time, to the millisecond),
#: beside the Date: a reverse proxy (nginx) replaces the Date with its own machine's clock by
#: default, but passes a header of the server's own on; and a Date is to the second only.
CLOCK_HEADER = "X-Dext-Clock"


class AnswerClock(NamedTuple):
    """The server's clock when it answered (unix time), and whether it is `precise` (its
    CLOCK_HEADER) or a Date's (to the second: within half a second of `at`)."""

    at: float
    precise: bool


def answer_clock(headers: Iterable[tuple[bytes, bytes]]) -> AnswerClock | None:
    """The server's clock in a response's headers: CLOCK_HEADER if readable, else the Date."""
    given = _header(headers, CLOCK_HEADER.lower().encode())
    if given is not None:
        try:
            at = float(given)
        except ValueError:
            at = math.nan
        if math.isfinite(at) and at > 0:
            return AnswerClock(at, precise=True)
    date = _http_date(headers)
    return None if date is None else AnswerClock(date + 0.5, precise=False)


def _http_date(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """The unix time of a response's Date header (to the second), if it has a readable one."""
    date = _header(headers, b"date")
    if date is None:
        return None
    try:
        return parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


async def local_address_towards(endpoint: Endpoint) -> str:
    """The address of the local interface that reaches `endpoint` (damocles-worker's default
    worker name): a UDP socket is connected to it, which picks a route and sends nothing."""
    try:
        infos = await trio.socket.getaddrinfo(
            endpoint.host, endpoint.port, type=trio.socket.SOCK_DGRAM
        )
    except RuntimeError as exc:  # the lookup's thread could not be started
        if (failed := no_thread(exc)) is None:
            raise
        raise OSError(errno.EAGAIN, f"cannot look {endpoint.host} up: {failed}") from None
    if not infos:
        raise OSError(f"{endpoint.host} has no address")
    family, kind, proto, _, address = infos[0]
    with trio.socket.socket(family, kind, proto) as sock:
        await sock.connect(address)
        return str(sock.getsockname()[0])
