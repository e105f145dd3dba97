"""The timer-driven rules: request timeouts, the cancel grace, and the liveness watches.

Each rule is a callback on the supervisor's timer heap (`timers.Timers`) that checks on its own,
when it runs, that it still applies:
* the request timeout (RequestTimeoutSecs): the caller is answered, or the request queued again,
  at once; the child is sent a Cancel (dext) and given its cancel grace;
* the cancel grace (CancelGraceSecs): a child still running a request that long after its Cancel
  (JSON lines: after its timeout) is killed; its other requests are retried free;
Two liveness watches, each armed at most once per process at a time:
* the heartbeat (HeartbeatTimeoutSecs): a dext child with requests in flight must say something
  (a Progress or a Response) that often, or it is taken for hung;
* the stdin watch (StdinTimeoutSecs): while messages for a child wait for room in its stdin pipe,
  the child must take some bytes that often, or it is taken for hung.
A hung process is killed at once (`child_loop.kill`); its requests are retried as for a crash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from ..config import effective_timeouts
from . import child_loop

if TYPE_CHECKING:
    from .child_loop import Child, Process
    from .core import Supervisor
    from .request import Slot


def arm_heartbeat(sup: Supervisor, child: Child, p: Process) -> None:
    """A request was sent to `p`: watch that it keeps talking while it works (dext only)."""
    hb = effective_timeouts(child.spec)[0]
    if hb and p.conn.protocol == "dext" and not p.heartbeat_armed:
        p.heartbeat_armed = True
        p.heartbeat_timer = sup._timers.add(
            p.last_activity + hb, lambda t: _on_heartbeat(sup, child, p, t)
        )


def _on_heartbeat(sup: Supervisor, child: Child, p: Process, now: float) -> None:
    hb = effective_timeouts(child.spec)[0]
    if p.down_reason is not None or not hb:
        return
    if not p.slots:
        p.heartbeat_armed = False
        return
    due = p.last_activity + hb
    if now < due:
        p.heartbeat_timer = sup._timers.add(due, lambda t: _on_heartbeat(sup, child, p, t))
        return
    child_loop.kill(
        sup,
        child,
        p,
        f"hung: no Progress or Response for {now - p.last_activity:.1f}s while working"
        f" (HeartbeatTimeoutSecs = {hb:g})",
        charge_all=True,
    )


def watch_stdin(sup: Supervisor, child: Child, p: Process, now: float) -> None:
    """Writes to the child wait for room in its stdin pipe: make sure it keeps reading."""
    timeout = effective_timeouts(child.spec)[1]
    if timeout and not p.stdin_watch_armed:
        p.stdin_watch_armed = True
        p.stdin_timer = sup._timers.add(now + timeout, lambda t: _on_stdin_watch(sup, child, p, t))


def _on_stdin_watch(sup: Supervisor, child: Child, p: Process, now: float) -> None:
    p.stdin_watch_armed = False
    if p.down_reason is not None or p.queued_writes == 0:
        return
    timeout = effective_timeouts(child.spec)[1]
    due = p.stdin_progress_at + timeout
    if now < due:
        p.stdin_watch_armed = True
        p.stdin_timer = sup._timers.add(due, lambda t: _on_stdin_watch(sup, child, p, t))
        return
    child_loop.kill(
        sup,
        child,
        p,
        f"hung: read nothing from its stdin for {now - p.stdin_progress_at:.1f}s while"
        f" messages for it waited in a full pipe (StdinTimeoutSecs = {timeout:g})",
        charge_all=True,
    )


def arm_request_timeout(sup: Supervisor, child: Child, p: Process, slot: Slot) -> list[Any] | None:
    """`slot` was sent to `p`: its RequestTimeoutSecs timer, if the child has one."""
    timeout = child.spec.request_timeout
    if not timeout:
        return None
    return sup._timers.add(
        slot.started + timeout, lambda t: _on_request_timeout(sup, child, p, slot, t)
    )


def _on_request_timeout(sup: Supervisor, child: Child, p: Process, slot: Slot, now: float) -> None:
    if p.slots.get(slot.child_rid) is not slot or slot.abandoned or p.down_reason is not None:
        return
    slot.abandoned = True
    req = slot.request
    child.failed += 1
    timeout = child.spec.request_timeout
    what = f"timed out after {timeout:g}s on {child.name} (pid {child.pid})"
    req.history.append(f"attempt {req.attempts} {what}")
    sup._retry_or_fail(req, child, slot.attempt_id, what, outcome="timeout")
    send_cancel(sup, child, slot, kill_after_grace=True)
    sup._dispatch()


def send_cancel(sup: Supervisor, child: Child, slot: Slot, *, kill_after_grace: bool) -> None:
    """Tell `child` to stop `slot`'s request (dext; a JSON-lines child cannot be told); with
    `kill_after_grace`, kill it if it is still running the request after its CancelGraceSecs."""
    p = child.p
    if p is None or p.slots.get(slot.child_rid) is not slot:
        return
    data = p.conn.encode_cancel(slot.child_rid)
    if data is not None:
        child_loop.send(sup, child, p, data)
    if kill_after_grace:
        grace = child.spec.cancel_grace
        sup._timers.add(
            trio.current_time() + grace,
            lambda t: _on_cancel_grace(sup, child, p, slot, grace),
        )


def _on_cancel_grace(sup: Supervisor, child: Child, p: Process, slot: Slot, grace: float) -> None:
    if p.slots.get(slot.child_rid) is not slot or p.down_reason is not None:
        return
    how = "a Cancel" if p.conn.protocol == "dext" else "its timeout (JSON lines: no Cancel)"
    # The request that hung was dealt with already; the others on this child did nothing
    # wrong, so their retry is free.
    child_loop.kill(
        sup,
        child,
        p,
        f"request {slot.request.rid} (child id {slot.child_rid}) still running"
        f" {grace:g}s after {how}",
        charge_all=False,
    )
