"""A coordinator that misbehaves on purpose, for the tests of `damocles-ext worker` against one:
an HTTP/1.1 JSON-RPC server on trio (in the test's own run, beside the worker), whose answer to
each call is what a script says, right or wrong.

`HostileCoordinator(script)` takes a dict of method -> handler; a handler is called with the call's
params and its number among the calls of that method (1 for the first), and returns the answer:
- any JSON value: `{"result": value}` with HTTP 200 (None is `"result": null`);
- `Error(code, message, status=200)`: a JSON-RPC error, with that HTTP status;
- `Page(status, body)`: an answer that is no JSON-RPC answer (a proxy's HTML 502, a 401 page);
- `CUT`: the head and half of an answer sent, then the connection closed (a crash mid-answer);
- `SILENT`: no answer at all, the connection held open (a stuck server);
- `NO_RESULT`: a JSON-RPC answer with neither `result` nor `error`.
A method without a handler is answered as our coordinator answers an idle worker: no job, no stop,
a finish taken, a ping taken, every store known.

`calls` records (method, params) in order, `times` when each came; `await wait_for(predicate)`
waits until a call makes `predicate(self)` hold; `finishes(job_id)` are the finish calls of a
job (either API); `await down()` stops it (connections refused) and `await up()` starts it again
on the same port.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
import trio


@dataclass(frozen=True)
class Error:
    code: int
    message: str
    status: int = 200


@dataclass(frozen=True)
class Page:
    status: int
    body: bytes
    content_type: str = "text/html"


CUT = object()
SILENT = object()
NO_RESULT = object()

Handler = Callable[[list[Any], int], Any]

DEFAULTS: dict[str, Handler] = {
    "Dext.AllocateJobs": lambda params, n: [],
    "Dext.HeartbeatJobs": lambda params, n: [],
    "Dext.FinishJob": lambda params, n: None,
    "Venus.WdPoStAllocateJobs": lambda params, n: [],
    "Venus.WdPoStHeartbeatJobs": lambda params, n: None,
    "Venus.WdPoStFinishJob": lambda params, n: None,
    "Venus.WorkerPing": lambda params, n: None,
    "Venus.StoreBasicInfo": lambda params, n: {"Name": params[0]},
}


class HostileCoordinator:
    def __init__(self, script: dict[str, Handler] | None = None) -> None:
        self.script = {**DEFAULTS, **(script or {})}
        self.calls: list[tuple[str, list[Any]]] = []
        self.times: list[float] = []  # trio.current_time() of each call
        self._changed = trio.Event()
        self._listener: trio.SocketListener | None = None
        self.port = 0
        self._serving = trio.CancelScope()
        self._up, self._listening, self._closed = trio.Event(), trio.Event(), trio.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    def count(self, method: str) -> int:
        return self.methods().count(method)

    def times_of(self, method: str) -> list[float]:
        return [t for (m, _), t in zip(self.calls, self.times, strict=True) if m == method]

    def finishes(self, job_id: str) -> list[list[Any]]:
        return [
            p
            for m, p in self.calls
            if m in ("Dext.FinishJob", "Venus.WdPoStFinishJob") and p and p[0] == job_id
        ]

    async def wait_for(self, predicate: Callable[[HostileCoordinator], bool]) -> None:
        while not predicate(self):
            await self._changed.wait()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            [listener] = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self._listener = listener
            self.port = listener.socket.getsockname()[1]
            self._listening.set()
            if not started:
                task_status.started()
                started = True
            with trio.CancelScope() as self._serving:  # (its end closes the connections too)
                await trio.serve_listeners(self._connection, [listener])  # type: ignore[arg-type]
            self._closed.set()
            await self._up.wait()

    async def down(self) -> None:
        """Stop: the listener and every connection closed, so calls are refused (the
        connection cannot be made) until `up()`."""
        self._up, self._listening, self._closed = trio.Event(), trio.Event(), trio.Event()
        self._serving.cancel()
        await self._closed.wait()

    async def up(self) -> None:
        """Listen again after `down()`, on the same port."""
        self._up.set()
        await self._listening.wait()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is not h11.DONE:
                            return
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                if not await self._answer(stream, conn, body):
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection, body: bytes) -> bool:
        request = json.loads(body)
        method, params = request["method"], request.get("params") or []
        self.calls.append((method, params))
        self.times.append(trio.current_time())
        self._changed.set()
        self._changed = trio.Event()
        handler = self.script.get(method)
        if handler is None:
            reply: Any = Error(-32601, f"(error code -32601) method '{method}' not found", 500)
        else:
            reply = handler(params, self.count(method))
        if reply is SILENT:
            await trio.sleep_forever()
        status, content_type = 200, "application/json"
        if isinstance(reply, Page):
            status, content_type, data = reply.status, reply.content_type, reply.body
        elif isinstance(reply, Error):
            status = reply.status
            error = {"code": reply.code, "message": reply.message}
            data = json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}).encode()
        else:
            answer = {
                "jsonrpc": "2.0",
                "id": request["id"],
                "result": None if reply is CUT else reply,
            }
            if reply is NO_RESULT:
                del answer["result"]
            data = json.dumps(answer).encode()
        headers = [("Content-Type", content_type), ("Content-Length", str(len(data)))]
        head = conn.send(h11.Response(status_code=status, headers=headers))
        if reply is CUT:
            await stream.send_all(head + data[: len(data) // 2])
            return False
        await stream.send_all(head + conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
        return True
