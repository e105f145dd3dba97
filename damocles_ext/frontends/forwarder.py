"""`serve --connect`: a JSON-lines front end that supervises nothing and forwards each request to
a running `damocles-ext run` through its control socket, so that one supervisor serves both of
damocles-manager's entries and its locks and stage priority act between the two stages.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import trio

from ..errors import NotStartedError, ProverError, UsageError
from ..stages import can_serve
from ..tasks import Output, Task, stage_of
from .control_status import no_child_problem
from .serve_jsonl import (
    InFlight,
    StopReasons,
    log_stopped,
    serve_draining,
    with_default_deadline,
)
from .signals import stop_signals

if TYPE_CHECKING:
    from pathlib import Path

    from ..client import Client, ReconnectingClient
    from ..status import StatusDocument

log = logging.getLogger("damocles_ext.serve")

#: What to do when nothing listens, as serve --connect says it.
CONNECT_HINT = (
    "start `damocles-ext run` first (it supervises the provers of both stages), or give"
    " --connect the --socket path of the one running"
)


async def stage_problem(
    remote: Client | ReconnectingClient, stage: str, flag: str = "--connect", *, warn: bool = True
) -> str | None:
    """Why the supervisor at the other end cannot serve `stage` (it has no child of it, or it is
    a worker's, which takes no requests), or None; `flag`: the option that named its socket.

    serve --connect checks it once, before the ready line, so that a `run` whose config lacks
    the stage's table (or a worker's socket given by mistake) makes damocles-manager's start
    fail instead of every request of that stage; prove --socket once a proof failed on a
    supervisor older than Response.kind (a newer one says a usage error in its answer). A status
    that does not come is None, said in a warning if `warn` (serve goes on without the check).
    """
    return (await status_and_problem(remote, stage, flag, warn=warn))[1]


async def status_and_problem(
    remote: Client | ReconnectingClient, stage: str, flag: str = "--connect", *, warn: bool = True
) -> tuple[StatusDocument | None, str | None]:
    """(the status document of the supervisor at the other end, or None when none came; why it
    cannot serve `stage`, as stage_problem says it, or None); check-config counts the slots
    that `serve --connect` forwards to in the document."""
    try:
        with trio.fail_after(3):
            doc = await remote.status()
    except NotStartedError:  # a worker's, which has not started its children yet
        return None, _worker_socket_problem(remote.path, flag)
    except (ProverError, trio.TooSlowError) as exc:
        if warn:
            why = str(exc) or "its status did not come within 3 s (is it stopped or overloaded?)"
            log.warning("could not check that %s serves %s (going on): %s", remote.path, stage, why)
        return None, None
    if doc.worker is not None:
        return doc, _worker_socket_problem(remote.path, flag)
    served = {c.stage for c in doc.children}
    if can_serve(stage, served):
        return doc, None
    return doc, no_child_problem(remote.path, stage, lambda s: can_serve(s, served))


def _worker_socket_problem(path: str | Path, flag: str) -> str:
    """What is wrong with `flag` naming `path`, a worker's control socket."""
    # Its children prove the jobs it pulls; its socket answers `status` and refuses proofs.
    which = "socket path" if flag == "--socket" else "--socket path"
    return (
        f"{path} is the control socket of a `damocles-ext worker`, which answers"
        " status only and proves the jobs it pulls from its manager, not requests; give"
        f" {flag} the {which} of a `damocles-ext run` instead"
    )


class Forwarder:
    """submit(task) for JsonLineServer that proves through the remote supervisor, and can give up
    on what is in flight (each then gets an error answer, and the supervisor a Cancel)."""

    def __init__(
        self, stage: str, remote: ReconnectingClient, deadline_after: float | None = None
    ) -> None:
        self.stage = stage
        self.remote = remote
        after = {} if deadline_after is None else {stage: deadline_after}
        self._submit = with_default_deadline(remote.submit, after)
        self.in_flight = InFlight()

    async def submit(self, task: Task) -> Output:
        """Prove `task` through the remote supervisor; ProverError once abandoned."""
        output = await self.in_flight.run(lambda: self._submit(task))
        # The task went out typed by our stage, so the supervisor chose a child of it; an
        # output of another stage would be its bug, and must not reach damocles as a proof.
        if stage_of(output) != self.stage:
            raise ProverError(
                f"the supervisor at {self.remote.path} answered a {self.stage} task with a"
                f" {stage_of(output)} output; not passed on"
            )
        return output

    def abandon(self, reason: str) -> None:
        """Answer every request in flight with `reason` now (and every later one)."""
        self.in_flight.abandon(reason)


async def forward(
    stage: str,
    remote: ReconnectingClient,
    protocol_in: int,
    protocol_out: int,
    shutdown_grace: float,
    deadline_after: float | None = None,
) -> int:
    """Serve requests of `stage` on the pipes through `remote`; the ready line goes out once
    `remote` is connected and has children of `stage` (UsageError if it has none)."""
    # Before the ready line: damocles-manager's start check must fail when nobody listens.
    await remote.connect()
    log.info("connected to the supervisor at %s", remote.path)
    forwarder = Forwarder(stage, remote, deadline_after)
    problem: str | None = None
    with trio.open_signal_receiver(*stop_signals()) as signals:
        receive = trio.lowlevel.FdStream(protocol_in)
        send = trio.lowlevel.FdStream(protocol_out)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(remote.run)
                problem = await stage_problem(remote, stage)
                if problem is not None:  # leave the nursery (raised below, outside of it)
                    nursery.cancel_scope.cancel()
                    await trio.lowlevel.checkpoint()

                log.info("serving %s through %s (pid %d)", stage, remote.path, os.getpid())
                reasons = StopReasons(
                    reader_gone="damocles-ext serve stopped: its reader is gone",
                    grace_over=f"damocles-ext serve stopped: no answer from the supervisor at"
                    f" {remote.path} within the shutdown grace ({shutdown_grace:g} s); the"
                    " request was cancelled there",
                    at_once="damocles-ext serve stopped at once (second signal); the request was"
                    " cancelled at the supervisor",
                    refused=f"damocles-ext serve is shutting down (signal): the request was not"
                    f" sent to the supervisor at {remote.path}; send it again to the processor"
                    " that replaces this one",
                )
                server = await serve_draining(
                    stage, forwarder.submit, forwarder.in_flight, receive, send, signals,
                    shutdown_grace, reasons,
                )  # fmt: skip
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await remote.aclose()
                await receive.aclose()
                await send.aclose()
    if problem is not None:
        raise UsageError(problem)
    log_stopped(server)
    return 0
