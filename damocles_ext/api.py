"""The Python API: run a supervisor inside your own trio program.

    from damocles_ext.api import open_supervisor

    async with open_supervisor("ext-prover.cfg") as sup:
        await sup.wait_ready("window_post")
        output = await sup.submit(task)          # raises ProverError when no proof came

Leaving the block requests a graceful shutdown (in-flight requests get `shutdown_grace`
seconds) and waits until every child process is gone.

Or submit WindowPoSt tasks as jobs of a job store, for workers on other machines to prove (the
same producer as `serve window_post --jobs`; see docs/JOBS.md):

    from damocles_ext.api import open_job_producer

    async with open_job_producer("postgresql://...", stores={"nfs-1": "/mnt/nfs-1"}) as jobs:
        output = await jobs.submit(task)         # ProverError names job, worker, tries, why

`submit_job(url, task, ...)` does the same for one task.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

import trio

from .errors import check_trio_run
from .supervisor.core import Supervisor

if TYPE_CHECKING:
    from .config import ChildSpec, Config
    from .frontends.producer import JobProducer
    from .tasks import Output, Task

#: What open_supervisor starts from: a Config, its children, or a config file or conf dir.
ConfigSource: TypeAlias = "Config | Sequence[ChildSpec] | str | os.PathLike[str]"


def _load(config_or_path: ConfigSource) -> Config | Sequence[ChildSpec]:
    if isinstance(config_or_path, (str, os.PathLike)):
        from .config import load_conf_dir, load_config

        if os.path.isdir(config_or_path):
            return load_conf_dir(config_or_path)
        return load_config(config_or_path)
    return config_or_path


@asynccontextmanager
async def open_supervisor(config_or_path: ConfigSource, **kwargs: Any) -> AsyncIterator[Supervisor]:
    """Start a Supervisor from a Config, a ChildSpec list, a config file or a conf dir.

    Keyword arguments go to `Supervisor` (plugin_manager, stages, shutdown_grace, ...). The
    children have been launched (not necessarily ready) when the block starts.
    """
    check_trio_run("open_supervisor()")
    sup = Supervisor(_load(config_or_path), **kwargs)
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        try:
            yield sup
        except BaseException as exc:  # noqa: BLE001 - re-raised below, outside the nursery
            # Raised inside it, the caller's own exception (a ProverError, say) would reach it
            # wrapped in the nursery's ExceptionGroup. The supervisor stops at once, as before.
            error = exc
            nursery.cancel_scope.cancel()
        finally:
            sup.request_shutdown()
    if error is not None:
        raise error


@asynccontextmanager
async def open_job_producer(
    url: str,
    *,
    stores: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    conf_dir: str | None = None,
    deadline_after: float | None = None,
    poll_interval: float | None = None,
) -> AsyncIterator[JobProducer]:
    """A JobProducer on the job store at `url` (created if missing) whose `submit(task)` proves
    a WindowPoSt through the workers; on PostgreSQL its LISTEN/NOTIFY listener runs meanwhile, on
    SQLite serve's check of its file every 10 s (one deleted or replaced is said within it).

    `stores` (name -> path) and, with `conf_dir`, the [[Common.PersistStores]] of
    damocles-manager's sector-manager.cfg there map the task's paths to store names; that file's
    [Common.Proving.WorkerProver] gives the limits. On PostgreSQL it keeps to the server's clock,
    as the coordinators do (read before the block starts, 3 s at most, then at each poll):
    `deadline_after` is counted on it, and a machine whose clock is 2 s or more off is warned;
    a `deadline` given to submit is a unix time taken as it is. Raises UsageError for a bad URL or config, or
    a store that takes no writes or that another user could change (as `serve --jobs` does),
    and StoreError when the store cannot be reached (or no thread can be started to open it)."""
    # Else, from asyncio, trio's refusal of the thread read as this user's limit of tasks.
    check_trio_run("open_job_producer()")
    from .frontends.producer import JobProducer, producer_settings
    from .jobs.store import JobStore, StoreUnavailable, describe_url
    from .threads import NoThreadError, run_in_thread

    given = list(stores.items()) if isinstance(stores, Mapping) else list(stores)
    try:
        # In a thread: sector-manager.cfg's ScanPersistStores globs the stores' mounts (an NFS
        # server down would hold the caller's whole trio run).
        settings = await run_in_thread(
            functools.partial(producer_settings, conf_dir, given, poll_interval)
        )
        store = await run_in_thread(
            functools.partial(JobStore.open, url, limits=settings.limits, writable=True)
        )
    except NoThreadError as exc:  # at the limit of tasks: the store was not asked
        raise StoreUnavailable(f"job store {describe_url(url)}: {exc}") from None
    error: BaseException | None = None
    try:
        producer = JobProducer.on(store, settings, deadline_after=deadline_after)
        async with trio.open_nursery() as nursery:
            producer.start_watches(nursery)
            # On the server's clock before a job is made: deadline_after is counted on it.
            await nursery.start(producer.watch_clock)
            try:
                yield producer
            except BaseException as exc:  # noqa: BLE001 - re-raised below, outside the nursery
                # Raised inside it, the caller's own exception would reach it wrapped in the
                # nursery's ExceptionGroup.
                error = exc
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    if error is not None:
        raise error


async def submit_job(url: str, task: Task, *, deadline: float | None = None,
                     **kwargs: Any) -> Output:  # fmt: skip
    """Prove one WindowPoSt task as a job of the store at `url` (see open_job_producer for the
    keyword arguments); `deadline` is the job's not_after (unix seconds)."""
    async with open_job_producer(url, **kwargs) as producer:
        return await producer.submit(task, deadline=deadline)


__all__ = ["Supervisor", "open_job_producer", "open_supervisor", "submit_job"]
