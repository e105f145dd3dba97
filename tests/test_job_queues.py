"""The stages' job queues (scheduling/queues.py): their two lanes give the order one sorted list
of every job gives, whatever is pushed, removed or popped."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from damocles_ext.scheduling.decisions import Job
from damocles_ext.scheduling.queues import FRESH, RETRY, JobQueues

STAGES = ("window_post", "winning_post")

push = st.tuples(
    st.just("push"),
    st.sampled_from(STAGES),
    st.none() | st.sampled_from([5.0, 10.0, 20.0]),  # deadline
    st.sampled_from([0, 0, 0, 1, -1]),  # priority
    st.sampled_from([FRESH, FRESH, RETRY]),
    st.sampled_from([0.0, 0.0, 1.0, -1.0]),  # arrival step: mostly on, sometimes back
)
remove = st.tuples(st.just("remove"), st.integers(0, 40))
pop = st.tuples(st.just("pop"), st.sampled_from(STAGES))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(push, push, remove, pop), max_size=80))
def test_the_two_lanes_give_the_order_of_one_sorted_list(ops):
    queues = JobQueues()
    expected: dict[int, tuple[tuple, int, Job]] = {}  # request id -> (key, push order, job)
    arrival, rid, order = 100.0, 0, 0
    for op in ops:
        if op[0] == "push":
            _, stage, deadline, priority, tier, step = op
            rid += 1
            arrival += step
            job = Job(rid, stage, arrival, deadline, priority)
            queues.push(job, tier)
            key = (math.inf if deadline is None else deadline, -priority, tier, arrival)
            expected[rid] = (key, order, job)
            order += 1
        elif op[0] == "remove":
            removed = queues.remove(op[1])
            assert removed == (expected.pop(op[1])[2] if op[1] in expected else None)
        else:
            stage = op[1]
            if head := queues.peek(queues.stages[stage]) if stage in queues.stages else None:
                queues.pop(queues.stages[stage], head)
                expected.pop(head.request_id)
        for stage in STAGES:
            mine = sorted(v for v in expected.values() if v[2].stage == stage)
            head = queues.peek(queues.stages[stage]) if stage in queues.stages else None
            assert head == (mine[0][2] if mine else None)
            assert queues.length.get(stage, 0) == len(mine)
        assert queues.with_deadline == sum(v[2].deadline is not None for v in expected.values())
        assert set(queues.queued) == set(expected)
