"""Prometheus counters of the sector-location service (prometheus_client, as the rest of the
project; a registry of its own unless the process's is given, so that the worker's or the
coordinator's metrics endpoint can serve them with its own).

- `damocles_ext_sector_lookups_total`: sectors asked for;
- `damocles_ext_sector_cache_hits_total`: answered from a fresh cache entry, no provider asked;
- `damocles_ext_sector_source_errors_total{provider}`: a provider that could not answer for a
  sector (unreachable, timed out, an unknown store name);
- `damocles_ext_sector_stale_answers_total`: last known locations given because no provider
  could answer (their files were checked);
- `damocles_ext_sector_not_found_total`, `damocles_ext_sector_missing_total`: sectors no
  provider knows; sectors whose last known files are gone or did not answer (faults);
- `damocles_ext_sector_refreshes_total`: sectors asked again in the background.
"""

from __future__ import annotations

from typing import Any

from ..metrics import PREFIX


class SectorMetrics:
    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, disable_created_metrics

        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.lookups = Counter(f"{PREFIX}_sector_lookups_total", "Sectors asked for.", registry=r)
        self.cache_hits = Counter(
            f"{PREFIX}_sector_cache_hits_total",
            "Sectors answered from a fresh cache entry, no provider asked.",
            registry=r,
        )
        self.source_errors = Counter(
            f"{PREFIX}_sector_source_errors_total",
            "Lookups a provider could not answer (unreachable, timed out, unknown store).",
            ["provider"],
            registry=r,
        )
        self.stale_answers = Counter(
            f"{PREFIX}_sector_stale_answers_total",
            "Last known locations given (files checked) because no provider could answer.",
            registry=r,
        )
        self.not_found = Counter(
            f"{PREFIX}_sector_not_found_total", "Sectors no provider knows.", registry=r
        )
        self.missing = Counter(
            f"{PREFIX}_sector_missing_total",
            "Sectors whose last known files are gone or whose storage did not answer.",
            registry=r,
        )
        self.refreshes = Counter(
            f"{PREFIX}_sector_refreshes_total",
            "Sectors asked again in the background before they were needed.",
            registry=r,
        )
