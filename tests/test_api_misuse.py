"""The Python API used the ways an integrator gets it wrong: each is a UsageError that says what
to do, and the supervisor goes on as if nothing had been called."""

from __future__ import annotations

import asyncio
import copy
import datetime
import math
import pickle
import time

import msgspec
import pytest
import trio
from damocles_ext_plugins.testing import echo_output
from helpers.supervisor import builtin_child, python_child, spec, window_task

from damocles_ext.api import Supervisor, open_job_producer, open_supervisor
from damocles_ext.client import ReconnectingClient, connect, submit_sync
from damocles_ext.config import ConfigError
from damocles_ext.errors import ProverError, UsageError
from damocles_ext.frontends.control import ControlServer, bind_control_socket
from damocles_ext.jobs.client import RpcCallError, RpcConnectionError
from damocles_ext.jobs.store import JobNotFound, JobStore
from damocles_ext.protocol import dext
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


async def test_a_supervisor_called_from_another_thread_refuses_and_books_nothing():
    async with open_supervisor([spec(builtin_child("window_post", "echo"))]) as sup:
        await sup.wait_ready()

        def from_another_thread() -> None:
            # trio.run in a thread of its own: once, the request went to a child and its proof
            # ran while its caller got trio's AssertionError.
            with pytest.raises(UsageError, match=r"another trio run.*trio\.from_thread\.run"):
                trio.run(sup.submit, window_task())
            with pytest.raises(UsageError, match="another trio run"):
                trio.run(sup.wait_changed)
            # Once, this set the shutdown event without waking run(): leaving the block hung.
            with pytest.raises(UsageError, match="outside any trio run"):
                sup.request_shutdown()

        await trio.to_thread.run_sync(from_another_thread)
        stats = sup.statistics()
        assert stats.requests == 0 and not stats.shutting_down
        assert [c.done for c in stats.children] == [0]
        assert await sup.submit(window_task()) == echo_output(window_task())
        # What trio.from_thread.run sends to the supervisor's own run works.
        token = trio.lowlevel.current_trio_token()
        output = await trio.to_thread.run_sync(
            lambda: trio.from_thread.run(sup.submit, window_task(), trio_token=token)
        )
        assert output == echo_output(window_task())
    assert sup.shutting_down


async def test_a_supervisor_with_no_run_going_says_so_instead_of_hanging(autojump_clock):
    sup = Supervisor([spec(builtin_child("window_post", "echo"))])
    no_run = r"no run\(\) of this Supervisor is going.*await nursery\.start\(sup\.run\)"
    with trio.fail_after(60):  # on the mock clock
        # Once, each waited for ever: the request was booked, but only run() heeds deadlines.
        with pytest.raises(UsageError, match=r"Supervisor\.submit\(\) was called while " + no_run):
            await sup.submit(window_task(), deadline=time.time() + 1)
        with pytest.raises(UsageError, match=r"Supervisor\.wait_ready\(\) was called while"):
            await sup.wait_ready()
        with pytest.raises(UsageError, match=r"Supervisor\.wait_changed\(\) was called while"):
            await sup.wait_changed()
        # Its callback form, synchronous, cannot wait for a run() about to begin: refused.
        with pytest.raises(UsageError, match=r"Supervisor\.start_nowait\(\) was called while"):
            sup.start_nowait(window_task(), on_done=lambda output, error: None)
    assert sup.statistics().requests == 0


async def test_a_supervisor_run_started_just_before_serves_what_is_asked_at_once():
    sup = Supervisor([spec(builtin_child("window_post", "echo"))])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)  # not begun yet when submit is called: waited for
            assert await sup.submit(window_task()) == echo_output(window_task())
            await sup.wait_ready()
            sup.request_shutdown()
        # A run() that ended is no run() still to come: refused at once, as before.
        with pytest.raises(ProverError, match="refused: the supervisor has stopped"):
            await sup.submit(window_task())
        with pytest.raises(ProverError, match="cannot wait for 1 ready children"):
            await sup.wait_ready()


async def test_statistics_from_a_thread_says_where_to_call_it():
    async with open_supervisor([spec(builtin_child("window_post", "echo"))]) as sup:

        async def stats_in_another_run() -> None:
            sup.statistics()

        def from_another_thread() -> None:
            # Once, trio's own RuntimeError: "must be called from async context".
            with pytest.raises(UsageError, match=r"statistics\(\) was called outside any trio"):
                sup.statistics()
            with pytest.raises(UsageError, match=r"statistics\(\) was called from another trio"):
                trio.run(stats_in_another_run)

        await trio.to_thread.run_sync(from_another_thread)
        assert [c.name for c in sup.statistics().children] == ["window_post#0"]


def test_open_supervisor_from_asyncio_says_the_api_runs_on_trio():
    async def main() -> None:
        async with open_supervisor([spec(builtin_child("window_post", "echo"))]):
            pass  # pragma: no cover - never reached

    with pytest.raises(UsageError, match=r"outside any trio run.*trio\.run"):
        asyncio.run(main())


def test_open_job_producer_from_asyncio_says_the_api_runs_on_trio(tmp_path):
    # Once, it said no thread could be started and to raise this user's limit of tasks.
    async def main() -> None:
        async with open_job_producer(f"sqlite:///{tmp_path}/jobs.db"):
            pass  # pragma: no cover - never reached

    with pytest.raises(UsageError, match=r"open_job_producer\(\) was called outside any trio run"):
        asyncio.run(main())
    assert not (tmp_path / "jobs.db").exists()


async def echo_submit(task, *, deadline=None, priority=0, on_progress=None):
    return echo_output(task)


async def test_a_client_called_from_another_thread_refuses_instead_of_hanging(sock_dir, nursery):
    server = ControlServer(bind_control_socket(sock_dir / "control.sock"), echo_submit)
    await nursery.start(server.serve)
    remote = ReconnectingClient(server.path)
    await remote.connect()
    nursery.start_soon(remote.run)
    async with connect(server.path) as client:

        def from_another_thread() -> None:
            # Once, this waited for ever: the answer came to the connection's own trio run.
            with pytest.raises(UsageError, match=r"Client\.submit\(\).*another trio run"):
                trio.run(client.submit, window_task())
            with pytest.raises(UsageError, match="another trio run"):
                trio.run(client.status)
            with pytest.raises(UsageError, match=r"ReconnectingClient\.submit\(\)"):
                trio.run(remote.submit, window_task())

        with trio.fail_after(10):
            await trio.to_thread.run_sync(from_another_thread)
            assert await client.submit(window_task()) == echo_output(window_task())
            assert await remote.submit(window_task()) == echo_output(window_task())
    await remote.aclose()


async def test_a_client_submit_already_cancelled_sends_nothing(sock_dir, nursery):
    server = ControlServer(bind_control_socket(sock_dir / "control.sock"), echo_submit)
    await nursery.start(server.serve)
    async with connect(server.path) as client:
        with trio.fail_after(10):
            with trio.CancelScope() as scope:
                scope.cancel()
                # Once, the request was written (and a Cancel after it): the proof could start.
                await client.submit(window_task(miner=1))
            assert scope.cancelled_caught
            # The server reads a connection in order: once the next is answered, it has read
            # all that came before it.
            assert await client.submit(window_task(miner=2)) == echo_output(window_task(miner=2))
            assert server.statistics().requests == 1


async def test_a_reconnecting_client_with_no_run_going_says_so_instead_of_hanging(
    sock_dir, nursery, autojump_clock
):
    server = ControlServer(bind_control_socket(sock_dir / "control.sock"), echo_submit)
    await nursery.start(server.serve)
    remote = ReconnectingClient(server.path)
    await remote.connect()
    with trio.fail_after(60):  # on the mock clock
        # Once, the request waited for ever, never written: run() writes and reads.
        with pytest.raises(UsageError, match=r"no run\(\) is going.*start_soon\(remote\.run\)"):
            await remote.submit(window_task())
        async with trio.open_nursery() as readers:
            readers.start_soon(remote.run)  # not begun yet when submit is called: waited for
            assert await remote.submit(window_task()) == echo_output(window_task())
            readers.cancel_scope.cancel()
        with pytest.raises(UsageError, match=r"no run\(\) is going"):
            await remote.status()
        # The run() after one that ended is waited for too (once, it was taken as begun).
        async with trio.open_nursery() as asking:
            answers = []

            async def ask() -> None:
                answers.append(await remote.submit(window_task()))
                asking.cancel_scope.cancel()

            asking.start_soon(ask)
            await trio.sleep(1)  # on the mock clock: within CONNECT_TIMEOUT
            asking.start_soon(remote.run)
        assert answers == [echo_output(window_task())]
    await remote.aclose()


def test_connect_from_asyncio_says_the_api_runs_on_trio(sock_dir):
    async def main() -> None:
        async with connect(sock_dir / "control.sock"):
            pass  # pragma: no cover - never reached

    with pytest.raises(UsageError, match=r"connect\(\) was called outside any trio run"):
        asyncio.run(main())


async def test_submit_sync_within_a_trio_run_says_to_use_connect(sock_dir):
    with pytest.raises(UsageError, match=r"within a trio run.*async with .*connect\(\)"):
        submit_sync(window_task(), socket_path=sock_dir / "control.sock")


@pytest.mark.parametrize(
    ("replica", "problem"),
    [
        (PoStReplicaInfo(2**64, bytes(32), "/c", "/s"), "serialize ints"),
        (PoStReplicaInfo(1, bytes(32), "/c\udcff", "/s"), "surrogates not allowed"),
    ],
)
async def test_a_task_no_child_could_be_sent_is_refused_at_once_not_when_a_child_is_free(
    replica, problem
):
    # Once, it waited in the queue for a free child (here: one never ready) and then failed as
    # a prover's error.
    never_ready = spec(python_child("import time; time.sleep(60)"), ready_timeout=60.0)
    async with open_supervisor([never_ready]) as sup:
        task = msgspec.structs.replace(window_task(), replicas=[replica])
        with trio.fail_after(10):
            with pytest.raises(UsageError, match=f"request 1 cannot be sent: .*{problem}.*valid"):
                await sup.submit(task)
        assert sup.statistics().requests == 0
        sup.request_shutdown()


async def test_waiting_for_more_ready_children_than_configured_says_how_many_there_are():
    async with open_supervisor([spec(builtin_child("window_post", "echo"))]) as sup:
        # Once, it said "none configured" of a stage that had its one child.
        with pytest.raises(ProverError, match=r"only 1 of 1 can still start \(the config has 1\)"):
            await sup.wait_ready("window_post", 2)
        with pytest.raises(ProverError, match=r"only 0 of 0 .*\(none configured\)"):
            await sup.wait_ready("winning_post")


async def test_waiting_after_a_run_cancelled_says_the_child_never_became_ready():
    never_ready = spec(python_child("import time; time.sleep(60)"), ready_timeout=60.0)
    sup = Supervisor([never_ready], stop_timeout=1.0)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            nursery.cancel_scope.cancel()
        # Once: "window_post#0 is stopped, last: None".
        with pytest.raises(
            ProverError, match=r"\(window_post#0 is stopped, it never became ready\)"
        ):
            await sup.wait_ready()


@pytest.mark.parametrize("count", ["2", 0, -1, 1.5, True, None])
async def test_waiting_for_a_count_that_is_no_number_of_children_says_so(count):
    # Once, "2" was a bare TypeError from a comparison, and 0 or -1 returned at once.
    async with open_supervisor([spec(builtin_child("window_post", "echo"))]) as sup:
        with pytest.raises(UsageError, match=r"wait_ready: count must be a whole number.*got"):
            await sup.wait_ready(count=count)
        sup.request_shutdown()


async def test_the_apis_errors_survive_pickling_with_their_message_and_fields(tmp_path):
    # Pickled (a multiprocessing pool, concurrent.futures) or copied, an error is made again as
    # cls(*args): once, that raised TypeError for those whose __init__ takes more than the
    # message, and JobNotFound's message was wrapped in itself.
    bad = tmp_path / "ext-prover.cfg"
    bad.write_text("[[WdPost]]\nConcurent = 2\n")
    with pytest.raises(ConfigError) as raised:
        async with open_supervisor(bad):
            pass  # pragma: no cover - never reached
    errors = [
        raised.value,
        JobNotFound("3VsCrq5syFF"),
        RpcConnectionError("refused", url="http://h:1/rpc/v0", method="Venus.X", sent=False),
        RpcCallError(1, "no such job", url="http://h:1/rpc/v0", method="Venus.X", status=200),
        dext.FrameTooLarge(70_000_000, 16 << 20),  # what a Refusal is made of
    ]
    for error in errors:
        for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
            assert type(again) is type(error)
            assert str(again) == str(error) and vars(again) == vars(error)
    assert pickle.loads(pickle.dumps(raised.value)).errors == raised.value.errors


def job_task(root: str, **fields: object) -> WindowPoSt:
    """A WindowPoSt whose sector is in damocles' layout under the store at `root`."""
    task = WindowPoSt(
        1000,
        "StackedDrgWindow2KiBV1_2",
        [PoStReplicaInfo(1, bytes(32), f"{root}/cache/s-t01000-1", f"{root}/sealed/s-t01000-1")],
        bytes(32),
    )
    return msgspec.structs.replace(task, **fields)


async def test_the_job_producer_refuses_a_bad_task_or_deadline_before_making_a_job(tmp_path):
    # Once, a proof type no prover knows or a deadline in milliseconds became a job waited for
    # until its deadline (the year 58000), a datetime deadline raised TypeError, and a dict was
    # refused as a WinningPoSt.
    url, root = f"sqlite:///{tmp_path}/jobs.db", str(tmp_path / "a")
    now = time.time()
    bad: list[tuple[object, object, str]] = [
        (job_task(root, proof_type="StackedDrgWindow2KiBV9"), None, "Invalid enum value"),
        (job_task(root, seed=b"short"), None, r"length >= 32 - at `\$\.seed`"),
        (job_task(root), now * 1000, "not a time between the years 0001 and 9999"),
        (
            job_task(root),
            datetime.datetime.now(datetime.UTC),
            "is a datetime, not a number of seconds",
        ),
        (job_task(root), math.nan, "is not a finite number"),
        ({"miner_id": 1000}, None, "dict is not a task of a job; give a WindowPoSt"),
    ]
    async with open_job_producer(url, stores={"a": root}) as jobs:
        for task, deadline, words in bad:
            with trio.fail_after(10), pytest.raises(UsageError, match=words):
                await jobs.submit(task, deadline=deadline)  # type: ignore[arg-type]
    with JobStore.open(url) as store:
        assert store.list_jobs() == []


async def test_a_task_no_prover_can_prove_is_refused_at_once_not_failed_on_every_child():
    # Once, a task built with no replicas or a sector twice went to a child, which refused it,
    # then to its sibling (MaxAttempts), and the caller got a ProverError: each child counted a
    # failure for the caller's mistake.
    children = [spec(builtin_child("window_post", "native"), index=i) for i in range(2)]
    task = window_task()
    async with open_supervisor(children) as sup:
        for replicas, words in ((task.replicas * 2, "sector 1 appears twice"), ([], "no replicas")):
            with trio.fail_after(10), pytest.raises(UsageError, match=f"refused: .*{words}"):
                await sup.submit(msgspec.structs.replace(task, replicas=replicas))
        stats = sup.statistics()
        assert stats.requests == 0 and [c.failed for c in stats.children] == [0, 0]


@pytest.mark.parametrize("children", [["ext-prover.cfg"], ({"Plugin": "echo"},)])
async def test_a_list_of_what_is_no_child_spec_is_a_type_error_that_says_so(children):
    # Once, an AttributeError from deep inside: 'str' object has no attribute 'name'.
    with pytest.raises(TypeError, match=r"list of ChildSpec, got a (list|tuple) holding"):
        async with open_supervisor(children):
            pass  # pragma: no cover - never reached


def test_a_thread_asked_for_outside_trio_is_not_called_the_limit_of_tasks():
    # From asyncio (a JobProducer used there), trio's "must be called from async context" was
    # reported as a thread refused for the user's limit of tasks, with advice to raise it.
    from damocles_ext.threads import NoThreadError, run_in_thread

    with pytest.raises(RuntimeError) as raised:
        asyncio.run(run_in_thread(int))
    assert not isinstance(raised.value, NoThreadError)
    assert "ulimit" not in str(raised.value)


def test_replicas_and_answers_no_prover_can_have_are_named_replica_by_replica():
    # replicas_problem and output_problem run on every request and answer: each case names the
    # first replica (in task order) and the first field that is wrong, and an answer's faults are
    # checked against the task's sectors only when there are faults.
    from helpers.child import window_task as three_sector_task

    from damocles_ext.tasks import WindowPoStOutput, output_problem, replicas_problem

    task = three_sector_task(sectors=3)
    assert replicas_problem(task) is None
    for i, field, value in ((1, "sealed_file", "/s\0x"), (2, "cache_dir", "/c\0x")):
        replicas = list(task.replicas)
        replicas[i] = msgspec.structs.replace(replicas[i], **{field: value})
        if field == "cache_dir":  # both fields wrong: the cache_dir, checked first, is named
            replicas[i] = msgspec.structs.replace(replicas[i], sealed_file="/s\0y")
        bad = msgspec.structs.replace(task, replicas=replicas)
        assert replicas_problem(bad) == (
            f"sector {i}'s {field} holds a NUL byte: no file has that name"
        )
    both = list(task.replicas)
    both[0] = msgspec.structs.replace(both[0], sealed_file="/a\0")
    both[2] = msgspec.structs.replace(both[2], cache_dir="/b\0")
    assert replicas_problem(msgspec.structs.replace(task, replicas=both)) == (
        "sector 0's sealed_file holds a NUL byte: no file has that name"
    )
    assert output_problem(task, WindowPoStOutput([b"p"], [])) is None
    assert output_problem(task, WindowPoStOutput([], [2, 0])) is None
    assert output_problem(task, WindowPoStOutput([], [2, 7, 9])) == (
        "faults for sectors not in the task: [7, 9]"
    )
    assert output_problem(task, WindowPoStOutput([], [])) == "neither proofs nor faults"
    assert output_problem(task, WindowPoStOutput([b"p", b""], [])) == "proof 1 of 0 bytes"
