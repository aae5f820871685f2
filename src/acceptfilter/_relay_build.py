"""cffi builder (API mode, out of line) for ``acceptfilter._relay``: the relay's byte pump in C.

Separate from the I/O core (``_core_build.py``) on purpose: the relay is an
application of the framework, not part of the accept path, and the package
works without it (the relay then pumps with os.splice from Python threads).
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
int afr_relay(int a, int b, uint64_t *a_to_b, uint64_t *b_to_a);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "acceptfilter._relay",
    '#include "afrelay.h"',
    # Relative to the project root, where setuptools runs the build.
    sources=["csrc/afrelay.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
