"""damocles' newline-delimited JSON protocol, both directions (sans-IO).

Byte-compatible with damocles-manager (Go, `pkg/extproc`) and vc-processors (Rust): the ready line
`<stage> processor ready\\n`, request lines `{"id":N,"task":{...}}` and response lines
`{"id":N,"err_msg":...,"output":...}`. Fixed 32-byte values (`seed`, `comm_r`) travel as arrays of
32 integers, proofs (byte strings) as standard base64 - Go's encoding of `[32]byte` and `[]byte`.

The JSON shapes are mirror structs here; the rest of the program uses `damocles_ext.tasks`.
Unknown fields are ignored on input, as Go's and serde's decoders do by default.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

import msgspec

from ..tasks import (
    Output,
    PoStOutput,
    PoStReplicaInfo,
    PoStTask,
    Task,
    WindowPoSt,
    WindowPoStOutput,
    WindowProofType,
    WinningPoSt,
    WinningPoStOutput,
    WinningProofType,
    over_64_bits,
    stage_of,
)
from .dext import NESTED_TOO_DEEPLY

DEFAULT_MAX_LINE = 64 * 1024 * 1024

_Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]
_Array32 = Annotated[list[_Byte], msgspec.Meta(min_length=32, max_length=32)]
_U64 = Annotated[int, msgspec.Meta(ge=0)]
#: damocles-manager reads ids into a uint64: an id beyond it cannot be answered (msgspec's
#: bounds stop at int64, so the decoders check this one themselves).
MAX_ID = 2**64 - 1
#: How much of a skipped over-long line is kept, to read its id (`{"id":<20 digits>,` fits).
LINE_HEAD = 64


class JsonLineError(Exception):
    """A line that is not a valid message. Recoverable: damocles logs it and reads on.

    `id` is the request id when it could be read, so the peer can still be answered.
    """

    def __init__(self, message: str, id: int | None = None) -> None:
        super().__init__(message)
        self.id = id


class _Replica(msgspec.Struct):
    sector_id: _U64
    comm_r: _Array32
    cache_dir: str
    sealed_file: str


class _WindowPoSt(msgspec.Struct):
    miner_id: _U64
    proof_type: WindowProofType
    replicas: list[_Replica]
    seed: _Array32


class _WinningPoSt(msgspec.Struct):
    miner_id: _U64
    proof_type: WinningProofType
    replicas: list[_Replica]
    seed: _Array32


# A null list reads as an empty one, as Go's encoding/json reads it for damocles-manager: a
# processor written in Go with damocles' own output type writes its nil slices as null
# (`"faults": null` beside proofs, `"proofs": null` beside faults). We always write lists.
class _WindowPoStOutput(msgspec.Struct):
    proofs: list[bytes] | None
    faults: list[_U64] | None


class _WinningPoStOutput(msgspec.Struct):
    proofs: list[bytes]


class _RequestHead(msgspec.Struct):
    id: _U64
    task: msgspec.Raw


class _ResponseHead(msgspec.Struct):
    id: _U64
    err_msg: str | None = None
    # Raw keeps the output undecoded until the stage's type is applied; a JSON null stays b"null".
    output: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


class JsonRequest(msgspec.Struct, frozen=True):
    id: int
    task: PoStTask


class JsonResponse(msgspec.Struct, frozen=True):
    id: int
    output: PoStOutput | None
    err_msg: str | None


class LineTooLong(msgspec.Struct, frozen=True):
    """A line longer than the limit was skipped; `length` is how much of it was seen, `head` its
    first LINE_HEAD bytes (enough to read its id, see `leading_id`)."""

    length: int
    limit: int
    head: bytes = b""


_JsonTask = _WindowPoSt | _WinningPoSt
_JsonOutput = _WindowPoStOutput | _WinningPoStOutput
_T = TypeVar("_T")

# damocles' JSON lines carry the two stages damocles-manager knows; the split WindowPoSt steps
# travel only in dext frames.
_task_decoders: dict[str, msgspec.json.Decoder[_JsonTask]] = {
    "window_post": msgspec.json.Decoder(_WindowPoSt),
    "winning_post": msgspec.json.Decoder(_WinningPoSt),
}
_output_decoders: dict[str, msgspec.json.Decoder[_JsonOutput]] = {
    "window_post": msgspec.json.Decoder(_WindowPoStOutput),
    "winning_post": msgspec.json.Decoder(_WinningPoStOutput),
}
_request_head = msgspec.json.Decoder(_RequestHead)
_response_head = msgspec.json.Decoder(_ResponseHead)
_encoder = msgspec.json.Encoder()


def ready_line(stage: str) -> bytes:
    """The line a damocles processor writes once it can take requests."""
    return f"{stage} processor ready\n".encode()


def is_ready_line(line: bytes, stage: str) -> bool:
    """True for the exact ready line (damocles-manager compares the whole line, newline included)."""
    return line == ready_line(stage)


def detect_protocol(first_byte: int) -> Literal["dext", "jsonl"]:
    """Which protocol a child speaks, from the first byte it writes.

    A dext frame starts with the high byte of a length far below 16 MiB, so a small number; the
    ready line starts with a letter of the stage name.
    """
    return "jsonl" if 0x20 < first_byte < 0x7F else "dext"


def _check_stage(stage: str) -> None:
    if stage not in _task_decoders:
        raise ValueError(
            f"unknown stage {stage!r}; expected 'window_post' or 'winning_post' (the split"
            " WindowPoSt steps have no JSON form)"
        )


# -- tasks ---------------------------------------------------------------------------------------


def _task_to_json_struct(task: Task) -> _JsonTask:
    if not isinstance(task, WindowPoSt | WinningPoSt):
        raise TypeError(f"a {stage_of(task)} task has no damocles JSON form; it needs dext")
    replicas = [
        _Replica(r.sector_id, list(r.comm_r), r.cache_dir, r.sealed_file) for r in task.replicas
    ]
    if isinstance(task, WindowPoSt):
        return _WindowPoSt(task.miner_id, task.proof_type, replicas, list(task.seed))
    return _WinningPoSt(task.miner_id, task.proof_type, replicas, list(task.seed))


def _task_from_json_struct(j: _JsonTask) -> PoStTask:
    replicas = [
        PoStReplicaInfo(r.sector_id, bytes(r.comm_r), r.cache_dir, r.sealed_file)
        for r in j.replicas
    ]
    if isinstance(j, _WindowPoSt):
        return WindowPoSt(j.miner_id, j.proof_type, replicas, bytes(j.seed))
    return WinningPoSt(j.miner_id, j.proof_type, replicas, bytes(j.seed))


def _decode(decoder: msgspec.json.Decoder[_T], data: bytes | str, what: str) -> _T:
    """Decode a whole JSON document; JsonLineError says whether it is malformed or invalid."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:  # a DecodeError subclass: test it first
        raise JsonLineError(f"invalid {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise JsonLineError(f"malformed JSON in {what}: {exc}") from None
    except RecursionError:  # msgspec's nesting limit is Python's recursion limit
        raise JsonLineError(f"malformed JSON in {what}: {NESTED_TOO_DEEPLY}") from None


def task_to_json(task: Task) -> bytes:
    """The damocles JSON form of a task (the wire's `task` field)."""
    return _encoder.encode(_task_to_json_struct(task))


def task_from_json(data: bytes | str, stage: str) -> PoStTask:
    """Parse a task in damocles' JSON form; raises JsonLineError saying what and where."""
    _check_stage(stage)
    task = _task_from_json_struct(_decode(_task_decoders[stage], data, f"{stage} task"))
    if (too_big := over_64_bits(task)) is not None:
        raise JsonLineError(f"invalid {stage} task: {too_big}")
    return task


def _output_to_json_struct(output: Output) -> _JsonOutput:
    if isinstance(output, WindowPoStOutput):
        return _WindowPoStOutput(proofs=list(output.proofs), faults=list(output.faults))
    if isinstance(output, WinningPoStOutput):
        return _WinningPoStOutput(proofs=list(output.proofs))
    raise TypeError(f"a {stage_of(output)} output has no damocles JSON form; it needs dext")


def output_to_json(output: Output) -> bytes:
    """The damocles JSON form of an output: proofs as base64 strings."""
    return _encoder.encode(_output_to_json_struct(output))


def _output_from_json_struct(j: _JsonOutput) -> PoStOutput:
    if isinstance(j, _WindowPoStOutput):
        return WindowPoStOutput(proofs=j.proofs or [], faults=j.faults or [])
    return WinningPoStOutput(proofs=j.proofs)


def output_from_json(data: bytes | str, stage: str) -> PoStOutput:
    """Parse an output in damocles' JSON form; raises JsonLineError saying what and where."""
    _check_stage(stage)
    return _output_from_json_struct(_decode(_output_decoders[stage], data, f"{stage} output"))


# -- lines ---------------------------------------------------------------------------------------


class _RequestLine(msgspec.Struct):
    id: int
    task: _JsonTask


class _ResponseLine(msgspec.Struct, omit_defaults=False):
    id: int
    err_msg: str | None
    output: _JsonOutput | None


def encode_request(id: int, task: Task) -> bytes:
    """One request line, newline included, as damocles-manager writes it."""
    return _encoder.encode(_RequestLine(id, _task_to_json_struct(task))) + b"\n"


def encode_response(id: int, output: Output | None = None, err_msg: str | None = None) -> bytes:
    """One response line, newline included, in the form damocles-manager decodes."""
    if (output is None) == (err_msg is None):
        raise ValueError("a response carries exactly one of output and err_msg")
    out = None if output is None else _output_to_json_struct(output)
    return _encoder.encode(_ResponseLine(id, err_msg, out)) + b"\n"


def _strip_eol(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\n") else line


# damocles (Go's encoding/json) writes the id as the first member: `{"id":N,...`.
_WS = rb"[ \t\r\n]*"
_LEADING_ID = re.compile(
    _WS + rb"\{" + _WS + rb'"id"' + _WS + b":" + _WS + rb"(0|[1-9][0-9]{0,19})" + _WS + b"[,}]"
)


def leading_id(data: bytes) -> int | None:
    """The id of a line that cannot be decoded whole, if it is the line's first member and fits
    in 64 bits (as damocles writes it); None otherwise."""
    match = _LEADING_ID.match(data)
    if match is None:
        return None
    value = int(match.group(1))
    return value if value <= MAX_ID else None


def is_response_like(line: bytes) -> bool:
    """Whether a line whose id could not be read is still a response: a JSON object with an
    `output` or an `err_msg` (a child's answer with its id mangled, not a stray line, which a
    child may print, as a JSON logger writing to stdout does)."""
    try:
        obj = msgspec.json.decode(_strip_eol(line))
    except (msgspec.DecodeError, RecursionError):
        return False
    return isinstance(obj, dict) and ("output" in obj or "err_msg" in obj)


def _bad_head(kind: str, line: bytes, exc: Exception | None) -> JsonLineError:
    """A line whose head (the id, at least) did not decode; its id may still be readable."""
    reason = NESTED_TOO_DEEPLY if exc is None else str(exc)
    id = leading_id(line)
    if id is None:
        return JsonLineError(f"not a {kind} line: {reason}; line: {preview(line)}")
    return JsonLineError(f"{kind} {id}: not a valid {kind} line: {reason}", id=id)


def _id_too_big(kind: str, id: int, line: bytes) -> JsonLineError:
    return JsonLineError(
        f"not a {kind} line: its id {id} does not fit in 64 bits, so damocles cannot read it;"
        f" line: {preview(line)}"
    )


def decode_request(line: bytes, stage: str) -> JsonRequest:
    """Parse a request line for a child of `stage`; raises JsonLineError (with the id if readable)."""
    _check_stage(stage)
    try:
        head = _request_head.decode(_strip_eol(line))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _bad_head("request", line, exc) from None
    except RecursionError:
        raise _bad_head("request", line, None) from None
    if head.id > MAX_ID:
        raise _id_too_big("request", head.id, line)
    try:
        task = _task_from_json_struct(_task_decoders[stage].decode(head.task))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise JsonLineError(f"request {head.id}: invalid {stage} task: {exc}", id=head.id) from None
    except RecursionError:
        raise JsonLineError(
            f"request {head.id}: invalid {stage} task: {NESTED_TOO_DEEPLY}", id=head.id
        ) from None
    if (too_big := over_64_bits(task)) is not None:
        raise JsonLineError(f"request {head.id}: invalid {stage} task: {too_big}", id=head.id)
    return JsonRequest(head.id, task)


def decode_response(line: bytes, stage: str) -> JsonResponse:
    """Parse a response line from a child of `stage`; raises JsonLineError (with the id if readable)."""
    _check_stage(stage)
    try:
        head = _response_head.decode(_strip_eol(line))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _bad_head("response", line, exc) from None
    except RecursionError:
        raise _bad_head("response", line, None) from None
    if head.id > MAX_ID:
        raise _id_too_big("response", head.id, line)
    if head.err_msg is not None:
        return JsonResponse(head.id, None, head.err_msg)
    if bytes(head.output).strip() == b"null":
        raise JsonLineError(f"response {head.id} has neither output nor err_msg", id=head.id)
    try:
        output = _output_from_json_struct(_output_decoders[stage].decode(head.output))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise JsonLineError(
            f"response {head.id}: invalid {stage} output: {exc}", id=head.id
        ) from None
    except RecursionError:
        raise JsonLineError(
            f"response {head.id}: invalid {stage} output: {NESTED_TOO_DEEPLY}", id=head.id
        ) from None
    return JsonResponse(head.id, output, None)


def preview(data: bytes, limit: int = 200) -> str:
    """A short printable rendering of bytes for log lines."""
    text = repr(bytes(data[:limit]))
    return text + (f"... ({len(data)} bytes)" if len(data) > limit else "")


class LineReader:
    """Splits a byte stream into lines (newline kept), skipping lines longer than `max_line`.

    `receive_data(b"")` means end of stream: a last line without a newline is returned as is.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._skipping = 0  # > 0 while discarding the rest of an over-long line
        self._head = b""  # the first bytes of the line being skipped

    def _keep_head(self, more: bytes) -> None:
        if len(self._head) < LINE_HEAD:
            self._head = (self._head + more)[:LINE_HEAD]

    def _too_long(self, length: int) -> LineTooLong:
        marker = LineTooLong(length, self.max_line, self._head)
        self._skipping = 0
        self._head = b""
        return marker

    def partial_head(self) -> bytes:
        """The first bytes of the line received in part (no newline yet), b"" when none."""
        return self._head if self._skipping else bytes(self._buf[:LINE_HEAD])

    def receive_data(self, data: bytes) -> list[bytes | LineTooLong]:
        """Feed bytes; returns the complete lines and LineTooLong markers they finish."""
        out: list[bytes | LineTooLong] = []
        if not data:
            if self._skipping:
                out.append(self._too_long(self._skipping))
            elif self._buf:
                out.append(bytes(self._buf))
                self._buf.clear()
            return out
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                rest = len(data) - start
                if self._skipping:
                    self._skipping += rest
                    self._keep_head(data[start : start + LINE_HEAD])
                elif len(self._buf) + rest > self.max_line:
                    self._skipping = len(self._buf) + rest
                    self._head = bytes(self._buf[:LINE_HEAD]) + data[start : start + LINE_HEAD]
                    self._head = self._head[:LINE_HEAD]
                    self._buf.clear()
                else:
                    self._buf += data[start:]
                return out
            piece = data[start : nl + 1]
            if self._skipping:
                self._keep_head(piece[:LINE_HEAD])
                out.append(self._too_long(self._skipping + len(piece)))
            elif len(self._buf) + len(piece) > self.max_line + 1:
                self._head = (bytes(self._buf[:LINE_HEAD]) + piece[:LINE_HEAD])[:LINE_HEAD]
                out.append(self._too_long(len(self._buf) + len(piece)))
                self._buf.clear()
            elif self._buf:
                self._buf += piece
                out.append(bytes(self._buf))
                self._buf.clear()
            else:
                out.append(bytes(piece))
            start = nl + 1
