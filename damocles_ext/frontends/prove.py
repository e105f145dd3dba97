"""`damocles-ext prove`'s one request: through a running `run`'s control socket, or on a
supervisor of its own started for this request alone."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ..api import open_supervisor
from ..client import Client, KindUnsaidError, connect
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

#: A request `prove --socket` sends to `run` without --deadline carries none (`prove -c` and
#: `--jobs` give serve's default; through the socket, `run` gives its own --deadline-after,
#: which may be off): the client has none to give up at, and a `run` that is stopped (SIGSTOP)
#: or hung enforces its own on nobody. So every ALIVE_EVERY seconds the supervisor is asked its
#: status, and one that does not answer within ALIVE_WITHIN (as `status --timeout`) is taken for
#: stopped or hung: the request is given up. (`prove`'s own: a program of the Python client
#: bounds its waits with deadlines.)
ALIVE_EVERY = 60.0
ALIVE_WITHIN = 10.0


def prove_in_process(
    children: list[ChildSpec],
    task: Task,
    *,
    plugin_manager: DextPluginManager | None,
    deadline: float | None = None,
    priority: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
) -> Output:
    """Start `children`, prove `task` on them, stop them; ProverError when there is no proof.
    Its faults are for the caller to say (prove's own line): the supervisor's note of them is
    not logged."""
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
    async with open_supervisor(
        children, plugin_manager=plugin_manager, backoff=backoff, faults_said_elsewhere=True
    ) as sup:
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
            submit = client.submit(
                task, deadline=deadline, priority=priority, on_progress=on_progress
            )
            return await (submit if deadline is not None else _while_alive(client, submit))
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
    deadline_after: float | None = None,
    poll_interval: float | None = None,
) -> Output:
    """Prove `task` as a job of the store at `url`: the workers prove it (api.submit_job),
    its result looked for every `poll_interval` (None: the store's limits', damocles' 3 s);
    its deadline `deadline` (unix time), else `deadline_after` s from now on the store's clock."""
    from ..api import submit_job

    submit = functools.partial(
        submit_job, url, task, deadline=deadline, stores=stores, conf_dir=conf_dir,
        deadline_after=deadline_after, poll_interval=poll_interval,
    )  # fmt: skip
    return trio.run(submit)


async def _while_alive(client: Client, submit: Awaitable[Output]) -> Output:
    """`submit`'s answer, given up (ProverError) once the supervisor does not answer a status
    request within ALIVE_WITHIN, asked every ALIVE_EVERY (a request with no deadline would
    otherwise wait for ever on a `run` that is stopped or hung)."""
    answer: list[Output] = []
    failed: list[Exception] = []

    async def ask() -> None:
        try:
            answer.append(await submit)
        except Exception as exc:  # noqa: BLE001 - raised below as it is, not in a group
            failed.append(exc)
        nursery.cancel_scope.cancel()

    async def watch() -> None:
        while True:
            await trio.sleep(ALIVE_EVERY)
            with trio.move_on_after(ALIVE_WITHIN) as waited:
                try:
                    await client.status()
                except ProverError:  # an answer (busy, no status), or the connection gone,
                    if not client.open:  # which the request's own wait says
                        return
                    continue
            if waited.cancelled_caught:
                nursery.cancel_scope.cancel()  # the request is cancelled in the supervisor
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        nursery.start_soon(ask)
    if failed:
        raise failed[0]
    if answer:
        return answer[0]
    raise ProverError(  # (the watch ended it: nothing else does, but a cancel from outside)
        f"the supervisor at {client.path} did not answer a status request within"
        f" {ALIVE_WITHIN:g} s while it proved this request, which has no deadline (stopped,"
        " e.g. by SIGSTOP, or hung?); not proved, cancelled (give --deadline to bound the wait)"
    )
