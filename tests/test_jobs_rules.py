"""The WindowPoSt job record and its rules, sans-IO: events in, records and effects out."""

from __future__ import annotations

import json

import base58
import msgspec
import pytest
import xxhash

from damocles_ext.jobs import model, rules
from damocles_ext.jobs.model import FINISHED, READY, RUNNING
from damocles_ext.jobs.rules import (
    NO_RESULT,
    SENT_LEASE,
    Allocate,
    Allocated,
    AllocationSpec,
    AlreadyExists,
    CleanedUp,
    Cleanup,
    Create,
    Created,
    Finish,
    Finished,
    FinishRepeated,
    Heartbeat,
    HeartbeatAccepted,
    JobCancelled,
    JobLimits,
    NotFound,
    Refused,
    Remove,
    Removed,
    Reset,
    Retried,
    Sweep,
    TimedOut,
    WasReset,
    apply,
)

LIMITS = JobLimits()
LIMITS_ONE_TRY = JobLimits(max_try=1)
T0 = 1_700_000_000.0


def make_input(miner: int = 1000, sectors: int = 1, proof_type: str = "StackedDrgWindow2KiBV1_2",
               seed: int = 7) -> model.WdPoStInput:  # fmt: skip
    return model.WdPoStInput(
        Sectors=tuple(
            model.WdPoStSectorInfo(
                SectorId=n,
                CommR=tuple(range(n, n + 32)),
                Upgrade=n % 2 == 1,
                Accesses=model.SectorAccessStores(SealedFile="store-a", CacheDir="store-b"),
            )
            for n in range(sectors)
        ),
        MinerId=miner,
        ProofType=proof_type,
        Seed=(seed,) * 32,
    )


def created(now: float = T0, **kw) -> model.JobRecord:
    step = apply(None, Create(make_input(**kw)), now, LIMITS)
    assert step.job is not None
    return step.job


def running(now: float = T0, worker: str = "w1", lease: str = "L1", **kw) -> model.JobRecord:
    step = apply(created(now, **kw), Allocate(worker, lease), now, LIMITS)
    assert step.job is not None and step.job.State == RUNNING
    return step.job


# --- the record and its id ----------------------------------------------------------------------


def test_the_job_id_is_base58_of_the_little_endian_xxhash64_of_the_go_json():
    job_input = make_input()
    raw = model.go_json(job_input)
    digest = xxhash.xxh64_intdigest(raw)

    assert model.job_id(job_input) == base58.b58encode(digest.to_bytes(8, "little")).decode()
    # xxHash64's published vector for no input, through damocles' little-endian + base58:
    assert xxhash.xxh64_intdigest(b"") == 0xEF46DB3751D8E999
    assert model.job_id_of_json(b"") == base58.b58encode(bytes.fromhex("99e9d85137db46ef")).decode()


def test_go_json_of_the_input_is_compact_in_go_field_order_with_byte_arrays_as_integers():
    raw = model.go_json(make_input(sectors=1))
    assert raw == (
        b'{"Sectors":[{"SectorId":0,"CommR":[' + ",".join(map(str, range(32))).encode() + b'],'
        b'"Upgrade":false,"Accesses":{"SealedFile":"store-a","CacheDir":"store-b"}}],'
        b'"MinerId":1000,"ProofType":"StackedDrgWindow2KiBV1_2","Seed":[' +
        b",".join([b"7"] * 32) + b"]}"
    )  # fmt: skip
    # and it is valid JSON that decodes back to the same input
    assert model.decode_input(raw) == make_input(sectors=1)


def test_go_json_writes_a_nil_sector_list_as_null_and_an_empty_one_as_brackets():
    nil = msgspec.structs.replace(make_input(), Sectors=None)
    empty = msgspec.structs.replace(make_input(), Sectors=())
    assert model.go_json(nil).startswith(b'{"Sectors":null,')
    assert model.go_json(empty).startswith(b'{"Sectors":[],')
    assert model.job_id(nil) != model.job_id(empty)


def test_go_json_escapes_strings_as_go_does():
    odd = msgspec.structs.replace(make_input(), ProofType='a<b>&"\\\n\r\t\b\f\x01\u2028\u2029é')
    raw = model.go_json(odd)
    assert (
        b'"ProofType":"a\\u003cb\\u003e\\u0026\\"\\\\\\n\\r\\t\\b\\f\\u0001\\u2028\\u2029\xc3\xa9"'
        in raw
    )
    assert json.loads(raw)["ProofType"] == odd.ProofType


def test_the_damocles_json_of_a_job_has_exactly_damocles_fields_in_go_order():
    job = running()
    doc = json.loads(model.damocles_json(job))
    assert list(doc) == [
        "Id", "State", "DeadlineIdx", "Partitions", "Input", "Output", "TryNum", "ErrorReason",
        "WorkerName", "StartedAt", "HeartbeatAt", "FinishedAt", "CreatedAt", "UpdatedAt",
    ]  # fmt: skip
    assert doc["State"] == "running" and doc["Partitions"] is None and doc["Output"] is None
    assert doc["Input"]["Seed"] == [7] * 32
    assert list(doc["Input"]["Sectors"][0]) == ["SectorId", "CommR", "Upgrade", "Accesses"]
    ours = json.loads(model.job_json(job))
    assert ours["lease"] == "L1" and ours["not_after"] is None and ours["cancelled_at"] == 0
    assert model.decode_job(model.job_json(job)) == job


def test_an_output_is_proofs_as_base64_and_faults_as_numbers():
    out = model.JobOutput(proofs=(b"\x01\x02\x03",), faults=(5, 9))
    assert msgspec.json.encode(out) == b'{"proofs":["AQID"],"faults":[5,9]}'
    assert model.decode_output(b'{"proofs":["AQID"],"faults":null}') == model.JobOutput(
        proofs=(b"\x01\x02\x03",), faults=None
    )


def test_an_input_with_a_short_seed_or_a_byte_out_of_range_is_refused():
    good = json.loads(model.go_json(make_input()))
    with pytest.raises(msgspec.ValidationError, match="Seed"):
        model.decode_input(json.dumps({**good, "Seed": [1] * 31}))
    with pytest.raises(msgspec.ValidationError, match="Seed"):
        model.decode_input(json.dumps({**good, "Seed": [256] + [0] * 31}))


@pytest.mark.parametrize(
    ("state", "error", "faults", "shown"),
    [
        (READY, "", None, "ReadyToRun"),
        (RUNNING, "", None, "Running"),
        (FINISHED, "", (), "Succeed"),
        (FINISHED, "", (3, 4), "Faults(2)"),
        (FINISHED, "boom", None, "Failed"),
    ],
)
def test_the_display_state_is_damocles(state, error, faults, shown):
    out = None if faults is None else model.JobOutput(proofs=(), faults=faults)
    job = msgspec.structs.replace(created(), State=state, ErrorReason=error, Output=out)
    assert model.display_state(job) == shown


# --- create, allocate, heartbeat, finish --------------------------------------------------------


def test_create_makes_a_ready_job_with_damocles_id_and_times():
    step = apply(None, Create(make_input(), deadline_idx=3, partitions=(1, 2)), T0 + 0.9, LIMITS)
    job = step.job
    assert step.effects == (Created(job.Id),)
    assert job.Id == model.job_id(make_input())
    assert (job.State, job.TryNum, job.DeadlineIdx, job.Partitions) == (READY, 0, 3, (1, 2))
    assert job.CreatedAt == job.UpdatedAt == int(T0)
    assert (job.StartedAt, job.HeartbeatAt, job.FinishedAt, job.WorkerName) == (0, 0, 0, "")


def test_create_of_an_existing_job_changes_nothing_in_any_state():
    for job in (created(), running()):
        step = apply(job, Create(make_input()), T0 + 50, LIMITS)
        assert step.job is job
        assert step.effects == (AlreadyExists(job.Id, job.State),)


def test_allocate_runs_the_job_on_the_worker_under_a_new_lease():
    job = created()
    step = apply(job, Allocate("w1", "L1"), T0 + 5, LIMITS)
    assert step.effects == (Allocated(job.Id, "w1", "L1", 1),)
    new = step.job
    assert (new.State, new.TryNum, new.WorkerName, new.lease) == (RUNNING, 1, "w1", "L1")
    assert new.StartedAt == new.HeartbeatAt == new.UpdatedAt == int(T0) + 5


def test_allocate_of_a_running_job_is_refused():
    job = running()
    step = apply(job, Allocate("w2", "L2"), T0, LIMITS)
    assert step.job is job
    assert step.effects == (Refused(job.Id, "allocate", "the job is running"),)


def test_heartbeat_from_the_lease_holder_or_the_tokenless_worker_is_accepted():
    job = running()
    for event in (Heartbeat("w1", "L1"), Heartbeat("w1")):
        step = apply(job, event, T0 + 3, LIMITS)
        assert step.effects == (HeartbeatAccepted(job.Id),)
        assert step.job.HeartbeatAt == step.job.UpdatedAt == int(T0) + 3


def test_a_heartbeat_keeps_a_later_stamp_unless_it_was_made_before_the_clock_stepped_back():
    heard = apply(running(), Heartbeat("w1", "L1"), T0 + 100, LIMITS).job
    # One that waited through a stalled store says nothing newer.
    assert apply(heard, Heartbeat("w1", "L1"), T0 + 40, LIMITS).job.HeartbeatAt == int(T0) + 100
    # The wall clock stepped an hour back: the stamp would hide every later heartbeat for the
    # hour, and a worker dying now would keep its job that long.
    step = apply(heard, Heartbeat("w1", "L1"), T0 + 100 - 3600, LIMITS)
    assert step.job.HeartbeatAt == int(T0) + 100 - 3600


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (Heartbeat("w1", "OLD"), "lease 'OLD' is not the job's current one"),
        (Heartbeat("w2"), "the job runs on worker 'w1', not 'w2'"),
    ],
)
def test_heartbeat_from_someone_else_is_refused(event, why):
    job = running()
    step = apply(job, event, T0 + 3, LIMITS)
    assert step.job is job
    [refused] = step.effects
    assert isinstance(refused, Refused) and why in refused.reason


def test_heartbeat_does_not_revive_a_ready_job_as_damocles_would():
    job = created()
    [refused] = apply(job, Heartbeat("w1"), T0, LIMITS).effects
    assert isinstance(refused, Refused) and "the job is ready2run" in refused.reason


def test_finish_with_the_lease_records_the_output():
    out = model.JobOutput(proofs=(b"p",), faults=())
    step = apply(running(), Finish(out, "", lease="L1"), T0 + 9, LIMITS)
    job = step.job
    assert step.effects == (Finished(job.Id, ""),)
    assert (job.State, job.Output, job.ErrorReason, job.lease) == (FINISHED, out, "", "L1")
    assert job.FinishedAt == job.UpdatedAt == int(T0) + 9
    assert rules.is_done(job, LIMITS) and job.succeeded


def test_the_same_finish_sent_again_is_acknowledged_and_changes_nothing():
    # The coordinator stored the finish and died before answering: the worker sends it again.
    out = model.JobOutput(proofs=(b"p",), faults=())
    done = apply(running(worker="w1", lease="L1"), Finish(out, "", lease="L1"), T0 + 9, LIMITS).job
    for again in (Finish(out, "", lease="L1"), Finish(None, "changed its mind", lease="L1")):
        step = apply(done, again, T0 + 30, LIMITS)
        assert step.job is done and step.effects == (rules.FinishRepeated(done.Id),)
    # Without a token: from the worker that finished it.
    named = apply(running(worker="w1"), Finish(out, "", worker="w1"), T0 + 9, LIMITS)
    assert apply(named.job, Finish(out, "", worker="w1"), T0 + 30, LIMITS).effects == (
        rules.FinishRepeated(named.job.Id),
    )
    other_out = model.JobOutput(proofs=(b"q",), faults=())
    for other in (
        Finish(out, "", worker="w2"),
        Finish(out, "", lease="L9"),
        Finish(other_out, ""),
        Finish(None, ""),
        Finish(out, "an error"),
    ):
        step = apply(named.job, other, T0 + 30, LIMITS)
        assert step.job is named.job
        [refused] = step.effects
        assert isinstance(refused, Refused), other
    # With neither a token nor a name (damocles-worker's finish): the stored result word for
    # word is the same finish sent again.
    for again in (Finish(out, ""), Finish(model.JobOutput(proofs=(b"p",), faults=()), "")):
        step = apply(named.job, again, T0 + 30, LIMITS)
        assert step.job is named.job and step.effects == (rules.FinishRepeated(named.job.Id),)
    failed = apply(running(), Finish(None, "gpu\0fell off"), T0 + 9, LIMITS).job
    assert apply(failed, Finish(None, "gpu\0fell off"), T0 + 10, LIMITS).effects == (
        rules.FinishRepeated(failed.Id),
    )


def test_a_finish_after_a_heartbeat_timeout_is_not_taken_for_a_repeat():
    job = running(worker="w1", lease="L1")
    timed_out = apply(job, Sweep(), T0 + 16, LIMITS_ONE_TRY).job
    assert (timed_out.State, timed_out.lease) == (FINISHED, None)
    for late in (Finish(None, "", lease="L1"), Finish(None, "", worker="w1")):
        [refused] = apply(timed_out, late, T0 + 18, LIMITS_ONE_TRY).effects
        assert isinstance(refused, Refused)


def test_a_tokenless_finish_without_a_name_is_accepted_only_while_running():
    step = apply(running(), Finish(None, "gpu fell off"), T0 + 9, LIMITS)
    assert step.effects == (Finished(step.job.Id, "gpu fell off"),)
    again = apply(step.job, Finish(None, ""), T0 + 10, LIMITS)
    assert again.job is step.job
    [refused] = again.effects
    assert isinstance(refused, Refused) and "the job is finished" in refused.reason


def test_a_finish_with_neither_an_output_nor_an_error_is_a_failure_tried_again():
    # damocles-worker sends (None, "") when its error's text is empty: no proof to submit.
    for finish in (Finish(None, ""), Finish(None, "", lease="L1")):
        step = apply(running(), finish, T0 + 9, LIMITS)
        assert step.effects == (Finished(step.job.Id, NO_RESULT),)
        assert not step.job.succeeded and step.job.ErrorReason == NO_RESULT
        # The same finish sent again is a repeat; the next sweep tries the job again.
        assert apply(step.job, finish, T0 + 10, LIMITS).effects == (FinishRepeated(step.job.Id),)
        assert apply(step.job, Sweep(), T0 + 11, LIMITS).job.State == READY


def test_a_late_finish_from_a_worker_that_lost_its_job_is_refused():
    # w1 goes silent, the job times out, is retried and given to w2; then w1 finishes.
    job = running(worker="w1", lease="L1")
    job = apply(job, Sweep(), T0 + 16, LIMITS).job
    assert job.State == READY
    job = apply(job, Allocate("w2", "L2"), T0 + 17, LIMITS).job
    for late in (Finish(None, "", lease="L1"), Finish(None, "", worker="w1")):
        step = apply(job, late, T0 + 18, LIMITS)
        assert step.job is job
        assert isinstance(step.effects[0], Refused)
    assert apply(job, Finish(None, "", lease="L2"), T0 + 18, LIMITS).job.State == FINISHED


def test_a_failure_that_names_nobody_is_refused_for_a_job_whose_worker_carries_its_lease():
    # A damocles-worker went silent, its job was retried and given through Dext.AllocateJobs
    # (the lease is sent back with each call); then the damocles-worker's finish arrives (no
    # token, no name): it is not the finish of the worker running the job.
    job = running(worker="w1", lease="L1")
    job = apply(job, Sweep(), T0 + 16, LIMITS).job
    step = apply(job, Allocate("dext-w2", "L2", sent_back=True), T0 + 17, LIMITS)
    job = step.job
    assert job.lease == SENT_LEASE + "L2"
    assert step.effects == (Allocated(job.Id, "dext-w2", SENT_LEASE + "L2", 2),)
    for late in (Finish(None, "stale failure"), Finish(None, "")):
        step = apply(job, late, T0 + 18, LIMITS)
        assert step.job is job
        [refused] = step.effects
        assert isinstance(refused, Refused) and "carries its lease" in refused.reason
    # A proof is a proof: taken (the Dext worker's own finish is then a repeat, acknowledged).
    proof = model.JobOutput((b"\x01",), ())
    proved = apply(job, Finish(proof, ""), T0 + 18, LIMITS).job
    assert proved.succeeded and proved.Output == proof
    # Its worker's finish, with the lease, is taken; a damocles-worker's, when it holds the job.
    assert apply(job, Finish(None, "", lease=job.lease), T0 + 18, LIMITS).job.State == FINISHED
    assert apply(running(), Finish(None, "x"), T0 + 9, LIMITS).job.State == FINISHED


def test_a_late_proof_is_taken_while_no_worker_holds_the_job_and_its_outcome_is_open():
    # w1 went silent and its job was taken back (ready2run again, a try left); then its proof
    # arrives: taken, with or without its token (a damocles-worker sends none), as damocles
    # takes it; and that finish sent again is acknowledged.
    out = model.JobOutput(proofs=(b"p",), faults=())
    taken_back = apply(running(worker="w1", lease="L1"), Sweep(), T0 + 16, LIMITS).job
    assert taken_back.State == READY
    for late, lease, worker in (
        (Finish(out, "", lease="L1"), "L1", "w1"),
        (Finish(out, "", worker="w1"), None, "w1"),
        (Finish(out, ""), None, "w1"),
    ):
        step = apply(taken_back, late, T0 + 18, LIMITS)
        done = step.job
        assert step.effects == (Finished(taken_back.Id, ""),)
        assert (done.State, done.Output, done.ErrorReason, done.lease) == (FINISHED, out, "", lease)
        assert (done.WorkerName, done.TryNum, done.FinishedAt) == (worker, 1, int(T0) + 18)
        assert rules.is_done(done, LIMITS) and done.succeeded
        again = apply(done, late, T0 + 19, LIMITS)
        assert again.job is done and again.effects == (rules.FinishRepeated(done.Id),)
    # A job that failed on another worker with a try left is not held either.
    failed = apply(
        running(worker="w2", lease="L2"), Finish(None, "oom", lease="L2"), T0 + 9, LIMITS
    )
    assert rules.retryable(failed.job, LIMITS)
    assert apply(failed.job, Finish(out, "", lease="L1"), T0 + 10, LIMITS).job.succeeded
    # Refused: a late failure (the timeout counted its try), a proof without an output, a job
    # running on another worker (a tokenless finish without a name is that worker's: the limit of
    # fencing without a token), a job whose outcome is final, a job past its deadline.
    held = apply(taken_back, Allocate("w2", "L2"), T0 + 17, LIMITS).job
    final = apply(running(worker="w1", lease="L1"), Sweep(), T0 + 16, LIMITS_ONE_TRY).job
    assert rules.is_done(final, LIMITS_ONE_TRY)
    with_deadline = apply(None, Create(make_input(), not_after=T0 + 20), T0, LIMITS).job
    closing = apply(
        apply(with_deadline, Allocate("w1", "L1"), T0, LIMITS).job, Sweep(), T0 + 16, LIMITS
    ).job
    assert closing.State == READY
    for job, late, now, limits in (
        (taken_back, Finish(None, "gpu fell off", lease="L1"), T0 + 18, LIMITS),
        (taken_back, Finish(None, "", lease="L1"), T0 + 18, LIMITS),
        (held, Finish(out, "", lease="L1"), T0 + 18, LIMITS),
        (held, Finish(out, "", worker="w1"), T0 + 18, LIMITS),
        (final, Finish(out, "", lease="L1"), T0 + 18, LIMITS_ONE_TRY),
        (closing, Finish(out, "", lease="L1"), T0 + 20, LIMITS),
        # Reset by an operator (to be proved afresh), or never given out.
        (apply(taken_back, Reset(), T0 + 17, LIMITS).job, Finish(out, ""), T0 + 18, LIMITS),
        (created(), Finish(out, ""), T0 + 18, LIMITS),
    ):
        step = apply(job, late, now, limits)
        assert step.job is job, late
        [refused] = step.effects
        assert isinstance(refused, Refused), late


def test_events_on_a_missing_job_say_not_found_and_remove_is_silent():
    for event in (Allocate("w", "L"), Heartbeat("w"), Finish(None, ""), Reset()):
        step = apply(None, event, T0, LIMITS, job_id="abc")
        assert step == rules.Step(None, (NotFound("abc", rules.event_name(event)),))
    assert apply(None, Remove(), T0, LIMITS, job_id="abc") == rules.Step(None, ())


# --- sweeps: heartbeat timeout, retries, deadlines, cleanup --------------------------------------


def test_a_silent_job_times_out_after_heartbeat_timeout_and_is_retried():
    job = running()
    assert apply(job, Sweep(), T0 + 15, LIMITS).effects == ()  # not yet: HeartbeatAt == now - 15
    step = apply(job, Sweep(), T0 + 16, LIMITS)
    assert step.effects == (TimedOut(job.Id, "w1"), Retried(job.Id, 1))
    new = step.job
    assert (new.State, new.ErrorReason, new.StartedAt, new.FinishedAt, new.lease) == (
        READY, "", 0, 0, None,
    )  # fmt: skip
    assert new.TryNum == 1 and new.WorkerName == "w1"


def test_a_heartbeat_stamped_before_the_last_one_stored_does_not_move_it_back():
    job = running(T0 + 30)  # heard from at T0 + 30
    step = apply(job, Heartbeat("w1", lease="L1"), T0 + 10, LIMITS)  # sent at T0 + 10, landed late
    assert step.effects == (HeartbeatAccepted(job.Id),)
    assert step.job.HeartbeatAt == int(T0) + 30


def test_a_job_is_silent_when_last_heard_before_silent_before_if_that_is_earlier():
    job = running()  # heard from at T0
    assert apply(job, Sweep(silent_before=T0 - 1), T0 + 100, LIMITS).effects == ()
    assert apply(job, Sweep(silent_before=T0 + 1), T0 + 100, LIMITS).effects != ()
    # never later than now - HeartbeatTimeout
    assert apply(job, Sweep(silent_before=T0 + 1000), T0 + 15, LIMITS).effects == ()


def test_silence_counts_from_heard_since_at_the_earliest():
    job = running()  # its last heartbeat at T0; no one could hear one from T0 to T0 + 100
    assert apply(job, Sweep(heard_since=T0 + 100), T0 + 115, LIMITS).effects == ()
    step = apply(job, Sweep(heard_since=T0 + 100), T0 + 116, LIMITS)
    assert step.effects == (TimedOut(job.Id, "w1"), Retried(job.Id, 1))


def test_a_job_at_max_try_stays_failed_until_reset():
    job = running()
    job = apply(job, Sweep(), T0 + 16, LIMITS).job
    job = apply(job, Allocate("w2", "L2"), T0 + 17, LIMITS).job
    step = apply(job, Sweep(), T0 + 40, LIMITS)
    assert step.effects == (TimedOut(job.Id, "w2"),)
    failed = step.job
    assert (failed.State, failed.ErrorReason, failed.TryNum) == (FINISHED, "heartbeat timeout", 2)
    assert rules.is_done(failed, LIMITS) and model.display_state(failed) == "Failed"
    assert apply(failed, Sweep(), T0 + 100, LIMITS).effects == ()
    # A larger JobMaxTry applies at once, as damocles' fixed-at-start one does not.
    assert apply(failed, Sweep(), T0 + 100, JobLimits(max_try=3)).job.State == READY
    step = apply(failed, Reset(), T0 + 200, LIMITS)
    assert step.effects == (WasReset(job.Id),)
    reset = step.job
    assert (reset.State, reset.TryNum, reset.ErrorReason, reset.WorkerName) == (READY, 0, "", "")
    assert reset.CreatedAt == int(T0) + 200 and reset.HeartbeatAt == 0


def test_a_worker_error_is_retried_by_the_sweep_under_max_try():
    job = apply(running(), Finish(None, "oops", lease="L1"), T0 + 1, LIMITS).job
    assert not rules.is_done(job, LIMITS)
    assert apply(job, Sweep(), T0 + 2, LIMITS).effects == (Retried(job.Id, 1),)


def test_allocation_takes_the_earliest_deadline_first_and_skips_passed_deadlines():
    def job(seed, not_after, created_at):
        step = apply(None, Create(make_input(seed=seed), not_after=not_after), created_at, LIMITS)
        return step.job

    late = job(1, T0 + 900, T0)
    early = job(2, T0 + 300, T0 + 5)
    none_old = job(3, None, T0 - 50)
    none_new = job(4, None, T0)
    passed = job(5, T0 - 1, T0 - 100)
    other_miner = job(6, T0 + 1, T0)
    other_miner = msgspec.structs.replace(
        other_miner, Input=msgspec.structs.replace(other_miner.Input, MinerId=2000)
    )
    jobs = [late, none_new, passed, early, none_old, other_miner]
    spec = AllocationSpec(allowed_miners=(1000,))
    assert rules.choose(jobs, spec, 10, T0) == [early, late, none_old, none_new]
    assert rules.choose(jobs, AllocationSpec(), 2, T0) == [other_miner, early]
    assert rules.choose(jobs, AllocationSpec(allowed_proof_types=("X",)), 10, T0) == []
    [refused] = apply(passed, Allocate("w", "L"), T0, LIMITS).effects
    assert refused == Refused(passed.Id, "allocate", "its deadline has passed")


@pytest.mark.parametrize("where", ["ready", "running", "failed with tries left"])
def test_a_job_whose_deadline_passed_is_cancelled_with_why(where):
    job = apply(None, Create(make_input(), not_after=T0 + 60), T0, LIMITS).job
    if where != "ready":
        job = apply(job, Allocate("w1", "L1"), T0 + 1, LIMITS).job
    if where == "failed with tries left":
        job = apply(job, Finish(None, "disk gone", lease="L1"), T0 + 2, LIMITS).job
    assert not any(
        isinstance(e, JobCancelled) for e in apply(job, Sweep(), T0 + 10, LIMITS).effects
    )
    step = apply(job, Sweep(), T0 + 60, LIMITS)
    [cancelled] = step.effects
    assert isinstance(cancelled, JobCancelled)
    assert "cancelled: its deadline passed at 2023-11-14T22:14:20Z" in cancelled.reason
    assert {"ready": "waiting for a worker", "running": "running on worker 'w1'",
            "failed with tries left": "its last try failed: disk gone"}[where] in cancelled.reason  # fmt: skip
    done = step.job
    assert (done.State, done.ErrorReason, done.cancelled_at) == (
        FINISHED,
        cancelled.reason,
        int(T0) + 60,
    )
    assert done.cancelled and rules.is_done(done, LIMITS)
    assert apply(done, Sweep(), T0 + 100, LIMITS).effects == ()  # never retried


def test_a_finish_after_the_deadline_is_refused():
    job = apply(None, Create(make_input(), not_after=T0 + 60), T0, LIMITS).job
    job = apply(job, Allocate("w1", "L1"), T0 + 1, LIMITS).job
    [refused] = apply(job, Finish(None, "", lease="L1"), T0 + 61, LIMITS).effects
    assert isinstance(refused, Refused) and "deadline passed" in refused.reason


def test_a_success_or_a_final_failure_is_not_cancelled_by_a_passed_deadline():
    job = apply(None, Create(make_input(), not_after=T0 + 60), T0, LIMITS).job
    job = apply(job, Allocate("w1", "L1"), T0 + 1, LIMITS).job
    done = apply(job, Finish(model.JobOutput((b"\x01",), ()), "", lease="L1"), T0 + 2, LIMITS).job
    assert apply(done, Sweep(), T0 + 100, LIMITS).effects == ()


def test_cleanup_forgets_finished_jobs_older_than_the_job_lifetime_only():
    job = apply(running(), Finish(None, "", lease="L1"), T0 + 1, LIMITS).job
    life = LIMITS.job_lifetime
    assert apply(job, Cleanup(), T0 + life, LIMITS) == rules.Step(job, ())
    assert apply(job, Cleanup(), T0 + life + 1, LIMITS) == rules.Step(None, (CleanedUp(job.Id),))
    still = running()
    assert apply(still, Cleanup(), T0 + 10 * life, LIMITS) == rules.Step(still, ())


def test_remove_forgets_a_job_in_any_state():
    for job in (created(), running()):
        assert apply(job, Remove(), T0, LIMITS) == rules.Step(None, (Removed(job.Id),))


def test_the_limits_have_damocles_defaults_and_refuse_nonsense():
    assert (LIMITS.max_try, LIMITS.heartbeat_timeout, LIMITS.job_lifetime) == (2, 15, 25 * 3600)
    assert (LIMITS.sweep_interval, LIMITS.cleanup_interval, LIMITS.poll_interval) == (10, 1800, 3)
    with pytest.raises(ValueError, match="JobMaxTry"):
        JobLimits(max_try=0)
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        JobLimits(heartbeat_timeout=float("nan"))


def test_a_deadline_out_of_the_years_a_date_can_hold_is_said_in_seconds_not_a_crash():
    # A row written so (before the store refused it, or by hand): the sweep cancels it, and the
    # reason names the deadline as it is (formatting it raised OverflowError in every sweep).
    created = apply(None, Create(make_input(), not_after=-1e20), T0, LIMITS).job
    job = apply(created, Allocate("w1", "L1"), T0, LIMITS).job
    step = rules.apply(job, rules.Sweep(), T0, LIMITS)
    assert step.job is not None and step.job.cancelled
    assert "its deadline passed at -100000000000000000000 (unix seconds)" in step.job.ErrorReason


def test_the_sweep_runs_at_least_four_times_per_heartbeat_timeout():
    # damocles' 10 s, unless a quarter of HeartbeatTimeout is shorter (its 15 s: 3.75 s).
    assert rules.sweep_every(rules.JobLimits()) == 3.75
    assert rules.sweep_every(rules.JobLimits(heartbeat_timeout=60.0)) == 10.0
    assert rules.sweep_every(rules.JobLimits(heartbeat_timeout=2.0)) == 0.5


# --- pinned by mutation: each of these failed no test when its rule was removed -----------------


def test_a_finish_from_the_worker_whose_job_was_cancelled_is_refused_not_a_repeat():
    # The job was cancelled at its deadline while running on w1: nobody finished it, so w1's
    # finish arriving later is refused (too late), not acknowledged as the finish it was.
    out = model.JobOutput(proofs=(b"p",), faults=())
    job = apply(None, Create(make_input(), not_after=T0 + 60), T0, LIMITS).job
    job = apply(job, Allocate("w1", "L1"), T0 + 1, LIMITS).job
    cancelled = apply(job, Sweep(), T0 + 60, LIMITS).job
    assert cancelled.cancelled and cancelled.WorkerName == "w1"
    for late in (Finish(out, "", worker="w1"), Finish(out, "", lease="L1")):
        step = apply(cancelled, late, T0 + 61, LIMITS)
        assert step.job is cancelled, late
        [refused] = step.effects
        assert isinstance(refused, Refused), late


def test_a_late_failure_that_carries_an_output_is_refused_like_any_late_failure():
    # Only a proof (an output and no error) is taken from a worker that lost its job.
    out = model.JobOutput(proofs=(b"p",), faults=())
    taken_back = apply(running(worker="w1", lease="L1"), Sweep(), T0 + 16, LIMITS).job
    assert taken_back.State == READY
    for late in (Finish(out, "half done", lease="L1"), Finish(out, "half done", worker="w1")):
        step = apply(taken_back, late, T0 + 18, LIMITS)
        assert step.job is taken_back, late
        [refused] = step.effects
        assert isinstance(refused, Refused), late


def test_a_late_proof_names_the_worker_that_sent_it_and_its_repeat_is_acknowledged():
    # w1 and then w2 went silent; w1's proof, named but without a token, arrives while the job
    # waits for its third try: the job is w1's result, and w1 sending it again is a repeat.
    limits = JobLimits(max_try=3)
    out = model.JobOutput(proofs=(b"p",), faults=())
    job = apply(running(worker="w1", lease="L1"), Sweep(), T0 + 16, limits).job
    job = apply(job, Allocate("w2", "L2"), T0 + 17, limits).job
    job = apply(job, Sweep(), T0 + 40, limits).job
    assert (job.State, job.TryNum, job.WorkerName) == (READY, 2, "w2")
    late = Finish(out, "", worker="w1")
    done = apply(job, late, T0 + 41, limits).job
    assert (done.State, done.Output, done.WorkerName) == (FINISHED, out, "w1")
    again = apply(done, late, T0 + 42, limits)
    assert again.job is done and again.effects == (FinishRepeated(done.Id),)


def test_a_cancelled_job_keeps_no_output_of_its_failed_try():
    # A failure that carried an output, with a try left, then its deadline passed.
    out = model.JobOutput(proofs=(b"p",), faults=())
    job = apply(None, Create(make_input(), not_after=T0 + 60), T0, LIMITS).job
    job = apply(job, Allocate("w1", "L1"), T0 + 1, LIMITS).job
    job = apply(job, Finish(out, "half done", lease="L1"), T0 + 2, LIMITS).job
    assert rules.retryable(job, LIMITS) and job.Output == out
    cancelled = apply(job, Sweep(), T0 + 60, LIMITS).job
    assert cancelled.cancelled and cancelled.Output is None


def test_allocation_takes_the_oldest_first_among_jobs_with_the_same_deadline():
    # Whatever their ids: the older job here has the id that sorts last.
    first_id, last_id = sorted((make_input(seed=1), make_input(seed=2)), key=model.job_id)
    for not_after in (None, T0 + 600):
        old = apply(None, Create(last_id, not_after=not_after), T0 - 60, LIMITS).job
        new = apply(None, Create(first_id, not_after=not_after), T0, LIMITS).job
        assert new.Id < old.Id
        assert rules.choose([new, old], AllocationSpec(), 1, T0) == [old]


def test_a_worker_is_told_timed_out_for_a_job_taken_back_with_no_try_left():
    # Dext.HeartbeatJobs' Reason, which a worker acts on (worker_beats.py): taken back for
    # its silence, not "finished" as if a result had been stored.
    job = running(worker="w1", lease="L1")
    final = apply(job, Sweep(), T0 + 16, LIMITS_ONE_TRY).job
    assert (final.State, final.ErrorReason) == (FINISHED, model.HEARTBEAT_TIMEOUT_REASON)
    reason, _text = rules.stop_reason(final, "L1", T0 + 17)
    assert reason == "timed_out"


def test_the_limits_refuse_a_boolean_try_count_and_an_endless_time():
    with pytest.raises(ValueError, match="JobMaxTry"):
        JobLimits(max_try=True)
    for name in ("heartbeat_timeout", "job_lifetime", "sweep_interval"):
        with pytest.raises(ValueError, match=name):
            JobLimits(**{name: float("inf")})
