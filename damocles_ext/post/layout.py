"""Byte layout of a reference PoSt proof, and the proof-type parameters behind it.

One proof per WindowPoSt partition (WinningPoSt: exactly one). All integers little-endian.

Header, 88 bytes::

    off size field
      0    4 magic b"DXPP"
      4    1 layout version (1)
      5    1 PoSt kind: 1 WindowPoSt, 2 WinningPoSt
      6    1 sector size code: 0 2KiB, 1 8MiB, 2 512MiB, 3 32GiB, 4 64GiB
      7    1 API version: 0 V1, 2 V1_2
      8    4 u32 partition index
     12    4 u32 sector entries that follow (sectors per partition; 1 for WinningPoSt)
     16    4 u32 challenges per sector (10 WindowPoSt, 66 WinningPoSt)
     20    1 tree height H = log2(sector size / 32): siblings per inclusion path
     21    3 zero
     24   32 randomness (the seed with seed[31] &= 0x3f)
     56   32 prover_id (unsigned LEB128 of the miner's actor id, zero-padded)

Then one entry per sector, in ascending sector id order (WindowPoSt); a short last partition
repeats its last sector's entry, as rust-fil-proofs pads partitions for the circuit::

      8 u64 sector id
     32 comm_c
     32 comm_r_last (the tree root; comm_r = H(comm_c, comm_r_last))
     then per challenge:
      8 u64 challenged node index
     32 the node (leaf) from the sealed file
     32*H siblings, from the leaf's level up to just below the root

The randomness and prover_id echo the public inputs so a proof cannot be replayed for another
seed or miner, the way a SNARK binds its public inputs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..tasks import (
    SECTOR_SIZE_BYTES,
    SECTOR_SIZES,
    SECTORS_PER_PARTITION,
    WINDOW_CHALLENGES_PER_SECTOR,
    WINDOW_PROOF_TYPES,
    WINNING_CHALLENGES_PER_SECTOR,
    WINNING_PROOF_TYPES,
    WINNING_SECTOR_COUNT,
)

NODE_SIZE = 32
MAGIC = b"DXPP"
LAYOUT_VERSION = 1
KIND_WINDOW = 1
KIND_WINNING = 2
API_V1 = 0
API_V1_2 = 2

HEADER = struct.Struct("<4sBBBBIIIB3x32s32s")
HEADER_SIZE = HEADER.size  # 88
SECTOR_HEAD = struct.Struct("<Q32s32s")  # sector id, comm_c, comm_r_last

assert HEADER_SIZE == 88


@dataclass(frozen=True, slots=True)
class ProofParams:
    """What a proof type string implies for proving and for the proof layout."""

    proof_type: str
    kind: int  # KIND_WINDOW or KIND_WINNING
    size_code: int
    api_version: int
    nodes: int  # sector size / 32
    height: int  # log2(nodes)
    sectors_per_partition: int
    challenges: int  # per sector

    @property
    def sector_size(self) -> int:
        """The sector size in bytes."""
        return self.nodes * NODE_SIZE

    @property
    def entry_size(self) -> int:
        """Bytes of one sector entry."""
        return SECTOR_HEAD.size + self.challenges * (8 + NODE_SIZE * (1 + self.height))

    @property
    def proof_size(self) -> int:
        """Bytes of one proof (one partition)."""
        return HEADER_SIZE + self.sectors_per_partition * self.entry_size


def proof_params(proof_type: str) -> ProofParams:
    """Parameters of a proof type; ValueError for an unknown one."""
    if proof_type in WINDOW_PROOF_TYPES:
        kind = KIND_WINDOW
    elif proof_type in WINNING_PROOF_TYPES:
        kind = KIND_WINNING
    else:
        raise ValueError(f"unknown proof type {proof_type!r}")
    size = next(s for s in SECTOR_SIZES if s in proof_type)
    nodes = SECTOR_SIZE_BYTES[size] // NODE_SIZE
    window = kind == KIND_WINDOW
    return ProofParams(
        proof_type=proof_type,
        kind=kind,
        size_code=SECTOR_SIZES.index(size),
        api_version=API_V1_2 if proof_type.endswith("V1_2") else API_V1,
        nodes=nodes,
        height=nodes.bit_length() - 1,
        sectors_per_partition=SECTORS_PER_PARTITION[size] if window else WINNING_SECTOR_COUNT,
        challenges=WINDOW_CHALLENGES_PER_SECTOR if window else WINNING_CHALLENGES_PER_SECTOR,
    )


def encode_header(
    params: ProofParams, partition: int, randomness: bytes, prover_id: bytes
) -> bytes:
    """The 88-byte header of one proof."""
    return HEADER.pack(
        MAGIC,
        LAYOUT_VERSION,
        params.kind,
        params.size_code,
        params.api_version,
        partition,
        params.sectors_per_partition,
        params.challenges,
        params.height,
        randomness,
        prover_id,
    )


@dataclass(frozen=True, slots=True)
class ChallengeProof:
    node_index: int
    leaf: bytes
    siblings: tuple[bytes, ...]  # bottom-up, `height` of them


@dataclass(frozen=True, slots=True)
class SectorProof:
    sector_id: int
    comm_c: bytes
    comm_r_last: bytes
    challenges: tuple[ChallengeProof, ...]


def encode_sector(proof: SectorProof) -> bytes:
    """One sector entry."""
    parts = [SECTOR_HEAD.pack(proof.sector_id, proof.comm_c, proof.comm_r_last)]
    for ch in proof.challenges:
        parts.append(struct.pack("<Q", ch.node_index))
        parts.append(ch.leaf)
        parts.extend(ch.siblings)
    return b"".join(parts)


def decode_sector(params: ProofParams, entry: bytes) -> SectorProof:
    """Split one sector entry (exactly `params.entry_size` bytes) into its fields."""
    if len(entry) != params.entry_size:
        raise ValueError(f"sector entry is {len(entry)} bytes, expected {params.entry_size}")
    sector_id, comm_c, comm_r_last = SECTOR_HEAD.unpack_from(entry)
    challenges = []
    at = SECTOR_HEAD.size
    for _ in range(params.challenges):
        (index,) = struct.unpack_from("<Q", entry, at)
        leaf = entry[at + 8 : at + 8 + NODE_SIZE]
        at += 8 + NODE_SIZE
        siblings = tuple(
            entry[at + i * NODE_SIZE : at + (i + 1) * NODE_SIZE] for i in range(params.height)
        )
        at += params.height * NODE_SIZE
        challenges.append(ChallengeProof(index, leaf, siblings))
    return SectorProof(sector_id, comm_c, comm_r_last, tuple(challenges))


def sector_entries(params: ProofParams, proof: bytes) -> list[bytes]:
    """The raw sector entries of one proof whose length was already checked."""
    size = params.entry_size
    return [
        proof[HEADER_SIZE + i * size : HEADER_SIZE + (i + 1) * size]
        for i in range(params.sectors_per_partition)
    ]
