"""The control socket's answers to `StatusRequest{id}` (control.py reads the requests and writes
the replies): the status document, or why there is none, and how many may be answered at once."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ..config import TABLE_OF_STAGE
from ..errors import DextError, NotStartedError
from ..protocol import control as control_protocol
from ..stages import WINDOW_POST_SPLIT
from .started import internal_error

log = logging.getLogger("damocles_ext.control")

# Status requests of one connection being answered (or their replies not yet written) before
# we stop reading from it: a client that sends them without reading the replies would otherwise
# start a task and a /proc walk per request, and queue every reply.
MAX_STATUS_IN_FLIGHT = 16
# Status requests being answered on all connections together: each is a task and a /proc walk of
# every child's tree, so many connections each within their own bound must not add up to more.
# One past it is answered at once with an error reply.
MAX_STATUS_IN_FLIGHT_SERVER = 64

#: Where the status document comes from (ControlServer's `status`), if this supervisor has one.
StatusFn = Callable[[], Awaitable[dict[str, object]]]


def no_child_problem(path: object, stage: str, serves: Callable[[str], bool]) -> str:
    """What is wrong with a request of `stage` sent to the supervisor at `path`, which has no
    child of it (`serves(stage)`: whether it has children of `stage`): the config of that `run`
    (or the socket the caller chose)."""
    table = TABLE_OF_STAGE[stage]
    said = f"the supervisor at {path} has no [[{table}]] child, so it cannot prove {stage} requests"
    run = "the config of that `damocles-ext run`"
    if stage not in WINDOW_POST_SPLIT:
        return f"{said}; add a [[{table}]] table to {run} and restart it"
    # A split step: the config takes both split tables or neither, and never with [[WdPost]].
    both = " and ".join(f"[[{TABLE_OF_STAGE[s]}]]" for s in WINDOW_POST_SPLIT)
    if serves("window_post"):  # whole, with [[WdPost]]
        return (
            f"{said}: it proves WindowPoSt whole ([[WdPost]]), not in steps; send a window_post"
            f" task instead, or replace the [[WdPost]] tables in {run} with {both} tables and"
            " restart it"
        )
    return f"{said}; add both {both} tables to {run} and restart it"


def busy_reply(request_id: int) -> control_protocol.StatusReply:
    """The answer to a status request past MAX_STATUS_IN_FLIGHT_SERVER."""
    return control_protocol.StatusReply(
        request_id,
        error=(
            f"{MAX_STATUS_IN_FLIGHT_SERVER} status requests are being answered already (all"
            " connections together); try again in a moment"
        ),
    )


async def status_reply(status: StatusFn | None, request_id: int) -> control_protocol.StatusReply:
    """The answer to status request `request_id`: `status()`'s document, or why there is none
    (with a worker's part when the worker has not started its children yet)."""
    reply = control_protocol.StatusReply
    if status is None:
        return reply(request_id, error="this supervisor does not report its status")
    try:
        return reply(request_id, status=await status())
    except DextError as exc:  # said to the asker (a source logs what its operator must see)
        worker = exc.worker_part if isinstance(exc, NotStartedError) else None
        return reply(request_id, error=str(exc), worker=worker)
    except Exception as exc:  # a bug of ours must still answer, and not kill `run`
        log.exception("status request %d: internal error", request_id)
        return reply(request_id, error=internal_error(exc))
