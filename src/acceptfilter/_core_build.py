"""cffi builder (API mode, out of line) for the C I/O core ``acceptfilter._core``.

Run by setuptools through ``cffi_modules`` in setup.py; the C sources live in
``csrc/`` at the top of the source tree (and of the sdist, via MANIFEST.in).
"""

from __future__ import annotations

import os
import re

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
#: The C headers, next to this file in a source tree or an sdist (src/acceptfilter/../../csrc).
CSRC = os.path.join(_HERE, os.pardir, os.pardir, "csrc")
_DEFINE = re.compile(r"^#define\s+([A-Z_][A-Z0-9_]*)\s+(0[xX][0-9a-fA-F]+|\d+)\b")


def cdef_from_header(path: str) -> str:
    """The cffi declarations, generated from the C header so the two cannot drift.

    cffi parses C declarations but not the preprocessor: keep ``#define NAME
    <integer>`` constants, drop every other directive (include guard, includes).
    """
    lines = []
    with open(path, encoding="ascii") as header:
        for line in header:
            if line.lstrip().startswith("#"):
                match = _DEFINE.match(line.strip())
                if match:
                    lines.append(f"#define {match.group(1)} {match.group(2)}\n")
                continue
            lines.append(line)
    return "".join(lines)


CDEF = cdef_from_header(os.path.join(CSRC, "afcore.h"))

#: The compiled readiness matchers (csrc/afmatch.h): a self-contained library the core links in.
MATCH_CDEF = cdef_from_header(os.path.join(CSRC, "afmatch.h"))

#: The ready queue (csrc/afqueue.h): connections waiting for accept(), filled by the core and the engine.
QUEUE_CDEF = cdef_from_header(os.path.join(CSRC, "afqueue.h"))

#: One look at a listen socket's next connection (csrc/aflook.h), shared with acceptfilter._look.
LOOK_CDEF = cdef_from_header(os.path.join(CSRC, "aflook.h"))

ffibuilder = FFI()
ffibuilder.cdef(MATCH_CDEF)  # first: afcore.h uses afm_prog,
ffibuilder.cdef(QUEUE_CDEF)  # af_addr and afq
ffibuilder.cdef(LOOK_CDEF)
ffibuilder.cdef(CDEF)

# AF_SANITIZE=1 builds the core with AddressSanitizer + UBSan (see README, Reliability).
_extra_compile = ["-O2", "-Wall", "-Wextra", "-std=c11"]
_extra_link: list[str] = []
if os.environ.get("AF_SANITIZE"):
    _flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    # AF_DEBUG turns on the core's assertions on connection state transitions.
    _extra_compile = ["-O1", "-g", "-Wall", "-Wextra", "-std=c11", "-DAF_DEBUG", *_flags]
    _extra_link = list(_flags)

ffibuilder.set_source(
    "acceptfilter._core",
    '#include "afcore.h"\n#include "afmatch.h"\n#include "afqueue.h"',
    # Relative to the project root, where setuptools runs the build.
    sources=["csrc/afcore.c", "csrc/aflook.c", "csrc/afmatch.c", "csrc/afqueue.c", "csrc/afsrc.c"],
    include_dirs=["csrc"],
    extra_compile_args=_extra_compile,
    extra_link_args=_extra_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
