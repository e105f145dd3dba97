"""`damocles-ext worker` against a coordinator that misbehaves (tests/helpers/hostile_coordinator.py:
a scripted JSON-RPC server over real HTTP, beside the worker in the test's trio run; real
children): answers of the wrong shape, HTTP errors, connections cut mid-answer, answers that never
come, stop signals for jobs the worker never had. Each scenario checks that the worker stays up,
says what happened naming the job (or the coordinator), answers each job it took exactly once,
and backs off rather than asking again at full speed."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from helpers.frontend import plugin_block
from helpers.hostile_coordinator import CUT, NO_RESULT, SILENT, Error, HostileCoordinator, Page
from test_worker import children, job_input, start_worker, worker_settings

from damocles_ext.frontends.worker import Worker
from damocles_ext.frontends.worker_beats import failed
from damocles_ext.jobs.client import RpcConnectionError, RpcProtocolError, RpcTimeout
from damocles_ext.jobs.worker_rules import Backoff, UnheldStops, UnprovedRounds
from damocles_ext.sectors.locator import SectorLocator

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

ECHO = plugin_block("WdPost", "echo", concurrent=2)
#: Proofs that last until the test stops the worker (its heartbeats are what the test watches),
#: two at once: a slot stays free while one runs.
LONG = plugin_block("WdPost", "sleep", concurrent=2, seconds=60, progress_interval=0.05)


def job(job_id: str, lease: str | None = "L1", try_num: int = 1, **input_fields: Any) -> dict:
    """A job as Dext.AllocateJobs gives it (Venus.WdPoStAllocateJobs: `lease=None`), its input's
    fields replaced by `input_fields`."""
    given: dict[str, Any] = {"Id": job_id, "Input": msgspec.to_builtins(job_input())}
    given["Input"].update(input_fields)
    if lease is not None:
        given |= {"Lease": lease, "TryNum": try_num}
    return given


def first(*jobs: Any) -> Callable[[list, int], Any]:
    """An allocation handler that gives `jobs` at its first call, none after."""
    return lambda params, n: list(jobs) if n == 1 else []


def venus(script: dict[str, Any]) -> dict[str, Any]:
    """A damocles-manager's script: no Dext.* method (the worker speaks Venus.* after one try)."""
    return {"Dext.AllocateJobs": None, **script}


def beats(coordinator: HostileCoordinator) -> int:
    return coordinator.count("Dext.HeartbeatJobs") + coordinator.count("Venus.WdPoStHeartbeatJobs")


def allocations(coordinator: HostileCoordinator) -> int:
    return coordinator.count("Dext.AllocateJobs") + coordinator.count("Venus.WdPoStAllocateJobs")


@contextlib.asynccontextmanager
async def against(
    tmp_path,
    script: dict[str, Any],
    prover: str = ECHO,
    locator: SectorLocator | None = None,
    **settings: Any,
):
    """(coordinator, worker): the worker running against a coordinator scripted by `script` (a
    method given None has no handler: go-jsonrpc's -32601), for 60 s at most; stopped at the end
    of the body, which must see it end on its own (no exception: it stayed up). Heartbeats every
    0.05 s and a shutdown grace of 0.1 s unless `settings` say otherwise: the proofs still running
    at the end are the test's own, cut short."""
    settings.setdefault("heartbeat_interval", 0.05)
    settings.setdefault("shutdown_grace", 0.1)
    coordinator = HostileCoordinator({k: v for k, v in script.items() if v is not None})
    for method in [k for k, v in script.items() if v is None]:
        del coordinator.script[method]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.serve)
            kids = children(tmp_path, prover)
            worker = Worker(worker_settings(coordinator.address, kids, **settings), locator=locator)
            running = await start_worker(nursery, worker)
            yield coordinator, worker
            await running.stop()
            nursery.cancel_scope.cancel()


async def until(worker: Worker, coordinator: HostileCoordinator, condition) -> None:
    """Wait until `condition()` holds, looked at after each change of the worker and each call
    the coordinator gets."""
    async with trio.open_nursery() as nursery:
        for wait in (worker.wait_for(condition), coordinator.wait_for(lambda c: condition())):

            async def waiting(wait=wait) -> None:
                await wait
                nursery.cancel_scope.cancel()

            nursery.start_soon(waiting)


def worker_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "damocles_ext.worker"]


# --- a job given twice ----------------------------------------------------------------------------


async def test_a_manager_that_gives_again_the_job_held_is_not_asked_again_at_full_speed(
    tmp_path, caplog
):
    # A hostile manager (no real one does this: damocles-manager gives only jobs ready to run,
    # so a held job comes back only after a reset; ours gives a held job only under a new lease)
    # answering each call with the job the worker already proves: it filled no slot, and the
    # worker asked again at once, for ever (thousands of calls a second) instead of waiting as
    # after an empty answer.
    script = venus({"Venus.WdPoStAllocateJobs": lambda params, n: [job("j1", lease=None)]})
    async with against(tmp_path, script, LONG) as (coordinator, worker):
        await coordinator.wait_for(lambda c: beats(c) >= 5)
        assert list(worker.held) == ["j1"]
        assert allocations(coordinator) <= 3, coordinator.methods()
    assert "job j1: given again while this worker holds it; ignored" in worker_lines(caplog)
    assert worker.counters.pulled == 1  # (a job given again is not pulled again)
    # Each answer after the first gave no new job: counted empty, as it was waited after.
    assert worker.counters.allocations >= 2
    assert worker.counters.empty_allocations == worker.counters.allocations - 1
    assert coordinator.finishes("j1") == []  # stopped before its end: left to the heartbeat timeout


async def test_a_job_given_twice_in_one_answer_is_proved_once_and_answered_once_under_its_last_lease(
    tmp_path, caplog
):
    # A hostile manager gives j1 twice in one allocation, under two leases. Before, the second
    # entry was read as an operator's reset of the job held: "the manager took it back (reset:
    # given to this worker afresh (try 1))", its first proof cancelled, a take-back counted and
    # the job counted pulled twice. It is proved once and answered once, under the last lease
    # given (the manager's, if it allocated the job twice over), and the answer is said as it is.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    alloc = first(job("j1", lease="L1"), job("j2"), job("j1", lease="L2"))
    async with against(tmp_path, {"Dext.AllocateJobs": alloc}) as (coordinator, worker):
        await worker.wait_for(lambda: allocations(coordinator) >= 2 and not worker.held)
        proofs = sum(c.done + c.failed for c in worker.supervisor.statistics().children)
    assert proofs == 2  # (j1 and j2)
    [(_, lease, output, error)] = coordinator.finishes("j1")
    assert (lease, error) == ("L2", "") and output["proofs"]
    assert len(coordinator.finishes("j2")) == 1
    assert worker.counters.pulled == 2 and worker.counters.stopped_by == {}
    lines = worker_lines(caplog)
    assert [line for line in lines if "afresh" in line or "took it back" in line] == [], lines
    assert len([line for line in lines if line.startswith("job j1: pulled")]) == 1, lines
    [twice] = [line for line in lines if "more than once" in line]
    assert twice == (
        f"the manager at {worker.manager_url} gave the same job more than once in one allocation"
        " answer (job 'j1' twice, under leases L1, L2): each is proved once and its result sent once,"
        " under the last lease given (the earlier ones are not heartbeated); a manager gives a"
        " job once per answer"
    ), twice


async def step_until(
    worker: Worker, coordinator: HostileCoordinator, mock_clock, end: float, jobs_given=None
):
    """Move the mock time to `end` in half seconds, each step once the worker waits (all it was
    given answered, and no call before a time to come): a worker that asks again at once asks
    at the same instant, and never waits (caught as more than 60 allocations)."""

    def waiting() -> bool:
        given = allocations(coordinator) if jobs_given is None else jobs_given()
        done = worker.counters.delivered == given
        later = max(worker._unproved.until, worker._idle_until)
        return done and not worker.held and trio.current_time() < later

    while trio.current_time() < end:
        await until(worker, coordinator, lambda: allocations(coordinator) > 60 or waiting())
        assert allocations(coordinator) <= 60, "asked again at full speed"
        mock_clock.jump(0.5)


def unreadable(job_id: str, lease: str | None = "L1") -> dict:
    return job(job_id, lease) | {"Input": None}


def test_a_job_given_many_times_under_many_leases_is_said_in_one_bounded_line():
    # A hostile answer repeating one job under a new lease each time: the line names five.
    from damocles_ext.frontends.worker_state import given_twice_line

    line = given_twice_line("http://m:1789/rpc/v0", {"j1": [f"L{i}" for i in range(1000)]})
    assert "job 'j1' 1000 times, under leases L0, L1, L2, L3, L4 and 995 more)" in line, line
    assert len(line) < 400


async def test_allocations_of_only_jobs_failing_before_a_prover_settle_at_the_idle_poll(
    tmp_path, caplog, mock_clock
):
    # Once such a job (its input unreadable here), answered at once with its error,
    # freed its slot at once and the worker asked again at once, for ever: about 2,500
    # allocations and finishes in 3 s, a line each (the breaker counts the prover's failures
    # only: none here). Then every such allocation was waited after, the first job included.
    # Now a burst of 8 is asked again at once, then 1 s doubling to --idle-poll (8 s), said once
    # a spell; a job that reaches a prover ends the spell and brings the burst back. One slot:
    # each allocation is asked only once the job before it ended, so the times follow from the
    # rule alone.
    caplog.set_level(logging.INFO, "damocles_ext.worker")

    def alloc(params: list, n: int) -> list:
        return [job(f"j{n}")] if n == 14 else [unreadable(f"bad-{n}")]

    settings = {"retry_base": 1.0, "idle_poll": 8.0, "ping_interval": 1000.0, "max_jobs": 1}
    script = {"Dext.AllocateJobs": alloc}
    async with against(tmp_path, script, **settings) as (coordinator, worker):
        await step_until(worker, coordinator, mock_clock, 58)  # (against's limit: 60)
    times = coordinator.times_of("Dext.AllocateJobs")
    # 9 at 0 (the 9th round waited after), 1, 3, 7, 15, 23 (j14, proved: the burst is back), 9 at
    # 23, 24, 26, 30, then every 8 s (38, 46, 54): a hostile manager settles at one call per --idle-poll.
    burst = [0.0] * 8
    expected = [*burst, 1, 2, 4, 8, 8, 0, *burst, 1, 2, 4, 8, 8, 8]
    assert [b - a for a, b in itertools.pairwise(times)] == expected, times
    assert worker.counters.delivered == len(times)
    for n in (*range(1, 14), *range(15, len(times) + 1)):
        [(_, _, output, error)] = coordinator.finishes(f"bad-{n}")
        assert output is None and error.startswith("unreadable job input"), error
    [(_, _, output, error)] = coordinator.finishes("j14")
    assert error == "" and output["proofs"]
    lines = worker_lines(caplog)
    spells = [line for line in lines if line.startswith(f"9 allocations from {worker.manager_url}")]
    assert len(spells) == 2, spells
    assert spells[0] == (
        f"9 allocations from {worker.manager_url} in under a second brought only jobs that fail"
        " before a prover here (job bad-9: unreadable job input: Expected `object`, got `null` - at"
        " `$.Input`); each is answered at once with its error, and the manager is asked again"
        " after 1 s (growing to --idle-poll) until one reaches a prover; check the jobs it gives"
        " this worker: their input, whether the stores of their sectors are attached here"
        " (--attached), and --allowed-miners"
    ), spells[0]
    ended = "a job reaches a prover again, after 13 allocations of jobs that all failed before one"
    assert [line for line in lines if line.startswith("a job reaches")] == [f"{ended}, in 23 s"]
    assert worker.counters.pauses == 0


async def test_a_wait_after_allocations_of_only_failing_jobs_shows_until_a_job_reaches_a_prover(
    tmp_path, mock_clock
):
    # The 9th allocation of only jobs that fail before a prover (past the burst of 8) is waited
    # after (30 s here): before, only a warning said so, once a spell, and the worker's status
    # and metrics looked like an idle one's. The job the 10th brings reaches a prover, which
    # ends the wait's rule early: no pause shows from then on.
    from prometheus_client import CollectorRegistry

    from damocles_ext.frontends.worker_control import WorkerMetrics, worker_part

    def alloc(params: list, n: int) -> list:
        return [job(f"j{n}")] if n == 10 else [unreadable(f"bad-{n}")]

    def sampled(metrics: WorkerMetrics) -> dict:
        return {
            (s.name, tuple(s.labels.values())): s.value
            for family in metrics.collect() for s in family.samples
        }  # fmt: skip

    settings = {"retry_base": 30.0, "idle_poll": 60.0, "ping_interval": 1000.0, "max_jobs": 1}
    async with against(tmp_path, {"Dext.AllocateJobs": alloc}, **settings) as (coordinator, worker):
        metrics = WorkerMetrics(worker, CollectorRegistry())
        await until(worker, coordinator, lambda: worker.counters.delivered == 9 and not worker.held)
        began = time.time()
        during, part = sampled(metrics), worker_part(worker)
        mock_clock.jump(30)
        await until(worker, coordinator, lambda: worker.counters.delivered == 10)
        after, part_after = sampled(metrics), worker_part(worker)
    assert during[("damocles_ext_worker_pauses_total", ("unproved_jobs",))] == 1
    assert during[("damocles_ext_worker_pauses_total", ("prover_failures",))] == 0
    until_unix = during[("damocles_ext_worker_paused_until_timestamp_seconds", ())]
    assert began < until_unix <= began + 30
    assert (part.pauses, part.paused_reason, part.paused_until) == (1, "unproved_jobs", until_unix)
    assert part.paused_why == (
        "9 allocations in a row brought only jobs that fail before a prover here (last: job bad-9:"
        " unreadable job input: Expected `object`, got `null` - at `$.Input`); taking no job for"
        " 30 s (growing to --idle-poll) until one reaches a prover"
    ), part.paused_why
    assert after[("damocles_ext_worker_paused_until_timestamp_seconds", ())] == 0
    assert after[("damocles_ext_worker_pauses_total", ("unproved_jobs",))] == 1
    assert part_after.paused_until is part_after.paused_why is part_after.paused_reason is None
    assert part_after.pauses == 1


async def test_a_backlog_of_bad_jobs_from_a_damocles_manager_costs_no_wait_within_the_burst(
    tmp_path, caplog, mock_clock
):
    # damocles-manager gives one job per allocation, its ready jobs in no order, and each bad
    # job at most JobMaxTry (2) times: a real backlog, never endless. Under an earlier rule,
    # each bad job was a round waited after: 10 ahead of a good one cost 1+2+4+8+6*15 s at the
    # defaults, with no slot asking meanwhile. Now 8 bad jobs ahead of a good one cost no wait,
    # and 10 cost 3 s (8 at once, then 1 + 2).
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    given = [*(f"bad-{n}" for n in range(8)), "good-1", *(f"bad-{n}" for n in range(8, 18))]
    given.append("good-2")

    def alloc(params: list, n: int) -> list:
        if n > len(given):
            return []
        name = given[n - 1]
        return [job(name, lease=None) if name.startswith("good") else unreadable(name, None)]

    settings = {"retry_base": 1.0, "idle_poll": 8.0, "ping_interval": 1000.0, "max_jobs": 1}
    script = venus({"Venus.WdPoStAllocateJobs": alloc})
    async with against(tmp_path, script, **settings) as (coordinator, worker):
        calls = lambda: coordinator.count("Venus.WdPoStAllocateJobs")  # noqa: E731
        await step_until(worker, coordinator, mock_clock, 4, lambda: min(calls(), len(given)))
        await worker.wait_for(lambda: worker.counters.delivered == len(given))
    times = coordinator.times_of("Venus.WdPoStAllocateJobs")[: len(given)]
    assert times[given.index("good-1")] == times[0], times  # reached without any wait
    assert times[given.index("good-2")] - times[given.index("good-1")] == 3.0, times
    for name in given:
        [(_, _, error)] = coordinator.finishes(name)
        assert (error == "") == name.startswith("good"), (name, error)
    [spell] = [line for line in worker_lines(caplog) if "brought only jobs" in line]
    burst = f"9 allocations from {worker.manager_url} in under a second brought"
    assert spell.startswith(burst), spell


async def test_a_quiet_stretch_that_ends_a_warned_spell_of_unproved_allocations_is_said(
    tmp_path, caplog, mock_clock
):
    # 9 bad jobs (the 9th past the burst: warned), then empty answers for 16 s (twice the quiet
    # stretch of burst x --idle-poll = 8 s), then a bad job again: the burst is back, and the
    # warned spell's end is said, as information. It ended unsaid, and the next warning came
    # with no end between; its "until one reaches a prover" was never so.
    caplog.set_level(logging.INFO, "damocles_ext.worker")

    def alloc(params: list, n: int) -> list:
        return [unreadable(f"bad-{n}")] if n <= 9 or n >= 26 else []

    settings = {"retry_base": 1.0, "idle_poll": 1.0, "ping_interval": 1000.0, "max_jobs": 1}
    async with against(tmp_path, {"Dext.AllocateJobs": alloc}, **settings) as (coordinator, worker):
        calls = lambda: allocations(coordinator)  # noqa: E731
        given = lambda: min(calls(), 9) + max(0, calls() - 25)  # noqa: E731 (not the empty ones)
        await step_until(worker, coordinator, mock_clock, 18, given)
    times = coordinator.times_of("Dext.AllocateJobs")
    assert times[:9] == [0.0] * 9 and times[9:26] == [float(t) for t in range(1, 18)], times
    said = [
        (r.levelno, r.getMessage()) for r in caplog.records if "fail before a prover" in r.message
    ]
    url = worker.manager_url
    # (the second spell's 9th, at 17 s too, warns again: a burst of 8 at once, then waits)
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO, logging.WARNING], said
    assert said[1][1] == (
        f"no allocation from {url} brought only jobs that fail before a prover here for 17 s"
        " (after 9 that did): the next 8 such are followed at once again"
    )


def test_a_spell_of_unproved_allocations_in_under_a_second_is_said_so_not_in_0_s():
    # A burst of allocations at one instant (a backlog of bad jobs, each answered at once) was
    # "9 allocations from ... in 0 s", and its end "... in 0 s": as if no time were a time.
    def spell(lasted: float) -> tuple[str | None, str | None]:
        rounds = UnprovedRounds(Backoff(1.0, 8.0), burst=1)
        said = [rounds.ended(rounds.round(1), t, unproved=True, why="job a: x", url="http://m")
                for t in (100.0, 100.0 + lasted)]  # fmt: skip
        return said[1], rounds.reached(100.0 + lasted)

    begins, ends = spell(0.0)
    assert begins is not None and begins.startswith(
        "2 allocations from http://m in under a second brought only jobs that fail before a prover"
    ), begins
    assert ends == (
        "a job reaches a prover again, after 2 allocations of jobs that all failed before one,"
        " in under a second"
    )
    assert spell(0.999)[0].startswith("2 allocations from http://m in under a second brought")
    begins, ends = spell(2.4)
    assert begins.startswith("2 allocations from http://m in 2 s brought"), begins
    assert ends.endswith("all failed before one, in 2 s"), ends


def test_a_round_is_waited_after_only_when_its_last_job_ends_and_none_reached_a_prover():
    rounds = UnprovedRounds(Backoff(1.0, 3.0), burst=1)

    def ended(round_: int, now: float, why: str = "", unproved: bool = True) -> str | None:
        return rounds.ended(round_, now, unproved=unproved, why=why, url="http://m")

    mixed, bad, worse = rounds.round(2), rounds.round(2), rounds.round(1)
    # A job of a round with others still held: asked for at once, as any slot freed.
    assert ended(bad, 0.0, "job a: x") is None
    assert ended(mixed, 0.0, unproved=False) is None  # (proved)
    assert ended(mixed, 0.0, "job b: y") is None and rounds.until == -math.inf
    assert ended(bad, 5.0, "job c: z") is None and rounds.until == -math.inf  # (the burst)
    said = ended(worse, 6.0, "job d: z")
    assert said is not None and said.startswith("2 allocations from http://m in 1 s brought")
    assert "(job d: z)" in said and "asked again after 1 s" in said and rounds.until == 7.0
    # A job that does not end its round lowers no wait another round set (it would be asked
    # for at once, ahead of the wait).
    late, soon = rounds.round(2), rounds.round(1)
    assert ended(late, 6.5, "job e: z") is None and rounds.until == 7.0
    assert ended(soon, 6.5, "job f: z") is None and rounds.until == 8.5  # (said once a spell)
    assert [ended(rounds.round(1), 7.0) for _ in "ab"] == [None, None] and rounds.until == 10.0
    assert rounds.reached(9.0) == (
        "a job reaches a prover again, after 5 allocations of jobs that all failed before one,"
        " in 4 s"
    )
    assert rounds.until == -math.inf and rounds.rounds == {late: (1, False)}
    # The burst is back after a prover is reached, and after a quiet stretch (burst x cap).
    assert ended(rounds.round(1), 10.0) is None and ended(rounds.round(1), 10.0) is not None
    assert rounds.until == 11.0
    # Quiet for 3 s: a burst again; the warned spell's end is said (it was not: the warning's
    # "until one reaches a prover" went unanswered, and the next spell warned again).
    assert ended(rounds.round(1), 13.0) == (
        "no allocation from http://m brought only jobs that fail before a prover here for 3 s"
        " (after 2 that did): the next 1 such are followed at once again"
    )
    assert not rounds.said
    assert ended(rounds.round(1), 13.0) is not None and rounds.until == 14.0


async def test_a_job_answered_with_its_faults_between_bad_ones_brings_the_burst_back(
    tmp_path, caplog, mock_clock
):
    # Through the worker: 9 bad jobs (the 9th past the burst: waited after), a job whose only
    # sector no store here has and no provider knows (answered with its faults, no prover run,
    # no error), then 9 bad jobs again: the faults end the spell, so the second 8 are asked for
    # at once, and its end is said. A job answered so only kept its round from being waited
    # after: the next bad round waited the grown delay, and the spell went on unsaid.
    caplog.set_level(logging.INFO, "damocles_ext.worker")

    def alloc(params: list, n: int) -> list:
        if n == 10:
            return [job("faulty", **msgspec.to_builtins(job_input(store="store-gone")))]
        return [unreadable(f"bad-{n}")]

    settings = {"retry_base": 1.0, "idle_poll": 8.0, "ping_interval": 1000.0, "max_jobs": 1}
    locator = SectorLocator([])  # (no provider: every sector not attached is a fault)
    script = {"Dext.AllocateJobs": alloc}
    async with against(tmp_path, script, locator=locator, **settings) as (coordinator, worker):
        await step_until(worker, coordinator, mock_clock, 2.5)
    await locator.aclose()
    times = coordinator.times_of("Dext.AllocateJobs")
    # 9 at 0, the faults at 1 (the 9th waited 1 s), 9 bad at 1 (no wait: the burst), then 1 s.
    assert times[:20] == [0.0] * 9 + [1.0] * 10 + [2.0], times
    [(_, _, output, error)] = coordinator.finishes("faulty")
    assert error == "" and output == {"proofs": [], "faults": [1]}, (output, error)
    lines = worker_lines(caplog)
    ended = "a job reaches a prover again, after 9 allocations of jobs that all failed before one"
    assert [line for line in lines if line.startswith("a job reaches")] == [f"{ended}, in 1 s"]
    assert len([line for line in lines if "brought only jobs" in line]) == 2, lines


@pytest.mark.parametrize("bad_last", [False, True], ids=["bad-ends-first", "bad-ends-last"])
async def test_a_round_of_two_jobs_one_proved_and_one_failing_before_a_prover_is_not_waited_after(
    tmp_path, caplog, mock_clock, bad_last
):
    # Through the worker, two slots: 8 allocations of a job failing before a prover (the burst
    # used up), then one of 2 jobs: "good" is proved, "bad-9" fails before a prover (its result
    # delivered at once, before "good" reaches its child; or, `bad_last`, cut at its first
    # finish and sent again 1 s later, after "good" ended). The round is not unproved: whichever of its jobs ends first frees its slot
    # at once, its last asks for no wait, and it is no step of a spell. Then 9 allocations of a
    # bad job: the first 8 at once, the 9th waited after (1 s). Were each job's end a round's,
    # "bad-9" would have been the 9th unproved (warned), or "good" a reset before its round's
    # end; were the round counted unproved, the 8th bad one after it would have been waited after.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    finished: set[str] = set()
    given, gave_at, late, last = [0], list[float](), list[str](), [0]

    def alloc(params: list, n: int) -> list:
        if n <= 8:
            jobs = [unreadable(f"bad-{n}")]
        elif n == 9:
            jobs = [job("good"), unreadable("bad-9")]
        elif {"good", "bad-9"} <= finished and len(late) < 9:  # (none while the round is held)
            late.append(f"late-{len(late) + 1}")
            jobs, last[0] = [unreadable(late[-1])], n
        else:
            return []
        given[0] += len(jobs)
        gave_at.append(trio.current_time())
        return jobs

    def finish(params: list, n: int) -> Any:
        if bad_last and params[0] == "bad-9" and n == len(finished) + 1:  # (none cut yet)
            return CUT
        finished.add(params[0])
        return None

    settings = {"retry_base": 1.0, "idle_poll": 8.0, "ping_interval": 1000.0, "max_jobs": 2}
    script = {"Dext.AllocateJobs": alloc, "Dext.FinishJob": finish}
    async with against(tmp_path, script, **settings) as (coordinator, worker):
        if bad_last:  # "good" ended, "bad-9" waits to send its result again
            held = lambda: list(worker.held) == ["bad-9"] and "good" in finished  # noqa: E731
            await until(worker, coordinator, held)
            await jump(mock_clock, 1.0)
        await step_until(worker, coordinator, mock_clock, 4, lambda: given[0])
    at = 1.0 if bad_last else 0.0  # (when the round ended)
    assert gave_at == [0.0] * 9 + [at] * 9, gave_at  # (8 bad, the round of 2, 9 bad)
    times = coordinator.times_of("Dext.AllocateJobs")
    assert times[last[0]] == at + 1, times  # (the call after the 9th bad one after the round)
    [*_, (_, _, output, error)] = coordinator.finishes("good")
    assert error == "" and output["proofs"]
    assert len(coordinator.finishes("bad-9")) == 1 + bad_last
    lines = worker_lines(caplog)
    [spell] = [line for line in lines if "brought only jobs" in line]
    burst = f"9 allocations from {worker.manager_url} in under a second brought"
    assert spell.startswith(burst), spell
    assert "(job late-9: unreadable job input" in spell, spell
    assert not [line for line in lines if line.startswith("a job reaches a prover again")], lines


def test_a_job_answered_with_its_faults_ends_the_spell_and_a_stopping_worker_waits_for_none():
    rounds = UnprovedRounds(Backoff(1.0, 8.0), burst=1)

    def ended(now: float, **kw) -> str | None:
        kw = {"unproved": True, "why": "job a: x"} | kw
        return rounds.ended(rounds.round(1), now, url="http://m", **kw)

    assert ended(0.0) is None and ended(1.0) is not None and ended(1.5) is None
    assert rounds.until == 3.5
    # Faults and no error, no prover run: a result all the same. Before, the round only counted
    # as proved: the spell went on (no burst), its next wait doubled and its end was unsaid.
    line = ended(2.0, unproved=False, why="", answered=True)
    assert line == (
        "a job reaches a prover again, after 3 allocations of jobs that all failed before one,"
        " in 2 s"
    )
    assert rounds.until == -math.inf and ended(3.0) is None  # (the burst is back)
    assert ended(3.0) is not None and rounds.until == 4.0
    # Stopping: the rounds are kept count of, nothing is waited for or said.
    stopping = UnprovedRounds(Backoff(1.0, 8.0), burst=1)
    stopping.ended(stopping.round(1), 0.0, unproved=True, why="", url="")
    assert (
        stopping.ended(stopping.round(1), 0.0, unproved=True, why="", url="", stopping=True) is None
    )
    assert stopping.until == -math.inf and stopping.rounds == {} and not stopping.said


#: Three slots, proofs that last until the test stops the worker.
THREE = plugin_block("WdPost", "sleep", concurrent=3, seconds=60, progress_interval=0.05)


async def test_a_full_answer_with_a_job_given_again_and_a_new_one_asks_at_once_for_the_slot_left(
    tmp_path,
):
    # Three slots, j1 held: the worker asks for 2, and gets its j1 again (its lease lapsed: a
    # new one, try 2) with a new j2. The manager counted j1 against the 2, so one slot is free
    # and the manager may have more. Before, the new jobs taken (1) were fewer than asked (2)
    # and the worker waited --idle-poll (600 s here: the test's time runs out) with a slot free.
    def alloc(params: list, n: int) -> list:
        if n == 1:  # j1, and a job failed at once: its end frees its slot, asked for again now
            return [job("j1"), job("unreadable") | {"Input": None}]
        if n == 2:
            return [job("j1", lease="L2", try_num=2), job("j2")]
        return []

    async with against(tmp_path, {"Dext.AllocateJobs": alloc}, THREE) as (coordinator, worker):
        await coordinator.wait_for(lambda c: c.count("Dext.AllocateJobs") >= 3)
        assert sorted(worker.held) == ["j1", "j2"] and worker.held["j1"].job.Lease == "L2"
    asked = [params[1] for method, params in coordinator.calls if method == "Dext.AllocateJobs"]
    assert asked[1:3] == [2, 1], asked


# --- answers of the wrong shape -------------------------------------------------------------------


async def test_entries_of_an_allocation_that_are_no_job_lose_none_of_the_jobs_beside_them(
    tmp_path, caplog
):
    # Before, the answer was read as a whole: one entry that was no object (null, a number) threw
    # the whole answer away as "unreachable", and the jobs beside it, allocated to this worker,
    # were neither proved nor finished nor named anywhere.
    alloc = first(job("j1"), None, 5, {"Lease": "L9"}, job("j2"))
    async with against(tmp_path, {"Dext.AllocateJobs": alloc}) as (coordinator, worker):
        # The next allocation is asked after the jobs of the first are held (or it was lost).
        await worker.wait_for(lambda: allocations(coordinator) >= 2 and not worker.held)
    for job_id in ("j1", "j2"):
        [(_, lease, output, error)] = coordinator.finishes(job_id)
        assert (lease, error) == ("L1", "") and output["proofs"]
    [said] = [line for line in worker_lines(caplog) if "in an allocation" in line]
    assert said.startswith(
        f"the manager at {worker.manager_url} gave 3 entries that are no job in an allocation"
        " (an entry that is no job (null); an entry that is no job (5); a job without an id"
        " (Object missing required"
    ), said
    assert said.endswith("); whatever they stand for is left to time out there"), said
    assert worker.manager_reachable and worker.counters.pulled == 2


async def test_an_allocation_of_many_entries_that_are_no_job_is_said_in_one_line(tmp_path, caplog):
    # Before, each was a line of its own: 10,000 nulls wrote 10,000 lines, again at each answer.
    alloc = first(*[None] * 10_000, job("j1"), 7)
    async with against(tmp_path, {"Dext.AllocateJobs": alloc}) as (coordinator, worker):
        await worker.wait_for(lambda: allocations(coordinator) >= 2 and not worker.held)
    assert len(coordinator.finishes("j1")) == 1
    [said] = [line for line in worker_lines(caplog) if "in an allocation" in line]
    assert said == (
        f"the manager at {worker.manager_url} gave 10001 entries that are no job in an allocation"
        " (an entry that is no job (null); an entry that is no job (null); an entry that is no"
        " job (null); and 9998 more); whatever"
        " they stand for is left to time out there"
    )


# --- stop signals ---------------------------------------------------------------------------------


async def test_a_heartbeat_answer_to_stop_a_job_never_held_is_said_once_and_stops_nothing(
    tmp_path, caplog
):
    # Before, it was ignored without a word: the manager's mistake (its answer names a job this
    # worker never heartbeated) went unseen.
    ghost = {"Id": "ghost", "Reason": "reset", "Message": "reset by an operator"}
    script = {"Dext.AllocateJobs": first(job("j1")), "Dext.HeartbeatJobs": lambda p, n: [ghost]}
    async with against(tmp_path, script, LONG) as (coordinator, worker):
        await coordinator.wait_for(lambda c: beats(c) >= 4)
        assert worker.held["j1"].stop_reason is None and worker.held["j1"].state == "proving"
    said = [line for line in worker_lines(caplog) if "does not hold" in line]
    assert said == [
        (
            f"the manager at {worker.manager_url} says to stop 1 job this worker does not hold"
            " (ghost): nothing of theirs runs here; ignored (the manager's heartbeat answers"
            " should name only the jobs heartbeated)"
        )
    ]
    assert worker.counters.stopped == 0


async def test_stops_of_jobs_not_held_named_anew_at_each_heartbeat_are_said_once_while_they_last(
    tmp_path, caplog
):
    # Before, each change of the set named was said again: a manager naming a rotating set of jobs
    # it never gave this worker was said at every heartbeat.
    def stops(params: list, n: int) -> list:
        named = {4: [], 5: ["ghost-1"]}.get(n, [f"ghost-{min(n, 6)}"])
        return [{"Id": job_id, "Reason": "reset"} for job_id in named]

    script = {"Dext.AllocateJobs": first(job("j1")), "Dext.HeartbeatJobs": stops}
    async with against(tmp_path, script, LONG) as (coordinator, worker):
        await coordinator.wait_for(lambda c: beats(c) >= 8)
    said = [line for line in worker_lines(caplog) if "does not hold" in line]
    # ghost-2, ghost-3: in the same run of answers; ghost-1 again: said already; ghost-6: anew
    # after an answer that named none.
    assert [line.split("(")[1].split(")")[0] for line in said] == ["ghost-1", "ghost-6"], said
    assert worker.counters.stopped == 0


def test_unheld_stops_are_said_once_a_run_of_answers_and_again_only_for_a_job_not_named_before():
    said = UnheldStops(remembered=3)
    answers = [["a"], ["b"], ["a", "c"], [], ["a"], ["c"], ["d"], ["d"], [], ["a"]]
    # d: new in a run where nothing was said; a at the end: forgotten (3 remembered: b, c, d).
    assert [said.to_say(ids) for ids in answers] == [1, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    assert list(said.named) == ["c", "d", "a"]


# --- what holds: each job answered once, the worker up, the manager waited for ------------------

SECTOR = msgspec.to_builtins(job_input()).get("Sectors")[0]


async def test_jobs_that_cannot_be_proved_are_each_failed_once_saying_why_and_the_rest_proved(
    tmp_path, caplog
):
    # One answer, more jobs than the two asked for, a job given twice among them.
    given = [
        job("no-input") | {"Input": None},
        job("no-sectors", Sectors=[]),
        job("null-sectors", Sectors=None),
        job("unknown-type", ProofType="StackedDrgWindow3GiBV9"),
        job("winning-type", ProofType="StackedDrgWinning2KiBV1"),
        job("sector-over-64-bits", Sectors=[SECTOR | {"SectorId": 2**64 + 1}]),
        job("miner-over-64-bits", MinerId=2**64 + 1),
        job("ten-thousand", Sectors=[SECTOR | {"SectorId": n} for n in range(10_000)]),
        job("twice"),
        job("twice"),
    ]
    errors = {
        "no-input": "unreadable job input: Expected `object`, got `null` - at `$.Input`",
        "no-sectors": "the task has no replicas",
        "null-sectors": "the task has no replicas",
        "unknown-type": "Invalid enum value 'StackedDrgWindow3GiBV9'",
        "winning-type": "Invalid enum value 'StackedDrgWinning2KiBV1'",
        "sector-over-64-bits": f"sector_id {2**64 + 1} does not fit in 64 bits",
        "miner-over-64-bits": "unreadable job input: Expected `int` <= 9223372036854775807",
    }
    async with against(tmp_path, {"Dext.AllocateJobs": first(*given)}) as (coordinator, worker):
        await until(worker, coordinator, lambda: allocations(coordinator) >= 2 and not worker.held)
    for job_id, why in errors.items():
        [(_, lease, output, error)] = coordinator.finishes(job_id)
        assert (lease, output) == ("L1", None) and why in error, (job_id, error)
        said = why.removeprefix("unreadable job input: ")
        assert any(f"job {job_id}" in line and said in line for line in worker_lines(caplog))
    for job_id in ("ten-thousand", "twice"):
        [(_, lease, output, error)] = coordinator.finishes(job_id)
        assert (lease, error) == ("L1", "") and output["proofs"], job_id
    [twice] = [line for line in worker_lines(caplog) if "more than once" in line]
    assert (
        "allocation answer (job 'twice' twice, under lease L1 each time): each is proved" in twice
    )
    assert worker.counters.delivered == len(errors) + 2 and worker.counters.given_up == 0
    # More than asked: all taken, and said once (it proved them without a word).
    [over] = [line for line in worker_lines(caplog) if "job(s) were asked" in line]
    assert (
        "gave 10 entries where 2 job(s) were asked: the 9 job(s) among them are all taken" in over
    )


async def test_a_worker_stopped_while_waiting_out_an_allocations_backoff_stops_at_once(tmp_path):
    # Each allocation cut mid-answer: the worker waits out its backoff (600 s here) before it
    # asks again. A stop ends that wait: before, dropping it failed no test, and a worker
    # stopped during an outage of its manager would have stopped only at the backoff's end.
    coordinator = HostileCoordinator({"Dext.AllocateJobs": lambda params, n: CUT})
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.serve)
            kids = children(tmp_path, ECHO)
            backoff = {"retry_base": 600.0, "retry_cap": 600.0, "shutdown_grace": 0.1}
            worker = Worker(worker_settings(coordinator.address, kids, **backoff))
            running = await start_worker(nursery, worker)
            # (the outage is said, the loop waiting out its backoff, before the next checkpoint)
            await worker.wait_for(lambda: not worker.manager_reachable)
            with trio.fail_after(10):  # (the grace is 0.1 s, and no job is held)
                await running.stop()
            nursery.cancel_scope.cancel()
    assert allocations(coordinator) == 1


async def test_an_allocation_answered_resets_the_backoff_of_the_next_outage(tmp_path):
    # Six allocations cut mid-answer (waits of 0.05 s doubling to 1.6 s), one answered, one cut
    # again: the next is asked after the base wait, 0.05 s, not after 3.2 s, the outage before
    # it going on doubling. Before, dropping the reset failed no test.
    asked_at: list[float] = []

    def alloc(params: list, n: int) -> Any:
        asked_at.append(trio.current_time())
        return [] if n == 7 else CUT

    settings = {"retry_base": 0.05, "retry_cap": 600.0, "idle_poll": 0.01}
    async with against(tmp_path, {"Dext.AllocateJobs": alloc}, **settings) as (coordinator, _):
        await coordinator.wait_for(lambda c: allocations(c) >= 9)
    assert asked_at[8] - asked_at[7] < 2.0, asked_at  # (3.2 s without the reset)


#: Answers that are no result, for the first calls of a method (`times_bad`), then the right one.
BAD_ANSWERS = {
    "json-rpc-error-500": Error(-32603, "internal error", status=500),
    "method-error": Error(1, "the job store is down"),
    "proxy-502-html": Page(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "401-html": Page(401, b"<html>401 Authorization Required</html>"),
    "not-json": Page(200, b"{'result': oops", content_type="application/json"),
    "cut-mid-answer": CUT,
    "no-answer": SILENT,
}


#: Answers that are no list where a list is expected (an allocation, a heartbeat's stop list);
#: no manager sends them for an empty list (damocles-manager's allocation starts from an empty
#: slice, our coordinator builds lists), and read as one, a coordinator that broke would be
#: answering: its heartbeats counted as taken, the stops it should have said lost.
NO_LIST = {"null": None, "no-result": NO_RESULT}


def times_bad(answer: Any) -> int:
    """How many calls get `answer` before the right one: 3 (an outage said once over several
    failures), 1 for no answer at all (each waits out the worker's rpc_timeout)."""
    return 1 if answer is SILENT else 3


def timeout_for(answer: Any) -> dict[str, float]:
    """The worker's rpc_timeout for a test of `answer`: short for no answer (the test waits it
    out), else the default (10 s), which no good call on this machine's loopback comes near:
    an extra timeout would be a warning the test does not expect."""
    return {"rpc_timeout": 1.0} if answer is SILENT else {}


def bad_then(answer: Any, good: Callable[[list, int], Any]) -> Callable[[list, int], Any]:
    bad = times_bad(answer)
    return lambda params, n: answer if n <= bad else good(params, n - bad)


def spaced(times: list[float], at_least: float) -> bool:
    return all(b - a >= at_least for a, b in itertools.pairwise(times))


BAD_ALLOCATIONS = {**BAD_ANSWERS, **NO_LIST}


@pytest.mark.parametrize("answer", BAD_ALLOCATIONS.values(), ids=BAD_ALLOCATIONS.keys())
async def test_an_allocation_answered_wrong_is_asked_again_after_a_backoff_and_said_once(
    tmp_path, caplog, answer
):
    script = {"Dext.AllocateJobs": bad_then(answer, first(job("j1")))}
    async with against(tmp_path, script, **timeout_for(answer)) as (coordinator, worker):
        await worker.wait_for(lambda: worker.counters.delivered == 1)
    assert len(coordinator.finishes("j1")) == 1
    calls = times_bad(answer) + 1
    assert coordinator.count("Dext.AllocateJobs") >= calls
    # Not asked again at full speed: each retry waited its backoff (0.05 s, doubling).
    assert spaced(coordinator.times_of("Dext.AllocateJobs")[:calls], 0.04)
    url = worker.manager_url
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and url in warned[0] and "Dext.AllocateJobs" in warned[0], warned
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("answer", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
async def test_a_finish_answered_wrong_is_sent_again_after_a_backoff_until_taken_once(
    tmp_path, caplog, answer
):
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    script = {"Dext.AllocateJobs": first(job("j1")), "Dext.FinishJob": bad_then(answer, first())}
    async with against(tmp_path, script, **timeout_for(answer)) as (coordinator, worker):
        await worker.wait_for(lambda: worker.counters.delivered == 1 and not worker.held)
    bad = times_bad(answer)
    finishes = coordinator.finishes("j1")
    assert len(finishes) == bad + 1 and all(f == finishes[0] for f in finishes)  # the same result
    assert spaced(coordinator.times_of("Dext.FinishJob"), 0.04)
    assert worker.counters.given_up == 0 and worker.counters.finish_retries == bad
    lines = worker_lines(caplog)
    assert f"job j1: delivered 1 proofs (attempt {bad + 1})" in lines
    # Said at the failed attempts 1, 2, 4, 8...: of 3, the first two (seen, not a flood).
    not_yet = [line for line in lines if line.startswith("job j1: result (1 proofs) not delivered")]
    assert [line.split("(attempt ")[1][0] for line in not_yet] == ["1", "2"][:bad], not_yet


async def test_heartbeats_without_answer_while_the_rest_answers_are_said_once_not_as_an_outage(
    tmp_path, caplog, mock_clock
):
    # A coordinator whose heartbeat handler is stuck while its allocations and finishes answer.
    # Before, each heartbeat's timeout began an outage of the manager, and the next allocation
    # answered ended it: the log alternated "unreachable" / "answers again" for as long as it
    # lasted. Now the heartbeats' own outage: one line when they fail, one when answered again.
    # The time moves only in the test's jumps (mock_clock): the in-process coordinator's answers
    # take none, so every allocation answers within a step, and a heartbeat times out only when
    # the time is jumped past its --rpc-timeout.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    script = {
        "Dext.AllocateJobs": first(job("j1")),
        "Dext.HeartbeatJobs": lambda params, n: SILENT if n <= 3 else [],
    }
    # Allocations every 1 s (a slot stays free), answered while each heartbeat waits 10 s.
    settings = {"rpc_timeout": 10.0, "heartbeat_interval": 1.0, "idle_poll": 1.0}
    settings["ping_interval"] = 1000.0

    async with trio.open_nursery() as clock:
        async with against(tmp_path, script, LONG, **settings) as (coordinator, worker):

            def beaten() -> bool:
                return "j1" in worker.held and worker.held["j1"].last_heartbeat is not None

            await until(worker, coordinator, lambda: "j1" in worker.held)
            while not beaten():
                await trio.testing.wait_all_tasks_blocked()
                assert worker.manager_reachable
                mock_clock.jump(0.5)
            await trio.testing.wait_all_tasks_blocked()
            assert worker.manager_reachable
            # Through the stop (its shutdown grace): the body ends near 35 s, the stop near 45 s
            # (a heartbeat's --rpc-timeout).
            clock.start_soon(stepping, mock_clock)
        clock.cancel_scope.cancel()
    sent = coordinator.times_of("Dext.HeartbeatJobs")
    during = [t for t in coordinator.times_of("Dext.AllocateJobs") if sent[0] < t < sent[0] + 10]
    assert len(during) >= 5, (sent, during)  # answered while heartbeat 1 waited
    lines = worker_lines(caplog)
    outage = [line for line in lines if "unreachable" in line or "answers again" in line]
    assert outage == [], outage
    [failing] = [line for line in lines if line.startswith("the heartbeats of the jobs")]
    assert worker.manager_url in failing and "Dext.HeartbeatJobs" in failing, failing
    [again] = [line for line in lines if line.startswith("heartbeats are answered again")]
    assert again == "heartbeats are answered again, after 3 failed in 23 s", (again, sent)


async def test_an_outage_begun_by_a_call_unanswered_is_ended_by_a_heartbeat_once_one_was_refused(
    tmp_path, caplog, mock_clock
):
    # A manager that hangs (an allocation sent, never answered: the manager's outage, which only
    # an allocation or a finish answered ended, so that a stuck heartbeat handler does not make
    # the log alternate), then dies (a heartbeat refused), then comes back (a heartbeat
    # answered). The outage stayed until the next allocation or finish answered: with every slot
    # proving, a proof's length, shown as UNREACHABLE with the gauge at 0. A call that could not
    # connect during the outage shows the manager down, not stuck: any answer now ends it.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    worker = Worker(worker_settings("127.0.0.1:1", children(tmp_path, ECHO)))
    url = worker.manager_url
    worker._unreachable(str(RpcTimeout("no answer", url=url, method="Dext.AllocateJobs")))  # silent
    worker.heard()  # (a heartbeat answered while the allocation hangs: maybe only stuck)
    assert not worker.manager_reachable
    refused = RpcConnectionError("refused", url=url, method="Dext.HeartbeatJobs", sent=False)
    mock_clock.jump(1)
    failed(worker, refused)
    worker.heard()  # (a heartbeat answered)
    assert worker.manager_reachable
    lines = worker_lines(caplog)
    begins = (
        "the manager is unreachable (no answer); running proofs go on, no job is asked for, and"
        " results are kept and sent again until it answers"
    )
    ends = "the manager answers again (unreachable for 1.0 s)"
    assert [line for line in lines if line.startswith("the manager ")] == [begins, ends], lines


async def test_an_outage_that_met_a_refused_connection_leaves_the_next_one_to_its_own_calls(
    tmp_path, caplog, mock_clock
):
    # An outage begun by a heartbeat that could not connect ends at the next answer; the next
    # outage, begun by an allocation unanswered (the manager maybe only stuck), is not ended by
    # a heartbeat's answer: whether a call could not connect is the outage's, and ends with it.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    worker = Worker(worker_settings("127.0.0.1:1", children(tmp_path, ECHO)))
    url = worker.manager_url
    failed(worker, RpcConnectionError("refused", url=url, method="Dext.HeartbeatJobs", sent=False))
    mock_clock.jump(1)
    worker.answered()  # (an allocation answered)
    assert worker.manager_reachable and not worker._outage.unconnected
    mock_clock.jump(1)
    worker._unreachable(str(RpcTimeout("no answer", url=url, method="Dext.AllocateJobs")))
    worker.heard()  # (a heartbeat answered while the allocation hangs)
    assert not worker.manager_reachable
    said = [line for line in worker_lines(caplog) if line.startswith("the manager ")]
    assert len(said) == 3 and said[1] == "the manager answers again (unreachable for 1.0 s)", said


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_proxys_502_or_503_for_a_heartbeat_is_the_managers_outage_and_504_the_heartbeats(
    tmp_path, caplog, status, mock_clock
):
    # A proxy in front of the manager answers 502 or 503 while the manager behind it is down or
    # restarting: as a heartbeat that cannot connect, the manager's outage (one line), which the
    # next answer, a heartbeat's included, ends. A 504 is a manager too slow, maybe a stuck
    # heartbeat handler: the heartbeats' own outage, not the manager's. Before, a 502 for a
    # heartbeat was a second warning beside the allocations' "unreachable" line for the same
    # restart, depending on which call met the proxy first.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    worker = Worker(worker_settings("127.0.0.1:1", children(tmp_path, ECHO)))
    url = worker.manager_url
    answer = f"HTTP {status} (a proxy's page)"
    failed(worker, RpcProtocolError(answer, url=url, method="Dext.HeartbeatJobs", status=status))
    down = status != 504
    assert worker.manager_reachable is not down
    worker.heard()  # (the next heartbeat answered)
    assert worker.manager_reachable
    lines = worker_lines(caplog)
    said = [line for line in lines if line.startswith("the manager ")]
    if down:
        begins = (
            f"the manager is unreachable ({answer}); running proofs go on, no job is asked for,"
            " and results are kept and sent again until it answers"
        )
        assert said == [begins, "the manager answers again (unreachable for 0.0 s)"], lines
    else:
        assert said == [], lines
        assert [line for line in lines if line.startswith("the heartbeats of the jobs")], lines


async def jump(mock_clock, seconds: float) -> None:
    """Move the mock time on by `seconds` once the worker waits, and let it do what falls due."""
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def stepping(mock_clock) -> None:
    """The mock time moved on through a worker's stop (the shutdown grace of a proof running)
    until cancelled: a stop that outlasts against()'s limit of 60 s fails the test there, where
    a clock that stopped moving would have left it hanging. Each step waits until the worker
    has been still for a moment of real time (STILL): a child process it stops answers in real
    time, and steps taken as soon as each task waited ran the mock time past the limit before
    the child's exit was read (in about a third of the runs)."""
    while True:
        await trio.testing.wait_all_tasks_blocked(STILL)
        await jump(mock_clock, 0.5)


#: Real seconds the worker must have been still before `stepping` moves the mock time on.
STILL = 0.02


def outage_lines(caplog) -> list[str]:
    starts = ("the manager is unreachable", "the manager answers again", "the heartbeats of the")
    return [line for line in worker_lines(caplog) if line.startswith(starts)]


async def test_heartbeats_answered_again_count_only_the_time_they_failed_not_the_idle_time_after(
    tmp_path, caplog, mock_clock
):
    # A coordinator whose job store is down fails j1's heartbeats (3 of them, 1 s apart); j1's
    # proof ends and is delivered, and the worker holds no job for 30 s, sending no heartbeat;
    # then j2's first heartbeat is answered. The line said "after 3 failed in 33 s", the idle
    # time counted as outage. The time moves only in the test's jumps (against()'s limit of 60 s
    # is on it too); the proofs, 2 s long, in real time.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    failing, ready = [True], [False]
    down = Error(1, "job store unavailable")
    script = {
        "Dext.AllocateJobs": lambda params, n: (
            [job("j1")] if n == 1 else [job("j2")] if ready[0] else []
        ),
        "Dext.HeartbeatJobs": lambda params, n: down if failing[0] else [],
    }
    proof = plugin_block("WdPost", "sleep", seconds=2, progress_interval=0.05)
    settings = {"heartbeat_interval": 1.0, "idle_poll": 1.0, "ping_interval": 1000.0}
    async with against(tmp_path, script, proof, **settings) as (coordinator, worker):
        await until(worker, coordinator, lambda: "j1" in worker.held)
        while beats(coordinator) < 3:
            await jump(mock_clock, 1)
        failed_at = coordinator.times_of("Dext.HeartbeatJobs")
        await until(worker, coordinator, lambda: worker.counters.delivered == 1)
        assert not worker.held
        failing[0] = False
        for _ in range(15):  # 30 s with no job held
            await jump(mock_clock, 2)
        ready[0] = True
        while beats(coordinator) < 4:
            await jump(mock_clock, 1)
        await until(worker, coordinator, lambda: worker.counters.delivered == 2)
    lines = worker_lines(caplog)
    assert len([line for line in lines if line.startswith("the heartbeats of the jobs")]) == 1
    [again] = [line for line in lines if line.startswith("heartbeats are answered again")]
    # From the first failure (1 s) to the first tick that found no job held (5 s: the first
    # jump of 2 s after the proof ended); the next answer ends it.
    assert failed_at == [1.0, 2.0, 3.0]
    assert again == "heartbeats are answered again, after 3 failed in 4 s", again


@pytest.mark.parametrize("via", ["Dext.HeartbeatJobs", "Venus.WorkerPing"])
async def test_a_coordinator_down_while_the_only_slot_proves_is_shown_unreachable_by_its_calls(
    tmp_path, caplog, mock_clock, via
):
    # The only slot proving, one kind of call alone talks to the manager: our coordinator's
    # Dext.HeartbeatJobs (jobs under a lease; test_worker_damocles_manager.py shows it for
    # damocles-manager's Venus.WdPoStHeartbeatJobs), or Venus.WorkerPing with heartbeats far
    # apart. Those that cannot connect (the coordinator stopped) are the manager's outage, said
    # once (not as the call's own failure); the first answered ends it. The time moves only in
    # the test's jumps: the coordinator stops between two calls.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    script = {"Dext.AllocateJobs": first(job("j1"))}
    pinging = via == "Venus.WorkerPing"
    settings = {
        "heartbeat_interval": 1000.0 if pinging else 1.0,
        "ping_interval": 1.0 if pinging else 1000.0,
        "max_jobs": 1,
    }
    async with trio.open_nursery() as clock:
        async with against(tmp_path, script, LONG, **settings) as (coordinator, worker):
            held = lambda: worker.held["j1"]  # noqa: E731
            sent = lambda: coordinator.count(via)  # noqa: E731 (answered ones: a refused is none)
            await until(worker, coordinator, lambda: "j1" in worker.held and held().child)
            await jump(mock_clock, 1.0)
            assert sent() >= 1 and worker.manager_reachable
            await coordinator.down()  # connections refused
            before = sent()
            for _ in range(3):
                await jump(mock_clock, 1.0)
            assert not worker.manager_reachable
            await coordinator.up()  # the same port: the next call is answered
            await jump(mock_clock, 1.0)
            assert worker.manager_reachable and sent() == before + 1
            assert held().state == "proving" and held().stop_reason is None
            assert allocations(coordinator) == 1  # (nothing else sent: no free slot)
            if pinging:
                assert beats(coordinator) == 0
            clock.start_soon(stepping, mock_clock)
        clock.cancel_scope.cancel()
    [down, again] = outage_lines(caplog)
    assert down.startswith("the manager is unreachable (cannot connect to"), down
    assert f"(for {via})" in down, down
    assert again == "the manager answers again (unreachable for 3.0 s)", again
    assert not [line for line in worker_lines(caplog) if line.startswith("Venus.WorkerPing")]


async def test_a_call_waiting_out_its_backoff_goes_as_soon_as_a_heartbeat_says_the_manager_is_back(
    tmp_path, caplog, mock_clock
):
    # The coordinator went down (connections refused) and came back: its first answer, a
    # heartbeat's, ends the outage, and the allocation that was waiting out its backoff is
    # asked then; it waited the rest of its backoff (100 s here, 30 s by default) after the
    # manager answered again. The time moves only in the test's jumps.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    script = {"Dext.AllocateJobs": first(job("j1"))}
    settings = {"heartbeat_interval": 1.0, "ping_interval": 1000.0, "idle_poll": 1.0,
                "retry_base": 100.0, "retry_cap": 100.0}  # fmt: skip
    async with trio.open_nursery() as clock:
        async with against(tmp_path, script, LONG, **settings) as (coordinator, worker):
            held = lambda: worker.held["j1"]  # noqa: E731
            # One job of the two asked for: the free slot is asked for after the idle poll.
            await until(worker, coordinator, lambda: "j1" in worker.held and held().child)
            await coordinator.down()
            await jump(mock_clock, 1.0)  # the idle poll's end: an allocation, refused
            assert not worker.manager_reachable and allocations(coordinator) == 1
            await coordinator.up()
            await jump(mock_clock, 1.0)  # a heartbeat answered, and the allocation at once
            assert worker.manager_reachable and allocations(coordinator) == 2
            clock.start_soon(stepping, mock_clock)
        clock.cancel_scope.cancel()
    [down, again] = outage_lines(caplog)
    assert down.startswith("the manager is unreachable (cannot connect to"), down
    assert again.startswith("the manager answers again"), again


async def test_a_result_waiting_out_its_backoff_goes_as_soon_as_a_heartbeat_says_the_manager_is_back(
    tmp_path, caplog, mock_clock
):
    # The finish is cut (the manager went down under it) and its connection then refused: the
    # result waits its backoff (100 s here, up to 30 s by default), and is sent again once a
    # heartbeat of the job it holds is answered, not the rest of the backoff later.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    script = {
        "Dext.AllocateJobs": first(job("j1")),
        "Dext.FinishJob": lambda params, n: CUT if n == 1 else None,
    }
    settings = {"heartbeat_interval": 1.0, "ping_interval": 1000.0, "idle_poll": 1000.0,
                "retry_base": 100.0, "retry_cap": 100.0}  # fmt: skip
    async with trio.open_nursery() as clock:
        async with against(tmp_path, script, **settings) as (coordinator, worker):
            await until(worker, coordinator, lambda: worker.counters.finish_retries == 1)
            await coordinator.down()
            await jump(mock_clock, 1.0)  # a heartbeat refused: the manager is down
            assert not worker.manager_reachable and worker.counters.delivered == 0
            await coordinator.up()
            await jump(mock_clock, 1.0)  # the next one answered, the result sent at once
            assert worker.manager_reachable and worker.counters.delivered == 1
            assert len(coordinator.finishes("j1")) == 2
            clock.start_soon(stepping, mock_clock)
        clock.cancel_scope.cancel()
    assert "job j1: delivered 1 proofs (attempt 2)" in worker_lines(caplog)


BAD_HEARTBEATS = {
    **BAD_ANSWERS,
    **NO_LIST,
    "stop-signal-without-reason": [{"Id": "j1"}],
    "not-a-list": {"Id": "j1", "Reason": "reset"},
}


@pytest.mark.parametrize("answer", BAD_HEARTBEATS.values(), ids=BAD_HEARTBEATS.keys())
async def test_heartbeats_answered_wrong_neither_stop_the_proof_nor_the_worker(
    tmp_path, caplog, answer
):
    # Heartbeats go at their interval, answered or not (no backoff: each is a job's lease kept).
    script = {"Dext.AllocateJobs": first(job("j1")), "Dext.HeartbeatJobs": lambda p, n: answer}
    async with against(tmp_path, script, LONG, **timeout_for(answer)) as (coordinator, worker):
        await coordinator.wait_for(lambda c: beats(c) >= 1 + times_bad(answer))
        held = worker.held["j1"]
        assert held.state == "proving" and held.stop_reason is None
        assert held.last_heartbeat is None  # none counted as taken
    assert worker.counters.stopped == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    [said] = [line for line in warned if not line.startswith("stopping:")]  # (the test's end)
    assert worker.manager_url in said, said
    assert "Traceback" not in caplog.text
