"""The reference prover in C, through the Python ABI, given what a storage provider's disk or a
buggy caller can give it: tasks whose byte fields have the wrong length, files that are not
regular files, cache dirs in the way of the files it writes."""

from __future__ import annotations

import pytest
from helpers.post import sectors

from damocles_ext.post import InvalidTaskError
from damocles_ext.post.fixtures import window_task, winning_task
from damocles_ext.post.native import NativeProver
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt, WinningPoSt

SEED = bytes(range(32))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return sectors(tmp_path_factory.mktemp("s"), "StackedDrgWindow2KiBV1", 3, random_seed=5)


@pytest.mark.parametrize("length", [0, 5, 31, 33])
def test_a_seed_or_comm_r_not_32_bytes_is_a_bad_task_not_memory_read_past_it(manifest, length):
    # msgspec checks a Struct's fields when it decodes one, not when Python builds it; cffi's
    # memmove copies 32 bytes whatever the source holds. A short seed was padded with whatever
    # followed it in memory (two proofs, of another seed), a short comm_r made a good sector a
    # fault, which damocles-manager would declare on chain.
    window = window_task(manifest, SEED)
    winning = winning_task(manifest, SEED)
    short = bytes(length)
    r = window.replicas[0]
    replicas = [PoStReplicaInfo(r.sector_id, short, r.cache_dir, r.sealed_file)]
    bad = [
        (WindowPoSt(window.miner_id, window.proof_type, window.replicas, short), "seed"),
        (WinningPoSt(winning.miner_id, winning.proof_type, winning.replicas, short), "seed"),
        (WindowPoSt(window.miner_id, window.proof_type, replicas, SEED), "comm_r"),
        (WinningPoSt(winning.miner_id, winning.proof_type, replicas, SEED), "comm_r"),
    ]
    with NativeProver() as prover:
        good = prover.window_post(window)
        for task, field in bad:
            with pytest.raises(InvalidTaskError, match=f"{field} must be 32 bytes, got {length}"):
                prover.prove(task)
            with pytest.raises(InvalidTaskError, match=f"{field} must be 32 bytes"):
                prover.verify(task, good)
        with pytest.raises(InvalidTaskError, match="seed must be 32 bytes, got str"):
            prover.prove(WindowPoSt(window.miner_id, window.proof_type, window.replicas, "x" * 32))
