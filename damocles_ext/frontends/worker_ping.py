"""The worker's `Venus.WorkerPing` loop: every ping_interval, damocles' WorkerInfo, as
damocles-worker sends it, so that damocles-manager's worker list shows this worker and our
coordinator keeps an idle one live; and at once when its Paused slots change (while it takes no
job, its free slots are Paused, not Empty: a pause begins or ends, a slot frees during one). A
failing ping is logged once per outage, never fatal.

It sees the worker through `Pinging` alone (what it reads of it, and what it tells it), and
sends on the connection it is given (the pings' own)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import trio

from .. import __version__
from ..jobs.client import RpcCallError, RpcClientError, local_address_towards, manager_down
from ..jobs.worker_rules import WorkerInfo, worker_info

if TYPE_CHECKING:
    from ..jobs.client import AnswerClock, RpcClient
    from ..jobs.endpoint import Endpoint
    from .worker_state import HeldJob, Pause, WorkerCounters

log = logging.getLogger("damocles_ext.worker")


class Pinging(Protocol):
    """What the ping loop needs of the worker (`Worker` is one), and all it touches of it."""

    @property
    def name(self) -> str | None: ...  # the worker's, as the manager knows it
    @property
    def address(self) -> str | None: ...  # the local address that reaches the manager, if known
    @property
    def held(self) -> Mapping[str, HeldJob]: ...  # the jobs held now, by id
    @property
    def counters(self) -> WorkerCounters: ...  # (its pings: the answered ones)

    def slots(self) -> int:
        """The slots free for jobs now."""
        ...

    def children_down(self) -> int:
        """The WindowPoSt children (the SNARK ones too) not up now."""
        ...

    def now(self) -> float:
        """The wall clock (compared with the manager's)."""
        ...

    def heard_clock(self, clock: AnswerClock | None) -> None:
        """An answer just received gave this clock (its X-Dext-Clock, else its Date; None:
        neither): the manager's, by which job deadlines are read."""
        ...

    def paused(self) -> Pause | None:
        """The pause in taking jobs in force now, or None."""
        ...

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds; it is looked at after each change of the worker."""
        ...

    def touch(self) -> None:
        """Something changed: the worker's waiters look again."""
        ...

    def manager_unreachable(self, what: str) -> None:
        """A ping could not connect, or a proxy answered 502 or 503 for the manager: the
        manager's outage (said once), which any answer ends."""
        ...

    def heard(self) -> None:
        """A whole answer (a JSON-RPC error too): the manager's outage ends if a call could not
        connect during it."""
        ...


async def ping_forever(
    worker: Pinging, pings: RpcClient, endpoint: Endpoint, interval: float
) -> None:
    """Every `interval`, ping the manager on `pings` (first at once), and at once when the
    slots it would say Paused change (a pause begins or ends, a slot frees during one): the
    manager's list shows a pause of 30 s while it lasts."""
    # damocles-manager's worker list shows the workers that ping it; the coordinator keeps
    # an idle worker (no allocation for idle_poll, no job to heartbeat) live by it.
    address = worker.address
    if address is None:  # named by --name: the address is looked up here, once
        try:
            address = await local_address_towards(endpoint)
        except OSError:
            address = worker.name or "unknown"
    failing = False
    skewed = False
    while True:
        assert worker.name is not None
        held = worker.held.values()
        info = worker_info(
            worker.name, address, __version__, slots=worker.slots(),
            proving=sum(h.state == "proving" for h in held),
            finishing=sum(h.state == "finishing" for h in held),
            children_down=worker.children_down(), paused=worker.paused() is not None,
        )  # fmt: skip
        try:
            await pings.call("Venus.WorkerPing", info)
        except RpcClientError as exc:
            if manager_down(exc):
                # No connection made, or a proxy's 502 or 503 for the manager behind it: the
                # manager's outage (said once), not the ping's alone.
                worker.manager_unreachable(str(exc))
            else:
                if isinstance(exc, RpcCallError):
                    worker.heard()  # (a whole answer)
                # Never fatal: the ping only shows this worker in the manager's list.
                if not failing:
                    log.warning(
                        "Venus.WorkerPing failed (%s); the manager's worker list may not show"
                        " this worker until it works again (logged once)",
                        exc,
                    )
                failing = True
        else:
            worker.heard()
            if failing:
                log.info("Venus.WorkerPing works again")
            failing = False
            worker.counters.pings += 1
            worker.touch()
            worker.heard_clock(clock := pings.answer_clock)
            skewed = check_skew(clock, worker.now(), skewed)
        with trio.move_on_after(interval):
            # (A pause begins with a failure, a slot frees with a result, a pause ends with an
            # allocation: each changes the worker.)
            await worker.wait_for(functools.partial(_paused_other_than, worker, info))


def _paused_other_than(worker: Pinging, sent: WorkerInfo) -> bool:
    return paused_slots(worker) != sent.Summary.Paused


def paused_slots(worker: Pinging) -> int:
    """The slots the worker's ping says Paused now: its free ones while it takes no job."""
    if worker.paused() is None:
        return 0
    busy = sum(h.state in ("proving", "finishing") for h in worker.held.values())
    return max(0, worker.slots() - busy)


#: A worker whose clock is this far from its manager's (the clock of the ping's answer) is
#: warned: its log's times are its own, and a clock that far off is no clock in step.
CLOCK_SKEW = 3.0

#: The least difference of the manager's clock and this machine's, read on a Date, that the
#: worker corrects job deadlines by (`manager_offset`); a damocles-ext coordinator's
#: X-Dext-Clock, to the millisecond, is taken as it is, whatever the difference. The Date of an
#: answer is to the second: read as the middle of its second, it puts a clock in step anywhere
#: within half a second of it (and the round trip's time on top). Below a second the difference
#: is that noise, not a clock off, and correcting by it would move every deadline of a worker in
#: step by up to half a second, one way or the other; a clock off by less is left as it is,
#: where the correction could do no better.
SKEW_CORRECTED = 1.0


def manager_offset(clock: AnswerClock | None, now: float, offset: float) -> float:
    """The manager's clock less this machine's, by which the worker reads job deadlines
    (NotAfter, on the manager's clock) on its own: from the clock of an answer received at
    `now`: its X-Dext-Clock as it is; its Date (the middle of its second), 0 when within
    SKEW_CORRECTED; `offset`, the one used so far, when the answer gave neither."""
    if clock is None:
        return offset
    measured = clock.at - now
    return measured if clock.precise or abs(measured) >= SKEW_CORRECTED else 0.0


def check_skew(clock: AnswerClock | None, now: float, skewed: bool) -> bool:
    """Warn once when this machine's clock is CLOCK_SKEW or more away from the manager's (the
    answer's clock: `manager_offset`), and once when it agrees again; whether it is off now."""
    if clock is None:
        return skewed
    skew = now - clock.at
    if abs(skew) >= CLOCK_SKEW:
        if not skewed:
            log.warning(
                "this machine's clock is about %.0f s %s the manager's (the clock of its answers):"
                " a job's deadline (NotAfter: a damocles-ext coordinator's jobs carry one,"
                " damocles-manager's do not) is read on the manager's clock, corrected by this"
                " difference, but this machine's log times are its own;"
                " keep the clocks in step (NTP: `timedatectl`, `chronyc tracking`)",
                abs(skew),
                "ahead of" if skew > 0 else "behind",
            )
        return True
    if skewed:
        log.info("this machine's clock agrees with the manager's again")
    return False
