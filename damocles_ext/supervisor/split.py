"""A split WindowPoSt through the supervisor: its vanilla step on a [[WdPostVanilla]] child, then
its SNARK step on a [[WdPostSnark]] child (`Supervisor.submit` calls `prove_split`).

The SNARK step proves the vanilla proofs it is given. When two SNARK children or more answered it
with an error, the fault is likely the vanilla proofs' (a vanilla child whose output has the
right shape but proves nothing: a SNARK step retried on another GPU fails the same way), so the
whole request runs again from its vanilla step, avoiding the vanilla children whose proofs were
refused, while another vanilla child can serve, the deadline allows, and rounds are left: the
vanilla step's MaxAttempts (of the child that made the first proofs) bounds the rounds, each of
which has its own attempts. One SNARK child's error is no such evidence while another SNARK
child can serve (a GPU's own fault is far more common, and running the vanilla step again would
read every challenged sector again for nothing); with no other SNARK child to ask (none, or all
benched or stopped for good), one is enough: the proofs made again are the only chance of a
proof. A SNARK child that went down of its own fault while running the step (a crash, a hang:
a native prover aborting on proofs it cannot read) counts here as one that answered it with an
error: otherwise a vanilla child whose proofs crash the SNARK prover would never be blamed, and
every request it made proofs for would fail. A SNARK step's error names the vanilla child whose
proofs it had, whatever ended it (an error, its child going down, a deadline, the shutdown);
the answer after several rounds says what each said.

For the breaker, a vanilla step's proofs count once its SNARK step is judged, in their place
among their child's answers: as an error when two SNARK children or more refused them, or when
one alone did and another vanilla child's proofs of the same request were then proved (that
SNARK child works: a broken lone SNARK GPU refusing every child's proofs blames none), as a
proof when it proved them, and not at all when it ended with nothing said of them (one SNARK
child's error otherwise, its deadline, a cancel, a shutdown). A vanilla
child whose proofs prove nothing is benched as one that answers errors is, while a sibling's
proofs for the same miner are taken. The SNARK children are not blamed for them (see the
breaker's key for the SNARK step in lifecycle/records.py): a SNARK child's error counts for the
breaker only once a sibling proves that step (TrackedRequest.refusals), so that refusing proofs
every SNARK child refuses does not bench one on probation again.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ProverError, prover_error
from ..stages import WINDOW_POST_SPLIT
from ..tasks import (
    Task,
    WindowPoSt,
    WindowPoStOutput,
    WindowPoStSnarkOutput,
    WindowPoStVanillaOutput,
    join_window_post,
    snark_task,
    split_window_post,
)
from .readiness import run_begun, run_going

if TYPE_CHECKING:
    from ..lifecycle.records import TrackedRequest
    from .core import Supervisor
    from .request import Waiter

VANILLA, SNARK = WINDOW_POST_SPLIT
# "request 12 (window_post_snark): " or "request 12 (window_post_snark) ": the book's label.
_LABEL = re.compile(r"^request \d+ \([a-z_]+\):? ?")


async def _step(
    sup: Supervisor,
    task: Task,
    how: tuple[Any, ...],
    *,
    in_flight: bool = False,
    avoid: frozenset[str] | None = None,
    judged_later: bool = False,
) -> Waiter:
    """One of the two requests of a split WindowPoSt, submitted and answered: its waiter (the
    child that answered is read from it). `avoid`: children not to send it to while another
    can serve; `judged_later`: a vanilla step (see TrackedRequest); `in_flight`: the SNARK step
    of one begun, which shutdown lets finish within its grace."""
    if not run_going(sup, "Supervisor.submit()"):
        await run_begun(sup, "Supervisor.submit()")
    # A caller already cancelled gets Cancelled before anything reaches a child (trio's rule).
    await trio.lowlevel.checkpoint_if_cancelled()
    deadline, priority, on_progress, on_dispatch = how
    waiter = sup._begin(task, deadline, priority, on_progress, on_dispatch, None, in_flight, avoid)
    waiter.tracked.judged_later = judged_later  # (no answer can come before the wait)
    try:
        await waiter.wait()
    finally:
        if not waiter.tracked.done:  # the caller went away (cancelled): forget it, stop its work
            sup._abandon(waiter)
    return waiter


async def prove_split(sup: Supervisor, task: WindowPoSt, how: tuple[Any, ...]) -> WindowPoStOutput:
    """The answer to `task`, proved in two steps; `how`: submit's deadline, priority,
    on_progress and on_dispatch. Raises ProverError."""
    deadline = how[0]
    avoid: frozenset[str] = frozenset()  # vanilla children whose proofs no SNARK step took
    earlier: list[str] = []
    rounds, budget = 0, 1
    held: list[TrackedRequest] = []  # vanilla steps one lone SNARK child refused (see _judge)
    try:
        while True:
            if (why := sup._book.cannot_serve(SNARK)) is not None:
                # Its SNARK step would fail at once: no vanilla step (every challenged sector
                # read, a vanilla slot taken) for proofs no SNARK child can prove.
                rid = next(sup._rids)
                why = f"request {rid} ({SNARK}): {why}; its vanilla step was not run"
                raise _with_earlier(prover_error(why, late=False, request_id=rid), earlier)
            waiter = await _step(
                sup, split_window_post(task), how, avoid=avoid or None, judged_later=True
            )
            if waiter.error is not None:
                raise _with_earlier(waiter.error, earlier)
            vanilla = waiter.output
            assert isinstance(vanilla, WindowPoStVanillaOutput)  # the book checks the stage
            if vanilla.faults:  # no proofs to make: prove again without them, as a whole one
                return WindowPoStOutput(proofs=[], faults=vanilla.faults)
            made_by = waiter.tracked.child or "?"
            rounds += 1
            if rounds == 1 and made_by in sup._children:
                budget = sup._children[made_by].spec.max_attempts
            waiter.dispatched(None)  # on no child until a SNARK child takes its SNARK step
            # The SNARK children that said an error, or went down of their own fault (a crash,
            # a hang) while running it: a SNARK prover aborting on the proofs it is given is as
            # much evidence against them as an error.
            refused_by: frozenset[str] = frozenset()
            judged: bool | None = None  # refused, proved, or nothing said (see module docstring)
            enough = False
            try:
                snark = await _step(sup, snark_task(task, vanilla), how, in_flight=True)
                if snark.error is not None:
                    refused_by = (snark.tracked.avoid or frozenset()) | snark.tracked.lost_on
                    enough = len(refused_by) >= _opinions(sup, refused_by)
                    judged = True if len(refused_by) >= 2 else None
                else:
                    judged = False
            finally:  # the vanilla child's answer counts for the breaker now (or once judged)
                if judged is False:  # proved: the other vanilla children's proofs were bad
                    _judge(sup, held, made_by)
                if enough and judged is None:
                    held.append(waiter.tracked)
                else:
                    sup._tell(sup._book.judge_vanilla, waiter.tracked, judged, sup._now())
            if snark.error is None:
                assert isinstance(snark.output, WindowPoStSnarkOutput)
                return join_window_post(vanilla, snark.output)
            # Named whatever ended it (an operator looks for them on that child's GPU too).
            error = _rewrapped(
                snark.error, f"{snark.error}; its vanilla proofs came from {made_by}"
            )
            if not refused_by:  # a timeout, a deadline, the shutdown: nothing said of the proofs
                raise _with_earlier(error, earlier)
            avoid |= {made_by}
            if not enough or rounds >= budget or not _vanilla_again(sup, avoid, deadline):
                raise _with_earlier(error, earlier)
            earlier.append(
                f"the SNARK step of the vanilla proofs from {made_by}: "
                + _LABEL.sub("", str(snark.error), count=1)
            )
    finally:  # never confirmed: nothing said of them
        _judge(sup, held, None)


def _judge(sup: Supervisor, held: list[TrackedRequest], proved_by: str | None) -> None:
    """Judge the vanilla steps `held` (one lone SNARK child refused each): errors when
    `proved_by`, another vanilla child, made proofs of the same task that were proved; else
    nothing said of them."""
    for tracked in held:
        refused = True if proved_by is not None and tracked.child != proved_by else None
        sup._tell(sup._book.judge_vanilla, tracked, refused, sup._now())
    held.clear()


def _opinions(sup: Supervisor, refused_by: frozenset[str]) -> int:
    """How many SNARK children's errors blame the vanilla proofs: two, or one when no other
    SNARK child can serve now (none configured, benched, stopped for good): then there is no
    second opinion to wait for, and proofs made again by another vanilla child are the only
    chance of a proof."""
    return 2 if _another_can_serve(sup, SNARK, refused_by) else 1


def _vanilla_again(sup: Supervisor, avoid: frozenset[str], deadline: float | None) -> bool:
    """Whether another vanilla child than `avoid` can serve the request, in time."""
    if sup.shutting_down or (deadline is not None and time.time() >= deadline):
        return False
    return _another_can_serve(sup, VANILLA, avoid)


def _another_can_serve(sup: Supervisor, stage: str, besides: frozenset[str]) -> bool:
    """Whether a child of `stage` not in `besides` can serve now (neither benched nor FATAL)."""
    breaker, now = sup._book.scheduler.breaker, sup._now()
    return any(
        c.spec.stage == stage and c.name not in besides and breaker.can_serve(c.name, now)
        for c in sup._children.values()
    )


def _with_earlier(error: ProverError, earlier: list[str]) -> ProverError:
    if not earlier:
        return error
    return _rewrapped(error, f"{error}; before that, " + "; then ".join(earlier))


def _rewrapped(error: ProverError, message: str) -> ProverError:
    """`error` said as `message`: its class kept (a DeadlineError stays one: no failure of a
    prover's), and its fields: the `request_id` of the step whose answer it is, the number
    its message starts with, as an unsplit request's error carries its own."""
    again = type(error)(message)
    again.__dict__.update(error.__dict__)
    return again
