"""The job store's summary (`status --jobs`, the metrics' gauges): the jobs by kind, the oldest
ready job, the live workers and the ready jobs none of them may take. The rules on plain values
(jobs/summary.py), then a real store on SQLite and PostgreSQL, time passed in, never slept."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from test_jobs_rules import make_input

from damocles_ext.jobs import database, model, rows, rules, store, summary
from damocles_ext.jobs.rules import AllocationSpec
from damocles_ext.jobs.store import JobStore

T0 = 1_700_000_000.0
W2K = "StackedDrgWindow2KiBV1_2"
W32G = "StackedDrgWindow32GiBV1_2"


# --- the rules, on plain values -----------------------------------------------------------------


def group(miner: int, proof: str = W2K, jobs: int = 1, oldest: int = int(T0)):
    return summary.ReadyGroup(miner, proof, jobs, oldest)


def test_ready_jobs_no_live_workers_filters_admit_are_unallocatable():
    ready = [group(1000, jobs=2), group(2000, jobs=3), group(1000, W32G, jobs=5)]
    seen = [
        summary.WorkerSeen("a", AllocationSpec((1000,), (W2K,)), T0),
        summary.WorkerSeen("b", AllocationSpec((), (W32G,)), T0),
    ]
    s = summary.summarize(counts={"ready2run": 10}, ready=ready, oldest_ready=("J", int(T0) - 90),
                          workers=seen, now=T0 + 30)  # fmt: skip
    # a takes miner 1000's 2KiB jobs, b every 32GiB one: miner 2000's 2KiB jobs have nobody.
    assert s.unallocatable == 3
    assert s.unallocatable_groups == [summary.UnallocatableGroup(2000, W2K, 3)]
    assert s.live_workers == 2 and [w.worker for w in s.workers] == ["a", "b"]
    assert s.oldest_ready_job == "J" and s.oldest_ready_age == 120
    assert s.jobs == dict.fromkeys(summary.KINDS, 0) | {"ready2run": 10} and s.total == 10


def test_a_worker_not_seen_within_the_window_no_longer_counts():
    ready = [group(1000)]
    seen = [summary.WorkerSeen("a", AllocationSpec(), T0)]
    fresh = summary.summarize(counts={}, ready=ready, oldest_ready=None, workers=seen,
                              now=T0 + summary.DEFAULT_LIVE_WINDOW)  # fmt: skip
    assert (fresh.live_workers, fresh.unallocatable) == (1, 0)
    gone = summary.summarize(counts={}, ready=ready, oldest_ready=None, workers=seen,
                             now=T0 + summary.DEFAULT_LIVE_WINDOW + 1)  # fmt: skip
    assert (gone.live_workers, gone.unallocatable, gone.workers) == (0, 1, [])


def test_with_no_live_worker_every_ready_job_is_unallocatable():
    s = summary.summarize(counts={"ready2run": 4}, ready=[group(1), group(2, jobs=3)],
                          oldest_ready=None, workers=[], now=T0)  # fmt: skip
    assert s.unallocatable == 4 and s.live_workers == 0


def test_a_spec_is_stored_in_one_canonical_form():
    assert summary.spec_key(AllocationSpec((2, 1, 2), ("b", "a"))) == summary.spec_key(
        AllocationSpec((1, 2), ("a", "b"))
    )
    spec = AllocationSpec((1, 2), ("a",))
    assert summary.spec_of_key(summary.spec_key(spec)) == spec
    assert summary.spec_of_key("not json") == AllocationSpec()


def test_an_unknown_job_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="not a job kind: \\['done'\\]"):
        summary.summarize(counts={"done": 1}, ready=[], oldest_ready=None, workers=[], now=T0)


# --- on a real store ----------------------------------------------------------------------------


def test_the_summary_of_a_store_with_jobs_of_every_kind(js):
    js.limits = rules.JobLimits(max_try=1)  # a failure is final: it stays finished-failed
    ids = {}
    for name, seed, not_after in [("ok", 1, None), ("failed", 2, None), ("cancelled", 3, T0 + 100),
                                  ("running", 4, None)]:  # fmt: skip
        job, _ = js.create(make_input(seed=seed), T0, not_after=not_after)
        [taken] = [j for j in js.allocate(AllocationSpec(), 1, name, T0 + 1) if j.Id == job.Id]
        ids[name] = taken
    js.create(make_input(seed=5), T0 + 5)
    js.create(make_input(seed=6), T0 + 3)
    out = model.JobOutput(proofs=(b"p",), faults=())
    js.finish(ids["ok"].Id, out, "", T0 + 2, lease=ids["ok"].lease)
    js.finish(ids["failed"].Id, None, "gpu fell off", T0 + 2, lease=ids["failed"].lease)
    js.heartbeat([ids["running"].Id], "running", T0 + 95)
    js.sweep(T0 + 100)  # the job with a deadline is cancelled; the failed one has no try left
    s = js.summary(T0 + 103)
    assert s.jobs == {"ready2run": 2, "running": 1, "finished-ok": 1, "finished-failed": 1,
                      "cancelled": 1}  # fmt: skip
    assert s.total == 6 and s.schema == "damocles-ext/jobs/1"
    oldest = js.get(model.job_id(make_input(seed=6)))
    assert (s.oldest_ready_job, s.oldest_ready_created_at) == (oldest.Id, int(T0) + 3)
    assert s.oldest_ready_age == 100
    assert s.store == js.where


def test_unallocatable_follows_two_workers_different_filters(js):
    for seed, miner, proof in [(1, 1000, W2K), (2, 2000, W2K), (3, 2000, W2K), (4, 3000, W32G)]:
        js.create(make_input(seed=seed, miner=miner, proof_type=proof), T0)
    assert js.summary(T0).unallocatable == 4  # nobody has asked yet
    # Two workers that find nothing: a asks for miner 5000's jobs, b for 32GiB ones only.
    assert js.allocate(AllocationSpec((5000,), ()), 1, "a", T0 + 1) == []
    assert js.allocate(AllocationSpec((), ("StackedDrgWindow8MiBV1_2",)), 1, "b", T0 + 1) == []
    s = js.summary(T0 + 2)
    assert (s.live_workers, s.unallocatable) == (2, 4)
    # b now asks for 32GiB jobs and takes miner 3000's; a asks for miner 2000's with 0 slots.
    [taken] = js.allocate(AllocationSpec((), (W32G,)), 1, "b", T0 + 3)
    assert taken.Input.MinerId == 3000
    assert js.allocate(AllocationSpec((2000,), (W2K,)), 0, "a", T0 + 3) == []
    s = js.summary(T0 + 4)
    # Miner 1000's job is the one no live worker's filters admit.
    assert s.unallocatable == 1
    assert s.unallocatable_groups == [summary.UnallocatableGroup(1000, W2K, 1)]
    assert s.live_workers == 2
    assert {(w.worker, tuple(w.allowed_miners), tuple(w.allowed_proof_types)) for w in s.workers} \
        == {("a", (5000,), ()), ("a", (2000,), (W2K,)), ("b", (), ("StackedDrgWindow8MiBV1_2",)),
            ("b", (), (W32G,))}  # fmt: skip


def test_a_dead_worker_no_longer_counts_and_heartbeats_and_pings_keep_one_alive(js):
    js.create(make_input(seed=1, miner=1000), T0)
    js.create(make_input(seed=2, miner=1000), T0)
    [taken] = js.allocate(AllocationSpec((1000,)), 1, "busy", T0)
    assert js.allocate(AllocationSpec((1000,)), 0, "idle", T0) == []
    js.allocate(AllocationSpec((1000,)), 0, "pinging", T0)
    window = summary.DEFAULT_LIVE_WINDOW
    # "busy" heartbeats its job, "pinging" pings, "idle" is silent; a sealing-only worker that
    # pings without ever asking for jobs is not a WindowPoSt worker.
    for t in range(15, int(window) + 60, 15):
        js.heartbeat([taken.Id], "busy", T0 + t)
        js.worker_seen("pinging", T0 + t)
        js.worker_seen("sealer", T0 + t)
    s = js.summary(T0 + window + 60)
    assert s.live_workers == 2 and {w.worker for w in s.workers} == {"busy", "pinging"}
    assert s.unallocatable == 0
    # Nobody is heard from for longer than the window: the ready job has no live worker.
    s = js.summary(T0 + 3 * window)
    assert (s.live_workers, s.unallocatable) == (0, 1)
    # A longer window: the same silences are inside it, the idle worker's too.
    assert js.summary(T0 + 3 * window, live_window=10 * window).live_workers == 3


def test_after_the_wall_clock_steps_back_a_dead_worker_no_longer_counts_and_a_live_one_does(js):
    # Before, every worker seen before an hour's step back counted as live for that hour,
    # dead or not: its row lay ahead of the clock, and heartbeats did not write it again.
    js.create(make_input(seed=1, miner=1000), T0)
    js.create(make_input(seed=2, miner=1000), T0)
    [taken] = js.allocate(AllocationSpec((1000,)), 1, "busy", T0)
    js.allocate(AllocationSpec((1000,)), 0, "pinging", T0)
    js.allocate(AllocationSpec((2000,)), 0, "dead", T0)
    back = T0 - 3600  # NTP steps the clock an hour back
    window = summary.DEFAULT_LIVE_WINDOW
    for t in range(15, int(window) + 60, 15):
        js.heartbeat([taken.Id], "busy", back + t)
        js.worker_seen("pinging", back + t)
    s = js.summary(back + window + 60)
    assert {w.worker for w in s.workers} == {"busy", "pinging"}
    assert all(w.last_seen <= back + window + 60 for w in s.workers)
    assert s.unallocatable == 0  # the jobs of miner 1000; none of miner 2000 to miss "dead"
    # Silent for longer than the window after the step: no longer live.
    assert js.summary(back + 3 * window).live_workers == 0


def test_a_late_allocation_call_keeps_a_workers_later_last_seen_unless_the_clock_stepped_back(js):
    # An allocation call stored late (up to the 60 s a store call may take) or abandoned and
    # stored after the worker's next one set its stamp back, as if the worker was last seen then.
    spec = AllocationSpec((1000,))

    def last_seen(now: float) -> float:
        [seen] = js.summary(now, live_window=10 * 3600).workers
        return seen.last_seen

    js.allocate(spec, 0, "w", T0 + 100)
    js.allocate(spec, 0, "w", T0 + 40)  # the late one
    assert last_seen(T0 + 100) == T0 + 100
    js.allocate(spec, 0, "w", T0 + 130)  # a later one is taken
    assert last_seen(T0 + 130) == T0 + 130
    back = T0 - 3600  # the wall clock stepped an hour back: the stamp ahead is replaced
    js.allocate(spec, 0, "w", back)
    assert last_seen(back) == back
    # A heartbeat's or ping's sighting stored late does not set it back either.
    js.worker_seen("w", back + 100)
    assert last_seen(back + 100) == back + 100
    js.worker_seen("w", back + 40)  # the late one
    assert last_seen(back + 100) == back + 100


def test_a_workers_pause_is_kept_while_its_pings_say_it_and_read_within_the_live_window(js):
    window = summary.DEFAULT_LIVE_WINDOW
    js.allocate(AllocationSpec(), 0, "w", T0)
    js.allocate(AllocationSpec(), 0, "v", T0)

    def pauses(now: float) -> tuple:
        s = js.summary(now)
        return s.paused_workers, {w.worker: (w.paused_slots, w.slots) for w in s.workers}

    def rows() -> list:
        with js.engine.begin() as conn:
            t = database.workers_paused.c
            return conn.execute(sa.select(t.worker, t.paused, t.slots, t.at)).all()

    assert pauses(T0) == (0, {"v": (0, 0), "w": (0, 0)})  # (no ping said it yet)
    js.worker_seen("w", T0 + 1, (1, 4))
    js.worker_seen("v", T0 + 1, (0, 2))
    js.worker_seen("sealer", T0 + 1, (3, 3))  # never asked for jobs: nothing written
    assert pauses(T0 + 1) == (1, {"v": (0, 2), "w": (1, 4)})
    assert "paused workers: 1 (a slot paused takes no job" in summary.render(js.summary(T0 + 1))
    assert {r.worker for r in rows()} == {"v", "w"}
    js.worker_seen("w", T0 + 2, (2, 4))
    js.worker_seen("w", T0 + 3, None)  # a ping not read: the pause stays
    assert pauses(T0 + 3)[1]["w"] == (2, 4)
    js.worker_seen("w", T0 + 4, (0, 4))  # the pause over
    js.worker_seen("w", T0 + 3.5, (2, 4))  # a late ping: an older state, not taken
    js.worker_seen("v", T0 + 2, (0, 2))  # nothing changed, within 10 s: not written again
    assert pauses(T0 + 4) == (0, {"v": (0, 2), "w": (0, 4)})
    assert {(r.worker, r.at) for r in rows()} == {("v", T0 + 1), ("w", T0 + 4)}
    # Not said again within the live window (the worker gone, or pinging an older
    # coordinator): not known any more, though the row stays until the cleanup.
    later = T0 + window + 10
    js.worker_seen("w", later, None)
    assert pauses(later) == (0, {"w": (0, 0)})
    # The wall clock stepped an hour back: a row stamped ahead is replaced, not kept paused.
    js.worker_seen("w", later, (3, 4))
    back = later - 3600
    js.worker_seen("w", back, (0, 4))
    assert pauses(back)[1]["w"] == (0, 4)
    js.cleanup(T0 + js.limits.job_lifetime + 2)  # forgotten with the workers
    assert rows() == []


def test_workers_gone_for_the_job_lifetime_are_forgotten_by_the_cleanup(js):
    js.allocate(AllocationSpec(), 0, "old", T0)
    js.allocate(AllocationSpec(), 0, "new", T0 + js.limits.job_lifetime)
    js.cleanup(T0 + js.limits.job_lifetime + 1)
    everyone = js.summary(T0 + js.limits.job_lifetime + 1, live_window=10 * js.limits.job_lifetime)
    assert [w.worker for w in everyone.workers] == ["new"]


#: The workers table of versions 2 and 3, keyed by the spec itself (version 4: by its digest).
OLD_WORKERS = sa.Table(
    database.OLD_WORKERS,
    sa.MetaData(),
    sa.Column("worker", sa.Text, primary_key=True),
    sa.Column("spec", sa.Text, primary_key=True),
    sa.Column("last_seen", sa.Float, nullable=False),
)


def make_old_store(url: str, version: int, job: model.JobRecord) -> None:
    """A store as an older release made it: version 1 has the jobs table (with its index of
    ready jobs, which version 3 replaces) and no workers table; version 2 adds the workers
    (keyed by their spec until version 4); version 3 has the index of today; version 4 keys the
    workers by the spec's digest, in a table of another name, and keeps no pauses."""
    engine = store.make_engine(url)
    try:
        with engine.begin() as conn:
            store.schema_version.create(conn)
            store.jobs.create(conn)
            if version < 3:
                for index in store.jobs.indexes:
                    index.drop(conn)
                conn.execute(
                    sa.text(
                        f"CREATE INDEX {database.OLD_READY_INDEX} ON dext_wdpost_jobs"
                        " (state, not_after, created_at)"
                    )
                )
            key = summary.spec_key(AllocationSpec((1234,)))
            if version == 4:  # its own table, keyed by the spec's digest (no pauses kept)
                database.workers.create(conn)
                digest = summary.spec_digest(key)
                conn.execute(database.workers.insert().values(
                    worker="old", spec_digest=digest, spec=key, last_seen=T0))  # fmt: skip
            elif version >= 2:
                OLD_WORKERS.create(conn)  # (as versions 2 and 3 kept them)
                conn.execute(OLD_WORKERS.insert().values(worker="old", spec=key, last_seen=T0))
            conn.execute(store.schema_version.insert().values(version=version))
            conn.execute(store.jobs.insert().values(rows.row_values(job)))
    finally:
        engine.dispose()


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_a_store_of_a_previous_schema_version_is_migrated_and_keeps_its_jobs(store_url, version):
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(store_url, version, job)
    with JobStore.open(store_url) as s:
        assert s.schema_version() == store.SCHEMA_VERSION == 5
        assert s.get(job.Id) == job
        # The workers seen before are carried over (version 1 kept none): the job is one the
        # worker seen takes, so it is not unallocatable.
        seen = s.summary(T0)
        assert [w.worker for w in seen.workers] == (["old"] if version >= 2 else [])
        assert seen.unallocatable == (0 if version >= 2 else 1)
        s.allocate(AllocationSpec((1234,)), 0, "w", T0)
        assert s.summary(T0).unallocatable == 0
        with s.engine.begin() as conn:
            assert sa.inspect(conn).has_table("dext_job_workers")
            assert sa.inspect(conn).has_table("dext_job_workers_paused")
            # A coordinator of versions 2 or 3 still running goes on with its own table.
            assert sa.inspect(conn).has_table(database.OLD_WORKERS) == (2 <= version <= 3)
            indexes = {
                i["name"]: i["column_names"]
                for i in sa.inspect(conn).get_indexes("dext_wdpost_jobs")
            }
        # The index of ready jobs is the new one, the allocation order's, and only it.
        assert indexes == {"dext_wdpost_jobs_ready": ["state", "not_after", "created_at", "id"]}
        [taken] = s.allocate(AllocationSpec(), 1, "w", T0 + 1)
        assert taken.Id == job.Id
    with JobStore.open(store_url) as s:  # and a second open finds nothing to do
        assert s.migrate() == store.SCHEMA_VERSION and s.get(job.Id) == taken


async def test_the_trio_wrapper_reads_the_summary_and_records_pings_with_its_clock(store_url):
    now = [T0]
    with JobStore.open(store_url) as s:
        jobs = store.TrioJobStore(s, clock=lambda: now[0])
        await jobs.create(make_input(seed=1))
        await jobs.allocate(AllocationSpec((7,)), 1, "w")
        now[0] += 100
        await jobs.worker_seen("w")
        now[0] += 100
        got = await jobs.summary()
        assert (got.time, got.live_workers, got.unallocatable) == (T0 + 200, 1, 1)
        assert got.oldest_ready_age == 200


def test_two_coordinators_on_one_postgresql_see_each_others_workers(postgres_url):
    # Each store is its own engine, as two coordinator processes would have.
    with JobStore.open(postgres_url) as one, JobStore(postgres_url) as two:
        one.create(make_input(seed=1, miner=1000), T0)
        one.create(make_input(seed=2, miner=2000), T0)
        one.create(make_input(seed=3, miner=3000), T0)
        assert one.allocate(AllocationSpec((1000,)), 0, "a", T0) == []
        assert two.allocate(AllocationSpec((2000,)), 0, "b", T0) == []
        for s in (one, two):
            got = s.summary(T0 + 1)
            assert (got.live_workers, got.unallocatable) == (2, 1)
            assert got.unallocatable_groups == [summary.UnallocatableGroup(3000, W2K, 1)]
        # b's pings reach the other coordinator; a goes silent.
        two.worker_seen("b", T0 + 100)
        got = one.summary(T0 + 200)
        assert [w.worker for w in got.workers] == ["b"] and got.unallocatable == 2


def test_the_workers_a_coordinator_of_version_3_still_records_are_live_in_the_upgraded_store(
    store_url,
):
    # A rolling upgrade: a newer coordinator upgraded the store to version 4 while one of version
    # 3 goes on, recording the workers it serves in its own table, as its workers.record did:
    # an upsert keyed by (worker, spec). The newer one's summary (its metrics, status --jobs) saw
    # none of them once the carried-over rows aged out: "no worker is live", every ready job
    # unallocatable, while those workers took the jobs.
    job = rules.new_job(make_input(seed=9, miner=1234), T0)
    make_old_store(store_url, 3, job)  # worker "old" seen at T0, spec (1234,)
    later = T0 + 1000
    with JobStore.open(store_url) as s:
        s.allocate(AllocationSpec((5,)), 0, "new", later)  # a worker of the newer coordinator
        with s.engine.begin() as conn:  # the version-3 coordinator sees "old" again, and "old-2"
            for worker, spec in (("old", (1234,)), ("old-2", ())):
                key = summary.spec_key(AllocationSpec(spec))
                updated = conn.execute(
                    OLD_WORKERS.update()
                    .where(OLD_WORKERS.c.worker == worker, OLD_WORKERS.c.spec == key)
                    .values(last_seen=later)
                ).rowcount
                if not updated:
                    conn.execute(
                        OLD_WORKERS.insert().values(worker=worker, spec=key, last_seen=later)
                    )
        got = s.summary(later + 1)
        # One row per worker and spec: "old" is in both tables, carried over and seen again.
        assert [(w.worker, w.allowed_miners, w.last_seen) for w in got.workers] == [
            ("new", [5], later),
            ("old", [1234], later),
            ("old-2", [], later),
        ]
        assert (got.live_workers, got.unallocatable) == (3, 0)
        # Once that coordinator is gone, its workers age out like any other.
        assert [w.worker for w in s.summary(later + 1000).workers] == []
