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


@pytest.mark.skipif(bool(os.environ.get(PURE_ENV, "") not in ("", "0")), reason=f"{PURE_ENV} set")
def test_the_request_book_and_the_scheduler_run_compiled():
    # As built from a fresh clone (`pip install -e .`): a source edited since then runs as
    # itself, and this says so (build again: `pip install -e .`).
    assert compiled.sources_because is None, f"{compiled.sources_because}: pip install -e ."
    for name in COMPILED:
        module = importlib.import_module(name)
        assert module.__file__ is not None and module.__file__.endswith(SUFFIX), module.__file__
    assert compiled.how_they_run() == "compiled"


def make_tree(tmp_path: Path, built: tuple[str, ...] = COMPILED) -> Path:
    """A package directory with the sources of COMPILED and extensions of `built`, the
    extensions written after the sources (as a build does)."""
    then = time.time() - 100
    tmp_path.mkdir(parents=True, exist_ok=True)
    if built:
        shared = compiled.source_path(compiled.SHARED, tmp_path).with_suffix(SUFFIX)
        shared.write_bytes(b"")
        os.utime(shared, (then + 1, then + 1))
    for name in COMPILED:
        src = compiled.source_path(name, tmp_path)
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("")
        os.utime(src, (then, then))
        if name in built:
            ext = src.with_name(src.stem + SUFFIX)
            ext.write_bytes(b"")
            os.utime(ext, (then + 1, then + 1))
    return tmp_path


def test_the_extensions_run_unless_a_source_is_newer_the_build_incomplete_or_asked(tmp_path):
    tree = make_tree(tmp_path / "built")
    assert why_sources(tree, {}) is None
    assert why_sources(tree, {PURE_ENV: "0"}) is None
    assert why_sources(tree, {PURE_ENV: "1"}) == f"{PURE_ENV} is set"
    assert why_sources(make_tree(tmp_path / "none", built=()), {}) is None  # plain sources
    incomplete = make_tree(tmp_path / "some", built=COMPILED[1:])
    assert why_sources(incomplete, {}) == (
        "the build is incomplete: book.py has no compiled extension"
    )
    edited = compiled.source_path("damocles_ext.scheduling.policy", tree)
    os.utime(edited, (time.time(), time.time()))
    assert why_sources(tree, {}) == f"{edited} was edited after it was compiled"
    # Built again: the code is in the shared library, rebuilt; a shim may be left as it was.
    shared = compiled.extension_path(compiled.SHARED, tree)
    assert shared is not None
    os.utime(shared, (time.time() + 1, time.time() + 1))
    assert why_sources(tree, {}) is None
    shared.unlink()
    assert why_sources(tree, {}) == (
        "the build is incomplete: the compiled modules' shared library is missing"
    )


def test_the_sources_run_when_asked_and_serve_as_the_extensions_do():
    lines = run_round({PURE_ENV: "1"})
    assert lines[0] == f"{PURE_ENV} is set"
    assert lines[1:] == [str(compiled.source_path(name)) for name in COMPILED]


@pytest.mark.skipif(not BUILT, reason="the package was built without its compiled modules")
def test_a_source_edited_after_the_build_runs_as_itself_not_as_its_stale_extension(tmp_path):
    copy = tmp_path / "damocles_ext"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    files = run_round({PURE_ENV: ""}, tmp_path)[1:]  # (mypyc's own, its modules' __file__)
    assert all(f.startswith(str(copy)) and f.endswith(SUFFIX) for f in files), files
    edited = compiled.source_path("damocles_ext.lifecycle.rules", copy)
    later = time.time() + 60
    os.utime(edited, (later, later))
    lines = run_round({PURE_ENV: ""}, tmp_path)
    assert lines[0] == f"{edited} was edited after it was compiled"
    assert lines[1:] == [str(compiled.source_path(name, copy)) for name in COMPILED]
