"""NativeProver: the built-in library (cffi API mode) and vendor libraries by path (ABI mode)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest
from helpers.post import sectors

from damocles_ext.errors import ProverError, UsageError
from damocles_ext.hookspecs import CancelToken
from damocles_ext.post import (
    InvalidTaskError,
    PoStCancelled,
    ProverOutOfMemory,
    SectorFaultError,
    VerifyError,
)
from damocles_ext.post.fixtures import window_task, winning_task
from damocles_ext.post.native import NativeLoadError, NativeProver

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
SEED = bytes(range(32))

# A vendor library that implements the ABI's required functions and fails every proof, with the
# ABI version chosen at compile time.
STUB_VENDOR = r"""
#include <stdlib.h>
#include "dext_prover.h"
#ifndef STUB_FAIL
#define STUB_FAIL DEXT_ERR_INTERNAL
#endif
struct dext_handle { int unused; };
uint32_t dext_abi_version(void) { return STUB_ABI; }
dext_handle *dext_open(const char *o) { (void)o; return calloc(1, sizeof(dext_handle)); }
void dext_close(dext_handle *h) { free(h); }
const char *dext_last_error(dext_handle *h) { (void)h; return "no GPU found (stub)"; }
static int32_t fail(dext_result **out) { *out = NULL; return STUB_FAIL; }
/* miner 0: report progress once, then spin until cancelled without reporting again */
int32_t dext_window_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                         const volatile int32_t *x, dext_result **out) {
    if (t->miner_id != 0 || !x) return fail(out);
    p(c, "spin", 0, 1);
    while (!dext_cancel_requested(x)) {}
    *out = NULL;
    return DEXT_ERR_CANCELLED;
}
int32_t dext_winning_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                          const volatile int32_t *x, dext_result **out) { return fail(out); }
void dext_result_free(dext_result *r) { free(r); }
"""


def compile_library(out: Path, sources: list[Path], *defines: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the test libraries"
    subprocess.run(
        [
            cc,
            "-shared",
            "-fPIC",
            "-O2",
            f"-I{NATIVE / 'include'}",
            *defines,
            *map(str, sources),
            "-lcrypto",
            "-o",
            str(out),
        ],
        check=True,
    )
    return out


@pytest.fixture(scope="module")
def reference_so(tmp_path_factory):
    """The reference prover built as a plain shared library, as a vendor would ship one."""
    out = tmp_path_factory.mktemp("lib") / "libdext_ref.so"
    return compile_library(out, sorted((NATIVE / "src").glob("*.c")))


@pytest.fixture(scope="module")
def stub_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("stub") / "stub.c"
    path.write_text(STUB_VENDOR)
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return sectors(tmp_path_factory.mktemp("s"), "StackedDrgWindow2KiBV1", 5, random_seed=3)


def test_builtin_library_speaks_abi_version_1():
    with NativeProver() as prover:
        assert prover.abi_version == 1
        assert prover.has("dext_build_tree") and prover.has("dext_verify")


def test_a_library_loaded_by_path_proves_the_same_bytes(reference_so, manifest, tmp_path):
    task, win = window_task(manifest, SEED), winning_task(manifest, SEED)
    with NativeProver() as builtin, NativeProver(reference_so) as vendor:
        assert vendor.window_post(task) == builtin.window_post(task)
        assert vendor.winning_post(win) == builtin.winning_post(win)
        vendor.verify(task, builtin.window_post(task))
        rep = manifest.replicas[0]
        comm_c = (Path(rep.cache_dir) / "p_aux").read_bytes()[:32]
        assert (
            vendor.build_tree(task.proof_type, rep.sealed_file, tmp_path / "c", comm_c).hex()
            == rep.comm_r
        )


def test_the_build_command_of_the_native_readme_makes_a_library_the_plugin_loads(
    manifest, tmp_path
):
    import re

    readme = (NATIVE / "README.md").read_text()
    (command,) = re.findall(r"^cc .* -o libdext_ref\.so$", readme, re.MULTILINE)
    # The doc's line as a shell runs it; its paths are relative to the checkout.
    (tmp_path / "native").symlink_to(NATIVE)
    subprocess.run(command, shell=True, cwd=tmp_path, check=True)
    lib = tmp_path / "libdext_ref.so"
    task = window_task(manifest, SEED)
    with NativeProver() as builtin, NativeProver(lib) as vendor:
        assert vendor.window_post(task) == builtin.window_post(task)
    # Built as the doc said before, every symbol hidden: the error says why, not only what.
    hidden = command.replace("-o libdext_ref.so", "-fvisibility=hidden -o libhidden.so")
    subprocess.run(hidden, shell=True, cwd=tmp_path, check=True)
    said = r"exports none of the functions of .* built with -fvisibility=hidden, mark them"
    with pytest.raises(NativeLoadError, match=said):
        NativeProver(tmp_path / "libhidden.so")


def test_a_relative_library_path_means_that_file_not_a_system_search(reference_so, monkeypatch):
    monkeypatch.chdir(reference_so.parent)
    with NativeProver(reference_so.name) as prover:
        assert prover.library == str(reference_so)


def test_missing_library_file_is_named(tmp_path):
    with pytest.raises(NativeLoadError, match=r"libnope\.so does not exist") as exc:
        NativeProver(tmp_path / "libnope.so")
    assert isinstance(exc.value, UsageError)


def test_a_file_that_is_not_a_shared_library_cannot_load(tmp_path):
    path = tmp_path / "libtext.so"
    path.write_text("not ELF")
    with pytest.raises(NativeLoadError, match="cannot load native prover library"):
        NativeProver(path)


def test_a_library_whose_dependency_is_not_found_says_which_and_where_to_give_it(
    tmp_path, stub_source
):
    dep = tmp_path / "dep" / "dep.c"
    dep.parent.mkdir()
    dep.write_text("int dext_test_dep(void) { return 1; }\n")
    compile_library(dep.parent / "libdextdep.so", [dep])
    lib = compile_library(
        tmp_path / "libneeds.so",
        [stub_source],
        "-DSTUB_ABI=1",
        "-Wl,--no-as-needed",
        f"-L{dep.parent}",
        "-ldextdep",
    )
    with pytest.raises(NativeLoadError) as raised:
        NativeProver(lib)  # the dependency's directory is on no search path
    assert str(raised.value) == (
        f"cannot load native prover library {lib}: libdextdep.so: cannot open shared object"
        " file: No such file or directory; a library it needs is not found: install it, or"
        " give its directory in LD_LIBRARY_PATH (the Envs of the child's table)"
    )


def test_missing_symbols_are_listed_by_name(tmp_path):
    src = tmp_path / "partial.c"
    src.write_text(
        '#include "dext_prover.h"\n#include <stdlib.h>\n'
        "uint32_t dext_abi_version(void) { return 1; }\n"
        "dext_handle *dext_open(const char *o) { return NULL; }\n"
    )
    lib = compile_library(tmp_path / "libpartial.so", [src])
    with pytest.raises(NativeLoadError) as exc:
        NativeProver(lib)
    message = str(exc.value)
    for name in (
        "dext_close",
        "dext_last_error",
        "dext_window_post",
        "dext_winning_post",
        "dext_result_free",
    ):
        assert name in message
    assert "dext_open" not in message and "dext_abi_version" not in message


def test_an_open_that_fails_without_a_message_says_so_with_the_options(tmp_path, stub_source):
    src = tmp_path / "mute.c"
    src.write_text(
        stub_source.read_text()
        .replace("return calloc(1, sizeof(dext_handle));", "return NULL;")
        .replace('return "no GPU found (stub)";', 'return "";')
    )
    lib = compile_library(tmp_path / "libmute.so", [src], "-DSTUB_ABI=1")
    with pytest.raises(NativeLoadError) as raised:
        NativeProver(lib, {"device": 3})
    assert str(raised.value) == (
        f"{lib}: dext_open failed: it gave no message (dext_last_error(NULL) was empty); the"
        ' options it was given: {"device": 3} (PluginOptions but for library and gpu_lock)'
    )


def test_abi_version_mismatch_says_found_and_expected(tmp_path, stub_source):
    lib = compile_library(tmp_path / "libv2.so", [stub_source], "-DSTUB_ABI=2")
    with pytest.raises(NativeLoadError, match="ABI version 2, expected 1"):
        NativeProver(lib)


def test_vendor_errors_reach_the_caller_with_their_message(tmp_path, stub_source, manifest):
    lib = compile_library(tmp_path / "libstub.so", [stub_source], "-DSTUB_ABI=1")
    with NativeProver(lib) as prover:
        assert not prover.has("dext_build_tree")
        with pytest.raises(ProverError, match="no GPU found"):
            prover.window_post(window_task(manifest, SEED))
        with pytest.raises(ProverError, match="optional dext_build_tree"):
            prover.build_tree("StackedDrgWindow2KiBV1", "x", "y", bytes(32))


def test_out_of_memory_in_a_library_is_its_own_error_not_a_bad_task(
    tmp_path, stub_source, manifest
):
    lib = compile_library(
        tmp_path / "libnomem.so", [stub_source], "-DSTUB_ABI=1", "-DSTUB_FAIL=DEXT_ERR_NOMEM"
    )
    with NativeProver(lib) as prover, pytest.raises(ProverOutOfMemory) as exc:
        prover.winning_post(winning_task(manifest, SEED))
    message = str(exc.value)
    assert "no GPU found (stub)" in message  # the library's own words come first
    assert "ran out of memory (DEXT_ERR_NOMEM)" in message and "retry" in message
    assert not isinstance(exc.value, UsageError)


def test_cancel_reaches_a_library_that_stops_reporting_progress(tmp_path, stub_source, manifest):
    lib = compile_library(tmp_path / "libspin.so", [stub_source], "-DSTUB_ABI=1")
    started, token, outcome = threading.Event(), CancelToken(), []

    def prove():
        task = msgspec.structs.replace(window_task(manifest, SEED), miner_id=0)
        try:
            prover.window_post(task, progress=lambda *a: started.set(), cancel=token)
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    with NativeProver(lib) as prover:
        thread = threading.Thread(target=prove)
        thread.start()
        assert started.wait(10)
        token.cancel()  # the library will not call back again: the watcher thread must tell it
        thread.join(10)
        assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], PoStCancelled)


def test_bad_options_fail_at_open_with_the_library_message():
    with pytest.raises(NativeLoadError, match="unknown option 'gpu'"):
        NativeProver(options={"gpu": 1})
    with pytest.raises(NativeLoadError, match="rows_to_discard must be an integer"):
        NativeProver(options={"rows_to_discard": 99})
    with pytest.raises(NativeLoadError, match="rows_to_discard must be an integer"):
        NativeProver(options={"rows_to_discard": "2"})


def test_progress_reports_start_and_completion(manifest):
    seen = []
    with NativeProver() as prover:
        prover.window_post(window_task(manifest, SEED), progress=lambda *a: seen.append(a))
    assert seen[0] == ("window_post", 0, 5)
    assert seen[-1] == ("window_post", 5, 5)


def test_a_cancelled_token_stops_proving(manifest):
    token = CancelToken()
    token.cancel()
    with NativeProver() as prover, pytest.raises(PoStCancelled, match="cancelled"):
        prover.window_post(window_task(manifest, SEED), cancel=token)


def test_cancelling_while_proving_stops_at_the_next_check(manifest):
    token = CancelToken()
    with NativeProver() as prover, pytest.raises(PoStCancelled, match="after 0 of 5"):
        prover.window_post(
            window_task(manifest, SEED), progress=lambda *a: token.cancel(), cancel=token
        )


def test_an_exception_in_the_progress_callback_propagates(manifest):
    def boom(*args):
        raise KeyError("from progress")

    with NativeProver() as prover, pytest.raises(KeyError, match="from progress"):
        prover.winning_post(winning_task(manifest, SEED), progress=boom)


def test_build_tree_refuses_a_sealed_file_of_the_wrong_size(tmp_path):
    sealed = tmp_path / "sealed"
    sealed.write_bytes(bytes(4096))
    with NativeProver() as prover, pytest.raises(SectorFaultError, match="4096 bytes"):
        prover.build_tree("StackedDrgWindow2KiBV1", sealed, tmp_path / "cache", bytes(32))


def test_rows_to_discard_must_leave_a_tree(tmp_path):
    sealed = tmp_path / "sealed"
    sealed.write_bytes(bytes(2048))
    with (
        NativeProver(options={"rows_to_discard": 6}) as prover,
        pytest.raises(InvalidTaskError, match="at most 5"),
    ):
        prover.build_tree("StackedDrgWindow2KiBV1", sealed, tmp_path / "cache", bytes(32))


def test_a_closed_prover_refuses_work(manifest):
    prover = NativeProver()
    prover.close()
    prover.close()
    with pytest.raises(ProverError, match="closed"):
        prover.window_post(window_task(manifest, SEED))


# What the vendor libraries below share: the ABI's version, a handle, an empty last error.
PLAIN_VENDOR = r"""
#include <stdlib.h>
#include "dext_prover.h"
struct dext_handle { int unused; };
uint32_t dext_abi_version(void) { return 1; }
dext_handle *dext_open(const char *o) { (void)o; return calloc(1, sizeof(dext_handle)); }
void dext_close(dext_handle *h) { free(h); }
const char *dext_last_error(dext_handle *h) { (void)h; return ""; }
"""


# A vendor library's WinningPoSt, for those that prove WindowPoSt only.
NO_WINNING_POST = r"""
int32_t dext_winning_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                          const volatile int32_t *x, dext_result **out) {
    (void)h; (void)t; (void)p; (void)c; (void)x;
    *out = NULL;
    return DEXT_ERR_INTERNAL;
}
"""


# A vendor library that returns DEXT_OK with results that break the ABI's contract, chosen by
# the task's miner id; its progress phases are not text.
LIAR_VENDOR = (
    PLAIN_VENDOR
    + r"""
#include <string.h>
static dext_result *result(size_t proofs, size_t faults) {
    dext_result *r = calloc(1, sizeof *r);
    r->proofs = calloc(proofs + 1, sizeof *r->proofs);
    for (size_t i = 0; i < proofs; i++) { r->proofs[i].ptr = malloc(1); r->proofs[i].len = 1; }
    r->proof_count = proofs;
    r->faults = calloc(faults + 1, sizeof *r->faults);
    r->fault_count = faults;
    return r;
}
int32_t dext_window_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                         const volatile int32_t *x, dext_result **out) {
    (void)h; (void)x;
    uint64_t first = t->replicas[0].sector_id, second = t->replicas[1].sector_id;
    *out = NULL;
    switch (t->miner_id) {
    case 1: return DEXT_OK;  /* no result at all */
    case 2: *out = result(0, 0); return DEXT_OK;
    case 3: *out = result(1, 1); (*out)->faults[0] = first; return DEXT_OK;
    case 4: *out = result(0, 1); (*out)->faults[0] = 999999; return DEXT_OK;
    case 5: *out = result(0, 3); (*out)->faults[0] = second; (*out)->faults[1] = first;
            (*out)->faults[2] = second; return DEXT_OK;  /* out of order, twice */
    case 6: *out = result(1, 0); return DEXT_OK;  /* one blob for all partitions */
    case 7: return DEXT_ERR_IO;  /* and no message */
    case 8: return DEXT_ERR_INVALID_PROOF;  /* dext_verify's status, from a proving call */
    case 9: *out = result(2, 0); (*out)->proofs[1].len = 0; return DEXT_OK;  /* an empty one */
    default:
        p(c, "\xff\xfe not utf-8", 0, 1);
        p(c, NULL, 1, 1);
        *out = result(3, 0);
        return DEXT_OK;
    }
}
int32_t dext_winning_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                          const volatile int32_t *x, dext_result **out) {
    (void)h; (void)p; (void)c; (void)x;
    *out = result(t->miner_id == 1 ? 2 : 1, 0);
    if (t->miner_id == 2) (*out)->proofs[0].len = 0;
    return DEXT_OK;
}
void dext_result_free(dext_result *r) {
    for (size_t i = 0; i < r->proof_count; i++) free(r->proofs[i].ptr);
    free(r->proofs); free(r->faults); free(r);
}
"""
)


def test_a_result_that_breaks_the_abi_contract_is_an_error_naming_the_library(tmp_path, manifest):
    src = tmp_path / "liar.c"
    src.write_text(LIAR_VENDOR)
    lib = compile_library(tmp_path / "libliar.so", [src])
    task = window_task(manifest, SEED)
    ids = [r.sector_id for r in task.replicas]
    broken = {
        1: "returned DEXT_OK without a result",
        2: "returned DEXT_OK with neither proofs nor faults",
        3: "returned DEXT_OK with 1 proofs beside its faults",
        4: "returned DEXT_OK with faults for sectors not in the task: [999999]",
        9: "returned DEXT_OK with proof 1 of 0 bytes",
    }
    seen = []
    with NativeProver(lib) as prover:
        for miner, words in broken.items():
            with pytest.raises(ProverError) as raised:
                prover.window_post(msgspec.structs.replace(task, miner_id=miner))
            assert f"window_post: {lib} {words}" in str(raised.value)
            assert "a window_post result holds its proofs, or the task's faulty" in str(
                raised.value
            )
        with pytest.raises(ProverError) as raised:
            prover.window_post(msgspec.structs.replace(task, miner_id=7))
        assert (
            f"window_post: DEXT_ERR_IO, and the library gave no message (status 4 from {lib})"
            in (str(raised.value))
        )
        with pytest.raises(ProverError) as raised:
            prover.window_post(msgspec.structs.replace(task, miner_id=8))
        assert not isinstance(raised.value, VerifyError)
        assert f"DEXT_ERR_INVALID_PROOF, and the library gave no message (status 6 from {lib})" in (
            str(raised.value)
        )
        # One proof for several partitions, as filecoin-proofs answers: passed on.
        assert len(prover.window_post(msgspec.structs.replace(task, miner_id=6)).proofs) == 1
        faulty = prover.window_post(msgspec.structs.replace(task, miner_id=5))
        assert faulty.faults == sorted(ids[:2]) and faulty.proofs == []
        # Progress with a phase that is not text, or none, does not cost the proof.
        good = prover.window_post(task, progress=lambda *a: seen.append(a))
        assert len(good.proofs) == 3 and good.faults == []
        assert seen == [("\ufffd\ufffd not utf-8", 0, 1)]
        with pytest.raises(ProverError, match=r"winning_post: .* returned DEXT_OK with 2 proofs"):
            prover.winning_post(msgspec.structs.replace(winning_task(manifest, SEED), miner_id=1))
        with pytest.raises(
            ProverError, match=r"winning_post: .* returned DEXT_OK with proof 0 of 0"
        ):
            prover.winning_post(msgspec.structs.replace(winning_task(manifest, SEED), miner_id=2))
        assert len(prover.winning_post(winning_task(manifest, SEED)).proofs) == 1


def test_ctrl_c_while_the_library_builds_a_tree_stops_sectors_create(tmp_path):
    """The KeyboardInterrupt of a Ctrl-C is raised as the progress callback is entered (the C
    code between its calls runs no Python): it stops the work instead of being dropped."""
    import signal
    import sys

    args = ["sectors", "create", "--proof-type", "StackedDrgWindow8MiBV1", "--count", "40",
            "--miner", "1000", "--out", str(tmp_path / "s")]  # fmt: skip
    with subprocess.Popen(
        [sys.executable, "-m", "damocles_ext", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # SIGINT as a shell leaves it, whatever the test runner did with it (one signal() call,
        # which takes no lock another thread could hold across the fork).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    ) as proc:  # fmt: skip
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("sector 1/40 tree: "):  # said from inside the library's call
                break
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "sectors: 40/40" not in err


# A vendor library whose DEXT_OK results cannot be read as they are: a count beside a NULL array,
# a count or a length no task has. Chosen by the task's miner id; each would fault the process
# that reads it.
GARBAGE_VENDOR = (
    PLAIN_VENDOR
    + r"""
static dext_result *one_proof(size_t len) {
    dext_result *r = calloc(1, sizeof *r);
    r->proofs = calloc(1, sizeof *r->proofs);
    r->proofs[0].ptr = malloc(8);
    r->proofs[0].len = len;
    r->proof_count = 1;
    return r;
}
int32_t dext_window_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                         const volatile int32_t *x, dext_result **out) {
    (void)h; (void)p; (void)c; (void)x;
    dext_result *r;
    switch (t->miner_id) {
    case 1: r = calloc(1, sizeof *r); r->proof_count = 2; break;  /* proofs NULL */
    case 2: r = calloc(1, sizeof *r); r->fault_count = 1; break;  /* faults NULL */
    case 3: r = one_proof(100); free(r->proofs[0].ptr); r->proofs[0].ptr = NULL; break;
    case 4: r = one_proof((size_t)-1); break;
    case 5: r = one_proof(8); r->proof_count = (size_t)-1; break;
    case 6:  /* one fault of the task, one not */
        r = calloc(1, sizeof *r);
        r->faults = calloc(2, sizeof *r->faults);
        r->faults[0] = t->replicas[0].sector_id;
        r->faults[1] = 999999;
        r->fault_count = 2;
        break;
    default:  /* zeroes (sector 0 is in the task) and a count as if uninitialised */
        r = calloc(1, sizeof *r);
        r->faults = calloc(2, sizeof *r->faults);
        r->fault_count = (size_t)1 << 40;
    }
    *out = r;
    return DEXT_OK;
}
void dext_result_free(dext_result *r) {
    if (r && r->proofs) free(r->proofs[0].ptr);
    if (r) { free(r->proofs); free(r->faults); free(r); }
}
"""
    + NO_WINNING_POST
)


FAULTY_VENDOR = (
    PLAIN_VENDOR
    + r"""
int32_t dext_window_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                         const volatile int32_t *x, dext_result **out) {
    (void)h; (void)p; (void)c; (void)x;
    dext_result *r = calloc(1, sizeof *r);
    r->faults = calloc(1, sizeof *r->faults);
    r->faults[0] = t->replicas[0].sector_id;
    r->fault_count = 1;
    *out = r;
    return DEXT_OK;
}
void dext_result_free(dext_result *r) { if (r) { free(r->faults); free(r); } }
"""
    + NO_WINNING_POST
)


# A library that breaks "result is NULL on error" and clears its message at each call into it.
FORGETFUL_VENDOR = (
    r"""
#include <stdlib.h>
#include <string.h>
#include "dext_prover.h"
struct dext_handle { int unused; };
static char said[64];
uint32_t dext_abi_version(void) { return 1; }
dext_handle *dext_open(const char *o) { (void)o; return calloc(1, sizeof(dext_handle)); }
void dext_close(dext_handle *h) { free(h); }
const char *dext_last_error(dext_handle *h) { (void)h; return said; }
int32_t dext_window_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                         const volatile int32_t *x, dext_result **out) {
    (void)h; (void)t; (void)p; (void)c; (void)x;
    strcpy(said, "sector 1: its sealed file is cut short");
    *out = calloc(1, sizeof **out);
    return DEXT_ERR_SECTOR;
}
void dext_result_free(dext_result *r) { said[0] = 0; free(r); }
"""
    + NO_WINNING_POST
)


def test_a_librarys_error_is_read_before_its_result_is_freed(tmp_path):
    from helpers.child import Child
    from helpers.child import window_task as bare_task

    from damocles_ext.protocol import dext

    src = tmp_path / "forgetful.c"
    src.write_text(FORGETFUL_VENDOR)
    lib = compile_library(tmp_path / "libforgetful.so", [src])
    with Child("window_post", "native", f"library={lib}") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, bare_task()))
        response, _ = child.next_of(dext.Response)
        assert "sector 1: its sealed file is cut short" in (response.error or ""), response
        child.close_stdin()


def test_a_vendor_library_is_not_held_to_bellpersons_lock_files_unless_asked(tmp_path, monkeypatch):
    # A library built on bellperson takes bellman.*.lock itself: held around its call by the
    # plugin too (the default was gpu_lock = true), it waited on itself for ever. Here another
    # process holds the GPU lock: the library, not held to it, answers at once.
    from helpers.child import Child
    from helpers.child import window_task as bare_task

    from damocles_ext import gpulock
    from damocles_ext.protocol import dext

    src = tmp_path / "faulty.c"
    src.write_text(FAULTY_VENDOR)
    lib = compile_library(tmp_path / "libfaulty.so", [src])
    lockdir = tmp_path / "tmpdir"
    lockdir.mkdir()
    hold = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666);"
        " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(lockdir / "bellman.gpu.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert gpulock.lock_state(lockdir)["gpu"] is True
        monkeypatch.setenv("TMPDIR", str(lockdir))
        with Child("window_post", "native", f"library={lib}") as child:
            child.next_of(dext.Hello)
            child.send_msg(dext.Request(1, bare_task()))
            response, before = child.next_of(dext.Response)
            assert response.output is not None and response.output.faults == [0], response
            assert not [m for m in before if isinstance(m, dext.Progress) and m.phase == "gpu-lock"]
            child.close_stdin()
    finally:
        holder.kill()
        holder.wait()


def test_a_result_with_garbage_pointers_or_counts_fails_the_request_not_the_child(tmp_path):
    from helpers.child import Child
    from helpers.child import window_task as bare_task

    from damocles_ext.protocol import dext

    src = tmp_path / "garbage.c"
    src.write_text(GARBAGE_VENDOR)
    lib = compile_library(tmp_path / "libgarbage.so", [src])
    broken = {
        1: "with proof_count 2 and a NULL proofs array",
        2: "with fault_count 1 and a NULL faults array",
        3: "with proof 0 of 100 bytes at a NULL pointer",
        4: f"with proof 0 of {2**64 - 1} bytes",
        5: f"with proof_count {2**64 - 1} for a task of 2 sectors",
        6: "with faults for sectors not in the task: [999999]",
        # Read up to its count, zeroes of the task's sector 0, the child died (SIGSEGV).
        7: f"with fault_count {2**40} for a task of 2 sectors",
    }
    with Child("window_post", "native", f"library={lib}", "gpu_lock=false") as child:
        child.next_of(dext.Hello)
        for miner, words in broken.items():
            child.send_msg(dext.Request(miner, bare_task(miner=miner)))
            response, _ = child.next_of(dext.Response)
            assert response.id == miner and response.output is None
            assert f"ProverError: window_post: {lib} returned DEXT_OK {words}" in (
                response.error or ""
            ), (response.error, child.stderr)
        child.close_stdin()
        assert child.wait() == 0, child.stderr


# A vendor library that leaves a thread behind after its first window_post returns, and lets it
# report progress with that call's ctx during the second call.
LATE_VENDOR = (
    PLAIN_VENDOR
    + r"""
#include <pthread.h>
#include <semaphore.h>
static dext_progress_fn first_progress;
static void *first_ctx;
static sem_t go;
static pthread_t late;
static int calls;
static void *report_late(void *unused) {
    (void)unused;
    sem_wait(&go);
    first_progress(first_ctx, "late", 1, 1);
    return NULL;
}
int32_t dext_window_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                         const volatile int32_t *x, dext_result **out) {
    (void)h; (void)t; (void)x;
    if (calls++ == 0) {
        first_progress = p;
        first_ctx = c;
        sem_init(&go, 0, 0);
        pthread_create(&late, NULL, report_late, NULL);
    } else if (calls == 2) {
        sem_post(&go);
        pthread_join(late, NULL);
    }
    dext_result *r = calloc(1, sizeof *r);
    r->proofs = calloc(1, sizeof *r->proofs);
    r->proofs[0].ptr = malloc(1);
    r->proofs[0].ptr[0] = 7;
    r->proofs[0].len = 1;
    r->proof_count = 1;
    *out = r;
    return DEXT_OK;
}
void dext_result_free(dext_result *r) {
    if (r) { free(r->proofs[0].ptr); free(r->proofs); free(r); }
}
"""
    + NO_WINNING_POST
)


def test_progress_reported_after_its_call_returned_is_ignored_with_a_warning(tmp_path):
    from helpers.child import Child
    from helpers.child import window_task as bare_task

    from damocles_ext.protocol import dext

    src = tmp_path / "late.c"
    src.write_text(LATE_VENDOR)
    lib = compile_library(tmp_path / "liblate.so", [src], "-pthread")
    with Child("window_post", "native", f"library={lib}", "gpu_lock=false") as child:
        child.next_of(dext.Hello)
        frames = []
        for request in (1, 2, 3):
            child.send_msg(dext.Request(request, bare_task()))
            response, skipped = child.next_of(dext.Response)
            frames += skipped
            assert response.id == request and response.error is None, child.stderr
            assert response.output.proofs == [b"\x07"]
        # Not forwarded as the progress of the call that runs when it comes.
        assert not [f for f in frames if isinstance(f, dext.Progress) and f.phase == "late"]
        child.close_stdin()
        assert child.wait() == 0, child.stderr
    assert child.stderr.count("reported progress (phase 'late') for a call that had returned") == 1


# A vendor library whose every failure comes with a message of 4 MiB, and whose progress phase
# is 1 MiB long (a log put in each, say).
VERBOSE_VENDOR = (
    r"""
#include <stdlib.h>
#include <string.h>
#include "dext_prover.h"
struct dext_handle { int unused; };
static char *said;
static char *text(size_t n, char c) {
    char *s = malloc(n + 1);
    memset(s, c, n);
    s[n] = 0;
    return s;
}
uint32_t dext_abi_version(void) { return 1; }
dext_handle *dext_open(const char *o) { (void)o; return calloc(1, sizeof(dext_handle)); }
void dext_close(dext_handle *h) { free(h); }
const char *dext_last_error(dext_handle *h) { (void)h; return said ? said : ""; }
int32_t dext_window_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                         const volatile int32_t *x, dext_result **out) {
    (void)h; (void)t; (void)x;
    char *phase = text((size_t)1 << 20, 'P');
    p(c, phase, 0, 1);
    free(phase);
    if (!said) said = text((size_t)4 << 20, 'E');
    *out = NULL;
    return DEXT_ERR_INTERNAL;
}
void dext_result_free(dext_result *r) { free(r); }
"""
    + NO_WINNING_POST
)


def test_a_huge_library_message_is_cut_before_it_reaches_the_log_or_the_answer(tmp_path):
    from helpers.child import Child
    from helpers.child import window_task as bare_task

    from damocles_ext.protocol import dext

    src = tmp_path / "verbose.c"
    src.write_text(VERBOSE_VENDOR)
    lib = compile_library(tmp_path / "libverbose.so", [src])
    with Child("window_post", "native", f"library={lib}", "gpu_lock=false") as child:
        child.next_of(dext.Hello)
        for request in (1, 2):
            child.send_msg(dext.Request(request, bare_task()))
            response, frames = child.next_of(dext.Response)
            assert response.id == request and response.output is None
            error = response.error or ""
            assert error.startswith("ProverError: window_post: EEEE"), error[:200]
            assert "EEEE... (cut: the library's message is longer than 16384 bytes)" in error
            assert len(error) < 17_000
            phases = {f.phase for f in frames if isinstance(f, dext.Progress)}
            assert phases <= {"P" * dext.MAX_PHASE_CHARS + "..."}, phases
        child.close_stdin()
        assert child.wait() == 0
    # Each failure is logged once, cut as the answer is: not 4 MiB of it.
    assert len(child.stderr) < 2 * 17_000 + 2_000, len(child.stderr)


# A vendor library that opens one handle per process (one GPU context, say) and refuses a
# second; its proofs take until the test lets them end.
ONE_HANDLE_VENDOR = (
    r"""
#include <stdlib.h>
#include "dext_prover.h"
struct dext_handle { int unused; };
static int opened;
static const char *said = "";
uint32_t dext_abi_version(void) { return 1; }
dext_handle *dext_open(const char *o) {
    (void)o;
    if (__atomic_fetch_add(&opened, 1, __ATOMIC_SEQ_CST)) {
        said = "cuCtxCreate: out of memory";
        return NULL;
    }
    return calloc(1, sizeof(dext_handle));
}
void dext_close(dext_handle *h) { free(h); }
const char *dext_last_error(dext_handle *h) { (void)h; return said; }
int32_t dext_window_post(dext_handle *h, const dext_post_task *t, dext_progress_fn p, void *c,
                         const volatile int32_t *x, dext_result **out) {
    (void)h; (void)t;
    *out = NULL;
    p(c, "spin", 0, 1);
    while (!dext_cancel_requested(x)) {}
    return DEXT_ERR_CANCELLED;
}
void dext_result_free(dext_result *r) { free(r); }
"""
    + NO_WINNING_POST
)


def test_a_library_refusing_a_second_handle_is_told_to_serve_one_request_at_a_time(tmp_path):
    from helpers.child import Child
    from helpers.child import window_task as bare_task

    from damocles_ext.protocol import dext

    src = tmp_path / "one.c"
    src.write_text(ONE_HANDLE_VENDOR)
    lib = compile_library(tmp_path / "libone.so", [src])
    args = ("window_post", "native", f"library={lib}", "gpu_lock=false")
    with Child(*args, extra=["--capacity", "2"]) as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, bare_task()))
        child.next_of(dext.Progress)  # request 1 has the one handle
        child.send_msg(dext.Request(2, bare_task()))
        response, _ = child.next_of(dext.Response)
        assert response.id == 2 and response.output is None
        assert response.error == (
            f"NativeLoadError: {lib}: dext_open failed: cuCtxCreate: out of memory; it was"
            " opening handle 2 of this child (one per request proved at once): if the library"
            " allows only one handle per process, set Concurrent = 1 on this child's table"
        )
        child.send_msg(dext.Cancel(1))
        response, _ = child.next_of(dext.Response)
        assert response.id == 1 and response.error == "cancelled"
        child.close_stdin()
        assert child.wait() == 0, child.stderr
