"""Requests a front end gives the supervisor's `start_nowait`, answered by a callback: the one
way `run`'s control server and `serve` take a request, refusals and bugs included.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ..errors import DextError
from ..tasks import Output, Task

log = logging.getLogger("damocles_ext.frontends")

#: on_done(output, error): a request's one answer.
OnDone = Callable[[Output | None, DextError | None], None]


class CancelHandle(Protocol):
    """What abandons a request in flight: its task's cancel scope, or what `start` returned."""

    def cancel(self) -> None: ...


#: start(task, *, on_done, **options) -> a started request, or None to leave it to `submit`:
#: `Supervisor.start_nowait`, the callback form of `submit`, which needs no task per request.
Start = Callable[..., CancelHandle | None]

#: batch() -> a context within which the requests `start` takes go to the children together, at
#: its end (`Supervisor.batch`); a front end starts the requests of one read in one.
Batch = Callable[[], AbstractContextManager[object]]


class _Starting:
    def cancel(self) -> None:  # cancelled before `start` returned: nothing to cancel yet
        pass


STARTING = _Starting()


def internal_error(exc: Exception) -> str:
    """How a front end answers a request a bug of ours failed."""
    return f"internal error in damocles-ext: {type(exc).__name__}: {exc}"


class InternalError(DextError):
    """The answer to a request a bug of ours failed (internal_error's words), logged already
    with its traceback where it was caught: a front end does not warn about it again."""

    logged = True


def start_or_decline(
    start: Start,
    handles: dict[int, Any],
    rid: int,
    task: Task,
    on_done: OnDone,
    **options: Any,
) -> bool:
    """Give request `rid` to `start`, keeping what it returns in `handles[rid]` until `on_done`
    (which removes it) is called. True if it was taken: its answer comes through `on_done`,
    maybe already; a refusal raised by `start`, or a bug of ours, is given to `on_done` too.
    False: nothing was started, and the request goes to `submit`."""
    handles[rid] = STARTING  # its answer may come before `start` returns
    try:
        started = start(task, on_done=on_done, **options)
    except DextError as exc:  # refused at once (e.g. shutting down)
        handles.pop(rid, None)
        on_done(None, exc)
        return True
    except Exception as exc:  # noqa: BLE001 - a bug of ours must still answer the request
        error = bug_answer(log, rid, exc)
        handles.pop(rid, None)
        on_done(None, error)
        return True
    if started is None:
        handles.pop(rid, None)
        return False
    if handles.get(rid) is STARTING:  # not answered already
        handles[rid] = started
    return True


# "request 12 (window_post)" or "request 12": how the supervisor (and the codec) start a message
# about one request; "request 12 (window_post; request 3 in run's log)": how `run`'s control
# socket does, for its client (control.py).
_OWN_LABEL = re.compile(
    r"request (\d+)"
    r"(?: \((?:((?:window|winning)_post[a-z_]*)(?:; )?)?(?:request (\d{1,19}) in run's log)?\))?"
    r"(?=[ :;,])"
)


def own_label(message: str) -> tuple[str | None, str | None, str]:
    """(the supervisor's number, the stage it names, the rest) of a message about one request;
    (None, None, message) when it does not start with one."""
    own = _OWN_LABEL.match(message)
    if own is None:
        return None, None, message
    return own.group(1), own.group(2), message[own.end() :]


def for_client(rid: int, message: str) -> str:
    """`message` about the client's request `rid`, named by its id; the supervisor's own number
    for it, which `run`'s log uses, kept beside it."""
    number, stage, rest = own_label(message)
    if number is None:
        return f"request {rid}: {message}"
    return f"request {rid} ({f'{stage}; ' if stage else ''}request {number} in run's log){rest}"


def said_and_logged(rid: int, error: BaseException, logger: logging.Logger) -> str:
    """`error`, the answer to the client's request `rid`, in the client's words (for_client),
    logged once, as a warning with failure_fields: `run`'s record of an error answer, which the
    `request N in run's log` a client reads points to (the supervisor logs no answer: it
    raises it to its caller); not an error `logged` already (DextError.logged)."""
    said = for_client(rid, str(error) or repr(error))
    if not getattr(error, "logged", False):
        logger.warning("%s", said, extra=failure_fields(rid, error))
    return said


def bug_answer(
    logger: logging.Logger, rid: int, exc: Exception, what: str = "request %d: internal error"
) -> InternalError:
    """The answer to request `rid` (the caller's id) after a bug of ours, `exc`: logged once
    here, with its traceback and the answer's fields (`what`, a format of the id, says where)."""
    logger.error(what, rid, exc_info=exc, extra=failure_fields(rid, exc))
    return InternalError(internal_error(exc))


def failure_fields(caller_id: int | str, error: BaseException) -> dict[str, Any]:
    """The fields of a front end's record of a request's error answer (JSON logs):
    `caller_request_id`, the caller's own id for it (serve's damocles request id); and
    `request_id`, the supervisor's number for it, as the supervisor's own records about it
    (its retries, its kill) carry it: this process's supervisor's, or, for a request `run`
    answered through its control socket (serve --connect), the number in run's log. The
    caller's id alone if working out the rest fails (a bug there, or in what it imports): the
    record is written just before the answer, which must still go, and its connection go on."""
    fields: dict[str, Any] = {"caller_request_id": caller_id}
    try:
        if (rid := supervisor_number(error)) is not None:
            fields["request_id"] = rid
        if (job_id := getattr(error, "job_id", None)) is not None:  # serve --jobs: its job's
            # Imported here: loaded already by serve --jobs, and not needed by any other front end.
            from ..jobs.log_lines import job_fields

            fields.update(job_fields(job_id, getattr(error, "worker", None)))
    except Exception:  # noqa: BLE001 - a bug of ours in the fields: the caller's id is enough
        return {"caller_request_id": caller_id}
    return fields


def supervisor_number(error: BaseException) -> int | None:
    """The supervisor's number of the request `error` answers: this process's supervisor's,
    or the number in run's log its control socket wrote in the message; None if neither."""
    rid = getattr(error, "request_id", None)
    if rid is None and (own := _OWN_LABEL.match(str(error))) is not None and own.group(3):
        rid = int(own.group(3))
    return rid
