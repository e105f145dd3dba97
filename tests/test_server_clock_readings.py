"""A coordinator's and a producer's readings of the PostgreSQL server's clock (TrioJobStore's
`read_server_clock`): a slow reading is not kept, the store's clock counts a suspend of this
machine, and a stalled database holds a reading a few seconds at most."""

from __future__ import annotations

import logging
import threading
import time

import trio

from damocles_ext.jobs import trio_store
from damocles_ext.jobs.store import JobStore, TrioJobStore
from damocles_ext.jobs.store_clock import clock_skew


async def test_a_slow_reading_of_the_servers_clock_does_not_move_the_stores_clock(
    postgres_url, caplog
):
    # A reading is taken halfway through its round trip: one whose answer came 2 s after the
    # server read its clock (a retransmitted packet, a server starved of CPU) was 1 s off, and
    # replaced the last reading: the store's clock jumped a second, said as a move of the server's.
    from damocles_ext.frontends.coordinator import Coordinator

    caplog.set_level(logging.DEBUG)
    slow = [False]

    def reading(engine, clock):
        if not slow[0]:
            return clock_skew(engine, clock)
        calls = [0]

        def late():  # the second look (after the answer) is 2 s on
            calls[0] += 1
            return clock() + (2.0 if calls[0] == 2 else 0.0)

        return clock_skew(engine, late)

    with JobStore.open(postgres_url) as store:
        jobs = TrioJobStore(store)
        coordinator = Coordinator(jobs)
        await coordinator.server_clock.read_server()
        known = jobs.server_offset
        assert known is not None
        trio_store.clock_skew, real = reading, trio_store.clock_skew
        try:
            slow[0] = True
            await coordinator.server_clock.read_server()
        finally:
            trio_store.clock_skew = real
        assert jobs.server_offset is not None and abs(jobs.server_offset - known) < 0.2
    assert "moved forward" not in caplog.text and "moved back" not in caplog.text
    assert "(over 0.5 s): not kept, the last one holds" in caplog.text


async def test_the_stores_clock_counts_a_suspend_of_this_machine(postgres_url, monkeypatch):
    # time.monotonic stops while Linux is suspended: after a resume, until the next reading,
    # heartbeats were stamped and Dates sent the whole suspend behind the server's clock.
    suspended = [0.0]
    gettime = time.clock_gettime

    def clock_gettime(which):
        if which == time.CLOCK_BOOTTIME:
            return gettime(which) + suspended[0]
        return gettime(which)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    with JobStore.open(postgres_url) as store:
        jobs = TrioJobStore(store)
        assert await jobs.read_server_clock() is not None
        before = jobs.clock()
        suspended[0] = 600.0  # this machine slept 10 minutes (time.time is not moved here)
        assert abs(jobs.clock() - before - 600) < 5


async def test_a_suspend_of_this_machine_takes_back_no_job_heartbeated_before_it(
    postgres_url, monkeypatch, caplog
):
    # The store's clock counts a suspend (the boot clock), the monotonic clock the sweeps measure
    # steps against does not: the 600 s were a step of the wall clock only ("no job is
    # affected"), the server's clock read after the resume had not moved against the store's, and
    # a sweep before the workers' next heartbeats took back every job heard before the suspend.
    from test_jobs_rules import make_input

    from damocles_ext.frontends.coordinator import Coordinator
    from damocles_ext.jobs import rules
    from damocles_ext.jobs.model import RUNNING

    caplog.set_level(logging.INFO, "damocles_ext.coordinator")
    suspended = [0.0]  # boot, wall and server clocks run on through it; the monotonic one stops

    def reading(engine, clock):
        read = clock_skew(engine, clock)
        return None if read is None else read._replace(skew=read.skew - suspended[0])

    monkeypatch.setattr(trio_store, "clock_skew", reading)
    with JobStore.open(postgres_url) as store:
        jobs = TrioJobStore(store, clock=lambda: time.time() + suspended[0],
                            steady=lambda: time.monotonic() + suspended[0])  # fmt: skip
        coordinator = Coordinator(jobs, monotonic=time.monotonic)
        clock = coordinator.server_clock
        await clock.read_server()
        last = clock.watch(None, 1.0)
        job, _ = await jobs.create(make_input())
        await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
        suspended[0] = 600.0
        await clock.read_server()  # the server's clock moved with the store's: no step there
        clock.watch(last, 1.0)
        now = jobs.clock()
        assert coordinator.hearing.silent_before(now, 30) == float("-inf")
        await coordinator.sweep_once()  # before worker-a's next heartbeat lands
        assert (await jobs.get(job.Id)).State == RUNNING
    assert "this machine was suspended for 600 s" in caplog.text
    assert "the wall clock stepped" not in caplog.text


async def test_a_stalled_database_holds_a_reading_of_its_clock_seconds_not_a_call_timeout(
    postgres_url, caplog, mock_clock
):
    # The reading before each sweep pass waited up to the store's call timeout (60 s) on a
    # stalled database, unsaid, before the pass's own calls (and their stall warning) began: every
    # pass, cancelling jobs at their deadline too, a minute late. It is waited for 3 s; the last
    # reading holds.
    from damocles_ext.frontends.coordinator import Coordinator

    caplog.set_level(logging.DEBUG, "damocles_ext.coordinator")
    release = threading.Event()
    stalled = [False]

    def reading(engine, clock):
        if stalled[0]:
            release.wait(30)
        return clock_skew(engine, clock)

    with JobStore.open(postgres_url) as store:
        jobs = TrioJobStore(store)
        coordinator = Coordinator(jobs)
        trio_store.clock_skew, real = reading, trio_store.clock_skew
        try:
            await coordinator.server_clock.read_server()
            known = jobs.server_offset
            assert known is not None
            # From here the clock jumps after 0.5 real seconds of nothing to do: the stalled
            # reading's 3 s pass at once (the first, real, reading above had all it needed).
            mock_clock.autojump_threshold = 0.5
            stalled[0] = True
            began = trio.current_time()
            with trio.fail_after(10):
                await coordinator.server_clock.read_server()
            assert trio.current_time() - began < 4
            assert jobs.server_offset == known
        finally:
            release.set()
            trio_store.clock_skew = real
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the last one holds
    assert "no answer to reading within 3 s; the database hangs" in caplog.text
