"""Sector fixtures: random sealed replicas, their cache dirs (tree built by the native prover) and a
manifest listing them, plus helpers that turn a manifest into a task.

Layout of a fixture directory (damocles' naming)::

    DIR/manifest.json
    DIR/sealed/s-t0<miner>-<sector>
    DIR/cache/s-t0<miner>-<sector>/{p_aux, sc-02-data-tree-r-last.dat}

WinningPoSt uses the same sectors as WindowPoSt: a proof type maps to sectors by its size part.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import msgspec

from ..errors import UsageError
from ..tasks import (
    U64,
    WINDOW_PROOF_TYPES,
    WINNING_PROOF_TYPES,
    PoStReplicaInfo,
    WindowPoSt,
    WinningPoSt,
    is_window_proof_type,
    is_winning_proof_type,
    sector_size_name,
)
from .layout import NODE_SIZE, proof_params

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

Progress = Callable[[str, int, int], None]

# Clearing the top two bits of every node's last byte makes each node a field element, as in a
# real replica.
_FIELD_MASK = bytes(b & 0x3F for b in range(256))


class ManifestReplica(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sector_id: U64
    comm_r: str  # hex, 64 characters
    cache_dir: str
    sealed_file: str


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    proof_type: str
    miner_id: U64
    sector_size: str
    rows_to_discard: int
    replicas: list[ManifestReplica]


_WRITE_CHUNK = 1 << 20


def _random_node_bytes(rng: random.Random, size: int) -> bytes:
    data = bytearray(rng.randbytes(size))
    data[NODE_SIZE - 1 :: NODE_SIZE] = data[NODE_SIZE - 1 :: NODE_SIZE].translate(_FIELD_MASK)
    return bytes(data)


def _write_random_replica(path: Path, rng: random.Random, size: int) -> None:
    with open(path, "wb") as f:
        f.writelines(
            _random_node_bytes(rng, min(_WRITE_CHUNK, size - offset))
            for offset in range(0, size, _WRITE_CHUNK)
        )


def create_sectors(
    out_dir: str | os.PathLike,
    proof_type: str,
    count: int,
    miner_id: int,
    progress: Progress | None = None,
    rows_to_discard: int = 2,
    *,
    first_sector_id: int = 1,
    random_seed: int | None = None,
) -> Path:
    """Write `count` random sealed sectors, their cache dirs and DIR/manifest.json (returned)."""
    from .native import NativeProver

    try:
        params = proof_params(proof_type)
    except ValueError:
        known = ", ".join(WINDOW_PROOF_TYPES + WINNING_PROOF_TYPES)
        raise UsageError(f"unknown proof type {proof_type!r}; use one of {known}") from None
    if count < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    if not 0 <= rows_to_discard < params.height:
        raise UsageError(
            f"rows_to_discard must be 0..{params.height - 1} for {proof_type}, "
            f"got {rows_to_discard}"
        )
    rng = random.Random(random_seed) if random_seed is not None else random.SystemRandom()
    out = Path(out_dir).resolve()
    (out / "sealed").mkdir(parents=True, exist_ok=True)
    (out / "cache").mkdir(exist_ok=True)
    need = count * params.sector_size * 2  # the tree file is at most as big as the data
    free = shutil.disk_usage(out).free
    if need > free:
        raise UsageError(
            f"{count} sectors of {sector_size_name(proof_type)} need about {need >> 20} MiB under "
            f"{out}, only {free >> 20} MiB are free; use a smaller proof type or count"
        )
    replicas = []
    big = params.sector_size >= (8 << 20)
    with NativeProver(options={"rows_to_discard": rows_to_discard}) as prover:
        for i in range(count):
            sector_id = first_sector_id + i
            name = f"s-t0{miner_id}-{sector_id}"
            sealed = out / "sealed" / name
            cache = out / "cache" / name
            _write_random_replica(sealed, rng, params.sector_size)
            cache.mkdir(exist_ok=True)
            comm_c = _random_node_bytes(rng, NODE_SIZE)
            comm_r = prover.build_tree(
                proof_type, sealed, cache, comm_c, progress=progress if big else None
            )
            replicas.append(ManifestReplica(sector_id, comm_r.hex(), str(cache), str(sealed)))
            if progress:
                progress("sectors", i + 1, count)
    manifest = Manifest(
        version=MANIFEST_VERSION,
        proof_type=proof_type,
        miner_id=miner_id,
        sector_size=sector_size_name(proof_type),
        rows_to_discard=rows_to_discard,
        replicas=replicas,
    )
    path = out / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n")
    tmp.replace(path)
    return path


#: The most a manifest file may hold, as a request file (four times a dext frame's limit).
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest; relative paths inside are taken relative to its directory."""
    path = Path(path)
    try:
        with path.open("rb") as f:  # bounded: /dev/zero given by mistake must not fill memory
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read manifest {path}: {exc.strerror}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise UsageError(
            f"manifest {path} holds over {MAX_MANIFEST_BYTES // 2**20} MiB, more than any"
            " manifest: is it the right file?"
        )
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except msgspec.ValidationError as exc:
        raise UsageError(f"{path}: invalid manifest: {exc}") from None
    except msgspec.DecodeError as exc:
        raise UsageError(f"{path}: not JSON: {exc}") from None
    if manifest.version != MANIFEST_VERSION:
        raise UsageError(
            f"{path}: manifest version {manifest.version} is not {MANIFEST_VERSION}, the one this"
            " damocles-ext reads; write it again with `damocles-ext sectors create`"
        )
    if manifest.rows_to_discard < 0:
        raise UsageError(f"{path}: rows_to_discard must be >= 0, not {manifest.rows_to_discard}")
    base = path.resolve().parent
    replicas = []
    for i, rep in enumerate(manifest.replicas):
        try:
            comm_r = bytes.fromhex(rep.comm_r)
        except ValueError:
            comm_r = b""
        if len(comm_r) != 32:
            raise UsageError(f"{path}: replicas[{i}].comm_r must be 64 hex characters")
        replicas.append(
            msgspec.structs.replace(
                rep, cache_dir=str(base / rep.cache_dir), sealed_file=str(base / rep.sealed_file)
            )
        )
    return msgspec.structs.replace(manifest, replicas=replicas)


def proof_type_for(stage: str, sector_size: str, window_version: str = "V1_2") -> str:
    """The proof type of a stage for a sector size: StackedDrgWindow<size><version> or Winning."""
    if stage == "window_post":
        return f"StackedDrgWindow{sector_size}{window_version}"
    if stage == "winning_post":
        return f"StackedDrgWinning{sector_size}V1"
    raise UsageError(f"unknown stage {stage!r}; use window_post or winning_post")


def _replica_infos(manifest: Manifest, sector_ids: list[int] | None) -> list[PoStReplicaInfo]:
    infos = [
        PoStReplicaInfo(r.sector_id, bytes.fromhex(r.comm_r), r.cache_dir, r.sealed_file)
        for r in manifest.replicas
    ]
    if sector_ids is None:
        return infos
    by_id = {r.sector_id: r for r in infos}
    missing = [s for s in sector_ids if s not in by_id]
    if missing:
        raise UsageError(f"sectors {missing} are not in the manifest")
    return [by_id[s] for s in sector_ids]


def window_task(
    manifest: Manifest,
    seed: bytes,
    proof_type: str | None = None,
    sector_ids: list[int] | None = None,
) -> WindowPoSt:
    """A WindowPoSt task over the manifest's sectors (all, or `sector_ids`)."""
    ptype = proof_type or (
        manifest.proof_type
        if manifest.proof_type in WINDOW_PROOF_TYPES
        else proof_type_for("window_post", manifest.sector_size)
    )
    _check_size(manifest, ptype)
    if not is_window_proof_type(ptype):
        raise UsageError(f"{ptype} is not a WindowPoSt proof type (StackedDrgWindow<size>V1[_2])")
    return WindowPoSt(manifest.miner_id, ptype, _replica_infos(manifest, sector_ids), seed)


def winning_task(
    manifest: Manifest,
    seed: bytes,
    proof_type: str | None = None,
    sector_ids: list[int] | None = None,
) -> WinningPoSt:
    """A WinningPoSt task whose eligible set is the manifest's sectors (all, or `sector_ids`)."""
    ptype = proof_type or proof_type_for("winning_post", manifest.sector_size)
    _check_size(manifest, ptype)
    if not is_winning_proof_type(ptype):
        raise UsageError(f"{ptype} is not a WinningPoSt proof type (StackedDrgWinning<size>V1)")
    return WinningPoSt(manifest.miner_id, ptype, _replica_infos(manifest, sector_ids), seed)


def _check_size(manifest: Manifest, proof_type: str) -> None:
    try:
        size = sector_size_name(proof_type)
    except ValueError:
        raise UsageError(f"unknown proof type {proof_type!r}") from None
    if size != manifest.sector_size:
        raise UsageError(
            f"proof type {proof_type} is for {size} sectors but the manifest's are "
            f"{manifest.sector_size}"
        )
