"""The `native` and `python-ref` provers, served by real `damocles-ext child` processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from damocles_ext_plugins.native import NativePoStProver
from damocles_ext_plugins.native import validate_options as native_problems
from helpers.child import Child
from helpers.post import sectors, sectors_with_a_short_one

from damocles_ext.hookspecs import Cancelled, CancelToken
from damocles_ext.post.fixtures import window_task, winning_task
from damocles_ext.post.verify import verify
from damocles_ext.protocol import dext

SEED = bytes(range(32))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return sectors(tmp_path_factory.mktemp("s"), "StackedDrgWindow2KiBV1_2", 3, random_seed=4)


@pytest.mark.parametrize("plugin", ["native", "python-ref"])
def test_child_serves_verifiable_proofs_of_both_stages(manifest, plugin):
    outputs = {}
    for stage, task in (
        ("window_post", window_task(manifest, SEED)),
        ("winning_post", winning_task(manifest, SEED)),
    ):
        with Child(stage, plugin) as child:
            hello, _ = child.next_of(dext.Hello)
            assert hello.prover == plugin
            child.send_msg(dext.Request(1, task))
            response, _ = child.next_of(dext.Response)
            assert response.error is None, response.error
            verify(task, response.output)
            outputs[stage] = response.output
    assert outputs["window_post"].faults == []


def test_both_provers_answer_a_faulty_sector_alike_through_the_child(manifest, tmp_path):
    m = sectors_with_a_short_one(tmp_path)
    task = window_task(m, SEED)
    answers = []
    for plugin in ("native", "python-ref"):
        with Child("window_post", plugin) as child:
            child.next_of(dext.Hello)
            child.send_msg(dext.Request(3, task))
            answers.append(child.next_of(dext.Response)[0].output)
    assert answers[0] == answers[1]
    assert answers[0].faults == [2] and answers[0].proofs == []


def test_a_missing_vendor_library_stops_the_child_before_ready(tmp_path):
    with Child("window_post", "native", f"library={tmp_path}/libgone.so") as child:
        assert child.wait() == 2
        assert "libgone.so" in child.stderr and "no such file" in child.stderr


def test_native_options_are_checked_by_name():
    assert native_problems({}) == []
    assert native_problems({"rows_to_discard": 3}) == []
    assert "rows_to_discard" in native_problems({"rows_to_discard": 40})[0]
    assert "unknown option 'gpus'" in native_problems({"gpus": 2})[0]
    assert "library" in native_problems({"library": "/nonexistent/lib.so"})[0]


def _elf_header_of_this_python() -> bytes:
    with open("/proc/self/exe", "rb") as f:
        return f.read(64)


def test_a_vendor_library_option_naming_a_directory_says_so(tmp_path):
    # It said "no such file" of a directory that is there.
    (message,) = native_problems({"library": str(tmp_path)})
    assert message.startswith(f"native: option 'library' = {str(tmp_path)!r}: a directory, not")
    (message,) = native_problems({"library": str(tmp_path / "none.so")})
    assert ": no such file; give the path of a shared library" in message


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda h: b"#!/bin/sh\n" + bytes(64), "is not a shared library (no ELF header)"),
        # e_type 1: a relocatable object file (gcc -c), which dlopen refuses
        (lambda h: h[:16] + (1).to_bytes(2, "little") + h[18:], "is an ELF file but not a shared"),
        # e_machine 183 (AArch64) on any other machine, 62 (x86-64) on AArch64
        (
            lambda h: h[:18] + (183 if h[18] != 183 else 62).to_bytes(2, "little") + h[20:],
            "is built for another machine",
        ),
    ],
)
def test_a_vendor_library_dlopen_would_refuse_is_named_before_any_child_starts(
    tmp_path, make, problem
):
    # Told from the ELF header only: nothing of the library runs in the process that checks.
    header = _elf_header_of_this_python()
    assert header[5] == 1, "these headers are written little-endian"
    library = tmp_path / "libvendor.so"
    library.write_bytes(make(header[:16] + (3).to_bytes(2, "little") + header[18:]))
    (message,) = native_problems({"library": str(library)})
    assert message.startswith(f"native: option 'library' = {str(library)!r}: {problem}")
    assert "give the path of a shared library" in message


def test_a_real_shared_library_passes_the_header_check():
    import damocles_ext

    built = next(Path(damocles_ext.__file__).parent.glob("_native*.so"))
    assert native_problems({"library": str(built)}) == []


@pytest.fixture(params=["tmpfs", "bind"])
def noexec_dir(tmp_path, request):
    """A directory on a filesystem mounted noexec (as /tmp is on hardened machines): a tmpfs, or
    a bind mount remounted noexec (systemd's NoExecPaths=), whose device is the one below it."""
    import shutil
    import subprocess

    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mount = tmp_path / "noexec"
    mount.mkdir()
    if request.param == "tmpfs":
        steps = [["mount", "-t", "tmpfs", "-o", "noexec,size=16m", "tmpfs", str(mount)]]
    else:
        steps = [["mount", "--bind", str(mount), str(mount)],
                 ["mount", "-o", "remount,bind,noexec", str(mount)]]  # fmt: skip
    mounted = False
    try:
        for step in steps:
            made = subprocess.run(step, capture_output=True, text=True, check=False)
            if made.returncode != 0:
                pytest.skip(f"cannot mount a noexec {request.param} here (needs root):"
                            f" {made.stderr.strip()}")  # fmt: skip
            mounted = True
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)


def test_a_vendor_library_on_a_noexec_mount_is_named_as_such(noexec_dir):
    import shutil

    import damocles_ext

    built = next(Path(damocles_ext.__file__).parent.glob("_native*.so"))
    library = noexec_dir / "libvendor.so"
    shutil.copy(built, library)  # a real shared library, which dlopen cannot map from there
    (message,) = native_problems({"library": str(library)})
    assert message.startswith(
        f"native: option 'library' = {str(library)!r}: is on a filesystem mounted noexec"
        f" ({noexec_dir}), from which dlopen cannot map a library; put it on another one, or"
        " remount that one without noexec"
    )


def test_a_cancelled_request_raises_the_plugin_contracts_cancelled(manifest):
    prover = NativePoStProver({})
    token = CancelToken()
    try:
        with pytest.raises(Cancelled):
            prover.prove(window_task(manifest, SEED), lambda *a: token.cancel("stop"), token)
    finally:
        prover.close()


def test_check_config_refuses_a_program_as_a_library_and_a_vendor_library_for_a_split_step(
    tmp_path,
):
    import shutil
    import subprocess
    import sys

    import damocles_ext

    program = shutil.which("true")
    library = str(next(Path(damocles_ext.__file__).parent.glob("_native*.so")))
    # A position-independent executable is ET_DYN as a library is; dlopen refuses it.
    (message,) = native_problems({"library": program})
    assert "is a program (a position-independent executable), not a shared library" in message
    cfg = tmp_path / "split.cfg"
    cfg.write_text(
        f'[[WdPostVanilla]]\nPlugin = "native"\nPluginOptions = {{ library = "{library}" }}\n'
        f'[[WdPostSnark]]\nPlugin = "native"\nPluginOptions = {{ library = "{library}" }}\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "check-config", "-c", str(cfg)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    for stage in ("window_post_vanilla", "window_post_snark"):
        assert f"option 'library' cannot serve {stage}: a split WindowPoSt step needs" in (
            done.stdout + done.stderr
        )
    # The same library serves a whole WindowPoSt.
    assert native_problems({"library": library}, stage="window_post") == []


def test_a_validator_that_answers_one_string_gives_one_problem():
    from damocles_ext.hookspecs import ProverSpec
    from damocles_ext.plugins import get_plugin_manager, validate_prover_options

    spec = ProverSpec("s", ("window_post",), lambda o: None, validate_options=lambda o: "bad x")
    assert validate_prover_options(get_plugin_manager(entry_points=False), spec, {}) == ["bad x"]
