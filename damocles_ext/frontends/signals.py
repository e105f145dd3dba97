"""SIGTERM, SIGINT and SIGHUP (the terminal that started it closed), read the same way by every
front end: the first asks for a graceful stop, a second one stops at once."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

log = logging.getLogger("damocles_ext.serve")

#: What stops a front end: its default action would kill it at once, leaving its requests
#: unanswered and its control socket behind.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def watch_signals(
    signals,
    cancel_scope,
    shut_down,
    logger: logging.Logger = log,
    at_once: Callable[[], None] | None = None,
) -> None:
    """First of STOP_SIGNALS: call `shut_down()` (graceful); a second one cancels
    `cancel_scope`, or calls `at_once()` when given."""
    count = 0
    async for signum in signals:
        count += 1
        name = signal.Signals(signum).name
        if count == 1:
            logger.info("%s: shutting down gracefully (again to stop at once)", name)
            shut_down()
        else:
            logger.warning("%s again: stopping at once", name)
            if at_once is not None:
                at_once()
            else:
                cancel_scope.cancel()
