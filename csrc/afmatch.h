/* afmatch: compiled readiness matchers, protocol-agnostic.
 *
 * A matcher is a small program (a list of afm_insn) that a filter declares in
 * Python (acceptfilter.matcher) and that this interpreter runs on the bytes a
 * connection has sent so far.  It only ever answers
 *
 *   AFM_DONE   certainly ready: the filter's Python check ACCEPTs these bytes
 *              with consume = afm_state.consume (proven by the fuzz contract),
 *   AFM_MORE   not sure yet; afm_state.need = a lower bound on the further
 *              bytes before the answer can change (for SO_RCVLOWAT: exact for
 *              a field or a frame, 1 inside a literal, run or search), or
 *   AFM_NO     never sure on any extension of these bytes: ask Python.
 *
 * Properties the interpreter keeps whatever the program and the bytes:
 *   - it never reads data[i] for i >= min(len, prog->max_bytes);
 *   - per-connection state is one fixed-size afm_state (no allocation);
 *   - it is resumable: each call continues where the last one stopped, so a
 *     growing prefix is scanned once, not once per arrival; the answer for a
 *     prefix does not depend on how it was split;
 *   - work is bounded: afm_check() refuses a program with a loop that may not
 *     consume input (as a BPF verifier would: every backward jump closes a loop
 *     in which some instruction always moves the cursor forward, and none moves
 *     it back), so a program runs at most ncode * (max_bytes + 1) instructions;
 *     the interpreter still cuts off (AFM_NO) after ncode * (max_bytes + 2).
 * Any malformed program is refused by afm_check(): call it once per program
 * (acceptfilter.cmatcher does) and never afm_run a program it refused.
 */
#ifndef AFMATCH_H
#define AFMATCH_H

#include <stdint.h>

/* Instructions.  pos is the cursor; "limit" is the innermost frame end
 * (AFM_PUSH) or max_bytes when no frame is open.  Reading or moving past the
 * limit is AFM_NO; reading a byte that has not arrived yet is AFM_MORE. */
#define AFM_NEED 1     /* a: n, b: 0|1      wait until pos + n bytes (b=1: the frame) are there */
#define AFM_SKIP 2     /* a: n              pos += n                                            */
#define AFM_LIT 3      /* a: lit off, b: n  bytes at pos equal lits[a..a+n); pos += n           */
#define AFM_RUN 4      /* a: set, b: min, c: max   greedy run of bytes in set a                */
#define AFM_FIELD 5    /* a: off, b: width, c: mask, d: lo, e: hi   lo <= (v & mask) <= hi     */
#define AFM_PUSH 6     /* a: off, b: width, c: adjust, d: lo, e: hi   open frame pos+v+adjust   */
#define AFM_POP 7      /* a: 0 exact (pos must be the frame end), 1 seek (pos = frame end)      */
#define AFM_VEC 8      /* a: width          pos += width + v (a length-prefixed vector)         */
#define AFM_JEQ 9      /* a: off, b: width, c: value, d: target   jump if the field equals c   */
#define AFM_JGE_END 10 /* a: target         jump if pos >= limit                                */
#define AFM_JUMP 11    /* a: target                                                             */
#define AFM_SEARCH 12  /* a: lit off, b: count, c: back   first of several terminators          */
#define AFM_READY 13   /* a: 0 consume 0, 1 consume pos   certain once pos bytes are there      */
#define AFM_FAIL 14    /* never certain                                                         */
#define AFM_OP_MAX 14

/* Field widths are 1..4 bytes, big-endian; OR AFM_LE for little-endian. */
#define AFM_LE 0x100
/* In a SEARCH table, a length byte ORed with AFM_TERM_FAIL marks a terminator
 * that, found first, makes the answer AFM_NO (e.g. a line end the filter accepts
 * but the matcher does not certify). */
#define AFM_TERM_FAIL 0x80

/* Results (AFM_READY is the instruction; the result is AFM_DONE). */
#define AFM_MORE 0
#define AFM_DONE 1
#define AFM_NO 2

#define AFM_MAX_DEPTH 8
#define AFM_MAX_CODE 4096
#define AFM_MAX_TERM 16

typedef struct afm_insn {
    int64_t op, a, b, c, d, e;
} afm_insn;

/* A compiled program.  sets: nsets * 32 bytes (256-bit byte sets, bit b of
 * byte b>>3 is set for member b).  lits: literals; a SEARCH table at lits[a]
 * is b entries of [length byte (| AFM_TERM_FAIL)][bytes]. */
typedef struct afm_prog {
    const afm_insn *code;
    uint32_t ncode;
    const uint8_t *sets;
    uint32_t nsets;
    const uint8_t *lits;
    uint32_t nlits;
    uint32_t max_bytes;
} afm_prog;

/* One connection's matcher state: constant size, zeroed by afm_init. */
typedef struct afm_state {
    uint32_t pc;
    uint32_t pos;
    uint32_t aux;   /* RUN: bytes matched so far; SEARCH: next start + 1 */
    uint32_t depth;
    uint32_t ends[AFM_MAX_DEPTH];
    uint32_t status; /* AFM_MORE, AFM_DONE or AFM_NO */
    uint32_t consume;
    uint32_t need;
    uint64_t steps;
} afm_state;

/* 0 when the program is well formed, else -(index of the first bad instruction + 1),
 * or -(AFM_MAX_CODE + 1) for a bad header (no code, too long, max_bytes 0). Operands
 * first (a SEARCH's back may not exceed its shortest terminator), then loops: a
 * loop that may not consume input is named by the instruction that jumps back. */
int afm_check(const afm_prog *p);
void afm_init(afm_state *s);
/* Run on data[0..len) (the whole prefix seen so far, as peeked); returns s->status. */
int afm_run(const afm_prog *p, afm_state *s, const uint8_t *data, uint32_t len);

#endif
