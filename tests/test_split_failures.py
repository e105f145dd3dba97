"""Split WindowPoSt: what its children get wrong, and what that costs them. SNARK children that
fail for one miner, vanilla proofs every SNARK child refuses (the breaker must not blame the SNARK
children for them), children answering an output of the wrong step or one that does not fit the
task. Real children, as in test_split.py; the breaker's bookkeeping also in the book, sans-IO.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import trio
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import DEXT, ManagerLike, make_task, plugin_block, write_config
from helpers.scheduling import GATED_CHILD, Gate
from helpers.supervisor import (
    BAD_VANILLA,
    builtin_child,
    child_stats,
    dext_child,
    one_bad_vanilla_child,
    spec,
    wait_until,
    window_task,
)

from damocles_ext.api import open_supervisor
from damocles_ext.errors import ProverError
from damocles_ext.lifecycle import RequestBook
from damocles_ext.lifecycle.effects import Note, Resolve, Send
from damocles_ext.lifecycle.records import ChildLimits
from damocles_ext.supervisor.restart import BackoffPolicy
from damocles_ext.tasks import (
    WindowPoStOutput,
    WindowPoStSnarkOutput,
    WindowPoStVanillaOutput,
    snark_task,
)

VAN, SNARK = "window_post_vanilla", "window_post_snark"
SNARK_OK = WindowPoStOutput(proofs=[b"ok"], faults=[])  # a gated SNARK child's, joined


# A SNARK child whose GPU fails miner 1's proofs only; it proves the others (the echo SNARK).
SNARK_FAILING_MINER_1 = dext_child(
    """
if msg.task.miner_id == 1:
    send(dext.Response(msg.id, error="CUDA error 700 for miner 1"))
else:
    send(dext.Response(msg.id, output=WindowPoStSnarkOutput(list(msg.task.vanilla_proofs))))
""",
    setup="from damocles_ext.tasks import WindowPoStSnarkOutput",
    stage=SNARK,
)


def answering(output: str, stage: str) -> list[str]:
    """A fake child of `stage` answering every request with `output` (Python source)."""
    return dext_child(
        f"send(dext.Response(msg.id, output={output}))",
        setup="from damocles_ext.tasks import *",
        stage=stage,
    )


async def prove_all(sup, miners) -> list:
    """Each miner's WindowPoSt, submitted together: its output, or its error's text."""
    results: list = [None] * len(miners)

    async def one(i: int, miner: int) -> None:
        try:
            results[i] = await sup.submit(window_task(miner=miner))
        except ProverError as exc:
            results[i] = str(exc)

    async with trio.open_nursery() as nursery:
        for i, miner in enumerate(miners):
            nursery.start_soon(one, i, miner)
    return results


async def test_a_snark_child_failing_one_miner_is_retried_on_its_sibling_without_a_vanilla_again():
    children = [
        spec(builtin_child(VAN, "echo"), stage=VAN),
        spec(builtin_child(VAN, "echo"), stage=VAN, index=1),
        spec(SNARK_FAILING_MINER_1, stage=SNARK),
        spec(builtin_child(SNARK, "echo"), stage=SNARK, index=1),
    ]
    miners = [1, 1, 2, 1, 1, 2, 1, 3, 1, 1]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post", 2)
        outputs = [await sup.submit(window_task(miner=m)) for m in miners]
        stats = {c.name: c for c in sup.statistics().children}
        benched = set(sup._book.scheduler.breaker.suspects)
    assert outputs == [echo_output(window_task(miner=m)) for m in miners]
    # One vanilla step per request: a SNARK child's own error runs no vanilla step again.
    assert stats[f"{VAN}#0"].done + stats[f"{VAN}#1"].done == len(miners)
    assert stats[f"{SNARK}#0"].failed >= 1 and stats[f"{SNARK}#1"].failed == 0
    # The failing GPU, its sibling having proved the same proofs, is benched; nothing else.
    assert benched <= {f"{SNARK}#0"}


async def test_snark_children_are_not_benched_for_vanilla_proofs_that_every_one_refuses():
    # A vanilla child making proofs that prove nothing: both SNARK children refuse them, and
    # another vanilla child makes them again, which one SNARK child proves. The refusals were
    # the vanilla child's fault: the SNARK child that did not prove the second proofs must not
    # be benched for them (a benched sibling leaves one SNARK child to refuse the next bad
    # proofs, and one SNARK child's error is the answer: requests failed that could be proved).
    children = one_bad_vanilla_child()
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post", 2)
        results = await prove_all(sup, [1] * 16)
        benched = set(sup._book.scheduler.breaker.suspects)
    assert results == [echo_output(window_task(miner=1))] * 16
    assert benched <= {"window_post_vanilla#0"}  # the bad vanilla child may be; no SNARK child


async def test_a_vanilla_child_whose_proofs_prove_nothing_is_benched_while_its_sibling_proves(
    caplog,
):
    # Its steps are judged with their SNARK steps: both SNARK children refusing its proofs is an
    # error of its own, made again by its sibling. Taking every other request, it would make
    # bad proofs for 6 of 12 (each costing a vanilla step and two SNARK steps); benched after
    # its third, it makes them for 3, and the rest go straight to its sibling.
    children = one_bad_vanilla_child()
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post", 2)
        for _ in range(12):
            assert await sup.submit(window_task(miner=1)) == echo_output(window_task(miner=1))
        bad = child_stats(sup, "window_post_vanilla#0")
        good = child_stats(sup, "window_post_vanilla#1")
        benched = set(sup._book.scheduler.breaker.suspects)
    assert benched == {"window_post_vanilla#0"}
    assert (bad.done, good.done) == (3, 12)
    (warning,) = [r.getMessage() for r in caplog.records if "takes no request" in r.getMessage()]
    assert warning.startswith("window_post_vanilla#0 (pid ")
    assert "(or with vanilla proofs the SNARK children refused)" in warning


def test_the_breaker_compares_a_snark_step_with_its_own_retry_not_the_miners_other_proofs():
    # Sans-IO, in the order that benched a blameless SNARK child: a and b both refuse a step's
    # vanilla proofs (so the request makes them again), and the other child, less loaded (one
    # step of another miner holds a slot of the first), proves the new step, three times.
    book = RequestBook()
    for name in ("a", "b"):
        book.add_child(name, SNARK, capacity=2, limits=ChildLimits(max_attempts=2))
    for i, name in enumerate(("a", "b")):
        book.child_ready(name, 0.0, protocol="dext", pid=100 + i)
    vanilla = WindowPoStVanillaOutput([b"good"], [])
    _, out = book.submit(1, snark_task(window_task(miner=2), vanilla), 0.0)
    (hold,) = [e for e in out if isinstance(e, Send)]
    task = window_task(miner=1)
    bad = snark_task(task, WindowPoStVanillaOutput([b"garbage"], []))
    good = snark_task(task, vanilla)
    proof = WindowPoStSnarkOutput([b"p"])
    now, rid, notes, answers, provers = 0.0, 1, [], [], []
    for step in (bad, good) * 3:
        rid += 1
        _, pending = book.submit(rid, step, now)
        while pending:
            effect = pending.pop(0)
            if isinstance(effect, Note):
                notes.append(effect.message)
            elif isinstance(effect, Resolve):
                answers.append(effect.error is None)
            elif isinstance(effect, Send):
                now += 1
                if step is bad:
                    pending += book.answered(effect.child, effect.child_rid, now, error="no")
                else:
                    provers.append(effect.child)
                    pending += book.answered(effect.child, effect.child_rid, now, output=proof)
    assert answers == [False, True] * 3
    assert provers == [{"a": "b", "b": "a"}[hold.child]] * 3  # the order that benched it
    assert not [n for n in notes if "takes no request" in n], notes
    assert book.scheduler.breaker.suspects == set()


@pytest.mark.parametrize(
    ("stage", "output", "said"),
    [
        (VAN, "WindowPoStOutput([b'p'], [])", "answered with a window_post output"),
        (VAN, "WindowPoStSnarkOutput([b'p'])", "answered with a window_post_snark output"),
        (VAN, "WinningPoStOutput([b'p'])", "answered with a winning_post output"),
        (VAN, "WindowPoStVanillaOutput([b'p'], [99])", "faults for sectors not in the task: [99]"),
        (VAN, "WindowPoStVanillaOutput([], [])", "answered with neither proofs nor faults"),
        (SNARK, "WindowPoStVanillaOutput([b'p'], [])", "a window_post_vanilla output"),
        (SNARK, "WindowPoStOutput([b'p'], [])", "answered with a window_post output"),
        (SNARK, "WindowPoStSnarkOutput([])", "answered with neither proofs nor faults"),
    ],
)
async def test_a_wrong_or_unfitting_step_output_runs_elsewhere_or_is_one_clear_error(
    stage, output, said
):
    other = VAN if stage == SNARK else SNARK
    with_sibling = [
        spec(answering(output, stage), stage=stage),
        spec(builtin_child(stage, "echo"), stage=stage, index=1),
        spec(builtin_child(other, "echo"), stage=other),
    ]
    async with open_supervisor(with_sibling) as sup:
        await sup.wait_ready(stage, 2)
        results = await prove_all(sup, [1, 2, 3])
    assert results == [echo_output(window_task(miner=m)) for m in (1, 2, 3)]
    alone = [with_sibling[0], with_sibling[2]]
    async with open_supervisor(alone) as sup:
        await sup.wait_ready("window_post")
        results = await prove_all(sup, [1, 2])
        assert sup.statistics().requests == 0
    for text in results:
        assert isinstance(text, str) and said in text and f"{stage}#0" in text, text


async def test_serve_answers_each_request_read_once_with_a_proof_when_stdin_ends_between_steps(
    tmp_path, stderr_file
):
    # damocles-manager's processor: 4 requests, the SNARK child holding the first while the
    # others' vanilla steps are done (their SNARK steps wait for it), then stdin EOF. Every
    # request read is proved and answered once, and serve exits 0.
    script, log_path = tmp_path / "gated.py", tmp_path / "log"
    script.write_text(GATED_CHILD)
    os.mkfifo(log_path)  # the child's "start"/"end" lines, read here as they come
    gate = Gate(tmp_path / "gate")
    snark = [str(script), SNARK, f"{SNARK}#0", str(gate.path), str(log_path)]
    cfg = write_config(
        tmp_path,
        plugin_block("WdPostVanilla", "echo", concurrent=4)
        + f"[[WdPostSnark]]\nBin = {json.dumps(sys.executable)}\nArgs = {json.dumps(snark)}\n",
    )
    log_fd = os.open(log_path, os.O_RDONLY | os.O_NONBLOCK)  # before the child opens it
    log = trio.lowlevel.FdStream(log_fd)
    tasks = [make_task(3000 + i) for i in range(4)]
    try:
        async with trio.open_nursery() as nursery:
            m = await ManagerLike.start(
                nursery, [*DEXT, "serve", "window_post", "-c", str(cfg)], "window_post",
                stderr=stderr_file, ready_timeout=10,
            )  # fmt: skip
            with trio.fail_after(30):
                ids = [await m.send(task) for task in tasks]
                seen = b""
                while b"start" not in seen:
                    seen += await log.receive_some()
                await m.close_stdin()
                for _ in tasks:
                    gate.release()
                answers = [await m.wait(i) for i in ids]
                assert await m.process.wait() == 0
                await m.eof.wait()
    finally:
        gate.close()
        await log.aclose()
    assert [(a.err_msg, a.output) for a in answers] == [(None, SNARK_OK)] * len(tasks)
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])


async def test_a_window_post_no_snark_child_can_prove_fails_at_once_without_a_vanilla_step(
    recorder,
):
    # The only SNARK child is FATAL (its start fails): a WindowPoSt fails at once, saying why,
    # as a request of a stage no child can serve does. Before, its vanilla step ran first
    # (every challenged sector read, a vanilla slot taken) for proofs nothing could prove.
    rec, pm = recorder
    children = [
        spec(builtin_child(VAN, "echo"), stage=VAN),
        spec([sys.executable, "-c", "raise SystemExit(1)"], stage=SNARK),
    ]
    backoff = BackoffPolicy(base=0.01, cap=0.02, max_failed_starts=2)
    async with open_supervisor(children, plugin_manager=pm, backoff=backoff) as sup:
        await sup.wait_ready(VAN)
        await wait_until(lambda: child_stats(sup, f"{SNARK}#0").state == "fatal", 10)
        with pytest.raises(ProverError) as excinfo:
            await sup.submit(window_task())
        vanilla = child_stats(sup, f"{VAN}#0")
    assert (vanilla.done, vanilla.failed, rec.log) == (0, 0, [])
    message = str(excinfo.value)
    assert excinfo.value.request_id == _number(message) is not None, message
    assert f"({SNARK}): no {SNARK} child can serve: the only child is FATAL" in message, message
    assert f"({SNARK}#0: failed start" in message and "its vanilla step was not run" in message


async def test_serve_says_which_step_of_a_split_window_post_missed_its_deadline(
    tmp_path, stderr_file
):
    # Two WindowPoSts; the first's SNARK step holds the one GPU past both deadlines (its prover
    # ignores the cancel, so its child stays busy for the cancel grace, 10 s: a prover that
    # stopped at once would free it for the second if that came a little later), so the
    # second's SNARK step never starts. damocles-manager must read that it was the SNARK step
    # that was never sent (the vanilla step ran): before, it read "request 1 (window_post):
    # ... it was not sent to a prover", as if the WindowPoSt had never reached a prover.
    cfg = write_config(
        tmp_path,
        plugin_block("WdPostVanilla", "echo", concurrent=2)
        + plugin_block("WdPostSnark", "sleep", fail="hang"),
    )
    argv = [*DEXT, "serve", "window_post", "-c", str(cfg), "--deadline-after", "3"]
    async with trio.open_nursery() as nursery:
        m = await ManagerLike.start(nursery, argv, "window_post", stderr=subprocess.PIPE)
        with trio.fail_after(30):
            await m.wait_log_times("ready: stage window_post_", 2)
            ids = [await m.send(make_task(4000 + i)) for i in range(2)]
            answers = [(await m.wait(i)).err_msg for i in ids]
            await m.close_stdin()
            assert await m.process.wait() == 0
    unsent = [a for a in answers if a is not None and "before the request could start" in a]
    assert len(unsent) == 1, answers
    assert unsent[0].startswith(f"({SNARK}): deadline passed", len("request 1 ")), answers
    assert all(a is not None and "(window_post)" not in a for a in answers), answers


def checking_snark_child(miner: int, then: str) -> list[str]:
    """A SNARK child that does `then` for `miner`'s steps, else refuses proofs that are not the
    task's (the echo SNARK's check) and proves the others."""
    return dext_child(
        f"""
if msg.task.miner_id == {miner}:
    {then}
elif list(msg.task.vanilla_proofs) != [echo_proof(msg.task)]:
    send(dext.Response(msg.id, error="the vanilla proofs are not this task's"))
else:
    send(dext.Response(msg.id, output=WindowPoStSnarkOutput([echo_proof(msg.task)])))
""",
        setup="from damocles_ext.tasks import WindowPoStSnarkOutput\n"
        "from damocles_ext_plugins.testing import echo_proof",
        stage=SNARK,
    )


# Never answers miner 99's SNARK steps (a GPU that hangs on them).
SNARK_HANGING_ON_MINER_99 = checking_snark_child(99, "pass")


async def test_vanilla_proofs_whose_snark_step_said_nothing_do_not_end_their_childs_errors():
    # The bad vanilla child's second and third refused proofs have, between them, proofs whose
    # SNARK step never ended (its deadline passed on a hung GPU): nothing was said of those,
    # so they are no proof of its own, and the three refusals bench it (its sibling proved).
    children = [
        *one_bad_vanilla_child()[:2],
        spec(SNARK_HANGING_ON_MINER_99, stage=SNARK, cancel_grace=0.1),
        spec(SNARK_HANGING_ON_MINER_99, stage=SNARK, index=1, cancel_grace=0.1),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post", 2)
        bad = child_stats(sup, "window_post_vanilla#0")
        good = child_stats(sup, "window_post_vanilla#1")
        # The vanilla children take requests in turn (#0 first); refused, a request's proofs
        # are made again on #1 without a turn.
        for miner in (1, 1, 1, 1):
            assert await sup.submit(window_task(miner=miner)) == echo_output(window_task(miner))
        assert child_stats(sup, "window_post_vanilla#0").done == bad.done + 2
        with pytest.raises(ProverError, match="deadline") as cut:
            await sup.submit(window_task(miner=99), deadline=time.time() + 1.0)
        # Whatever ended its SNARK step, its answer names the child that made its proofs.
        assert str(cut.value).endswith("; its vanilla proofs came from window_post_vanilla#0")
        assert child_stats(sup, "window_post_vanilla#0").done == bad.done + 3
        for miner in (1, 1):
            assert await sup.submit(window_task(miner=miner)) == echo_output(window_task(miner))
        assert child_stats(sup, "window_post_vanilla#0").done == bad.done + 4
        assert child_stats(sup, "window_post_vanilla#1").done == good.done + 6
        benched = set(sup._book.scheduler.breaker.suspects)
    assert benched == {"window_post_vanilla#0"}


# A vanilla child whose proofs for miner 2 prove nothing (the echo vanilla step's otherwise),
# and a SNARK child whose GPU fails miner 1's steps (the echo SNARK step's check otherwise).
VANILLA_BAD_FOR_MINER_2 = dext_child(
    "proofs = [b'garbage'] if msg.task.miner_id == 2 else [echo_proof(msg.task)]\n"
    "send(dext.Response(msg.id, output=WindowPoStVanillaOutput(proofs, [])))",
    setup="from damocles_ext.tasks import WindowPoStVanillaOutput\n"
    "from damocles_ext_plugins.testing import echo_proof",
    stage=VAN,
)
SNARK_FAILING_MINER_1_CHECKING = checking_snark_child(
    1, 'send(dext.Response(msg.id, error="CUDA error 700 for miner 1"))'
)


async def test_a_snark_child_on_probation_is_not_benched_again_for_proofs_every_one_refuses():
    # Benched for its own errors (its sibling proved those steps), then on probation: vanilla
    # proofs that prove nothing, which its sibling refuses too, are no error of its own.
    children = [
        spec(VANILLA_BAD_FOR_MINER_2, stage=VAN),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
        spec(SNARK_FAILING_MINER_1_CHECKING, stage=SNARK, index=1),
    ]
    flaky = f"{SNARK}#1"
    async with open_supervisor(children, backoff=BackoffPolicy(base=0.02, cap=0.08)) as sup:
        await sup.wait_ready(SNARK, 2)
        await sup.wait_ready(VAN)
        breaker = sup._book.scheduler.breaker
        while flaky not in breaker.benches:  # every other step goes to it, and fails
            assert await sup.submit(window_task(miner=1)) == echo_output(window_task(miner=1))
        pid = child_stats(sup, flaky).pid
        os.kill(pid, 9)  # its next process ends its first bench: it is on probation
        await wait_until(lambda: child_stats(sup, flaky).pid not in (None, pid))
        await sup.wait_ready(SNARK, 2)
        assert flaky in breaker.suspects and flaky not in breaker.benches
        failed = child_stats(sup, flaky).failed
        while child_stats(sup, flaky).failed == failed:
            with pytest.raises(ProverError, match="the vanilla proofs are not this task's"):
                await sup.submit(window_task(miner=2))
        assert flaky not in breaker.benches


async def test_the_only_snark_childs_outage_blames_no_vanilla_child(tmp_path):
    # The one SNARK child's GPU fails every step for a while (no sibling to ask: each request's
    # proofs are made again by the other vanilla child, and refused again). Its refusals alone
    # say nothing of the proofs: once it proves again, no vanilla child is benched (both were,
    # by the first proof after the outage, counted three errors each made while it was down).
    broken = tmp_path / "broken"
    broken.touch()
    outage = (
        f"send(dext.Response(msg.id, error='CUDA error 999')) if os.path.exists({str(broken)!r})"
        " else send(dext.Response(msg.id, output=WindowPoStSnarkOutput([echo_proof(msg.task)])))"
    )
    snark = checking_snark_child(1, outage)
    snark[-1] = "import os\n" + snark[-1]
    children = [
        spec(builtin_child(VAN, "echo"), stage=VAN),
        spec(builtin_child(VAN, "echo"), stage=VAN, index=1),
        spec(snark, stage=SNARK),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post", 1)
        for _ in range(3):
            with pytest.raises(ProverError, match="CUDA error 999"):
                await sup.submit(window_task(miner=1))
        broken.unlink()
        for _ in range(4):
            assert await sup.submit(window_task(miner=1)) == echo_output(window_task(miner=1))
        breaker = sup._book.scheduler.breaker
        assert not breaker.suspects and not breaker.unproven
        done = {c.name: c.done for c in sup.statistics().children}
    assert done[f"{VAN}#0"] >= 2 and done[f"{VAN}#1"] >= 2  # both took work after it


async def eight_requests_bench_the_first_vanilla_child(sup) -> None:
    """8 requests, all proved though the first vanilla child's proofs are refused: that child,
    and no other, is benched, having had 3 of them proved."""
    for _ in range(8):
        assert await sup.submit(window_task(miner=1)) == echo_output(window_task(miner=1))
    assert set(sup._book.scheduler.breaker.suspects) == {f"{VAN}#0"}
    assert child_stats(sup, f"{VAN}#0").done == 3


async def test_a_vanilla_child_whose_proofs_the_only_snark_child_refuses_is_benched():
    # Its refusal alone judges nothing, but the same SNARK child proving the proofs made again by
    # the other vanilla child does: the bad vanilla child is benched after its third.
    children = [
        spec(BAD_VANILLA, stage=VAN),
        spec(builtin_child(VAN, "echo"), stage=VAN, index=1),
        spec(builtin_child(SNARK, "echo"), stage=SNARK),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post", 1)
        await eight_requests_bench_the_first_vanilla_child(sup)


# A vanilla child whose proofs make the SNARK prover abort (a native library that cannot read
# them), and SNARK children that do.
POISON_VANILLA = dext_child(
    "send(dext.Response(msg.id, output=WindowPoStVanillaOutput([b'poison'], [])))",
    setup="from damocles_ext.tasks import WindowPoStVanillaOutput",
    stage=VAN,
)


def snark_aborting_when(condition: str) -> list[str]:
    """A SNARK child that aborts (SIGABRT) on a step for which `condition` holds (of `msg`)."""
    return dext_child(
        f"""
if {condition}:
    os.abort()
send(dext.Response(msg.id, output=WindowPoStSnarkOutput([echo_proof(msg.task)])))
""",
        setup="from damocles_ext.tasks import WindowPoStSnarkOutput\n"
        "from damocles_ext_plugins.testing import echo_proof",
        stage=SNARK,
    )


SNARK_ABORTING_ON_POISON = snark_aborting_when("list(msg.task.vanilla_proofs) == [b'poison']")


async def test_vanilla_proofs_that_crash_both_snark_children_are_made_again_and_their_child_benched():
    # Two SNARK children crashing on a step's proofs say as much of them as two errors: the
    # proofs are made again by the other vanilla child, and the child that made them is benched
    # after its third. Before, a crash said nothing: every request the bad vanilla child took
    # failed, for ever, and it was never benched.
    children = [
        spec(POISON_VANILLA, stage=VAN),
        spec(builtin_child(VAN, "echo"), stage=VAN, index=1),
        spec(SNARK_ABORTING_ON_POISON, stage=SNARK),
        spec(SNARK_ABORTING_ON_POISON, stage=SNARK, index=1),
    ]
    async with open_supervisor(children, backoff=BackoffPolicy(base=0.02, cap=0.08)) as sup:
        await sup.wait_ready(VAN, 2)
        await sup.wait_ready(SNARK, 2)
        await eight_requests_bench_the_first_vanilla_child(sup)


SNARK_ABORTING_ON_MINER_7 = snark_aborting_when("msg.task.miner_id == 7")


async def test_a_request_that_crashes_every_snark_child_fails_alone_and_leaves_none_fatal():
    # A poison request (its SNARK prover aborts on it, wherever it runs), sent again and again:
    # each fails after its attempts, saying so, and the SNARK children go on proving the others.
    # Before, each crash counted as an exit after ready without answering: after 5 of them in a
    # row every SNARK child was FATAL, and every WindowPoSt failed at once.
    children = [
        spec(builtin_child(VAN, "echo"), stage=VAN),
        spec(SNARK_ABORTING_ON_MINER_7, stage=SNARK),
        spec(SNARK_ABORTING_ON_MINER_7, stage=SNARK, index=1),
    ]
    async with open_supervisor(children, backoff=BackoffPolicy(base=0.02, cap=0.08)) as sup:
        await sup.wait_ready(SNARK, 2)
        await sup.wait_ready(VAN)
        for _ in range(6):
            with pytest.raises(ProverError) as excinfo:
                await sup.submit(window_task(miner=7))
            message = str(excinfo.value)
            assert "killed by SIGABRT" in message, message
            assert "giving up (MaxAttempts = 2" in message, message
        assert await sup.submit(window_task(miner=1)) == echo_output(window_task(miner=1))
        states = {c.name: c.state for c in sup.statistics().children}
    assert "fatal" not in states.values(), states


SNARK_REFUSING_ALL = dext_child(
    'send(dext.Response(msg.id, error="these proofs do not verify"))', stage=SNARK
)


async def test_a_split_window_posts_error_carries_the_request_id_its_message_starts_with():
    # As an unsplit request's error does: the number of the step whose answer it is, which the
    # supervisor's records about that step carry (serve's record of the answer takes it from
    # there). Before, the error said again with the vanilla child's name (and the rounds before
    # it), or a refusal for want of a SNARK child, had none.
    children = [
        spec(builtin_child(VAN, "echo"), stage=VAN),
        spec(builtin_child(VAN, "echo"), stage=VAN, index=1),
        spec(SNARK_REFUSING_ALL, stage=SNARK),
    ]
    async with open_supervisor(children) as sup:
        await sup.wait_ready("window_post")
        await sup.wait_ready(VAN, 2)
        with pytest.raises(ProverError) as excinfo:
            await sup.submit(window_task())
    message = str(excinfo.value)
    assert "its vanilla proofs came from" in message and "; before that, " in message, message
    assert excinfo.value.request_id == _number(message), (excinfo.value.request_id, message)


def _number(message: str) -> int | None:
    """The supervisor's number a message about one of its requests starts with."""
    number = re.match(r"request (\d+) \(", message)
    return None if number is None else int(number.group(1))
