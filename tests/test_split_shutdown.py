"""A split WindowPoSt at shutdown: between its two steps it is one request in flight.

Its vanilla step answered, its SNARK step not yet submitted, no request of it is open in the
request book: only the supervisor's count of split requests under way tells the shutdown's
drain that it must wait. Whether the drain looks in that gap depends on the order in which
trio wakes the caller and the drain; these tests hold the caller in the gap (a wrapper around
`split._step`, the real one inside it) to look at it every time.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers.supervisor import BAD_VANILLA, builtin_child, python_child, spec, window_task

from damocles_ext.api import open_supervisor
from damocles_ext.errors import ProverError
from damocles_ext.supervisor import split

VAN, SNARK = "window_post_vanilla", "window_post_snark"


def echo_children():
    return [
        spec(builtin_child(VAN, "echo"), stage=VAN),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
    ]


class Gaps:
    """`split._step` with the caller held before its SNARK step and after that step's answer,
    each until the test lets it go on."""

    def __init__(self) -> None:
        self.reached = [trio.Event(), trio.Event()]
        self.go_on = [trio.Event(), trio.Event()]
        self._real = split._step

    async def step(self, sup, task, how, **kwargs):
        if not kwargs.get("in_flight"):  # the vanilla step
            return await self._real(sup, task, how, **kwargs)
        await self._hold(0)
        waiter = await self._real(sup, task, how, **kwargs)
        await self._hold(1)
        return waiter

    async def _hold(self, gap: int) -> None:
        self.reached[gap].set()
        await self.go_on[gap].wait()


def states(sup) -> set[str]:
    return {c.state for c in sup.statistics().children}


async def test_shutdown_waits_for_a_split_request_between_its_steps_and_no_longer(monkeypatch):
    # Removing the split count from the drain's test, or the wake-up when a split request
    # ends, failed no test before: in the first case the children were stopped under the
    # request's SNARK step, in the second the drain waited out the whole grace.
    gaps = Gaps()
    monkeypatch.setattr(split, "_step", gaps.step)
    results = []
    with trio.fail_after(30):
        async with open_supervisor(echo_children(), shutdown_grace=20) as sup:
            await sup.wait_ready("window_post")

            async def prove() -> None:
                results.append(await sup.submit(window_task(miner=7)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(prove)
                await gaps.reached[0].wait()  # the vanilla step answered, the SNARK one to come
                sup.request_shutdown()
                await trio.testing.wait_all_tasks_blocked()
                assert states(sup) == {"ready"}  # the drain waits for it: no child stopped
                gaps.go_on[0].set()
                await gaps.reached[1].wait()  # the SNARK step answered, the caller not back
                await trio.testing.wait_all_tasks_blocked()
                assert states(sup) == {"ready"}
                gaps.go_on[1].set()
            # Answered: the drain ends now, not at the grace's end.
            await trio.testing.wait_all_tasks_blocked()
            assert states(sup) <= {"stopping", "stopped"}, states(sup)
    assert results == [echo_output(window_task(miner=7))]


async def test_a_snark_error_at_shutdown_is_the_answer_with_no_vanilla_step_run_again(
    monkeypatch,
):
    # The lone SNARK child refuses the vanilla proofs as shutdown has begun: another vanilla
    # child could make them again, but no new request is taken. The answer is the SNARK
    # step's error naming whose proofs it had, not a vanilla step's refusal (removing the
    # shutdown from split._vanilla_again failed no test before).
    gaps = Gaps()
    gaps.go_on[1].set()
    monkeypatch.setattr(split, "_step", gaps.step)
    never_ready = python_child("import time; time.sleep(600)")  # another vanilla child, idle
    children = [
        spec(BAD_VANILLA, stage=VAN),
        spec(never_ready, stage=VAN, index=1),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
    ]
    errors: list[str] = []

    async def prove(sup) -> None:
        with pytest.raises(ProverError) as info:
            await sup.submit(window_task())
        errors.append(str(info.value))

    with trio.fail_after(30):
        async with open_supervisor(children, shutdown_grace=20) as sup:
            await sup.wait_ready(VAN)
            await sup.wait_ready(SNARK)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prove, sup)
                await gaps.reached[0].wait()
                sup.request_shutdown()
                gaps.go_on[0].set()
    (error,) = errors
    assert error.startswith(f"request 2 ({SNARK})"), error
    assert error.endswith(f"its vanilla proofs came from {VAN}#0"), error
    assert "shutting down" not in error, error
