"""frontends.inbox.Inbox: what the control server and its client read, on a real socket pair."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from helpers.supervisor import BlockingWaits, StepGate, instruments

from damocles_ext.frontends.inbox import YIELD_EVERY, Inbox


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_it_reads_what_is_there_and_waits_for_more():
    ours, peer = await _pair()
    inbox = Inbox(ours, 1024)
    await peer.send_all(b"first")
    assert await inbox.receive() == b"first"
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receive_into, inbox, got)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # the reader waits: nothing came yet
        await peer.send_all(b"second")
    assert got == [b"second"]
    await peer.aclose()
    assert await inbox.receive() == b""  # end of stream
    await ours.aclose()


async def _receive_into(inbox: Inbox, got: list[bytes]) -> None:
    got.append(await inbox.receive())


async def test_a_peer_that_never_stops_writing_does_not_starve_the_other_tasks():
    ours, peer = await _pair()
    inbox = Inbox(ours, 16)  # every read is full: the socket always has more
    reads = 4 * YIELD_EVERY
    await peer.send_all(b"x" * 16 * (reads + 1))
    order: list[str] = []

    async def other() -> None:
        order.append("other ran")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(reads):
            assert await inbox.receive() == b"x" * 16
            order.append("read")
    # The other task ran while the reader still had data to read, not after it: at its first
    # yield, or at its second (trio may run the tasks of one batch in either order).
    assert order.index("other ran") <= 2 * YIELD_EVERY
    await peer.aclose()
    await ours.aclose()


async def test_a_stream_closed_under_a_waiting_reader_or_before_a_read_raises_closed():
    ours, peer = await _pair()
    inbox = Inbox(ours, 1024)
    raised: list[BaseException] = []

    async def reader() -> None:
        try:
            await inbox.receive()
        except trio.ClosedResourceError as exc:
            raised.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await ours.aclose()
    assert len(raised) == 1
    # A new connection may get the closed one's descriptor number: never read it as ours.
    other, other_peer = await _pair()
    await other_peer.send_all(b"not ours")
    with pytest.raises(trio.ClosedResourceError):
        await inbox.receive()
    assert await other.receive_some() == b"not ours"
    for stream in (peer, other, other_peer):
        await stream.aclose()


async def test_a_stream_without_a_descriptor_is_read_through_receive_some():
    send, receive = trio.testing.memory_stream_one_way_pair()
    inbox = Inbox(receive, 1024)
    await send.send_all(b"hello")
    assert await inbox.receive() == b"hello"
    await send.aclose()
    assert await inbox.receive() == b""


# -- polling: the control server's reader looks for its client's next request before sleeping ---


@asynccontextmanager
async def _emptied() -> AsyncIterator[tuple[Inbox, socket.socket]]:
    """An Inbox on our end of a socket pair, its first read having emptied the socket (the next
    one would wait), and the peer's end as a plain blocking socket, for a thread to write."""
    a, peer = socket.socketpair()
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    inbox = Inbox(ours, 1024)
    try:
        peer.sendall(b"first")
        assert await inbox.receive() == b"first"
        yield inbox, peer
    finally:
        peer.close()
        await ours.aclose()


async def test_a_poll_reads_what_comes_within_it_without_sleeping():
    async with _emptied() as (inbox, peer):
        gate, waits = StepGate(trio.lowlevel.current_task()), BlockingWaits()
        seen: list[bool] = []

        def write_in_the_poll() -> None:  # once the reader took its step after the schedule point
            seen.append(gate.wait_next())
            peer.sendall(b"second")

        thread = threading.Thread(target=write_in_the_poll)
        with instruments(gate, waits):
            gate.arm()
            thread.start()
            got = await inbox.receive(poll=10.0)
        thread.join()
        assert got == b"second" and seen == [True]
        assert waits.waits == 0  # read in the poll: the run never slept


async def _written_once_asleep(inbox: Inbox, peer: socket.socket, poll: float) -> bool:
    """Whether the run slept before the peer's bytes came: the peer writes them once it did
    (or after 5 s); receive(poll) reads them."""
    waits = BlockingWaits()
    seen: list[bool] = []

    def write_once_asleep() -> None:
        seen.append(waits.slept.wait(5))
        peer.sendall(b"second")

    thread = threading.Thread(target=write_once_asleep)
    with instruments(waits):
        thread.start()
        assert await inbox.receive(poll=poll) == b"second"
    thread.join()
    return seen == [True]


async def test_a_poll_that_meets_nothing_gives_up_at_its_bound_and_sleeps():
    async with _emptied() as (inbox, peer):
        assert await _written_once_asleep(inbox, peer, poll=0.01)


async def test_the_end_of_the_stream_met_in_a_poll_is_returned_as_it():
    async with _emptied() as (inbox, peer):
        gate = StepGate(trio.lowlevel.current_task())

        def shut_in_the_poll() -> None:
            gate.wait_next()
            peer.shutdown(socket.SHUT_WR)

        thread = threading.Thread(target=shut_in_the_poll)
        with instruments(gate):
            gate.arm()
            thread.start()
            assert await inbox.receive(poll=10.0) == b""
        thread.join()


async def test_a_reader_cancelled_as_it_would_poll_is_cancelled_and_reads_nothing():
    # E.g. its connection closed (evicted, idle, the server stopping): what came is not read.
    async with _emptied() as (inbox, peer):
        peer.sendall(b"second")
        with trio.CancelScope() as scope:
            scope.cancel()
            await inbox.receive(poll=10.0)
        assert scope.cancelled_caught
        assert await inbox.receive() == b"second"  # still there
