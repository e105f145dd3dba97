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
on each (`jobs.client.RpcClient`).

`StoreScan` looks for `<store>/sealed/s-t0<miner>-<number>` and `<store>/cache/…` in every store,
in worker threads with a time bound (files.py): a stalled store makes it fail, never hang.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import trio

from ..jobs.client import RpcClient, RpcClientError
from ..jobs.endpoint import Endpoint, parse_endpoint
from ..jobs.model import SectorAccessStores
from ..jobs.paths import StoreMap
from .files import DEFAULT_THREADS, first_present, in_thread
from .model import SectorLocation, SectorProviderError, SectorRef, SectorSettings

METHOD = "Venus.SectorIndexerFind"
#: A source call bounded on its own too, for a provider used without a locator.
DEFAULT_CALL_TIMEOUT = 30.0
#: One store look bounded on its own too, for a scan used without a locator.
DEFAULT_SCAN_TIMEOUT = 10.0


class IndexLocation(msgspec.Struct, frozen=True):
    """damocles' `core.SectorIndexLocation`, as its JSON is."""

    Found: bool
    Instance: SectorAccessStores = SectorAccessStores(SealedFile="", CacheDir="")


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
    ) -> None:
        """`address` in any form `jobs.endpoint.parse_endpoint` takes (ValueError naming it);
        `stores` name -> path on this machine."""
        self.endpoint = address if isinstance(address, Endpoint) else parse_endpoint(address)
        self.stores = StoreMap(dict(stores))
        self.name = f"source {self.endpoint.host_header}"
        self._send, self._receive = trio.open_memory_channel[RpcClient](connections)
        self._clients = [
            RpcClient(self.endpoint, timeout=call_timeout, headers=list(headers))
            for _ in range(max(1, connections))
        ]
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
        try:
            found = await self.index_location(sector)
        except RpcClientError as exc:
            raise SectorProviderError(f"{sector}: {exc}") from None
        if not found.Found:
            return None
        return self.location(sector, found.Instance)

    def location(self, sector: SectorRef, names: SectorAccessStores) -> SectorLocation:
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

    async def find(self, sector: SectorRef) -> SectorLocation | None:
        found = []
        for kind in ("sealed", "cache"):
            try:
                hit = await in_thread(
                    first_present,
                    self.candidates(sector, kind),
                    kind == "cache",
                    limiter=self.limiter,
                    timeout=self.timeout,
                )
            except TimeoutError as exc:
                raise SectorProviderError(f"{sector}: scanning the stores: {exc}") from None
            if hit is None:
                return None
            found.append(hit)
        (sealed_store, sealed), (cache_store, cache) = found
        return SectorLocation(sealed, cache, sealed_store, cache_store)


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
            )
        )
    if settings.stores:
        providers.append(StoreScan(settings.stores, limiter=limiter))
    return providers
