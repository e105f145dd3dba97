"""The modules compiled with mypyc, and when their sources are imported instead.

The request book and the scheduler (`COMPILED`: sans-IO, strictly typed, on every request's
path) are compiled to C extensions by mypyc when the package is built (setup.py): the same
source, about twice as fast per request (bench/bench_supervisor.py). Python imports an extension
before a source of the same name, so a source edited after the build would run as its stale
extension; `use_sources_if_stale`, called as the package is imported, has the sources of all of
them imported instead when one source is newer than its extension, when the build is incomplete,
or when DAMOCLES_EXT_PURE is set (to debug or profile them line by line). All or none: compiled
modules call each other natively, and each build of them goes together.

This module imports only the standard library: setup.py reads `COMPILED` from it before the
package's dependencies are installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

#: Compiled by setup.py, as one group: their code is in one shared library (`SHARED`), which
#: each module's own extension (a small shim) loads.
COMPILED = (
    "damocles_ext.lifecycle.book",
    "damocles_ext.lifecycle.rules",
    "damocles_ext.scheduling.breaker",
    "damocles_ext.scheduling.children",
    "damocles_ext.scheduling.policy",
    "damocles_ext.scheduling.queues",
)
SHARED = "damocles_ext.compiled__mypyc"
#: Set to anything but "" or "0": the sources run (at build time: nothing is compiled).
PURE_ENV = "DAMOCLES_EXT_PURE"
#: A source this much newer than its extension is one edited since the build (files written by
#: one build or one unpacked wheel are seconds apart at most).
EDITED_AFTER = 2.0

_PACKAGE = Path(__file__).resolve().parent


def source_path(name: str, package: Path = _PACKAGE) -> Path:
    """The source file of module `name` (one of COMPILED) under the package directory."""
    return package.joinpath(*name.split(".")[1:]).with_suffix(".py")


def extension_path(name: str, package: Path = _PACKAGE) -> Path | None:
    """The compiled extension of module `name` (or SHARED) beside its source, None if none
    was built."""
    stem = source_path(name, package).with_suffix("")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        ext = stem.with_name(stem.name + suffix)
        if ext.exists():
            return ext
    return None


def why_sources(package: Path = _PACKAGE, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the sources of COMPILED are to run though extensions were built; None: the
    extensions run (or none was built, and the sources run as any other module's)."""
    if environ.get(PURE_ENV, "") not in ("", "0"):
        return f"{PURE_ENV} is set"
    built = {name: extension_path(name, package) for name in (*COMPILED, SHARED)}
    if not any(built.values()):
        return None
    if (shared := built.pop(SHARED)) is None:
        return "the build is incomplete: the compiled modules' shared library is missing"
    for name, ext in built.items():
        src = source_path(name, package)
        if ext is None:
            return f"the build is incomplete: {src.name} has no compiled extension"
        # A build that compiled the code again may leave a module's shim as it was.
        built_at = max(ext.stat().st_mtime, shared.stat().st_mtime)
        if src.stat().st_mtime > built_at + EDITED_AFTER:
            return f"{src} was edited after it was compiled"
    return None


class _Sources(importlib.abc.MetaPathFinder):
    """Finds the sources of COMPILED ahead of their extensions."""

    def __init__(self, package: Path) -> None:
        self.package = package

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname, self.package))


#: Why the sources run rather than the extensions (None: the extensions, if built).
sources_because: str | None = None


def use_sources_if_stale() -> None:
    """Called once as the package is imported, before any of COMPILED is."""
    global sources_because
    sources_because = why_sources()
    if sources_because is not None and not any(isinstance(f, _Sources) for f in sys.meta_path):
        sys.meta_path.insert(0, _Sources(_PACKAGE))


def how_they_run() -> str:
    """ "compiled", "sources (why)", or "not compiled" (built without them), for the record."""
    if sources_because is not None:
        return f"sources ({sources_because})"
    return "compiled" if extension_path(COMPILED[0]) else "not compiled"
