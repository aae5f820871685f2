/* afloop: one epoll loop that relays every forwarded connection of a process.
 *
 * Why one loop: with a thread per relayed connection (afr_relay, afrelay.c)
 * every message cost a poll(2) wake-up and a context switch into that
 * connection's thread; under redis-benchmark (50 connections, one small
 * request in flight on each) that is 50 threads taking turns on 2 cores. Here
 * one thread waits in epoll_wait(2) for all of them and handles every ready
 * socket a wake-up reports: under load one wake-up carries many messages.
 *
 * Edge-triggered, each socket registered once (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET)
 * and never modified: the loop keeps "readable"/"writable" flags per socket,
 * set by events and cleared by EAGAIN. Backpressure (stop reading a side whose
 * peer cannot take more) is then a flag, not an epoll_ctl(2) pair per episode
 * as level-triggered interest masks would need. A read shorter than asked for
 * clears "readable" at once (the socket was empty; new data is a new edge),
 * so a small message costs exactly one read and one write, the same count a
 * level-triggered loop gets, unless EPOLLRDHUP said the peer closed: then the
 * loop reads on until recv returns 0. A connection that keeps both sides busy
 * yields after AFR_BUDGET bytes to a ready list, so it cannot starve the others.
 *
 * Copy or splice (the mode): both cost two system calls per message each way
 * (recv + send, or splice in + splice out); bench/relay.py measures them. The
 * copy mode reads into one buffer shared by the whole loop and sends from it
 * at once; only when the peer cannot take it all does the rest go to a
 * per-direction buffer (AFR_CHUNK, freed when drained), and that direction
 * reads nothing more until it drained. So memory is bounded by AFR_CHUNK per
 * blocked direction and idle connections cost no buffer and no extra fd. The
 * splice mode needs a pipe per direction (two fds, made on first data).
 *
 * Half-close: EOF from one side is passed on as shutdown(SHUT_WR) of the other,
 * the other direction goes on; the connection ends when both directions did.
 * An error on either side (a reset, a failed write, EPOLLERR) ends both: the
 * fds are closed. Finished connections are reported (id, bytes each way, why,
 * errno) through a mutex-protected array to afr_loop_reap(), which another
 * thread calls: the loop itself never waits for Python or its GIL.
 *
 * The backend's connect(2) is non-blocking and completes in the loop (the
 * first EPOLLOUT, then SO_ERROR), with a deadline; a PROXY header given with
 * the connection is sent before any relayed byte. */
#define _GNU_SOURCE
#include "afloop.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define AFR_CHUNK (64 * 1024)
#define AFR_BUDGET (4 * AFR_CHUNK) /* bytes one connection moves before the others get a turn */
#define AFR_EVENTS 256

struct afr_conn;

/* What an epoll event points at: one socket of a connection. */
struct afr_side {
    struct afr_conn *conn;
    int index; /* 0: client, 1: backend */
};

struct afr_dir {
    char *buf; /* AFR_COPY: bytes the destination has not taken yet: buf[off..len) */
    size_t off, len;
    int pipe_r, pipe_w; /* AFR_SPLICE */
    size_t inpipe;
    int eof;  /* the source said EOF */
    int shut; /* and it was passed on */
    uint64_t moved;
};

struct afr_conn {
    uint64_t id;
    int fd[2]; /* 0: client, 1: backend */
    struct afr_side side[2];
    int readable[2], writable[2], rdhup[2];
    int urgent[2]; /* EPOLLPRI: a TCP urgent byte is pending, so a short read may stop at its mark */
    struct afr_dir dir[2]; /* 0: client -> backend (up), 1: backend -> client (down) */
    char *head;            /* sent to the backend first (PROXY header) */
    size_t head_len, head_off;
    int connecting;
    int connect_timeout_ms;
    int64_t deadline_ns;
    int closed;
    int queued; /* on the ready list */
    struct afr_conn *prev, *next;   /* live list (or incoming, or graveyard: next only) */
    struct afr_conn *cprev, *cnext; /* connecting list */
    struct afr_conn *ready_next;
};

struct afr_loop {
    int ep, wake;
    int mode;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    /* guarded by lock */
    struct afr_conn *incoming, *incoming_tail;
    struct afr_done *done;
    size_t ndone, cap_done;
    int stopping, stopped;
    /* the loop thread's own */
    struct afr_conn live;       /* sentinel of a circular list */
    struct afr_conn connecting; /* sentinel of a circular list (cprev/cnext) */
    struct afr_conn *ready, *ready_tail;
    struct afr_conn *graveyard;
    char *scratch;
    /* read by afr_loop_stats from any thread */
    uint64_t n_live, n_connecting, buffered, pipes;
};

#define STAT_ADD(l, field, v) __atomic_add_fetch(&(l)->field, (uint64_t)(v), __ATOMIC_RELAXED)
#define STAT_SUB(l, field, v) __atomic_sub_fetch(&(l)->field, (uint64_t)(v), __ATOMIC_RELAXED)

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct afr_loop *afr_loop_new(int mode) {
    struct afr_loop *l = calloc(1, sizeof *l);
    pthread_condattr_t attr;
    int err;
    if (!l) return NULL;
    l->mode = mode == AFR_SPLICE ? AFR_SPLICE : AFR_COPY;
    l->ep = l->wake = -1;
    l->live.prev = l->live.next = &l->live;
    l->connecting.cprev = l->connecting.cnext = &l->connecting;
    l->scratch = malloc(AFR_CHUNK);
    if (!l->scratch) goto fail;
    l->ep = epoll_create1(EPOLL_CLOEXEC);
    if (l->ep < 0) goto fail;
    l->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (l->wake < 0) goto fail;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(l->ep, EPOLL_CTL_ADD, l->wake, &ev) < 0) goto fail;
    if ((err = pthread_mutex_init(&l->lock, NULL))) {
        errno = err;
        goto fail;
    }
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    err = pthread_cond_init(&l->cond, &attr);
    pthread_condattr_destroy(&attr);
    if (err) {
        pthread_mutex_destroy(&l->lock);
        errno = err;
        goto fail;
    }
    return l;
fail:
    err = errno;
    if (l->ep >= 0) close(l->ep);
    if (l->wake >= 0) close(l->wake);
    free(l->scratch);
    free(l);
    errno = err;
    return NULL;
}

int afr_loop_add(struct afr_loop *l, int client, int backend, int connecting, const char *head, size_t head_len,
                 int connect_timeout_ms, uint64_t id) {
    struct afr_conn *c = calloc(1, sizeof *c);
    int was_empty;
    if (!c) return -ENOMEM;
    if (head_len) {
        c->head = malloc(head_len);
        if (!c->head) {
            free(c);
            return -ENOMEM;
        }
        memcpy(c->head, head, head_len);
        c->head_len = head_len;
    }
    c->id = id;
    c->fd[0] = client;
    c->fd[1] = backend;
    c->connecting = connecting;
    c->connect_timeout_ms = connect_timeout_ms;
    for (int i = 0; i < 2; i++) {
        c->side[i].conn = c;
        c->side[i].index = i;
        c->dir[i].pipe_r = c->dir[i].pipe_w = -1;
    }
    pthread_mutex_lock(&l->lock);
    if (l->stopping) {
        pthread_mutex_unlock(&l->lock);
        free(c->head);
        free(c);
        return -ESHUTDOWN;
    }
    was_empty = l->incoming == NULL;
    if (was_empty)
        l->incoming = c;
    else
        l->incoming_tail->next = c;
    l->incoming_tail = c;
    pthread_mutex_unlock(&l->lock);
    if (was_empty) {
        /* One wake-up per batch: the loop takes the whole list when it wakes. */
        uint64_t one = 1;
        ssize_t n = write(l->wake, &one, sizeof one);
        (void)n; /* EAGAIN only if the counter is full: the loop is awake anyway */
    }
    return 0;
}

void afr_loop_stop(struct afr_loop *l) {
    uint64_t one = 1;
    pthread_mutex_lock(&l->lock);
    l->stopping = 1;
    pthread_mutex_unlock(&l->lock);
    ssize_t n = write(l->wake, &one, sizeof one);
    (void)n;
}

/* -- the loop thread ------------------------------------------------------------------------- */

static void report(struct afr_loop *l, struct afr_conn *c, int why, int err) {
    struct afr_done d = {.id = c->id, .up = c->dir[0].moved, .down = c->dir[1].moved, .why = why, .err = err};
    pthread_mutex_lock(&l->lock);
    if (l->ndone == l->cap_done) {
        size_t cap = l->cap_done ? 2 * l->cap_done : 64;
        struct afr_done *grown = realloc(l->done, cap * sizeof *grown);
        if (!grown) {
            /* Out of memory: this connection's line is lost, its fds are still closed. */
            pthread_mutex_unlock(&l->lock);
            return;
        }
        l->done = grown;
        l->cap_done = cap;
    }
    l->done[l->ndone++] = d;
    pthread_cond_signal(&l->cond);
    pthread_mutex_unlock(&l->lock);
}

static void free_buf(struct afr_loop *l, struct afr_dir *d) {
    if (d->buf) {
        free(d->buf);
        d->buf = NULL;
        STAT_SUB(l, buffered, d->len - d->off);
        d->off = d->len = 0;
    }
}

/* Close both sockets, report, and leave the memory to the end of this loop
 * iteration: events already returned by epoll_wait may still point at it. */
static void finish(struct afr_loop *l, struct afr_conn *c, int why, int err) {
    if (c->closed) return;
    c->closed = 1;
    for (int i = 0; i < 2; i++) {
        /* Explicitly, in case something else holds a duplicate of the fd:
         * then close() alone would leave it in the epoll set. */
        epoll_ctl(l->ep, EPOLL_CTL_DEL, c->fd[i], NULL);
        close(c->fd[i]);
        struct afr_dir *d = &c->dir[i];
        free_buf(l, d);
        if (d->pipe_r >= 0) {
            close(d->pipe_r);
            close(d->pipe_w);
            STAT_SUB(l, pipes, 1);
            STAT_SUB(l, buffered, d->inpipe);
        }
    }
    if (c->connecting) {
        c->cprev->cnext = c->cnext;
        c->cnext->cprev = c->cprev;
        STAT_SUB(l, n_connecting, 1);
    }
    c->prev->next = c->next;
    c->next->prev = c->prev;
    STAT_SUB(l, n_live, 1);
    report(l, c, why, err);
    c->next = l->graveyard;
    l->graveyard = c;
}

static int side_error(int fd) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return errno;
    return err;
}

/* Move bytes one way (dir k: from fd[k] to fd[1-k]) until blocked or out of
 * budget. Returns 0 (blocked or done), 1 (budget spent, more to do) or -errno
 * with *bad the index of the failing side. */
static int move_copy(struct afr_loop *l, struct afr_conn *c, int k, int *bad, size_t *budget) {
    struct afr_dir *d = &c->dir[k];
    int src = k, dst = 1 - k;
    for (;;) {
        if (d->len > d->off) {
            if (!c->writable[dst]) return 0;
            ssize_t n = send(c->fd[dst], d->buf + d->off, d->len - d->off, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) {
                    c->writable[dst] = 0;
                    return 0;
                }
                *bad = dst;
                return -errno;
            }
            d->off += (size_t)n;
            d->moved += (uint64_t)n;
            STAT_SUB(l, buffered, n);
            if (d->off == d->len) free_buf(l, d); /* drained: back to the shared buffer */
            continue;
        }
        if (d->eof) {
            if (!d->shut) {
                shutdown(c->fd[dst], SHUT_WR); /* pass the half-close on */
                d->shut = 1;
            }
            return 0;
        }
        /* Backpressure: read nothing while the destination cannot take it. */
        if (!c->readable[src] || !c->writable[dst]) return 0;
        if (*budget == 0) return 1;
        ssize_t n = recv(c->fd[src], l->scratch, AFR_CHUNK, MSG_DONTWAIT);
        if (n > 0) {
            size_t got = (size_t)n, sent = 0;
            *budget = got >= *budget ? 0 : *budget - got;
            /* Drained: the next data is an edge. Not so at an urgent mark: a read stops
             * there, with the bytes after it already in (SO_OOBINLINE makes the next read
             * take them); then read on until EAGAIN. */
            if (got < AFR_CHUNK && !c->rdhup[src] && !c->urgent[src]) c->readable[src] = 0;
            while (c->writable[dst] && sent < got) {
                ssize_t w = send(c->fd[dst], l->scratch + sent, got - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (w >= 0) {
                    sent += (size_t)w;
                } else if (errno == EAGAIN) {
                    c->writable[dst] = 0;
                } else if (errno != EINTR) {
                    *bad = dst;
                    return -errno;
                }
            }
            d->moved += sent;
            if (sent < got) { /* the destination is full: keep the rest, read no more this way */
                d->buf = malloc(AFR_CHUNK);
                if (!d->buf) {
                    *bad = dst;
                    return -ENOMEM;
                }
                memcpy(d->buf, l->scratch + sent, got - sent);
                d->off = 0;
                d->len = got - sent;
                STAT_ADD(l, buffered, d->len);
            }
            continue;
        }
        if (n == 0) {
            d->eof = 1;
            c->readable[src] = 0;
            continue;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {
            c->readable[src] = 0;
            c->urgent[src] = 0;
            return 0;
        }
        *bad = src;
        return -errno;
    }
}

/* splice(2) never reads past a TCP urgent mark (it answers EAGAIN there, however much
 * follows, or 0 when the FIN is in too: so a 0 is checked here as well): with one pending, the bytes from the mark on are read with recv(2) (the
 * urgent byte is inline: SO_OOBINLINE) and written into the empty pipe, in order.
 * Returns the bytes, 0 at EOF, -1 with errno set (EAGAIN: nothing there). */
static ssize_t past_the_mark(struct afr_loop *l, struct afr_dir *d, int fd) {
    ssize_t n = recv(fd, l->scratch, 4096, MSG_DONTWAIT); /* one page: an empty pipe takes it whole */
    if (n <= 0) return n;
    ssize_t w = write(d->pipe_w, l->scratch, (size_t)n);
    if (w != n) {
        if (w >= 0) errno = EIO;
        return -1;
    }
    return n;
}

static int move_splice(struct afr_loop *l, struct afr_conn *c, int k, int *bad, size_t *budget) {
    struct afr_dir *d = &c->dir[k];
    int src = k, dst = 1 - k;
    for (;;) {
        if (d->inpipe > 0) {
            if (!c->writable[dst]) return 0;
            ssize_t n = splice(d->pipe_r, NULL, c->fd[dst], NULL, d->inpipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n > 0) {
                d->inpipe -= (size_t)n;
                d->moved += (uint64_t)n;
                STAT_SUB(l, buffered, n);
                continue;
            }
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && errno == EAGAIN) { /* the pipe holds data: it is the socket that is full */
                c->writable[dst] = 0;
                return 0;
            }
            *bad = dst;
            return n < 0 ? -errno : -EPIPE;
        }
        if (d->eof) {
            if (!d->shut) {
                shutdown(c->fd[dst], SHUT_WR);
                d->shut = 1;
            }
            return 0;
        }
        if (!c->readable[src] || !c->writable[dst]) return 0;
        if (*budget == 0) return 1;
        if (d->pipe_r < 0) {
            int p[2];
            if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) {
                *bad = src;
                return -errno;
            }
            d->pipe_r = p[0];
            d->pipe_w = p[1];
            STAT_ADD(l, pipes, 1);
        }
        ssize_t n = splice(c->fd[src], NULL, d->pipe_w, NULL, AFR_CHUNK, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        /* At an urgent mark splice answers EAGAIN, or 0 once the FIN is in as well. */
        if ((n < 0 && errno == EAGAIN && c->urgent[src]) || n == 0) n = past_the_mark(l, d, c->fd[src]);
        if (n > 0) {
            d->inpipe = (size_t)n;
            STAT_ADD(l, buffered, n);
            *budget = (size_t)n >= *budget ? 0 : *budget - (size_t)n;
            if (n < AFR_CHUNK && !c->rdhup[src] && !c->urgent[src]) c->readable[src] = 0;
            continue;
        }
        if (n == 0) {
            d->eof = 1;
            c->readable[src] = 0;
            continue;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN) { /* the pipe is empty: it is the socket that is */
            c->readable[src] = 0;
            c->urgent[src] = 0;
            return 0;
        }
        *bad = src;
        return -errno;
    }
}

static void make_ready(struct afr_loop *l, struct afr_conn *c) {
    if (c->queued) return;
    c->queued = 1;
    c->ready_next = NULL;
    if (l->ready)
        l->ready_tail->ready_next = c;
    else
        l->ready = c;
    l->ready_tail = c;
}

/* Move what can be moved on one connection; finish it when both ways ended or one failed. */
static void pump(struct afr_loop *l, struct afr_conn *c) {
    size_t budget = AFR_BUDGET;
    int more = 0;
    if (c->closed || c->connecting) return;
    while (c->head_off < c->head_len) { /* the PROXY header, before any relayed byte */
        if (!c->writable[1]) break;
        ssize_t n = send(c->fd[1], c->head + c->head_off, c->head_len - c->head_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0) {
            c->head_off += (size_t)n;
        } else if (errno == EAGAIN) {
            c->writable[1] = 0;
        } else if (errno != EINTR) {
            finish(l, c, AFR_END_BACKEND, errno);
            return;
        }
    }
    for (int k = 0; k < 2; k++) {
        int bad = 0, rc;
        if (k == 0 && c->head_off < c->head_len) continue; /* up waits for the header */
        rc = l->mode == AFR_SPLICE ? move_splice(l, c, k, &bad, &budget) : move_copy(l, c, k, &bad, &budget);
        if (rc < 0) {
            /* One side failed: the other has nobody to talk to any more. */
            finish(l, c, bad == 0 ? AFR_END_CLIENT : AFR_END_BACKEND, -rc);
            return;
        }
        more |= rc;
    }
    if (c->dir[0].shut && c->dir[1].shut)
        finish(l, c, AFR_END_OK, 0);
    else if (more)
        make_ready(l, c);
}

static int set_nonblock(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -1;
    return (flags & O_NONBLOCK) ? 0 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* Take in a connection afr_loop_add() queued. */
static void take_in(struct afr_loop *l, struct afr_conn *c) {
    int one = 1;
    c->prev = l->live.prev;
    c->next = &l->live;
    l->live.prev->next = c;
    l->live.prev = c;
    STAT_ADD(l, n_live, 1);
    if (c->connecting) {
        /* The connecting list is kept in deadline order (from the tail: usually the
         * last), so each turn looks at the due connects and the next one only. */
        struct afr_conn *before = l->connecting.cprev;
        c->deadline_ns = now_ns() + (int64_t)c->connect_timeout_ms * 1000000;
        while (before != &l->connecting && before->deadline_ns > c->deadline_ns) before = before->cprev;
        c->cprev = before;
        c->cnext = before->cnext;
        before->cnext->cprev = c;
        before->cnext = c;
        STAT_ADD(l, n_connecting, 1);
    }
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                 .data.ptr = &c->side[i]};
        /* Not TCP (a UNIX socket): no Nagle to turn off, nothing to do. */
        setsockopt(c->fd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        /* Urgent bytes are relayed as ordinary data, in place (a read skips them otherwise). */
        setsockopt(c->fd[i], SOL_SOCKET, SO_OOBINLINE, &one, sizeof one);
        if (set_nonblock(c->fd[i]) < 0 || epoll_ctl(l->ep, EPOLL_CTL_ADD, c->fd[i], &ev) < 0) {
            finish(l, c, i == 0 ? AFR_END_CLIENT : c->connecting ? AFR_END_CONNECT : AFR_END_BACKEND, errno);
            return;
        }
    }
    /* Optimistic: the client was surfaced because its bytes are there. EAGAIN
     * clears a flag; ADD reports what is ready already, so nothing is missed. */
    c->readable[0] = c->writable[0] = 1;
    c->readable[1] = c->writable[1] = !c->connecting;
    pump(l, c);
}

static void connected(struct afr_loop *l, struct afr_conn *c) {
    c->connecting = 0;
    c->cprev->cnext = c->cnext;
    c->cnext->cprev = c->cprev;
    STAT_SUB(l, n_connecting, 1);
}

static void on_event(struct afr_loop *l, struct afr_side *s, uint32_t events) {
    struct afr_conn *c = s->conn;
    int i = s->index;
    if (c->closed) return;
    if (c->connecting && i == 1) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = side_error(c->fd[1]);
        if (err || (events & EPOLLERR)) {
            finish(l, c, AFR_END_CONNECT, err ? err : ECONNREFUSED);
            return;
        }
        connected(l, c);
    }
    if (events & (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) c->readable[i] = 1;
    if (events & EPOLLPRI) c->urgent[i] = 1; /* read on past the urgent mark */
    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) c->rdhup[i] = 1; /* read on to EOF or the error */
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) c->writable[i] = 1;
    pump(l, c);
    if (!c->closed && (events & EPOLLERR)) {
        /* A reset the pump did not run into (this side's reads wait on
         * backpressure): end both now, the peer is gone. */
        int err = side_error(c->fd[i]);
        finish(l, c, i == 0 ? AFR_END_CLIENT : AFR_END_BACKEND, err ? err : ECONNRESET);
    }
}

/* End the connects whose deadline passed; milliseconds epoll_wait may sleep: until
 * the next deadline, -1 if none. Called on every turn, busy or not (it was called
 * only when no connection had more to move, so with busy connections a hung connect
 * was never reported); the list is in deadline order, so the work is the due
 * connects plus one look. */
static int expire_connects(struct afr_loop *l) {
    struct afr_conn *c = l->connecting.cnext;
    int64_t now, left;
    if (c == &l->connecting) return -1;
    now = now_ns();
    while (c != &l->connecting && c->deadline_ns <= now) {
        finish(l, c, AFR_END_CONNECT, ETIMEDOUT); /* unlinks it */
        c = l->connecting.cnext;
    }
    if (c == &l->connecting) return -1;
    left = (c->deadline_ns - now) / 1000000 + 1;
    return left > 0x7fffffff ? 0x7fffffff : (int)left;
}

static void bury(struct afr_loop *l) {
    while (l->graveyard) {
        struct afr_conn *c = l->graveyard;
        l->graveyard = c->next;
        free(c->head);
        free(c);
    }
}

/* Returns 1 when afr_loop_stop() was called. */
static int on_wake(struct afr_loop *l) {
    uint64_t count;
    struct afr_conn *batch, *c;
    int stopping;
    ssize_t n = read(l->wake, &count, sizeof count);
    (void)n;
    pthread_mutex_lock(&l->lock);
    batch = l->incoming;
    l->incoming = l->incoming_tail = NULL;
    stopping = l->stopping;
    pthread_mutex_unlock(&l->lock);
    while (batch) {
        c = batch;
        batch = c->next;
        take_in(l, c);
    }
    return stopping;
}

int afr_loop_run(struct afr_loop *l) {
    struct epoll_event events[AFR_EVENTS];
    int rc = 0, stop = 0;
    sigset_t pipe_only;
    /* splice(2) into a socket whose peer has gone raises SIGPIPE (it has no
     * MSG_NOSIGNAL): keep it off this thread, whatever the process does with it. */
    sigemptyset(&pipe_only);
    sigaddset(&pipe_only, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_only, NULL);
    while (!stop) {
        int timeout = expire_connects(l);
        if (l->ready) timeout = 0; /* connections with more to move: look, do not wait */
        int n = epoll_wait(l->ep, events, AFR_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            rc = -errno;
            break;
        }
        for (int e = 0; e < n; e++) {
            if (events[e].data.ptr == NULL)
                stop |= on_wake(l);
            else
                on_event(l, events[e].data.ptr, events[e].events);
        }
        /* Connections that ran out of budget: their turn again, after everyone else's. */
        struct afr_conn *turn = l->ready;
        l->ready = l->ready_tail = NULL;
        while (turn) {
            struct afr_conn *c = turn;
            turn = c->ready_next;
            c->queued = 0;
            pump(l, c);
        }
        bury(l);
    }
    /* Stopping (or epoll failed): what was handed over and not taken in yet, then everything live. */
    pthread_mutex_lock(&l->lock);
    l->stopping = 1;
    struct afr_conn *batch = l->incoming;
    l->incoming = l->incoming_tail = NULL;
    pthread_mutex_unlock(&l->lock);
    while (batch) {
        struct afr_conn *c = batch;
        batch = c->next;
        c->prev = l->live.prev; /* live for a moment, so finish() unlinks it like any other */
        c->next = &l->live;
        l->live.prev->next = c;
        l->live.prev = c;
        STAT_ADD(l, n_live, 1);
        c->connecting = 0;
        finish(l, c, AFR_END_STOPPED, 0);
    }
    while (l->live.next != &l->live) finish(l, l->live.next, AFR_END_STOPPED, 0);
    l->ready = l->ready_tail = NULL;
    bury(l);
    pthread_mutex_lock(&l->lock);
    l->stopped = 1;
    pthread_cond_broadcast(&l->cond);
    pthread_mutex_unlock(&l->lock);
    return rc;
}

int afr_loop_reap(struct afr_loop *l, struct afr_done *out, int max, int timeout_ms) {
    struct timespec until;
    int n = 0;
    if (timeout_ms >= 0) {
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
        if (until.tv_nsec >= 1000000000) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000;
        }
    }
    pthread_mutex_lock(&l->lock);
    while (l->ndone == 0 && !l->stopped) {
        if (timeout_ms < 0)
            pthread_cond_wait(&l->cond, &l->lock);
        else if (pthread_cond_timedwait(&l->cond, &l->lock, &until) == ETIMEDOUT)
            break;
    }
    if (l->ndone > 0 && max > 0) {
        n = l->ndone < (size_t)max ? (int)l->ndone : max;
        memcpy(out, l->done, (size_t)n * sizeof *out);
        memmove(l->done, l->done + n, (l->ndone - (size_t)n) * sizeof *out);
        l->ndone -= (size_t)n;
    } else if (l->ndone == 0 && l->stopped) {
        n = -ESHUTDOWN;
    }
    pthread_mutex_unlock(&l->lock);
    return n;
}

void afr_loop_stats(struct afr_loop *l, uint64_t out[4]) {
    out[0] = __atomic_load_n(&l->n_live, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&l->n_connecting, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&l->buffered, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&l->pipes, __ATOMIC_RELAXED);
}

void afr_loop_free(struct afr_loop *l) {
    struct afr_conn *c = l->incoming;
    while (c) { /* handed over to a loop that never ran */
        struct afr_conn *next = c->next;
        close(c->fd[0]);
        close(c->fd[1]);
        free(c->head);
        free(c);
        c = next;
    }
    close(l->ep);
    close(l->wake);
    free(l->scratch);
    free(l->done);
    pthread_cond_destroy(&l->cond);
    pthread_mutex_destroy(&l->lock);
    free(l);
}
