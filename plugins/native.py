"""The `native` prover: a library implementing native/include/dext_prover.h, through cffi.

Without options it runs the reference prover in C compiled into damocles-ext at install time.
`PluginOptions` (or `--option K=V` to `damocles-ext child`):

    library          path of a vendor shared library implementing the header (loaded with dlopen,
                     cffi ABI mode); its ABI version and symbols are checked when the child starts
    rows_to_discard  the reference prover's tree rows not stored on disk (0..20, default 2); it only
                     matters when the library builds trees: proving reads it from the tree file
    gpu_lock         true / false: hold bellperson's bellman.priority.lock and bellman.gpu.lock
                     in TMPDIR around the proof, as a bellperson priority proof does, so this
                     child and a bellperson prover sharing its TMPDIR never prove at the same time
                     (in a split WindowPoSt: around the SNARK step only). Default: true for the
                     built-in reference prover, false with `library`: a vendor library built on
                     bellperson takes those locks itself, and one held around its call deadlocks
                     it (a flock through a second descriptor waits even in one process)
    any other key    passed to a vendor library's dext_open as JSON (the reference refuses it)

Each concurrent request gets its own library handle (the ABI lets a handle serve one call at a
time), so `--capacity N` proves N tasks at once.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from damocles_ext.hookspecs import CancelToken, Options, ProgressCallback, ProverSpec, hookimpl
from damocles_ext.stages import STAGES, WINDOW_POST_SPLIT  # the PoSt stages, the split steps

if TYPE_CHECKING:
    from damocles_ext.post.native import NativeProver
    from damocles_ext.tasks import Output, Task

MAX_ROWS_TO_DISCARD = 20  # the reference library's bound


def _rows_to_discard(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_ROWS_TO_DISCARD:
        return value
    return None


_ELF_MAGIC = b"\x7fELF"
_ET_DYN = 3
_PT_DYNAMIC = 2
_DT_FLAGS_1 = 0x6FFFFFFB
_DF_1_PIE = 0x08000000
_ELF_CLASS = {1: "32-bit", 2: "64-bit"}


def _library_problem(path: str) -> str | None:
    """Why dlopen would refuse `path`, told from its ELF header alone.

    Nothing of the library runs here (its constructors would run in the supervisor), so a
    library whose own dependencies are missing is still found only when the child opens it.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if len(header) < 20 or header[:4] != _ELF_MAGIC:
        return "is not a shared library (no ELF header)"
    order: Literal["little", "big"] = "little" if header[5] == 1 else "big"
    if int.from_bytes(header[16:18], order) != _ET_DYN:
        return "is an ELF file but not a shared library (an executable or an object file?)"
    if _is_pie(path, header):
        return "is a program (a position-independent executable), not a shared library"
    if _noexec(path):
        return (
            f"is on a filesystem mounted noexec ({_mount_point(path)}), from which dlopen cannot"
            " map a library; put it on another one, or remount that one without noexec"
        )
    try:
        with open("/proc/self/exe", "rb") as f:
            ours = f.read(20)
    except OSError:
        return None  # nothing to compare with; dlopen will tell
    if ours[:4] == _ELF_MAGIC and (header[4:6] != ours[4:6] or header[18:20] != ours[18:20]):
        machine = int.from_bytes(header[18:20], order)
        our_machine = int.from_bytes(ours[18:20], "little" if ours[5] == 1 else "big")
        return (
            f"is built for another machine ({_ELF_CLASS.get(header[4], '?')}, ELF machine "
            f"{machine}; this Python is {_ELF_CLASS.get(ours[4], '?')}, ELF machine {our_machine})"
        )
    return None


def _noexec(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_NOEXEC)
    except OSError:
        return False  # dlopen will tell


def _mount_point(path: str) -> str:
    """The mount point `path` is under (the longest one in /proc/self/mountinfo that holds it:
    a bind mount remounted noexec has the device of the file system below it)."""
    path = os.path.realpath(path)
    best = "/"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 5:
                    continue
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best):
                    best = point
    except OSError:
        pass
    return best


def _is_pie(path: str, ident: bytes) -> bool:
    """Whether the ELF file at `path` (`ident`: its first 20 bytes) has DF_1_PIE in its dynamic
    section: a program, which dlopen refuses, though its type is ET_DYN as a library's is."""
    wide = ident[4] == 2  # ELFCLASS64
    end = "<" if ident[5] == 1 else ">"
    # (e_phoff, e_phentsize, e_phnum) and (p_offset, p_filesz) where each layout keeps them.
    table = struct.Struct(end + ("Q14xHH" if wide else "I10xHH"))
    segment = struct.Struct(end + ("I4xQ16xQ" if wide else "II8xI"))
    entry = struct.Struct(end + ("QQ" if wide else "II"))
    try:
        with open(path, "rb") as f:
            f.seek(32 if wide else 28)
            ph_off, ph_size, ph_num = table.unpack(f.read(table.size))
            for i in range(min(ph_num, 256)):
                f.seek(ph_off + i * ph_size)
                p_type, offset, size = segment.unpack(f.read(segment.size))
                if p_type != _PT_DYNAMIC:
                    continue
                f.seek(offset)
                dynamic = f.read(min(size, 1 << 20))
                for tag, value in entry.iter_unpack(
                    dynamic[: len(dynamic) // entry.size * entry.size]
                ):
                    if tag == _DT_FLAGS_1:
                        return bool(value & _DF_1_PIE)
                    if tag == 0:  # DT_NULL: the end
                        return False
    except (OSError, struct.error):
        pass  # dlopen will tell
    return False


def validate_options(options: Options, stage: str | None = None) -> list[str]:
    """Problems with `native`'s options, each naming the key (and, for `stage`, the stage)."""
    problems = []
    library = options.get("library")
    if library is not None and stage in WINDOW_POST_SPLIT:
        problems.append(
            f"native: option 'library' cannot serve {stage}: a split WindowPoSt step needs the"
            " built-in reference library (the C ABI v1 has no vanilla or SNARK entry point);"
            " serve a vendor library from [[WdPost]]"
        )
    if library is not None:
        if not isinstance(library, str) or not library:
            problems.append(f"native: option 'library' must be a path, got {library!r}")
        elif not os.path.isfile(library):
            what = "a directory, not a file" if os.path.isdir(library) else "no such file"
            problems.append(
                f"native: option 'library' = {library!r}: {what}; give the path of a shared "
                "library implementing native/include/dext_prover.h"
            )
        elif (problem := _library_problem(library)) is not None:
            problems.append(
                f"native: option 'library' = {library!r}: {problem}; give the path of a shared "
                "library implementing native/include/dext_prover.h, built for this machine"
            )
    if "rows_to_discard" in options and _rows_to_discard(options["rows_to_discard"]) is None:
        problems.append(
            f"native: option 'rows_to_discard' must be an integer from 0 to "
            f"{MAX_ROWS_TO_DISCARD}, got {options['rows_to_discard']!r}"
        )
    if "gpu_lock" in options and not isinstance(options["gpu_lock"], bool):
        problems.append(
            f"native: option 'gpu_lock' must be true or false, got {options['gpu_lock']!r}"
        )
    if library is None:
        for key in sorted(set(options) - {"library", "rows_to_discard", "gpu_lock"}):
            problems.append(
                f"native: unknown option {key!r} for the built-in reference prover; known options: "
                "library, rows_to_discard, gpu_lock (other keys go to a vendor library's dext_open)"
            )
    return problems


class NativePoStProver:
    """Proves through one NativeProver handle per concurrent request."""

    name = "native"
    stages = STAGES

    def __init__(self, options: Options) -> None:
        from damocles_ext.post.native import NativeProver

        problems = validate_options(options)
        if problems:
            raise ValueError("; ".join(problems))
        library = options.get("library")
        # validate_options above rejected anything but a path string.
        self._library = library if isinstance(library, str) else None
        # Held around the reference prover's calls; a vendor library takes its own (see above).
        self._gpu_lock = options.get("gpu_lock", self._library is None)
        self._open_options: dict[str, object] = {
            k: v for k, v in options.items() if k not in ("library", "gpu_lock")
        }
        if "rows_to_discard" in self._open_options:
            self._open_options["rows_to_discard"] = _rows_to_discard(options["rows_to_discard"])
        self._factory = NativeProver
        self._lock = threading.Lock()
        # Opening the first handle now makes a bad library fail the child's start, not a request.
        first = self._open()
        self.version = f"dext-abi-{first.abi_version} ({first.library})"
        self._idle = [first]
        self._opened = 1  # handles opened

    def _open(self) -> NativeProver:
        return self._factory(self._library, self._open_options)

    @contextlib.contextmanager
    def _handle(self) -> Iterator[NativeProver]:
        with self._lock:
            prover = self._idle.pop() if self._idle else None
            opened = self._opened
        if prover is None:
            from damocles_ext.post.native import NativeLoadError

            try:
                prover = self._open()
            except NativeLoadError as exc:
                # The first one opened at start: this is a request beside another one's.
                raise NativeLoadError(
                    f"{exc}; it was opening handle {opened + 1} of this child (one per request"
                    " proved at once): if the library allows only one handle per process, set"
                    " Concurrent = 1 on this child's table"
                ) from None
            with self._lock:
                self._opened += 1
        try:
            yield prover
        finally:
            with self._lock:
                self._idle.append(prover)

    @contextlib.contextmanager
    def _gpu_section(self, progress: ProgressCallback, cancel: CancelToken) -> Iterator[None]:
        # The whole proof is the heavy phase: bellperson holds its priority lock for a whole
        # priority proof, and the reference library has no separate GPU phase to narrow it to.
        if not self._gpu_lock:
            yield
            return
        from damocles_ext import gpulock
        from damocles_ext.hookspecs import Cancelled

        progress("gpu-lock", 0, 1)
        try:
            with gpulock.priority_gpu_lock(gpulock.lock_dir(), cancelled=lambda: cancel.cancelled):
                progress("gpu-lock", 1, 1)
                yield
        except gpulock.LockCancelled as exc:
            raise Cancelled(str(exc)) from None

    def prove(self, task: Task, progress: ProgressCallback, cancel: CancelToken) -> Output:
        """Prove `task` with the library; a cancelled request raises hookspecs.Cancelled.

        Split WindowPoSt steps (damocles_ext.post.split): the vanilla step is the library's
        WindowPoSt, without the GPU lock (CPU and disk only); the SNARK step checks the vanilla
        proofs with the library's dext_verify, under the GPU lock.
        """
        from damocles_ext.post import PoStCancelled, split
        from damocles_ext.tasks import WindowPoStSnark, WindowPoStVanilla

        cancel.check()
        if self._library is not None and isinstance(task, WindowPoStVanilla | WindowPoStSnark):
            raise ValueError(
                f"a split WindowPoSt step needs the built-in reference library: the C ABI v1 of "
                f"{self._library} has no vanilla or SNARK entry point; serve it from [[WdPost]]"
            )
        with self._handle() as prover:
            try:
                if isinstance(task, WindowPoStVanilla):
                    return split.vanilla_step(
                        lambda t: prover.window_post(t, progress, cancel), task
                    )
                with self._gpu_section(progress, cancel):
                    if isinstance(task, WindowPoStSnark):
                        return split.snark_step(prover.verify, task, progress, cancel)
                    return prover.prove(task, progress, cancel)
            except PoStCancelled:
                cancel.check()
                raise

    def close(self) -> None:
        """Close every library handle."""
        with self._lock:
            idle, self._idle = self._idle, []
        for prover in idle:
            prover.close()


@hookimpl
def dext_provers() -> list[ProverSpec]:
    return [
        ProverSpec(
            name="native",
            stages=STAGES,
            description="a C-ABI prover library through cffi: the built-in reference PoSt prover "
            "in C, or a vendor's library (PluginOptions.library)",
            factory=NativePoStProver,
            validate_options=validate_options,
        )
    ]
