/* afmatch: the interpreter of compiled readiness matchers (see afmatch.h).
 *
 * Nothing here knows a protocol: the programs come from declarations in
 * the filters' Python modules, compiled by acceptfilter.matcher, which also holds a pure
 * Python mirror of this file with the same semantics (the reference the C
 * interpreter is tested against, instruction by instruction). */
#include "afmatch.h"

#include <string.h>

static int width_ok(int64_t w) {
    int64_t n = w & ~(int64_t)AFM_LE;
    return (w & ~(int64_t)(AFM_LE | 7)) == 0 && n >= 1 && n <= 4;
}

static int target_ok(const afm_prog *p, int64_t t) { return t >= 0 && t < (int64_t)p->ncode; }

static int u32_ok(int64_t v) { return v >= 0 && v <= (int64_t)UINT32_MAX; }

/* The shortest terminator of a SEARCH table (afm_check has checked the table). */
static int64_t search_min_len(const afm_prog *p, const afm_insn *in) {
    int64_t off = in->a, best = AFM_MAX_TERM + 1;
    for (int64_t t = 0; t < in->b; t++) {
        int64_t n = p->lits[off] & ~AFM_TERM_FAIL;
        if (n < best) best = n;
        off += 1 + n;
    }
    return best;
}

/* Whether the instruction always moves the cursor forward by at least one byte. */
static int consumes(const afm_prog *p, const afm_insn *in) {
    switch (in->op) {
    case AFM_SKIP: return in->a >= 1;
    case AFM_LIT: return 1;
    case AFM_RUN: return in->b >= 1;
    case AFM_VEC: return 1;
    case AFM_SEARCH: return search_min_len(p, in) > in->c;
    default: return 0;
    }
}

/* Successor k (0 or 1) of instruction i, or -1. */
static int64_t successor(const afm_prog *p, uint32_t i, int k) {
    const afm_insn *in = &p->code[i];
    int64_t next = i + 1 < p->ncode ? (int64_t)i + 1 : -1;
    switch (in->op) {
    case AFM_JUMP: return k == 0 ? in->a : -1;
    case AFM_JEQ: return k == 0 ? next : in->d;
    case AFM_JGE_END: return k == 0 ? next : in->a;
    case AFM_READY:
    case AFM_FAIL: return -1;
    default: return k == 0 ? next : -1;
    }
}

/* The verifier's loop rule, as a BPF verifier's: every loop consumes input. A depth-first
 * search over the instructions that do not consume (from each in order, successors in order)
 * finds a cycle among them if there is one; the instruction named is the one on that cycle
 * that jumps back (to itself or an earlier instruction). Returns its index, or -1. Since no
 * instruction moves the cursor back (SEARCH's back is at most its shortest terminator), a
 * program that passes loops at most max_bytes times. Mirrored by Program.check(). */
static int64_t loop_without_input(const afm_prog *p) {
    uint8_t color[AFM_MAX_CODE]; /* 0 unseen, 1 on the stack, 2 done; 3: consumes (not a node) */
    uint32_t stack[AFM_MAX_CODE];
    uint8_t tried[AFM_MAX_CODE]; /* successors of stack[d] looked at so far */
    for (uint32_t i = 0; i < p->ncode; i++) color[i] = consumes(p, &p->code[i]) ? 3 : 0;
    for (uint32_t root = 0; root < p->ncode; root++) {
        if (color[root]) continue;
        uint32_t depth = 0;
        stack[depth] = root;
        tried[depth++] = 0;
        color[root] = 1;
        while (depth) {
            uint32_t u = stack[depth - 1];
            if (tried[depth - 1] == 2) {
                color[u] = 2;
                depth--;
                continue;
            }
            int64_t v = successor(p, u, tried[depth - 1]++);
            if (v < 0 || color[v] == 2 || color[v] == 3) continue;
            if (color[v] == 1) { /* a cycle: stack[v's depth..] then back to v; name its backward jump */
                uint32_t from = depth - 1;
                while (stack[from] != (uint32_t)v) from--;
                for (uint32_t d = from; d + 1 < depth; d++)
                    if (stack[d + 1] <= stack[d]) return stack[d];
                return u; /* the edge u -> v closes it */
            }
            color[v] = 1;
            stack[depth] = (uint32_t)v;
            tried[depth++] = 0;
        }
    }
    return -1;
}

int afm_check(const afm_prog *p) {
    if (!p || !p->code || p->ncode == 0 || p->ncode > AFM_MAX_CODE || p->max_bytes == 0 ||
        (p->nsets && !p->sets) || (p->nlits && !p->lits))
        return -(AFM_MAX_CODE + 1);
    for (uint32_t i = 0; i < p->ncode; i++) {
        const afm_insn *in = &p->code[i];
        int ok = 1;
        switch (in->op) {
        case AFM_NEED:
            ok = u32_ok(in->a) && (in->b == 0 || in->b == 1);
            break;
        case AFM_SKIP:
            ok = u32_ok(in->a);
            break;
        case AFM_LIT:
            ok = u32_ok(in->a) && in->b >= 1 && in->b <= AFM_MAX_TERM * 16 && in->a + in->b <= (int64_t)p->nlits;
            break;
        case AFM_RUN:
            ok = in->a >= 0 && in->a < (int64_t)p->nsets && u32_ok(in->b) && u32_ok(in->c) && in->b <= in->c;
            break;
        case AFM_FIELD:
            ok = u32_ok(in->a) && width_ok(in->b) && u32_ok(in->c) && u32_ok(in->d) && u32_ok(in->e);
            break;
        case AFM_PUSH:
            ok = u32_ok(in->a) && width_ok(in->b) && in->c >= -(int64_t)UINT32_MAX && in->c <= (int64_t)UINT32_MAX &&
                 u32_ok(in->d) && u32_ok(in->e);
            break;
        case AFM_POP:
        case AFM_READY:
            ok = in->a == 0 || in->a == 1;
            break;
        case AFM_VEC:
            ok = width_ok(in->a);
            break;
        case AFM_JEQ:
            ok = u32_ok(in->a) && width_ok(in->b) && u32_ok(in->c) && target_ok(p, in->d);
            break;
        case AFM_JGE_END:
        case AFM_JUMP:
            ok = target_ok(p, in->a);
            break;
        case AFM_SEARCH: {
            ok = u32_ok(in->a) && in->b >= 1 && in->b <= 8 && in->c >= 0 && in->c <= AFM_MAX_TERM;
            int64_t off = in->a;
            for (int64_t t = 0; ok && t < in->b; t++) {
                if (off >= (int64_t)p->nlits) {
                    ok = 0;
                    break;
                }
                int64_t n = p->lits[off] & ~AFM_TERM_FAIL;
                ok = n >= 1 && n <= AFM_MAX_TERM && off + 1 + n <= (int64_t)p->nlits;
                off += 1 + n;
            }
            /* The cursor never moves back: back is at most the shortest terminator. */
            ok = ok && in->c <= search_min_len(p, in);
            break;
        }
        case AFM_FAIL:
            break;
        default:
            ok = 0;
        }
        if (!ok)
            return -(int)(i + 1);
    }
    int64_t loop = loop_without_input(p);
    return loop < 0 ? 0 : -(int)(loop + 1);
}

void afm_init(afm_state *s) { memset(s, 0, sizeof *s); }

/* Read a 1..4 byte field at q (the caller checked q + width <= avail). */
static uint32_t rd(const uint8_t *d, uint32_t q, int64_t w) {
    uint32_t n = (uint32_t)(w & 7), v = 0;
    if (w & AFM_LE) {
        for (uint32_t k = n; k-- > 0;)
            v = (v << 8) | d[q + k];
    } else {
        for (uint32_t k = 0; k < n; k++)
            v = (v << 8) | d[q + k];
    }
    return v;
}

static int finish(afm_state *s, int status) {
    s->status = (uint32_t)status;
    return status;
}

static int more(afm_state *s, uint64_t need) {
    s->need = need > UINT32_MAX ? UINT32_MAX : (uint32_t)need;
    return AFM_MORE;
}

/* Field access at pos + off: 1 readable, 0 not yet arrived, -1 never (past the limit). */
static int field_at(uint64_t q, int64_t w, uint64_t limit, uint64_t avail) {
    uint64_t end = q + (uint64_t)(w & 7);
    if (end > limit)
        return -1;
    return end <= avail;
}

int afm_run(const afm_prog *p, afm_state *s, const uint8_t *data, uint32_t len) {
    if (s->status != AFM_MORE)
        return (int)s->status;
    const uint64_t avail = len < p->max_bytes ? len : p->max_bytes;
    const uint64_t step_limit = (uint64_t)p->ncode * ((uint64_t)p->max_bytes + 2);
    s->need = 0;
    for (;;) {
        if (s->pc >= p->ncode || s->steps > step_limit)
            return finish(s, AFM_NO);
        const afm_insn *in = &p->code[s->pc];
        const uint64_t pos = s->pos;
        const uint64_t limit = s->depth ? s->ends[s->depth - 1] : p->max_bytes;
        uint64_t next_pc = (uint64_t)s->pc + 1;
        switch (in->op) {
        case AFM_NEED: {
            /* b = 1: the whole innermost frame (one wake-up per record with SO_RCVLOWAT = need) */
            uint64_t q = in->b ? limit : pos + (uint64_t)in->a;
            if (q > limit)
                return finish(s, AFM_NO);
            if (q > avail)
                return more(s, q - avail);
            break;
        }
        case AFM_SKIP: {
            uint64_t q = pos + (uint64_t)in->a;
            if (q > limit)
                return finish(s, AFM_NO);
            s->pos = (uint32_t)q;
            break;
        }
        case AFM_LIT: {
            uint64_t n = (uint64_t)in->b;
            if (pos + n > limit)
                return finish(s, AFM_NO);
            uint64_t have = avail > pos ? avail - pos : 0;
            if (have > n)
                have = n;
            if (have && memcmp(data + pos, p->lits + in->a, (size_t)have) != 0)
                return finish(s, AFM_NO);
            if (have < n) /* need 1: the next byte may already mismatch */
                return more(s, 1);
            s->pos = (uint32_t)(pos + n);
            break;
        }
        case AFM_RUN: {
            const uint8_t *set = p->sets + 32 * in->a;
            uint64_t count = s->aux;
            while (count < (uint64_t)in->c) {
                uint64_t q = pos + count;
                if (q >= limit)
                    break;
                if (q >= avail) {
                    s->aux = (uint32_t)count;
                    return more(s, 1);
                }
                uint8_t b = data[q];
                if (!(set[b >> 3] & (1u << (b & 7))))
                    break;
                count++;
            }
            if (count < (uint64_t)in->b)
                return finish(s, AFM_NO);
            s->aux = 0;
            s->pos = (uint32_t)(pos + count);
            break;
        }
        case AFM_FIELD:
        case AFM_JEQ:
        case AFM_PUSH:
        case AFM_VEC: {
            int64_t off = in->op == AFM_VEC ? 0 : in->a;
            int64_t w = in->op == AFM_VEC ? in->a : in->b;
            uint64_t q = pos + (uint64_t)off;
            int r = field_at(q, w, limit, avail);
            if (r < 0)
                return finish(s, AFM_NO);
            if (r == 0)
                return more(s, q + (uint64_t)(w & 7) - avail);
            uint64_t v = rd(data, (uint32_t)q, w);
            if (in->op == AFM_FIELD) {
                uint64_t m = v & (uint64_t)in->c;
                if (m < (uint64_t)in->d || m > (uint64_t)in->e)
                    return finish(s, AFM_NO);
            } else if (in->op == AFM_JEQ) {
                if (v == (uint64_t)in->c)
                    next_pc = (uint64_t)in->d;
            } else if (in->op == AFM_VEC) {
                uint64_t np = pos + (uint64_t)(w & 7) + v;
                if (np > limit)
                    return finish(s, AFM_NO);
                s->pos = (uint32_t)np;
            } else { /* AFM_PUSH */
                if (v < (uint64_t)in->d || v > (uint64_t)in->e || s->depth >= AFM_MAX_DEPTH)
                    return finish(s, AFM_NO);
                int64_t end = (int64_t)pos + (int64_t)v + in->c;
                if (end < (int64_t)pos || (uint64_t)end > limit)
                    return finish(s, AFM_NO);
                s->ends[s->depth++] = (uint32_t)end;
            }
            break;
        }
        case AFM_POP:
            if (s->depth == 0 || (in->a == 0 && pos != limit) || pos > limit)
                return finish(s, AFM_NO);
            s->pos = (uint32_t)limit;
            s->depth--;
            break;
        case AFM_JGE_END:
            if (pos >= limit)
                next_pc = (uint64_t)in->a;
            break;
        case AFM_JUMP:
            next_pc = (uint64_t)in->a;
            break;
        case AFM_SEARCH: {
            /* The first position i (from pos - back) where a terminator matches; at one
             * position the terminators are tried in order, and an earlier one that may still
             * match there (cut off by avail) is waited for, so the answer never depends on
             * how the bytes were split.  A terminator flagged AFM_TERM_FAIL found first: NO. */
            if ((uint64_t)in->c > pos)
                return finish(s, AFM_NO);
            uint64_t i = s->aux ? (uint64_t)s->aux - 1 : pos - (uint64_t)in->c;
            const uint8_t *tab = p->lits + in->a;
            uint8_t firsts[32] = {0}, fb[2];
            int nfirst = 0; /* distinct first bytes, counted up to 3 */
            uint64_t next_at[2] = {0, 0}, min_len = UINT64_MAX;
            {
                const uint8_t *t = tab;
                for (int64_t k = 0; k < in->b; k++) {
                    uint64_t n = t[0] & ~AFM_TERM_FAIL;
                    if (!(firsts[t[1] >> 3] & (1u << (t[1] & 7)))) {
                        if (nfirst < 2)
                            fb[nfirst] = t[1];
                        nfirst++;
                    }
                    firsts[t[1] >> 3] |= (uint8_t)(1u << (t[1] & 7));
                    if (n < min_len)
                        min_len = n;
                    t += 1 + n;
                }
            }
            for (;;) {
                if (i + min_len > limit)
                    return finish(s, AFM_NO);
                if (i < avail) { /* skip the positions no terminator can start at */
                    if (nfirst <= 2) {
                        /* memchr per first byte; next_at[k] stays valid while >= i (0: not yet) */
                        uint64_t best = avail;
                        for (int k = 0; k < nfirst; k++) {
                            if (!next_at[k] || next_at[k] < i) {
                                const uint8_t *hit = memchr(data + i, fb[k], (size_t)(avail - i));
                                next_at[k] = hit ? (uint64_t)(hit - data) : avail;
                            }
                            if (next_at[k] < best)
                                best = next_at[k];
                        }
                        i = best;
                    } else {
                        while (i < avail && !(firsts[data[i] >> 3] & (1u << (data[i] & 7))))
                            i++;
                    }
                    if (i + min_len > limit)
                        return finish(s, AFM_NO);
                }
                const uint8_t *t = tab;
                for (int64_t k = 0; k < in->b; k++) {
                    uint64_t n = t[0] & ~AFM_TERM_FAIL;
                    int fail = t[0] & AFM_TERM_FAIL;
                    const uint8_t *term = t + 1;
                    t += 1 + n;
                    if (i + n > limit)
                        continue;
                    uint64_t have = avail > i ? avail - i : 0;
                    if (have > n)
                        have = n;
                    if (have && memcmp(data + i, term, (size_t)have) != 0)
                        continue;
                    if (have < n) {
                        /* need 1: a shorter terminator at a later position may complete first */
                        s->aux = (uint32_t)(i + 1);
                        return more(s, 1);
                    }
                    if (fail)
                        return finish(s, AFM_NO);
                    s->aux = 0;
                    s->pos = (uint32_t)(i + n);
                    goto searched;
                }
                i++;
            }
        searched:
            break;
        }
        case AFM_READY:
            if (pos > avail)
                return more(s, pos - avail);
            s->consume = in->a ? (uint32_t)pos : 0;
            return finish(s, AFM_DONE);
        default: /* AFM_FAIL, and anything afm_check would have refused */
            return finish(s, AFM_NO);
        }
        s->pc = (uint32_t)next_pc;
        s->steps++;
    }
}
