"""Damaged sectors become faults (WindowPoSt) or a SectorFaultError (WinningPoSt), in C and in
Python alike, and proving really reads the replica."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import msgspec
import pytest

from damocles_ext.post import InvalidTaskError, SectorFaultError, challenges, reference
from damocles_ext.post.fixtures import create_sectors, load_manifest, window_task, winning_task
from damocles_ext.post.layout import proof_params
from damocles_ext.post.native import NativeProver
from damocles_ext.post.verify import verify
from damocles_ext.tasks import PoStReplicaInfo, WinningPoSt

TREE = "sc-02-data-tree-r-last.dat"
SEED = bytes(range(32))


@pytest.fixture(params=["native", "python"])
def prover(request):
    if request.param == "python":
        yield reference
    else:
        with NativeProver() as p:
            yield p


@pytest.fixture
def manifest(tmp_path):
    return load_manifest(
        create_sectors(tmp_path, "StackedDrgWindow2KiBV1_2", 4, 1000, random_seed=5)
    )


def victim(manifest):
    rep = manifest.replicas[1]
    return rep.sector_id, Path(rep.sealed_file), Path(rep.cache_dir)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(data)


def challenged_nodes(manifest, sector_id):
    params = proof_params("StackedDrgWindow2KiBV1_2")
    return challenges.leaf_challenges(params, challenges.randomness(SEED), sector_id, 0)


def damage_missing_sealed(m):
    victim(m)[1].unlink()


def damage_short_sealed(m):
    path = victim(m)[1]
    path.write_bytes(path.read_bytes()[:1000])


def damage_long_sealed(m):
    with open(victim(m)[1], "ab") as f:
        f.write(b"\0" * 32)


def damage_unreadable_sealed(m):
    path = victim(m)[1]
    path.unlink()
    path.mkdir()  # opens, but cannot be read (root ignores permission bits, not this)


def damage_challenged_node(m):
    sid, sealed, _ = victim(m)
    flip_byte(sealed, challenged_nodes(m, sid)[0] * 32 + 3)


def damage_discarded_row_neighbour(m):
    # A node that is not challenged but shares the challenged node's 8-node block: it feeds the
    # rows that proving recomputes from the replica.
    sid, sealed, _ = victim(m)
    c = challenged_nodes(m, sid)[0]
    flip_byte(sealed, (c ^ 5) * 32)


def damage_missing_paux(m):
    (victim(m)[2] / "p_aux").unlink()


def damage_short_paux(m):
    path = victim(m)[2] / "p_aux"
    path.write_bytes(path.read_bytes()[:63])


def damage_corrupt_comm_c(m):
    flip_byte(victim(m)[2] / "p_aux", 0)


def damage_corrupt_comm_r_last(m):
    flip_byte(victim(m)[2] / "p_aux", 40)


def damage_missing_tree(m):
    (victim(m)[2] / TREE).unlink()


def damage_truncated_tree(m):
    path = victim(m)[2] / TREE
    path.write_bytes(path.read_bytes()[:-32])


def damage_corrupt_tree_root(m):
    path = victim(m)[2] / TREE
    flip_byte(path, path.stat().st_size - 1)


def damage_corrupt_tree_every_stored_node_below_root(m):
    # The first stored level (rows_to_discard + 1) is on every inclusion path.
    path = victim(m)[2] / TREE
    for offset in range(0, 8 * 32, 32):
        flip_byte(path, offset)


def damage_swapped_cache_dirs(m):
    _, _, cache = victim(m)
    other = Path(m.replicas[2].cache_dir)
    tmp = cache.with_name("tmp")
    cache.rename(tmp)
    other.rename(cache)
    tmp.rename(other)


DAMAGES = [v for k, v in dict(globals()).items() if k.startswith("damage_")]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.removeprefix("damage_"))
def test_damaged_sector_is_reported_as_a_fault_with_no_proofs(prover, manifest, damage):
    damage(manifest)
    out = prover.window_post(window_task(manifest, SEED))
    expected = [victim(manifest)[0]]
    if damage is damage_swapped_cache_dirs:
        expected = sorted([victim(manifest)[0], manifest.replicas[2].sector_id])
    assert out.faults == expected
    assert out.proofs == []


def test_wrong_comm_r_in_the_task_is_a_fault(prover, manifest):
    task = window_task(manifest, SEED)
    replicas = list(task.replicas)
    replicas[3] = msgspec.structs.replace(replicas[3], comm_r=bytes(32))
    out = prover.window_post(msgspec.structs.replace(task, replicas=replicas))
    assert out.faults == [replicas[3].sector_id]


def test_a_tasks_first_20_faulty_sectors_are_said_with_their_reason_and_the_rest_counted(
    prover, manifest, caplog, capfd
):
    # A lost mount: thousands of faults for one reason. The answer holds the numbers only; the
    # log gets the first 20 reasons and one line for the rest, not a line per sector (a child's
    # relayed stderr is capped: that flood would drop the lines that matter).
    caplog.set_level(logging.WARNING, "damocles_ext.post")
    lost = [PoStReplicaInfo(100 + i, bytes(32), "/nonexistent/c", "/nonexistent/s") for i in range(25)]  # fmt: skip
    out = prover.window_post(msgspec.structs.replace(window_task(manifest, SEED), replicas=lost))
    assert out.faults == list(range(100, 125)) and out.proofs == []
    # python-ref logs them (the child's log); the C library writes them on stderr.
    said = caplog.messages if prover is reference else capfd.readouterr().err.splitlines()
    assert len(said) == 21, said
    for sector, line in zip(range(100, 120), said, strict=False):
        assert f"sector {sector} is faulty: cannot open sealed file /nonexistent/s:" in line
    assert "window_post: 5 more faulty sectors, the first of them 120 and the last 124" in said[20]


def test_every_damaged_sector_is_listed_in_ascending_order(prover, manifest):
    for rep in (manifest.replicas[3], manifest.replicas[0]):
        os.unlink(rep.sealed_file)
    task = window_task(manifest, SEED, sector_ids=[r.sector_id for r in manifest.replicas][::-1])
    out = prover.window_post(task)
    assert out.faults == [manifest.replicas[0].sector_id, manifest.replicas[3].sector_id]


def test_damage_away_from_the_challenged_blocks_does_not_stop_a_proof(prover, manifest):
    # Proving reads the challenged 8-node blocks of the replica, not the whole file.
    sid, sealed, _ = victim(manifest)
    blocks = {c // 8 for c in challenged_nodes(manifest, sid)}
    untouched = next(b for b in range(8) if b not in blocks)
    flip_byte(sealed, untouched * 8 * 32)
    task = window_task(manifest, SEED)
    out = prover.window_post(task)
    assert out.faults == []
    verify(task, out)


def test_winning_post_of_a_damaged_chosen_sector_fails_naming_it(prover, manifest):
    task = winning_task(manifest, SEED, sector_ids=[victim(manifest)[0]])
    damage_challenged_node(manifest)
    with pytest.raises(SectorFaultError, match=f"sector {victim(manifest)[0]}.*faulty"):
        prover.winning_post(task)


def test_bad_tasks_are_rejected_before_any_proving(prover, manifest):
    task = window_task(manifest, SEED)
    dup = msgspec.structs.replace(task, replicas=task.replicas + task.replicas[:1])
    with pytest.raises(InvalidTaskError, match="twice"):
        prover.window_post(dup)
    with pytest.raises(InvalidTaskError, match="no replicas"):
        prover.window_post(msgspec.structs.replace(task, replicas=[]))
    # msgspec checks the proof type when decoding; a task built in memory is not checked
    window_type = WinningPoSt(task.miner_id, "StackedDrgWindow2KiBV1_2", task.replicas, task.seed)
    with pytest.raises(InvalidTaskError, match="proof type"):
        prover.winning_post(window_type)


def test_proving_with_a_wider_rows_to_discard_still_reads_the_replica(prover, tmp_path):
    m = load_manifest(
        create_sectors(tmp_path, "StackedDrgWindow2KiBV1", 2, 9, rows_to_discard=5, random_seed=1)
    )
    task = window_task(m, SEED)
    verify(task, prover.window_post(task))
    # with 5 of 6 rows discarded the tree file holds the root only; the replica gives the rest
    assert os.path.getsize(Path(m.replicas[0].cache_dir) / TREE) == 32
    shutil.copy(m.replicas[1].sealed_file, m.replicas[0].sealed_file)
    assert prover.window_post(task).faults == [m.replicas[0].sector_id]
