"""The child runtime's inline path (capacity 1: the main thread proves) against the threaded one.

Each behaviour is checked on both paths: capacity 1 takes the inline path, capacity 2 the
threaded one, and a supervisor cannot tell them apart.
"""

from __future__ import annotations

import textwrap

import pytest
from damocles_ext_plugins.testing import echo_output
from helpers.child import Child, make_plugin_dist, window_task

from damocles_ext.protocol import dext

# Reports the name of the thread it proves on, then stays silent until cancelled.
WHEREAMI_PLUGIN = textwrap.dedent(
    """
    import threading
    from damocles_ext.hookspecs import hookimpl, ProverSpec
    from damocles_ext_plugins.testing import echo_output

    class WhereAmI:
        name = "whereami"
        stages = ("window_post",)

        def prove(self, task, progress, cancel):
            progress(threading.current_thread().name, 0, 1)
            if task.miner_id == 1:
                return echo_output(task)
            while not cancel.wait(600):
                pass
            cancel.check()

    @hookimpl
    def dext_provers():
        return [ProverSpec("whereami", ("window_post",), lambda options: WhereAmI())]
    """
)


@pytest.mark.parametrize(
    ("capacity", "threads"), [(1, {"MainThread"}), (2, {"prover-0", "prover-1"})]
)
def test_a_silent_proof_heartbeats_and_is_cancelled_on_either_path(tmp_path, capacity, threads):
    root = make_plugin_dist(
        tmp_path, dist="whereami-plugin", module="whereami_plugin", source=WHEREAMI_PLUGIN
    )
    extra = ["--capacity", str(capacity), "--heartbeat", "0.1"]
    with Child("window_post", "whereami", extra=extra, pythonpath=[root]) as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task(miner=1)))  # a quick one first
        assert child.next_of(dext.Response)[0] == dext.Response(
            1, output=echo_output(window_task(miner=1))
        )
        child.send_msg(dext.Request(2, window_task(miner=2)))
        # The prover reports once, then is silent: the heartbeat repeats its progress.
        # (With capacity 2, whichever of the two prover threads is free takes it.)
        frames = [child.next() for _ in range(4)]
        thread = frames[0].phase
        assert thread in threads, frames[0]
        assert all(f == dext.Progress(2, thread, 0, 1) for f in frames), frames
        child.send_msg(dext.Cancel(2))
        assert child.next_of(dext.Response)[0] == dext.Response(2, error="cancelled")
        # Requests sent together are each answered once by the free child.
        for i in range(3, 23):
            child.send_msg(dext.Request(i, window_task(miner=1, seed_byte=i)))
        answers = [child.next_of(dext.Response)[0] for _ in range(3, 23)]
        ids = [a.id for a in answers]
        # One thread answers in order; two answer each once, in whichever order they finish.
        assert (ids if capacity == 1 else sorted(ids)) == list(range(3, 23)), ids
        assert all(a.output == echo_output(window_task(1, a.id)) for a in answers)
        child.close_stdin()
        assert child.wait() == 0


@pytest.mark.parametrize("capacity", [1, 2])
def test_stdin_eof_ends_the_child_though_its_prover_ignores_the_cancel(capacity):
    # fail=hang never answers and ignores its cancel token.
    extra = ["--capacity", str(capacity)]
    with Child("window_post", "sleep", "fail=hang", extra=extra) as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task()))
        child.next_of(dext.Progress)
        child.close_stdin()
        assert child.wait() == 0
        assert "stdin closed: cancelling 1 request(s) in flight" in child.stderr
