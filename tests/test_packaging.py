"""The sdist: it holds what its own test suite needs (helpers, configs, the example config, the
benchmarks, CI's command) and the licence files of the declared licence, declared the PEP 639
way; built with the installed setuptools, offline."""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist of this tree, built by setuptools' PEP 517 backend and unpacked."""
    out = tmp_path_factory.mktemp("sdist")
    # From a clean copy: setuptools adds the files listed by an earlier build's
    # *.egg-info/SOURCES.txt (an editable install leaves one), which would hide a gap here.
    source = tmp_path_factory.mktemp("source") / "tree"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "build",
        "dist", "*.so", "*.o"))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c",
         "import setuptools.build_meta as b, sys; print(b.build_sdist(sys.argv[1]))", str(out)],
        cwd=source, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    archive = out / done.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    [tree] = [p for p in out.iterdir() if p.is_dir()]
    return tree


def test_the_sdist_holds_every_tracked_file(sdist: Path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout (an sdist itself)")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    missing = [f for f in tracked if f != ".gitignore" and not (sdist / f).is_file()]
    assert missing == []


def test_the_sdist_holds_what_its_tests_read_and_the_licence_files(sdist: Path):
    for path in ["LICENSE-MIT", "LICENSE-APACHE", "ext-prover.cfg.example", ".ci/run",
                 "tests/conftest.py", "tests/helpers/__init__.py", "tests/helpers/frontend.py",
                 "tests/helpers/supervisor.py", "tests/helpers/child.py", "tests/helpers/post.py",
                 "tests/configs/seed-8gpu.cfg", "bench/runner.py", "docs/STATUS.md",
                 "examples/dext-hello-plugin/pyproject.toml"]:  # fmt: skip
        assert (sdist / path).is_file(), path
    assert list((sdist / "tests" / "configs" / "bad").glob("*.cfg"))
    assert not list(sdist.rglob("__pycache__")) and not list(sdist.rglob("*.so"))
    assert "Permission is hereby granted" in (sdist / "LICENSE-MIT").read_text()
    assert "Apache License" in (sdist / "LICENSE-APACHE").read_text()


def test_the_licence_is_a_pep_639_expression_with_its_files_and_no_dead_dependency(sdist: Path):
    meta = email.parser.Parser().parsestr((sdist / "PKG-INFO").read_text())
    assert meta["License-Expression"] == "MIT OR Apache-2.0"
    assert meta["License"] is None  # the deprecated free-text field of `license = {text = ...}`
    assert meta.get_all("License-File") == ["LICENSE-MIT", "LICENSE-APACHE"]
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    requires = meta.get_all("Requires-Dist") or []
    assert not [r for r in requires if r.startswith("tomli")]  # tomllib: Python >= 3.11


@pytest.mark.slow
def test_the_sdists_own_tests_run_with_their_helpers_and_configs(sdist: Path):
    # One run: collecting modules that import each helper, and running the tests that read
    # tests/configs/ and the repository's layout. -P: the package is the installed one; the
    # tests and what they read are the sdist's.
    done = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_serve.py", "tests/test_supervisor.py", "tests/test_child.py",
         "tests/test_post_cli.py", "tests/test_config.py", "tests/test_repo.py",
         "-k", "seed or layout or readme_test_command or example"],
        cwd=sdist, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "error" not in done.stdout.lower(), done.stdout


# A user's script written from the README's and the modules' examples of the API.
USER_SCRIPT = """
import time

import trio

from damocles_ext.api import open_job_producer, open_supervisor
from damocles_ext.client import connect, submit_sync
from damocles_ext.errors import ProverError
from damocles_ext.tasks import Output, PoStReplicaInfo, WindowPoSt


async def main(task: WindowPoSt) -> Output:
    async with open_supervisor("ext-prover.cfg") as sup:
        await sup.wait_ready("window_post")
        try:
            output = await sup.submit(task, deadline=None, on_progress=print)
        except ProverError as exc:
            print("no proof:", exc)
        print(sup.statistics().children[0].state)
    async with connect() as client:
        output = await client.submit(task, deadline=time.time() + 600)
    async with open_job_producer("sqlite:///jobs.db", stores={"nfs-1": "/mnt/nfs-1"}) as jobs:
        output = await jobs.submit(task, deadline=None)
    return output


task = WindowPoSt(1000, "StackedDrgWindow2KiBV1_2", [PoStReplicaInfo(1, bytes(32), "/c", "/s")],
                  bytes(32))
print(trio.run(main, task), submit_sync(task))
"""


def test_a_users_script_is_type_checked_against_the_installed_package(
    sdist: Path, tmp_path: Path
) -> None:
    pytest.importorskip("mypy", reason="mypy is in the lint extra: pip install -e '.[lint]'")
    # The package as a wheel installs it: in a site-packages, where mypy reads a package only
    # if it has a py.typed (PEP 561); once, it had none, so every import of it was an error.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = Path(subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip())  # fmt: skip
    (site / "damocles_ext").symlink_to(sdist / "damocles_ext", target_is_directory=True)
    # Its dependencies (trio, msgspec, ...) are this environment's.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file=/dev/null",
         f"--python-executable={venv / 'bin' / 'python'}", "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
