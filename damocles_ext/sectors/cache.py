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
- At most `max_entries` entries: the least recently used go first.
"""

from __future__ import annotations

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

    # --- changes ---------------------------------------------------------------------------

    def learn(self, sector: SectorRef, location: SectorLocation, provider: str, now: float) -> None:
        """A provider gave this location now."""
        old = self._entries.pop(sector, None)
        used_at = None if old is None else old.used_at
        self._entries[sector] = CacheEntry(location, provider, now, used_at)
        self._tried.pop(sector, None)
        wanted = self._wanted.get(sector)
        if wanted is not None and now + self.rules.fresh_for > wanted:
            del self._wanted[sector]  # fresh when it is needed: nothing more to do for it
        while len(self._entries) > self.rules.max_entries:
            oldest = next(iter(self._entries))
            self.forget(oldest)

    def forget(self, sector: SectorRef) -> None:
        """Every provider says it does not know the sector (or the entry is too old): its entry
        and any want of it go (a sector nobody knows is not refreshed again and again)."""
        self._entries.pop(sector, None)
        self._tried.pop(sector, None)
        self._wanted.pop(sector, None)

    def want(self, sectors: Iterable[SectorRef], at: float) -> None:
        """These sectors will be needed at `at`: refresh them before then."""
        for sector in sectors:
            known = self._wanted.get(sector)
            if known is None or at < known:
                self._wanted[sector] = at

    def tried(self, sectors: Iterable[SectorRef], now: float) -> None:
        """A background refresh of these sectors got no answer: wait `retry_after`."""
        for sector in sectors:
            self._tried[sector] = now

    # --- background refresh ----------------------------------------------------------------

    def _due_at(self, sector: SectorRef, entry: CacheEntry | None, now: float) -> float | None:
        """When the sector should be asked again in the background (None: not for now)."""
        rules = self.rules
        times: list[float] = []
        wanted = self._wanted.get(sector)
        if wanted is not None and (entry is None or entry.learned_at + rules.fresh_for <= wanted):
            times.append(wanted - rules.refresh_lead)
        if entry is not None and entry.used_at is not None:
            ahead = entry.learned_at + rules.refresh_ahead * rules.fresh_for
            if ahead < entry.used_at + rules.fresh_for:  # still hot then
                times.append(ahead)
        if not times:
            return None
        when = min(times)
        tried = self._tried.get(sector)
        if tried is not None:
            when = max(when, tried + rules.retry_after)
        return when

    def due(self, now: float) -> list[SectorRef]:
        """The sectors to ask again now; wants whose time has passed are dropped."""
        out: list[SectorRef] = []
        for sector, wanted in list(self._wanted.items()):
            if wanted < now:
                del self._wanted[sector]
        candidates = set(self._wanted) | {
            s for s, e in self._entries.items() if e.used_at is not None
        }
        for sector in sorted(candidates):
            when = self._due_at(sector, self._entries.get(sector), now)
            if when is not None and when <= now:
                out.append(sector)
        return out

    def next_wakeup(self, now: float) -> float | None:
        """The earliest time `due` will have something (None: nothing is planned)."""
        best: float | None = None
        candidates = set(self._wanted) | {
            s for s, e in self._entries.items() if e.used_at is not None
        }
        for sector in candidates:
            when = self._due_at(sector, self._entries.get(sector), now)
            if when is not None and (best is None or when < best):
                best = when
        return best
