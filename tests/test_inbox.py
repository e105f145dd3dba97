"""frontends.inbox.Inbox: what the control server and its client read, on a real socket pair."""

from __future__ import annotations

import pytest
import trio
import trio.testing

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
