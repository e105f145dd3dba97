"""The supervisor with real child processes: dispatch, crash recovery, timeouts, shutdown.

Children are small Python programs (`python -u -c ...`, as trio's own subprocess tests do) or the
built-in child runtime. Time only enters through events and bounded polling of process state;
the backoff sequence runs on a MockClock.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable

import msgspec
import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers.supervisor import (
    alive,
    builtin_child,
    cancel_once_running,
    child_stats,
    dext_child,
    jsonl_child,
    python_child,
    spec,
    wait_until,
    wait_until_real,
    who,
    window_task,
    winning_task,
)

from damocles_ext import config
from damocles_ext.api import open_supervisor
from damocles_ext.child_codecs import QUEUE
from damocles_ext.errors import DeadlineError, ProverError, UsageError
from damocles_ext.hookspecs import hookimpl
from damocles_ext.plugins import get_plugin_manager
from damocles_ext.protocol import dext
from damocles_ext.scheduling.children import TAKE_BACK_AFTER
from damocles_ext.supervisor import Supervisor, child_loop
from damocles_ext.supervisor.process import SpawnError, prepare_spawn
from damocles_ext.supervisor.restart import BackoffPolicy, GiveUp, RestartTracker

FAST = BackoffPolicy(base=0.05, cap=0.2)


pytestmark = pytest.mark.usefixtures("no_leftover_processes")


# -- dispatch ---------------------------------------------------------------------------------


async def test_builtin_dext_child_and_jsonl_child_both_answer_requests():
    specs = [
        spec(builtin_child(), index=0, concurrent=2),
        spec(jsonl_child(), index=1),
    ]
    async with open_supervisor(specs) as sup:
        await sup.wait_ready("window_post", 2)
        results: dict[int, object] = {}

        async def one(miner: int) -> None:
            results[miner] = await sup.submit(window_task(miner=miner))

        async with trio.open_nursery() as nursery:
            for miner in range(1, 13):
                nursery.start_soon(one, miner)
        pid1 = child_stats(sup, "window_post#1").pid
        for miner, out in results.items():
            # echo answers with a proof derived from the task; the fake child with [miner, pid]
            assert out == echo_output(window_task(miner=miner)) or who(out) == (miner, pid1)
        stats = {c.name: c for c in sup.statistics().children}
        assert stats["window_post#0"].done + stats["window_post#1"].done == 12
        assert stats["window_post#0"].done > 0 and stats["window_post#1"].done > 0
        assert stats["window_post#0"].protocol == "dext"
        assert stats["window_post#1"].protocol == "jsonl"


async def test_waiting_for_a_stage_that_is_none_is_a_usage_error_naming_the_stages():
    async with open_supervisor([spec(jsonl_child())]) as sup:
        with pytest.raises(UsageError, match="unknown stage 'windowpost'; give one of"):
            await sup.wait_ready("windowpost")


async def test_quick_requests_queue_in_a_builtin_child_and_never_in_a_jsonl_child():
    # The built-in runtime offers a queue in its Hello; once its answers are quick it is sent
    # that many requests beyond Concurrent = 1. A JSON-lines child never is.
    specs = [spec(builtin_child(), index=0), spec(jsonl_child(), index=1)]
    most: dict[str, int] = {}
    async with open_supervisor(specs) as sup:
        await sup.wait_ready("window_post", 2)

        def dispatched(name: str | None) -> None:
            if name is not None:
                most[name] = max(most.get(name, 0), child_stats(sup, name).in_flight)

        async def caller(first: int) -> None:
            for miner in range(first, first + 20):
                task = window_task(miner=miner)
                out = await sup.submit(task, on_dispatch=dispatched)
                assert out == echo_output(task) or who(out)[0] == miner

        callers = 2 * (1 + QUEUE)  # enough to fill both children, and more
        async with trio.open_nursery() as nursery:
            for k in range(callers):
                nursery.start_soon(caller, 1 + 20 * k)
        stats = {c.name: c for c in sup.statistics().children}
        assert stats["window_post#0"].done + stats["window_post#1"].done == 20 * callers
    assert most == {"window_post#0": 1 + QUEUE, "window_post#1": 1}


async def test_a_child_offering_a_huge_queue_is_sent_no_more_than_the_supervisors_bound():
    # The queue a Hello offers is the child's word: one offering 1000 (and answering at once,
    # as a child must to be sent its queue) is still sent at most 16 requests beyond Concurrent.
    child = python_child(
        """
        import os, sys
        from damocles_ext.protocol import dext
        from damocles_ext.tasks import WindowPoStOutput
        def send(m):
            sys.stdout.buffer.write(dext.encode(m))
            sys.stdout.buffer.flush()
        send(dext.Hello("dext/1", "window_post", os.getpid(), "greedy", "1", 1, 1000))
        dec = dext.FrameDecoder()
        while data := os.read(0, 65536):
            for msg in dec.receive_data(data):
                if isinstance(msg, dext.Request):
                    send(dext.Response(msg.id, output=WindowPoStOutput([b"p"], [])))
        """
    )
    most = 0
    async with open_supervisor([spec(child)]) as sup:
        await sup.wait_ready()
        for miner in range(1, 21):  # quick answers: it takes its queue from now on
            await sup.submit(window_task(miner=miner))

        def dispatched(name: str | None) -> None:
            nonlocal most
            if name is not None:
                most = max(most, child_stats(sup).in_flight)

        async def caller() -> None:
            for miner in range(5):
                await sup.submit(window_task(miner=miner), on_dispatch=dispatched)

        async with trio.open_nursery() as nursery:
            for _ in range(3 * (1 + QUEUE)):  # more than its bound, far fewer than its offer
                nursery.start_soon(caller)
    assert most == 1 + child_loop._MAX_QUEUE


async def test_requests_that_start_together_on_a_child_go_in_one_write(tmp_path, monkeypatch):
    # A child with Concurrent = 4 that says Hello only once the test opens its gate: the four
    # requests submitted before are started by one decision, and written to it in one write.
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    child = python_child(
        f"""
        import os, sys
        from damocles_ext.protocol import dext
        from damocles_ext.tasks import WindowPoStOutput
        os.read(os.open({str(gate)!r}, os.O_RDONLY), 1)
        def send(m):
            sys.stdout.buffer.write(dext.encode(m))
            sys.stdout.buffer.flush()
        send(dext.Hello("dext/1", "window_post", os.getpid(), "gated-hello", "1", 4))
        dec = dext.FrameDecoder()
        while data := os.read(0, 65536):
            for msg in dec.receive_data(data):
                if isinstance(msg, dext.Request):
                    send(dext.Response(msg.id, output=WindowPoStOutput([b"%d" % msg.task.miner_id], [])))
        """
    )
    writes: list[bytes] = []
    real_send = child_loop.send

    def spy(host, child, p, data: bytes) -> None:
        writes.append(data)
        real_send(host, child, p, data)

    monkeypatch.setattr(child_loop, "send", spy)
    async with open_supervisor([spec(child, concurrent=4)]) as sup:
        results: dict[int, int] = {}

        async def one(miner: int) -> None:
            results[miner] = int((await sup.submit(window_task(miner=miner))).proofs[0])

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for miner in range(1, 5):
                    nursery.start_soon(one, miner)
                await trio.testing.wait_all_tasks_blocked()
                assert writes == [] and sup.statistics().stages["window_post"].queued == 4
                fd = await trio.to_thread.run_sync(os.open, gate, os.O_WRONLY)
                os.write(fd, b"x")
                os.close(fd)
        assert results == {m: m for m in range(1, 5)}
    sent = [
        [
            m.task.miner_id
            for m in dext.FrameDecoder().receive_data(w)
            if isinstance(m, dext.Request)
        ]
        for w in writes
    ]
    assert [sorted(miners) for miners in sent if miners] == [[1, 2, 3, 4]]


async def test_a_callers_task_is_encoded_once_by_its_check_and_sent_as_those_bytes(monkeypatch):
    # submit() checks the caller's task by encoding it as its child will read it: that msgpack
    # goes to the dext child as it is (not encoded again), and the child proves the task.
    from damocles_ext.supervisor import connection
    from damocles_ext.tasks import task_check

    sent: list[msgspec.Struct] = []
    real_encode = connection.dext.encode

    def spy(message: msgspec.Struct) -> bytes:
        sent.append(message)
        return real_encode(message)

    monkeypatch.setattr(connection.dext, "encode", spy)
    task = window_task(miner=7)
    async with open_supervisor([spec(builtin_child())]) as sup:
        await sup.wait_ready("window_post", 1)
        assert await sup.submit(task) == echo_output(task)
    [request] = [m for m in sent if isinstance(m, (dext.Request, dext.RawRequest))]
    assert isinstance(request, dext.RawRequest) and bytes(request.task) == task_check(task)


async def test_a_request_queued_behind_a_long_one_is_taken_back_and_answered_once(
    tmp_path, mock_clock
):
    # A child that offers a queue and runs its requests in turn: miner 999's proof lasts until the
    # request queued behind it is cancelled. That request is taken back after TAKE_BACK_AFTER, and
    # sent again (a new id) once the child is free. The clock stands still until the test moves
    # it: so the 20 answers first are quick, as the child must be to take a queue, however loaded
    # the machine (one over QUICK_ANSWER in real time, and 7 waited, untaken, behind 999).
    seen = tmp_path / "seen"
    child = python_child(
        f"""
        import os, sys
        from damocles_ext.protocol import dext
        from damocles_ext.tasks import WindowPoStOutput
        log = open({str(seen)!r}, "a", buffering=1)
        def send(m):
            sys.stdout.buffer.write(dext.encode(m))
            sys.stdout.buffer.flush()
        def answer(r):
            send(dext.Response(r.id, output=WindowPoStOutput([b"%d" % r.task.miner_id], [])))
        send(dext.Hello("dext/1", "window_post", os.getpid(), "turns", "1", 1, 1))
        dec, long, waiting = dext.FrameDecoder(), None, []
        while data := os.read(0, 65536):
            for msg in dec.receive_data(data):
                if isinstance(msg, dext.Request):
                    log.write(f"request {{msg.id}} {{msg.task.miner_id}}\\n")
                    if msg.task.miner_id == 999:
                        long = msg
                    elif long is not None:
                        waiting.append(msg)
                    else:
                        answer(msg)
                elif isinstance(msg, dext.Cancel):
                    log.write(f"cancel {{msg.id}}\\n")
                    for r in [r for r in waiting if r.id == msg.id]:
                        waiting.remove(r)
                        send(dext.Response(r.id, error="cancelled"))
                    if long is not None:
                        answer(long)
                        long = None
                    for r in waiting:
                        answer(r)
                    waiting.clear()
        """
    )
    async with open_supervisor([spec(child, max_attempts=1)]) as sup:
        await sup.wait_ready("window_post", 1)
        for miner in range(1, 21):  # quick answers: it takes its queue from now on
            assert (await sup.submit(window_task(miner=miner))).proofs == [b"%d" % miner]
        results: dict[int, object] = {}

        async def one(miner: int) -> None:
            results[miner] = int((await sup.submit(window_task(miner=miner))).proofs[0])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 999)
            await wait_until_real(lambda: child_stats(sup).in_flight == 1)
            nursery.start_soon(one, 7)
            await wait_until_real(lambda: seen.read_text().endswith("request 22 7\n"))
            mock_clock.jump(2 * TAKE_BACK_AFTER)
            await wait_until_real(lambda: len(results) == 2, what="both answers")
        assert results == {999: 999, 7: 7}
        stats = child_stats(sup)
        assert (stats.done, stats.failed) == (22, 0)
    lines = seen.read_text().splitlines()
    assert lines[-4:] == ["request 21 999", "request 22 7", "cancel 22", "request 23 7"]


async def test_weights_spread_sequential_requests_3_to_1():
    specs = [spec(jsonl_child(), index=0, weight=3), spec(jsonl_child(), index=1, weight=1)]
    async with open_supervisor(specs) as sup:
        await sup.wait_ready("window_post", 2)
        pids = [who(await sup.submit(window_task(miner=i)))[1] for i in range(8)]
        p0 = child_stats(sup, "window_post#0").pid
        p1 = child_stats(sup, "window_post#1").pid
        assert pids.count(p0) == 6 and pids.count(p1) == 2


async def test_jsonl_responses_in_any_order_reach_their_requests():
    # Collects three requests, then answers them last first.
    handle = """
    pending.append(req)
    if len(pending) == 3:
        for r in reversed(pending):
            answer(r)
        pending.clear()
    """
    async with open_supervisor(
        [spec(jsonl_child(handle, setup="pending = []"), concurrent=3)]
    ) as sup:
        await sup.wait_ready()
        results: dict[int, int] = {}

        async def one(miner: int) -> None:
            results[miner] = who(await sup.submit(window_task(miner=miner)))[0]

        async with trio.open_nursery() as nursery:
            for miner in (11, 22, 33):
                nursery.start_soon(one, miner)
        assert results == {11: 11, 22: 22, 33: 33}


async def test_unknown_and_duplicate_response_ids_are_logged_and_dropped(caplog):
    handle = """
    sys.stdout.write(json.dumps({"id": 999, "err_msg": "stray", "output": None}) + "\\n")
    answer(req)
    answer(req)
    """
    async with open_supervisor([spec(jsonl_child(handle))]) as sup:
        await sup.wait_ready()
        first = await sup.submit(window_task(miner=1))
        second = await sup.submit(window_task(miner=2))
        assert (who(first)[0], who(second)[0]) == (1, 2)
        assert child_stats(sup, "window_post#0").restarts == 0
    text = caplog.text
    assert "unknown id 999" in text
    assert "a second response to its request 1" in text


async def test_progress_reaches_the_callback_with_the_supervisor_request_id():
    seen = []
    child = builtin_child("window_post", "sleep", "seconds=0.3", "progress_interval=0.1")
    async with open_supervisor([spec(child)]) as sup:
        await sup.wait_ready()
        out = await sup.submit(window_task(miner=4), on_progress=seen.append)
    assert out == echo_output(window_task(miner=4))
    assert seen and all(p.id == 1 for p in seen)
    assert "sleep" in {p.phase for p in seen}


async def test_stage_without_children_fails_at_once():
    async with open_supervisor([spec(jsonl_child())]) as sup:
        with pytest.raises(ProverError, match="no winning_post children are configured"):
            await sup.submit(winning_task())


@pytest.mark.parametrize(
    ("deadline", "problem"),
    [
        (float("nan"), "is not a finite number"),
        (float("inf"), "is not a finite number"),
        (float("-inf"), "is not a finite number"),
        (1e300, "is not a time between the years 0001 and 9999"),
        ("soon", "is a str, not a number of seconds"),
    ],
)
async def test_a_deadline_that_is_not_a_time_is_refused_by_the_api_naming_the_request(
    deadline, problem
):
    async with open_supervisor([spec(builtin_child())]) as sup:
        await sup.wait_ready()
        with pytest.raises(UsageError) as info:
            await sup.submit(window_task(miner=1), deadline=deadline)
        assert str(info.value).startswith("request 1 (window_post) refused: its deadline ")
        assert info.value.request_id == 1  # a front end's record of it carries the number
        assert problem in str(info.value)
        # Nothing was queued, and the supervisor goes on serving.
        assert sup.statistics().requests == 0
        assert await sup.submit(window_task(miner=2)) == echo_output(window_task(miner=2))


@pytest.mark.parametrize(
    ("task", "priority", "problem"),
    [
        # A string stopped the stage's queue (its sort key failed after the request was booked);
        # a float or a bool killed the child, whose decoder refused the frame, and failed the
        # other requests it ran.
        (None, "x", "(window_post) refused: its priority 'x' is not a whole number"),
        (None, 0.5, "(window_post) refused: its priority 0.5 is not a whole number"),
        (None, True, "(window_post) refused: its priority True is not a whole number"),
        (None, 2**70, f"(window_post) refused: its priority {2**70} is beyond a signed 64 bits"),
        (
            "a task",
            0,
            "refused: str is not a task; give a WindowPoSt or a WinningPoSt (damocles_ext.tasks)",
        ),
        # A field its child cannot read (Structs are checked when decoded, not when built):
        # each killed every child it was sent to, and three such requests made the stage FATAL.
        *(
            (
                msgspec.structs.replace(window_task(miner=1), **{field: value}),
                0,
                (
                    f"(window_post) refused: its task is not valid: {words}; build it with valid"
                    " fields"
                ),
            )
            for field, value, words in [
                ("seed", b"s" * 31, "Expected `bytes` of length >= 32 - at `$.seed`"),
                ("miner_id", -1, "Expected `int` >= 0 - at `$.miner_id`"),
                ("proof_type", "Nope", "Invalid enum value 'Nope' - at `$.proof_type`"),
                ("miner_id", "1000", "Expected `int`, got `str` - at `$.miner_id`"),
            ]
        ),
    ],
)
async def test_a_request_the_caller_got_wrong_is_refused_and_the_stage_goes_on(
    task, priority, problem
):
    async with open_supervisor([spec(builtin_child())]) as sup:
        await sup.wait_ready()
        with pytest.raises(UsageError) as info:
            await sup.submit(task or window_task(miner=1), priority=priority)
        assert str(info.value) == f"request 1 {problem}"
        assert sup.statistics().requests == 0
        assert await sup.submit(window_task(miner=2)) == echo_output(window_task(miner=2))
        assert child_stats(sup, "window_post#0").restarts == 0


async def test_requests_of_one_deadline_go_by_priority_through_the_api():
    # Each deadline (unix seconds) was put on the supervisor's clock with the two clocks read
    # afresh: requests of one deadline were microseconds apart in a random direction, and
    # their priorities were never looked at (a damocles deadline is shared by its partitions).
    async with open_supervisor([spec(builtin_child())]) as sup:
        await sup.wait_ready()
        done: list[int] = []
        all_done = trio.Event()
        deadline = time.time() + 600

        def on_done(miner: int) -> Callable[[object, object], None]:
            def record(output: object, error: object) -> None:
                assert error is None, error
                done.append(miner)
                if len(done) == 11:
                    all_done.set()

            return record

        # The first goes to the child at once; the rest wait in its queue, started together.
        for miner, priority in [(100, 0), *((p, p) for p in (3, 0, 7, 1, 9, 5, 2, 8, 4, 6))]:
            sup.start_nowait(
                window_task(miner=miner),
                deadline=deadline,
                priority=priority,
                on_done=on_done(miner),
            )
        await all_done.wait()
    assert done == [100, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"stages": "window_post"}, "Supervisor(stages='window_post'): give a list of stages"),
        ({"stages": ["nope"]}, "Supervisor(stages=...): unknown stage 'nope'; the stages are"),
        ({"shutdown_grace": -1}, "Supervisor(shutdown_grace=-1): give a number of seconds >= 0"),
        ({"shutdown_grace": float("nan")}, "Supervisor(shutdown_grace=nan): give a number"),
        ({"stop_timeout": "5"}, "Supervisor(stop_timeout='5'): give a number of seconds >= 0"),
    ],
)
def test_constructor_arguments_a_caller_got_wrong_are_refused_at_once(kwargs, problem):
    # Before, a bad grace failed only at shutdown (the running requests lost their grace), and
    # stages as a string was taken letter by letter: no child served.
    with pytest.raises(UsageError) as info:
        Supervisor([spec(builtin_child())], **kwargs)
    assert str(info.value).startswith(problem)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("max_attempts", 2.0, "its max_attempts 2.0 is not a whole number"),
        ("weight", 2.0, "its weight 2.0 is not a whole number"),
        ("concurrent", True, "its concurrent True is not a whole number"),
        ("request_timeout", "5", "its request_timeout '5' is not a number of seconds or None"),
        ("cancel_grace", None, "its cancel_grace None is not a number of seconds"),
    ],
)
def test_a_child_spec_made_by_hand_with_a_number_of_the_wrong_kind_is_refused(
    field, value, problem
):
    # A ChildSpec is a msgspec Struct, not checked as it is made. Before, the request book took
    # a MaxAttempts of 2.0 as given and failed on the child's first error answer, an internal
    # error in the middle of an event; a weight of 2.0 failed deep inside the constructor.
    with pytest.raises(UsageError) as info:
        Supervisor([spec(builtin_child(), **{field: value})])
    assert str(info.value) == f"ChildSpec 'window_post#0': {problem}"
    made = config.Config(
        source="<by hand>",
        children=[spec(builtin_child(), **{field: value})],
        warnings=[],
        tmp_root="/tmp",
    )
    with pytest.raises(UsageError, match=problem):
        Supervisor(made)
    Supervisor([spec(builtin_child(), cancel_grace=1, request_timeout=None)])  # an int is seconds


async def test_stages_may_be_any_iterable_of_stage_names():
    # An iterator was read twice, once by the check: no child was kept.
    sup = Supervisor([spec(builtin_child())], stages=(s for s in ["window_post"]))
    assert [c.name for c in sup.statistics().children] == ["window_post#0"]


async def test_an_exception_of_the_callers_block_comes_out_of_open_supervisor_as_itself():
    # Not wrapped in the nursery's ExceptionGroup: `except ProverError` around the block works.
    async def refused() -> None:
        async with open_supervisor([spec(builtin_child())]) as sup:
            await sup.wait_ready()
            await sup.submit(window_task(), deadline=float("nan"))

    async def own() -> None:
        async with open_supervisor([spec(builtin_child())]):
            raise KeyError("the caller's own")

    with pytest.raises(UsageError, match="its deadline nan"):
        await refused()
    with pytest.raises(KeyError):
        await own()


# -- crash recovery ---------------------------------------------------------------------------


async def test_crash_mid_request_is_retried_on_a_sibling():
    specs = [spec(jsonl_child("os._exit(7)"), index=0), spec(jsonl_child(), index=1)]
    async with open_supervisor(specs, backoff=FAST) as sup:
        await sup.wait_ready("window_post", 2)
        pid1 = child_stats(sup, "window_post#1").pid
        out = await sup.submit(window_task(miner=5))  # goes to #0 first (both idle, equal weight)
        assert who(out) == (5, pid1)
        crashed = child_stats(sup, "window_post#0")
        assert crashed.failed == 1
        assert "exit code 7" in crashed.last_exit


@pytest.mark.parametrize("written", ["half an answer line", "nothing"])
async def test_a_json_lines_child_that_dies_mid_answer_has_its_request_retried(tmp_path, written):
    # Killed (e.g. by the OOM killer) while writing its answer: the cut-off line is the crash's,
    # not the prover's error answer; the request is retried on the child started again, as
    # when it died before writing anything (a lone child: no sibling to retry it on).
    mark = tmp_path / "crashed"
    half = '{"id": %d, "err_msg": null, "output": {"proofs": ["AAAA' if written != "nothing" else ""
    child = jsonl_child(f"""
if not os.path.exists({str(mark)!r}):
    open({str(mark)!r}, "w").close()
    sys.stdout.write({half!r} % req["id"] if {half!r} else "")
    sys.stdout.flush()
    os._exit(137)
answer(req)""")
    async with open_supervisor([spec(child, max_attempts=2)], backoff=FAST) as sup:
        await sup.wait_ready("window_post", 1)
        first = child_stats(sup, "window_post#0").pid
        out = await sup.submit(window_task(miner=5))
        assert who(out)[0] == 5 and who(out)[1] != first
        assert "exit code 137" in child_stats(sup, "window_post#0").last_exit


async def test_last_attempt_fails_with_child_exit_status_and_attempts():
    async with open_supervisor(
        [spec(jsonl_child("os._exit(7)"), max_attempts=2)], backoff=FAST
    ) as sup:
        await sup.wait_ready()
        with pytest.raises(ProverError) as info:
            await sup.submit(window_task())
    text = str(info.value)
    assert "request 1" in text and "window_post#0" in text
    assert "exit code 7" in text and "2 attempts made" in text and "MaxAttempts = 2" in text


async def test_garbage_on_dext_stdout_kills_and_restarts_the_child(tmp_path):
    marker = tmp_path / "garbage-sent"
    handle = """
    if not os.path.exists(os.environ["MARKER"]):
        open(os.environ["MARKER"], "w").close()
        out.write(b"\\xff\\xff\\xff\\xff this is not a frame")
        out.flush()
    else:
        answer(msg)
    """
    async with open_supervisor(
        [spec(dext_child(handle), envs={"MARKER": str(marker)})], backoff=FAST
    ) as sup:
        await sup.wait_ready()
        first_pid = child_stats(sup, "window_post#0").pid
        out = await sup.submit(window_task(miner=9))
        stats = child_stats(sup, "window_post#0")
        assert who(out) == (9, stats.pid) and stats.pid != first_pid
        assert stats.restarts == 1
        assert "broke the protocol" in stats.last_exit and "framing error" in stats.last_exit
        assert not alive(first_pid)


async def test_garbage_line_on_jsonl_stdout_is_skipped(caplog):
    handle = """
    sys.stdout.write("this is not json\\n")
    answer(req)
    """
    async with open_supervisor([spec(jsonl_child(handle))]) as sup:
        await sup.wait_ready()
        pid = child_stats(sup, "window_post#0").pid
        out = await sup.submit(window_task(miner=3))
        assert who(out) == (3, pid)
        assert child_stats(sup, "window_post#0").restarts == 0
    assert "skipped a bad stdout line" in caplog.text


# -- failed starts ----------------------------------------------------------------------------


async def test_slow_ready_is_a_failed_start_and_the_child_is_killed():
    child = python_child("import os, sys; print(os.getpid(), file=sys.stderr); sys.stdin.read()")
    async with open_supervisor([spec(child, ready_timeout=0.5, auto_restart=False)]) as sup:
        with pytest.raises(ProverError, match=r"no ready message within 0.5s"):
            await sup.wait_ready()
        stats = child_stats(sup, "window_post#0")
        assert stats.state == "stopped"
        assert "it wrote nothing" in stats.last_exit and "SIGKILL" in stats.last_exit
        assert "the ReadyTimeoutSecs of its table; raise it" in stats.last_exit


async def test_a_plugin_child_slow_to_be_ready_names_what_may_delay_it():
    # A plugin installed here that imports CUDA at module level, or a prover slow to build,
    # delays every Plugin child: the failed start said only "no ready message within 5s".
    text = (
        '[[WdPost]]\nPlugin = "sleep"\nPluginOptions = { load_delay = 60 }\n'
        "ReadyTimeoutSecs = 1\nAutoRestart = false\n"
    )
    async with open_supervisor(config.parse_config(text, "slow.cfg")) as sup:
        with pytest.raises(ProverError, match=r"no ready message within 1s"):
            await sup.wait_ready()
        last = child_stats(sup, "window_post#0").last_exit
        assert "a prover plugin installed here that is slow to import" in last
        assert "ReadyTimeoutSecs" in last


async def test_wrong_ready_line_is_a_failed_start_naming_what_came():
    child = python_child("import sys; print('window_post processor warming up'); sys.stdin.read()")
    async with open_supervisor([spec(child, auto_restart=False)]) as sup:
        with pytest.raises(ProverError, match="warming up"):
            await sup.wait_ready()
        assert "instead of the ready line" in child_stats(sup, "window_post#0").last_exit
        with pytest.raises(ProverError, match="FATAL"):
            await sup.submit(window_task())


async def test_missing_damocles_worker_is_a_clear_failed_start():
    child = spec(
        ["damocles-worker", "processor", "window_post"],
        kind="damocles-worker",
        auto_restart=False,
        envs={"PATH": "/nonexistent"},
    )
    async with open_supervisor([child]) as sup:
        with pytest.raises(
            ProverError,
            match=r"damocles-worker not found on PATH; set Bin or Plugin in WdPost\[0\]",
        ):
            await sup.wait_ready()


async def test_a_bin_that_is_a_directory_is_a_failed_start_that_says_so(tmp_path):
    # Without a config check (the Python API with ChildSpecs), exec's EACCES is all there is.
    async with open_supervisor([spec([str(tmp_path)], auto_restart=False)]) as sup:
        with pytest.raises(ProverError, match=r"is a directory, not a program"):
            await sup.wait_ready()


async def test_a_bin_whose_interpreter_is_missing_is_a_failed_start_that_names_it(tmp_path):
    # exec says ENOENT, as for a missing program; the program is there, its #! line is wrong.
    script = tmp_path / "prover.sh"
    script.write_text("#!/opt/vendor/bin/python3 -u\nprint('hi')\n")
    script.chmod(0o755)
    async with open_supervisor([spec([str(script)], auto_restart=False)]) as sup:
        with pytest.raises(ProverError) as info:
            await sup.wait_ready()
    assert (
        f"program {str(script)!r} exists, but the interpreter its #! line names,"
        " '/opt/vendor/bin/python3', was not found; install it or fix the #! line"
    ) in str(info.value)
    assert 'not found"' not in str(info.value)


@pytest.mark.parametrize(
    ("make", "kind"),
    [(lambda p: os.mkfifo(p, 0o755), "a FIFO (named pipe)"), (None, "a character device")],
    ids=["fifo", "device"],
)
async def test_a_bin_that_is_not_a_regular_file_is_a_failed_start_that_says_what_it_is(
    tmp_path, make, kind
):
    path = tmp_path / "prover"
    if make is None:
        path = "/dev/zero"
    else:
        make(path)
    async with open_supervisor([spec([str(path)], auto_restart=False)]) as sup:
        with pytest.raises(ProverError, match=f"{str(path)!r} is {re.escape(kind)}, not a program"):
            await sup.wait_ready()


async def test_a_nul_in_an_env_name_is_a_failed_start_not_a_crash():
    child = spec([sys.executable, "-c", "pass"], envs={"A\x00B": "x"}, auto_restart=False)
    async with open_supervisor([child]) as sup:
        with pytest.raises(ProverError, match=r"cannot start .*: embedded null byte"):
            await sup.wait_ready()


@pytest.fixture
def patient_autojump_clock():
    # Jump only after half a real second of idleness: long enough for a real child to exit
    # (so its failure is seen as an exit, not a jumped ready timeout), short for the backoff.
    return trio.testing.MockClock(autojump_threshold=0.5)


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, float, object]] = []

    # async: a plain observer runs in a worker thread, where trio's clock cannot be read
    @hookimpl
    async def dext_child_started(self, child):
        self.events.append(("started", trio.current_time(), child.pid))

    @hookimpl
    async def dext_child_exited(self, child, status):
        self.events.append(("exited", trio.current_time(), status.returncode))


async def test_backoff_sequence_and_fatal_after_five_failed_starts(patient_autojump_clock):
    recorder = _Recorder()
    pm = get_plugin_manager(entry_points=False)
    pm.register(recorder, name="recorder")
    child = spec(python_child("import sys; sys.exit(3)"), ready_timeout=30.0)
    sup = Supervisor([child], plugin_manager=pm, clock_jitter=random.Random(42))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(ProverError, match="FATAL"):
            await sup.wait_ready()
        assert child_stats(sup, "window_post#0").state == "fatal"
        with pytest.raises(ProverError, match="no window_post child can serve") as info:
            await sup.submit(window_task())
        # the caller learns why without reading the supervisor's log
        assert "window_post#0: " in str(info.value) and "code 3" in str(info.value)
        sup.request_shutdown()
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["started", "exited"] * 5
    assert all(e[2] == 3 for e in recorder.events if e[0] == "exited")
    gaps = [recorder.events[i + 1][1] - recorder.events[i][1] for i in range(1, 9, 2)]
    expected = RestartTracker(BackoffPolicy(), rng=random.Random(42))
    delays = [expected.start_failed("x").delay for _ in range(4)]  # type: ignore[union-attr]
    assert isinstance(expected.start_failed("x"), GiveUp)
    assert gaps == pytest.approx(delays, abs=1e-9)
    assert all(0.8 * n <= d <= n for d, n in zip(gaps, (1, 2, 4, 8), strict=True))


async def test_fatal_child_leaves_the_rest_of_the_pool_serving():
    specs = [spec(python_child("import sys; sys.exit(3)"), index=0), spec(jsonl_child(), index=1)]
    async with open_supervisor(specs, backoff=BackoffPolicy(base=0.01, cap=0.02)) as sup:
        await wait_until(lambda: child_stats(sup, "window_post#0").state == "fatal", 10)
        pid1 = child_stats(sup, "window_post#1").pid
        assert who(await sup.submit(window_task(miner=2))) == (2, pid1)
        assert child_stats(sup, "window_post#0").restarts == 4


async def test_with_retry_fatal_a_fatal_child_is_tried_at_the_cap_and_serves_once_it_starts(
    tmp_path, mock_clock
):
    # A GPU driver not loaded yet at boot: the child exits 1 until it is. `run` and `serve`
    # retry such a FATAL child every `cap` seconds; meanwhile its stage fails requests at once.
    flag = tmp_path / "driver_loaded"
    setup = f"""
    if not os.path.exists({str(flag)!r}):
        sys.stderr.write("CUDA driver not loaded\\n")
        sys.exit(1)
    """
    policy = BackoffPolicy(base=1.0, cap=60.0, jitter=0.0, max_failed_starts=2, retry_fatal=True)

    def stats():
        return child_stats(sup, "window_post#0")

    async with open_supervisor([spec(jsonl_child(setup=setup))], backoff=policy) as sup:
        await wait_until_real(lambda: stats().state == "backoff", what="the first failed start")
        mock_clock.jump(1)
        await wait_until_real(lambda: stats().state == "fatal", what="FATAL")
        first = stats()
        assert first.next_start_in == 60.0  # status says when it is tried next
        assert "code 1" in first.last_exit and "CUDA driver not loaded" in first.last_exit
        with pytest.raises(ProverError, match="no window_post child can serve") as info:
            await sup.submit(window_task())
        assert "CUDA driver not loaded" in str(info.value)
        # Not before the cap...
        mock_clock.jump(59)
        await trio.testing.wait_all_tasks_blocked()
        assert stats().restarts == first.restarts and stats().next_start_in == 1.0
        # ...then once: it fails again, FATAL again, tried again 60 s later.
        mock_clock.jump(1)
        await wait_until_real(
            lambda: stats().restarts == first.restarts + 1 and stats().state == "fatal",
            what="a failed retry",
        )
        assert stats().next_start_in == 60.0
        with pytest.raises(ProverError, match="no window_post child can serve"):
            await sup.submit(window_task())
        flag.touch()  # the driver is loaded
        mock_clock.jump(60)
        await wait_until_real(lambda: stats().state == "ready", what="the retried start")
        assert who(await sup.submit(window_task(miner=5))) == (5, stats().pid)


# -- timeouts ---------------------------------------------------------------------------------


async def test_hung_child_is_cancelled_then_killed_and_restarted():
    child = builtin_child("window_post", "sleep", "fail=hang")
    async with open_supervisor(
        [spec(child, request_timeout=0.5, cancel_grace=0.3, max_attempts=1)], backoff=FAST
    ) as sup:
        await sup.wait_ready()
        first_pid = child_stats(sup, "window_post#0").pid
        with pytest.raises(ProverError, match=r"timed out after 0.5s on window_post#0") as hung:
            await sup.submit(window_task())
        assert not isinstance(hung.value, DeadlineError)  # a prover's failure (the worker's count)
        await wait_until(lambda: child_stats(sup, "window_post#0").restarts == 1, 10)
        assert "still running 0.3s after a Cancel" in child_stats(sup, "window_post#0").last_exit
        assert not alive(first_pid)
        await sup.wait_ready()


async def test_silent_dext_child_counts_as_hung_after_the_heartbeat_timeout():
    async with open_supervisor(
        [spec(dext_child("pass"), heartbeat_timeout=0.3, max_attempts=1)], backoff=FAST
    ) as sup:
        await sup.wait_ready()
        with pytest.raises(ProverError, match="hung: no Progress or Response"):
            await sup.submit(window_task())


async def test_deadline_answers_at_once_and_a_jsonl_child_is_killed_after_the_grace():
    async with open_supervisor([spec(jsonl_child("pass"), cancel_grace=0.2)], backoff=FAST) as sup:
        await sup.wait_ready()
        with pytest.raises(DeadlineError, match="passed its deadline"):  # a ProverError
            await sup.submit(window_task(), deadline=time.time() + 0.3)
        await wait_until(lambda: child_stats(sup, "window_post#0").restarts == 1, 10)
        assert "JSON lines: no Cancel" in child_stats(sup, "window_post#0").last_exit


async def test_a_request_its_stages_fastest_recent_proofs_could_not_make_in_time_is_a_deadline_error():
    # Each proof takes 0.2 s or more: once four are known, one with 0.1 s left is not started
    # (damocles-ext worker counts no failure of its prover for it). Miner 99 gets an error.
    handle = "time.sleep(0.2); answer(req, 'no' if req['task']['miner_id'] == 99 else None)"
    async with open_supervisor([spec(jsonl_child(handle))]) as sup:
        await sup.wait_ready()
        for miner in range(4):
            await sup.submit(window_task(miner=miner))
        with pytest.raises(DeadlineError, match="cannot finish before its deadline"):
            await sup.submit(window_task(), deadline=time.time() + 0.1)
        with pytest.raises(ProverError) as failed:  # a prover's error is no DeadlineError
            await sup.submit(window_task(miner=99), deadline=time.time() + 60)
        assert not isinstance(failed.value, DeadlineError)


# -- shutdown ---------------------------------------------------------------------------------


async def test_shutdown_lets_in_flight_finish_fails_queued_and_refuses_new():
    child = jsonl_child("time.sleep(0.3); answer(req)")
    sup = Supervisor([spec(child)])
    outcomes: dict[str, object] = {}

    async def submit(name: str, miner: int) -> None:
        try:
            outcomes[name] = await sup.submit(window_task(miner=miner))
        except ProverError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        nursery.start_soon(submit, "running", 1)
        await wait_until(lambda: child_stats(sup, "window_post#0").in_flight == 1)
        nursery.start_soon(submit, "queued", 2)
        await wait_until(lambda: sup.statistics().stages["window_post"].queued == 1)
        sup.request_shutdown()
        with pytest.raises(ProverError, match=r"^request 3 .* shutting down") as refused:
            await sup.submit(window_task())
        assert refused.value.request_id == 3
    assert not isinstance(outcomes["running"], Exception), outcomes["running"]
    assert who(outcomes["running"])[0] == 1
    assert "still queued" in str(outcomes["queued"])
    assert child_stats(sup, "window_post#0").state == "stopped"
    with pytest.raises(ProverError, match="refused: the supervisor has stopped"):
        await sup.submit(window_task())  # after `run` returned: not "shutting down" for ever


async def test_shutdown_kills_stubborn_children_and_their_grandchildren(tmp_path):
    # Ignores stdin EOF and SIGTERM, starts a grandchild in its group and one in its own session.
    setup = """
    import signal, subprocess
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    g1 = subprocess.Popen(["sleep", "1000"])
    g2 = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    with open(os.environ["PIDS"], "w") as f:
        f.write(json.dumps([g1.pid, g2.pid]))
    """
    pids_file = tmp_path / "pids.json"
    child = spec(jsonl_child("time.sleep(100)", setup=setup), envs={"PIDS": str(pids_file)})
    sup = Supervisor([child], shutdown_grace=0.2, stop_timeout=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        grandchildren = json.loads(pids_file.read_text())
        child_pid = child_stats(sup, "window_post#0").pid
        assert all(alive(pid) for pid in grandchildren)
        errors = await _stop_while_running(sup, nursery, sup.request_shutdown)
    assert "within the shutdown grace period (0.2s)" in str(errors[0])
    assert not alive(child_pid)
    await wait_until(lambda: not any(alive(pid) for pid in grandchildren), 5)


@pytest.mark.parametrize("left", [0.0, -1.5])
async def test_a_shutdown_with_the_grace_already_spent_waits_no_second_grace(left):
    # serve at stdin EOF waits for the requests it read within the grace, then stops the
    # supervisor with what is left of it: not a second whole grace. What is left is below 0
    # when that wait ran past the grace: run() ends as for 0, not on a negative timeout.
    sup = Supervisor(
        [spec(builtin_child("window_post", "sleep", "seconds=600"))], shutdown_grace=3600
    )
    with trio.fail_after(30):  # a second grace would be an hour
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            errors = await _stop_while_running(
                sup, nursery, lambda: sup.request_shutdown(grace_left=left)
            )
    assert "within the shutdown grace period (3600s)" in str(errors[0])


async def _stop_while_running(
    sup: Supervisor, nursery: trio.Nursery, stop: Callable[[], None]
) -> list[ProverError]:
    """Submit a request that is to fail, and call `stop()` once it runs on window_post#0; the
    list returned gets its error when it is answered."""
    errors: list[ProverError] = []

    async def submit() -> None:
        with pytest.raises(ProverError) as info:
            await sup.submit(window_task())
        errors.append(info.value)

    nursery.start_soon(submit)
    await wait_until(lambda: child_stats(sup, "window_post#0").in_flight == 1)
    stop()
    return errors


async def test_supervisor_sigkilled_takes_its_children_with_it():
    script = f"""
import sys, trio
sys.path.insert(0, {os.path.dirname(__file__)!r})
from helpers.supervisor import spec, jsonl_child
from damocles_ext.supervisor import Supervisor
async def main():
    sup = Supervisor([spec(jsonl_child(), index=0), spec(jsonl_child(), index=1)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready(count=2)
        print(*[c.pid for c in sup.statistics().children], flush=True)
        await trio.sleep_forever()
trio.run(main)
"""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some()
                assert chunk, "the supervisor subprocess exited early"
                line += chunk
        pids = [int(x) for x in line.split()]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        proc.kill()
        await proc.wait()
        await wait_until(lambda: not any(alive(pid) for pid in pids), 1.0)
    finally:
        proc.kill()
        await proc.wait()
        await proc.stdout.aclose()


# -- the child's environment ------------------------------------------------------------------


async def test_env_cpuset_and_tmpdir_are_applied_before_the_child_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DEXT_TEST_INHERITED", "yes")
    report = tmp_path / "report.json"
    tmpdir = tmp_path / "gpu0" / "tmp"
    setup = """
    with open(os.environ["REPORT"], "w") as f:
        json.dump({"cpus": sorted(os.sched_getaffinity(0)), "env": dict(os.environ)}, f)
    """
    envs = {"REPORT": str(report), "TMPDIR": str(tmpdir), "PATH": os.environ["PATH"], "FOO": "bar"}
    child = spec(jsonl_child(setup=setup), envs=envs, inherit_envs=False, cpuset=frozenset({0}))
    async with open_supervisor([child]) as sup:
        await sup.wait_ready()
    data = json.loads(report.read_text())
    assert data["cpus"] == [0]
    assert data["env"]["FOO"] == "bar" and "DEXT_TEST_INHERITED" not in data["env"]
    assert stat.S_IMODE(tmpdir.stat().st_mode) == 0o700


# The per-GPU TMPDIR `<tmp root>/<stage>-gpu<i>/` (from Gpus) is private: the default tmp root
# is in /tmp, where another user can create these names first.

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
OTHER_UID = 65534


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv(config.TMP_ROOT_ENV, str(root))
    return root


def prepare_gpu_tmpdir(tmpdir) -> None:
    prepare_spawn("window_post#0", "window_post", 0, [sys.executable], "bin", os.environ,
                  None, tmpdir=f"{tmpdir}/", private_tmpdir=True)  # fmt: skip


def test_a_new_per_gpu_tmpdir_and_its_tmp_root_are_created_private(tmp_root):
    old_umask = os.umask(0)  # a permissive umask must not leave anything open to others
    try:
        prepare_gpu_tmpdir(tmp_root / "window_post-gpu0")
    finally:
        os.umask(old_umask)
    for d in (tmp_root, tmp_root / "window_post-gpu0"):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        assert stat.S_IMODE(st.st_mode) == 0o700, d


def test_a_tmp_root_with_missing_parents_starts_under_a_group_writable_umask(tmp_path, monkeypatch):
    # RHEL's user private groups (umask 002): os.makedirs made the missing parents 0775, which
    # the check after it refused as writable by others, so check-config said OK and then every
    # spawn failed. Both now say it can start, and the spawn makes them 0755.
    root = tmp_path / "a" / "b" / "root"
    monkeypatch.setenv(config.TMP_ROOT_ENV, str(root))
    old_umask = os.umask(0o002)
    try:
        assert (
            config.startup_problems(
                config.parse_config('[[WdPost]]\nBin = "sh"\nGpus = [0]\n', "t.cfg").children
            )
            == []
        )
        prepare_gpu_tmpdir(root / "window_post-gpu0")
    finally:
        os.umask(old_umask)
    for made, mode in ((tmp_path / "a", 0o755), (tmp_path / "a" / "b", 0o755), (root, 0o700)):
        assert stat.S_IMODE(os.lstat(made).st_mode) == mode, made
    assert stat.S_IMODE(os.lstat(root / "window_post-gpu0").st_mode) == 0o700


def test_a_loose_per_gpu_tmpdir_of_ours_is_tightened_in_a_shared_sticky_root(tmp_root):
    # The root may be /tmp itself (DAMOCLES_EXT_TMP_ROOT=/tmp): mode 1777, left as it is; the
    # sticky bit keeps others from replacing the per-GPU directory, which is made 0700.
    (tmp_root / "window_post-gpu0").mkdir(parents=True)
    os.chmod(tmp_root, 0o1777)
    os.chmod(tmp_root / "window_post-gpu0", 0o777)
    prepare_gpu_tmpdir(tmp_root / "window_post-gpu0")
    assert stat.S_IMODE(os.lstat(tmp_root / "window_post-gpu0").st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(tmp_root).st_mode) == 0o1777


def test_a_tmp_root_others_may_write_without_a_sticky_bit_is_refused_not_changed(tmp_root):
    tmp_root.mkdir()
    os.chmod(tmp_root, 0o777)
    with pytest.raises(SpawnError, match=r"may be written by other users and has no sticky bit.*"
                       r"chmod go-w or \+t it"):  # fmt: skip
        prepare_gpu_tmpdir(tmp_root / "window_post-gpu0")
    assert stat.S_IMODE(os.lstat(tmp_root).st_mode) == 0o777
    assert not (tmp_root / "window_post-gpu0").exists()


def test_a_tmp_root_that_is_our_own_symlink_is_followed(tmp_root, tmp_path):
    # An operator's link to a directory of theirs (a faster disk, say).
    (tmp_path / "fast").mkdir(mode=0o700)
    tmp_root.symlink_to(tmp_path / "fast")
    prepare_gpu_tmpdir(tmp_root / "window_post-gpu0")
    assert stat.S_IMODE(os.lstat(tmp_path / "fast" / "window_post-gpu0").st_mode) == 0o700


@needs_root
def test_a_per_gpu_tmpdir_owned_by_another_user_is_refused(tmp_root):
    tmpdir = tmp_root / "window_post-gpu0"
    tmpdir.mkdir(parents=True)
    os.chown(tmpdir, OTHER_UID, OTHER_UID)
    with pytest.raises(SpawnError) as caught:
        prepare_gpu_tmpdir(tmpdir)
    assert str(caught.value) == (
        f"window_post#0: TMPDIR {tmpdir}/ of WdPost[0] is owned by uid {OTHER_UID}, not by us"
        f" (uid {os.geteuid()}); refusing to use it (another user could read or replace the"
        " prover's temporary files and bellperson's GPU lock files there). Remove it, or set"
        " TMPDIR in the Envs of WdPost[0] to a directory of your own"
    )


def test_a_per_gpu_tmpdir_that_is_a_symlink_is_refused(tmp_root, tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    tmp_root.mkdir(mode=0o700)
    (tmp_root / "window_post-gpu0").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SpawnError, match=r"window_post#0: TMPDIR .*/window_post-gpu0/ of"
                       r" WdPost\[0\] is a symlink; refusing to use it .* Remove it, or set"
                       r" TMPDIR in the Envs of WdPost\[0\]"):  # fmt: skip
        prepare_gpu_tmpdir(tmp_root / "window_post-gpu0")


@needs_root
def test_a_tmp_root_owned_by_another_user_or_a_symlink_is_refused(tmp_root, tmp_path):
    tmp_root.mkdir()
    os.chown(tmp_root, OTHER_UID, OTHER_UID)
    root = re.escape(str(tmp_root))
    refused = (
        rf"the tmp root {root}, where WdPost\[0\] gets its TMPDIR .* is owned by uid {OTHER_UID},"
        r" not by us or root.* Fix or remove it, or set DAMOCLES_EXT_TMP_ROOT to a directory of"
        r" your own"
    )
    with pytest.raises(SpawnError, match=refused):
        prepare_gpu_tmpdir(tmp_root / "window_post-gpu0")
    tmp_root.rmdir()
    (tmp_path / "theirs").mkdir()
    tmp_root.symlink_to(tmp_path / "theirs")
    os.lchown(tmp_root, OTHER_UID, OTHER_UID)  # another user's link, planted in /tmp
    with pytest.raises(SpawnError, match=rf"the tmp root {root}, .* is a symlink owned by uid"):
        prepare_gpu_tmpdir(tmp_root / "window_post-gpu0")
    assert not (tmp_path / "theirs" / "window_post-gpu0").exists()


@needs_root
@pytest.mark.parametrize("linked", [False, True], ids=["made-there", "our-link-there"])
def test_a_tmp_root_under_a_directory_another_user_owns_is_refused(tmp_path, linked):
    # Its owner could rename our root away and put one of theirs in its place after the checks:
    # the children, given their TMPDIR as a path, would then use theirs. The same of our link
    # to our own directory, in theirs: the children get their TMPDIR through the link, which
    # its owner can swap for one to a directory of theirs.
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    if linked:
        (theirs / "root").symlink_to(ours)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    root = theirs / "root"
    with pytest.raises(SpawnError) as caught:
        prepare_gpu_tmpdir(root / "window_post-gpu0")
    assert str(caught.value) == (
        f"window_post#0: the tmp root {root}, where WdPost[0] gets its TMPDIR"
        f" {root}/window_post-gpu0/, is under a directory another user could change: directory"
        f" {theirs} is owned by uid {OTHER_UID}, not by us or root, so its owner could replace"
        " what is in it; refusing to use it (another user could read or replace the prover's"
        " temporary files and bellperson's GPU lock files there). Fix or remove it, or set"
        " DAMOCLES_EXT_TMP_ROOT to a directory of your own"
    )
    assert not (root / "window_post-gpu0").exists() and list(ours.iterdir()) == []


@needs_root
async def test_a_per_gpu_tmpdir_of_another_user_is_a_clear_failed_start(tmp_root):
    tmpdir = tmp_root / "window_post-gpu0"
    tmpdir.mkdir(parents=True)
    os.chown(tmpdir, OTHER_UID, OTHER_UID)
    child = spec(
        jsonl_child(), envs={"TMPDIR": f"{tmpdir}/"}, private_tmpdir=True, auto_restart=False
    )
    async with open_supervisor([child]) as sup:
        with pytest.raises(ProverError, match=re.escape(f"{tmpdir}/ of WdPost[0] is owned by")):
            await sup.wait_ready()
        last_exit = child_stats(sup, "window_post#0").last_exit
        assert last_exit.startswith(f"failed to start: window_post#0: TMPDIR {tmpdir}/ of")
        assert "Traceback" not in last_exit


async def test_a_tmpdir_from_envs_is_left_as_it_is(tmp_path):
    # Envs may point TMPDIR at a directory shared on purpose (even /tmp): created if missing,
    # never checked or chmodded; only the ones Gpus makes (private_tmpdir) are.
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    prepare_spawn("window_post#0", "window_post", 0, [sys.executable], "bin", os.environ,
                  None, tmpdir=f"{shared}/")  # fmt: skip
    assert stat.S_IMODE(os.lstat(shared).st_mode) == 0o777
    prepare_spawn("window_post#0", "window_post", 0, [sys.executable], "bin", os.environ,
                  None, tmpdir=f"{tmp_path / 'new'}/")  # fmt: skip
    assert stat.S_IMODE(os.lstat(tmp_path / "new").st_mode) == 0o700


async def test_child_stderr_is_relogged_with_stage_index_and_pid(caplog):
    caplog.set_level(logging.INFO, logger="damocles_ext.child")
    child = jsonl_child(setup="sys.stderr.write('loading parameters\\n'); sys.stderr.flush()")
    async with open_supervisor([spec(child, index=0)]) as sup:
        await sup.wait_ready()
        pid = child_stats(sup, "window_post#0").pid
        expected = f"[window_post#0 pid={pid}] loading parameters"
        await wait_until(lambda: expected in caplog.text)


async def test_observers_see_children_and_requests():
    seen: list[tuple] = []

    class Observer:
        @hookimpl
        def dext_child_ready(self, child):
            seen.append(("ready", child.name))

        @hookimpl
        async def dext_request_started(self, request):
            seen.append(("started", request.id, request.child, request.attempt))

        @hookimpl
        def dext_request_finished(self, request, outcome, duration):
            seen.append(("finished", request.id, outcome))

        @hookimpl
        def dext_child_exited(self, child, status):
            seen.append(("exited", child.name, status.reason))

    pm = get_plugin_manager(entry_points=False)
    pm.register(Observer(), name="observer")
    async with open_supervisor([spec(jsonl_child())], plugin_manager=pm) as sup:
        await sup.wait_ready()
        await sup.submit(window_task())
    assert seen == [
        ("ready", "window_post#0"),
        ("started", 1, "window_post#0", 1),
        ("finished", 1, "ok"),
        ("exited", "window_post#0", "stopped (shutdown)"),
    ]


async def test_cancelled_caller_does_not_break_the_child_for_the_next_request():
    async with open_supervisor([spec(dext_child())]) as sup:
        await sup.wait_ready()
        with trio.move_on_after(0) as scope:
            await sup.submit(window_task(miner=1))
        assert scope.cancelled_caught
        assert who(await sup.submit(window_task(miner=2)))[0] == 2


def logging_child(seen) -> list[str]:
    """A dext child that writes "request <miner>" for each request and "cancel <id>" for each
    Cancel to `seen`; miner 1's request runs until it is cancelled (it reports progress first),
    the others are answered at once."""
    return dext_child(
        """
        log.write(f"request {msg.task.miner_id}\\n")
        if msg.task.miner_id == 1:
            send(dext.Progress(msg.id, "working", 0, 1))
        else:
            send(dext.Response(msg.id, output=WindowPoStOutput([b"p"], [])))
        """,
        setup=f"log = open({str(seen)!r}, 'a', buffering=1)",
        cancel="""
        log.write(f"cancel {msg.id}\\n")
        send(dext.Response(msg.id, error="cancelled"))
        """,
    )


async def test_a_caller_cancelled_before_it_submits_sends_its_child_nothing(tmp_path):
    seen = tmp_path / "seen"
    async with open_supervisor([spec(logging_child(seen), concurrent=2)]) as sup:
        await sup.wait_ready()
        with trio.CancelScope() as scope:
            scope.cancel()
            await sup.submit(window_task(miner=1))
        assert scope.cancelled_caught
        assert (await sup.submit(window_task(miner=2))).proofs == [b"p"]
        assert child_stats(sup).in_flight == 0
    assert seen.read_text().splitlines() == ["request 2"]


async def test_a_caller_cancelled_while_its_request_runs_has_its_child_told_to_stop(tmp_path):
    seen = tmp_path / "seen"
    async with open_supervisor([spec(logging_child(seen), concurrent=2)]) as sup:
        await sup.wait_ready()
        await cancel_once_running(sup, window_task(miner=1))
        await wait_until_real(lambda: child_stats(sup).in_flight == 0, what="the cancel answered")
        assert (await sup.submit(window_task(miner=2))).proofs == [b"p"]  # and it serves on
        assert child_stats(sup).done == 1
    assert seen.read_text().splitlines() == ["request 1", "cancel 1", "request 2"]


async def test_a_request_open_when_run_is_cancelled_is_answered_not_left_waiting():
    # run() cancelled by its caller's scope (not request_shutdown) while a request runs on a
    # child that never answers: its caller, outside that scope, is answered with an error
    # (removing run()'s last fail_all failed no test: it waited for ever).
    sup = Supervisor([spec(dext_child("pass"))])  # takes requests, answers none
    answers: list[BaseException] = []

    async def caller() -> None:
        try:
            await sup.submit(window_task(miner=1))
        except ProverError as exc:
            answers.append(exc)

    with trio.fail_after(30):
        async with trio.open_nursery() as callers:
            with trio.CancelScope() as run_scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(sup.run)
                    await sup.wait_ready()
                    callers.start_soon(caller)
                    await wait_until_real(lambda: child_stats(sup).in_flight == 1)
                    run_scope.cancel()
    [answer] = answers
    assert "request 1" in str(answer) and "the supervisor stopped before it was answered" in str(
        answer
    ), answer


async def test_every_request_is_answered_once_while_a_child_is_sigkilled_repeatedly():
    handle = "time.sleep(0.01); answer(req)"
    specs = [
        spec(jsonl_child(handle), index=0, concurrent=4, max_attempts=3),
        spec(jsonl_child(handle), index=1, concurrent=4, max_attempts=3),
    ]
    answers: dict[int, list[object]] = {miner: [] for miner in range(200)}
    kills = 0
    async with open_supervisor(specs, backoff=BackoffPolicy(base=0.05, cap=0.2)) as sup:
        await sup.wait_ready(count=2)

        submitted = 0

        async def one(miner: int) -> None:
            nonlocal submitted
            submitted += 1
            try:
                answers[miner].append(await sup.submit(window_task(miner=miner)))
            except ProverError as exc:
                answers[miner].append(exc)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for miner in answers:
                    nursery.start_soon(one, miner)
                await wait_until(lambda: submitted == len(answers))
                while sup.statistics().requests:
                    pid = child_stats(sup, "window_post#0").pid
                    if pid is not None and alive(pid):
                        os.kill(pid, 9)
                        kills += 1
                    await trio.sleep(0.1)  # the kill cadence (load), not synchronisation
        # Nothing is left behind in the bookkeeping either.
        sizes = sup._book.sizes()
        assert not sup._waiters and sizes["requests"] == sizes["attempts"] == 0, sizes
        assert sizes["running"] == sizes["queued"] == 0, sizes
    assert kills >= 1
    assert all(len(got) == 1 for got in answers.values())
    for miner, (got,) in answers.items():
        assert isinstance(got, ProverError) or who(got)[0] == miner


async def test_statistics_show_backoff_and_shutdown_does_not_wait_for_the_restart():
    specs = [
        spec(jsonl_child("os._exit(5)"), index=0, max_attempts=1),
        spec(jsonl_child(stage="winning_post"), index=0, stage="winning_post"),
    ]
    sup = Supervisor(specs, stages=["window_post"], backoff=BackoffPolicy(base=30.0, cap=30.0))
    # The 30 s restart wait must not hold up the shutdown.
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            assert [c.name for c in sup.statistics().children] == ["window_post#0"]
            before = trio.current_time()  # the exit comes after it: its restart 24 to 30 s later
            with pytest.raises(ProverError, match="exit code 5"):
                await sup.submit(window_task())
            await wait_until(lambda: child_stats(sup, "window_post#0").state == "backoff")
            stats = child_stats(sup, "window_post#0")
            # (30 s less a jitter of up to 20%, less the time since the exit)
            assert 24.0 - (trio.current_time() - before) <= stats.next_start_in <= 30.0
            assert stats.pid is None and stats.failed == 1 and stats.restarts == 1
            sup.request_shutdown()
    assert child_stats(sup, "window_post#0").state == "stopped"


async def test_open_supervisor_reads_a_config_file_with_a_plugin_child(tmp_path, caplog):
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text('[[WdPost]]\nPlugin = "echo"\nConcurrent = 2\n\n[[WinPost]]\nPlugin = "echo"\n')
    async with open_supervisor(str(cfg)) as sup:
        await sup.wait_ready(count=2)
        assert await sup.submit(window_task(miner=8)) == echo_output(window_task(miner=8))
        assert await sup.submit(winning_task(miner=9)) == echo_output(winning_task(miner=9))
        names = sorted(c.name for c in sup.statistics().children)
        assert names == ["window_post#0", "winning_post#0"]
    # Concurrent reaches the plugin runtime (its Hello agrees), which would otherwise prove one
    # request at a time while we send two.
    assert "its Hello says capacity" not in caplog.text


async def test_timed_out_request_is_retried_on_a_sibling_and_the_silent_child_killed(
    mock_clock, caplog
):
    # Time moves only when the test jumps it: the timeout of #0 passes when the test says, and
    # the sibling's answer, however slow on a loaded machine, comes before its own timeout.
    caplog.set_level(logging.INFO, "damocles_ext")
    specs = [
        spec(jsonl_child("pass"), index=0, request_timeout=0.3, cancel_grace=0.2),
        spec(jsonl_child(), index=1, request_timeout=0.3),
    ]
    async with open_supervisor(specs, backoff=FAST) as sup:
        await sup.wait_ready(count=2)
        pid0 = child_stats(sup, "window_post#0").pid
        pid1 = child_stats(sup, "window_post#1").pid
        outputs = []

        async def submit() -> None:
            outputs.append(await sup.submit(window_task(miner=6)))  # #0 first: it never answers

        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(0.31)  # past #0's RequestTimeoutSecs: the request goes to #1
            await trio.testing.wait_all_tasks_blocked()
            # The answer of #1 reaches the caller without waiting for #0 to be killed.
            # #1 (a real process) answers in real time; time does not move for #0 meanwhile.
            await wait_until_real(lambda: bool(outputs), what="answer while #0 still lives")
            mock_clock.jump(0.25)  # past #0's CancelGraceSecs, not past #1's timeout
        [out] = outputs
        assert who(out) == (6, pid1)
        await wait_until_real(lambda: child_stats(sup, "window_post#0").restarts == 1)
        assert (
            "request 1 (child id 1) still running 0.2s"
            in child_stats(sup, "window_post#0").last_exit
        )
    # Both records carry the request's id and the fields of the child it timed out on (JSON
    # logs), though the request went on to #1 at once.
    (retried,) = (r for r in caplog.records if "retrying (attempt 2" in r.getMessage())
    (killed,) = (r for r in caplog.records if "killing its process group" in r.getMessage())
    for record in (retried, killed):
        fields = tuple(vars(record).get(k) for k in ("request_id", "child", "stage", "pid"))
        assert fields == (1, "window_post#0", "window_post", pid0), record.getMessage()


async def test_a_request_retried_on_a_sibling_is_answered_without_waiting_for_the_first_to_die():
    # A JSON-lines child cannot be cancelled: the timed-out one is killed after CancelGraceSecs
    # (a minute here). The caller, which was reading that child's pipe, used to stay there until
    # the kill, though the sibling had answered long before.
    specs = [
        spec(jsonl_child("pass"), index=0, request_timeout=0.5, cancel_grace=60.0),
        spec(jsonl_child(), index=1),
    ]
    async with open_supervisor(specs, backoff=FAST) as sup:
        await sup.wait_ready(count=2)
        pid1 = child_stats(sup, "window_post#1").pid
        with trio.fail_after(20):  # far below the 60 s grace, generous for a loaded machine
            out = await sup.submit(window_task(miner=7))  # #0 first: it never answers
        assert who(out) == (7, pid1)


async def test_plugin_child_with_a_quiet_prover_is_not_taken_for_hung(tmp_path):
    # The prover reports nothing for 1 s; the runtime's keep-alive must beat the 0.5 s timeout.
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text(
        '[[WdPost]]\nPlugin = "sleep"\nHeartbeatTimeoutSecs = 0.5\nMaxAttempts = 1\n'
        "[WdPost.PluginOptions]\nseconds = 1.0\nprogress_interval = 5.0\n"
    )
    async with open_supervisor(str(cfg)) as sup:
        await sup.wait_ready()
        assert await sup.submit(window_task(miner=3)) == echo_output(window_task(miner=3))
        assert child_stats(sup, "window_post#0").restarts == 0


def test_a_split_window_posts_error_keeps_its_class_when_earlier_rounds_are_added():
    from damocles_ext.supervisor.split import _with_earlier

    late = _with_earlier(DeadlineError("passed its deadline"), ["the SNARK step of ...: no"])
    assert isinstance(late, DeadlineError) and "before that, the SNARK step" in str(late)
    assert type(_with_earlier(ProverError("no"), ["x"])) is ProverError
