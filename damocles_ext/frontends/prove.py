"""`damocles-ext prove`'s one request: through a running `run`'s control socket, or on a
supervisor of its own started for this request alone."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..api import open_supervisor
from ..client import KindUnsaidError, connect
from ..errors import ProverError, UsageError
from ..supervisor.restart import BackoffPolicy
from ..tasks import stage_of
from .forwarder import stage_problem

if TYPE_CHECKING:
    from ..config import ChildSpec
    from ..plugins import DextPluginManager
    from ..protocol.dext import Progress
    from ..tasks import Output, Task

log = logging.getLogger("damocles_ext.prove")


def prove_in_process(
    children: list[ChildSpec],
    task: Task,
    *,
    plugin_manager: DextPluginManager | None,
    deadline: float | None = None,
    priority: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
) -> Output:
    """Start `children`, prove `task` on them, stop them; ProverError when there is no proof."""
    return trio.run(
        _prove_embedded, children, task, deadline, priority, on_progress, plugin_manager
    )


def prove_through_socket(
    socket: str | None,
    task: Task,
    *,
    deadline: float | None = None,
    priority: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
) -> Output:
    """Prove `task` through the `run` at `socket` (None: its default path)."""
    return trio.run(_prove_remote, socket, task, deadline, priority, on_progress)


async def _prove_embedded(
    children: list[ChildSpec],
    task: Task,
    deadline: float | None,
    priority: int,
    on_progress: Callable[[Progress], None] | None,
    plugin_manager: DextPluginManager | None,
) -> Output:
    # Caught inside the block: leaving open_supervisor's nursery with an exception would wrap
    # it in an ExceptionGroup.
    # A prover that cannot load with this config is said at once (exit code 2), not after the
    # restarts' backoff; a child that crashes as it starts is retried as `run` would.
    backoff = BackoffPolicy(give_up_when_refused=True)
    async with open_supervisor(children, plugin_manager=plugin_manager, backoff=backoff) as sup:
        try:
            return await sup.submit(
                task, deadline=deadline, priority=priority, on_progress=on_progress
            )
        except ProverError as exc:
            error = exc
            refused = all(c.start_refused for c in sup.statistics().children)
    if refused:
        raise UsageError(f"{error}; fix the config (check-config checks what it can)") from None
    raise error


async def _prove_remote(
    socket: str | None,
    task: Task,
    deadline: float | None,
    priority: int,
    on_progress: Callable[[Progress], None] | None,
) -> Output:
    async with connect(socket) as client:
        log.info("connected to %s", client.path)
        try:
            # A worker's socket, which refuses every proof, or a `run` with no child of the
            # stage: a wrong --socket or config, the operator's to fix (exit code 2, as serve
            # --connect says it), not a prover's failure. The answer says so (UsageError)...
            return await client.submit(
                task, deadline=deadline, priority=priority, on_progress=on_progress
            )
        except KindUnsaidError as exc:
            error = exc
        # ... except a supervisor's older than that: its status tells.
        problem = await stage_problem(client, stage_of(task), "--socket", warn=False)
        if problem is not None:
            raise UsageError(problem) from None
        raise error


def prove_through_jobs(
    url: str,
    task: Task,
    *,
    stores: list[tuple[str, str]],
    conf_dir: str | None,
    deadline: float | None = None,
    poll_interval: float | None = None,
) -> Output:
    """Prove `task` as a job of the store at `url`: the workers prove it (api.submit_job),
    its result looked for every `poll_interval` (None: the store's limits', damocles' 3 s)."""
    from ..api import submit_job

    submit = functools.partial(
        submit_job, url, task, deadline=deadline, stores=stores, conf_dir=conf_dir,
        poll_interval=poll_interval,
    )  # fmt: skip
    return trio.run(submit)
