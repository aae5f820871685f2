# cffi has no pyproject.toml key for its builders (cffi#55); everything else is in pyproject.toml.
from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithoutBuilder(build_py):
    """Leave the cffi builder out of wheels: it runs at build time (cffi_modules), never at import time."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) not in (("acceptfilter", "_core_build"), ("acceptfilter", "_relay_build"))]


setup(
    cffi_modules=["src/acceptfilter/_core_build.py:ffibuilder", "src/acceptfilter/_relay_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithoutBuilder},
    # The core only uses the stable ABI: one wheel serves every CPython >= 3.11.
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
