"""A child's stderr, re-logged line by line under a cap that holds across its restarts.

`relay_stderr` logs each line a child process writes on stderr; `StderrCap`, the token bucket
that caps it, belongs to the configured child (`child_loop.Child`), not to one of its processes:
a child that crash-loops, writing a flood before each death, is logged at the rate past one
burst, not at a fresh burst per process.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping

import trio

#: A child's stderr lines logged at most this many a second, past a burst of STDERR_BURST.
STDERR_LINES_PER_SECOND = 200
STDERR_BURST = 2000
_LINE_CHARS = 300  # of a stderr line quoted in a failed start's reason


class StderrCap:
    """A token bucket of stderr lines, kept by a child across its processes."""

    def __init__(self) -> None:
        self.tokens = float(STDERR_BURST)
        self.refilled: float | None = None  # trio's clock at the last refill (None: never used)
        self.dropped = 0  # lines dropped and not yet said
        self.said_at = -math.inf  # when the last "dropped" warning went out: one a second

    def take(self) -> bool:
        """Whether a line may be logged now (it took a token), else counted as dropped."""
        now = trio.current_time()
        if self.refilled is None:
            self.refilled = now
        if self.tokens < 1:
            gained = (now - self.refilled) * STDERR_LINES_PER_SECOND
            self.tokens, self.refilled = min(STDERR_BURST, self.tokens + gained), now
            if self.tokens < 1:
                self.dropped += 1
                return False
        self.tokens -= 1
        return True


async def relay_stderr(
    stream: trio.abc.ReceiveStream,
    prefix: str,
    logger: logging.Logger,
    fields: Mapping[str, object] | None = None,
    tail: deque[str] | None = None,
    cap: StderrCap | None = None,
) -> None:
    """Log each line the child writes on stderr, with `prefix` in front; returns at EOF.

    `fields` go on each record (logging's `extra`), so JSON logs carry them as keys. `tail`, if
    given, keeps the last non-blank lines (its maxlen), so a failed start can say why. `cap` is
    the child's bucket (a new one if not given): a burst (a traceback, a prover's start-up
    chatter) is logged whole; a child writing without end fills no disk (a flood logged 1 GB in
    5 s), nor does one that floods and dies again and again.
    """
    limit = 8192  # a longer line is logged in pieces rather than buffered without bound
    bucket = cap if cap is not None else StderrCap()

    def emit(text: str) -> None:
        if tail is not None and text.strip():
            tail.append(text)
        if not bucket.take():
            return
        if bucket.dropped and trio.current_time() - bucket.said_at >= 1.0:
            said_dropped()
        logger.info("%s %s", prefix, text, extra=fields)

    def said_dropped() -> None:
        bucket.said_at = trio.current_time()
        logger.warning(
            "%s %d stderr lines dropped: it wrote over %d a second (bursts of %d are kept)",
            prefix,
            bucket.dropped,
            STDERR_LINES_PER_SECOND,
            STDERR_BURST,
            extra=fields,
        )
        bucket.dropped = 0

    buf = b""
    while True:
        try:
            data = await stream.receive_some(65536)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            data = b""
        if not data:
            if buf:
                emit(buf.decode("utf-8", "replace").rstrip())
            if bucket.dropped:
                said_dropped()
            return
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0 or nl > limit:
                if len(buf) > limit:
                    emit(buf[:limit].decode("utf-8", "replace"))
                    buf = buf[limit:]
                    continue
                break
            line, buf = buf[:nl], buf[nl + 1 :]
            emit(line.decode("utf-8", "replace").rstrip("\r"))


def stderr_summary(lines: Iterable[str]) -> str:
    """A child's last stderr lines, quoted and each cut, for a failed start's reason."""
    cut = _LINE_CHARS
    return " | ".join(
        repr(line if len(line) <= cut else line[:cut] + "...") for line in map(str.strip, lines)
    )
