"""The modules compiled with mypyc, and when their sources are imported instead.

The request book and the scheduler (`COMPILED`: sans-IO, strictly typed, on every request's
path) are compiled to C extensions by mypyc when the package is built (setup.py): the same
source, taking about 40% less CPU (bench/bench_supervisor_ab.py). Python imports an extension
before a source of the same name, so a source changed after the build would run as its stale
extension. The build records what it compiled (`RECORD`: each source the compiled modules read,
theirs and those of the modules they import from the package, with its CRC-32), and
`use_sources_if_stale`, called as the package is imported, has the sources of all of them
imported instead when one of those files changed since, when the build is incomplete or left no
record, or when DAMOCLES_EXT_PURE is set (to debug or profile them line by line). All or none:
compiled modules call each other natively, and each build of them goes together.

This module imports only the standard library: setup.py runs it before the package's
dependencies are installed. Every process of the package imports it, children too: it imports
at the top only what the interpreter has loaded at its start (the record is plain text, and a
file is hashed only when its size or time moved).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import stat
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
#: Written by the build beside this module once it compiled COMPILED (not in git): its first
#: line says whether it compiled them (and how many files follow), each other line a file:
#: CRC-32, size, mtime_ns, path.
RECORD = "compiled_sources.txt"
_HEAD = ("damocles-ext compiled from", "damocles-ext compiled none")
#: Set to anything but "" or "0": the sources run (at build time: nothing is compiled).
PURE_ENV = "DAMOCLES_EXT_PURE"

_PACKAGE = Path(__file__).resolve().parent


def pure_asked(environ: Mapping[str, str] = os.environ) -> bool:
    """PURE_ENV is set (to anything but "" or "0")."""
    return environ.get(PURE_ENV, "") not in ("", "0")


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
    import ast  # (the build's, not every process's)

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


def _digest(path: Path) -> str:
    """What tells a file's content changed: its CRC-32 (a change is looked for, not a forgery;
    an installed wheel keeps no file times, so every process of it reads them all)."""
    import zlib  # (only for a file whose size or time moved)

    return f"{zlib.crc32(path.read_bytes()):08x}"


def fingerprint(package: Path = _PACKAGE) -> list[str]:
    """A line of RECORD for each of `read_sources`: its CRC-32, size, mtime_ns and path."""
    lines = []
    for path in read_sources(package):
        st = path.stat()
        rel = path.relative_to(package).as_posix()
        lines.append(f"{_digest(path)} {st.st_size} {st.st_mtime_ns} {rel}")
    return lines


def write_record(package: Path, sources: list[str] | None) -> None:
    """What the build compiled (`fingerprint` taken before it read them), once it is built;
    None: it compiled none of them (PURE_ENV at build time). Written whole or not at all."""
    head = f"{_HEAD[0]} {len(sources)}" if sources is not None else _HEAD[1]
    tmp = package / f".{RECORD}.tmp"
    tmp.write_text("\n".join([head, *(sources or ())]) + "\n")
    os.replace(tmp, package / RECORD)


def forget_record(package: Path) -> None:
    """A build begins: until it ends well, no record says what its extensions are."""
    (package / RECORD).unlink(missing_ok=True)


def _read_record(package: Path) -> list[str] | None:
    """RECORD's file lines; None if there is none or it is not one; [] for a build that
    compiled none of them."""
    try:
        head, *lines = (package / RECORD).read_text().splitlines()
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if head == _HEAD[1] and not lines:
        return []
    return lines if head == f"{_HEAD[0]} {len(lines)}" and lines else None


def built_pure(package: Path = _PACKAGE) -> bool:
    """The last build compiled none of COMPILED, on purpose (PURE_ENV at build time)."""
    return _read_record(package) == []


def why_sources(package: Path = _PACKAGE, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the sources of COMPILED are to run though extensions were built; None: the
    extensions run (or none was built, and the sources run as any other module's). Never
    raises: it runs as the package is imported, in every process."""
    if pure_asked(environ):
        return f"{PURE_ENV} is set"
    try:
        return _why_sources(package)
    except Exception as exc:  # noqa: BLE001 - the sources are safe; an import that fails is not
        return f"the compiled modules could not be checked ({type(exc).__name__}: {exc})"


def _why_sources(package: Path) -> str | None:
    built = {name: extension_path(name, package) for name in (*COMPILED, SHARED)}
    if not any(built.values()):
        return None
    missing = [name for name, ext in built.items() if ext is None]
    if missing:
        return f"the build is incomplete: {missing[0]} has no compiled extension"
    lines = _read_record(package)
    if lines is None:
        return f"the build left no record of what it compiled ({package / RECORD})"
    if not lines:
        return f"the last build compiled none of them ({PURE_ENV} was set)"
    for line in lines:
        digest, size, mtime_ns, rel = [*line.split(" ", 3), "", "", ""][:4]
        if not rel or rel.startswith("/") or ".." in rel.split("/") or "\0" in rel:
            # (never written so: a record damaged, or of another format)
            return f"the build left no record of what it compiled ({package / RECORD})"
        path = package / rel
        try:
            st = path.stat()
        except OSError:
            return f"{path} is gone since it was compiled"
        if (str(st.st_size), str(st.st_mtime_ns)) == (size, mtime_ns):
            continue  # as it was compiled (or at least, as it was then, to the nanosecond)
        if stat.S_ISREG(st.st_mode) and _digest(path) == digest:
            continue  # touched, or checked out again, the same
        return f"{path} changed since it was compiled"
    return None


class _Sources:
    """Finds the sources of COMPILED ahead of their extensions (a meta path finder)."""

    def __init__(self, package: Path) -> None:
        self.package = package

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = source_path(fullname, self.package) if fullname in COMPILED else None
        if source is None or not source.is_file():  # (none shipped: what there is runs)
            return None
        return importlib.util.spec_from_file_location(fullname, source)


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
