"""A sector's files as paths (what damocles-manager's ext-prover requests carry) and as store names
(what a WindowPoSt job carries), both ways.

damocles lays a store out as `<store path>/sealed/s-t0<miner>-<number>` and
`<store path>/cache/s-t0<miner>-<number>`, and for an upgraded (SnapDeals) sector
`update/…` and `update-cache/…`. A job names the stores (`Accesses.SealedFile`,
`Accesses.CacheDir`) and says `Upgrade`; each worker turns a name back into a path through its
own `[[attached]]` stores, so a path here must be exactly where damocles puts it, or the worker
would look elsewhere. When stores nest, the longest store path that holds a file is its store.

Sans-IO: paths are compared as strings (normalised, never resolved on a disk).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from ..tasks import WindowPoSt
from .model import SectorAccessStores, WdPoStInput, WdPoStSectorInfo, check_input

SEALED: Final = "sealed"
CACHE: Final = "cache"
UPDATE: Final = "update"
UPDATE_CACHE: Final = "update-cache"

STORE_FIX = (
    "add the store that holds it with --store NAME=PATH (NAME as damocles-manager and the"
    " workers name it), or give --conf-dir the directory of the sector-manager.cfg whose"
    " [[Common.PersistStores]] list it"
)


class SectorPathError(ValueError):
    """A sector's path that no store holds, or that is not in damocles' layout."""


def sector_file_name(miner: int, number: int) -> str:
    """damocles' file name of a sector: `s-t0<miner>-<number>`."""
    return f"s-t0{miner}-{number}"


def _normal(path: str) -> str:
    return posixpath.normpath(path) if path else path


def merge_stores(*sources: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Store name -> path from several sources (sector-manager.cfg, --store); the same name with
    two different paths is a ValueError naming both."""
    merged: dict[str, str] = {}
    for source in sources:
        for name, path in source:
            known = merged.get(name)
            if known is not None and _normal(known) != _normal(path):
                raise ValueError(
                    f"store {name!r} is given twice with different paths ({known!r} and"
                    f" {path!r}); keep one"
                )
            merged[name] = path
    return merged


@dataclass(frozen=True, slots=True)
class StoreMap:
    """The stores by name; `locate` maps a sector's paths to names, `path_of` back."""

    stores: Mapping[str, str]

    def __post_init__(self) -> None:
        by_path: dict[str, str] = {}
        for name, path in self.stores.items():
            if not name or not path:
                raise ValueError(f"a store needs a name and a path, got {name!r}={path!r}")
            if "\0" in name or "\0" in path:
                raise ValueError(
                    f"store {name!r}={path!r} has a NUL character, which no store name or"
                    " path can hold; write the store's name and directory as they are"
                )
            other = by_path.setdefault(_normal(path), name)
            if other != name:
                raise ValueError(
                    f"stores {other!r} and {name!r} have the same path {path!r}: a sector there"
                    " could not be given one name; keep one"
                )

    def _store_of(self, path: str) -> tuple[str, str] | None:
        normal = _normal(path)
        best: tuple[str, str] | None = None
        for name, given in self.stores.items():
            root = _normal(given)
            inside = normal.startswith(root.rstrip("/") + "/") and normal != root
            if inside and (best is None or len(root) > len(best[1])):
                best = (name, root)
        return best

    def _place(self, what: str, path: str, dirs: tuple[str, str], miner: int, number: int,
               sector: str) -> tuple[str, bool]:  # fmt: skip
        """(store name, in the upgrade directory) of one file; SectorPathError naming it."""
        found = self._store_of(path)
        if found is None:
            known = ", ".join(f"{n}={p}" for n, p in self.stores.items()) or "none are known"
            raise SectorPathError(
                f"{sector}: its {what} {path!r} is in none of the stores ({known}); {STORE_FIX}"
            )
        name, root = found
        rest = posixpath.relpath(_normal(path), root)
        file_name = sector_file_name(miner, number)
        for upgrade, directory in ((False, dirs[0]), (True, dirs[1])):
            if rest == f"{directory}/{file_name}":
                return name, upgrade
        raise SectorPathError(
            f"{sector}: its {what} {path!r} is in store {name!r} ({root}) but not where damocles"
            f" keeps it ({root}/{dirs[0]}/{file_name}, or {root}/{dirs[1]}/{file_name} for an"
            " upgraded sector), so a worker would not find it there; check the request, or"
            " whether a store nested in this one is missing from the stores given"
        )

    def locate(self, miner: int, number: int, sealed_file: str,
               cache_dir: str) -> tuple[SectorAccessStores, bool]:  # fmt: skip
        """The store names of a sector's sealed file and cache directory, and whether the sector
        is upgraded; SectorPathError when a path is in no store or not in damocles' layout."""
        sector = f"sector {number} of miner {miner}"
        sealed, sealed_upgrade = self._place(
            "sealed_file", sealed_file, (SEALED, UPDATE), miner, number, sector
        )
        cache, cache_upgrade = self._place(
            "cache_dir", cache_dir, (CACHE, UPDATE_CACHE), miner, number, sector
        )
        if sealed_upgrade != cache_upgrade:
            raise SectorPathError(
                f"{sector}: its sealed_file {sealed_file!r} and cache_dir {cache_dir!r} do not"
                f" agree on whether it is upgraded (an upgraded sector has both in {UPDATE}/ and"
                f" {UPDATE_CACHE}/, another in {SEALED}/ and {CACHE}/)"
            )
        return SectorAccessStores(SealedFile=sealed, CacheDir=cache), sealed_upgrade

    def path_of(self, store: str, kind: str, miner: int, number: int, upgrade: bool) -> str:
        """The path of a sector's sealed file (`kind` "sealed") or cache directory ("cache") in
        the store named `store`; KeyError naming the store when it is not known."""
        root = self.stores.get(store)
        if root is None:
            known = ", ".join(sorted(self.stores)) or "none"
            # A source node's answer names it: at most a line of it (an answer may be 64 KiB).
            shown = repr(store) if len(store) <= 100 else f"{store[:100]!r}… ({len(store)} chars)"
            raise KeyError(f"store {shown} is not known here (known: {known}); {STORE_FIX}")
        return sector_path(root, kind, miner, number, upgrade)


def sector_path(root: str, kind: str, miner: int, number: int, upgrade: bool) -> str:
    """The path of a sector's sealed file (`kind` "sealed") or cache directory ("cache") in the
    store whose directory is `root`, in damocles' layout."""
    if kind == "sealed":
        directory = UPDATE if upgrade else SEALED
    elif kind == "cache":
        directory = UPDATE_CACHE if upgrade else CACHE
    else:
        raise ValueError(f"kind must be 'sealed' or 'cache', not {kind!r}")
    return posixpath.join(_normal(root), directory, sector_file_name(miner, number))


def job_input(task: WindowPoSt, stores: StoreMap) -> WdPoStInput:
    """The job input damocles-manager's worker-prover mode would make for this task: each
    replica's paths become store names and `Upgrade`, in the task's order (the job id is the
    hash of this input, so the same task is always the same job). SectorPathError for a path
    in no store or out of the layout; ValueError for a value a job cannot hold."""
    sectors = []
    for replica in task.replicas:
        access, upgrade = stores.locate(
            task.miner_id, replica.sector_id, replica.sealed_file, replica.cache_dir
        )
        sectors.append(
            WdPoStSectorInfo(
                SectorId=replica.sector_id,
                CommR=tuple(replica.comm_r),
                Upgrade=upgrade,
                Accesses=access,
            )
        )
    # damocles builds the list with make(), never nil: JSON `[]` even for no sector.
    made = WdPoStInput(
        Sectors=tuple(sectors),
        MinerId=task.miner_id,
        ProofType=task.proof_type,
        Seed=tuple(task.seed),
    )
    return check_input(made)
