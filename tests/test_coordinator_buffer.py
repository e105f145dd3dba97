"""The coordinator's request bodies, all connections together, stay under its cap
(`max_buffered`): over it, the connection whose unfinished body holds the most is closed, with
a line saying why; a request already read is answered. Measured with real connections, by the
bytes the server accounts and by the bytes Python holds (tracemalloc), not by timing."""

from __future__ import annotations

import logging
import tracemalloc

import trio
import trio.testing

from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
from damocles_ext.jobs.store import TrioJobStore

MiB = 1024 * 1024
PIECE = 64 * 1024


def head(length: int) -> bytes:
    return (
        b"POST /rpc/v0 HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


async def everything_sent_back(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(10):
        while True:
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                return received
            if not data:
                return received
            received += data


async def test_unfinished_bodies_of_many_connections_stay_under_the_cap_and_the_largest_goes(
    sqlite_store, caplog
):
    caplog.set_level(logging.WARNING, "damocles_ext.coordinator")
    cap, clients, each = 2 * MiB, 16, 1 * MiB  # 16 MiB offered (of 16 MiB bodies) to a 2 MiB cap
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            server = CoordinatorServer(
                Coordinator(TrioJobStore(sqlite_store)), "127.0.0.1", 0, max_buffered=cap
            )
            await nursery.start(server.serve)
            streams = []
            for _ in range(clients):
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                await stream.send_all(head(16 * MiB))
                streams.append(stream)
            await trio.testing.wait_all_tasks_blocked()
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            broken: set[int] = set()
            for _ in range(each // PIECE):
                for i, stream in enumerate(streams):
                    if i in broken:
                        continue
                    try:
                        await stream.send_all(b" " * PIECE)
                    except trio.BrokenResourceError:
                        broken.add(i)
                    await trio.testing.wait_all_tasks_blocked()  # the server read it all
                    assert server.buffered <= cap
            held = tracemalloc.get_traced_memory()[1] - before
            assert held < cap + 2 * MiB, f"{held / MiB:.1f} MiB held at the peak"
            assert server.peak_buffered <= cap
            # Every connection sent as much: closed one after another as the total went over
            # (readable: their end is there; the others' bodies are being read still).
            answers = [await everything_sent_back(s) for s in streams if s.socket.is_readable()]
            assert len(answers) >= clients - cap // each, answers
            assert all(a == b"" or a.startswith(b"HTTP/1.1 503 ") for a in answers), answers
            assert server.over_buffer == len(answers)
            for stream in streams:
                await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert server.buffered == 0  # the connections that went let their bodies go
            nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "closing a coordinator connection: its unfinished request body holds" in line
        and "over the limit of 2 MiB" in line
        for line in lines
    ), lines
