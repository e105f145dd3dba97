"""Shared helpers of the front-end tests (serve, run/prove, stress): tasks, configs, processes."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import h11
import trio

from damocles_ext.protocol import jsonl
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt, WinningPoSt

DEXT = [sys.executable, "-m", "damocles_ext"]

_SET_THEN_RUN = """\
import importlib, sys
for name, value in {constants!r}.items():
    module, _, attr = name.rpartition(".")
    module = importlib.import_module(module)
    if not hasattr(module, attr):
        raise AttributeError(f"{{module.__name__}} has no {{attr}} to set")
    setattr(module, attr, value)
from damocles_ext.cli import main
sys.exit(main())
"""


def dext_with(constants: dict[str, object]) -> list[str]:
    """`damocles-ext` (as DEXT) with module constants set before it runs, each named by its
    dotted path (`{"damocles_ext.frontends.producer.LATE_LOOK": 0.5}`): what a test shortens
    in a real process of its own, as it would monkeypatch one in-process."""
    return [sys.executable, "-c", _SET_THEN_RUN.format(constants=constants)]


_SHIFTED_THEN_RUN = """\
import sys, time
_time = time.time
time.time = lambda: _time() + {seconds!r}
from damocles_ext.cli import main
sys.exit(main())
"""


def dext_shifted(seconds: float) -> list[str]:
    """`damocles-ext` (as DEXT) whose wall clock (`time.time`, set before anything is imported)
    is `seconds` ahead of this machine's (behind when negative): a machine whose clock is off."""
    return [sys.executable, "-c", _SHIFTED_THEN_RUN.format(seconds=seconds)]


_STEPPING_THEN_RUN = """\
import os, sys, time
def _seconds(path):
    try:
        with open(path) as f:
            return float(f.read() or 0)
    except (OSError, ValueError):
        return 0.0
if {wall!r} is not None:
    _time = time.time
    time.time = lambda: _time() + _seconds({wall!r})
if {server!r} is not None:
    import damocles_ext.jobs.store_clock as store_clock
    _skew = store_clock.clock_skew
    def clock_skew(engine, clock):
        r = _skew(engine, clock)
        return None if r is None else r._replace(skew=r.skew - _seconds({server!r}))
    store_clock.clock_skew = clock_skew
from damocles_ext.cli import main
sys.exit(main())
"""


def dext_stepping(wall: Path | None = None, server: Path | None = None) -> list[str]:
    """`damocles-ext` (as DEXT) whose wall clock is this machine's plus the seconds in the file
    `wall`, and whose readings of a PostgreSQL server's clock find it the seconds in the file
    `server` ahead of the real one; each read at every look (no file: 0): clocks a test steps
    mid-run (`step_clock`), as NTP steps a machine's or a database host's."""
    wall_path = None if wall is None else str(wall)
    server_path = None if server is None else str(server)
    return [sys.executable, "-c", _STEPPING_THEN_RUN.format(wall=wall_path, server=server_path)]


def step_clock(path: Path, seconds: float) -> None:
    """Set the clock that `path` shifts (dext_stepping's) `seconds` off the real one, at once
    (a new file put in place: a reader never sees it half written)."""
    new = path.with_name(path.name + ".new")
    new.write_text(repr(seconds))
    os.replace(new, path)


def make_task(miner: int = 1000, replicas: int = 1, stage: str = "window_post"):
    """A small task whose miner id tells requests apart (echo/sleep outputs depend on it)."""
    infos = [
        PoStReplicaInfo(
            sector_id=i, comm_r=bytes([i % 256]) * 32, cache_dir=f"/c/{i}", sealed_file=f"/s/{i}"
        )
        for i in range(replicas)
    ]
    seed = bytes([miner % 256] * 31 + [miner % 64])
    if stage == "window_post":
        return WindowPoSt(
            miner_id=miner, proof_type="StackedDrgWindow2KiBV1_2", replicas=infos, seed=seed
        )
    return WinningPoSt(
        miner_id=miner, proof_type="StackedDrgWinning2KiBV1", replicas=infos, seed=seed
    )


def plugin_block(table: str, plugin: str, *, concurrent: int = 1, **options) -> str:
    """One [[WdPost]]/[[WinPost]] table running a built-in test prover."""
    lines = [f"[[{table}]]", f'Plugin = "{plugin}"', f"Concurrent = {concurrent}"]
    if options:
        opts = ", ".join(
            f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else v}"
            for k, v in options.items()
        )
        lines.append(f"PluginOptions = {{ {opts} }}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def script_block(script: Path, envs: dict[str, str]) -> str:
    """One [[WdPost]] table running `python SCRIPT` with `envs` set."""
    env_table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in envs.items())
    return (
        "[[WdPost]]\n"
        f"Bin = {json.dumps(sys.executable)}\n"
        f"Args = {json.dumps([str(script)])}\n"
        f"Envs = {{ {env_table} }}\n"
    )


def write_config(directory: Path, text: str) -> Path:
    """DIR/ext-prover.cfg with `text`."""
    path = directory / "ext-prover.cfg"
    path.write_text(text)
    return path


def dext_env() -> dict[str, str]:
    """The environment for a damocles-ext subprocess: unbuffered, this checkout importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def dext_run(
    *args: str,
    input: bytes | None = None,
    timeout: float = 60,
    cwd: Path | None = None,
    dext: list[str] = DEXT,
) -> subprocess.CompletedProcess[bytes]:
    """Run `damocles-ext ARGS...` to completion (`dext`: DEXT, or `dext_with(...)`'s)."""
    return subprocess.run(
        [*dext, *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=dext_env(),
        cwd=cwd,
        check=False,
    )


class ManagerLike:
    """Drives a processor the way damocles-manager's extproc does: wait for the exact ready line
    (5 s limit), write `{"id":N,"task":...}` lines with ids counting up from 1, and match the
    response lines by id in whatever order they come. Everything odd is recorded for asserts."""

    def __init__(self, process: trio.Process, stage: str) -> None:
        self.process = process
        self.stage = stage
        self._next_id = 1
        self._waiters: dict[int, trio.Event] = {}
        self.responses: dict[int, jsonl.JsonResponse] = {}
        self.duplicates: list[int] = []
        self.unknown: list[int] = []
        self.bad_lines: list[bytes] = []
        self.eof = trio.Event()
        self._send_lock = trio.Lock()
        self.log: list[str] = []  # stderr lines, when started with stderr=subprocess.PIPE
        self._log_changed = trio.Event()

    @classmethod
    async def start(
        cls,
        nursery: trio.Nursery,
        argv: list[str],
        stage: str,
        *,
        stderr,
        ready_timeout: float = 5.0,
    ) -> ManagerLike:
        """Spawn `argv` and wait for its ready line; fails the test if it does not come in time."""
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=dext_env()
        )
        self = cls(process, stage)
        reader = jsonl.LineReader()
        with trio.fail_after(ready_timeout):
            first: list = []
            while not first:
                data = await process.stdout.receive_some()
                if not data:
                    raise AssertionError("processor exited before its ready line")
                first = reader.receive_data(data)
        assert first[0] == jsonl.ready_line(stage), f"wrong ready line {first[0]!r}"
        for line in first[1:]:
            self._on_line(line)
        nursery.start_soon(self._read_loop, reader)
        if stderr == subprocess.PIPE:
            nursery.start_soon(self._log_loop)
        return self

    async def _log_loop(self) -> None:
        reader = jsonl.LineReader()
        while True:
            data = await self.process.stderr.receive_some()
            for line in reader.receive_data(data):
                if isinstance(line, bytes):
                    self.log.append(line.decode(errors="replace"))
            self._log_changed.set()
            self._log_changed = trio.Event()
            if not data:
                return

    async def wait_log(self, text: str) -> str:
        """Wait for a stderr line containing `text` (needs stderr=subprocess.PIPE)."""
        seen = 0
        while True:
            for line in self.log[seen:]:
                if text in line:
                    return line
            seen = len(self.log)
            await self._log_changed.wait()

    async def wait_log_times(self, text: str, times: int) -> None:
        """Wait until `times` stderr lines contain `text` (needs stderr=subprocess.PIPE)."""
        while sum(text in line for line in self.log) < times:
            await self._log_changed.wait()

    async def _read_loop(self, reader: jsonl.LineReader) -> None:
        while True:
            try:
                data = await self.process.stdout.receive_some()
            except trio.ClosedResourceError:  # vanish()
                return
            for line in reader.receive_data(data):
                self._on_line(line)
            if not data:
                self.eof.set()
                return

    def _on_line(self, line) -> None:
        try:
            response = jsonl.decode_response(line, self.stage)
        except jsonl.JsonLineError:
            self.bad_lines.append(line)
            return
        if response.id in self.responses:
            self.duplicates.append(response.id)
        elif response.id not in self._waiters:
            self.unknown.append(response.id)
        else:
            self.responses[response.id] = response
            self._waiters[response.id].set()

    async def send(self, task) -> int:
        """Write one request line; returns its id."""
        async with self._send_lock:
            request_id = self._next_id
            self._next_id += 1
            self._waiters[request_id] = trio.Event()
            await self.process.stdin.send_all(jsonl.encode_request(request_id, task))
        return request_id

    async def send_raw(self, line: bytes, request_id: int | None = None) -> None:
        """Write a hand-made line; register `request_id` as awaited."""
        if request_id is not None:
            self._waiters[request_id] = trio.Event()
        async with self._send_lock:
            await self.process.stdin.send_all(line)

    async def wait(self, request_id: int) -> jsonl.JsonResponse:
        """The response to `request_id`, once it came."""
        await self._waiters[request_id].wait()
        return self.responses[request_id]

    async def request(self, task) -> jsonl.JsonResponse:
        """Send one task and wait for its response."""
        return await self.wait(await self.send(task))

    async def close_stdin(self) -> None:
        """What the manager's exit looks like from the child: EOF on stdin."""
        await self.process.stdin.aclose()

    async def vanish(self) -> None:
        """What a SIGKILLed manager looks like from the child: both pipes closed."""
        await self.process.stdout.aclose()
        await self.process.stdin.aclose()


class LogWatcher:
    """Collects a process's stderr lines; `wait_for(text)` waits for a line containing it."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self._changed = trio.Event()
        self.closed = False

    async def run(self) -> None:
        reader = jsonl.LineReader()
        while True:
            data = await self.stream.receive_some()
            for line in reader.receive_data(data):
                if isinstance(line, bytes):
                    self.lines.append(line.decode(errors="replace").rstrip("\n"))
            if not data:
                self.closed = True
            self._changed.set()
            self._changed = trio.Event()
            if not data:
                return

    async def wait_for(self, text: str, start: int = 0) -> str:
        """The first line containing `text`, from line `start` on (`len(lines)` before an action:
        the first such line after it), once it came."""
        seen = start
        while True:
            for line in self.lines[seen:]:
                if text in line:
                    return line
            seen = len(self.lines)
            if self.closed:
                raise AssertionError(f"{text!r} never logged:\n" + "\n".join(self.lines))
            await self._changed.wait()

    def text(self) -> str:
        return "\n".join(self.lines)


#: Runs argv[1:] with SIGHUP ignored, as `nohup` does.
_IGNORE_HUP = "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN)"
NOHUP = [sys.executable, "-c", f"{_IGNORE_HUP}; os.execv(sys.argv[1], sys.argv[1:])"]


async def start_run(
    nursery: trio.Nursery,
    cfg: Path,
    socket_path: Path,
    *extra: str,
    nofile: int | None = None,
    nohup: bool = False,
) -> tuple[trio.Process, LogWatcher]:
    """`damocles-ext run -c CFG --socket PATH` with its log watched; returns once it listens.

    With `nofile`, run starts with RLIMIT_NOFILE lowered to it (soft and hard); with `nohup`,
    with SIGHUP ignored."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    process = await trio.lowlevel.open_process(
        [
            *(NOHUP if nohup else []),
            *DEXT,
            "run",
            "-c",
            str(cfg),
            "--socket",
            str(socket_path),
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dext_env(),
        preexec_fn=None if nofile is None else limit,
    )
    watcher = LogWatcher(process.stderr)
    nursery.start_soon(watcher.run)
    with trio.fail_after(30):
        await watcher.wait_for("control socket listening")
    return process, watcher


@asynccontextmanager
async def running(
    nursery: trio.Nursery, cfg: Path, socket_path: Path, *extra: str
) -> AsyncIterator[tuple[trio.Process, LogWatcher]]:
    """`damocles-ext run` for one test, SIGKILLed (its children follow) if the test fails."""
    run, log = await start_run(nursery, cfg, socket_path, *extra)
    try:
        yield run, log
    finally:
        if run.returncode is None:
            run.kill()
            with trio.CancelScope(shield=True):
                await run.wait()


@asynccontextmanager
async def draining_run(
    directory: Path, socket_path: Path, *extra: str
) -> AsyncIterator[tuple[Path, trio.Process, LogWatcher, Any]]:
    """`damocles-ext run` with one `sleep` child proving a client's request, sent SIGTERM: it
    drains (its log said so). Yields its config, the process, its log and that client."""
    from damocles_ext.client import connect

    cfg = write_config(
        directory, plugin_block("WdPost", "sleep", seconds=600, progress_interval=0.1)
    )
    async with (
        trio.open_nursery() as nursery,
        running(nursery, cfg, socket_path, *extra) as (run, log),
        connect(socket_path) as client,
    ):
        started = trio.Event()
        nursery.start_soon(lambda: client.submit(make_task(1), on_progress=lambda p: started.set()))
        with trio.fail_after(30):
            await started.wait()
            run.send_signal(signal.SIGTERM)
            await log.wait_for("shutting down gracefully")
        yield cfg, run, log, client
        nursery.cancel_scope.cancel()


@contextmanager
def short_socket_dir(tag: str, name: str) -> Iterator[Path]:
    """A private (0700) directory with a short path: unix socket paths are limited to 107 bytes
    and pytest's tmp_path can be longer."""
    d = Path(f"/tmp/dext-{tag}{os.getpid()}-{name[-20:]}")
    d.mkdir(mode=0o700)
    d.chmod(0o700)  # mkdir's mode passes through the umask
    try:
        yield d
    finally:
        for p in sorted(d.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
        d.rmdir()


async def dext_run_async(*args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`damocles-ext ARGS...` to completion, from trio."""
    return await trio.run_process(
        [*DEXT, *args],
        stdin=input,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=dext_env(),
    )


_SERVING = re.compile(rb"serving the worker-prover RPC at http://[^/]+:(\d+)/rpc/v0")
_METRICS = re.compile(rb"metrics on (http://\S+)")


class CoordinatorProcess:
    """One `damocles-ext coordinator --jobs URL [EXTRA...]` subprocess on 127.0.0.1, which may be
    started again (on its port) after a kill; all it wrote to stderr is kept in `stderr`."""

    def __init__(self, url: str, *extra: str, dext: list[str] = DEXT) -> None:
        self.url = url
        self.extra = extra
        self.dext = dext  # DEXT, or dext_with's or dext_shifted's
        self.proc: trio.Process | None = None
        self.stderr = b""
        self.port = 0
        self.metrics_url: str | None = None  # with --metrics in EXTRA

    async def start(self, nursery: trio.Nursery, port: int = 0, host: str = "127.0.0.1") -> None:
        """Start it; returns once this process (not an earlier one) serves."""
        self.proc = await trio.lowlevel.open_process(
            [*self.dext, "coordinator", "--jobs", self.url, "--listen", f"{host}:{port}",
             *self.extra],
            stderr=subprocess.PIPE,
            env=dext_env(),
        )  # fmt: skip
        serving = trio.Event()
        nursery.start_soon(self._drain, self.proc, serving)
        await serving.wait()

    async def _drain(self, proc: trio.Process, serving: trio.Event) -> None:
        # Read all it writes (a full pipe would stop it), noting when it serves and where.
        assert proc.stderr is not None
        own = b""
        while chunk := await proc.stderr.receive_some(65536):
            self.stderr += chunk
            own += chunk
            found = _SERVING.search(own)
            if found and not serving.is_set():
                self.port = int(found.group(1))
                metrics = _METRICS.search(own)
                self.metrics_url = metrics.group(1).decode() if metrics else None
                serving.set()
        assert serving.is_set(), f"the coordinator exited before serving:\n{own.decode()}"

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    def stop(self) -> None:
        """Kill it and reap it (a failed test's traceback keeps the process object alive: a
        zombie left, the next test that counts this process's children failed for it)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.proc.pid, 0)


_EMPTY_STORE: list[str] = []


def empty_store() -> str:
    """A store in damocles' layout with no sector in it (sealed/, cache/, update/, update-cache/
    made), made once per test session: the store a worker attaches for the test provers that
    read no file (a worker refuses a job whose sectors' directories are missing)."""
    if not _EMPTY_STORE:
        root = Path(tempfile.mkdtemp(prefix="dext-store-")) / "store-a"
        for sub in ("sealed", "cache", "update", "update-cache"):
            (root / sub).mkdir(parents=True)
        atexit.register(shutil.rmtree, root.parent, True)
        _EMPTY_STORE.append(str(root))
    return _EMPTY_STORE[0]


@dataclass(frozen=True)
class Answer:
    """One whole HTTP answer, as a client read it."""

    status: int
    headers: list[tuple[bytes, bytes]]  # as h11 gives them: names in lower case
    body: bytes

    @property
    def closing(self) -> bool:
        """Whether it says the server closes the connection after it."""
        return (b"connection", b"close") in self.headers


async def read_answer(
    client: h11.Connection, stream: trio.abc.ReceiveStream, *, reset_is_close: bool = False
) -> Answer | None:
    """The next answer `client` reads from `stream` (h11 reads answers to requests it sent: to
    read one to bytes sent past it, send it a request of its own first), or None when the
    connection closed between answers. Closed in the middle of one, or before one to the
    request sent, it raises h11.RemoteProtocolError; with `reset_is_close`, a reset is read as
    a close (else it raises trio.BrokenResourceError)."""
    status, headers, body = 0, [], b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            try:
                client.receive_data(await stream.receive_some(65536))
            except trio.BrokenResourceError:
                if not reset_is_close:
                    raise
                client.receive_data(b"")
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, list(event.headers)
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return Answer(status, headers, body)
        else:  # closed
            return None


async def date_rewriting_proxy(
    upstream: int, shift: float, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """A reverse proxy to `upstream` that sends its own Date, `shift` seconds off the true
    time (as nginx sends its machine's, by default), and passes every other header on."""

    async def answers(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                if not (data := await source.receive_some(65536)):
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"date:")]
            lines.append(b"Date: " + formatdate(time.time() + shift, usegmt=True).encode())
            length = next(int(ln.split(b":")[1]) for ln in lines
                          if ln.lower().startswith(b"content-length:"))  # fmt: skip
            while len(buffer) < length:
                if not (data := await source.receive_some(65536)):
                    return
                buffer += data
            body, buffer = buffer[:length], buffer[length:]
            await sink.send_all(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    async def requests(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        while data := await source.receive_some(65536):
            await sink.send_all(data)

    async def proxy(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", upstream)
        async with server, client, trio.open_nursery() as nursery:
            nursery.start_soon(requests, client, server)
            await answers(server, client)
            nursery.cancel_scope.cancel()

    await trio.serve_tcp(proxy, 0, host="127.0.0.1", task_status=task_status)
