"""What the sector-location service speaks: a sector asked for, where its files are, the answer,
what a provider is, and the time a batch of lookups may take.

- `SectorRef(miner, number, upgrade)`: a sector and which of damocles' two indexes it is in
  (`"normal"`, or `"upgrade"` for a SnapDeals-upgraded sector, whose files are in `update/` and
  `update-cache/`).
- `SectorLocation`: the sealed file's and the cache directory's paths, and the names of the stores
  that hold them when known (a damocles source node answers names; the scan knows the store).
- `SectorAnswer`: one sector's answer: `status` is `found`, `not_found` (no provider knows the
  sector), `missing` (its last known files are gone, or their storage did not answer; or a
  provider found only part of it, a `BrokenLocation`: a fault for the prover, not an error) or
  `error` (no provider could answer and nothing was cached); it says which provider gave the
  location, whether it came from the cache and how old it is.
- `SectorProvider`: what a plugin's `dext_sector_providers` hook returns: a `name` and
  `async find(sector) -> SectorLocation | None` (None: this provider does not know the sector; an
  exception: it could not answer; a `BrokenLocation`: it found part of the sector, and says
  what is wrong with the rest). `SectorSettings` is what the hook is given.
- `Bounds`: the time a batch may take, derived from the caller's deadline (`budget`), and how it
  is shared between the providers and the last-known-location checks (`phases`); `Unasked`: a
  provider's share of it ran out before it was asked for some of the batch's sectors (how long
  it had, how many it answered, how many it was never asked for).

Sans-IO: no trio, no files; times are numbers the caller passes in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, runtime_checkable

IndexType = Literal["normal", "upgrade"]
INDEX_TYPES: Final = ("normal", "upgrade")

Status = Literal["found", "not_found", "missing", "error"]
STATUSES: Final = ("found", "not_found", "missing", "error")


@dataclass(frozen=True, slots=True, order=True)
class SectorRef:
    """A sector of a miner (actor id), in the normal or the upgrade index."""

    miner: int
    number: int
    upgrade: bool = False

    def __post_init__(self) -> None:
        for what, value in (("miner", self.miner), ("sector number", self.number)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
                raise ValueError(f"a {what} is a whole number from 0 to 2^64-1, not {value!r}")

    @property
    def index_type(self) -> IndexType:
        """damocles' name of the index the sector is in: "normal" or "upgrade"."""
        return "upgrade" if self.upgrade else "normal"

    def __str__(self) -> str:
        upgraded = " (upgraded)" if self.upgrade else ""
        return f"sector {self.number} of miner {self.miner}{upgraded}"


@dataclass(frozen=True, slots=True)
class SectorLocation:
    """Where a sector's files are: paths, and the store names when known."""

    sealed_file: str
    cache_dir: str
    sealed_store: str | None = None
    cache_store: str | None = None

    def textual(self) -> bool:
        """Its paths are str, its store names str or None (a provider's may be something else:
        a pathlib.Path, say), as answers are made of."""
        return (
            isinstance(self.sealed_file, str)
            and isinstance(self.cache_dir, str)
            and isinstance(self.sealed_store, str | None)
            and isinstance(self.cache_store, str | None)
        )


@dataclass(frozen=True, slots=True)
class BrokenLocation:
    """A provider's answer for a sector it found part of, the rest gone or not what it should
    be (the scan: a cache directory whose sealed file is gone, a sealed file that is a FIFO):
    `location` where its files are or should be, `problem` what is wrong and what to do (naming
    the sector). Not a location to prove from: the next providers are asked, and if none finds
    the sector it is answered `missing`, with `problem`."""

    location: SectorLocation
    problem: str


@dataclass(frozen=True, slots=True)
class SectorAnswer:
    """One sector's answer from the locator."""

    sector: SectorRef
    status: Status
    location: SectorLocation | None = None
    #: The provider that gave the location (or, for not_found, the ones asked).
    provider: str | None = None
    #: True when the location is the one remembered, not one a provider gave for this lookup.
    cached: bool = False
    #: Seconds since the provider gave the location (0 for a fresh answer).
    age: float | None = None
    #: Why the sector is not found, missing or in error (for a `BrokenLocation`, its
    #: `problem`); empty when found.
    detail: str = ""

    @property
    def found(self) -> bool:
        return self.status == "found"

    @property
    def stale(self) -> bool:
        """A location from the cache given because no provider could be asked in time."""
        return self.found and self.cached and bool(self.detail)

    def to_dict(self) -> dict[str, Any]:
        """The answer as JSON-ready data (`sectors find --json`)."""
        location = self.location
        return {
            "miner": self.sector.miner,
            "number": self.sector.number,
            "upgrade": self.sector.upgrade,
            "status": self.status,
            "sealed_file": None if location is None else location.sealed_file,
            "cache_dir": None if location is None else location.cache_dir,
            "sealed_store": None if location is None else location.sealed_store,
            "cache_store": None if location is None else location.cache_store,
            "provider": self.provider,
            "cached": self.cached,
            "age": None if self.age is None else round(self.age, 3),
            "detail": self.detail,
        }


@runtime_checkable
class SectorProvider(Protocol):
    """A source of sector locations (a damocles source node, a scan of the stores, a site's
    database). `find` runs in the locator's trio loop, may be called for many sectors at once
    (up to `Bounds.concurrency`), and is cancelled when its time is up: it must not block the
    loop (run blocking I/O with `trio.to_thread.run_sync(..., abandon_on_cancel=True)`).
    An optional `async aclose()` is awaited when the locator closes. An optional
    `async find_batch(sectors) -> Mapping[SectorRef, SectorLocation | BrokenLocation |
    SectorProviderError | None]` is used instead of `find` for several sectors at once (a
    sector missing from its answer: not known; one answered a SectorProviderError: its lookup
    failed, with that message); the time bound of one lookup then holds for the whole batch. `find` may also answer a
    `BrokenLocation`: the sector found in part, what is wrong with the rest."""

    @property
    def name(self) -> str: ...

    async def find(self, sector: SectorRef) -> SectorLocation | BrokenLocation | None: ...


class SectorProviderError(Exception):
    """A provider could not answer for a sector; the message names the sector and what to do."""


class SectorAccessRefused(SectorProviderError):
    """The provider's source refused our credentials (a source node answering HTTP 401 or 403
    to the token sent): a configuration mistake, the same for every sector. `reason` says it
    without naming a sector."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SectorSettings:
    """What the providers are built from (`dext_sector_providers(settings)`).

    `proxy`: a damocles source node's RPC address (`IP:PORT`, a URL or a multiaddr), or None;
    `stores`: store name -> path on this machine (sector-manager.cfg's PersistStores from
    `--conf-dir`, and `--attached NAME=PATH`), used to turn a source node's store names into
    paths and scanned in damocles' layout; `headers`: HTTP headers sent to the source node;
    `connections`: connections kept open to the source node (its calls run that many at once);
    `relay_names`: a store name of the source's not among `stores` is kept as a name, its path
    empty (a coordinator answers other nodes with names, as damocles' proxy node does; their
    machines have the stores), rather than an error.
    """

    proxy: str | None = None
    stores: Mapping[str, str] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    connections: int = 8
    relay_names: bool = False


# --- time bounds ------------------------------------------------------------------------------

#: The share of a batch's budget kept for checking last known locations when providers fail.
CHECK_RESERVE: Final = 0.25


@dataclass(frozen=True, slots=True)
class Bounds:
    """How long lookups may take.

    A batch may take `deadline_share` of the time left before the caller's deadline, and never
    more than `batch_timeout`; one provider's call for one sector at most `lookup_timeout`;
    checking that a remembered location's files are still there at most `check_timeout` per
    sector. `concurrency` calls to one provider run at once.
    """

    lookup_timeout: float = 5.0
    batch_timeout: float = 60.0
    deadline_share: float = 0.25
    check_timeout: float = 2.0
    concurrency: int = 16

    def __post_init__(self) -> None:
        for name in ("lookup_timeout", "batch_timeout", "check_timeout"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if not 0 < self.deadline_share <= 1:
            raise ValueError(f"deadline_share must be in (0, 1], not {self.deadline_share!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {self.concurrency!r}")

    def budget(self, time_left: float | None) -> float:
        """Seconds a batch may take when the caller's deadline is `time_left` away (None: no
        deadline): never more than `batch_timeout`, never less than 0."""
        if time_left is None:
            return self.batch_timeout
        return max(0.0, min(self.batch_timeout, time_left * self.deadline_share))

    def phases(self, start: float, budget: float) -> tuple[float, float]:
        """(when the providers must have answered, when the whole batch must be done): the
        providers get the budget less a reserve (a quarter of it, at most `check_timeout`) in
        which remembered locations are checked for the sectors no provider answered for."""
        reserve = min(self.check_timeout, budget * CHECK_RESERVE)
        return start + budget - reserve, start + budget


def provider_slice(now: float, phase_end: float, providers_left: int) -> float:
    """When the provider asked now must be done: an equal share of what is left of the phase
    between it and the providers after it, so that a slow first provider (a stalled source node)
    leaves time for the next (the scan). A provider that finishes early gives its time on."""
    if providers_left <= 0:
        return now
    return now + max(0.0, phase_end - now) / providers_left


#: What to do about sectors a provider had no time to be asked for (`Unasked.detail`); a command
#: replaces it with its own option's words (`sectors find --timeout`).
UNASKED_ADVICE = (
    "give the lookup more time, in proportion to its sectors, or ask for fewer sectors at once"
)


@dataclass(frozen=True, slots=True)
class Unasked:
    """A provider's share of a batch's time (`share` seconds) ran out before it was asked for
    `not_asked` of the batch's sectors: they had no lookup at all, not one that timed out. It
    was asked for the `asked` others in that time and answered `answered` of them. Of those
    it was not asked for, the providers after it found `found_later`."""

    provider: str
    share: float
    asked: int
    answered: int
    not_asked: int
    found_later: int = 0

    @property
    def missing(self) -> int:
        """The sectors it was not asked for that no provider after it found."""
        return self.not_asked - self.found_later

    @property
    def sectors(self) -> int:
        """The sectors it was to be asked for."""
        return self.asked + self.not_asked

    @property
    def why(self) -> str:
        """Why a sector it was not asked for has no answer from it, and what to do."""
        return (
            f"not asked: the {self.share:.1f} s this provider had of the lookup's time ran out"
            f" before its turn; {self.not_asked} of {self.sectors} sectors were not asked (it"
            f" answered {self.answered} in that time); {UNASKED_ADVICE}"
        )

    def detail(self, sector: SectorRef) -> str:
        """`sector`'s error from this provider (`why`, after the sector's name)."""
        return f"{sector}: {self.why}"

    def time_for_all(self, given: float) -> float | None:
        """The time a batch given `given` seconds would need for this provider to be asked for
        all its sectors at the pace it answered (its share grows with the batch's), with a
        quarter more for a pace that varies; None when it answered none (no pace to go by)."""
        if self.answered <= 0:
            return None
        return given * self.sectors / self.answered * 1.25
