"""The reference provers' split WindowPoSt steps: vanilla, then SNARK.

In Filecoin the vanilla step reads each challenged leaf and its Merkle path from the sectors
(CPU and disk), and the SNARK step proves, on a GPU, a circuit that checks those vanilla proofs.
This miniature has no zero-knowledge compression: its proof *is* the vanilla proofs. So its
SNARK step does what the circuit would check, verifying every vanilla proof against the task
(the replicas' comm_r, the challenges from the seed), and passes them on; a split WindowPoSt
answers with the very bytes of a whole one, which tests check.

A vanilla step that finds faulty sectors answers with the faults and no proofs, as a whole
WindowPoSt does (rust-fil-proofs' contract: prove again without them); the supervisor then skips
the SNARK step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..tasks import (
    WindowPoSt,
    WindowPoStOutput,
    WindowPoStSnark,
    WindowPoStSnarkOutput,
    WindowPoStVanilla,
    WindowPoStVanillaOutput,
)
from .errors import InvalidTaskError, PoStCancelled, VerifyError

ProveWindow = Callable[[WindowPoSt], WindowPoStOutput]
Progress = Callable[[str, int, int], None]
VerifyWindow = Callable[[WindowPoSt, WindowPoStOutput], None]


class Cancellable(Protocol):
    """What a step checks for a cancel: hookspecs.CancelToken, or any object with the flag."""

    @property
    def cancelled(self) -> bool: ...


def whole(task: WindowPoStVanilla | WindowPoStSnark) -> WindowPoSt:
    """The WindowPoSt a split step belongs to."""
    return WindowPoSt(task.miner_id, task.proof_type, task.replicas, task.seed)


def vanilla_step(prove: ProveWindow, task: WindowPoStVanilla) -> WindowPoStVanillaOutput:
    """The vanilla proofs of `task` (or its faults), made by `prove`, a whole-WindowPoSt prover."""
    out = prove(whole(task))
    return WindowPoStVanillaOutput(vanilla_proofs=out.proofs, faults=out.faults)


def snark_step(
    verify: VerifyWindow,
    task: WindowPoStSnark,
    progress: Progress | None = None,
    cancel: Cancellable | None = None,
) -> WindowPoStSnarkOutput:
    """Check the vanilla proofs of `task` with `verify` and pass them on as its proofs; reports
    the phase "snark" (0/1, then 1/1) to `progress`. Raises PoStCancelled if `cancel` (anything
    with a `cancelled` flag) is set before the check or before the answer."""
    _stop_if_cancelled(cancel, "before the SNARK step")
    if progress:
        progress("snark", 0, 1)
    if task.faults:
        raise InvalidTaskError(
            f"the vanilla step reported faulty sectors {list(task.faults)}: there is nothing to "
            "prove; prove the WindowPoSt again without them"
        )
    try:
        verify(whole(task), WindowPoStOutput(proofs=task.vanilla_proofs, faults=[]))
    except VerifyError as exc:
        raise VerifyError(f"the vanilla proofs do not prove the task: {exc}") from None
    _stop_if_cancelled(cancel, "after checking the vanilla proofs")
    if progress:
        progress("snark", 1, 1)
    return WindowPoStSnarkOutput(proofs=list(task.vanilla_proofs))


def _stop_if_cancelled(cancel: Cancellable | None, when: str) -> None:
    if cancel is not None and cancel.cancelled:
        raise PoStCancelled(f"cancelled {when}")
