"""Exception types that reach people, and the exit codes they map to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

EXIT_OK = 0
EXIT_PROVER_ERROR = 1
EXIT_USAGE = 2
#: sysexits' EX_TEMPFAIL: something this machine must provide did not answer yet (the GPU driver,
#: right after a boot), so a later start may succeed. systemd's Restart=on-failure retries it,
#: where RestartPreventExitStatus=2 keeps a usage error from looping.
EXIT_TEMPFAIL = 75


def passes_through(exc: BaseException) -> bool:
    """Whether `exc`, out of a plugin's code (a hook, an observer, a sector provider), is Ctrl-C,
    trio's cancellation of the caller or the close of its coroutine (alone or in a group), which
    pass through; anything else is the plugin's failure, reported and survived: an Exception, a
    sys.exit(), and a BaseException such as asyncio.CancelledError or one of the plugin's own,
    which would otherwise take the supervisor, a worker or a coordinator down."""
    import trio  # here: the child runtime imports this module, and has no use for trio

    if isinstance(exc, BaseExceptionGroup):
        return any(passes_through(e) for e in exc.exceptions)
    return isinstance(exc, (KeyboardInterrupt, trio.Cancelled, GeneratorExit))


#: What to do when a process or a thread cannot be started for lack of tasks (EAGAIN from fork or
#: clone, "can't start new thread"): the limits that count them.
TASKS_ADVICE = (
    "this user or service has as many processes and threads as its limit allows (ulimit -u,"
    " i.e. RLIMIT_NPROC, systemd's TasksMax or LimitNPROC, the cgroup's pids.max,"
    " kernel.threads-max): raise that limit or stop what holds them"
)
#: What to do when this process has no file descriptor left (EMFILE).
FILES_ADVICE = (
    "this process has as many files open as its limit allows (ulimit -n, i.e. RLIMIT_NOFILE,"
    " systemd's LimitNOFILE): raise it"
)


class DextError(Exception):
    """Base class of damocles-ext's own errors; the message is written for a person.

    `request_id`: the supervisor's number of the request it answers or refuses, when a
    supervisor of this process did (`numbered`); a front end's record of it carries it.
    `logged`: the answer it is was logged where it was made (a bug's traceback, a throttled
    refusal): a front end does not warn about it again."""

    exit_code = EXIT_PROVER_ERROR
    request_id: int | None = None
    logged = False

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled (multiprocessing, concurrent.futures) or copied, an exception is made again
        # as cls(*args), which failed for those whose __init__ takes other arguments than the
        # message (ConfigError's file and errors, the RPC errors' url and method): rebuilt
        # without calling __init__, with the same args and fields.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[DextError], args: tuple[object, ...], fields: dict[str, object]
) -> DextError:
    exc = cls.__new__(cls, *args)  # BaseException.__new__ sets args
    exc.__dict__.update(fields)
    return exc


class UsageError(DextError):
    """Bad input from the user (arguments, files, config, task JSON): exit code 2."""

    exit_code = EXIT_USAGE


class UnsendableTask(UsageError):
    """A task that cannot be encoded at all (tasks.UNSENDABLE: an id over 64 bits, a path that
    is no text): where a worker builds it, its own paths' fault, not the job's."""


class OutputError(DextError):
    """stdout took no more output (a full disk, a descriptor closed at start): exit code 1."""


class ProverError(DextError):
    """A proof could not be produced (prover failed, child died, deadline passed): exit code 1.

    `job_id` and `worker`: the job store's job (and its last worker) whose answer it is (serve
    --jobs); with `request_id` (DextError's), a front end's record of the failure carries them
    as fields."""

    exit_code = EXIT_PROVER_ERROR
    job_id: str | None = None
    worker: str | None = None


class ProverUsageError(UsageError, ProverError):
    """A request's error answer that the supervisor says is the caller's to fix (the control
    socket's Response.kind "usage": no child of its stage there, a worker's socket): a
    UsageError (exit code 2, the MRO finds UsageError's first) that is also the ProverError a
    client's `submit` raised before the answer said its kind, so `except ProverError` still
    catches it."""


class NotStartedError(ProverError):
    """A damocles-ext worker's answer to `status` before it has started its supervisor (it waits
    for its manager): no status document yet, only why, and `worker_part`, the document's
    `worker` part as plain data, which the control socket sends beside the error (StatusReply's
    `worker`), so that a client can tell a worker's socket from it."""

    def __init__(self, message: str, worker_part: dict[str, Any]) -> None:
        super().__init__(message)
        self.worker_part = worker_part


class DeadlineError(ProverError):
    """No proof in time: the request's deadline passed, or it was not started because even the
    fastest recent proofs like it could not have finished before it. A ProverError, but no
    failure of a prover's (a prover that hangs until RequestTimeoutSecs is a plain one)."""


_E = TypeVar("_E", bound=DextError)


def prover_error(message: str, *, late: bool, request_id: int | None = None) -> ProverError:
    """A request's error answer as raised to its caller: a DeadlineError when `late`."""
    return numbered((DeadlineError if late else ProverError)(message), request_id)


def numbered(error: _E, request_id: int | None) -> _E:
    """`error`, about the supervisor's request `request_id` (its message's `request N`),
    carrying that number as its `request_id`."""
    error.request_id = request_id
    return error


def not_utf8(text: str) -> str | None:
    """Where `text` is not UTF-8 (os.fsdecode made such bytes lone surrogates): its first such
    byte as \\xNN and the character it is; None when it is all UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"byte \\x{ord(text[e.start]) & 0xFF:02x} (character {e.start + 1})"
    return None


def text_of(value: object, how: Callable[[object], str] = str) -> str:
    """str(value) (or `how`, repr say), or what it is when its __str__ (__repr__) fails (a
    plugin's exception may have a broken one): for messages about third-party objects, which
    must not fail themselves."""
    try:
        return how(value)
    except Exception:  # noqa: BLE001 - a third party's object; its type is all there is to say
        return f"<{type(value).__name__} whose text could not be read>"


def describe(exc: BaseException) -> str:
    """'<Type>: message' of a third party's exception, even when its __str__ fails."""
    return f"{type(exc).__name__}: {text_of(exc)}"


def check_trio_run(what: str, token: object = None) -> None:
    """UsageError unless called within a trio run, and within the run of `token` (a
    trio.lowlevel.TrioToken) when given: what damocles-ext's API keeps (events, nurseries, a
    supervisor's request book) belongs to the one trio run that made it. Called from asyncio, a
    plain thread or another thread's trio.run, it failed deep inside trio, after a supervisor
    had booked the request (its proof ran, no caller heard of it) or set an event no task woke
    from (a shutdown that never came)."""
    import trio

    try:
        current = trio.lowlevel.current_trio_token()
    except RuntimeError:
        current = None
    if current is not None and (token is None or current is token):
        return
    where = (
        "outside any trio run (from asyncio, or a plain thread?)"
        if current is None
        else "from another trio run than the one it runs in (another thread's trio.run?)"
    )
    raise UsageError(
        f"{what} was called {where}: damocles-ext's API runs on trio (trio.run), and an object"
        " of it only in the trio run that made it; call it there, or from another thread with"
        " trio.from_thread.run(...) (or run_sync), passing that run's"
        " trio.lowlevel.current_trio_token() as trio_token"
    )
