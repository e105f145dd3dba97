"""The plugin contract of damocles-ext (pluggy project name, hook prefix and entry-point group:
``damocles_ext`` / ``dext_``).

A plugin is a module (or object) registered under the entry-point group ``damocles_ext``::

    [project.entry-points.damocles_ext]
    hello = "dext_hello_plugin"

whose functions are marked with :data:`hookimpl` and named after the hooks below. Plugin modules
are imported by every child at start, so keep their module-level imports light and do heavy work
(loading a GPU library, reading parameters) in the prover factory.

Two kinds of hooks:

* contribution hooks, called synchronously: :func:`dext_provers`,
  :func:`dext_validate_plugin_options`;
* observer hooks, called by the supervisor through :func:`damocles_ext.plugins.call_observers`
  (pluggy's hook caller, so ``tryfirst``/``trylast`` and wrappers apply): they may be plain
  functions (called in a worker thread, off the supervisor's trio loop: they may block, but
  cannot call trio directly) or ``async def`` (awaited under the supervisor's trio loop, after
  the hook call), must return quickly (cut off after 10 s), and an exception they raise (a
  `sys.exit()`, an asyncio.CancelledError or any BaseException but Ctrl-C too) is logged with
  the plugin's name and otherwise ignored.

The small value types the hooks pass around (:class:`ProverSpec`, :class:`ChildInfo`,
:class:`ExitStatus`, :class:`RequestInfo`, :class:`CancelToken`) live here too so that a plugin
needs exactly one import: ``from damocles_ext.hookspecs import hookimpl, ProverSpec``.
"""

from __future__ import annotations

import signal as _signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import pluggy

if TYPE_CHECKING:
    # Annotations only: plugin modules load in every child, so hookspecs stays light.
    from .jobs.model import WdPoStSectorInfo
    from .jobs.worker_rules import PulledJob
    from .sectors.model import SectorProvider, SectorSettings
    from .tasks import Output, Task

PROJECT = "damocles_ext"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: What a plugin's options look like once parsed (`PluginOptions` in the config, `--option K=V`).
Options = Mapping[str, "str | int | float | bool"]

#: How a request ended, as reported to :func:`dext_request_finished`.
Outcome = Literal["ok", "error", "cancelled", "timeout", "fault"]
OUTCOMES: tuple[str, ...] = ("ok", "error", "cancelled", "timeout", "fault")

#: progress(phase, done, total): a prover reports how far it got; cheap to call often.
ProgressCallback = Callable[[str, int, int], None]


class Cancelled(Exception):
    """Raised by :meth:`CancelToken.check` once the request was cancelled."""


class CancelToken:
    """A thread-safe cancellation flag handed to a prover with each request.

    Cheap to make (a child makes one per request): the event a :meth:`wait` sleeps on is made
    only when a prover first waits, under one lock shared by all tokens (taken only by
    :meth:`cancel` and :meth:`wait`, never by :meth:`check`)."""

    __slots__ = ("_event", "_set", "reason")

    def __init__(self) -> None:
        self._event: threading.Event | None = None
        self._set = False
        self.reason = ""

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._set

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the prover to stop at its next check; safe to call from any thread, repeatedly."""
        with _TOKEN_LOCK:
            if self._set:
                return
            self.reason = reason
            self._set = True
            event = self._event
        if event is not None:
            event.set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the request was cancelled; call it between units of work."""
        if self._set:
            raise Cancelled(self.reason or "cancelled")

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to `timeout` seconds, waking early on cancel; returns :attr:`cancelled`."""
        with _TOKEN_LOCK:
            event = self._event
            if event is None:
                event = self._event = threading.Event()
                if self._set:
                    event.set()
        return event.wait(timeout)


_TOKEN_LOCK = threading.Lock()


@runtime_checkable
class Prover(Protocol):
    """What a :class:`ProverSpec` factory returns.

    ``prove`` runs on a worker thread of the child; with ``--capacity N`` up to N calls run at
    once, so a prover that is not thread-safe must lock internally. It returns a
    ``damocles_ext.tasks.WindowPoStOutput`` / ``WinningPoStOutput`` for the task's stage, raises
    :class:`Cancelled` (directly or via ``cancel.check()``) when cancelled, and raises any other
    exception to fail the request (the message reaches the caller as ``"<Type>: message"``).
    An optional ``version`` attribute is reported in the dext Hello; an optional ``close()`` is
    called when the child shuts down. A ``prove`` that cannot take these three arguments, or an
    ``async def`` one, is refused when the child starts (:func:`prover_mismatch`).
    """

    # Read-only properties, not plain attributes: a protocol attribute is mutable and invariant,
    # so `stages = STAGES` (a tuple of four str) on a class would not satisfy `tuple[str, ...]`.
    @property
    def name(self) -> str: ...

    @property
    def stages(self) -> tuple[str, ...]: ...

    def prove(self, task: Task, progress: ProgressCallback, cancel: CancelToken) -> Output: ...


#: How the child calls a prover (on a worker thread, taking what it returns as the output).
PROVE_SIGNATURE = "prove(task, progress, cancel)"


def prover_mismatch(prover: object) -> str | None:
    """Why `prover` (what a factory returned) cannot be called as a :class:`Prover`: no
    callable ``prove``, an ``async def`` one (the child would get a coroutine, not an output),
    or one that cannot take the three arguments; None when it can, or when its signature
    cannot be read (a C function): then it is trusted."""
    import inspect  # here: hookspecs stays light for the children that only import it

    prove = getattr(prover, "prove", None)
    if not callable(prove):
        return (
            f"its factory returned {type(prover).__name__}, which has no {PROVE_SIGNATURE} method"
        )
    if inspect.iscoroutinefunction(prove):
        return (
            f"its prove is async def, where the child calls a plain {PROVE_SIGNATURE} on a worker"
            " thread and takes what it returns: make it a plain def (with asyncio.run inside, if"
            " need be)"
        )
    try:
        signature = inspect.signature(prove)
    except Exception:  # noqa: BLE001 - no signature to read (a C function): trusted
        return None
    try:
        signature.bind(None, None, None)
    except TypeError as exc:
        return f"its prove{signature} cannot be called as {PROVE_SIGNATURE}: {exc}"
    return None


def _no_problems(options: Options) -> list[str]:
    return []


@dataclass(frozen=True, slots=True)
class ProverSpec:
    """A named prover a plugin offers (returned from :func:`dext_provers`).

    `factory(options)` builds the prover in the child; `validate_options(options)` returns a list
    of human-readable problems (empty when the options are fine) and must not do heavy work: the
    supervisor's config check calls it too. One that takes a `stage` keyword is given the stage
    the child serves (e.g. "window_post_snark"), when it is known.
    """

    name: str
    stages: tuple[str, ...]
    factory: Callable[[Options], Prover]
    description: str = ""
    validate_options: Callable[[Options], list[str]] = field(default=_no_problems)

    def __post_init__(self) -> None:
        # Accept a list or a single stage name for convenience; store a tuple (frozen, hashable).
        stages = (self.stages,) if isinstance(self.stages, str) else tuple(self.stages)
        object.__setattr__(self, "stages", stages)


@dataclass(frozen=True, slots=True)
class ChildInfo:
    """A prover child as observers see it."""

    stage: str  # "window_post" | "winning_post" | "window_post_vanilla" | "window_post_snark"
    index: int  # index within the stage
    name: str  # e.g. "window_post#0"
    pid: int | None  # None before the process exists
    gpu: str | None = None  # its CUDA_VISIBLE_DEVICES, if any


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a child ended: an exit code or the signal that killed it, and why (our words)."""

    returncode: int | None  # the exit code, or None when killed by a signal
    signal: int | None = None  # the signal number when killed by one
    reason: str = ""  # e.g. "exited", "killed after request timeout", "shutdown"

    def describe(self) -> str:
        """A short phrase for logs and errors: 'exit code 3', 'killed by SIGKILL'."""
        if self.signal is not None:
            try:
                what = f"killed by {_signal.Signals(self.signal).name}"
            except ValueError:
                what = f"killed by signal {self.signal}"
        elif self.returncode is not None:
            what = f"exit code {self.returncode}"
        else:
            what = "unknown exit status"
        return f"{what} ({self.reason})" if self.reason else what


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A proof request as observers see it."""

    id: int  # the supervisor's request id
    stage: str
    child: str | None  # the child's name (ChildInfo.name) serving it, None while queued
    deadline: float | None = None  # unix time, seconds
    attempt: int = 1  # 1 for the first try, 2.. for retries after a child failure


# ---------------------------------------------------------------------------------------------
# Contribution hooks


# pluggy reads a hookspec's signature and never runs its body, hence the empty body.
@hookspec
def dext_provers() -> list[ProverSpec]:  # type: ignore[empty-body]
    """Return the provers this plugin offers.

    Parameters: none.

    Returns: a list of :class:`ProverSpec` (name, stages, description, factory(options) ->
    prover, validate_options(options) -> list of problems). Prover names are global across all
    plugins; a name offered by two plugins is an error when a child asks for it.

    Called: once per plugin manager, when a child (`damocles-ext child --plugin NAME`) looks up its
    prover, when `damocles-ext plugins` lists them and when a config is checked.
    """


@hookspec
def dext_validate_plugin_options(prover_name: str, options: Options) -> list[str] | None:
    """Check the `PluginOptions` given to a prover, on top of its own ``validate_options``.

    Parameters: `prover_name` — the prover the options are for (any plugin's, so a site plugin
    may enforce policy on other plugins' provers); `options` — the parsed options, a mapping of
    key to str/int/float/bool.

    Returns: a list of problems, each a sentence naming the key and what to do (empty or None
    when there is nothing to say about these options).

    Called: by the child before it builds the prover (any problem -> the child exits with code 2
    before it reports ready) and by the config check.
    """


# ---------------------------------------------------------------------------------------------
# Observer hooks (supervisor side; sync or async; exceptions are logged and ignored)


@hookspec
def dext_child_started(child: ChildInfo) -> None:
    """A prover child process was spawned (it is not ready yet).

    Parameters: `child` — a :class:`ChildInfo` (stage, index, name, pid, gpu).

    Returns: nothing (an awaitable is awaited).

    Called: by the supervisor right after each spawn, restarts included.
    """


@hookspec
def dext_child_ready(child: ChildInfo) -> None:
    """A child sent its ready message (dext Hello or the damocles ready line).

    Parameters: `child` — a :class:`ChildInfo`.

    Returns: nothing (an awaitable is awaited).

    Called: by the supervisor once per successful start, before requests are sent to the child.
    """


@hookspec
def dext_child_exited(child: ChildInfo, status: ExitStatus) -> None:
    """A child process ended, whatever the cause (crash, kill after a timeout, shutdown).

    Parameters: `child` — a :class:`ChildInfo`; `status` — an :class:`ExitStatus` (exit code or
    signal, and the supervisor's reason).

    Returns: nothing (an awaitable is awaited).

    Called: by the supervisor after it reaped the process, before any restart.
    """


@hookspec
def dext_request_started(request: RequestInfo) -> None:
    """A request was sent to a child.

    Parameters: `request` — a :class:`RequestInfo` (id, stage, child, deadline, attempt).

    Returns: nothing (an awaitable is awaited).

    Called: by the supervisor on each dispatch, so a retried request is reported once per attempt.
    """


@hookspec
def dext_request_finished(
    request: RequestInfo, outcome: Outcome, duration: float, slack: float | None
) -> None:
    """A request got its final answer.

    Parameters: `request` — a :class:`RequestInfo`; `outcome` — one of "ok", "error",
    "cancelled", "timeout", "fault" (proofs with faults listed); `duration` — seconds from
    submission to the answer; `slack` — seconds left before the request's deadline when it was
    answered (negative: the deadline was missed; None: no deadline). These are the events the
    Prometheus metrics count; an implementation may take any subset of the parameters.

    Returns: nothing (an awaitable is awaited).

    Called: by the supervisor once per request, when its answer is sent to the caller.
    """


# ---------------------------------------------------------------------------------------------
# Worker hooks (`damocles-ext worker`; synchronous, firstresult)


@hookspec(firstresult=True)
def dext_sector_paths(
    job: PulledJob, sector: WdPoStSectorInfo, attached: Mapping[str, str]
) -> tuple[str, str] | None:
    """Where a pulled job's sector is on this worker: for a site whose stores are not laid out as
    damocles lays them out.

    Parameters: `job` — the job as the manager gave it (`jobs.worker_rules.PulledJob`: `Id`,
    `Input` with `MinerId`, `ProofType`, `Sectors`); `sector` — one of `job.Input.Sectors`
    (`jobs.model.WdPoStSectorInfo`: `SectorId`, `Upgrade`, `Accesses.SealedFile` and
    `Accesses.CacheDir`, which are store *names*); `attached` — the worker's attached stores, name
    -> local path.

    Returns: `(sealed_file, cache_dir)` paths, or None to leave the sector to the next plugin and
    finally to the built-in rule (`<store>/sealed/s-t0<miner>-<num>`, `<store>/cache/…`;
    `update/` and `update-cache/` for an upgraded sector). An exception fails the job, and its
    message is the job's error: name the store and the job in it.

    Called: by the worker for each sector of each job it pulls, before the job goes to a child;
    the first non-None answer wins.
    """


# ---------------------------------------------------------------------------------------------
# Sector-location hooks (`damocles_ext.sectors`: `sectors find`, and the processes that locate
# sectors themselves)


@hookspec
def dext_sector_providers(settings: SectorSettings) -> list[SectorProvider] | None:
    """Sources of sector locations a plugin adds (a site's database, another index).

    Parameters: `settings` — a `damocles_ext.sectors.SectorSettings`: `proxy` (the source node's
    address, or None), `stores` (store name -> path on this machine, from `--conf-dir`'s
    sector-manager.cfg and `--attached`), `headers`, `connections`.

    Returns: a list of `damocles_ext.sectors.SectorProvider` (a `name`, and
    `async find(sector) -> SectorLocation | None`: None when it does not know the sector, an
    exception when it cannot answer), or None for none. The locator asks the plugins' providers
    first (pluggy's order: `tryfirst`/`trylast` apply), then the built-in ones: the damocles
    source node (`--proxy`), then the scan of the stores in damocles' layout. The first
    location given wins; a provider that raises (anything but Ctrl-C and trio's cancellation:
    a `sys.exit()`, an asyncio.CancelledError, an exception whose str() fails) counts as a
    source error and the next is asked.

    Called: once, when a locator is built (`sectors find`, and the worker and coordinator that
    locate sectors); the providers are then used for the locator's life.
    """
