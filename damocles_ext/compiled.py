"""The modules compiled with mypyc, and when their sources are imported instead.

The request book and the scheduler (`COMPILED`: sans-IO, strictly typed, on every request's
path) are compiled to C extensions by mypyc when the package is built (setup.py): the same
source, taking about 40% less CPU (bench/bench_supervisor_ab.py). Python imports an extension
before a source of the same name, so a source changed after the build would run as its stale
extension. The build records what it compiled (`RECORD`: each source the compiled modules read,
theirs and those of the modules they import from the package, with its SHA-256), and
`use_sources_if_stale`, called as the package is imported, has the sources of all of them
imported instead when one of those files changed since, when the build is incomplete or left no
record, or when DAMOCLES_EXT_PURE is set (to debug or profile them line by line). All or none:
compiled modules call each other natively, and each build of them goes together.

This module imports only the standard library: setup.py runs it before the package's
dependencies are installed.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
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
#: Written by the build beside this module once it compiled COMPILED (not in git).
RECORD = "compiled_sources.json"
#: Set to anything but "" or "0": the sources run (at build time: nothing is compiled).
PURE_ENV = "DAMOCLES_EXT_PURE"

_PACKAGE = Path(__file__).resolve().parent


def source_path(name: str, package: Path = _PACKAGE) -> Path:
    """The source file of module `name` (of this package) under the package directory."""
    path = package.joinpath(*name.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def extension_path(name: str, package: Path = _PACKAGE) -> Path | None:
    """The compiled extension of module `name` (or SHARED) beside its source, None if none
    was built."""
    stem = package.joinpath(*name.split(".")[1:])
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        ext = stem.with_name(stem.name + suffix)
        if ext.exists():
            return ext
    return None


def read_sources(package: Path = _PACKAGE) -> list[Path]:
    """The sources mypyc reads to compile COMPILED: theirs, and those of every module of the
    package they import (at any depth, in any function or TYPE_CHECKING block), with the
    packages' __init__ files on the way; not this module (the package's __init__ imports it,
    the compiled modules nothing of it)."""
    root = COMPILED[0].split(".")[0]  # (the package's import name, wherever it lies)
    seen: set[str] = {f"{root}.compiled"}
    todo = list(COMPILED)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages on the way, and the module itself
            here = ".".join(parts[:i])
            if here in seen or not source_path(here, package).exists():
                continue
            seen.add(here)
            path = source_path(here, package)
            is_package = path.name == "__init__.py"
            for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
                if isinstance(node, ast.ImportFrom):
                    base = here.split(".") if is_package else here.split(".")[:-1]
                    if node.level:
                        base = base[: len(base) - node.level + 1]
                        module = ".".join([*base, *([node.module] if node.module else [])])
                    else:
                        module = node.module or ""
                    if module == root or module.startswith(root + "."):
                        todo.append(module)
                        todo.extend(f"{module}.{alias.name}" for alias in node.names)
                elif isinstance(node, ast.Import):
                    todo.extend(a.name for a in node.names if a.name.startswith(root + "."))
    seen.discard(f"{root}.compiled")
    return sorted(source_path(name, package) for name in seen)


def fingerprint(package: Path = _PACKAGE) -> dict[str, list[int | str]]:
    """Each of `read_sources`, by its path in the package: [size, mtime_ns, sha256]."""
    out: dict[str, list[int | str]] = {}
    for path in read_sources(package):
        data, st = path.read_bytes(), path.stat()
        out[path.relative_to(package).as_posix()] = [
            st.st_size,
            st.st_mtime_ns,
            hashlib.sha256(data).hexdigest(),
        ]
    return out


def write_record(package: Path, sources: dict[str, list[int | str]] | None) -> None:
    """What the build compiled (`fingerprint` taken before it read them), once it is built;
    None: it compiled none of them (PURE_ENV at build time)."""
    (package / RECORD).write_text(json.dumps({"sources": sources}, indent=1, sort_keys=True))


def built_pure(package: Path = _PACKAGE) -> bool:
    """The last build compiled none of COMPILED, on purpose (PURE_ENV at build time)."""
    try:
        return json.loads((package / RECORD).read_text())["sources"] is None
    except (OSError, ValueError, KeyError, TypeError):
        return False


def why_sources(package: Path = _PACKAGE, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the sources of COMPILED are to run though extensions were built; None: the
    extensions run (or none was built, and the sources run as any other module's)."""
    if environ.get(PURE_ENV, "") not in ("", "0"):
        return f"{PURE_ENV} is set"
    built = {name: extension_path(name, package) for name in (*COMPILED, SHARED)}
    if not any(built.values()):
        return None
    missing = [name for name, ext in built.items() if ext is None]
    if missing:
        return f"the build is incomplete: {missing[0]} has no compiled extension"
    try:
        sources = json.loads((package / RECORD).read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"the build left no record of what it compiled ({package / RECORD})"
    if sources is None:
        return f"the last build compiled none of them ({PURE_ENV} was set)"
    for rel, (size, mtime_ns, digest) in sorted(sources.items()):
        path = package / rel
        try:
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                continue  # as it was compiled (or at least, as it was then, to the nanosecond)
            if hashlib.sha256(path.read_bytes()).hexdigest() == digest:
                continue  # touched, or checked out again, the same
        except OSError:
            return f"{path} is gone since it was compiled"
        return f"{path} changed since it was compiled"
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
