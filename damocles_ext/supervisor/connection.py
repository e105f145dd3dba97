"""One child's end of the pipe, protocol-wise: the ready handshake and the message stream.

`ChildConnection` turns the bytes a child writes into events and builds the bytes we write to it,
for both protocols (dext/1 frames and damocles JSON lines). It does no I/O itself, so the
handshake and decoding rules can be read (and tested) apart from the process handling.

Ready messages accepted: a dext `Hello` frame whose stage matches, or the damocles ready line
`<stage> processor ready` ended by `\\n` or `\\r\\n`. damocles-manager (Go) wants exactly the
`\\n` form and vc-processors (Rust) trims the line; we take both endings, nothing else (no leading
or other trailing spaces), so a child that works here works under damocles-manager unless it
writes `\\r\\n`.

Problems are of two kinds: `ChildProtocolError` is fatal for the child (a bad ready message, a
dext framing error, a dext message a child must not send); a bad JSON line is recoverable and
comes back as `Skipped`, as damocles logs such a line and reads on.
"""

from __future__ import annotations

import msgspec

from ..protocol import dext, jsonl
from ..stages import POST_STAGES
from ..tasks import Output, Task, stage_of

_PREVIEW = 200
# The longest request a child accepts: a dext frame's payload limit (a JSON line's is the same).
MAX_REQUEST_BYTES = dext.HEADER_SIZE + dext.DEFAULT_MAX_FRAME_SIZE


class ChildProtocolError(Exception):
    """The child broke the protocol; it must be killed. The message says what came instead.

    `events`: what the same input held, whole and valid, before what broke the protocol (an
    answer, then a stray printf in one write): the caller acts on them, then kills the child,
    as it would have had the pipe split the bytes between two reads."""

    def __init__(self, message: str, events: list[Event] | None = None) -> None:
        super().__init__(message)
        self.events: list[Event] = events if events is not None else []


class Ready(msgspec.Struct, frozen=True):
    """The child's ready message arrived; `hello` is set for dext children."""

    protocol: str
    hello: dext.Hello | None


class Answer(msgspec.Struct, frozen=True):
    """The child's response to its request `child_rid`."""

    child_rid: int
    output: Output | None
    error: str | None


class ProgressEvent(msgspec.Struct, frozen=True):
    """A dext Progress frame: the child is alive and working on `child_rid`."""

    child_rid: int
    phase: str
    done: int
    total: int


class Skipped(msgspec.Struct, frozen=True):
    """A line that is not a valid response (logged and skipped); `child_rid` if it was readable."""

    what: str
    child_rid: int | None
    raw: bytes = b""  # the line, for the operator's dump
    response_like: bool = False  # its id unreadable, it is still a response (jsonl)


Event = Ready | Answer | ProgressEvent | Skipped


def preview(data: bytes, limit: int = _PREVIEW) -> str:
    """A short printable rendering of bytes for log lines and errors."""
    return jsonl.preview(data, limit)


class ChildConnection:
    """Protocol state of one child process, from spawn to exit."""

    def __init__(self, stage: str, protocol: str = "auto", name: str = "child") -> None:
        if protocol not in ("auto", "dext", "jsonl"):
            raise ValueError(f"unknown protocol {protocol!r}")
        if protocol == "jsonl" and stage not in POST_STAGES:
            raise ValueError(f"{name}: damocles' JSON lines cannot carry {stage}; use dext")
        self.stage = stage
        self.name = name
        self.protocol: str | None = None if protocol == "auto" else protocol
        self.ready = False
        self._frames: dext.FrameDecoder | None = None
        self._lines: jsonl.LineReader | None = None
        self._head = b""  # the first bytes, kept to say what came instead of a ready message

    @property
    def head(self) -> bytes:
        """The first bytes the child wrote (up to a few hundred), for error messages."""
        return self._head

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed what the child wrote (b"" at EOF); raises ChildProtocolError if it is fatal."""
        if len(self._head) < _PREVIEW and data:
            self._head += data[: _PREVIEW - len(self._head)]
        if self.protocol is None:
            if not data:
                return self._eof()
            self.protocol = jsonl.detect_protocol(data[0])
            if self.protocol == "jsonl" and self.stage not in POST_STAGES:
                raise ChildProtocolError(
                    f"speaks damocles' JSON lines, which cannot carry {self.stage}: a split "
                    f"WindowPoSt step needs a dext child; it wrote {preview(self._head)}"
                )
        if self.protocol == "dext":
            return self._receive_dext(data)
        return self._receive_jsonl(data)

    def _eof(self) -> list[Event]:
        if not self.ready:
            raise ChildProtocolError(
                "closed its stdout before its ready message"
                + (f"; it wrote {preview(self._head)}" if self._head else " (wrote nothing)")
            )
        return []

    def _receive_dext(self, data: bytes) -> list[Event]:
        if self._frames is None:
            self._frames = dext.FrameDecoder()
        broke: dext.ProtocolError | None = None
        try:
            messages = self._frames.receive_data(data)
        except dext.ProtocolError as exc:
            messages, broke = exc.messages, exc  # the whole frames before the bad bytes first
        events: list[Event] = []
        try:
            self._dext_events(messages, events)
        except ChildProtocolError as exc:
            exc.events = events
            raise
        if broke is not None:
            if not self.ready:
                raise ChildProtocolError(
                    f"sent no valid dext Hello frame ({broke}); it wrote {preview(self._head)}"
                ) from None
            raise ChildProtocolError(f"dext framing error: {broke}", events) from None
        if not data:
            events.extend(self._eof())
        return events

    def _dext_events(self, messages: list[dext.Message], events: list[Event]) -> None:
        """Append the events of `messages` to `events`; ChildProtocolError at a bad one."""
        for msg in messages:
            if not self.ready:
                if not isinstance(msg, dext.Hello):
                    raise ChildProtocolError(
                        f"sent a dext {type(msg).__name__} frame before its Hello"
                    )
                if msg.protocol != dext.PROTOCOL_VERSION:
                    raise ChildProtocolError(
                        f"speaks {msg.protocol!r}, expected {dext.PROTOCOL_VERSION!r}"
                    )
                if msg.stage != self.stage:
                    raise ChildProtocolError(
                        f"Hello says stage {msg.stage!r}, but it was started for {self.stage!r}"
                    )
                self.ready = True
                events.append(Ready("dext", msg))
            elif isinstance(msg, dext.Response):
                events.append(Answer(msg.id, msg.output, msg.error))
            elif isinstance(msg, dext.Progress):
                phase = dext.short_phase(msg.phase)
                events.append(ProgressEvent(msg.id, phase, msg.done, msg.total))
            elif isinstance(msg, dext.Hello):
                raise ChildProtocolError(
                    f"sent a second Hello frame (pid {msg.pid}, prover {msg.prover!r}) after it"
                    " was ready: a child sends Hello once, at start, then only Response and"
                    " Progress frames"
                )
            else:
                raise ChildProtocolError(
                    f"sent a dext {type(msg).__name__} frame, which only a parent may send"
                )

    def _receive_jsonl(self, data: bytes) -> list[Event]:
        if self._lines is None:
            self._lines = jsonl.LineReader()
        if not data and not self.ready:
            return self._eof()  # a last line without its newline is not a ready line either
        events: list[Event] = []
        for line in self._lines.receive_data(data):
            if not self.ready:
                if isinstance(line, jsonl.LineTooLong) or not self._is_ready_line(line):
                    raise ChildProtocolError(
                        f"wrote {preview(self._head)} instead of the ready line"
                        f" {jsonl.ready_line(self.stage)!r}"
                    )
                self.ready = True
                events.append(Ready("jsonl", None))
                continue
            if isinstance(line, jsonl.LineTooLong):
                events.append(
                    Skipped(
                        f"skipped a stdout line of {line.length} bytes (limit {line.limit})",
                        # Its id, when it leads the line: that request is answered, not left.
                        jsonl.leading_id(line.head),
                    )
                )
                continue
            if not line.strip():
                continue
            try:
                resp = jsonl.decode_response(line, self.stage)
            except jsonl.JsonLineError as exc:
                if not data:  # cut off by the end of its output: it went down writing it
                    what = f"a stdout line cut off by the child's end, not read as an answer: {exc}"
                    events.append(Skipped(what, None, bytes(line)))
                    continue
                like = exc.id is None and jsonl.is_response_like(line)
                events.append(
                    Skipped(f"skipped a bad stdout line: {exc}", exc.id, bytes(line), like)
                )
                continue
            events.append(Answer(resp.id, resp.output, resp.err_msg))
        if not data:
            events.extend(self._eof())
        return events

    def _is_ready_line(self, line: bytes) -> bool:
        expected = jsonl.ready_line(self.stage)
        return line == expected or line == expected[:-1] + b"\r\n"

    # -- what we write -----------------------------------------------------------------------

    def encode_request(
        self, child_rid: int, task: Task, deadline: float | None = None, priority: int = 0,
        task_msgpack: bytes | None = None,
    ) -> bytes | bytearray:  # fmt: skip
        """The bytes that send request `child_rid` (deadline: unix time, dext only;
        `task_msgpack`: `task` encoded already, sent as it is)."""
        if self.protocol == "dext":
            if task_msgpack is not None:
                raw = msgspec.Raw(task_msgpack)
                return dext.encode(dext.RawRequest(child_rid, raw, deadline, priority))
            return dext.encode(dext.Request(child_rid, task, deadline, priority))
        return jsonl.encode_request(child_rid, task)

    def request_or_why(
        self, child_rid: int, task: Task, deadline: float | None, priority: int, rid: int,
        task_msgpack: bytes | None = None,
    ) -> bytes | bytearray | str:  # fmt: skip
        """`encode_request`'s bytes, or why no child can be sent this task, a sentence about
        the supervisor's request `rid`."""
        try:
            data = self.encode_request(child_rid, task, deadline, priority, task_msgpack)
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as exc:
            # E.g. an id over 2**64 - 1 from an API caller.
            return f"request {rid} ({stage_of(task)}): its task cannot be sent to a prover child: {exc}"
        if len(data) > MAX_REQUEST_BYTES:
            # A child refuses a frame (or line) this long, and dies of it: every sibling would
            # in turn. The task is the problem, not the child.
            return (
                f"request {rid} ({stage_of(task)}): its task is {len(data) / 2**20:.1f} MiB"
                f" on the wire ({len(task.replicas)} replicas), over the"
                f" {MAX_REQUEST_BYTES / 2**20:.0f} MiB a prover child takes in one message;"
                " split it into smaller tasks"
            )
        return data

    def encode_cancel(self, child_rid: int) -> bytearray | None:
        """The bytes that cancel `child_rid`, or None: a JSON-lines child cannot be cancelled."""
        if self.protocol == "dext":
            return dext.encode(dext.Cancel(child_rid))
        return None

    def encode_shutdown(self) -> bytearray | None:
        """The bytes asking the child to finish and exit (None: close its stdin instead)."""
        if self.protocol == "dext":
            return dext.encode(dext.Shutdown())
        return None
