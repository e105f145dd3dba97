"""The `python-ref` prover: the reference PoSt prover in plain Python (damocles_ext.post.reference).

The same algorithm and proof bytes as the `native` prover's reference library, several times
slower; useful where no compiler was available at install time and to cross-check. No options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from damocles_ext.hookspecs import CancelToken, Options, ProgressCallback, ProverSpec, hookimpl
from damocles_ext.stages import STAGES  # the PoSt stages and the split WindowPoSt steps

if TYPE_CHECKING:
    from damocles_ext.tasks import Output, Task


class PythonRefProver:
    name = "python-ref"
    stages = STAGES

    def prove(self, task: Task, progress: ProgressCallback, cancel: CancelToken) -> Output:
        """Prove `task` in Python; a cancelled request raises hookspecs.Cancelled."""
        from damocles_ext.post import PoStCancelled, reference, split, verify
        from damocles_ext.tasks import WindowPoSt, WindowPoStSnark, WindowPoStVanilla

        cancel.check()
        try:
            if isinstance(task, WindowPoSt):
                return reference.window_post(task, progress, cancel)
            if isinstance(task, WindowPoStVanilla):
                return split.vanilla_step(
                    lambda t: reference.window_post(t, progress, cancel), task
                )
            if isinstance(task, WindowPoStSnark):
                return split.snark_step(verify.verify, task, progress, cancel)
            return reference.winning_post(task, progress, cancel)
        except PoStCancelled:
            cancel.check()
            raise


def validate_options(options: Options) -> list[str]:
    """python-ref takes no options."""
    return [
        f"python-ref: unknown option {key!r}; python-ref takes no options"
        for key in sorted(options)
    ]


@hookimpl
def dext_provers() -> list[ProverSpec]:
    return [
        ProverSpec(
            name="python-ref",
            stages=STAGES,
            description="the reference PoSt prover in plain Python (hashlib): same proofs as "
            "native's, slower",
            factory=lambda options: PythonRefProver(),
            validate_options=validate_options,
        )
    ]
