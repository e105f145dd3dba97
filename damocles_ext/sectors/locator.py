"""The sector locator (trio): asks the providers, remembers what they said, refreshes it in the
background, and stands in for a provider that cannot answer with the last known location whose
files are still there.

Public API (kept stable; the worker, the coordinator and `prove` use it):

- `locator = await open_locator(settings, plugin_manager=pm)` builds the providers (the plugins'
  `dext_sector_providers`, then the source node and the scan) and the locator; or
  `SectorLocator(providers, rules=CacheRules(...), bounds=Bounds(...), metrics=...)`.
- `answers = await locator.locate(sectors, time_left=seconds)`: one `SectorAnswer` per sector,
  in the order given (duplicates answered alike). `time_left` is the time until the caller's
  deadline: the whole batch takes at most `bounds.budget(time_left)`, so a slow source cannot
  eat a proving window. Never raises for a sector: a sector that cannot be located is an answer
  (`not_found`, `missing`, `error`).
- `locator.want(sectors, within=seconds)`: these sectors are needed that much later (the next
  deadline's): the background task asks for them `rules.refresh_lead` before.
- `await nursery.start(locator.refresh_forever)`: the background refresh (optional).
- `locator.cached(sector)`: what is remembered, without asking anyone (None if nothing).
- `locator.status()`: a plain dict for a process's status document.
- `locator.refused`, `locator.unasked`: per provider, a refusal of our credentials, and the
  sectors its share of a lookup's time left unasked (`model.Unasked`): said once by a command.
- `await locator.aclose()` (or `async with locator`).
- `snapshot=CacheSnapshot(path)` (snapshot.py): the cache kept across restarts; its entries are
  read when the first lookup or refresh starts (`restore`), in a task of their own (a lookup
  waits for them a provider's share of its time at most, and goes on without them: they are
  taken in when they arrive; past `READ_TIMEOUT` nothing waits for them), saved by
  `refresh_forever` now and then and by `aclose` (only once they were taken in: a locator that
  never loaded does not overwrite a snapshot with nothing).

The rules of one batch: a sector whose entry is fresh is answered from the cache. The others go
to the providers in order, each given an equal share of what is left of the providers' phase
(`model.provider_slice`) and each lookup at most `bounds.lookup_timeout` (a sector it had no
time to be asked for says so: not asked, not timed out); the first location given wins and is
remembered. A sector no provider located although one of them failed (an
error, a timeout) gets its last known location if the files are still there (checked in a
thread with a time bound, in the reserve `bounds.phases` keeps), marked cached with its age;
if they are not, it is `missing` (a fault for the prover). A sector every provider said it does
not know is `not_found`, and forgotten; one a provider found in part (`BrokenLocation`) is
`missing` with its reason, and forgotten too. A provider's failures are logged (a warning at most
every `FAILURE_LOG_EVERY` seconds while it fails, an info line when it answers again), so an
outage hidden by the next provider or the cache is still said. An outage that begins and ends
within `FAILURE_LOG_EVERY` of the last warning (a flapping source) is counted, and said by the
next warning, else by one line once that time is over (or at close): summed up, never lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import trio

from ..errors import describe, passes_through, text_of
from .cache import CacheEntry, CacheRules, SectorCache
from .files import DEFAULT_THREADS, check_locations
from .model import (
    Bounds,
    BrokenLocation,
    SectorAccessRefused,
    SectorAnswer,
    SectorLocation,
    SectorProvider,
    SectorProviderError,
    SectorRef,
    SectorSettings,
    Unasked,
    provider_slice,
)
from .providers import build_providers

if TYPE_CHECKING:
    from ..plugins import DextPluginManager
    from .metrics import SectorMetrics
    from .snapshot import CacheSnapshot

log = logging.getLogger("damocles_ext.sectors")

#: Sectors given at once to a provider's optional `find_batch` (the scan: one thread per batch).
PROVIDER_BATCH = 64
#: Sectors one background refresh asks for at most.
REFRESH_BATCH = 4096
#: A background refresh asks each provider at most this share of `Bounds.concurrency` at once:
#: a lookup someone waits for queues behind a few of its calls at most, never behind thousands.
REFRESH_SHARE = 4
#: A provider's failures are logged at most once in this many seconds (with how many since).
FAILURE_LOG_EVERY = 60.0


@dataclass(slots=True)
class Counts:
    """What the locator did since it started (the status section; metrics count the same)."""

    lookups: int = 0
    cache_hits: int = 0
    source_errors: dict[str, int] = field(default_factory=dict)
    stale_answers: int = 0
    not_found: int = 0
    missing: int = 0
    refreshes: int = 0
    last_error: tuple[str, str, float] | None = None  # provider, message, when


@dataclass(slots=True)
class _Trouble:
    """A provider's lookups that failed since it last answered (what the log says of it)."""

    since: float
    failures: int = 0
    #: A warning said this trouble: its end is said too.
    said: bool = False
    message: str = ""  # the last failure's


@dataclass(slots=True)
class _Unsaid:
    """A provider's troubles that began and ended within a minute of its last warning (a
    flapping source): said, summed up, by its next warning, else once that minute is over."""

    outages: int = 0
    failures: int = 0
    message: str = ""  # the last failure's


@dataclass(slots=True)
class _Outcome:
    """What the providers said about one sector in one batch."""

    found: tuple[SectorLocation, str] | None = None
    #: The first provider's that found the sector in part, the rest gone or of the wrong type.
    broken: tuple[BrokenLocation, str] | None = None
    not_known: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class SectorLocator:
    def __init__(
        self,
        providers: Sequence[SectorProvider],
        *,
        rules: CacheRules | None = None,
        bounds: Bounds | None = None,
        metrics: SectorMetrics | None = None,
        threads: int = DEFAULT_THREADS,
        snapshot: CacheSnapshot | None = None,
    ) -> None:
        self.providers = list(providers)
        self.snapshot = snapshot
        self._restored = False
        self._restoring: trio.Event | None = None
        self._loading = trio.CancelScope()
        self.cache = SectorCache(rules)
        self.bounds = bounds or Bounds()
        self.metrics = metrics
        self.counts = Counts()
        self._limiters = [trio.CapacityLimiter(self.bounds.concurrency) for _ in self.providers]
        background = max(1, self.bounds.concurrency // REFRESH_SHARE)
        self._refresh_limiters = [trio.CapacityLimiter(background) for _ in self.providers]
        self._threads = trio.CapacityLimiter(threads)
        self._changed = trio.Event()
        #: Provider name -> its failures since it last answered; when it was last warned of;
        #: its troubles since then that no line said.
        self._trouble: dict[str, _Trouble] = {}
        self._warned_at: dict[str, float] = {}
        self._unsaid: dict[str, _Unsaid] = {}
        #: Provider name -> why, for each provider whose source refused our credentials in a
        #: lookup (`SectorAccessRefused`): a configuration mistake a command may say once.
        self.refused: dict[str, str] = {}
        #: Provider name -> the sectors its share of a lookup's time left unasked, in the last
        #: lookup (not a refresh) that left some: a command says it once, with its own advice.
        self.unasked: dict[str, Unasked] = {}

    @property
    def metrics(self) -> SectorMetrics | None:
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: SectorMetrics | None) -> None:
        # Each provider's error series is there (at 0) from the first scrape: one that appeared
        # at its first failures would show no increase() for them.
        if metrics is not None:
            for provider in self.providers:
                metrics.source_errors.labels(provider=provider.name)
        self._metrics = metrics

    @property
    def rules(self) -> CacheRules:
        return self.cache.rules

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._loading.cancel()  # a read not done: the file is left as it is
        if self.snapshot is not None and self._restored:
            await self.snapshot.save(self.cache, final=True)
        for name in list(self._unsaid):  # what a flapping provider did lately: said now
            self._say_unsaid(name, trio.current_time())
        for provider in self.providers:
            close = getattr(provider, "aclose", None)
            if close is not None:
                try:
                    await close()
                except BaseException as exc:  # one provider's close must not stop the others'
                    if passes_through(exc):
                        raise
                    log.warning("closing the sector provider %s: %s", provider.name, describe(exc))

    # --- one batch -------------------------------------------------------------------------

    async def locate(
        self, sectors: Iterable[SectorRef], *, time_left: float | None = None
    ) -> list[SectorAnswer]:
        """One answer per sector, in order; at most `bounds.budget(time_left)` seconds."""
        asked = list(sectors)
        start = trio.current_time()
        phase_end, batch_end = self.bounds.phases(start, self.bounds.budget(time_left))
        if self.snapshot is not None and not self._restored:  # being read: a share at most
            with trio.move_on_at(provider_slice(start, phase_end, len(self.providers) + 1)):
                await self.restore()
            start = trio.current_time()
        answers: dict[SectorRef, SectorAnswer] = {}
        todo: list[SectorRef] = []
        for sector in dict.fromkeys(asked):
            self._count("lookups")
            entry = self.cache.fresh(sector, start)
            if entry is None:
                todo.append(sector)
                continue
            self._count("cache_hits")
            answers[sector] = SectorAnswer(
                sector, "found", entry.location, entry.provider, True, entry.age(start)
            )
        outcomes = await self._ask(todo, phase_end)
        fallback: list[tuple[SectorRef, _Outcome]] = []
        now = trio.current_time()
        for sector in todo:
            outcome = outcomes[sector]
            if outcome.found is not None:
                location, provider = outcome.found
                self.cache.learn(sector, location, provider, now)
                self.cache.fresh(sector, now)  # a use: keeps it hot for the background refresh
                # A provider before it failed: said, though the sector was found.
                why = "; ".join(outcome.errors)
                answers[sector] = SectorAnswer(sector, "found", location, provider, False, 0.0, why)
            elif outcome.errors:
                fallback.append((sector, outcome))
            elif outcome.broken is not None:  # found in part: its files are what is wrong
                self.cache.forget(sector)
                self._count("missing")
                broken, provider = outcome.broken
                answers[sector] = SectorAnswer(
                    sector, "missing", broken.location, provider, False, 0.0,
                    broken.problem + _not_known_to(outcome),
                )  # fmt: skip
            else:
                self.cache.forget(sector)
                self._count("not_found")
                names = ", ".join(outcome.not_known) or "none: no provider is configured"
                answers[sector] = SectorAnswer(
                    sector, "not_found", None, ", ".join(outcome.not_known) or None,
                    detail=f"{sector} is not known to any provider (asked: {names})",
                )  # fmt: skip
        if fallback:
            await self._last_known(fallback, batch_end, answers)
        if asked:  # new uses and entries: the background refresh plans again
            self._changed.set()
        return [answers[sector] for sector in asked]

    async def _last_known(
        self,
        fallback: list[tuple[SectorRef, _Outcome]],
        batch_end: float,
        answers: dict[SectorRef, SectorAnswer],
    ) -> None:
        """The last known locations of sectors no provider could answer for, given when their
        files are still there: checked in one thread per group of sectors on the same storage
        (a stalled mount fails its own group only), within the batch's end."""
        now = trio.current_time()
        groups: dict[tuple[str, str], list[tuple[SectorRef, str, CacheEntry]]] = {}
        for sector, outcome in fallback:
            why = "; ".join(outcome.errors)
            if outcome.broken is not None:  # what the scan found of it, and what is wrong
                why += f"; {outcome.broken[1]}: {outcome.broken[0].problem}"
            why += _not_known_to(outcome)  # (next to look at: the store scan found nothing)
            entry = self.cache.last_known(sector, now)
            if entry is None:
                answers[sector] = SectorAnswer(
                    sector, "error", detail=f"{why}; and no location of it is known from before"
                )
                continue
            where = entry.location
            if not where.sealed_file:  # store names only (relayed): no files here to look at
                self._count("stale_answers")
                answers[sector] = SectorAnswer(
                    sector, "found", where, entry.provider, True, entry.age(now),
                    f"{why}; the last known store names ({entry.provider}, {entry.age(now):.0f} s"
                    " ago) are given, its files being on other machines",
                )  # fmt: skip
                continue
            key = (posixpath.dirname(where.sealed_file), posixpath.dirname(where.cache_dir))
            groups.setdefault(key, []).append((sector, why, entry))

        async def check(group: list[tuple[SectorRef, str, CacheEntry]]) -> None:
            timeout = min(self.bounds.check_timeout, batch_end - trio.current_time())
            locations = [entry.location for _, _, entry in group]
            if timeout > 0:
                problems = await check_locations(locations, limiter=self._threads, timeout=timeout)
            else:
                problems = ["no time was left to check its files"] * len(group)
            later = trio.current_time()
            for (sector, why, entry), problem in zip(group, problems, strict=True):
                answers[sector] = self._fallback_answer(sector, why, entry, problem, later)

        async with trio.open_nursery() as nursery:
            for group in groups.values():
                for first in range(0, len(group), PROVIDER_BATCH):
                    nursery.start_soon(check, group[first : first + PROVIDER_BATCH])

    def _fallback_answer(
        self, sector: SectorRef, why: str, entry: CacheEntry, problem: str, now: float
    ) -> SectorAnswer:
        age = entry.age(now)
        if problem:
            self._count("missing")
            return SectorAnswer(
                sector, "missing", entry.location, entry.provider, True, age,
                f"{why}; its last known files ({entry.provider}, {age:.0f} s ago) are not"
                f" there: {problem}",
            )  # fmt: skip
        self._count("stale_answers")
        return SectorAnswer(
            sector, "found", entry.location, entry.provider, True, age,
            f"{why}; the last known location ({entry.provider}, {age:.0f} s ago) is given, its"
            " files are there",
        )  # fmt: skip

    async def _ask(
        self, sectors: list[SectorRef], phase_end: float, *, background: bool = False
    ) -> dict[SectorRef, _Outcome]:
        """What the providers say, each in its share of the time to `phase_end` (`background`:
        a refresh, in at most its share of each provider's slots)."""
        outcomes = {sector: _Outcome() for sector in sectors}
        left = sectors
        never: dict[str, dict[SectorRef, str]] = {}  # by provider: the sectors left unasked
        for i, provider in enumerate(self.providers):
            if not left:
                break
            slice_end = provider_slice(trio.current_time(), phase_end, len(self.providers) - i)
            # A refresh takes one of its own few slots, then one of the provider's: never more
            # than `concurrency` calls to it at once in all.
            share = self._refresh_limiters[i] if background else None
            never[provider.name] = await self._ask_one(
                provider, self._limiters[i], left, slice_end, outcomes, share
            )
            left = [s for s in left if outcomes[s].found is None]
        for name, said in never.items():  # a provider after it found some: said of those no more
            found = [sector for sector in said if outcomes[sector].found is not None]
            for sector in found:
                outcomes[sector].errors.remove(said[sector])
            if (unasked := self.unasked.get(name)) is not None and found and not background:
                if len(found) == unasked.not_asked:
                    del self.unasked[name]
                else:
                    self.unasked[name] = dataclasses.replace(unasked, found_later=len(found))
        return outcomes

    async def _ask_one(
        self,
        provider: SectorProvider,
        limiter: trio.CapacityLimiter,
        sectors: list[SectorRef],
        slice_end: float,
        outcomes: dict[SectorRef, _Outcome],
        share: trio.CapacityLimiter | None = None,
    ) -> dict[SectorRef, str]:
        """Ask `provider` for `sectors` until `slice_end`; the sectors its share of the time
        left unasked, with the error each was given."""
        done: set[SectorRef] = set()
        started: set[SectorRef] = set()  # asked for: its lookup began (a slot was free)
        share_of_time = slice_end - trio.current_time()
        lookup_timeout = self.bounds.lookup_timeout
        find_batch = getattr(provider, "find_batch", None)

        def record(sector: SectorRef, location: object) -> None:
            outcome = outcomes[sector]
            if location is None:
                outcome.not_known.append(provider.name)
                self._answered(provider.name)
            elif isinstance(location, SectorLocation) and location.textual():
                outcome.found = (location, provider.name)
                self._answered(provider.name)
            elif (
                isinstance(location, BrokenLocation)
                and isinstance(location.location, SectorLocation)
                and location.location.textual()
                and isinstance(location.problem, str)
            ):
                if outcome.broken is None:
                    outcome.broken = (location, provider.name)
                self._answered(provider.name)
            elif isinstance(location, SectorProviderError):  # in a batch: that sector failed
                self._source_error(provider.name, outcome, text_of(location))
            else:
                message = f"{sector}: answered {text_of(location, repr):.300}, not a SectorLocation"
                if isinstance(location, SectorLocation):  # a pathlib.Path, say
                    message += " of str paths (and str or None store names)"
                self._source_error(provider.name, outcome, message)
            done.add(sector)

        size = 1 if find_batch is None else PROVIDER_BATCH
        chunks = iter(range(0, len(sectors), size))

        gate = contextlib.nullcontext() if share is None else share

        async def worker() -> None:
            # A few workers take the chunks in turn: a task per chunk would be a million tasks
            # for a million sectors, whose start and cancellation alone outlast the deadline.
            for first in chunks:
                async with gate, limiter:
                    await ask(sectors[first : first + size])

        async def ask(chunk: list[SectorRef]) -> None:
            started.update(chunk)
            deadline = min(slice_end, trio.current_time() + lookup_timeout)
            with trio.move_on_at(deadline):
                try:
                    if find_batch is None:
                        [sector] = chunk
                        found = {sector: await provider.find(sector)}
                    else:
                        found = await find_batch(chunk)
                        if isinstance(found, Mapping):  # a plugin's own, whose get may raise
                            found = {sector: found.get(sector) for sector in chunk}
                except BaseException as exc:  # a provider's bug fails that lookup only
                    if passes_through(exc):
                        raise
                    said = isinstance(exc, SectorProviderError)  # its message names the sector
                    if isinstance(exc, SectorAccessRefused):
                        why = exc.reason if isinstance(exc.reason, str) else text_of(exc)
                        self.refused[provider.name] = why
                    for sector in chunk:
                        message = text_of(exc) if said else f"{sector}: {describe(exc)}"
                        self._source_error(provider.name, outcomes[sector], message)
                        done.add(sector)
                else:
                    if not isinstance(found, Mapping):  # a plugin's find_batch: not to raise
                        for sector in chunk:
                            message = (
                                f"{sector}: find_batch answered {text_of(found, repr):.100}, not a mapping of"
                                " sectors to locations"
                            )
                            self._source_error(provider.name, outcomes[sector], message)
                            done.add(sector)
                        return
                    for sector in chunk:
                        record(sector, found.get(sector))

        with trio.move_on_at(slice_end):
            async with trio.open_nursery() as nursery:
                slots = int((share or limiter).total_tokens)
                for _ in range(min(slots, -(-len(sectors) // size))):
                    nursery.start_soon(worker)
        left = [sector for sector in sectors if sector not in started]
        unasked = Unasked(provider.name, max(0.0, share_of_time), len(started),
                          len(done), len(left))  # fmt: skip
        if left and share is None:
            self.unasked[provider.name] = unasked
        for sector in sectors:
            if sector not in done:  # asked, and cut at its bound; or never asked (its share over)
                self._source_error(
                    provider.name,
                    outcomes[sector],
                    f"{sector}: no answer in the time this lookup had (at most"
                    f" {lookup_timeout:g} s, within the caller's deadline)"
                    if sector in started
                    else unasked.detail(sector),
                )
        return {sector: outcomes[sector].errors[-1] for sector in left}

    def _source_error(self, provider: str, outcome: _Outcome, message: str) -> None:
        outcome.errors.append(f"{provider}: {message}")
        counts = self.counts
        now = trio.current_time()
        counts.source_errors[provider] = counts.source_errors.get(provider, 0) + 1
        counts.last_error = (provider, message, now)
        if self.metrics is not None:
            self.metrics.source_errors.labels(provider=provider).inc()
        trouble = self._trouble.get(provider)
        if trouble is None:
            trouble = self._trouble[provider] = _Trouble(now)
        trouble.failures += 1
        trouble.message = message
        warned = self._warned_at.get(provider)
        if warned is not None and now - warned < FAILURE_LOG_EVERY:
            return  # said not long ago: the next warning counts these too
        self._warned_at[provider] = now
        trouble.said = True
        unsaid = self._unsaid.pop(provider, None)
        if unsaid is not None:
            message += f" (and {_outages(unsaid)} since the last warning)"
        names = [p.name for p in self.providers]
        after = names[names.index(provider) + 1 :] if provider in names else []
        meanwhile = f"the sectors are asked of {', '.join(after)}, else " if after else ""
        more = "" if trouble.failures == 1 else f" ({trouble.failures} lookups failed so far)"
        log.warning(
            "sector provider %s could not answer: %s%s. Meanwhile %stheir last known locations"
            " are given when their files are there (said again at most every %g s while it"
            " fails, and when it answers again)",
            provider, message, more, meanwhile, FAILURE_LOG_EVERY,
        )  # fmt: skip

    def _answered(self, provider: str) -> None:
        """The provider answered a lookup: the end of its trouble is said, if it was; one
        that began within a minute of the last warning is added to what is still to say,
        which is said once that minute is over."""
        trouble = self._trouble.pop(provider, None)
        if trouble is None and provider not in self._unsaid:
            return
        now = trio.current_time()
        if trouble is not None and trouble.said:
            took = now - trouble.since
            log.info(
                "sector provider %s answers again, after %d lookups it could not answer in %.0f s",
                provider, trouble.failures, took,
            )  # fmt: skip
            return
        if trouble is not None:
            unsaid = self._unsaid.setdefault(provider, _Unsaid())
            unsaid.outages += 1
            unsaid.failures += trouble.failures
            unsaid.message = trouble.message
        if now - self._warned_at.get(provider, -math.inf) >= FAILURE_LOG_EVERY:
            self._say_unsaid(provider, now)

    def _say_unsaid(self, provider: str, now: float) -> None:
        """Say the troubles of the provider no line said yet (each over: it answers again)."""
        unsaid = self._unsaid.pop(provider, None)
        if unsaid is None:
            return
        self._warned_at[provider] = now
        log.warning(
            "sector provider %s could not answer in %s since its last warning, each time for a"
            " while only: it answers again",
            provider, _outages(unsaid),
        )  # fmt: skip

    def _count(self, what: str, n: int = 1) -> None:
        setattr(self.counts, what, getattr(self.counts, what) + n)
        if self.metrics is not None:
            getattr(self.metrics, what).inc(n)

    # --- remembered locations and background refresh ---------------------------------------

    def cached(self, sector: SectorRef) -> SectorAnswer | None:
        """What is remembered of the sector, asking nobody (None when nothing)."""
        entry = self.cache.get(sector)
        if entry is None:
            return None
        age = entry.age(trio.current_time())
        return SectorAnswer(sector, "found", entry.location, entry.provider, True, age)

    def want(self, sectors: Iterable[SectorRef], *, within: float) -> None:
        """These sectors are needed `within` seconds from now: refresh them before then."""
        self.cache.want(sectors, trio.current_time() + within)
        self._changed.set()

    async def refresh(self, sectors: Sequence[SectorRef]) -> int:
        """Ask the providers again for these sectors (no deadline but `bounds.batch_timeout`);
        returns how many got an answer. The cache keeps what a failing provider cannot
        replace."""
        start = trio.current_time()
        phase_end, _ = self.bounds.phases(start, self.bounds.batch_timeout)
        outcomes = await self._ask(list(sectors), phase_end, background=True)
        now = trio.current_time()
        answered = 0
        failed = []
        for sector, outcome in outcomes.items():
            if outcome.found is not None:
                self.cache.learn(sector, *outcome.found, now)
                answered += 1
            elif outcome.errors:
                failed.append(sector)
            else:
                self.cache.forget(sector)
                answered += 1
        self.cache.tried(failed, now)
        self._count("refreshes", len(outcomes))
        return answered

    async def restore(self) -> None:
        """Take in the snapshot's entries, once (nothing without a snapshot), and wait for them.
        They are read in a task of their own: a caller that stops waiting (a lookup's time
        bound) leaves them to be taken in when they arrive; a read given up (`READ_TIMEOUT`)
        is waited for no more, but taken in if it ends; `aclose` stops the read."""
        if self.snapshot is None or self._restored:
            return
        if self._restoring is None:
            self._restoring = trio.Event()
            trio.lowlevel.spawn_system_task(self._load, self.snapshot, self._restoring)
        await self._restoring.wait()

    async def _load(self, snapshot: CacheSnapshot, done: trio.Event) -> None:
        try:
            with self._loading:
                await snapshot.load(self.cache, gave_up=done.set)  # raises only the cancel
                self._restored = True
                self._changed.set()
        finally:
            done.set()

    async def refresh_forever(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
        """Refresh what `cache.due` says, when it says; run it in a nursery (`nursery.start`).
        With a snapshot: its entries are taken in first (or their read given up), and it is
        saved every `every`."""
        await self.restore()
        task_status.started()
        async with trio.open_nursery() as nursery:
            if self.snapshot is not None:
                nursery.start_soon(self.snapshot.save_forever, self.cache)
            await self._refresh_loop()

    async def _refresh_loop(self) -> None:
        while True:
            now = trio.current_time()
            due = self.cache.due(now)
            if due:
                for first in range(0, len(due), REFRESH_BATCH):
                    await self.refresh(due[first : first + REFRESH_BATCH])
                await trio.lowlevel.checkpoint()
                continue
            wake = self.cache.next_wakeup(now)
            self._changed = trio.Event()
            with trio.move_on_at(math.inf if wake is None else wake):
                await self._changed.wait()

    def status(self) -> dict[str, Any]:
        """The status section: providers, entries, counts, the hit rate, the last error."""
        counts = self.counts
        now = trio.current_time()
        last = None
        if counts.last_error is not None:
            provider, message, when = counts.last_error
            last = {"provider": provider, "message": message, "age": round(now - when, 3)}
        return {
            "providers": [p.name for p in self.providers],
            "entries": len(self.cache),
            "wanted": self.cache.wanted,
            "lookups": counts.lookups,
            "cache_hits": counts.cache_hits,
            "hit_rate": round(counts.cache_hits / counts.lookups, 4) if counts.lookups else None,
            "source_errors": dict(counts.source_errors),
            "stale_answers": counts.stale_answers,
            "not_found": counts.not_found,
            "missing": counts.missing,
            "refreshes": counts.refreshes,
            "last_source_error": last,
            "fresh_for": self.rules.fresh_for,
            "keep_for": self.rules.keep_for,
            "snapshot": None if self.snapshot is None else self.snapshot.status(now),
        }


def _not_known_to(outcome: _Outcome) -> str:
    """' (not known to A, B)' for the providers that said they do not know the sector."""
    return f" (not known to {', '.join(outcome.not_known)})" if outcome.not_known else ""


def _outages(unsaid: _Unsaid) -> str:
    """'N outages (M lookups failed; the last: why)'."""
    n, failed = unsaid.outages, unsaid.failures
    return (
        f"{n} outage{'' if n == 1 else 's'} ({failed} lookup{'' if failed == 1 else 's'} failed;"
        f" the last: {unsaid.message})"
    )


async def open_locator(
    settings: SectorSettings,
    *,
    plugin_manager: DextPluginManager | None = None,
    rules: CacheRules | None = None,
    bounds: Bounds | None = None,
    metrics: SectorMetrics | None = None,
    snapshot: CacheSnapshot | None = None,
) -> SectorLocator:
    """A locator over `build_providers(settings, plugin_manager)`."""
    providers = build_providers(settings, plugin_manager)
    await trio.lowlevel.checkpoint()
    return SectorLocator(providers, rules=rules, bounds=bounds, metrics=metrics, snapshot=snapshot)
