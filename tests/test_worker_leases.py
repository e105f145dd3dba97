"""`damocles-ext worker` and the leases of the jobs it holds: a job taken back from it while its
heartbeats could not get through (a stall on their connection) and given to it again is proved
under the new lease, not dropped (a real coordinator over HTTP, a real store, real children)."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from helpers.frontend import plugin_block
from test_worker import Rig, children, job_input, serving, worker_settings

from damocles_ext.frontends.coordinator import Coordinator
from damocles_ext.frontends.worker import Worker
from damocles_ext.frontends.worker_state import (
    ADOPTED,
    AFRESH,
    EMPTY_INPUT,
    SAME,
    HeldJob,
    given_again,
)
from damocles_ext.jobs import rpc
from damocles_ext.jobs.worker_rules import PulledJob

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


class StalledHeartbeats(Coordinator):
    """A coordinator whose Dext.HeartbeatJobs calls wait while `held` (their connection
    stalled), then are answered as usual; it records the leases each answered call carried.
    Its Dext.AllocateJobs calls hold `allocating` while they run: a test that holds it moves
    the store's clock between two allocations, never during one (a call reads the clock as it
    begins, and its store thread may run after a sweep made at the moved clock)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.held = False
        self.allocating = trio.Lock()
        self.released = trio.Event()
        self.waiting = trio.Event()  # set when a heartbeat waits on the stall
        self.answered: list[dict[str, str]] = []

    async def handle(self, call):
        if call.method == "Dext.HeartbeatJobs":
            if self.held:
                self.waiting.set()
                await self.released.wait()
            result = await super().handle(call)
            self.answered.append({h.Id: h.Lease for h in call.params[0]})
            return result
        if call.method == "Dext.AllocateJobs":
            async with self.allocating:
                return await super().handle(call)
        return await super().handle(call)


def stalling(
    tmp_path, pm, coordinator: type[Coordinator] = StalledHeartbeats
) -> tuple[Rig, Worker]:
    """A coordinator whose heartbeats can be stalled, and a worker of two slow slots: one free,
    so the worker keeps asking (every 50 ms) while it proves a job."""
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db", coordinator=coordinator)
    kids = children(
        tmp_path, plugin_block("WdPost", "sleep", seconds=60, progress_interval=0.05) * 2
    )
    worker = Worker(rig.settings(kids, idle_poll=0.05, shutdown_grace=0.2), plugin_manager=pm)
    return rig, worker


async def test_a_job_given_back_to_the_worker_that_holds_it_is_proved_under_its_new_lease(
    tmp_path, recorder
):
    # Before, the worker ignored a job it already held when the coordinator gave it again: the
    # stalled heartbeat then answered "lease lost" and cancelled the proof, and the new lease,
    # heartbeated by nobody, timed out too: both tries spent, the WindowPoSt lost.
    rec, pm = recorder
    rig, worker = stalling(tmp_path, pm)
    now = [1_000_000.0]
    rig.jobs.clock = lambda: now[0]
    job, _ = await rig.jobs.create(job_input())
    try:
        async with serving(rig, worker):
            await worker.wait_for(lambda: job.Id in worker.held)
            await rec.next("started")
            first = worker.held[job.Id].job.Lease
            rig.coordinator.held = True  # the heartbeats' connection stalls
            await rig.coordinator.waiting.wait()
            # Silent past HeartbeatTimeout: the job is taken back and ready again (no allocation
            # meanwhile: one stamped before the jump would look silent at once, its last try)...
            async with rig.coordinator.allocating:
                now[0] += 60.0
                await rig.jobs.sweep()
                back = await rig.jobs.get(job.Id)
                assert back.State == "ready2run" and back.TryNum == 1
            # ... and the worker, asking for its free slot, is given it again.
            await worker.wait_for(lambda: rig.allocations_of(job.Id) == 2)
            again = await rig.jobs.get(job.Id)
            assert again.State == "running" and again.TryNum == 2
            assert again.WorkerName == "gpu-1" and again.lease != first
            rig.coordinator.released.set()  # the stalled heartbeat (the old lease) is answered
            beats = len(rig.coordinator.answered)
            answered = rig.coordinator.answered
            # The stalled answer, then the next heartbeat (or the proof stopped by that answer).
            await worker.wait_for(lambda: len(answered) >= beats + 2 or worker.counters.stopped)
            # The proof running goes on, heartbeated under the new lease: the job stays its own.
            assert rig.coordinator.answered[-1] == {job.Id: again.lease}
            assert worker.held[job.Id].job.Lease == again.lease
            assert worker.held[job.Id].stop_reason is None and worker.counters.stopped == 0
            assert worker.counters.pulled == 2  # (given twice: the second gives the new lease)
            still = await rig.jobs.get(job.Id)
            assert still.State == "running" and still.lease == again.lease
            assert [e for e in rec.log if e[0] == "finished"] == []
    finally:
        rig.close()


class HeldAllocationAnswers(StalledHeartbeats):
    """StalledHeartbeats whose Dext.AllocateJobs answers wait, once stored, while
    `hold_answers` (the call's answer slow on its way back)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.hold_answers = False
        self.holding = trio.Event()  # set once a job's allocation is stored, its answer held
        self.answers_go = trio.Event()

    async def handle(self, call):
        result = await super().handle(call)
        if call.method == "Dext.AllocateJobs" and self.hold_answers and result:
            self.holding.set()
            await self.answers_go.wait()
        return result


async def test_a_lease_lost_heard_before_the_answer_giving_the_job_back_stops_nothing(
    tmp_path, recorder
):
    # The job is given back to this worker (a new lease, stored) while its heartbeat under the
    # old lease is answered lease_lost before the allocation's answer arrives (two connections):
    # the proof was cancelled, then proved again from scratch under the new lease.
    rec, pm = recorder
    rig, worker = stalling(tmp_path, pm, HeldAllocationAnswers)
    now = [1_000_000.0]
    rig.jobs.clock = lambda: now[0]
    job, _ = await rig.jobs.create(job_input())
    try:
        async with serving(rig, worker):
            await worker.wait_for(lambda: job.Id in worker.held)
            await rec.next("started")
            rig.coordinator.held = True  # the heartbeats' connection stalls
            await rig.coordinator.waiting.wait()
            async with rig.coordinator.allocating:
                now[0] += 60.0
                await rig.jobs.sweep()
                rig.coordinator.hold_answers = True
            await rig.coordinator.holding.wait()  # (the worker, waiting, has nothing to say)
            again = await rig.jobs.get(job.Id)
            assert again.TryNum == 2 and again.WorkerName == "gpu-1"
            answered = rig.coordinator.answered
            beats = len(answered)
            old_lease = worker.held[job.Id].job.Lease
            rig.coordinator.released.set()  # answered lease_lost, the allocation's answer held
            # Put off (once: a stop that stands comes again at the next heartbeat).
            await worker.wait_for(
                lambda: (
                    worker.deferred_stops.get(job.Id, "") == old_lease or worker.counters.stopped
                )
            )
            assert worker.counters.stopped == 0
            rig.coordinator.hold_answers = False
            rig.coordinator.answers_go.set()
            await worker.wait_for(lambda: worker.held[job.Id].job.Lease == again.lease)
            beats = len(answered)
            await worker.wait_for(lambda: len(answered) >= beats + 2 or worker.counters.stopped)
            assert answered[-1] == {job.Id: again.lease} and worker.counters.stopped == 0
            assert [e for e in rec.log if e[0] in ("finished", "started")] == [rec.log[0]]
        assert worker.held == {} and worker.deferred_stops == {}  # (the job, released, forgotten)
    finally:
        rig.close()


async def test_a_job_reset_and_given_back_to_the_worker_that_holds_it_is_proved_afresh(
    tmp_path, recorder
):
    # An operator's reset asks for the job to be proved afresh (a proof stuck on its GPU): given
    # back to the same worker before its heartbeat says so, the old proof is cancelled and the
    # new allocation proved, where before it was ignored and timed out unheard, a try spent.
    rec, pm = recorder
    rig, worker = stalling(tmp_path, pm)
    job, _ = await rig.jobs.create(job_input())
    try:
        async with serving(rig, worker):
            await worker.wait_for(lambda: job.Id in worker.held)
            await rec.next("started")
            rig.coordinator.held = True
            await rig.coordinator.waiting.wait()
            await rig.jobs.reset(job.Id)
            await worker.wait_for(lambda: rig.allocations_of(job.Id) == 2)
            again = await rig.jobs.get(job.Id)
            assert again.State == "running" and again.TryNum == 1
            assert (await rec.next("finished"))[2] == "cancelled"
            await rec.next("started")
            assert worker.held[job.Id].job.Lease == again.lease
            assert worker.counters.stopped_by == {"reset": 1}
            rig.coordinator.released.set()
            beats, answered = len(rig.coordinator.answered), rig.coordinator.answered
            await worker.wait_for(lambda: len(answered) >= beats + 2)
            assert answered[-1] == {job.Id: again.lease}
            assert worker.held[job.Id].stop_reason is None
            assert (await rig.jobs.get(job.Id)).lease == again.lease
    finally:
        rig.close()


class LostFinishAnswer(Coordinator):
    """Stores the first failed finish, sweeps (the job is ready again: a try left), and answers
    that call with a store error, as if its answer had been lost."""

    done = False

    async def handle(self, call):
        if call.method == "Dext.FinishJob" and call.params[3] and not self.done:
            self.done = True
            await super().handle(call)
            await self.store.sweep()
            raise rpc.RpcError(rpc.METHOD_ERROR, "store hiccup", call.request_id)
        return await super().handle(call)


async def test_a_try_given_back_while_the_last_tries_error_was_delivered_is_proved_afresh(
    tmp_path, recorder
):
    rec, pm = recorder
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db", coordinator=LostFinishAnswer)
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0.1, fail="always") * 2)
    worker = Worker(
        rig.settings(kids, idle_poll=0.05, retry_base=0.5, retry_cap=0.5), plugin_manager=pm
    )
    job, _ = await rig.jobs.create(job_input())
    try:
        async with serving(rig, worker):
            await worker.wait_for(lambda: rig.allocations_of(job.Id) == 2)
            await worker.wait_for(lambda: job.Id not in worker.held)
        final = await rig.jobs.get(job.Id)
        assert final.TryNum == 2
        # Try 2 was finished with try 1's error: the prover was never asked again.
        assert sum(e[0] == "finished" for e in rec.log) == 2, rec.log
    finally:
        rig.close()


class FinishFailsOnce(HeldAllocationAnswers):
    """HeldAllocationAnswers whose first Dext.FinishJob fails with a store error (not stored)."""

    failed = False

    async def handle(self, call):
        if call.method == "Dext.FinishJob" and not self.failed:
            self.failed = True
            raise rpc.RpcError(rpc.METHOD_ERROR, "store hiccup", call.request_id)
        return await super().handle(call)


async def test_a_result_sent_under_a_lease_that_lapsed_as_it_went_is_sent_again_under_the_new_one(
    tmp_path,
):
    # A proof done, its finish failed once; the lease lapses (heartbeats stalled) and the job is
    # given back to this worker (try 2, adopted) by an allocation whose answer is on its way
    # while the result's next finish waits for the connection, built under the old lease: that
    # finish is refused ("lease lost") and the result goes at once under the new lease.
    # Removing that resend (the result given up as refused, the proof lost) failed no test.
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db", coordinator=FinishFailsOnce)
    now = [1_000_000.0]
    rig.jobs.clock = lambda: now[0]
    # Two slots: one free, so the worker keeps asking (every 50 ms) while it holds the job.
    kids = children(tmp_path, plugin_block("WdPost", "echo") * 2)
    worker = Worker(rig.settings(kids, idle_poll=0.05), clock=lambda: now[0])
    # The result's first wait is held until the job is given back, its answer held; the
    # later ones are not waited (the backoff's waits play no part).
    waits, go = [], trio.Event()

    async def held_once(seconds, **kwargs):
        waits.append(seconds)
        if len(waits) == 1:
            await go.wait()

    worker.retry_wait = held_once
    job, _ = await rig.jobs.create(job_input())
    try:
        async with serving(rig, worker):
            await worker.wait_for(lambda: len(waits) == 1)
            first = worker.held[job.Id].job.Lease
            rig.coordinator.held = True  # the heartbeats' connection stalls
            await rig.coordinator.waiting.wait()
            rig.coordinator.hold_answers = True
            async with rig.coordinator.allocating:  # silent past HeartbeatTimeout: ready again
                now[0] += 60.0
                await rig.jobs.sweep()
                assert (await rig.jobs.get(job.Id)).State == "ready2run"
            await rig.coordinator.holding.wait()  # given back, the answer on its way
            go.set()  # the next finish, under the old lease, waits for the connection
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert worker.held[job.Id].job.Lease == first
            rig.coordinator.answers_go.set()
            await worker.wait_for(lambda: job.Id not in worker.held)
            rig.coordinator.released.set()
        done = await rig.jobs.get(job.Id)
        assert done.succeeded and done.TryNum == 2
        assert worker.counters.delivered == 1 and worker.counters.given_up == 0
        assert len(waits) == 1  # the refused finish was sent again at once
    finally:
        rig.close()


def test_a_job_given_again_under_a_new_lease_is_adopted_from_that_allocation_unless_stopping():
    first = PulledJob(Id="j", Input=EMPTY_INPUT, Lease="lease-1", TryNum=1)
    later = PulledJob(Id="j", Input=EMPTY_INPUT, Lease="lease-2", TryNum=2)
    # Adopted: the held job is the new allocation's, and so is its time, from which its
    # result's lifetime runs (counted from the lapsed one, the result could be given up as
    # "not delivered within the lifetime" of an allocation the manager no longer has).
    held = HeldJob(first, allocated_at=100.0)
    assert given_again(held, later, 500.0) == ADOPTED
    assert (held.job, held.allocated_at) == (later, 500.0)
    # The same lease (the same allocation told twice): nothing new.
    held = HeldJob(first, allocated_at=100.0)
    assert given_again(held, first, 500.0) == SAME and held.allocated_at == 100.0
    # A job being stopped (its proof or delivery cancelled) cannot be adopted: its work is
    # going away, and the new allocation would be left unproved and unheard; proved afresh.
    held = HeldJob(first, allocated_at=100.0, stop_reason="lease_lost: taken back")
    assert given_again(held, later, 500.0) == AFRESH
    assert (held.job, held.allocated_at) == (first, 100.0)
    # A result (a proof) being delivered is adopted; an error being delivered is not.
    held = HeldJob(first, allocated_at=100.0, state="finishing")
    assert given_again(held, later, 500.0) == ADOPTED
    held = HeldJob(first, allocated_at=100.0, state="finishing", error="no proof")
    assert given_again(held, later, 500.0) == AFRESH


def test_a_job_stopped_again_before_its_proof_ends_is_counted_and_said_once(tmp_path, caplog):
    # A stop may come again while the first one's cancellation has not yet released the job (a
    # second heartbeat's answer, or the job given again afresh): the first reason stands, the
    # stop is counted once (the stopped-by counters) and said once.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    kids = children(tmp_path, plugin_block("WdPost", "echo"))
    worker = Worker(worker_settings("http://127.0.0.1:9", kids))
    held = HeldJob(PulledJob(Id="j", Input=EMPTY_INPUT, Lease="lease-1", TryNum=1), 0.0)
    worker.held["j"] = held
    worker.stop_job("j", "lease_lost", "lease_lost: another worker holds it")
    worker.stop_job("j", "reset", "reset: given to this worker afresh (try 1)")
    assert held.scope.cancel_called and held.stop_reason == "lease_lost: another worker holds it"
    assert worker.counters.stopped_by == {"lease_lost": 1}
    assert len([r for r in caplog.records if "the manager took it back" in r.getMessage()]) == 1


class SlowFinishAnswer(Coordinator):
    """Stores each Dext.FinishJob, then holds its answer until `answers_go` (slow on its way
    back, while the heartbeats' own connection goes on)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.stored = trio.Event()
        self.answers_go = trio.Event()

    async def handle(self, call):
        result = await super().handle(call)
        if call.method == "Dext.FinishJob":
            self.stored.set()
            await self.answers_go.wait()
        return result


async def test_a_heartbeat_saying_finished_before_the_finishs_own_answer_drops_nothing(
    tmp_path, caplog
):
    # The finish is stored, its answer slow; a heartbeat, on its own connection, is answered
    # first: "finished". That is this worker's own finish: the delivery goes on to its answer,
    # counted delivered, neither cancelled nor said dropped ("took it back") with an error.
    caplog.set_level(logging.INFO, "damocles_ext.worker")
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db", coordinator=SlowFinishAnswer)
    kids = children(tmp_path, plugin_block("WdPost", "sleep", seconds=0.1))
    worker = Worker(rig.settings(kids, idle_poll=0.05, heartbeat_interval=0.05))
    beats_after = [0]
    job, _ = await rig.jobs.create(job_input())
    try:
        async with serving(rig, worker):
            await rig.coordinator.stored.wait()

            def beaten(_seconds: float) -> None:  # each heartbeat answered, from now on
                beats_after[0] += 1
                worker.touch()

            worker.counters.on_heartbeat = beaten
            # The second heartbeat answered from now on was sent after the finish was stored:
            # answered "finished" (and acted on, or not, as its answer was read).
            await worker.wait_for(lambda: beats_after[0] >= 2 or worker.counters.stopped)
            rig.coordinator.answers_go.set()
            await worker.wait_for(lambda: job.Id not in worker.held)
        assert worker.counters.delivered == 1 and worker.counters.stopped_by == {}
        assert "took it back" not in caplog.text, caplog.text
        assert (await rig.jobs.get(job.Id)).succeeded
    finally:
        rig.close()
