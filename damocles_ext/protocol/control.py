"""Messages of `run`'s control socket (sans-IO): dext/1 frames, plus the status exchange.

The control socket carries the child protocol's framing and its Request/Cancel/Progress (see
dext.py), a Response of its own (ControlResponse), and two messages of its own:

* client -> supervisor: `StatusRequest{id}`;
* supervisor -> client: `StatusReply{id, status, error, worker}`, where `status` is the status
  document (schema "damocles-ext/status/1", see docs/STATUS.md) as plain msgpack data, or
  `error` says why there is none (and `worker` is a not yet started worker's part of it).

Ids of status requests come from the same per-connection counter as proof requests. A
supervisor that predates these messages closes the connection on a `StatusRequest` (it is not
a message it can decode), which a client reports as "cannot get the status".

* supervisor -> client: `ControlResponse{id, output, error, kind}`, the control socket's own
  Response: a child's (dext.Response, whose tag it shares) with one field more, `kind`. A
  child's frames are decoded as dext.Response, which has none: a child that sends the key has
  it skipped, as any unknown key. On an error answer the supervisor sets it to USAGE when the
  request is the caller's to fix (no child of its stage in this supervisor, a worker's socket,
  which takes no proofs, a request the supervisor refuses as malformed), else to None (a
  failure of the proof). Our client raises ProverUsageError (a UsageError that is also a
  ProverError) on USAGE straight from the answer; a Response without the field (UNSET) is a
  supervisor's older than it, which a client may ask for its status to tell the two apart.

* supervisor -> client: `Refusal{error}`, the last frame of a connection the supervisor closes
  because of a frame it could not take from the client (`refusal_reason` words why). It answers
  every request and status request of the connection that had no answer before it: failed, not
  proved, and not to be sent again as they are. It is a message type of its own, not the id-0
  Response (which says "nothing more was read: safe to send again"): a client older than it
  cannot decode it and reports a protocol error, which it does not take for that goodbye either.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .. import __version__
from ..tasks import Output
from . import dext

STATUS_SCHEMA = "damocles-ext/status/1"

#: A Response's `kind` for a request the caller must fix (its task, its --socket, the config of
#: the `run` it went to), not a failure of a prover: `prove --socket` exits 2 on it.
USAGE = "usage"


class StatusRequest(msgspec.Struct, tag="status", frozen=True):
    """Client -> supervisor: send me the status document."""

    id: int


class StatusReply(msgspec.Struct, tag="status_reply", frozen=True):
    """Supervisor -> client: the status document (plain data), or why there is none; with that
    `error`, a damocles-ext worker that has not started its supervisor yet sends `worker`, the
    document's worker part alone (its socket refuses proofs, started or not)."""

    id: int
    status: dict[str, Any] | None = None
    error: str | None = None
    worker: dict[str, Any] | None = None


class ControlResponse(msgspec.Struct, tag="response", frozen=True):
    """Supervisor -> client: the one answer to request `id`, an output or an error saying why
    there is none (dext.Response's fields), and on an error the `kind` the supervisor says:
    USAGE, None, or UNSET (the default, never written: a success, the id-0 Response, and every
    answer of a supervisor older than the field has none)."""

    id: int
    output: Output | None = None
    error: str | None = None
    kind: str | msgspec.UnsetType | None = msgspec.UNSET


class Refusal(msgspec.Struct, tag="refusal", frozen=True):
    """Supervisor -> client, its last frame: why it closes the connection over what the client
    sent. What the connection had not answered before it is failed with `error`."""

    error: str


ControlMessage = (
    dext.Hello
    | dext.Request
    | ControlResponse
    | dext.Progress
    | dext.Cancel
    | dext.Shutdown
    | StatusRequest
    | StatusReply
    | Refusal
)


def frame_decoder(max_frame_size: int = dext.DEFAULT_MAX_FRAME_SIZE) -> dext.FrameDecoder:
    """A frame decoder for the control socket's message set."""
    return dext.FrameDecoder(max_frame_size, message_type=ControlMessage)


def encode(message: ControlMessage) -> bytearray:
    """One whole frame (the dext/1 layout) for any control message."""
    return dext.encode(message)


def refusal_reason(problem: dext.ProtocolError | str) -> str:
    """Why the supervisor refuses a client that sent a frame it cannot take: `problem` is the
    decoder's error, or the name of a message type clients do not send."""
    if isinstance(problem, dext.FrameTooLarge):
        length, limit, most = problem.length, problem.limit, dext.DEFAULT_MAX_FRAME_SIZE
        said = f"the client sent a frame of {length} bytes, over this supervisor's limit of {limit}"
        if length <= most:  # only a limit below dext's own: run's --max-buffer
            return (
                f"{said} (run's --max-buffer, {_size(limit)}): restart `run` with a"
                f" --max-buffer of at least {-(-length // 2**20)} MiB, or send smaller requests"
                " (fewer replicas per task)"
            )
        return (
            f"{said} ({most / 2**20:g} MiB is the most a dext/1 frame may hold): is the client"
            " speaking dext/1? A task that large must be split into requests of fewer replicas"
        )
    if isinstance(problem, str):
        what = f"a {problem} frame, which no client sends"
    else:
        what = f"a frame it could not decode ({problem})"
    return (
        f"the client sent {what}: is it another version of damocles-ext than this supervisor's"
        f" ({__version__})? Their control messages differ between versions (a new message type,"
        " a field renamed or retyped): use the damocles-ext (or Python library) of the version"
        " `run` runs, or restart `run` with the client's version"
    )


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"
