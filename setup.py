# setup.py builds what pyproject.toml cannot declare: the cffi build of the native reference
# prover (cffi_modules), and the mypyc build of the request book and the scheduler
# (damocles_ext/compiled.py says which modules, and when their sources run instead). All
# metadata lives in pyproject.toml. DAMOCLES_EXT_PURE=1 at build time compiles none of them.
import os
import runpy

from setuptools import setup

compiled = runpy.run_path(os.path.join("damocles_ext", "compiled.py"))
ext_modules = []
if os.environ.get(compiled["PURE_ENV"], "") in ("", "0"):
    from mypyc.build import mypycify

    paths = [os.path.join(*name.split(".")) + ".py" for name in compiled["COMPILED"]]
    ext_modules = mypycify(paths, group_name="damocles_ext.compiled")

setup(cffi_modules=["native/build_ffi.py:ffibuilder"], ext_modules=ext_modules)
