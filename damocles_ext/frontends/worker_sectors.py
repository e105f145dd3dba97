"""Where a pulled job's sectors are, for `damocles-ext worker`: a plugin's `dext_sector_paths`,
then the attached stores in damocles' layout (jobs/worker_rules.py), then, for a sector whose
store the worker has not attached, the sector-location service (`worker --proxy`: the damocles
source node, a scan of the attached stores in damocles' layout, the plugins' providers).

A sector the service does not locate (not found, its last known files gone, no provider could
answer in time) makes the job's answer its faults and no proof, as a prover answers for a
sector it cannot read: damocles-manager then proves again without them. The lookup takes at
most a share of the time to the job's deadline (`NotAfter`), so a slow source cannot eat the
proving window. Without `--proxy`, a store not attached fails the job, as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

from ..jobs.worker_rules import MissingStore, PulledJob, default_sector_paths
from ..sectors.files import in_thread

if TYPE_CHECKING:
    import pluggy

    from ..sectors import SectorRef
    from ..sectors.locator import SectorLocator

log = logging.getLogger("damocles_ext.worker")


async def job_sector_paths(
    job: PulledJob,
    *,
    attached: Mapping[str, str],
    plugin_manager: pluggy.PluginManager | None,
    locator: SectorLocator | None,
    now: float,
) -> tuple[list[tuple[str, str]], list[int]]:
    """(each sector's (sealed_file, cache_dir), the sector numbers not located: faults).
    MissingStore when a store is not attached and there is no locator; a plugin's exception
    passes through (it fails the job)."""
    from ..sectors import SectorRef

    paths: list[tuple[str, str]] = []
    unresolved: list[tuple[int, SectorRef]] = []
    for i, sector in enumerate(job.Input.Sectors or ()):
        found = None
        if plugin_manager is not None:
            found = plugin_manager.hook.dext_sector_paths(job=job, sector=sector, attached=attached)
        if found is None:
            try:
                found = default_sector_paths(job, sector, attached)
            except MissingStore:
                if locator is None:
                    raise
                ref = SectorRef(job.Input.MinerId, sector.SectorId, sector.Upgrade)
                unresolved.append((i, ref))
                found = ("", "")
        paths.append((str(found[0]), str(found[1])))
    faults: list[int] = []
    if unresolved:
        assert locator is not None
        time_left = None if job.NotAfter is None else job.NotAfter - now
        answers = await locator.locate([ref for _, ref in unresolved], time_left=time_left)
        for (i, ref), answer in zip(unresolved, answers, strict=True):
            location = answer.location
            if answer.found and location is not None:
                paths[i] = (location.sealed_file, location.cache_dir)
                if answer.stale:
                    log.warning("job %s: %s: %s", job.Id, ref, answer.detail)
            else:
                log.warning("job %s: %s is a fault: %s", job.Id, ref, answer.detail)
                faults.append(ref.number)
    return paths, faults


#: Seconds the look at a job's store directories may take (a stalled mount fails the job).
STORE_LOOK_TIMEOUT = 30.0


def _missing_dirs(paths: list[tuple[str, str]]) -> list[str]:
    """The directories holding the sectors' files that are not directories here (blocking)."""
    dirs = sorted({os.path.dirname(p) for pair in paths for p in pair if p})
    return [d for d in dirs if not os.path.isdir(d)]


async def store_problem(
    job: PulledJob, paths: list[tuple[str, str]], limiter: trio.CapacityLimiter
) -> str | None:
    """Why `job` must not be proved here, or None: a directory its sectors' files should be in
    (a store's sealed/, cache/, update/ ...) is missing, so the store is not mounted, or
    attached at the wrong path. Proving would answer every sector on it faulty, and
    damocles-manager would declare them faulty on chain; failing the job lets a worker that
    has the store prove it. A sector whose own file is missing stays a fault."""
    try:
        missing = await in_thread(_missing_dirs, paths, limiter=limiter, timeout=STORE_LOOK_TIMEOUT)
    except TimeoutError:
        return (
            f"job {job.Id}: its sectors' stores did not answer within {STORE_LOOK_TIMEOUT:g} s"
            " (a stalled mount?); not proved here"
        )
    if not missing:
        return None
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return (
        f"job {job.Id}: {missing[0]}{more} is not a directory here: is the store mounted, and"
        " attached at the right path (--attached)? Not proved here, rather than answering every"
        " sector in it faulty"
    )
