"""The reference prover in C under AddressSanitizer, UndefinedBehaviorSanitizer and
ThreadSanitizer, driven by native/tests/sanitize_driver.c over real sectors.

The driver is compiled here with `cc` from the same sources the cffi build uses, with stricter
warnings than the install build (-Wconversion and friends) as errors. Each test runs one
scenario; the driver checks the prover's answers itself and a sanitizer report fails the run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.post import sectors

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
DRIVER = NATIVE / "tests" / "sanitize_driver.c"

# Stricter than native/build_ffi.py: these apply to our sources only, not to cffi's code.
WARNINGS = [
    "-Wall",
    "-Wextra",
    "-Wformat=2",
    "-Wshadow",
    "-Wstrict-prototypes",
    "-Wmissing-prototypes",
    "-Wvla",
    "-Wcast-qual",
    "-Wconversion",
    "-Wsign-conversion",
    "-Werror",
]
COMMON = ["-std=gnu11", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread"]
ASAN_UBSAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
TSAN = ["-fsanitize=thread"]
WRAP = ["-Wl,--wrap=malloc", "-Wl,--wrap=calloc", "-Wl,--wrap=pread"]

SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66",
}


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler (cc or gcc) on PATH: the sanitizer build cannot run")
    return cc


def _build(out: Path, sanitizers: list[str]) -> Path:
    """The driver and the prover sources with `sanitizers`; skips if the toolchain lacks them."""
    cc = _compiler()
    probe = out.parent / f"probe-{out.name}"
    probe_src = out.parent / "probe.c"
    probe_src.write_text("int main(void) { return 0; }\n")
    check = subprocess.run(
        [cc, *sanitizers, str(probe_src), "-o", str(probe)],
        check=False,
        capture_output=True,
        text=True,
    )
    if check.returncode == 0:
        # Built is not enough: ThreadSanitizer refuses to run on some kernels' memory layouts.
        check = subprocess.run([str(probe)], check=False, capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(
            f"{cc} cannot build and run a program with {' '.join(sanitizers)} (is libasan, "
            f"libubsan or libtsan installed?): {check.stderr.strip()[-300:]}"
        )
    sources = [*sorted((NATIVE / "src").glob("*.c")), DRIVER]
    command = [
        cc,
        *COMMON,
        *WARNINGS,
        *sanitizers,
        f"-I{NATIVE / 'include'}",
        *map(str, sources),
        *WRAP,
        "-lcrypto",
        "-o",
        str(out),
    ]
    built = subprocess.run(command, check=False, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(command)}\n{built.stderr}"
    return out


@pytest.fixture(scope="module")
def fixture_args(tmp_path_factory) -> list[str]:
    manifest = sectors(
        tmp_path_factory.mktemp("sectors"), "StackedDrgWindow2KiBV1", 5, random_seed=11, miner=1234
    )
    args = [str(manifest.miner_id), "StackedDrgWindow2KiBV1", "StackedDrgWinning2KiBV1"]
    for rep in manifest.replicas:
        args += [str(rep.sector_id), rep.comm_r, str(rep.cache_dir), str(rep.sealed_file)]
    return args


@pytest.fixture(scope="module")
def asan_driver(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("asan") / "driver", ASAN_UBSAN)


@pytest.fixture(scope="module")
def tsan_driver(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("tsan") / "driver", TSAN)


def run_driver(driver: Path, scenario: str, fixture_args: list[str], workdir: Path) -> str:
    run = subprocess.run(
        [str(driver), scenario, str(workdir), *fixture_args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **SANITIZER_ENV},
        timeout=120,
    )
    report = f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, report
    for marker in ("Sanitizer", "runtime error:", "FAIL:"):
        assert marker not in run.stderr, report
    assert f"ok {scenario}" in run.stdout, report
    return run.stdout


def test_sanitized_prover_proves_and_verifies_real_sectors(asan_driver, fixture_args, tmp_path):
    run_driver(asan_driver, "prove", fixture_args, tmp_path)


def test_every_allocation_failure_is_reported_as_out_of_memory(asan_driver, fixture_args, tmp_path):
    out = run_driver(asan_driver, "nomem", fixture_args, tmp_path)
    # Each ABI function was made to fail at each of its allocations, leak-checked by LSan.
    for name in (
        "dext_open",
        "dext_window_post",
        "dext_winning_post",
        "dext_verify",
        "dext_build_tree",
    ):
        assert f"{name}: " in out


def test_an_allocation_failure_inside_openssl_is_never_a_sector_fault(
    asan_driver, fixture_args, tmp_path
):
    # A hash that failed is not evidence against a sector: reporting it as a fault would make
    # damocles-manager declare a good sector faulty.
    run_driver(asan_driver, "nomem-openssl", fixture_args, tmp_path)


def test_a_failed_write_on_a_full_disk_leaves_no_descriptor_open(
    asan_driver, fixture_args, tmp_path
):
    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full here to stand in for a full disk")
    run_driver(asan_driver, "write-failure", fixture_args, tmp_path)


def test_a_read_that_finds_its_file_ended_early_says_so_not_a_stale_errno(
    asan_driver, fixture_args, tmp_path
):
    # A file that shrinks between the prover's fstat and its read (replaced, truncated): pread
    # returns 0 and sets no errno, and the message gave whatever an earlier call had left.
    out = run_driver(asan_driver, "short-read", fixture_args, tmp_path)
    for name in ("dext_window_post", "dext_winning_post", "dext_build_tree"):
        assert f"{name}: " in out


@pytest.mark.parametrize("sanitizer", ["asan", "tsan"])
def test_handles_used_by_several_threads_at_once_share_nothing(
    sanitizer, request, fixture_args, tmp_path
):
    # The host opens one handle per concurrent request and calls them from as many threads.
    driver = request.getfixturevalue(f"{sanitizer}_driver")
    run_driver(driver, "threads", fixture_args, tmp_path)


def test_cancel_flag_set_before_or_during_a_call_stops_it(asan_driver, fixture_args, tmp_path):
    run_driver(asan_driver, "cancel", fixture_args, tmp_path)


def test_cancel_flag_is_read_atomically_while_another_thread_sets_it(
    tsan_driver, fixture_args, tmp_path
):
    run_driver(tsan_driver, "cancel-race", fixture_args, tmp_path)


HEADER_USER = """
#include "dext_prover.h"
int stop_now(const volatile int32_t *cancel);
int stop_now(const volatile int32_t *cancel) { return dext_cancel_requested(cancel); }
"""


@pytest.mark.parametrize(
    ("language", "std"), [("c", "c99"), ("c", "c11"), ("c++", "c++11"), ("c++", "c++17")]
)
def test_the_abi_header_and_its_cancel_helper_compile_warning_free_for_vendors(
    language, std, tmp_path
):
    # Vendor libraries are C, C++ or CUDA (C++ on the host side): the header must serve them all.
    cc = _compiler() if language == "c" else shutil.which("c++") or shutil.which("g++")
    if not cc:
        pytest.skip("no C++ compiler (c++ or g++) on PATH")
    src = tmp_path / ("user.c" if language == "c" else "user.cpp")
    src.write_text(HEADER_USER)
    done = subprocess.run(
        [cc, f"-std={std}", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-fsyntax-only",
         f"-I{NATIVE / 'include'}", str(src)],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def _build_ffi_module():
    spec = importlib.util.spec_from_file_location("dext_build_ffi", NATIVE / "build_ffi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cffi_build_makes_warnings_errors_unless_told_not_to(monkeypatch):
    build = _build_ffi_module()
    monkeypatch.delenv("DAMOCLES_EXT_NATIVE_WERROR", raising=False)
    assert "-Werror" in build._warning_flags() and "-Wextra" in build._warning_flags()
    assert "-Werror" in build.COMPILE_ARGS
    monkeypatch.setenv("DAMOCLES_EXT_NATIVE_WERROR", "0")
    assert "-Werror" not in build._warning_flags() and "-Wall" in build._warning_flags()
    monkeypatch.setenv("DAMOCLES_EXT_NATIVE_WERROR", "no")
    with pytest.raises(SystemExit, match="DAMOCLES_EXT_NATIVE_WERROR='no': use 1"):
        build._warning_flags()
