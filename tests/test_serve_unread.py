"""`damocles-ext serve` stopping its reading while request lines wait in its stdin pipe: each is
answered with why, not left to damocles-manager's callers, which would wait on their contexts.

A second signal: serve is stopped (SIGSTOP) while the lines and the signal are written, so that
once it goes on it sees both at once. It acts on the signal within three reads (256 KiB each:
trio hands a signal to its watcher through one task more), and the lines fill more than three.
The drain's end is driven in-process, serve reading 64 bytes at a time.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
import trio.testing
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import DEXT, ManagerLike, make_task, plugin_block, running, write_config

from damocles_ext.frontends import serve_jsonl
from damocles_ext.frontends.serve_jsonl import InFlight, StopReasons, serve_draining
from damocles_ext.protocol import jsonl

_READ = 256 * 1024  # what serve reads at once
_REPLICAS = 100  # about 17 KB a line


def _pipe_max() -> int:
    """What we may make a pipe hold (0 when this machine does not say)."""
    try:
        return int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        return 0


async def _lines_waiting_as_signals_come(
    m: ManagerLike, *signals: signal.Signals, blank: int = 0
) -> list[int]:
    """Stop serve, fill its stdin pipe with `blank` bytes of blank lines, then requests, send
    `signals`, let it go on; the requests' ids."""
    pid, fd = m.process.pid, m.process.stdin.fileno()
    try:
        capacity = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(1 << 20, _pipe_max()))
    except OSError as exc:  # over this user's pipe pages, say
        pytest.skip(f"cannot make a pipe hold more: {exc}")
    per_line = len(jsonl.encode_request(10**6, make_task(1000, _REPLICAS)))
    count = (capacity * 7 // 8 - blank) // per_line  # all fit: no write waits for serve
    if blank + count * per_line < 3 * _READ + 2 * per_line:
        pytest.skip(f"a pipe of {capacity} bytes takes too few request lines")
    os.kill(pid, signal.SIGSTOP)
    await trio.to_thread.run_sync(os.waitid, os.P_PID, pid, os.WSTOPPED)  # stopped now
    await m.send_raw(b"\n" * blank)
    ids = [await m.send(make_task(1000 + k, _REPLICAS)) for k in range(count)]
    for signum in signals:
        os.kill(pid, signum)
    os.kill(pid, signal.SIGCONT)
    return ids


def _check_answered(m: ManagerLike, ids: list[int], reasons: tuple[str, ...]) -> None:
    missing = [i for i in ids if i not in m.responses]
    assert not missing, f"{len(missing)} of {len(ids)} requests never answered: {missing}"
    for i in ids:
        r = m.responses[i]
        assert r.output is None and r.err_msg.startswith(f"request {i} (window_post)"), r
        assert any(reason in r.err_msg for reason in reasons), r.err_msg
    assert (m.duplicates, m.unknown, m.bad_lines) == ([], [], [])


@pytest.mark.parametrize("mode", ["children", "connect"])
async def test_a_second_signal_answers_the_requests_left_unread_in_stdin(tmp_path, sock_path, mode):
    cfg = write_config(tmp_path, plugin_block("WdPost", "sleep", seconds=30))
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        with trio.fail_after(30):
            source = ["-c", str(cfg)]
            if mode == "connect":
                run, _ = await stack.enter_async_context(running(nursery, cfg, sock_path))
                source = ["--connect", str(sock_path)]
            argv = [*DEXT, "serve", "window_post", *source, "--log-level", "debug"]
            m = await ManagerLike.start(nursery, argv, "window_post", stderr=subprocess.PIPE)
            first = await m.send(make_task(1))
            await m.wait_log(f"request {first}: submitted")
            m.process.send_signal(signal.SIGTERM)
            await m.wait_log("SIGTERM: shutting down gracefully")
            # SIGINT, not SIGTERM again: two of one kind pending at once count as one.
            ids = await _lines_waiting_as_signals_come(m, signal.SIGINT)
            assert await m.process.wait() == 0, "\n".join(m.log)
            await m.eof.wait()
            if mode == "connect":
                run.send_signal(signal.SIGTERM)
                assert await run.wait() == 0
            nursery.cancel_scope.cancel()
    # (Under load the child may not have taken it before the first signal: then refused.)
    said = m.responses[first].err_msg
    assert "stopped at once" in said or "still queued" in said, m.responses[first]
    # Read before the second signal: refused (by serve --connect, or by the stopping
    # supervisor); left in the pipe: what serve says as it stops reading.
    _check_answered(m, ids, ("shutting down", "stopped at once", "before it read the request"))
    assert any("left unread in stdin" in line for line in m.log), "\n".join(m.log)


async def test_requests_in_stdin_as_the_drain_ends_are_answered_not_left_unread(monkeypatch):
    # The last answer in flight ends the drain after the first signal, and serve stops reading
    # then, with requests damocles-manager wrote a moment before still in the pipe. In-process
    # over real pipes, reading 64 bytes at a time: the drain ends before serve has read them.
    monkeypatch.setattr(serve_jsonl, "_READ_SIZE", 64)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    receive, send = trio.lowlevel.FdStream(in_r), trio.lowlevel.FdStream(out_w)
    answers = trio.lowlevel.FdStream(out_r)
    signals_in, signals = trio.open_memory_channel[int](1)
    in_flight = InFlight()
    started, release = trio.Event(), trio.Event()

    async def prove() -> object:
        started.set()
        await release.wait()
        return echo_output(make_task(1))

    async def submit(task):
        return await in_flight.run(prove)

    reasons = StopReasons("reader gone", "grace over", "at once", "refused: not sent on")
    lines: list[bytes] = []
    reader = jsonl.LineReader()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):

            async def collect() -> None:
                while data := await answers.receive_some():
                    lines.extend(reader.receive_data(data))

            nursery.start_soon(collect)

            async def serve() -> None:
                await serve_draining(
                    "window_post", submit, in_flight, receive, send, signals, 30, reasons,
                    ready_line_sent=True,
                )  # fmt: skip
                await send.aclose()

            nursery.start_soon(serve)
            os.write(in_w, jsonl.encode_request(1, make_task(1)))
            await started.wait()
            await signals_in.send(signal.SIGTERM)
            await trio.testing.wait_all_tasks_blocked()  # the drain waits for request 1
            later = b"".join(jsonl.encode_request(i, make_task(i)) for i in range(2, 12))
            assert os.write(in_w, later) == len(later)
            release.set()  # no checkpoint between: serve sees both at once
    os.close(in_w)
    await receive.aclose()
    responses = [jsonl.decode_response(line, "window_post") for line in lines]
    assert sorted(r.id for r in responses) == list(range(1, 12))
    for r in responses:
        if r.id == 1:
            assert r.output == echo_output(make_task(1)), r
        else:
            assert r.err_msg == f"request {r.id} (window_post): refused: not sent on", r


async def test_with_its_reader_gone_serve_answers_nothing_left_in_stdin(monkeypatch, caplog):
    # damocles-manager killed (stdout's reader closed): the drain stops at once, and the lines
    # left in stdin were read and answered into a closed pipe, a log line per request dropped.
    monkeypatch.setattr(serve_jsonl, "_READ_SIZE", 64)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(out_r)  # the reader is gone
    receive, send = trio.lowlevel.FdStream(in_r), trio.lowlevel.FdStream(out_w)
    signals_in, signals = trio.open_memory_channel[int](1)
    in_flight = InFlight()

    async def submit(task):
        return await in_flight.run(trio.sleep_forever)

    reasons = StopReasons("reader gone", "grace over", "at once", "refused: not sent on")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                await serve_draining(
                    "window_post", submit, in_flight, receive, send, signals, 30, reasons,
                    ready_line_sent=True,
                )  # fmt: skip

            nursery.start_soon(serve)
            await trio.testing.wait_all_tasks_blocked()
            os.write(in_w, b"".join(jsonl.encode_request(i, make_task(i)) for i in range(1, 30)))
            await signals_in.send(signal.SIGTERM)  # the drain finds the reader gone
    os.close(in_w)
    await receive.aclose()
    said = [r.getMessage() for r in caplog.records]
    assert not any("left unread in stdin" in m or "answer dropped" in m for m in said), said
