"""A split WindowPoSt through the supervisor: its vanilla step on a [[WdPostVanilla]] child, then
its SNARK step on a [[WdPostSnark]] child (`Supervisor.submit` calls `prove_split`).

The SNARK step proves the vanilla proofs it is given. When SNARK children answer it with an
error, the fault may be the vanilla proofs' (a vanilla child whose output has the right shape
but proves nothing: a SNARK step retried on another GPU fails the same way), so the whole
request runs again once more per MaxAttempts of the vanilla step, its vanilla step avoiding the
child that made those proofs, while another vanilla child can serve. The answer after several
rounds says what each SNARK step said and whose vanilla proofs it had.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from ..errors import ProverError
from ..tasks import (
    WindowPoSt,
    WindowPoStOutput,
    WindowPoStSnarkOutput,
    WindowPoStVanillaOutput,
    join_window_post,
    snark_task,
    split_window_post,
)

if TYPE_CHECKING:
    from .core import Supervisor
    from .request import Waiter

VANILLA = "window_post_vanilla"
# "request 12 (window_post_snark): " or "request 12 (window_post_snark) ": the book's label.
_LABEL = re.compile(r"request \d+ \([a-z_]+\):? ?")


async def prove_split(sup: Supervisor, task: WindowPoSt, how: tuple[Any, ...]) -> WindowPoStOutput:
    """The answer to `task`, proved in two steps; `how`: submit's deadline, priority,
    on_progress and on_dispatch. Raises ProverError."""
    deadline = how[0]
    avoid: frozenset[str] = frozenset()  # vanilla children whose proofs no SNARK step took
    earlier: list[str] = []
    while True:
        waiter = await sup._submit_waiter(split_window_post(task), *how, avoid=avoid or None)
        if waiter.error is not None:
            raise _with_earlier(waiter.error, earlier)
        vanilla = waiter.output
        assert isinstance(vanilla, WindowPoStVanillaOutput)  # the book checks the stage
        if vanilla.faults:  # no proofs to make: prove again without them, as a whole one
            return WindowPoStOutput(proofs=[], faults=vanilla.faults)
        made_by = waiter.tracked.child or "?"
        snark = await sup._submit_waiter(snark_task(task, vanilla), *how, in_flight=True)
        if snark.error is None:
            assert isinstance(snark.output, WindowPoStSnarkOutput)
            return join_window_post(vanilla, snark.output)
        error = ProverError(f"{snark.error}; its vanilla proofs came from {made_by}")
        avoid |= {made_by}
        if not _vanilla_again(sup, snark, made_by, avoid, deadline):
            raise _with_earlier(error, earlier)
        earlier.append(
            f"the SNARK step of the vanilla proofs from {made_by}: "
            + _LABEL.sub("", str(snark.error), count=1)
        )


def _vanilla_again(
    sup: Supervisor, snark: Waiter, made_by: str, avoid: frozenset[str], deadline: float | None
) -> bool:
    """Whether to run the request again from its vanilla step, avoiding `avoid`: a SNARK child
    answered the SNARK step with an error (not a timeout, a crash or shutdown alone), the
    vanilla step has runs left and another vanilla child can serve it in time."""
    if not snark.tracked.avoid or sup.shutting_down:
        return False
    if deadline is not None and time.time() >= deadline:
        return False
    spec = sup._children[made_by].spec if made_by in sup._children else None
    if spec is None or len(avoid) >= spec.max_attempts:
        return False
    breaker = sup._book.scheduler.breaker
    now = sup._now()
    return any(
        c.spec.stage == VANILLA and c.name not in avoid and breaker.can_serve(c.name, now)
        for c in sup._children.values()
    )


def _with_earlier(error: ProverError, earlier: list[str]) -> ProverError:
    if not earlier:
        return error
    return ProverError(f"{error}; before that, " + "; then ".join(earlier))
