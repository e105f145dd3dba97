"""The worker-prover RPC client: addresses, answers, errors, its one kept-alive connection; over
real HTTP against an in-process coordinator on a real SQLite store."""

from __future__ import annotations

import socket
from functools import partial

import msgspec
import pytest
import trio
import trio.testing
from test_jobs_rules import make_input

from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
from damocles_ext.jobs import rpc
from damocles_ext.jobs.client import (
    WORKER_PROVER_RPC,
    RpcCallError,
    RpcClient,
    RpcClientError,
    RpcConnectionError,
    RpcProtocolError,
    RpcTimeout,
)
from damocles_ext.jobs.endpoint import Endpoint, parse_endpoint
from damocles_ext.jobs.model import WdPoStInput
from damocles_ext.jobs.store import JobStore, TrioJobStore

PROOF = "StackedDrgWindow2KiBV1_2"


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("/ip4/1.2.3.4/tcp/1789", Endpoint("1.2.3.4", 1789, "/rpc/v0")),
        ("/ip4/1.2.3.4/tcp/1789/http", Endpoint("1.2.3.4", 1789, "/rpc/v0")),
        ("/ip6/::1/tcp/2000", Endpoint("::1", 2000, "/rpc/v0")),
        ("/dns/manager.lan/tcp/1789/", Endpoint("manager.lan", 1789, "/rpc/v0")),
        ("/dns4/manager/tcp/1", Endpoint("manager", 1, "/rpc/v0")),
        ("http://manager:1789", Endpoint("manager", 1789, "/rpc/v0")),
        ("http://manager", Endpoint("manager", 80, "/rpc/v0")),
        ("http://[::1]:1789/other/path", Endpoint("::1", 1789, "/other/path")),
        ("127.0.0.1:1789", Endpoint("127.0.0.1", 1789, "/rpc/v0")),
        ("[::1]:1789", Endpoint("::1", 1789, "/rpc/v0")),
        ("b\u00fccher.example:1789", Endpoint("b\u00fccher.example", 1789, "/rpc/v0")),
    ],
)
def test_an_address_is_a_multiaddr_a_url_or_host_port(text, endpoint):
    assert parse_endpoint(text) == endpoint


def test_an_endpoint_writes_its_url_and_host_header():
    assert Endpoint("::1", 1789).url == "http://[::1]:1789/rpc/v0"
    assert Endpoint("::1", 1789).host_header == "[::1]:1789"
    assert Endpoint("manager", 80).host_header == "manager"
    # A non-ASCII name as it goes on the wire: its A-labels (h11 sends ASCII headers only).
    assert Endpoint("b\u00fccher.example", 1789).host_header == "xn--bcher-kva.example:1789"
    assert Endpoint("b\u00fccher.example", 1789).url == "http://xn--bcher-kva.example:1789/rpc/v0"
    # IDNA 2008 alone (the older codec refused a right-to-left label ending in a digit).
    assert parse_endpoint("\u05e9\u05dc\u05d5\u05dd1.example:1789").host_header.startswith("xn--")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("/ip4/1.2.3.4/udp/1789", "not a multiaddr of a TCP address"),
        ("/ip4/::1/tcp/1789", "not an ip4 address"),
        ("/ip6/1.2.3.4/tcp/1789", "not an ip6 address"),
        ("/ip4/1.2.3.4/tcp/17x9", "must be a number"),
        ("/ip4/1.2.3.4/tcp/1789/https", "only plain HTTP"),
        ("https://manager:1789", "only http://"),
        ("http://:1789", "has no host"),
        ("http://manager:99999", "must be a number"),
        ("http://manager:0", "must be a number"),
        ("manager", "not an RPC address"),
        ("manager:0", "must be a number"),
        ("http://a..b:1789", "not a host name"),
        ("/dns/a..b/tcp/1789", "not a host name"),
        ("a..b:1789", "not a host name"),
        # IDNA 2008, as trio encodes a name to look it up (a traceback from the worker before).
        ("a\u0660b.example:1789", "not a host name .*direction"),
        # Looked up as it was, and said "cannot connect"; a bracket left open was read as closed.
        ("a b:1789", r"'a b' is not a host name \(it holds ' '\)"),
        ("a\tb:1789", r"not a host name \(it holds '\\t'\)"),
        ("http://a b:1789", "not a host name"),
        ("/dns/a b/tcp/1789", "not a host name"),
        ("[::1:1789", r"an IPv6 address is written in \[ and \], as \[::1\]:1789"),
        ("::1]:1789", r"an IPv6 address is written in \[ and \]"),
        # Dropped silently before, and the calls were refused for want of the token.
        ("http://manager:1789/rpc/v0?token=SECRET", "query .*not sent.*Authorization: Bearer"),
        ("http://user:SECRET@manager:1789", "credentials .*not sent.*Authorization: Bearer"),
        # With a second mistake, the message of that one does not quote the secret either.
        ("http://user:SECRET@manager:0", "must be a number"),
        ("http://manager:abc/?token=SECRET", "must be a number"),
        ("https://manager:1789/rpc?token=SECRET", "only http://"),
        ("http://user:SECRET@:1789/", "has no host"),
        ("http://[::1]:1789/rpc/v0?token=SECRET", r"address http://\[::1\]:1789/rpc/v0 is given"),
        # urlsplit's own error was the whole message ("Invalid IPv6 URL"), with no address.
        ("http://[::1", r"'http://\[::1' is not a URL \(Invalid IPv6 URL\)"),
        ("http://user:SECRET@[::1:1789/?token=SECRET", r"'http://\[::1:1789/' is not a URL"),
    ],
)
def test_a_bad_address_says_what_is_wrong(text, words):
    with pytest.raises(ValueError, match=words) as caught:
        parse_endpoint(text)
    assert "SECRET" not in str(caught.value)  # a token is not echoed


async def serving(nursery: trio.Nursery, store: JobStore, **kw) -> CoordinatorServer:
    server = CoordinatorServer(Coordinator(TrioJobStore(store)), "127.0.0.1", 0, **kw)
    await nursery.start(server.serve)
    return server


async def test_calls_give_results_over_one_kept_alive_connection(sqlite_store):
    job, _ = await TrioJobStore(sqlite_store).create(make_input(miner=1000, proof_type=PROOF))
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store)
        async with RpcClient(f"/ip4/127.0.0.1/tcp/{server.port}") as client:
            [allocated] = await client.call("Venus.WdPoStAllocateJobs", {}, 1, "worker-a")
            assert allocated["Id"] == job.Id
            assert msgspec.convert(allocated["Input"], WdPoStInput) == job.Input
            assert await client.call("Venus.WdPoStHeartbeatJobs", [job.Id], "worker-a") is None
            everything = await client.call("Venus.WdPoStAllJobs")
            assert [j["Id"] for j in everything["Jobs"]] == [job.Id]
            assert client.connections_opened == 1
        nursery.cancel_scope.cancel()


async def test_json_rpc_errors_are_raised_with_their_code_whatever_the_http_status(sqlite_store):
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store)
        async with RpcClient(f"http://127.0.0.1:{server.port}") as client:
            # go-jsonrpc sends these with HTTP 500: the body is the error.
            with pytest.raises(RpcCallError) as caught:
                await client.call("Venus.NoSuchMethod")
            assert (caught.value.status, caught.value.code) == (500, rpc.METHOD_NOT_FOUND)
            assert (
                caught.value.message == "(error code -32601) method 'Venus.NoSuchMethod' not found"
            )
            with pytest.raises(RpcCallError) as caught:
                await client.call("Venus.WdPoStResetJob", "nope")
            assert (caught.value.status, caught.value.code) == (200, rpc.METHOD_ERROR)
            assert caught.value.message == "job 'nope' does not exist"
            assert "Venus.WdPoStResetJob at http://127.0.0.1:" in str(caught.value)
            # The connection is still good after errors.
            assert (await client.call("Venus.WdPoStAllJobs"))["Jobs"] == []
            assert client.connections_opened == 1
        nursery.cancel_scope.cancel()


async def test_the_token_is_sent_as_a_bearer_token(sqlite_store):
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store, token="t0k3n")
        async with RpcClient(f"127.0.0.1:{server.port}", token="t0k3n") as client:
            assert (await client.call("Venus.WdPoStAllJobs"))["MaxTry"] == 2
        async with RpcClient(f"127.0.0.1:{server.port}") as client:
            with pytest.raises(RpcCallError) as caught:
                await client.call("Venus.WdPoStAllJobs")
            assert (caught.value.status, caught.value.code) == (401, rpc.UNAUTHORIZED)
        nursery.cancel_scope.cancel()


async def test_a_connection_the_server_closed_while_idle_is_opened_again(sqlite_store):
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store)
        async with RpcClient(f"127.0.0.1:{server.port}") as client:
            await client.call("Venus.WdPoStAllJobs")
            assert server._slots is not None
            [conn] = server._slots._open
            await trio.testing.wait_all_tasks_blocked()  # the server is back waiting on it
            assert server._slots.evict_idle("as its idle timeout would") == 1
            await conn.closed.wait()
            assert (await client.call("Venus.WdPoStAllJobs"))["Jobs"] == []
            assert client.connections_opened == 2
        nursery.cancel_scope.cancel()


async def test_a_refused_connection_is_a_clear_error_naming_the_url():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        async with RpcClient(f"/ip4/127.0.0.1/tcp/{port}") as client:
            with pytest.raises(RpcConnectionError) as caught:
                await client.call("Venus.WdPoStAllJobs")
    message = str(caught.value)
    assert f"cannot connect to http://127.0.0.1:{port}/rpc/v0" in message
    assert "Venus.WdPoStAllJobs" in message and "refused" in message.lower()
    assert f"check that {WORKER_PROVER_RPC} runs there" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not caught.value.sent  # nothing reached a server: the call was surely not done
    # A client of a source node says what should run there (it named the coordinator).
    async with RpcClient(f"/ip4/127.0.0.1/tcp/{port}", serves="a source node") as client:
        with pytest.raises(RpcConnectionError, match="check that a source node runs there"):
            await client.call("Venus.SectorIndexerFind")


async def _call_a_server_answering(
    status: int, body: bytes, headers: str = "", token: str | None = None
) -> None:
    """Venus.WdPoStAllJobs to a server that answers every request with `status`, `headers`
    (lines ending in CRLF) and `body`; the client sends `token`."""

    async def answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        head = f"HTTP/1.1 {status} X\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode()
        await stream.send_all(head + body)

    error: RpcClientError | None = None
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        try:
            async with RpcClient(f"127.0.0.1:{port}", token=token) as client:
                await client.call("Venus.WdPoStAllJobs")
        except RpcClientError as exc:  # raised outside the nursery: not in an ExceptionGroup
            error = exc
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error


@pytest.mark.parametrize("status", [401, 403])
async def test_a_token_refused_in_plain_text_says_so(status):
    # A proxy's plain "Unauthorized": it said to check that the address is the RPC's.
    refused = rf"HTTP {status} .*'Unauthorized'.*it does not take the token sent"
    with pytest.raises(RpcProtocolError, match=refused):
        await _call_a_server_answering(status, b"Unauthorized\n", token="wrong")


async def test_a_deny_page_says_what_came_and_the_token_only_as_one_possibility():
    # A reverse proxy's deny page (no token sent): it said "the token was refused", which
    # there was none of, and printed no more than the first 200 bytes, cut without saying so.
    page = b"<html><title>403 Forbidden</title>\n\x1b[2J<h1>denied by nginx</h1>" + b" " * 300
    with pytest.raises(RpcProtocolError) as raised:
        await _call_a_server_answering(403, page + b"</html>")
    said = str(raised.value)
    assert "HTTP 403 and a body that is not a JSON-RPC answer ('<html><title>" in said, said
    assert "Forbidden</title>\\n\\x1b[2J<h1>denied" in said and "\x1b" not in said, said
    assert f"(the first 200 of {len(page) + 7} bytes)" in said, said
    assert "if the server itself refused it, it wants a token and none was sent" in said, said
    assert "if something in front of it did (a reverse proxy, a firewall rule)" in said, said
    assert "the token was refused" not in said


async def test_a_redirect_says_where_it_points_as_it_is_not_followed():
    # It said only "HTTP 307 ... check that the address is ...", not the address to give.
    moved = "Location: http://10.0.0.2:1789/rpc/v1\r\n"
    with pytest.raises(RpcProtocolError, match=r"HTTP 307 .*redirects to 'http://10\.0\.0\.2"):
        await _call_a_server_answering(307, b"", moved)


@pytest.mark.parametrize(
    ("status", "body", "check"),
    [
        (401, b'{"message": "Unauthorized"}', "it wants a token and none was sent"),
        # It said only to check the address, wrong for a manager restarting behind nginx.
        (
            502,
            b"{}",
            (
                "a proxy in front answered for the server behind it, which is down,"
                " restarting or too slow; if it lasts, check that server and that the"
                " address is a worker-prover RPC"
            ),
        ),
        (504, b"<html>Gateway Time-out</html>", "a proxy in front answered"),
        (200, b'{"status": "ok"}', "check that the address is a worker-prover RPC"),
    ],
    ids=["gateway-401", "gateway-502", "gateway-504", "another-json-api"],
)
async def test_a_json_body_that_is_no_json_rpc_answer_says_the_status_and_what_to_check(
    status, body, check
):
    # It said "answered with the id None, not 1", hiding the refused token or the wrong address.
    with pytest.raises(RpcProtocolError, match=rf"HTTP {status} .*not a JSON-RPC answer.*{check}"):
        await _call_a_server_answering(status, body)


async def test_an_answer_that_is_not_json_rpc_is_a_protocol_error(sqlite_store):
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store)
        async with RpcClient(f"http://127.0.0.1:{server.port}/not/the/rpc") as client:
            with pytest.raises(RpcProtocolError, match=r"HTTP 404 .*POST /rpc/v0"):
                await client.call("Venus.WdPoStAllJobs")
        nursery.cancel_scope.cancel()


async def test_a_call_with_no_answer_times_out_and_drops_its_connection(autojump_clock):
    got_request = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        got_request.set()
        await trio.sleep_forever()  # read the request, never answer

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with RpcClient(f"127.0.0.1:{port}", timeout=30) as client:
            with pytest.raises(RpcTimeout, match=r"no answer from .* within 5 s") as caught:
                await client.call("Venus.WdPoStAllJobs", timeout=5)
            assert got_request.is_set()
            assert caught.value.sent  # the server read the call: it may have done it
            assert client._stream is None
        nursery.cancel_scope.cancel()


async def test_a_call_that_found_no_connection_in_its_time_says_it_was_not_sent(autojump_clock):
    # A host that drops the packets (here: a listener whose backlog is full) never took the
    # call: a later refusal of the result must not say this attempt may have delivered it.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepts
    filler = socket.create_connection(listener.getsockname())  # the backlog is full now
    try:
        async with RpcClient(f"127.0.0.1:{listener.getsockname()[1]}") as client:
            with pytest.raises(RpcTimeout, match=r"no connection to .* within 5 s") as caught:
                await client.call("Venus.WdPoStAllJobs", timeout=5)
        assert not caught.value.sent
    finally:
        filler.close()
        listener.close()


@pytest.mark.parametrize("where", ["result", "envelope"])
async def test_an_answer_nested_too_deeply_is_a_protocol_error(where):
    deep = b"[" * 100_000 + b"]" * 100_000
    body = (
        b'{"jsonrpc":"2.0","result":' + deep + b',"id":1}'
        if where == "result"
        else b'{"jsonrpc":"2.0","result":null,"id":1,"x":' + deep + b"}"
    )

    with pytest.raises(RpcProtocolError, match=r"Venus\.WdPoStAllJobs"):
        await _call_a_server_answering(200, body)


@pytest.mark.parametrize(
    ("sent", "when"),
    [
        (b"", "before its answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "mid-answer"),
    ],
    ids=["before-the-answer", "mid-answer"],
)
async def test_a_server_that_closes_before_its_answer_ends_is_a_lost_connection(sent, when):
    async def close_early(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(sent)  # then the handler returns: the connection closes

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, close_early, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with RpcClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(RpcConnectionError, match=f"broke {when}") as caught:
                await client.call("Venus.StoreBasicInfo", "s")
            assert not isinstance(caught.value, RpcTimeout)
            assert caught.value.sent  # the server read the call: it may have done it
        nursery.cancel_scope.cancel()


async def test_a_result_that_is_not_utf_8_is_a_protocol_error_naming_the_server():
    # The envelope decodes with the result left raw: its strings were not checked as UTF-8
    # until the result's own decode, whose DecodeError escaped the callers' RpcClientError.
    body = b'{"jsonrpc":"2.0","id":1,"result":{"Jobs":["\xff\xfe"]}}'
    with pytest.raises(RpcProtocolError, match=r"127\.0\.0\.1.* Venus\.WdPoStAllJobs .*UTF-8"):
        await _call_a_server_answering(200, body)
