"""The worker's Venus.WorkerPing, against a real coordinator (over HTTP, on SQLite): damocles'
WorkerInfo shape, the worker's row kept live by it, a failing ping logged once and never fatal."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from helpers.frontend import date_rewriting_proxy, plugin_block
from test_worker import Rig, children, job_input, start_worker, worker_settings

from damocles_ext.frontends.coordinator import Coordinator
from damocles_ext.frontends.worker import Worker
from damocles_ext.frontends.worker_ping import SKEW_CORRECTED, check_skew, manager_offset
from damocles_ext.jobs import rpc
from damocles_ext.jobs.client import AnswerClock, RpcClient, answer_clock
from damocles_ext.jobs.worker_rules import worker_info

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


class Pinged(Coordinator):
    """The coordinator, keeping the WorkerPing params it got; refusing them while `refuse`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pings: list = []
        self.refuse = False
        self._pinged = trio.Event()

    async def pinged(self, count: int) -> None:
        while len(self.pings) < count:
            await self._pinged.wait()

    async def pinged_with(self, **summary: int) -> None:
        """Until the last ping's Summary has these counts."""
        while not self.pings or any(
            self.pings[-1][0]["Summary"][k] != v for k, v in summary.items()
        ):
            await self._pinged.wait()

    async def handle(self, call):
        if call.method == "Venus.WorkerPing":
            self.pings.append(call.params)
            self._pinged.set()
            self._pinged = trio.Event()
            if self.refuse:
                # damocles-manager's own refusal of a ping it cannot take.
                raise rpc.RpcError(1, "worker dest is required", call.request_id)
        return await super().handle(call)


async def test_the_ping_keeps_an_idle_worker_live_in_the_store_with_damocles_worker_info(tmp_path):
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db", coordinator=Pinged)
    now = [1000.0]
    rig.jobs.clock = lambda: now[0]
    kids = children(tmp_path, plugin_block("WdPost", "echo", concurrent=2))
    # idle_poll 600 s and no job: after its first allocation, only pings reach the coordinator.
    worker = Worker(rig.settings(kids, ping_interval=0.05))
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(rig.server.serve)
                running = await start_worker(nursery, worker)
                await worker.wait_for(lambda: worker.counters.allocations == 1)
                summary = await rig.jobs.summary()
                assert [w.worker for w in summary.workers] == ["gpu-1"]
                now[0] += 3600.0  # an hour later, the allocation alone would be long stale
                seen = worker.counters.pings
                await worker.wait_for(lambda: worker.counters.pings >= seen + 2)
                summary = await rig.jobs.summary()
                await running.stop()
                nursery.cancel_scope.cancel()
    finally:
        rig.close()
    assert summary.live_workers == 1 and [w.worker for w in summary.workers] == ["gpu-1"]
    assert worker.counters.allocations == 1
    # damocles' WorkerInfo, as damocles-manager decodes it (core.WorkerInfo).
    [info] = rig.coordinator.pings[-1]
    assert set(info) == {"Name", "Dest", "Version", "Summary"}
    assert info["Name"] == "gpu-1" and info["Dest"] == "127.0.0.1:0"
    assert info["Version"].startswith("damocles-ext v")
    assert info["Summary"] == {
        "Threads": 2, "Empty": 2, "Paused": 0, "Running": 0, "Waiting": 0, "Errors": 0,
    }  # fmt: skip


async def test_a_failing_ping_is_logged_once_per_outage_and_jobs_go_on(tmp_path, caplog):
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db", coordinator=Pinged)
    rig.coordinator.refuse = True
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(rig.settings(kids, ping_interval=0.02))
    job, _ = await rig.jobs.create(job_input())
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(rig.server.serve)
                running = await start_worker(nursery, worker)
                await worker.wait_for(lambda: worker.counters.delivered == 1)
                await rig.coordinator.pinged(5)  # several failed pings in a row
                rig.coordinator.refuse = False
                await worker.wait_for(lambda: worker.counters.pings >= 1)
                await running.stop()
                nursery.cancel_scope.cancel()
        done = await rig.jobs.get(job.Id)
    finally:
        rig.close()
    assert done.succeeded
    lines = [r.getMessage() for r in caplog.records if "WorkerPing" in r.getMessage()]
    assert len([m for m in lines if "failed" in m]) == 1, lines
    assert "worker dest is required" in lines[0]
    assert lines[-1] == "Venus.WorkerPing works again"


def test_worker_info_counts_slots_as_damocles_counts_threads():
    info = worker_info("w", "fe80::1", "1.2", slots=4, proving=2, finishing=1, children_down=1)
    assert info.Dest == "[fe80::1]:0" and info.Version == "damocles-ext v1.2"
    s = info.Summary
    assert (s.Threads, s.Empty, s.Running, s.Waiting, s.Errors, s.Paused) == (4, 1, 2, 1, 1, 0)
    # Paused (taking no job): its free slot is Paused, not Empty; the rest as they are.
    info = worker_info("w", "h", "1.2", slots=4, proving=2, finishing=1, children_down=1,
                       paused=True)  # fmt: skip
    s = info.Summary
    assert (s.Threads, s.Empty, s.Running, s.Waiting, s.Errors, s.Paused) == (4, 0, 2, 1, 1, 1)


async def test_a_worker_whose_clock_is_off_the_managers_is_warned_once(tmp_path, caplog):
    # The coordinator's answers carry a Date, as damocles-manager's (Go's net/http) do: the
    # worker keeps the difference, by which it reads a job's NotAfter (the manager's clock), and
    # warns once (test_worker_deadlines.py: what it does to their jobs).
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db", coordinator=Pinged)
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(rig.settings(kids, ping_interval=0.02), clock=lambda: time.time() + 30)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(rig.server.serve)
                running = await start_worker(nursery, worker)
                await worker.wait_for(lambda: worker.counters.pings >= 3)
                await running.stop()
                nursery.cancel_scope.cancel()
    finally:
        rig.close()
    skew = [
        r.getMessage() for r in caplog.records if "the manager's (the clock of" in r.getMessage()
    ]
    assert len(skew) == 1, skew  # once, however many pings
    assert "about 30 s ahead of the manager's" in skew[0]
    assert "is read on the manager's clock, corrected by this difference" in skew[0]
    assert worker.clock_offset == pytest.approx(-30, abs=1.5)  # (the Date is to the second)


def test_the_clock_check_warns_once_each_way_and_says_when_it_agrees_again(caplog):
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    date = 1_700_000_000.0
    assert check_skew(None, date, False) is False  # no Date: nothing to compare
    assert check_skew(_date(date), date + 0.9, False) is False  # within the second it names
    assert check_skew(_date(date), date - 10, False) is True
    assert check_skew(_date(date), date - 10, True) is True
    assert check_skew(_date(date), date + 1, True) is False
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "about 10 s behind the manager's" in messages[0]
    # Deadlines are read on the manager's clock; damocles-manager's jobs have none: said.
    assert "read on the manager's clock" in messages[0]
    assert "damocles-manager's do not" in messages[0]
    assert messages[1] == "this machine's clock agrees with the manager's again"


async def test_a_split_workers_ping_counts_a_snark_child_that_is_down_among_its_errors(tmp_path):
    # One of its two GPUs' SNARK children gave up: the manager's worker list must show the
    # worker's error (as damocles-worker's Errors), though its slots are the vanilla children's.
    from test_worker import crashing_table

    rig = Rig(f"sqlite:///{tmp_path}/jobs.db", coordinator=Pinged)
    config = (
        plugin_block("WdPostVanilla", "echo")
        + plugin_block("WdPostSnark", "echo")
        + crashing_table("WdPostSnark", "no GPU")
    )
    worker = Worker(rig.settings(children(tmp_path, config), ping_interval=0.05))
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(rig.server.serve)
                running = await start_worker(nursery, worker)
                await worker.wait_for(
                    lambda: (
                        [c.state for c in worker.supervisor.statistics().children]
                        == ["ready", "ready", "stopped"]
                    )
                )
                seen = worker.counters.pings
                await worker.wait_for(lambda: worker.counters.pings >= seen + 2)
                await running.stop()
                nursery.cancel_scope.cancel()
    finally:
        rig.close()
    [info] = rig.coordinator.pings[-1]
    assert (info["Summary"]["Threads"], info["Summary"]["Errors"]) == (1, 1), info


@asynccontextmanager
async def paused_by_its_failures(
    tmp_path, *, ping_interval: float, concurrent: int = 1
) -> AsyncIterator[tuple[Rig, Worker, list[str]]]:
    """A worker whose prover fails every proof, 5 jobs ready (their ids yielded): in the block
    once 3 proofs failed in a row paused it and it holds no job; stopped after it."""
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db", coordinator=Pinged)
    kids = children(tmp_path, plugin_block("WdPost", "sleep", concurrent=concurrent, seconds=0,
                                           fail="always"))  # fmt: skip
    worker = Worker(rig.settings(kids, ping_interval=ping_interval))
    ids = [(await rig.jobs.create(job_input(seed=seed)))[0].Id for seed in range(5)]
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(rig.server.serve)
                running = await start_worker(nursery, worker)
                await worker.wait_for(lambda: worker.counters.pauses == 1 and not worker.held)
                yield rig, worker, ids
                await running.stop()
                nursery.cancel_scope.cancel()
    finally:
        rig.close()


async def test_a_paused_workers_ping_reports_its_free_slots_paused_at_once(tmp_path):
    # 3 proofs failed in a row: the worker takes no job for 30 s. damocles-manager's worker
    # list (and our coordinator) must see that, not free slots of an idle worker; and at once,
    # not at the next ping, 30 s later, when a first pause of 30 s is over.
    async with paused_by_its_failures(tmp_path, ping_interval=600, concurrent=2) as (
        rig,
        worker,
        _,
    ):
        # Pinged as it paused and as its slots freed, not 600 s later.
        await rig.coordinator.pinged_with(Paused=2)
        paused = rig.coordinator.paused_workers.names(time.time())
    assert worker.paused() is not None
    [info] = rig.coordinator.pings[-1]
    assert info["Summary"] == {
        "Threads": 2, "Empty": 0, "Paused": 2, "Running": 0, "Waiting": 0, "Errors": 0,
    }  # fmt: skip
    assert paused == {"gpu-1"}  # the coordinator that took the ping shows it paused


async def test_a_worker_paused_by_prover_failures_asks_for_no_job_while_paused(tmp_path):
    # 3 proofs failed in a row: the worker takes no job for 30 s, so that other workers take
    # them. Before, only a test stopped at the instant of the pause said so: dropping the pause
    # from the allocation loop's wait failed none, the next job pulled at once.
    async with paused_by_its_failures(tmp_path, ping_interval=0.05) as (rig, worker, ids):
        # Its slot free, jobs ready: pinged 5 times more, 0.05 s apart, pulling none.
        await rig.coordinator.pinged(len(rig.coordinator.pings) + 5)
        pulled = worker.counters.pulled
        states = [(await rig.jobs.get(i)).State for i in ids]
    assert pulled == 3  # the Breaker's limit, then none while paused
    assert states.count("ready2run") == 2, states  # left for other workers


def _date(date: float) -> AnswerClock:
    """The clock an answer with this Date (and no X-Dext-Clock) gives: the middle of its second."""
    return AnswerClock(date + 0.5, precise=False)


def test_the_managers_clock_is_taken_from_a_date_only_beyond_its_seconds_noise():
    # The Date is to the second: read as the middle of it, a clock in step is within half a
    # second of it, and is not corrected; a clock off by more is, by what the Date shows.
    date = 1_700_000_000.0
    assert manager_offset(_date(date), date + 0.5, 0.0) == 0.0  # in step
    assert manager_offset(_date(date), date + 0.5 + 0.9, 0.0) == 0.0  # within the noise
    assert manager_offset(_date(date), date + 0.5 + SKEW_CORRECTED, 0.0) == -SKEW_CORRECTED
    assert manager_offset(_date(date), date + 60.3, 0.0) == pytest.approx(-59.8)  # 60 s ahead
    assert manager_offset(_date(date), date - 59.7, 0.0) == pytest.approx(60.2)  # 60 s behind
    assert manager_offset(None, date, -59.8) == -59.8  # no Date: the last one kept
    assert manager_offset(_date(date), date + 0.2, -59.8) == 0.0  # back in step


def test_the_managers_clock_to_the_millisecond_is_taken_as_it_is():
    # A damocles-ext coordinator's X-Dext-Clock: no second's noise to ignore, so a clock 0.8 s
    # off is corrected by 0.8 s, not by 0 or 1.2 s from one answer to the next as by a Date.
    at = 1_700_000_000.25
    assert manager_offset(AnswerClock(at, precise=True), at + 0.8, 0.0) == pytest.approx(-0.8)
    assert manager_offset(AnswerClock(at, precise=True), at - 0.004, 0.0) == pytest.approx(
        0.004, abs=1e-6
    )
    assert check_skew(AnswerClock(at, precise=True), at + 2.9, False) is False
    assert check_skew(AnswerClock(at, precise=True), at + 3.1, False) is True


def test_an_answers_clock_is_its_x_dext_clock_before_its_date():
    # Behind nginx, the Date is the proxy machine's (here a minute off); the header the
    # coordinator's, passed on as it is.
    date = (b"date", b"Tue, 14 Nov 2023 22:12:20 GMT")  # 1_700_000_000 - 60
    assert answer_clock([date, (b"x-dext-clock", b"1700000000.123")]) == AnswerClock(
        1_700_000_000.123, precise=True
    )
    assert answer_clock([date]) == AnswerClock(1_699_999_940.5, precise=False)  # a manager's
    for unreadable in (b"soon", b"nan", b"inf", b"-5", b""):
        assert answer_clock([date, (b"x-dext-clock", unreadable)]) == AnswerClock(
            1_699_999_940.5, precise=False
        )
    assert answer_clock([]) is None


async def test_the_coordinators_answers_carry_its_clock_to_the_millisecond(tmp_path):
    # Its store's clock (on PostgreSQL the server's), beside the Date, in X-Dext-Clock.
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db")
    rig.jobs.clock = lambda: 1_700_000_000.1234
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(rig.server.serve)
                async with RpcClient(f"127.0.0.1:{rig.port}") as client:
                    await client.call("Venus.WdPoStAllJobs")
                    headers = dict(client._last_headers)
                    clock = client.answer_clock
                nursery.cancel_scope.cancel()
    finally:
        rig.close()
    assert headers[b"x-dext-clock"] == b"1700000000.123"
    assert headers[b"date"] == b"Tue, 14 Nov 2023 22:13:20 GMT"  # (kept, as HTTP servers do)
    assert clock == AnswerClock(1_700_000_000.123, precise=True)


async def test_a_worker_behind_a_proxy_with_a_date_a_minute_off_reads_deadlines_on_the_coordinator(
    tmp_path,
):
    # nginx in front of the coordinator sends its own Date, here a minute behind; the worker
    # took that for the coordinator's clock and read every job's deadline a minute early.
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db", coordinator=Pinged)
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(rig.server.serve)
                [listener] = await nursery.start(date_rewriting_proxy, rig.port, -60.0)
                settings = worker_settings(
                    f"127.0.0.1:{listener.socket.getsockname()[1]}", kids, ping_interval=0.02
                )
                worker = Worker(settings)
                running = await start_worker(nursery, worker)
                await worker.wait_for(lambda: worker.counters.pings >= 3)
                offset = worker.clock_offset
                await running.stop()
                nursery.cancel_scope.cancel()
    finally:
        rig.close()
    assert offset == pytest.approx(0, abs=0.5), offset  # (not -60: the Date)
