"""cffi build script (API mode) for the reference prover: produces `damocles_ext._native`.

Run by setuptools through `cffi_modules` in setup.py. The cdef is the part of
native/include/dext_prover.h between the cdef markers, so the header stays the single source of
the ABI. The compiled module also carries that cdef text (`lib._dext_cdef_text()`), from which
damocles_ext.post.native builds the ABI-mode FFI that opens vendor libraries with `dlopen`: an
installed package has no native/ directory to read it from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "include" / "dext_prover.h"


# The cdef text as a C string literal: JSON string escaping is valid C for ASCII text.
def _c_string(text: str) -> str:
    if not text.isascii():
        raise SystemExit(f"{HEADER}: the cdef section must be ASCII")
    return json.dumps(text)


# A progress callback implemented in Python; its C pointer is handed to the prover (the compiled
# reference or a dlopen'ed vendor library alike) with a handle to the Python state as ctx.
PYTHON_CALLBACKS = """
extern "Python" void _dext_py_progress(void *ctx, const char *phase, uint64_t done,
                                       uint64_t total);
const char *_dext_cdef_text(void);
void _dext_cancel_set(int32_t *flag);
"""

# The host's side of the cancel contract in dext_prover.h: Python cannot make an atomic store
# itself (a cffi item assignment is a plain one), so it calls this, for vendor libraries too.
CANCEL_SETTER = """
static void _dext_cancel_set(int32_t *flag) { __atomic_store_n(flag, 1, __ATOMIC_RELEASE); }
"""

# Warnings are errors in our own build so that a new warning is fixed, not shipped. A newer
# compiler can add warnings to these sets and fail an install that worked: setting
# DAMOCLES_EXT_NATIVE_WERROR=0 keeps the warnings and drops -Werror (native/README.md).
# -Wconversion is left to the stricter sanitizer build of the tests (tests/test_native_sanitizers.py):
# here it would also apply to cffi's generated code, which we do not control.
WARNINGS = ["-Wall", "-Wextra", "-Wformat=2", "-Wshadow", "-Wstrict-prototypes", "-Wvla"]


def _warning_flags() -> list[str]:
    werror = os.environ.get("DAMOCLES_EXT_NATIVE_WERROR", "1").strip()
    if werror not in ("0", "1"):
        raise SystemExit(
            f"DAMOCLES_EXT_NATIVE_WERROR={werror!r}: use 1 (warnings are errors, the default) or 0"
        )
    return WARNINGS + (["-Werror"] if werror == "1" else [])


def header_cdef(header: Path = HEADER) -> str:
    """The declarations between `/* cdef-begin */` and `/* cdef-end */` in the ABI header."""
    text = header.read_text()
    try:
        start = text.index("/* cdef-begin */") + len("/* cdef-begin */")
        end = text.index("/* cdef-end */")
    except ValueError:
        raise SystemExit(f"{header}: cdef markers not found") from None
    return text[start:end]


def _rel(path: Path) -> str:
    # setuptools wants source paths relative to the project root (the build's cwd).
    return os.path.relpath(path, Path.cwd())


COMPILE_ARGS = ["-O2", "-fvisibility=hidden", *_warning_flags()]
_CDEF = header_cdef()
ffibuilder = FFI()
ffibuilder.cdef(_CDEF + PYTHON_CALLBACKS)
ffibuilder.set_source(
    "damocles_ext._native",
    '#include "dext_prover.h"\n'
    f"static const char *_dext_cdef_text(void) {{ return {_c_string(_CDEF)}; }}\n" + CANCEL_SETTER,
    sources=[_rel(p) for p in sorted((HERE / "src").glob("*.c"))],
    include_dirs=[_rel(HERE / "include")],
    libraries=["crypto"],
    extra_compile_args=COMPILE_ARGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
