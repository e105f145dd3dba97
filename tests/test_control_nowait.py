"""The control server and serve's JSON-lines server with a real supervisor's `start_nowait` (as
`run` and `serve` use it): requests answered by a callback, with no task of their own, and the
same answers, cancels and hang-ups as through `submit`; a request that needs a task of its own (a
split WindowPoSt) still gets one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers.child import winning_task
from helpers.frontend import make_task, plugin_block, write_config

from damocles_ext import plugins
from damocles_ext.api import open_supervisor
from damocles_ext.client import connect
from damocles_ext.errors import DeadlineError
from damocles_ext.frontends.control import ControlServer, bind_control_socket
from damocles_ext.frontends.serve_jsonl import JsonLineServer
from damocles_ext.hookspecs import hookimpl
from damocles_ext.protocol import dext, jsonl
from damocles_ext.supervisor import child_loop


class Counting:
    """`start_nowait` of `sup`, counting what it took and what it left to `submit`."""

    def __init__(self, sup) -> None:
        self.sup = sup
        self.taken = 0
        self.declined = 0

    def __call__(self, task, **kwargs):
        started = self.sup.start_nowait(task, **kwargs)
        if started is None:
            self.declined += 1
        else:
            self.taken += 1
        return started


async def _serve(
    sup, sock_dir: Path, nursery, *, with_start: bool = True
) -> tuple[ControlServer, Counting]:
    """A control server on `sup`, taking requests through `start_nowait` (counted), or, without
    `with_start`, each through a task of its own calling `submit` (as before `start` existed)."""
    start = Counting(sup)
    server = ControlServer(
        bind_control_socket(sock_dir / "control.sock"),
        sup.submit,
        start=start if with_start else None,
    )
    await nursery.start(server.serve)
    return server, start


def _jsonl_server(sup, **options):
    """serve's JSON-lines server on `sup`, taking requests through `start_nowait`, over memory
    streams: (the server, its input's sending end, its output's receiving end)."""
    in_send, in_receive = trio.testing.memory_stream_one_way_pair()
    out_send, out_receive = trio.testing.memory_stream_one_way_pair()
    server = JsonLineServer(
        "window_post",
        sup.submit,
        receive_stream=in_receive,
        send_stream=out_send,
        ready_line_sent=True,
        start=sup.start_nowait,
        **options,
    )
    return server, in_send, out_receive


def _sleeping(tmp_path: Path) -> Path:
    """A config of one child whose proofs last 10 minutes, reporting progress as they go."""
    return write_config(
        tmp_path, plugin_block("WdPost", "sleep", seconds=600, progress_interval=0.05)
    )


async def _raw(server: ControlServer) -> tuple[trio.SocketStream, dext.FrameDecoder]:
    """A connection to `server` that speaks dext frames itself, and its frame decoder."""
    return await trio.open_unix_socket(str(server.path)), dext.FrameDecoder()


def _a_progress(got: list) -> bool:
    return any(isinstance(m, dext.Progress) for m in got)


def _a_response(got: list) -> bool:
    return any(isinstance(m, dext.Response) for m in got)


async def _responses(stream: trio.SocketStream, decoder: dext.FrameDecoder, until) -> list:
    """What the server sends, until `until(messages so far)` holds."""
    got: list = []
    while not until(got):
        data = await stream.receive_some()
        assert data, "the control server closed the connection"
        got += decoder.receive_data(data)
    return got


async def _the_response(stream: trio.SocketStream, decoder: dext.FrameDecoder) -> dext.Response:
    """The one Response among what the server sends next (Progress frames may come first)."""
    got = await _responses(stream, decoder, _a_response)
    (response,) = [m for m in got if isinstance(m, dext.Response)]
    return response


async def _two_one_running(stream: trio.SocketStream, decoder: dext.FrameDecoder) -> None:
    """Requests 1 and 2 to a single sleeping child: once this returns, 1 runs and 2 waits."""
    await stream.send_all(
        dext.encode(dext.Request(1, make_task(3))) + dext.encode(dext.Request(2, make_task(4)))
    )
    await _responses(stream, decoder, _a_progress)


async def test_requests_taken_by_start_are_answered_with_their_outputs_in_any_number(
    tmp_path, sock_dir, nursery
):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo", concurrent=2))
    with trio.fail_after(30):
        async with open_supervisor(str(cfg)) as sup:
            server, start = await _serve(sup, sock_dir, nursery)
            results: dict[int, object] = {}
            async with connect(server.path) as client, trio.open_nursery() as callers:

                async def one(miner: int) -> None:
                    results[miner] = await client.submit(make_task(miner))

                for miner in range(1, 21):
                    callers.start_soon(one, miner)
            await server.wait_idle()
            server.stop_accepting()
            assert sup.statistics().requests == 0
    assert results == {m: echo_output(make_task(m)) for m in range(1, 21)}
    assert (start.taken, start.declined) == (20, 0)
    assert server.statistics().in_flight == 0


@pytest.mark.parametrize("with_start", [True, False], ids=["started", "task"])
async def test_a_cancel_from_the_client_answers_a_started_request_and_stops_its_work(
    tmp_path, sock_dir, nursery, with_start
):
    cfg = _sleeping(tmp_path)
    with trio.fail_after(30):
        async with open_supervisor(str(cfg)) as sup:
            server, start = await _serve(sup, sock_dir, nursery, with_start=with_start)
            stream, decoder = await _raw(server)
            await stream.send_all(dext.encode(dext.Request(1, make_task(3))))
            # Its progress says it runs on the child.
            await _responses(stream, decoder, _a_progress)
            await stream.send_all(dext.encode(dext.Cancel(1)))
            response = await _the_response(stream, decoder)
            assert (response.id, response.output) == (1, None)
            assert response.error == "cancelled at the client's request"
            assert sup.statistics().requests == 0
            # The child was told: it is free for the next request, answered on the same connection.
            await stream.send_all(dext.encode(dext.Request(2, make_task(4))))
            await _responses(stream, decoder, lambda got: any(isinstance(m, dext.Progress) and m.id == 2 for m in got))  # fmt: skip
            await stream.aclose()
            await server.wait_idle()
            server.stop_accepting()
    assert start.taken == (2 if with_start else 0)


async def test_a_client_that_hangs_up_abandons_its_started_requests(tmp_path, sock_dir, nursery):
    cfg = _sleeping(tmp_path)
    with trio.fail_after(30):
        async with open_supervisor(str(cfg)) as sup:
            server, start = await _serve(sup, sock_dir, nursery)
            stream, decoder = await _raw(server)
            await _two_one_running(stream, decoder)
            await stream.aclose()
            await server.wait_idle()
            # Both answered inside the supervisor (cancelled): nothing is left in its book.
            assert sup.statistics().requests == 0
            assert server.statistics().in_flight == 0
            server.stop_accepting()
    assert start.taken == 2


async def test_a_split_window_post_is_left_to_submit_and_answered_whole(
    tmp_path, sock_dir, nursery
):
    cfg = write_config(
        tmp_path, plugin_block("WdPostVanilla", "echo") + plugin_block("WdPostSnark", "echo")
    )
    with trio.fail_after(30):
        async with open_supervisor(str(cfg)) as sup:
            server, start = await _serve(sup, sock_dir, nursery)
            async with connect(server.path) as client:
                output = await client.submit(make_task(5))
            server.stop_accepting()
    assert output.proofs and not output.faults
    assert (start.taken, start.declined) == (0, 1)


class _SeesStarts:
    def __init__(self) -> None:
        self.started = trio.Event()

    @hookimpl
    async def dext_request_started(self, request) -> None:
        self.started.set()  # async: a plain observer runs in a worker thread, off trio


async def test_a_serve_stopped_from_outside_abandons_what_start_took_and_answers_nothing(tmp_path):
    # A second SIGTERM cancels serve's JsonLineServer: a request taken by `start` has no task to
    # be cancelled with it, so the server abandons it itself (the child is told to stop), and
    # nobody is answered (as for a request's task cancelled with the rest).
    cfg = _sleeping(tmp_path)
    pm = plugins.get_plugin_manager()
    seen = _SeesStarts()
    plugins.register_plugin(pm, seen, "seen")
    with trio.fail_after(30):
        async with open_supervisor(str(cfg), plugin_manager=pm) as sup:
            server, in_send, _out_receive = _jsonl_server(sup)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.run)
                await in_send.send_all(jsonl.encode_request(1, make_task(3)))
                await seen.started.wait()  # on the child
                nursery.cancel_scope.cancel()
            assert sup.statistics().requests == 0
            assert server.statistics().answered == 0


async def test_a_control_server_stopped_from_outside_abandons_what_start_took(tmp_path, sock_dir):
    cfg = _sleeping(tmp_path)
    with trio.fail_after(30):
        async with open_supervisor(str(cfg)) as sup:
            async with trio.open_nursery() as nursery:
                server, start = await _serve(sup, sock_dir, nursery)
                stream, decoder = await _raw(server)
                await stream.send_all(dext.encode(dext.Request(1, make_task(3))))
                await _responses(stream, decoder, _a_progress)
                nursery.cancel_scope.cancel()  # the server stops; the supervisor goes on
            assert sup.statistics().requests == 0
            assert server.statistics().in_flight == 0
            await stream.aclose()
    assert start.taken == 1


async def test_requests_refused_or_answered_inside_start_get_exactly_one_answer(
    tmp_path, sock_dir, nursery
):
    # Only WinningPoSt children: a WindowPoSt fails inside start_nowait, before it returns.
    cfg = write_config(tmp_path, plugin_block("WinPost", "echo"))
    with trio.fail_after(30):
        async with open_supervisor(str(cfg)) as sup:
            server, _ = await _serve(sup, sock_dir, nursery)
            stream, decoder = await _raw(server)
            await stream.send_all(
                dext.encode(dext.Request(1, make_task(3)))  # no child for its stage
                + dext.encode(dext.Request(2, winning_task(), deadline=float("nan")))
                + dext.encode(dext.Request(3, winning_task()))
            )
            got = await _responses(stream, decoder, lambda got: len(got) >= 3)
            await stream.aclose()
            await server.wait_idle()
            server.stop_accepting()
    by_id = {m.id: m for m in got}
    assert sorted(by_id) == [1, 2, 3] and len(got) == 3
    assert "no window_post children are configured" in by_id[1].error
    assert "its deadline nan is not a finite number" in by_id[2].error
    assert by_id[3].output == echo_output(winning_task()) and by_id[3].error is None
    assert server.statistics().in_flight == 0


async def test_a_cancel_of_a_queued_started_request_answers_it_and_leaves_the_running_one(
    tmp_path, sock_dir, nursery
):
    cfg = _sleeping(tmp_path)
    with trio.fail_after(30):
        async with open_supervisor(str(cfg)) as sup:
            server, _ = await _serve(sup, sock_dir, nursery)
            stream, decoder = await _raw(server)
            await _two_one_running(stream, decoder)
            assert sup.statistics().stages["window_post"].queued == 1  # 2 waits for the child
            await stream.send_all(dext.encode(dext.Cancel(2)))
            response = await _the_response(stream, decoder)
            assert (response.id, response.error) == (2, "cancelled at the client's request")
            assert sup.statistics().requests == 1  # 1 still runs
            await stream.aclose()
            await server.wait_idle()
            server.stop_accepting()


@pytest.mark.parametrize("door", ["control socket", "serve"])
async def test_the_requests_of_one_read_go_to_their_child_in_one_write(
    tmp_path, sock_dir, nursery, monkeypatch, door
):
    # Four requests in one read, a child that takes four at once: the front end starts them in
    # one batch of the supervisor's, so they reach the child in one write, not four.
    writes: list[list[int]] = []
    real_send = child_loop.send

    def spy(host, child, p, data: bytes) -> None:
        frames = dext.FrameDecoder().receive_data(data)
        got = [m.task.miner_id for m in frames if isinstance(m, dext.Request)]
        if got:
            writes.append(sorted(got))
        real_send(host, child, p, data)

    monkeypatch.setattr(child_loop, "send", spy)
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo", concurrent=4))
    miners = [1, 2, 3, 4]
    with trio.fail_after(30):
        async with open_supervisor(str(cfg)) as sup:
            await sup.wait_ready("window_post", 1)
            if door == "serve":
                server, in_send, out_receive = _jsonl_server(sup, batch=sup.batch)
                nursery.start_soon(server.run)
                await in_send.send_all(
                    b"".join(jsonl.encode_request(m, make_task(m)) for m in miners)
                )
                reader, answers = jsonl.LineReader(), []
                while len(answers) < len(miners):
                    answers += reader.receive_data(await out_receive.receive_some())
                ids = sorted(jsonl.decode_response(line, "window_post").id for line in answers)
            else:
                control = ControlServer(
                    bind_control_socket(sock_dir / "control.sock"),
                    sup.submit,
                    start=sup.start_nowait,
                    batch=sup.batch,
                )
                await nursery.start(control.serve)
                stream, decoder = await _raw(control)
                await stream.send_all(
                    b"".join(dext.encode(dext.Request(m, make_task(m))) for m in miners)
                )
                got = await _responses(
                    stream, decoder, lambda got: sum(isinstance(m, dext.Response) for m in got) == 4
                )
                ids = sorted(m.id for m in got if isinstance(m, dext.Response))
                control.stop_accepting()
    assert ids == miners
    assert writes == [miners]


async def test_a_request_started_in_a_batch_fails_at_its_deadline_while_queued(tmp_path):
    # The driver learns of a new alarm once per batch, at its end, not per request started in
    # it: a queued request's deadline, sooner than anything it waited for, must still end it.
    # (No progress from the running proof: each report read would have the driver look again.)
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=600, progress_interval=60))
    answers: list = []
    answered = trio.Event()

    def on_done(output, error) -> None:
        answers.append((output, error, time.time()))
        answered.set()

    with trio.fail_after(30):
        async with open_supervisor(str(cfg)) as sup:
            await sup.wait_ready("window_post", 1)
            began = trio.Event()
            running = sup.start_nowait(
                make_task(3), on_progress=lambda _: began.set(), on_done=lambda *_: None
            )
            assert running is not None
            await began.wait()  # its first report: the next is a minute away
            await trio.testing.wait_all_tasks_blocked()  # the driver waits for what it knows
            deadline = time.time() + 0.5
            with sup.batch():
                sup.start_nowait(make_task(4), deadline=deadline, on_done=on_done)
            assert sup.statistics().stages["window_post"].queued == 1  # behind the 600 s proof
            await answered.wait()
            running.cancel()
    ((output, error, at),) = answers
    assert output is None and isinstance(error, DeadlineError), error
    assert at >= deadline, "failed before its deadline, not by it"
    # At its deadline (a few ms late here), not at the driver's next alarm (1.5 s later):
    assert at - deadline < 1.0, f"failed {at - deadline:.2f} s after its deadline"
