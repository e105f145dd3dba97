"""The built-in child runtime: `damocles-ext child <stage> --plugin NAME`.

One process serves one stage with one prover, on one of two paths:

* capacity 1 (the default): the inline path (`child_inline.InlineRuntime`). The main thread
  reads a request, proves it and writes the answer itself, with no queue and no thread switch
  per request; a watcher thread reads stdin and sends heartbeats while a proof runs long.
* capacity N > 1: the threaded path (`ChildRuntime`, here). The main thread reads the protocol
  from stdin and reacts to it; requests run on worker threads (at most `capacity` at once, the
  rest wait in a FIFO here); a heartbeat thread re-sends the last progress of a silent prover so
  the supervisor can tell a busy child from a hung one.

On both, frames go out through one write lock, so every frame is whole, and once a request's
response is written no progress for it follows.

Threads, not trio: provers are blocking code (C libraries, GPU calls), the child must start fast,
and cancelling a prover is cooperative anyway (a token it checks).

Lock order, to stay deadlock-free: `_write_lock` before `_state_lock`, never the other way.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from .child_codecs import _Bad, _DextCodec, _In, _JsonlCodec
from .errors import TASKS_ADVICE, describe, text_of
from .hookspecs import Cancelled, CancelToken, Options, Prover
from .options import child_options
from .protocol import dext, jsonl
from .tasks import OUTPUT_TYPES, TASK_TYPES, Output, Task, stage_of

log = logging.getLogger("damocles_ext.child")

#: A busy request sends a Progress frame at least this often (the contract says every 5 s).
DEFAULT_HEARTBEAT = 2.0
#: Progress within one phase is forwarded at most this often per request; a new phase, and the
#: end of one (done == total), at once.
PROGRESS_MIN_INTERVAL = 0.1
#: After stdin EOF (the parent is gone) provers get this long to notice their cancel token.
EOF_GRACE = 1.0
READ_SIZE = 1 << 16
_MAIN = threading.main_thread()


#: An error text longer than this is cut (a prover's exception may carry a whole file).
MAX_ERROR_CHARS = 64 * 1024

#: A SIGINT came since `main` took the signal over (None: it did not, as in a runtime made in
#: another program's process; a KeyboardInterrupt is then taken for one).
_sigint: bool | None = None


def _on_sigint(signum: int, frame: object) -> None:
    global _sigint
    if _sigint is not None:
        _sigint = True
    raise KeyboardInterrupt


def _interrupted() -> bool:
    """Whether a KeyboardInterrupt comes from a SIGINT, not from a prover that raised one."""
    return _sigint is not False


@dataclass(slots=True, eq=False)
class _Job:
    id: int
    task: Task
    runtime: ChildRuntime  # where `report` sends progress
    token: CancelToken = field(default_factory=CancelToken)
    state: str = "queued"  # queued -> running -> done
    progress: tuple[str, int, int] = ("queued", 0, 0)
    sent_at: float = 0.0  # monotonic time of the last Progress frame sent
    sent_phase: str = ""
    started: float = 0.0  # monotonic time the prover was called

    def report(self, phase: str, done: int, total: int) -> None:
        """The progress callback the prover gets (a bound method: cheaper than a closure per
        request). A sloppy call must not fail a proof, nor stop the heartbeat that re-sends it:
        a phase a frame cannot carry is made one it can, counts it cannot are left out."""
        if type(phase) is not str or not phase.isascii():
            phase = utf8(text_of(phase))
        phase = dext.short_phase(phase)
        try:
            counts = (int(done), int(total))
        except (TypeError, ValueError, OverflowError):
            counts = (0, 0)
        if not (_I64_MIN <= counts[0] <= _I64_MAX and _I64_MIN <= counts[1] <= _I64_MAX):
            counts = (0, 0)
        self.progress = (phase, *counts)
        self.runtime._send_progress(self, force=False)


_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def utf8(text: str) -> str:
    """`text` as a frame can carry it: lone surrogates (a file name os.fsdecode could not
    decode, say) written as escapes, e.g. \\udcff."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


class ChildRuntime:
    """Serve one prover over one protocol on a pair of file descriptors until told to stop."""

    # Slots, not an instance dict: CPython 3.11 specializes `self.x` and `self.method()` for an
    # instance dict of at most 30 keys only, and the inline runtime has more; without slots every
    # method call of the per-request path took the slow, unspecialized lookup.
    __slots__ = (
        "_all_done",
        "_awaiting_all_done",
        "_broken_pipe",
        "_check_output",
        "_debug",
        "_enqueue",
        "_jobs",
        "_output_type",
        "_queue",
        "_shutting_down",
        "_state_lock",
        "_stop",
        "_task_type",
        "_threads",
        "_wake_r",
        "_wake_w",
        "_write_lock",
        "capacity",
        "codec",
        "heartbeat",
        "in_fd",
        "out_fd",
        "prover",
        "prover_name",
        "stage",
        "version",
    )

    def __init__(
        self,
        *,
        stage: str,
        prover: Prover,
        prover_name: str,
        version: str,
        capacity: int = 1,
        protocol: str = "dext",
        in_fd: int = 0,
        out_fd: int = 1,
        heartbeat: float = DEFAULT_HEARTBEAT,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.stage = stage
        self.prover = prover
        self.prover_name = prover_name
        self.version = version
        self.capacity = capacity
        self.codec: _DextCodec | _JsonlCodec = (
            _DextCodec() if protocol == "dext" else _JsonlCodec(stage)
        )
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.heartbeat = heartbeat
        self._jobs: dict[int, _Job] = {}
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._state_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._all_done = threading.Condition(self._state_lock)
        self._awaiting_all_done = False  # someone waits on _all_done (notified only then)
        self._stop = threading.Event()
        self._shutting_down = False
        self._broken_pipe = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._threads: list[threading.Thread] = []
        self._task_type = TASK_TYPES.get(stage)
        self._output_type: type = OUTPUT_TYPES[stage]
        self._check_output = _output_check(self._output_type)
        #: Where an accepted request goes: the workers' queue (the inline path: its own list).
        self._enqueue: Callable[[_Job], object] = self._queue.put
        self._debug = False  # debug logging on (read once at start: one check per request less)

    # -- output ---------------------------------------------------------------------------------

    def _write(self, data: bytes | bytearray) -> bool:
        """Write a whole frame; False (and the loop is woken to exit) if the parent is gone."""
        try:
            n = os.write(self.out_fd, data)
            if n < len(data):
                view = memoryview(data)[n:]
                while view:
                    view = view[os.write(self.out_fd, view) :]
        except (BrokenPipeError, OSError) as exc:
            if not self._broken_pipe:
                log.warning("cannot write to the parent (%s); exiting", exc)
            self._broken_pipe = True
            self._wake()
            return False
        return True

    def _respond(self, job: _Job, output: Output | None = None, error: str | None = None) -> None:
        if error is not None:
            error = utf8(error)
            if len(error) > MAX_ERROR_CHARS:
                cut = len(error) - MAX_ERROR_CHARS
                error = f"{error[:MAX_ERROR_CHARS]}... ({cut} characters cut)"
        data = self.codec.response(job.id, output, error)
        # Once per request, so acquire/try/finally/release: a `with` costs 2.5 times as much on
        # CPython 3.11 (it looks up __enter__ and __exit__, and calls __exit__ with 3 arguments).
        write_lock = self._write_lock
        state_lock = self._state_lock
        write_lock.acquire()
        try:
            state_lock.acquire()
            try:
                job.state = "done"
                if self._jobs.get(job.id) is job:
                    del self._jobs[job.id]
                if self._awaiting_all_done and not self._jobs:
                    self._all_done.notify_all()
            finally:
                state_lock.release()
            self._write(data)
        finally:
            write_lock.release()

    def _respond_unknown(self, id: int, error: str) -> None:
        data = self.codec.response(id, None, error)
        with self._write_lock:
            self._write(data)

    def _send_progress(self, job: _Job, force: bool) -> None:
        with self._write_lock:
            with self._state_lock:
                if job.state != "running":
                    return
                phase, done, total = job.progress
                now = time.monotonic()
                recent = now - job.sent_at < PROGRESS_MIN_INTERVAL
                # A phase's last step is often within the interval of the one before (a fast
                # prover's whole phase is); dropping it would leave the phase shown unfinished.
                finished = 0 < total <= done
                if not force and phase == job.sent_phase and recent and not finished:
                    return
                job.sent_at = now
                job.sent_phase = phase
            try:
                data = self.codec.progress(job.id, phase, done, total)
            except Exception:  # a bug of ours: the heartbeat thread must live on
                log.exception("request %d: cannot encode its progress; not sent", job.id)
                return
            if data is not None:
                self._write(data)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full of wake-ups already (or closed at exit)

    # -- workers --------------------------------------------------------------------------------

    def _start(self, job: _Job) -> bool:
        """queued -> running; False if it was cancelled while it waited."""
        lock = self._state_lock  # once per request: no `with` (see _respond)
        lock.acquire()
        try:
            if job.state != "queued":
                return False
            job.state = "running"
            job.progress = ("started", 0, 0)
            # No frame yet: a quick request needs only its Response; the heartbeat sends
            # ("started", 0, 0) if the prover stays silent for a whole interval.
            job.sent_at = job.started = time.monotonic()
        finally:
            lock.release()
        return True

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._start(job):
                self._run_job(job)
                self._wake()  # the main loop may be waiting for the last answer (shutdown)

    def _run_job(self, job: _Job) -> None:
        started = job.started
        token = job.token
        try:
            token.check()
            output = self.prover.prove(job.task, job.report, token)
        except Cancelled as exc:
            log.info("request %d cancelled after %.3f s", job.id, time.monotonic() - started)
            self._respond(
                job, error="cancelled" if token.cancelled else f"Cancelled: {text_of(exc)}"
            )
            return
        except BaseException as exc:  # SystemExit in a worker would silently lose the request
            if (
                isinstance(exc, KeyboardInterrupt)
                and threading.current_thread() is _MAIN
                and _interrupted()
            ):
                raise  # SIGINT stops the child, also while it proves on its main thread
            log.warning(
                "request %d failed: %s: %s",
                job.id,
                type(exc).__name__,
                text_of(exc),
                exc_info=not isinstance(exc, Exception) or log.isEnabledFor(logging.DEBUG),
            )
            self._respond(job, error=describe(exc))
            return
        expected = self._output_type
        if not isinstance(output, expected):
            error = (
                f"prover {self.prover_name!r} returned {type(output).__name__}, expected "
                f"{expected.__name__}"
            )
            log.error("request %d: %s", job.id, error)
            self._respond(job, error=error)
            return
        try:  # msgspec builds a Struct without checking its fields: the supervisor would
            self._check_output(output)  # refuse the frame and take this child for broken
        except (msgspec.MsgspecError, OverflowError, TypeError, ValueError) as exc:
            error = f"prover {self.prover_name!r} returned an invalid {expected.__name__}: {exc}"
            log.error("request %d: %s", job.id, error)
            self._respond(job, error=error)
            return
        if self._debug:
            log.debug("request %d done in %.3f s", job.id, time.monotonic() - started)
        try:
            self._respond(job, output=output)
        except Exception as exc:  # e.g. an output the codec cannot encode
            log.exception("request %d: cannot encode the output", job.id)
            self._respond(job, error=f"cannot encode the prover's output: {exc}")

    def _heartbeat_loop(self) -> None:
        tick = min(self.heartbeat / 2, 1.0)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._state_lock:
                due = [
                    j
                    for j in self._jobs.values()
                    if j.state == "running" and now - j.sent_at >= self.heartbeat
                ]
            for job in due:
                self._send_progress(job, force=True)

    # -- input ----------------------------------------------------------------------------------

    def _handle(self, item: _In) -> None:
        match item:
            case dext.Request(id=id, task=task) | jsonl.JsonRequest(id=id, task=task):
                self._on_request(id, task)
            case dext.Cancel(id=id):
                self._on_cancel(id)
            case dext.Shutdown():
                log.info("shutdown requested: finishing %d request(s) in flight", len(self._jobs))
                self._shutting_down = True
            case _Bad(id, message):
                log.error("bad input from the parent: %s", message)
                if id is not None:
                    with self._state_lock:
                        clash = id in self._jobs
                    if not clash:
                        self._respond_unknown(id, f"bad request: {message}")

    def _on_request(self, id: int, task: Task) -> None:
        if self._shutting_down:
            self._respond_unknown(id, "child is shutting down; send the request elsewhere")
            return
        if task.__class__ is not self._task_type and stage_of(task) != self.stage:
            self._respond_unknown(
                id, f"this child serves {self.stage}, not {stage_of(task)} (request {id})"
            )
            return
        job = _Job(id, task, self)
        lock = self._state_lock  # once per request: no `with` (see _respond)
        lock.acquire()
        try:
            if id in self._jobs:
                log.error("request id %d is already in flight; duplicate ignored", id)
                return
            self._jobs[id] = job
        finally:
            lock.release()
        self._enqueue(job)

    def _on_cancel(self, id: int) -> None:
        with self._state_lock:
            job = self._jobs.get(id)
            if job is None:
                log.debug("cancel of request %s, which is not in flight (already answered?)", id)
                return
            queued = job.state == "queued"
        job.token.cancel("cancelled")
        if queued:
            # Answer now: with every worker busy it could wait for a long time.
            with self._state_lock:
                still_queued = job.state == "queued"
                if still_queued:
                    job.state = "cancelling"
            if still_queued:
                self._respond(job, error="cancelled")

    # -- main loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Send the ready message, then serve until Shutdown (0), stdin EOF (0) or a fatal error."""
        self._debug = log.isEnabledFor(logging.DEBUG)
        try:
            self._start_threads()
        except RuntimeError as exc:  # "can't start new thread": at the limit of tasks
            log.error("cannot start its threads (%s): %s", exc, TASKS_ADVICE)
            return 1
        hello = self.codec.hello(self.stage, self.prover_name, self.version, self.capacity)
        if not self._write(hello):
            return 1
        log.info(
            "ready: stage %s, prover %s %s, protocol %s, capacity %d",
            self.stage,
            self.prover_name,
            self.version,
            self.codec.name,
            self.capacity,
        )
        try:
            return self._loop()
        finally:
            self._stop_threads()
            close = getattr(self.prover, "close", None)
            if callable(close) and not self._jobs:
                try:
                    close()
                except Exception:
                    log.exception("prover %s: close() failed", self.prover_name)

    def _start_threads(self) -> None:
        for i in range(self.capacity):
            t = threading.Thread(target=self._worker, name=f"prover-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.codec.heartbeats:
            hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
            hb.start()

    def _stop_threads(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)

    def _read(self) -> tuple[str, int] | None:
        """Read once from stdin and act on what came; (why, exit code) when the input is over."""
        data = os.read(self.in_fd, READ_SIZE)
        codec = self.codec
        try:
            items = codec.feed(data)
        except codec.fatal_errors as exc:  # the stream is unusable
            log.error("protocol error from the parent: %s", exc)
            return "protocol error", 1
        request = codec.request_type
        for item in items:
            if item.__class__ is request:  # the common case, without _handle's match
                self._on_request(item.id, item.task)  # type: ignore[union-attr, arg-type]
            else:
                self._handle(item)
        if not data:
            return "stdin closed", 0
        return None

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    def _shutdown_complete(self) -> bool:
        """After Shutdown, once every request is answered (logged): time to exit 0."""
        if not self._shutting_down:
            return False
        with self._state_lock:
            idle = not self._jobs
        if idle:
            log.info("shutdown complete")
        return idle

    def _loop(self) -> int:
        poller = select.poll()
        poller.register(self.in_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            if self._broken_pipe:
                return self._abandon("the parent stopped reading")
            if self._shutdown_complete():
                return 0
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    self._drain_wake()
                    continue
                ended = self._read()
                if ended is not None:
                    why, code = ended
                    self._abandon(why)
                    return code

    def _wait_all_done(self) -> bool:
        """Wait up to EOF_GRACE for every request to be answered; True if they were."""
        with self._all_done:
            self._awaiting_all_done = True  # from now on every answer looks for us
            return self._all_done.wait_for(lambda: not self._jobs, timeout=EOF_GRACE)

    def _abandon(self, why: str) -> int:
        """The parent is gone: cancel everything, give provers a moment to notice, exit 0."""
        with self._state_lock:
            jobs = list(self._jobs.values())
        if jobs:
            log.info("%s: cancelling %d request(s) in flight", why, len(jobs))
            for job in jobs:
                job.token.cancel(why)
            self._wait_all_done()
        else:
            log.info("%s: exiting", why)
        return 0


# ---------------------------------------------------------------------------------------------
# Process set-up (called by `damocles-ext child`)


def _output_check(output_type: type) -> Callable[[Output], object]:
    """A function that raises what the supervisor's decoder would say of an output (a wrong
    type in a field, a number out of range): an encode and a typed decode, well under 1 us."""
    decoder: msgspec.msgpack.Decoder[Output] = msgspec.msgpack.Decoder(output_type)
    encode = msgspec.msgpack.encode
    return lambda output: decoder.decode(encode(output))


def main(
    stage: str,
    plugin: str,
    option_items: Sequence[str] = (),
    protocol: str = "dext",
    capacity: int = 1,
    heartbeat: float = DEFAULT_HEARTBEAT,
) -> int:
    """Load the prover (PluginError -> exit 2 before the ready message), then serve."""
    from .child_process import (
        exit_past_lingering_threads,
        loading_interrupt,
        protect_stdio,
        prover_version,
    )
    from .errors import UsageError
    from .plugins import get_plugin_manager, load_prover

    # A prover that crashes the process (a native library's SIGSEGV or abort) leaves the Python
    # stack of each thread on stderr, which the supervisor logs: where it was, not only the signal.
    faulthandler.enable()
    # A KeyboardInterrupt a prover raises itself fails its request; one from a SIGINT stops the
    # child (the supervisor starts it in a session of its own: no terminal's Ctrl-C reaches it).
    # With SIGINT ignored (a supervisor started by `nohup ... &` passes that on), none can come:
    # every KeyboardInterrupt is then a prover's own.
    global _sigint
    _sigint = False
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored
        signal.signal(signal.SIGINT, _on_sigint)
    in_fd, out_fd = protect_stdio()
    try:
        # Taken out of the environment before the prover loads: what it starts inherits none.
        options: Options = child_options(option_items, os.environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    pm = None
    try:
        pm = get_plugin_manager()
        prover = load_prover(pm, plugin, options, stage)
    except KeyboardInterrupt as exc:
        if _interrupted():
            raise  # a SIGINT while the prover loads: the child stops, as ever
        raise loading_interrupt(pm, plugin, exc) from None
    from .child_inline import InlineRuntime

    runtime = (InlineRuntime if capacity == 1 else ChildRuntime)(
        stage=stage,
        prover=prover,
        prover_name=plugin,
        version=prover_version(pm, prover, plugin),
        capacity=capacity,
        protocol=protocol,
        in_fd=in_fd,
        out_fd=out_fd,
        heartbeat=heartbeat,
    )
    code = runtime.run()
    exit_past_lingering_threads(pm, plugin, code)
    return code
