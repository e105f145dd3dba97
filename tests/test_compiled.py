"""The request book and the scheduler run compiled (mypyc, setup.py), and their sources run
instead when one was edited since the build or when asked (damocles_ext/compiled.py)."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from damocles_ext import compiled
from damocles_ext.compiled import COMPILED, PURE_ENV, why_sources

PACKAGE = Path(compiled.__file__).parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
BUILT = all(compiled.extension_path(name) for name in COMPILED)

# A round of the book in a fresh interpreter: one request sent and answered; says which file
# each compiled module ran from and why the sources ran, if they did.
ROUND = textwrap.dedent("""
    import sys
    from damocles_ext import compiled
    from damocles_ext.lifecycle.book import RequestBook
    from damocles_ext.lifecycle.effects import Resolve, Send
    from damocles_ext_plugins.testing import echo_output
    from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt
    task = WindowPoSt(miner_id=1, proof_type="StackedDrgWindow2KiBV1_2", seed=bytes(32),
        replicas=[PoStReplicaInfo(1, bytes(32), "/c", "/s")])
    book = RequestBook()
    book.add_child("wd", "window_post")
    book.child_ready("wd", 0.0, protocol="dext", pid=1)
    _, [send] = book.submit(1, task, 1.0)
    assert isinstance(send, Send), send
    [resolve] = book.answers("wd", [(send.child_rid, echo_output(task), None)], 2.0)
    assert isinstance(resolve, Resolve) and resolve.outcome == "ok", resolve
    print(compiled.sources_because)
    for name in compiled.COMPILED:
        print(sys.modules[name].__file__)
""")


def run_round(env: dict[str, str], path: Path | None = None) -> list[str]:
    """ROUND's lines, with `env`, the package imported from under `path` if given."""
    env = {**os.environ, **env}
    done = subprocess.run(  # (-c: the working directory comes first in sys.path)
        [sys.executable, "-c", ROUND],
        env=env,
        cwd=path,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.skipif(compiled.pure_asked(), reason=f"{PURE_ENV} set")
@pytest.mark.skipif(
    not BUILT or compiled.built_pure(), reason="the package was built without its compiled modules"
)
def test_the_request_book_and_the_scheduler_run_compiled():
    # As built from a fresh clone (`pip install -e .`): a source edited since then runs as
    # itself, and this says so (build again: `pip install -e .`).
    assert compiled.sources_because is None, f"{compiled.sources_because}: pip install -e ."
    for name in COMPILED:
        module = importlib.import_module(name)
        assert module.__file__ is not None and module.__file__.endswith(SUFFIX), module.__file__
    assert compiled.how_they_run() == "compiled"


def make_tree(tmp_path: Path, built: tuple[str, ...] = (*COMPILED, compiled.SHARED)) -> Path:
    """A package with the sources of COMPILED (the book importing a module of records), the
    extensions of `built`, and the record of a build that compiled them."""
    (tmp_path / "__init__.py").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "__init__.py").write_text("")
    for name in COMPILED:
        src = compiled.source_path(name, tmp_path)
        src.parent.mkdir(parents=True, exist_ok=True)
        (src.parent / "__init__.py").write_text("")
        imports = {"book": "from .records import Record\n", "queues": "from . import heap\n"}
        src.write_text(imports.get(src.stem, ""))
    (tmp_path / "lifecycle" / "records.py").write_text("class Record: ...\n")
    (tmp_path / "scheduling" / "heap.py").write_text("")
    if built:
        compiled.write_record(tmp_path, compiled.fingerprint(tmp_path))
    for name in built:
        stem = tmp_path.joinpath(*name.split(".")[1:])
        stem.with_name(stem.name + SUFFIX).write_bytes(b"")
    return tmp_path


def test_what_is_compiled_is_read_from_the_sources_and_what_they_import_from_the_package():
    read = {p.relative_to(PACKAGE).as_posix() for p in compiled.read_sources()}
    assert {compiled.source_path(n).relative_to(PACKAGE).as_posix() for n in COMPILED} <= read
    for imported in ("lifecycle/records.py", "scheduling/decisions.py", "tasks.py", "__init__.py"):
        assert imported in read
    assert "supervisor/core.py" not in read and "protocol/dext.py" not in read
    assert "compiled.py" not in read  # (its own logic: edited, nothing compiled needs building)


def test_the_extensions_run_unless_what_they_were_compiled_from_changed_or_asked(tmp_path):
    tree = make_tree(tmp_path / "built")
    read = {p.relative_to(tree).as_posix() for p in compiled.read_sources(tree)}
    assert {"lifecycle/records.py", "scheduling/heap.py", "scheduling/__init__.py"} <= read
    assert why_sources(tree, {}) is None
    assert why_sources(tree, {PURE_ENV: "0"}) is None
    assert why_sources(tree, {PURE_ENV: "1"}) == f"{PURE_ENV} is set"
    assert why_sources(make_tree(tmp_path / "none", built=()), {}) is None  # plain sources
    incomplete = make_tree(tmp_path / "some", built=COMPILED[1:])
    assert why_sources(incomplete, {}) == (
        f"the build is incomplete: {COMPILED[0]} has no compiled extension"
    )
    # Touched, or checked out again the same: as compiled.
    policy = compiled.source_path("damocles_ext.scheduling.policy", tree)
    os.utime(policy, (time.time() + 10, time.time() + 10))
    assert why_sources(tree, {}) is None
    # A module the compiled ones import, changed (one byte, the same size, the same time).
    records = tree / "lifecycle" / "records.py"
    st = records.stat()
    records.write_text("class Recorb: ...\n")
    os.utime(records, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert why_sources(tree, {}) is None  # (size and time the same: taken as unchanged)
    os.utime(records, (time.time() + 10, time.time() + 10))
    assert why_sources(tree, {}) == f"{records} changed since it was compiled"
    records.unlink()
    assert why_sources(tree, {}) == f"{records} is gone since it was compiled"
    no_record = f"the build left no record of what it compiled ({tree / compiled.RECORD})"
    (tree / compiled.RECORD).write_text('{"sources": {}}\n')  # (not one: another format)
    assert why_sources(tree, {}) == no_record
    head = "damocles-ext compiled from 1\n"
    for damaged in ("book.py", "0 1 2 /etc/passwd", "0 1 2 ../x.py", "0 1 2 a\0b"):
        (tree / compiled.RECORD).write_text(head + damaged + "\n")
        assert why_sources(tree, {}) == no_record, damaged
    (tree / compiled.RECORD).write_text("damocles-ext compiled from 3\n0 1 2 __init__.py\n")
    assert why_sources(tree, {}) == no_record  # (cut short)
    (tree / compiled.RECORD).unlink()
    (tree / compiled.RECORD).mkdir()
    assert why_sources(tree, {}) == no_record  # (not even a file)
    (tree / compiled.RECORD).rmdir()
    fifo = tree / "lifecycle" / "fifo.py"
    os.mkfifo(fifo)  # (a path that changed into one, which a read would wait on for ever)
    (tree / compiled.RECORD).write_text(head + "0 1 2 lifecycle/fifo.py\n")
    assert why_sources(tree, {}) == f"{fifo} changed since it was compiled"
    (tree / compiled.RECORD).unlink()
    assert why_sources(tree, {}) == no_record
    # Built again with PURE_ENV set: the extensions of the build before are left, not run.
    assert not compiled.built_pure(tree)
    compiled.write_record(tree, None)
    assert compiled.built_pure(tree)
    assert why_sources(tree, {}) == f"the last build compiled none of them ({PURE_ENV} was set)"


def test_the_sources_run_when_asked_and_serve_as_the_extensions_do():
    lines = run_round({PURE_ENV: "1"})
    assert lines[0] == f"{PURE_ENV} is set"
    assert lines[1:] == [str(compiled.source_path(name)) for name in COMPILED]


def test_the_sources_are_found_first_only_where_they_are(tmp_path):
    # An install that ships only the extensions runs them, whatever the check said.
    tree = make_tree(tmp_path / "built")
    finder = compiled._Sources(tree)
    spec = finder.find_spec(COMPILED[0], None)
    assert spec is not None and spec.origin == str(compiled.source_path(COMPILED[0], tree))
    assert finder.find_spec("damocles_ext.tasks", None) is None  # (not one of them)
    compiled.source_path(COMPILED[0], tree).unlink()
    assert finder.find_spec(COMPILED[0], None) is None


@pytest.mark.skipif(
    not BUILT or compiled.built_pure(), reason="the package was built without its compiled modules"
)
def test_a_source_changed_after_the_build_runs_as_itself_not_as_its_stale_extension(tmp_path):
    copy = tmp_path / "damocles_ext"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    edited = compiled.source_path("damocles_ext.lifecycle.rules", copy)
    later = time.time() + 60
    os.utime(edited, (later, later))  # touched only: as compiled
    files = run_round({PURE_ENV: ""}, tmp_path)[1:]  # (mypyc's own, its modules' __file__)
    assert len(files) == len(COMPILED)
    assert all(f.startswith(str(copy)) and f.endswith(SUFFIX) for f in files), files
    with edited.open("a") as f:
        f.write("# changed\n")
    lines = run_round({PURE_ENV: ""}, tmp_path)
    assert lines[0] == f"{edited} changed since it was compiled"
    assert lines[1:] == [str(compiled.source_path(name, copy)) for name in COMPILED]
