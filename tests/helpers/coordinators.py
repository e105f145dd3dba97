"""Helpers for the tests that run coordinators on one job store: jobs to share, a worker's
heartbeats, and what the coordinators said when a test fails."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
from test_jobs_rules import make_input

from damocles_ext.jobs.client import RpcClient
from damocles_ext.jobs.store import JobStore
from helpers.frontend import CoordinatorProcess

#: A sector-manager.cfg whose HeartbeatTimeout takes a silent job back within seconds.
SHORT_TIMEOUT = '[Common.Proving.WorkerProver]\nHeartbeatTimeout = "3s"\n'


def two_jobs_with_a_quick_heartbeat_timeout(postgres_url: str, conf_dir: Path) -> tuple[str, str]:
    """Two ready jobs in the store and a 3 s HeartbeatTimeout in `conf_dir`: the coordinators'
    arguments that read it."""
    (conf_dir / "sector-manager.cfg").write_text(SHORT_TIMEOUT)
    with JobStore.open(postgres_url) as store:
        for seed in range(2):
            store.create(make_input(miner=1000 + seed, seed=seed), time.time())
    return ("--conf-dir", str(conf_dir))


def no_longer_running(postgres_url: str, job_id: str) -> bool:
    with JobStore.open(postgres_url, create=False) as store:
        return store.get(job_id).State != "running"


async def heartbeat_forever(client: RpcClient, held: list, worker: str) -> None:
    """`worker`'s heartbeats of `held` through `client`, each answered with nothing to stop."""
    while True:
        assert await client.call("Dext.HeartbeatJobs", held, worker) == []
        await trio.sleep(0.25)  # the worker's heartbeat period, not a wait


@contextmanager
def what_they_said(*coordinators: CoordinatorProcess) -> Iterator[None]:
    """The coordinators stopped at the end; on a failure, what each said (A, B...), with it."""
    try:
        yield
    except BaseException as exc:
        for name, c in zip("ABCDEFGH", coordinators, strict=False):
            exc.add_note(f"{name} said:\n{c.stderr.decode(errors='replace')[-4000:]}")
        raise
    finally:
        for c in coordinators:
            c.stop()
