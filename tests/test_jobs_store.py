"""The job store on both engines: SQLite (a file) and a real PostgreSQL server that the test
session starts itself (conftest.postgres_server). Time is passed in (`now`), never slept."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
from collections import Counter

import msgspec
import pytest
import sqlalchemy as sa
import trio
from helpers.kept_out import a_closed_directory, said_when_kept_out
from test_jobs_rules import make_input

from damocles_ext.jobs import model, rules, store
from damocles_ext.jobs.database import jobs
from damocles_ext.jobs.model import FINISHED, READY, RUNNING
from damocles_ext.jobs.store import JobStore, StoreConfigError, StoreError, TrioJobStore

T0 = 1_700_000_000.0
ANY = rules.AllocationSpec()


def create_many(s: JobStore, count: int, now: float = T0, **kw) -> list[model.JobRecord]:
    events = [rules.Create(make_input(seed=i % 256, miner=1000 + i // 256), **kw)
              for i in range(count)]  # fmt: skip
    made = s.create_many(events, now)
    assert all(created for _, created in made)
    return [job for job, _ in made]


# --- schema, records, idempotence ---------------------------------------------------------------


def test_the_schema_is_made_at_open_and_a_second_open_keeps_it(store_url):
    with JobStore.open(store_url) as s:
        assert s.schema_version() == store.SCHEMA_VERSION
        job, made = s.create(make_input(), T0)
        assert made
    with JobStore.open(store_url) as s:
        assert s.migrate() == store.SCHEMA_VERSION
        assert s.get(job.Id) == job


def test_a_store_with_a_newer_schema_is_refused_with_what_to_do(store_url):
    with JobStore.open(store_url) as s, s.engine.begin() as conn:
        conn.execute(store.schema_version.update().values(version=store.SCHEMA_VERSION + 1))
    with pytest.raises(StoreConfigError) as raised:
        JobStore.open(store_url)
    message = str(raised.value)
    assert f"schema version {store.SCHEMA_VERSION + 1}, newer than this damocles-ext" in message
    assert "upgrade this one, or give another store URL" in message
    assert raised.value.exit_code == 2


def test_create_is_idempotent_and_a_record_reads_back_as_written(js):
    job, made = js.create(make_input(sectors=3), T0, deadline_idx=7, partitions=(0, 2),
                          not_after=T0 + 1800)  # fmt: skip
    assert made and job.Id == model.job_id(make_input(sectors=3))
    again, made_again = js.create(make_input(sectors=3), T0 + 60, deadline_idx=9)
    assert not made_again and again == job
    assert js.get(job.Id) == job
    other = rules.Create(make_input(seed=99), not_after=T0 + 60)
    made = js.create_many([other, rules.Create(make_input(sectors=3)), other], T0 + 61)
    assert [created for _, created in made] == [True, False, False]
    assert made[0][0] == made[2][0] == js.get(made[0][0].Id) and made[1][0] == job
    js.remove(made[0][0].Id, T0)
    [allocated] = js.allocate(ANY, 5, "w1", T0 + 1)
    out = model.JobOutput(proofs=(b"\x00\xff" * 96,), faults=(2,))
    [finished] = js.finish(job.Id, out, "", T0 + 2, lease=allocated.lease).jobs
    assert js.get(job.Id) == finished
    assert finished.Output == out and model.display_state(finished) == "Faults(1)"
    assert js.list_jobs() == [finished]


def test_an_allocation_may_ask_for_as_many_jobs_as_damocles_allows_on_both_engines(js):
    # damocles' num is a u32: 2**32 - 1 is valid (PostgreSQL's integer stops at 2**31 - 1).
    job, _ = js.create(make_input(), T0)
    [allocated] = js.allocate(ANY, 2**32 - 1, "w1", T0 + 1)
    assert allocated.Id == job.Id


def damage(store: JobStore, job_id: str) -> None:
    """Make a job's row unreadable, as a hand edit or another program's write may."""
    with store.engine.begin() as conn:
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(input="{bad"))


@contextlib.contextmanager
def listening(store: JobStore):
    """The job ids the store NOTIFYs its producers of while the block runs (PostgreSQL), as
    `heard()` after it; None on SQLite."""
    import psycopg

    from damocles_ext.jobs.store import NOTIFY_CHANNEL

    if not store.is_postgresql:
        yield lambda: None
        return
    url = store.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        got: list[str] = []
        yield lambda: got
        got += [n.payload for n in conn.notifies(timeout=5, stop_after=1)]


def test_a_damaged_row_is_passed_over_by_allocation_the_sweep_and_the_list_and_removable(js):
    bad_running, _ = js.create(make_input(seed=1), T0 - 20)
    js.allocate(rules.AllocationSpec(), 1, "w1", T0)  # then silent: the sweep's to take back
    bad_ready, _ = js.create(make_input(seed=2), T0 - 10)  # first in allocation order
    good, _ = js.create(make_input(seed=3), T0 - 5)
    for bad in (bad_running, bad_ready):
        damage(js, bad.Id)
    [given] = js.allocate(rules.AllocationSpec(), 1, "w2", T0 + 1)
    assert given.Id == good.Id
    assert [j.Id for j in js.list_jobs()] == [good.Id]
    swept = js.sweep(T0 + 1000)  # both running jobs silent: the readable one is taken back
    assert {e.job_id for e in swept.effects if isinstance(e, rules.TimedOut)} == {good.Id}
    for call in (lambda: js.get(bad_ready.Id), lambda: js.reset(bad_ready.Id, T0)):
        with pytest.raises(StoreError, match=f"job '{bad_ready.Id}' in the store is damaged .*:"
                           f" remove it \\(damocles-ext wdpost remove {bad_ready.Id}\\)"):  # fmt: skip
            call()
    with listening(js) as heard:  # its waiting producers are told, as of any removal
        assert js.remove(bad_ready.Id, T0) is True
    assert heard() in ([bad_ready.Id], None)  # (None: SQLite, which has no LISTEN)
    assert js.remove_all(T0) == sorted([bad_running.Id, good.Id])
    assert js.list_jobs() == []


def test_an_error_text_with_a_nul_is_kept_on_both_engines(js):
    # PostgreSQL's text takes no NUL: the finish failed as the store failing (code 1), and the
    # worker retried it for a day while the job stayed running.
    job, _ = js.create(make_input(), T0)
    [allocated] = js.allocate(ANY, 1, "w1", T0 + 1)
    [finished] = js.finish(job.Id, None, "prover said a\0b", T0 + 2, lease=allocated.lease).jobs
    assert finished.ErrorReason == js.get(job.Id).ErrorReason == "prover said a\ufffdb"


def test_a_write_that_lost_a_race_is_refused_not_applied(js):
    [job] = create_many(js, 1)
    stale = job
    js.allocate(ANY, 1, "w1", T0 + 1)
    with pytest.raises(store.StoreConflict, match=f"job {job.Id} changed"), js.engine.begin() as c:
        js._write(c, stale, rules.apply(stale, rules.Allocate("w2", "L"), T0 + 2, js.limits).job)
    assert js.get(job.Id).WorkerName == "w1"


def test_a_write_guarded_by_another_lease_than_the_rows_is_refused(js):
    # Only the lease differs from the row (the guard compares NULL too): the write is refused.
    create_many(js, 1)
    [running] = js.allocate(ANY, 1, "w1", T0 + 1)
    for lease in (None, "not-" + running.lease):
        stale = msgspec.structs.replace(running, lease=lease)
        beat = rules.apply(stale, rules.Heartbeat("w1", lease), T0 + 2, js.limits).job
        assert beat is not None and beat.HeartbeatAt == T0 + 2
        with pytest.raises(store.StoreConflict, match="changed"), js.engine.begin() as c:
            js._write(c, stale, beat)
    assert js.get(running.Id) == running
    # The row as it is, lease and all, is written.
    with js.engine.begin() as c:
        js._write(
            c,
            running,
            rules.apply(running, rules.Heartbeat("w1", running.lease), T0 + 3, js.limits).job,
        )
    assert js.get(running.Id).HeartbeatAt == T0 + 3


# --- allocation ---------------------------------------------------------------------------------


def test_eight_concurrent_clients_allocate_each_of_1000_jobs_exactly_once(store_url):
    with JobStore.open(store_url) as s:
        ids = {j.Id for j in create_many(s, 1000)}
    assert len(ids) == 1000
    got: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8, timeout=60)
    # Every client has taken its first batch before any takes a second, so all eight are
    # allocating side by side for the rest of the run: without this, one client on a fast
    # SQLite file could take all 1000 before the others' first transaction began.
    overlap = threading.Barrier(8, timeout=60)

    def client(name: str) -> None:
        # Each client is its own engine and connection, as separate workers would be.
        try:
            with JobStore(store_url, pool_size=1) as mine:
                start.wait()
                taken = got.setdefault(name, [])
                taken += [j.Id for j in mine.allocate(ANY, 8, name, T0 + 1)]
                overlap.wait()
                while batch := mine.allocate(ANY, (1, 4, 8)[len(taken) % 3], name, T0 + 1):
                    taken += [j.Id for j in batch]
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    counts = Counter(i for taken in got.values() for i in taken)
    assert set(counts) == ids and set(counts.values()) == {1}
    assert len(got) == 8 and all(len(taken) >= 8 for taken in got.values())  # full first batches
    with JobStore(store_url) as s:
        for job in s.list_jobs():
            assert (job.State, job.TryNum) == (RUNNING, 1) and job.Id in got[job.WorkerName]


def test_allocation_takes_earliest_deadline_first_and_follows_the_filters(js):
    late = js.create(make_input(seed=1), T0, not_after=T0 + 900)[0]
    early = js.create(make_input(seed=2), T0 + 5, not_after=T0 + 300)[0]
    no_deadline = js.create(make_input(seed=3), T0 - 50)[0]
    js.create(make_input(seed=4), T0 - 100, not_after=T0 - 1)  # passed: never allocated
    other = js.create(make_input(seed=5, miner=2000, proof_type="StackedDrgWindow32GiBV1_2"), T0)[0]
    mine = rules.AllocationSpec(allowed_miners=(1000,))
    assert [j.Id for j in js.allocate(mine, 2, "w1", T0)] == [early.Id, late.Id]
    size = rules.AllocationSpec(allowed_proof_types=("StackedDrgWindow32GiBV1_2",))
    assert [j.Id for j in js.allocate(size, 5, "w2", T0)] == [other.Id]
    assert [j.Id for j in js.allocate(ANY, 5, "w3", T0)] == [no_deadline.Id]
    assert js.allocate(ANY, 5, "w3", T0) == []


# --- heartbeats, timeouts, fencing --------------------------------------------------------------


def test_a_silent_workers_job_is_retried_on_another_after_the_heartbeat_timeout(js):
    [job] = create_many(js, 1)
    [first] = js.allocate(ANY, 1, "w1", T0)
    assert js.heartbeat([job.Id], "w1", T0 + 10).effects == (rules.HeartbeatAccepted(job.Id),)
    assert js.sweep(T0 + 25).effects == ()  # 15 s after the last heartbeat: not yet
    assert js.allocate(ANY, 1, "w2", T0 + 25) == []
    swept = js.sweep(T0 + 26)
    assert swept.effects == (rules.TimedOut(job.Id, "w1"), rules.Retried(job.Id, 1))
    [second] = js.allocate(ANY, 1, "w2", T0 + 27)
    assert (second.Id, second.TryNum, second.WorkerName) == (job.Id, 2, "w2")
    assert second.lease != first.lease
    # w2 goes silent too: at JobMaxTry (2) the job stays failed until reset.
    assert js.sweep(T0 + 50).effects == (rules.TimedOut(job.Id, "w2"),)
    failed = js.get(job.Id)
    assert (failed.State, failed.ErrorReason, failed.TryNum) == (FINISHED, "heartbeat timeout", 2)
    assert js.sweep(T0 + 100).effects == () and js.allocate(ANY, 1, "w3", T0 + 100) == []


def test_a_late_finish_or_heartbeat_from_a_fenced_worker_is_refused(js):
    [job] = create_many(js, 1)
    [first] = js.allocate(ANY, 1, "w1", T0)
    js.sweep(T0 + 16)
    [second] = js.allocate(ANY, 1, "w2", T0 + 17)
    for late in (
        js.finish(job.Id, None, "", T0 + 18, lease=first.lease),
        js.finish(job.Id, None, "", T0 + 18, worker="w1"),
        js.heartbeat([job.Id], "w1", T0 + 18),
        js.heartbeat([job.Id], "w1", T0 + 18, leases={job.Id: first.lease}),
    ):
        [refused] = late.effects
        assert isinstance(refused, rules.Refused), refused
    assert js.get(job.Id) == second
    out = model.JobOutput(proofs=(b"p",), faults=())
    assert js.finish(job.Id, out, "", T0 + 19, lease=second.lease).effects == (
        rules.Finished(job.Id, ""),
    )
    # and once finished, nobody can overwrite the result: the last holder's finish sent again
    # (its answer lost) is acknowledged and changes nothing; a fenced one stays refused
    done = js.get(job.Id)
    again = js.finish(job.Id, None, "late error", T0 + 20, lease=second.lease)
    assert again.effects == (rules.FinishRepeated(job.Id),) and js.get(job.Id) == done
    [refused] = js.finish(job.Id, None, "late error", T0 + 20, lease=first.lease).effects
    assert isinstance(refused, rules.Refused) and js.get(job.Id).Output == out


def test_heartbeats_for_a_batch_keep_the_good_ones_and_name_the_rest(js):
    a, b = create_many(js, 2)
    js.allocate(ANY, 2, "w1", T0)
    outcome = js.heartbeat([a.Id, b.Id, "nosuchjob"], "w1", T0 + 5)
    assert set(outcome.effects) == {
        rules.HeartbeatAccepted(a.Id),
        rules.HeartbeatAccepted(b.Id),
        rules.NotFound("nosuchjob", "heartbeat"),
    }
    assert js.get(a.Id).HeartbeatAt == int(T0) + 5


# --- deadlines, operators, cleanup --------------------------------------------------------------


def test_jobs_past_their_deadline_are_cancelled_with_why(js):
    busy = js.create(make_input(seed=1), T0, not_after=T0 + 50)[0]
    waiting = js.create(make_input(seed=2), T0, not_after=T0 + 60)[0]
    later = js.create(make_input(seed=3), T0, not_after=T0 + 600)[0]
    assert [j.Id for j in js.allocate(ANY, 1, "w1", T0)] == [busy.Id]
    js.heartbeat([busy.Id], "w1", T0 + 45)
    swept = js.sweep(T0 + 60)
    cancelled = {e.job_id: e.reason for e in swept.effects if isinstance(e, rules.JobCancelled)}
    assert set(cancelled) == {waiting.Id, busy.Id}
    assert "it was waiting for a worker" in cancelled[waiting.Id]
    assert "it was running on worker 'w1'" in cancelled[busy.Id]
    for job_id, reason in cancelled.items():
        job = js.get(job_id)
        assert job.State == FINISHED and job.cancelled and job.ErrorReason == reason
        assert reason.startswith("cancelled: its deadline passed at ")
        assert rules.is_done(job, js.limits)
    assert js.get(later.Id).State == READY
    assert js.sweep(T0 + 120).effects == ()  # cancelled jobs are never retried


def test_a_sweep_of_given_jobs_changes_those_alone(js):
    # A producer settles its own job at its deadline without sweeping everyone else's.
    mine = js.create(make_input(seed=1), T0, not_after=T0 + 50)[0]
    other = js.create(make_input(seed=2), T0, not_after=T0 + 50)[0]
    swept = js.sweep(T0 + 60, job_ids=[mine.Id])
    assert [e.job_id for e in swept.effects if isinstance(e, rules.JobCancelled)] == [mine.Id]
    assert js.get(mine.Id).cancelled and js.get(other.Id).State == READY


def test_a_sweep_pass_gives_its_places_only_to_jobs_it_changes(store_url):
    # A pass takes `limit` jobs: a final failure, a job heard from just within its timeout, or
    # one whose silence cannot count yet (heard_since) must not take a place, else a store with
    # a pass's worth of them would never time out, retry or cancel the jobs behind them.
    with JobStore.open(store_url, limits=rules.JobLimits(max_try=1)) as s:
        inputs = sorted((make_input(seed=i) for i in range(3)), key=model.job_id)
        final, heard, due = (s.create(i, T0)[0] for i in inputs)  # in the order of their ids
        assert len(s.allocate(ANY, 3, "w1", T0)) == 3
        s.finish(final.Id, None, "oom", T0 + 1, worker="w1")  # failed at JobMaxTry: final
        s.heartbeat([heard.Id], "w1", T0 + 5)
        swept = s.sweep(T0 + 20, limit=1)  # heard: 15 s ago, the timeout; due: 20 s ago
        assert swept.effects == (rules.TimedOut(due.Id, "w1"),)
        assert swept.wrote and [j.Id for j in swept.jobs] == [due.Id]
        # Nobody could be heard from before T0 + 10: no running job is silent yet, and none takes a
        # place from the failed jobs now given a try more, one per pass of one place.
        s.limits = rules.JobLimits(max_try=2)
        for retried in (final, due):
            swept = s.sweep(T0 + 21, limit=1, heard_since=T0 + 10)
            assert swept.effects == (rules.Retried(retried.Id, 1),)
        assert s.get(heard.Id).State == RUNNING


def test_a_sweep_or_heartbeat_says_whether_it_wrote(js):
    # What a store refusing writes (a full disk) is told it takes them again by.
    [job] = create_many(js, 1)
    js.allocate(ANY, 1, "w1", T0)
    assert not js.sweep(T0 + 5).wrote  # nothing to change
    assert js.sweep(T0 + 16).wrote  # timed out
    # A heartbeat of a job no longer running, from a worker last seen long ago: its worker's row
    # is written all the same.
    beat = js.heartbeat([job.Id], "w1", T0 + 600)
    assert isinstance(beat.effects[0], rules.Refused) and beat.wrote


def test_several_jobs_made_at_once_are_checked_as_one_is(js):
    good = rules.Create(make_input(seed=1))
    for bad, says in (
        (rules.Create(msgspec.structs.replace(make_input(), MinerId=2**64 - 1)), r"MinerId"),
        (rules.Create(make_input(proof_type="Stacked\x00Drg")), r"without a NUL character"),
        (rules.Create(make_input(), deadline_idx=-1), r"DeadlineIdx -1 is out of range"),
        (rules.Create(make_input(), not_after=float("nan")), r"not_after nan is not "),
    ):
        with pytest.raises(store.InvalidJob, match=says):
            js.create_many([good, bad], T0)
    assert js.list_jobs() == []


def test_reset_remove_and_cleanup(js):
    _, b, _ = create_many(js, 3)
    with pytest.raises(store.JobNotFound, match="job 'nope' does not exist"):
        js.reset("nope", T0)
    assert js.remove("nope", T0) is False  # damocles: an unknown id is a silent success
    [ran] = js.allocate(ANY, 1, "w1", T0)
    js.finish(ran.Id, None, "", T0 + 1, lease=ran.lease)
    reset = js.reset(ran.Id, T0 + 2)
    assert (reset.State, reset.TryNum, reset.WorkerName, reset.CreatedAt) == (
        READY, 0, "", int(T0) + 2
    )  # fmt: skip
    assert js.remove(b.Id, T0) is True and js.get(b.Id) is None
    [ran] = js.allocate(ANY, 1, "w1", T0 + 3)
    js.finish(ran.Id, None, "", T0 + 4, lease=ran.lease)
    life = js.limits.job_lifetime
    assert js.cleanup(T0 + life).effects == ()
    cleaned = js.cleanup(T0 + life + 3).effects
    assert cleaned == (rules.CleanedUp(ran.Id),)
    assert js.get(ran.Id) is None
    left = sorted(j.Id for j in js.list_jobs())
    assert len(left) == 1
    assert sorted(js.remove_all(T0)) == left
    assert js.list_jobs() == []


def test_remove_all_commits_each_batch_so_other_writers_get_in_and_says_each_batchs_jobs(js):
    # All jobs in one transaction held SQLite's write lock for seconds at 20,000 jobs (every
    # worker's heartbeat and the coordinator waited); on PostgreSQL each job's row until the end.
    create_many(js, 7)
    running = {job.Id: job for job in js.allocate(ANY, 7, "w1", T0 + 1)}
    ids = sorted(running)
    beating = [ids[4], ids[6]]  # one removed by the second transaction (3 each), one by the third
    deleted: list[str] = []
    between: list[tuple[int, list[type]]] = []  # jobs deleted before, the heartbeat's effects
    made_meanwhile = []
    # A writer that never waits for SQLite's lock: its write lands only where no one holds it.
    other = JobStore(str(js.url), busy_timeout=0.0)

    def counted(_conn, _cursor, statement, *_args):
        if statement.startswith("DELETE FROM dext_wdpost_jobs"):
            deleted.append(statement)

    def other_writes(*_args):  # as a transaction of remove_all takes its connection, unlocked
        if deleted:
            leases = {job_id: running[job_id].lease for job_id in beating}
            beat = other.heartbeat(beating, "w1", T0 + 2, leases=leases)
            job, made = other.create(make_input(seed=200 + len(between)), T0 + 2)
            assert made
            made_meanwhile.append(job.Id)
            between.append((len(deleted), [type(e) for e in beat.effects]))

    sa.event.listen(js.engine, "after_cursor_execute", counted)
    sa.event.listen(js.engine, "checkout", other_writes)
    told: list[list[str]] = []
    try:
        removed = js.remove_all(T0 + 3, batch=3, pause=0.0, removed=told.append)
    finally:
        other.close()
    assert sorted(removed) == ids and len(deleted) == 7
    assert [sorted(batch) for batch in told] == [ids[0:3], ids[3:6], ids[6:]]
    accepted, gone = rules.HeartbeatAccepted, rules.NotFound
    assert between == [(3, [accepted, accepted]), (6, [gone, accepted])]
    # The jobs made during the removal are not among those there at its start: left.
    assert sorted(job.Id for job in js.list_jobs()) == sorted(made_meanwhile)


def test_a_job_out_of_range_is_refused_with_the_field_not_by_the_database(js):
    too_big = msgspec.structs.replace(make_input(), MinerId=2**64 - 1)
    with pytest.raises(store.InvalidJob, match=r"bad job input: .* at `\$.MinerId`"):
        js.create(too_big, T0)
    for not_after in (float("nan"), -1e20, 1e20):
        # Out of the years 0001-9999: every sweep failed on it, which took the coordinator down.
        with pytest.raises(store.InvalidJob, match=re.escape(f"not_after {not_after!r} is not ")):
            js.create(make_input(), T0, not_after=not_after)
    assert js.list_jobs() == []


def test_a_nul_in_a_text_field_is_refused_naming_it_before_the_database(js):
    # PostgreSQL's text cannot hold NUL: refused at the insert, it would read as a store failure.
    with pytest.raises(store.InvalidJob, match=r"without a NUL character - at `\$.ProofType`"):
        js.create(make_input(proof_type="Stacked\x00DrgWindow2KiBV1"), T0)
    assert js.list_jobs() == []


# --- PostgreSQL: two coordinators on one database -----------------------------------------------


def test_two_coordinators_on_one_postgresql_allocate_and_sweep_without_duplicates(postgres_url):
    with JobStore.open(postgres_url) as setup:
        ids = {j.Id for j in create_many(setup, 400)}
    a, b = JobStore.open(postgres_url), JobStore.open(postgres_url)
    got: list[tuple[str, str]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(coordinator: JobStore, name: str) -> None:
        try:
            while batch := coordinator.allocate(ANY, 2, name, T0):
                with lock:
                    got.extend((j.Id, name) for j in batch)
                    turn = len(got)
                if turn % 8 < 2:
                    # Both coordinators sweep while the others allocate (nothing to time out).
                    coordinator.sweep(T0)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=client, args=(c, f"{'a' if c is a else 'b'}{i}"))
        for c in (a, b)
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert Counter(i for i, _ in got) == Counter(ids)
    assert {name[0] for _, name in got} == {"a", "b"}
    # Now every worker is silent: both coordinators sweep at once, each job times out once.
    swept: list[rules.Effect] = []
    sweepers = [threading.Thread(target=lambda c=c: swept.extend(c.sweep(T0 + 20).effects))
                for c in (a, b)]  # fmt: skip
    for t in sweepers:
        t.start()
    for t in sweepers:
        t.join(timeout=120)
    timed_out = Counter(e.job_id for e in swept if isinstance(e, rules.TimedOut))
    assert timed_out == Counter(ids)
    a.close()
    b.close()


# --- errors for people --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("not a url", "is not a URL"),
        ("mysql://u@h/db", "'mysql' is not supported"),
        ("postgresql+asyncpg://u@h/db", "is not supported"),
        ("sqlite://", "names no file"),
        ("sqlite:///:memory:", "names no file"),
        ("postgresql://u@h:abc/db", "is not a valid URL (invalid literal for int()"),
        ("postgresql://u@[::1/db", "is not a valid URL"),
        ("sqlite:////tmp/jobs.db?timeout=abc", "could not convert string to float: 'abc'"),
        # SQLAlchemy warned and dropped it: the store was opened read-write.
        ("sqlite:////tmp/jobs.db?mode=ro", "SQLite takes no 'mode' here; its URI parameters"),
    ],
)
def test_a_bad_store_url_says_what_is_wrong_and_what_to_give(url, says):
    with pytest.raises(StoreConfigError) as raised:
        JobStore.open(url)
    assert says in str(raised.value)
    assert "sqlite:///PATH" in str(raised.value) and "postgresql://" in str(raised.value)
    assert raised.value.exit_code == 2


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:secret@h1:5432,h2:5433/db", "postgresql://u@h1:5432,h2/db",
     "postgresql://u@[::1]:5432,[::2]:5432/db", "postgres://u@[fd00::1],h2/db?sslmode=require"],
)  # fmt: skip
def test_several_servers_with_ports_before_the_database_are_refused_saying_what_works(url):
    # SQLAlchemy reads one HOST:PORT there: the first two failed with "invalid literal for
    # int()", the last two were read as a garbled host and failed as an outage (exit code 1).
    with pytest.raises(StoreConfigError) as raised:
        JobStore.open(url)
    said = str(raised.value)
    assert "names several servers" in said and "secret" not in said, said
    assert "?host=h1:5432&host=h2:5433" in said and "@h1,h2:5432/DATABASE" in said, said
    assert raised.value.exit_code == 2


def test_several_servers_on_one_port_before_the_database_are_one_host_list_for_libpq():
    engine_url = store.parse_url("postgresql://u@h1,h2:5432/db")
    assert (engine_url.host, engine_url.port) == ("h1,h2", 5432)  # libpq tries h1, then h2


@pytest.mark.parametrize(
    "url", ["postgresql://u:a,b/c@h1/db", "postgresql://u:x,y?z@h1:5432/db",
            "postgresql://u:s3cr,et#1@h1/db"],
)  # fmt: skip
def test_a_password_holding_a_comma_and_a_slash_or_question_mark_is_no_list_of_servers(url):
    # SQLAlchemy reads a password up to its '@': these were refused as naming several servers.
    assert store.parse_url(url).host == "h1"


@pytest.mark.parametrize(
    "url", ["postgresql://u:s3cr,et?x@h1:5432,h2:5433/db", "postgresql://u:s3cr/et@h1:1,h2:2/db",
            "postgresql://u:s3cr@et@h1:1,h2:2/db"],
)  # fmt: skip
def test_a_url_refused_hides_all_of_its_password_whatever_it_holds(url):
    with pytest.raises(StoreConfigError) as raised:
        JobStore.open(url)
    said = str(raised.value)
    assert "names several servers" in said, said
    assert "s3cr" not in said and "'postgresql://u:***@h1:" in said, said


@pytest.mark.parametrize(
    ("url", "said"),
    [("sqlite:///newq?x.db", "'x.db' after its ?"), ("sqlite:///newq?", "nothing after its ?"),
     ("postgresql://u:s3cr?t@h/db?sslmode", "'sslmode' after its ?"),
     ("postgresql://u@h/db?connect_timeout=5&sslmode", "'sslmode' after its ?")],
)  # fmt: skip
def test_a_query_part_with_no_value_is_refused_not_dropped(tmp_path, monkeypatch, url, said):
    # SQLAlchemy dropped it: `sqlite:///newq?x.db` made a store at newq, `?sslmode` meant none.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreConfigError) as raised:
        store.parse_url(url)
    assert f"has {said}, no NAME=VALUE parameter" in str(raised.value), raised.value
    assert "write a ? in a file name as %3F" in str(raised.value)
    assert "s3cr" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []
    # A ? in a password is no query; one in a file name, written %3F, is kept.
    assert store.parse_url("postgresql://u:s3cr?t@h/db").password == "s3cr?t"
    assert store.parse_url("sqlite:///new%3Fx.db").database == "new?x.db"


def test_plain_postgresql_urls_mean_psycopg_3():
    assert store.parse_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert store.parse_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert store.parse_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"


def test_postgresql_connections_give_up_on_a_silent_server_unless_the_url_says_otherwise(
    postgres_url,
):
    # TCP keepalives and a user timeout: a server whose host died or whose network was cut
    # fails the call instead of leaving it waiting for ever; a URL's own settings win.
    from damocles_ext.jobs.database import PG_TCP_SETTINGS
    from damocles_ext.jobs.notify import JobListener

    for url, idle in ((postgres_url, "10"), (postgres_url + "&keepalives_idle=60", "60")):
        with JobStore.open(url) as s:
            with s.engine.connect() as conn:
                params = conn.connection.dbapi_connection.info.get_parameters()
            # The LISTEN connection too (it only receives: only keepalives tell it of a dead host).
            listener = JobListener.of_store(s, lambda job_id: None, lambda: None)
        assert params["keepalives_idle"] == idle
        assert params["tcp_user_timeout"] == str(PG_TCP_SETTINGS["tcp_user_timeout"])
        assert params["keepalives"] == "1"
        assert listener is not None and listener.tcp["keepalives"] == 1
        if idle == "10":
            assert listener.tcp["keepalives_idle"] == 10
        else:
            assert (
                "keepalives_idle" not in listener.tcp and "keepalives_idle=60" in listener.conninfo
            )


def test_postgresql_sessions_have_the_server_end_them_when_their_client_is_gone_unless_told(
    postgres_url, monkeypatch
):
    # Each session of the store tells the server when to end it if its client dies (an idle
    # transaction's timeout, server-side keepalives, a check while a statement runs), so that
    # a dead client's row locks do not outlive it by hours; a URL's (or PGOPTIONS') own win.
    from damocles_ext.jobs.notify import JobListener
    from damocles_ext.jobs.pg_session import PG_SESSION_SETTINGS

    server: list[int] = []

    def settings(url: str) -> tuple[dict[str, str], dict[str, str]]:
        with JobStore.open(url) as s:
            with s.engine.connect() as conn:
                server[:] = [int(conn.execute(sa.text("SHOW server_version_num")).scalar_one())]
                rows = conn.execute(sa.text(
                    "SELECT name, current_setting(name), source FROM pg_settings"
                    " WHERE name = ANY(CAST(:names AS text[]))"
                ), {"names": list(PG_SESSION_SETTINGS)}).all()  # fmt: skip
                isolation = conn.execute(sa.text("SHOW transaction_isolation")).scalar_one()
            listener = JobListener.of_store(s, lambda job_id: None, lambda: None)
        assert isolation == "read committed" and listener is not None
        return {name: f"{value} ({source})" for name, value, source in rows}, listener.session

    ours, listened = settings(postgres_url)
    # client_connection_check_interval is PostgreSQL 14's: an older server has none to set.
    checked = server[0] >= 140000
    expected = [
        k for k in PG_SESSION_SETTINGS if checked or k != "client_connection_check_interval"
    ]
    # The TCP ones read 0 on the tests' unix socket; set all the same.
    assert {k: v.split()[1] for k, v in ours.items()} == dict.fromkeys(expected, "(session)")
    assert ours["idle_in_transaction_session_timeout"] == "30s (session)"
    assert ours["lock_timeout"] == "4s (session)"  # a live session's lock waited for so long
    assert listened == PG_SESSION_SETTINGS
    if checked:
        assert ours["client_connection_check_interval"] == "10s (session)"

    given = (
        postgres_url
        + "&options=-c%20idle_in_transaction_session_timeout%3D5min%20--lock-timeout%3D0"
    )
    ours, listened = settings(given)
    assert ours["idle_in_transaction_session_timeout"] == "5min (client)"
    assert ours["lock_timeout"] == "0 (client)"
    assert ours["tcp_keepalives_count"] == "0 (session)"
    assert "idle_in_transaction_session_timeout" not in listened

    # An escaped space is part of the value, as the server reads it: what follows is still ours.
    given = postgres_url + "&options=-c%20application_name%3Da%5C%20--tcp-user-timeout%3D5"
    ours, listened = settings(given)
    assert ours["tcp_user_timeout"] == "0 (session)"  # ours, read 0 on a unix socket
    assert listened == PG_SESSION_SETTINGS

    monkeypatch.setenv("PGOPTIONS", "--tcp-user-timeout=0")
    ours, listened = settings(postgres_url)
    assert ours["tcp_user_timeout"] == "0 (client)"
    assert ours["idle_in_transaction_session_timeout"] == "30s (session)"
    assert "tcp_user_timeout" not in listened


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ("-c idle_in_transaction_session_timeout=5min", {"idle_in_transaction_session_timeout"}),
        (
            "-cTCP_User_Timeout=0  --tcp-keepalives-idle=1\t-c  a.b=1",
            {"tcp_user_timeout", "tcp_keepalives_idle", "a.b"},
        ),
        # A backslash makes the space after it part of the value: no second setting.
        ("-c application_name=a\\ --tcp-user-timeout=5", {"application_name"}),
        # An escaped backslash is one; the space after it ends the word.
        (
            "-c application_name=a\\\\ --tcp-user-timeout=5",
            {"application_name", "tcp_user_timeout"},
        ),
        ("-B 10 -c", set()),
        ("", set()),
    ],
)
def test_the_settings_a_urls_options_name_are_read_as_the_server_splits_them(options, names):
    # The settings a URL's `options` (or PGOPTIONS) names are left to it; the words are split
    # as the server splits them, so a value with an escaped space names no setting of its own.
    from damocles_ext.jobs.pg_session import options_names

    assert options_names(options) == names


def test_a_session_setting_the_server_refuses_leaves_the_others_set_and_is_warned_of_once(
    postgres_url, monkeypatch, caplog
):
    # A server that refuses one of the settings (a managed service that locked it; a platform
    # that cannot check for a closed socket refuses client_connection_check_interval): the
    # others, the idle-in-transaction timeout first, are set all the same, and the refusal is
    # one warning for the engine (or listener), not one per new connection.
    import psycopg

    from damocles_ext.jobs.notify import JobListener
    from damocles_ext.jobs.pg_session import PG_SESSION_SETTINGS
    from damocles_ext.jobs.pg_session import apply as apply_session_settings

    with psycopg.connect(postgres_url) as probe:
        if probe.info.server_version < 140000:
            pytest.skip("client_connection_check_interval is PostgreSQL 14's")
    monkeypatch.setitem(PG_SESSION_SETTINGS, "client_connection_check_interval", "often")
    names = list(PG_SESSION_SETTINGS)
    read = (
        "SELECT name, current_setting(name) || ' (' || source || ')' FROM pg_settings"
        " WHERE name = ANY(%s::text[])"
    )

    def check(ours: dict[str, str]) -> None:
        assert ours["idle_in_transaction_session_timeout"] == "30s (session)"
        assert ours["tcp_user_timeout"].endswith("(session)")
        assert ours["client_connection_check_interval"] == "0 (default)"

    with (
        caplog.at_level(logging.WARNING, "damocles_ext.jobs.store"),
        JobStore.open(postgres_url) as s,
    ):
        with s.engine.connect() as one, s.engine.connect() as two:  # two new connections
            for conn in (one, two):
                check(dict(conn.connection.driver_connection.execute(read, (names,))))
        listener = JobListener.of_store(s, lambda job_id: None, lambda: None)
        assert listener is not None
        for _ in range(2):  # the listener's connection (autocommit), and its reconnection
            with psycopg.connect(listener.conninfo, autocommit=True) as raw:
                apply_session_settings(raw, listener.session, s.where, listener.refusals)
                check(dict(raw.execute(read, (names,))))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2, warned  # the engine's and the listener's, once each
    for message in warned:
        assert "refused client_connection_check_interval = often (" in message
        assert "idle_in_transaction" not in message


def test_a_latin1_database_stores_what_it_can_hold_and_refuses_the_rest_as_a_store_error(
    postgres_server,
):
    # libpq's client encoding defaults to the database's: psycopg itself then failed to encode
    # a worker's name outside LATIN1, a UnicodeEncodeError out of the store (a traceback and an
    # "internal error" in the coordinator) rather than a StoreError saying what to do.
    import psycopg

    url = postgres_server.create_database()
    name = url.split("?")[0].rsplit("/", 1)[1] + "_latin1"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
            " TEMPLATE template0"
        )
    spec = rules.AllocationSpec((), ())
    with JobStore.open(postgres_server.url(name)) as s:
        s.create(make_input(seed=1), 1000)
        s.create(make_input(seed=2), 1000)
        with pytest.raises(StoreError) as raised:
            s.allocate(spec, 1, "гпу-1", 1001)
        assert type(raised.value) is StoreError
        assert "allocate failed: character with byte sequence" in str(raised.value)
        assert "give the URL of a database created WITH ENCODING 'UTF8'" in str(raised.value)
        [job] = s.allocate(spec, 1, "gpü-1", 1001)
        assert s.get(job.Id).WorkerName == "gpü-1"


def test_an_unreachable_postgresql_is_a_clear_error_without_the_password():
    with socket.socket() as probe:  # a loopback port with nobody listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StoreError) as raised:
        JobStore.open(f"postgresql://dext:s3cret@127.0.0.1:{port}/jobs", connect_timeout=5)
    message = str(raised.value)
    assert message.startswith(
        f"cannot reach the job store postgresql://dext:***@127.0.0.1:{port}/jobs"
    )
    assert "s3cret" not in message and "check that the PostgreSQL server is running" in message


def test_a_sqlite_store_in_a_missing_directory_says_to_create_it(tmp_path):
    with pytest.raises(StoreError) as raised:
        JobStore.open(f"sqlite:///{tmp_path}/nowhere/jobs.db")
    assert f"its directory '{tmp_path}/nowhere' does not exist: create it" in str(raised.value)


def test_a_sqlite_store_in_a_directory_this_user_may_not_enter_is_a_config_error(tmp_path):
    with a_closed_directory() as closed:
        said = said_when_kept_out(lambda: JobStore.open(f"sqlite:///{closed}/sub/jobs.db"))
    assert said.startswith(f"StoreConfigError: cannot open the job store sqlite:///{closed}/sub/")
    assert said.endswith(
        f"this user may not enter its directory '{closed}/sub' (or one above it): check their"
        " mode and owner"
    )


def test_a_file_that_is_not_a_database_is_named_as_such(tmp_path):
    (tmp_path / "jobs.db").write_bytes(b"not a database, just text" * 100)
    with pytest.raises(StoreError) as raised:
        JobStore.open(f"sqlite:///{tmp_path}/jobs.db")
    assert "the file is not an SQLite database" in str(raised.value)


def test_a_schema_lock_held_past_the_servers_own_lock_timeout_is_a_store_error(postgres_url):
    # lock_timeout from the URL (or the role, or PGOPTIONS), not from open_timeout.
    import psycopg

    with JobStore.open(postgres_url):
        pass
    with psycopg.connect(postgres_url) as holder:
        holder.execute("SELECT pg_advisory_lock(7426385010214)")
        with pytest.raises(StoreError) as raised:
            JobStore.open(postgres_url + "&options=-c%20lock_timeout%3D200")
    assert "another session held its schema lock (" in str(raised.value)
    assert "the server's own lock_timeout ran out" in str(raised.value)


def test_a_full_sqlite_store_says_its_file_system_is_full(tmp_path):
    # SQLite's "database or disk is full", made real by a page limit on every connection.
    from sqlalchemy import event

    from damocles_ext.jobs.store import StoreUnavailable

    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as s:
        with s.engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
        s.engine.dispose()

        @event.listens_for(s.engine, "connect")
        def _limit(dbapi_connection, _record):
            dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

        def fill() -> None:
            for n in range(1000):
                s.create(make_input(miner=1000 + n), 1_700_000_000.0)

        with pytest.raises(StoreUnavailable) as raised:
            fill()
    assert "database or disk is full" in str(raised.value)
    assert "the file system that holds it is full: free some space there" in str(raised.value)


def test_a_store_whose_tables_are_gone_says_so_and_what_to_do(store_url):
    # Its database dropped and made again, empty, under a running coordinator or serve.
    with JobStore.open(store_url) as s:
        with s.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE dext_wdpost_jobs")
        with pytest.raises(StoreError) as raised:
            s.get("job-1")
    assert "the store's tables are gone (its database dropped or emptied?)" in str(raised.value)
    assert "restart damocles-ext to make them again" in str(raised.value)


def test_a_sqlite_store_locked_past_the_busy_timeout_says_so(tmp_path):
    url = f"sqlite:///{tmp_path}/jobs.db"
    with (
        JobStore.open(url) as holder,
        holder.engine.begin(),  # holds the write lock
        JobStore(url, busy_timeout=0.01) as waiter,
        pytest.raises(StoreError) as raised,
    ):
        waiter.create(make_input(), T0)
    assert "stayed locked by another process for longer than the busy timeout" in str(raised.value)


# --- from trio ----------------------------------------------------------------------------------


async def test_the_trio_wrapper_runs_store_calls_in_threads_with_its_clock(store_url):
    now = [T0]
    with JobStore.open(store_url) as s:
        ts = TrioJobStore(s, clock=lambda: now[0])
        job, made = await ts.create(make_input())
        assert made and job.CreatedAt == int(T0)
        async with trio.open_nursery() as nursery:
            results: list[list[model.JobRecord]] = []

            async def take(name: str) -> None:
                results.append(await ts.allocate(ANY, 1, name))

            for name in ("w1", "w2", "w3"):
                nursery.start_soon(take, name)
        assert sorted(len(r) for r in results) == [0, 0, 1]
        [[allocated]] = [r for r in results if r]
        now[0] = T0 + 16
        assert (await ts.sweep()).effects[0] == rules.TimedOut(job.Id, allocated.WorkerName)
        assert (await ts.get(job.Id)).State == READY


def test_the_store_tables_are_prefixed(js):
    names = set(sa.inspect(js.engine).get_table_names())
    assert {"dext_wdpost_jobs", "dext_schema_version"} <= names


def test_a_postgresql_server_with_no_connection_left_is_said_so_with_what_to_raise():
    # PostgreSQL refuses it before a session exists (no SQLSTATE to read): only its words tell.
    # Before, the advice was to check that the server runs and the URL's user and password.
    from sqlalchemy import exc

    from damocles_ext.jobs.database import parse_url, store_failure

    url = parse_url("postgresql://dext@db.example/jobs")
    for words in ("FATAL:  sorry, too many clients already",
                  "FATAL:  remaining connection slots are reserved for roles with SUPERUSER"):  # fmt: skip
        error = exc.OperationalError("connect", {}, Exception(f"connection failed: {words}"))
        failure = store_failure("postgresql://dext@db.example/jobs", url, "sweep", error)
        assert isinstance(failure, store.StoreUnavailable)
        assert "takes no more connections" in str(failure) and "max_connections" in str(failure)

    class WithSqlstate(Exception):  # a driver that gives the SQLSTATE, whatever the words
        sqlstate = "53300"

    error = exc.OperationalError("connect", {}, WithSqlstate("connection failed: (translated)"))
    failure = store_failure("postgresql://dext@db.example/jobs", url, "sweep", error)
    assert isinstance(failure, store.StoreUnavailable) and "max_connections" in str(failure)


def test_a_role_or_database_at_its_connection_limit_is_said_so_with_what_to_raise(postgres_url):
    # SQLSTATE 53300 from a role's or a database's CONNECTION LIMIT, which the server words
    # otherwise than its max_connections: before, "check that the PostgreSQL server is running
    # and reachable from here, and the user, password and database in the URL".
    import psycopg

    JobStore.open(postgres_url).close()
    role, database = f"lim{os.getpid()}", postgres_url.split("?")[0].rsplit("/", 1)[1]
    url = postgres_url.replace("postgres@", f"{role}@", 1)
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
        try:
            with psycopg.connect(url), pytest.raises(store.StoreUnavailable) as raised:
                JobStore(url).list_jobs()  # the role's one connection held above
            assert f"the PostgreSQL role {role!r} of the job store " in str(raised.value)
            assert "too many connections for role" in str(raised.value)
            assert f"raise it (ALTER ROLE {role} CONNECTION LIMIT n)" in str(raised.value)
            admin.execute(f"ALTER DATABASE {database} CONNECTION LIMIT 0")
            with pytest.raises(store.StoreUnavailable) as raised:
                JobStore(url).list_jobs()
            assert f"the PostgreSQL database {database!r} of the job store " in str(raised.value)
            assert f"(ALTER DATABASE {database} CONNECTION LIMIT n)" in str(raised.value)
        finally:
            admin.execute(f"DROP ROLE {role}")


def test_a_late_proof_on_a_failed_job_wakes_the_listening_producers():
    # Finished (failed, a try left) to finished (proved): the state did not change, and no
    # NOTIFY went out; producers on other hosts saw the proof at their next poll only.
    job = rules.apply(None, rules.Create(make_input()), T0, rules.JobLimits()).job
    job = rules.apply(job, rules.Allocate("w1", "L1"), T0, rules.JobLimits()).job
    failed = rules.apply(job, rules.Finish(None, "oom", lease="L1"), T0 + 1, rules.JobLimits()).job
    out = model.JobOutput(proofs=(b"p",), faults=())
    proved = rules.apply(failed, rules.Finish(out, "", lease="L0"), T0 + 2, rules.JobLimits()).job
    assert (failed.State, proved.State) == (FINISHED, FINISHED) and proved.succeeded
    assert store._wakes_producers(failed, proved)
    assert store._wakes_producers(job, failed)  # running -> finished, as before
    assert not store._wakes_producers(job, job)  # a heartbeat: nothing to act on
