"""The C prover and the Python reference produce identical bytes: trees, proofs and faults."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from damocles_ext.post import reference
from damocles_ext.post.fixtures import create_sectors, load_manifest, window_task, winning_task
from damocles_ext.post.native import NativeProver
from damocles_ext.post.verify import verify
from damocles_ext.tasks import PoStReplicaInfo

TREE = "sc-02-data-tree-r-last.dat"
WINDOW_2KIB = ("StackedDrgWindow2KiBV1", "StackedDrgWindow2KiBV1_2")


@pytest.fixture(scope="module")
def native():
    with NativeProver() as prover:
        yield prover


def corrupt(rng: random.Random, replica: PoStReplicaInfo) -> None:
    """Damage one sector in one of the ways a disk or a bad copy does."""
    sealed, cache = Path(replica.sealed_file), Path(replica.cache_dir)
    kind = rng.choice(
        ["sealed-byte", "sealed-short", "sealed-missing", "paux-byte", "tree-byte", "tree-missing"]
    )
    if kind == "sealed-byte":
        data = bytearray(sealed.read_bytes())
        # hit every node so whichever one is challenged is wrong
        for i in range(0, len(data), 32):
            data[i] ^= 1
        sealed.write_bytes(data)
    elif kind == "sealed-short":
        sealed.write_bytes(sealed.read_bytes()[:-32])
    elif kind == "sealed-missing":
        sealed.unlink()
    elif kind == "paux-byte":
        data = bytearray((cache / "p_aux").read_bytes())
        data[rng.randrange(64)] ^= 1 << rng.randrange(8)
        (cache / "p_aux").write_bytes(data)
    elif kind == "tree-byte":
        data = bytearray((cache / TREE).read_bytes())
        data[-32 + rng.randrange(32)] ^= 1 << rng.randrange(8)  # the root
        (cache / TREE).write_bytes(data)
    else:
        (cache / TREE).unlink()


def test_c_and_python_agree_on_random_tasks(tmp_path, native):
    rng = random.Random(20240601)
    for case in range(30):
        rows = rng.randrange(0, 6)
        miner = rng.choice([0, 1, 1000, rng.randrange(2**40), 2**64 - 1])
        count = rng.randrange(1, 7)
        first = rng.randrange(2**50)
        manifest = load_manifest(
            create_sectors(
                tmp_path / f"c{case}",
                rng.choice(WINDOW_2KIB),
                count,
                miner,
                rows_to_discard=rows,
                first_sector_id=first,
                random_seed=case,
            )
        )
        ids = [r.sector_id for r in manifest.replicas]
        rng.shuffle(ids)
        ids = ids[: rng.randrange(1, count + 1)]
        seed = rng.randbytes(32)
        faulty = set()
        if rng.random() < 0.4:
            victim = rng.choice(manifest.replicas)
            corrupt(
                rng, PoStReplicaInfo(victim.sector_id, b"", victim.cache_dir, victim.sealed_file)
            )
            faulty.add(victim.sector_id)

        wtask = window_task(manifest, seed, proof_type=rng.choice(WINDOW_2KIB), sector_ids=ids)
        c_out, py_out = native.window_post(wtask), reference.window_post(wtask)
        assert c_out == py_out, f"case {case}"
        assert c_out.faults == sorted(faulty & set(ids))
        if not c_out.faults:
            verify(wtask, c_out)
            native.verify(wtask, c_out)

        ptask = winning_task(manifest, seed, sector_ids=ids)
        try:
            c_win = native.winning_post(ptask)
        except Exception as exc:  # noqa: BLE001 - compared with the Python side below
            with pytest.raises(type(exc)):
                reference.winning_post(ptask)
        else:
            assert c_win == reference.winning_post(ptask), f"case {case}"
            verify(ptask, c_win)


@pytest.mark.parametrize("rows", [0, 2, 5])
def test_c_and_python_write_identical_tree_files(tmp_path, native, rows):
    manifest = load_manifest(
        create_sectors(
            tmp_path / "s",
            "StackedDrgWindow2KiBV1_2",
            1,
            1000,
            rows_to_discard=rows,
            random_seed=rows,
        )
    )
    rep = manifest.replicas[0]
    comm_c = (Path(rep.cache_dir) / "p_aux").read_bytes()[:32]
    comm_r = reference.build_tree(
        manifest.proof_type, rep.sealed_file, tmp_path / "py", comm_c, rows_to_discard=rows
    )
    assert comm_r.hex() == rep.comm_r
    for name in (TREE, "p_aux"):
        assert (tmp_path / "py" / name).read_bytes() == (Path(rep.cache_dir) / name).read_bytes()
    # levels rows+1..6 of a 64-node tree: (64 >> rows) - 1 nodes
    assert os.path.getsize(tmp_path / "py" / TREE) == ((64 >> rows) - 1) * 32


def test_c_and_python_agree_on_an_8mib_sector_built_in_several_chunks(tmp_path, native):
    # 8MiB = 262144 nodes: the C builder streams 32768-node chunks, Python builds in one go.
    manifest = load_manifest(
        create_sectors(tmp_path / "s", "StackedDrgWindow8MiBV1", 1, 77, random_seed=8)
    )
    rep = manifest.replicas[0]
    comm_c = (Path(rep.cache_dir) / "p_aux").read_bytes()[:32]
    assert (
        reference.build_tree(manifest.proof_type, rep.sealed_file, tmp_path / "py", comm_c).hex()
        == rep.comm_r
    )
    assert (tmp_path / "py" / TREE).read_bytes() == (Path(rep.cache_dir) / TREE).read_bytes()
    task = window_task(manifest, bytes(range(32)))
    assert native.window_post(task) == reference.window_post(task)
    win = winning_task(manifest, bytes(range(32)))
    assert native.winning_post(win) == reference.winning_post(win)
