"""The request lifecycle, sans-IO: the request book (`book.RequestBook`) and its effects.

Events in (with `now`), effects out; the supervisor (`supervisor.core`) is the driver that feeds
it and carries the effects out. See `book` for the rules.
"""

from .book import RequestBook
from .effects import Effect, Kill, Note, ReportProgress, Resolve, Retry, Send, SendCancel
from .records import Attempt, ChildLimits, TrackedRequest, UnknownChild

__all__ = [
    "Attempt",
    "ChildLimits",
    "Effect",
    "Kill",
    "Note",
    "ReportProgress",
    "RequestBook",
    "Resolve",
    "Retry",
    "Send",
    "SendCancel",
    "TrackedRequest",
    "UnknownChild",
]
