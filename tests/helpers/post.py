"""Sectors on disk for the PoSt tests: a manifest of fresh sectors, or one with a faulty sector."""

from __future__ import annotations

from pathlib import Path

from damocles_ext.post.fixtures import create_sectors, load_manifest


def sectors(base: Path, proof_type: str, count: int, *, random_seed: int, miner: int = 1000):
    """The manifest of `count` new sectors of `proof_type` for `miner` under `base`."""
    return load_manifest(create_sectors(base, proof_type, count, miner, random_seed=random_seed))


def sectors_with_a_short_one(base: Path):
    """Two 2KiB sectors of miner 5, the second cut short: a WindowPoSt finds it faulty."""
    manifest = sectors(base, "StackedDrgWindow2KiBV1", 2, random_seed=9, miner=5)
    (base / "sealed" / "s-t05-2").write_bytes(b"short")
    return manifest
