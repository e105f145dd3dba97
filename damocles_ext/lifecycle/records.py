"""The request book's records: a child's limits and state, a request, an attempt, an alarm.

They are the book's own (`book.RequestBook` changes them); the driver reads `TrackedRequest` and
`Attempt` in the effects it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from ..tasks import Task, WindowPoStSnark
from .deadlines import Alarm

#: The protocol whose children can be sent a Cancel and must report progress while they work.
DEXT = "dext"


class UnknownChild(KeyError):
    """An event named a child the book was not given (`add_child`): a bug of the caller."""


@dataclass(frozen=True, slots=True)
class ChildLimits:
    """A child's request rules, in seconds; 0 turns a timeout off."""

    max_attempts: int = 1
    request_timeout: float = 0.0
    cancel_grace: float = 10.0
    heartbeat_timeout: float = 0.0  # dext children only
    stdin_timeout: float = 0.0


class TrackedRequest(msgspec.Struct, eq=False):
    """A request from submission until it is answered, across all its attempts."""

    rid: int
    task: Task
    stage: str
    arrival: float
    deadline: float | None  # on the book's clock
    deadline_unix: float | None  # as the caller gave it, for the wire
    priority: int
    attempts: int = 0  # times sent to a child
    free_tries: int = 0  # of them, a WinningPoSt's sent back to a child that failed it
    attempt_id: int | None = None  # its current scheduler job (queued or running)
    child: str | None = None  # child of the current or last attempt
    history: list[str] = msgspec.field(default_factory=list)
    avoid: frozenset[str] | None = None  # children that answered it with an error
    #: Children whose process went down of its own fault (a crash, a hang) while running it: a
    #: split WindowPoSt counts them as it counts a SNARK step's errors (supervisor/split.py).
    lost_on: frozenset[str] = frozenset()
    back: bool = True  # may go back to one of them (WinningPoSt; not after one failed it twice)
    #: A WinningPoSt run again after an error no other child could give a second opinion on
    #: (`BookRules._failed_answer`): that happens once per request.
    tried_again: bool = False
    done: bool = False
    #: A split WindowPoSt's SNARK step: its caller's request is in flight, so shutdown lets it
    #: wait for a child within the grace, queued or not.
    second_step: bool = False
    #: A split WindowPoSt's vanilla step: a proof of it counts for the breaker once its SNARK
    #: step is judged (`RequestBook.judge_vanilla`); `judge`: (its child, answered at, by which
    #: process) until then.
    judged_later: bool = False
    judge: tuple[str, float, ProcessRecord] | None = None
    #: A SNARK step's errors, (child, answered at, by which process): they count for the
    #: breaker once a sibling proves the step (`RequestBook._count_refusals`), not when the
    #: step fails everywhere (vanilla proofs that prove nothing are no SNARK child's fault).
    refusals: list[tuple[str, float, ProcessRecord]] = msgspec.field(default_factory=list)
    current: Attempt | None = None  # the attempt running for it, not abandoned
    #: Its task as msgpack, from the check of the caller's task: what a dext child is sent.
    task_msgpack: bytes | None = None

    @property
    def breaker_key(self) -> int:
        """What the breaker compares across children (`Job.key`): the task's miner; for a split
        WindowPoSt's SNARK step, the step itself (its vanilla proofs). A SNARK child's error is
        about the vanilla proofs it was given: a sibling's proof of other vanilla proofs for the
        same miner (those another vanilla child made again after both SNARK children refused
        the first) is no evidence against it; a sibling's proof of the same step (its retry) is."""
        return self.rid if isinstance(self.task, WindowPoStSnark) else self.task.miner_id


class Attempt(msgspec.Struct, eq=False):
    """One attempt of a request, sent to one process."""

    attempt_id: int
    child_rid: int
    request: TrackedRequest
    started: float
    process: ProcessRecord
    abandoned: bool = False  # its request was answered or moved on; the child still runs it
    #: A WinningPoSt sent back to a child that failed it (no other could start it at once): it
    #: is not counted against MaxAttempts, whose last is kept for another child.
    free: bool = False
    timeout_waited: bool = False  # its timeout waited once for its child's unread output
    grace_waited: bool = False  # and its Cancel's grace (rules.UNREAD_WAIT)
    timeout: Alarm[Due] | None = None
    grace: Alarm[Due] | None = None
    deadline: Alarm[Due] | None = None  # only while its process is going down (see rules)


@dataclass(eq=False, slots=True)
class ProcessRecord:
    """The book's view of one process of a child, from its ready message until it is lost."""

    child: ChildRecord
    protocol: str
    pid: int | None
    attempts: dict[int, Attempt] = field(default_factory=dict)  # by child_rid
    next_rid: int = 1
    last_activity: float = 0.0
    down: bool = False
    charge_all: bool = True  # its loss costs every request on it an attempt
    heartbeat: Alarm[Due] | None = None
    stdin_waiting: bool = False  # messages for it wait for room in its stdin pipe
    stdin_progress_at: float = 0.0
    stdin_watch: Alarm[Due] | None = None
    unread_at: float = -1.0  # when its output was last found unread (book.spoke, book.answers)

    @property
    def who(self) -> str:
        return f"{self.child.name} (pid {self.pid})"


@dataclass(eq=False, slots=True)
class ChildRecord:
    name: str
    stage: str
    limits: ChildLimits
    process: ProcessRecord | None = None
    gave_up: bool = False  # FATAL: will not start again
    last_exit: str | None = None
    done: int = 0  # requests answered with an output
    failed: int = 0  # requests answered with an error, or lost with the child
    served: bool = False  # its current (or last) process answered something
    sent: bool = False  # its current (or last) process was sent a request
    # Its processes that went down still alive and hold locks until they exit (child_exited).
    exiting: list[ProcessRecord] = field(default_factory=list)


# What an alarm is for; each is checked, when due, against what happened since.
class RequestTimeout(msgspec.Struct, frozen=True):
    attempt: Attempt


class CancelGrace(msgspec.Struct, frozen=True):
    attempt: Attempt


class HeartbeatDue(msgspec.Struct, frozen=True):
    process: ProcessRecord


class StdinWatch(msgspec.Struct, frozen=True):
    process: ProcessRecord


class DeadlineOnDown(msgspec.Struct, frozen=True):
    attempt: Attempt


Due = RequestTimeout | CancelGrace | HeartbeatDue | StdinWatch | DeadlineOnDown
