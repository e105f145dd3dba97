"""When a running job counts as silent (jobs/silence.py, sans-IO): only the time a coordinator
could hear heartbeats counts: not before it served, not while its store was unavailable to it or
stalled, not in a step of its wall clock."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from damocles_ext.jobs.silence import SLOW_CALL, Hearing

T0 = 1_700_000_000.0


def test_before_a_timeout_was_heard_nothing_is_silent():
    hearing = Hearing(T0)
    assert hearing.silent_before(T0 + 10, 15) == -math.inf
    assert hearing.silent_before(T0 + 20, 15) == T0 + 5


def test_an_outage_is_unheard_from_its_first_failure_to_the_first_answer_after_it():
    hearing = Hearing(T0)
    hearing.call_failed(T0 + 100)
    hearing.call_failed(T0 + 90)  # a call begun earlier failed later: the outage began then
    # While down, the time since it began is unheard too: [T0 + 75, T0 + 90] is the last heard.
    assert hearing.silent_before(T0 + 200, 15) == T0 + 75
    hearing.call_answered(T0 + 80, T0 + 81)  # begun before the outage: proves nothing
    assert hearing.silent_before(T0 + 200, 15) == T0 + 75  # still down
    hearing.call_answered(T0 + 130, T0 + 130.1)
    # 5 s heard after the outage, 10 s more before it.
    assert hearing.silent_before(T0 + 135, 15) == T0 + 80


def test_a_slow_answer_and_a_step_of_the_clock_are_unheard():
    hearing = Hearing(T0)
    hearing.call_answered(T0 + 100, T0 + 100 + SLOW_CALL + 30)  # stalled 35 s
    assert hearing.silent_before(T0 + 140, 15) == T0 + 90  # 5 s after it, 10 s before
    hearing.deaf(T0 + 150, T0 + 210)  # the clock stepped a minute forward
    assert hearing.silent_before(T0 + 215, 15) == T0 + 140


def test_a_call_is_slow_by_the_clock_that_does_not_step():
    hearing = Hearing(T0)
    # The wall clock stepped 16 s while a quick call was in flight: the step is the clock
    # watch's to tell (when it is on), not a stalled store's.
    hearing.call_answered(T0 + 100, T0 + 116, took=0.01)
    assert hearing.silent_before(T0 + 130, 15) == T0 + 115
    # A stall, though the wall clock says 1 s (it was set back meanwhile): unheard all the same.
    hearing.call_answered(T0 + 200, T0 + 201, took=SLOW_CALL + 1)
    assert hearing.silent_before(T0 + 215, 15) == T0 + 199  # 14 s after it, 1 s before


def test_a_write_refused_is_an_outage_that_only_an_answered_write_ends():
    # A full disk: heartbeats are refused, reads (a sweep with nothing to change) answered.
    hearing = Hearing(T0)
    hearing.call_failed(T0 + 100, write_refused=True)
    for k in range(1, 10):
        hearing.call_answered(T0 + 100 + 5 * k, T0 + 100 + 5 * k, wrote=False)
        hearing.call_failed(T0 + 102 + 5 * k, write_refused=True)
    assert hearing.writes_down
    assert hearing.silent_before(T0 + 160, 15) == T0 + 85  # unheard since the first refusal
    hearing.call_answered(T0 + 170, T0 + 170.1)  # a write landed: heard from then on
    assert not hearing.writes_down
    assert hearing.silent_before(T0 + 175, 15) == T0 + 90


def test_a_read_answered_ends_an_outage_in_which_no_write_was_refused():
    hearing = Hearing(T0)
    hearing.call_failed(T0 + 100)  # unreachable, locked: reads fail as well
    hearing.call_answered(T0 + 110, T0 + 110.1, wrote=False)
    assert hearing.silent_before(T0 + 120, 15) == T0 + 95


def test_failures_that_keep_coming_delay_a_silent_job_by_their_length_only():
    # A store that fails a moment every 10 s, for ever: a dead worker's job is still silent
    # once 15 s were heard since its last heartbeat.
    hearing = Hearing(T0)
    for k in range(1, 100):
        hearing.call_failed(T0 + 10 * k)
        hearing.call_answered(T0 + 10 * k + 1, T0 + 10 * k + 1.01)
    now = T0 + 1000
    assert now - 20 < hearing.silent_before(now, 15) < now - 15


@given(
    st.lists(
        st.tuples(st.floats(0, 1000), st.floats(0, 100)).map(lambda p: (T0 + p[0], p[1])),
        max_size=30,
    ),
    st.floats(1, 100),
    st.floats(0, 2000),
)
def test_silent_before_leaves_exactly_a_timeout_heard_after_it(spans, timeout, later):
    hearing = Hearing(T0)
    for start, length in spans:
        hearing.deaf(start, start + length)
    now = T0 + later
    found = hearing.silent_before(now, timeout)

    def heard(a: float, b: float) -> float:  # the heard measure of [a, b], sampled finely
        step = 0.01
        points = [a + step * (i + 0.5) for i in range(int((b - a) / step))]
        deaf = [(s, s + n) for s, n in spans]
        return step * sum(1 for t in points if t >= T0 and not any(s <= t < e for s, e in deaf))

    if found == -math.inf:
        assert heard(T0, now) <= timeout + 0.05
    else:
        assert T0 <= found <= now - timeout
        assert abs(heard(found, now) - timeout) < 0.05
