"""The Python verifier: checks proof bytes against the public inputs only (no files are read).

Public inputs: proof type, miner (prover_id), seed, and each replica's sector id and comm_r. The
C verifier (`NativeProver.verify`) implements the same checks; tests hold both to every flipped
bit of a proof.
"""

from __future__ import annotations

from ..tasks import (
    Output,
    PoStReplicaInfo,
    Task,
    WindowPoSt,
    WindowPoStOutput,
    WinningPoSt,
    WinningPoStOutput,
    stage_of,
)
from . import challenges as ch
from .errors import InvalidTaskError, VerifyError, split_step_not_a_proof
from .layout import (
    HEADER,
    KIND_WINDOW,
    KIND_WINNING,
    LAYOUT_VERSION,
    MAGIC,
    ProofParams,
    decode_sector,
    encode_header,
    proof_params,
    sector_entries,
)
from .reference import hash_node, sorted_replicas

__all__ = ["VerifyError", "verify", "verify_window_post", "verify_winning_post"]


def _params(proof_type: str, kind: int) -> ProofParams:
    try:
        params = proof_params(proof_type)
    except ValueError:
        raise InvalidTaskError(f"unknown proof type {proof_type!r}") from None
    if params.kind != kind:
        raise InvalidTaskError(f"proof type {proof_type!r} is for the other PoSt stage")
    return params


def _check_header(proof: bytes, expected: bytes) -> str | None:
    fields = HEADER.unpack_from(proof)
    want = HEADER.unpack(expected)
    if fields[0] != MAGIC:
        return "not a damocles-ext reference proof (bad magic)"
    if fields[1] != LAYOUT_VERSION:
        return f"unknown proof layout version {fields[1]}"
    if fields[2:5] != want[2:5]:
        return "proof is for another proof type"
    if fields[5] != want[5]:
        return f"proof is for partition {fields[5]}"
    if fields[6:9] != want[6:9] or proof[21:24] != b"\0\0\0":
        return "sector count, challenge count or tree height differ from the proof type's"
    if fields[9] != want[9]:
        return "proof was made for another seed"
    if fields[10] != want[10]:
        return "proof was made for another miner (prover_id)"
    return None


def _check_sector(
    params: ProofParams, entry: bytes, replica: PoStReplicaInfo, rand: bytes, sector_index: int
) -> str | None:
    proof = decode_sector(params, entry)
    sid = replica.sector_id
    if proof.sector_id != sid:
        return f"proves sector {proof.sector_id}, expected sector {sid}"
    if hash_node(proof.comm_c, proof.comm_r_last) != replica.comm_r:
        return f"sector {sid}: H(comm_c, comm_r_last) is not comm_r"
    wanted = ch.leaf_challenges(params, rand, sid, sector_index)
    for n, (want, challenge) in enumerate(zip(wanted, proof.challenges, strict=True)):
        c = challenge.node_index
        if c != want:
            return f"sector {sid} challenge {n}: proves node {c}, challenged node is {want}"
        cur = challenge.leaf
        for level, sib in enumerate(challenge.siblings):
            cur = hash_node(sib, cur) if (c >> level) & 1 else hash_node(cur, sib)
        if cur != proof.comm_r_last:
            return (
                f"sector {sid} challenge {n}: inclusion path of node {c} does not lead to "
                "comm_r_last"
            )
    return None


def _verify_partitions(
    params: ProofParams,
    proofs: list[bytes],
    slots: list[tuple[PoStReplicaInfo, int]],
    rand: bytes,
    prover: bytes,
) -> None:
    spp = params.sectors_per_partition
    partitions = (len(slots) + spp - 1) // spp
    if len(proofs) != partitions:
        plural = "" if partitions == 1 else "s"
        raise VerifyError(
            f"expected {partitions} proof{plural} (one per partition of {spp} sectors), "
            f"got {len(proofs)}"
        )
    for part, proof in enumerate(proofs):
        if len(proof) != params.proof_size:
            raise VerifyError(f"proof {part} is {len(proof)} bytes, expected {params.proof_size}")
        bad = _check_header(proof, encode_header(params, part, rand, prover))
        if bad:
            raise VerifyError(f"proof {part}: {bad}")
        entries = sector_entries(params, proof)
        real = min(spp, len(slots) - part * spp)
        for i, entry in enumerate(entries):
            if i >= real:
                if entry != entries[real - 1]:
                    raise VerifyError(
                        f"proof {part}: padding slot {i} is not a copy of the last sector"
                    )
                continue
            replica, sector_index = slots[part * spp + i]
            bad = _check_sector(params, entry, replica, rand, sector_index)
            if bad:
                raise VerifyError(f"proof {part}: {bad}")


def verify_window_post(task: WindowPoSt, output: WindowPoStOutput) -> None:
    """Return if `output` proves `task`; raise VerifyError with the reason otherwise."""
    params = _params(task.proof_type, KIND_WINDOW)
    if not task.replicas:
        raise InvalidTaskError("the task has no replicas")
    replicas = sorted_replicas(task.replicas)
    if output.faults:
        raise VerifyError(
            f"the output reports faulty sectors {list(output.faults)} and no valid proof of the "
            "task; prove again without them"
        )
    slots = [(r, i) for i, r in enumerate(replicas)]
    _verify_partitions(
        params, list(output.proofs), slots, ch.randomness(task.seed), ch.prover_id(task.miner_id)
    )


def verify_winning_post(task: WinningPoSt, output: WinningPoStOutput) -> None:
    """Return if `output` proves `task`; raise VerifyError with the reason otherwise."""
    params = _params(task.proof_type, KIND_WINNING)
    if not task.replicas:
        raise InvalidTaskError("the task has no replicas")
    rand = ch.randomness(task.seed)
    prover = ch.prover_id(task.miner_id)
    slots = [
        (task.replicas[ch.winning_sector_choice(prover, rand, k, len(task.replicas))], k)
        for k in range(params.sectors_per_partition)
    ]
    _verify_partitions(params, list(output.proofs), slots, rand, prover)


def verify(task: Task, output: Output) -> None:
    """Verify an output of either stage; VerifyError when it does not prove the task."""
    if stage_of(task) != stage_of(output):
        raise InvalidTaskError(f"a {stage_of(output)} output cannot prove a {stage_of(task)} task")
    if isinstance(task, WindowPoSt) and isinstance(output, WindowPoStOutput):
        verify_window_post(task, output)
    elif isinstance(task, WinningPoSt) and isinstance(output, WinningPoStOutput):
        verify_winning_post(task, output)
    else:
        raise split_step_not_a_proof(stage_of(task))
