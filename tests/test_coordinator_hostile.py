"""A coordinator against hostile clients, over real sockets: wrong heads, lying lengths, bodies
over the limit, a client that stops halfway, junk that is not HTTP. Each gets a clear answer (or
its connection closed, as docs/JOBS.md says), nothing is logged as an error of ours, and a
worker's normal call is answered after all of them. In process (its log read through caplog,
time moved by the test) and as the `damocles-ext coordinator` command (its stderr read)."""

from __future__ import annotations

import logging

import h11
import msgspec
import pytest
import trio
import trio.testing
from helpers.frontend import CoordinatorProcess, read_answer
from helpers.supervisor import wait_until_real
from test_jobs_rules import make_input

from damocles_ext.frontends.coordinator import MAX_BODY, MAX_HEAD, Coordinator, CoordinatorServer
from damocles_ext.jobs import rpc
from damocles_ext.jobs.store import JobStore, TrioJobStore

MAX = 4096  # the in-process server's body limit (the command's is MAX_BODY)
HEAD = b"POST /rpc/v0 HTTP/1.1\r\nHost: coordinator\r\n"
ALLOCATE = b'{"jsonrpc":"2.0","method":"Venus.WdPoStAllocateJobs","params":[{},1,"w"],"id":9}'
CUT_SHORT = (
    b"peer closed connection without sending complete message body (received 80 bytes, expected 800"
)
PING = b'{"jsonrpc":"2.0","method":"Venus.WorkerPing","params":[{"Name":"w"}],"id":1}'


def post(body: bytes, headers: bytes = b"Content-Type: application/json\r\n") -> bytes:
    return HEAD + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(body: bytes) -> bytes:
    return HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


# (what, request, whether the client then shuts its sending side, [(status, words)] of the
# answers in order, whether the server closes after them). A JSON-RPC error is HTTP 500 as
# go-jsonrpc sends it (docs/JOBS.md); HTTP's own refusals close the connection.
def hostile(max_body: int) -> list[tuple[str, bytes, bool, list[tuple[int, bytes]], bool]]:
    unknown = b'{"jsonrpc":"2.0","method":"Venus.NoSuchMethod","params":[],"id":1}'
    over = b"[" + b" " * max_body + b"]"
    return [
        # go-jsonrpc reads the body whatever its Content-Type says: so does the coordinator.
        ("a wrong Content-Type", post(PING, b"Content-Type: text/xml\r\n"),
         False, [(200, b'"result":null')], False),
        ("no Content-Type", post(PING, b""),
         False, [(200, b'"result":null')], False),
        ("a Content-Length shorter than the body", post(ALLOCATE).replace(b"Length: 80", b"Length: 40"),
         True, [(500, b"the body is not JSON: Input data was truncated"),
                 (400, b"bad request: peer unexpectedly closed connection")], True),
        ("a Content-Length longer than the body, then the end of the stream",
         post(ALLOCATE).replace(b"Length: 80", b"Length: 800"),
         True, [(400, CUT_SHORT)], True),
        # Refused on its head, before a byte of it is read.
        ("a body over the limit, announced", HEAD + b"Content-Length: %d\r\n\r\n" % (max_body + 1),
         False, [(413, b"a request body is at most %d bytes" % max_body)], True),
        ("an unknown method", post(unknown),
         False, [(500, b"method 'Venus.NoSuchMethod' not found")], False),
        ("GET instead of POST", b"GET /rpc/v0 HTTP/1.1\r\nHost: c\r\n\r\n",
         False, [(405, b"only POST is served here")], False),
        ("another path", post(ALLOCATE).replace(b"/rpc/v0", b"/rpc/v1"),
         False, [(404, b"the RPC is served at POST /rpc/v0")], False),
        ("a head over the limit", post(ALLOCATE, b"X-Junk: " + b"j" * MAX_HEAD + b"\r\n"),
         False, [(431, b"over the %d this server reads" % MAX_HEAD)], True),
        ("no HTTP at all", b"\x00\x01\xff junk\r\n\r\n",
         False, [(400, b"bad request: illegal request line")], True),
        ("a Content-Length that is no number", post(ALLOCATE).replace(b"Length: 80", b"Length: x"),
         False, [(400, b"bad request: bad Content-Length")], True),
        ("a transfer coding other than chunked",
         HEAD + b"Transfer-Encoding: gzip\r\n\r\n" + ALLOCATE,
         False, [(501, b"Only Transfer-Encoding: chunked is supported")], True),
        ("a chunk size that is no number", HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}",
         False, [(400, b"bad request: illegal chunk header")], True),
        ("a batch", post(b"[" + ALLOCATE + b"]"),
         False, [(500, b"a batch of requests is not served: send each in a POST of its own")],
         False),
        ("an empty body", post(b""), False, [(500, b"the body is not JSON")], False),
        ("a body that is not UTF-8", post(b'{"method":"\xff"}'),
         False, [(500, b"the body is not JSON: Invalid UTF-8 encoded string")], False),
        *([] if max_body > MAX else [  # (sending 16 MiB to be cut off races the reset)
            ("a body over the limit, chunked", chunked(over),
             False, [(413, b"a request body is at most %d bytes" % max_body)], True),
        ]),
        ("a bomb of nesting", post(b'{"method":"Venus.WorkerPing","params":[' + b"[" * 1500 + b"]" * 1500 + b"]}"),
         False, [(500, b"nested too deeply")], False),
    ]  # fmt: skip


async def answers(stream: trio.abc.Stream, count: int) -> tuple[list[tuple[int, bytes]], bool]:
    """The next `count` answers (fewer if the server closes first) and whether the server closed
    the connection after them (looked at only when it announced it would)."""
    client = h11.Connection(h11.CLIENT)
    got: list[tuple[int, bytes]] = []
    closing = False
    while len(got) < count:
        if client.our_state is not h11.SEND_BODY:  # h11 reads an answer to a request it sent
            if client.our_state is h11.DONE:
                client.start_next_cycle()
            client.send(h11.Request(method="POST", target="/", headers=[("Host", "x"),
                                    ("Transfer-Encoding", "chunked")]))  # fmt: skip
        try:
            answer = await read_answer(client, stream, reset_is_close=True)
        except h11.RemoteProtocolError:  # closed before a whole answer
            return got, True
        if answer is None:  # closed
            return got, True
        got.append((answer.status, answer.body))
        client.send(h11.EndOfMessage())
        closing = answer.closing
        if closing:
            break
    closed = closing and not client.trailing_data[0] and await stream.receive_some(1) == b""
    return got, closed


async def try_each(port: int, max_body: int) -> None:
    for what, request, shut, expected, closes in hostile(max_body):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            if shut:
                await stream.send_eof()
            got, closed = await answers(stream, len(expected))
        assert len(got) == len(expected), (what, got)
        for (status, body), (want_status, words) in zip(got, expected, strict=True):
            assert status == want_status and words in body, (what, status, body)
            assert b"Traceback" not in body, what
            if status == 500:  # a JSON-RPC error, with go-jsonrpc's code
                error = msgspec.json.decode(body)["error"]
                assert error["code"] in (rpc.PARSE_ERROR, rpc.METHOD_NOT_FOUND), what
        assert closed == closes, what


async def allocate(port: int) -> list[dict]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(post(ALLOCATE))
        [(status, body)], _ = await answers(stream, 1)
    assert status == 200, body
    answer = msgspec.json.decode(body)
    assert answer["id"] == 9
    return answer["result"]


async def test_hostile_requests_get_clear_answers_nothing_is_logged_and_a_worker_is_served(
    sqlite_store, caplog
):
    job, _ = await TrioJobStore(sqlite_store).create(make_input(miner=1000))
    caplog.set_level(logging.DEBUG, "damocles_ext")
    async with trio.open_nursery() as nursery:
        server = CoordinatorServer(
            Coordinator(TrioJobStore(sqlite_store)), "127.0.0.1", 0, max_body=MAX
        )
        await nursery.start(server.serve)
        with trio.fail_after(60):
            await try_each(server.port, MAX)
            assert [j["Id"] for j in await allocate(server.port)] == [job.Id]
        assert server.buffered == 0  # every body let go of
        nursery.cancel_scope.cancel()
    ours = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert ours == [], [r.getMessage() for r in ours]


@pytest.mark.parametrize("stop_in", ["the head", "the body", "the body, the server stopping"])
async def test_a_client_stopped_in_its_body_gets_408_in_its_head_is_closed(
    sqlite_store, mock_clock, stop_in
):
    # Stopped in its body, it held its connection for the idle timeout, then the connection
    # closed without a word, as if the coordinator had crashed. Stopped in its head (not HTTP,
    # likely: a port scanner), it is closed without one, as nginx does; and so is one the
    # server closes itself in its body (stopping, or making room), its time not up.
    idle = 120.0
    async with trio.open_nursery() as nursery:
        server = CoordinatorServer(Coordinator(TrioJobStore(sqlite_store)), "127.0.0.1", 0,
                                   idle_timeout=idle)  # fmt: skip
        await nursery.start(server.serve)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        request = post(ALLOCATE)
        half = request[: len(HEAD) // 2] if stop_in == "the head" else request[:-40]
        await stream.send_all(half)
        # The coordinator holds what came (the part of a head in h11, or the body's bytes: for
        # the body, not some of the head in h11, which is also so while the head comes).
        await wait_until_real(lambda: len(server._slots) == 1, what="the connection accepted")
        [conn] = server._slots._open
        if stop_in == "the head":
            await wait_until_real(lambda: conn._h11.trailing_data[0], what="the half head read")
        else:
            await wait_until_real(lambda: server.buffered == 40, what="the half body read")
        if stop_in == "the body, the server stopping":
            server.stop()
        else:
            mock_clock.jump(idle - 1)
            await trio.testing.wait_all_tasks_blocked()
            assert len(server._slots) == 1  # not yet
            mock_clock.jump(1)
        got: list = []

        async def read() -> None:
            got.append(await answers(stream, 1))

        nursery.start_soon(read)
        await wait_until_real(lambda: got, what="the coordinator's answer or close")
        if stop_in != "the body":
            assert got == [([], True)]
            if server.stopping:
                await wait_until_real(server.stopped.is_set, what="the server stopped")
                assert server.buffered == 0
                return
        else:
            said = (
                b"the request body did not come whole within 120 s (of connecting, or of the last"
                b" answer on this connection); send each request whole, at once\n"
            )
            assert got == [([(408, said)], True)]
        # Another client is served after.
        assert await allocate(server.port) == []
        assert server.buffered == 0
        nursery.cancel_scope.cancel()


async def test_the_coordinator_command_answers_hostile_requests_without_a_traceback(tmp_path):
    url = f"sqlite:///{tmp_path}/jobs.db"
    with JobStore.open(url) as s:
        job, _ = await TrioJobStore(s).create(make_input(miner=1000))
    coordinator = CoordinatorProcess(url)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await coordinator.start(nursery)
            await try_each(coordinator.port, MAX_BODY)
            assert [j["Id"] for j in await allocate(coordinator.port)] == [job.Id]
        coordinator.stop()
    assert b"Traceback" not in coordinator.stderr and b"ERROR" not in coordinator.stderr, (
        coordinator.stderr.decode()
    )
