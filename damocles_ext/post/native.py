"""Load a prover implementing native/include/dext_prover.h and call it from Python.

`NativeProver()` uses the reference prover compiled into `damocles_ext._native` at install time
(cffi API mode); `NativeProver("/path/libvendor.so")` opens a vendor library with `dlopen` (cffi
ABI mode) through an FFI built from the header's cdef, which the compiled module carries. The
progress trampoline is the compiled module's `extern "Python"` function in both modes.
The GIL is released while the library works (cffi does so around every C call).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Self

from ..errors import ProverError, UsageError
from ..protocol.dext import MAX_PHASE_CHARS
from ..tasks import (
    Output,
    Task,
    WindowPoSt,
    WindowPoStOutput,
    WinningPoSt,
    WinningPoStOutput,
    stage_of,
)
from .errors import (
    InvalidTaskError,
    PoStCancelled,
    ProverOutOfMemory,
    SectorFaultError,
    VerifyError,
    split_step_not_a_proof,
)

if TYPE_CHECKING:
    from types import TracebackType

    from cffi import FFI

    from ..hookspecs import CancelToken

ABI_VERSION = 1
REQUIRED_SYMBOLS = (
    "dext_abi_version",
    "dext_open",
    "dext_close",
    "dext_last_error",
    "dext_window_post",
    "dext_winning_post",
    "dext_result_free",
)
OPTIONAL_SYMBOLS = ("dext_verify", "dext_build_tree")

Progress = Callable[[str, int, int], None]


log = logging.getLogger(__name__)


class NativeLoadError(UsageError):
    """A native prover library cannot be used (missing, not loadable, wrong symbols or ABI)."""


# The cffi objects below (the compiled module, its lib, FFI data) are Any: types-cffi types C data
# without its struct fields and a library without its functions, so every use would need an ignore.
def _compiled() -> Any:
    try:
        # Built by cffi at install time (native/build_ffi.py): an extension without a stub.
        from .. import _native  # type: ignore[attr-defined]
    except ImportError as exc:
        raise NativeLoadError(
            f"the built-in native prover (damocles_ext._native) is not built ({exc}); reinstall "
            "damocles-ext with `pip install -e .` on a machine with a C compiler and the OpenSSL "
            "headers (libssl-dev)"
        ) from None
    return _native


_abi_ffi: Any = None
_abi_ffi_lock = threading.Lock()


def _abi_ffi_for(native: Any) -> Any:
    global _abi_ffi
    with _abi_ffi_lock:
        if _abi_ffi is None:
            from cffi import FFI

            ffi = FFI()
            ffi.cdef(native.ffi.string(native.lib._dext_cdef_text()).decode())
            _abi_ffi = ffi
        return _abi_ffi


class _CallState:
    """What the progress trampoline needs during one call (the C ctx is its number in _calls)."""

    __slots__ = ("_set_flag", "cancel", "error", "flag", "progress")

    def __init__(self, native: Any, progress: Progress | None, cancel: CancelToken | None) -> None:
        self.progress = progress
        self.cancel = cancel
        # The cancel flag of the header's contract: owned here, read by the library with atomic
        # loads, so it is only ever set through the compiled atomic store, never `flag[0] = 1`.
        self.flag = native.ffi.new("int32_t *", 1 if cancel is not None and cancel.cancelled else 0)
        self._set_flag = native.lib._dext_cancel_set
        self.error: BaseException | None = None

    def set_cancelled(self) -> None:
        """Tell the library to stop (from any thread; idempotent)."""
        self._set_flag(self.flag)


# The calls in progress, by the number passed to the library as their ctx. A library that calls
# progress after its call returned (from a thread it left running) then finds no call and is
# ignored: a cffi handle to a collected object would abort the process (or, its memory reused by
# the next call's, forward the stale report as that call's progress).
_calls: dict[int, _CallState] = {}
_call_numbers = itertools.count(1)
_stale_reported = False

#: The most of a library's message (dext_last_error) read, and of a progress phase (a phase is
#: cut to dext.MAX_PHASE_CHARS later): a runaway or unterminated string is not read further.
MAX_MESSAGE_BYTES = 16 * 1024
MAX_PHASE_BYTES = 4 * MAX_PHASE_CHARS + 1


def _text(ffi: Any, ptr: Any, most: int) -> str:
    """The NUL-terminated string at `ptr` (not NULL), read up to `most` bytes."""
    raw = ffi.string(ptr, most + 1)
    if len(raw) <= most:
        return raw.decode(errors="replace")
    return (
        f"{raw[:most].decode(errors='replace')}... (cut: the library's message is longer than"
        f" {most} bytes)"
    )


def _stale_progress(ffi: Any, phase: Any) -> None:
    global _stale_reported
    if not _stale_reported:
        _stale_reported = True
        phase = ffi.string(phase, MAX_PHASE_BYTES).decode(errors="replace") if phase else ""
        log.warning(
            "a native prover library reported progress (phase %r) for a call that had returned;"
            " ignored, and not said again (dext_prover.h: progress is called on the calling"
            " thread, during the call)",
            phase,
        )


_trampoline_installed = False


def _install_trampoline(native: Any) -> None:
    global _trampoline_installed
    if _trampoline_installed:
        return
    ffi = native.ffi

    def on_error(_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        # Raised outside the callback's `try`: a Ctrl-C's KeyboardInterrupt comes as the
        # callback is entered, since the C code between its calls runs no Python. cffi would
        # print and drop it, and the work would go on: keep it for the caller, as the `try` does.
        ctx = tb.tb_frame.f_locals.get("ctx") if tb is not None else None
        if ctx is None:
            return  # (raised before the callback had its arguments: cffi prints it)
        state = _calls.get(int(ffi.cast("uintptr_t", ctx)))
        if state is None:
            return  # a call that had returned: nobody to stop
        if state.error is None:
            state.error = exc
        state.set_cancelled()

    @ffi.def_extern(onerror=on_error)
    def _dext_py_progress(ctx: FFI.CData, phase: FFI.CData, done: int, total: int) -> None:
        state = _calls.get(int(ffi.cast("uintptr_t", ctx)))
        if state is None:
            _stale_progress(ffi, phase)
            return
        try:
            if state.progress is not None and phase != ffi.NULL:
                # A sloppy phase text must not fail a proof (the child's report is as lenient).
                text = ffi.string(phase, MAX_PHASE_BYTES).decode(errors="replace")
                state.progress(text, int(done), int(total))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller after the C call
            state.error = exc
            state.set_cancelled()
        # The library checks the int32 flag; the progress call is where a Python cancel token
        # gets copied into it (the reference library reports at least every 20 ms).
        if state.cancel is not None and state.cancel.cancelled:
            state.set_cancelled()

    _trampoline_installed = True


class NativeProver:
    """A prover behind the C ABI; one handle, used by one call at a time."""

    def __init__(
        self,
        library_path: str | os.PathLike | None = None,
        options: Mapping[str, object] | None = None,
    ) -> None:
        native = _compiled()
        _install_trampoline(native)
        self._native = native
        self._api_ffi = native.ffi
        self._consts = native.lib  # a dlopen'ed library carries functions only
        self._handle = None
        self._lock = threading.Lock()
        if library_path is None:
            self.library = "built-in reference prover"
            self._ffi = native.ffi
            self._lib = native.lib
            self._callback = native.lib._dext_py_progress
        else:
            # dlopen searches the system paths for a name without a slash; we mean this file.
            self.library = os.path.abspath(os.fspath(library_path))
            self._ffi = _abi_ffi_for(native)
            self._lib = self._dlopen(self.library)
            # Same C function, seen through the other FFI's types.
            self._callback = self._ffi.cast(
                "dext_progress_fn", self._address(native.lib._dext_py_progress)
            )
        self.abi_version = int(self._lib.dext_abi_version())
        if self.abi_version != ABI_VERSION:
            raise NativeLoadError(
                f"{self.library} implements dext prover ABI version {self.abi_version}, expected "
                f"{ABI_VERSION}; use a build of the library for ABI {ABI_VERSION}"
            )
        opts = json.dumps(dict(options or {})).encode()
        handle = self._lib.dext_open(opts)
        if handle == self._ffi.NULL:
            why = self._last_error(None).strip() or (
                f"it gave no message (dext_last_error(NULL) was empty); the options it was given:"
                f" {opts.decode()} (PluginOptions but for library and gpu_lock)"
            )
            raise NativeLoadError(f"{self.library}: dext_open failed: {why}")
        self._handle = handle

    def _dlopen(self, path: str) -> Any:
        if not os.path.exists(path):
            raise NativeLoadError(
                f"native prover library {path} does not exist; set PluginOptions.library to "
                "the path of a shared library implementing native/include/dext_prover.h"
            )
        try:
            # RTLD_LOCAL: two vendor libraries (or ours) never resolve each other's symbols.
            lib = self._ffi.dlopen(path, self._ffi.RTLD_NOW | self._ffi.RTLD_LOCAL)
        except OSError as exc:
            raise NativeLoadError(
                f"cannot load native prover library {path}: {_dlopen_error(str(exc), path)}"
            ) from None
        missing = [name for name in REQUIRED_SYMBOLS if not _has_symbol(lib, name)]
        if len(missing) == len(REQUIRED_SYMBOLS):
            raise NativeLoadError(
                f"{path} is not a dext prover: it exports none of the functions of "
                f"native/include/dext_prover.h ({', '.join(missing)}); if it was built with "
                '-fvisibility=hidden, mark them __attribute__((visibility("default"))) (see '
                "native/README.md)"
            )
        if missing:
            raise NativeLoadError(
                f"{path} is not a dext prover: missing symbol{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} (see native/include/dext_prover.h)"
            )
        return lib

    def _address(self, cdata: Any) -> int:
        return int(self._api_ffi.cast("uintptr_t", cdata))

    @contextlib.contextmanager
    def _context(self, state: _CallState) -> Iterator[Any]:
        """The ctx pointer to pass for `state`, valid while the context lasts."""
        number = next(_call_numbers)
        _calls[number] = state
        try:
            yield self._ffi.cast("void *", number)
        finally:
            del _calls[number]

    def _flag(self, state: _CallState) -> Any:
        """The cancel flag as this library's FFI types it (the flag lives in the API FFI)."""
        if self._ffi is self._api_ffi:
            return state.flag
        return self._ffi.cast("int32_t *", self._address(state.flag))

    def has(self, symbol: str) -> bool:
        """Whether the library exports an optional function such as dext_build_tree."""
        return _has_symbol(self._lib, symbol)

    def _last_error(self, handle: Any) -> str:
        msg = self._lib.dext_last_error(handle if handle is not None else self._ffi.NULL)
        return _text(self._ffi, msg, MAX_MESSAGE_BYTES) if msg != self._ffi.NULL else ""

    def _check(
        self, status: int, state: _CallState | None, what: str, said: str | None = None
    ) -> None:
        if state is not None and state.error is not None:
            raise state.error
        if status == 0:
            return
        error = (self._last_error(self._handle) if said is None else said).strip() or (
            f"{_status_name(self._consts, status)}, and the library gave no message"
        )
        message = f"{what}: {error}" if what else error
        lib = self._consts
        if status == lib.DEXT_ERR_INVALID_ARGUMENT:
            raise InvalidTaskError(message)
        if status == lib.DEXT_ERR_SECTOR:
            raise SectorFaultError(message)
        if status == lib.DEXT_ERR_CANCELLED:
            raise PoStCancelled(message)
        if status == lib.DEXT_ERR_INVALID_PROOF and not what:  # dext_verify's own answer only
            raise VerifyError(message)
        if status == lib.DEXT_ERR_NOMEM:
            # Not the task's fault: say so, or it reads like a bad request and nobody retries it.
            raise ProverOutOfMemory(
                f"{message}: {self.library} ran out of memory (DEXT_ERR_NOMEM); the task itself "
                "may be fine: give the prover more memory (fewer concurrent requests on this "
                "child, a higher memory limit) and retry"
            )
        raise ProverError(f"{message} (status {status} from {self.library})")

    def _handle_or_raise(self) -> Any:
        if self._handle is None:
            raise ProverError(f"{self.library}: the prover is closed")
        return self._handle

    def _c_task(self, task: Task) -> tuple[Any, list[Any]]:
        ffi = self._ffi
        keep: list[Any] = []
        replicas = ffi.new("dext_replica[]", len(task.replicas))
        keep.append(replicas)
        for i, rep in enumerate(task.replicas):
            c = replicas[i]
            c.sector_id = _u64(rep.sector_id, f"replica {i}: sector_id")
            ffi.memmove(
                c.comm_r, _bytes32(rep.comm_r, f"replica {i} (sector {rep.sector_id}): comm_r"), 32
            )
            for field in ("cache_dir", "sealed_file"):
                path = os.fsencode(getattr(rep, field))
                if b"\0" in path:
                    raise InvalidTaskError(
                        f"replica {i} (sector {rep.sector_id}): {field} has a NUL byte"
                    )
                buf = ffi.new("char[]", path)
                keep.append(buf)
                setattr(c, field, buf)
        ptype = ffi.new("char[]", task.proof_type.encode())
        keep.append(ptype)
        ctask = ffi.new("dext_post_task *")
        ctask.miner_id = _u64(task.miner_id, "miner_id")
        ctask.proof_type = ptype
        ffi.memmove(ctask.seed, _bytes32(task.seed, "seed"), 32)
        ctask.replicas = replicas
        ctask.replica_count = len(task.replicas)
        return ctask, keep

    def _prove(
        self, fn_name: str, task: Task, progress: Progress | None, cancel: CancelToken | None
    ) -> tuple[list[bytes], list[int]]:
        ffi = self._ffi
        ctask, keep = self._c_task(task)
        state = _CallState(self._native, progress, cancel)
        out = ffi.new("dext_result **")
        proofs: list[bytes] = []
        faults: list[int] = []
        unreadable: str | None = None
        with self._lock, _cancel_watcher(cancel, state), self._context(state) as ctx:
            handle = self._handle_or_raise()
            status = getattr(self._lib, fn_name)(
                handle, ctask, self._callback, ctx, self._flag(state), out
            )
            result = out[0]
            got_result = result != ffi.NULL
            said = None  # an error's message, read before the result is freed (a call, for the
            if got_result and status != 0:  # ABI, after which the message may be gone)
                said = self._last_error(self._handle)
            if got_result:
                try:
                    if status == 0:  # an error's result is only freed: nothing in it is used
                        proofs, faults, unreadable = _copy_result(ffi, result, task)
                finally:
                    self._lib.dext_result_free(result)
            self._check(status, state, fn_name.removeprefix("dext_"), said)
        del keep
        broken = unreadable or _broken_result(fn_name, task, got_result, proofs, faults)
        if broken:
            raise ProverError(
                f"{fn_name.removeprefix('dext_')}: {self.library} returned DEXT_OK {broken}"
                " (dext_prover.h: a window_post result holds its proofs, or the task's faulty"
                " sectors and no proof; a winning_post result one proof)"
            )
        return proofs, sorted(set(faults))

    def window_post(
        self, task: WindowPoSt, progress: Progress | None = None, cancel: CancelToken | None = None
    ) -> WindowPoStOutput:
        """Prove a WindowPoSt; faults come back in the output (and no proofs), as damocles wants."""
        proofs, faults = self._prove("dext_window_post", task, progress, cancel)
        return WindowPoStOutput(proofs=proofs, faults=faults)

    def winning_post(
        self, task: WinningPoSt, progress: Progress | None = None, cancel: CancelToken | None = None
    ) -> WinningPoStOutput:
        """Prove a WinningPoSt (SectorFaultError when the chosen sector is faulty)."""
        proofs, _ = self._prove("dext_winning_post", task, progress, cancel)
        return WinningPoStOutput(proofs=proofs)

    def prove(
        self, task: Task, progress: Progress | None = None, cancel: CancelToken | None = None
    ) -> Output:
        """window_post or winning_post, by the task's type."""
        if isinstance(task, WindowPoSt):
            return self.window_post(task, progress, cancel)
        if isinstance(task, WinningPoSt):
            return self.winning_post(task, progress, cancel)
        raise InvalidTaskError(
            f"a {stage_of(task)} task is a split WindowPoSt step, which the C ABI has no entry "
            "point for: prove it with damocles_ext.post.split"
        )

    def verify(self, task: Task, output: Output) -> None:
        """Check proofs with the library's dext_verify; VerifyError with its reason if invalid."""
        if not self.has("dext_verify"):
            raise ProverError(f"{self.library} does not implement the optional dext_verify")
        if not isinstance(output, WindowPoStOutput | WinningPoStOutput):
            raise split_step_not_a_proof(stage_of(output))
        if isinstance(output, WindowPoStOutput) and output.faults:
            raise VerifyError(
                f"the output reports faulty sectors {list(output.faults)} and no valid proof of "
                "the task; prove again without them"
            )
        ffi = self._ffi
        ctask, keep = self._c_task(task)
        bufs = [ffi.from_buffer("uint8_t[]", p) for p in output.proofs]
        cproofs = ffi.new("dext_bytes[]", max(1, len(bufs)))
        for i, buf in enumerate(bufs):
            cproofs[i].ptr = ffi.cast("uint8_t *", buf)
            cproofs[i].len = len(buf)
        with self._lock:
            status = self._lib.dext_verify(self._handle_or_raise(), ctask, cproofs, len(bufs))
            self._check(status, None, "")
        del keep, bufs

    def build_tree(
        self,
        proof_type: str,
        sealed_file: str | os.PathLike,
        cache_dir: str | os.PathLike,
        comm_c: bytes,
        progress: Progress | None = None,
        cancel: CancelToken | None = None,
    ) -> bytes:
        """Write cache_dir's p_aux and tree file for a sealed file; returns comm_r."""
        if not self.has("dext_build_tree"):
            raise ProverError(f"{self.library} does not implement the optional dext_build_tree")
        if len(comm_c) != 32:
            raise InvalidTaskError(f"comm_c must be 32 bytes, got {len(comm_c)}")
        ffi = self._ffi
        state = _CallState(self._native, progress, cancel)
        comm_r = ffi.new("uint8_t[32]")
        with self._lock, _cancel_watcher(cancel, state), self._context(state) as ctx:
            status = self._lib.dext_build_tree(
                self._handle_or_raise(),
                proof_type.encode(),
                os.fsencode(sealed_file),
                os.fsencode(cache_dir),
                comm_c,
                comm_r,
                self._callback,
                ctx,
                self._flag(state),
            )
            self._check(status, state, "build_tree")
        return bytes(ffi.buffer(comm_r, 32))

    def close(self) -> None:
        """Release the library's handle (idempotent)."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return  # __init__ failed before there was anything to release
        with lock:
            if self._handle is not None:
                self._lib.dext_close(self._handle)
                self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter shutdown the library may already be gone; nothing left to release then.
        with contextlib.suppress(Exception):
            self.close()


_WATCH_INTERVAL = 0.05


@contextlib.contextmanager
def _cancel_watcher(cancel: CancelToken | None, state: _CallState) -> Iterator[None]:
    """Copy a cancel token into the C flag from a helper thread while the library works.

    The progress trampoline does the same, but a vendor library may report progress rarely; this
    bounds the delay between `cancel.cancel()` and the flag the library polls to ~50 ms.
    """
    if cancel is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_WATCH_INTERVAL):
            if cancel.cancelled:
                state.set_cancelled()
                return

    thread = threading.Thread(target=watch, name="dext-cancel-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _u64(value: object, what: str) -> int:
    """`value`, when it is an integer in 0..2**64 - 1 (a C uint64_t); InvalidTaskError otherwise.
    A Struct built in Python is not checked by msgspec, and cffi's own refusal (OverflowError,
    TypeError) says neither which field nor that the task is what is wrong."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidTaskError(f"{what} must be an integer, got {type(value).__name__}")
    if not 0 <= value < 2**64:
        raise InvalidTaskError(f"{what} {value} is not in 0..{2**64 - 1} (a uint64)")
    return value


def _bytes32(value: object, what: str) -> bytes:
    """`value`, when it is 32 bytes; InvalidTaskError otherwise. A Struct built in Python is not
    checked by msgspec, and ffi.memmove copies 32 bytes whatever the source's length: a short
    seed or comm_r would be padded with whatever memory follows it (a proof for another seed, a
    good sector reported faulty)."""
    if isinstance(value, str):  # (memoryview() refuses it too, but say what it is)
        raise InvalidTaskError(f"{what} must be 32 bytes, got str")
    try:
        data = bytes(memoryview(value))  # type: ignore[arg-type]
    except TypeError:
        raise InvalidTaskError(f"{what} must be 32 bytes, got {type(value).__name__}") from None
    if len(data) != 32:
        raise InvalidTaskError(f"{what} must be 32 bytes, got {len(data)} bytes")
    return data


def _status_name(lib: Any, status: int) -> str:
    """dext_prover.h's name of a status code (its constants, as the cffi build has them)."""
    names = (n for n in dir(lib) if n.startswith("DEXT_ERR_") and getattr(lib, n) == status)
    return next(names, "an unknown status")


#: More bytes than any PoSt proof has (a 64GiB WindowPoSt partition's vanilla proofs: ~59 MiB):
#: a length above it is garbage, which copying would read past the library's memory with.
MAX_PROOF_BYTES = 1 << 32


def _copy_result(ffi: Any, result: Any, task: Task) -> tuple[list[bytes], list[int], str | None]:
    """The proofs and faults of a DEXT_OK result, copied out of the library's memory; or how
    the result breaks the ABI so that it cannot be read (a NULL array with a count, a count or a
    length no task has): read as given, it would fault the process, not fail the request."""
    proof_count, fault_count = int(result.proof_count), int(result.fault_count)
    if proof_count and result.proofs == ffi.NULL:
        return [], [], f"with proof_count {proof_count} and a NULL proofs array"
    if fault_count and result.faults == ffi.NULL:
        return [], [], f"with fault_count {fault_count} and a NULL faults array"
    # One proof per partition (a partition holds at least one sector), or one for them all.
    most = max(1, len(task.replicas))
    if proof_count > most:
        return [], [], f"with proof_count {proof_count} for a task of {len(task.replicas)} sectors"
    proofs = []
    for i in range(proof_count):
        ptr, size = result.proofs[i].ptr, int(result.proofs[i].len)
        if size > MAX_PROOF_BYTES:
            return [], [], f"with proof {i} of {size} bytes"
        if size and ptr == ffi.NULL:
            return [], [], f"with proof {i} of {size} bytes at a NULL pointer"
        proofs.append(bytes(ffi.buffer(ptr, size)))
    known = {r.sector_id for r in task.replicas}
    if fault_count > len(task.replicas):  # more faults than sectors: a count no array has
        return [], [], f"with fault_count {fault_count} for a task of {len(task.replicas)} sectors"
    faults = []
    for i in range(fault_count):  # (a repeat is allowed, within the task's count)
        faults.append(int(result.faults[i]))
        if faults[-1] not in known:
            break  # reported as not in the task; a garbage count is not read any further
    return proofs, faults, None


def _broken_result(
    fn_name: str, task: Task, got_result: bool, proofs: list[bytes], faults: list[int]
) -> str | None:
    """How a library's DEXT_OK result breaks the ABI's contract, or None when it keeps it."""
    if not got_result:
        return "without a result"
    # No proof system has an empty proof: passed on, it would be sent to the chain as one.
    empty = next((i for i, proof in enumerate(proofs) if not proof), None)
    if empty is not None:
        return f"with proof {empty} of 0 bytes"
    if fn_name == "dext_winning_post":
        return None if len(proofs) == 1 else f"with {len(proofs)} proofs"
    if faults:
        unknown = sorted(set(faults) - {r.sector_id for r in task.replicas})
        if unknown:
            return f"with faults for sectors not in the task: {unknown[:10]}"
        return f"with {len(proofs)} proofs beside its faults" if proofs else None
    # Not counted against the partitions: filecoin-proofs (and so damocles' own processor)
    # answers one blob holding every partition's proof, the reference one per partition.
    return None if proofs or not task.replicas else "with neither proofs nor faults"


def _dlopen_error(said: str, path: str) -> str:
    """dlerror's text in cffi's OSError, without cffi's frame around it (its note on
    ctypes.util.find_library, about a search for `path` that is not ours), and what to do when
    it is a library `path` needs that the loader does not find."""
    said = said.split(".  Additionally, ctypes.util.find_library()", 1)[0]
    said = said.removeprefix(f"cannot load library '{path}': ")
    needed, _, why = said.partition(": cannot open shared object file")
    if needed != path and "No such file or directory" in why:  # not one it may not read
        said += (
            "; a library it needs is not found: install it, or give its directory in"
            " LD_LIBRARY_PATH (the Envs of the child's table)"
        )
    return said


def _has_symbol(lib: Any, name: str) -> bool:
    try:
        getattr(lib, name)
    except AttributeError:
        return False
    return True
