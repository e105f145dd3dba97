"""The child process around its runtime (`child.main`): its stdio, the version its Hello
reports, the failed start a plugin's own KeyboardInterrupt makes, and its exit past threads a
prover left running."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import TYPE_CHECKING

from .child import utf8
from .errors import describe

if TYPE_CHECKING:
    from .hookspecs import Prover
    from .plugins import DextPluginManager

log = logging.getLogger("damocles_ext.child")


def protect_stdio() -> tuple[int, int]:
    """Move the protocol's stdin and stdout to private fds; point fd 0 at /dev/null and fd 1 (and
    sys.stdout) at stderr.

    Stray prints, from Python or from C code in a prover, then land in the log instead of
    corrupting the frames, and nothing a prover runs (a vendor tool it starts without
    stdin=DEVNULL, an `input()`) reads requests meant for the runtime. The private fds are not
    inherited (os.dup's copies are non-inheritable). Returns (the fd to read the protocol from,
    the fd to write it to).
    """
    from .frontends.serve import take_protocol_fds  # (serve's process does the same first)

    sys.stdout.flush()
    return take_protocol_fds()


def prover_version(pm: DextPluginManager, prover: Prover, prover_name: str) -> str:
    """The version a Hello reports: the prover's own, else its plugin distribution's, else ours."""
    try:  # a prover's attribute (a property may read a file): informative only, never fatal
        version = getattr(prover, "version", None)
        if version:  # (a string from a file name may hold lone surrogates: escaped)
            return utf8(str(version))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported; the plugin's version is told
        log.warning(
            "prover %s: its version cannot be read (%s); the Hello gives its plugin's",
            prover_name,
            describe(exc),
        )
    from .plugins import prover_plugin

    plugin = prover_plugin(pm, prover_name)
    if plugin and plugin in pm.versions:
        return pm.versions[plugin]
    from . import __version__

    return __version__


def loading_interrupt(pm: DextPluginManager | None, prover: str, exc: BaseException) -> Exception:
    """The PluginError for a KeyboardInterrupt a plugin raised itself (no SIGINT came) while the
    child loaded its prover: a failed start naming the plugin, as for any other exception."""
    from .plugins import PluginError, prover_plugin

    why = f"{describe(exc)} (raised by the plugin itself: no SIGINT came)"
    if pm is not None:  # the prover's factory raised it
        return PluginError(
            f"prover {prover!r} (plugin {prover_plugin(pm, prover)}) failed to start: {why}"
        )
    module = "?"  # a plugin's import raised it: the module importlib entered first
    tb = exc.__traceback__
    while tb is not None and module == "?":
        name = tb.tb_frame.f_globals.get("__name__")
        if isinstance(name, str) and name.partition(".")[0] not in ("damocles_ext", "importlib"):
            module = name
        tb = tb.tb_next
    return PluginError(
        f"prover {prover!r} failed to start: plugin module {module!r} raised {why} on import"
    )


#: How long idle executors' workers get to end, as Python's exit hook ends them (seconds).
EXECUTORS_EXIT = 1.0


def exit_past_lingering_threads(pm: DextPluginManager, prover: str, code: int) -> None:
    """Exit now, saying whose they are, if threads that are not daemons outlive the runtime (a
    prover's, or its library's): Python would join them at exit and hold the child until the
    supervisor's SIGTERM, which could only say that the child was still running."""
    from .plugins import prover_plugin

    pools = sys.modules.get("concurrent.futures.thread")
    if pools is not None:
        # Executors' workers are no daemons either (Python 3.9): the exit hook Python would
        # run wakes the idle ones and joins them; run early, for a second at most (work still
        # running in one counts as a lingering thread).
        hook = threading.Thread(target=pools._python_exit, name="executors-exit", daemon=True)
        hook.start()
        hook.join(EXECUTORS_EXIT)
    main_thread = threading.main_thread()
    names = [t.name for t in threading.enumerate() if t is not main_thread and not t.daemon]
    if not names:
        return
    one = len(names) == 1
    log.warning(
        "prover %s (plugin %s): %s %s, not %s, still %s after the child ended; exiting without"
        " waiting for %s (a prover's own threads are best started with daemon=True, or ended"
        " by its close())",
        prover,
        prover_plugin(pm, prover),
        "thread" if one else "threads",
        ", ".join(repr(n) for n in names),
        "a daemon" if one else "daemons",
        "runs" if one else "run",
        "it" if one else "them",
    )
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
