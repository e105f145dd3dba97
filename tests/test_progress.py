"""Progress display: a redrawn bar on a terminal (checked through a real pty), periodic plain lines
elsewhere; `prove` and `sectors create` use it."""

from __future__ import annotations

import errno
import io
import os
import pty
import subprocess
from pathlib import Path

from helpers.frontend import DEXT, dext_env, make_task, write_config

from damocles_ext.progress import ProgressRenderer
from damocles_ext.protocol.jsonl import task_to_json


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_phase_start_every_interval_and_at_completion():
    # Phase boundaries print at once, but no more than one line a second.
    out, clock = io.StringIO(), FakeClock()
    r = ProgressRenderer(out, tty=False, interval=5.0, label="window_post", clock=clock)
    r.update("vanilla", 0, 10)  # a new phase: printed
    for done in range(1, 10):
        clock.now += 1.0
        r.update("vanilla", done, 10)  # printed once 5 s went by
    clock.now += 0.5
    r.update("vanilla", 10, 10)  # done: printed at once
    r.update("snark", 0, 0)  # a new phase, but the last line is not a second old
    clock.now += 1.0
    r.update("snark", 1, 0)
    clock.now += 5.0
    r.update("snark", 2, 0)  # 5 s since the last line
    clock.now += 1.0
    r.update("snark", 3, 0)
    r.close()  # the last state was not printed yet
    assert out.getvalue().splitlines() == [
        "window_post vanilla: 0/10 (0%) after 0.0s",
        "window_post vanilla: 5/10 (50%) after 5.0s",
        "window_post vanilla: 10/10 (100%) after 9.5s",
        "window_post snark: 2 after 15.5s",
        "window_post snark: 3 after 16.5s",
    ]


def test_plain_close_prints_nothing_twice_and_nothing_without_progress():
    out = io.StringIO()
    ProgressRenderer(out, tty=False).close()
    assert out.getvalue() == ""
    r = ProgressRenderer(out, tty=False, clock=FakeClock())
    r.update("sectors", 3, 3)
    r.close()
    assert out.getvalue() == "sectors: 3/3 (100%) after 0.0s\n"


def test_terminal_bar_is_redrawn_in_place_at_most_ten_times_a_second():
    out, clock = io.StringIO(), FakeClock()
    r = ProgressRenderer(out, tty=True, clock=clock, columns=80)
    r.update("sleep", 0, 20)
    clock.now += 0.05
    r.update("sleep", 1, 20)  # too soon: not drawn
    clock.now += 0.05
    r.update("sleep", 10, 20)
    r.close()
    frames = out.getvalue().split("\r")[1:]
    assert frames[0] == f"sleep [{'.' * 40}]   0%  0/20  0.0s\x1b[K"
    assert frames[1] == f"sleep [{'#' * 20}{'.' * 20}]  50%  10/20  0.1s\x1b[K\n"
    assert len(frames) == 2  # close() had nothing new to draw, only ends the line


def test_terminal_bar_fits_a_narrow_terminal():
    out = io.StringIO()
    r = ProgressRenderer(out, tty=True, clock=FakeClock(), columns=40)
    r.update("build_tree", 7, 10)
    r.close()
    line = out.getvalue().removeprefix("\r").removesuffix("\x1b[K\n")
    assert line == "build_tree [#####...]  70%  7/10  0.0s"  # 8 cells of bar fit
    out = io.StringIO()
    r = ProgressRenderer(out, tty=True, clock=FakeClock(), columns=20)
    r.update("build_tree", 7, 10)  # no room for a bar
    r.close()
    assert out.getvalue() == "\rbuild_tree  70%  7/\x1b[K\n"


def test_a_pty_is_a_terminal_and_a_pipe_is_not():
    master, slave = pty.openpty()
    read_end, write_end = os.pipe()
    with open(slave, "w") as tty_stream, open(write_end, "w") as pipe_stream:
        assert ProgressRenderer(tty_stream).tty is True
        assert ProgressRenderer(pipe_stream).tty is False
    os.close(master)
    os.close(read_end)


# -- the commands -------------------------------------------------------------------------------


def _run_on_pty(argv: list[str], cwd: Path) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pty (stdout on a pipe); returns (exit code, stdout, terminal bytes)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=dext_env(),
        cwd=cwd,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError as exc:  # EIO: every copy of the slave side is closed (the process exited)
            assert exc.errno == errno.EIO
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = proc.stdout.read()
    proc.stdout.close()
    return proc.wait(timeout=30), stdout, b"".join(chunks)


def _sleep_setup(tmp_path: Path) -> list[str]:
    cfg = write_config(
        tmp_path,
        '[[WdPost]]\nPlugin = "sleep"\nPluginOptions = { seconds = 1.2, progress_interval = 0.1 }\n',
    )
    task = tmp_path / "task.json"
    task.write_bytes(task_to_json(make_task(5)))
    return [*DEXT, "prove", "window_post", "--request", str(task), "-c", str(cfg)]


def test_prove_draws_a_bar_on_a_terminal(tmp_path: Path):
    rc, stdout, terminal = _run_on_pty(_sleep_setup(tmp_path), tmp_path)
    assert rc == 0, terminal.decode(errors="replace")
    assert stdout.startswith(b'{"proofs":')
    text = terminal.decode()
    frames = [f for f in text.split("\r") if f.startswith("sleep [")]
    assert len(frames) >= 3, text  # redrawn as the child reports progress
    assert any("#" in f for f in frames) and all("\x1b[K" in f for f in frames)
    assert text.rstrip("\r\n").endswith("\x1b[K")  # the bar's line was ended


def test_prove_prints_plain_lines_when_stderr_is_not_a_terminal(tmp_path: Path):
    done = subprocess.run(
        _sleep_setup(tmp_path), capture_output=True, env=dext_env(), timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stderr.decode().splitlines()
    assert lines and all(line.startswith("window_post sleep: ") for line in lines), lines
    assert "\r" not in done.stderr.decode() and "\x1b" not in done.stderr.decode()
    # A 1.2 s proof: the first report, then the completion (no 5 s heartbeat in between).
    assert len(lines) <= 3
    # --no-progress: nothing at all.
    quiet = subprocess.run(
        [*_sleep_setup(tmp_path), "--no-progress"],
        capture_output=True,
        env=dext_env(),
        timeout=30,
        check=False,
    )
    assert quiet.returncode == 0 and quiet.stderr == b""


def test_sectors_create_draws_a_bar_on_a_terminal(tmp_path: Path):
    argv = [*DEXT, "sectors", "create", "--proof-type", "StackedDrgWindow2KiBV1_2", "--count",
            "3", "--miner", "1000", "--out", str(tmp_path / "fx")]  # fmt: skip
    rc, stdout, terminal = _run_on_pty(argv, tmp_path)
    assert rc == 0, terminal.decode(errors="replace")
    assert stdout.decode().strip() == str(tmp_path / "fx" / "manifest.json")
    frames = [f for f in terminal.decode().split("\r") if f.startswith("sectors [")]
    assert frames and "100%  3/3" in frames[-1]
