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

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import trio

from ..errors import describe, passes_through, text_of
from ..jobs.worker_rules import MissingStore, PulledJob, default_sector_paths
from ..sectors.files import in_thread, path_problem
from ..threads import NoThreadError
from ..wording import sector_list, some_and_more

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
        with _limiter_of(limiters, directory) as limiter:
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
        if not there:
            return (
                f"job {job.Id}: {directory} is not a directory here: is the store mounted, and"
                f" attached at the right path (--attached)? {_WHAT_NOW}"
            )
    return None


@contextlib.contextmanager
def _limiter_of(
    limiters: dict[str, trio.CapacityLimiter], directory: str
) -> Iterator[trio.CapacityLimiter]:
    """The limiter of the looks at `directory` (one thread at a time), made if it has none; it
    goes once nothing holds or waits for it (a look timed out keeps it: its thread holds it
    until it returns)."""
    limiter = limiters.get(directory)
    if limiter is None:
        limiter = limiters[directory] = trio.CapacityLimiter(1)
    try:
        yield limiter
    finally:
        idle = not (limiter.borrowed_tokens or limiter.statistics().tasks_waiting)
        if idle and limiters.get(directory) is limiter:
            del limiters[directory]


#: The faulty sectors of a proof whose files the worker looks at, at most (a partition's
#: 2,349 in a store gone: the first ones say it).
FAULTS_LOOKED_AT = 200
#: Threads looking at faulty sectors' files at once, across the worker's jobs.
FAULT_LOOK_THREADS = 8
#: What a faulty sector whose files are there and readable comes from.
_FILES_FINE = (
    "the data did not check out against the comm_r, or the prover could not use it: the"
    " prover's log lines say which, where it writes any"
)


async def faults_seen(
    job_id: str,
    where: dict[int, tuple[str, str]],
    faults: Sequence[int],
    threads: trio.CapacityLimiter,
) -> str:
    """The log line for what this machine sees of the files of `faults`, the sectors a proof of
    job `job_id` answered faulty (`where`: (sealed_file, cache_dir) by sector number): of each
    of the first FAULTS_LOOKED_AT, what is wrong (missing, another type of file, a symlink to
    nothing, not readable by this worker's user), or that nothing is. A prover's answer names
    the faulty sectors, not why; a C or `Bin` prover may log nothing. One thread per directory
    of sealed files, each within STORE_LOOK_TIMEOUT, at most `threads`' tokens at once for all
    the worker's looks: a thread stuck on a stalled mount keeps its token until it returns, so
    such threads never pile up (the looks that find no token in time say so)."""
    known = [n for n in faults if n in where]  # (a number not the job's: the prover's bug)
    looked = known[:FAULTS_LOOKED_AT]
    why: dict[int, str] = {}

    async def look(directory: str, numbers: list[int]) -> None:
        try:
            found = await in_thread(
                _file_problems,
                [where[n] for n in numbers],
                limiter=threads,
                timeout=STORE_LOOK_TIMEOUT,
            )
        except (TimeoutError, NoThreadError) as exc:
            found = [f"{directory}: {exc}"] * len(numbers)
        why.update(zip(numbers, found, strict=True))

    async with trio.open_nursery() as nursery:
        for directory, numbers in _by_directory(looked, where).items():
            nursery.start_soon(look, directory, numbers)
    return faults_seen_text(job_id, [(n, why[n]) for n in looked], len(known) - len(looked))


def _by_directory(numbers: list[int], where: dict[int, tuple[str, str]]) -> dict[str, list[int]]:
    """`numbers` by the directory of their sealed files (no I/O)."""
    groups: dict[str, list[int]] = {}
    for n in numbers:
        groups.setdefault(os.path.dirname(os.path.normpath(where[n][0])), []).append(n)
    return groups


def _file_problems(pairs: list[tuple[str, str]]) -> list[str]:
    """For each (sealed_file, cache_dir): what is wrong with them here, '' for nothing
    (blocking)."""
    return [_file_problem(sealed, cache) for sealed, cache in pairs]


def _file_problem(sealed: str, cache: str) -> str:
    problem = path_problem(sealed, False) or path_problem(cache, True)
    if problem:
        return problem
    user = f"this worker's user (uid {os.geteuid()})"
    effective = os.access in os.supports_effective_ids  # (the uid named: the one that opens)
    if not os.access(sealed, os.R_OK, effective_ids=effective):
        return f"{sealed} is not readable by {user}"
    if not os.access(cache, os.R_OK | os.X_OK, effective_ids=effective):
        return f"{cache} cannot be read by {user}"
    return ""


#: Faulty sectors whose causes one line names one by one; the rest are counted.
FAULT_CAUSES_NAMED = 5


def faults_seen_text(job_id: str, seen: Sequence[tuple[int, str]], not_looked_at: int) -> str:
    """The log line for what the worker saw of a job's faulty sectors' files: `seen`, (sector
    number, what is wrong with its files, '' for nothing) each; `not_looked_at`, the faulty
    sectors beyond those."""
    bad = [(n, why) for n, why in seen if why]
    fine = [n for n, why in seen if not why]
    parts = []
    if bad:
        named = [f"sector {n}: {why}" for n, why in bad[:FAULT_CAUSES_NAMED]]
        parts.append(some_and_more(named, len(bad), "; "))
    if fine:
        whose = "its files are" if len(fine) == 1 else "their files are"
        parts.append(
            f"{'sector' if len(fine) == 1 else 'sectors'} {sector_list(fine)}: {whose} here and"
            f" readable, so {_FILES_FINE}"
        )
    if not_looked_at:
        parts.append(f"{not_looked_at} more not looked at")
    return f"job {job_id}: the files of its faulty sectors, as this worker sees them: " + "; ".join(
        parts
    )


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
