"""What a child leaves behind: the orphan adopter and the process-group guardian (Linux).

Killing a child's process group misses what it started in a session of its own (setsid). Two
helpers catch those: `OrphanAdopter` makes the supervisor a child subreaper and finds, by the
mark every child's environment carries (`TREE_ENV`), the orphans it inherits; `GroupGuardian`
is a double-forked helper that kills every child's group and every marked process when the
supervisor itself dies, SIGKILL included.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys

import psutil
import trio

from .process import os_reason, pgid_of, prctl

log = logging.getLogger("damocles_ext.supervisor")


_PR_SET_CHILD_SUBREAPER = 36
#: The environment variable that marks a supervisor's process tree (see OrphanAdopter).
TREE_ENV = "DAMOCLES_EXT_TREE"


class OrphanAdopter:
    """Finds, kills and reaps what a child left behind outside its process group.

    A process that calls setsid leaves its parent's group, so killing the child's group misses it,
    and if the child then dies on its own, nobody we know is its parent any more. As a child
    subreaper (PR_SET_CHILD_SUBREAPER) the supervisor becomes the parent of every orphan of its
    tree instead of init, so the orphans can be found among its own children:

    * Each spawn gets its own mark, `TREE_ENV=<token>.<n>`, in the child's environment, which its
      descendants inherit. A child of ours that we did not spawn, carries a mark of ours and
      whose child process has exited is an orphan of a dead child: it is killed (with its process
      group) and reaped. One whose child is still running (a double-forked helper, a daemon it
      runs on purpose) is left alone, as is anything in a running child's process group, and
      anything without our mark (a subprocess of an observer plugin, say).
    * Zombies among our children that we did not spawn are reaped: they are orphans of the tree
      that exited (init reaped them before we became a subreaper). Those in our own process group
      are not: every child we spawn leads a group of its own, so they are no orphans of the tree
      but subprocesses of this program (an observer plugin's, say), which their owner waits for.
      A subprocess started in a new session or group (``start_new_session=True``) cannot be told
      from an orphan once it has exited: if it is still unwaited when a sweep runs, it is reaped
      and its Popen reports exit code 0.

    Subreaper is a property of the whole process, so only the `serve` and `run` commands turn it
    on; a Supervisor embedded in another program (the Python API) leaves that program alone.
    An orphan that clears its environment is not recognised while it lives.
    """

    def __init__(self) -> None:
        self.token = f"{os.getpid()}-{os.urandom(6).hex()}"
        self.enabled = False
        self._spawns = 0

    def enable(self) -> bool:
        """Become a child subreaper; False (and a log line) if the kernel refuses."""
        if prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            log.warning(
                "cannot become a child subreaper (%s): processes a child starts outside its "
                "process group (setsid) may outlive it",
                os.strerror(err),
            )
            return False
        self.enabled = True
        return True

    def mark(self, env: dict[str, str]) -> str:
        """Put this spawn's mark in a child's environment (before spawning it); returns it.

        Marked also when we are no subreaper: the GroupGuardian finds the tree by the mark."""
        self._spawns += 1
        env[TREE_ENV] = tag = f"{self.token}.{self._spawns}"
        return tag

    def find(
        self, spawned: set[int], live_marks: set[str]
    ) -> tuple[list[tuple[psutil.Process, str]], list[int]]:
        """(orphans of dead children to kill, each with its mark; pids of zombie orphans to
        reap) among our children.

        `spawned`: pids of the processes we spawned and have not reaped; `live_marks`: the marks
        of those still running."""
        if not self.enabled:
            return [], []
        orphans, zombies = [], []
        prefix = self.token + "."
        own_group = os.getpgrp()
        for proc in psutil.Process().children():
            if proc.pid in spawned:
                continue
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    if pgid_of(proc.pid) not in (own_group, None):
                        zombies.append(proc.pid)
                    continue
                if pgid_of(proc.pid) in spawned or os.getsid(proc.pid) in spawned:
                    continue  # still in a child's group or session: the child's to manage
                mark = proc.environ().get(TREE_ENV, "")
            except (psutil.Error, OSError):  # gone, or not ours to read
                continue
            if mark.startswith(prefix) and mark not in live_marks:
                orphans.append((proc, mark))
        return orphans, zombies

    @staticmethod
    def reap(pid: int) -> None:
        """Collect a zombie child's exit status."""
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    @staticmethod
    async def kill_and_reap(proc: psutil.Process) -> None:
        """SIGKILL an orphan and its process group, and wait for it (it is our child now)."""
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            return  # already reaped
        try:
            try:
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
            except (OSError, psutil.Error):
                pass
            await trio.lowlevel.wait_readable(fd)
            try:
                os.waitpid(proc.pid, 0)  # noqa: ASYNC222 - it has exited (pidfd readable): no wait
            except ChildProcessError:
                pass
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


# The guardian's program. It double-forks, so that it is nobody's child but init's (tools and
# tests that list the supervisor's children see only provers), ignores the signals a terminal or
# a service manager sends to everyone, and reads "+PGID" / "-PGID" lines until EOF. Then it kills
# the groups still listed, and every process whose environment carries the tree's mark
# (argv[1] is "DAMOCLES_EXT_TREE=<token>."): those that left their group (setsid, daemons). It
# runs with -I -S (no psutil), so it reads /proc itself; a pidfd taken before the environment is
# read makes sure the signal reaches the process that was checked, not a reused pid. Killing
# repeats until a pass finds nothing, as a marked process may fork while the pass runs.
_GUARDIAN_CODE = r"""
import os, shutil, signal, stat, sys, time
if os.fork():
    os._exit(0)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(s, signal.SIG_IGN)
mark = sys.argv[1].encode() if len(sys.argv) > 1 else None

def kill_marked():
    found = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            fd = os.pidfd_open(int(name))
        except OSError:
            continue
        try:
            with open("/proc/" + name + "/stat", "rb") as f:
                if f.read().rpartition(b")")[2].split()[0] == b"Z":
                    continue
            with open("/proc/" + name + "/environ", "rb") as f:
                env = f.read()
            if any(v.startswith(mark) for v in env.split(b"\0")):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                found += 1
        except (OSError, IndexError):
            pass
        finally:
            os.close(fd)
    return found

def gone(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return True

groups, removals, buf = set(), [], b""
while True:
    try:
        data = os.read(0, 65536)
    except InterruptedError:
        continue
    if not data:
        break
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        if line[:1] == b"+":
            groups.add(int(line[1:]))
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
        elif line[:1] == b"r":
            pid, _, path = line[1:].partition(b" ")
            removals.append((int(pid), path))
for g in groups:
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass
if mark:
    for _ in range(100):
        if not kill_marked():
            break
for pid, path in removals:
    # A killed process closes its files a moment before it is a zombie: a second to be gone.
    for _ in range(20):
        if gone(pid):
            break
        time.sleep(0.05)
    else:
        continue  # alive: it stopped its supervisor, and removes the directory itself
    try:
        st = os.lstat(path)
    except OSError:
        continue
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
        shutil.rmtree(path, ignore_errors=True)
"""


class GroupGuardian:
    """A helper process that SIGKILLs the children's process groups once the supervisor is gone.

    PR_SET_PDEATHSIG reaches the children only: when the supervisor is SIGKILLed (damocles-manager
    stops its ext-prover that way) the processes a child started would live on as orphans. The
    guardian is told each child's group as it starts and ends; when its stdin (a pipe from us)
    reaches EOF, which happens however we die, it kills every group still listed, then every
    process that carries `tree_token`'s mark in its environment (see OrphanAdopter.mark), which
    finds those that left their child's group (setsid, a daemon), and exits. Out of its reach: a
    process that both left the group and cleared its environment (or was started with a fresh
    one), and one it may not signal or whose environment it may not read (another user's).
    """

    def __init__(self, tree_token: str | None = None) -> None:
        read_end, self._fd = os.pipe2(os.O_CLOEXEC)
        mark = [f"{TREE_ENV}={tree_token}."] if tree_token else []
        try:
            helper = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _GUARDIAN_CODE, *mark],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={},
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:  # the caller says so, and goes on without it
            os.close(self._fd)
            raise OSError(exc.errno, os_reason(exc)) from None
        finally:
            os.close(read_end)
        self._helper: subprocess.Popen[bytes] | None = helper
        # Its intermediate process not reaped by `started` (its bound passed): reaped at close.
        self._unreaped: subprocess.Popen[bytes] | None = None
        os.set_blocking(self._fd, False)
        self._broken = False

    async def started(self) -> None:
        """Reap the intermediate process of the double fork (it exits at once).

        Its exit is watched through a pidfd, not waited for on a thread: at the limit of tasks
        (ulimit -u, TasksMax) no thread can be started, which took the supervisor down at its
        start. Without a descriptor for the pidfd, it is waited for here (a few milliseconds)."""
        helper, self._helper = self._helper, None
        if helper is None:
            return
        try:
            pidfd = os.pidfd_open(helper.pid)
        except OSError:
            helper.wait()
            return
        try:
            # Shielded, as the thread's wait was: a supervisor stopped at once must still reap
            # it (it exits at once); bounded, in case its fork hangs.
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
        if helper.poll() is None:  # slow to start (a loaded machine; a clock that jumped): later
            self._unreaped = helper

    def add(self, pgid: int) -> None:
        """A child's process group to kill if we die."""
        self._write(f"+{pgid}\n")

    def remove_when_gone(self, path: str, pid: int | None = None) -> None:
        """Remove the directory `path` if this process (or `pid`) is gone when the guardian's
        stdin ends (atexit does not run on SIGKILL): the per-process root of the children's
        TMPDIRs. A process still alive then (it stopped its supervisor) removes it itself."""
        line = f"r{os.getpid() if pid is None else pid} {path}\n"
        if "\n" not in path:
            try:
                line.encode()
            except UnicodeEncodeError:  # a TMPDIR that is no text: not told (atexit removes it)
                return
            self._write(line)

    def remove(self, pgid: int) -> None:
        """The group is gone (its leader reaped after the group was killed)."""
        self._write(f"-{pgid}\n")

    def _write(self, line: str) -> None:
        if self._fd < 0 or self._broken:
            return
        try:
            os.write(self._fd, line.encode())
        except OSError as exc:  # the guardian was killed, or is stuck with a full pipe
            self._broken = True
            log.error(
                "the process-group guardian is gone (%s): if the supervisor is killed,"
                " its children's own children may outlive it",
                exc,
            )

    def close(self) -> None:
        """EOF for the guardian: it kills the groups still listed (none, normally) and exits.
        Its intermediate process, if `started` gave up waiting for it, is reaped if it exited
        since (never waited for: a hung fork must not hold the supervisor's end)."""
        if self._unreaped is not None:
            self._unreaped.poll()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
