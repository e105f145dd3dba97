"""A job store that hangs rather than refuses (its host frozen, the network stalled: connections
open, no answer) or goes down, on the real PostgreSQL behind a proxy that stalls or cuts it
(helpers/stalling_proxy.py): every request is still answered, by its deadline at the latest,
and serve and the coordinator still stop when told to."""

from __future__ import annotations

import logging
import signal
import subprocess

import pytest
import trio
from helpers.frontend import DEXT, CoordinatorProcess, ManagerLike, dext_with
from helpers.stalling_proxy import StallingProxy
from helpers.supervisor import wait_until
from sqlalchemy.engine import make_url
from test_coordinator import heartbeat_body
from test_jobs_rules import make_input
from test_producer import finish_as_worker, send_until_created, stop, task_in_store_a

from damocles_ext.jobs import model
from damocles_ext.jobs.store import JobStore, StoreError, TrioJobStore

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

WATCHDOG = 90.0  # seconds after which a stalled proxy resumes whatever the test does


@pytest.fixture
async def proxy(postgres_server, nursery):
    proxy = StallingProxy(postgres_server.socket_dir)
    await nursery.start(proxy.serve)

    async def watchdog() -> None:
        # A regression must fail its test, not hang it: a call that cannot be given up on waits
        # for the store, so the store comes back after every test's own time limit.
        await trio.sleep(WATCHDOG)
        proxy.resume()

    nursery.start_soon(watchdog)
    try:
        yield proxy
    finally:
        proxy.resume()  # what is left waiting on it finishes


async def serve_a_job(nursery, proxy, postgres_url, tmp_path, *args: str, dext=DEXT):
    """`serve window_post --jobs` through the proxy, polling every 0.2 s, with a request whose
    job it made: (serve, the request's id, the job's id). `dext`: DEXT or `dext_with(...)`'s."""
    root, task, job_id = task_in_store_a(tmp_path)
    argv = [*dext, "serve", "window_post", "--jobs", proxy.url(postgres_url), "--store",
            f"a={root}", "--poll-interval", "0.2", *args]  # fmt: skip
    m = await ManagerLike.start(
        nursery, argv, "window_post", stderr=subprocess.PIPE, ready_timeout=30
    )
    await m.wait_log("serving window_post through the job store")  # its signals are handled
    return m, await send_until_created(m, task, job_id), job_id


async def test_a_call_the_store_does_not_answer_fails_after_its_timeout_and_a_cancelled_one_returns(
    proxy, postgres_url
):
    store = await trio.to_thread.run_sync(JobStore.open, proxy.url(postgres_url))
    try:
        with trio.fail_after(60):  # (without the fix: stuck until the proxy resumes, at the end)
            jobs = TrioJobStore(store, call_timeout=1.0)
            job, _ = await jobs.create(make_input())
            proxy.stall()
            with pytest.raises(
                StoreError, match=r"no answer to get within 1 s; the database hangs"
            ):
                await jobs.get(job.Id)
            with trio.move_on_after(0.2) as cancelled:  # a deadline, a shutdown
                await jobs.get(job.Id)
            assert cancelled.cancelled_caught
            proxy.resume()
            jobs.call_timeout = 30.0
            again = await jobs.get(job.Id)
            assert again is not None and again.Id == job.Id
    finally:
        proxy.resume()
        await trio.to_thread.run_sync(store.close)


async def test_an_allocation_the_store_does_not_answer_fails_after_its_timeout_as_unavailable(
    proxy, postgres_url
):
    # The store's allocate is called through a functools.partial, which has no __name__: its
    # timeout's message raised AttributeError (an "internal error" and a traceback for the
    # worker's call, no outage told to the hearing) instead of StoreUnavailable.
    from damocles_ext.jobs import rules
    from damocles_ext.jobs.store import StoreUnavailable

    store = await trio.to_thread.run_sync(JobStore.open, proxy.url(postgres_url))
    try:
        jobs = TrioJobStore(store, call_timeout=1.0)
        await jobs.create(make_input())
        proxy.stall()
        with trio.fail_after(60), pytest.raises(StoreUnavailable, match=r"no answer to allocate "):
            await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
    finally:
        proxy.resume()
        await trio.to_thread.run_sync(store.close)


async def test_a_heartbeat_that_waited_through_a_stall_costs_its_job_no_try(proxy, postgres_url):
    # The heartbeat is stamped with the time it was sent, and lands 40 s later (a stall shorter
    # than the call timeout): the sweep after it does not take the job back for those 40 s.
    from damocles_ext.frontends.coordinator import Coordinator
    from damocles_ext.jobs import rules

    store = await trio.to_thread.run_sync(JobStore.open, proxy.url(postgres_url))
    try:
        now = [1_700_000_000.0]
        jobs = TrioJobStore(store, clock=lambda: now[0], monotonic=lambda: now[0])
        coordinator = Coordinator(jobs, monotonic=lambda: now[0])
        job, _ = await jobs.create(make_input())
        await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
        now[0] += 3
        beat = heartbeat_body([job.Id], "worker-a")
        answered: list[bytes] = []
        with trio.fail_after(60):
            proxy.stall()
            async with trio.open_nursery() as nursery:

                async def heartbeat() -> None:
                    answered.append((await coordinator.answer(beat))[1])

                nursery.start_soon(heartbeat)
                await proxy.holding()
                now[0] += 40
                proxy.resume()
            assert b'"result"' in answered[0], answered
            now[0] += 1
            outcome = await coordinator.sweep_once()
        assert not any(isinstance(e, rules.TimedOut) for e in outcome.effects), outcome.effects
        assert (await jobs.get(job.Id)).State == "running"
    finally:
        proxy.resume()
        await trio.to_thread.run_sync(store.close)


async def jumped(mock_clock, seconds: float) -> None:
    """Move the mock clock `seconds` on, and let every task act on it until all wait again."""
    mock_clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


def stall_lines(caplog) -> list[str]:
    """The coordinator's lines about its store's stalls, in order."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "damocles_ext.coordinator" and r.getMessage().startswith("the job store ")
    ]


async def test_a_store_call_that_stalls_is_warned_within_seconds_naming_the_store_and_the_method(
    proxy, postgres_url, caplog, mock_clock
):
    # A worker's heartbeat waits on a stalled store: the coordinator said nothing for a minute
    # (the sweep's "database hangs", at its call timeout), while the worker's own call timed out
    # after 10 s saying the coordinator was overloaded or stuck. Now one warning once the call
    # has waited SLOW_CALL (5 s), naming the store and the method, and one line when the store
    # answers again. The time moves only in the test's jumps.
    from damocles_ext.frontends.coordinator import Coordinator
    from damocles_ext.jobs import rules

    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    # With a password (the test server trusts its socket): the warning does not show it.
    url = make_url(proxy.url(postgres_url)).set(password="s3cret")
    store = await trio.to_thread.run_sync(JobStore.open, url.render_as_string(hide_password=False))
    try:
        jobs = TrioJobStore(store)
        coordinator = Coordinator(jobs, watch_clocks=False)
        job, _ = await jobs.create(make_input())
        await jobs.allocate(rules.AllocationSpec(), 1, "worker-a")
        beat = heartbeat_body([job.Id], "worker-a")
        answered = trio.Event()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(coordinator.sweep_forever, 3600.0)  # no pass in the test
                proxy.stall()

                async def heartbeat() -> None:
                    assert b'"result"' in (await coordinator.answer(beat))[1]
                    answered.set()

                nursery.start_soon(heartbeat)
                await proxy.holding()
                await jumped(mock_clock, 4)
                assert stall_lines(caplog) == []  # (4 s: not yet)
                await jumped(mock_clock, 2)
                [warning] = stall_lines(caplog)
                await jumped(mock_clock, 30)  # once per stall
                assert stall_lines(caplog) == [warning]
                proxy.resume()
                await answered.wait()
                await jumped(mock_clock, 1)
                nursery.cancel_scope.cancel()
    finally:
        proxy.resume()
        await trio.to_thread.run_sync(store.close)
    assert warning.startswith(
        f"the job store {store.where} has not answered Venus.WdPoStHeartbeatJobs (its heartbeat"
        " call) for 6 s: its database is stalled or very slow"
    ), warning
    assert "s3cret" not in warning and "a line says when it answers again" in warning
    again = f"the job store {store.where} answers again, after a stall of 36 s"
    assert stall_lines(caplog) == [warning, again]
    [record] = [r for r in caplog.records if r.getMessage() == warning]
    assert record.levelno == logging.WARNING


async def test_a_sweep_that_waits_on_a_stalled_store_is_warned_once_per_stall(
    proxy, postgres_url, caplog, mock_clock
):
    from damocles_ext.frontends.coordinator import Coordinator

    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    store = await trio.to_thread.run_sync(JobStore.open, proxy.url(postgres_url))
    try:
        coordinator = Coordinator(TrioJobStore(store), watch_clocks=False)
        sweep, swept = coordinator.sweep_once, [trio.Event()]

        async def counted():  # the real pass, told
            try:
                return await sweep()
            finally:
                swept[0].set()

        coordinator.sweep_once = counted
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(coordinator.sweep_forever, 10.0)
                for stall in range(2):
                    proxy.stall()
                    swept[0] = trio.Event()
                    mock_clock.jump(10)  # the next pass, stuck
                    await proxy.holding()
                    await jumped(mock_clock, 6)
                    assert len(stall_lines(caplog)) == 2 * stall + 1, stall_lines(caplog)
                    proxy.resume()
                    await swept[0].wait()
                    await jumped(mock_clock, 1)
                nursery.cancel_scope.cancel()
    finally:
        proxy.resume()
        await trio.to_thread.run_sync(store.close)
    lines = stall_lines(caplog)
    assert len(lines) == 4, lines
    for warning, again in (lines[0:2], lines[2:4]):
        assert warning.startswith(
            f"the job store {store.where} has not answered the sweep (its sweep call) for 6 s:"
        ), warning
        assert again == f"the job store {store.where} answers again, after a stall of 6 s"


async def test_a_workers_call_held_up_by_a_stalled_store_times_out_naming_the_job_store(
    proxy, postgres_url, mock_clock
):
    # The worker's timeout said only "check that the server is not overloaded or stuck": the
    # operator looked at the coordinator process, not at its database.
    from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
    from damocles_ext.jobs.client import RpcClient, RpcTimeout

    store = await trio.to_thread.run_sync(JobStore.open, proxy.url(postgres_url))
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                server = CoordinatorServer(Coordinator(TrioJobStore(store)), "127.0.0.1", 0)
                await nursery.start(server.serve)
                proxy.stall()
                said: list[str] = []
                client = RpcClient(f"127.0.0.1:{server.port}", timeout=10)
                async with client, trio.open_nursery() as calling:

                    async def call() -> None:
                        with pytest.raises(RpcTimeout) as caught:
                            await client.call("Venus.WdPoStAllJobs")
                        said.append(str(caught.value))

                    calling.start_soon(call)
                    await proxy.holding()  # the call waits on the store
                    mock_clock.jump(10)
                proxy.resume()
                nursery.cancel_scope.cancel()
    finally:
        proxy.resume()
        await trio.to_thread.run_sync(store.close)
    assert said == [
        (
            f"no answer from http://127.0.0.1:{server.port}/rpc/v0 to Venus.WdPoStAllJobs within"
            " 10 s; check that the server is not overloaded or stuck; a damocles-ext coordinator"
            " may be waiting on its job store (its log warns of a store call that has waited"
            " 5 s): then check the database"
        )
    ]


async def test_serve_answers_a_request_by_its_deadline_when_the_store_hangs(
    proxy, postgres_url, tmp_path
):
    # LATE_LOOK at 0.5 s, not 5: the look that hangs is given up on sooner.
    late_look = 0.5
    dext = dext_with({"damocles_ext.frontends.producer.LATE_LOOK": late_look})
    async with trio.open_nursery() as nursery:
        m, request_id, job_id = await serve_a_job(nursery, proxy, postgres_url, tmp_path,
                                                  "--deadline-after", "4s", dext=dext)  # fmt: skip
        proxy.stall()
        # Answered while the store still hangs: at the deadline, or LATE_LOOK after it.
        with trio.fail_after(4 + late_look + 20):
            response = await m.wait(request_id)
        assert response.output is None
        assert f"job {job_id}: the job store " in response.err_msg
        assert "did not answer by the job's deadline, nor 0.5 s after it" in response.err_msg
        proxy.resume()
        await stop(m)


async def test_a_job_finished_before_its_deadline_and_read_just_after_it_is_still_its_proof(
    proxy, postgres_url, tmp_path
):
    # The look that would find it finished is slow (the store stalled across the deadline, for
    # less than LATE_LOOK): the request gets the proof, not a complaint about the store.
    async with trio.open_nursery() as nursery:
        m, request_id, job_id = await serve_a_job(nursery, proxy, postgres_url, tmp_path,
                                                  "--deadline-after", "4s")  # fmt: skip
        deadline = trio.current_time() + 4  # (a little later than serve's own)
        proxy.stall()
        with trio.fail_after(10):
            await proxy.holding()  # serve's next look is under way, and stuck
        # A worker finishes it (straight to the database) before the deadline.
        await finish_as_worker(postgres_url, job_id, model.JobOutput(proofs=(b"p",), faults=()))
        await trio.sleep_until(deadline + 1)  # the deadline passes during the look
        proxy.resume()
        with trio.fail_after(30):
            response = await m.wait(request_id)
        assert response.err_msg is None and response.output.proofs == [b"p"]
        await stop(m)


async def test_serve_stops_at_a_second_signal_while_the_store_hangs_answering_every_request(
    proxy, postgres_url, tmp_path
):
    async with trio.open_nursery() as nursery:
        m, request_id, _ = await serve_a_job(nursery, proxy, postgres_url, tmp_path,
                                             "--shutdown-grace", "60")  # fmt: skip
        proxy.stall()
        m.process.send_signal(signal.SIGTERM)
        await m.wait_log("SIGTERM: shutting down gracefully")
        m.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            response = await m.wait(request_id)
            assert await m.process.wait() == 0
    assert "damocles-ext serve stopped at once (second signal)" in response.err_msg
    assert any("stopped: 1 requests read, 1 answered" in line for line in m.log), m.log


async def test_a_coordinator_stops_when_told_while_the_store_hangs(proxy, postgres_url):
    from test_coordinator import Client

    # A short grace: what it bounds is the point, not its default (STOP_GRACE, 10 s).
    coordinator = CoordinatorProcess(proxy.url(postgres_url), "--shutdown-grace", "1")
    async with trio.open_nursery() as nursery:
        await coordinator.start(nursery)
        assert coordinator.proc is not None
        try:
            proxy.stall()
            # A call under way, stuck on the store (this RPC call, or the sweep: either one
            # held the coordinator until the store came back before).
            client = Client(await trio.open_tcp_stream("127.0.0.1", coordinator.port))
            body = b'{"jsonrpc":"2.0","method":"Venus.WdPoStAllJobs","params":[],"id":1}'
            cut = trio.Event()

            async def call() -> None:
                # Cut at the end of the grace, unanswered: closed, or reset when the process
                # exits with the request's bytes still unread in its socket (the kernel's RST).
                with pytest.raises(Exception, match=r"ConnectionClosed|Connection reset by peer"):
                    await client.post(body)
                cut.set()

            nursery.start_soon(call)
            await proxy.holding()  # a call of the coordinator's stuck on the store
            coordinator.proc.send_signal(signal.SIGTERM)
            # The grace ends the call, and the coordinator, even with the store stuck.
            with trio.fail_after(1 + 20):
                assert await coordinator.proc.wait() == 0
                await cut.wait()
        finally:
            coordinator.stop()
    lines = coordinator.stderr.decode().splitlines()
    assert lines[-1].endswith("damocles_ext.coordinator: stopped"), lines
    assert not any("Traceback" in line for line in lines), lines


async def test_a_store_down_until_the_deadline_is_answered_at_it_not_a_backoff_later(
    proxy, postgres_url, tmp_path
):
    async with trio.open_nursery() as nursery:
        # Its looks fail from the cut on, with backoffs of 0.5, 1 and 2 s (3.5 s), then 4 s: the
        # one that ends past the deadline would end 7.5 s after the cut at the earliest. Cut to
        # the deadline, it ends at 5 s from the request (before `sent`), 2 s of load allowed.
        m, request_id, _ = await serve_a_job(nursery, proxy, postgres_url, tmp_path,
                                             "--deadline-after", "5s")  # fmt: skip
        sent = trio.current_time()
        proxy.cut()
        with trio.fail_after(30):
            response = await m.wait(request_id)
        print(f"answered {trio.current_time() - sent:.2f} s after the cut")
        assert trio.current_time() - sent < 5 + 2
        assert "the job store failed until the job's deadline passed" in response.err_msg
        proxy.resume()
        await stop(m)


def lock_waits(conn) -> bool:
    """Whether a session of this database waits on a lock (a start held by the test's lock)."""
    waiting = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    return conn.execute(waiting).fetchone() == (1,)


async def test_serve_listen_stops_at_stdin_eof_while_its_first_sweep_waits_on_the_store(
    postgres_url, nursery
):
    # serve --jobs --listen, its ready line out: its coordinator's first sweep waits on the
    # jobs' table, locked by another session. stdin (and its signals) were read only once that
    # pass was over, up to a minute a store call: damocles-manager stopping it went unheard.
    import psycopg

    from damocles_ext.jobs.database import jobs

    JobStore.open(postgres_url).close()
    conn_url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    argv = [*DEXT, "serve", "window_post", "--jobs", postgres_url, "--listen", "127.0.0.1:0"]
    with psycopg.connect(conn_url) as locker:
        locker.execute(f"LOCK TABLE {jobs.name} IN ACCESS EXCLUSIVE MODE")
        m = await ManagerLike.start(nursery, argv, "window_post", stderr=subprocess.PIPE)
        with psycopg.connect(conn_url, autocommit=True) as watcher:
            await wait_until(lambda: lock_waits(watcher), timeout=30,
                             what="the first sweep waiting on the lock")  # fmt: skip
        await m.close_stdin()
        with trio.fail_after(20):
            assert await m.process.wait() == 0
        await m.wait_log("stopped")
    # Heard at once, not once the store gave up on the lock (its lock_timeout) and the pass failed.
    assert not [line for line in m.log if "lock_timeout" in line], m.log


async def test_a_coordinator_stops_when_told_while_its_start_waits_on_the_store(postgres_url):
    # The jobs' table locked by another session (a migration, an operator's transaction): the
    # coordinator's start waits on it (learning the sectors of the jobs in the store, the first
    # sweep). Its signals were read only once the start was over, up to a minute a store call
    # (and the one pending then was raised again as trio's receiver closed: killed by it, -15):
    # now it stops gracefully at once, the lock still held.
    import psycopg

    from damocles_ext.jobs.database import jobs

    with JobStore.open(postgres_url) as store:
        store.create(make_input(), 1_700_000_000.0)
    conn_url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conn_url) as locker:
        locker.execute(f"LOCK TABLE {jobs.name} IN ACCESS EXCLUSIVE MODE")
        proc = await trio.lowlevel.open_process(
            [*DEXT, "coordinator", "--jobs", postgres_url, "--listen", "127.0.0.1:0",
             "--shutdown-grace", "30"],
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            with psycopg.connect(conn_url, autocommit=True) as watcher:
                await wait_until(lambda: lock_waits(watcher), timeout=30,
                                 what="the coordinator's start waiting on the lock")  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            assert proc.stderr is not None
            said = (await proc.stderr.receive_some(1 << 20)).decode()
    assert said.splitlines()[-1].endswith("damocles_ext.coordinator: stopped"), said
    assert "Traceback" not in said, said
