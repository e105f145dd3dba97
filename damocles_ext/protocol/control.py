"""Messages of `run`'s control socket (sans-IO): dext/1 frames, plus the status exchange.

The control socket carries the child protocol's framing and its Request/Cancel/Progress/Response
(see dext.py), and two messages of its own:

* client -> supervisor: `StatusRequest{id}`;
* supervisor -> client: `StatusReply{id, status, error}`, where `status` is the status document
  (schema "damocles-ext/status/1", see docs/STATUS.md) as plain msgpack data, or `error` says
  why there is none.

Ids of status requests come from the same per-connection counter as proof requests. A
supervisor that predates these messages closes the connection on a `StatusRequest` (it is not
a message it can decode), which a client reports as "cannot get the status".
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import dext

STATUS_SCHEMA = "damocles-ext/status/1"


class StatusRequest(msgspec.Struct, tag="status", frozen=True):
    """Client -> supervisor: send me the status document."""

    id: int


class StatusReply(msgspec.Struct, tag="status_reply", frozen=True):
    """Supervisor -> client: the status document (plain data), or why there is none."""

    id: int
    status: dict[str, Any] | None = None
    error: str | None = None


ControlMessage = (
    dext.Hello
    | dext.Request
    | dext.Response
    | dext.Progress
    | dext.Cancel
    | dext.Shutdown
    | StatusRequest
    | StatusReply
)


def frame_decoder(max_frame_size: int = dext.DEFAULT_MAX_FRAME_SIZE) -> dext.FrameDecoder:
    """A frame decoder for the control socket's message set."""
    return dext.FrameDecoder(max_frame_size, message_type=ControlMessage)


def encode(message: ControlMessage) -> bytes:
    """One whole frame (the dext/1 layout) for any control message."""
    return dext.encode(message)
