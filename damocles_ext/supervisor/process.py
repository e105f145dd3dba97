"""Spawning a prover child and stopping its whole process tree (Linux).

Each child starts in its own session (so its process group holds it and everything it forks),
with PR_SET_PDEATHSIG=SIGKILL (so it dies when the supervisor is SIGKILLed, which is how
damocles-manager stops its ext-prover) and its Cpuset applied before its own code runs.

Why not `trio.lowlevel.open_process`: it forks from a worker thread of trio's thread cache, and
PDEATHSIG fires when the *thread* that forked the child exits, not the process. Cached threads
exit after ten idle seconds, which would SIGKILL every child soon after it started. So the fork
happens here, synchronously, on the thread that runs trio (a few milliseconds), and the pipes and
the exit wait are plain trio primitives (FdStream, a pidfd).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import psutil
import trio

from ..config import TABLE_OF_STAGE, TMP_ROOT_ENV
from ..config.machine import untrusted_problem
from ..config.startup import interpreter_problem
from ..errors import FILES_ADVICE, TASKS_ADVICE
from ..regular_file import file_kind
from ..trusted_path import UntrustedPathError, make_trusted_dirs, resolve_trusted

log = logging.getLogger("damocles_ext.supervisor")

_PR_SET_PDEATHSIG = 1
_GROUP_POLL = 0.01  # seconds between looks at whether a process group is empty
_libc = ctypes.CDLL(None, use_errno=True)
prctl = _libc.prctl
prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
prctl.restype = ctypes.c_int


class SpawnError(Exception):
    """The child could not be started; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a process ended: its exit code, or the signal that killed it."""

    returncode: int | None
    signal: int | None

    @classmethod
    def from_returncode(cls, rc: int) -> ExitInfo:
        """Popen's convention: a negative return code is the killing signal."""
        return cls(None, -rc) if rc < 0 else cls(rc, None)

    def describe(self) -> str:
        """'exit code 3' or 'killed by SIGKILL'."""
        if self.signal is not None:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        return f"exit code {self.returncode}"

    @property
    def crashed(self) -> bool:
        """Killed by a signal a process gets from its own faults (a native library's bad
        pointer, an abort()), not one a supervisor or the kernel's OOM killer sends."""
        return self.signal in _CRASH_SIGNALS


_CRASH_SIGNALS = frozenset(
    s.value
    for s in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
              signal.SIGSYS, signal.SIGTRAP)
)  # fmt: skip


def block_name(stage: str, block: int) -> str:
    """The config table a child came from, as a person would look for it: 'WdPost[0]'."""
    return f"{TABLE_OF_STAGE.get(stage, stage)}[{block}]"


def _preexec(parent_pid: int, cpuset: frozenset[int] | None) -> Callable[[], None]:
    # Runs in the forked child before exec: keep it to system calls.
    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The supervisor may have died between fork and prctl; then no signal will ever come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        if cpuset:
            os.sched_setaffinity(0, cpuset)

    return preexec


def prepare_spawn(
    name: str,
    stage: str,
    block: int,
    argv: Sequence[str],
    kind: str,
    env: Mapping[str, str],
    cpuset: frozenset[int] | None,
    tmpdir: str | None = None,
    *,
    private_tmpdir: bool = False,
) -> None:
    """Checks that turn a doomed spawn into a clear error; creates `tmpdir` (the TMPDIR).

    A `private_tmpdir` (the `<tmp root>/<stage>-gpu<i>/` that Gpus gives a child) is made
    private, or refused if others could reach it; see _private_gpu_tmpdir. One from Envs is
    created if missing and otherwise left as it is (it may be shared on purpose).
    """
    where = block_name(stage, block)
    if not argv:
        raise SpawnError(f"{name}: empty command line; set Bin in {where}")
    program = argv[0]
    if os.sep not in program and shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        if kind == "damocles-worker":
            raise SpawnError(f"damocles-worker not found on PATH; set Bin or Plugin in {where}")
        raise SpawnError(f"{name}: program {program!r} not found on PATH; check Bin in {where}")
    if cpuset:
        available = os.sched_getaffinity(0)
        missing = sorted(set(cpuset) - available)
        if missing:
            raise SpawnError(
                f"{name}: Cpuset in {where} names CPUs {missing} that this process may not use"
                f" (available: {sorted(available)})"
            )
    if tmpdir:
        if private_tmpdir:
            root = os.path.dirname(os.path.normpath(tmpdir))
            _private_gpu_tmpdir(name, where, tmpdir, root)
            return
        try:
            os.makedirs(tmpdir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SpawnError(
                f"{name}: cannot create TMPDIR {tmpdir!r} from Envs in {where}: {exc.strerror}"
            ) from None


class _Unusable(Exception):
    """A directory that is not ours to use; the message says what it is (a symlink, ...)."""


def _open_dir(path: str, dir_fd: int | None, make: Callable[[], None]) -> int:
    """An fd of the directory `path` (relative to `dir_fd`), made by `make` if missing.

    Never through a symlink at `path` (O_NOFOLLOW): what the callers check is the open fd, so
    nothing can be swapped in between the check and the use. Raises _Unusable for a symlink or
    a non-directory, OSError when it cannot be made or opened.
    """
    for _ in range(3):
        try:
            return os.open(
                path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except FileNotFoundError:
            try:
                make()
            except FileExistsError:
                pass  # made meanwhile by someone else: the checks decide
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                try:
                    is_link = stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
                except OSError:
                    is_link = False
                raise _Unusable("is a symlink" if is_link else "is not a directory") from None
            raise
    raise _Unusable("keeps disappearing")


def _open_tmp_root(root: str) -> int:
    """An fd of the tmp root (created mode 0700 if missing, its missing parents 0755) in which
    no other user can replace our entries; raises _Unusable saying what it is otherwise.

    Accepted: a directory owned by us or by root, that others cannot write to, or that has the
    sticky bit (as /tmp has: others cannot rename or remove what we put there). A symlink is
    followed only if it is ours or root's (an operator's link to a faster disk, say): one that
    another user made, e.g. in /tmp before we made the root, is refused. Nothing here changes the
    mode of a directory that exists: it may be shared (the root may be /tmp itself).
    """
    euid = os.geteuid()
    path = root
    try:
        link = os.lstat(root)
    except FileNotFoundError:
        link = None
    if link is not None and stat.S_ISLNK(link.st_mode):
        if (problem := untrusted_problem(link, euid, link=True)) is not None:
            raise _Unusable(problem)
        path = os.path.realpath(root)
    fd = _open_dir(path, None, lambda: _make_tmp_root(root))
    if (problem := untrusted_problem(os.fstat(fd), euid)) is not None:
        os.close(fd)
        raise _Unusable(("" if path == root else f"({path}) ") + problem)
    try:
        # The children get the TMPDIR as a path: a directory above the root that another user
        # owns (or may write to) lets them swap the root for one of theirs after these checks.
        # The path as given, not where it leads: the children go through our link and the
        # directories above it too.
        resolve_trusted(root)
    except UntrustedPathError as exc:
        os.close(fd)
        raise _Unusable(f"is under a directory another user could change: {exc}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_tmp_root(root: str) -> None:
    # Its missing parents 0755 whatever the umask (os.makedirs made them 0775 under umask 002,
    # which the check of the directories above the root then refused), each made only once the
    # directories it goes in have passed.
    try:
        make_trusted_dirs(root, 0o700)
    except UntrustedPathError as exc:
        raise _Unusable(f"is under a directory another user could change: {exc}") from None


def _private_gpu_tmpdir(name: str, where: str, tmpdir: str, root: str) -> None:
    """Create or check `<tmp root>/<stage>-gpu<i>/`: a real directory of ours, mode 0700, in a
    tmp root where no other user can replace it (see _open_tmp_root).

    The tmp root may be one others can write to (DAMOCLES_EXT_TMP_ROOT=/tmp, say), where any
    user can create these names before we do, as a directory others can read and write or as a
    symlink to one of theirs; the prover's temporary files and bellperson's GPU lock files must
    not go there. (The default root, config.default_tmp_root, is one they cannot make first.)
    """
    why = (
        "another user could read or replace the prover's temporary files and bellperson's GPU"
        " lock files there"
    )
    try:
        root_fd = _open_tmp_root(root)
    except _Unusable as exc:
        raise SpawnError(
            f"{name}: the tmp root {root}, where {where} gets its TMPDIR {tmpdir}, {exc};"
            f" refusing to use it ({why}). Fix or remove it, or set {TMP_ROOT_ENV} to a"
            f" directory of your own"
        ) from None
    except OSError as exc:
        raise SpawnError(
            f"{name}: cannot create the tmp root {root} for the TMPDIR of {where}: {exc.strerror};"
            f" set {TMP_ROOT_ENV} to a directory you may write to"
        ) from None
    try:
        leaf = os.path.basename(os.path.normpath(tmpdir))
        try:
            fd = _open_dir(leaf, root_fd, lambda: os.mkdir(leaf, 0o700, dir_fd=root_fd))
            try:
                st = os.fstat(fd)
                if st.st_uid != os.geteuid():
                    raise _Unusable(f"is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")
                if stat.S_IMODE(st.st_mode) != 0o700:
                    os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
        except _Unusable as exc:
            raise SpawnError(
                f"{name}: TMPDIR {tmpdir} of {where} {exc}; refusing to use it ({why})."
                f" Remove it, or set TMPDIR in the Envs of {where} to a directory of your own"
            ) from None
    except OSError as exc:
        raise SpawnError(
            f"{name}: cannot create TMPDIR {tmpdir} of {where}: {exc.strerror}"
        ) from None
    finally:
        os.close(root_fd)


class ChildProcess:
    """A spawned child: its pipes as trio streams, its exit status, its process group."""

    READ_SIZE = 1 << 16  # bytes read from its pipes at once

    def __init__(self, popen: subprocess.Popen[bytes], stdin: int, stdout: int, stderr: int):
        self._popen = popen
        self.pid: int = popen.pid
        self._pidfd: int | None = os.pidfd_open(self.pid)  # first: nothing to undo if it fails
        self.stdin = trio.lowlevel.FdStream(stdin)
        self.stdout = trio.lowlevel.FdStream(stdout)
        self.stderr = trio.lowlevel.FdStream(stderr)
        self.exit: ExitInfo | None = None
        self._waiting = False
        self._changed = trio.Event()
        self._known: list[psutil.Process] = []
        self._late_reap: threading.Thread | None = None  # reap_when_it_exits' thread

    @property
    def returncode(self) -> int | None:
        """Popen's return code once reaped (negative: killed by that signal)."""
        return self._popen.returncode

    async def wait(self) -> ExitInfo:
        """Wait for the process to exit and reap it (any number of tasks may wait)."""
        while self.exit is None:
            if self._waiting:
                # One task watches the pidfd (epoll allows one waiter per fd); the rest wait
                # for its word, and one of them takes over if that task is cancelled.
                await self._changed.wait()
                continue
            self._waiting = True
            try:
                if self._late_reap is not None:  # its pidfd closed: its thread reaps it
                    await trio.to_thread.run_sync(self._late_reap.join, abandon_on_cancel=True)
                elif self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                if self.exit is None:
                    self._reap(self._popen.wait())
            finally:
                self._waiting = False
                changed, self._changed = self._changed, trio.Event()
                changed.set()
        return self.exit

    def poll(self) -> ExitInfo | None:
        """Reap the process if it has exited, without blocking."""
        if self.exit is None:
            rc = self._popen.poll()
            if rc is not None:
                self._reap(rc)
        return self.exit

    def reap_when_it_exits(self) -> threading.Thread:
        """Reap the process once it exits, however late, on a (daemon) thread of its own: for one
        not dead yet when no task will wait for it any more (the supervisor stops; one that does
        waits for the thread). Called in trio (the pidfd is closed here); the thread is started,
        and may raise RuntimeError."""
        self._close_pidfd()
        thread = threading.Thread(target=self._wait_blocking, name=f"reap {self.pid}", daemon=True)
        thread.start()
        self._late_reap = thread
        return thread

    def _wait_blocking(self) -> None:
        self.exit = ExitInfo.from_returncode(self._popen.wait())

    def _reap(self, rc: int) -> None:
        self._close_pidfd()
        self.exit = ExitInfo.from_returncode(rc)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def descendants(self) -> list[psutil.Process]:
        """The child's descendants as psutil sees them now (empty once the child is gone)."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def signal_group(self, sig: int) -> bool:
        """Send `sig` to the child's process group; False if the group is gone."""
        # The group id is the child's pid (own session). The kernel does not hand a pid out again
        # while a process group of that id still has members, so this is safe after the reap too.
        try:
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            # A group member changed its credentials (setuid helper); the leader still is ours.
            if self.exit is None:
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    return False
                except PermissionError:  # (a Bin that is another user's: sudo, setpriv)
                    pass
            return True

    def group_left(self) -> list[int]:
        """The processes still running in the child's group once the child itself was reaped
        (a prover its script started, holding the GPU), and that we may kill; [] when there
        is none. A zombie has freed what it held, and one we may not signal (another user's)
        we cannot wait out: neither counts."""
        if self.exit is None:
            return []  # (group_gone says it is not gone: the child itself runs)
        try:
            os.killpg(self.pid, 0)
        except OSError:  # none left (ESRCH), or none of them ours to signal (EPERM)
            return []
        return [pid for pid in running_in_group(self.pid) if _may_signal(pid)]

    def group_gone(self) -> bool:
        """The child was reaped and nothing of `group_left` is left: what the group held, a
        GPU's memory say, is free."""
        return self.exit is not None and not self.group_left()

    async def until_group_gone(self) -> None:
        """Return once `group_gone` (the caller bounds the wait)."""
        while left := self.group_left():
            for pid in left:
                await _until_exited(pid)

    def remember_descendants(self) -> None:
        """Note the child's descendants now, so that ones that left its process group (setsid)
        can still be found and killed after the child itself is gone."""
        self._known = self.descendants()

    def kill_tree(self) -> None:
        """SIGKILL the process group, and descendants that left the group (setsid) while known."""
        escaped = [
            p for p in self.descendants() + self._known if pgid_of(p.pid) not in (self.pid, None)
        ]
        self.signal_group(signal.SIGKILL)
        for proc in escaped:
            try:
                proc.kill()  # psutil checks the create time, so a reused pid is left alone
            except psutil.Error:
                pass

    def stdout_now(self) -> bytes:
        """What the (non-blocking) stdout pipe holds now: b"" when empty, at EOF, or broken."""
        try:
            return os.read(self.stdout.fileno(), self.READ_SIZE)
        except OSError:  # BlockingIOError (empty) among them
            return b""

    async def receive_stdout(self) -> bytes:
        """The next bytes of stdout; b"" at EOF, or when the pipe broke or was closed."""
        try:
            return await self.stdout.receive_some(self.READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def aclose(self) -> None:
        """Close our ends of the pipes."""
        for stream in (self.stdin, self.stdout, self.stderr):
            await stream.aclose()


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat's fields after the command's name (state, ppid, pgrp, ...); None once
    the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    return text[text.rfind(b")") + 2 :].split()  # the name may hold spaces and parentheses


def _state(pid: int) -> bytes | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def running_in_group(pgid: int) -> list[int]:
    """The pids of the processes of group `pgid` that have not exited (zombies excluded), from
    /proc: no system call lists a group's members."""
    group = b"%d" % pgid
    found = []
    for name in os.listdir("/proc"):
        fields = _stat_fields(name) if name.isdigit() else None
        if fields and len(fields) > 2 and fields[0] not in (b"Z", b"X") and fields[2] == group:
            found.append(int(name))
    return found


def _may_signal(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:  # gone, or another user's
        return False
    return True


async def _until_exited(pid: int) -> None:
    """Return once process `pid` (not our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfds (Linux before 5.3): no event tells, look every few ms
        while _state(pid) not in (None, b"Z", b"X"):  # noqa: ASYNC110
            await trio.sleep(_GROUP_POLL)
        return
    try:
        await trio.lowlevel.wait_readable(fd)  # readable once it has exited
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


def pgid_of(pid: int) -> int | None:
    """The process group of `pid`; None once it is gone."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None


_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20


def _grow_pipe(fd: int) -> None:
    # A WindowPoSt request for a 32GiB partition is ~300 kB: with the default 64 kB pipe it takes
    # a handful of partial writes and wake-ups on both sides. 1 MiB (the unprivileged limit)
    # carries it in one.
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size or the user's pipe quota: keep the default


def _exec_failure(program: str, env: Mapping[str, str], exc: OSError) -> str:
    """What exec's ENOENT or EACCES for `program` means, in words: ENOENT is also what a
    script whose #! interpreter is missing gets, EACCES what a directory or a FIFO gets."""
    # Looked up as exec looks it up: in the child's PATH, the default one without it.
    path = program if os.sep in program else shutil.which(program, path=env.get("PATH", os.defpath))
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        st = None
    if st is None:
        return "not found" if isinstance(exc, FileNotFoundError) else "is not executable"
    if not stat.S_ISREG(st.st_mode):
        return f"is {file_kind(st.st_mode)}, not a program"
    if isinstance(exc, PermissionError):
        return "is not executable"
    assert path is not None
    return interpreter_problem(path) or (
        "exists, but exec found no interpreter for it (an ELF program without its loader?)"
    )


def spawn(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cpuset: frozenset[int] | None = None,
) -> ChildProcess:
    """Start `argv` (no shell) in a new session with PDEATHSIG and cpuset; raises SpawnError.

    Whatever goes wrong on the way (no fds left, no memory, a NUL in an argument or variable)
    is a SpawnError that says why: a start that failed, never an exception that would take the
    supervisor down.
    """
    # Our ends are non-inheritable (O_CLOEXEC); the child ends are dup2'd onto 0/1/2 by Popen.
    made: list[int] = []
    try:
        for _ in range(3):
            made.extend(os.pipe2(os.O_CLOEXEC))
    except OSError as exc:
        for fd in made:
            os.close(fd)
        raise SpawnError(f"{name}: cannot create its pipes: {os_reason(exc)}") from None
    stdin_r, stdin_w, stdout_r, stdout_w, stderr_r, stderr_w = made
    ours = (stdin_w, stdout_r, stderr_r)
    _grow_pipe(stdin_w)  # answers are small; only requests need the room
    try:
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=stdin_r,
                stdout=stdout_w,
                stderr=stderr_w,
                env=dict(env),
                start_new_session=True,
                close_fds=True,
                # Only system calls run in the forked child (no locks, no imports); there is no
                # other way to set PDEATHSIG and the affinity before the program's first line.
                preexec_fn=_preexec(os.getpid(), cpuset),  # noqa: PLW1509
            )
        except (FileNotFoundError, PermissionError) as exc:
            why = _exec_failure(argv[0], env, exc)
            raise SpawnError(f"{name}: program {argv[0]!r} {why}") from None
        except ValueError as exc:  # a NUL in argv or env, which exec cannot carry
            raise SpawnError(f"{name}: cannot start {argv[0]!r}: {exc}") from None
        except OSError as exc:
            raise SpawnError(f"{name}: cannot start {argv[0]!r}: {os_reason(exc)}") from None
        except subprocess.SubprocessError as exc:
            raise SpawnError(f"{name}: cannot start {argv[0]!r}: {exc}") from None
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in (stdin_r, stdout_w, stderr_w):
            os.close(fd)
    try:
        return ChildProcess(popen, stdin_w, stdout_r, stderr_r)
    except OSError as exc:  # e.g. out of file descriptors for the pidfd
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        for fd in ours:
            os.close(fd)
        raise SpawnError(f"{name}: started, but cannot watch it: {os_reason(exc)}") from None


def os_reason(exc: OSError) -> str:
    """'Too many open files (errno EMFILE): …': the words, the name to search for, and, when
    the process ran out of tasks or descriptors, which limit to raise."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    advice = {errno.EAGAIN: TASKS_ADVICE, errno.EMFILE: FILES_ADVICE}.get(exc.errno or 0)
    said = f"{exc.strerror or exc}" + (f" (errno {code})" if code else "")
    return f"{said}: {advice}" if advice else said
