# cffi has no pyproject.toml key for its builders (cffi#55); everything else is in pyproject.toml.
import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

#: Build-time modules: they run here (cffi_modules, ext_modules), never at import time.
BUILDERS = ("_core_build", "_relay_build", "_look_build")


class BuildPyWithoutBuilder(build_py):
    """Leave the builders out of wheels."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (m[0] == "acceptfilter" and m[1] in BUILDERS)]


def _look_extension() -> Extension:
    """acceptfilter._look (csrc/pylook.c); loaded by path: the package itself is not built yet."""
    spec = importlib.util.spec_from_file_location("_look_build", Path("src/acceptfilter/_look_build.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Extension(**module.extension_kwargs())


setup(
    cffi_modules=["src/acceptfilter/_core_build.py:ffibuilder", "src/acceptfilter/_relay_build.py:ffibuilder"],
    ext_modules=[_look_extension()],
    cmdclass={"build_py": BuildPyWithoutBuilder},
    # The core only uses the stable ABI: one wheel serves every CPython >= 3.11.
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
