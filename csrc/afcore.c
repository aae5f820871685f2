/* afcore.c: accept4 + edge-triggered epoll + recv(MSG_PEEK). See afcore.h. */
#define _GNU_SOURCE
#include "afcore.h"
#include "afsrc.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NIL (-1)
#define FIRST_BUF 1024u
#define BACKOFF_MIN_US 10000
#define BACKOFF_MAX_US 1000000
#define TAG_LISTEN ((uint64_t)1 << 62)
#define TAG_WAKE ((uint64_t)1 << 61)

/* Assertions on state transitions (BUG_ON style): on in the sanitizer
 * build (-DAF_DEBUG), free in the release build. */
#ifdef AF_DEBUG
static void af_bug(const char *what, int line) {
    fprintf(stderr, "afcore.c:%d: BUG: %s\n", line, what);
    abort();
}
#define AF_ASSERT(x) ((x) ? (void)0 : af_bug(#x, __LINE__))
#else
#define AF_ASSERT(x) ((void)0)
#endif

enum conn_state { CS_FREE = 0, CS_HELD = 1, CS_FINAL = 2 };

/* One owned connection, in a table indexed by fd. Kept small: an idle held
 * connection costs this and nothing else (its buffer comes with its first byte).
 * HELD connections are linked in the FIFO, FINAL ones in the final list (the
 * same links: a connection is in at most one of them). */
typedef struct conn {
    int32_t prev, next;   /* idle, partial or final-list links (fds) */
    int64_t accepted_us;  /* on the core's clock; idle deadline = this + idle_timeout */
    int64_t data_us;      /* its first byte (partial): deadline = this + timeout */
    int32_t src;          /* idle: its source's entry (afsrc), or AFS_NIL */
    int32_t sprev, snext; /* idle: its source's other idle connections (fds) */
    char *buf;
    uint32_t len, bufsize;
    uint32_t batch;       /* poll number of this connection's last event */
    uint32_t ev_index;    /* its index in that batch */
    uint8_t state;        /* enum conn_state */
    uint8_t idle;         /* HELD with nothing sent yet: in the idle list, counted by source */
    uint8_t armed, eof;
    uint8_t final_kind;   /* FINAL: the event it was reported with */
    int32_t final_err;    /* ERROR: the errno; READY: the bytes to consume */
    uint8_t addrlen;
    uint8_t matching;     /* the matcher may still certify this connection (MORE so far) */
    uint8_t lowat;        /* SO_RCVLOWAT was raised (reset before the fd is handed over) */
    uint8_t nonblock;     /* adopted with O_NONBLOCK (cleared before the fd is handed over) */
    uint8_t urgent;       /* the last wake-up said EPOLLPRI: a TCP urgent byte is pending */
    uint8_t abortive;     /* SO_LINGER {1, 0} while watched (cleared before the fd is handed over or closed) */
    uint8_t addr[sizeof(struct sockaddr_in6)];
} conn;

typedef struct list { int32_t head, tail; uint32_t count; } list;

struct af_core {
    int listen_fd, epfd, wakefd;
    uint32_t max_bytes, max_held, max_events;
    int64_t timeout_us;
    conn *conns;
    uint32_t nconns;          /* table size */
    list idle;                /* HELD, nothing sent yet: in accept order = idle deadline order */
    list fifo;                /* HELD, partial: in first-byte order = deadline order */
    int64_t idle_us;          /* the idle limit (af_set_idle_timeout; 0: none) */
    afs_table srcs;           /* idle connections by source address: who loses one when full */
    list finals;              /* FINAL: reported, not yet released or closed */
    uint32_t fresh_data;      /* HELD connections with a DATA event in this batch */
    int32_t *pending;         /* peeked at accept, to be armed at next poll */
    uint32_t npending, pending_cap;
    af_event *events;
    uint32_t nevents;
    struct epoll_event *epevents;
    uint32_t batch;
    int listening, paused;
    int woken;                /* this poll read the wake fd (af_wake) */
    int interrupted;          /* this poll's wait was interrupted by a signal (EINTR) */
    int64_t resume_at, backoff_us, now, fake_now;
    const afm_prog *prog;     /* the readiness matcher, or NULL */
    uint32_t ms_hdr;          /* with a matcher: an afm_state in front of each peek buffer */
    af_ready *fast_out;       /* during af_accept(): where the first certified connection goes */
    int direct_ok;            /* in a waiting af_accept(): a connection with no bytes yet may be waited on directly */
    int32_t direct;           /* the one accept_batch() left unarmed for wait_direct(), or NIL */
    int64_t direct_resume_us; /* no direct waits before this (an idle client used up the last one) */
    int64_t direct_wait_us, direct_backoff_us; /* af_set_direct_wait() */
    char *scratch;            /* af_ready.data: a copy of the peeked bytes */
    uint32_t scratch_size;
    afq *queue;               /* where certified connections go (af_set_queue), or NULL */
    uint64_t hist_bounds[AF_HIST_SLOTS];
    uint32_t nbounds;
    af_stats stats;           /* the core's own counters (the polling thread's) */
    /* What af_get_stats() returns to any thread: a copy published after every
     * batch, and at once when a connection goes into the queue, since the
     * application may take it and ask for the counters before the batch ends. */
    pthread_mutex_t stats_lock;
    af_stats published;
};

static int64_t clock_us(const af_core *c) {
    if (c->fake_now >= 0) return c->fake_now;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void publish(af_core *c) {
    c->stats.held_idle = c->idle.count;
    /* For `acceptfilter stats`: idle ones are in accept order, partial ones in first-byte order, so
     * the older of the two heads (the partial head is the oldest partial but for a rare reordering). */
    int64_t oldest = -1;
    if (c->idle.head != NIL) oldest = c->conns[c->idle.head].accepted_us;
    if (c->fifo.head != NIL && (oldest < 0 || c->conns[c->fifo.head].accepted_us < oldest))
        oldest = c->conns[c->fifo.head].accepted_us;
    c->stats.oldest_accepted_us = oldest;
    pthread_mutex_lock(&c->stats_lock);
    c->published = c->stats;
    pthread_mutex_unlock(&c->stats_lock);
}

static int64_t deadline_of(const af_core *c, const conn *k) {
    /* timeouts <= 2^40 * 1000 and the clock is far below 2^62: no overflow. */
    if (k->idle) return c->idle_us > 0 ? k->accepted_us + c->idle_us : INT64_MAX;
    return c->timeout_us > 0 ? k->data_us + c->timeout_us : INT64_MAX;
}

static int grow_table(af_core *c, int fd) {
    if ((uint32_t)fd < c->nconns) return 0;
    uint32_t n = c->nconns ? c->nconns : 1024;
    while (n <= (uint32_t)fd) n *= 2;
    conn *t = realloc(c->conns, (size_t)n * sizeof(conn));
    if (!t) return -ENOMEM;
    memset(t + c->nconns, 0, (size_t)(n - c->nconns) * sizeof(conn));
    c->conns = t;
    c->nconns = n;
    return 0;
}

static conn *owned(af_core *c, int fd) {
    if (fd < 0 || (uint32_t)fd >= c->nconns || c->conns[fd].state == CS_FREE) return NULL;
    return &c->conns[fd];
}

static list *list_of(af_core *c, const conn *k) {
    return k->state == CS_HELD ? (k->idle ? &c->idle : &c->fifo) : &c->finals;
}

static void list_unlink(af_core *c, int fd) {
    conn *k = &c->conns[fd];
    list *l = list_of(c, k);
    AF_ASSERT(l->count > 0);
    if (l == &c->idle && k->src != AFS_NIL) { /* out of its source's list too */
        afs_source *e = &c->srcs.src[k->src];
        if (k->sprev != NIL) c->conns[k->sprev].snext = k->snext; else e->head = k->snext;
        if (k->snext != NIL) c->conns[k->snext].sprev = k->sprev; else e->tail = k->sprev;
        afs_remove(&c->srcs, k->src);
        k->src = AFS_NIL;
        k->sprev = k->snext = NIL;
    }
    if (k->prev != NIL) c->conns[k->prev].next = k->next; else l->head = k->next;
    if (k->next != NIL) c->conns[k->next].prev = k->prev; else l->tail = k->prev;
    k->prev = k->next = NIL;
    l->count--;
}

static void list_append(af_core *c, int fd) {
    conn *k = &c->conns[fd];
    list *l = list_of(c, k);
    k->prev = l->tail;
    k->next = NIL;
    if (l->tail != NIL) c->conns[l->tail].next = fd; else l->head = fd;
    l->tail = fd;
    l->count++;
    k->src = AFS_NIL;
    k->sprev = k->snext = NIL;
    if (l == &c->idle) { /* counted by source (out of memory: only in the idle list, evicted last of the idle) */
        uint8_t key[AFS_KEY];
        afs_key(k->addr, k->addrlen, key);
        int32_t s = afs_add(&c->srcs, key);
        if (s >= 0) {
            afs_source *e = &c->srcs.src[s];
            k->src = s;
            k->sprev = e->tail;
            if (e->tail != NIL) c->conns[e->tail].snext = fd; else e->head = fd;
            e->tail = fd;
        }
    }
}

/* HELD, idle -> partial: its first byte arrived, the header deadline starts now. */
static void to_partial(af_core *c, int fd) {
    conn *k = &c->conns[fd];
    if (k->state != CS_HELD || !k->idle) return;
    list_unlink(c, fd);
    k->idle = 0;
    k->data_us = c->now;
    list_append(c, fd);
}

static void disarm(af_core *c, int fd) {
    conn *k = &c->conns[fd];
    if (k->armed) {
        epoll_ctl(c->epfd, EPOLL_CTL_DEL, fd, NULL);
        k->armed = 0;
    }
}

/* FREE -> HELD */
static conn *hold(af_core *c, int fd, int64_t now, const void *addr, socklen_t alen) {
    conn *k = &c->conns[fd];
    AF_ASSERT(k->state == CS_FREE);
    memset(k, 0, sizeof *k);
    k->state = CS_HELD;
    k->prev = k->next = NIL;
    k->accepted_us = now;
    k->idle = 1;
    k->addrlen = alen <= sizeof k->addr ? (uint8_t)alen : 0;
    if (k->addrlen) memcpy(k->addr, addr, k->addrlen);
    k->matching = c->prog != NULL;
    c->stats.held++;
    list_append(c, fd);
    return k;
}

/* A peek buffer is one block: [afm_state, with a matcher][the peeked bytes]. */
static char *block_of(const af_core *c, const conn *k) { return k->buf - c->ms_hdr; }

static void free_buf(af_core *c, conn *k) {
    if (k->buf) free(block_of(c, k));
    k->buf = NULL;
}

/* HELD or FINAL -> FREE: the slot is empty again (the fd is the caller's business). */
static void forget(af_core *c, int fd) {
    conn *k = &c->conns[fd];
    AF_ASSERT(k->state == CS_HELD || k->state == CS_FINAL);
    AF_ASSERT(c->stats.held > 0);
    AF_ASSERT(!k->armed);
    list_unlink(c, fd);
    AF_ASSERT(c->stats.buffered >= k->bufsize);
    c->stats.buffered -= k->bufsize;
    free_buf(c, k);
    memset(k, 0, sizeof *k);
    k->prev = k->next = NIL;
    c->stats.held--;
}

/* This connection's event in the current batch (at most one per batch; a final
 * kind replaces DATA). Returns NULL when it already has a final one. */
static af_event *event_for(af_core *c, int fd, int kind, int err) {
    conn *k = &c->conns[fd];
    af_event *ev;
    if (k->batch == c->batch && k->ev_index < c->nevents && c->events[k->ev_index].fd == fd) {
        ev = &c->events[k->ev_index];
        if (ev->kind != AF_EV_DATA) return NULL; /* already final */
        if (kind != AF_EV_DATA) c->fresh_data--;
    } else {
        AF_ASSERT(c->nevents < c->max_events);
        k->batch = c->batch;
        k->ev_index = c->nevents;
        ev = &c->events[c->nevents++];
        if (kind == AF_EV_DATA) c->fresh_data++;
    }
    ev->fd = fd;
    ev->kind = kind;
    ev->err = err;
    ev->len = k->len;
    ev->data = k->buf;
    int64_t age = c->now - k->accepted_us;
    ev->age_us = age < 0 ? 0 : (age > UINT32_MAX ? UINT32_MAX : (uint32_t)age);
    return ev;
}

/* Report an event; a final one moves the connection HELD -> FINAL. */
static void emit(af_core *c, int fd, int kind, int err) {
    conn *k = &c->conns[fd];
    AF_ASSERT(k->state == CS_HELD);
    if (!event_for(c, fd, kind, err) || kind == AF_EV_DATA) return;
    list_unlink(c, fd);
    disarm(c, fd);
    k->state = CS_FINAL;
    k->final_kind = (uint8_t)kind;
    k->final_err = err;
    list_append(c, fd);
}

/* FINAL connections the caller did not resolve (it was interrupted): report
 * them again, as they were. */
static void report_finals(af_core *c) {
    for (int32_t fd = c->finals.head; fd != NIL && c->nevents < c->max_events; fd = c->conns[fd].next) {
        conn *k = &c->conns[fd];
        AF_ASSERT(k->state == CS_FINAL);
        event_for(c, fd, k->final_kind, k->final_err);
    }
}

/* SO_RCVLOWAT counts unread bytes, peeked ones included. Best effort: 1 is the default. */
static void set_lowat(conn *k, int fd, int bytes) {
    if (bytes <= 1 && !k->lowat) return;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &bytes, sizeof bytes) == 0) k->lowat = bytes > 1;
}

/* Double the peek buffer, without wrapping: bufsize <= max_bytes <= AF_MAX_BYTES (2^30). */
static int grow_buf(af_core *c, conn *k) {
    uint32_t want = k->bufsize > c->max_bytes / 2 ? c->max_bytes : k->bufsize * 2;
    AF_ASSERT(want > k->bufsize);
    char *block = realloc(block_of(c, k), (size_t)c->ms_hdr + want);
    if (!block) return -ENOMEM;
    c->stats.buffered += want - k->bufsize;
    k->buf = block + c->ms_hdr;
    k->bufsize = want;
    return 0;
}

/* A peek stops at a TCP urgent mark when bytes come before it, SO_OOBINLINE or not,
 * so a filter would never see the bytes after an urgent byte. While one is pending
 * (EPOLLPRI), peek on from the end of what is known with SO_PEEK_OFF (TCP: Linux
 * 6.10+), then switch the offset off again: the application's socket peeks from its
 * start. On an older kernel the filter sees the bytes up to the mark. 0 or -ENOMEM. */
static int peek_past_mark(af_core *c, conn *k, int fd) {
    int off = (int)k->len, rc = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &off, sizeof off) < 0) return 0;
    while (k->len < c->max_bytes) {
        if (k->len == k->bufsize && (rc = grow_buf(c, k)) < 0) break;
        ssize_t n = recv(fd, k->buf + k->len, k->bufsize - k->len, MSG_PEEK | MSG_DONTWAIT);
        c->stats.peeks++;
        if (n < 0 && errno == EINTR) continue;
        if (n == 0) k->eof = 1;
        if (n <= 0) break; /* EAGAIN; an error shows at the next peek */
        c->stats.bytes_peeked += (uint32_t)n;
        k->len += (uint32_t)n;
    }
    off = -1;
    setsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &off, sizeof off);
    return rc;
}

/* Peek everything available (up to max_bytes). Returns the final event kind to
 * report, or -1 when nothing final happened (the caller compares lengths). */
static int peek(af_core *c, int fd, int hup, int *err) {
    conn *k = &c->conns[fd];
    int more = 1;
    if (k->bufsize == 0) {
        /* No buffer until the first byte arrives: peek into the stack, so an
         * idle held connection (EAGAIN here) costs no heap at all. */
        char first[FIRST_BUF];
        uint32_t cap = FIRST_BUF < c->max_bytes ? FIRST_BUF : c->max_bytes;
        ssize_t n;
        do {
            n = recv(fd, first, cap, MSG_PEEK | MSG_DONTWAIT);
            c->stats.peeks++;
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) { *err = errno; return AF_EV_ERROR; }
            more = 0;
        } else if (n == 0) {
            k->eof = 1;
            more = 0;
        } else {
            char *block = malloc((size_t)c->ms_hdr + cap);
            if (!block) { *err = ENOMEM; return AF_EV_ERROR; }
            if (c->ms_hdr) afm_init((afm_state *)(void *)block);
            char *b = block + c->ms_hdr;
            memcpy(b, first, (size_t)n);
            c->stats.buffered += cap;
            c->stats.bytes_peeked += (uint32_t)n;
            k->buf = b;
            k->bufsize = cap;
            k->len = (uint32_t)n;
            to_partial(c, fd);
            more = (uint32_t)n == cap && cap < c->max_bytes; /* filled: grow and peek again */
        }
    }
    while (more) {
        if (k->len == k->bufsize && k->bufsize < c->max_bytes && grow_buf(c, k) < 0) {
            *err = ENOMEM;
            return AF_EV_ERROR;
        }
        ssize_t n = recv(fd, k->buf, k->bufsize, MSG_PEEK | MSG_DONTWAIT);
        c->stats.peeks++;
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            *err = errno;
            return AF_EV_ERROR;
        }
        if (n == 0) { k->eof = 1; break; }
        if ((uint32_t)n > k->len) {
            c->stats.bytes_peeked += (uint32_t)n - k->len;
            k->len = (uint32_t)n;
        }
        if ((uint32_t)n < k->bufsize || k->bufsize >= c->max_bytes) break;
        /* buffer filled: grow and peek again */
    }
    if (k->urgent && k->len > 0 && !k->eof && peek_past_mark(c, k, fd) < 0) {
        *err = ENOMEM;
        return AF_EV_ERROR;
    }
    if (hup) k->eof = 1;
    if (k->matching && k->len > 0) {
        /* Resumable: each call continues where the last stopped. Certain, or
         * never certain (then Python decides, as without a matcher). */
        afm_state *ms = (afm_state *)(void *)block_of(c, k);
        int r = afm_run(c->prog, ms, (const uint8_t *)k->buf, k->len);
        if (r == AFM_DONE && ms->consume <= k->len) { *err = (int)ms->consume; return AF_EV_READY; }
        if (r != AFM_MORE) {
            k->matching = 0;
            set_lowat(k, fd, 1);
        } else if (ms->need > 1 && !k->eof) {
            /* The matcher knows how much more it needs (a length field): the
             * kernel wakes us once that much is there, not on every segment. */
            uint64_t want = (uint64_t)k->len + ms->need;
            set_lowat(k, fd, want < c->max_bytes ? (int)want : (int)c->max_bytes);
        }
    }
    if (k->len >= c->max_bytes) return AF_EV_FULL;
    if (k->eof) return AF_EV_EOF;
    return -1;
}

static int release_fast(af_core *c, int fd, uint32_t consume);

static uint32_t age_of(const af_core *c, const conn *k) {
    int64_t age = c->now - k->accepted_us;
    return age < 0 ? 0 : (age > UINT32_MAX ? UINT32_MAX : (uint32_t)age);
}

/* Surfaced by the core itself (the matcher certified it): counted here, with
 * its time to surface, since no caller will count it. */
static void count_surfaced(af_core *c, uint32_t age_us) {
    c->stats.surfaced++;
    c->stats.surfaced_age_us += age_us;
    uint32_t slot = 0;
    while (slot < c->nbounds && age_us > c->hist_bounds[slot]) slot++;
    c->stats.surfaced_hist[slot]++;
}

/* HELD -> FREE, into the ready queue (af_set_queue): the matcher certified it,
 * so nobody needs an event. Returns 0; -ENOMEM before anything changed (still
 * held: report it AF_EV_READY as without a queue); another -errno when the
 * release failed (still held: report AF_EV_ERROR, as release_fast's caller does). */
static int queue_ready(af_core *c, int fd, uint32_t consume) {
    conn *k = &c->conns[fd];
    AF_ASSERT(k->state == CS_HELD && consume <= k->len && c->queue);
    afq_item it;
    memset(&it, 0, sizeof it);
    it.fd = fd;
    it.consume = consume;
    it.len = k->len; /* the whole prefix, consumed header included: info is parsed from it */
    it.age_us = age_of(c, k);
    if (it.len) {
        it.data = malloc(it.len);
        if (!it.data) return -ENOMEM;
        memcpy(it.data, k->buf, it.len); /* the buffer goes with the slot */
    }
    int rc = af_release(c, fd, consume, &it.addr);
    if (rc < 0) { afq_item_clear(&it); return rc; }
    count_surfaced(c, it.age_us);
    /* Before the put: the application may take it and read the counters before
     * this batch ends, and must find it counted. */
    publish(c);
    rc = afq_put(c->queue, &it);
    if (rc != 0) {
        /* Closed (afq_put closed it) or out of memory (released already: close
         * it here). Surfaced and never claimed, as a closed Python queue counts. */
        if (rc < 0) { close(fd); afq_item_clear(&it); }
        c->stats.surfaced_lost++;
        publish(c);
    }
    return 0;
}

/* A final kind for a HELD connection. READY goes to af_accept()'s caller if it
 * has none yet (returns 1), else into the ready queue if there is one; without
 * either (or out of memory) it is reported, as any final kind. */
static int settle(af_core *c, int fd, int kind, int err) {
    if (kind == AF_EV_READY && (c->queue || (c->fast_out && c->fast_out->fd < 0))) {
        int handed = c->fast_out && c->fast_out->fd < 0;
        int rc = handed ? release_fast(c, fd, (uint32_t)err) : queue_ready(c, fd, (uint32_t)err);
        if (rc == 0) return handed;
        if (rc != -ENOMEM) { emit(c, fd, AF_EV_ERROR, -rc); return 0; }
    }
    emit(c, fd, kind, err);
    return 0;
}

static void on_readable(af_core *c, int fd, uint32_t flags) {
    conn *k = owned(c, fd);
    if (!k || k->state != CS_HELD) return;
    int err = 0;
    uint32_t before = k->len;
    if (flags & EPOLLERR) {
        /* Reset (or errored) while held, whatever it sent before: nothing can be
         * answered any more. Not an EOF: a FIN is EPOLLRDHUP without EPOLLERR. */
        socklen_t sl = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl);
        emit(c, fd, AF_EV_ERROR, err ? err : ECONNRESET);
        return;
    }
    k->urgent = (flags & EPOLLPRI) != 0;
    int kind = peek(c, fd, (flags & (EPOLLRDHUP | EPOLLHUP)) != 0, &err);
    if (kind > 0) settle(c, fd, kind, err);
    else if (k->len != before && !k->matching) emit(c, fd, AF_EV_DATA, 0);
    /* While the matcher still says MORE, arrivals wake no Python: it certifies,
     * gives up (then the filter sees everything), or a final event decides. */
}

static int arm(af_core *c, int fd);

/* Into the epoll set, or reported failed (a HELD connection the core cannot watch). */
static void arm_or_fail(af_core *c, int fd) {
    conn *k = owned(c, fd);
    if (!k || k->state != CS_HELD || k->armed) return; /* settled (or evicted) meanwhile */
    int e = arm(c, fd);
    if (e) emit(c, fd, AF_EV_ERROR, -e);
}

static int arm(af_core *c, int fd) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLET; /* EPOLLPRI: an urgent byte (peek_past_mark) */
    ev.data.u64 = (uint64_t)(uint32_t)fd;
    if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) return -errno;
    conn *k = &c->conns[fd];
    k->armed = 1;
    if (!k->abortive) {
        /* A held connection is closed by the kernel if this process dies (SIGKILL, a crash):
         * with an RST whether or not the client had sent bytes, one rule instead of a FIN for
         * idle clients and an RST for half-sent ones. Only watched connections pay for it:
         * one certified at accept never gets here. Best effort, like SO_RCVLOWAT. */
        struct linger lg = {1, 0};
        if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0) k->abortive = 1;
    }
    return 0;
}

/* The default close again (a FIN after the data), for the application or a graceful close. */
static int clear_abortive(conn *k, int fd) {
    if (!k->abortive) return 0;
    struct linger lg = {0, 0};
    if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) < 0) return -errno;
    k->abortive = 0;
    return 0;
}

static int remember_pending(af_core *c, int fd) {
    if (c->npending == c->pending_cap) {
        uint32_t cap = c->pending_cap ? c->pending_cap * 2 : 64;
        int32_t *p = realloc(c->pending, cap * sizeof *p);
        if (!p) return -ENOMEM;
        c->pending = p;
        c->pending_cap = cap;
    }
    c->pending[c->npending++] = fd;
    return 0;
}

static void set_listening(af_core *c, int on) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = on ? EPOLLIN : 0;
    ev.data.u64 = TAG_LISTEN;
    epoll_ctl(c->epfd, EPOLL_CTL_MOD, c->listen_fd, &ev);
}

static void pause_accepting(af_core *c, int64_t now) {
    c->stats.fd_exhaustion++;
    c->backoff_us = c->backoff_us ? c->backoff_us * 2 : BACKOFF_MIN_US;
    if (c->backoff_us > BACKOFF_MAX_US) c->backoff_us = BACKOFF_MAX_US;
    c->resume_at = now + c->backoff_us;
    c->paused = 1;
    c->stats.paused = 1;
    set_listening(c, 0);
}

/* Over max_held: make room. An idle connection first: the oldest of the source
 * that holds the most idle ones (one client's thousand idle connections go
 * before anyone else's). Only then a partial one: the oldest that has no fresh
 * data in this batch (one with data may be decided by the caller before the
 * next poll, and then it was never undecided). Returns 0 when there is none. */
static int evict_one(af_core *c) {
    if (c->idle.count) {
        int32_t s = afs_top(&c->srcs);
        emit(c, s != AFS_NIL ? c->srcs.src[s].head : c->idle.head, AF_EV_EVICT, 0);
        return 1;
    }
    for (int32_t fd = c->fifo.head; fd != NIL; fd = c->conns[fd].next) {
        conn *k = &c->conns[fd];
        if (k->batch == c->batch && k->ev_index < c->nevents && c->events[k->ev_index].fd == fd) continue;
        emit(c, fd, AF_EV_EVICT, 0);
        return 1;
    }
    return 0;
}

/* Accept while there is room in the event array, keeping one slot per accepted
 * connection for the eviction it may cause. */
static void accept_batch(af_core *c, int64_t now) {
    while (c->listening && !c->paused && c->nevents + 2 <= c->max_events && !(c->fast_out && c->fast_out->fd >= 0)) {
        union { struct sockaddr sa; struct sockaddr_in6 in6; struct sockaddr_storage ss; } addr;
        socklen_t alen = sizeof addr;
        /* Blocking: every read here says MSG_DONTWAIT, so a connection handed to
         * the application needs no fcntl/ioctl to become blocking again. */
        int fd = accept4(c->listen_fd, &addr.sa, &alen, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                pause_accepting(c, now);
                break;
            }
            c->stats.accept_errors++;
            break;
        }
        if (grow_table(c, fd) < 0) { close(fd); pause_accepting(c, now); break; }
        c->backoff_us = 0;
        c->stats.accepted++;
        /* The bound counts undecided connections only. */
        if (c->max_held && c->idle.count + c->fifo.count - c->fresh_data >= c->max_held) evict_one(c);
        conn *k = hold(c, fd, now, &addr, alen);
        /* Opportunistic peek: on a busy server the request is often already
         * here, and the connection never has to enter the epoll set. */
        int err = 0;
        int kind = peek(c, fd, 0, &err);
        if (kind > 0) {
            if (settle(c, fd, kind, err)) {
                c->stats.fast++; /* certified at accept: af_accept() returns it now */
                return;
            }
            continue;
        }
        if (k->len > 0 && !k->matching) {
            emit(c, fd, AF_EV_DATA, 0);
            if (remember_pending(c, fd) == 0) continue;
        }
        if (c->direct_ok && k->len == 0 && now >= c->direct_resume_us && c->direct_wait_us > 0) {
            /* A waiting accept(): the request of the connection it just took
             * in is usually a few microseconds behind the handshake. Like a
             * plain server, which accepts one connection and reads it, it
             * stops accepting and waits on this one (wait_direct), rather
             * than add it to the epoll set, wake again for the next
             * handshake, and take it out again. */
            c->direct = fd;
            break;
        }
        int e = arm(c, fd);
        if (e) emit(c, fd, AF_EV_ERROR, -e);
    }
}

/* The connection accept_batch() left unarmed for a waiting af_accept(): a
 * poll() on it and on the wake fd alone, for at most direct_wait_us (and
 * within the caller's wait and the next deadline). Meanwhile new connections
 * wait in the listen queue and other held ones in the epoll set's ready list,
 * as they would behind a plain server's read. Its bytes are peeked and matched
 * as on_readable() does; it is armed (added to the epoll set, which reports
 * what arrived since: an edge-triggered ADD checks readiness) unless that
 * settled it. A connection that sends nothing within that time (an idle
 * client) turns direct waits off for direct_backoff_us, so that idle
 * clients cannot stall the accepting thread that long each. Returns 1 when the
 * caller's wait is used up (a signal, the caller's timeout or a deadline: the
 * epoll_wait after it must not wait again), else 0. */
static int wait_direct(af_core *c, int fd, int timeout_ms) {
    AF_ASSERT(c->conns[fd].state == CS_HELD && !c->conns[fd].armed && c->conns[fd].len == 0);
    int64_t wait_us = c->direct_wait_us;
    int bounded = 0; /* by the caller's timeout or a deadline rather than the direct wait */
    if (timeout_ms >= 0 && (int64_t)timeout_ms * 1000 <= wait_us) { wait_us = (int64_t)timeout_ms * 1000; bounded = 1; }
    int64_t next = af_next_timeout_ms(c);
    if (next >= 0 && next * 1000 <= wait_us) { wait_us = next * 1000; bounded = 1; }
    struct pollfd p[2];
    memset(p, 0, sizeof p);
    p[0].fd = fd;
    p[0].events = POLLIN | POLLPRI | POLLRDHUP;
    p[1].fd = c->wakefd;
    p[1].events = POLLIN;
    struct timespec ts = { (time_t)(wait_us / 1000000), (long)(wait_us % 1000000) * 1000 };
    int n = ppoll(p, 2, &ts, NULL);
    if (n < 0) {
        c->interrupted = errno == EINTR; /* else (ENOMEM): the epoll path carries on */
        n = 1;
    }
    c->now = clock_us(c);
    if (n > 0 && p[0].revents) {
        uint32_t flags = 0;
        if (p[0].revents & POLLERR) flags |= EPOLLERR;
        if (p[0].revents & (POLLHUP | POLLRDHUP)) flags |= EPOLLRDHUP;
        if (p[0].revents & POLLPRI) flags |= EPOLLPRI;
        on_readable(c, fd, flags);
    } else if (n == 0 && !bounded) {
        c->stats.direct_idle++;
        c->direct_resume_us = c->now + c->direct_backoff_us;
    }
    arm_or_fail(c, fd);
    return (n == 0 && bounded) || c->interrupted;
}

af_core *af_new(int listen_fd, uint32_t max_bytes, int64_t timeout_ms, uint32_t max_held,
                uint32_t max_events, int *err) {
    af_core *c = calloc(1, sizeof *c);
    if (!c) { *err = ENOMEM; return NULL; }
    c->listen_fd = listen_fd;
    c->max_bytes = max_bytes < 1 ? 1 : (max_bytes > AF_MAX_BYTES ? AF_MAX_BYTES : max_bytes);
    if (timeout_ms > AF_MAX_TIMEOUT_MS) timeout_ms = AF_MAX_TIMEOUT_MS;
    c->timeout_us = timeout_ms > 0 ? timeout_ms * 1000 : 0;
    c->max_held = max_held;
    c->max_events = max_events < 16 ? 16 : max_events;
    c->fifo.head = c->fifo.tail = NIL;
    c->idle.head = c->idle.tail = NIL;
    c->srcs.free_head = AFS_NIL;
    c->finals.head = c->finals.tail = NIL;
    c->epfd = c->wakefd = -1;
    c->fake_now = -1;
    c->direct = NIL;
    c->direct_wait_us = AF_DIRECT_WAIT_US;
    c->direct_backoff_us = AF_DIRECT_BACKOFF_US;
    int rc = pthread_mutex_init(&c->stats_lock, NULL);
    if (rc) { free(c); *err = rc; return NULL; }
    c->events = calloc(c->max_events, sizeof *c->events);
    c->epevents = calloc(c->max_events, sizeof *c->epevents);
    if (!c->events || !c->epevents) { *err = ENOMEM; goto fail; }
    int fl = 1;
    if (ioctl(listen_fd, FIONBIO, &fl) < 0) { *err = errno; goto fail; }
    /* Urgent bytes are ordinary data in every connection accepted (they inherit
     * it): a read or splice otherwise skips or stops at them. Best effort. */
    setsockopt(listen_fd, SOL_SOCKET, SO_OOBINLINE, &fl, sizeof fl);
    c->epfd = epoll_create1(EPOLL_CLOEXEC);
    c->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->epfd < 0 || c->wakefd < 0) { *err = errno; goto fail; }
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.u64 = TAG_LISTEN;
    if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, listen_fd, &ev) < 0) { *err = errno; goto fail; }
    ev.data.u64 = TAG_WAKE;
    if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, c->wakefd, &ev) < 0) { *err = errno; goto fail; }
    c->listening = 1;
    return c;
fail:
    af_free(c);
    return NULL;
}

void af_free(af_core *c) {
    if (!c) return;
    for (uint32_t fd = 0; fd < c->nconns; fd++) {
        if (c->conns[fd].state != CS_FREE) {
            if (c->conns[fd].armed) epoll_ctl(c->epfd, EPOLL_CTL_DEL, (int)fd, NULL);
            close((int)fd);
            free_buf(c, &c->conns[fd]);
        }
    }
    free(c->scratch);
    afs_free(&c->srcs);
    if (c->epfd >= 0) close(c->epfd);
    if (c->wakefd >= 0) close(c->wakefd);
    free(c->conns);
    free(c->pending);
    free(c->events);
    free(c->epevents);
    pthread_mutex_destroy(&c->stats_lock);
    free(c);
}

int af_fileno(const af_core *c) { return c->epfd; }

int64_t af_next_timeout_ms(const af_core *c) {
    int64_t next = INT64_MAX;
    if (c->finals.count) return 0; /* unresolved finals: report them again now */
    if (c->fifo.head != NIL) next = deadline_of(c, &c->conns[c->fifo.head]);
    if (c->idle.head != NIL) {
        int64_t idle = deadline_of(c, &c->conns[c->idle.head]);
        if (idle < next) next = idle;
    }
    if (c->paused && c->resume_at < next) next = c->resume_at;
    if (next == INT64_MAX) return -1;
    int64_t left = next - clock_us(c);
    /* round up: waking a little late is fine, waking early spins */
    return left <= 0 ? 0 : (left + 999) / 1000;
}

/* A waiting af_accept(): take in from the listen queue (accept_batch) and, if
 * that settled nothing, wait on the byte-less connection it stopped at
 * (wait_direct). Returns wait_direct's answer (1: the caller's wait is used
 * up), 0 without one. */
static int take_in(af_core *c, int64_t now, int timeout_ms) {
    c->direct_ok = timeout_ms != 0;
    c->direct = NIL;
    accept_batch(c, now);
    c->direct_ok = 0;
    int direct = c->direct;
    c->direct = NIL;
    if (direct == NIL) return 0;
    if (c->fast_out->fd >= 0 || c->nevents) {
        arm_or_fail(c, direct);
        return 0;
    }
    publish(c); /* what was taken in is counted before the wait */
    return wait_direct(c, direct, timeout_ms);
}

static void new_batch(af_core *c, af_event **events) {
    *events = c->events;
    c->nevents = 0;
    c->fresh_data = 0;
    c->batch++;
    c->now = clock_us(c);
}

/* Deadlines due by the core's clock: the oldest HELD connections of each list, in order. */
static void expire(af_core *c, int64_t now) {
    while (c->fifo.head != NIL && deadline_of(c, &c->conns[c->fifo.head]) <= now && c->nevents < c->max_events)
        emit(c, c->fifo.head, AF_EV_TIMEOUT, 0);
    while (c->idle.head != NIL && deadline_of(c, &c->conns[c->idle.head]) <= now && c->nevents < c->max_events)
        emit(c, c->idle.head, AF_EV_TIMEOUT, 0);
}

static int poll_impl(af_core *c, int timeout_ms, af_event **events, af_ready *ready) {
    new_batch(c, events);
    c->woken = 0;
    c->interrupted = 0;
    if (ready) ready->fd = -1;
    c->fast_out = ready;
    report_finals(c);
    for (uint32_t i = 0; i < c->npending; i++) {
        int fd = c->pending[i];
        conn *k = owned(c, fd);
        if (k && k->state == CS_HELD && !k->armed) {
            int e = arm(c, fd);
            if (e) emit(c, fd, AF_EV_ERROR, -e);
        }
    }
    c->npending = 0;
    /* Over the bound (connections the caller kept waiting, adopted ones):
     * evict the oldest, as FreeBSD does. */
    while (c->max_held && c->idle.count + c->fifo.count > c->max_held && c->nevents + 2 <= c->max_events)
        if (!evict_one(c)) break;

    int64_t now = c->now;
    if (c->paused && now >= c->resume_at) {
        c->paused = 0;
        c->stats.paused = 0;
        if (c->listening) set_listening(c, 1);
    }
    int waited_out = 0;
    if (ready && !c->nevents && !c->fifo.count && !c->idle.count) {
        /* A thread waiting in accept(), nothing held: the listen queue first.
         * With TCP_DEFER_ACCEPT what is queued has sent data, often all of
         * it. What was taken in is published before the wait, so that
         * stats() never lags behind it; the wait hands over the first
         * connection the matcher certifies (a request that arrives after the
         * handshake). With connections held, epoll_wait below looks at them
         * and at the listen queue together: taking from the listen queue
         * first would leave a held connection whose request came starving
         * for as long as new ones keep arriving. */
        waited_out = take_in(c, now, timeout_ms);
        if (ready->fd >= 0 || c->nevents) goto done;
        publish(c);
    }
    int wait = waited_out ? 0 : timeout_ms;
    int64_t next = af_next_timeout_ms(c);
    if (next >= 0 && (wait < 0 || next < wait)) wait = next > 0x7fffffff ? 0x7fffffff : (int)next;
    if (c->nevents) wait = 0;
    if (c->nevents + 2 > c->max_events) goto done;

    /* Half the array for epoll events (each makes at most one event); the rest
     * is for accepted connections (and their evictions) and deadlines. */
    int room = (int)(c->max_events - c->nevents) / 2;
    int n = epoll_wait(c->epfd, c->epevents, room > 0 ? room : 1, wait);
    if (n < 0) {
        if (errno != EINTR) { c->fast_out = NULL; return -errno; }
        c->interrupted = 1; /* the caller goes back to Python, which runs signal handlers */
        n = 0;
    }
    now = c->now = clock_us(c);
    int want_accept = 0;
    for (int i = 0; i < n; i++) {
        uint64_t tag = c->epevents[i].data.u64;
        if (tag == TAG_LISTEN) want_accept = 1;
        else if (tag == TAG_WAKE) {
            c->woken = 1;
            uint64_t v;
            ssize_t r = read(c->wakefd, &v, sizeof v);
            (void)r;
        } else on_readable(c, (int)(uint32_t)tag, c->epevents[i].events);
    }
    if (want_accept) {
        if (ready) take_in(c, now, timeout_ms);
        else accept_batch(c, now);
    }
done:
    expire(c, c->now);
    c->fast_out = NULL;
    publish(c);
    return (int)c->nevents;
}

int af_poll(af_core *c, int timeout_ms, af_event **events) {
    /* Waiting for as long as it takes (a background thread): what the core
     * settles alone (a connection its matcher certified goes into the ready
     * queue) is no reason to wake the caller, so it waits again, without the
     * GIL. It returns for events, af_wake(), and fd exhaustion (the caller warns). */
    for (;;) {
        uint64_t exhausted = c->stats.fd_exhaustion;
        int n = poll_impl(c, timeout_ms, events, NULL);
        if (n != 0 || timeout_ms >= 0 || c->woken || c->interrupted || c->stats.fd_exhaustion != exhausted) return n;
    }
}

static int64_t real_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int af_accept(af_core *c, int timeout_ms, af_event **events, af_ready *ready) {
    /* As af_poll(): a wait that saw nothing, or only settled connections into
     * the ready queue, is no reason to go back to the caller (Python): it
     * waits again, for at most timeout_ms in all (on the real clock: a test's
     * fake clock does not move). */
    int64_t end = timeout_ms > 0 ? real_ms() + timeout_ms : 0;
    int wait = timeout_ms;
    for (;;) {
        uint64_t exhausted = c->stats.fd_exhaustion;
        int n = poll_impl(c, wait, events, ready);
        if (n != 0 || ready->fd >= 0 || timeout_ms == 0 || c->woken || c->interrupted ||
            c->stats.fd_exhaustion != exhausted)
            return n;
        if (timeout_ms > 0) {
            int64_t left = end - real_ms();
            if (left <= 0) return 0;
            wait = (int)left;
        }
    }
}

int af_set_matcher(af_core *c, const afm_prog *prog) {
    /* Every peek buffer carries the matcher's state in front: only before the first one. */
    if (c->stats.held || c->stats.accepted) return -EBUSY;
    c->prog = prog;
    c->ms_hdr = prog ? (uint32_t)((sizeof(afm_state) + 15) & ~(size_t)15) : 0;
    return 0;
}

int af_adopt(af_core *c, int fd) {
    if (fd < 0) return -EBADF;
    if (owned(c, fd)) return -EEXIST;
    union { struct sockaddr sa; struct sockaddr_in6 in6; struct sockaddr_storage ss; } addr;
    socklen_t alen = sizeof addr;
    if (getpeername(fd, &addr.sa, &alen) < 0) return -errno; /* a connected stream socket only */
    /* Everything that can fail before anything changes: on an error the
     * caller's fd is as it was. */
    if (grow_table(c, fd) < 0) return -ENOMEM;
    if (remember_pending(c, fd) < 0) return -ENOMEM; /* armed (and so peeked) by the next af_poll() */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) { c->npending--; return -errno; }
    conn *k = hold(c, fd, clock_us(c), &addr, alen);
    k->nonblock = (fl & O_NONBLOCK) != 0; /* left as it is: every read here is MSG_DONTWAIT */
    int one = 1; /* urgent bytes as ordinary data, as for the connections accepted here */
    setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one);
    c->stats.accepted++; /* counted as taken in, so the accounting still adds up */
    return 0;
}

static void fill_addr(const conn *k, af_addr *addr) { af_sockaddr_to_addr(k->addr, k->addrlen, addr); }

int af_peer(const af_core *c, int fd, af_addr *addr) {
    if (fd < 0 || (uint32_t)fd >= c->nconns || c->conns[fd].state == CS_FREE) return -EBADF;
    fill_addr(&c->conns[fd], addr);
    return 0;
}

int af_release(af_core *c, int fd, uint32_t consume, af_addr *addr) {
    conn *k = owned(c, fd);
    if (!k) return -EBADF;
    disarm(c, fd);
    char sink[512];
    while (consume > 0) {
        ssize_t n = recv(fd, sink, consume < sizeof sink ? consume : sizeof sink, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return n < 0 ? -errno : -EPIPE;
        consume -= (uint32_t)n;
    }
    if (k->nonblock) {
        int off = 0;
        if (ioctl(fd, FIONBIO, &off) < 0) return -errno;
    }
    if (k->lowat) {
        int one = 1; /* the application's socket: the default low-water mark again */
        if (setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one) < 0) return -errno;
    }
    int e = clear_abortive(k, fd);
    if (e) return e;
    if (addr) fill_addr(k, addr);
    forget(c, fd);
    return 0;
}

int af_close(af_core *c, int fd, int reset) {
    conn *k = owned(c, fd);
    if (!k) return -EBADF;
    if (reset) {
        struct linger lg = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    } else {
        if (k->len > 0 || !k->eof) {
            /* Closing with unread data sends an RST; read everything that is there
             * (not just max_bytes, what a filter looks at: the client may have sent
             * more) so a "close" is a clean FIN as promised, also for one never
             * peeked at (adopted). Bounded by AF_CLOSE_DRAIN, more than a receive
             * buffer holds; bytes that arrive after the close draw the kernel's RST,
             * as on any closed socket. */
            char sink[16384];
            uint32_t left = AF_CLOSE_DRAIN;
            while (left > 0) {
                ssize_t r = recv(fd, sink, left < sizeof sink ? left : sizeof sink, MSG_DONTWAIT);
                if (r < 0 && errno == EINTR) continue;
                if (r <= 0) break;
                left -= (uint32_t)r;
            }
        }
        (void)clear_abortive(k, fd); /* a FIN, as promised */
    }
    /* Leave the epoll set explicitly: close() only removes it when no other
     * descriptor (dup, fork) refers to the same open file. */
    disarm(c, fd);
    forget(c, fd);
    return close(fd) < 0 ? -errno : 0;
}

/* af_accept(): hand a certified connection straight to the caller, HELD -> FREE.
 * Returns 0; -ENOMEM before anything changed; another -errno when the release
 * failed (still owned either way: the caller reports or closes it). */
static int release_fast(af_core *c, int fd, uint32_t consume) {
    conn *k = &c->conns[fd];
    af_ready *out = c->fast_out;
    AF_ASSERT(k->state == CS_HELD && consume <= k->len && out->fd < 0);
    uint32_t len = k->len; /* the whole prefix, consumed header included: info is parsed from it */
    if (len > c->scratch_size) {
        char *s = realloc(c->scratch, len);
        if (!s) return -ENOMEM;
        c->scratch = s;
        c->scratch_size = len;
    }
    if (len) memcpy(c->scratch, k->buf, len); /* the buffer goes with the slot */
    uint32_t age = age_of(c, k);
    int rc = af_release(c, fd, consume, &out->addr);
    if (rc < 0) return rc;
    out->fd = fd;
    out->consume = consume;
    out->len = len;
    out->age_us = age;
    out->data = c->scratch;
    /* Counted here: the counters published as this call ends include it, before
     * the caller can hand it to anyone. */
    count_surfaced(c, age);
    return 0;
}

void af_wake(af_core *c) {
    uint64_t one = 1;
    ssize_t r = write(c->wakefd, &one, sizeof one);
    (void)r;
}

int af_stop_accepting(af_core *c) {
    if (!c->listening) return 0;
    c->listening = 0;
    if (epoll_ctl(c->epfd, EPOLL_CTL_DEL, c->listen_fd, NULL) < 0) return -errno;
    return 0;
}

int af_drain(af_core *c, af_event **events) {
    new_batch(c, events);
    report_finals(c);
    while ((c->idle.head != NIL || c->fifo.head != NIL) && c->nevents < c->max_events) {
        int fd = c->idle.head != NIL ? c->idle.head : c->fifo.head;
        int err = 0;
        conn *k = &c->conns[fd];
        if (!k->eof) peek(c, fd, 0, &err);
        emit(c, fd, AF_EV_SHUTDOWN, err);
    }
    return (int)c->nevents;
}

void af_publish_stats(af_core *c) { publish(c); }

void af_get_stats(af_core *c, af_stats *out) {
    pthread_mutex_lock(&c->stats_lock);
    *out = c->published;
    pthread_mutex_unlock(&c->stats_lock);
}

void af_set_queue(af_core *c, afq *q) { c->queue = q; }

int af_set_hist_bounds(af_core *c, const uint64_t *bounds_us, uint32_t n) {
    if (n >= AF_HIST_SLOTS) return -EINVAL;
    for (uint32_t i = 0; i < n; i++) c->hist_bounds[i] = bounds_us[i];
    c->nbounds = n;
    return 0;
}

void af_set_idle_timeout(af_core *c, int64_t timeout_ms) {
    if (timeout_ms > AF_MAX_TIMEOUT_MS) timeout_ms = AF_MAX_TIMEOUT_MS;
    c->idle_us = timeout_ms > 0 ? timeout_ms * 1000 : 0;
}

void af_set_clock(af_core *c, int64_t now_us) { c->fake_now = now_us < 0 ? -1 : now_us; }

void af_set_direct_wait(af_core *c, uint32_t wait_us, uint32_t backoff_us) {
    c->direct_wait_us = wait_us;
    c->direct_backoff_us = backoff_us;
    c->direct_resume_us = 0;
}
