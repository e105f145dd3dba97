"""The public `Prover` protocol is satisfiable under mypy, by the built-in provers and by the
minimal class a plugin author writes (a class attribute `stages = ("window_post",)`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mypy", reason="mypy is in the lint extra: pip install -e '.[lint]'")

SNIPPET = textwrap.dedent(
    """
    from damocles_ext.hookspecs import CancelToken, ProgressCallback, Prover
    from damocles_ext.tasks import Output, Task, WindowPoStOutput
    from damocles_ext_plugins.native import NativePoStProver
    from damocles_ext_plugins.python_ref import PythonRefProver
    from damocles_ext_plugins.testing import EchoProver, SleepProver


    def native(p: NativePoStProver) -> Prover:
        return p


    def python_ref(p: PythonRefProver) -> Prover:
        return p


    def echo(p: EchoProver) -> Prover:
        return p


    def sleep(p: SleepProver) -> Prover:
        return p


    class ThirdParty:
        name = "hello"
        stages = ("window_post",)

        def prove(self, task: Task, progress: ProgressCallback, cancel: CancelToken) -> Output:
            return WindowPoStOutput(proofs=[], faults=[])


    third_party: Prover = ThirdParty()


    class NoProve:
        name = "broken"
        stages = ("window_post",)


    class ReturnsText(ThirdParty):
        def prove(  # type: ignore[override]
            self, task: Task, progress: ProgressCallback, cancel: CancelToken
        ) -> str:
            return "not an output"


    wrong_output: Prover = ReturnsText()  # type: ignore[assignment]

    # mypy must reject these; with --warn-unused-ignores an unneeded ignore is an error, so the
    # run also fails if mypy were not checking the protocol at all.
    broken: Prover = NoProve()  # type: ignore[assignment]
    """
)


def test_builtin_and_plugin_style_provers_satisfy_the_prover_protocol(tmp_path: Path) -> None:
    # The plugins ship as `damocles_ext_plugins` (a package-dir mapping mypy cannot see through
    # the editable install's import hook), so give mypy the same name by a link.
    stubs = tmp_path / "path"
    stubs.mkdir()
    (stubs / "damocles_ext_plugins").symlink_to(ROOT / "plugins", target_is_directory=True)
    (tmp_path / "snippet.py").write_text(SNIPPET)
    env = dict(os.environ, MYPYPATH=f"{ROOT}{os.pathsep}{stubs}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--follow-imports=silent",
            "--warn-unused-ignores",
            "--config-file=/dev/null",
            str(tmp_path / "snippet.py"),
        ],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
