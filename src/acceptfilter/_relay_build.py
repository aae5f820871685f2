"""cffi builder (API mode, out of line) for ``acceptfilter._relay``: the relay's byte pumps in C.

Separate from the I/O core (``_core_build.py``) on purpose: the relay is an
application of the framework, not part of the accept path, and the package
works without it (the relay then pumps with os.splice from Python threads).

Two pumps: csrc/afloop.c, one epoll loop for every relayed connection of a
process (the default), and csrc/afrelay.c, one blocking call per connection
(the pump before it, kept as ``ACCEPTFILTER_RELAY_PUMP=thread`` to compare).
cffi releases the GIL around every call, so both run without it.
"""

from __future__ import annotations

import os

from cffi import FFI

CDEF = """
int afr_relay(int a, int b, uint64_t *a_to_b, uint64_t *b_to_a);

#define AFR_COPY 0
#define AFR_SPLICE 1
#define AFR_END_OK 0
#define AFR_END_CONNECT 1
#define AFR_END_CLIENT 2
#define AFR_END_BACKEND 3
#define AFR_END_STOPPED 4
struct afr_done { uint64_t id; uint64_t up; uint64_t down; int32_t why; int32_t err; };
struct afr_loop;
struct afr_loop *afr_loop_new(int mode);
int afr_loop_add(struct afr_loop *loop, int client, int backend, int connecting, const char *head, size_t head_len,
                 int connect_timeout_ms, uint64_t id);
int afr_loop_run(struct afr_loop *loop);
void afr_loop_stop(struct afr_loop *loop);
int afr_loop_reap(struct afr_loop *loop, struct afr_done *out, int max, int timeout_ms);
void afr_loop_stats(struct afr_loop *loop, uint64_t out[4]);
void afr_loop_free(struct afr_loop *loop);
"""

# AF_SANITIZE=1 builds with AddressSanitizer + UBSan, like the core (scripts/sanitize.sh).
_extra_compile = ["-O2", "-Wall", "-Wextra", "-std=gnu11", "-pthread"]
_extra_link = ["-pthread"]
if os.environ.get("AF_SANITIZE"):
    _flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    _extra_compile = ["-O1", "-g", "-Wall", "-Wextra", "-std=gnu11", "-pthread", *_flags]
    _extra_link = ["-pthread", *_flags]

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "acceptfilter._relay",
    '#include "afrelay.h"\n#include "afloop.h"',
    # Relative to the project root, where setuptools runs the build.
    sources=["csrc/afrelay.c", "csrc/afloop.c"],
    include_dirs=["csrc"],
    extra_compile_args=_extra_compile,
    extra_link_args=_extra_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
