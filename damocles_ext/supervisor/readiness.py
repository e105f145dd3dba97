"""What `Supervisor.wait_ready` decides on each look at the children: enough of them are ready,
or that can no longer happen (why, in words), or it waits for a change."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ProverError
from .child_loop import Child
from .states import ChildState


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
    down = "; ".join(f"{c.name} is {c.state.word}, last: {c.last_exit}" for c in gone)
    down = down or (f"the config has {len(pool)}" if pool else "none configured")
    raise ProverError(
        f"cannot wait for {count} ready {what}: only {len(alive)} of {len(pool)}"
        f" can still start ({down})"
    )
