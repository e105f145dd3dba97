"""Errors of the PoSt miniature, mapped onto damocles-ext's exit codes."""

from __future__ import annotations

from ..errors import DextError, ProverError, UsageError


class InvalidTaskError(UsageError):
    """The task itself is unusable (unknown proof type, no replicas, a sector id twice)."""


def split_step_not_a_proof(stage: str) -> InvalidTaskError:
    """The error for verifying a split WindowPoSt step on its own."""
    return InvalidTaskError(
        f"a {stage} step is a part of a WindowPoSt, not a proof to verify on its own: verify the"
        " whole WindowPoSt's task and output"
    )


class SectorFaultError(ProverError):
    """A WinningPoSt's chosen sector is faulty (WindowPoSt reports faults in its output)."""


class ProverOutOfMemory(ProverError):
    """The prover library could not allocate memory (DEXT_ERR_NOMEM): the task may be fine."""


class PoStCancelled(ProverError):
    """Proving stopped because the cancel token was set."""


class VerifyError(DextError):
    """A proof does not check out against the public inputs; the message says why (exit 1)."""
