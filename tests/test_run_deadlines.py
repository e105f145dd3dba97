"""`run` gives a request that comes without a deadline one of its stage's (--deadline-after), as
`serve` does, and `prove -c` its own: a prover stuck in a GPU call still sends Progress, and the
deadline frees its child."""

from __future__ import annotations

import re
import time

import pytest
import trio
from helpers.frontend import (
    dext_run,
    dext_with,
    make_task,
    plugin_block,
    running,
    write_config,
)

from damocles_ext import cli
from damocles_ext.client import connect
from damocles_ext.commands.run import deadlines_after
from damocles_ext.errors import ProverError
from damocles_ext.frontends.serve_jsonl import with_default_deadline
from damocles_ext.protocol import jsonl
from damocles_ext.tasks import split_window_post


def test_the_deadlines_default_to_serves_and_each_argument_overrides_what_it_names():
    assert deadlines_after(None) == {"window_post": 2400.0, "winning_post": 300.0}
    assert deadlines_after([(None, 0.0)]) == {}
    assert deadlines_after([(None, 600.0), ("winning_post", 60.0)]) == {
        "window_post": 600.0,
        "winning_post": 60.0,
    }
    assert deadlines_after([("winning_post", 0.0)]) == {"window_post": 2400.0}


def test_a_split_window_posts_step_sent_alone_gets_window_posts_deadline():
    # A vanilla or SNARK step sent straight to `run` is a WindowPoSt's part: the same bound.
    given = []
    call = with_default_deadline(
        lambda task, *, deadline: given.append(deadline), deadlines_after(None)
    )
    before = time.time()
    call(split_window_post(make_task(1)))
    call(make_task(2, stage="winning_post"))
    call(split_window_post(make_task(3)), deadline=12.5)
    assert before + 2400 <= given[0] <= time.time() + 2400
    assert before + 300 <= given[1] <= time.time() + 300
    assert given[2] == 12.5


@pytest.mark.parametrize(
    ("given", "words"),
    [
        (["10m", "20m"], "'10m' and '20m' both give every stage's deadline: give it once"),
        (["window_post=10m", "winning_post=1m", "window_post=20m"],
         "'window_post=10m' and 'window_post=20m' both give window_post's deadline"),
        (["window_post=10m", "20m"], "'20m', for every stage, would override 'window_post=10m'"),
    ],
)  # fmt: skip
def test_a_stages_deadline_given_twice_is_a_usage_error_naming_both(capsys, given, words):
    # argparse kept them all and the last won: a value given by mistake went unnoticed.
    argv = ["run", "-c", "x.cfg"]
    for value in given:
        argv += ["--deadline-after", value]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert f"argument --deadline-after: {words}" in capsys.readouterr().err


def test_a_stages_own_deadline_after_the_one_for_every_stage_sets_that_stage():
    from damocles_ext.cli import build_parser

    argv = ["run", "-c", "x.cfg", "--deadline-after", "10m", "--deadline-after", "winning_post=1m"]
    args = build_parser().parse_args(argv)
    assert deadlines_after(args.deadline_after) == {"window_post": 600.0, "winning_post": 60.0}


def test_a_deadline_for_a_stage_requests_do_not_come_for_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "-c", "x.cfg", "--deadline-after", "window_post_snark=1m"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'window_post_snark' is not a stage requests come for; give window_post or" in err


async def test_a_winning_post_stuck_in_its_prover_without_a_deadline_is_answered_at_runs(
    tmp_path, sock_dir
):
    # `fail = "hang"`: the prover never returns and ignores Cancel, while the runtime goes on
    # sending Progress. The client gives no deadline; run's (2 s here) answers the request.
    block = plugin_block("WinPost", "sleep", fail="hang")
    cfg = write_config(tmp_path, block + "CancelGraceSecs = 0.2\n")
    path = sock_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        async with running(nursery, cfg, path, "--deadline-after", "winning_post=2s") as (_, log):
            with trio.fail_after(30):
                await log.wait_for("ready: stage winning_post")
                async with connect(path) as client:
                    with pytest.raises(ProverError, match="passed its deadline"):
                        await client.submit(make_task(1, stage="winning_post"))
                await log.wait_for("0.2s after a Cancel")  # its child freed
        nursery.cancel_scope.cancel()


def test_prove_in_process_without_deadline_gives_up_on_a_hung_prover_at_serves_default(tmp_path):
    # `prove -c` sent its request with no deadline: a prover stuck in a GPU call (`fail =
    # "hang"`: Progress goes on, Cancel is ignored) was waited for for ever, a progress line
    # every 5 s. It now gets serve's default deadline (shortened to 3 s here), as `run` gives.
    block = plugin_block("WdPost", "sleep", fail="hang")
    cfg = write_config(tmp_path, block + "MaxAttempts = 1\nCancelGraceSecs = 0.2\n")
    task = tmp_path / "task.json"
    task.write_bytes(jsonl.task_to_json(make_task(1)))
    short = {"window_post": 3.0, "winning_post": 3.0}
    dext = dext_with({"damocles_ext.commands.serve.DEFAULT_DEADLINE_AFTER": short})
    done = dext_run(
        "prove",
        "window_post",
        "--request",
        str(task),
        "-c",
        str(cfg),
        "--no-progress",
        dext=dext,
        timeout=30,
    )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    # (On a machine so loaded that the child has not started by then: before it could start.)
    assert re.search(r"passed its deadline|deadline passed", err), err
    assert "Traceback" not in err, err
    assert done.stdout == b""
