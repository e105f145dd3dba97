"""The I/O of `damocles-ext serve`: damocles' JSON-lines protocol on our own stdin/stdout.

damocles-manager starts us exactly like one of its processors: it waits for the ready line, then
writes request lines with increasing ids and matches the response lines by id, in any order. We
answer every request we could read exactly once, and those still waiting in stdin as we stop
reading (with why); a line we cannot read is answered with an error when its id can be read and
logged otherwise (damocles does the same with a bad line from a child). The codec is `protocol.jsonl`; JsonLineServer only moves bytes and runs one task per
request, and `serve_supervised` at the end runs it against a supervisor of our own.

damocles' id rules (docs: damocles-wire.md): an answer is routed to whoever waits for its id, so
a request whose id is already in flight is logged and never answered (an error answer would
reach the first caller, whose proof would then be lost); an id beyond 64 bits cannot be read by
damocles-manager, so such a line is unreadable; an over-long line whose id can be read (the
first member, as damocles writes it) is answered with an error. Error texts name the request by
its wire id, never by the supervisor's own request number.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..errors import DextError, ProverError
from ..protocol import jsonl
from ..stages import WINDOW_POST_SPLIT, post_stage
from ..tasks import Output, Task, stage_of
from ..wording import some_and_more
from .outbox import Outbox, stream_fd
from .serve import reader_gone, replay_held_signals
from .signals import end_soon, stop_signals, watch_signals
from .started import (
    Batch,
    CancelHandle,
    Start,
    bug_answer,
    failure_fields,
    own_label,
    start_or_decline,
)

if TYPE_CHECKING:
    from ..supervisor.core import Supervisor

log = logging.getLogger("damocles_ext.serve")

#: submit(task) -> output; raises ProverError (or another DextError) when there is no proof.
Submit = Callable[[Task], Awaitable[Output]]

_READ_SIZE = 256 * 1024
#: At most this much of what waits in stdin is read when reading stops (a pipe holds 1 MiB at
#: most unless root raised the limit); a writer that never stops cannot hold serve there.
_UNREAD_LIMIT = 16 * 1024 * 1024


@dataclass(slots=True)
class ServeStats:
    """Counters of one JSON-lines server, for logs and tests."""

    received: int = 0  # request lines read, good or bad
    answered: int = 0  # response lines written
    failed: int = 0  # of which with err_msg
    unreadable: int = 0  # lines that could not be answered (no readable id)
    in_flight: int = 0
    duplicates: int = 0  # lines whose id was in flight: logged, not answered


class JsonLineServer:
    """Serve damocles JSON-lines requests read from `receive_stream` through `submit` (or
    `start`, tried first when given: a request it takes needs no task of its own).

    `run()` writes the ready line first (unless the caller did: `ready_line_sent`), then reads
    requests until end of input or `stop_reading()` (given a reason, it answers with it the
    request lines still waiting in the input), calls `on_input_closed` (the place to start a
    graceful shutdown), and returns once every request it accepted has been answered.
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
        start: Start | None = None,
        batch: Batch = contextlib.nullcontext,
    ) -> None:
        self.stage = stage
        self._submit = submit
        self._start = start
        self._batch = batch  # the requests of one read are started in one (Supervisor.batch)
        self._started: dict[int, CancelHandle] = {}  # what `start` returned, by id
        self._stopped = False  # run() ended: an answer now is nobody's
        self._receive = receive_stream
        self._send_stream = send_stream
        self._on_input_closed = on_input_closed
        self._reader = jsonl.LineReader(max_line)
        self._outbox = Outbox(send_stream)
        self._read_scope = trio.CancelScope()
        self._input_ended = False
        self._unread: str | None = None  # the error for what waits in stdin as reading stops
        self._refusing: str | None = None  # while those lines are answered with it
        self._in_flight: set[int] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._output_broken = False
        self._ready_sent = ready_line_sent
        self._stats = ServeStats()

    def statistics(self) -> ServeStats:
        """A snapshot of the counters."""
        s = self._stats
        return ServeStats(
            s.received, s.answered, s.failed, s.unreadable, len(self._in_flight), s.duplicates
        )

    async def wait_idle(self) -> None:
        """Wait until every request read so far has been answered."""
        while not self._idle.is_set():
            await self._idle.wait()

    def stop_reading(self, unread: str | None = None) -> None:
        """Take no more requests (e.g. on SIGTERM); those already read are still answered. With
        `unread`, each request line already waiting in the input (read without waiting) is
        answered with that error, not left unanswered: damocles-manager's caller would wait
        on its own context."""
        if self._unread is None:
            self._unread = unread
        self._read_scope.cancel()

    async def send_ready(self) -> None:
        """Write the ready line now (`run` writes it if this was not called)."""
        if not self._ready_sent:
            self._ready_sent = True
            # Before the writer runs and before any answer: nothing else writes yet.
            try:
                await self._send_stream.send_all(jsonl.ready_line(self.stage))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._output_broken = True
                log.error("stdout broke (%s) before the ready line, stopping", _why(exc))
                self.stop_reading()

    async def run(self) -> None:
        """Write the ready line, serve until input ends, then wait for every answer."""
        await self.send_ready()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._outbox.run)
                with self._read_scope:
                    await self._read_requests(nursery)
                if self._unread is not None and not (self._input_ended or self._output_broken):
                    out = stream_fd(self._send_stream)
                    if out is None or not reader_gone(out):  # (else nobody reads an answer)
                        self._answer_unread(self._unread, nursery)
                if self._on_input_closed is not None:
                    self._on_input_closed()
                # An id is in flight until its answer is written: then the writer may stop.
                await self.wait_idle()
                self._outbox.close()
        finally:
            # Cancelled from outside (a second signal): what `start` took is abandoned, as the
            # tasks of `submit` are by their cancellation, and answered by nobody.
            self._stopped = True
            for started in list(self._started.values()):
                started.cancel()
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
            # A stream may hand back a bytearray; bytes() of bytes is the same object, no copy.
            with self._batch():
                self._handle_lines(bytes(data), nursery)
            if not data:
                self._input_ended = True
                log.info(
                    "stdin closed: taking no more requests, %d in flight", len(self._in_flight)
                )
                return

    def _handle_lines(self, data: bytes, nursery: trio.Nursery) -> None:
        for item in self._reader.receive_data(data):
            try:
                self._handle_line(item, nursery)
            except Exception:
                # A bug of ours on one line must not end serve, and every other request.
                self._stats.unreadable += 1
                log.exception("internal error on a request line; it is not answered")

    def _answer_unread(self, why: str, nursery: trio.Nursery) -> None:
        """Reading stopped: answer the request lines already waiting in the input with `why`,
        read without waiting (the descriptor is non-blocking), and a last line only partly
        there whose id can be read. Their answers are queued before run() waits for the
        answers in flight, so they are written before it returns."""
        fd = stream_fd(self._receive)
        if fd is None:  # (trio's memory streams in tests)
            return
        self._refusing = why
        answered = self._stats.failed
        # What the pipe holds, not what a writer still writing could add meanwhile.
        try:
            limit = min(_UNREAD_LIMIT, fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
        except OSError:  # not a pipe (a file, a tty)
            limit = 1 << 20
        taken, ended = 0, False
        while taken < limit and not ended:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("stdin broke (%s) while reading what was left in it", exc)
                break
            taken += len(data)
            ended = not data
            self._handle_lines(data, nursery)
        partial = None if ended else jsonl.leading_id(self._reader.partial_head())
        if partial is not None and self._take(partial, "a request line only partly written"):
            self._answer_error(partial, why)
        if answered != self._stats.failed:
            log.warning(
                "answered %d requests left unread in stdin as serve stopped reading: %s",
                self._stats.failed - answered,
                why,
            )

    def _handle_line(self, item: bytes | jsonl.LineTooLong, nursery: trio.Nursery) -> None:
        if isinstance(item, jsonl.LineTooLong):
            self._stats.received += 1
            id = jsonl.leading_id(item.head)
            what = f"the request line is {item.length} bytes, over the {item.limit}-byte limit"
            if id is None:
                self._stats.unreadable += 1
                log.error("skipped a request line without a readable id: %s", what)
            elif self._take(id, what):
                log.error("request %d: answering with an error: %s", id, what)
                self._answer_error(id, f"bad request: {what}; not proved")
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
            elif self._take(exc.id, str(exc)):
                log.error("answering a bad request with an error: %s", exc)
                self._answer_error(exc.id, str(exc))
            return
        if not self._take(request.id, "a request"):
            return
        if self._refusing is not None:  # left in stdin as reading stopped
            self._answer_error(request.id, self._refusing)
            return
        log.debug("request %d: submitted", request.id)
        id = request.id
        if self._start is not None and start_or_decline(
            self._start, self._started, id, request.task, lambda o, e: self._finished(id, o, e)
        ):
            return
        nursery.start_soon(self._answer, request.id, request.task)

    def _finished(self, id: int, output: Output | None, error: DextError | None) -> None:
        """The answer to request `id`: `start`'s (maybe before `start` returned, from within the
        supervisor) or `_answer`'s. A bug of ours here must still answer the request, and reach
        neither the supervisor nor the server's nursery."""
        self._started.pop(id, None)
        if self._stopped:
            self._done(id)  # cancelled by run()'s end: nobody reads it
            return
        try:
            self._reply(id, output, error)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: answered, logged by bug_answer
            self._reply(
                id, None, bug_answer(log, id, exc, "request %d: internal error on its answer")
            )

    def _take(self, id: int, what: str) -> bool:
        """Count `id` in flight until it is answered; False (logged) if it is already."""
        if id in self._in_flight:
            # damocles counts ids up per child, so this is a peer bug. Any answer to this line
            # would be routed to the caller of the request in flight, which would lose its proof.
            self._stats.duplicates += 1
            log.error(
                "request %d is already in flight: a second line with its id (%s) is not"
                " answered, and the first one still is",
                id,
                what if len(what) <= 300 else what[:300] + "...",
            )
            return False
        self._in_flight.add(id)
        if self._idle.is_set():
            self._idle = trio.Event()
        return True

    def _done(self, id: int) -> None:
        self._in_flight.discard(id)
        if not self._in_flight:
            self._idle.set()

    async def _answer(self, id: int, task: Task) -> None:
        output: Output | None = None
        error: DextError | None = None
        try:
            output = await self._submit(task)
        except DextError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a bug of ours must still answer the request
            error = bug_answer(log, id, exc)
        except BaseException:  # cancelled from outside: never answered
            self._done(id)
            raise
        # As `start`'s answers are: a bug of ours writing it is answered too, not the server's end.
        self._finished(id, output, error)

    def _reply(self, id: int, output: Output | None, error: DextError | None) -> None:
        """Answer request `id` with `output`, or with `error`, which says why there is no proof
        (an InternalError: a bug of ours, logged by the caller, and still answered)."""
        if error is None:
            self._write(jsonl.encode_response(id, output=output), id)
            return
        message = self._error_text(id, str(error) or type(error).__name__)
        if not error.logged:  # (a bug's answer: logged with its traceback already)
            log.warning("%s", message, extra=failure_fields(id, error))
        self._stats.failed += 1
        self._write(jsonl.encode_response(id, err_msg=message), id)

    def _answer_error(self, id: int, message: str) -> None:
        self._stats.failed += 1
        self._write(jsonl.encode_response(id, err_msg=self._error_text(id, message)), id)

    def _error_text(self, id: int, message: str) -> str:
        """`message` as damocles' caller should read it: about request `id` (its wire id) of
        this stage, named once. The supervisor (ours, or the `run` that serve --connect
        forwards to) numbers requests its own way; that number is replaced by the wire id."""
        number, named, rest = own_label(message)
        rest = rest if number is not None else ": " + message
        if named in WINDOW_POST_SPLIT:  # a split WindowPoSt's step: say which one failed
            return f"request {id} ({named}){rest}"
        if self.stage in rest:  # e.g. "failed on window_post#0": the child names the stage
            return f"request {id}{rest}"
        return f"request {id} ({self.stage}){rest}"

    def _write(self, line: bytes, id: int) -> None:
        """Queue the answer to `id`; it stays in flight until it is written (or dropped)."""
        if self._output_broken:
            log.error("request %s: stdout is closed, answer dropped", id)
            self._done(id)
            return

        def written(error: BaseException | None) -> None:
            if error is None:
                self._stats.answered += 1
            elif not self._output_broken:
                # The manager is gone: nobody can read answers any more, so stop taking work.
                self._output_broken = True
                why = _why(error)
                log.error("stdout broke (%s): answer to request %s dropped, stopping", why, id)
                self.stop_reading()
            else:
                log.error("request %s: stdout is closed, answer dropped", id)
            self._done(id)

        # Alone in flight: written now; else joined with the answers of this pass of the loop.
        self._outbox.send(line, written, at_once=len(self._in_flight) == 1)


def _id_list(ids: set[int], limit: int = 20) -> str:
    return some_and_more([str(i) for i in sorted(ids)[:limit]], len(ids))


# -- serve with children of our own: the runtime around JsonLineServer and one supervisor ------


def with_default_deadline(call: Any, after: Mapping[str, float]) -> Any:
    """`call(task, *, deadline=None, ...)` (a supervisor's `submit` or `start_nowait`, a remote
    one's `submit`) giving a request that comes without a deadline the one `after` says for its
    stage, seconds from now (none if absent): `serve`'s (damocles' JSON lines carry none) and
    `run`'s (a client may send none). A split WindowPoSt's step sent alone gets window_post's."""
    if not after:
        return call

    def with_deadline(task: Any, *, deadline: float | None = None, **kwargs: Any) -> Any:
        if deadline is None and (seconds := after.get(post_stage(stage_of(task)))) is not None:
            deadline = time.time() + seconds
        return call(task, deadline=deadline, **kwargs)

    return with_deadline


async def serve_supervised(
    stage: str,
    supervisor: Supervisor,
    submit: Submit,
    protocol_in: int,
    protocol_out: int,
    start: Start | None = None,
) -> int:
    """Answer requests of `stage` on the pipes with `start` (if given) or `submit` while
    `supervisor` runs; the ready line is already out. Stops on stdin EOF (after the requests
    read) or on a signal."""
    with trio.open_signal_receiver(*stop_signals()) as signals:
        replay_held_signals()  # those that came since the ready line
        receive = trio.lowlevel.FdStream(protocol_in)
        send = trio.lowlevel.FdStream(protocol_out)
        async with trio.open_nursery() as nursery:
            server = JsonLineServer(
                stage,
                submit,
                receive_stream=receive,
                send_stream=send,
                on_input_closed=lambda: nursery.start_soon(
                    finish_then_stop, server, supervisor, send.fileno()
                ),
                ready_line_sent=True,
                start=start,
                batch=supervisor.batch,
            )
            log.info("serving %s (pid %d)", stage, os.getpid())

            def at_once() -> None:
                server.stop_reading(STOPPED_AT_ONCE)
                supervisor.stop_at_once(STOPPED_AT_ONCE)  # every open request answered now
                end_soon(nursery.cancel_scope)

            # Reading goes on after the first signal: a request already in the pipe still gets
            # its (error) answer.
            nursery.start_soon(
                watch_signals, signals, nursery.cancel_scope, supervisor.request_shutdown, log,
                at_once,
            )  # fmt: skip
            server_done = trio.Event()

            async def serve_requests() -> None:
                await server.run()
                server_done.set()

            nursery.start_soon(serve_requests)
            await supervisor.run()
            # The supervisor has answered everything it accepted; let the answers reach stdout.
            server.stop_reading(STOPPED_UNREAD)
            with trio.move_on_after(5):
                await server_done.wait()
            if not server_done.is_set():
                log.error("answers still unwritten 5 s after the supervisor stopped")
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await receive.aclose()
            await send.aclose()
        log_stopped(server)
    return 0


#: What a request still open is told when serve stops at once.
STOPPED_AT_ONCE = (
    "damocles-ext serve stopped at once (second signal); the request was not proved: send it"
    " again to the prover that replaces it"
)


#: What a request left unread in stdin is told when serve stops after a signal.
STOPPED_UNREAD = (
    "damocles-ext serve stopped (signal) before it read the request, which was not proved: send"
    " it again to the prover that replaces it"
)


def log_stopped(server: JsonLineServer) -> None:
    """Log what `server` did, once it has stopped."""
    stats = server.statistics()
    log.info(
        "stopped: %d requests read, %d answered (%d with an error), %d unreadable",
        stats.received,
        stats.answered,
        stats.failed,
        stats.unreadable,
    )


async def finish_then_stop(server: JsonLineServer, supervisor: Supervisor, out_fd: int) -> None:
    """stdin EOF: stop the supervisor once the requests already read are answered."""
    # stdin EOF: the requests already read were taken, so they are proved (the supervisor would
    # refuse the ones still queued if asked to stop now); then the supervisor stops within what
    # is left of the grace. If our stdout is closed as well, the
    # manager is gone (it was killed) and nobody can read an answer: stop at once.
    left = 0.0  # of the shutdown grace, once the requests read were waited for
    if reader_gone(out_fd):
        log.info("stdout is closed as well: the reader is gone, stopping now")
    else:
        began = trio.current_time()
        with trio.move_on_after(supervisor.shutdown_grace):
            await server.wait_idle()
        left = supervisor.shutdown_grace - (trio.current_time() - began)
    supervisor.request_shutdown(grace_left=left)  # one grace in all, not a second one


# -- serve through something that proves elsewhere (serve --connect, serve --jobs) --------------

T = TypeVar("T")


class InFlight:
    """The submits in flight of a front end that proves elsewhere, so that a stopping front end
    can refuse every later one (`refuse_new`) and answer all of them now (`abandon`)."""

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.abandoned: str | None = None
        self.refusing: str | None = None

    async def run(
        self, work: Callable[[], Awaitable[T]], detail: Callable[[], str] = lambda: ""
    ) -> T:
        """`await work()`, or ProverError(reason + detail()) once abandoned; a submit that comes
        once new ones are refused is answered ProverError(that reason) without running."""
        if self.refusing is not None:
            raise ProverError(self.refusing)
        if self.abandoned is None:
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    return await work()
                finally:
                    self._scopes.discard(scope)
        assert self.abandoned is not None  # only abandon() cancels the scope
        raise ProverError(self.abandoned + detail())

    def refuse_new(self, reason: str) -> None:
        """Answer every later submit with `reason` at once; those in flight go on."""
        if self.refusing is None:
            self.refusing = reason

    def abandon(self, reason: str) -> None:
        """Answer every request in flight with `reason` now (and every later one)."""
        if self.abandoned is None:
            self.abandoned = reason
        for scope in self._scopes:
            scope.cancel()


@dataclass(frozen=True, slots=True)
class StopReasons:
    """What the requests still in flight are told when serve stops without their answer."""

    reader_gone: str  # stdin EOF and stdout closed: the manager was killed
    grace_over: str  # stdin EOF or the first signal, and the shutdown grace passed
    at_once: str  # a second signal
    refused: str  # a request read after the first signal: not sent on


async def serve_draining(
    stage: str,
    submit: Submit,
    in_flight: InFlight,
    receive: trio.lowlevel.FdStream,
    send: trio.lowlevel.FdStream,
    signals: AsyncIterator[int],
    shutdown_grace: float,
    reasons: StopReasons,
    *,
    ready_line_sent: bool = False,
) -> JsonLineServer:
    """Serve requests of `stage` with `submit` until stdin ends or a signal comes (the ready line
    first, unless the caller wrote it), then wait for the answers in flight within
    `shutdown_grace`; `in_flight` answers what is left with an error. After the first signal,
    reading goes on while they are waited for: a request already in the pipe, or written
    meanwhile, is answered with `reasons.refused`, not left unread; so is one still in the pipe
    when reading stops (the drain's end, a second signal). Returns the stopped server."""
    async with trio.open_nursery() as nursery:
        draining = False

        async def drain() -> None:
            # stdin EOF or the first signal: wait for the answers in flight, within the grace;
            # what is left then is answered with an error.
            if reader_gone(send.fileno()):
                log.info("stdout is closed as well: the reader is gone, stopping now")
                in_flight.abandon(reasons.reader_gone)
                return
            with trio.move_on_after(shutdown_grace):
                await server.wait_idle()
            in_flight.abandon(reasons.grace_over)

        def start_drain() -> None:
            nonlocal draining
            if not draining:
                draining = True
                nursery.start_soon(drain_then_stop)

        async def drain_then_stop() -> None:
            await drain()
            # (After stdin EOF: it has stopped already.) A line still in the pipe was sent on
            # to nothing, as one read after the first signal.
            server.stop_reading(reasons.refused)

        def shut_down() -> None:  # the first signal
            in_flight.refuse_new(reasons.refused)
            start_drain()

        def at_once() -> None:
            server.stop_reading(reasons.refused)  # what waits in the pipe: never sent on
            in_flight.abandon(reasons.at_once)
            end_soon(nursery.cancel_scope)

        server = JsonLineServer(
            stage,
            submit,
            receive_stream=receive,
            send_stream=send,
            on_input_closed=start_drain,
            ready_line_sent=ready_line_sent,
        )
        nursery.start_soon(watch_signals, signals, nursery.cancel_scope, shut_down, log, at_once)
        await server.run()  # writes the ready line first
        nursery.cancel_scope.cancel()
    return server


def _why(exc: BaseException) -> str:
    """What broke a write to stdout: trio's BrokenResourceError says nothing itself; the OSError
    it comes from does (its strerror), else its type is named."""
    why = exc.__cause__ or exc
    return getattr(why, "strerror", None) or str(why) or type(why).__name__
