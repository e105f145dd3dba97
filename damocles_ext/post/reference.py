"""The reference PoSt prover in plain Python (hashlib): the same algorithm and bytes as native/src.

It exists to pin the C implementation down (tests compare their proof bytes) and as the
`python-ref` prover. Tree geometry: level 0 is the sealed file, level `height` the root; the tree
file keeps levels rows_to_discard+1..height, lowest first, and proving recomputes the discarded
rows from the sealed file, so every challenge reads the replica.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from ..regular_file import NotRegularFile, open_regular
from ..tasks import PoStReplicaInfo, WindowPoSt, WindowPoStOutput, WinningPoSt, WinningPoStOutput
from . import challenges as ch
from .errors import InvalidTaskError, PoStCancelled, SectorFaultError
from .layout import (
    KIND_WINDOW,
    KIND_WINNING,
    NODE_SIZE,
    ChallengeProof,
    ProofParams,
    SectorProof,
    encode_header,
    encode_sector,
    proof_params,
)

P_AUX_NAME = "p_aux"
TREE_FILE_NAME = "sc-02-data-tree-r-last.dat"
#: Beyond this a challenge would read 2^(rows+1) nodes: megabytes per challenge (same as the C).
MAX_ROWS_TO_DISCARD = 20
_SMALL_TREE_FILE = 1 << 20
#: A WindowPoSt's faulty sectors whose reasons are logged, one line each (the C reference writes
#: as many): a lost mount makes thousands of faults, all for one reason, and a child's log is
#: capped (supervisor/stderr_relay.py), so the rest are one line with their count.
FAULT_REASONS_LOGGED = 20

log = logging.getLogger("damocles_ext.post.reference")

Progress = Callable[[str, int, int], None]


class CancelLike(Protocol):
    @property
    def cancelled(self) -> bool: ...


def hash_node(a: bytes, b: bytes) -> bytes:
    """SHA256(a ‖ b) trimmed to 254 bits (byte 31 &= 0x3f)."""
    d = hashlib.sha256(a + b).digest()
    return d[:31] + bytes([d[31] & 0x3F])


def _level_offset(nodes: int, rows: int, level: int) -> int:
    return (nodes >> rows) - (nodes >> (level - 1))


def _params(proof_type: str, kind: int, stage: str) -> ProofParams:
    try:
        params = proof_params(proof_type)
    except ValueError:
        params = None
    if params is None or params.kind != kind:
        raise InvalidTaskError(f"{stage}: unknown proof type {proof_type!r}")
    return params


def build_tree(
    proof_type: str,
    sealed_file: str | os.PathLike,
    cache_dir: str | os.PathLike,
    comm_c: bytes,
    rows_to_discard: int = 2,
    progress: Progress | None = None,
    cancel: CancelLike | None = None,
) -> bytes:
    """Write cache_dir/p_aux and the tree-r-last file for a sealed file; return comm_r.
    Only tests and benchmarks call it (sector fixtures are built by the C prover's), but it
    reads the sealed file as the provers do: a regular file only (never a FIFO's wait nor a
    device's open), and no more of it than a sector holds."""
    params = proof_params(proof_type)
    if not 0 <= rows_to_discard < params.height or rows_to_discard > MAX_ROWS_TO_DISCARD:
        raise InvalidTaskError(
            f"rows_to_discard {rows_to_discard} is out of range for {proof_type}: "
            f"use 0..{min(params.height - 1, MAX_ROWS_TO_DISCARD)}"
        )
    try:
        fd = open_regular(sealed_file, wait_for_lease=True)
    except NotRegularFile as exc:
        what = f"sealed file {sealed_file} is {exc.kind}, not a regular file"
        raise SectorFaultError(what) from None
    with open(fd, "rb") as f:
        data = f.read(params.sector_size + 1)  # bounded: one byte past a sector says it is longer
        size = len(data) if len(data) <= params.sector_size else os.fstat(fd).st_size
    if size != params.sector_size:
        raise SectorFaultError(
            f"sealed file {sealed_file} is {size} bytes; {proof_type} needs exactly "
            f"{params.sector_size}"
        )
    level = [data[i : i + NODE_SIZE] for i in range(0, len(data), NODE_SIZE)]
    stored = []
    if progress:
        progress("build_tree", 0, params.height)
    for height in range(1, params.height + 1):
        if cancel is not None and cancel.cancelled:
            raise PoStCancelled("cancelled while building the tree")
        level = [hash_node(level[2 * i], level[2 * i + 1]) for i in range(len(level) // 2)]
        if height > rows_to_discard:
            stored.append(b"".join(level))
        if progress:
            progress("build_tree", height, params.height)
    root = level[0]
    cache = Path(cache_dir)
    cache.mkdir(exist_ok=True)
    _write_atomically(cache / TREE_FILE_NAME, b"".join(stored))
    _write_atomically(cache / P_AUX_NAME, comm_c + root)
    return hash_node(comm_c, root)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class _Fault(Exception):
    """A sector cannot be proven; the message says why."""


def _read_exact_at(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise OSError(f"short read at offset {offset}")
        data += more
    return data


def prove_sector(
    params: ProofParams, replica: PoStReplicaInfo, rand: bytes, sector_index: int
) -> SectorProof:
    """Vanilla proof of one sector; raises _Fault with the reason when it is faulty."""
    try:
        return _prove_sector(params, replica, rand, sector_index)
    except OSError as exc:  # (the sector is named by whoever says the reason)
        raise _Fault(str(exc)) from None


def _open_input(path: str, what: str) -> BinaryIO:
    """`path` opened for reading, unbuffered, if it is a regular file: a FIFO where a file
    should be (no writer) would block open() for ever, and a device's open runs its driver, so
    neither is opened (regular_file.open_regular); one that a lease holds is opened once the
    lease breaks, as a plain open() does."""
    try:
        fd = open_regular(path, wait_for_lease=True)
    except NotRegularFile:
        raise _Fault(f"{what} {path} is not a regular file") from None
    except OSError as exc:
        raise _Fault(f"cannot open {what} {path}: {exc.strerror or exc}") from None
    try:
        return open(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _prove_sector(
    params: ProofParams, replica: PoStReplicaInfo, rand: bytes, sector_index: int
) -> SectorProof:
    sid = replica.sector_id
    with _open_input(replica.sealed_file, "sealed file") as sealed:
        st = os.fstat(sealed.fileno())
        if st.st_size != params.sector_size:
            raise _Fault(
                f"sealed file {replica.sealed_file} is {st.st_size} bytes, "
                f"expected {params.sector_size}"
            )
        with _open_input(os.path.join(replica.cache_dir, P_AUX_NAME), "p_aux") as f:
            paux = f.read(65)
        if len(paux) != 64:
            raise _Fault(f"p_aux of sector {sid} is {len(paux)} bytes, expected 64")
        comm_c, comm_r_last = paux[:32], paux[32:]
        if hash_node(comm_c, comm_r_last) != replica.comm_r:
            raise _Fault(f"comm_r of sector {sid} does not match H(comm_c, comm_r_last)")

        tree_path = os.path.join(replica.cache_dir, TREE_FILE_NAME)
        with _open_input(tree_path, "tree file") as tree:
            size = os.fstat(tree.fileno()).st_size
            rows = next(
                (
                    r
                    for r in range(min(params.height, MAX_ROWS_TO_DISCARD + 1))
                    if size == ((params.nodes >> r) - 1) * NODE_SIZE
                ),
                None,
            )
            if rows is None:
                raise _Fault(f"tree file {tree_path} has {size} bytes: not a tree of this size")
            whole = tree.read() if size <= _SMALL_TREE_FILE else None

            def tree_node(level: int, index: int) -> bytes:
                at = (_level_offset(params.nodes, rows, level) + index) * NODE_SIZE
                if whole is not None:
                    return whole[at : at + NODE_SIZE]
                return _read_exact_at(tree.fileno(), NODE_SIZE, at)

            if tree_node(params.height, 0) != comm_r_last:
                raise _Fault(f"root of {tree_path} does not match comm_r_last in p_aux")

            block_nodes = 1 << (rows + 1)
            proofs = []
            for c in ch.leaf_challenges(params, rand, sid, sector_index):
                start = c & ~(block_nodes - 1)
                raw = _read_exact_at(sealed.fileno(), block_nodes * NODE_SIZE, start * NODE_SIZE)
                block = [raw[i : i + NODE_SIZE] for i in range(0, len(raw), NODE_SIZE)]
                leaf = block[c - start]
                siblings = []
                for level in range(rows + 1):
                    siblings.append(block[((c >> level) ^ 1) - (start >> level)])
                    block = [
                        hash_node(block[2 * i], block[2 * i + 1]) for i in range(len(block) // 2)
                    ]
                cur = block[0]
                for level in range(rows + 1, params.height):
                    sib = tree_node(level, (c >> level) ^ 1)
                    siblings.append(sib)
                    cur = hash_node(sib, cur) if (c >> level) & 1 else hash_node(cur, sib)
                if cur != comm_r_last:
                    raise _Fault(
                        f"challenged node {c} of sector {sid} does not hash up to comm_r_last"
                    )
                proofs.append(ChallengeProof(c, leaf, tuple(siblings)))
    return SectorProof(sid, comm_c, comm_r_last, tuple(proofs))


def sorted_replicas(replicas: list[PoStReplicaInfo]) -> list[PoStReplicaInfo]:
    """Replicas in ascending sector id order (rust-fil-proofs keys them by id); no duplicates."""
    ordered = sorted(replicas, key=lambda r: r.sector_id)
    for a, b in itertools.pairwise(ordered):
        if a.sector_id == b.sector_id:
            raise InvalidTaskError(f"sector {a.sector_id} appears twice in the task")
    return ordered


def window_post(
    task: WindowPoSt, progress: Progress | None = None, cancel: CancelLike | None = None
) -> WindowPoStOutput:
    """Prove a WindowPoSt: one proof per partition, or faults=[...] with no proofs."""
    params = _params(task.proof_type, KIND_WINDOW, "window_post")
    if not task.replicas:
        raise InvalidTaskError("window_post: the task has no replicas")
    replicas = sorted_replicas(task.replicas)
    rand = ch.randomness(task.seed)
    prover = ch.prover_id(task.miner_id)
    entries: list[bytes] = []
    faults: list[int] = []
    total = len(replicas)
    if progress:
        progress("window_post", 0, total)
    for i, replica in enumerate(replicas):
        if cancel is not None and cancel.cancelled:
            raise PoStCancelled(f"cancelled after {i} of {total} sectors")
        try:
            entries.append(encode_sector(prove_sector(params, replica, rand, i)))
        except _Fault as exc:
            faults.append(replica.sector_id)
            if len(faults) <= FAULT_REASONS_LOGGED:  # the answer holds the numbers, not why
                log.warning("window_post: sector %d is faulty: %s", replica.sector_id, exc)
        if progress:
            progress("window_post", i + 1, total)
    if faults:
        if len(faults) > FAULT_REASONS_LOGGED:
            log.warning(
                "window_post: %d more faulty sectors, the first of them %d and the last %d"
                " (their reasons are not logged: a task's first %d only are)",
                len(faults) - FAULT_REASONS_LOGGED,
                faults[FAULT_REASONS_LOGGED],
                faults[-1],
                FAULT_REASONS_LOGGED,
            )
        return WindowPoStOutput(proofs=[], faults=faults)
    spp = params.sectors_per_partition
    proofs = []
    for part in range((total + spp - 1) // spp):
        chunk = entries[part * spp : (part + 1) * spp]
        chunk += [chunk[-1]] * (spp - len(chunk))  # pad like rust-fil-proofs
        proofs.append(encode_header(params, part, rand, prover) + b"".join(chunk))
    return WindowPoStOutput(proofs=proofs, faults=[])


def winning_post(
    task: WinningPoSt, progress: Progress | None = None, cancel: CancelLike | None = None
) -> WinningPoStOutput:
    """Prove a WinningPoSt; the replicas are the eligible set (usually the one chosen sector)."""
    params = _params(task.proof_type, KIND_WINNING, "winning_post")
    if not task.replicas:
        raise InvalidTaskError("winning_post: the task has no replicas")
    rand = ch.randomness(task.seed)
    prover = ch.prover_id(task.miner_id)
    parts = [encode_header(params, 0, rand, prover)]
    if progress:
        progress("winning_post", 0, params.sectors_per_partition)
    for k in range(params.sectors_per_partition):
        if cancel is not None and cancel.cancelled:
            raise PoStCancelled("cancelled")
        replica = task.replicas[ch.winning_sector_choice(prover, rand, k, len(task.replicas))]
        try:
            parts.append(encode_sector(prove_sector(params, replica, rand, k)))
        except _Fault as exc:
            raise SectorFaultError(
                f"sector {replica.sector_id} (chosen from {len(task.replicas)} eligible) is "
                f"faulty: {exc}"
            ) from None
        if progress:
            progress("winning_post", k + 1, params.sectors_per_partition)
    return WinningPoStOutput(proofs=[b"".join(parts)])
