"""A JSON-RPC 2.0 server over HTTP POST that answers as go-jsonrpc (the fork damocles uses) does,
for tests that need a peer built independently of our own server code: a damocles-manager
look-alike (`--worker-prover`, or a proxy's source node) is a dict of method handlers served by
this class.

Forms, as go-jsonrpc v0.1.9 (handler.go, server.go) writes them: positional params; an unknown
method is HTTP 500 with JSON-RPC error -32601 (`(error code -32601) method 'X' not found`); a
body or a param it cannot read is HTTP 500 with -32700, a wrong param count -32602; an error a
method returns (a `MethodError`) is HTTP 200 with code 1 and its text; a nil result is
`"result": null`. The standard library's threading HTTP server runs it, in
a thread of the test's process, HTTP/1.1 with keep-alive.

`stop()` closes the port and cuts the connections open on it, and `start()` opens the same port
again (a source node that goes down and comes back); `hold()` makes every call wait until `release()` (a source that hangs), and
`calls` records (method, params) in order. `gateway` set to an HTTP status (502, 503) answers
every call with it and an HTML page, as a reverse proxy in front (nginx) does while the server
behind it is down or restarting; None (the default) lets the calls through."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Callable
from typing import Any, Self

Handler = Callable[..., Any]


class MethodError(Exception):
    """An error the method returns: go-jsonrpc answers it with HTTP 200 and code 1."""


class GoJsonRpcServer:
    def __init__(
        self,
        methods: dict[str, Handler],
        *,
        host: str = "127.0.0.1",
        path: str = "/rpc/v0",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.methods = methods
        self.host = host
        self.path = path
        self.required_headers = dict(headers or {})
        self.calls: list[tuple[str, list[Any]]] = []
        self.port = 0
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._server: http.server.ThreadingHTTPServer | None = None
        # Kept-alive connections, cut by stop(): a stopped node answers nothing more.
        self._connections: set[socket.socket] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.gateway: int | None = None

    # --- life -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    @property
    def multiaddr(self) -> str:
        return f"/ip4/{self.host}/tcp/{self.port}"

    def start(self) -> Self:
        server_self = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # stdlib's name
                pass

            def setup(self) -> None:
                super().setup()
                # Go's net/http sets TCP_NODELAY on every connection: without it the head and
                # the body, written apart, wait 40 ms for a delayed ACK on each answer.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with server_self._lock:
                    server_self._connections.add(self.connection)

            def finish(self) -> None:
                with server_self._lock:
                    server_self._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass  # cut by stop()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if (status := server_self.gateway) is not None:
                    server_self._record_passing(body)
                    page = f"<html><head><title>{status}</title></head></html>\r\n".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                for name, value in server_self.required_headers.items():
                    if self.headers.get(name) != value:
                        self._send(401, {"error": "unauthorized"})
                        return
                if self.path != server_self.path:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, answer = server_self._answer(body)
                if server_self._stopping:  # stopped while the call waited: no answer
                    self.close_connection = True
                    return
                self._send(status, answer)

            def _send(self, status: int, answer: dict[str, Any]) -> None:
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the caller gave up waiting (a held call)

        self._stopping = False
        server = http.server.ThreadingHTTPServer((self.host, self.port), _Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        # stop()'s shutdown() waits for serve_forever to look at its flag, which it does once a
        # poll_interval (0.5 s by default): half a second of every test's teardown.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port and cut every connection (calls waiting in `hold()` get no answer)."""
        self._stopping = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
        self.release()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def hold(self) -> None:
        """From now on every call waits, unanswered, until `release()` or `stop()`."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def methods_called(self) -> list[str]:
        with self._lock:
            return [m for m, _ in self.calls]

    # --- one call ---------------------------------------------------------------------------

    def _record_passing(self, body: bytes) -> None:
        """A call the proxy answered (`gateway`): recorded as tried, not served."""
        try:
            method = json.loads(body).get("method")
        except (ValueError, AttributeError):
            method = None
        with self._lock:
            self.calls.append((f"{method} (gateway {self.gateway})", []))
        self.recorded()

    def recorded(self) -> None:
        """Called after a call is recorded (a subclass wakes its waiters)."""

    def _answer(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            request = json.loads(body)
        except ValueError as e:
            return 500, _error(None, -32700, f"(error code -32700) unmarshaling request: {e}")
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            return 500, _error(None, -32700, "(error code -32700) unmarshaling request")
        rid = request.get("id")
        method = request["method"]
        params = request.get("params") or []
        with self._lock:
            self.calls.append((method, params))
        self._open.wait()
        handler = self.methods.get(method)
        if handler is None:
            return 500, _error(rid, -32601, f"(error code -32601) method '{method}' not found")
        if not isinstance(params, list):
            return 500, _error(rid, -32700, "(error code -32700) unmarshaling param array")
        try:
            result = handler(*params)
        except MethodError as e:
            return 200, _error(rid, 1, str(e))
        except TypeError as e:
            return 500, _error(rid, -32602, f"(error code -32602) wrong param count: {e}")
        return 200, {"jsonrpc": "2.0", "id": rid, "result": result}


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}
