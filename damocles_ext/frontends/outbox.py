"""What many tasks write to one stream, in order, with few writes and few task switches: the
answers of `serve` and of the control socket, and the requests of the control socket's client.

A piece sent `at_once` goes out at once, in one `os.write` from the task that sends it, when
nothing is queued before it and no write is under way: at one request in flight, no lock, no
task switch and no checkpoint stand between an answer and the kernel. Otherwise (and when its
sender expects company: several requests in flight) it waits in the queue, and the writer task
(`run`) writes everything queued since its last pass in one `send_all`: the answers that finish
in one pass of trio's loop go out in one write, not one write (and one wake-up of the peer)
each. Each piece may carry a `written` callback: called with None once the piece is in the
kernel, or with the error once the stream broke before it was (the error goes to every piece not
written, and to every later one, which is not attempted).

What is queued is what the tasks sent and the peer has not read yet, as before this queue: a
peer that stops reading stops the writer in `send_all`, and the front end's own bounds on what
is in flight bound the queue. A stream without a descriptor (trio's memory streams in tests)
always goes through the writer.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

#: Called once per piece: None when written, else why it never will be.
Written = Callable[[BaseException | None], None]

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


def stream_fd(stream: object) -> int | None:
    """The descriptor under `stream`, for writes that need no checkpoint; None when it has none."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    if isinstance(stream, trio.lowlevel.FdStream):
        return stream.fileno()
    return None


def write_now(fd: int, data: bytes | bytearray) -> int:
    """How much of `data` one non-blocking write put in the kernel (0 when none, or when the
    write failed: `send_all` then meets the same error and reports it)."""
    try:
        return os.write(fd, data)
    except OSError:  # EAGAIN: full; EPIPE and the like: broken, left for send_all to say
        return 0


class Outbox:
    """Pieces of bytes for `stream`, written in the order they are sent; `run` is the writer."""

    def __init__(self, stream: trio.abc.SendStream) -> None:
        self._stream = stream
        self._fd = stream_fd(stream)
        self._queue: list[tuple[bytes | bytearray, Written | None]] = []
        self._wake = trio.Event()
        self._writing = False
        self._closing = False
        #: Why the stream broke (every later piece is dropped with it), or None.
        self.broken: BaseException | None = None

    @property
    def idle(self) -> bool:
        """Nothing queued and no write under way."""
        return not self._queue and not self._writing

    def send(
        self, data: bytes | bytearray, written: Written | None = None, *, at_once: bool = True
    ) -> None:
        """Write `data` after everything sent before it; never blocks. `at_once=False` leaves
        it to the writer even when the stream is idle, to be joined with what else is sent in
        this pass of the loop."""
        if self.broken is not None:
            if written is not None:
                written(self.broken)
            return
        if at_once and self._fd is not None and not self._queue and not self._writing:
            done = write_now(self._fd, data)
            if done == len(data):
                if written is not None:
                    written(None)
                return
            data = data[done:]
        self._queue.append((data, written))
        self._wake.set()

    def close(self) -> None:
        """`run` returns once what is queued is written."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        """Write what is queued, until `close()` and an empty queue, or the stream breaks."""
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            batch, self._queue = self._queue, []
            self._writing = True
            try:
                await self._stream.send_all(
                    batch[0][0] if len(batch) == 1 else b"".join(data for data, _ in batch)
                )
            except _BROKEN as exc:
                self.broken = exc
                self._queue, lost = [], batch + self._queue
                for _, written in lost:
                    if written is not None:
                        written(exc)
                return
            finally:
                self._writing = False
            for _, written in batch:
                if written is not None:
                    written(None)
