"""Misbehaving children: each test spawns a real child that breaks a rule on purpose
and checks that the supervisor survives it, says what happened, and keeps serving.

Children are small Python programs (`python -u -c`) built with helpers.supervisor, or the
built-in child runtime. Waits are on events or bounded polling of process state, never sleeps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import time
from collections import deque
from collections.abc import Iterator

import psutil
import pytest
import trio
import trio.testing
from helpers.supervisor import (
    alive,
    builtin_child,
    child_stats,
    dext_child,
    python_child,
    spec,
    wait_until,
    who,
    window_task,
    winning_task,
)

from damocles_ext.errors import ProverError
from damocles_ext.logs import JsonFormatter
from damocles_ext.supervisor import Supervisor, stderr_relay
from damocles_ext.supervisor.restart import BackoffPolicy

FAST = BackoffPolicy(base=0.02, cap=0.08)


pytestmark = pytest.mark.usefixtures("no_leftover_processes")


# -- a child that cannot start says why ---------------------------------------------------------


async def test_a_prover_that_cannot_load_fails_the_start_with_the_childs_own_reason():
    child = spec(builtin_child("window_post", "nope"))
    sup = Supervisor([child], backoff=BackoffPolicy(base=0.01, cap=0.02, max_failed_starts=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(ProverError) as info:
            await sup.wait_ready()
        sup.request_shutdown()
    # The child exits 2 after writing the reason on stderr; the supervisor quotes it.
    assert "unknown prover 'nope'" in str(info.value)
    stats = child_stats(sup)
    assert stats.state == "fatal"
    assert "exit code 2" in stats.last_exit and "unknown prover 'nope'" in stats.last_exit


async def test_a_child_exiting_with_an_error_after_ready_has_its_last_stderr_line_quoted():
    # Exit 3 with a message on the first request; the request is lost (MaxAttempts = 1).
    crash = python_child(
        """
        import sys
        sys.stdout.write("window_post processor ready\\n")
        sys.stdin.readline()
        sys.stderr.write("fatal: the GPU fell off the bus\\n")
        sys.exit(3)
        """
    )
    said, _ = await the_one_failure(crash)
    assert "exit code 3" in said
    assert "the GPU fell off the bus" in said


async def the_one_failure(argv: list[str]) -> tuple[str, Supervisor]:
    """What a request to a lone child running `argv` fails with (MaxAttempts = 1), and the
    supervisor after it."""
    sup = Supervisor([spec(argv, max_attempts=1)], backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        with pytest.raises(ProverError) as info:
            await sup.submit(window_task())
        sup.request_shutdown()
    return str(info.value), sup


@pytest.mark.parametrize("crash", ["SIGSEGV", "SIGABRT"])
async def test_a_child_that_crashes_on_a_request_names_what_it_runs_in_the_error(crash):
    # What a native library's bad pointer (or its abort()) does to the child running it.
    faulty = dext_child(f"os.kill(os.getpid(), signal.{crash})", setup="import os, signal")
    error, sup = await the_one_failure(faulty)
    # ("exited (killed by ...)" or "closed its stdout; killed by ...": whichever is seen first.)
    said = rf"killed by {crash}\)?; a crash of {re.escape(shlex.join(faulty)[:200])}"
    assert re.search(said, child_stats(sup).last_exit)
    assert re.search(rf"killed by {crash}\)?; a crash of /", error)  # shortened there


async def test_a_child_killed_from_outside_is_not_called_a_crash():
    sup = Supervisor([spec(dext_child(), max_attempts=1)], backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        os.kill(child_stats(sup).pid, signal.SIGKILL)  # as the kernel's OOM killer does
        await wait_until(lambda: child_stats(sup).last_exit is not None)
        sup.request_shutdown()
    assert "killed by SIGKILL" in child_stats(sup).last_exit
    assert "crash" not in child_stats(sup).last_exit


# -- a child that exits right after its ready message, forever ---------------------------------


async def test_a_child_exiting_right_after_ready_backs_off_to_the_cap_then_is_fatal_cheaply(
    caplog,
):
    caplog.set_level(logging.INFO, "damocles_ext.supervisor")
    quitter = python_child(
        """
        import sys
        sys.stdout.write("window_post processor ready\\n")
        sys.exit(0)
        """
    )
    policy = BackoffPolicy(base=0.1, cap=0.4, jitter=0.0, max_failed_starts=6)
    sup = Supervisor([spec(quitter)], backoff=policy)
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    wall_before = time.monotonic()
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await wait_until(lambda: child_stats(sup).state == "fatal", 20, "FATAL")
        wall = time.monotonic() - wall_before
        cpu = sum(me.cpu_times()[:2]) - cpu_before
        sup.request_shutdown()
    delays = [
        float(r.getMessage().rsplit(" ", 1)[1].rstrip("s"))
        for r in caplog.records
        if "restarting in" in r.getMessage()
    ]
    assert delays == [0.1, 0.2, 0.4, 0.4, 0.4]  # doubling to the cap, then FATAL at the 6th
    stats = child_stats(sup)
    assert stats.state == "fatal" and stats.restarts == 5
    assert "FATAL: exited 6 times in a row after its ready message without answering" in caplog.text
    # 1.5 s of backoff: the supervisor sleeps through it (no busy loop, no restart storm). The
    # CPU it does use is mostly the six fork+exec's and log lines.
    print(f"supervisor CPU {cpu:.3f} s over {wall:.2f} s wall")
    assert wall >= 1.5
    assert cpu < 0.25 * wall


async def test_a_ready_message_followed_at_once_by_an_exit_is_always_a_ready_start(caplog):
    # The supervisor may see the exit before it has read the ready message from the pipe. The
    # start still succeeded: every one of these runs is an exit after ready, none a failed start
    # ("before its ready message"), so the child is FATAL after exactly max_failed_starts runs.
    caplog.set_level(logging.INFO, "damocles_ext.supervisor")
    quitter = python_child(
        """
        import sys
        sys.stdout.write("window_post processor ready\\n")
        sys.stdout.flush()
        sys.exit(3)
        """
    )
    runs = 30
    policy = BackoffPolicy(base=0.001, cap=0.002, jitter=0.0, max_failed_starts=runs)
    sup = Supervisor([spec(quitter)], backoff=policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await wait_until(lambda: child_stats(sup).state == "fatal", 60, "FATAL")
        sup.request_shutdown()
    assert "before its ready message" not in caplog.text
    assert f"FATAL: exited {runs} times in a row after its ready message" in caplog.text
    assert child_stats(sup).restarts == runs - 1


def test_exits_after_serving_or_after_a_stable_run_never_add_up_to_fatal():
    from damocles_ext.supervisor.restart import GiveUp, RestartTracker

    tracker = RestartTracker(BackoffPolicy(max_failed_starts=3))
    for now in range(0, 100, 10):  # it answered requests each time: a crash, not a loop
        tracker.ready(float(now))
        assert not isinstance(tracker.exited(now + 1.0, "crash", served=True), GiveUp)
    for now in range(100, 200, 10):
        tracker.ready(float(now))  # 60 s ready without requests, then an exit: still fine
        assert not isinstance(tracker.exited(now + 60.0, "crash", served=False), GiveUp)
    tracker.ready(300.0)
    tracker.exited(301.0, "quit", served=False)
    tracker.ready(302.0)
    tracker.exited(303.0, "quit", served=False)
    tracker.ready(304.0)
    decision = tracker.exited(305.0, "quit", served=False)
    assert isinstance(decision, GiveUp) and decision.fatal


# -- protocol abuse ----------------------------------------------------------------------------


async def test_dext_answers_to_ids_never_given_or_given_twice_are_dropped_and_the_child_kept(
    caplog,
):
    caplog.set_level(logging.WARNING, "damocles_ext.supervisor")
    # Request 1: stray answers to ids never sent (0, 999, a huge one), then the real answer.
    # Request 2: first a second answer to request 1 (a replay with another payload), then the
    # real one; the replay must not be taken for request 2's answer.
    handle = """
    if msg.id == 1:
        for stray in (0, 999, 2**63):
            send(dext.Response(stray, error="stray"))
    else:
        send(dext.Response(1, output=WindowPoStOutput([b"replayed"], [424242])))
    answer(msg)
    """
    async with open_supervisor_fast([spec(dext_child(handle))]) as sup:
        await sup.wait_ready()
        first = await sup.submit(window_task(miner=1))
        second = await sup.submit(window_task(miner=2))
        stats = child_stats(sup)
    assert who(first)[0] == 1 and who(second)[0] == 2
    assert stats.restarts == 0 and stats.done == 2 and stats.failed == 0
    for stray in ("unknown id 0 ", "unknown id 999 ", f"unknown id {2**63} "):
        assert stray in caplog.text
    assert "a second response to its request 1 dropped" in caplog.text


async def test_an_output_of_the_wrong_stage_is_an_error_for_that_request_only():
    handle = """
    from damocles_ext.tasks import WinningPoStOutput
    if msg.task.miner_id == 1:
        send(dext.Response(msg.id, output=WinningPoStOutput([b"x"])))
    else:
        answer(msg)
    """
    async with open_supervisor_fast([spec(dext_child(handle))]) as sup:
        await sup.wait_ready()
        with pytest.raises(ProverError, match="answered with a winning_post output"):
            await sup.submit(window_task(miner=1))
        assert who(await sup.submit(window_task(miner=2)))[0] == 2
        assert child_stats(sup).restarts == 0


async def test_an_output_with_neither_proofs_nor_faults_or_an_empty_proof_is_an_error_for_that_request_only():
    # It was passed on as a success (damocles-manager got no proof and no fault); the native
    # prover's ABI already refused it of a library.
    handle = """
    from damocles_ext.tasks import WindowPoStOutput, WinningPoStOutput
    if msg.task.miner_id == 1:
        send(dext.Response(msg.id, output=WindowPoStOutput([], [])))
    elif msg.task.miner_id == 2:
        send(dext.Response(msg.id, output=WinningPoStOutput([])))
    elif msg.task.miner_id == 4:
        send(dext.Response(msg.id, output=WinningPoStOutput([b""])))
    else:
        answer(msg)
    """
    children = [
        spec(dext_child(handle)),
        spec(dext_child(handle, stage="winning_post"), stage="winning_post"),
    ]
    async with open_supervisor_fast(children) as sup:
        await sup.wait_ready(count=2)
        with pytest.raises(ProverError, match=r"\(pid \d+\) answered with neither proofs nor"):
            await sup.submit(window_task(miner=1))
        with pytest.raises(ProverError, match="answered with neither proofs nor faults"):
            await sup.submit(winning_task(miner=2))
        # An empty proof, which damocles-manager would submit to the chain.
        with pytest.raises(ProverError, match="answered with proof 0 of 0 bytes"):
            await sup.submit(winning_task(miner=4))
        assert who(await sup.submit(window_task(miner=3)))[0] == 3
        assert child_stats(sup).restarts == 0


async def test_a_winning_post_error_on_the_lone_winning_child_runs_again_on_it_within_its_block(
    caplog,
):
    # Most operators run one [[WinPost]] child: a passing error there (CUDA out of memory while
    # a WindowPoSt held the GPU's memory) lost the block; once more on it often proves in time.
    # Its 1st and 3rd requests fail, the 2nd and 4th prove: the first WinningPoSt proves at its
    # second attempt, the second fails twice and its error says both.
    caplog.set_level(logging.WARNING, "damocles_ext")
    handle = """
    seen.append(msg.id)
    if len(seen) in (1, 3, 4):
        send(dext.Response(msg.id, error="CUDA error 2: out of memory (%d)" % len(seen)))
    else:
        proof = b"%d %d" % (msg.task.miner_id, os.getpid())
        send(dext.Response(msg.id, output=WinningPoStOutput([proof])))
    """
    setup = "from damocles_ext.tasks import WinningPoStOutput\nseen = []"
    child = dext_child(handle, setup, stage="winning_post")
    async with open_supervisor_fast([spec(child, stage="winning_post")]) as sup:
        await sup.wait_ready("winning_post")
        pid = child_stats(sup, "winning_post#0").pid
        sent: list[str] = []
        assert who(await sup.submit(winning_task(miner=7), on_dispatch=sent.append)) == (7, pid)
        assert sent == ["winning_post#0", None, "winning_post#0"]  # (None: it waits again)
        with pytest.raises(ProverError) as info:
            await sup.submit(winning_task(miner=8))
        stats = child_stats(sup, "winning_post#0")
        assert (stats.done, stats.failed, stats.restarts, stats.pid) == (1, 3, 0, pid)
    assert str(info.value) == (
        f"request 2 (winning_post): failed on winning_post#0 (pid {pid}): CUDA error 2: out of"
        " memory (4); 2 attempts made (attempt 1 on winning_post#0: CUDA error 2: out of memory"
        " (3))"
    )
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2
    assert retries[0].startswith(
        f"request 1: failed on winning_post#0 (pid {pid}): CUDA error 2: out of memory (1); no"
        " other winning_post child can give a second opinion"
    )
    assert retries[0].endswith("it runs again, once; retrying (attempt 2 of 2)")


def one_broken(fail: str, when: str, max_attempts: int = 2) -> list:
    """Two dext children; window_post#0 runs `fail` (code, per Request `msg`) when `when` holds
    (an expression), and answers otherwise, as #1 always does."""
    handle = f"""
    if os.environ.get("BROKEN") and ({when}):
        {fail}
    else:
        answer(msg)
    """
    return [
        spec(dext_child(handle), index=0, envs={"BROKEN": "1"}, max_attempts=max_attempts),
        spec(dext_child(handle), index=1, max_attempts=max_attempts),
    ]


async def test_a_child_that_fails_every_request_at_once_is_benched_and_its_sibling_takes_the_work(
    caplog,
):
    # A GPU gone bad under a child that does not crash: every request fails at once. Always idle,
    # it was the least loaded child and took half the requests, failing them all.
    caplog.set_level(logging.WARNING, "damocles_ext")
    broken = 'send(dext.Response(msg.id, error="CUDA error 999: unknown error"))'
    async with open_supervisor_fast(one_broken(broken, "True")) as sup:
        await sup.wait_ready(count=2)
        good_pid = child_stats(sup, "window_post#1").pid
        for i in range(30):  # one at a time, both children idle each time; 3 miners' tasks
            miner = 1000 + i % 3
            assert who(await sup.submit(window_task(miner=miner))) == (miner, good_pid)
        broken = child_stats(sup, "window_post#0")
        # Each of its errors ran again on the sibling, which proved it; its third error in a
        # row (the sibling having proved for one of those miners since the first) benched it,
        # and none of the other requests went to it. Without either, 15 of the 30 failed.
        assert (broken.failed, broken.done, broken.restarts) == (3, 0, 0)
        assert 0 < broken.benched_for <= 30  # in status: "ready, benched 29s"
        assert child_stats(sup, "window_post#1").done == 30
    (bench,) = [r for r in caplog.records if "takes no request" in r.getMessage()]
    assert "answered its last 3 requests with an error" in bench.getMessage()
    retried = [r for r in caplog.records if "CUDA error 999" in r.getMessage()]
    assert len(retried) == 3
    assert all("retrying (attempt 2 of 2)" in r.getMessage() for r in retried)
    # In JSON logs, the bench and each retry carry the child's fields (its process that failed),
    # and each retry the request's id, as its message names it.
    about = {"child": "window_post#0", "stage": "window_post", "index": 0, "pid": broken.pid}
    for record in (bench, *retried):
        doc = json.loads(JsonFormatter().format(record))
        assert {k: doc.get(k) for k in about} == about, doc
    for record in retried:
        rid = json.loads(JsonFormatter().format(record)).get("request_id")
        assert record.getMessage().startswith(f"request {rid}: "), rid


class _BrokenChildWatch:
    """An inline observer: the requests sent to window_post#0 and its ready processes."""

    def __init__(self) -> None:
        self.sent = self.readies = 0
        self._ready = trio.Event()

    def dext_request_started(self, request) -> None:
        self.sent += request.child == "window_post#0"

    def dext_child_ready(self, child) -> None:
        if child.name == "window_post#0":
            self.readies += 1
            self._ready.set()
            self._ready = trio.Event()

    async def wait_readies(self, count: int) -> None:
        while self.readies < count:
            await self._ready.wait()


async def test_a_child_that_answers_an_error_and_exits_each_time_is_benched_despite_its_restarts():
    # Restarted after the base delay (it answered), each process failed one request, and each
    # fresh process forgot the error and ended any bench: it took every other request for ever.
    from damocles_ext.api import open_supervisor

    exits = (
        'send(dext.Response(msg.id, error="CUDA error 999: unknown error")); '
        "sys.stdout.flush(); os._exit(1)"
    )
    watch = _BrokenChildWatch()
    async with open_supervisor(
        one_broken(exits, "True"), backoff=FAST, inline_observers=[watch]
    ) as sup:
        await sup.wait_ready(count=2)
        good_pid = child_stats(sup, "window_post#1").pid
        for i in range(30):  # one at a time, both children up each time
            sent, readies = watch.sent, watch.readies
            miner = 1000 + i % 3
            assert who(await sup.submit(window_task(miner=miner))) == (miner, good_pid)
            if watch.sent > sent:  # it failed that one and exited: its next process first
                await watch.wait_readies(readies + 1)
        # Three errors in a row, one per process, bench it; its next process is on probation
        # (a restart may clear a GPU error), and its error benches it again, restarts or not.
        assert watch.sent == 4
        assert child_stats(sup, "window_post#0").benched_for > 0


async def test_an_error_on_one_child_is_proved_by_another_before_it_is_the_answer():
    # damocles-manager gives up a partition batch on an error: a GPU that failed one request
    # (out of memory, say) is not the last word while a sibling can try it.
    oom = 'send(dext.Response(msg.id, error="CUDA error 2: out of memory"))'
    async with open_supervisor_fast(one_broken(oom, "msg.task.miner_id == 1")) as sup:
        await sup.wait_ready(count=2)
        pids = {c.name: c.pid for c in sup.statistics().children}
        got = [who(await sup.submit(window_task(miner=1))) for _ in range(4)]
        assert got == [(1, pids["window_post#1"])] * 4
        assert child_stats(sup, "window_post#0").failed >= 1  # it had its turns, and failed
        # With MaxAttempts = 1 the error is the answer.
    async with open_supervisor_fast(one_broken(oom, "msg.task.miner_id == 1", 1)) as sup:
        await sup.wait_ready(count=2)
        outcomes = []
        for _ in range(4):
            try:
                await sup.submit(window_task(miner=1))
                outcomes.append("ok")
            except ProverError as exc:
                assert "CUDA error 2: out of memory" in str(exc)
                outcomes.append("error")
        assert outcomes == ["error", "ok", "error", "ok"]  # the children take turns


async def test_a_child_that_closes_stdout_but_keeps_running_is_killed_and_its_request_retried(
    tmp_path,
):
    marker = tmp_path / "closed-once"
    # First process: closes its stdout on the first request and goes on living (ignoring
    # SIGTERM and stdin EOF). Second process: answers.
    handle = """
    if not os.path.exists(os.environ["MARKER"]):
        open(os.environ["MARKER"], "w").write(str(os.getpid()))
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.close(1)
        while True:
            time.sleep(1)
    answer(msg)
    """
    child = spec(dext_child(handle, setup="import signal, time"), envs={"MARKER": str(marker)})
    async with open_supervisor_fast([child]) as sup:
        await sup.wait_ready()
        out = await sup.submit(window_task(miner=6))
        stats = child_stats(sup)
    first_pid = int(marker.read_text())
    assert who(out) == (6, stats.pid) and stats.pid != first_pid
    assert "closed its stdout" in stats.last_exit and "SIGKILL" in stats.last_exit
    assert not alive(first_pid)


async def test_a_1_gib_frame_length_kills_the_child_without_the_supervisor_buffering_it():
    # The prefix announces 1 GiB, then the child writes as fast as it can until killed.
    handle = """
    out.write(struct.pack(">I", 1 << 30))
    chunk = b"\\0" * (1 << 20)
    while True:
        out.write(chunk)
    """
    me = psutil.Process()
    rss_before = me.memory_info().rss
    async with open_supervisor_fast(
        [spec(dext_child(handle, setup="import struct"), max_attempts=1)]
    ) as sup:
        await sup.wait_ready()
        with pytest.raises(ProverError) as info:
            await sup.submit(window_task())
        rss_after = me.memory_info().rss
    assert "frame length 1073741824 exceeds the maximum" in str(info.value)
    assert "broke the protocol" in str(info.value)
    print(f"supervisor RSS grew {(rss_after - rss_before) / 2**20:.1f} MiB")
    assert rss_after - rss_before < 32 * 2**20


async def test_a_stderr_flood_is_relogged_in_pieces_and_capped_while_requests_are_answered(
    tmp_path,
):
    # 4 MiB lines of 100 bytes and one 8 MiB line without a newline, from a thread, while the
    # main thread answers requests. All of it was logged: 1 GB of log in 5 s from a child
    # writing without end.
    marker = tmp_path / "flood-done"
    setup = f"""
    import threading
    def flood():
        line = b"x" * 99 + b"\\n"
        for _ in range(40):
            os.write(2, line * 1000)
        os.write(2, b"y" * (8 << 20))
        os.write(2, b"\\nflood done\\n")
        open({str(marker)!r}, "w").close()
    threading.Thread(target=flood, daemon=True).start()
    """
    me = psutil.Process()
    rss_before = me.memory_info().rss

    started = time.monotonic()
    with counting_child_lines() as seen:
        async with open_supervisor_fast([spec(dext_child(setup=setup))]) as sup:
            await sup.wait_ready()
            for i in range(50):
                assert who(await sup.submit(window_task(miner=i)))[0] == i
            await wait_until(marker.exists, 20, "the end of the flood")
            rss_after = me.memory_info().rss
        elapsed = time.monotonic() - started
    # A burst is logged whole, then at most the rate; what is dropped is said, with its count.
    cap = stderr_relay.STDERR_BURST + stderr_relay.STDERR_LINES_PER_SECOND * elapsed + 1
    assert seen.x_lines + seen.y_pieces <= cap
    assert seen.x_lines >= min(40_000, stderr_relay.STDERR_BURST) and seen.dropped > 30_000
    # ...in a warning a second at most (one per line let through doubled what was logged).
    assert seen.warnings <= elapsed + 2, (seen.warnings, elapsed)
    # The newline-less line arrives as pieces of at most 8 KiB, never buffered whole.
    assert seen.longest < 8192 + 100
    print(f"supervisor RSS grew {(rss_after - rss_before) / 2**20:.1f} MiB")
    assert rss_after - rss_before < 32 * 2**20


async def test_the_stderr_cap_keeps_a_burst_then_the_rate_and_counts_what_it_drops(autojump_clock):
    lines = b"".join(b"line %d\n" % i for i in range(stderr_relay.STDERR_BURST + 500))
    send, receive = trio.testing.memory_stream_one_way_pair()
    seen = _Count()
    logger = logging.getLogger("test.stderr.cap")
    logger.addHandler(seen)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    tail: deque[str] = deque(maxlen=2)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stderr_relay.relay_stderr, receive, "child:", logger, None, tail)
            await send.send_all(lines)
            await trio.testing.wait_all_tasks_blocked()
            assert seen.logged == stderr_relay.STDERR_BURST  # the clock stood still: no refill
            await trio.sleep(1.0)  # the (mock) clock: a second's worth of lines again
            await send.send_all(b"".join(b"later %d\n" % i for i in range(1000)))
            await send.aclose()
    finally:
        logger.removeHandler(seen)
    assert seen.logged == stderr_relay.STDERR_BURST + stderr_relay.STDERR_LINES_PER_SECOND
    assert seen.dropped == 500 + 1000 - stderr_relay.STDERR_LINES_PER_SECOND
    assert list(tail) == ["later 998", "later 999"]  # a failed start still says why


async def test_the_stderr_cap_holds_across_the_restarts_of_a_child_that_floods_and_dies():
    # Each process answers, writes more than a burst of lines and dies; the cap was each
    # process's own, so a crash loop was logged at a fresh burst per process (~2,000 lines/s).
    flood = stderr_relay.STDERR_BURST + 1000
    handle = f"""
    answer(msg)
    os.write(2, (b"x" * 99 + b"\\n") * {flood})
    os._exit(1)
    """
    started = trio.current_time()
    with counting_child_lines() as seen:
        async with open_supervisor_fast([spec(dext_child(handle))]) as sup:
            await sup.wait_ready()
            for i in range(5):
                assert who(await sup.submit(window_task(miner=i)))[0] == i
            # Four processes' floods read whole (each wrote them before it died).
            await wait_until(lambda: seen.x_lines + seen.dropped >= 4 * flood, 20, "the floods")
        elapsed = trio.current_time() - started
    cap = stderr_relay.STDERR_BURST + stderr_relay.STDERR_LINES_PER_SECOND * elapsed + 1
    assert seen.x_lines <= cap, (seen.x_lines, cap, elapsed)
    assert seen.dropped > 0 and seen.warnings <= elapsed + 6  # said at most once a second


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.x_lines = self.y_pieces = self.longest = self.logged = self.dropped = 0
        self.warnings = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if (found := _DROPPED.search(text)) is not None:
            self.dropped += int(found[1])
            self.warnings += 1
            return
        self.logged += 1
        self.x_lines += text.endswith("x" * 99)
        self.y_pieces += text.endswith("y")
        self.longest = max(self.longest, len(text))


_DROPPED = re.compile(r" (\d+) stderr lines dropped: it wrote over")


# -- stubborn children at shutdown ------------------------------------------------------------


async def test_a_dext_child_ignoring_shutdown_and_sigterm_is_sigkilled_after_the_stop_timeout(
    caplog,
):
    caplog.set_level(logging.INFO, "damocles_ext.supervisor")
    handle = "answer(msg)"
    setup = """
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    """
    # The stock fake child exits on Shutdown; this one also ignores it (and stdin EOF).
    argv = dext_child(handle, setup=setup)
    argv[-1] = (
        argv[-1]
        .replace("sys.exit(0)", "pass")
        .replace("if not data:\n        break", "if not data:\n        signal.pause()")
    )
    sup = Supervisor([spec(argv)], stop_timeout=0.3, backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        pid = child_stats(sup).pid
        assert who(await sup.submit(window_task(miner=3)))[0] == 3
        started = time.monotonic()
        sup.request_shutdown()
    took = time.monotonic() - started
    assert not alive(pid)
    assert "still running 0.3s after it was asked to stop; SIGTERM" in caplog.text
    assert "killed by SIGKILL" in child_stats(sup).last_exit
    assert took < 0.3 + 0.3 + 2.0  # Shutdown wait + SIGTERM wait + the kill and reap


LINGERING_PLUGIN = """
import threading
from concurrent import futures
from damocles_ext.hookspecs import ProverSpec, hookimpl
from damocles_ext_plugins.testing import echo_output

class Lingering:
    name = "lingers"
    stages = ("window_post",)

    def prove(self, task, progress, cancel):
        return echo_output(task)

def factory(options):
    # a vendor library's poller: not a daemon, and it never ends
    threading.Thread(target=threading.Event().wait, name="vendor-poller").start()
    prover = Lingering()
    # the prover's idle executor's worker: no daemon either, but Python's exit ends it (unsaid)
    prover.pool = futures.ThreadPoolExecutor(thread_name_prefix="idle-pool")
    prover.pool.submit(int).result()
    return prover

@hookimpl
def dext_provers():
    return [ProverSpec("lingers", ("window_post",), factory)]
"""


async def test_a_childs_thread_that_is_no_daemon_does_not_hold_it_past_shutdown(tmp_path, caplog):
    from helpers.child import make_plugin_dist

    from damocles_ext.api import open_supervisor

    caplog.set_level(logging.INFO)
    make_plugin_dist(tmp_path, dist="lingers", module="lingers_plugin", source=LINGERING_PLUGIN)
    child = spec(builtin_child("window_post", "lingers"), envs={"PYTHONPATH": str(tmp_path)})
    with trio.fail_after(60):
        async with open_supervisor([child], stop_timeout=30.0, backoff=FAST) as sup:
            await sup.wait_ready("window_post")
            await sup.submit(window_task(miner=3))
    assert "after it was asked to stop; SIGTERM" not in caplog.text
    assert "stopped (shutdown); exit code 0" in caplog.text
    assert (
        "prover lingers (plugin lingers_plugin): thread 'vendor-poller', not a daemon, still runs"
        " after the child ended; exiting without waiting for it"
    ) in caplog.text


def open_supervisor_fast(children):
    from damocles_ext.api import open_supervisor

    return open_supervisor(children, backoff=FAST)


async def test_a_dead_childs_request_is_retried_at_once_though_a_daemonized_grandchild_holds_its_pipes(
    tmp_path,
):
    marker = tmp_path / "grandchild.pid"
    # First request: start a grandchild in its own session that inherits stdout and stderr (the
    # pipes to the supervisor) and outlives us, then die. Later requests: answer.
    handle = """
    if not os.path.exists(os.environ["MARKER"]):
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)
        open(os.environ["MARKER"], "w").write(str(g.pid))
        os._exit(7)
    answer(msg)
    """
    env = {"MARKER": str(marker)}
    children = [
        spec(dext_child(handle, setup="import subprocess"), index=i, envs=env) for i in (0, 1)
    ]
    try:
        async with open_supervisor_fast(children) as sup:
            await sup.wait_ready(count=2)
            started = time.monotonic()
            out = await sup.submit(window_task(miner=8))
            took = time.monotonic() - started
            assert who(out) == (8, child_stats(sup, "window_post#1").pid)
            assert "exit code 7" in child_stats(sup, "window_post#0").last_exit
    finally:
        if marker.exists():
            psutil.Process(int(marker.read_text())).kill()
    # The answers of a dead child are in its pipe already; EOF, which the grandchild holds
    # back, is not waited for (it used to cost the full 5 s reap timeout).
    assert took < 2.0


@contextlib.contextmanager
def counting_child_lines() -> Iterator[_Count]:
    """The child logger's lines counted (not kept: a flood must not be held by the test, nor by
    pytest's log capture) while in the block."""
    seen = _Count()
    child_logger = logging.getLogger("damocles_ext.child")
    saved = child_logger.level, child_logger.propagate
    child_logger.addHandler(seen)
    child_logger.setLevel(logging.INFO)
    child_logger.propagate = False
    try:
        yield seen
    finally:
        child_logger.removeHandler(seen)
        child_logger.setLevel(saved[0])
        child_logger.propagate = saved[1]
