"""The scheduling rules through the real supervisor, with real child processes.

Each child is a small dext/1 program that, for every request, writes "start"/"end" lines to a
log and in between blocks reading one byte from a named pipe (its gate). The test lets a request
finish by writing one byte to that pipe, and learns what the supervisor started from the
`dext_request_started` / `dext_request_finished` observer hooks: no sleeps, no polling.
"""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing
from helpers.scheduling import (
    GATED_CHILD,
    Gate,
    child_log,
    gated,
    submit_in_order,
    wd_and_win_gates,
)
from helpers.supervisor import (
    builtin_child,
    child_stats,
    python_child,
    spec,
    wait_until_real,
    window_task,
    winning_task,
)

from damocles_ext.api import open_supervisor
from damocles_ext.errors import DeadlineError, ProverError

WD, WIN = "window_post", "winning_post"


async def test_winning_post_overtakes_queued_window_posts_which_then_start_by_deadline(
    tmp_path, recorder
):
    rec, pm = recorder
    with wd_and_win_gates(tmp_path) as (log, wd_gate, win_gate):
        children = [
            gated(tmp_path, WD, 0, wd_gate, log, locks=("gpu:0",)),
            gated(tmp_path, WIN, 0, win_gate, log, locks=("gpu:0",)),
        ]
        async with open_supervisor(children, plugin_manager=pm, stop_timeout=2.0) as sup:
            await sup.wait_ready(WD)
            await sup.wait_ready(WIN)
            async with trio.open_nursery() as nursery:
                now = time.time()
                # 1: a WindowPoSt takes gpu:0. Then, while it runs: WindowPoSts due in 300 s,
                # 100 s and 200 s (2, 3, 4) and a WinningPoSt (5), all waiting for gpu:0.
                await submit_in_order(sup, nursery, [(window_task(miner=1), None)])
                assert await rec.next("started") == ("started", 1, f"{WD}#0")
                await submit_in_order(
                    sup,
                    nursery,
                    [
                        (window_task(miner=2), now + 300),
                        (window_task(miner=3), now + 100),
                        (window_task(miner=4), now + 200),
                        (winning_task(miner=5), now + 60),
                    ],
                )
                stages = sup.statistics().stages
                assert (stages[WD].queued, stages[WIN].queued) == (3, 1)
                order = []
                for gate in (wd_gate, win_gate, wd_gate, wd_gate):
                    gate.release()  # the running request ends; gpu:0 is free
                    _, rid, child = await rec.next("started")
                    order.append((rid, child))
                assert order == [(5, f"{WIN}#0"), (3, f"{WD}#0"), (4, f"{WD}#0"), (2, f"{WD}#0")]
                wd_gate.release()
    # The children's own view: the same order, and never two requests at once on gpu:0.
    assert child_log(log) == [
        f"start {WD}#0 1",
        f"end {WD}#0 1",
        f"start {WIN}#0 5",
        f"end {WIN}#0 5",
        f"start {WD}#0 3",
        f"end {WD}#0 3",
        f"start {WD}#0 4",
        f"end {WD}#0 4",
        f"start {WD}#0 2",
        f"end {WD}#0 2",
    ]
    assert [e for e in rec.log if e[0] == "finished"] == [
        ("finished", r, "ok") for r in (1, 5, 3, 4, 2)
    ]


async def test_two_children_with_one_lock_never_run_at_once(tmp_path, recorder):
    rec, pm = recorder
    log = tmp_path / "log"
    log.touch()
    gate = Gate(tmp_path / "gate")  # shared: only the child that runs reads from it
    children = [gated(tmp_path, WD, i, gate, log, locks=("gpu:0",)) for i in range(2)]
    try:
        async with open_supervisor(children, plugin_manager=pm, stop_timeout=2.0) as sup:
            await sup.wait_ready(WD, count=2)
            async with trio.open_nursery() as nursery:
                await submit_in_order(
                    sup, nursery, [(window_task(miner=m), None) for m in range(1, 7)]
                )
                # Six requests, two idle children: the lock lets exactly one start.
                assert sum(c.in_flight for c in sup.statistics().children) == 1
                used = set()
                for _ in range(6):
                    _, rid, child = await rec.next("started")
                    used.add(child)
                    gate.release()
                    assert (await rec.next("finished"))[1] == rid
    finally:
        gate.close()
    assert used == {f"{WD}#0", f"{WD}#1"}  # both children served, one at a time
    lines = child_log(log)
    assert [line.split()[0] for line in lines] == ["start", "end"] * 6
    assert all(a.split()[1:] == b.split()[1:] for a, b in zip(lines[::2], lines[1::2], strict=True))
    started = [e for e in rec.log if e[0] == "started"]
    for i, event in enumerate(rec.log):  # supervisor's view: a start only after the finish
        if event[0] == "started" and i + 1 < len(rec.log):
            assert rec.log[i + 1] == ("finished", event[1], "ok")
    assert len(started) == 6


async def test_request_past_its_deadline_fails_at_once_and_never_reaches_a_child(
    tmp_path, recorder
):
    rec, pm = recorder
    log = tmp_path / "log"
    log.touch()
    gate = Gate(tmp_path / "gate")
    children = [gated(tmp_path, WD, 0, gate, log)]
    try:
        async with open_supervisor(children, plugin_manager=pm, stop_timeout=2.0) as sup:
            await sup.wait_ready(WD)
            # Already past when submitted, with an idle child ready to take it.
            with trio.fail_after(2), pytest.raises(ProverError) as info:
                await sup.submit(window_task(miner=1), deadline=time.time() - 1)
            message = str(info.value)
            assert "request 1 (window_post)" in message
            assert "deadline passed" in message and "it was not sent to a prover" in message
            assert "attempt" not in message  # no attempt was made
            # Passing while it waits behind a running request: it fails at its deadline, and
            # the request ahead of it is not disturbed.
            async with trio.open_nursery() as nursery:
                await submit_in_order(sup, nursery, [(window_task(miner=2), None)])
                assert await rec.next("started") == ("started", 2, f"{WD}#0")
                with trio.fail_after(5), pytest.raises(ProverError) as info:
                    await sup.submit(window_task(miner=3), deadline=time.time() + 0.2)
                assert "request 3 (window_post)" in str(info.value)
                assert "it was not sent to a prover" in str(info.value)
                assert await rec.next("finished") == ("finished", 3, "timeout")
                gate.release()
                assert await rec.next("finished") == ("finished", 2, "ok")
    finally:
        gate.close()
    assert child_log(log) == [f"start {WD}#0 2", f"end {WD}#0 2"]
    assert [e for e in rec.log if e[0] == "started"] == [("started", 2, f"{WD}#0")]
    assert [e for e in rec.log if e[0] == "finished"] == [
        ("finished", 1, "timeout"),
        ("finished", 3, "timeout"),
        ("finished", 2, "ok"),
    ]


PHASED_CHILD = GATED_CHILD.replace('"gated", "1", 1))', '"gated", "1", 2))').replace(
    '            os.write(log, f"start {name} {msg.task.miner_id}\\n".encode())',
    '            os.write(log, f"start {name} {msg.task.miner_id}\\n".encode())\n'
    '            send(dext.Progress(msg.id, "vanilla", 0, 1))\n'
    '            send(dext.Progress(msg.id, "snark", 0, 0))',
)


async def test_pipelined_child_gets_its_next_job_a_vanilla_phase_before_its_gpu_frees(
    tmp_path, recorder, mock_clock
):
    # Virtual time (the clock moves only when the test jumps it): a child that reports its SNARK
    # phase, Concurrent = 2. Its first SNARK takes 100 s; the vanilla phase takes no time.
    rec, pm = recorder
    log = tmp_path / "log"
    log.touch()
    gate = Gate(tmp_path / "gate")
    argv = [*python_child(PHASED_CHILD), WD, f"{WD}#0", str(gate.path), str(log)]
    phases = trio.open_memory_channel[str](100)

    def on_progress(progress) -> None:
        phases[0].send_nowait(progress.phase)

    async def snark_started() -> None:
        with trio.fail_after(10):
            while await phases[1].receive() != "snark":
                pass

    try:
        # HeartbeatTimeoutSecs off: in a jump of virtual time no keep-alive can come.
        async with open_supervisor(
            [spec(argv, concurrent=2, heartbeat_timeout=0)], plugin_manager=pm, stop_timeout=2.0
        ) as sup:
            await sup.wait_ready(WD)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: sup.submit(window_task(miner=1), on_progress=on_progress)
                )
                await snark_started()
                mock_clock.jump(100)
                gate.release()
                assert await rec.next("finished") == ("finished", 1, "ok")
                nursery.start_soon(
                    lambda: sup.submit(window_task(miner=2), on_progress=on_progress)
                )
                assert await rec.next("started") == ("started", 2, f"{WD}#0")
                await snark_started()
                await submit_in_order(sup, nursery, [(window_task(miner=3), None)])
                # A free slot, but the GPU is busy for ~100 s more: request 3 stays queued, free
                # to go to any GPU that frees first.
                assert sup.statistics().stages[WD].queued == 1
                mock_clock.jump(50)
                await trio.testing.wait_all_tasks_blocked()
                assert sup.statistics().stages[WD].queued == 1
                mock_clock.jump(60)  # past the moment its GPU is expected to free
                assert await rec.next("started") == ("started", 3, f"{WD}#0")
                gate.release()
                gate.release()
    finally:
        gate.close()


async def test_a_winning_post_child_too_slow_for_the_deadline_gets_none_its_sibling_makes_in_time(
    recorder, mock_clock
):
    # Virtual time: the sleep prover of #0 takes 25 s, #1 answers at once; each WinningPoSt has
    # 20 s. The first goes to #0 (nothing known yet: round robin) and is cancelled at its
    # deadline; the next ones go to #1 although #0 is idle too (round robin: every other one).
    rec, pm = recorder
    slow, fast = f"{WIN}#0", f"{WIN}#1"
    children = [  # HeartbeatTimeoutSecs off: in a jump of virtual time no keep-alive can come
        spec(builtin_child(WIN, "sleep", "seconds=25"), stage=WIN, index=0, heartbeat_timeout=0),
        spec(builtin_child(WIN, "sleep", "seconds=0"), stage=WIN, index=1, heartbeat_timeout=0),
    ]

    async def lost() -> None:
        with pytest.raises(DeadlineError, match=f"passed its deadline .* on {slow}"):
            await sup.submit(winning_task(miner=1), deadline=time.time() + 20)

    async with open_supervisor(children, plugin_manager=pm, stop_timeout=2.0) as sup:
        await sup.wait_ready(WIN, count=2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lost)
            assert await rec.next("started") == ("started", 1, slow)
            mock_clock.jump(21)  # no answer by its deadline: it ran 21 s at least
            assert await rec.next("finished") == ("finished", 1, "timeout")
        # It answers the cancel within its progress interval (0.5 s of real time): idle.
        await wait_until_real(lambda: child_stats(sup, slow).in_flight == 0, what="cancel")
        for miner in range(2, 6):
            await sup.submit(winning_task(miner=miner), deadline=time.time() + 20)
            assert await rec.next("started") == ("started", miner, fast)
            assert await rec.next("finished") == ("finished", miner, "ok")


TWO_SLOTS_CHILD = GATED_CHILD.replace('"gated", "1", 1))', '"gated", "1", 2))')


async def test_a_queued_request_whose_caller_went_away_frees_the_lock_it_kept_at_once(
    tmp_path, recorder
):
    # A WinningPoSt waiting for gpu:0 keeps it from the WindowPoSts queued behind it, though
    # the WindowPoSt child holding gpu:0 has a slot free. Its caller going away must let the
    # WindowPoSt start at once, not when something else happens (removing the dispatch of
    # the book's caller_gone failed no test before: the WindowPoSt waited for request 1).
    rec, pm = recorder
    with wd_and_win_gates(tmp_path) as (log, wd_gate, win_gate):
        wd_argv = [*python_child(TWO_SLOTS_CHILD), WD, f"{WD}#0", str(wd_gate.path), str(log)]
        children = [
            spec(wd_argv, stage=WD, concurrent=2, locks=("gpu:0",)),
            gated(tmp_path, WIN, 0, win_gate, log, locks=("gpu:0",)),
        ]
        async with open_supervisor(children, plugin_manager=pm, stop_timeout=2.0) as sup:
            await sup.wait_ready(WD)
            await sup.wait_ready(WIN)
            async with trio.open_nursery() as nursery:
                await submit_in_order(sup, nursery, [(window_task(miner=1), None)])
                assert await rec.next("started") == ("started", 1, f"{WD}#0")
                async with trio.open_nursery() as winning:
                    await submit_in_order(sup, winning, [(winning_task(miner=2), None)])
                    await submit_in_order(sup, nursery, [(window_task(miner=3), None)])
                    stages = sup.statistics().stages
                    assert (stages[WIN].queued, stages[WD].queued) == (1, 1)
                    winning.cancel_scope.cancel()
                assert await rec.next("finished") == ("finished", 2, "cancelled")
                assert await rec.next("started") == ("started", 3, f"{WD}#0")
                wd_gate.release()
                wd_gate.release()
    assert child_log(log) == [
        f"start {WD}#0 1",
        f"end {WD}#0 1",
        f"start {WD}#0 3",
        f"end {WD}#0 3",
    ]
