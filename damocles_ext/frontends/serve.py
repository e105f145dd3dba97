"""`damocles-ext serve`'s process: our own stdin/stdout become the protocol channel.

Light to import (the standard library only, the rest inside the functions): damocles-manager
gives a processor 5 s for its ready line, so the line goes out before trio and the supervisor
are imported. The JSON lines themselves are serve_jsonl.py's; `--connect` is forwarder.py's.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from damocles_ext.commands.common import SupervisorOptions
    from damocles_ext.config import ChildSpec

log = logging.getLogger("damocles_ext.serve")

#: Seconds `serve --jobs` waits for the database to take a connection (its own and every later
#: one), and at its start for a lock another process holds on the store. damocles-manager waits
#: 5 s (`stable_wait`) for the ready line, and the store is opened before it: a database that
#: does not answer, or stays locked, fails the start with our reason, not its timeout. With
#: --listen, also how long it waits for the server's clock before it serves (after the line).
SERVE_CONNECT_TIMEOUT = 3


def serve_children(
    stage: str,
    children: list[ChildSpec],
    supervisor_options: Callable[[], SupervisorOptions],
    deadline_after: float | None = None,
    *,
    fds: tuple[int, int],
) -> int:
    """Say ready on `fds` (take_protocol_fds'), then supervise `children` and answer requests of
    `stage` there until stdin closes or a signal arrives. `supervisor_options()` gives the
    Supervisor's keyword arguments; it is called after the ready line, since building them
    imports the supervisor."""
    protocol_in, protocol_out = fds

    # The config is good: say ready now, before the heavier imports, so that a loaded machine
    # still makes damocles-manager's 5 s limit. Requests wait in the pipe, then in the queue.
    hold_stop_signals()
    say_ready(protocol_out, stage)

    import trio

    from damocles_ext.supervisor.core import Supervisor

    from .serve_jsonl import serve_supervised, with_default_deadline

    supervisor = Supervisor(children, **supervisor_options())
    after = {} if deadline_after is None else {stage: deadline_after}
    submit = with_default_deadline(supervisor.submit, after)
    start = with_default_deadline(supervisor.start_nowait, after)
    return trio.run(serve_supervised, stage, supervisor, submit, protocol_in, protocol_out, start)


def serve_connected(
    stage: str,
    socket: str | None,
    shutdown_grace: float,
    deadline_after: float | None = None,
    *,
    fds: tuple[int, int],
) -> int:
    """serve --connect: connect to the `run` at `socket` (None: its default; UsageError, exit 2,
    before the ready line if nobody listens), then forward each request of `stage` to it."""
    import trio

    from damocles_ext.client import ReconnectingClient

    from .forwarder import CONNECT_HINT, forward

    remote = ReconnectingClient(socket, hint=CONNECT_HINT)
    protocol_in, protocol_out = fds
    return trio.run(
        forward, stage, remote, protocol_in, protocol_out, shutdown_grace, deadline_after
    )


def take_protocol_fds() -> tuple[int, int]:
    """Keep the protocol pipes for ourselves and point fds 0/1 elsewhere, so that nothing else in
    this process (a print, a C library, a plugin as it is imported) can read a request or write a
    stray byte to stdout; done first thing. os.dup's copies are not inherited by children.
    Returns (protocol in, protocol out)."""
    protocol_in = os.dup(0)
    protocol_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol_in, protocol_out


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a blocking fd)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def say_ready(fd: int, stage: str) -> None:
    """Write the ready line to the protocol's stdout; DextError (exit 1) when it cannot be
    written for another reason than a reader gone (a full disk, a descriptor closed at start)."""
    from damocles_ext.errors import DextError
    from damocles_ext.protocol.jsonl import ready_line

    try:
        write_all(fd, ready_line(stage))
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise DextError(
            f"cannot write the ready line to stdout: {exc.strerror}; serve speaks the protocol"
            " on stdout, which must be the pipe damocles-manager reads"
        ) from None


#: The handlers of the stop signals before hold_stop_signals, and those it kept since.
_before_hold: dict[int, Any] = {}
_held: list[int] = []
_holding = False


def hold_stop_signals() -> None:
    """Keep the first stop signal (SIGTERM, SIGINT, SIGHUP; not one that is ignored) that comes
    from now until `replay_held_signals` (a second one has its own action at once).
    damocles-manager writes its requests as soon as the ready line comes, and trio watches the
    signals only once it and the supervisor are imported: a signal in between would kill serve
    (or raise KeyboardInterrupt) with its requests unanswered, instead of stopping it
    gracefully."""
    global _holding
    _holding = True
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN:  # one that is ignored (nohup's SIGHUP) stays so
            _before_hold[signum] = handler
            signal.signal(signum, _hold)


def _hold(signum: int, frame: object) -> None:
    if _holding and (not _held or signum == signal.SIGHUP):
        # A second SIGHUP changes nothing, as later (signals.watch_signals): a closing
        # terminal may send two.
        if not _held:
            _held.append(signum)
    else:
        # A second one while the first is held (the start after the ready line is slow or
        # stuck: a plugin's import, say): the signal's own action, as a second signal stops
        # serve at once later. Or trio's watch is over (its receiver put this handler back):
        # what it did before.
        signal.signal(signum, _before_hold[signum])
        signal.raise_signal(signum)


def replay_held_signals() -> None:
    """Deliver the signals `hold_stop_signals` kept, once trio's signal receiver is open (it is
    their handler now): serve then stops as for a signal that came later."""
    global _holding
    _holding = False
    held = list(_held)
    _held.clear()
    for signum in held:
        signal.raise_signal(signum)


def reader_gone(fd: int) -> bool:
    """True when the read end of the pipe `fd` writes to is closed (poll reports POLLERR)."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def serve_jobs(
    stage: str,
    url: str,
    *,
    stores: list[tuple[str, str]],
    conf_dir: str | None,
    deadline_after: float | None,
    poll_interval: float | None,
    file_check_every: float | None = None,
    listen: tuple[str, int] | None,
    token: str | None,
    shutdown_grace: float,
    fds: tuple[int, int],
) -> int:
    """serve --jobs: check the store URL, the stores and damocles' config, open the store (and
    bind --listen), all before the ready line so that a mistake fails damocles-manager's start;
    then turn each request into a job and answer from it."""
    from damocles_ext.errors import UsageError

    if stage != "window_post":
        from .producer import WINNING_REFUSED

        raise UsageError(f"serve {stage} --jobs: {WINNING_REFUSED}")
    from damocles_ext.jobs.store import JobStore

    from .producer import JobProducer, producer_settings, run_producer

    settings = producer_settings(conf_dir, stores, poll_interval)
    listening = None
    if listen is not None:
        from .listeners import bind_tcp

        # Bound before the store is opened: a busy port fails the start (exit 2) without
        # leaving a new SQLite store behind.
        listening = bind_tcp(*listen, doing="listen", option="--listen")
    try:
        store = JobStore.open(
            url,
            limits=settings.limits,
            connect_timeout=SERVE_CONNECT_TIMEOUT,
            open_timeout=SERVE_CONNECT_TIMEOUT,  # a store another process keeps locked: the same
            writable=True,
        )
    except BaseException:
        if listening is not None:
            listening.close()
        raise
    if not settings.stores:  # said once it starts: a start that fails says only why
        log.warning(
            "no store is known (no --store NAME=PATH, no [[Common.PersistStores]] in --conf-dir's"
            " sector-manager.cfg): every request will be answered with an error"
        )
    try:
        from damocles_ext.jobs.store import TrioJobStore

        producer = JobProducer.on(
            store, settings, deadline_after=deadline_after, file_check_every=file_check_every
        )
        coordinator = None
        if listen is not None:
            from .coordinator import Coordinator, CoordinatorServer

            # A finish it takes wakes the request waiting for that job at once, not at its poll.
            rpc = Coordinator(TrioJobStore(store), settings.stores, observe=producer.observe)
            # One clock, the one the coordinator stamps and sweeps with (a PostgreSQL server's):
            # its jobs' deadlines and stamps, and the producer's own sweeps of them at their
            # deadline or retry (on this machine's clock behind the server's, such a sweep
            # found the deadline not passed, did nothing, and the job waited for the
            # coordinator's next sweep).
            producer.store.clock = rpc.store.clock
            coordinator = (rpc, CoordinatorServer(rpc, *listen, token=token, sock=listening))
        protocol_in, protocol_out = fds
        hold_stop_signals()
        say_ready(protocol_out, stage)

        import trio

        return trio.run(
            run_producer, stage, producer, protocol_in, protocol_out, shutdown_grace, coordinator
        )
    finally:
        if listening is not None:
            listening.close()  # the server's by now, if it was made: closed again, harmlessly
        store.close()
