"""The PoSt-day simulator: determinism, the capacity bound, hand-checked timelines, policies."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import replace

import pytest

from damocles_ext.cli import main
from damocles_ext.scheduling import policy, simulator
from damocles_ext.scheduling.simulator import (
    Scenario,
    SimJob,
    Uniform,
    Workload,
    capacity_bound,
    generate,
    max_missfree_load,
    run_workload,
    simulate,
)

WD, WIN = "window_post", "winning_post"

# One miner, one GPU, one deadline, fixed durations: every timeline below is worked out by hand.
# The window opens at 600 s (randomness known at 0), closes at 2400 s; proofs are due at 2100 s.
# The "partition" model: the durations given are the durations run (no per-GPU speed, no jitter).
TINY = Scenario(
    gpus=1,
    partitions=(3,),
    hours=0.5,
    vanilla=Uniform(60, 60),
    snark=Uniform(600, 600),
    snark_model="partition",
    winning_rate=0.0,
)


def wd_job(job_id: int, vanilla: float, snark: float, due: float = 2100.0) -> SimJob:
    return SimJob(job_id, WD, 0, 0, 0.0, due, vanilla, snark)


def test_same_seed_gives_identical_results_and_another_seed_differs():
    sc = Scenario(gpus=2, partitions=(2, 2), hours=3)
    assert simulate(sc) == simulate(sc)
    assert simulate(sc) != simulate(replace(sc, seed=2))


def test_more_partitions_keep_every_earlier_draw():
    small = {
        (j.miner, j.deadline_index, j.vanilla, j.gpu_work)
        for j in generate(Scenario(partitions=(2, 2), hours=2)).jobs
        if j.stage == WD
    }
    big = {
        (j.miner, j.deadline_index, j.vanilla, j.gpu_work)
        for j in generate(Scenario(partitions=(3, 2), hours=2)).jobs
        if j.stage == WD
    }
    assert small < big


def test_capacity_bound_on_hand_checkable_scenarios():
    one = replace(TINY, snark=Uniform(360, 360))
    # one deadline: GPU time from randomness (0 s) to due (2100 s) over 360 s per partition
    assert capacity_bound(one) == pytest.approx(2100 / 360)
    # two deadlines: their work is released from 0 s and due by 3900 s
    assert capacity_bound(replace(one, hours=1)) == pytest.approx(3900 / 720)
    # two colliding miners on two GPUs: twice the total load
    two = replace(one, gpus=2, partitions=(1, 1))
    assert capacity_bound(two) == pytest.approx(2 * 2100 / 360)
    # the mean of the distribution is what counts
    assert capacity_bound(replace(one, snark=Uniform(180, 540))) == pytest.approx(2100 / 360)


def wd_works(sc: Scenario) -> list[float]:
    return [j.gpu_work for j in generate(sc).jobs if j.stage == WD]


def test_snark_models_put_the_spread_where_it_comes_from():
    base = Scenario(gpus=4, partitions=(4, 4), hours=2, snark=Uniform(180, 540))
    # partition: every GPU has speed 1; the partitions' SNARK times spread over the range
    part = replace(base, snark_model="partition")
    assert part.gpu_speeds() == (1.0,) * 4
    assert min(wd_works(part)) < 250 and max(wd_works(part)) > 470
    # machine (the default): one speed for every GPU, drawn per seed; each partition's work within
    # the jitter of the mean (a GPU of speed v takes work / v seconds)
    assert base.snark_model == "machine" and base.snark_jitter == 0.05
    [speed] = set(base.gpu_speeds())
    assert 180 <= 360 / speed <= 540
    assert base.gpu_speeds() != replace(base, seed=2).gpu_speeds()
    assert all(360 * 0.95 <= w <= 360 * 1.05 for w in wd_works(base))
    assert max(wd_works(base)) - min(wd_works(base)) > 10
    assert all(w == 360 for w in wd_works(replace(base, snark_jitter=0.0)))
    # gpu: a speed per GPU, and a fifth GPU keeps the first four's
    mixed = replace(base, snark_model="gpu")
    assert len(set(mixed.gpu_speeds())) == 4
    assert replace(mixed, gpus=5).gpu_speeds()[:4] == mixed.gpu_speeds()
    assert replace(base, gpus=8).gpu_speeds()[:4] == base.gpu_speeds()  # the same machine
    assert all(180 <= 360 / v <= 540 for v in mixed.gpu_speeds())
    # the capacity bound counts the speeds (the sum of what the GPUs do per second)
    for sc in (base, mixed):
        assert capacity_bound(sc) == pytest.approx(capacity_bound(part) * sc.gpu_capacity() / 4)
    with pytest.raises(ValueError, match="snark_model must be one of machine, gpu, partition"):
        replace(base, snark_model="card").gpu_speeds()


@pytest.mark.parametrize("policy", sorted(simulator.POLICIES))
def test_a_gpu_of_speed_v_runs_a_snark_in_work_over_v(policy):
    # One machine drawn from 300-900 s: its speed v = 600 s / its draw. A job of 600 s of work
    # (the mean GPU's time) runs on it in 600 / v s after its 60 s vanilla phase.
    sc = replace(TINY, snark=Uniform(300, 900), snark_model="machine")
    [speed] = sc.gpu_speeds()
    assert speed != 1.0
    seen = Workload((wd_job(0, 60.0, 600.0),))
    run_workload(sc, seen, policy)
    assert seen.jobs[0].finish == pytest.approx(60 + 600 / speed, abs=1)


def test_progress_reports_count_the_gpus_speed():
    # The timeline of test_pipelined_scheduler_holds_a_job_for_the_gpu_that_frees_first on a
    # machine of speed v, each job's work scaled by v so that its times stay the same: the
    # scheduler's estimate of when wd0 frees comes from done/total, which must count v.
    two = replace(
        TINY, gpus=2, progress_interval=10.0, snark=Uniform(300, 900), snark_model="machine"
    )
    v = two.gpu_speeds()[0]
    assert abs(v - 1) > 0.3
    seen = Workload(
        (
            wd_job(0, 60, 900 * v),
            wd_job(1, 60, 300 * v),
            replace(wd_job(2, 60, 600 * v), release=400.0),
            replace(wd_job(3, 60, 1100 * v), release=500.0),
        )
    )
    r = run_workload(two, seen, "damocles-ext")
    assert seen.jobs[3].child == "wd0" and seen.jobs[3].start == pytest.approx(900, abs=1)
    assert r.wdpost_deadlines_missed == 0 and r.min_slack == pytest.approx(40, abs=1)


@pytest.mark.parametrize("policy", ["reference", "clairvoyant"])
def test_the_yardsticks_give_a_ready_snark_to_the_fastest_idle_gpu(policy):
    mixed = replace(TINY, gpus=2, snark=Uniform(300, 900), snark_model="gpu")
    speeds = mixed.gpu_speeds()
    fastest = speeds.index(max(speeds))
    assert fastest != 0 and max(speeds) > 1.2 * min(speeds)  # not the first GPU by index
    seen = Workload((wd_job(0, 60.0, 600.0),))
    run_workload(mixed, seen, policy)
    assert seen.jobs[0].child == f"wd{fastest}"
    assert seen.jobs[0].finish == pytest.approx(60 + 600 / max(speeds))


def test_the_report_measures_overload_against_the_gpus_speeds():
    sc = Scenario(gpus=2, partitions=(2, 2), hours=2, snark_model="gpu")
    assert sc.gpu_capacity() != pytest.approx(2)
    doc = simulator.report(sc, simulate(sc, ["reference"]))
    expected = simulator.realized_overload(generate(sc), sc.gpu_capacity())
    assert doc["realized_overload"] == round(expected, 4)


def test_winning_post_takes_its_own_gpu_time_on_any_machine():
    # WinningPoSt's 2-6 s are not scaled by the machine's WindowPoSt SNARK speed.
    sc = replace(TINY, snark=Uniform(300, 900), snark_model="machine")
    assert sc.gpu_speeds()[0] != pytest.approx(1)
    for name in ("damocles-ext", "reference", "damocles"):
        seen = Workload((SimJob(0, WIN, 0, -1, 100.0, 120.0, 0.0, 4.0),))
        run_workload(sc, seen, name)
        assert seen.jobs[0].finish == pytest.approx(104)


def test_scenario_refuses_values_that_make_no_sense():
    with pytest.raises(ValueError, match="snark_jitter must be at least 0 and below 1"):
        Scenario(snark_jitter=1.5)
    with pytest.raises(ValueError, match="snark's low end must be above 0"):
        Scenario(snark=Uniform(0, 0))


def test_one_child_per_gpu_runs_vanilla_and_snark_back_to_back():
    r = run_workload(TINY, generate(TINY), "damocles")
    # 0-60-660, 660-720-1320, 1320-1380-1980: the last proof is done 120 s before it is due
    assert (r.min_slack, r.wdpost_deadlines_missed) == (120, 0)
    assert r.gpu_busy_fraction == pytest.approx(1800 / 2400)


def test_scheduler_overlaps_one_proofs_vanilla_with_anothers_snark():
    r = run_workload(TINY, generate(TINY), "damocles-ext")
    # two proofs start together; the third's vanilla (660-720) runs under the second's SNARK:
    # SNARKs 60-660, 660-1260, 1260-1860
    assert (r.min_slack, r.wdpost_deadlines_missed) == (240, 0)


def test_winning_post_waits_behind_a_snark_on_a_shared_bellperson_lock():
    def workload():
        return Workload((wd_job(0, 60, 600), SimJob(1, WIN, 0, -1, 100.0, 120.0, 0.0, 4.0)))

    shared = run_workload(TINY, workload(), "damocles-c2")
    assert (shared.winning_missed, shared.winning_p99_latency) == (1, 564.0)  # 660 + 4 - 100
    for name in ("damocles", "damocles-ext"):
        timeshared = run_workload(TINY, workload(), name)
        # half the GPU while the SNARK runs: 8 s instead of 4
        assert (timeshared.winning_missed, timeshared.winning_p99_latency) == (0, 8.0), name


def test_with_the_gpu_lock_on_winning_post_waits_for_the_gpus_window_post_request():
    def workload():
        return Workload((wd_job(0, 60, 600), SimJob(1, WIN, 0, -1, 100.0, 120.0, 0.0, 4.0)))

    # "gpu:0" is held by the WindowPoSt request from its start to its end (0-660), vanilla phase
    # included: the WinningPoSt that arrives at 100 waits, and fails at its 20 s budget unstarted.
    seen = workload()
    locked = run_workload(TINY, seen, "damocles-ext-gpulock")
    assert locked.winning_missed == 1 and (seen.jobs[1].state, seen.jobs[1].start) == (
        "failed",
        None,
    )
    # (c) leaves the lock off (GpuLock = false): it time-shares the GPU, 8 s instead of 4.
    assert run_workload(TINY, workload(), "c").winning_p99_latency == 8.0
    two = replace(TINY, gpus=2)
    # With a second GPU whose lock is free, it goes there at once.
    free = run_workload(two, workload(), "cl")
    assert (free.winning_missed, free.winning_p99_latency) == (0, 4.0)


def test_damocles_drops_what_still_waits_when_the_window_closes():
    # One child (Concurrent=1): 0-60-960, 960-1020-1920, then the third waits for the slot until
    # 1920 and runs 1920-1980-2880. The window closes at 2400: a fourth request still waiting
    # then is dropped, never started, and the third runs on, late, to its end.
    jobs = Workload(tuple(wd_job(i, 60, 900) for i in range(4)))
    r = run_workload(TINY, jobs, "damocles")
    assert [j.state for j in jobs.jobs] == ["done", "done", "done", "failed"]
    assert jobs.jobs[2].finish == pytest.approx(2880) and jobs.jobs[3].start is None
    assert (r.wdpost_partitions_late, r.wdpost_partitions_abandoned) == (1, 1)


def test_damocles_gives_a_running_requests_slot_back_when_its_window_closes():
    # The first request runs past the close (2400) on the only child; its context ends then, so
    # the child's slot goes to the request waiting behind it (a later deadline's) while the first
    # still runs: both SNARKs share the child's bellperson lock, the second after the first.
    first = wd_job(0, 60, 2500)  # 60-2560
    second = replace(wd_job(1, 60, 300), deadline_index=1, release=1800.0, due=3900.0)
    jobs = Workload((first, second))
    run_workload(replace(TINY, hours=1.0), jobs, "damocles")
    assert second.start == pytest.approx(2400)  # not 2560, when the first ends
    assert first.finish == pytest.approx(2560) and second.finish == pytest.approx(2860)


def test_scheduler_gives_up_on_hopeless_work_instead_of_holding_the_gpu():
    jobs = Workload(tuple(wd_job(i, 60, 900) for i in range(3)))
    late = run_workload(TINY, jobs, "damocles-ext")
    # 60-960, 960-1860, then 1860+900 > 2100: cancelled at the deadline, not run to 2760
    assert (late.wdpost_partitions_abandoned, late.wdpost_deadlines_missed) == (1, 1)
    assert late.min_slack is None
    baseline = run_workload(TINY, Workload(tuple(wd_job(i, 60, 900) for i in range(3))), "damocles")
    assert baseline.wdpost_partitions_late == 1 and baseline.wdpost_partitions_abandoned == 0


def test_pipelined_scheduler_holds_a_job_for_the_gpu_that_frees_first():
    two = replace(TINY, gpus=2, progress_interval=10.0)

    def workload():
        # j0 and j1 start at once (SNARKs 60-960 on wd0, 60-360 on wd1); j2 takes idle wd1 at
        # 400 (SNARK 460-1060); j3 arrives at 500, when both GPUs are busy.
        return Workload(
            (
                wd_job(0, 60, 900),
                wd_job(1, 60, 300),
                replace(wd_job(2, 60, 600), release=400.0),
                replace(wd_job(3, 60, 1100), release=500.0),
            )
        )

    blind = workload()
    r0 = run_workload(two, blind, "damocles-ext-nophase")
    # Without phase reports j3 takes wd1's free slot at once and waits behind j2's SNARK:
    # 1060 + 1100 > 2100, cancelled at the deadline.
    assert blind.jobs[3].child == "wd1" and r0.wdpost_deadlines_missed == 1
    seen = workload()
    r = run_workload(two, seen, "damocles-ext")
    # With them it waits until a vanilla phase (60 s) before wd0 frees (960), goes there, and its
    # SNARK runs 960-2060: 40 s to spare (within the 1/1000 resolution of the progress reports).
    assert seen.jobs[3].child == "wd0" and seen.jobs[3].start == pytest.approx(900, abs=1)
    assert r.wdpost_deadlines_missed == 0 and r.min_slack == pytest.approx(40, abs=1)


def test_realized_bound_uses_the_drawn_work():
    fixed = replace(TINY, snark=Uniform(360, 360), partitions=(1,))
    # fixed durations: the draws are the mean, 2100 s / 360 s per partition = 5.83 -> 5
    assert simulator.realized_capacity_bound(fixed) == 5
    for model in simulator.SNARK_MODELS:
        sc = Scenario(gpus=4, partitions=(1,) * 4, hours=6, snark_model=model)
        realized = simulator.realized_capacity_bound(sc)
        capacity = sc.gpu_capacity()
        draws = generate(sc.with_total_partitions(realized + 1))
        assert simulator.realized_overload(draws, capacity) > 1
        at = generate(sc.with_total_partitions(realized))
        assert simulator.realized_overload(at, capacity) <= 1


def test_bisection_finds_the_highest_missfree_load_of_each_policy():
    sc = replace(TINY, snark=Uniform(360, 360), vanilla=Uniform(120, 120), partitions=(1,))
    # damocles: 480 s per proof, 4 fit in 2100 s. Scheduler: 120 + 5 * 360 = 1920 <= 2100.
    assert max_missfree_load(sc, "damocles") == 4
    assert max_missfree_load(sc, "damocles-ext") == 5
    assert max_missfree_load(sc, "reference") == 5
    assert 5 / capacity_bound(sc) == pytest.approx(5 * 360 / 2100)


def test_clairvoyant_packs_longest_first_where_the_reference_misses():
    # Two GPUs, one deadline due at 2100 s, vanilla 60 s each, SNARKs 500 s x 4 and one of 1050 s.
    two = replace(TINY, gpus=2, partitions=(5,))
    snarks = (500.0, 500.0, 500.0, 500.0, 1050.0)

    def workload() -> Workload:
        return Workload(tuple(wd_job(i, 60.0, s) for i, s in enumerate(snarks)))

    # reference (EDF, then job order): each GPU runs 500 + 500 (60-1060), then the long SNARK
    # runs 1060-2110: 10 s late
    ref = run_workload(two, workload(), "reference")
    assert ref.wdpost_deadlines_missed == 1
    seen = workload()
    clair = run_workload(two, seen, "clairvoyant")
    # clairvoyant: the long SNARK first (60-1110) beside 500 + 500 (60-1060), then one 500 on
    # each GPU: 1060-1560 and 1110-1610, 490 s to spare
    assert clair.wdpost_deadlines_missed == 0
    assert seen.jobs[4].finish == pytest.approx(1110)
    assert clair.min_slack == pytest.approx(490)


def test_split_runs_vanilla_steps_in_the_pool_and_snarks_back_to_back():
    # One GPU: a vanilla pool of VANILLA_SLOTS_PER_GPU (4) slots and one SNARK child.
    assert simulator.VANILLA_SLOTS_PER_GPU == 4
    one = replace(TINY, partitions=(6,))
    seen = Workload(tuple(wd_job(i, 60.0, 300.0) for i in range(6)))
    r = run_workload(one, seen, "cs")
    # Vanilla steps: four at 0-60, then two at 60-120. SNARKs back to back from 60: the sixth
    # ends at 60 + 6 * 300 = 1860, 240 s before the 2100 s due time.
    assert [j.start for j in seen.jobs] == [0, 0, 0, 0, 60, 60]
    assert [j.finish for j in seen.jobs] == [360, 660, 960, 1260, 1560, 1860]
    assert {j.child for j in seen.jobs} == {"wd0"}
    assert r.wdpost_deadlines_missed == 0 and r.min_slack == pytest.approx(240)


def test_scheduler_beats_damocles_on_colliding_windows():
    sc = Scenario(gpus=2, partitions=(3, 3), hours=4, offsets="colliding", snark=Uniform(360, 360))
    results = simulate(sc)
    assert results["damocles"].missed > 0
    assert results["damocles-ext"].missed == 0
    assert results["damocles-c2"].winning_missed > 0


def test_simulator_drives_the_supervisors_scheduler():
    assert simulator.Scheduler is policy.Scheduler


def test_simulate_command_prints_json(capsys):
    assert (
        main(
            [
                "simulate",
                "--miners",
                "2",
                "--gpus",
                "2",
                "--hours",
                "2",
                "--json",
                "--policies",
                "a,c,c0,cs,reference,clairvoyant",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["results"]) == {
        "damocles",
        "damocles-ext",
        "damocles-ext-nophase",
        "damocles-ext-split",
        "reference",
        "clairvoyant",
    }
    assert doc["scenario"]["miners"] == 2 and doc["capacity_bound_partitions"] > 0


def test_a_span_simulated_as_whole_deadlines_says_so(capsys):
    # 8.6 s was shown as "0.0024 h" and simulated as a whole deadline per miner, WinningPoSts
    # drawn over its half hour, without a word.
    argv = ["simulate", "--miners", "1", "--gpus", "1", "--policies", "c"]
    assert main([*argv, "--days", "0.0001"]) == 0
    assert "0.0024 h (simulated as 1 whole deadline per miner: 0.5 h)" in capsys.readouterr().out
    assert main([*argv, "--hours", "1"]) == 0
    assert ", 1 h, seed " in capsys.readouterr().out


def test_a_day_without_window_post_shows_no_slack_rather_than_abandoned_partitions(capsys):
    # --partitions 0 (WinningPoSt only) showed "abandoned" as the WindowPoSt slack: a partition
    # that never ran, when there was none to run.
    argv = ["simulate", "--miners", "1", "--gpus", "1", "--hours", "1", "--policies", "c"]
    assert main([*argv, "--partitions", "0"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:2] == ["damocles-ext", "0/0"] and row[5:7] == ["-", "-"], row
    assert "abandoned" not in " ".join(row)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--snark", "9m-3m"], "--snark: the low end 540s is above the high end 180s"),
        # A negative duration was said to be "'' is not a duration".
        (["--snark", "-1"], "--snark: '-1' is not LOW-HIGH (for example 3m-9m) or one duration"),
        (["--vanilla", "3m-"], "--vanilla: '3m-' is not LOW-HIGH"),
        (["--vanilla", "soon"], "--vanilla: 'soon' is not a duration"),
        (["--policies", "a,z"], "--policies: unknown policy 'z'"),
        (["--offsets", "0,5m"], "--offsets gives 2 offsets but --miners is 4"),
        (["--submit-margin", "40m"], "leaves no time"),
        (["--progress-interval", "often"], "--progress-interval: 'often' is not a duration"),
        (["--snark-model", "card"], "--snark-model: 'card' is not one of machine, gpu, partition"),
        (["--snark-jitter", "1.5"], "--snark-jitter must be at least 0 and below 1"),
        (["--snark-jitter", "nan"], "--snark-jitter must be at least 0 and below 1"),
        (["--snark-model", "partition", "--snark-jitter", "0.1"], "applies to the machine and gpu"),
        (["--snark", "0-0"], "--snark: a SNARK takes time; the low end must be above 0"),
        (["--snark", "0-3m", "--snark-model", "partition"], "the low end must be above 0"),
        # Not finite: inf WinningPoSt an hour ran for ever filling memory, nan meant none.
        (["--winning-rate", "nan"], "--winning-rate must be a finite number, got nan"),
        (["--hours", "nan"], "--hours must be a finite number, got nan"),
        (["--hours=-inf"], "--hours must be a finite number, got -inf"),
        (["--days", "inf"], "--days must be a finite number, got inf"),
        (["--days", "nan"], "--days must be a finite number, got nan"),
        (["--snark-jitter", "inf"], "--snark-jitter must be at least 0 and below 1"),
        (["--submit-margin", "9" * 400], "--submit-margin: '999"),
        (["--snark", "1m-" + "9" * 400], "is too long a duration"),
        (["--vanilla", "9" * 400 + "m"], "is too long a duration"),
        (["--winning", "9" * 400], "is too long a duration"),
        (["--progress-interval", "9" * 400], "is too long a duration"),
        (["--offsets", "0,0,0,1e300"], "--offsets: '1e300' is not a duration"),
        # A negative offset is a list with a bad element, not a word it does not know.
        (["--offsets=-100,0,0,0"], "--offsets: '-100' is not a duration"),
        (["--offsets", "bogus"], "--offsets: 'bogus' is neither 'colliding', 'spread' nor a"),
        # A billion miners ran for ever, on its way to MemoryError.
        (["--miners", "999999999"], "--miners is limited to 1000 (one machine's), got 999999999"),
        (["--gpus", "1001"], "--gpus is limited to 1000"),
        (["--partitions", "10000000"], "--partitions is limited to 1000, got 10000000"),
    ],
)
def test_simulate_command_rejects_bad_options_with_exit_2(capsys, argv, message):
    assert main(["simulate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--winning-rate", "inf"], "--winning-rate must be a finite number, got inf"),
        (["--winning-rate", "1e9"], "--winning-rate 1e+09 is more than one WinningPoSt per"),
        (["--offsets", "0,0,0,99999999"], "not within the 24-hour proving period"),
        (["--progress-interval", "0.001"], "give 0 (only when a SNARK starts) or at least 1s"),
    ],
)
def test_simulate_command_refuses_options_that_would_never_finish(argv, message):
    # In a process of its own, memory-capped and timed: these ran for ever (the first two
    # filling memory with WinningPoSt requests), which must fail this test, not the machine.
    result = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "simulate", *argv],
        capture_output=True,
        timeout=60,
        preexec_fn=_limit_memory,
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err[-2000:]
    assert message in err and "Traceback" not in err
