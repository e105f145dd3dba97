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
pure = compiled["pure_asked"]()
ext_modules = []
sources = None  # what mypyc is about to read (compiled.fingerprint); None: pure
if not pure:
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        raise SystemExit(
            f"damocles-ext: building needs mypy 2.4.1, whose mypyc compiles the request book and"
            f" the scheduler ({exc}); pip installs it for the build unless told not to"
            f" (--no-build-isolation), or set {compiled['PURE_ENV']}=1 to build without them"
        ) from None
    sources = compiled["fingerprint"](package)
    relative = Path("damocles_ext")  # (mypyc names the modules by their paths from here)
    paths = [str(compiled["source_path"](name, relative)) for name in compiled["COMPILED"]]
    ext_modules = mypycify(paths, group_name="damocles_ext.compiled")


class BuildExtRecorded(build_ext):
    """build_ext, then the record of what it compiled (compiled.py), where it builds: the source
    tree in place (an editable install), else the wheel's tree."""

    def run(self) -> None:
        where = package if self.inplace else Path(self.build_lib) / "damocles_ext"
        if where.is_dir():
            compiled["forget_record"](where)  # (a build that fails leaves none)
        if pure and not self.inplace:
            # A build directory keeps what an earlier build put in it: none of it goes out.
            for name in (*compiled["COMPILED"], compiled["SHARED"]):
                while (ext := compiled["extension_path"](name, where)) is not None:
                    ext.unlink()
        super().run()
        where.mkdir(parents=True, exist_ok=True)
        compiled["write_record"](where, sources)


setup(
    cffi_modules=["native/build_ffi.py:ffibuilder"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtRecorded},
)
