"""The reaper: what the children leave behind is killed and reaped, at each end and at the last.

Two jobs, both about processes no child task owns any more:
* the orphan sweep: as a child subreaper (orphans.OrphanAdopter), the supervisor inherits what a
  child started outside its process group (setsid) once the child dies; such orphans are killed
  and reaped at each child's end and every `ORPHAN_SWEEP_INTERVAL` seconds;
* the last kill: when the supervisor stops, every child's tree still alive (and every process
  that did not die after SIGKILL, kept in `unreaped`) is killed and waited for, REAP_TIMEOUT at
  most; one still not dead then is reaped by a thread of its own whenever it exits (no task of
  ours waits for it once the supervisor has returned).

A process that did not die after SIGKILL (`keep`: stuck in the kernel, a GPU driver call say)
keeps the scheduler locks it held when it went down (its GPU): the reaper logs which, waits for
it (`run`) and says when it exits, so that they are freed then; but for `KEEP_LOCKS_FOR` seconds
at most. Past that it is stuck for good (a GPU driver that hangs, a network file system that
does not answer a read), and the GPU's other work (the child's next process, a WinningPoSt
sharing its lock) would otherwise wait for it until each request's deadline: the locks are
freed then, saying so, and the process is still waited for.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psutil
import trio

from .orphans import OrphanAdopter
from .process import ChildProcess

log = logging.getLogger("damocles_ext.supervisor")

ORPHAN_SWEEP_INTERVAL = 10.0  # seconds between sweeps for orphans that exit on their own
REAP_TIMEOUT = 5.0  # after SIGKILL; longer means uninterruptible sleep (a stuck driver)
#: How long, past its `keep`, the locks of a process not dead after SIGKILL stay held for it.
KEEP_LOCKS_FOR = 25.0
#: How many spawns' fields are kept for the records about what they leave behind: those of the
#: processes running, and of the latest ended up to this many in all.
SPAWNS_REMEMBERED = 1024

# See Reaper.keep; the last: the fields of its records (JSON logs).
_Kept = tuple[ChildProcess, str, list[str], Callable[[], None], dict[str, Any]]


class Reaper:
    """Kills and reaps what is left; `running()` lists the live children's (process, mark)."""

    def __init__(self, running: Callable[[], Iterable[tuple[ChildProcess, str | None]]]) -> None:
        self._running = running
        self.adopter = OrphanAdopter()
        #: SIGKILLed and still not dead (D state), with their log fields (for the last kill).
        self.unreaped: dict[ChildProcess, dict[str, Any]] = {}
        self._sweep_wanted = trio.Event()
        self._kept, self._to_watch = trio.open_memory_channel[_Kept](math.inf)
        # Each spawn's mark (OrphanAdopter.mark) -> its child's fields as it was spawned (its
        # `pid` that process's): what the record of an orphan it left behind carries. In the
        # order they were spawned, an ended one moved last (sweep_soon): the first that is not
        # running is the one ended longest ago, forgotten first.
        self._spawns: dict[str, dict[str, Any]] = {}

    def spawned(self, mark: str, fields: Mapping[str, Any]) -> str:
        """The process marked `mark` was spawned, with its child's `fields` (`Child.fields`, its
        `pid` set): kept for the record of an orphan it leaves (SPAWNS_REMEMBERED at most, the
        running ones' always: a child's long-lived process outlives many of a sibling's crash
        loop). Returns `mark`."""
        self._spawns[mark] = dict(fields)
        if len(self._spawns) > SPAWNS_REMEMBERED:
            live = {m for _, m in self._running()}
            old = next((m for m in self._spawns if m not in live and m != mark), None)
            if old is not None:
                del self._spawns[old]
        return mark

    def keep(
        self,
        proc: ChildProcess,
        child: str,
        exiting: Iterable[tuple[int | None, frozenset[str], float]],
        on_exit: Callable[[], None],
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        """`proc` of `child` did not die after SIGKILL: kept in `unreaped`, and watched (`run`)
        for its exit, which `on_exit()` reports; `exiting`: its child's processes that hold
        locks until they exit (`RequestBook.exiting`), to say which this one holds; `fields`:
        the child's (`Child.fields`), which the records about it carry, its `pid` this one's."""
        extra = {**(fields if fields is not None else {"child": child}), "pid": proc.pid}
        self.unreaped[proc] = extra
        locks = sorted({lock for pid, held, _ in exiting if pid == proc.pid for lock in held})
        if locks:
            log.error(
                "%s (pid %d): still not dead %gs or more after SIGKILL (stuck in the kernel: a"
                " GPU driver call?); %s stay held for it until it exits, so nothing else runs on"
                " them meanwhile (status: `exiting`), for %gs at most",
                child,
                proc.pid,
                REAP_TIMEOUT,  # waited once at least (a process torn down: up to three times)
                ", ".join(locks),
                KEEP_LOCKS_FOR,
                extra=extra,
            )
        # Watched while run() runs; one kept after it ends is the last kill's to reap.
        self._kept.send_nowait((proc, child, locks, on_exit, extra))

    async def run(self, scope: trio.CancelScope, sweep: bool) -> None:
        """Watch the kept processes (and, with `sweep`, sweep for orphans) until `scope` is
        cancelled."""
        with scope:
            async with trio.open_nursery() as nursery:
                if sweep:
                    nursery.start_soon(self.sweeper)
                async for kept in self._to_watch:
                    nursery.start_soon(self._await_exit, *kept)

    async def _await_exit(
        self,
        proc: ChildProcess,
        child: str,
        locks: list[str],
        on_exit: Callable[[], None],
        extra: dict[str, Any],
    ) -> None:
        with trio.move_on_after(KEEP_LOCKS_FOR):
            await proc.wait()
        if proc.exit is None and locks:
            log.error(
                "%s (pid %d): still not dead %gs more after SIGKILL: stuck for good (a GPU"
                " driver that hangs, a network file system that does not answer?); %s free now,"
                " so that the GPU's other work goes on (a proof there may fail if it still"
                " holds the GPU's memory); check the machine (dmesg), a reboot may be needed",
                child, proc.pid, KEEP_LOCKS_FOR, ", ".join(locks), extra=extra,
            )  # fmt: skip
            self._exited(proc, child, on_exit, extra)  # said again at its exit: harmless
            locks = []
        await proc.wait()
        self.unreaped.pop(proc, None)
        held = f"; {', '.join(locks)} free" if locks else ""
        log.warning("%s (pid %d): exited at last%s", child, proc.pid, held, extra=extra)
        self._exited(proc, child, on_exit, extra)

    @staticmethod
    def _exited(
        proc: ChildProcess, child: str, on_exit: Callable[[], None], extra: dict[str, Any]
    ) -> None:
        try:
            on_exit()
        except Exception:  # a bug of ours must not end the supervisor
            log.exception(
                "%s (pid %d): internal error on its late exit; going on", child, proc.pid,
                extra=extra,
            )  # fmt: skip

    def sweep_soon(self, mark: str | None = None) -> None:
        """A child's process (marked `mark`) ended: what it left outside its group is ours now
        (when a subreaper); its fields are kept as the latest ended's."""
        if mark is not None and (fields := self._spawns.pop(mark, None)) is not None:
            self._spawns[mark] = fields
        self._sweep_wanted.set()

    async def sweeper(self) -> None:
        """Sweep for orphans at each child's end and now and then, until cancelled."""
        while True:
            # At each child's end, and now and then for orphans that exit on their own.
            with trio.move_on_after(ORPHAN_SWEEP_INTERVAL):
                await self._sweep_wanted.wait()
            self._sweep_wanted = trio.Event()
            with trio.move_on_after(REAP_TIMEOUT):  # an unkillable orphan (D state)
                await self.sweep_orphans()

    async def sweep_orphans(self) -> None:
        """Kill and reap the orphans of our tree (orphans.OrphanAdopter), until none are left:
        an orphan's own setsid'd children become ours when it dies."""
        while True:
            running = [(proc, mark) for proc, mark in self._running() if proc.exit is None]
            spawned = {proc.pid for proc, _ in running}
            spawned |= {proc.pid for proc in self.unreaped if proc.exit is None}
            live = {mark for _, mark in running if mark is not None}
            orphans, zombies = self.adopter.find(spawned, live)
            for pid in zombies:
                self.adopter.reap(pid)
            if not orphans:
                return
            for proc, mark in orphans:
                self._log_orphan(proc, mark)
            async with trio.open_nursery() as nursery:
                for proc, _ in orphans:
                    nursery.start_soon(OrphanAdopter.kill_and_reap, proc)

    def _log_orphan(self, proc: psutil.Process, mark: str) -> None:
        """The record of an orphan killed: with the fields of the child's process that left it
        (`child`, `stage`, `index`, `pid`), and its own `orphan_pid`, `orphan_command`."""
        try:
            what = " ".join(proc.cmdline())[:120]
        except psutil.Error:
            what = "?"
        fields = self._spawns.get(mark)
        who = "a child" if fields is None else f"{fields['child']} (pid {fields.get('pid')})"
        log.warning(
            "killing pid %d (%s): %s started it outside its process group (setsid) and exited,"
            " leaving it behind",
            proc.pid,
            what,
            who,
            extra={**(fields or {}), "orphan_pid": proc.pid, "orphan_command": what},
        )

    async def kill_everything(self) -> None:
        """The supervisor stops: SIGKILL every child's tree, reap them and the orphans."""
        running = list(self._running())
        procs = [proc for proc, _ in running] + list(self.unreaped)
        fields = {proc: self._spawns.get(mark or "") or {} for proc, mark in running}
        fields |= self.unreaped
        for proc in procs:
            proc.kill_tree()
        with trio.move_on_after(REAP_TIMEOUT):
            for proc in procs:
                await proc.wait()
            if self.adopter.enabled:
                await self.sweep_orphans()
        for proc in dict.fromkeys(procs):
            # (The wait gave up on one: those after it were never waited for, dead or not.)
            if proc.poll() is None:
                _reap_late(proc, {**fields.get(proc, {}), "pid": proc.pid})


def _reap_late(proc: ChildProcess, extra: dict[str, Any]) -> None:
    """`proc` is still not dead `REAP_TIMEOUT` after the last kill: no task waits for it any
    more (the supervisor returns), so a thread of its own reaps it once it exits, however late;
    before, it stayed a zombie for as long as this process lived."""
    _late_reaps[:] = [thread for thread in _late_reaps if thread.is_alive()]
    try:
        _late_reaps.append(proc.reap_when_it_exits())
        then = "it is reaped whenever it exits"
    except RuntimeError as exc:  # no thread (the limit of tasks): init reaps it after us
        then = f"it stays a zombie of this process once it exits (cannot start a thread: {exc})"
    who = f"{extra['child']} (pid {proc.pid})" if "child" in extra else f"pid {proc.pid}"
    log.error(
        "%s: still not dead %gs after SIGKILL as the supervisor stops (stuck in the kernel: a"
        " GPU driver call?); %s; check the machine (dmesg) if it stays",
        who, REAP_TIMEOUT, then, extra=extra,
    )  # fmt: skip


_late_reaps: list[threading.Thread] = []  # (_reap_late's threads, for join_late_reaps)


def join_late_reaps(timeout: float) -> bool:
    """Wait up to `timeout` seconds (in all) for the processes that stopped supervisors left to
    be reaped late (`_reap_late`); True once none is left. For tests, which check that a
    supervisor leaves no process behind."""
    deadline = time.monotonic() + timeout
    for thread in list(_late_reaps):
        thread.join(max(0.0, deadline - time.monotonic()))
        if not thread.is_alive():
            _late_reaps.remove(thread)
    return not _late_reaps
