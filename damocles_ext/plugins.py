"""The plugin manager: discovery through entry points, prover lookup, observer calls.

Discovery mirrors ``pm.load_setuptools_entrypoints("damocles_ext")`` but loads each entry point on
its own, so a plugin that fails to import (or registers a misspelt hook) is recorded with its name
and error while every other plugin still loads. What a plugin's synchronous code (its import, its
contribution hooks, validators and factories) raises is recorded whatever it is but Ctrl-C: a
BaseException of its own, an asyncio.CancelledError, a sys.exit() (no trio cancellation can come
out of code that never awaits). Observer hooks go through pluggy's hook caller
(order, wrappers, tracing), with each implementation guarded for the same reason: one failing
observer must not hide the others from the supervisor.
"""

from __future__ import annotations

import contextvars
import difflib
import importlib.metadata
import inspect
import logging
import os
import threading
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import UsageError, describe, passes_through, text_of
from .hookspecs import (  # noqa: F401  (re-exported: the public plugin API lives here too)
    OUTCOMES,
    Cancelled,
    CancelToken,
    ChildInfo,
    ExitStatus,
    Options,
    Outcome,
    ProgressCallback,
    Prover,
    ProverSpec,
    RequestInfo,
    hookimpl,
    prover_mismatch,
)

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT
TRACE_ENV = "DAMOCLES_EXT_TRACE_HOOKS"


class PluginError(UsageError):
    """A prover or plugin cannot be used as configured (exit code 2: fix the config or install)."""


@dataclass(frozen=True, slots=True)
class PluginLoadError:
    """A plugin that could not be loaded: its entry-point name, where it came from, and why."""

    name: str
    origin: str
    error: str


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One row of `damocles-ext plugins`."""

    name: str
    origin: str
    provers: tuple[ProverSpec, ...] = ()
    error: str | None = None
    #: The other hooks it implements (observers such as dext_child_exited), sorted.
    hooks: tuple[str, ...] = ()


@dataclass(slots=True)
class _Catalog:
    provers: dict[str, ProverSpec] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # prover name -> plugin name
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # prover -> other plugins
    by_plugin: dict[str, list[ProverSpec]] = field(default_factory=dict)


class DextPluginManager(pluggy.PluginManager):
    """A pluggy PluginManager that also remembers where each plugin came from and what failed."""

    def __init__(self) -> None:
        #: Counts registrations, unregistrations and hookspecs added: what is known of the
        #: hooks' implementations (the supervisor's observers) holds while it is unchanged.
        self.generation = 0
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.load_errors: list[PluginLoadError] = []
        self.origins: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self._catalog: _Catalog | None = None

    def add_hookspecs(self, module_or_class: types.ModuleType | type) -> None:
        self.generation += 1
        super().add_hookspecs(module_or_class)

    def register(self, plugin: object, name: str | None = None) -> str | None:
        self._catalog = None
        self.generation += 1
        return super().register(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> object:
        self._catalog = None
        self.generation += 1
        return super().unregister(plugin, name)


def _origin_of(plugin: object, dist: str | None, value: str) -> str:
    """Where `plugin` came from: its distribution ("name version", if one), its entry point
    (`value`) and its module's file."""
    parts = []
    if dist is not None:
        parts.append(dist)
    parts.append(f"entry point {value!r}" if value else "registered directly")
    module = plugin if getattr(plugin, "__file__", None) else inspect.getmodule(plugin)
    if module_file := getattr(module, "__file__", None):
        parts.append(module_file)
    return ", ".join(parts)


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hook implementations of `plugin` that match no hookspec (typically a misspelling)."""
    problems = []
    known = sorted(
        n for n in dir(pm.hook) if n.startswith("dext_") and getattr(pm.hook, n).has_spec()
    )
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        if all(impl.optionalhook for impl in caller.get_hookimpls() if impl.plugin is plugin):
            continue
        close = difflib.get_close_matches(caller.name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"implements unknown hook {caller.name!r}{hint}")
    return problems


def register_plugin(
    pm: DextPluginManager,
    plugin: object,
    name: str,
    *,
    origin: str | None = None,
    version: str | None = None,
) -> bool:
    """Register one plugin object; on failure record a PluginLoadError and return False."""
    origin = origin or _origin_of(plugin, None, "")
    try:
        pm.register(plugin, name=name)
    except Exception as exc:  # noqa: BLE001 - pluggy raises ValueError / PluginValidationError
        pm.load_errors.append(PluginLoadError(name, origin, describe(exc)))
        return False
    if problems := _unknown_hooks(pm, plugin):
        pm.unregister(plugin)
        pm.load_errors.append(PluginLoadError(name, origin, "; ".join(problems)))
        return False
    pm.origins[name] = origin
    if version:
        pm.versions[name] = version
    return True


def _entry_points(
    pm: DextPluginManager, group: str
) -> Iterable[tuple[importlib.metadata.EntryPoint, str, str | None]]:
    """Each entry point of `group`, with the name and the version of its distribution (walked,
    not entry_points(), to know it; sys.path order decides between two copies). Its metadata
    is read once, and only if it has such an entry point: each read of `dist.metadata` (and of
    `dist.version`) parses the file again, a dozen parses a tenth of a prover child's start."""
    for dist in importlib.metadata.distributions():
        try:
            entry_points = list(dist.entry_points)
        except Exception as exc:  # noqa: BLE001 - a hand-edited or corrupt entry_points.txt
            _unreadable_entry_points(pm, dist, group, exc)
            continue
        meta = None
        for ep in entry_points:
            if ep.group == group:
                if meta is None:
                    meta = dist.metadata
                yield ep, meta["Name"] or "?", meta["Version"]


def _unreadable_entry_points(
    pm: DextPluginManager, dist: importlib.metadata.Distribution, group: str, exc: Exception
) -> None:
    """A distribution whose entry_points.txt importlib cannot parse (a line without `=`):
    recorded when it names our group, skipped otherwise (another program's problem)."""
    try:
        text = dist.read_text("entry_points.txt") or ""
    except Exception:  # noqa: BLE001 - unreadable as well: nothing to tell about it
        text = ""
    name = dist.metadata["Name"] or "?"
    if f"[{group}]" not in text:
        log.debug("distribution %s: entry_points.txt cannot be read: %s", name, describe(exc))
        return
    error = (
        f"its entry_points.txt cannot be read ({describe(exc)}): each line under [{group}] is"
        " NAME = module or NAME = module:object; reinstall the distribution"
    )
    log.warning("plugin distribution %r failed to load: %s", name, error)
    pm.load_errors.append(PluginLoadError(name, f"{name} {dist.version}", error))


def load_entry_points(pm: DextPluginManager, group: str = ENTRY_POINT_GROUP) -> int:
    """Load every plugin of the entry-point group; failures are recorded, not raised."""
    count = 0
    owners: dict[str, str] = {}  # entry point name -> the distribution that had it first
    for ep, name, version in _entry_points(pm, group):
        owner = owners.setdefault(ep.name, name)
        if owner != name and not pm.is_blocked(ep.name):
            # Not a shadowed copy: it was dropped unsaid (which one loads follows sys.path).
            error = (
                f"not loaded: distribution {owner!r} has a plugin of that name (the one tried);"
                " two distributions' plugins cannot share a name: rename one's entry point"
            )
            said = "was"
        elif pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue  # (a shadowed copy)
        elif any(e.name == ep.name for e in pm.load_errors):
            continue  # (a copy of a plugin that already failed)
        else:
            try:
                plugin = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - recorded, not fatal
                error, said = describe(exc), "failed to load:"
            else:
                origin = _origin_of(plugin, f"{name} {version}", ep.value)
                if register_plugin(pm, plugin, ep.name, origin=origin, version=version):
                    count += 1
                continue
        origin = f"{name} {version}, entry point {ep.value!r}"
        log.warning("plugin %r (%s) %s %s", ep.name, origin, said, error)
        pm.load_errors.append(PluginLoadError(ep.name, origin, error))
    return count


def get_plugin_manager(*, entry_points: bool = True) -> DextPluginManager:
    """A plugin manager with the hookspecs added and (by default) every installed plugin loaded.

    With DAMOCLES_EXT_TRACE_HOOKS=1 in the environment every hook call is logged.
    """
    pm = DextPluginManager()
    if os.environ.get(TRACE_ENV, "").strip() not in ("", "0"):
        trace_log = logging.getLogger("damocles_ext.hooks")
        pm.trace.root.setwriter(lambda text: trace_log.info("%s", text.rstrip()))
        pm.enable_tracing()
    if entry_points:
        load_entry_points(pm)
    return pm


# ---------------------------------------------------------------------------------------------
# Provers


def _catalog(pm: DextPluginManager) -> _Catalog:
    if pm._catalog is not None:
        return pm._catalog
    cat = _Catalog()
    for impl in pm.hook.dext_provers.get_hookimpls():  # registration order: first one wins
        plugin_name = impl.plugin_name
        try:
            # Whatever the plugin returned: checked item by item below.
            returned: Any = impl.function()
            specs = list(returned or [])
            bad = [s for s in specs if not isinstance(s, ProverSpec)]
            if bad:
                raise TypeError(f"dext_provers returned {type(bad[0]).__name__}, not ProverSpec")
            for spec in specs:  # listings and errors join them: one of another type broke those
                odd = [v for v in (spec.name, *spec.stages) if not isinstance(v, str)]
                if odd or not isinstance(spec.description, str):
                    raise TypeError(
                        f"ProverSpec {text_of(spec.name)!r}: its name, stages and description"
                        f" must be str (a stage such as 'window_post'), got"
                        f" {type(odd[0] if odd else spec.description).__name__}"
                    )
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a third-party hook must not stop the others
            error = f"dext_provers raised {describe(exc)}"
            log.warning("plugin %r: %s", plugin_name, error)
            origin = pm.origins.get(plugin_name, _origin_of(impl.plugin, None, ""))
            pm.load_errors.append(PluginLoadError(plugin_name, origin, error))
            continue
        cat.by_plugin[plugin_name] = specs
        for spec in specs:
            if spec.name in cat.provers:
                cat.duplicates.setdefault(spec.name, []).append(plugin_name)
                continue
            cat.provers[spec.name] = spec
            cat.owner[spec.name] = plugin_name
    pm._catalog = cat
    return cat


def available_provers(pm: DextPluginManager) -> dict[str, ProverSpec]:
    """Every prover offered by the loaded plugins, by name."""
    return dict(_catalog(pm).provers)


def prover_plugin(pm: DextPluginManager, prover_name: str) -> str | None:
    """The name of the plugin that offers `prover_name`."""
    return _catalog(pm).owner.get(prover_name)


def _failed_plugins_text(pm: DextPluginManager) -> str:
    if not pm.load_errors:
        return ""
    failed = "; ".join(f"{e.name} ({e.error})" for e in pm.load_errors)
    return f"; plugins that failed to load: {failed}"


def find_prover(pm: DextPluginManager, name: str, stage: str | None = None) -> ProverSpec:
    """The ProverSpec called `name` (serving `stage` if given), or a PluginError saying why not."""
    cat = _catalog(pm)
    spec = cat.provers.get(name)
    if spec is None:
        listing = ", ".join(
            f"{n} ({cat.owner[n]}: {'/'.join(s.stages)})" for n, s in sorted(cat.provers.items())
        )
        close = difflib.get_close_matches(name, list(cat.provers), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PluginError(
            f"unknown prover {name!r}{hint}; available provers: {listing or 'none'}"
            f"{_failed_plugins_text(pm)}. Install the plugin that provides it or fix `Plugin` "
            "in the config; `damocles-ext plugins` lists what is installed"
        )
    if name in cat.duplicates:
        others = ", ".join([cat.owner[name], *cat.duplicates[name]])
        raise PluginError(
            f"prover {name!r} is offered by several plugins ({others}); "
            "uninstall all but one of them"
        )
    if stage is not None and stage not in spec.stages:
        raise PluginError(
            f"prover {name!r} (plugin {cat.owner[name]}) serves {', '.join(spec.stages)}, "
            f"not {stage}; choose a prover for {stage}"
        )
    return spec


def validate_prover_options(
    pm: DextPluginManager, spec: ProverSpec, options: Options, stage: str | None = None
) -> list[str]:
    """Problems with `options` for `spec` (serving `stage`, when known): its own
    validate_options plus every plugin's hook. A validate_options with a `stage` parameter is
    given the stage too."""
    problems: list[str] = []
    try:
        problems.extend(_as_list(_call_validate(spec.validate_options, options, stage)))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported as a problem with the options
        problems.append(f"validate_options raised {describe(exc)}")
    for impl in pm.hook.dext_validate_plugin_options.get_hookimpls():
        try:
            result: Any = impl.function(  # a plugin's answer, not trusted to be a list
                **_select_args(impl, {"prover_name": spec.name, "options": options})
            )
            problems.extend(_as_list(result))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported as a problem with the options
            problems.append(
                f"plugin {impl.plugin_name!r} dext_validate_plugin_options raised {describe(exc)}"
            )
    return [text_of(p) for p in problems]


def _call_validate(validate: Any, options: Options, stage: str | None) -> Any:
    try:
        takes_stage = "stage" in inspect.signature(validate).parameters
    except (TypeError, ValueError):  # a builtin or a C function: no signature to read
        takes_stage = False
    return validate(options, stage=stage) if takes_stage else validate(options)


def _as_list(problems: Any) -> list[Any]:
    """A validator's answer as a list: one string is one problem, not one per character."""
    if isinstance(problems, str):
        return [problems] if problems else []
    return list(problems or [])


def prover_problems(
    pm: DextPluginManager, name: str, options: Options, stage: str | None = None
) -> list[str]:
    """Why `name` with `options` could not serve `stage`, without building it (config checks)."""
    try:
        spec = find_prover(pm, name, stage)
    except PluginError as exc:
        return [str(exc)]
    return [f"prover {name!r}: {p}" for p in validate_prover_options(pm, spec, options, stage)]


def load_prover(
    pm: DextPluginManager, name: str, options: Options, stage: str | None = None
) -> Prover:
    """Find, validate and build a prover; every failure is a PluginError naming the prover."""
    spec = find_prover(pm, name, stage)
    problems = validate_prover_options(pm, spec, options, stage)
    if problems:
        raise PluginError(f"invalid options for prover {name!r}: " + "; ".join(problems))
    try:
        prover = spec.factory(options)
    except PluginError:
        raise
    except KeyboardInterrupt:
        raise  # Ctrl-C (a signal) while the prover loads: the child stops, as ever
    except BaseException as exc:  # a sys.exit() or a BaseException of the plugin's own too
        raise PluginError(
            f"prover {name!r} (plugin {prover_plugin(pm, name)}) failed to start: {describe(exc)}"
        ) from exc
    mismatch = prover_mismatch(prover)
    if mismatch is not None:  # it would fail every request, naming neither prover nor plugin
        raise PluginError(f"prover {name!r} (plugin {prover_plugin(pm, name)}): {mismatch}")
    return prover


# The hooks that make a prover plugin; any other hook a plugin implements observes.
_PROVER_HOOKS = frozenset({"dext_provers", "dext_validate_plugin_options"})


def list_plugins(pm: DextPluginManager) -> list[PluginInfo]:
    """Every plugin (loaded or failed) with its provers and origin, for `damocles-ext plugins`."""
    cat = _catalog(pm)
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None or name is None:
            continue
        rows.append(
            PluginInfo(
                name=name,
                origin=pm.origins.get(name, _origin_of(plugin, None, "")),
                provers=tuple(cat.by_plugin.get(name, ())),
                error=next((e.error for e in pm.load_errors if e.name == name), None),
                hooks=tuple(
                    sorted(
                        caller.name
                        for caller in pm.get_hookcallers(plugin) or ()
                        if caller.name not in _PROVER_HOOKS
                    )
                ),
            )
        )
    loaded = {r.name for r in rows}
    rows.extend(
        PluginInfo(name=e.name, origin=e.origin, error=e.error)
        for e in pm.load_errors
        if e.name not in loaded
    )
    return sorted(rows, key=lambda r: r.name)


# ---------------------------------------------------------------------------------------------
# Observers


def _select_args(impl: pluggy.HookImpl, kwargs: dict[str, object]) -> dict[str, object]:
    # pluggy passes only the arguments an implementation names; do the same.
    return {name: kwargs[name] for name in impl.argnames if name in kwargs}


class ObserverCall:
    """One observer hook call in progress, as its driver (the supervisor's observer task) sees
    it: which plugin's code runs now (named when the call is cut off), whether it got a thread.

    The plain implementations of a hook run in a worker thread (its code may block: an HTTP
    alert), so these fields are written by that thread and read by the trio side; each is one
    attribute store, and a stale read only names the plugin that ran a moment earlier."""

    __slots__ = ("abandoned", "hook", "no_thread", "pending", "running", "started", "thread_error")

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.running: str | None = None  # the plugin whose observer runs now
        self.started = False  # the synchronous hook call began (it had its thread)
        self.no_thread = False  # not called: every observer thread was held, or none started
        self.thread_error: str | None = None  # not called: why no thread could be started
        self.abandoned = False  # cut off: what it still returns is discarded, not awaited
        # What its implementations returned that is still to be awaited, in the order they ran:
        # taken from here rather than from the hook's results, which a wrapper may replace or
        # never return.
        self.pending: list[_Pending] = []

    def abandon(self) -> None:
        """Cut off: close what was still to be awaited (and what its thread adds later)."""
        self.abandoned = True
        for item in list(self.pending):
            item.discard()


class _Pending:
    """What an observer returned that is still to be done: an awaitable, or a callable that
    returns one (datasette's await_me_maybe). The hook call itself is synchronous (pluggy), so
    these are awaited after it, in the order the implementations ran."""

    __slots__ = ("hook", "plugin", "result")

    def __init__(self, hook: str, plugin: str, result: Any) -> None:
        self.hook, self.plugin, self.result = hook, plugin, result

    async def finish(self) -> None:
        try:
            result = self.result
            if callable(result) and not inspect.isawaitable(result):
                result = result()
            if inspect.isawaitable(result):
                await result
        except BaseException as exc:
            if passes_through(exc):
                raise
            log.exception("observer %s of plugin %r raised; ignored", self.hook, self.plugin)

    def discard(self) -> None:
        # The hook call failed or was cut off before these could be awaited: close the
        # coroutines so that Python does not warn that they were never awaited.
        close = getattr(self.result, "close", None)
        if inspect.iscoroutine(self.result) and close is not None:
            close()


# The observer hook call in progress (in the thread or task that makes the synchronous call).
_current_call: contextvars.ContextVar[ObserverCall | None] = contextvars.ContextVar(
    "_current_call", default=None
)


def _ends_the_call(exc: BaseException) -> bool:
    """passes_through, but for a KeyboardInterrupt raised off the main thread (a plain observer
    runs in a worker thread): Python raises a SIGINT's in the main thread only, so that one is
    the plugin's own, reported and survived as any other."""
    if (
        isinstance(exc, KeyboardInterrupt)
        and threading.current_thread() is not threading.main_thread()
    ):
        return False
    return passes_through(exc)


def _guarded(hook_name: str, plugin_name: str, function: Any) -> Any:
    def observer(*args: Any, **kwargs: Any) -> Any:
        call = _current_call.get()
        if call is not None:
            call.running = plugin_name
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:
            if _ends_the_call(exc):
                raise
            log.exception("observer %s of plugin %r raised; ignored", hook_name, plugin_name)
            return None
        finally:
            if call is not None:
                call.running = None
        if result is not None and (callable(result) or inspect.isawaitable(result)):
            pending = _Pending(hook_name, plugin_name, result)
            if call is not None:
                call.pending.append(pending)
            return pending
        return result

    observer._dext_observer = True  # type: ignore[attr-defined]
    # An `async def` observer only makes its coroutine when called: no code of its runs in the
    # synchronous hook call, so that call needs no thread for it.
    observer._dext_async = inspect.iscoroutinefunction(function)  # type: ignore[attr-defined]
    return observer


def _guard_implementations(caller: pluggy.HookCaller) -> bool:
    """Make each plain implementation of an observer hook log its exception and return, so
    that the hook call goes on to the others (pluggy would stop at the first that raises).
    Returns whether any implementation runs code of its own in the synchronous hook call (a
    plain function, a wrapper): then that call is made in a worker thread.

    Done on each call, not at registration: a plugin may be registered at any time, on a
    plugin manager that is not ours. Wrappers are left as they are: they wrap the others."""
    blocking = False
    for impl in caller.get_hookimpls():
        if impl.wrapper or impl.hookwrapper:
            blocking = True
            continue
        if not getattr(impl.function, "_dext_observer", False):
            # pluggy reads the argument names once, from the original function, and passes the
            # arguments positionally, so the guard takes whatever it is given.
            impl.function = _guarded(caller.name, impl.plugin_name, impl.function)  # type: ignore[misc]
        blocking = blocking or not getattr(impl.function, "_dext_async", False)
    return blocking


def _raising_wrapper(caller: pluggy.HookCaller, exc: BaseException) -> str:
    # Which wrapper's code the exception came out of, to name its plugin in the log.
    from .plugin_blame import raised_by

    return raised_by(caller, exc, wrappers_only=True) or "?"


def _call_hook(caller: pluggy.HookCaller, kwargs: dict[str, Any], call: ObserverCall) -> bool:
    """The synchronous hook call (on the trio thread or in a worker thread); False if a
    wrapper raised, which ends the event's delivery."""
    call.started = True
    token = _current_call.set(call)
    try:
        caller(**kwargs)
    except BaseException as exc:
        if _ends_the_call(exc):
            raise
        plugin = _raising_wrapper(caller, exc)
        log.exception(
            "observer %s: a wrapper of plugin %r raised; the observers it wrapped that had not"
            " run yet, or whose work was still to be awaited, miss this event",
            caller.name,
            plugin,
        )
        call.abandon()
        return False
    finally:
        _current_call.reset(token)
        call.running = None
    if call.abandoned:  # cut off while this thread ran: nobody will await these
        call.abandon()
    return True


async def call_observers(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call an observer hook through the plugin manager's hook caller, then await what its
    implementations returned that is awaitable; never raise.

    Going through `pm.hook.<name>` keeps pluggy's rules: call order with `tryfirst`/`trylast`,
    wrappers (`@hookimpl(wrapper=True)` or `hookwrapper=True`), hook-call tracing. An exception
    from one implementation is logged with the plugin's name and the others still run; one from
    a wrapper ends this event's delivery (what had not run, or was still to be awaited), logged
    likewise. Cancellation of the caller (a BaseException under trio) is not swallowed.

    When a plain function (or a wrapper) implements the hook, the synchronous hook call is made
    in a worker thread (trio's), so that its code never holds the trio loop; cancelling the
    caller abandons that thread, whose work is then ignored. Only `async def` implementations:
    the call is made here, as it only makes their coroutines.
    """
    call = ObserverCall(hook_name)
    await deliver_observers(pm, hook_name, kwargs, call)
    if call.thread_error is not None:
        log.warning("observer hook %s: not called: %s", hook_name, call.thread_error)


async def deliver_observers(
    pm: pluggy.PluginManager,
    hook_name: str,
    kwargs: dict[str, Any],
    call: ObserverCall,
    limiter: trio.CapacityLimiter | None = None,
) -> None:
    """`call_observers`, with `call` to follow it by and `limiter` bounding the worker threads
    (None: trio's default): when the limiter has no thread free, the hook is not called and
    `call.no_thread` says so (a stuck observer holds its thread until it returns)."""
    # here: the child runtime imports this module, and has no use for trio
    from .threads import NoThreadError, run_in_thread

    caller = getattr(pm.hook, hook_name, None)
    if caller is None:
        log.error("call_observers: no hook named %r", hook_name)
        return
    blocking = _guard_implementations(caller)
    try:
        if not blocking:
            called = _call_hook(caller, kwargs, call)
        elif limiter is not None and limiter.available_tokens < 1:
            call.no_thread = True
            return
        else:
            try:
                called = await run_in_thread(
                    _call_hook, caller, kwargs, call, abandon_on_cancel=True, limiter=limiter
                )
            except NoThreadError as exc:  # at the limit of tasks: this event is not delivered
                call.no_thread, call.thread_error = True, str(exc)
                return
        if not called:
            return
        for item in call.pending:
            call.running = item.plugin
            await item.finish()
            call.running = None
    except BaseException:
        call.abandon()
        raise
