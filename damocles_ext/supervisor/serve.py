"""The I/O of `damocles-ext serve`: damocles' JSON-lines protocol on our own stdin/stdout.

damocles-manager starts us exactly like one of its processors: it waits for the ready line, then
writes request lines with increasing ids and matches the response lines by id, in any order. We
answer every request we could read exactly once; a line we cannot read is answered with an error
when its id can be read and logged otherwise (damocles does the same with a bad line from a
child). The codec is `protocol.jsonl`; this module only moves bytes and runs one task per request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..errors import DextError
from ..protocol import jsonl
from ..tasks import Output, Task

log = logging.getLogger("damocles_ext.serve")

#: submit(task) -> output; raises ProverError (or another DextError) when there is no proof.
Submit = Callable[[Task], Awaitable[Output]]

_READ_SIZE = 256 * 1024


@dataclass(slots=True)
class ServeStats:
    """Counters of one JSON-lines server, for logs and tests."""

    received: int = 0  # request lines read, good or bad
    answered: int = 0  # response lines written
    failed: int = 0  # of which with err_msg
    unreadable: int = 0  # lines that could not be answered (no readable id)
    in_flight: int = 0


class JsonLineServer:
    """Serve damocles JSON-lines requests read from `receive_stream` through `submit`.

    `run()` writes the ready line first (unless the caller did: `ready_line_sent`), then reads requests until end of input or
    `stop_reading()`, calls `on_input_closed` (the place to start a graceful shutdown), and
    returns once every request it accepted has been answered.
    """

    def __init__(
        self,
        stage: str,
        submit: Submit,
        *,
        receive_stream: trio.abc.ReceiveStream,
        send_stream: trio.abc.SendStream,
        on_input_closed: Callable[[], None] | None = None,
        max_line: int = jsonl.DEFAULT_MAX_LINE,
        ready_line_sent: bool = False,
    ) -> None:
        self.stage = stage
        self._submit = submit
        self._receive = receive_stream
        self._send_stream = send_stream
        self._on_input_closed = on_input_closed
        self._reader = jsonl.LineReader(max_line)
        self._send_lock = trio.Lock()
        self._read_scope = trio.CancelScope()
        self._in_flight: set[int] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._output_broken = False
        self._ready_sent = ready_line_sent
        self._stats = ServeStats()

    def statistics(self) -> ServeStats:
        """A snapshot of the counters."""
        s = self._stats
        return ServeStats(s.received, s.answered, s.failed, s.unreadable, len(self._in_flight))

    async def wait_idle(self) -> None:
        """Wait until every request read so far has been answered."""
        while not self._idle.is_set():
            await self._idle.wait()

    def stop_reading(self) -> None:
        """Take no more requests (e.g. on SIGTERM); those already read are still answered."""
        self._read_scope.cancel()

    async def send_ready(self) -> None:
        """Write the ready line now (`run` writes it if this was not called)."""
        if not self._ready_sent:
            self._ready_sent = True
            await self._write(jsonl.ready_line(self.stage))

    async def run(self) -> None:
        """Write the ready line, serve until input ends, then wait for every answer."""
        await self.send_ready()
        try:
            async with trio.open_nursery() as nursery:
                with self._read_scope:
                    await self._read_requests(nursery)
                if self._on_input_closed is not None:
                    self._on_input_closed()
        finally:
            if self._in_flight:  # only when cancelled from outside
                log.warning(
                    "%d requests left unanswered: %s",
                    len(self._in_flight),
                    _id_list(self._in_flight),
                )

    async def _read_requests(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data = await self._receive.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.warning("stdin broke (%s): taking no more requests", exc)
                data = b""
            for item in self._reader.receive_data(data):
                self._handle_line(item, nursery)
            if not data:
                log.info(
                    "stdin closed: taking no more requests, %d in flight", len(self._in_flight)
                )
                return

    def _handle_line(self, item: bytes | jsonl.LineTooLong, nursery: trio.Nursery) -> None:
        if isinstance(item, jsonl.LineTooLong):
            self._stats.received += 1
            self._stats.unreadable += 1
            log.error(
                "skipped a request line of %d bytes: longer than the %d-byte limit",
                item.length,
                item.limit,
            )
            return
        if not item.strip():
            return  # a blank line carries nothing to answer
        self._stats.received += 1
        try:
            request = jsonl.decode_request(item, self.stage)
        except jsonl.JsonLineError as exc:
            if exc.id is None:
                self._stats.unreadable += 1
                log.error("unreadable request line, cannot answer it: %s", exc)
            else:
                log.error("answering a bad request with an error: %s", exc)
                nursery.start_soon(self._answer_error, exc.id, str(exc))
            return
        if request.id in self._in_flight:
            # damocles counts ids up per child, so this is a peer bug; answering the second one
            # with an error is the only answer that cannot be mistaken for a proof.
            log.error("request id %d is already in flight; rejecting the duplicate", request.id)
            nursery.start_soon(
                self._answer_error,
                request.id,
                f"bad request: request id {request.id} is already in flight",
            )
            return
        self._in_flight.add(request.id)
        if self._idle.is_set():
            self._idle = trio.Event()
        nursery.start_soon(self._answer, request.id, request.task)

    async def _answer(self, id: int, task: Task) -> None:
        try:
            try:
                log.debug("request %d: submitted", id)
                output = await self._submit(task)
            except DextError as exc:
                message = str(exc) or type(exc).__name__
                log.warning("request %d failed: %s", id, message)
                line = jsonl.encode_response(id, err_msg=message)
                self._stats.failed += 1
            except Exception as exc:  # a bug of ours must still answer the request
                log.exception("request %d: internal error", id)
                line = jsonl.encode_response(
                    id, err_msg=f"internal error in damocles-ext: {type(exc).__name__}: {exc}"
                )
                self._stats.failed += 1
            else:
                line = jsonl.encode_response(id, output=output)
            await self._write(line, id)
        finally:
            self._in_flight.discard(id)
            if not self._in_flight:
                self._idle.set()

    async def _answer_error(self, id: int, message: str) -> None:
        self._stats.failed += 1
        await self._write(jsonl.encode_response(id, err_msg=message), id)

    async def _write(self, line: bytes, id: int | None = None) -> None:
        if self._output_broken:
            log.error("request %s: stdout is closed, answer dropped", id)
            return
        async with self._send_lock:
            try:
                await self._send_stream.send_all(line)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # The manager is gone: nobody can read answers any more, so stop taking work.
                self._output_broken = True
                log.error("stdout broke (%s): answer to request %s dropped, stopping", exc, id)
                self.stop_reading()
                return
        if id is not None:
            self._stats.answered += 1


def _id_list(ids: set[int], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in sorted(ids)[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
