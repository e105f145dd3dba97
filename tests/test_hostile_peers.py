"""No input may take the supervisor down: nested bombs through every door, and the second wall.

A value about 1,500 containers deep (3 KB) is more than msgspec can follow within Python's
recursion limit. Each door gets one through a real peer: a prover child's frame or JSON line
(the child is killed and restarted, or the line skipped), a control-socket client's frame to a
real `run` (the client is dropped), a server's frame to the client, the supervisor's frame to the
child runtime. The serve door (a request line on stdin) is in test_serve.py.

The second wall: a bug of ours (injected with monkeypatch; the children and sockets stay real)
while serving one child or one control connection ends that child or connection, logged with
its traceback, and the supervisor goes on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import make_task, plugin_block, running, write_config
from helpers.supervisor import dext_child, jsonl_child, our_descendants, spec, who, window_task

from damocles_ext import __version__
from damocles_ext.client import connect
from damocles_ext.errors import ProverError
from damocles_ext.frontends import control as control_module
from damocles_ext.frontends import started as started_module
from damocles_ext.frontends.control import ControlServer, bind_control_socket
from damocles_ext.frontends.serve_jsonl import JsonLineServer
from damocles_ext.lifecycle import Kill
from damocles_ext.lifecycle.book import RequestBook
from damocles_ext.protocol import control as control_protocol
from damocles_ext.protocol import dext, jsonl
from damocles_ext.supervisor import Supervisor, child_loop
from damocles_ext.supervisor import core as core_module
from damocles_ext.supervisor.restart import BackoffPolicy

STAGE = "window_post"
DEPTH = 1500
#: msgpack: DEPTH one-element arrays around a nil, one byte a level.
MSGPACK_BOMB = b"\x91" * DEPTH + b"\xc0"
JSON_BOMB = b"[" * DEPTH + b"]" * DEPTH


def bomb_frame(kind: str, id: int = 1) -> bytes:
    """A dext frame `{"type": kind, "id": id, "junk": <bomb>}`: the unknown field is skipped,
    which still walks every level of it."""
    tag = kind.encode()
    payload = b"\x83\xa4type" + bytes([0xA0 | len(tag)]) + tag + b"\xa2id" + bytes([id])
    payload += b"\xa4junk" + MSGPACK_BOMB
    return len(payload).to_bytes(4, "big") + payload


def fast_restarts() -> BackoffPolicy:
    return BackoffPolicy(base=0.01, cap=0.05)


# -- door 1: a prover child's output -------------------------------------------------------------


async def _one_request(argv: list[str], miner: int, **kw: Any) -> tuple[Any, Any, int]:
    """One request to a supervisor of one child (`argv`, spec keywords `kw`), once it is
    ready: (its output, the child's statistics after it, the pid that was ready first)."""
    sup = Supervisor([spec(argv, **kw)], backoff=fast_restarts())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            first_pid = sup.statistics().children[0].pid
            output = await sup.submit(window_task(miner=miner))
            stats = sup.statistics().children[0]
            sup.request_shutdown()
    assert first_pid is not None
    return output, stats, first_pid


async def test_a_dext_child_sending_a_nested_bomb_is_restarted_and_its_request_retried(
    tmp_path, caplog
):
    # Its first process answers with a bomb; the one started after it answers properly.
    marker = tmp_path / "bombed"
    argv = dext_child(
        """
        if not os.path.exists(MARKER):
            open(MARKER, "w").close()
            out.write(BOMB)
            out.flush()
        else:
            answer(msg)
        """,
        setup=f"MARKER = {str(marker)!r}\nBOMB = {bomb_frame('response')!r}",
    )
    sup = Supervisor([spec(argv, max_attempts=2)], backoff=fast_restarts())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            first = await sup.submit(window_task(miner=1))
            second = await sup.submit(window_task(miner=2))
            stats = sup.statistics().children[0]
            sup.request_shutdown()
    assert marker.exists()
    assert who(first)[0] == 1 and who(second)[0] == 2
    assert who(first)[1] == who(second)[1]  # both from the restarted process
    assert stats.restarts == 1 and "nested too deeply" in stats.last_exit, stats.last_exit
    assert "broke the protocol" in stats.last_exit
    assert our_descendants() == []


async def test_a_json_lines_child_sending_a_nested_bomb_line_fails_only_that_request():
    # damocles skips a bad line and reads on; its id could be read, so the request it answered
    # badly is answered with the reason at once (not left to a timeout).
    argv = jsonl_child(
        """
        if req["task"]["miner_id"] == 1:
            sys.stdout.write('{"id": %d, "output": %s}\\n' % (req["id"], BOMB))
            sys.stdout.flush()
        else:
            answer(req)
        """,
        setup=f"BOMB = {JSON_BOMB.decode()!r}",
    )
    sup = Supervisor([spec(argv)], backoff=fast_restarts())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            with pytest.raises(ProverError, match=r"invalid response.*nested too deeply"):
                await sup.submit(window_task(miner=1))
            output = await sup.submit(window_task(miner=2))
            stats = sup.statistics().children[0]
            sup.request_shutdown()
    assert who(output)[0] == 2
    assert stats.restarts == 0 and stats.done == 1 and stats.failed == 1


async def test_a_child_sending_its_hello_twice_is_restarted_with_a_reason_that_says_so(tmp_path):
    marker = tmp_path / "twice"
    argv = dext_child(
        """
        if not os.path.exists(MARKER):
            open(MARKER, "w").close()
            send(dext.Hello("dext/1", "window_post", os.getpid(), "fake", "1", 1))
        else:
            answer(msg)
        """,
        setup=f"MARKER = {str(marker)!r}",
    )
    output, stats, _ = await _one_request(argv, 3, max_attempts=2)
    assert who(output)[0] == 3
    assert "sent a second Hello frame" in stats.last_exit, stats.last_exit
    assert "only a parent may send" not in stats.last_exit


async def test_an_answer_and_a_stray_printf_in_one_write_answers_the_request_then_restarts(
    caplog,
):
    # One stdio flush: the whole, valid Response, then a debug printf. The request has its
    # answer (it is not retried: one attempt), then the child is killed for the printf.
    argv = dext_child(
        """
        proof = b"%d %d" % (msg.task.miner_id, os.getpid())  # as answer() does (who())
        out.write(dext.encode(dext.Response(msg.id, output=WindowPoStOutput([proof], [])))
                  + b"proof done\\n")
        out.flush()
        """
    )
    output, stats, first_pid = await _one_request(argv, 7, max_attempts=1)
    assert who(output) == (7, first_pid)
    assert stats.done == 1 and stats.failed == 0
    # Killed as it was answered, on the same read.
    kills = [
        r.getMessage() for r in caplog.records if "killing its process group" in r.getMessage()
    ]
    assert len(kills) == 1 and "broke the protocol: dext framing error" in kills[0], kills


async def test_a_hello_and_a_bad_length_in_one_write_is_a_start_then_a_protocol_break(tmp_path):
    # Not a failed start ("sent no valid dext Hello frame"): the Hello was whole and valid.
    marker = tmp_path / "broke"
    argv = dext_child(
        setup=f"""
        MARKER = {str(marker)!r}
        if not os.path.exists(MARKER):
            open(MARKER, "w").close()
            out.write(dext.encode(dext.Hello("dext/1", "window_post", os.getpid(), "f", "1", 1))
                      + b"\\xff\\xff\\xff\\xff")
            out.flush()
            os.read(0, 1)  # killed here
        """
    )
    # The request waits from before the first start: that process, broken as it said ready, is
    # never sent it (with MaxAttempts = 1 it was, and failed "went down while running it").
    sup = Supervisor([spec(argv, max_attempts=1)], backoff=fast_restarts())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            output = await sup.submit(window_task(miner=3))
            stats = sup.statistics().children[0]
            sup.request_shutdown()
    assert who(output) == (3, stats.pid)
    assert stats.restarts == 1
    assert "broke the protocol: dext framing error: frame length" in stats.last_exit, (
        stats.last_exit
    )
    assert "no valid dext Hello" not in stats.last_exit


# -- door 2: a control-socket client -------------------------------------------------------------


async def test_run_drops_a_control_client_sending_a_nested_bomb_and_serves_the_next(
    tmp_path, sock_path
):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            async with running(nursery, cfg, sock_path) as (run, log):
                async with connect(sock_path) as good:
                    assert await good.submit(make_task(1)) == echo_output(make_task(1))
                    hostile = await trio.open_unix_socket(os.fspath(sock_path))
                    await hostile.send_all(bomb_frame("request"))
                    # Dropped: the connection ends, with only why, in a Refusal (not id 0's
                    # "nothing was read: send it again").
                    said = b""
                    while data := await hostile.receive_some():
                        said += data
                    [refusal] = control_protocol.frame_decoder().receive_data(said)
                    assert isinstance(refusal, control_protocol.Refusal), refusal
                    assert "nested too deeply" in refusal.error
                    assert "another version of damocles-ext" in refusal.error
                    await hostile.aclose()
                    line = await log.wait_for("control client broke the protocol")
                    assert "nested too deeply" in line
                    # The other client's connection and the supervisor go on.
                    assert await good.submit(make_task(2)) == echo_output(make_task(2))
                async with connect(sock_path) as late:
                    assert await late.submit(make_task(3)) == echo_output(make_task(3))
                run.send_signal(signal.SIGTERM)
                assert await run.wait() == 0, log.text()
    assert "Traceback" not in log.text()


# -- the client, reading a server ----------------------------------------------------------------


async def test_the_client_reports_a_nested_bomb_from_the_server_as_a_lost_connection(sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(sock_path))
    listener.listen(1)
    server = trio.SocketListener(trio.socket.from_stdlib_socket(listener))

    async def hostile_server() -> None:
        stream = await server.accept()
        await stream.receive_some()  # the request
        await stream.send_all(bomb_frame("response"))
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hostile_server)
            with pytest.raises(ProverError, match=r"broke the protocol.*nested too deeply"):
                async with connect(sock_path) as client:
                    await client.submit(make_task(1))
            nursery.cancel_scope.cancel()
    await server.aclose()


async def test_the_client_says_a_frame_it_does_not_know_may_come_from_another_version(sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(sock_path))
    listener.listen(1)
    server = trio.SocketListener(trio.socket.from_stdlib_socket(listener))

    async def newer_server() -> None:  # answers with a message type this client does not know
        stream = await server.accept()
        await stream.receive_some()
        payload = msgspec.msgpack.encode({"type": "answer_v9", "id": 1})
        await stream.send_all(len(payload).to_bytes(4, "big") + payload)
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(newer_server)
            with pytest.raises(ProverError) as raised:
                async with connect(sock_path) as client:
                    await client.submit(make_task(1))
            nursery.cancel_scope.cancel()
    await server.aclose()
    said = str(raised.value)
    assert "broke the protocol" in said, said
    assert f"another version of damocles-ext than this client's, {__version__}?" in said, said
    assert "use the client of the version `run` runs" in said, said


# -- the child runtime, reading the supervisor ---------------------------------------------------


def child_argv(protocol: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "damocles_ext",
        "child",
        STAGE,
        "--plugin",
        "echo",
        "--protocol",
        protocol,
    ]


async def test_the_child_runtime_exits_1_on_a_nested_bomb_frame_without_a_traceback():
    stdin = dext.encode(dext.Request(1, window_task())) + bomb_frame("request", id=2)
    with trio.fail_after(20):
        result = await trio.run_process(
            child_argv("dext"), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 1, stderr
    assert "protocol error from the parent" in stderr and "nested too deeply" in stderr
    assert "Traceback" not in stderr


async def test_the_json_lines_child_runtime_answers_a_nested_bomb_line_and_goes_on():
    bomb_line = b'{"id":1,"junk":' + JSON_BOMB + b',"task":{}}\n'
    proc = await trio.lowlevel.open_process(
        child_argv("jsonl"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reader = jsonl.LineReader()
    lines: list[bytes] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            stderr = bytearray()

            async def collect_stderr() -> None:
                while data := await proc.stderr.receive_some():
                    stderr.extend(data)

            nursery.start_soon(collect_stderr)
            # Stdin stays open until both are answered: its end would cancel request 2.
            await proc.stdin.send_all(bomb_line + jsonl.encode_request(2, window_task(miner=5)))
            while len(lines) < 3:
                data = await proc.stdout.receive_some()
                assert data, bytes(stderr).decode(errors="replace")
                lines += reader.receive_data(data)
            await proc.stdin.aclose()
            assert await proc.wait() == 0, bytes(stderr).decode(errors="replace")
    assert lines[0] == jsonl.ready_line(STAGE)
    answers = {r.id: r for r in (jsonl.decode_response(line, STAGE) for line in lines[1:])}
    assert answers[1].output is None and "nested too deeply" in answers[1].err_msg
    assert answers[2].output == echo_output(window_task(miner=5))
    assert b"Traceback" not in stderr


# -- the second wall -----------------------------------------------------------------------------


async def test_an_internal_error_on_a_childs_answer_ends_that_child_not_the_supervisor(
    monkeypatch, caplog
):
    calls = []

    class BuggyBook(RequestBook):  # (a subclass: the compiled book calls answers natively)
        def answers(self, child, answers, now, out=None):
            calls.append(child)
            if len(calls) == 1:
                raise RuntimeError("injected bug on the first answer")
            return super().answers(child, answers, now, out)

    monkeypatch.setattr(core_module, "RequestBook", BuggyBook)
    caplog.set_level(logging.ERROR, "damocles_ext.supervisor")
    sup = Supervisor([spec(dext_child(), max_attempts=2)], backoff=fast_restarts())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            output = await sup.submit(window_task(miner=7))  # retried on the new process
            stats = sup.statistics().children[0]
            sup.request_shutdown()
    assert who(output)[0] == 7
    assert stats.restarts == 1 and "injected bug" in stats.last_exit, stats.last_exit
    logged = [r for r in caplog.records if "internal error on its output" in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # with its traceback
    assert our_descendants() == []


def inject_a_bug(monkeypatch, event: str, rule: str, *, after: bool) -> dict:
    """Once, within the book's `event`, raise in its `rule` (before or `after` the rule ran):
    what the book answered before the bug must still reach its caller. (The supervisor's book is
    of a subclass: the compiled book calls its own rules natively, past a patch of its class.)"""
    original_event, original_rule = getattr(RequestBook, event), getattr(RequestBook, rule)
    state = {"inside": False, "raised": False}

    def wrapped_event(self, *args, **kwargs):
        state["inside"] = True
        try:
            return original_event(self, *args, **kwargs)
        finally:
            state["inside"] = False

    def buggy_rule(self, *args, **kwargs):
        result = original_rule(self, *args, **kwargs) if after else None
        if state["inside"] and not state["raised"]:
            state["raised"] = True
            raise RuntimeError(f"injected bug in {event}, in {rule}")
        return result if after else original_rule(self, *args, **kwargs)

    buggy = type("BuggyBook", (RequestBook,), {event: wrapped_event, rule: buggy_rule})
    monkeypatch.setattr(core_module, "RequestBook", buggy)
    return state


async def test_an_internal_error_after_a_reads_answers_were_taken_loses_none_of_them(
    monkeypatch, caplog
):
    # The book takes a read's answers, then fails filling the slots they freed (a bug injected
    # into its dispatch, once): the answers it took still reach their callers, the child goes,
    # and what was queued is answered by its next process.
    state = inject_a_bug(monkeypatch, "answers", "_dispatch", after=False)
    caplog.set_level(logging.ERROR, "damocles_ext.supervisor")
    sup = Supervisor([spec(dext_child(), max_attempts=2)], backoff=fast_restarts())
    outputs: dict[int, object] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()

            async def one(miner: int) -> None:
                outputs[miner] = who(await sup.submit(window_task(miner=miner)))[0]

            async with trio.open_nursery() as callers:
                for miner in (7, 8, 9):  # one runs, two wait in the supervisor's queue
                    callers.start_soon(one, miner)
            stats = sup.statistics().children[0]
            sup.request_shutdown()
    assert state["raised"]
    assert outputs == {7: 7, 8: 8, 9: 9}
    assert stats.restarts == 1 and "injected bug" in stats.last_exit, stats.last_exit
    assert our_descendants() == []


async def test_an_internal_error_as_time_passes_loses_no_answer_the_book_gave(monkeypatch, caplog):
    # The request times out on a child that never answers; the book answers it, then fails
    # (an injected bug). The caller still gets the timeout, and the supervisor goes on.
    state = inject_a_bug(monkeypatch, "advance", "_resolve", after=True)
    caplog.set_level(logging.ERROR, "damocles_ext.supervisor")
    sup = Supervisor(
        [spec(dext_child("pass"), request_timeout=0.2, cancel_grace=0.2, max_attempts=1)],
        shutdown_grace=0.1,
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            with pytest.raises(ProverError, match=r"timed out after 0\.2s"):
                await sup.submit(window_task())
            sup.request_shutdown()
    assert state["raised"]
    assert "the request book failed on time passing" in caplog.text
    assert our_descendants() == []


async def test_an_internal_error_as_a_child_is_lost_loses_no_answer_the_book_gave(
    monkeypatch, caplog
):
    # The child dies while running a request it may not be retried for; the book answers it,
    # then fails (an injected bug). The caller still gets why, and the child starts again.
    state = inject_a_bug(monkeypatch, "child_lost", "_resolve", after=True)
    caplog.set_level(logging.ERROR, "damocles_ext.supervisor")
    sup = Supervisor(
        [
            spec(
                dext_child("os._exit(3) if msg.task.miner_id == 1 else answer(msg)"), max_attempts=1
            )
        ],
        backoff=fast_restarts(),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            with pytest.raises(ProverError, match="went down while running it"):
                await sup.submit(window_task(miner=1))
            assert who(await sup.submit(window_task(miner=2)))[0] == 2
            sup.request_shutdown()
    assert state["raised"]
    assert our_descendants() == []


async def test_an_effect_that_fails_to_be_carried_out_stops_none_of_those_after_it(
    monkeypatch, caplog
):
    # One event of the book kills a child, then answers a request on another. Carrying out the
    # kill fails (a bug injected into the book event it starts, child_down): the answer after
    # it still reaches its caller, and the supervisor goes on.
    caplog.set_level(logging.ERROR, "damocles_ext.supervisor")
    sup = Supervisor(
        # (A cancel grace past the test's limit: only the kill can restart the child in time.)
        [spec(dext_child("pass"), index=i, cancel_grace=60.0) for i in (0, 1)],
        backoff=fast_restarts(),
        shutdown_grace=0.1,
    )
    answers: list[object] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready(count=2)
            book = sup._book
            sup.start_nowait(window_task(), on_done=lambda output, error: answers.append(error))
            [rid] = book._requests

            def kill_then_answer(*, out):  # an event as the book's own: a kill, an answer
                out.append(Kill("window_post#0", "hung (the test's)"))
                book.caller_gone(rid, trio.current_time(), out=out)

            def buggy_child_down(self, *args, **kwargs):
                raise RuntimeError("injected bug in child_down")

            monkeypatch.setattr(RequestBook, "child_down", buggy_child_down)
            sup._tell(kill_then_answer)
            monkeypatch.undo()
            assert [str(e) for e in answers] == [f"request {rid} abandoned by its caller"]
            assert "internal error carrying out Kill; going on" in caplog.text
            # The kill itself happened: the child starts again and serves.
            await sup.wait_ready(count=2)
            assert sup.statistics().children[0].restarts == 1
            sup.request_shutdown()
    assert our_descendants() == []


async def test_an_internal_error_in_a_childs_task_ends_that_child_not_the_supervisor(
    monkeypatch, caplog
):
    original = child_loop._handshake
    calls = []

    async def buggy_handshake(sup, child, p):
        calls.append(child.name)
        if len(calls) == 1:
            raise RuntimeError("injected bug in the handshake")
        return await original(sup, child, p)

    monkeypatch.setattr(child_loop, "_handshake", buggy_handshake)
    caplog.set_level(logging.ERROR, "damocles_ext.supervisor")
    sup = Supervisor([spec(dext_child())], backoff=fast_restarts())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            output = await sup.submit(window_task(miner=8))
            stats = sup.statistics().children[0]
            sup.request_shutdown()
    assert who(output)[0] == 8
    assert len(calls) == 2 and stats.restarts == 1
    logged = [r for r in caplog.records if "injected bug in the handshake" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert our_descendants() == []


async def test_an_internal_error_before_a_child_is_spawned_is_retried_by_the_restart_rules(
    monkeypatch, caplog
):
    original = child_loop.child_env
    calls = []

    def buggy_child_env(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected bug before the spawn")
        return original(*args, **kwargs)

    monkeypatch.setattr(child_loop, "child_env", buggy_child_env)
    caplog.set_level(logging.ERROR, "damocles_ext.supervisor")
    sup = Supervisor([spec(dext_child())], backoff=fast_restarts())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            output = await sup.submit(window_task(miner=9))
            sup.request_shutdown()
    assert who(output)[0] == 9 and len(calls) == 2
    logged = [r for r in caplog.records if "injected bug before the spawn" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert our_descendants() == []


async def test_an_internal_error_on_one_control_connection_drops_only_that_one(monkeypatch, caplog):
    sock_dir = Path(tempfile.mkdtemp(prefix="dext-wall-", dir="/tmp"))
    os.chmod(sock_dir, 0o700)
    path = sock_dir / "control.sock"

    async def submit(task, *, deadline=None, priority=0, on_progress=None):
        return echo_output(task)

    original = control_module._Connection._start_request

    def buggy_start_request(self, req, nursery):
        if req.task.miner_id == 666:
            raise RuntimeError("injected bug on one request")
        return original(self, req, nursery)

    monkeypatch.setattr(control_module._Connection, "_start_request", buggy_start_request)
    caplog.set_level(logging.ERROR, "damocles_ext.control")
    server = ControlServer(bind_control_socket(path), submit)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            async with connect(path) as good:
                with pytest.raises(ProverError, match="lost the connection"):
                    async with connect(path) as doomed:
                        await doomed.submit(make_task(666))
                assert await good.submit(make_task(1)) == echo_output(make_task(1))
            assert server.statistics().in_flight == 0
            server.stop_accepting()
            nursery.cancel_scope.cancel()
    os.rmdir(sock_dir)
    logged = [r for r in caplog.records if "internal error; closing it" in r.getMessage()]
    assert logged and logged[0].exc_info is not None


def _buggy_at(where: str):
    """A `start` and a `submit` for a front end, one of which (`where`) meets a bug of ours."""

    def start(task, **options):  # None: the request goes to `submit`
        if where == "start":
            _buggy(task)

    async def submit(task, **options):
        if where == "submit":
            _buggy(task)
        return echo_output(task)

    return start, submit


def _buggy(task):
    if task.miner_id == 666:
        raise RuntimeError("injected bug on one request")


@pytest.mark.parametrize("where", ["submit", "start"])
async def test_an_internal_error_answering_a_control_request_is_logged_once(
    where, sock_dir, caplog
):
    # The bug is logged where it is caught, with its traceback; the error answer it becomes
    # is not warned about again (it was, as any error answer is: two records of one failure).
    # That one record carries the caller's id, as every record of an error answer does (it had
    # no fields: a search by the client's id did not find the failure).
    start, submit = _buggy_at(where)
    caplog.set_level(logging.INFO, "damocles_ext")
    path = sock_dir / "control.sock"
    server = ControlServer(bind_control_socket(path), submit, start=start)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            async with connect(path) as client:
                with pytest.raises(
                    ProverError, match="internal error in damocles-ext: Runtime"
                ) as e:
                    await client.submit(make_task(666))
                assert await client.submit(make_task(1)) == echo_output(make_task(1))
            server.stop_accepting()
            nursery.cancel_scope.cancel()
    (logged,) = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert logged.levelno == logging.ERROR and logged.exc_info is not None, logged
    said = re.match(r"request (\d+): ", str(e.value))  # the client's id, as the client reads it
    assert said is not None, str(e.value)
    assert logged.caller_request_id == int(said.group(1)), logged.__dict__


@pytest.mark.parametrize("where", ["submit", "start"])
async def test_an_internal_error_answering_a_serve_request_is_logged_once(where, caplog):
    # serve's JSON-lines server, as run's control socket: the bug's record, not a second one,
    # with damocles' id of the request.
    start, submit = _buggy_at(where)
    caplog.set_level(logging.INFO, "damocles_ext")
    in_send, in_receive = trio.testing.memory_stream_one_way_pair()
    out_send, out_receive = trio.testing.memory_stream_one_way_pair()
    server = JsonLineServer("window_post", submit, receive_stream=in_receive,
                            send_stream=out_send, ready_line_sent=True, start=start)  # fmt: skip
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            await in_send.send_all(jsonl.encode_request(7, make_task(666)))
            reader = jsonl.LineReader()
            lines: list = []
            while not lines:
                lines += reader.receive_data(await out_receive.receive_some())
            nursery.cancel_scope.cancel()
    assert b"internal error in damocles-ext: RuntimeError" in lines[0], lines
    (logged,) = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert logged.levelno == logging.ERROR and logged.exc_info is not None, logged
    assert logged.caller_request_id == 7, logged.__dict__


async def _a_failed_request_then_a_good_one(door, submit, sock_dir, said, start=None):
    """Through `door` (the control socket or serve's lines), request 666 (answered with an
    error holding `said`), then request 1 on the same connection (answered with its proof)."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            if door == "control":
                path = sock_dir / "control.sock"
                server = ControlServer(bind_control_socket(path), submit, start=start)
                await nursery.start(server.serve)
                async with connect(path) as client:
                    with pytest.raises(ProverError, match=re.escape(said)):
                        await client.submit(make_task(666))
                    assert await client.submit(make_task(1)) == echo_output(make_task(1))
                server.stop_accepting()
            else:
                in_send, in_receive = trio.testing.memory_stream_one_way_pair()
                out_send, out_receive = trio.testing.memory_stream_one_way_pair()
                serve = JsonLineServer("window_post", submit, receive_stream=in_receive,
                                       send_stream=out_send, ready_line_sent=True,
                                       start=start)  # fmt: skip
                nursery.start_soon(serve.run)
                await in_send.send_all(jsonl.encode_request(7, make_task(666)))
                await in_send.send_all(jsonl.encode_request(8, make_task(1)))
                reader = jsonl.LineReader()
                lines: list = []
                while len(lines) < 2:
                    lines += reader.receive_data(await out_receive.receive_some())
                # Each by its id: the two are answered as they finish, in either order.
                answers = {a["id"]: a for a in map(json.loads, lines)}
                assert said in answers[7]["err_msg"], answers
                assert answers[8]["err_msg"] is None and answers[8]["output"], answers
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("door", ["control", "serve"])
async def test_an_error_answer_goes_out_even_when_its_records_fields_fail(
    door, monkeypatch, sock_dir, caplog
):
    # Not a bug's answer, an ordinary one (the prover's error): its warning's fields are worked
    # out just before it is written; a bug there loses neither the answer nor the connection.
    def no_number(error):
        raise RuntimeError("injected bug in the record's fields")

    monkeypatch.setattr(started_module, "supervisor_number", no_number)

    async def submit(task, **options):
        if task.miner_id == 666:
            raise ProverError("request 3 (window_post): no GPU left")
        return echo_output(task)

    caplog.set_level(logging.INFO, "damocles_ext")
    await _a_failed_request_then_a_good_one(door, submit, sock_dir, "no GPU left")
    (warned,) = [r for r in caplog.records if "no GPU left" in r.getMessage()]
    assert warned.levelno == logging.WARNING and not hasattr(warned, "request_id"), warned
    assert isinstance(warned.caller_request_id, int), warned.__dict__


@pytest.mark.parametrize("where", ["submit", "start"])
@pytest.mark.parametrize("door", ["control", "serve"])
async def test_a_request_a_bug_failed_is_answered_even_when_its_records_fields_fail_too(
    door, where, monkeypatch, sock_dir, caplog
):
    # The record of the bug has the fields of an error answer (failure_fields); when working
    # them out fails as well, the request is still answered, its record has the caller's id
    # alone, and the connection goes on.
    def no_number(error):
        if "injected bug" in str(error):
            raise RuntimeError("injected bug in the record's fields")

    monkeypatch.setattr(started_module, "supervisor_number", no_number)

    start, submit = _buggy_at(where)
    caplog.set_level(logging.INFO, "damocles_ext")
    said = "internal error in damocles-ext: RuntimeError"
    await _a_failed_request_then_a_good_one(door, submit, sock_dir, said, start=start)
    (logged,) = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert logged.exc_info is not None and isinstance(logged.caller_request_id, int)
