"""systemd's watchdog, kept by the long-running commands (`run`, `worker`, `coordinator`).

With `WatchdogSec=` in its unit, systemd gives a service WATCHDOG_USEC (and NOTIFY_SOCKET,
WATCHDOG_PID) and, when the service has not sent "WATCHDOG=1" to the notify socket within that
time, kills it with SIGABRT and restarts it (`Restart=on-failure`; sd_notify(3),
sd_watchdog_enabled(3)). The pings go out from the trio loop, every third of the time: a loop
that stops turning (a call that blocks it, a thread that holds the GIL) stops them, and systemd
restarts a supervisor that would otherwise hold its GPUs and its requests without answering
until the proving window had passed. Python's fault handler is on while the watchdog is kept, so
the SIGABRT writes every thread's stack to stderr (the journal): where the loop was stuck.

Without WatchdogSec nothing is sent. The variables are taken out of the environment, so that no
child inherits them (as sd_notify's unset_environment does).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
from collections.abc import MutableMapping
from typing import NamedTuple

import trio

log = logging.getLogger(__name__)

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
PING = b"WATCHDOG=1"


class Watchdog(NamedTuple):
    """systemd's watchdog for this process."""

    address: str  # the notify socket: a path, or "\0name" for an abstract one
    seconds: float  # how long systemd waits for a ping

    @property
    def every(self) -> float:
        """How often it is pinged: a third of its time (not more than 20 times a second, for
        a WatchdogSec of a few milliseconds, which no service could keep anyway)."""
        return max(self.seconds / 3, 0.05)


def take_watchdog(environ: MutableMapping[str, str] | None = None) -> Watchdog | None:
    """The watchdog systemd keeps on this process, or None; its variables leave `environ` (by
    default the process's environment) either way."""
    env = os.environ if environ is None else environ
    address, usec, pid = (env.pop(name, "") for name in _VARIABLES)
    if not address or not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None  # set for another process (the one that started us), not for this one
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number of microseconds: no watchdog kept", usec)
        return None
    if seconds <= 0:
        return None
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning(
            "NOTIFY_SOCKET=%r is not a unix socket (a path, or @name): systemd's watchdog is not"
            " kept, and systemd will restart this service after WatchdogSec; remove WatchdogSec"
            " from its unit",
            address,
        )
        return None
    return Watchdog(address, seconds)


def start_watchdog(environ: MutableMapping[str, str] | None = None) -> Watchdog | None:
    """Keep systemd's watchdog, if it keeps one on this process, from a system task of the
    current trio run (it ends with the run). Called first thing in a command's trio run."""
    watchdog = take_watchdog(environ)
    if watchdog is not None:
        faulthandler.enable()  # the SIGABRT of a missed ping says where every thread was
        trio.lowlevel.spawn_system_task(keep_watchdog, watchdog, name="systemd watchdog")
        log.info("pinging systemd's watchdog every %.3g s", watchdog.every)
    return watchdog


def _notify_socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


async def keep_watchdog(watchdog: Watchdog) -> None:
    """Ping systemd every third of its time, until cancelled. Nothing here raises: it runs as
    a system task, whose exception would end the whole run (no socket for it, at the limit of
    open files, is said and tried again at the next ping)."""
    sock: socket.socket | None = None
    failing = False
    try:
        while True:
            try:
                if sock is None:
                    sock = _notify_socket()
                sock.sendto(PING, watchdog.address)
            except OSError as exc:
                if not failing:
                    log.warning(
                        "cannot ping systemd's watchdog at %s: %s; systemd restarts this service"
                        " once %.3g s pass without a ping",
                        watchdog.address.replace("\0", "@"),
                        exc,
                        watchdog.seconds,
                    )
                failing = True
            else:
                if failing:
                    log.info("systemd's watchdog is pinged again")
                failing = False
            await trio.sleep(watchdog.every)
    finally:
        if sock is not None:
            sock.close()
