# cffi has no pyproject.toml key for its builders (cffi#55); everything else is in pyproject.toml.
from setuptools import setup

setup(
    cffi_modules=["src/acceptfilter/_core_build.py:ffibuilder", "src/acceptfilter/_relay_build.py:ffibuilder"],
    # The core only uses the stable ABI: one wheel serves every CPython >= 3.11.
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
