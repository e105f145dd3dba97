"""The HTTP listeners (the metrics port, the coordinator's RPC port) against careless and hostile
peers, over real sockets: what they send must cost at most their own connection."""

from __future__ import annotations

import socket
import threading
from typing import Any

import h11
import msgspec
import pytest
import trio
import trio.testing
from helpers.frontend import read_answer

from damocles_ext.frontends.coordinator import PARSE_ON_A_THREAD, Coordinator, CoordinatorServer
from damocles_ext.jobs import rpc
from damocles_ext.jobs.store import TrioJobStore
from damocles_ext.metrics import MAX_REQUEST_HEAD, MetricsServer, SupervisorMetrics

SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


async def exchange(port: int, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send `request` on a new connection; the status, headers and body of the answer (0 and
    nothing when the server closed the connection without one)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        answer = await read_answer(client, stream, reset_is_close=True)
    if answer is None:
        return 0, {}, b""
    return answer.status, dict(answer.headers), answer.body


async def test_a_scrape_with_an_accept_header_prometheus_client_cannot_read_gets_the_text_format(
    nursery,
):
    # prometheus_client's choose_encoder compares a version of `x` with numbers and raises: the
    # scrape got no answer at all, and each one logged a traceback.
    server = MetricsServer(SupervisorMetrics(process_metrics=False), "127.0.0.1", 0)
    await nursery.start(server.serve)
    for accept in (b"application/openmetrics-text; version=abc", b"text/plain; version=x"):
        request = SCRAPE.replace(b"\r\n\r\n", b"\r\nAccept: " + accept + b"\r\n\r\n")
        status, headers, body = await exchange(server.port, request)
        assert status == 200, accept
        assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
        assert b"# TYPE damocles_ext_requests_total counter" in body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_scrape_with_a_body_of_the_limit_exactly_is_answered_one_byte_more_refused(
    nursery, chunked
):
    # A scrape's body (read and ignored) is at most a head's size. Its count began at the size
    # of the request's head, as the coordinator's did: a body some dozens of bytes under the
    # limit was refused 413.
    server = MetricsServer(SupervisorMetrics(process_metrics=False), "127.0.0.1", 0)
    await nursery.start(server.serve)
    for size, expected in ((MAX_REQUEST_HEAD, 200), (MAX_REQUEST_HEAD + 1, 413)):
        body = b"x" * size
        if chunked:
            framed = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (size, body)
        else:
            framed = b"Content-Length: %d\r\n\r\n%s" % (size, body)
        status, _, answer = await exchange(server.port, SCRAPE.removesuffix(b"\r\n") + framed)
        assert status == expected, (size, answer)
        if expected == 200:
            assert b"# TYPE damocles_ext_requests_total counter" in answer
        else:
            assert answer == b"bad request: a scrape request has no body; this one is too long\n"


def stalled_peer(port: int, request: bytes) -> socket.socket:
    """A client that sends `request` again and again and never reads an answer, until the
    server stops reading too (blocked sending it answers)."""
    peer = socket.create_connection(("127.0.0.1", port))
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.setblocking(False)
    try:
        while True:
            peer.send(request * 64)
    except BlockingIOError:
        return peer


async def until_sending_to_all(server: Any, n: int) -> None:
    """Wait until `n` connections to `server` are open, each blocked sending an answer (h11 has
    it sent: the rest is the client's to read)."""
    while sum(conn._h11.our_state is h11.DONE for conn in server._slots._open) < n:
        await trio.testing.wait_all_tasks_blocked(0.01)


async def test_clients_that_never_read_their_answers_make_room_for_a_scraper(nursery):
    # Each of them held its connection busy for the idle timeout: two of them (the limit here)
    # had every new scraper turned away with a 503.
    server = MetricsServer(SupervisorMetrics(process_metrics=False), "127.0.0.1", 0,
                           max_connections=2)  # fmt: skip
    await nursery.start(server.serve)
    peers = [stalled_peer(server.port, SCRAPE) for _ in range(2)]
    await until_sending_to_all(server, 2)
    status, _, body = await exchange(server.port, SCRAPE)
    assert status == 200
    assert b"# TYPE damocles_ext_requests_total counter" in body
    assert server.statistics()["evicted"] == 1
    assert server.statistics()["refused"] == 0
    for peer in peers:
        peer.close()


async def test_clients_lacking_the_token_that_never_read_make_room_for_a_worker(
    nursery, sqlite_store
):
    server = CoordinatorServer(Coordinator(TrioJobStore(sqlite_store)), "127.0.0.1", 0,
                               max_connections=2, token="secret")  # fmt: skip
    await nursery.start(server.serve)
    call = b'{"jsonrpc":"2.0","method":"Venus.WorkerPing","params":[{}],"id":1}'
    head = b"POST /rpc/v0 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(call)
    peers = [stalled_peer(server.port, head + b"\r\n" + call) for _ in range(2)]
    await until_sending_to_all(server, 2)
    status, _, body = await exchange(
        server.port, head + b"Authorization: Bearer secret\r\n\r\n" + call
    )
    assert (status, msgspec.json.decode(body)["result"]) == (200, None)
    for peer in peers:
        peer.close()
    server.stop()


def rpc_post(method: str, *params: object) -> bytes:
    call = msgspec.json.encode({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
    head = b"POST /rpc/v0 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(call)
    return head + call


async def test_a_large_body_is_parsed_off_the_loop_while_other_workers_are_answered(
    nursery, sqlite_store, monkeypatch
):
    # A junk ping of megabytes takes the parser seconds: parsed on the loop, it stalled every
    # worker's heartbeats and the sweep. Here its parse waits until a small call was answered
    # (at most 10 s: on the loop, that call could not be, and the parse goes on unanswered).
    started, answered, waited = threading.Event(), threading.Event(), []
    parse = rpc.parse_request

    def slow_for_large(body: bytes) -> rpc.Call:
        if len(body) > PARSE_ON_A_THREAD:
            started.set()
            waited.append(answered.wait(10))
        return parse(body)

    monkeypatch.setattr(rpc, "parse_request", slow_for_large)
    coordinator = Coordinator(TrioJobStore(sqlite_store))
    server = CoordinatorServer(coordinator, "127.0.0.1", 0)
    await nursery.start(server.serve)
    junk = {"Name": "w1", "x": [[]] * (PARSE_ON_A_THREAD // 3)}
    large: list[tuple[int, dict[bytes, bytes], bytes]] = []

    async def send_large() -> None:
        large.append(await exchange(server.port, rpc_post("Venus.WorkerPing", junk)))

    async with trio.open_nursery() as inner:
        inner.start_soon(send_large)
        assert await trio.to_thread.run_sync(started.wait, 10)
        status, _, body = await exchange(server.port, rpc_post("Venus.WorkerPing", {}))
        answered.set()
    assert (status, msgspec.json.decode(body)["result"]) == (200, None)
    assert waited == [True]
    assert large[0][0] == 200 and msgspec.json.decode(large[0][2])["result"] is None
    server.stop()
