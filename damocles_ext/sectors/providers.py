"""The built-in providers: a damocles source node over its RPC, and a scan of the stores in
damocles' layout.

`SourceNode` asks `Venus.SectorIndexerFind(indexType, {"Miner": m, "Number": n})`, as a damocles
proxy node does (`indexType` "normal" or "upgrade"); the source answers
`{"Found": bool, "Instance": {"SealedFile": NAME, "CacheDir": NAME}}` with store *names*, which
become paths through this machine's stores (`jobs.paths.StoreMap`: `sealed/`, `cache/`, and
`update/`, `update-cache/` for an upgraded sector; the sealed file and the cache directory may be
in different stores). `{"Found": false, …}` is "not known"; a store name not configured here is a
`SectorProviderError` naming the store and the sector. It is read-only by construction: it has
no method that changes the source's index (damocles' proxy refuses updates; here there is
nothing to refuse). Its calls go over `connections` kept-alive connections, one call at a time
on each (`jobs.client.RpcClient`). A source that cannot be reached is not asked again for
`down_for` seconds (the lookups in between fail at once, and fall back as any failure does).

`StoreScan` looks for `<store>/sealed/s-t0<miner>-<number>` and `<store>/cache/…` in every store,
in worker threads with a time bound (files.py): a stalled store makes it fail, never hang. A
sector found in part (its cache directory there and its sealed file gone, or either of the wrong
type: a FIFO, a symlink loop, a symlink to nothing) is a `BrokenLocation` saying which store and
what is wrong, not "not known"; one found nowhere while a store could not be looked in (a
directory on the way that cannot be searched or is none, an I/O error) fails its lookup, naming
the store and why, not "not known" either. The first store holding both files whole is where a
sector is; only when none does are they taken from two stores (damocles may keep them apart),
never from a store with something of the sector's of the wrong type (a leftover). A sector whole
in the k-th store costs k + 1 looks; one found nowhere a look at each file in each store; one
split over two stores a look at each sealed file and at the cache directories up to the one
taken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import msgspec
import trio

from ..jobs.client import (
    SERVER_STUCK,
    RpcCallError,
    RpcClient,
    RpcClientError,
    RpcConnectionError,
    RpcProtocolError,
)
from ..jobs.endpoint import Endpoint, parse_endpoint
from ..jobs.model import SectorAccessStores, Text
from ..jobs.paths import StoreMap
from ..threads import NoThreadError
from ..wording import some_and_more
from .files import DEFAULT_THREADS, in_thread, look_at, path_problem
from .model import (
    BrokenLocation,
    SectorAccessRefused,
    SectorLocation,
    SectorProvider,
    SectorProviderError,
    SectorRef,
    SectorSettings,
)

if TYPE_CHECKING:
    from ..plugins import DextPluginManager

METHOD = "Venus.SectorIndexerFind"
#: A source call bounded on its own too, for a provider used without a locator.
DEFAULT_CALL_TIMEOUT = 30.0
#: The largest answer to one lookup read from the source (a real one is under 200 bytes): a
#: source that sends more (an endless body) fails that lookup, not the process's memory.
MAX_INDEX_ANSWER = 64 * 1024
#: How long a source that could not be reached is not asked again.
DEFAULT_DOWN_FOR = 2.0
#: A lookup cut by its time after this long without the source's answer (a real one takes
#: milliseconds) counts as the source not answering: it is not asked again for `down_for`.
NO_ANSWER_AFTER = 1.0
#: One store look bounded on its own too, for a scan used without a locator.
DEFAULT_SCAN_TIMEOUT = 10.0
#: What to do about a sector the scan found in part (`BrokenLocation.problem`'s end).
BROKEN_ADVICE = (
    "a prover here answers it faulty: restore the sector's files (from a copy, or attach the"
    " store it was moved to), or remove what is left of it if the sector is gone"
)
#: What the scan answers for a sector: where it is, what is wrong with it, or None (not known).
Found = SectorLocation | BrokenLocation | None
#: What the scan answers for a sector in a batch: that, or why it could not tell.
Scanned = Found | SectorProviderError
#: What of the source's own error a lookup's reason shows: it is in every sector's answer and
#: log line, and an answer may be 64 KiB (a chain of proxies' reasons take a few hundred).
MAX_SHOWN = 1000

#: A sector's two parts, as a store holds them: its sealed file and its cache directory.
_KINDS = ("sealed", "cache")


def _shown(text: str) -> str:
    """`text`, cut to MAX_SHOWN characters (saying so)."""
    if len(text) <= MAX_SHOWN:
        return text
    return f"{text[:MAX_SHOWN]}… (cut; {len(text)} characters)"


class IndexInstance(msgspec.Struct, frozen=True):
    """damocles' `SectorAccessStores` as a source node sends it. As in a job's input, fields a
    newer damocles adds here are ignored, as Go's client does: an answer with one is still a
    location, not a failed lookup of every sector."""

    SealedFile: Text
    CacheDir: Text


class IndexLocation(msgspec.Struct, frozen=True):
    """damocles' `core.SectorIndexLocation`, as its JSON is."""

    Found: bool
    Instance: IndexInstance = IndexInstance(SealedFile="", CacheDir="")


#: What a source node's address should be (the error when something else answers there).
SOURCE_RPC = "a damocles source node's RPC (damocles-manager, or damocles-ext coordinator)"
#: How to give a source node the token it takes, for the error of its HTTP 401 or 403.
TOKEN_HINT = (
    "give the one it takes as the header 'Authorization: Bearer TOKEN' (--header; a worker's"
    " --proxy-header)"
)


class SourceNode:
    """Sector locations from a damocles source node (`--proxy`)."""

    def __init__(
        self,
        address: str | Endpoint,
        stores: Mapping[str, str],
        *,
        connections: int = 8,
        headers: tuple[tuple[str, str], ...] = (),
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        down_for: float = DEFAULT_DOWN_FOR,
        relay_names: bool = False,
    ) -> None:
        """`address` in any form `jobs.endpoint.parse_endpoint` takes (ValueError naming it);
        `stores` name -> path on this machine. After the source could not be reached, it is not
        asked again for `down_for` seconds: the lookups in between fail at once, so an outage
        costs a deadline one failed connection, not one per sector."""
        self.endpoint = address if isinstance(address, Endpoint) else parse_endpoint(address)
        self.stores = StoreMap(dict(stores))
        self.name = f"source {self.endpoint.host_header}"
        self.down_for = down_for
        self.relay_names = relay_names  # a store not known here: its name, an empty path
        #: (when, why) of the last failure to reach the source; None once it answered again.
        self.down: tuple[float, str] | None = None
        #: A lookup is asking the source again after it was down (the others fail at once).
        self._probing = False
        #: When the source last answered a call (with a location or an error).
        self._answered_at = float("-inf")
        self._clients = [
            RpcClient(
                self.endpoint,
                timeout=call_timeout,
                max_answer=MAX_INDEX_ANSWER,
                headers=list(headers),
                serves=SOURCE_RPC,
                token_hint=TOKEN_HINT,
                stuck_hint=SERVER_STUCK,
            )
            for _ in range(max(1, connections))
        ]
        self._send, self._receive = trio.open_memory_channel[RpcClient](len(self._clients))
        for client in self._clients:
            self._send.send_nowait(client)

    async def index_location(self, sector: SectorRef) -> IndexLocation:
        """The source's own answer for the sector (RpcClientError when there is none)."""
        client = await self._receive.receive()
        try:
            params = {"Miner": sector.miner, "Number": sector.number}
            found: IndexLocation = await client.call(
                METHOD, sector.index_type, params, result_type=IndexLocation
            )
            return found
        finally:
            self._send.send_nowait(client)

    async def find(self, sector: SectorRef) -> SectorLocation | None:
        down = self.down
        if down is not None:
            ago = trio.current_time() - down[0]
            if ago < self.down_for or self._probing:
                raise SectorProviderError(
                    f"{sector}: not asked, the source node could not be reached or did not"
                    f" answer {ago:.1f} s ago ({down[1]}); it is asked again {self.down_for:g} s"
                    " after, by one lookup until it answers"
                )
            # One lookup asks again; the others fail at once until it has its answer, so a
            # source that still does not answer holds one lookup, not every one.
            self._probing = True
        asked = trio.current_time()
        try:
            found = await self.index_location(sector)
        except RpcConnectionError as exc:  # also RpcTimeout
            self.down = (trio.current_time(), str(exc))
            raise SectorProviderError(f"{sector}: {exc}") from None
        except RpcClientError as exc:  # it answered (with an error): it is not down
            self._answered_at = trio.current_time()
            self.down = None
            reason = _shown(str(exc))
            # A 401 or 403 refuses our token whatever its body: a bare one (go-jsonrpc's auth,
            # a reverse proxy) or a JSON-RPC error (a damocles-ext coordinator's --token-file).
            if isinstance(exc, RpcProtocolError | RpcCallError) and exc.status in (401, 403):
                if isinstance(exc, RpcCallError):  # the server's words (a coordinator's name
                    reason += f"; {TOKEN_HINT}"  # its --token-file): how to send it here
                raise SectorAccessRefused(f"{sector}: {reason}", reason=reason) from None
            raise SectorProviderError(f"{sector}: {reason}") from None
        except trio.Cancelled:
            # Its time was up (the locator's bound) with no answer: after this long, and with
            # no other call answered meanwhile, the source is not answering, as good as
            # unreachable (a real answer takes milliseconds). One that answered other calls is
            # slow (loaded, or a large batch), not down: its other lookups still get answers.
            waited = trio.current_time() - asked
            if waited >= NO_ANSWER_AFTER and self._answered_at < asked:
                self.down = (trio.current_time(), f"no answer within {waited:.1f} s")
            raise
        finally:
            if down is not None:
                self._probing = False
        self._answered_at = trio.current_time()
        self.down = None
        if not found.Found:
            return None
        return self.location(sector, found.Instance)

    def location(
        self, sector: SectorRef, names: SectorAccessStores | IndexInstance
    ) -> SectorLocation:
        """Store names -> paths; SectorProviderError for a name not known here."""
        paths = []
        for kind, name in (("sealed", names.SealedFile), ("cache", names.CacheDir)):
            what = "sealed file" if kind == "sealed" else "cache directory"
            if not name:
                raise SectorProviderError(
                    f"{sector}: the source node {self.endpoint.url} found it but named no store"
                    f" for its {what}; check the sector's index on the source node"
                )
            try:
                paths.append(
                    self.stores.path_of(name, kind, sector.miner, sector.number, sector.upgrade)
                )
            except KeyError as exc:
                if self.relay_names:
                    paths.append("")
                    continue
                raise SectorProviderError(
                    f"{sector}: the source node {self.endpoint.url} keeps its {what} in a store"
                    f" this machine does not know: {exc.args[0]}"
                ) from None
        return SectorLocation(paths[0], paths[1], names.SealedFile, names.CacheDir)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


class StoreScan:
    """Sector locations found by looking in each store, in damocles' layout."""

    def __init__(
        self,
        stores: Mapping[str, str],
        *,
        limiter: trio.CapacityLimiter | None = None,
        timeout: float = DEFAULT_SCAN_TIMEOUT,
    ) -> None:
        self.stores = StoreMap(dict(stores))
        count = len(self.stores.stores)
        self.name = f"scan of {count} store{'' if count == 1 else 's'}"
        self.limiter = limiter or trio.CapacityLimiter(DEFAULT_THREADS)
        self.timeout = timeout

    def candidates(self, sector: SectorRef, kind: str) -> list[tuple[str, str]]:
        return [
            (name, self.stores.path_of(name, kind, sector.miner, sector.number, sector.upgrade))
            for name in self.stores.stores
        ]

    def _look(self, sectors: Sequence[SectorRef]) -> dict[SectorRef, Scanned]:
        """Blocking: each sector's files, looked for in each store. A sector with nothing of it
        in any store is None (not known); one found in part, a `BrokenLocation` saying why; one
        not found where a store could not be looked in, a SectorProviderError saying where."""
        return {sector: self._look_one(sector) for sector in sectors}

    def _look_one(self, sector: SectorRef) -> Scanned:
        """Blocking: the first store that holds both of the sector's files; else, as damocles
        may keep them, its sealed file from one store and its cache directory from another,
        neither from a store with something of the wrong type (a leftover: none of it is
        taken); else what is wrong. A store's cache directory is looked at as soon as its
        sealed file is found (a sector whole in the k-th store costs k + 1 looks), the others'
        only when no store holds it whole, up to the first one to take."""
        paths = {kind: self.candidates(sector, kind) for kind in _KINDS}
        # (why not, something there) of each kind in each store, as it is looked at
        looks: dict[str, list[tuple[str, bool | None] | None]] = {
            kind: [None] * len(paths[kind]) for kind in _KINDS
        }

        def look(kind: str, i: int) -> tuple[str, bool | None]:
            found = looks[kind][i]
            if found is None:
                found = looks[kind][i] = look_at(paths[kind][i][1], kind == "cache")
            return found

        def whole(kind: str, i: int) -> bool:
            return not look(kind, i)[0]

        def leftover(i: int) -> bool:
            """Something of the sector's of the wrong type in store `i`."""
            return any(why and there for why, there in (look(kind, i) for kind in _KINDS))

        stores = range(len(paths["sealed"]))
        for i in stores:
            if whole("sealed", i) and whole("cache", i):
                store = paths["sealed"][i][0]
                return SectorLocation(paths["sealed"][i][1], paths["cache"][i][1], store, store)
        # No store holds it whole: every sealed file is looked at, and the cache directory beside
        # each one found; the other cache directories up to the first one to take.
        sealed_at = next((i for i in stores if whole("sealed", i) and not leftover(i)), None)
        cache_at = None
        if sealed_at is not None:
            cache_at = next((i for i in stores if whole("cache", i) and not leftover(i)), None)
        if sealed_at is not None and cache_at is not None:
            return SectorLocation(
                paths["sealed"][sealed_at][1],
                paths["cache"][cache_at][1],
                paths["sealed"][sealed_at][0],
                paths["cache"][cache_at][0],
            )
        # Rare: what is wrong, everything looked at. `wrong`: by kind, (store, path, why) where
        # something else is; `untold`: by store, why each look in it could not tell.
        wrong: dict[str, list[tuple[str, str, str]]] = {kind: [] for kind in _KINDS}
        untold: dict[str, list[str]] = {}
        for i in stores:
            for kind in _KINDS:
                why, there = look(kind, i)
                if why and there:
                    wrong[kind].append((*paths[kind][i], why))
                elif there is None:
                    untold.setdefault(paths[kind][i][0], []).append(why)
        parts = {kind: next((i for i in stores if whole(kind, i)), None) for kind in _KINDS}
        if parts == {"sealed": None, "cache": None} and not any(wrong.values()):
            # Nothing of it anywhere: not known, unless a store could not be looked in.
            if not untold:
                return None
            which = (
                "no store could be looked in"
                if len(untold) == len(self.stores.stores)
                else "not in the stores looked in, and some could not be"
            )
            return SectorProviderError(
                f"{sector}: {which}: {_untold(untold)}; check that the stores are mounted and"
                " readable here"
            )
        if None not in parts.values():
            # Each part whole somewhere, but one only beside a leftover: said of the first store
            # with a leftover and a part whole (what is wrong there is what to put right).
            at = next(i for i in stores if leftover(i) and any(whole(k, i) for k in _KINDS))
            store = paths["sealed"][at][0]
            parts = {kind: at if whole(kind, at) else None for kind in _KINDS}
            wrong = {kind: [w for w in wrong[kind] if w[0] == store] for kind in _KINDS}
        return self._broken(
            sector,
            {kind: None if i is None else paths[kind][i] for kind, i in parts.items()},
            wrong,
            untold,
        )

    def _broken(
        self,
        sector: SectorRef,
        parts: dict[str, tuple[str, str] | None],
        wrong: dict[str, list[tuple[str, str, str]]],
        untold: dict[str, list[str]],
    ) -> BrokenLocation:
        """Blocking: what is wrong with a sector found in part (`parts`: the (store, path) of
        its sealed file and cache directory, None for one not found; `wrong`: by kind, each
        (store, path, why) where something else is; `untold`: the stores that could not be
        looked in, and why)."""
        there = [part[0] for part in parts.values() if part is not None]
        anchor = (there or [w[0] for kind in _KINDS for w in wrong[kind]])[0]
        looked_in = {name: path for name, path in self.stores.stores.items() if name not in untold}
        others = len(looked_in) - (anchor in looked_in)
        where: dict[str, tuple[str, str]] = {}
        problems = []
        for kind in _KINDS:
            part = parts[kind]
            if part is not None:
                where[kind] = part
                continue
            what, want_dir = (
                ("sealed file", False) if kind == "sealed" else ("cache directory", True)
            )
            if wrong[kind]:
                where[kind] = wrong[kind][0][:2]
                whys = " and ".join(why for _, _, why in wrong[kind])
            else:
                path = self.stores.path_of(
                    anchor, kind, sector.miner, sector.number, sector.upgrade
                )
                where[kind] = (anchor, path)
                whys = path_problem(path, want_dir) or f"{path} was not there when looked at"
                if others:
                    whys += f" (nor in {_other_stores(looked_in, anchor)})"
            problems.append(f"its {what} {whys}")
        if untold:
            problems[-1] += f"; {_untold(untold)} could not be looked in"
        location = SectorLocation(
            where["sealed"][1], where["cache"][1], where["sealed"][0], where["cache"][0]
        )
        return BrokenLocation(
            location,
            f"{sector}: found in store {anchor} ({self.stores.stores[anchor]}), but"
            f" {' and '.join(problems)}; {BROKEN_ADVICE}",
        )

    async def find_batch(self, sectors: Sequence[SectorRef]) -> dict[SectorRef, Scanned]:
        """The sectors' locations, one worker thread for the batch (a SectorProviderError for
        a sector it could not tell of)."""
        try:
            return await in_thread(self._look, sectors, limiter=self.limiter, timeout=self.timeout)
        except (TimeoutError, NoThreadError) as exc:
            what = str(sectors[0]) if len(sectors) == 1 else f"{len(sectors)} sectors"
            raise SectorProviderError(f"{what}: scanning the stores: {exc}") from None

    async def find(self, sector: SectorRef) -> Found:
        found = (await self.find_batch([sector]))[sector]
        if isinstance(found, SectorProviderError):
            raise found
        return found


def _stores(shown: list[str], total: int) -> str:
    """'store b', 'stores b, c', 'stores b, c, d and 5 more': the first 3 of `total` stores."""
    return ("store " if total == 1 else "stores ") + some_and_more(shown[:3], total)


def _untold(untold: dict[str, list[str]]) -> str:
    """'store b (why; why)', 'stores b (why), c (why)': the stores that could not be looked
    in, with why."""
    return _stores([f"{store} ({'; '.join(whys)})" for store, whys in untold.items()], len(untold))


def _other_stores(stores: Mapping[str, str], but: str) -> str:
    """The stores other than `but` (`_stores`)."""
    others = [name for name in stores if name != but]
    return _stores(others, len(others))


def builtin_providers(
    settings: SectorSettings, *, limiter: trio.CapacityLimiter | None = None
) -> list[SourceNode | StoreScan]:
    """The source node (when `settings.proxy`), then the scan (when there are stores)."""
    providers: list[SourceNode | StoreScan] = []
    if settings.proxy is not None:
        providers.append(
            SourceNode(
                settings.proxy,
                settings.stores,
                connections=settings.connections,
                headers=settings.headers,
                relay_names=settings.relay_names,
            )
        )
    if settings.stores:
        providers.append(StoreScan(settings.stores, limiter=limiter))
    return providers


def build_providers(
    settings: SectorSettings, plugin_manager: DextPluginManager | None = None
) -> list[SectorProvider]:
    """The plugins' providers (`dext_sector_providers`), then the built-in ones. UsageError
    when a plugin's hook fails or returns something that is not a provider."""
    from ..errors import UsageError, describe, passes_through, text_of
    from ..plugin_blame import call_hook, raised_by, returned_by, whose

    providers: list[SectorProvider] = []
    if plugin_manager is not None:
        caller = plugin_manager.hook.dext_sector_providers
        try:
            results, seen = call_hook(caller, settings=settings)
        except BaseException as exc:  # a plugin's bug is reported, not a traceback
            if passes_through(exc):
                raise
            hook = whose("dext_sector_providers", raised_by(caller, exc))
            raise UsageError(f"{hook} failed: {describe(exc)}") from None
        for result in results:
            hook = whose("dext_sector_providers", returned_by(seen, result))
            try:
                given = list(result or ())
            except TypeError:
                given = [result]  # not a list of providers: said below
            for provider in given:
                try:
                    named = isinstance(provider.name, str) and bool(provider.name)
                except BaseException as exc:  # a property of the plugin's that raises
                    if passes_through(exc):
                        raise
                    named = False
                if not (isinstance(provider, SectorProvider) and named):
                    raise UsageError(
                        f"{hook} returned {text_of(provider, repr)}, which is not a"
                        " sector provider (it needs a `name`, a non-empty str, and"
                        " `async find(sector)`)"
                    )
                providers.append(provider)
    try:
        providers.extend(builtin_providers(settings))
    except ValueError as exc:  # a bad --proxy address, a bad store
        raise UsageError(str(exc)) from None
    return providers
