"""Challenge values in real proofs, checked against the formulas of ../shared/filecoin-post.md
written out again here with hashlib and struct (independently of damocles_ext.post)."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damocles_ext.post import challenges, reference
from damocles_ext.post.fixtures import create_sectors, load_manifest, window_task, winning_task
from damocles_ext.post.native import NativeProver

NODES_2KIB = 2048 // 32
HEADER = 88
ENTRY_HEAD = 8 + 32 + 32
HEIGHT_2KIB = 6


def field_seed(seed: bytes) -> bytes:
    return seed[:31] + bytes([seed[31] & 0x3F])


def formula_leaf(seed: bytes, sector_id: int, challenge_index: int, nodes: int) -> int:
    digest = hashlib.sha256(field_seed(seed) + struct.pack("<QQ", sector_id, challenge_index))
    return struct.unpack("<Q", digest.digest()[:8])[0] % nodes


def formula_winning_choice(miner_leb128: bytes, seed: bytes, n: int, eligible: int) -> int:
    prover_id = miner_leb128 + bytes(32 - len(miner_leb128))
    digest = hashlib.sha256(prover_id + field_seed(seed) + struct.pack("<Q", n)).digest()
    return struct.unpack("<Q", digest[:8])[0] % eligible


def proven_nodes(proof: bytes, slot: int, challenges_per_sector: int) -> tuple[int, list[int]]:
    """(sector id, challenged node indices) of one sector entry, read at the documented offsets."""
    per_challenge = 8 + 32 + 32 * HEIGHT_2KIB
    entry = ENTRY_HEAD + challenges_per_sector * per_challenge
    at = HEADER + slot * entry
    (sector_id,) = struct.unpack_from("<Q", proof, at)
    nodes = [
        struct.unpack_from("<Q", proof, at + ENTRY_HEAD + n * per_challenge)[0]
        for n in range(challenges_per_sector)
    ]
    return sector_id, nodes


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = create_sectors(
        tmp_path_factory.mktemp("sectors"),
        "StackedDrgWindow2KiBV1",
        5,
        1000,
        first_sector_id=40,
        random_seed=7,
    )
    return load_manifest(path)


@pytest.mark.parametrize(
    ("miner", "payload"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (1000, b"\xe8\x07"),
        (16384, b"\x80\x80\x01"),
        (2**64 - 1, b"\xff" * 9 + b"\x01"),
    ],
)
def test_prover_id_is_leb128_of_the_actor_id_zero_padded(miner, payload):
    assert challenges.prover_id(miner) == payload + bytes(32 - len(payload))


@pytest.mark.parametrize("prover", ["native", "python"])
def test_v1_challenge_index_counts_sectors_across_partitions(manifest, prover):
    seed = bytes(random.Random(1).randbytes(31)) + b"\xff"  # top bits set: must be cleared
    task = window_task(manifest, seed, proof_type="StackedDrgWindow2KiBV1")
    out = (NativeProver() if prover == "native" else reference).window_post(task)
    assert len(out.proofs) == 3  # 5 sectors, 2 per partition
    for sector_index, replica in enumerate(sorted(task.replicas, key=lambda r: r.sector_id)):
        part, slot = divmod(sector_index, 2)
        sector_id, nodes = proven_nodes(out.proofs[part], slot, 10)
        assert sector_id == replica.sector_id
        assert nodes == [
            formula_leaf(seed, sector_id, sector_index * 10 + n, NODES_2KIB) for n in range(10)
        ]
    # the short last partition repeats sector index 4 with its own challenges
    assert proven_nodes(out.proofs[2], 1, 10) == proven_nodes(out.proofs[2], 0, 10)


@pytest.mark.parametrize("prover", ["native", "python"])
def test_v1_2_challenge_index_is_the_challenge_number(manifest, prover):
    seed = bytes(range(32))
    task = window_task(manifest, seed, proof_type="StackedDrgWindow2KiBV1_2")
    out = (NativeProver() if prover == "native" else reference).window_post(task)
    for sector_index in range(len(task.replicas)):
        part, slot = divmod(sector_index, 2)
        sector_id, nodes = proven_nodes(out.proofs[part], slot, 10)
        assert nodes == [formula_leaf(seed, sector_id, n, NODES_2KIB) for n in range(10)]


@pytest.mark.parametrize("prover", ["native", "python"])
@pytest.mark.parametrize("seed_byte", [0, 3, 9, 200])
def test_winning_post_proves_the_formula_chosen_sector_with_66_challenges(
    manifest, prover, seed_byte
):
    seed = bytes([seed_byte]) * 32
    task = winning_task(manifest, seed)
    assert task.proof_type == "StackedDrgWinning2KiBV1"
    out = (NativeProver() if prover == "native" else reference).winning_post(task)
    chosen = formula_winning_choice(b"\xe8\x07", seed, 0, len(task.replicas))
    sector_id, nodes = proven_nodes(out.proofs[0], 0, 66)
    assert sector_id == task.replicas[chosen].sector_id
    assert nodes == [formula_leaf(seed, sector_id, n, NODES_2KIB) for n in range(66)]


def test_winning_choice_indexes_the_eligible_list_in_the_given_order(manifest):
    seed = bytes([5]) * 32
    forward = winning_task(manifest, seed)
    backward = winning_task(
        manifest, seed, sector_ids=[r.sector_id for r in forward.replicas][::-1]
    )
    chosen = formula_winning_choice(b"\xe8\x07", seed, 0, 5)
    assert (
        proven_nodes(NativeProver().winning_post(forward).proofs[0], 0, 66)[0]
        == forward.replicas[chosen].sector_id
    )
    assert (
        proven_nodes(NativeProver().winning_post(backward).proofs[0], 0, 66)[0]
        == backward.replicas[chosen].sector_id
    )


def test_window_post_orders_sectors_by_id_whatever_the_task_order(manifest):
    seed = bytes(32)
    ids = [r.sector_id for r in manifest.replicas]
    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != ids
    a = NativeProver().window_post(window_task(manifest, seed, sector_ids=ids))
    b = NativeProver().window_post(window_task(manifest, seed, sector_ids=shuffled))
    assert a == b


@settings(max_examples=200, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    sector_id=st.integers(0, 2**64 - 1),
    index=st.integers(0, 2**64 - 1),
    height=st.integers(1, 31),
)
def test_python_leaf_challenge_matches_the_formula(seed, sector_id, index, height):
    rand = challenges.randomness(seed)
    assert challenges.leaf_challenge(rand, sector_id, index, 1 << height) == formula_leaf(
        seed, sector_id, index, 1 << height
    )


@settings(max_examples=200, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32), eligible=st.integers(1, 10**6), n=st.integers(0, 3)
)
def test_python_winning_choice_matches_the_formula(seed, eligible, n):
    choice = challenges.winning_sector_choice(
        challenges.prover_id(1000), challenges.randomness(seed), n, eligible
    )
    assert choice == formula_winning_choice(b"\xe8\x07", seed, n, eligible)
