"""Both verifiers accept real proofs and reject any change to a proof or to its public inputs."""

from __future__ import annotations

import random

import msgspec
import pytest

from damocles_ext.post import VerifyError
from damocles_ext.post import challenges as ch
from damocles_ext.post.errors import InvalidTaskError
from damocles_ext.post.fixtures import create_sectors, load_manifest, window_task, winning_task
from damocles_ext.post.native import NativeProver
from damocles_ext.post.verify import verify as python_verify
from damocles_ext.tasks import (
    WindowPoStOutput,
    WindowPoStVanillaOutput,
    WinningPoStOutput,
    split_window_post,
)

HEADER_BITS = 88 * 8


@pytest.fixture(scope="module")
def native():
    with NativeProver() as prover:
        yield prover


@pytest.fixture(scope="module", params=["python", "native"])
def verifier(request, native):
    return python_verify if request.param == "python" else native.verify


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    # ids far apart so that flipping one bit of one never collides with another
    base = tmp_path_factory.mktemp("s")
    parts = [
        load_manifest(
            create_sectors(
                base / str(i),
                "StackedDrgWindow2KiBV1",
                1,
                1000,
                first_sector_id=first,
                random_seed=11 + i,
            )
        )
        for i, first in enumerate([1 << 40, (1 << 41) + 5, (1 << 42) + 9])
    ]
    return msgspec.structs.replace(parts[0], replicas=[p.replicas[0] for p in parts])


@pytest.fixture(scope="module")
def window(manifest, native):
    task = window_task(manifest, bytes(range(32)))  # V1: sector index matters
    return task, native.window_post(task)


@pytest.fixture(scope="module")
def winning(manifest, native):
    task = winning_task(manifest, bytes(range(1, 33)))
    return task, native.winning_post(task)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def with_proof(output, index: int, proof: bytes):
    proofs = list(output.proofs)
    proofs[index] = proof
    return msgspec.structs.replace(output, proofs=proofs)


def sampled_bits(size: int, rng: random.Random) -> list[int]:
    """Every header bit, then one random bit in every 4th byte after it."""
    return list(range(HEADER_BITS)) + [
        byte * 8 + rng.randrange(8) for byte in range(88 + rng.randrange(4), size, 4)
    ]


def test_real_proofs_verify(verifier, window, winning):
    for task, output in (window, winning):
        verifier(task, output)
    assert len(window[1].proofs) == 2  # 3 sectors in partitions of 2: the last one padded


@pytest.mark.parametrize("which", ["window-first", "window-padded", "winning"])
def test_flipped_proof_bits_are_rejected(verifier, window, winning, which):
    task, output = winning if which == "winning" else window
    index = 1 if which == "window-padded" else 0
    proof = output.proofs[index]
    rng = random.Random(which)
    bits = sampled_bits(len(proof), rng)
    if verifier is python_verify:
        bits = bits[:HEADER_BITS] + rng.sample(bits[HEADER_BITS:], 400)
    for bit in bits:
        with pytest.raises(VerifyError):
            verifier(task, with_proof(output, index, flip(proof, bit)))


@pytest.mark.slow
def test_native_verifier_rejects_every_single_bit_flip_of_a_padded_partition(native, window):
    task, output = window
    proof = output.proofs[1]  # sector 3 and its padding copy
    for bit in range(len(proof) * 8):
        with pytest.raises(VerifyError):
            native.verify(task, with_proof(output, 1, flip(proof, bit)))


def test_seed_flips_are_rejected_except_the_two_bits_a_field_element_drops(verifier, window):
    task, output = window
    for bit in range(256):
        changed = msgspec.structs.replace(task, seed=flip(task.seed, bit))
        if bit in (31 * 8 + 6, 31 * 8 + 7):
            verifier(changed, output)  # seed[31] &= 0x3f: the same randomness
        else:
            with pytest.raises(VerifyError, match=r"seed|challenge"):
                verifier(changed, output)


def test_miner_flips_are_rejected(verifier, window, winning):
    for task, output in (window, winning):
        for bit in range(64):
            with pytest.raises(VerifyError):
                verifier(msgspec.structs.replace(task, miner_id=task.miner_id ^ (1 << bit)), output)


def replica_changes(replica):
    yield from (
        msgspec.structs.replace(replica, comm_r=flip(replica.comm_r, bit)) for bit in range(256)
    )
    yield from (
        msgspec.structs.replace(replica, sector_id=replica.sector_id ^ (1 << bit))
        for bit in range(64)
    )


def with_replica(task, i, replica):
    replicas = list(task.replicas)
    replicas[i] = replica
    return msgspec.structs.replace(task, replicas=replicas)


def test_window_comm_r_and_sector_id_flips_are_rejected(verifier, window):
    task, output = window
    for i, replica in enumerate(task.replicas):
        for changed in replica_changes(replica):
            with pytest.raises(VerifyError):
                verifier(with_replica(task, i, changed), output)


def test_winning_proof_binds_the_chosen_sector_and_only_it(verifier, winning):
    task, output = winning
    rand, prover = ch.randomness(task.seed), ch.prover_id(task.miner_id)
    chosen = ch.winning_sector_choice(prover, rand, 0, len(task.replicas))
    for i, replica in enumerate(task.replicas):
        for changed in replica_changes(replica):
            if i == chosen:
                with pytest.raises(VerifyError):
                    verifier(with_replica(task, i, changed), output)
            else:
                verifier(with_replica(task, i, changed), output)


def test_other_proof_type_and_stage_are_rejected(verifier, window):
    task, output = window
    with pytest.raises(VerifyError):
        verifier(msgspec.structs.replace(task, proof_type="StackedDrgWindow2KiBV1_2"), output)


def test_a_split_step_is_refused_as_not_a_proof_on_its_own(verifier, window):
    task, output = window
    vanilla = split_window_post(task)
    answer = WindowPoStVanillaOutput(vanilla_proofs=output.proofs, faults=[])
    with pytest.raises(
        InvalidTaskError, match="window_post_vanilla step is a part of a WindowPoSt"
    ):
        verifier(vanilla, answer)


def test_the_native_prover_refuses_a_split_step_with_the_reason(native, window):
    task, _ = window
    with pytest.raises(InvalidTaskError, match="split WindowPoSt step"):
        native.prove(split_window_post(task))


def test_wrong_number_or_length_of_proofs_is_rejected(verifier, window, winning):
    task, output = window
    for proofs in (
        [output.proofs[0]],
        output.proofs + output.proofs[:1],
        [],
        [output.proofs[0], output.proofs[1][:-1]],
        [output.proofs[0], output.proofs[1] + b"\0"],
        [output.proofs[1], output.proofs[0]],
    ):
        with pytest.raises(VerifyError):
            verifier(task, WindowPoStOutput(proofs=proofs, faults=[]))
    wtask, wout = winning
    with pytest.raises(VerifyError):
        verifier(wtask, WinningPoStOutput(proofs=wout.proofs * 2))


def test_an_output_with_faults_is_not_a_valid_proof(verifier, window):
    task, _ = window
    with pytest.raises(VerifyError, match="faulty sectors"):
        verifier(task, WindowPoStOutput(proofs=[], faults=[task.replicas[0].sector_id]))
