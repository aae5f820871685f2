"""cffi builder (API mode, out of line) for the C I/O core ``acceptfilter._core``.

Run by setuptools through ``cffi_modules`` in setup.py; the C sources live in
``csrc/`` at the top of the source tree (and of the sdist, via MANIFEST.in).
"""

from __future__ import annotations

import os

from cffi import FFI

CDEF = """
typedef struct af_event { int fd; int kind; int err; uint32_t len; uint32_t age_us; const char *data; } af_event;
typedef struct af_stats {
    uint64_t accepted; uint64_t accept_errors; uint64_t fd_exhaustion;
    uint64_t peeks; uint64_t bytes_peeked; uint64_t buffered; uint32_t held; uint32_t paused;
} af_stats;
typedef struct af_addr { int family; int port; uint32_t flowinfo; uint32_t scope_id; char host[64]; } af_addr;
typedef struct af_core af_core;
#define AF_EV_DATA 1
#define AF_EV_EOF 2
#define AF_EV_FULL 3
#define AF_EV_TIMEOUT 4
#define AF_EV_EVICT 5
#define AF_EV_ERROR 6
#define AF_EV_SHUTDOWN 7
af_core *af_new(int listen_fd, uint32_t max_bytes, int64_t timeout_ms, uint32_t max_held,
                uint32_t max_events, int *err);
void af_free(af_core *c);
int af_fileno(const af_core *c);
int af_poll(af_core *c, int timeout_ms, af_event **events);
int64_t af_next_timeout_ms(const af_core *c);
int af_release(af_core *c, int fd, uint32_t consume, af_addr *addr);
int af_close(af_core *c, int fd, int reset);
void af_wake(af_core *c);
int af_adopt(af_core *c, int fd);
int af_stop_accepting(af_core *c);
int af_drain(af_core *c, af_event **events);
void af_get_stats(const af_core *c, af_stats *out);
"""

# --- compiled readiness matchers (csrc/afmatch.h; issue 13) -------------------------------
# Kept apart from the core's cdef: afmatch is a self-contained library the core links in.
MATCH_CDEF = """
typedef struct afm_insn { int64_t op, a, b, c, d, e; } afm_insn;
typedef struct afm_prog {
    const afm_insn *code; uint32_t ncode; const uint8_t *sets; uint32_t nsets;
    const uint8_t *lits; uint32_t nlits; uint32_t max_bytes;
} afm_prog;
typedef struct afm_state {
    uint32_t pc; uint32_t pos; uint32_t aux; uint32_t depth; uint32_t ends[8];
    uint32_t status; uint32_t consume; uint32_t need; uint64_t steps;
} afm_state;
int afm_check(const afm_prog *p);
void afm_init(afm_state *s);
int afm_run(const afm_prog *p, afm_state *s, const uint8_t *data, uint32_t len);
"""
MATCH_SOURCES = ["csrc/afmatch.c"]
MATCH_INCLUDE = '#include "afmatch.h"'
# -------------------------------------------------------------------------------------------

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.cdef(MATCH_CDEF)

# AF_SANITIZE=1 builds the core with AddressSanitizer + UBSan (see README, Reliability).
_extra_compile = ["-O2", "-Wall", "-Wextra", "-std=c11"]
_extra_link: list[str] = []
if os.environ.get("AF_SANITIZE"):
    _flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    _extra_compile = ["-O1", "-g", "-Wall", "-Wextra", "-std=c11", *_flags]
    _extra_link = list(_flags)

ffibuilder.set_source(
    "acceptfilter._core",
    '#include "afcore.h"\n' + MATCH_INCLUDE,
    # Relative to the project root, where setuptools runs the build.
    sources=["csrc/afcore.c", *MATCH_SOURCES],
    include_dirs=["csrc"],
    extra_compile_args=_extra_compile,
    extra_link_args=_extra_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
