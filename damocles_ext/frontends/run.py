"""`damocles-ext run`'s process: one supervisor behind the control socket (and, if asked, the
metrics port), until a signal.

The socket and the metrics port are bound before any child is spawned, so a taken or unsafe place
is a usage error (exit 2), not a half-started supervisor; whatever fails before serving starts
takes the socket file away again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..stages import can_serve
from .control import ControlServer
from .control_socket import bind_control_socket, bound_inode, release_control_socket
from .serve_jsonl import with_default_deadline
from .signals import end_soon, stop_signals, watch_signals
from .watchdog import start_watchdog

if TYPE_CHECKING:
    from ..commands.common import SupervisorOptions
    from ..config import Config
    from ..metrics import MetricsServer, SupervisorMetrics
    from ..supervisor.core import Supervisor
    from .control_status import StatusFn

log = logging.getLogger("damocles_ext.run")


def serve_control_socket(
    config: Config,
    path: str | Path,
    supervisor_options: Callable[[], SupervisorOptions],
    *,
    limits: Mapping[str, Any],
    deadline_after: Mapping[str, float] | None = None,
    metrics_address: tuple[str, int] | None = None,
    metrics_limits: Mapping[str, Any] | None = None,
) -> int:
    """Bind the control socket at `path` (and the metrics port at `metrics_address`), then
    supervise `config`'s children and serve both until SIGTERM/SIGINT. `limits` and
    `metrics_limits` are ControlServer's and MetricsServer's keyword arguments; `deadline_after`:
    per stage, the deadline (seconds after its arrival) of a request that comes without one."""
    sock = bind_control_socket(path)
    metrics = server = None
    try:
        from ..supervisor.core import Supervisor

        options = supervisor_options()
        if metrics_address is not None:
            from ..metrics import MetricsServer, SupervisorMetrics

            metrics = SupervisorMetrics()
            options["inline_observers"] = [metrics]  # at once, not behind plugins' hooks
            server = MetricsServer(metrics, *metrics_address, **(metrics_limits or {}))
        supervisor = Supervisor(config, **options)
    except BaseException:
        _discard(sock)
        if server is not None:
            server.close()
        raise

    try:
        return trio.run(_run, supervisor, sock, metrics, server, dict(limits), deadline_after)
    finally:
        if server is not None:
            server.close()


def _discard(sock: socket.socket) -> None:
    """Remove the file of a control socket not served after all, if it is still the one that
    socket made, then close it (and so release its path's lock)."""
    path = sock.getsockname()
    with contextlib.suppress(FileNotFoundError):
        if os.lstat(path).st_ino == bound_inode(sock):
            os.unlink(path)
    sock.close()
    release_control_socket(sock)


#: What a request still open is told when run stops at once.
STOPPED_AT_ONCE = (
    "damocles-ext run stopped at once (second signal); the request was not proved: send it"
    " again once damocles-ext runs again"
)


def control_server(
    supervisor: Supervisor,
    sock: socket.socket,
    status: StatusFn,
    deadline_after: Mapping[str, float] | None = None,
    limits: Mapping[str, Any] | None = None,
) -> ControlServer:
    """The control server `run` serves `supervisor` with on `sock` (`status`: its document)."""
    after = deadline_after or {}
    served = {c.stage for c in supervisor.statistics().children}
    return ControlServer(
        sock,
        with_default_deadline(supervisor.submit, after),
        start=with_default_deadline(supervisor.start_nowait, after),
        batch=supervisor.batch,
        status=status,
        serves=lambda stage: can_serve(stage, served),
        **(limits or {}),
    )


async def _run(
    supervisor: Supervisor,
    sock: socket.socket,
    metrics: SupervisorMetrics | None = None,
    metrics_server: MetricsServer | None = None,
    limits: dict[str, Any] | None = None,
    deadline_after: Mapping[str, float] | None = None,
) -> int:
    from ..status import StatusSource

    start_watchdog()
    with trio.open_signal_receiver(*stop_signals()) as signals:
        status = StatusSource(
            supervisor,
            socket=str(sock.getsockname()),
            metrics=(lambda: metrics_server.url) if metrics_server is not None else None,
        )
        server = control_server(supervisor, sock, status.as_data, deadline_after, limits)
        async with trio.open_nursery() as nursery:
            # The socket stays while the supervisor drains: `status` shows it shutting down,
            # a new request is refused saying so, and no second `run` takes the socket (and
            # the GPUs) while this one's proofs still run. It goes once the supervisor stopped.
            def at_once() -> None:
                supervisor.stop_at_once(STOPPED_AT_ONCE)  # every open request answered now
                end_soon(nursery.cancel_scope)

            nursery.start_soon(
                watch_signals,
                signals,
                nursery.cancel_scope,
                supervisor.request_shutdown,
                log,
                at_once,
            )
            await nursery.start(server.serve)
            log.info("control socket listening on %s", server.path)
            if metrics is not None and metrics_server is not None:
                metrics.attach(supervisor, trio.lowlevel.current_trio_token())
                await nursery.start(metrics_server.serve)
                log.info("metrics on %s", metrics_server.url)
            await supervisor.run()
            # Every accepted request has its answer by now; give the clients time to read it.
            server.stop_accepting()
            with trio.move_on_after(5):
                await server.wait_idle()
            nursery.cancel_scope.cancel()
    return 0
