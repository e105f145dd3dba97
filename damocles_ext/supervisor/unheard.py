"""What the children did that the request book has not heard of yet, told to it before it judges
their silence.

A child's reader and writer tasks, and the tasks whose events make the book catch up with the
time, wake in one pass of trio's loop, in any order. After a while in which the supervisor
itself did not run (SIGSTOP then SIGCONT, swapped out, a stall of the machine), a busy child's
heartbeat is past due while the Progress it kept sending waits unread in its stdout pipe (or
its StdinTimeoutSecs watch is past due while it made room in its stdin pipe): judged before
its reader (or writer) runs, on the driver's or any other child's event, the child would be
killed as hung for a silence that was ours, and its proof lost. So before the alarms are acted
on, the book is told which children wrote what is not read yet, and which took bytes from
their stdin pipe; their tasks act on those bytes when they run, as always.
"""

from __future__ import annotations

import select
from collections.abc import Iterable

from ..lifecycle import RequestBook
from .child_loop import Child


def tell_unheard(book: RequestBook, children: Iterable[Child], now: float) -> None:
    """Tell `book` (`spoke`, `stdin_progress`) what `children` did by `now` that their tasks
    have not read or noted yet: bytes waiting in a stdout pipe (part of a frame too: they were
    written while the reader did not run), room in a stdin pipe that messages wait for."""
    poller = select.poll()
    told = {}  # fd -> (what it tells, of which child), one poll for all
    for child in children:
        p = child.p
        if p is None or p.down_reason is not None or p.reader_done is None or p.read_ended:
            continue  # going down, or in its handshake (no heartbeat then)
        stdout = p.proc.stdout.fileno()
        poller.register(stdout, select.POLLIN)
        told[stdout] = (select.POLLIN, book.spoke, child.name)
        if p.queued_writes:
            poller.register(p.stdin_fd, select.POLLOUT)
            told[p.stdin_fd] = (select.POLLOUT, book.stdin_progress, child.name)
    for fd, events in poller.poll(0) if told else ():
        wanted, tell, name = told[fd]
        if events & wanted:
            tell(name, now)
