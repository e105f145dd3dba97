"""A caller reads its own answer from its child's pipe while the reader task is off it.

Real child processes; the clock is a MockClock that stands still unless a test jumps it, so the
reader task, off an idle child's pipe for LINGER, never takes it back on its own here: an answer
that needs it comes only if something woke it. A trio instrument counts the reader's steps.
Each test runs with a caller that sleeps on the pipe at once, and with one that polls it first
for up to 50 ms (SPIN, real time) once its child answered quickly.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from helpers.supervisor import (
    BlockingWaits,
    TaskSteps,
    child_stats,
    dext_child,
    instruments,
    spec,
    wait_until_real,
    who,
    window_task,
)

from damocles_ext.api import open_supervisor
from damocles_ext.errors import ProverError
from damocles_ext.supervisor import child_loop, pipe_turns
from damocles_ext.supervisor.pipe_turns import LINGER

pytestmark = pytest.mark.usefixtures("no_leftover_processes", "polling")

HELD = 7  # the fake child holds a request of this miner until SIGUSR1 or its Cancel
TALKATIVE = 9  # it reports progress three times before it answers a request of this miner
GARBAGE = 666  # it answers a request of this miner with bytes no dext frame starts with
FLOOD = 777  # it sends progress on a request of this miner without end until SIGUSR1


@pytest.fixture(params=[0.0, 0.05], ids=["sleeps", "polls"])
def polling(request, monkeypatch) -> None:
    monkeypatch.setattr(pipe_turns, "SPIN", request.param)


def fake_child(late_cancels: bool = False, capacity: int = 1) -> list[str]:
    """A dext child answering at once but for miner HELD; a Cancel of a held request is
    answered at once, or (`late_cancels`) with the held ones, on SIGUSR1."""
    return dext_child(
        """
        if msg.task.miner_id == HELD:
            held.append(msg)
        elif msg.task.miner_id == TALKATIVE:
            for done in range(3):
                send(dext.Progress(msg.id, "vanilla", done, 3))
            answer(msg)
        elif msg.task.miner_id == FLOOD:
            while not flood_over:
                send(dext.Progress(msg.id, "vanilla", 0, 1))
            answer(msg)
        elif msg.task.miner_id == GARBAGE:
            out.write(b"\\xff" * 8)  # a frame longer than any allowed
            out.flush()
        else:
            answer(msg)
        """,
        setup=f"""
        import signal
        HELD, GARBAGE, TALKATIVE, LATE_CANCELS = {HELD}, {GARBAGE}, {TALKATIVE}, {late_cancels}
        FLOOD = {FLOOD}
        held, cancelled, flood_over = [], [], []
        def answer_held(*_):
            flood_over.append(True)
            while held:
                answer(held.pop())
            for m in cancelled:
                send(dext.Response(m.id, error="cancelled as asked"))
            cancelled.clear()
        signal.signal(signal.SIGUSR1, answer_held)
        """,
        cancel="""
        for m in [m for m in held if m.id == msg.id]:
            held.remove(m)
            if LATE_CANCELS:
                cancelled.append(m)
            else:
                send(dext.Response(m.id, error="cancelled as asked"))
        """,
        capacity=capacity,
    )


CHILD = fake_child()


def process(sup):
    (child,) = sup._children.values()
    return child.p


@asynccontextmanager
async def warmed(specs: list) -> AsyncIterator:
    """A supervisor of `specs` (one child), ready, one request answered: its reader is off the
    pipe (nothing in flight)."""
    async with open_supervisor(specs) as sup:
        await sup.wait_ready("window_post", 1)
        assert who(await sup.submit(window_task(miner=1)))[0] == 1
        await wait_until_real(lambda: process(sup).turn.off, what="the reader off the pipe")
        yield sup


async def held_by_a_caller(sup, nursery, results: dict) -> None:
    """A caller submits a request the child holds, and reads the pipe for it."""

    async def caller() -> None:
        try:
            results[HELD] = await sup.submit(window_task(miner=HELD))
        except ProverError as exc:
            results[HELD] = exc

    nursery.start_soon(caller)
    await wait_until_real(lambda: process(sup).turn.caller, what="the caller on the pipe")


async def test_callers_one_after_another_read_their_own_answers_the_reader_takes_no_step(
    mock_clock,
):
    async with warmed([spec(CHILD)]) as sup:
        steps = TaskSteps("child_loop.read")
        trio.lowlevel.add_instrument(steps)
        try:
            for miner in range(10, 40):
                assert who(await sup.submit(window_task(miner=miner)))[0] == miner
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert steps.steps == 0
        assert process(sup).turn.off and not process(sup).turn.caller
        assert (child_stats(sup).done, child_stats(sup).in_flight) == (31, 0)


async def test_a_caller_reading_its_pipe_hears_its_progress(mock_clock):
    seen: list = []
    async with warmed([spec(CHILD)]) as sup:
        steps = TaskSteps("child_loop.read")
        trio.lowlevel.add_instrument(steps)
        try:
            out = await sup.submit(window_task(miner=TALKATIVE), on_progress=seen.append)
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert who(out)[0] == TALKATIVE and steps.steps == 0
        assert [(m.phase, m.done, m.total) for m in seen] == [("vanilla", d, 3) for d in range(3)]


async def test_a_front_end_request_wakes_the_reader_off_the_pipe(mock_clock):
    answers: list = []
    async with warmed([spec(CHILD)]) as sup:
        sup.start_nowait(window_task(miner=5), on_done=lambda out, err: answers.append((out, err)))
        await wait_until_real(lambda: answers, what="the answer, read by the woken reader")
        assert who(answers[0][0])[0] == 5 and answers[0][1] is None


async def test_a_front_ends_requests_keep_the_reader_on_the_pipe(mock_clock):
    # No caller of submit reads their answers: the reader stays on the pipe rather than being
    # woken off it at each request; a caller's request then has it leave the pipe again.
    async with warmed([spec(CHILD)]) as sup:
        p = process(sup)
        got: list = []
        for n, miner in enumerate((5, 6), 1):
            sup.start_nowait(window_task(miner=miner), on_done=lambda out, _: got.append(out))
            await wait_until_real(lambda: len(got) == n, what="the answer")  # noqa: B023
            assert who(got[-1])[0] == miner
            await trio.testing.wait_all_tasks_blocked()
            assert not p.turn.off
        assert who(await sup.submit(window_task(miner=8)))[0] == 8
        await wait_until_real(lambda: p.turn.off, what="the reader off the pipe")


async def test_a_caller_answered_elsewhere_while_it_reads_is_woken_and_the_reader_takes_over(
    mock_clock,
):
    results: dict = {}
    child = spec(fake_child(late_cancels=True), request_timeout=5.0, max_attempts=1)
    async with warmed([child]) as sup:
        p = process(sup)
        async with trio.open_nursery() as nursery:
            await held_by_a_caller(sup, nursery, results)
            mock_clock.jump(6)  # its timeout: answered by the driver; the child says nothing
            await wait_until_real(lambda: HELD in results, what="the timed-out caller woken")
        assert isinstance(results[HELD], ProverError)
        assert "timed out after 5s" in str(results[HELD]), results[HELD]
        assert not p.turn.caller and child_stats(sup).in_flight == 1  # its Cancel: unanswered
        await wait_until_real(lambda: not p.turn.off, what="the reader back on the pipe")
        os.kill(p.proc.pid, signal.SIGUSR1)  # the Cancel answered: read by the reader
        await wait_until_real(lambda: child_stats(sup).in_flight == 0, what="the Cancel answered")
        assert who(await sup.submit(window_task(miner=3)))[0] == 3


async def test_a_caller_done_with_the_pipe_leaves_it_to_the_reader_after_linger(mock_clock):
    results: dict = {}
    async with warmed([spec(CHILD)]) as sup:
        p = process(sup)
        async with trio.open_nursery() as nursery:
            await held_by_a_caller(sup, nursery, results)
            mock_clock.jump(2 * LINGER)  # the reader's linger ends while a caller reads: off still
            await trio.testing.wait_all_tasks_blocked()
            assert p.turn.off and p.turn.caller
            os.kill(p.proc.pid, signal.SIGUSR1)  # the held request answered, read by its caller
            await wait_until_real(lambda: HELD in results, what="the held request answered")
        assert who(results[HELD])[0] == HELD
        await trio.testing.wait_all_tasks_blocked()
        assert p.turn.off and not p.turn.caller  # nothing in flight: off for LINGER from now
        mock_clock.jump(LINGER)
        await wait_until_real(lambda: not p.turn.off, what="the reader back on the pipe")


async def test_a_cancelled_caller_hands_the_pipe_back_to_the_reader(mock_clock):
    results: dict = {}
    async with warmed([spec(CHILD)]) as sup:
        async with trio.open_nursery() as nursery:
            await held_by_a_caller(sup, nursery, results)
            nursery.cancel_scope.cancel()
        assert results == {}
        await wait_until_real(lambda: child_stats(sup).in_flight == 0, what="the Cancel answered")
        assert child_stats(sup).done == 1  # (an abandoned attempt counts as neither)
        assert who(await sup.submit(window_task(miner=3)))[0] == 3


async def test_a_caller_reading_the_pipe_reads_the_answers_of_others_waiting(mock_clock):
    results: dict = {}
    async with warmed([spec(fake_child(capacity=2), concurrent=2)]) as sup:
        steps = TaskSteps("child_loop.read")
        async with trio.open_nursery() as nursery:
            await held_by_a_caller(sup, nursery, results)
            trio.lowlevel.add_instrument(steps)
            try:
                # Sent while a caller reads: this one waits to be woken, by that caller.
                assert who(await sup.submit(window_task(miner=8)))[0] == 8
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert steps.steps == 0 and process(sup).turn.caller
            nursery.cancel_scope.cancel()
        await wait_until_real(lambda: child_stats(sup).in_flight == 0, what="the Cancel answered")
        assert who(await sup.submit(window_task(miner=3)))[0] == 3


async def test_a_child_killed_while_its_caller_reads_answers_the_caller(mock_clock):
    results: dict = {}
    async with warmed([spec(CHILD, max_attempts=1)]) as sup:
        async with trio.open_nursery() as nursery:
            await held_by_a_caller(sup, nursery, results)
            process(sup).proc.kill_tree()
            await wait_until_real(lambda: HELD in results, what="the caller answered")
        assert isinstance(results[HELD], ProverError)
        assert "SIGKILL" in str(results[HELD]) or str(signal.SIGKILL.value) in str(results[HELD])


async def test_the_reader_takes_an_idle_childs_pipe_back_after_linger(mock_clock):
    async with warmed([spec(CHILD)]) as sup:
        p = process(sup)
        mock_clock.jump(LINGER / 2)
        await trio.testing.wait_all_tasks_blocked()
        assert p.turn.off
        mock_clock.jump(LINGER)
        await wait_until_real(lambda: not p.turn.off, what="the reader back on the pipe")
        assert who(await sup.submit(window_task(miner=3)))[0] == 3


async def test_an_idle_child_that_dies_while_its_reader_is_off_the_pipe_is_read_to_its_end(
    mock_clock,
):
    async with warmed([spec(CHILD)]) as sup:
        p = process(sup)
        p.proc.kill_tree()  # its exit wakes the reader: its last words and EOF are read now
        await wait_until_real(p.reader_done.is_set, what="the reader at EOF")
        assert p.read_ended and not p.turn.off


async def test_a_caller_claims_the_pipe_of_a_reader_woken_that_has_not_run_yet(mock_clock):
    answers: list = []
    async with warmed([spec(fake_child(capacity=2), concurrent=2)]) as sup:
        sup.start_nowait(window_task(miner=5), on_done=lambda out, _: answers.append(who(out)[0]))
        # No checkpoint between: the reader, woken for the front end's request, runs only once
        # this caller reads the pipe, and leaves it to the caller.
        assert who(await sup.submit(window_task(miner=6)))[0] == 6
        await wait_until_real(lambda: answers == [5], what="the front end's answer")
        assert child_stats(sup).in_flight == 0 and child_stats(sup).restarts == 0


async def test_stopping_at_once_answers_a_caller_reading_its_pipe(mock_clock):
    results: dict = {}
    async with warmed([spec(CHILD)]) as sup, trio.open_nursery() as nursery:
        await held_by_a_caller(sup, nursery, results)
        sup.stop_at_once("stopped at once for the test")
        await wait_until_real(lambda: HELD in results, what="the caller answered")
    assert isinstance(results[HELD], ProverError)
    assert "stopped at once for the test" in str(results[HELD])


async def test_garbage_read_by_a_caller_kills_its_child_and_answers_the_caller(mock_clock):
    async with warmed([spec(CHILD, max_attempts=1)]) as sup:
        pid = process(sup).proc.pid
        with pytest.raises(ProverError, match="broke the protocol") as e:
            await sup.submit(window_task(miner=GARBAGE))
        assert f"pid {pid}" in str(e.value)
        await wait_until_real(lambda: child_stats(sup).state != "ready", what="the child down")


async def test_a_bug_of_ours_on_output_read_by_a_caller_ends_the_child_not_the_call(
    mock_clock, monkeypatch
):
    def buggy(*_):
        raise RuntimeError("injected bug reporting bad output")

    monkeypatch.setattr(child_loop, "report_bad_output", buggy)
    async with warmed([spec(CHILD, max_attempts=1)]) as sup:
        with pytest.raises(ProverError, match="internal error in damocles-ext: RuntimeError"):
            await sup.submit(window_task(miner=GARBAGE))
        await wait_until_real(lambda: child_stats(sup).state != "ready", what="the child down")
        assert sup.statistics().children  # the supervisor goes on


async def test_callers_front_ends_and_cancels_mixed_leave_nothing_unread(mock_clock):
    # Rounds of callers, front-end requests and cancelled callers at once on a child of two
    # slots; between rounds the reader's LINGER runs out or not: both ways of reading mix.
    rng = random.Random(20261207)
    answered: list[int] = []
    async with open_supervisor([spec(fake_child(capacity=2), concurrent=2)]) as sup:
        await sup.wait_ready("window_post", 1)
        pid = process(sup).proc.pid

        async def one(i: int, kind: float, scope: trio.CancelScope) -> None:
            miner = 100 + i
            if kind < 0.55:
                assert who(await sup.submit(window_task(miner=miner)))[0] == miner
            elif kind < 0.75:
                with scope:  # cancelled by the round, whether or not it was sent by then
                    await sup.submit(window_task(miner=HELD))
                    raise AssertionError("a held request answered")
                return
            else:
                got = trio.Event()

                def done(out, err) -> None:
                    assert err is None and who(out)[0] == miner
                    got.set()

                sup.start_nowait(window_task(miner=miner), on_done=done)
                await got.wait()
            answered.append(i)

        n, expected, held = 0, [], []
        for _ in range(60):
            scopes = []
            async with trio.open_nursery() as nursery:
                for _ in range(rng.randint(1, 4)):
                    scopes.append(trio.CancelScope())
                    kind = rng.random()
                    nursery.start_soon(one, n, kind, scopes[-1])
                    (expected if not 0.55 <= kind < 0.75 else held).append(n)
                    n += 1
                    if rng.random() < 0.5:
                        await trio.lowlevel.checkpoint()
                if rng.random() < 0.5:
                    await trio.testing.wait_all_tasks_blocked(0.005)
                for scope in scopes:
                    scope.cancel()
            if rng.random() < 0.3:
                mock_clock.jump(LINGER * rng.choice((0.5, 1.5)))
        assert sorted(answered) == expected and len(held) > 10
        assert child_stats(sup).done == len(expected)
        await wait_until_real(lambda: child_stats(sup).in_flight == 0, what="nothing in flight")
        assert process(sup).proc.pid == pid and child_stats(sup).restarts == 0


async def quick_now(sup) -> None:
    """Requests answered at once until the child's pipe is polled for the next answer."""
    for miner in range(20, 30):
        if process(sup).turn.quick:
            return
        assert who(await sup.submit(window_task(miner=miner)))[0] == miner
    raise AssertionError(f"no answer within SPIN ({pipe_turns.SPIN} s) in 10 tries")


async def test_a_submit_answered_while_its_caller_polls_lets_the_other_tasks_run(
    mock_clock, monkeypatch
):
    monkeypatch.setattr(pipe_turns, "SPIN", 10.0)  # every answer comes within the poll
    async with warmed([spec(CHILD)]) as sup:
        await quick_now(sup)
        steps, waits = TaskSteps("child_loop.read"), BlockingWaits()
        with instruments(steps, waits):
            for miner in range(40, 70):
                assert process(sup).turn.quick
                with trio.testing.assert_checkpoints():  # a cancel point and a schedule point
                    assert who(await sup.submit(window_task(miner=miner)))[0] == miner
        # Each answer read by its caller's poll: the run loop never slept on the pipe.
        assert steps.steps == 0 and waits.waits == 0 and child_stats(sup).in_flight == 0


async def test_a_child_slow_to_answer_is_not_polled_for_until_it_answers_quickly_again(
    mock_clock, monkeypatch
):
    monkeypatch.setattr(pipe_turns, "SPIN", 1.0)
    results: dict = {}
    async with warmed([spec(CHILD)]) as sup:
        await quick_now(sup)
        turn = process(sup).turn
        async with trio.open_nursery() as nursery:
            # The caller polls for 1 s (this task cannot run meanwhile), then sleeps on the
            # pipe: the held request is answered only after that.
            await held_by_a_caller(sup, nursery, results)
            await wait_until_real(lambda: turn.caller.reading_fd, what="the caller asleep")
            os.kill(process(sup).proc.pid, signal.SIGUSR1)
        assert who(results[HELD])[0] == HELD
        assert not turn.quick  # the next caller sleeps on the pipe at once
        assert who(await sup.submit(window_task(miner=3)))[0] == 3  # answered within SPIN
        assert turn.quick


async def test_a_child_flooding_its_pipe_while_its_caller_polls_stops_the_poll_at_spin(
    mock_clock, monkeypatch
):
    monkeypatch.setattr(pipe_turns, "SPIN", 0.05)
    seen: list = []
    results: dict = {}
    async with warmed([spec(CHILD)]) as sup:
        await quick_now(sup)

        async def caller() -> None:
            results[FLOOD] = await sup.submit(window_task(miner=FLOOD), on_progress=seen.append)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            # This task runs again only once the poll gave up (the flood never lets the run
            # loop be idle: no wait_all_tasks_blocked here).
            while not seen:
                await trio.lowlevel.checkpoint()
            os.kill(process(sup).proc.pid, signal.SIGUSR1)
        assert who(results[FLOOD])[0] == FLOOD and child_stats(sup).restarts == 0


async def front_end_ready(sup, mock_clock) -> None:
    """The child quick, and its reader back on the pipe (as a front end's requests keep it):
    a front end's request then wakes no task."""
    await quick_now(sup)
    mock_clock.jump(LINGER)
    await wait_until_real(lambda: not process(sup).turn.off, what="the reader on the pipe")


async def started(sup, miner: int, answers: list) -> None:
    """A front end's request for `miner`, in a batch of its own, with no other task ready to run
    (as a connection's task reading one request); its answer goes to `answers`."""
    await trio.testing.wait_all_tasks_blocked()
    with sup.batch():
        sup.start_nowait(
            window_task(miner=miner), on_done=lambda out, _: answers.append(who(out)[0])
        )


async def test_a_front_ends_lone_request_to_a_quick_idle_child_is_answered_as_its_batch_ends(
    mock_clock, monkeypatch
):
    monkeypatch.setattr(pipe_turns, "SPIN", 10.0)  # every answer comes within the poll
    answers: list = []
    async with warmed([spec(CHILD)]) as sup:
        await front_end_ready(sup, mock_clock)
        for miner in range(40, 50):
            await started(sup, miner, answers)
            assert answers[-1] == miner  # read by the batch's poll, no checkpoint between
        assert child_stats(sup).in_flight == 0 and process(sup).turn.quick


async def test_a_batch_to_a_child_with_a_request_in_flight_is_not_polled(mock_clock, monkeypatch):
    monkeypatch.setattr(pipe_turns, "SPIN", 10.0)
    answers: list = []
    async with warmed([spec(fake_child(capacity=2), concurrent=2)]) as sup:
        await front_end_ready(sup, mock_clock)
        # Not in a batch: never polled for (only a batch's end polls).
        sup.start_nowait(window_task(miner=HELD), on_done=lambda out, _: answers.append(HELD))
        await started(sup, 5, answers)  # polled, it would be read by now (after 10 s)
        assert answers == []
        await wait_until_real(lambda: answers == [5], what="the answer, read by the reader")
        os.kill(process(sup).proc.pid, signal.SIGUSR1)
        await wait_until_real(lambda: answers == [5, HELD], what="the held one answered")


async def test_a_batch_polls_a_child_again_once_its_reader_saw_it_answer_within_spin(
    mock_clock, monkeypatch
):
    monkeypatch.setattr(pipe_turns, "SPIN", 1.0)
    answers: list = []
    async with warmed([spec(CHILD)]) as sup:
        await front_end_ready(sup, mock_clock)
        turn = process(sup).turn
        await started(sup, HELD, answers)  # polled for 1 s in vain: not quick any more
        assert not turn.quick and answers == []
        os.kill(process(sup).proc.pid, signal.SIGUSR1)
        await wait_until_real(lambda: answers == [HELD], what="the held one answered")
        await started(sup, 5, answers)  # not polled: its reader times its answer
        assert answers == [HELD] and turn.sent_at
        await wait_until_real(lambda: answers == [HELD, 5], what="the answer, read by the reader")
        assert turn.quick and not turn.sent_at
        await started(sup, 6, answers)  # polled again
        assert answers == [HELD, 5, 6]


async def test_a_batch_does_not_poll_while_another_task_is_ready_to_run(mock_clock, monkeypatch):
    # E.g. another connection's task, its request read: a poll would hold it back.
    monkeypatch.setattr(pipe_turns, "SPIN", 10.0)
    answers: list = []
    async with warmed([spec(CHILD)]) as sup:
        await front_end_ready(sup, mock_clock)
        async with trio.open_nursery() as nursery:
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(trio.lowlevel.checkpoint)  # ready to run, not run yet
            with sup.batch():  # polled, it would be answered by its end
                sup.start_nowait(window_task(miner=5), on_done=lambda out, _: answers.append(5))
            assert answers == []
        await wait_until_real(lambda: answers == [5], what="the answer, read by the reader")
        await started(sup, 6, answers)  # nothing else ready: polled (its reader timed the last one)
        assert answers == [5, 6]


async def test_tasks_runnable_counts_trios_run_queue_without_walking_its_descriptors(
    monkeypatch,
):
    async def nothing() -> None:
        pass

    before = trio.lowlevel.current_statistics().tasks_runnable  # (0 unless a fixture's task)
    assert pipe_turns.tasks_runnable() == before
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(nothing)
        assert pipe_turns.tasks_runnable() == before + 5
        assert trio.lowlevel.current_statistics().tasks_runnable == before + 5
        # This trio keeps its run queue where it is read: the public call, which walks every
        # descriptor's waiters, is not made.
        monkeypatch.setattr(trio.lowlevel, "current_statistics", None)
        assert pipe_turns.tasks_runnable() == before + 5
    monkeypatch.undo()
    # A trio without it: the public call.
    monkeypatch.setattr(pipe_turns, "_RUN_CONTEXT", None)
    before = trio.lowlevel.current_statistics().tasks_runnable
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nothing)
        assert pipe_turns.tasks_runnable() == before + 1
