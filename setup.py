# Minimal setup.py: only here for the cffi build of the native reference prover (cffi_modules);
# all metadata lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
