"""The HTTP listeners (the metrics port, the coordinator's RPC port) against careless and hostile
peers, over real sockets: what they send must cost at most their own connection."""

from __future__ import annotations

import h11
import trio

from damocles_ext.metrics import MetricsServer, SupervisorMetrics

SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


async def exchange(port: int, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send `request` on a new connection; the status, headers and body of the answer (0 and
    nothing when the server closed the connection without one)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                try:
                    client.receive_data(await stream.receive_some(65536))
                except trio.BrokenResourceError:  # reset
                    client.receive_data(b"")
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            else:  # the end of the answer, or the connection closed without one
                return status, headers, body


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
