/*
 * aflook: one look at the next connection of a listen socket, for a process
 * that serves connections itself but holds none (the gunicorn integration's
 * worker: what is not ready goes to the process that holds).
 *
 * Protocol-agnostic, like the core it was split from: the readiness knowledge
 * is the compiled matcher's program (afmatch.h), declared by a filter in Python.
 * Built into both extension modules: the cffi core (acceptfilter._core, whose
 * af_addr conversion the core shares) and acceptfilter._look, which wraps
 * af_look() for Python without cffi's per-field reads (csrc/pylook.c).
 */
#ifndef AFLOOK_H
#define AFLOOK_H

#include <stdint.h>

#include "afmatch.h"
#include "afqueue.h"

/* accept4 on the (non-blocking) listen fd, one recv(MSG_PEEK) of up to cap
 * bytes into buf, and the matcher (if prog is not NULL) on them, all in one
 * call that touches no Python state (call it without the GIL). Connections
 * that closed or reset before a byte are closed and skipped. out->fd -1: the
 * listen queue is empty. Otherwise the caller owns out->fd (blocking):
 * out->len bytes peeked into buf (0: none sent yet); out->ready 1 when the
 * matcher certified them, and then out->consume bytes were read off.
 * Returns 0, or -errno of accept4. */
typedef struct af_look_out {
    int fd;
    int ready;
    uint32_t consume;
    uint32_t len;
    af_addr addr;
} af_look_out;
int af_look(int listen_fd, const afm_prog *prog, char *buf, uint32_t cap, af_look_out *out);

/* A socket address (len bytes at sa, possibly unaligned) as an af_addr:
 * numeric host, port, and for IPv6 the flow info and scope id. */
void af_sockaddr_to_addr(const void *sa, uint32_t len, af_addr *addr);

#endif
