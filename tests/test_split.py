"""Split WindowPoSt: a vanilla step and a SNARK step on different children.

Real children throughout: the reference provers (`python-ref`, `native`) and the test provers,
spawned by the supervisor from a config with [[WdPostVanilla]] and [[WdPostSnark]] tables.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import write_config
from helpers.post import sectors, sectors_with_a_short_one
from helpers.scheduling import Gate, child_log, gated, submit_in_order
from helpers.supervisor import (
    BAD_VANILLA,
    builtin_child,
    cancel_once_running,
    child_stats,
    dext_child,
    one_bad_vanilla_child,
    spec,
    wait_until,
    wait_until_real,
    window_task,
)

from damocles_ext.api import open_supervisor
from damocles_ext.config import ConfigError, load_config, parse_config
from damocles_ext.errors import ProverError
from damocles_ext.post import VerifyError, reference, split
from damocles_ext.post.fixtures import window_task as fixture_task
from damocles_ext.post.verify import verify
from damocles_ext.protocol import dext
from damocles_ext.supervisor.connection import ChildConnection, ChildProtocolError
from damocles_ext.tasks import (
    WindowPoStOutput,
    WindowPoStSnarkOutput,
    WindowPoStVanilla,
    WindowPoStVanillaOutput,
    join_window_post,
    snark_task,
    split_window_post,
)

VAN, SNARK = "window_post_vanilla", "window_post_snark"
SEED = bytes(range(32))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return sectors(tmp_path_factory.mktemp("s"), "StackedDrgWindow2KiBV1_2", 3, random_seed=5)


# -- the steps, in process -----------------------------------------------------------------------


def test_split_steps_of_the_reference_prover_give_the_whole_proofs_bytes(manifest):
    task = fixture_task(manifest, SEED)
    vanilla = split.vanilla_step(reference.window_post, split_window_post(task))
    snark = split.snark_step(verify, snark_task(task, vanilla))
    joined = join_window_post(vanilla, snark)
    assert joined == reference.window_post(task)
    verify(task, joined)


def test_the_snark_step_refuses_vanilla_proofs_that_do_not_prove_the_task(manifest):
    task = fixture_task(manifest, SEED)
    vanilla = split.vanilla_step(reference.window_post, split_window_post(task))
    proof = bytearray(vanilla.vanilla_proofs[0])
    proof[-1] ^= 1  # one bit of one Merkle path
    bad = WindowPoStVanillaOutput(vanilla_proofs=[bytes(proof)], faults=[])
    with pytest.raises(VerifyError, match="the vanilla proofs do not prove the task"):
        split.snark_step(verify, snark_task(task, bad))
    other_seed = fixture_task(manifest, bytes(32))  # proofs of another challenge
    with pytest.raises(VerifyError):
        split.snark_step(verify, snark_task(other_seed, vanilla))


def test_the_snark_step_stops_when_its_request_is_cancelled(manifest):
    from damocles_ext.hookspecs import CancelToken
    from damocles_ext.post import PoStCancelled

    task = fixture_task(manifest, SEED)
    step = snark_task(task, split.vanilla_step(reference.window_post, split_window_post(task)))
    cancel = CancelToken()
    cancel.cancel("deadline")
    with pytest.raises(PoStCancelled, match="cancelled before the SNARK step"):
        split.snark_step(verify, step, cancel=cancel)
    # cancelled while the proofs are checked: no answer is made
    late = CancelToken()

    def verify_then_cancel(t, out):
        verify(t, out)
        late.cancel("deadline")

    with pytest.raises(PoStCancelled, match="cancelled after checking the vanilla proofs"):
        split.snark_step(verify_then_cancel, step, cancel=late)
    assert split.snark_step(verify, step, cancel=CancelToken()).proofs


# -- config ---------------------------------------------------------------------------------------


SPLIT_CFG = """
[[WdPostVanilla]]
Plugin = "python-ref"
Concurrent = 4

[[WdPostSnark]]
Plugin = "native"
Gpus = [0, 1]
"""


def test_split_tables_expand_to_vanilla_and_per_gpu_snark_children(tmp_path):
    config = parse_config(SPLIT_CFG, "split.cfg", tmp_root="/tmp/dx")
    by_name = {c.name: c for c in config.children}
    assert sorted(by_name) == [f"{SNARK}#0", f"{SNARK}#1", f"{VAN}#0"]
    assert by_name[f"{VAN}#0"].concurrent == 4 and by_name[f"{VAN}#0"].locks == ()
    assert by_name[f"{SNARK}#1"].envs["CUDA_VISIBLE_DEVICES"] == "1"
    assert by_name[f"{SNARK}#1"].locks == ("gpu:1",)
    assert by_name[f"{SNARK}#0"].argv[3:6] == ("child", SNARK, "--plugin")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[WdPostVanilla]]\nPlugin = "native"\n',
            "[[WdPostVanilla]] without [[WdPostSnark]]",
        ),
        (
            '[[WdPostSnark]]\nPlugin = "native"\n',
            "[[WdPostSnark]] without [[WdPostVanilla]]",
        ),
        (  # an empty array of tables starts no child: as good as absent
            'WdPostSnark = []\n[[WdPostVanilla]]\nPlugin = "native"\n',
            "[[WdPostVanilla]] without [[WdPostSnark]]",
        ),
        (
            SPLIT_CFG + '[[WdPost]]\nPlugin = "native"\n',
            "[[WdPost]] and [[WdPostVanilla]]/[[WdPostSnark]] both serve window_post",
        ),
        (
            '[[WdPostVanilla]]\n[[WdPostSnark]]\nPlugin = "native"\n',
            "WdPostVanilla[0]: no Plugin or Bin; damocles-worker has no split WindowPoSt steps",
        ),
        (
            (
                '[[WdPostVanilla]]\nBin = "prover"\nProtocol = "jsonl"\n'
                '[[WdPostSnark]]\nPlugin = "native"\n'
            ),
            'WdPostVanilla[0].Protocol: "jsonl" cannot carry a split WindowPoSt step',
        ),
    ],
)
def test_split_config_mistakes_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError) as excinfo:
        load_config(write_config(tmp_path, text))
    assert message in str(excinfo.value)


def test_check_config_shows_the_split_tables(tmp_path):
    path = write_config(tmp_path, SPLIT_CFG)
    out = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f"{VAN}#0" in out.stdout and "(WdPostVanilla[0])" in out.stdout
    assert "(WdPostSnark[0])" in out.stdout and "CUDA_VISIBLE_DEVICES=1" in out.stdout


def test_a_json_lines_child_cannot_serve_a_split_step():
    out = subprocess.run(
        builtin_child(VAN, "echo", protocol="jsonl"), capture_output=True, text=True, check=False
    )
    assert out.returncode == 2
    assert "a split WindowPoSt step needs --protocol dext" in out.stderr
    conn = ChildConnection(SNARK, "auto", "snark#0")
    with pytest.raises(ChildProtocolError, match="cannot carry window_post_snark"):
        conn.receive_data(b'{"ready": true}\n')


# -- through the supervisor -------------------------------------------------------------------------


async def test_a_split_window_post_answers_the_whole_proof_through_real_children(manifest):
    children = [
        spec([*builtin_child(VAN, "python-ref"), "--capacity", "2"], stage=VAN, concurrent=2),
        spec(builtin_child(SNARK, "native", "gpu_lock=false"), stage=SNARK),
    ]
    task = fixture_task(manifest, SEED)
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post")
        output = await sup.submit(task, deadline=time.time() + 60)
        stats = sup.statistics()
    assert output == reference.window_post(task)
    verify(task, output)
    done = {c.name: c.done for c in stats.children}
    assert done == {f"{VAN}#0": 1, f"{SNARK}#0": 1}


async def test_faults_found_by_the_vanilla_step_are_the_answer_without_a_snark(tmp_path):
    m = sectors_with_a_short_one(tmp_path)
    children = [
        spec(builtin_child(VAN, "python-ref"), stage=VAN),
        spec(builtin_child(SNARK, "python-ref"), stage=SNARK),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post")
        output = await sup.submit(fixture_task(m, SEED))
        stats = sup.statistics()
    assert output == WindowPoStOutput(proofs=[], faults=[2])
    assert {c.name: c.done for c in stats.children} == {f"{VAN}#0": 1, f"{SNARK}#0": 0}


async def test_a_failing_step_fails_the_request_once_with_the_steps_reason():
    children = [
        spec(builtin_child(VAN, "sleep", "seconds=0", "fail=always"), stage=VAN),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post")
        with pytest.raises(ProverError) as excinfo:
            await sup.submit(window_task())
        stats = sup.statistics()
    message = str(excinfo.value)
    assert f"({VAN}) failed on {VAN}#0" in message and "failing as configured" in message
    assert {c.name: c.done for c in stats.children} == {f"{VAN}#0": 0, f"{SNARK}#0": 0}


async def test_vanilla_proofs_every_snark_child_refuses_are_made_again_by_another_vanilla_child():
    children = one_bad_vanilla_child()
    tasks = [window_task(miner=m) for m in range(1, 5)]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post", 2)
        outputs = [await sup.submit(t) for t in tasks]
        done = {c.name: c.done for c in sup.statistics().children}
    assert outputs == [echo_output(t) for t in tasks]
    assert done[f"{VAN}#0"] >= 1  # the bad child made vanilla proofs that were refused
    # Each request the bad child made proofs for was made again by the good one.
    assert done[f"{VAN}#1"] == len(tasks), done


async def failing_split(children, ready: int) -> tuple[str, dict[str, int]]:
    """One split WindowPoSt through `children` once `ready` of them serve window_post: the error it
    fails with, and how many proofs each child made."""
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post", ready)
        with pytest.raises(ProverError) as excinfo:
            await sup.submit(window_task())
        return str(excinfo.value), {c.name: c.done for c in sup.statistics().children}


async def test_the_only_snark_childs_error_has_the_vanilla_proofs_made_again_elsewhere():
    # With one SNARK child (or its siblings benched or stopped for good), its error is the only
    # opinion there will be: the proofs are made again by another vanilla child, and proved.
    # (Before, its error was the answer, and a vanilla child making bad proofs failed every
    # request it took.)
    children = [
        spec(BAD_VANILLA, stage=VAN),
        spec(builtin_child(VAN, "echo"), stage=VAN, index=1),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready(VAN, 2)
        await sup.wait_ready(SNARK, 1)
        assert await sup.submit(window_task()) == echo_output(window_task())  # #0's turn first
        done = {c.name: c.done for c in sup.statistics().children}
    assert done == {f"{VAN}#0": 1, f"{VAN}#1": 1, f"{SNARK}#0": 1}


async def test_one_snark_childs_error_names_whose_vanilla_proofs_it_had_and_runs_nothing_again():
    # One SNARK child's error while its sibling can serve, which cannot take the step (it has
    # MaxAttempts 1), is no evidence against the vanilla proofs (a GPU's own fault is far more
    # common): the error is the answer, and says which vanilla child made the proofs.
    children = [
        spec(BAD_VANILLA, stage=VAN),
        spec(builtin_child(VAN, "echo"), stage=VAN, index=1),
        spec(builtin_child(SNARK, "echo"), stage=SNARK, max_attempts=1),
        spec(builtin_child(SNARK, "echo"), stage=SNARK, index=1, max_attempts=1),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready(VAN, 2)
        await sup.wait_ready(SNARK, 2)
        with pytest.raises(ProverError) as excinfo:
            await sup.submit(window_task())  # #0's turn first
        message = str(excinfo.value)
        done = {c.name: c.done for c in sup.statistics().children}
    assert message.startswith("request ") and f"({SNARK}) failed on {SNARK}#" in message
    assert message.endswith(f"; its vanilla proofs came from {VAN}#0"), message
    assert done[f"{VAN}#1"] == 0 and done[f"{SNARK}#0"] == done[f"{SNARK}#1"] == 0


async def test_vanilla_proofs_no_snark_child_takes_run_again_at_most_maxattempts_rounds():
    # Two SNARK children refuse the proofs of both vanilla children: the request is made again
    # once (MaxAttempts = 2 rounds), and its answer says what each round said.
    children = [
        spec(BAD_VANILLA, stage=VAN),
        spec(BAD_VANILLA, stage=VAN, index=1),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
        spec(builtin_child(SNARK, "echo"), stage=SNARK, index=1),
    ]
    message, done = await failing_split(children, ready=2)
    first, second = (f"{VAN}#0", f"{VAN}#1") if done[f"{VAN}#0"] == 1 else (f"{VAN}#1", f"{VAN}#0")
    assert f"its vanilla proofs came from {second}; before that, the SNARK step of the" in message
    assert f"vanilla proofs from {first}: " in message and message.count("before that") == 1
    assert done == {f"{VAN}#0": 1, f"{VAN}#1": 1, f"{SNARK}#0": 0, f"{SNARK}#1": 0}


async def test_the_rounds_stop_at_maxattempts_when_the_vanilla_step_lands_on_the_same_child(
    monkeypatch,
):
    # The scheduler's avoid is soft (an avoided child serves while no other can): a round may
    # be made by the same vanilla child again. The rounds are counted, not the children.
    from types import SimpleNamespace

    from damocles_ext.supervisor import split

    rounds = 0

    async def step(sup, task, how, *, in_flight=False, avoid=None, judged_later=False):
        nonlocal rounds
        if isinstance(task, WindowPoStVanilla):
            rounds += 1
            if rounds > 10:
                raise RuntimeError("the rounds do not stop")
            out = WindowPoStVanillaOutput([b"x"], [])
            made = SimpleNamespace(child="A")
            return SimpleNamespace(error=None, output=out, tracked=made, dispatched=lambda c: None)
        error = ProverError(f"request {rounds} ({SNARK}) failed on S0 and S1: bad")
        tracked = SimpleNamespace(avoid={"S0", "S1"}, lost_on=frozenset())
        return SimpleNamespace(error=error, tracked=tracked)

    def child(name, stage):
        return SimpleNamespace(name=name, spec=SimpleNamespace(stage=stage, max_attempts=2))

    breaker = SimpleNamespace(can_serve=lambda name, now: True)  # B looks able at each check
    monkeypatch.setattr(split, "_step", step)
    sup = SimpleNamespace(
        _children={"A": child("A", VAN), "B": child("B", VAN), "S0": child("S0", SNARK)},
        _book=SimpleNamespace(
            scheduler=SimpleNamespace(breaker=breaker),
            judge_vanilla=None,
            cannot_serve=lambda stage: None,
        ),
        _now=lambda: 0.0,
        _tell=lambda event, *args: None,
        shutting_down=False,
    )
    with pytest.raises(ProverError, match="before that"):
        await split.prove_split(sup, window_task(), (None, 0, None, None))
    assert rounds == 2


async def test_shutdown_lets_a_split_request_in_its_vanilla_step_take_its_snark_step(recorder):
    from damocles_ext_plugins.testing import echo_output

    rec, pm = recorder
    children = [
        spec(builtin_child(VAN, "sleep", "seconds=0.3"), stage=VAN),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
    ]
    results = []
    async with open_supervisor(children, plugin_manager=pm) as sup:
        await sup.wait_ready("window_post")

        async def prove() -> None:
            results.append(await sup.submit(window_task(miner=9)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(prove)
            assert await rec.next("started") == ("started", 1, f"{VAN}#0")
            sup.request_shutdown()  # the vanilla step runs; its SNARK step is yet to come
    assert results == [echo_output(window_task(miner=9))]
    assert [e for e in rec.log if e[0] == "finished"] == [
        ("finished", 1, "ok"),
        ("finished", 2, "ok"),
    ]


def gated_snark(tmp_path, vanilla_slots: int):
    """An echo vanilla child with `vanilla_slots`, and a SNARK child that answers each step when
    its gate is released: (its log, the gate, the children)."""
    log = tmp_path / "log"
    log.touch()
    gate = Gate(tmp_path / "snark")
    vanilla = [*builtin_child(VAN, "echo"), "--capacity", str(vanilla_slots)]
    children = [
        spec(vanilla, stage=VAN, concurrent=vanilla_slots),
        gated(tmp_path, SNARK, 0, gate, log),
    ]
    return log, gate, children


async def test_shutdown_lets_a_snark_step_waiting_for_its_child_take_it(tmp_path, recorder):
    """A request whose vanilla step is done and whose SNARK step waits for the busy GPU when
    shutdown begins is in flight, as one still in its vanilla step is: it gets the grace."""
    rec, pm = recorder
    _, gate, children = gated_snark(tmp_path, vanilla_slots=2)
    results: dict[int, object] = {}
    try:
        async with open_supervisor(children, plugin_manager=pm, stop_timeout=2.0) as sup:
            await sup.wait_ready("window_post")

            async def prove(miner: int) -> None:
                try:
                    results[miner] = await sup.submit(window_task(miner=miner))
                except ProverError as exc:
                    results[miner] = str(exc)

            async with trio.open_nursery() as nursery:
                for miner in (1, 2):
                    nursery.start_soon(prove, miner)
                # One SNARK step holds the SNARK child, the other waits for it.
                while sup.statistics().stages[SNARK].queued < 1:
                    await rec.next("finished")
                    await trio.testing.wait_all_tasks_blocked()
                sup.request_shutdown()
                await trio.testing.wait_all_tasks_blocked()
                gate.release()
                gate.release()
    finally:
        gate.close()
    whole = WindowPoStOutput(proofs=[b"ok"], faults=[])
    assert results == {1: whole, 2: whole}


async def test_echo_steps_join_to_the_whole_echo_answer():
    from damocles_ext_plugins.testing import echo_output

    children = [
        spec(builtin_child(VAN, "echo"), stage=VAN),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post")
        outputs = [await sup.submit(window_task(miner=m)) for m in (7, 8)]
    assert outputs == [echo_output(window_task(miner=m)) for m in (7, 8)]


async def test_snark_steps_start_by_deadline_as_the_gpu_frees(tmp_path, recorder):
    """Vanilla steps finish in any order; the SNARK child takes them earliest deadline first."""
    rec, pm = recorder
    log, gate, children = gated_snark(tmp_path, vanilla_slots=4)
    try:
        async with open_supervisor(children, plugin_manager=pm, stop_timeout=2.0) as sup:
            await sup.wait_ready("window_post")
            async with trio.open_nursery() as nursery:
                now = time.time()
                # 1 holds the SNARK child; 2, 3, 4 (due in 300, 100, 200 s) finish their vanilla
                # steps meanwhile and wait for it.
                await submit_in_order(sup, nursery, [(window_task(miner=1), None)])
                while rec.log[-1:] != [("started", 2, f"{SNARK}#0")]:
                    await rec.next("started")
                await submit_in_order(
                    sup,
                    nursery,
                    [
                        (window_task(miner=2), now + 300),
                        (window_task(miner=3), now + 100),
                        (window_task(miner=4), now + 200),
                    ],
                )
                while sup.statistics().stages[SNARK].queued < 3:
                    await rec.next("finished")  # a vanilla step ended; its SNARK step queues
                for _ in range(4):
                    gate.release()
    finally:
        gate.close()
    assert [line for line in child_log(log) if line.startswith("start")] == [
        f"start {SNARK}#0 {m}" for m in (1, 3, 4, 2)
    ]


def test_a_dext_request_carries_the_split_steps(manifest):
    task = fixture_task(manifest, SEED)
    vanilla = split.vanilla_step(reference.window_post, split_window_post(task))
    for msg in (
        dext.Request(1, split_window_post(task), deadline=5.0),
        dext.Request(2, snark_task(task, vanilla)),
        dext.Response(1, output=vanilla),
        dext.Response(2, output=WindowPoStSnarkOutput(proofs=vanilla.vanilla_proofs)),
    ):
        [decoded] = dext.FrameDecoder().receive_data(dext.encode(msg))
        assert decoded == msg


# -- the split rule (damocles_ext.stages), sans-IO ---------------------------------------------


@pytest.mark.parametrize(
    ("served", "split", "window_post", "winning_post"),
    [
        ({"window_post"}, False, True, False),
        ({"window_post", "winning_post"}, False, True, True),
        ({VAN, SNARK}, True, True, False),
        ({VAN, SNARK, "winning_post"}, True, True, True),
        ({VAN}, False, False, False),
        ({SNARK, "winning_post"}, False, False, True),
        # the config refuses both forms at once; were they met, whole proofs win.
        ({"window_post", VAN, SNARK}, False, True, False),
        (set(), False, False, False),
    ],
)
def test_which_children_serve_a_stage_and_when_a_window_post_runs_split(
    served, split, window_post, winning_post
):
    from damocles_ext.stages import can_serve, runs_split

    assert runs_split(served) is split
    assert can_serve("window_post", served) is window_post
    assert can_serve("winning_post", served) is winning_post


def test_the_children_of_a_window_post_include_the_split_steps():
    from damocles_ext.stages import child_stages

    assert child_stages("window_post") == {"window_post", VAN, SNARK}
    assert child_stages("winning_post") == {"winning_post"}
    assert child_stages(VAN) == {VAN}


async def test_a_snark_step_begun_once_the_supervisor_stopped_is_refused_not_left_waiting():
    """A vanilla step answered just as run() ends (its grace over), its caller resuming after:
    the SNARK step it then submits is refused, as the supervisor has stopped. Taken as one in
    flight within the grace would be, it waited for ever: no child, no driver is left to answer
    it."""
    from damocles_ext.supervisor import split

    children = [
        spec(builtin_child(VAN, "echo"), stage=VAN),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post")
    task = window_task()
    vanilla = echo_output(split_window_post(task))
    with trio.fail_after(10), pytest.raises(ProverError) as excinfo:
        await split._step(sup, snark_task(task, vanilla), (None, 0, None, None), in_flight=True)
    assert str(excinfo.value).endswith(f"({SNARK}) refused: the supervisor has stopped")


async def test_a_request_between_its_steps_is_dispatched_to_no_child_until_its_snark_step_is():
    """Its vanilla child is done with it: on_dispatch says None (what `damocles-ext worker`'s
    status shows as the job's child) until a SNARK child takes the SNARK step, not the vanilla
    child it left (idle, or proving another job's vanilla step, while the job waited for a GPU)."""
    children = [
        spec([*builtin_child(VAN, "echo"), "--capacity", "2"], stage=VAN, concurrent=2),
        spec(builtin_child(SNARK, "sleep", "seconds=30", "progress_interval=0.05"), stage=SNARK),
    ]
    seen: dict[int, list[str | None]] = {1: [], 2: []}
    async with open_supervisor(children, shutdown_grace=0.1) as sup:
        await sup.wait_ready("window_post")
        async with trio.open_nursery() as nursery:
            for m in (1, 2):
                nursery.start_soon(
                    lambda m=m: sup.submit(window_task(miner=m), on_dispatch=seen[m].append)
                )
            await wait_until(
                lambda: sup.statistics().stages[SNARK].queued == 1 and all(seen.values()),
                20,
                "one SNARK step running, the other queued",
            )
            nursery.cancel_scope.cancel()
    waiting = [m for m in (1, 2) if seen[m][-1] != f"{SNARK}#0"]
    assert len(waiting) == 1, seen
    assert seen[waiting[0]] == [f"{VAN}#0", None], seen


async def test_a_stop_at_once_between_the_steps_runs_no_snark_step(recorder):
    """A second signal (stop_at_once) as a request's vanilla step has just been answered, before
    its SNARK step is submitted: it fails at once. Before, its SNARK step was still taken, as
    within the grace there is none of (serve and run exit soon after, leaving it unanswered)."""
    rec, pm = recorder
    children = [
        spec(builtin_child(VAN, "echo"), stage=VAN),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
    ]
    dispatched: list[str | None] = []

    def on_dispatch(child: str | None) -> None:
        dispatched.append(child)
        if child is None:  # between the steps
            sup.stop_at_once("stopped at once")

    async with open_supervisor(children, plugin_manager=pm, shutdown_grace=60) as sup:
        await sup.wait_ready("window_post")
        with pytest.raises(ProverError) as excinfo:
            await sup.submit(window_task(), on_dispatch=on_dispatch)
        snark = {c.name: c for c in sup.statistics().children}[f"{SNARK}#0"]
    assert dispatched == [f"{VAN}#0", None]
    assert (snark.done, [e for e in rec.log if e[0] == "started"]) == (
        0,
        [("started", 1, f"{VAN}#0")],
    )
    assert str(excinfo.value) == f"request 2 ({SNARK}) refused: the supervisor is shutting down"


def logging_vanilla_child(seen) -> list[str]:
    """A vanilla child that writes "request <miner>" and "cancel <id>" to `seen`; miner 1's step
    runs until it is cancelled (it reports progress first), the others are proved at once."""
    return dext_child(
        """
        log.write(f"request {msg.task.miner_id}\\n")
        if msg.task.miner_id == 1:
            send(dext.Progress(msg.id, "working", 0, 1))
        else:
            send(dext.Response(msg.id, output=WindowPoStVanillaOutput([echo_proof(msg.task)], [])))
        """,
        setup=f"log = open({str(seen)!r}, 'a', buffering=1)\n"
        "from damocles_ext.tasks import WindowPoStVanillaOutput\n"
        "from damocles_ext_plugins.testing import echo_proof",
        stage=VAN,
        cancel="""
        log.write(f"cancel {msg.id}\\n")
        send(dext.Response(msg.id, error="cancelled"))
        """,
    )


async def test_a_split_window_posts_caller_cancelled_before_or_during_its_vanilla_step(tmp_path):
    # A caller cancelled before it submits sends no child anything, and one cancelled while the
    # vanilla step runs has that child told to stop (removing either from split._step failed
    # no test: the unsplit path's own tests do not go through it).
    seen = tmp_path / "seen"
    children = [
        spec(logging_vanilla_child(seen), stage=VAN, concurrent=2),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post", 1)
        with trio.CancelScope() as scope:
            scope.cancel()
            await sup.submit(window_task(miner=2))
        assert scope.cancelled_caught
        await cancel_once_running(sup, window_task(miner=1))
        await wait_until_real(
            lambda: child_stats(sup, f"{VAN}#0").in_flight == 0, what="the cancel answered"
        )
        assert await sup.submit(window_task(miner=3)) == echo_output(window_task(miner=3))
    assert seen.read_text().splitlines() == ["request 1", "cancel 1", "request 3"]
