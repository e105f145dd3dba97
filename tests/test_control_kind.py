"""An error answer of the control socket says its kind (Response.kind): a request the caller must
fix (no child of its stage, a worker's socket) is a usage error the client raises as UsageError,
exit code 2 for `prove --socket`, without asking the supervisor's status after it; an ordinary
failure is not; an answer without the field (a supervisor older than it) keeps the status
question. The codec round trip, with and without the field, and what an older peer makes of it;
a child's Response has no such field: a child that sends the key has it skipped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import dext_run_async, make_task, plugin_block, write_config
from helpers.supervisor import dext_child, spec, who, window_task

from damocles_ext.api import open_supervisor
from damocles_ext.client import connect
from damocles_ext.errors import ProverError, ProverUsageError, UsageError
from damocles_ext.frontends.control import bind_control_socket
from damocles_ext.frontends.prove import prove_through_socket
from damocles_ext.frontends.run import control_server
from damocles_ext.protocol import control as control_protocol
from damocles_ext.protocol import dext, jsonl
from damocles_ext.status import StatusSource
from damocles_ext.supervisor import Supervisor
from damocles_ext.tasks import split_window_post, stage_of


class _OlderResponse(msgspec.Struct, tag="response", frozen=True):
    """control.ControlResponse as a client older than `kind` decodes it (dext.Response's fields)."""

    id: int
    output: dext.Output | None = None
    error: str | None = None


def _payload(message: msgspec.Struct) -> bytes:
    return dext.encode(message)[dext.HEADER_SIZE :]


@pytest.mark.parametrize("kind", [control_protocol.USAGE, None, msgspec.UNSET])
def test_a_response_round_trips_with_its_kind_and_without_it(kind):
    sent = control_protocol.ControlResponse(7, error="no", kind=kind)
    (got,) = control_protocol.frame_decoder().receive_data(control_protocol.encode(sent))
    assert got == sent and got.kind == kind


def test_a_response_without_a_kind_is_written_as_before_and_an_older_client_skips_the_field():
    # A child's Response (and a success) is written without the key: its bytes are unchanged.
    for old, new in [
        (_OlderResponse(1, error="x"), control_protocol.ControlResponse(1, error="x")),
        (_OlderResponse(2, output=echo_output(make_task())), control_protocol.ControlResponse(2, output=echo_output(make_task()))),
    ]:  # fmt: skip
        assert (
            _payload(new)
            == msgspec.msgpack.encode(old)
            == _payload(dext.Response(old.id, old.output, old.error))
        )
    assert b"kind" not in _payload(control_protocol.ControlResponse(1, error="x"))
    # An older client decodes the new answers, the field skipped as any unknown key.
    for kind in (control_protocol.USAGE, None):
        payload = _payload(control_protocol.ControlResponse(3, error="why", kind=kind))
        assert b"kind" in payload
        assert msgspec.msgpack.decode(payload, type=_OlderResponse) == _OlderResponse(
            3, error="why"
        )


def test_the_child_protocol_s_response_has_no_kind():
    assert dext.Response.__struct_fields__ == ("id", "output", "error")
    frame = control_protocol.encode(control_protocol.ControlResponse(1, error="x", kind="usage"))
    assert dext.FrameDecoder().receive_data(frame) == [dext.Response(1, error="x")]


@pytest.mark.parametrize("kind", [5, {"code": 5}, "usage"])
async def test_a_child_that_sends_a_kind_in_its_response_is_not_killed_and_is_answered(kind):
    # A custom child's own field, which the child protocol does not know: skipped, as any
    # unknown key (PROTOCOL.md section 3), whatever its type; before, a value that was not a
    # string was a protocol error, and the child was killed.
    argv = dext_child(
        f"""
        proof = b"%d %d" % (msg.task.miner_id, os.getpid())  # as answer() does (who())
        send(KindResponse(msg.id, output=WindowPoStOutput([proof], []), kind={kind!r}))
        """,
        setup="""
        import msgspec
        class KindResponse(msgspec.Struct, tag="response"):
            id: int
            output: WindowPoStOutput
            kind: object
        """,
    )
    sup = Supervisor([spec(argv, max_attempts=1)])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            first = await sup.submit(window_task(miner=1))
            second = await sup.submit(window_task(miner=2))
            stats = sup.statistics().children[0]
            sup.request_shutdown()
    assert who(first) == (1, stats.pid) and who(second) == (2, stats.pid)
    assert stats.restarts == 0 and stats.done == 2 and stats.failed == 0, stats.last_exit


class _Asked:
    """The supervisor's status source, counting the status requests it answers."""

    def __init__(self, sup) -> None:
        self.source = StatusSource(sup, socket="test")
        self.count = 0

    async def __call__(self) -> dict[str, object]:
        self.count += 1
        return await self.source.as_data()


@asynccontextmanager
async def _run(
    tmp_path, sock_dir, config: str, before_serving: Callable[[Supervisor], object] | None = None
) -> AsyncIterator[tuple[Supervisor, str, _Asked]]:
    """`run` of `config` in this process: its supervisor, the path of its control socket and
    the status requests that socket answered. `before_serving` is given the supervisor before
    the socket is bound to it. All is stopped at the end of the block, which has 60 s."""
    cfg = write_config(tmp_path, config)
    with trio.fail_after(60):
        async with open_supervisor(str(cfg)) as sup, trio.open_nursery() as nursery:
            if before_serving is not None:
                before_serving(sup)
            asked = _Asked(sup)
            server = control_server(sup, bind_control_socket(sock_dir / "control.sock"), asked)
            await nursery.start(server.serve)
            yield sup, str(server.path), asked
            nursery.cancel_scope.cancel()


async def _prove(path: str, tmp_path, task) -> tuple[int, str]:
    request = tmp_path / "task.json"
    request.write_bytes(jsonl.task_to_json(task))
    result = await dext_run_async(
        "prove", stage_of(task), "--request", str(request), "--socket", path
    )
    return result.returncode, result.stderr.decode()


async def test_prove_to_a_run_without_a_child_of_the_stage_exits_2_asking_no_status(
    tmp_path, sock_dir
):
    async with _run(tmp_path, sock_dir, plugin_block("WdPost", "echo")) as (_, path, asked):
        code, err = await _prove(path, tmp_path, make_task(stage="winning_post"))
        # The Python client raises it as it comes, too.
        async with connect(path) as client:
            with pytest.raises(UsageError, match=r"has no \[\[WinPost\]\] child") as info:
                await client.submit(make_task(stage="winning_post"))
            assert await client.submit(make_task()) == echo_output(make_task())
    # Both: a caller's `except ProverError` around submit, as before the answer said its kind,
    # still catches it, and its exit code is a usage error's.
    assert type(info.value) is ProverUsageError and isinstance(info.value, ProverError)
    assert info.value.exit_code == 2
    assert code == 2, err
    assert f"the supervisor at {path} has no [[WinPost]] child" in err, err
    assert "add a [[WinPost]] table" in err and "Traceback" not in err, err
    assert "children are configured" not in err, err  # said once, as what to do
    assert asked.count == 0, (asked.count, err)


async def test_prove_whose_prover_fails_exits_1_asking_no_status(tmp_path, sock_dir):
    failing = plugin_block("WdPost", "sleep", seconds=0, fail="always")
    async with _run(tmp_path, sock_dir, failing) as (_, path, asked):
        code, err = await _prove(path, tmp_path, make_task())
        async with connect(path) as client:
            with pytest.raises(ProverError, match="failing as configured") as info:
                await client.submit(make_task())
    assert type(info.value) is ProverError
    assert code == 1, err
    assert "sleep prover failing as configured" in err and "Traceback" not in err, err
    assert asked.count == 0, (asked.count, err)


async def _older_worker_socket(stream: trio.SocketStream) -> None:
    """A worker's control socket as a supervisor older than Response.kind answers: each request
    with an error alone, each status request with the not-started worker's reply."""
    decoder = control_protocol.frame_decoder()
    while data := await stream.receive_some():
        for msg in decoder.receive_data(data):
            if isinstance(msg, dext.Request):
                answer = control_protocol.ControlResponse(
                    msg.id, error="this control socket is a worker's"
                )
            else:
                answer = control_protocol.StatusReply(msg.id, error="not yet", worker={"name": "w"})
            await stream.send_all(control_protocol.encode(answer))


async def test_prove_to_an_older_worker_socket_still_asks_its_status_and_exits_2(sock_dir, nursery):
    sock = bind_control_socket(sock_dir / "control.sock")
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    await nursery.start(trio.serve_listeners, _older_worker_socket, [listener])
    path = str(sock_dir / "control.sock")
    # Bounded: a regression that leaves the request or the status unanswered fails the test,
    # not the whole suite (the thread, abandoned, ends as the fixture closes the server).
    with (
        trio.fail_after(30),
        pytest.raises(UsageError, match="is the control socket of a `damocles-ext worker`"),
    ):
        await trio.to_thread.run_sync(
            prove_through_socket, path, make_task(), abandon_on_cancel=True
        )


def _twice(task):
    """`task` with its first sector given a second time (the typed decoder takes it)."""
    return msgspec.structs.replace(task, replicas=[*task.replicas, task.replicas[0]])


@pytest.mark.parametrize(
    ("task", "deadline", "priority", "said"),
    [
        (_twice(make_task(replicas=2)), None, 0, "sector 0 appears twice in the task"),
        (make_task(), float("nan"), 0, "its deadline nan is not a finite number"),
        (make_task(), float("inf"), 0, "its deadline inf is not a finite number"),
        (make_task(), None, 2**63, f"its priority {2**63} is beyond a signed 64 bits"),
    ],
    ids=["a-sector-twice", "a-nan-deadline", "an-infinite-deadline", "a-priority-past-64-bits"],
)
async def test_a_raw_request_the_caller_must_fix_is_answered_usage_and_no_child_is_asked(
    tmp_path, sock_dir, task, deadline, priority, said
):
    # Not our Client, which checks these before sending: the frames as another client sends
    # them, to a whole-WindowPoSt run (start_nowait; a split run goes through submit).
    async with _run(tmp_path, sock_dir, plugin_block("WdPost", "echo")) as (sup, path, asked):
        await sup.wait_ready("window_post")
        stream = await trio.open_unix_socket(path)
        await stream.send_all(
            control_protocol.encode(dext.Request(1, task, deadline, priority))
            + control_protocol.encode(dext.Request(2, make_task(miner=7)))
        )
        decoder, answers = control_protocol.frame_decoder(), {}
        while len(answers) < 2:
            data = await stream.receive_some()
            assert data, answers
            for msg in decoder.receive_data(data):
                if isinstance(msg, control_protocol.ControlResponse):
                    answers[msg.id] = msg
        await stream.aclose()
        (child,) = sup.statistics().children
    bad, good = answers[1], answers[2]
    assert bad.kind == control_protocol.USAGE and bad.output is None, bad
    assert said in bad.error and "refused" in bad.error, bad.error
    assert good == control_protocol.ControlResponse(2, output=echo_output(make_task(miner=7)))
    # Only the good request reached the child.
    assert (child.done, child.failed) == (1, 0), child
    assert asked.count == 0


@pytest.mark.parametrize(
    ("table", "advice"),
    [
        # A whole-WindowPoSt run: no split table can join its [[WdPost]] (the config refuses it).
        (
            "WdPost",
            "it proves WindowPoSt whole ([[WdPost]]), not in steps; send a window_post task",
        ),
        # A run without WindowPoSt: one split table without the other is refused too.
        ("WinPost", "add both [[WdPostVanilla]] and [[WdPostSnark]] tables to the config"),
    ],
)
async def test_a_split_step_to_a_run_without_its_table_gets_advice_the_config_can_follow(
    tmp_path, sock_dir, table, advice
):
    vanilla = split_window_post(make_task())
    async with (
        _run(tmp_path, sock_dir, plugin_block(table, "echo")) as (_, path, _),
        connect(path) as client,
    ):
        with pytest.raises(UsageError) as info:
            await client.submit(vanilla)
    said = str(info.value)
    assert f"the supervisor at {path} has no [[WdPostVanilla]] child" in said, said
    assert advice in said, said
    assert "add a [[WdPostVanilla]] table" not in said, said
    # Said once, in the words that say what to do: not the supervisor's own before them.
    assert "children are configured" not in said, said


async def test_a_bug_of_ours_on_a_request_of_a_stage_the_run_lacks_is_not_a_usage_answer(
    tmp_path, sock_dir, monkeypatch
):
    # A bug of ours (injected: the children and the socket stay real) is never the caller's to
    # fix, even for a stage the run could not have served: kind nil, without the no-child advice.
    def start_nowait(*args, **kwargs):
        raise RuntimeError("injected bug")

    def inject(sup: Supervisor) -> None:  # before the socket takes sup.start_nowait
        monkeypatch.setattr(sup, "start_nowait", start_nowait)

    async with (
        _run(tmp_path, sock_dir, plugin_block("WdPost", "echo"), inject) as (_, path, _),
        connect(path) as client,
    ):
        with pytest.raises(ProverError, match="internal error") as info:
            await client.submit(make_task(stage="winning_post"))
    assert type(info.value) is ProverError, info.value
    assert "add a [[WinPost]] table" not in str(info.value), info.value
