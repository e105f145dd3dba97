"""Why each sector is faulty reaches the operator's log: a WindowPoSt's answer holds the faulty
sectors' numbers only, so the reference provers say each one's reason in their log (the child's
stderr, relayed by the supervisor) and the supervisor warns once per request answered with
faults, naming them. Real children and real `serve` throughout."""

from __future__ import annotations

import logging
import os
import time

import msgspec
import pytest
import trio
from helpers.frontend import DEXT, ManagerLike, plugin_block, write_config
from helpers.post import sectors
from helpers.supervisor import builtin_child, spec

from damocles_ext.api import open_supervisor
from damocles_ext.post.fixtures import window_task
from damocles_ext.tasks import WindowPoSt, WindowPoStOutput

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

SEED = bytes(range(32))


def a_lost_and_a_mismatched_sector(tmp_path) -> tuple[WindowPoSt, int, int, str]:
    """A task of 4 sectors: the sealed file of the first is gone (a lost file), the third's
    comm_r in the task is not its own (its files read fine). Returns the task, the two sector
    numbers and the lost file's path."""
    manifest = sectors(tmp_path / "s", "StackedDrgWindow2KiBV1_2", 4, random_seed=11)
    lost, mismatched = manifest.replicas[0], manifest.replicas[2]
    os.unlink(lost.sealed_file)
    task = window_task(manifest, SEED)
    replicas = [
        msgspec.structs.replace(r, comm_r=bytes(32)) if r.sector_id == mismatched.sector_id else r
        for r in task.replicas
    ]
    task = msgspec.structs.replace(task, replicas=replicas)
    return task, lost.sector_id, mismatched.sector_id, lost.sealed_file


@pytest.mark.parametrize(
    "prover", [("python-ref",), ("native", "gpu_lock=false")], ids=lambda p: p[0]
)
async def test_the_supervisors_log_says_why_each_sector_is_faulty_and_warns_once_naming_them(
    tmp_path, caplog, prover
):
    # The reasons were worked out by the provers and dropped: the log held no sector number nor
    # reason, and a lost file could not be told from a comm_r that does not match.
    caplog.set_level(logging.INFO, "damocles_ext")
    task, lost, mismatched, lost_path = a_lost_and_a_mismatched_sector(tmp_path)
    async with open_supervisor([spec(builtin_child("window_post", *prover))]) as sup:
        await sup.wait_ready("window_post")
        output = await sup.submit(task, deadline=time.time() + 60)
    # (The children are stopped: what they wrote on stderr has been relayed.)
    assert output == WindowPoStOutput(proofs=[], faults=[lost, mismatched])
    text = caplog.text
    assert f"sector {lost} is faulty: cannot open sealed file {lost_path}: No such file" in text
    assert f"sector {mismatched} is faulty: comm_r of sector {mismatched} does not match" in text
    assert text.count(" is faulty: ") == 2, text  # once each
    [warning] = [r for r in caplog.records if getattr(r, "faults", None) is not None]
    assert warning.levelno == logging.WARNING and warning.faults == 2
    assert warning.getMessage() == (
        f"request {warning.request_id} (window_post): 2 faulty sectors, no proof: {lost},"
        f" {mismatched}; the log lines of window_post#0 (pid {warning.pid}) say why"
    )


async def test_serve_names_the_faulty_sectors_and_why_on_its_stderr(tmp_path, stderr_file):
    # A request answered {"faults": [...]} left nothing in serve's log but "1 answered".
    task, lost, mismatched, lost_path = a_lost_and_a_mismatched_sector(tmp_path)
    cfg = write_config(tmp_path, plugin_block("WdPost", "python-ref"))
    async with trio.open_nursery() as nursery:
        m = await ManagerLike.start(
            nursery, [*DEXT, "serve", "window_post", "-c", str(cfg)], "window_post",
            stderr=stderr_file,
        )  # fmt: skip
        with trio.fail_after(60):
            answer = await m.wait(await m.send(task))
            await m.close_stdin()
            assert await m.process.wait() == 0
    assert answer.err_msg is None and answer.output.faults == [lost, mismatched]
    stderr_file.seek(0)
    log = stderr_file.read().decode(errors="replace")
    assert f"sector {lost} is faulty: cannot open sealed file {lost_path}" in log, log
    assert f"sector {mismatched} is faulty: comm_r of sector {mismatched} does not match" in log
    assert (
        f"WARNING damocles_ext.supervisor: request 1 (window_post): 2 faulty sectors, no proof:"
        f" {lost}, {mismatched}; the log lines of window_post#0 (pid "
    ) in log, log


async def test_the_faults_note_is_dropped_only_by_a_supervisor_whose_front_end_says_them(
    tmp_path, caplog
):
    # Two supervisors in one process (a worker, and an API user's own): the worker's says a
    # job's faults on its own line, the other's note must still be logged. (A switch for the
    # whole process dropped both.)
    caplog.set_level(logging.INFO, "damocles_ext.supervisor")
    task, lost, mismatched, _ = a_lost_and_a_mismatched_sector(tmp_path)
    child = [spec(builtin_child("window_post", "python-ref"))]
    async with (
        open_supervisor(child, faults_said_elsewhere=True) as quiet,
        open_supervisor(child) as plain,
    ):
        for sup in (quiet, plain):
            await sup.wait_ready("window_post")
            output = await sup.submit(task, deadline=time.time() + 60)
            assert output.faults == [lost, mismatched]
        pids = {s: s.statistics().children[0].pid for s in (quiet, plain)}
    [note] = [r for r in caplog.records if getattr(r, "faults", None) is not None]
    assert note.faults == 2 and note.pid == pids[plain] != pids[quiet], note.__dict__
