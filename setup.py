# cffi has no pyproject.toml key for its builders (cffi#55); everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["src/acceptfilter/_core_build.py:ffibuilder"])
