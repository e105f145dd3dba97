"""The supervisor's records of the request book's Retry and Note effects, with the fields that
name what they are about (JSON logs; the text format shows the message only): `request_id`,
the supervisor's number of a request (the one its messages name), and a child's own fields
(`child`, `stage`, `index`, `pid`: `Child.fields`, as its stderr lines carry them).

Built only for a record that is logged: a request that goes well makes none of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..lifecycle import Note, Retry
    from .child_loop import Child

log = logging.getLogger("damocles_ext.supervisor")


def log_retry(effect: Retry, children: Mapping[str, Child]) -> None:
    """`request N: <what>; retrying (attempt A of M)`, with the request's id and the fields of
    the child whose attempt was lost, its `pid` that attempt's process."""
    req = effect.request
    level = logging.getLevelName(effect.level.upper())
    if not log.isEnabledFor(level):
        return
    fields = _child_fields(effect.child, effect.pid, children)
    fields["request_id"] = req.rid
    log.log(
        level,
        "request %d: %s; retrying (attempt %d of %d)",
        req.rid,
        effect.what,
        effect.attempt,
        effect.max_attempts,
        extra=fields,
    )


def log_note(effect: Note, children: Mapping[str, Child]) -> None:
    """The note's message, with the fields of the child it is about (its process: `pid`)."""
    level = logging.getLevelName(effect.level.upper())
    if not log.isEnabledFor(level):
        return
    fields = _child_fields(effect.child, effect.pid, children)
    if effect.request_id is not None:
        fields["request_id"] = effect.request_id
    if effect.faults is not None:
        fields["faults"] = effect.faults
    log.log(level, "%s", effect.message, extra=fields)


def _child_fields(
    name: str | None, pid: int | None, children: Mapping[str, Child]
) -> dict[str, Any]:
    """The fields of child `name` (none for None), its `pid` the one given (the process the
    record is about, which may have been replaced since), or none: the child's current one may
    be a process the record is not about (one starting, one gone)."""
    if name is None:
        return {}
    child = children.get(name)
    fields: dict[str, Any] = {**child.fields} if child is not None else {"child": name}
    if pid is None:
        fields.pop("pid", None)
    else:
        fields["pid"] = pid
    return fields
