"""Clocks that step while coordinators and producers on one PostgreSQL run: this machine's wall
clock (NTP setting it), the database server's, a producer's machine off the server's. Each keeps
to the server's clock, and between its readings advances it by a clock that only moves forward."""

from __future__ import annotations

import base64
import re
import subprocess
import time
from functools import partial

import pytest
import trio
from helpers.coordinators import (
    SHORT_TIMEOUT,
    heartbeat_forever,
    no_longer_running,
    two_jobs_with_a_quick_heartbeat_timeout,
    what_they_said,
)
from helpers.frontend import CoordinatorProcess, dext_stepping, step_clock
from helpers.supervisor import wait_until
from test_jobs_rules import make_input

from damocles_ext.jobs.client import RpcClient
from damocles_ext.jobs.store import JobStore

# HeartbeatTimeout 3 s: the coordinators' sweeps 0.75 s apart.


@pytest.mark.parametrize("step", [-300.0, 300.0], ids=["back", "forward"])
async def test_a_step_of_the_coordinators_wall_clock_moves_no_stamp_and_loses_no_job(
    postgres_url, tmp_path, step
):
    # NTP steps the coordinator's machine's clock 300 s: it stamped and swept on its wall clock
    # plus the server's offset read before, until its next sweep read the server's clock again.
    # Back: the heartbeat that landed first moved the job's HeartbeatAt 300 s back, and that
    # sweep took the job back as silent while saying "no job is affected". Forward: the finish
    # of a job 120 s before its deadline was refused as past it (the proof thrown away), and
    # the answers' Date, which workers read deadlines by, was 300 s ahead. Between its readings
    # the coordinator advances the server's clock by the monotonic clock: the step moves nothing.
    (tmp_path / "sector-manager.cfg").write_text(SHORT_TIMEOUT)
    shift = tmp_path / "shift"
    with JobStore.open(postgres_url) as store:
        store.create(make_input(miner=1000), time.time(), not_after=time.time() + 120)
    c = CoordinatorProcess(postgres_url, "--conf-dir", str(tmp_path), dext=dext_stepping(shift))
    with what_they_said(c):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await c.start(nursery)
                client = RpcClient(f"127.0.0.1:{c.port}", timeout=30)
                (job,) = await client.call("Dext.AllocateJobs", {}, 1, "w1")
                held = [{"Id": job["Id"], "Lease": job["Lease"]}]
                step_clock(shift, step)
                # At once, before the coordinator's next sweep (0.75 s at most) sees the step.
                assert await client.call("Dext.HeartbeatJobs", held, "w1") == []
                assert client.server_date is not None
                assert abs(client.server_date + 0.5 - time.time()) < 3
                with JobStore.open(postgres_url, create=False) as store:
                    stamped = store.get(job["Id"]).HeartbeatAt
                assert abs(stamped - time.time()) < 3
                # The sweep that sees the step takes nothing back, and the proof is taken.
                await wait_until(lambda: b"the wall clock stepped" in c.stderr, timeout=30,
                                 what="the step seen by a sweep")  # fmt: skip
                assert await client.call("Dext.HeartbeatJobs", held, "w1") == []
                proof = base64.b64encode(b"a proof").decode()
                output = {"proofs": [proof], "faults": []}
                await client.call("Dext.FinishJob", job["Id"], job["Lease"], output, "")
                await client.aclose()
                nursery.cancel_scope.cancel()
        with JobStore.open(postgres_url, create=False) as store:
            done = store.get(job["Id"])
        finished = (done.State, done.cancelled, done.ErrorReason, done.TryNum)
        assert finished == ("finished", False, "", 1)
    said = c.stderr.decode()
    assert "keeps to the job store's server's clock, which does not follow it" in said, said
    assert "timed out" not in said and "Traceback" not in said, said


async def test_coordinators_keep_to_the_servers_clock_within_a_sweep_after_it_steps(
    postgres_url, tmp_path
):
    # NTP on the database host steps the server's clock back 300 s. Each coordinator read the
    # server's clock every 10 minutes from its own start: A, (re)started after the step, stamped
    # its workers' heartbeats 300 s behind the clock B swept with, and B's sweep took their jobs
    # back as silent, heartbeated all along. Each reads the server's clock before each sweep
    # pass, and counts its move as a step: only the silent job is taken back.
    server = tmp_path / "server-shift"
    conf = two_jobs_with_a_quick_heartbeat_timeout(postgres_url, tmp_path)
    a = CoordinatorProcess(postgres_url, *conf, dext=dext_stepping(server=server))
    b = CoordinatorProcess(postgres_url, *conf, dext=dext_stepping(server=server))
    with what_they_said(a, b):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await b.start(nursery)
                step_clock(server, -300.0)
                await a.start(nursery)  # reads the server's clock as it is now
                to_a = RpcClient(f"127.0.0.1:{a.port}", timeout=30)
                kept, silent = await to_a.call("Dext.AllocateJobs", {}, 2, "w1")
                held = [{"Id": kept["Id"], "Lease": kept["Lease"]}]
                nursery.start_soon(heartbeat_forever, to_a, held, "w1")
                # The silent job is taken back a timeout after it was given out: by then B had
                # swept four times, and on the old reading took the kept job back at its first.
                await wait_until(partial(no_longer_running, postgres_url, silent["Id"]),
                                 timeout=30, what="the silent job taken back")  # fmt: skip
                nursery.cancel_scope.cancel()
            await to_a.aclose()
        with JobStore.open(postgres_url, create=False) as store:
            job = store.get(kept["Id"])
        assert (job.State, job.lease, job.TryNum) == ("running", kept["Lease"], 1)
    said = b.stderr.decode()
    # (A reading is off by up to half its round trip: within a second on a loaded machine.)
    assert re.search(r"moved back by (299\.\d|300\.\d) s against this machine's monotonic", said), (
        said
    )
    assert "no running job is taken back for the step" in said, said
    assert b"Traceback" not in a.stderr + b.stderr


async def test_prove_jobs_on_a_machine_behind_the_server_gives_the_deadline_on_the_servers_clock(
    postgres_url, tmp_path
):
    # `prove --jobs --deadline 30` (the Python API's open_job_producer underneath) on a machine
    # 60 s behind the database server gave its job a deadline 30 s in the server's past: it was
    # cancelled at the next sweep, at a time still in the producer's future, and no clock was
    # warned of (only serve's producer compared them). Its deadlines are on the server's clock.
    from helpers.frontend import dext_env, dext_shifted
    from test_producer import finish_as_worker, stderr_until, task_in_store_a, to_the_end

    from damocles_ext.jobs import model
    from damocles_ext.protocol.jsonl import task_to_json

    root, task, job_id = task_in_store_a(tmp_path)
    (tmp_path / "task.json").write_bytes(task_to_json(task))
    argv = [*dext_shifted(-60.0), "prove", "window_post", "--request", str(tmp_path / "task.json"),
            "--jobs", postgres_url, "--store", f"a={root}", "--deadline", "30", "--no-progress",
            "--log-level", "info", "--poll-interval", "0.1"]  # fmt: skip
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dext_env()
    )
    seen = b""
    try:
        with trio.fail_after(60):
            seen = await stderr_until(process, f"job {job_id}: created".encode())
            with JobStore.open(postgres_url, create=False) as store:
                job = store.get(job_id)
            assert job is not None and job.not_after is not None
            assert abs(job.not_after - (time.time() + 30)) < 5, (job.not_after, time.time())
            await finish_as_worker(postgres_url, job_id, model.JobOutput(proofs=(b"p",), faults=()))
            out, seen = await to_the_end(process, seen)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    said = seen.decode()
    assert re.search(
        r"this machine's clock is (59\.\d|60\.\d) s behind the clock of the job", said
    ), said
    assert "this producer keeps to the server's clock" in said, said
    assert b'"proofs": ["cA=="]' in out or b'"proofs":["cA=="]' in out, out


@pytest.mark.parametrize("asked", [None, "60"])
def test_prove_jobs_gives_the_job_what_is_left_of_its_deadline_after_the_sectors_lookup(asked):
    # --deadline SECONDS (and the default) count from the command's start; the job's
    # deadline_after counts from the job's creation, after the sectors' lookup (up to a quarter
    # of the deadline): passed as it was asked, the job got that much longer than asked.
    import argparse

    from damocles_ext.commands.prove import _job_deadline
    from damocles_ext.commands.serve import DEFAULT_DEADLINE_AFTER

    seconds = DEFAULT_DEADLINE_AFTER["window_post"] if asked is None else float(asked)
    started = time.time() - 10.0  # the lookup took 10 s
    args = argparse.Namespace(deadline=asked, stage="window_post")
    given = _job_deadline(args, started + seconds)
    assert given["deadline"] is None
    assert given["deadline_after"] == pytest.approx(seconds - 10.0, abs=1.0)


def test_prove_jobs_gives_a_deadline_given_as_a_time_as_it_is():
    import argparse

    from damocles_ext.commands.prove import _job_deadline

    at = time.time() + 300.0
    args = argparse.Namespace(deadline="2030-01-01T00:00:00Z", stage="window_post")
    assert _job_deadline(args, at) == {"deadline": at, "deadline_after": None}
