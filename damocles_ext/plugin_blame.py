"""Which plugin's implementation of a hook raised, or returned a value, so that an error about
a hook call can name that plugin rather than say "a plugin's".

pluggy returns a hook call's result without saying whose it is: a `firstresult` hook's value,
or the list of the values that were not None (its implementations' that returned None left
out, so a value's place does not tell whose it is). `call_hook` makes the call through the hook
caller as `pm.hook.<name>(...)` does (order, wrappers, tracing) and keeps who returned what;
`raised_by` reads whose code an exception came out of in its traceback.
"""

from __future__ import annotations

import contextvars
from typing import Any

import pluggy

# The (plugin name, value) of each implementation that returned a value in the `call_hook` in
# progress (in this thread or task); None outside of one.
_returned: contextvars.ContextVar[list[tuple[str, Any]] | None] = contextvars.ContextVar(
    "_returned", default=None
)


def _recording(plugin_name: str, function: Any) -> Any:
    def implementation(*args: Any) -> Any:
        result = function(*args)
        seen = _returned.get()
        if seen is not None and result is not None:
            seen.append((plugin_name, result))
        return result

    implementation._dext_recorded = function  # type: ignore[attr-defined]
    return implementation


def call_hook(caller: pluggy.HookCaller, **kwargs: Any) -> tuple[Any, list[tuple[str, Any]]]:
    """`caller(**kwargs)`, and the (plugin name, value) of each implementation that returned
    a value (not None), in the order they ran: what `returned_by` looks a value up in.

    Each plain implementation is wrapped once to keep what it returns (pluggy reads the argument
    names from the original function once, and passes them positionally); wrappers are left as
    they are."""
    for impl in caller.get_hookimpls():
        if not (impl.wrapper or impl.hookwrapper or hasattr(impl.function, "_dext_recorded")):
            impl.function = _recording(impl.plugin_name, impl.function)  # type: ignore[misc]
    seen: list[tuple[str, Any]] = []
    token = _returned.set(seen)
    try:
        return caller(**kwargs), seen
    finally:
        _returned.reset(token)


def returned_by(seen: list[tuple[str, Any]], value: object) -> str | None:
    """The plugin whose implementation returned `value` (itself, not an equal one), or None
    (a wrapper replaced the result)."""
    return next((name for name, returned in seen if returned is value), None)


def raised_by(
    caller: pluggy.HookCaller, exc: BaseException, *, wrappers_only: bool = False
) -> str | None:
    """The plugin whose implementation's code `exc` came out of, or None: the innermost such
    frame of its traceback (a wrapper it went through on its way out is further out)."""
    codes = {
        getattr(getattr(impl.function, "_dext_recorded", impl.function), "__code__", None): (
            impl.plugin_name
        )
        for impl in caller.get_hookimpls()
        if impl.wrapper or impl.hookwrapper or not wrappers_only
    }
    found = None
    tb = exc.__traceback__
    while tb is not None:
        found = codes.get(tb.tb_frame.f_code, found)
        tb = tb.tb_next
    return found


def whose(hook: str, plugin: str | None) -> str:
    """'plugin 'NAME': its HOOK', or 'a plugin's HOOK' when its plugin is not known."""
    return f"a plugin's {hook}" if plugin is None else f"plugin {plugin!r}: its {hook}"
