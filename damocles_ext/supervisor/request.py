"""A caller of `Supervisor.submit` waiting for its request's one answer (the driver's side).

The request itself, its attempts and the rules are the request book's
(`lifecycle.book.TrackedRequest`); this is what only the trio driver needs: the event the caller
waits on, the answer, and the progress and dispatch callbacks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import ProverError
from ..parked import Parked
from ..protocol import dext
from ..tasks import Output
from . import child_loop
from .pipe_turns import poll_answers

if TYPE_CHECKING:
    from ..lifecycle import TrackedRequest
    from .core import Supervisor

log = logging.getLogger("damocles_ext.supervisor")

#: Seconds the wall clock must move against the supervisor's before a deadline is converted with
#: the new difference (a step of the clock; reading the two clocks one after the other differs
#: by microseconds).
WALL_CLOCK_STEP = 0.01


class WallClock:
    """A caller's deadline (unix seconds) on the supervisor's clock, which orders the requests.
    The difference of the two clocks, read afresh, moves by microseconds from one request to the
    next: two requests of one deadline were ordered by that noise, never by their priority. It
    is kept until the wall clock steps."""

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        self._offset = math.inf

    def on_clock(self, deadline: float, now: float) -> float:
        offset = time.time() - now
        if abs(offset - self._offset) > WALL_CLOCK_STEP:
            self._offset = offset
        return deadline - self._offset


@dataclass(eq=False, slots=True)
class Waiter(Parked):
    """One caller of submit(), from submission until its request is answered: a task parked
    in `wait`, or the `on_done` callback of `Supervisor.start_nowait`."""

    tracked: TrackedRequest
    on_progress: Callable[[dext.Progress], None] | None
    on_dispatch: Callable[[str | None], None] | None = None  # a child's name, or None: waiting
    output: Output | None = None
    error: ProverError | None = None
    #: Called once with (output, error) instead of waking a task (`Supervisor.start_nowait`).
    on_done: Callable[[Output | None, ProverError | None], None] | None = None
    #: The child's stdout its caller waits on itself, while it does (pipe_turns.read_own).
    reading_fd: int | None = None

    @property
    def rid(self) -> int:
        return self.tracked.rid

    @property
    def done(self) -> bool:
        """Answered: the book resolved it (its Resolve is carried out before anything awaits)."""
        return self.tracked.done

    def result(self) -> Output:
        """The output of an answered request; raises its error."""
        if self.error is not None:
            raise self.error
        assert self.output is not None
        return self.output

    def answer(self) -> None:
        """The output or error is set: wake the caller, or call its `on_done`."""
        on_done = self.on_done
        if on_done is not None and self.waited_on:  # (a task waits: woken instead)
            on_done = None
        if (fd := self.reading_fd) is not None:  # answered elsewhere while it reads its pipe
            self.reading_fd = None
            trio.lowlevel.notify_closing(fd)  # wakes it (pipe_turns)
        self.set()
        if on_done is not None:
            try:
                on_done(self.output, self.error)
            except Exception:  # the caller's callback must not take the supervisor down
                log.exception("the answer callback of request %d raised; ignored", self.rid)

    def dispatched(self, child: str | None) -> None:
        """Call `on_dispatch(child)`, if there is one; what it raises is logged."""
        if self.on_dispatch is None:
            return
        try:
            self.on_dispatch(child)
        except Exception:
            log.exception("dispatch callback of request %d raised; ignored", self.rid)

    def progress(self, phase: str, done: int, total: int) -> None:
        """Call `on_progress` with the request's progress, if there is one; what it raises is
        logged."""
        if self.on_progress is None:
            return
        try:
            self.on_progress(dext.Progress(self.rid, phase, done, total))
        except Exception:
            log.exception("progress callback of request %d raised; ignored", self.rid)


class Started:
    """A request started by `Supervisor.start_nowait`; `cancel()` abandons it, as a cancelled
    caller of `submit` does (its `on_done` is called at once, with the error that says so)."""

    __slots__ = ("_sup", "_waiter")

    def __init__(self, sup: Supervisor, waiter: Waiter) -> None:
        self._sup = sup
        self._waiter = waiter

    def cancel(self) -> None:
        self._sup._abandon(self._waiter)


class Batch:
    """`Supervisor.batch()`'s context: within it, what the requests started send their children
    goes out at its end, one write per child. A plain object, not a generator: cheap enough
    for a front end to open around every read, even of one request."""

    __slots__ = ("_sup",)

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    def __enter__(self) -> None:
        self._sup._applying += 1

    def __exit__(self, *exc_info: object) -> None:
        sup = self._sup
        sup._applying -= 1
        lone = None
        if not sup._applying and len(sup._pending) == 1 and exc_info[1] is None:
            child, p, chunks = next(iter(sup._pending.values()))
            if sup._book.in_flight(child.name) == len(chunks):  # nothing else in flight on it
                lone = child, p
        sup._apply([])
        if lone is not None:  # its answers may come within SPIN: read at once (pipe_turns)
            poll_answers(sup._host, *lone, child_loop.on_data)
