"""The job rules under random sequences of events (a hypothesis state machine): workers allocate,
heartbeat, finish (with their lease, without one, or with a stale one: a late proof), time
passes, sweeps and operators act; the invariants of fencing, retries and deadlines hold after
every step."""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from test_jobs_rules import make_input

from damocles_ext.jobs import model, rules
from damocles_ext.jobs.model import FINISHED, READY, RUNNING
from damocles_ext.jobs.rules import JobLimits

T0 = 1_700_000_000
INPUTS = [make_input(seed=s) for s in range(4)]
WORKERS = ["w1", "w2", "w3"]


class JobRulesMachine(RuleBasedStateMachine):
    @initialize(max_try=st.integers(1, 3))
    def setup(self, max_try: int) -> None:
        self.limits = JobLimits(max_try=max_try)
        self.now = T0
        self.jobs: dict[str, model.JobRecord] = {}
        self.tokens = (f"L{i}" for i in itertools.count())
        self.leases_seen: set[str] = set()
        # What each worker believes it holds: lease -> job id (it never forgets a lease).
        self.held: dict[str, dict[str, str]] = {w: {} for w in WORKERS}

    def step(self, job_id: str, event: rules.Event) -> rules.Step:
        before = self.jobs.get(job_id)
        step = rules.apply(before, event, self.now, self.limits, job_id=job_id)
        for effect in step.effects:
            self.check_effect(before, event, effect)
        if step.job is None:
            self.jobs.pop(job_id, None)
        else:
            assert step.job.Id == job_id
            self.jobs[job_id] = step.job
        return step

    def check_effect(self, before: model.JobRecord | None, event: rules.Event, effect) -> None:
        if isinstance(effect, rules.Allocated):
            # A lease is given once, to one job, only from ready2run, only before the deadline.
            assert effect.lease not in self.leases_seen
            self.leases_seen.add(effect.lease)
            assert before is not None and before.State == READY
            assert effect.try_num == before.TryNum + 1 <= self.limits.max_try
            assert before.not_after is None or self.now < before.not_after
        if isinstance(effect, rules.Finished) and before is not None and before.State != RUNNING:
            # A late proof: for a job nobody holds and whose outcome is open; nothing overwritten.
            assert isinstance(event, rules.Finish)
            assert event.output is not None and event.error_reason == ""
            assert before.State == READY or rules.retryable(before, self.limits)
        elif isinstance(effect, rules.Finished | rules.HeartbeatAccepted):
            # Only the current lease, or tokenless the current worker, of a running job.
            assert before is not None and before.State == RUNNING
            lease = getattr(event, "lease", None)
            worker = getattr(event, "worker", None)
            if lease is not None:
                assert lease == before.lease
            elif worker is not None:
                assert worker == before.WorkerName
        if isinstance(effect, rules.Finished):
            assert before is not None
            assert before.not_after is None or self.now < before.not_after
        if isinstance(effect, rules.FinishRepeated):
            # Only the very finish that finished the job, and it changes nothing.
            assert before is not None and before.State == FINISHED and not before.cancelled
            lease = getattr(event, "lease", None)
            assert isinstance(event, rules.Finish)
            if lease is not None:
                assert lease == before.lease
            elif event.worker is not None:
                assert event.worker == before.WorkerName
            else:  # neither: the stored result, word for word
                assert (event.output, event.error_reason) == (before.Output, before.ErrorReason)

    @rule(which=st.sampled_from(range(len(INPUTS))), deadline=st.none() | st.integers(0, 120))
    def create(self, which: int, deadline: int | None) -> None:
        not_after = None if deadline is None else self.now + deadline
        job_input = INPUTS[which]
        self.step(model.job_id(job_input), rules.Create(job_input, not_after=not_after))

    @rule(worker=st.sampled_from(WORKERS), n=st.integers(1, 3))
    def allocate(self, worker: str, n: int) -> None:
        for job in rules.choose(self.jobs.values(), rules.AllocationSpec(), n, self.now):
            lease = next(self.tokens)
            step = self.step(job.Id, rules.Allocate(worker, lease))
            assert isinstance(step.effects[0], rules.Allocated)
            self.held[worker][lease] = job.Id

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data(), how=st.sampled_from(["lease", "named", "anonymous"]),
          error=st.sampled_from(["", "boom"]))  # fmt: skip
    def finish(self, data: st.DataObject, how: str, error: str) -> None:
        worker = data.draw(st.sampled_from([w for w in WORKERS if self.held[w]]))
        lease, job_id = data.draw(st.sampled_from(sorted(self.held[worker].items())))
        event = rules.Finish(
            model.JobOutput(proofs=(b"p",), faults=()) if not error else None,
            error,
            lease=lease if how == "lease" else None,
            worker=worker if how == "named" else None,
        )
        before = self.jobs.get(job_id)
        step = self.step(job_id, event)
        if how == "lease" and (before is None or before.lease != lease):
            # A stale lease finishes nothing, but for a late proof (checked in check_effect).
            late = before is not None and before.State != RUNNING and not error
            assert late or not any(isinstance(e, rules.Finished) for e in step.effects)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data(), tokenless=st.booleans())
    def heartbeat(self, data: st.DataObject, tokenless: bool) -> None:
        worker = data.draw(st.sampled_from([w for w in WORKERS if self.held[w]]))
        lease, job_id = data.draw(st.sampled_from(sorted(self.held[worker].items())))
        self.step(job_id, rules.Heartbeat(worker, None if tokenless else lease))

    @rule(seconds=st.integers(0, 40))
    def time_passes(self, seconds: int) -> None:
        self.now += seconds

    @rule()
    def sweep(self) -> None:
        for job_id in sorted(self.jobs):
            self.step(job_id, rules.Sweep())
        # After a sweep no job whose deadline passed is still waiting or running.
        for job in self.jobs.values():
            if rules.deadline_passed(job, self.now):
                assert job.State == FINISHED and rules.is_done(job, self.limits)
                # cancelled, or its outcome was final before the deadline passed
                assert job.cancelled or job.succeeded or job.TryNum >= self.limits.max_try

    @rule()
    def cleanup(self) -> None:
        for job_id in sorted(self.jobs):
            self.step(job_id, rules.Cleanup())

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), what=st.sampled_from(["reset", "remove"]))
    def operator(self, data: st.DataObject, what: str) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        self.step(job_id, rules.Reset() if what == "reset" else rules.Remove())

    @invariant()
    def tries_are_bounded_and_leases_match_the_state(self) -> None:
        for job in getattr(self, "jobs", {}).values():
            assert 0 <= job.TryNum <= self.limits.max_try
            # Running under a lease; never one while waiting; a finished job keeps the one (if
            # any) that finished it.
            assert job.State != RUNNING or job.lease is not None
            assert job.State != READY or job.lease is None
            if job.cancelled:
                assert job.State == FINISHED and job.ErrorReason.startswith("cancelled: ")


def test_job_rules_hold_under_random_events() -> None:
    run_state_machine_as_test(
        JobRulesMachine,
        settings=settings(max_examples=150, stateful_step_count=40, deadline=None),
    )
