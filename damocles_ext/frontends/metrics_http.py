"""The metrics endpoint's connection (`metrics.MetricsServer` serves it): GET or HEAD of the
exposition, rendered in a worker thread one scrape at a time; a request with a body longer than a
scrape's head is refused. Imported when the server starts, so that importing `metrics` costs no
trio or h11."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import h11
import trio

from ..threads import NoThreadError, run_in_thread
from .http import HttpConnection, Refuse

if TYPE_CHECKING:
    from ..metrics import MetricsServer

log = logging.getLogger("damocles_ext.metrics")


class ScrapeConnection(HttpConnection):
    """One scraper's connection: requests one after another (keep-alive)."""

    def __init__(self, server: MetricsServer, stream: trio.SocketStream, max_head: int) -> None:
        super().__init__(stream, idle_timeout=server.idle_timeout, max_head=max_head, log=log,
                         what="metrics")  # fmt: skip
        self._server = server
        self._max_body = max_head

    def on_data(self, request: h11.Request, data: bytes, size: int) -> bool:
        if size > self._max_body:
            raise Refuse(413, b"bad request: a scrape request has no body; this one is too long\n")
        return False  # read and ignored

    async def answer(self, request: h11.Request, body: bytes) -> None:
        method = request.method.decode("ascii", "replace")
        if method not in ("GET", "HEAD"):
            await self.send(405, b"only GET and HEAD are served here\n",
                            extra=[("Allow", "GET, HEAD")])  # fmt: skip
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        try:
            text, content_type, gzipped = await run_in_thread(
                self._server._render,
                request.target.decode("latin-1"),
                headers.get("accept", ""),
                headers.get("accept-encoding", ""),
                limiter=self._server._limiter,
            )
        except NoThreadError as exc:
            # The scraper sees the target down (a 503), and says so; the log says why.
            why = f"cannot build the metrics exposition: {exc}"
            log.warning("%s", why)
            await self.send(503, f"{why}\n".encode(), head=method == "HEAD", close=True)
            return
        await self.send(200, text, content_type=content_type, head=method == "HEAD",
                        extra=[("Content-Encoding", "gzip")] if gzipped else None)  # fmt: skip
