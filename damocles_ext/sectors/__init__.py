"""The sector-location service: where each sector's sealed file and cache directory are, for a
prover that is not handed paths (damocles' proxy node mode, done better).

Public API (stable; documented in docs/SECTORS.md):

- `damocles_ext.sectors.model` (sans-IO, re-exported here): `SectorRef`, `SectorLocation`,
  `BrokenLocation` (a sector a provider found in part, and what is wrong with the rest),
  `SectorAnswer` (`status` found / not_found / missing / error, `provider`, `cached`, `age`,
  `detail`), `SectorProvider` (what `dext_sector_providers` returns), `SectorProviderError`
  (`SectorAccessRefused`: its source refused our token),
  `SectorSettings`, `Bounds`;
- `damocles_ext.sectors.cache` (sans-IO): `CacheRules`, `SectorCache`;
- `damocles_ext.sectors.locator` (trio): `SectorLocator`, `open_locator`;
- `damocles_ext.sectors.providers` (trio): the built-in `SourceNode` (a damocles source node,
  `Venus.SectorIndexerFind`) and `StoreScan`, and `build_providers` (the plugins' then these);
- `damocles_ext.sectors.metrics`: `SectorMetrics` (Prometheus counters).
- `damocles_ext.sectors.snapshot` (trio, files): `CacheSnapshot`, the cache kept across restarts.

This package's `__init__` imports only the sans-IO model, so a plugin that offers a provider
imports `from damocles_ext.sectors import SectorLocation, SectorRef` cheaply.
"""

from __future__ import annotations

from .model import (
    INDEX_TYPES,
    STATUSES,
    Bounds,
    BrokenLocation,
    IndexType,
    SectorAccessRefused,
    SectorAnswer,
    SectorLocation,
    SectorProvider,
    SectorProviderError,
    SectorRef,
    SectorSettings,
    Status,
)

__all__ = [
    "INDEX_TYPES",
    "STATUSES",
    "Bounds",
    "BrokenLocation",
    "IndexType",
    "SectorAccessRefused",
    "SectorAnswer",
    "SectorLocation",
    "SectorProvider",
    "SectorProviderError",
    "SectorRef",
    "SectorSettings",
    "Status",
]
