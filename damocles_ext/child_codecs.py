"""The child runtime's two wire protocols behind one small interface: dext/1 frames and
damocles' JSON lines (`child.ChildRuntime.codec`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .protocol import dext, jsonl
from .tasks import Output

#: Requests beyond its capacity the runtime offers to take (the Hello's queue): they wait in
#: order, answered "cancelled" at once if the parent takes one back. Deeper is cheaper for the
#: supervisor with trivial requests (it reads and writes more at a time: 0.89x its CPU per
#: request with 2 against 1, 0.83x with 4; one write per 17 requests with 16 instead of one per
#: 5 with 4, 0.8x the CPU of 4), and the supervisor sends them only while quick (each answered
#: within 10 ms of its turn), so what waits here is at most 16 such requests. 16 is also the
#: most the supervisor sends beyond Concurrent, whatever a child offers.
QUEUE = 16

# What the main loop acts on: a request, a cancel, a shutdown, or a bad input. The codecs hand
# requests, cancels and shutdowns over as the protocol's own decoded messages (no wrapper per
# request): a request is anything with `id` and `task`.

_Request = dext.Request | jsonl.JsonRequest
_Cancel = dext.Cancel
_Shutdown = dext.Shutdown


@dataclass(frozen=True, slots=True)
class _Bad:
    """Input that is not a request; `id` when the request it was meant to be can be answered."""

    id: int | None
    message: str


_In = _Request | _Cancel | _Shutdown | _Bad
#: The dext messages a parent sends; any other (Hello, Response, Progress) is a bad input.
_FROM_PARENT = (dext.Request, dext.Cancel, dext.Shutdown)


class _DextCodec:
    name = "dext"
    heartbeats = True
    request_type: type = dext.Request

    def __init__(self) -> None:
        self._decoder = dext.FrameDecoder()
        self.fatal_errors: tuple[type[Exception], ...] = (dext.ProtocolError,)

    def hello(self, stage: str, prover: str, version: str, capacity: int) -> bytearray:
        return dext.encode(
            dext.Hello(dext.PROTOCOL_VERSION, stage, os.getpid(), prover, version, capacity, QUEUE)
        )

    def feed(self, data: bytes) -> list[_In]:
        """Raises dext.ProtocolError: a framing error is fatal for the connection."""
        items: list = self._decoder.receive_data(data)
        for i, msg in enumerate(items):
            if msg.__class__ not in _FROM_PARENT:
                # A Hello/Response/Progress from the parent: logged, never answered (its id is
                # not one of our requests).
                items[i] = _Bad(None, f"unexpected {type(msg).__name__} frame")
        return items

    def response(
        self, id: int, output: Output | None = None, error: str | None = None
    ) -> bytes | bytearray:
        frame = dext.encode(dext.Response(id, output, error))
        return _bounded(frame, dext.HEADER_SIZE + dext.DEFAULT_MAX_FRAME_SIZE, "a dext frame")

    def progress(self, id: int, phase: str, done: int, total: int) -> bytearray | None:
        return dext.encode(dext.Progress(id, phase, done, total))


class _JsonlCodec:
    name = "jsonl"
    heartbeats = False  # damocles' protocol has no progress message
    request_type: type = jsonl.JsonRequest

    def __init__(self, stage: str) -> None:
        self._stage = stage
        self._reader = jsonl.LineReader()
        # A bad line is reported and skipped (see feed), never fatal for the connection.
        self.fatal_errors: tuple[type[Exception], ...] = ()

    def hello(self, stage: str, prover: str, version: str, capacity: int) -> bytes:
        return jsonl.ready_line(stage)

    def feed(self, data: bytes) -> list[_In]:
        out: list[_In] = []
        for line in self._reader.receive_data(data):
            if isinstance(line, jsonl.LineTooLong):
                message = f"skipped a line of {line.length} bytes (limit {line.limit})"
                # With its leading id the request is answered with the error, not left unanswered.
                out.append(_Bad(jsonl.leading_id(line.head), message))
                continue
            if not line.strip():
                continue
            try:
                req = jsonl.decode_request(line, self._stage)
            except jsonl.JsonLineError as exc:
                out.append(_Bad(exc.id, str(exc)))
                continue
            out.append(req)
        return out

    def response(
        self, id: int, output: Output | None = None, error: str | None = None
    ) -> bytes | bytearray:
        if output is None and error is None:
            error = "prover returned no output"
        line = jsonl.encode_response(id, output if error is None else None, error)
        return _bounded(line, jsonl.DEFAULT_MAX_LINE, "a JSON line")

    def progress(self, id: int, phase: str, done: int, total: int) -> bytes | None:
        return None


def _bounded(data: bytes | bytearray, limit: int, what: str) -> bytes | bytearray:
    """`data`, unless it is longer than the supervisor reads in one message: it would take this
    child for broken, kill it, and retry the request on another, which fails the same way."""
    if len(data) > limit:
        raise ValueError(
            f"the answer is {len(data) / 2**20:.1f} MiB as {what}, over the"
            f" {limit / 2**20:.0f} MiB the supervisor reads in one; prove fewer partitions or"
            " sectors per request"
        )
    return data
