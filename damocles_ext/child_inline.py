"""The child runtime's inline path: with capacity 1, a request is proved on the thread that read it.

With one request at a time there is nothing to hand over. The main thread reads the input,
proves each request it brings and writes the answer, with no queue hop and no thread switch per
request (the threaded path's poll, queue, worker wake-up and loop wake-up cost several times the
work of a trivial proof).

While a proof runs the main thread cannot read stdin, so a watcher thread stands in for it:

* it looks every `WATCH_TICK` whether a proof is running; once one has run that long, it takes
  the reader's role (the `_reader` lock: whoever holds it may read stdin) and reads what comes
  (Cancel, Shutdown, EOF, a queued request, a cancel of one) exactly as the main loop would,
  and sends the heartbeat of a silent prover on time;
* the main thread takes the role back when it needs to read: it flags `_reclaim` and wakes the
  watcher through the wake pipe;
* when the input ends while a proof runs (EOF, a protocol error, the parent stopped reading) it
  cancels every request and gives them `EOF_GRACE`; a prover that ignores its cancel then
  does not keep the child alive: the watcher ends the process with the code the main loop would
  have returned.

A quick proof costs the watcher nothing: it is woken by its timer, never per request. With no
proof for `IDLE_AFTER` seconds it sleeps a heartbeat tick at a time instead, and the first proof
after that wakes it (one wake-up per idle spell).
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from collections import deque

from .child import EOF_GRACE, ChildRuntime, _Job

log = logging.getLogger("damocles_ext.child")

#: How often the watcher looks whether a proof has run long enough to need it, while the child
#: is busy: the most a Cancel waits at the start of a proof (twice this at worst).
WATCH_TICK = 0.02
#: Seconds without a proof after which the watcher only wakes every heartbeat tick.
IDLE_AFTER = 1.0


class InlineRuntime(ChildRuntime):
    """Capacity 1: the main thread reads, proves and answers; a watcher covers long proofs."""

    __slots__ = (
        "_ended",
        "_fast_tick",
        "_holding",
        "_kick",
        "_pending",
        "_proofs",
        "_proving",
        "_reader",
        "_reclaim",
        "_slow_tick",
        "_watcher_asleep",
    )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.capacity != 1:
            raise ValueError("the inline path serves capacity 1 only")
        self._pending: deque[_Job] = deque()  # accepted, not yet started, in arrival order
        self._enqueue = self._pending.append
        self._proving: _Job | None = None  # the job the main thread is proving
        self._proofs = 0  # proofs started (the watcher tells busy from idle by it)
        self._reader = threading.Lock()  # held by the thread that may read stdin
        self._holding = False  # the main thread holds `_reader`
        self._reclaim = False  # the main thread wants `_reader` back
        self._kick = threading.Event()  # wakes the watcher (a proof after an idle spell; stop)
        self._watcher_asleep = False
        self._ended: tuple[str, int] | None = None  # the input ended while a proof ran
        slow = min(self.heartbeat / 2, 1.0)
        self._slow_tick = slow
        self._fast_tick = min(WATCH_TICK, slow)

    # -- the main thread ------------------------------------------------------------------------

    def _start_threads(self) -> None:
        watcher = threading.Thread(target=self._watch, name="watcher", daemon=True)
        watcher.start()
        self._threads.append(watcher)

    def _stop_threads(self) -> None:
        self._stop.set()
        self._kick.set()

    def _loop(self) -> int:
        self._reader.acquire()
        self._holding = True
        pending = self._pending
        while True:
            if self._ended is not None:
                return self._wind_up(self._ended[1])
            if self._broken_pipe:
                return self._abandon("the parent stopped reading")
            if pending:
                self._prove(pending.popleft())
                continue
            if self._shutting_down and self._shutdown_complete():
                return 0
            if not self._holding:
                self._take_reader()
                continue  # the watcher may have read more before it let go
            ended = self._read()
            if ended is not None:
                why, code = ended
                self._abandon(why)
                return code

    def _prove(self, job: _Job) -> None:
        if not self._start(job):
            return  # cancelled while it waited, and answered then
        self._proving = job
        self._proofs += 1
        if self._holding:
            self._holding = False
            self._reader.release()
        if self._watcher_asleep:  # read after `_proving` was set: see _watch
            self._kick.set()
        try:
            self._run_job(job)
        finally:
            self._proving = None
            # The reader back at once, unless the watcher stands in (then _loop reclaims it).
            self._holding = self._reader.acquire(False)

    def _take_reader(self) -> None:
        if not self._reader.acquire(blocking=False):
            self._reclaim = True
            self._wake()
            self._reader.acquire()
            self._reclaim = False
        self._holding = True

    def _abandon(self, why: str) -> int:
        """The parent is gone and no proof runs: answer what waits as cancelled, exit 0."""
        with self._state_lock:
            jobs = list(self._jobs.values())
        if jobs:
            log.info("%s: cancelling %d request(s) in flight", why, len(jobs))
        else:
            log.info("%s: exiting", why)
        for job in jobs:
            job.token.cancel(why)
        return self._wind_up(0)

    def _wind_up(self, code: int) -> int:
        """Answer the requests still queued (their tokens are cancelled) and return `code`."""
        while self._pending:
            job = self._pending.popleft()
            if self._start(job):
                self._run_job(job)  # the token is cancelled: answered "cancelled" at once
        return code

    # -- the watcher ----------------------------------------------------------------------------

    def _watch(self) -> None:
        seen = self._proofs
        quiet_since = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if self._proving is not None or self._proofs != seen:
                seen = self._proofs
                quiet_since = now
            if now - quiet_since < IDLE_AFTER:
                self._kick.wait(self._fast_tick)
            else:
                # Flag first, then look: the main thread sets `_proving`, then reads the flag,
                # so one of the two sees the other and no proof starts unwatched for long.
                self._watcher_asleep = True
                if self._proving is None:
                    self._kick.wait(self._slow_tick)
                self._watcher_asleep = False
            self._kick.clear()
            job = self._proving
            long_proof = job is not None and time.monotonic() - job.started >= self._fast_tick
            if long_proof and self._stand_in():
                return

    def _stand_in(self) -> bool:
        """Read stdin and send heartbeats while the long proof runs; True once the input ended."""
        if not self._reader.acquire(blocking=False):
            return False
        try:
            poller = select.poll()
            poller.register(self.in_fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            long_one = self._proving
            while not self._reclaim and not self._stop.is_set():
                if self._broken_pipe:
                    self._end("the parent stopped reading", 0)
                    return True
                job = self._proving
                if job is None or job is not long_one:
                    # Its proof is over: the main thread reads between proofs again (standing
                    # in for quick proofs would only contend with it for the interpreter).
                    return False
                wait = self._slow_tick
                if self.codec.heartbeats:
                    if job.sent_at + self.heartbeat <= time.monotonic():
                        self._send_progress(job, force=True)
                    # Not sent if the job has just been answered: look again a tick later.
                    due = job.sent_at + self.heartbeat - time.monotonic()
                    wait = min(wait, max(due, self._fast_tick))
                for fd, _ in poller.poll(wait * 1000):
                    if fd == self._wake_r:
                        self._drain_wake()
                        continue
                    ended = self._read()
                    if ended is not None:
                        self._end(*ended)
                        return True
            return False
        finally:
            self._reader.release()

    def _end(self, why: str, code: int) -> None:
        """The input ended during a proof: cancel everything; exit if a prover ignores it."""
        with self._state_lock:
            jobs = list(self._jobs.values())
        log.info("%s: cancelling %d request(s) in flight", why, len(jobs))
        self._ended = (why, code)
        for job in jobs:
            job.token.cancel(why)
        if not self._wait_all_done():
            log.warning(
                "%s: a request is still running %.1f s after its cancel; exiting", why, EOF_GRACE
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.flush()
            os._exit(code)
