"""systemd's watchdog (WatchdogSec= in the units): `run`, `worker` and `coordinator`, started as
systemd starts them, ping a real notify socket from their trio loop; their children do not inherit
the variables; a SIGABRT (what systemd sends when the pings stop) writes every thread's stack; a
notify socket that is missing is said once and pinged again when it is back."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers.frontend import DEXT, dext_env, short_socket_dir, write_config

from damocles_ext.frontends import watchdog as wd

# A child that says on stderr (relayed to the supervisor's log) what it inherited, then waits.
SNITCH = (
    '[[WdPost]]\nBin = "/bin/sh"\nArgs = ["-c", "echo inherited'
    " NOTIFY_SOCKET=${NOTIFY_SOCKET:-unset} WATCHDOG_USEC=${WATCHDOG_USEC:-unset} >&2;"
    ' exec sleep 600"]\n'
)


@contextmanager
def notify_socket(name: str) -> Iterator[tuple[socket.socket, Path]]:
    """systemd's side: a datagram socket the service is told of by NOTIFY_SOCKET."""
    with short_socket_dir("wd", name) as d, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(d / "notify"))
        s.settimeout(60)
        yield s, d / "notify"


def commands(tmp_path: Path) -> dict[str, list[str]]:
    cfg = write_config(tmp_path, SNITCH)
    return {
        "run": ["run", "-c", str(cfg), "--socket", str(tmp_path / "run" / "control.sock")],
        "worker": ["worker", "-c", str(cfg), "--manager", "127.0.0.1:9"],
        "coordinator": ["coordinator", "--jobs", f"sqlite:///{tmp_path}/jobs.db", "--listen",
                        "127.0.0.1:0"],
    }  # fmt: skip


@pytest.mark.parametrize("command", ["run", "worker", "coordinator"])
def test_a_long_running_command_pings_systemds_watchdog(
    command: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    with notify_socket(request.node.name) as (systemd, path):
        env = dext_env() | {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "300000"}
        proc = subprocess.Popen(
            [*DEXT, *commands(tmp_path)[command], "--log-level", "info"],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            # Every 0.1 s (a third of 0.3 s): a few in a row, each from the running loop.
            assert [systemd.recv(64) for _ in range(3)] == [wd.PING] * 3
            if command != "coordinator":  # the two that start children
                assert proc.stderr is not None
                for line in proc.stderr:
                    if "inherited" in line and "${" not in line:  # said, not its command
                        assert "inherited NOTIFY_SOCKET=unset WATCHDOG_USEC=unset" in line
                        break
                else:
                    pytest.fail(f"{command} ended before its child spoke")
        finally:
            proc.terminate()
            proc.communicate(timeout=60)


def test_a_sigabrt_from_systemds_watchdog_says_where_every_thread_was(tmp_path: Path) -> None:
    # systemd kills a service whose pings stopped with SIGABRT: its stacks are in the journal.
    (tmp_path / "run").mkdir(mode=0o700)
    with notify_socket("abort") as (systemd, path):
        env = dext_env() | {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "300000"}
        proc = subprocess.Popen(
            [*DEXT, *commands(tmp_path)["run"]],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert systemd.recv(64) == wd.PING  # the watchdog is kept
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:  # failed before its abort: nothing left behind
                proc.kill()
                proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err
    assert "trio/_core/_run.py" in err  # the main thread's stack, in trio's loop


def test_the_variables_are_taken_and_the_watchdog_kept_only_when_meant_for_this_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def taken(**env: str) -> tuple[wd.Watchdog | None, dict[str, str]]:
        environ = {"PATH": "/bin", **env}
        return wd.take_watchdog(environ), environ

    assert taken(NOTIFY_SOCKET="/run/n", WATCHDOG_USEC="60000000") == (
        wd.Watchdog("/run/n", 60.0),
        {"PATH": "/bin"},
    )
    here = str(os.getpid())
    assert taken(NOTIFY_SOCKET="@n", WATCHDOG_USEC="1000", WATCHDOG_PID=here)[0] == wd.Watchdog(
        "\0n", 0.001
    )
    # Set for the process that started us (WATCHDOG_PID), not set, or off: none, and taken.
    assert taken(NOTIFY_SOCKET="/run/n", WATCHDOG_USEC="1000", WATCHDOG_PID="1") == (
        None,
        {"PATH": "/bin"},
    )
    assert taken(NOTIFY_SOCKET="/run/n") == (None, {"PATH": "/bin"})
    assert taken(WATCHDOG_USEC="1000") == (None, {"PATH": "/bin"})
    assert taken(NOTIFY_SOCKET="/run/n", WATCHDOG_USEC="0")[0] is None
    with caplog.at_level(logging.WARNING):
        assert taken(NOTIFY_SOCKET="/run/n", WATCHDOG_USEC="1m")[0] is None
        assert taken(NOTIFY_SOCKET="vsock:2:1", WATCHDOG_USEC="1000")[0] is None
    assert "WATCHDOG_USEC='1m' is not a number of microseconds" in caplog.text
    assert "NOTIFY_SOCKET='vsock:2:1' is not a unix socket" in caplog.text
    assert "remove WatchdogSec from its unit" in caplog.text
    # Pinged every third of its time, but not in a busy loop for a WatchdogSec of 1 ms.
    assert (wd.Watchdog("/run/n", 60.0).every, wd.Watchdog("/run/n", 0.001).every) == (20.0, 0.05)


def test_a_missing_notify_socket_is_said_once_and_pinged_again_when_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        with short_socket_dir("wd", "back") as d:
            watchdog = wd.Watchdog(str(d / "notify"), 3.0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wd.keep_watchdog, watchdog)
                await trio.sleep(10)  # virtual: four pings lost
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.bind(watchdog.address)
                    s.setblocking(False)
                    await trio.sleep(1.5)  # the next ping, a third of 3 s after the last
                    assert s.recv(64) == wd.PING
                nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger=wd.__name__):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    said = [r.getMessage() for r in caplog.records]
    (lost,) = [m for m in said if m.startswith("cannot ping")]  # said once, not every second
    assert "No such file or directory; systemd restarts this service once 3 s pass" in lost
    assert said[-1] == "systemd's watchdog is pinged again"


def test_no_socket_for_the_pings_is_said_and_tried_again_not_the_end_of_the_run(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pings run as a trio system task: a socket it could not make (at the limit of open
    # files) raised out of it and ended the whole run with TrioInternalError. The fault is
    # injected once: the first socket is refused as the kernel refuses it (EMFILE).
    made = wd._notify_socket
    refused = [OSError(errno.EMFILE, "Too many open files")]

    def notify_socket_once_refused() -> socket.socket:
        if refused:
            raise refused.pop()
        return made()

    monkeypatch.setattr(wd, "_notify_socket", notify_socket_once_refused)

    async def main() -> None:
        with notify_socket("nofile") as (systemd, path):
            systemd.setblocking(False)
            wd.start_watchdog({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000"})
            await trio.sleep(1.5)  # virtual: the first ping failed, the second went out
            assert systemd.recv(64) == wd.PING

    with caplog.at_level(logging.INFO, logger=wd.__name__):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    said = [r.getMessage() for r in caplog.records]
    assert any("cannot ping systemd's watchdog" in m and "Too many open files" in m for m in said)
    assert said[-1] == "systemd's watchdog is pinged again"
