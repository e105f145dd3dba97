"""A machine at its limit of tasks (`ulimit -u`, systemd's TasksMax): commands that cannot start
a thread or a process say what ran out and what to do, and survive it where they can, with real
processes run as a uid whose processes and threads are all held but a few (helpers/tasks_limit)."""

from __future__ import annotations

import subprocess

import pytest
import trio
from helpers.frontend import DEXT, ManagerLike, dext_env
from helpers.tasks_limit import a_uid_of_its_own, as_user, own_dir, skip_unless_possible, tasks_held
from test_producer import finish_and_expect_proofs, job_id_of, window_task


@pytest.fixture
def uid() -> int:
    skip_unless_possible()
    return a_uid_of_its_own()


def test_a_coordinator_that_cannot_start_a_thread_says_what_ran_out_without_a_traceback(
    uid, tmp_path
):
    store = own_dir(tmp_path / "svc", uid) / "jobs.db"
    argv = [*DEXT, "coordinator", "--jobs", f"sqlite:///{store}", "--listen", "127.0.0.1:0"]
    with tasks_held(uid, leave=1):  # its process, and no thread for its store
        done = subprocess.run(
            as_user(uid, argv), capture_output=True, timeout=60, env=dext_env(), check=False
        )
    err = done.stderr.decode()
    assert done.returncode == 1, err  # systemd's Restart=on-failure starts it again
    assert "Traceback" not in err, err
    assert f"damocles-ext coordinator: error: job store sqlite:///{store}: cannot start a" in err
    assert "ulimit -u" in err and "TasksMax" in err, err


async def test_serve_jobs_without_a_thread_for_its_store_waits_saying_why_then_proves(
    uid, tmp_path
):
    root = str(tmp_path / "s")
    task = window_task(root)
    job_id = job_id_of(task, {"a": root})
    url = f"sqlite:///{own_dir(tmp_path / 'svc', uid)}/jobs.db"
    argv = [*DEXT, "serve", "window_post", "--jobs", url, "--store", f"a={root}"]
    async with trio.open_nursery() as nursery:
        with tasks_held(uid, leave=1):  # its process; no thread for its store's calls
            m = await ManagerLike.start(
                nursery, as_user(uid, [*argv, "--poll-interval", "0.1"]), "window_post",
                stderr=subprocess.PIPE, ready_timeout=30,
            )  # fmt: skip
            request_id = await m.send(task)
            with trio.fail_after(30):
                line = await m.wait_log("the job store failed")
            assert "cannot start a thread" in line and "ulimit -u" in line, line
            assert request_id not in m.responses  # not answered with the error: it waits
        # Threads to be had again: the job is made, and its proof is the answer.
        with trio.fail_after(60):
            await m.wait_log(f"job {job_id}: created")
        await finish_and_expect_proofs(m, url, job_id, request_id)
        await m.close_stdin()
        with trio.fail_after(30):
            assert await m.process.wait() == 0
    assert not any("Traceback" in line for line in m.log), "\n".join(m.log)
