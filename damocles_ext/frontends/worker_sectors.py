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

from ..errors import describe, passes_through, text_of
from ..jobs.worker_rules import MissingStore, PulledJob, default_sector_paths
from ..sectors.files import in_thread
from ..threads import NoThreadError
from ..wording import some_and_more

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
    time_left: float | None,
) -> tuple[list[tuple[str, str]], list[int]]:
    """(each sector's (sealed_file, cache_dir), the sector numbers not located: faults);
    `time_left`: the seconds to the job's deadline (None: it has none), a share of which the
    locator may take.
    MissingStore when a store is not attached and there is no locator; a RuntimeError naming
    the hook and its plugin for what a plugin's dext_sector_paths raises (it fails the job)."""
    from ..plugin_blame import call_hook, raised_by, returned_by, whose
    from ..sectors import SectorRef

    paths: list[tuple[str, str]] = []
    unresolved: list[tuple[int, SectorRef]] = []
    for i, sector in enumerate(job.Input.Sectors or ()):
        found = None
        if plugin_manager is not None:
            caller = plugin_manager.hook.dext_sector_paths
            try:
                found, seen = call_hook(caller, job=job, sector=sector, attached=attached)
            except BaseException as exc:  # a plugin's bug fails this job, not the worker
                if passes_through(exc):
                    raise
                what = (
                    f"called sys.exit({text_of(exc.code, repr)})"
                    if isinstance(exc, SystemExit)
                    else f"raised {describe(exc)}"
                )
                hook = whose("dext_sector_paths", raised_by(caller, exc))
                raise RuntimeError(
                    f"job {job.Id}: sector {sector.SectorId}: {hook} {what}"
                ) from None
            if found is not None and not _a_pair_of_paths(found):  # its bug: no fault of it
                hook = whose("dext_sector_paths", returned_by(seen, found))
                raise RuntimeError(
                    f"job {job.Id}: sector {sector.SectorId}: {hook} returned"
                    f" {text_of(found, repr)[:200]}, not (sealed_file, cache_dir)"
                )
        if found is None:
            try:
                found = default_sector_paths(job, sector, attached)
            except MissingStore:
                if locator is None:
                    raise
                ref = SectorRef(job.Input.MinerId, sector.SectorId, sector.Upgrade)
                unresolved.append((i, ref))
                found = ("", "")
        paths.append((os.fspath(found[0]), os.fspath(found[1])))
    faults: list[int] = []
    if unresolved:
        assert locator is not None
        answers = await locator.locate([ref for _, ref in unresolved], time_left=time_left)
        stale: list[tuple[SectorRef, str]] = []
        lost: list[tuple[SectorRef, str]] = []
        for (i, ref), answer in zip(unresolved, answers, strict=True):
            location = answer.location
            if answer.found and location is not None:
                paths[i] = (location.sealed_file, location.cache_dir)
                if answer.stale:
                    stale.append((ref, answer.detail))
            else:
                lost.append((ref, answer.detail))
                faults.append(ref.number)
        # One line per job and kind, not per sector: a source node down made thousands a job.
        for said, what in ((stale, "given from their last known locations"), (lost, "faults")):
            if said:
                names = some_and_more([str(ref) for ref, _ in said[:3]], len(said))
                log.warning("job %s: %d sector(s) %s (%s): %s", job.Id, len(said), what, names,
                            said[0][1])  # fmt: skip
                for ref, detail in said:
                    log.debug("job %s: %s %s: %s", job.Id, ref, what, detail)
    return paths, faults


#: Seconds the look at a job's store directories may take (a stalled mount fails the job).
STORE_LOOK_TIMEOUT = 30.0


async def store_problem(
    job: PulledJob, paths: list[tuple[str, str]], limiters: dict[str, trio.CapacityLimiter]
) -> str | None:
    """What is wrong with the directories `job`'s sectors' files should be in (a store's
    sealed/, cache/, update/ ...), or None: one that is missing means the store is not mounted,
    or attached at the wrong path, and proving would answer every sector in it faulty, which
    damocles-manager declares on chain. The caller fails the job on its first try (a worker that
    has the store may prove it), and proves it on a later one (a store really lost: its sectors
    are faults, the others proved). A sector whose own file is missing stays a fault. Each
    directory is looked at in a thread of its own (`limiters`, one per directory), so a hung
    mount holds the looks at its own directory only. A directory's limiter goes once nothing
    holds or waits for it (a look timed out keeps it: its thread holds it until it returns): a
    plugin's layout with a directory per sector must not leave one per sector for ever."""
    for directory in _directories(paths):
        limiter = limiters.get(directory)
        if limiter is None:
            limiter = limiters[directory] = trio.CapacityLimiter(1)
        try:
            there = await in_thread(
                os.path.isdir, directory, limiter=limiter, timeout=STORE_LOOK_TIMEOUT
            )
        except TimeoutError:
            return (
                f"job {job.Id}: {directory} did not answer within {STORE_LOOK_TIMEOUT:g} s (a"
                f" stalled mount?); {_WHAT_NOW}"
            )
        except NoThreadError as exc:  # at the limit of tasks: the job's, not the worker's end
            return f"job {job.Id}: cannot look at {directory}: {exc}; {_WHAT_NOW}"
        finally:
            idle = not (limiter.borrowed_tokens or limiter.statistics().tasks_waiting)
            if idle and limiters.get(directory) is limiter:
                del limiters[directory]
        if not there:
            return (
                f"job {job.Id}: {directory} is not a directory here: is the store mounted, and"
                f" attached at the right path (--attached)? {_WHAT_NOW}"
            )
    return None


def _directories(paths: list[tuple[str, str]]) -> list[str]:
    """The directories the files and cache directories of `paths` are in (no I/O)."""
    dirs = {os.path.dirname(os.path.normpath(p)) for pair in paths for p in pair if p}
    return sorted(d for d in dirs if d)


_WHAT_NOW = (
    "Not proved here on the job's first try (every sector in it would be a fault); proved all"
    " the same on a later one"
)


def _a_pair_of_paths(found: object) -> bool:
    """Whether a dext_sector_paths answer is (sealed_file, cache_dir): two non-empty paths."""
    return (
        isinstance(found, tuple | list)
        and len(found) == 2
        and all(
            isinstance(p, str | os.PathLike) and isinstance(os.fspath(p), str) and os.fspath(p)
            for p in found
        )
    )
