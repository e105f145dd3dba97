"""A faithful miniature of Filecoin's vanilla fallback PoSt, real work on real files.

- `challenges`: challenge derivation as rust-fil-proofs does it;
- `layout`: the byte layout of a proof (documented there and in native/README.md);
- `reference`: the prover in plain Python (hashlib), the `python-ref` prover;
- `native`: `NativeProver`, the C ABI (native/include/dext_prover.h) through cffi, either the
  built-in reference prover in C or a vendor library;
- `verify`: the verifier; `fixtures`: sealed files, cache dirs and manifests for tests and demos.
"""

from .errors import (
    InvalidTaskError,
    PoStCancelled,
    ProverOutOfMemory,
    SectorFaultError,
    VerifyError,
)

__all__ = [
    "InvalidTaskError",
    "PoStCancelled",
    "ProverOutOfMemory",
    "SectorFaultError",
    "VerifyError",
]
