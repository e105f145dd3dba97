"""What one task reads from a stream, with one system call and no extra pass of trio's loop per
read: the requests the control server reads, and the answers its client reads.

trio's `SocketStream.receive_some` first tries the read (on an idle connection it fails with
EAGAIN, one system call for nothing), then waits, reads, and, when the first try succeeded, yields
to the scheduler once more: at one request in flight, each message pays a wasted system call and,
on the other side, a whole pass of the loop. `Inbox.receive` reads the descriptor directly: after
a read shorter than asked (the socket is empty now) it waits for it first, and it yields every
few reads in a row that needed no wait, so a peer that never stops writing does not starve the
other tasks. A stream without a descriptor (trio's memory streams in tests) is read through
`receive_some`.

Unlike `receive_some`, `receive` is not a checkpoint when data is waiting: a cancelled caller
gets Cancelled at its next wait (or within a few reads), not at once.

`receive(poll=seconds)`: when the socket is empty, the caller lets the other tasks run once (a
schedule point, where a cancel is raised), then looks at the socket without blocking for up to
that long before it sleeps on it: bytes that come within it are read at once, where a sleeping
process is woken only after the scheduler brought an idle CPU back (the control server's reader,
when its client sends its next request right after each answer; see control_connection.py). A
task made ready in the same pass of trio's loop may wait for the poll's end: the poll is bounded,
and short. (Whether other tasks are ready is not asked: trio's statistics, its only public
answer, walk every registered descriptor, 5 to 18 us a call with 10 to 300 of them on this VM,
as much as the poll saves.)
"""

from __future__ import annotations

import errno
import os
import select
from time import perf_counter

import trio

from .outbox import stream_fd

#: Reads in a row that found data without waiting before one yields to the scheduler.
YIELD_EVERY = 16


class Inbox:
    """Reads `stream` for one task, `size` bytes at most a time (b"" at end of stream)."""

    def __init__(self, stream: trio.abc.ReceiveStream, size: int) -> None:
        self._stream = stream
        self._fd = stream_fd(stream)
        self._size = size
        self._wait = False  # the last read emptied the socket: wait before the next one
        self._unyielded = 0

    async def receive(self, poll: float = 0.0) -> bytes:
        """The next bytes; raises BrokenResourceError if the stream broke, and
        ClosedResourceError if it was closed (as `receive_some` does). `poll` (seconds): how
        long to look for them without blocking first, when the socket is empty (see above)."""
        fd = self._fd
        if fd is None:
            return bytes(await self._stream.receive_some(self._size))
        self._check_open(fd)  # closed between two calls: its number may be another's now
        while True:
            if self._wait and poll > 0.0:
                self._unyielded = 0
                await trio.lowlevel.checkpoint()  # (the other tasks run first; a cancel raises)
                self._check_open(fd)
                until = perf_counter() + poll
                while (data := self._read(fd)) is None and perf_counter() < until:
                    pass
                if data is not None:
                    return data
                poll = 0.0  # (once a call)
            if self._wait:
                self._unyielded = 0
                await trio.lowlevel.wait_readable(fd)
                self._check_open(fd)
            elif self._unyielded >= YIELD_EVERY:
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
                self._check_open(fd)
            data = self._read(fd)
            if data is not None:
                return data

    def _read(self, fd: int) -> bytes | None:
        """One read of `fd`: its bytes, or None when it had none (it is to be waited on)."""
        try:
            data = os.read(fd, self._size)
        except BlockingIOError:
            self._wait = True
            return None
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("the stream was closed") from exc
            raise trio.BrokenResourceError(f"cannot read the stream: {exc}") from exc
        self._unyielded += 1
        self._wait = 0 < len(data) < self._size
        return data

    def _check_open(self, fd: int) -> None:
        if stream_fd(self._stream) != fd:  # a closed trio socket's fileno() is -1
            raise trio.ClosedResourceError("the stream was closed")


def only_sending_closed(fd: int) -> bool:
    """After EOF on `fd`: the peer shut down only its sending side (it still reads our
    answers), not the whole connection (POLLHUP: both ways are shut)."""
    events = select.poll()
    events.register(fd, select.POLLIN)
    return not any(event & select.POLLHUP for _, event in events.poll(0))
