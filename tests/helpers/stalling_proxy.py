"""A proxy in front of the test PostgreSQL server that can make it hang or go down, for the tests
of a job store that stops answering.

It listens on a unix socket of its own (`url(database_url)` points a store URL at it) and passes
bytes both ways to the real server. `stall()` stops passing them on, in both directions, while
every connection stays open and the kernel still takes what is sent: what a client sees of a
server whose host froze or whose network stalled (no error, no answer). `cut()` closes every
connection and refuses new ones: a server that is down. `resume()` lets everything through again.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

import trio
from sqlalchemy.engine import make_url

_PG_SOCKET = ".s.PGSQL.5432"


class StallingProxy:
    """Run `serve` in a nursery (`await nursery.start(proxy.serve)`); see the module's docstring."""

    def __init__(self, server_socket_dir: Path) -> None:
        self.target = str(Path(server_socket_dir) / _PG_SOCKET)
        # A short path: unix socket paths are limited to 107 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="dext-stall-"))
        self.path = self.directory / _PG_SOCKET
        self._flowing = trio.Event()
        self._flowing.set()
        self._down = False
        self._scopes: set[trio.CancelScope] = set()
        self._held = trio.Event()  # set when a stall holds bytes back
        self.connections = 0  # accepted so far

    def url(self, database_url: str) -> str:
        """`database_url` (a unix-socket URL of the test server) through this proxy."""
        return make_url(database_url).update_query_dict({"host": str(self.directory)}).render_as_string(hide_password=False)  # fmt: skip

    def stall(self) -> None:
        """Stop passing bytes on, both ways; the connections stay open."""
        if self._flowing.is_set():
            self._flowing = trio.Event()
            self._held = trio.Event()

    async def holding(self) -> None:
        """Wait until the stall holds back something a client sent (a call is stuck on it)."""
        await self._held.wait()

    def cut(self) -> None:
        """Close every connection and refuse new ones (until resume)."""
        self._down = True
        for scope in list(self._scopes):
            scope.cancel()

    def resume(self) -> None:
        self._down = False
        self._flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(self.path))
            sock.listen(64)
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    client, _ = await sock.accept()
                    self.connections += 1
                    if self._down:
                        client.close()  # refused, as near as a listening socket can
                        continue
                    nursery.start_soon(self._relay, trio.SocketStream(client))
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
                os.rmdir(self.directory)

    async def _relay(self, client: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                server = await trio.open_unix_socket(self.target)
                async with client, server, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                    await self._pump(server, client, nursery.cancel_scope)
        finally:
            self._scopes.discard(scope)
            await client.aclose()

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if not self._flowing.is_set():
                    self._held.set()
                await self._flowing.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()  # one side closed: close the other
