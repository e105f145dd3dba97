"""What the request book asks its driver to do: plain records, carried out in order."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from ..tasks import Output

if TYPE_CHECKING:
    from .records import TrackedRequest


class Send(msgspec.Struct, frozen=True):
    """Send `request`'s task to the process of `child`, under that process's id `child_rid`.

    If the task cannot be encoded (or is too long for a child), tell the book with
    `RequestBook.unsendable`: it frees the slot and answers the request.
    """

    request: TrackedRequest
    child: str
    child_rid: int


class SendCancel(msgspec.Struct, frozen=True):
    """Tell the process of `child` to stop its request `child_rid` (a dext Cancel; a JSON-lines
    child cannot be told, and the driver sends nothing)."""

    child: str
    child_rid: int


class Kill(msgspec.Struct, frozen=True):
    """Kill the process of `child` now (its process group): it is hung or ignored a Cancel.

    The book already took it down (no more requests go to it); `reason` is for the log and the
    child's last exit; its requests come back through `RequestBook.child_lost`. `request_id`:
    the request it is killed over, if one (for the record's fields).
    """

    child: str
    reason: str
    request_id: int | None = None


class Resolve(msgspec.Struct, frozen=True):
    """Answer `request`, once: with `output`, or with `error` (a whole sentence).

    `outcome` is the observers' word: ok, fault, error, timeout or cancelled. `late`: no proof
    in time (its deadline passed, or it was refused as unable to finish before it), not a
    failure of a prover's (a request timeout is a `timeout` but not `late`).
    """

    request: TrackedRequest
    output: Output | None
    error: str | None
    outcome: str
    late: bool = False


class Retry(msgspec.Struct, frozen=True):
    """`request`'s attempt was lost (`what`) and it is queued again (attempt `attempt` of
    `max_attempts` comes next); a caller following it must stop reading the old child.
    `child` and `pid`: where the lost attempt ran (the request may be sent elsewhere already)."""

    request: TrackedRequest
    what: str
    attempt: int
    max_attempts: int
    level: str = "warning"  # for the log: "info" for a request taken back (nothing failed)
    child: str | None = None
    pid: int | None = None


class ReportProgress(msgspec.Struct, frozen=True):
    """A progress report of `request`'s running attempt, for its caller."""

    request: TrackedRequest
    phase: str
    done: int
    total: int


class Note(msgspec.Struct, frozen=True):
    """Something the operator should see in the log (`level`: a logging level name); `child`
    and `pid` name the process it is about, `request_id` the request, for the record's fields
    (JSON logs); `faults`: how many faulty sectors a request was answered with (the note that
    says so)."""

    level: str
    message: str
    child: str | None = None
    pid: int | None = None
    request_id: int | None = None
    faults: int | None = None


Effect = Send | SendCancel | Kill | Resolve | Retry | ReportProgress | Note
