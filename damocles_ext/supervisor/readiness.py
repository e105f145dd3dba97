"""Whether a Supervisor can serve a call: its run() begun (`run_begun`), and what
`wait_ready` decides on each look at the children (`enough_ready`): enough of them are ready, or
that can no longer happen (why, in words), or it waits for a change."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from ..errors import ProverError, UsageError, check_trio_run
from ..stages import STAGES
from .child_loop import Child
from .states import ChildState

if TYPE_CHECKING:
    from .core import Supervisor


def run_going(sup: Supervisor, what: str) -> bool:
    """True when `what` is called in the trio run of `sup.run()`, which goes on (checked here,
    with no coroutine: per request); False when `run_begun` is to be awaited: run() has not
    begun (it waits for one starting) or is over (it checks the caller is in a trio run)."""
    if sup._token is None or sup._finished:
        return False
    check_trio_run(what, sup._token)
    return True


async def run_begun(sup: Supervisor, what: str) -> None:
    """UsageError unless `what` is called in the trio run of `sup.run()`; before that run()
    began, wait RUN_WAIT for one started just before (nursery.start_soon begins it at the next
    checkpoint), else a UsageError (no one would serve the call: it waited for ever, its
    deadline unheeded)."""
    check_trio_run(what, None if sup._finished else sup._token)
    if sup._token is not None:
        return
    with trio.move_on_after(sup.RUN_WAIT):
        await sup._run_began.wait()
    if sup._token is None:
        raise no_run(what)
    check_trio_run(what, sup._token)


def no_run(what: str) -> UsageError:
    """The refusal of `what`, called while no run() of its Supervisor is going."""
    return UsageError(
        f"{what} was called while no run() of this Supervisor is going, which starts the"
        " children and answers the requests: use `async with open_supervisor(...)`, or"
        " `await nursery.start(sup.run)` before calling it"
    )


def check_wait_arguments(stage: object, count: object) -> None:
    """UsageError for a `wait_ready` stage that is none, or a count that is no number of
    children."""
    if stage is not None and stage not in STAGES:
        raise UsageError(f"wait_ready: unknown stage {stage!r}; give one of {STAGES}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UsageError(
            f"wait_ready: count must be a whole number of children, 1 or more; got {count!r}"
        )


def enough_ready(children: Iterable[Child], stage: str | None, count: int, finished: bool) -> bool:
    """True once `count` children (of `stage`, or of any stage) are ready; False while it may
    still happen; ProverError once it cannot (too many FATAL or stopped, or run() ended)."""
    pool = [c for c in children if stage is None or c.spec.stage == stage]
    if sum(c.state is ChildState.READY for c in pool) >= count:
        return True
    alive = [c for c in pool if c.state not in (ChildState.FATAL, ChildState.STOPPED)]
    if len(alive) >= count and not finished:
        return False
    what = f"{stage} children" if stage else "children"
    gone = [c for c in pool if c not in alive]
    down = "; ".join(_why_down(c) for c in gone)
    down = down or (f"the config has {len(pool)}" if pool else "none configured")
    raise ProverError(
        f"cannot wait for {count} ready {what}: only {len(alive)} of {len(pool)}"
        f" can still start ({down})"
    )


def _why_down(c: Child) -> str:
    if c.last_exit is not None:
        return f"{c.name} is {c.state.word}, last: {c.last_exit}"
    # No exit of it was told: its one process (if any) was stopped with run(), never ready.
    return f"{c.name} is {c.state.word}" + (", it never became ready" if c.protocol is None else "")
