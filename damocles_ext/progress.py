"""Progress display for `prove` and `sectors create`: a bar on a terminal, plain lines otherwise.

On a terminal the current phase is redrawn in place (carriage return, erase to end of line) at
most ten times a second:

    sleep [##########..........]  50%  10/20  4.1s

Anywhere else (a pipe, a log file, CI) a line is printed when a phase starts, when it completes
(at most one such line a second), and every `interval` seconds in between, so logs get a
heartbeat and not a flood; `close()` prints the last state if it was not printed yet:

    window_post sleep: 10/20 (50%) after 4.1s      (label "window_post", phase "sleep")
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

_REDRAW = 0.1  # seconds between terminal redraws
_BAR_MAX = 40


def _is_tty(stream: TextIO) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def _elapsed(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class ProgressRenderer:
    """Shows (phase, done, total) updates on `stream`; call `close()` once the work is over."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        interval: float = 5.0,
        label: str = "",
        clock: Callable[[], float] = time.monotonic,
        columns: int | None = None,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.interval = interval
        self._min_gap = min(1.0, interval)
        self.label = label
        self._clock = clock
        self._columns = columns
        self._start = clock()
        self._last_out = -float("inf")
        self._phase: str | None = None
        self._state: tuple[str, int, int] | None = None
        self._shown: tuple[str, int, int] | None = None
        self._drawn = False  # a bar is on the terminal's current line

    def update(self, phase: str, done: int, total: int) -> None:
        """Record the progress of `phase`; draws or prints when it is time to."""
        now = self._clock()
        state = (phase, done, total)
        self._state = state
        new_phase = phase != self._phase
        self._phase = phase
        finished = total > 0 and done >= total
        if self.tty:
            if new_phase or finished or now - self._last_out >= _REDRAW:
                self._draw(state, now)
        else:
            since = now - self._last_out
            # Phase boundaries are worth a line, but not many a second (a tree per sector).
            if since >= self.interval or ((new_phase or finished) and since >= self._min_gap):
                self._print(state, now)

    def close(self) -> None:
        """End the display: the bar's line is finished, the last state printed if it was not."""
        if self.tty:
            if self._state is not None and self._state != self._shown:
                self._draw(self._state, self._clock())
            if self._drawn:
                self._write("\n")
                self._drawn = False
        elif self._state is not None and self._state != self._shown:
            self._print(self._state, self._clock())

    # -- output -----------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not fail the proof

    def _print(self, state: tuple[str, int, int], now: float) -> None:
        phase, done, total = state
        amount = f"{done}/{total} ({100 * done // total}%)" if total > 0 else str(done)
        prefix = f"{self.label} " if self.label else ""
        self._write(f"{prefix}{phase}: {amount} after {_elapsed(now - self._start)}\n")
        self._last_out = now
        self._shown = state

    def _draw(self, state: tuple[str, int, int], now: float) -> None:
        phase, done, total = state
        tail = f"{done}/{total}  {_elapsed(now - self._start)}" if total > 0 else f"{done}"
        columns = self._columns or shutil.get_terminal_size((80, 24)).columns
        if total > 0:
            fraction = min(1.0, max(0.0, done / total))
            pct = f"{int(fraction * 100):3d}%"
            room = columns - len(phase) - len(pct) - len(tail) - 8
            width = max(0, min(_BAR_MAX, room))
            filled = int(fraction * width)
            bar = f" [{'#' * filled}{'.' * (width - filled)}]" if width >= 5 else ""
            text = f"{phase}{bar} {pct}  {tail}"
        else:
            text = f"{phase}  {tail}"
        self._write("\r" + text[: max(1, columns - 1)] + "\x1b[K")
        self._drawn = True
        self._last_out = now
        self._shown = state
