"""The locator's memory of sector locations and its freshness rules (sans-IO: every method takes
`now`, a monotonic time in seconds).

- An entry younger than `fresh_for` is answered without asking any provider (`fresh`).
- An older entry is not trusted on its own: the providers are asked again. It is kept for
  `keep_for` as the *last known location* (`last_known`), which the locator gives (after it
  checked the files are still there) when no provider could answer in time.
- A provider that says it does not know a sector any more takes its entry away (`forget`), once
  every provider asked said so.
- Background refresh (`due`, `next_wakeup`): a sector the caller says it will need at some time
  (`want`, a deadline's sectors) is asked again `refresh_lead` before then unless its entry will
  still be fresh then; a sector looked up in the last `fresh_for` whose entry is older than
  `refresh_ahead` x `fresh_for` is asked again before it goes stale, so repeated lookups never
  wait on a provider. A refresh that did not give an answer is tried again `retry_after` later.
  The plan is kept up to date as entries change (a heap of refresh times, stale ones skipped when
  they come up): `due` and `next_wakeup` cost what is due, not what is cached, so a lookup in a
  cache of a million hot sectors does not make the next plan scan them all.
- At most `max_entries` entries: the least recently used go first.
- Entries remembered from before (`restore`: a snapshot a restarted process read) keep the time
  they were learned: one is fresh, or a last known location, for what is left of its time, never
  more; one learned "after" now, or all of them when the wall clock was set back since they were
  saved (`not_fresh`), at least `fresh_for` old: asked again first, still a last known location.
  One of a sector forgotten while they were being read (`begin_restore`) is left out.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .model import SectorLocation, SectorRef


@dataclass(frozen=True, slots=True)
class CacheRules:
    fresh_for: float = 600.0
    keep_for: float = 7 * 24 * 3600.0
    refresh_lead: float = 300.0
    refresh_ahead: float = 0.8
    retry_after: float = 30.0
    max_entries: int = 2_000_000

    def __post_init__(self) -> None:
        for name in ("fresh_for", "keep_for", "refresh_lead", "retry_after"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
        if self.keep_for < self.fresh_for:
            raise ValueError(
                f"keep_for ({self.keep_for:g} s) must be at least fresh_for ({self.fresh_for:g} s)"
            )
        if self.fresh_for and self.refresh_lead >= self.fresh_for:
            raise ValueError(
                f"refresh_lead ({self.refresh_lead:g} s) must be shorter than fresh_for"
                f" ({self.fresh_for:g} s), or a sector refreshed before its deadline would be"
                " stale again when the deadline comes"
            )
        if not 0 < self.refresh_ahead <= 1:
            raise ValueError(f"refresh_ahead must be in (0, 1], not {self.refresh_ahead!r}")
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {self.max_entries!r}")


@dataclass(slots=True)
class CacheEntry:
    location: SectorLocation
    provider: str
    learned_at: float
    used_at: float | None = None

    def age(self, now: float) -> float:
        return max(0.0, now - self.learned_at)


class SectorCache:
    """Locations by sector, least recently used first."""

    def __init__(self, rules: CacheRules | None = None) -> None:
        self.rules = rules or CacheRules()
        self._entries: dict[SectorRef, CacheEntry] = {}
        #: Sector -> when the caller needs it (monotonic time).
        self._wanted: dict[SectorRef, float] = {}
        #: Sector -> when a refresh was last tried without an answer.
        self._tried: dict[SectorRef, float] = {}
        #: Sector -> when it is due for a background refresh (`_due_at`, kept up to date).
        self._planned: dict[SectorRef, float] = {}
        #: (when, sector) for `_planned`, with stale pairs left in until they come up.
        self._plan: list[tuple[float, SectorRef]] = []
        #: (at, sector) for `_wanted`, to drop a want once its time passed (stale pairs too).
        self._want_ends: list[tuple[float, SectorRef]] = []
        #: Counts the changes of entries (learned, forgotten, restored): a snapshot taken when
        #: it has not moved since the last one would be the same.
        self.changes = 0
        #: The sectors forgotten since a restore began (`begin_restore`), which it leaves out;
        #: past max_entries of them (a read that never ends), none is noted and none taken in.
        self._forgotten: set[SectorRef] | None = None
        self._restore_void = False

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sector: object) -> bool:
        return sector in self._entries

    def entries(self) -> Iterator[tuple[SectorRef, CacheEntry]]:
        return iter(self._entries.items())

    @property
    def wanted(self) -> int:
        return len(self._wanted)

    # --- lookups ---------------------------------------------------------------------------

    def get(self, sector: SectorRef) -> CacheEntry | None:
        """The entry, whatever its age (no use recorded)."""
        return self._entries.get(sector)

    def fresh(self, sector: SectorRef, now: float) -> CacheEntry | None:
        """The entry when it may be answered without asking (and records the use)."""
        entry = self._entries.get(sector)
        if entry is None or entry.age(now) >= self.rules.fresh_for:
            return None
        self._use(sector, entry, now)
        return entry

    def last_known(self, sector: SectorRef, now: float) -> CacheEntry | None:
        """The entry when it may stand in for a provider that could not answer (younger than
        `keep_for`); an older one is dropped."""
        entry = self._entries.get(sector)
        if entry is None:
            return None
        if entry.age(now) >= self.rules.keep_for:
            self.forget(sector)
            return None
        self._use(sector, entry, now)
        return entry

    def _use(self, sector: SectorRef, entry: CacheEntry, now: float) -> None:
        entry.used_at = now
        # Most recently used last: eviction takes from the front.
        self._entries[sector] = self._entries.pop(sector)
        self._replan(sector)

    # --- changes ---------------------------------------------------------------------------

    def learn(self, sector: SectorRef, location: SectorLocation, provider: str, now: float) -> None:
        """A provider gave this location now."""
        old = self._entries.pop(sector, None)
        used_at = None if old is None else old.used_at
        self._entries[sector] = CacheEntry(location, provider, now, used_at)
        self.changes += 1
        self._tried.pop(sector, None)
        wanted = self._wanted.get(sector)
        if wanted is not None and now + self.rules.fresh_for > wanted:
            del self._wanted[sector]  # fresh when it is needed: nothing more to do for it
        self._replan(sector)
        while len(self._entries) > self.rules.max_entries:
            oldest = next(iter(self._entries))
            self.forget(oldest)

    def forget(self, sector: SectorRef) -> None:
        """Every provider says it does not know the sector (or the entry is too old): its entry
        and any want of it go (a sector nobody knows is not refreshed again and again)."""
        if self._entries.pop(sector, None) is not None:
            self.changes += 1
        if self._forgotten is not None and not self._restore_void:
            if len(self._forgotten) < self.rules.max_entries:
                self._forgotten.add(sector)
            else:  # as many as the cache holds: what is read that late is not taken in at all
                self._forgotten, self._restore_void = set(), True
        self._tried.pop(sector, None)
        self._wanted.pop(sector, None)
        self._replan(sector)

    def restore(
        self,
        entries: Iterable[tuple[SectorRef, CacheEntry]],
        now: float,
        *,
        not_fresh: bool = False,
    ) -> int:
        """Take in entries remembered from before (a snapshot: least recently used first), each
        with the time it was learned on this clock: `take_restored(restorable(...))`."""
        return self.take_restored(restorable(entries, now, self.rules, not_fresh=not_fresh))

    def begin_restore(self) -> None:
        """Entries remembered from before are being read (`take_restored` takes them): the
        sectors forgotten meanwhile (every provider said it does not know them) are noted, and
        left out of them."""
        if self._forgotten is None:
            self._forgotten = set()

    def take_restored(self, taken: dict[SectorRef, CacheEntry]) -> int:
        """Take in what `restorable` kept (it is taken over): one whose sector has an entry here
        already (learned since: newer), or was forgotten since `begin_restore`, is left out.
        They go before the entries here in the least-recently-used order; past `max_entries`
        the least recently used go. None counts as used: the background refresh plans them
        once they are looked up or wanted. Returns how many were taken. O(entries here), and
        one copy of the dict."""
        live = self._entries
        if self._restore_void:  # more forgotten meanwhile than could be noted (forget)
            self._forgotten, self._restore_void = None, False
            return 0
        for sector in live:
            taken.pop(sector, None)
        for sector in self._forgotten or ():
            taken.pop(sector, None)
        self._forgotten = None
        room = max(0, self.rules.max_entries - len(live))
        if len(taken) > room:  # the least recently used left out
            taken = dict(itertools.islice(taken.items(), len(taken) - room, None))
        if not taken:
            return 0
        self._entries = {**taken, **live} if live else taken
        self.changes += 1
        for sector in [s for s in self._wanted if s in taken]:
            self._replan(sector)
        return len(taken)

    def want(self, sectors: Iterable[SectorRef], at: float) -> None:
        """These sectors will be needed at `at`: refresh them before then."""
        for sector in sectors:
            known = self._wanted.get(sector)
            if known is None or at < known:
                self._wanted[sector] = at
                heapq.heappush(self._want_ends, (at, sector))
                self._replan(sector)
                self._compact()

    def tried(self, sectors: Iterable[SectorRef], now: float) -> None:
        """A background refresh of these sectors got no answer: wait `retry_after`."""
        for sector in sectors:
            self._tried[sector] = now
            self._replan(sector)

    # --- background refresh ----------------------------------------------------------------

    def _due_at(self, sector: SectorRef) -> float | None:
        """When the sector should be asked again in the background (None: not for now)."""
        rules = self.rules
        entry = self._entries.get(sector)
        times: list[float] = []
        wanted = self._wanted.get(sector)
        if wanted is not None and (entry is None or entry.learned_at + rules.fresh_for <= wanted):
            times.append(wanted - rules.refresh_lead)
        tried = self._tried.get(sector)
        retry = -float("inf") if tried is None else tried + rules.retry_after
        if entry is not None and entry.used_at is not None:
            ahead = max(entry.learned_at + rules.refresh_ahead * rules.fresh_for, retry)
            if ahead < entry.used_at + rules.fresh_for:  # still hot then (a retry too)
                times.append(ahead)
        if not times:
            return None
        return max(min(times), retry)

    def _replan(self, sector: SectorRef) -> None:
        """Work out the sector's refresh time again after a change of its entry, want or try."""
        when = self._due_at(sector)
        if sector not in self._entries and sector not in self._wanted:
            # Neither known nor wanted: nothing is refreshed, so its failed try is not kept (a
            # want that passed with its source down left one for each sector, for ever).
            self._tried.pop(sector, None)
        if when is None:
            self._planned.pop(sector, None)
        elif self._planned.get(sector) != when:
            self._planned[sector] = when
            heapq.heappush(self._plan, (when, sector))
            self._compact()

    def _compact(self) -> None:
        """Rebuild the heaps once stale pairs outnumber the live ones (amortised O(1))."""
        if len(self._plan) > 2 * len(self._planned) + 64:
            self._plan = [(when, sector) for sector, when in self._planned.items()]
            heapq.heapify(self._plan)
        if len(self._want_ends) > 2 * len(self._wanted) + 64:
            self._want_ends = [(at, sector) for sector, at in self._wanted.items()]
            heapq.heapify(self._want_ends)

    def _drop_stale_top(self) -> None:
        plan = self._plan
        while plan and self._planned.get(plan[0][1]) != plan[0][0]:
            heapq.heappop(plan)

    def due(self, now: float) -> list[SectorRef]:
        """The sectors to ask again now, in order; wants whose time has passed are dropped. A
        sector stays due until its entry, want or try changes."""
        while self._want_ends and self._want_ends[0][0] < now:
            at, sector = heapq.heappop(self._want_ends)
            if self._wanted.get(sector) == at:
                del self._wanted[sector]
                self._replan(sector)
        out: set[SectorRef] = set()
        self._drop_stale_top()
        while self._plan and self._plan[0][0] <= now:
            _, sector = heapq.heappop(self._plan)
            out.add(sector)
            self._drop_stale_top()
        for sector in out:  # still planned as they were: back in the heap
            heapq.heappush(self._plan, (self._planned[sector], sector))
        self._compact()
        return sorted(out)

    def next_wakeup(self, now: float) -> float | None:
        """The earliest time `due` will have something (None: nothing is planned)."""
        self._drop_stale_top()
        return self._plan[0][0] if self._plan else None


def restorable(
    entries: Iterable[tuple[SectorRef, CacheEntry]],
    now: float,
    rules: CacheRules,
    *,
    not_fresh: bool = False,
) -> dict[SectorRef, CacheEntry]:
    """Of entries remembered from before (least recently used first, each learned at its time
    on this clock), those a cache with `rules` takes, in order: one past `keep_for` is left
    out; one learned after `now`, or any learned less than `fresh_for` ago when `not_fresh`
    (the clock they were saved by was set back since: their ages are not known), is taken as
    learned `fresh_for` ago; of one sector's, the last; at most `max_entries` (the most
    recently used). Touches no cache: a snapshot's read runs it in its thread."""
    fresh_for, keep_for = rules.fresh_for, rules.keep_for
    not_after = now - fresh_for if not_fresh else now
    taken: dict[SectorRef, CacheEntry] = {}
    for sector, entry in entries:  # taken as they are, their times set as said
        if entry.learned_at > not_after:
            entry.learned_at = now - fresh_for
        if now - entry.learned_at >= keep_for:
            continue
        entry.used_at = None
        taken.pop(sector, None)  # a later one is the more recently used
        taken[sector] = entry
    if len(taken) > rules.max_entries:
        taken = dict(itertools.islice(taken.items(), len(taken) - rules.max_entries, None))
    return taken
