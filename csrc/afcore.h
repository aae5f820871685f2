/*
 * afcore: the I/O core of acceptfilter.
 *
 * It accepts eagerly, holds connections in an edge-triggered epoll set, peeks
 * at their first bytes with recv(MSG_PEEK) and reports what happened as a batch
 * of events. It knows nothing about any protocol: deciding is the (Python)
 * engine's job. A held connection is idle (it has sent nothing: held up to the
 * idle limit, counted by source address for eviction) or partial (it has begun:
 * held up to the deadline, counted from its first byte). Each limit is uniform
 * per core, so each state is one FIFO that is also its deadline order. When
 * max_held is reached, the oldest idle connection of the source address that
 * holds the most idle ones is evicted; only when none is idle, the oldest
 * partial one.
 *
 * Not thread-safe, except af_wake() and af_get_stats(), which any thread may call
 * while the core lives: their caller must make sure none of them runs during or
 * after af_free() (acceptfilter.iocore.CCore holds one lock around those calls and
 * around dropping its pointer before af_free, so a waker never reaches a freed core
 * or writes into its closed, maybe reused, eventfd).
 */
#ifndef AFCORE_H
#define AFCORE_H

#include <stdint.h>

#include "aflook.h"
#include "afmatch.h"
#include "afqueue.h"

/* Event kinds. DATA is the only non-final one: the connection stays held.
 * After any other event the connection has left the epoll set and the FIFO,
 * and the caller must af_release() or af_close() it. */
enum af_event_kind {
    AF_EV_DATA = 1,     /* more bytes were peeked */
    AF_EV_EOF = 2,      /* the peer sent FIN (data: what it sent before) */
    AF_EV_FULL = 3,     /* the peeked prefix reached max_bytes */
    AF_EV_TIMEOUT = 4,  /* the connection's deadline passed */
    AF_EV_EVICT = 5,    /* pushed out: too many held connections */
    AF_EV_ERROR = 6,    /* the connection failed (err: an errno, e.g. ECONNRESET) */
    AF_EV_SHUTDOWN = 7, /* af_drain(): the core is shutting down */
    AF_EV_READY = 8     /* the matcher certified the peeked bytes (err: the bytes to consume) */
};

typedef struct af_event {
    int fd;
    int kind;
    int err;
    uint32_t len;
    uint32_t age_us;  /* time since accept (saturates at ~71 minutes) */
    const char *data; /* valid until the next call on this core */
} af_event;

/* Slots of the time-to-surface histogram (stats.surfaced_hist). */
#define AF_HIST_SLOTS 24

typedef struct af_stats {
    uint64_t accepted;       /* connections taken from the listen queue */
    uint64_t accept_errors;  /* accept4 failures other than EAGAIN/EMFILE-like */
    uint64_t fd_exhaustion;  /* EMFILE/ENFILE/ENOBUFS/ENOMEM pauses */
    uint64_t peeks;          /* recv(MSG_PEEK) calls */
    uint64_t bytes_peeked;   /* new bytes seen by peeks */
    uint64_t buffered;       /* peek buffer bytes allocated now (<= held * max_bytes) */
    /* Connections the core surfaced itself, no caller involved: certified by the
     * matcher, then handed to af_accept()'s caller or put into the ready queue. */
    uint64_t surfaced;
    uint64_t fast;           /* of those, certified at accept and handed to af_accept()'s caller */
    uint64_t surfaced_lost;  /* of those, put into a queue already closed (closed at once) */
    uint64_t surfaced_age_us; /* their summed times from accept to surfacing */
    uint64_t surfaced_hist[AF_HIST_SLOTS]; /* their times to surfacing, by af_set_hist_bounds() slot */
    uint64_t direct_idle;    /* af_accept() waits on a new connection that ran out with no byte */
    int64_t oldest_accepted_us; /* when the oldest held connection was accepted (core clock, CLOCK_MONOTONIC); -1: none */
    uint32_t held;           /* connections the core still owns */
    uint32_t paused;         /* 1 while accepting is paused for fd exhaustion */
    uint32_t held_idle;      /* of the held ones, those that have sent nothing yet */
} af_stats;

/* A connection af_accept() released (the matcher certified it, at accept or
 * during the call's wait): the caller owns fd. */
typedef struct af_ready {
    int fd;           /* -1: none */
    uint32_t consume; /* bytes read off before the caller sees the stream */
    uint32_t len;     /* the peeked prefix (consumed bytes included), for parsing info later */
    uint32_t age_us;  /* from accept to now */
    const char *data; /* valid until the next call on this core */
    af_addr addr;
} af_ready;

typedef struct af_core af_core;

/* Bounds on what the caller may ask for; larger values are clamped. */
#define AF_MAX_BYTES 1073741824
#define AF_MAX_TIMEOUT_MS 1099511627776 /* 2^40 ms, ~35 years: deadline arithmetic never overflows */

/* A connection's states (one per slot of the fd-indexed table):
 *   FREE -accept/adopt-> HELD (in the FIFO, maybe in epoll) -final event-> FINAL
 *   HELD or FINAL -af_release/af_close-> FREE
 * A FINAL connection not released or closed by the next af_poll()/af_drain()
 * is reported again, so an interrupted caller strands nothing. */

/* Take over a listening socket (made non-blocking). timeout_ms <= 0: no deadline.
 * Returns NULL with *err set on failure. */
af_core *af_new(int listen_fd, uint32_t max_bytes, int64_t timeout_ms, uint32_t max_held,
                uint32_t max_events, int *err);
/* Close every connection still owned, the epoll and wake fds; not the listen fd. */
void af_free(af_core *c);
/* The epoll fd: readable when af_poll() has work. */
int af_fileno(const af_core *c);
/* Accept, wait up to timeout_ms, peek; returns the number of events (<=
 * max_events) or -errno. timeout_ms -1: until there are events (deadlines
 * make some), af_wake() or an fd-exhaustion pause; connections the core puts
 * into its ready queue are not events. */
int af_poll(af_core *c, int timeout_ms, af_event **events);
/* Milliseconds until the next deadline or accept resume (0 if due), -1 if none. */
int64_t af_next_timeout_ms(const af_core *c);
/* Hand a connection over: leave epoll, discard `consume` bytes, blocking (as accepted; an
 * adopted one that was non-blocking is made blocking).
 * Returns 0 or -errno (then the connection is still owned and must be closed). */
int af_release(af_core *c, int fd, uint32_t consume, af_addr *addr);
/* Close an owned connection; reset != 0 sends an RST (SO_LINGER 0). reset == 0
 * sends a FIN: what the client sent and nobody read (up to AF_CLOSE_DRAIN bytes)
 * is read first, since closing with unread bytes would send an RST instead. */
#define AF_CLOSE_DRAIN (16u << 20)
int af_close(af_core *c, int fd, int reset);
/* Hold a connection accepted elsewhere (another process handed it over), as if
 * just accepted: its deadline starts now, the next af_poll() peeks at it. The
 * core owns fd from then on. -EEXIST if already held; -ENOTCONN and friends
 * if fd is not a connected socket (the caller still owns it then). */
int af_adopt(af_core *c, int fd);
/* Make a concurrent or future af_poll() return promptly. Thread-safe, but never
 * concurrent with af_free() (see the top of this file). */
void af_wake(af_core *c);
/* Stop taking new connections (the listen fd leaves the epoll set). */
int af_stop_accepting(af_core *c);
/* Final events (AF_EV_SHUTDOWN) for every held connection, oldest first,
 * after any FINAL connection still unresolved (reported again, as it was). */
int af_drain(af_core *c, af_event **events);
/* Copy the counters now into what af_get_stats() returns (from the thread that
 * polls: the core publishes after every poll and every queued connection too). */
void af_publish_stats(af_core *c);
/* The counters last published. Thread-safe. */
void af_get_stats(af_core *c, af_stats *out);
/* The peer address taken at accept (or adoption): it stays known after the
 * peer reset. 0, or -EBADF if fd is not owned. */
int af_peer(const af_core *c, int fd, af_addr *addr);
/* Run a compiled readiness matcher on every connection's peeked bytes (NULL: none).
 * The program belongs to the caller and must outlive the core (or the next
 * af_set_matcher). A connection it certifies is reported AF_EV_READY. Only before
 * the first connection: -EBUSY after. */
int af_set_matcher(af_core *c, const afm_prog *prog);
/* af_poll() for a thread blocked in accept(): it first accepts, and returns
 * with the first connection the matcher certifies, at accept or while it
 * waits, released into *ready (blocking, consumed; the caller owns ready->fd;
 * no event; counted in stats.surfaced, and in stats.fast if at accept).
 * Otherwise as af_poll(); ready->fd is -1. */
int af_accept(af_core *c, int timeout_ms, af_event **events, af_ready *ready);
/* Put every connection the matcher certifies into q (released, consumed, with
 * a copy of its bytes) instead of reporting it AF_EV_READY: it reaches the
 * application's accept() without the caller running. (af_accept() still hands
 * the first one straight to its caller.) q must outlive the core or the next
 * af_set_queue(); NULL: report AF_EV_READY again. Counted in stats.surfaced. */
void af_set_queue(af_core *c, afq *q);
/* The upper bounds (microseconds, ascending; at most AF_HIST_SLOTS - 1) of
 * stats.surfaced_hist: slot i counts times <= bounds[i] (and above the one
 * before), slot n the rest. -EINVAL if too many. */
int af_set_hist_bounds(af_core *c, const uint64_t *bounds_us, uint32_t n);
/* How long a connection that has sent nothing may be held (ms; <= 0: no limit,
 * the default). af_new's timeout_ms counts from a connection's first byte. */
void af_set_idle_timeout(af_core *c, int64_t timeout_ms);
/* Tests: run deadlines on a clock the caller sets (microseconds); -1: the
 * real monotonic clock again. */
void af_set_clock(af_core *c, int64_t now_us);
/* How long a waiting af_accept() waits on the connection it just accepted,
 * when that one has sent nothing yet, before it watches the listen queue and
 * the other held connections again (wait_us; 0: never wait so), and for how
 * long it stops doing so after a connection sent nothing in that time
 * (backoff_us). Defaults: AF_DIRECT_WAIT_US, AF_DIRECT_BACKOFF_US. */
#define AF_DIRECT_WAIT_US 1000
#define AF_DIRECT_BACKOFF_US 100000
void af_set_direct_wait(af_core *c, uint32_t wait_us, uint32_t backoff_us);

#endif
