"""The restart rules (supervisor/restart.py), driven as the pure policy they are."""

from __future__ import annotations

import random

import pytest

from damocles_ext.supervisor.restart import BackoffPolicy, GiveUp, Restart, RestartTracker


def test_failed_starts_back_off_1_2_4_8_with_jitter_then_fatal_on_the_fifth():
    rng = random.Random(7)
    expected_jitter = random.Random(7)
    tracker = RestartTracker(BackoffPolicy(), rng=rng)
    delays = []
    for n in range(4):
        decision = tracker.start_failed(f"failure {n}")
        assert isinstance(decision, Restart)
        delays.append(decision.delay)
    nominal = [1.0, 2.0, 4.0, 8.0]
    assert delays == [d * (1 - 0.2 * expected_jitter.random()) for d in nominal]
    for d, n in zip(delays, nominal, strict=True):
        assert 0.8 * n <= d <= n
    fatal = tracker.start_failed("failure 4")
    assert isinstance(fatal, GiveUp) and fatal.fatal
    assert "5 failed starts in a row" in fatal.reason and "failure 4" in fatal.reason


def test_same_seed_gives_the_same_sequence_and_another_seed_does_not():
    def sequence(seed: int) -> list[float]:
        t = RestartTracker(BackoffPolicy(max_failed_starts=100), rng=random.Random(seed))
        return [t.start_failed("x").delay for _ in range(6)]  # type: ignore[union-attr]

    assert sequence(1) == sequence(1)
    assert sequence(1) != sequence(2)


def test_delay_doubles_up_to_the_cap_and_stays_there():
    tracker = RestartTracker(BackoffPolicy(jitter=0.0, max_failed_starts=100), rng=random.Random(0))
    delays = []
    for _ in range(10):
        tracker.ready(0.0)  # crashes after a short ready period, unproductive: not a failed start
        decision = tracker.exited(1.0, "crash", served=False)
        assert isinstance(decision, Restart)
        delays.append(decision.delay)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]


def test_sixty_seconds_of_ready_resets_the_sequence():
    tracker = RestartTracker(BackoffPolicy(jitter=0.0, max_failed_starts=100), rng=random.Random(0))
    for _ in range(4):
        tracker.ready(0.0)
        tracker.exited(1.0, "crash", served=False)
    tracker.ready(100.0)
    short = tracker.exited(159.0, "crash", served=False)  # 59 s ready: keeps doubling
    assert isinstance(short, Restart) and short.delay == 16
    tracker.ready(200.0)
    stable = tracker.exited(260.0, "crash", served=False)  # 60 s ready: back to the start
    assert isinstance(stable, Restart) and stable.delay == 1


def test_a_successful_start_resets_the_failed_start_count():
    tracker = RestartTracker(BackoffPolicy(), rng=random.Random(0))
    for _ in range(4):
        assert isinstance(tracker.start_failed("x"), Restart)
    tracker.ready(0.0)
    for _ in range(4):
        assert isinstance(tracker.start_failed("x"), Restart)
    assert isinstance(tracker.start_failed("x"), GiveUp)


def test_auto_restart_off_gives_up_without_fatal():
    tracker = RestartTracker(auto_restart=False)
    decision = tracker.start_failed("bad ready line")
    assert isinstance(decision, GiveUp) and not decision.fatal
    assert "AutoRestart is off" in decision.reason
    tracker.ready(0.0)
    assert isinstance(tracker.exited(1.0, "crash", served=True), GiveUp)


def test_a_run_that_answered_restarts_after_the_base_delay_however_often_it_crashes():
    rng = random.Random(3)
    tracker = RestartTracker(BackoffPolicy(), rng=rng)
    now = 0.0
    for _ in range(50):  # SIGKILLed every 0.3 s while proving: never stable, always productive
        tracker.ready(now)
        decision = tracker.exited(now + 0.3, "killed by SIGKILL", served=True)
        assert isinstance(decision, Restart)
        assert 0.8 <= decision.delay <= 1.0  # the base delay (with its jitter), never more
        now += 0.3 + decision.delay
    assert tracker.restarts == 50


def test_a_productive_run_ends_a_backoff_and_unproductive_runs_start_it_again():
    tracker = RestartTracker(BackoffPolicy(jitter=0.0), rng=random.Random(0))
    for expected in (1, 2, 4):  # ready, then died before answering anything
        tracker.ready(0.0)
        assert tracker.exited(1.0, "crash", served=False) == Restart(expected, "crash")
    tracker.ready(10.0)
    assert tracker.exited(11.0, "crash", served=True) == Restart(1, "crash")
    # Back to the start of the sequence: the next unproductive exit waits 2 s, not 16 s.
    tracker.ready(20.0)
    assert tracker.exited(21.0, "crash", served=False) == Restart(2, "crash")


def test_failed_starts_after_a_productive_run_still_back_off_then_go_fatal():
    tracker = RestartTracker(BackoffPolicy(jitter=0.0), rng=random.Random(0))
    tracker.ready(0.0)
    assert tracker.exited(1.0, "crash", served=True) == Restart(1, "crash")
    delays = [tracker.start_failed("bad binary") for _ in range(4)]
    assert [d.delay for d in delays if isinstance(d, Restart)] == [2, 4, 8, 16]
    fatal = tracker.start_failed("bad binary")
    assert isinstance(fatal, GiveUp) and fatal.fatal


def test_by_default_fatal_is_final():
    tracker = RestartTracker(BackoffPolicy(), rng=random.Random(0))
    for _ in range(4):
        tracker.start_failed("CUDA driver not loaded")
    fatal = tracker.start_failed("CUDA driver not loaded")
    assert isinstance(fatal, GiveUp) and fatal.fatal and fatal.retry_in is None
    assert "not restarting" in fatal.reason


def test_with_retry_fatal_a_fatal_child_is_tried_again_at_the_cap_until_it_starts():
    rng = random.Random(7)
    tracker = RestartTracker(BackoffPolicy(retry_fatal=True), rng=rng)
    delays = [tracker.start_failed("CUDA driver not loaded") for _ in range(4)]
    assert all(isinstance(d, Restart) for d in delays)  # 1, 2, 4, 8 s as before
    # FATAL after the 5th, then every failed retry is FATAL again, tried once more ~60 s later
    # (jittered, never above the cap), not the whole 1, 2, 4, 8 s sequence again.
    for n in range(5, 20):
        fatal = tracker.start_failed("CUDA driver not loaded")
        assert isinstance(fatal, GiveUp) and fatal.fatal
        assert fatal.retry_in is not None and 48.0 <= fatal.retry_in <= 60.0
        assert f"FATAL: {n} failed starts in a row (last: CUDA driver not loaded)" in fatal.reason
        assert "trying again every 60s" in fatal.reason
    assert tracker.restarts == 4 + 15
    # The driver is loaded: the retry starts, and the child serves and restarts as any other.
    tracker.ready(1000.0)
    decision = tracker.exited(1001.0, "killed by SIGKILL", served=True)
    assert isinstance(decision, Restart) and 0.8 <= decision.delay <= 1.0


def test_with_retry_fatal_a_child_that_keeps_exiting_after_ready_is_retried_at_the_cap():
    tracker = RestartTracker(BackoffPolicy(retry_fatal=True, jitter=0.0), rng=random.Random(0))
    for _ in range(4):
        tracker.ready(0.0)
        assert isinstance(tracker.exited(1.0, "crash", served=False), Restart)
    tracker.ready(0.0)
    fatal = tracker.exited(1.0, "crash", served=False)
    assert isinstance(fatal, GiveUp) and fatal.fatal and fatal.retry_in == 60.0


def test_with_retry_fatal_a_refusal_in_a_one_shot_command_is_still_final():
    policy = BackoffPolicy(retry_fatal=True, give_up_when_refused=True)
    fatal = RestartTracker(policy).start_failed("exited (code 2)", refused=True)
    assert isinstance(fatal, GiveUp) and fatal.fatal and fatal.retry_in is None


def test_with_auto_restart_off_nothing_is_retried():
    tracker = RestartTracker(
        BackoffPolicy(retry_fatal=True, max_failed_starts=1), auto_restart=False
    )
    decision = tracker.start_failed("CUDA driver not loaded")
    assert isinstance(decision, GiveUp) and decision.retry_in is None


@pytest.mark.parametrize(
    "argv",
    [["run", "-c", "x.cfg"], ["serve", "-c", "x.cfg", "window_post"], ["worker", "-c", "x.cfg"]],
    ids=lambda argv: argv[0],
)
def test_the_long_running_commands_retry_fatal_children_at_the_restart_cap(argv):
    from damocles_ext.cli import build_parser
    from damocles_ext.commands.common import supervisor_options
    from damocles_ext.commands.serve import check_supervising_options

    def policy(*extra: str) -> BackoffPolicy:
        args = build_parser().parse_args([*argv, *extra])
        if args.command == "serve":
            check_supervising_options(args)  # fills in the defaults, as the command does
        return supervisor_options(args, plugin_manager=object())["backoff"]  # type: ignore[arg-type]

    assert policy().retry_fatal and policy().cap == 60.0
    assert policy("--restart-max-delay", "300").cap == 300.0
