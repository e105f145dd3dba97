# setup.py builds what pyproject.toml cannot declare: the cffi build of the native reference
# prover (cffi_modules), and the mypyc build of the request book and the scheduler
# (damocles_ext/compiled.py says which modules, and when their sources run instead). All
# metadata lives in pyproject.toml. DAMOCLES_EXT_PURE=1 at build time compiles none of them.
import os
import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

compiled = runpy.run_path(os.path.join("damocles_ext", "compiled.py"))
package = Path("damocles_ext").resolve()
ext_modules = []
cmdclass = {}
if os.environ.get(compiled["PURE_ENV"], "") in ("", "0"):
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        raise SystemExit(
            f"damocles-ext: building needs mypy 2.4.1, whose mypyc compiles the request book and"
            f" the scheduler ({exc}); pip installs it for the build unless told not to"
            f" (--no-build-isolation), or set {compiled['PURE_ENV']}=1 to build without them"
        ) from None
    # What mypyc is about to read: the record says so once the build succeeded, and the
    # package runs the sources instead while any of them differs (compiled.py).
    sources = compiled["fingerprint"](package)
    paths = [os.path.join(*name.split(".")) + ".py" for name in compiled["COMPILED"]]
    ext_modules = mypycify(paths, group_name="damocles_ext.compiled")

    class BuildExtRecorded(build_ext):
        def run(self) -> None:
            super().run()
            where = package if self.inplace else Path(self.build_lib) / "damocles_ext"
            compiled["write_record"](where, sources)

    cmdclass["build_ext"] = BuildExtRecorded
else:
    # Built without them: extensions of an earlier build left beside the sources do not run.
    compiled["write_record"](package, None)

setup(cffi_modules=["native/build_ffi.py:ffibuilder"], ext_modules=ext_modules, cmdclass=cmdclass)
