"""dext/1: length-prefixed msgpack frames between a supervisor and a prover child (sans-IO).

A frame is a 4-byte big-endian payload length followed by that many bytes of msgpack. The
payload is one message of a msgspec tagged union (tag field "type"); structs are msgpack maps,
except a task's replicas, which are arrays `[sector_id, comm_r, cache_dir, sealed_file]` (see
`tasks.PoStReplicaInfo`). The byte layout lives here and nowhere else.

The decoder is fed arbitrary chunks and hands back whole messages; bad bytes raise a
ProtocolError that carries the whole messages before them in the same chunk. It keeps one bytearray and an
offset into it, so feeding n bytes costs O(n) however they are chunked; consumed bytes are dropped
in one slice once they are more than half of the buffer. The maximum frame size is enforced from
the length prefix alone, before any of the payload is buffered, so a hostile 4 GiB prefix costs
nothing.
"""

from __future__ import annotations

import struct

import msgspec

from ..tasks import Output, Task

PROTOCOL_VERSION = "dext/1"
HEADER_SIZE = 4
#: A Progress phase longer than this is cut (with "..."), by the runtime as it sends it and by
#: the supervisor as it reads it: it is re-sent with every heartbeat and shown in `status`.
MAX_PHASE_CHARS = 256
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
_MAX_LENGTH_FIELD = 2**32 - 1
#: The length prefix of the frame at an offset of a buffer (a tuple of one int).
_unpack_length = struct.Struct(">I").unpack_from
_pack_length = struct.Struct(">I").pack_into
_FIRST_ROOM = 512  # bytes a frame's buffer starts with: most frames fit (encode)
#: A payload shorter than this is decoded from a copy rather than a memoryview of the input.
_COPY_BELOW = 64 * 1024
#: What a decoder says of a message whose containers nest deeper than it can follow (no message
#: of ours nests more than a handful of levels).
NESTED_TOO_DEEPLY = "its values are nested too deeply to decode (hundreds of levels)"


def short_phase(phase: str) -> str:
    """`phase` cut to MAX_PHASE_CHARS (a prover that puts a whole log in it)."""
    return phase if len(phase) <= MAX_PHASE_CHARS else phase[:MAX_PHASE_CHARS] + "..."


class ProtocolError(Exception):
    """The peer broke the protocol; the message says what was wrong. Fatal for a dext peer.

    `messages`: the whole, valid frames that came before the bad bytes in the same input (a
    Response, then a stray printf in one write). A peer acts on them first, then on the error,
    so that what it does does not depend on where the pipe split the bytes."""

    def __init__(self, message: str, messages: list[Message] | None = None) -> None:
        super().__init__(message)
        self.messages: list[Message] = messages if messages is not None else []


class FrameTooLarge(ProtocolError):
    """A frame whose length prefix says `length` bytes, over the decoder's `limit`."""

    def __init__(self, length: int, limit: int, messages: list[Message] | None = None) -> None:
        super().__init__(
            f"frame length {length} exceeds the maximum of {limit} bytes (is the peer speaking"
            " dext/1?)",
            messages,
        )
        self.length = length
        self.limit = limit

    def __reduce__(self) -> tuple[type[FrameTooLarge], tuple[int, int, list[Message]]]:
        # Its arguments are not its message: pickling and copying give them back.
        return (type(self), (self.length, self.limit, self.messages))


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """First frame a child writes: it is ready, which prover it runs and how many requests at once."""

    protocol: str
    stage: str
    pid: int
    prover: str
    version: str
    capacity: int = 1
    queue: int = 0  # requests it takes beyond capacity, to run in turn (quick ones are sent)


class Request(msgspec.Struct, tag="request", frozen=True):
    """Prove `task`. `deadline` is a unix time in seconds; higher `priority` goes first."""

    id: int
    task: Task
    deadline: float | None = None
    priority: int = 0


class RawRequest(msgspec.Struct, tag="request", frozen=True):
    """A `Request` whose task is msgpack already (`tasks.task_check`'s, made when the caller's
    task was checked): the same bytes on the wire, the task not encoded a second time. Sent,
    never decoded (a `Request` is read)."""

    id: int
    task: msgspec.Raw
    deadline: float | None = None
    priority: int = 0


class Response(msgspec.Struct, tag="response", frozen=True):
    """The one answer to request `id`: an output, or an error saying why there is none."""

    id: int
    output: Output | None = None
    error: str | None = None


class Progress(msgspec.Struct, tag="progress", frozen=True):
    """Child -> parent while working on `id`; also the liveness signal of a busy child."""

    id: int
    phase: str
    done: int = 0
    total: int = 0


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    """Parent -> child: stop working on `id` and answer it with an error."""

    id: int


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    """Parent -> child: finish what is in flight, then exit."""


Message = Hello | Request | Response | Progress | Cancel | Shutdown

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: msgspec.Struct) -> bytearray:
    """One whole frame: the payload's length as 4 big-endian bytes, then the payload.

    Any struct frames alike: the control socket sends its own messages in dext frames."""
    # Encoded after the header's room, in one buffer sized for most frames (msgspec grows it as
    # needed and cuts it to the frame): no second copy. A copy of a frame of a few hundred KiB
    # (a 2349-replica task, vanilla proofs) is a fresh allocation the size of it, paid in page
    # faults each time: 70 per 200 KiB frame, three times the time of encoding it.
    frame = bytearray(_FIRST_ROOM)
    _encoder.encode_into(message, frame, HEADER_SIZE)
    length = len(frame) - HEADER_SIZE
    if length > _MAX_LENGTH_FIELD:
        raise ProtocolError(f"message of {length} bytes does not fit in a dext frame")
    _pack_length(frame, 0, length)
    return frame


def decode_payload(
    payload: bytes | memoryview, decoder: msgspec.msgpack.Decoder[Message] = _decoder
) -> Message:
    """Decode one frame's payload (without its length prefix)."""
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _undecodable(len(payload), exc) from None


def _undecodable(
    length: int, exc: Exception, messages: list[Message] | None = None
) -> ProtocolError:
    """The error for a payload of `length` bytes its decoder raised `exc` on, after the whole
    frames `messages` of the same input."""
    # msgspec decodes nested containers recursively, bounded by Python's recursion limit; a few
    # KB of nesting must be the peer's protocol error, not an exception that ends whatever task
    # reads the frame.
    what = NESTED_TOO_DEEPLY if isinstance(exc, RecursionError) else str(exc)
    return ProtocolError(f"undecodable dext frame of {length} bytes: {what}", messages)


class FrameDecoder:
    """Turns a byte stream into dext messages. `receive_data(b"")` signals end of stream.

    `message_type` widens or narrows the message set carried in the same framing (the control
    socket adds its own messages); it defaults to the child protocol's `Message` union.
    """

    def __init__(
        self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, message_type: object = None
    ) -> None:
        self.max_frame_size = max_frame_size
        self._decoder = _decoder if message_type is None else msgspec.msgpack.Decoder(message_type)
        self._buf = bytearray()  # the start of a frame not yet whole
        self._closed = False

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a whole message."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> list[Message]:
        """Feed bytes; returns every message they complete. Raises ProtocolError on bad input,
        with the whole messages before it in its `messages`."""
        if self._closed:
            raise ProtocolError("data received after end of stream")
        if not data:
            self._closed = True
            if self._buf:
                raise ProtocolError(
                    f"stream ended inside a frame ({len(self._buf)} bytes of an incomplete frame)"
                )
            return []
        buf = self._buf
        if not buf:
            # Nothing buffered (the common case: whole frames per read): decode straight from
            # `data`, and buffer only an incomplete frame at its end.
            return self._frames(data)
        buf += data
        if len(buf) < HEADER_SIZE:
            return []
        (length,) = _unpack_length(buf, 0)
        if length <= self.max_frame_size and len(buf) - HEADER_SIZE < length:
            return []  # still inside its first frame: no copy until it is whole
        # The buffered frame is whole (or its length is refused): decode from one copy.
        whole = bytes(buf)
        buf.clear()
        return self._frames(whole)

    def _frames(self, data: bytes) -> list[Message]:
        """The whole frames at the start of `data`; the rest is buffered."""
        messages: list[Message] = []
        pos = 0
        end = len(data)
        decode = self._decoder.decode  # what decode_payload does, without a call per frame
        try:
            while end - pos >= HEADER_SIZE:
                (length,) = _unpack_length(data, pos)
                if length > self.max_frame_size:
                    self._buf += memoryview(data)[pos:]  # as the buffered path leaves it
                    raise FrameTooLarge(length, self.max_frame_size, messages)
                start = pos + HEADER_SIZE
                if end - start < length:
                    break
                pos = start + length
                # A small payload is cheaper copied than viewed (a memoryview and its slice).
                payload = data[start:pos] if length < _COPY_BELOW else memoryview(data)[start:pos]
                messages.append(decode(payload))
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _undecodable(length, exc, messages) from None
        if pos < end:
            self._buf += memoryview(data)[pos:]
        return messages
