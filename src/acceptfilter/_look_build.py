"""Build settings for ``acceptfilter._look`` (csrc/pylook.c), the CPython extension around af_look().

One place for setup.py (``ext_modules``) and scripts/sanitize.sh (the
AddressSanitizer + UBSan build), as ``_core_build`` is for the cffi core.
Never imported at run time: setup.py leaves it out of wheels.
"""

from __future__ import annotations

import os
from typing import Any

#: Relative to the project root, where setuptools runs the build.
SOURCES = ["csrc/pylook.c", "csrc/aflook.c", "csrc/afmatch.c"]
INCLUDE_DIRS = ["csrc"]


def extension_kwargs(root: str = "") -> dict[str, Any]:
    """``setuptools.Extension`` keyword arguments; ``root`` prefixes the source paths.

    The stable ABI (``Py_LIMITED_API`` is set in csrc/pylook.c), as for the
    cffi modules: one ``.abi3.so`` for every CPython >= 3.11.
    AF_SANITIZE=1 builds with AddressSanitizer + UBSan, like the core.
    """
    compile_args = ["-O2", "-Wall", "-Wextra", "-std=c11"]
    link_args: list[str] = []
    if os.environ.get("AF_SANITIZE"):
        flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        compile_args = ["-O1", "-g", "-Wall", "-Wextra", "-std=c11", *flags]
        link_args = list(flags)
    return {
        "name": "acceptfilter._look",
        "sources": [os.path.join(root, p) for p in SOURCES],
        "include_dirs": [os.path.join(root, p) for p in INCLUDE_DIRS],
        "extra_compile_args": compile_args,
        "extra_link_args": link_args,
        "py_limited_api": True,
    }
