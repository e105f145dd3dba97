"""PoSt challenge derivation, as rust-fil-proofs does it (see ../shared/filecoin-post.md).

Everything here is public and deterministic: the prover and the verifier derive the same values
from the seed, the miner and the sector ids.
"""

from __future__ import annotations

import hashlib
import struct

from .layout import API_V1_2, ProofParams

_U64 = struct.Struct("<Q")


def prover_id(miner_id: int) -> bytes:
    """The miner's ID address payload (unsigned LEB128 of the actor id), zero-padded to 32."""
    out = bytearray()
    while True:
        byte = miner_id & 0x7F
        miner_id >>= 7
        if miner_id:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            break
    return bytes(out).ljust(32, b"\0")


def randomness(seed: bytes) -> bytes:
    """The seed as a field element: the top two bits of byte 31 cleared."""
    return seed[:31] + bytes([seed[31] & 0x3F])


def challenge_index(params: ProofParams, sector_index: int, n: int) -> int:
    """V1_2: `n`; V1: `sector_index * challenges + n` (sector_index counts across partitions)."""
    if params.api_version == API_V1_2:
        return n
    return sector_index * params.challenges + n


def leaf_challenge(rand: bytes, sector_id: int, index: int, nodes: int) -> int:
    """First 8 bytes (LE) of SHA256(randomness ‖ sector_id LE ‖ challenge_index LE), mod nodes."""
    digest = hashlib.sha256(rand + _U64.pack(sector_id) + _U64.pack(index)).digest()
    return _U64.unpack_from(digest)[0] % nodes


def leaf_challenges(
    params: ProofParams, rand: bytes, sector_id: int, sector_index: int
) -> list[int]:
    """The challenged node indices of one sector (`rand` already masked)."""
    return [
        leaf_challenge(rand, sector_id, challenge_index(params, sector_index, n), params.nodes)
        for n in range(params.challenges)
    ]


def winning_sector_choice(prover: bytes, rand: bytes, n: int, eligible: int) -> int:
    """First 8 bytes (LE) of SHA256(prover_id ‖ randomness ‖ n LE), mod the eligible count."""
    digest = hashlib.sha256(prover + rand + _U64.pack(n)).digest()
    return _U64.unpack_from(digest)[0] % eligible
