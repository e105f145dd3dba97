"""The supervisor's memory stays bounded: nothing of a request outlives its answer.

Each test runs the leaking pattern many times and checks that what is retained does not grow
with the count: the scheduler's per-request state (measured with tracemalloc), the timers of
answered requests, and the queue of events for observer plugins that are slow or never return.
"""

from __future__ import annotations

import gc
import logging
import threading
import tracemalloc

import pytest
import trio
from helpers.supervisor import dext_child, spec, window_task

from damocles_ext.hookspecs import hookimpl
from damocles_ext.plugins import get_plugin_manager
from damocles_ext.scheduling.policy import ChildSlots, Job, Scheduler
from damocles_ext.supervisor import Supervisor, observers
from damocles_ext.supervisor.restart import BackoffPolicy

WD = "window_post"


pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def _retained(run, first: int, count: int) -> int:
    """Bytes still allocated after `run(first, count)`, traced from its start."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(first, count)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_jobs_failed_in_the_queue_leave_nothing_in_the_scheduler():
    s = Scheduler()  # no child for the stage: every job fails at the first decide()

    def fail(first: int, count: int) -> None:
        for rid in range(first, first + count):
            s.submit(Job(rid, WD, float(rid)), float(rid))
            s.decide(float(rid))

    fail(1, 200)  # warm up: dicts and heaps reach their working size
    # 20,000 requests used to leave ~90 bytes each (an arrival-order entry): ~1.8 MB.
    assert _retained(fail, 1000, 20_000) < 50_000


def test_jobs_lost_with_their_child_leave_nothing_in_the_scheduler():
    s = Scheduler()
    s.add_child(ChildSlots("a", WD, 1, 1, frozenset({"gpu:0"})))
    s.child_ready("a", 0.0)

    def lose(first: int, count: int) -> None:
        for rid in range(first, first + count):
            s.submit(Job(rid, WD, float(rid)), float(rid))
            s.decide(float(rid))
            assert [j.request_id for j in s.child_down("a", float(rid))] == [rid]
            s.child_ready("a", float(rid))  # the caller failed it rather than requeue it

    lose(1, 200)
    assert _retained(lose, 1000, 20_000) < 50_000


def test_retried_attempts_keep_their_requests_arrival_order():
    # The supervisor gives each retry a fresh job id; the retries still go in arrival order.
    s = Scheduler()
    s.add_child(ChildSlots("a", WD, 2, 1, frozenset()))
    s.child_ready("a", 0.0)
    s.submit(Job(1, WD, 1.0), 1.0)
    s.submit(Job(2, WD, 2.0), 2.0)
    s.decide(2.0)
    lost = s.child_down("a", 3.0)
    s.submit(Job(3, WD, 3.0), 3.0)
    for job, fresh_id in zip(reversed(lost), (12, 11), strict=True):
        s.requeue(Job(fresh_id, WD, job.arrival), 3.0)
    s.child_ready("a", 4.0)
    first = [d.request_id for d in s.decide(4.0)]
    for rid in first:
        s.finished(rid, 5.0)
    assert first + [d.request_id for d in s.decide(5.0)] == [11, 12, 3]


async def test_timers_of_answered_requests_do_not_pile_up_until_they_expire():
    # RequestTimeoutSecs of an hour: each answered request's timer used to stay an hour.
    child = spec(dext_child(), request_timeout=3600.0)
    sup = Supervisor([child])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        for i in range(300):
            await sup.submit(window_task(miner=i))
        pending = sup._book.sizes()["alarms"]
        sup.request_shutdown()
    assert pending <= 1


async def test_timers_of_a_dead_child_go_with_it():
    # The heartbeat check is on by default for dext children; its timer held a dead process (its
    # pipes and buffers) until it fired, a minute later: under frequent crashes memory grew.
    child = spec(dext_child("answer(msg)\nos._exit(3)", setup="import os"), max_attempts=5)
    sup = Supervisor([child], backoff=BackoffPolicy(base=0.01, cap=0.02))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for i in range(20):
            await sup.wait_ready()
            await sup.submit(window_task(miner=i))
        pending = sup._book.sizes()["alarms"]
        sup.request_shutdown()
    assert pending <= 2


class _HangingObserver:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    async def dext_request_finished(self, request, outcome, duration):
        self.calls += 1
        await trio.sleep_forever()


def _observed_supervisor(observer: object, name: str) -> Supervisor:
    """A supervisor of one fake dext child whose only plugin is `observer`, named `name`."""
    pm = get_plugin_manager(entry_points=False)
    pm.register(observer, name=name)
    return Supervisor([spec(dext_child())], plugin_manager=pm)


async def _three_requests_then_stop(sup: Supervisor) -> None:
    """Run `sup`, prove three requests one after the other, then shut it down."""
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        for i in range(3):
            await sup.submit(window_task(miner=i))
        sup.request_shutdown()


async def test_an_observer_that_never_returns_does_not_keep_the_supervisor_running(
    monkeypatch, caplog
):
    monkeypatch.setattr(observers, "OBSERVER_TIMEOUT", 0.05)
    observer = _HangingObserver()
    with trio.fail_after(20):
        await _three_requests_then_stop(_observed_supervisor(observer, "hanging"))
    assert observer.calls == 3  # each call was cut off, and the next one still came
    assert "did not return within 0.05s" in caplog.text


async def test_events_for_a_stuck_observer_are_dropped_beyond_the_backlog(monkeypatch, caplog):
    monkeypatch.setattr(observers, "OBSERVER_BACKLOG", 5)
    monkeypatch.setattr(observers, "OBSERVER_TIMEOUT", 0.05)
    caplog.set_level(logging.WARNING, "damocles_ext.supervisor")
    observer = _HangingObserver()
    sup = _observed_supervisor(observer, "hanging")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        for i in range(40):  # two events a request, on one trio tick each: faster than 0.05 s
            await sup.submit(window_task(miner=i))
        dropped = sup._observers.dropped
        sup.request_shutdown()
    assert dropped > 0
    assert "observers are too slow" in caplog.text


class _BlockingObserver:
    """A plain observer that blocks its caller until the test releases it (an HTTP alert sent
    without a thread, to a server that does not answer)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit  # how long it blocks at most: past it, it notes that it was not freed
        self.entered = threading.Event()
        self.release = threading.Event()
        self.held_the_loop = False
        self.calls = 0

    @hookimpl
    def dext_request_finished(self, request):
        self.calls += 1
        self.entered.set()
        if not self.release.wait(self.limit):
            self.held_the_loop = True  # the test could not release it: its loop was blocked
            self.release.set()


async def test_a_blocking_plain_observer_does_not_hold_the_supervisor_back():
    observer = _BlockingObserver(limit=5)
    sup = _observed_supervisor(observer, "blocking")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            await sup.submit(window_task(miner=0))
            assert await trio.to_thread.run_sync(observer.entered.wait, 10)
            for i in range(1, 4):  # answered while the first observer call is blocked
                await sup.submit(window_task(miner=i))
            status = sup.statistics()
            observer.release.set()
            sup.request_shutdown()
    assert not observer.held_the_loop
    assert status is not None
    assert observer.calls == 4  # the later events were delivered once it returned


async def test_a_stuck_plain_observer_is_cut_off_and_logged_once_naming_its_plugin(
    monkeypatch, caplog
):
    monkeypatch.setattr(observers, "OBSERVER_TIMEOUT", 0.05)
    monkeypatch.setattr(observers, "OBSERVER_THREADS", 1)
    caplog.set_level(logging.WARNING, "damocles_ext.supervisor")
    observer = _BlockingObserver(limit=5)
    sup = _observed_supervisor(observer, "stuck")
    try:
        with trio.fail_after(30):
            await _three_requests_then_stop(sup)
    finally:
        observer.release.set()  # its abandoned thread ends
    cut_off = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
    expected = (
        "observer hook dext_request_finished: the observer of plugin 'stuck' did not return"
        " within 0.05s; cut off, this event's later observers missed it (observers must return"
        " quickly; a plain function goes on in its thread, its result ignored)"
    )
    assert cut_off == [expected]
    # Its thread is still held: the two later events are dropped at once, not waited for.
    assert observer.calls == 1
    assert sup._observers.dropped == 2
    held = [r.getMessage() for r in caplog.records if "observer threads are held" in r.getMessage()]
    assert len(held) == 1 and held[0].startswith("observer hook dext_request_finished:")
    assert not observer.held_the_loop


def test_a_timer_cancelled_after_it_fired_is_not_counted_twice():
    # The heartbeat and stdin timers of a process are cancelled when it goes down, often after
    # they fired: the count of live timers (what the leak tests read) must stay right.
    from damocles_ext.lifecycle.deadlines import Alarms

    timers: Alarms[str] = Alarms()
    fired = timers.add(1.0, "heartbeat")
    live = timers.add(5.0, "stdin")
    assert len(timers.pop_due(2.0)) == 1
    timers.cancel(fired)
    assert len(timers) == 1
    timers.cancel(live)
    assert len(timers) == 0
