"""Test helpers: drive a real `damocles-ext child` process, and make throw-away plugin packages.

The child is a real subprocess; its stdout is decoded on a reader thread into a queue, so a test
waits for the next message with a timeout instead of sleeping.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Self

from damocles_ext.protocol import dext, jsonl
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt, WinningPoSt

TIMEOUT = 10.0  # generous: only reached when something is broken
EOF = object()


def window_task(miner: int = 1000, seed_byte: int = 7, sectors: int = 2) -> WindowPoSt:
    """A small WindowPoSt task; the echo-family provers never open its files."""
    replicas = [
        PoStReplicaInfo(i, bytes([i]) * 32, f"/nonexistent/cache{i}", f"/nonexistent/sealed{i}")
        for i in range(sectors)
    ]
    return WindowPoSt(miner, "StackedDrgWindow2KiBV1_2", replicas, bytes([seed_byte]) * 32)


def winning_task(miner: int = 1000, seed_byte: int = 9) -> WinningPoSt:
    replicas = [PoStReplicaInfo(5, bytes(32), "/nonexistent/cache", "/nonexistent/sealed")]
    return WinningPoSt(miner, "StackedDrgWinning2KiBV1", replicas, bytes([seed_byte]) * 32)


def child_env(pythonpath: list[str | Path] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DAMOCLES_EXT_TRACE_HOOKS", None)
    if pythonpath:
        parts = [str(p) for p in pythonpath]
        if env.get("PYTHONPATH"):
            parts.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


class Child:
    """A running `damocles-ext child` with its output decoded on a background thread."""

    def __init__(
        self,
        stage: str,
        plugin: str,
        *options: str,
        protocol: str = "dext",
        extra: list[str] = (),
        pythonpath: list[str | Path] = (),
        sigint_ignored: bool = False,
    ) -> None:
        """`sigint_ignored`: start it with SIGINT ignored, as `nohup ... &` starts a program."""
        argv = [sys.executable, "-m", "damocles_ext", "child", stage, "--plugin", plugin]
        for option in options:
            argv += ["--option", option]
        argv += ["--protocol", protocol, *extra]
        self.stage = stage
        self.protocol = protocol
        # What a child inherits: ignored stays ignored across exec (a handler does not).
        before = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint_ignored else None
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=child_env(pythonpath),
            )
        finally:
            if before is not None:
                signal.signal(signal.SIGINT, before)
        self.messages: queue.Queue[Any] = queue.Queue()
        self.raw = bytearray()
        self._stderr: list[bytes] = []
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        decoder = dext.FrameDecoder() if self.protocol == "dext" else jsonl.LineReader()
        fd = self.proc.stdout.fileno()
        while True:
            data = os.read(fd, 65536)
            self.raw += data
            try:
                for item in decoder.receive_data(data):
                    self.messages.put(item)
            except dext.ProtocolError as exc:
                self.messages.put(exc)
                return
            if not data:
                self.messages.put(EOF)
                return

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        """Everything the child logged so far (complete once it exited and was waited for)."""
        return b"".join(self._stderr).decode(errors="replace")

    def next(self, timeout: float = TIMEOUT) -> Any:
        """The next decoded message (or line), EOF at end of output; fails after `timeout`."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no message from the child within {timeout} s; stderr:\n{self.stderr}"
            ) from None

    def next_of(self, kind: type, timeout: float = TIMEOUT) -> tuple[Any, list[Any]]:
        """Skip to the next message of `kind`; returns it and what came before it."""
        skipped = []
        while True:
            msg = self.next(timeout)
            if isinstance(msg, kind):
                return msg, skipped
            if msg is EOF:
                raise AssertionError(f"EOF before a {kind.__name__}; got {skipped}\n{self.stderr}")
            skipped.append(msg)

    def until_eof(self, timeout: float = TIMEOUT) -> list[Any]:
        """Every message up to the end of the child's output."""
        seen = []
        while (msg := self.next(timeout)) is not EOF:
            seen.append(msg)
        return seen

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send_msg(self, message: Any) -> None:
        self.send(dext.encode(message))

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def wait(self, timeout: float = TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self._threads:
            t.join(TIMEOUT)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def make_plugin_dist(
    root: Path,
    *,
    dist: str,
    module: str,
    source: str,
    entry_point: str | None = None,
    version: str = "0.1",
) -> Path:
    """Write `module.py` and a `dist-info` naming it in the damocles_ext group under `root`.

    With `root` on PYTHONPATH (or sys.path) importlib.metadata sees an installed distribution.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[damocles_ext]\n{entry_point or module} = {module}\n")
    return root
