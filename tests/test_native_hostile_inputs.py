"""The reference prover in C, through the Python ABI, given what a storage provider's disk or a
buggy caller can give it: tasks whose byte fields have the wrong length, files that are not
regular files, cache dirs in the way of the files it writes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.lease import run_holding_a_lease
from helpers.post import sectors

from damocles_ext.errors import ProverError
from damocles_ext.post import InvalidTaskError
from damocles_ext.post.fixtures import create_sectors, load_manifest, window_task, winning_task
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
        # Any buffer of 32 bytes is one, as the supervisor's own check takes it.
        r = window.replicas[0]
        viewed = [PoStReplicaInfo(r.sector_id, memoryview(r.comm_r), r.cache_dir, r.sealed_file)]
        task = WindowPoSt(window.miner_id, window.proof_type, viewed, memoryview(SEED))
        assert prover.prove(task).proofs


@pytest.mark.parametrize("value", [-1, 2**64, 2**70, "7"])
def test_a_miner_or_sector_id_no_uint64_holds_is_a_bad_task_naming_it(manifest, value):
    # cffi refused it with its own OverflowError ("int too big to convert"): no field named,
    # and not an InvalidTaskError, so the caller could not tell a bad task from a broken prover.
    window = window_task(manifest, SEED)
    winning = winning_task(manifest, SEED)
    r = window.replicas[0]
    replicas = [PoStReplicaInfo(value, r.comm_r, r.cache_dir, r.sealed_file)]
    bad = [
        (WindowPoSt(value, window.proof_type, window.replicas, SEED), "miner_id"),
        (WinningPoSt(value, winning.proof_type, winning.replicas, SEED), "miner_id"),
        (WindowPoSt(window.miner_id, window.proof_type, replicas, SEED), "replica 0: sector_id"),
    ]
    with NativeProver() as prover:
        good = prover.window_post(window)
        for task, field in bad:
            with pytest.raises(InvalidTaskError, match=f"^{field} "):
                prover.prove(task)
            with pytest.raises(InvalidTaskError, match=f"^{field} "):
                prover.verify(task, good)
        assert prover.window_post(window) == good  # the prover goes on


# Run in a child: before the fix the prover blocked in open() for ever, and a test in this
# process would have hung with it.
FIFO_PROOFS = r"""
import os, sys
from damocles_ext.post import SectorFaultError
from damocles_ext.post.fixtures import load_manifest, window_task, winning_task
from damocles_ext.post.native import NativeProver

manifest = load_manifest(sys.argv[1])
target = sys.argv[2]
seed = bytes(range(32))
for rep in manifest.replicas:
    path = {"sealed": rep.sealed_file, "p_aux": os.path.join(rep.cache_dir, "p_aux"),
            "tree": os.path.join(rep.cache_dir, "sc-02-data-tree-r-last.dat")}[target]
    os.unlink(path)
    os.mkfifo(path)
if len(sys.argv) > 4:  # the Python reference prover
    from damocles_ext.post import reference
    out = reference.window_post(window_task(manifest, seed))
    print("window faults", out.faults, "proofs", len(out.proofs))
    sys.exit(0)
with NativeProver() as prover:
    out = prover.window_post(window_task(manifest, seed))
    print("window faults", out.faults, "proofs", len(out.proofs))
    try:
        prover.winning_post(winning_task(manifest, seed))
    except SectorFaultError as exc:
        print("winning", exc)
    if target == "sealed":
        try:
            prover.build_tree(manifest.proof_type, manifest.replicas[0].sealed_file,
                              sys.argv[3], bytes(32))
        except SectorFaultError as exc:
            print("build_tree", exc)
"""


@pytest.mark.parametrize("prover", ["native", "python"])
@pytest.mark.parametrize("target", ["sealed", "p_aux", "tree"])
def test_a_fifo_in_place_of_a_sectors_file_is_a_fault_not_a_prover_blocked_for_ever(
    tmp_path, target, prover
):
    # A FIFO with no writer blocks open() until one comes: the prover was stuck before reading
    # any cancel flag, for ever, and the whole partition's proof was lost with it.
    manifest = create_sectors(tmp_path / "s", "StackedDrgWindow2KiBV1", 3, 1000, random_seed=5)
    argv = [sys.executable, "-c", FIFO_PROOFS, str(manifest), target, str(tmp_path / "built")]
    run = subprocess.run(
        argv + (["python"] if prover == "python" else []),
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "window faults [1, 2, 3] proofs 0", run.stdout
    if prover == "python":
        return
    assert lines[1].startswith("winning winning_post: sector "), run.stdout
    if target == "sealed":
        assert "is not a regular file" in lines[1], run.stdout
        assert lines[2].startswith("build_tree build_tree: sealed file "), run.stdout
        assert lines[2].endswith("is not a regular file"), run.stdout


@pytest.mark.parametrize("name", ["sc-02-data-tree-r-last.dat", "p_aux"])
def test_build_tree_whose_file_cannot_take_its_place_leaves_no_temporary_file(
    manifest, tmp_path, name
):
    # A directory in the way: the rename of the finished file fails. The tree file's temporary
    # was left behind (the p_aux one never was), in a cache dir the next build or a person reads.
    cache = tmp_path / "cache"
    (cache / name).mkdir(parents=True)
    (cache / name / "keep").write_bytes(b"")
    with NativeProver() as prover, pytest.raises(ProverError, match=f"cannot write .*{name}"):
        prover.build_tree(manifest.proof_type, manifest.replicas[0].sealed_file, cache, bytes(32))
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]


PROVE_WINDOW = """
def open_it(sealed_file, manifest):
    from damocles_ext.post.fixtures import load_manifest, window_task
    from damocles_ext.post.native import NativeProver

    with NativeProver() as prover:
        output = prover.window_post(window_task(load_manifest(manifest), bytes(range(32))))
    return f"faults {output.faults} proofs {len(output.proofs)}"
"""


def test_a_sealed_file_under_a_lease_is_proved_once_the_lease_breaks_not_a_fault(tmp_path):
    # Samba's kernel oplocks and NFS delegations hold leases: a plain open() waits for the lease
    # to break. Opened with O_NONBLOCK (for FIFOs), it failed at once with EWOULDBLOCK, and the
    # sector was a fault, which damocles-manager declares on chain.
    made = create_sectors(tmp_path / "s", "StackedDrgWindow2KiBV1", 1, 1000, random_seed=5)
    sealed = load_manifest(made).replicas[0].sealed_file
    assert run_holding_a_lease(PROVE_WINDOW, str(sealed), str(made)) == (
        "asked True faults [] proofs 1"
    )
