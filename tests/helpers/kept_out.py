"""Directories a user may not enter: what a call says when run by such a user."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

NOBODY = 65534
HANG_AFTER = 60.0  # seconds


@contextlib.contextmanager
def a_closed_directory() -> Iterator[Path]:
    """A directory of mode 0000 (with a file in it) under a directory anyone may enter."""
    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path is in a 0700 directory
        base = Path(tmp)
        base.chmod(0o755)
        closed = base / "closed"
        closed.mkdir()
        (closed / "inside").write_text("")
        closed.chmod(0)
        try:
            yield closed
        finally:
            closed.chmod(0o700)


def said_when_kept_out(call: Callable[[], object]) -> str:
    """'<exception type>: <message>' of what `call()` raises ('' if nothing), called by a user
    whom a 0000 directory keeps out: this one, or nobody when this one is root (whom none
    does), in a forked process."""

    def said() -> str:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - what it raises is what the test checks
            return f"{type(exc).__name__}: {exc}"
        return ""

    if os.geteuid() != 0:
        return said()
    read, write = os.pipe()
    if (pid := os.fork()) == 0:
        try:
            try:
                os.setgroups([])  # not root's groups: a directory's group bits would let it in
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as exc:
                os.write(write, f"!could not become uid {NOBODY}: {exc}".encode())
            else:
                os.write(write, b"=" + said().encode())  # "=": it answered, if only ""
        finally:
            os._exit(0)
    os.close(write)
    # A fork of a process with threads: should the call hang there, the test fails, not the run.
    if not select.select([read], [], [], HANG_AFTER)[0]:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as answer:
        text = answer.read().decode()
    assert text, f"the call gave no answer within {HANG_AFTER} s in the forked process"
    assert text[0] == "=", text[1:]
    return text[1:]
