/* afrelay: relay bytes between two connected sockets with splice(2), in one call
 * that runs without the GIL (cffi releases it around the call).
 *
 * Why: the relay of `acceptfilter serve --forward` pumped bytes in Python
 * (recv/sendall, two threads per connection): every small message cost two
 * trips through the interpreter and the GIL, 0.3x direct on redis-benchmark.
 * Here a relayed connection is one thread blocked in this function: poll(2)
 * on both sockets, and for each direction splice(2) socket -> pipe -> socket,
 * so the bytes never leave the kernel and no Python runs per message.
 *
 * Half-close is passed on (EOF from one side: shutdown(SHUT_WR) of the
 * other); an error on one side ends both directions. The sockets are left
 * open (the caller closes them) and switched to non-blocking.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <sys/socket.h>
#include <unistd.h>

#include "afrelay.h"

#define AFR_CHUNK (1 << 16)

struct dir {
    int src, dst;
    int pipe_r, pipe_w;
    size_t pending;    /* bytes in the pipe, not yet written to dst */
    int eof;           /* src said EOF (or failed) */
    int done;          /* nothing more will move this way */
    int want_read;     /* waiting for src to be readable */
    int want_write;    /* waiting for dst to be writable */
    int drained;       /* the last read was short: src is most likely empty now */
    uint64_t moved;
};

static int nonblock(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -1;
    return fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* splice(2) never reads past a TCP urgent mark: it answers EAGAIN there however much
 * follows (0 once the FIN is in too), and poll(2) says readable, so the relay spun at
 * 100% CPU. After an EAGAIN or a 0
 * the bytes (if any) are read with recv(2) instead (the urgent byte inline: SO_OOBINLINE)
 * and written into the empty pipe, in order. Returns the bytes, 0 at EOF, -1 with errno
 * set (EAGAIN: nothing there). */
static ssize_t past_the_mark(struct dir *d) {
    char buf[4096]; /* one page: an empty pipe takes it whole */
    ssize_t n = recv(d->src, buf, sizeof buf, MSG_DONTWAIT);
    if (n <= 0) return n;
    ssize_t w = write(d->pipe_w, buf, (size_t)n);
    if (w != n) {
        if (w >= 0) errno = EIO;
        return -1;
    }
    return n;
}

/* Move what can be moved now; returns 1 if anything changed, -1 on a fatal error. */
static int step(struct dir *d, int *err) {
    int progress = 0;
    d->want_read = d->want_write = 0;
    while (!d->done) {
        if (d->pending == 0 && !d->eof && d->drained) {
            /* A short read emptied the socket: ask poll(2) rather than spend a
             * splice(2) on EAGAIN (one syscall less per message each way). */
            d->drained = 0;
            d->want_read = 1;
            return progress;
        }
        if (d->pending == 0 && !d->eof) {
            ssize_t n = splice(d->src, NULL, d->pipe_w, NULL, AFR_CHUNK, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if ((n < 0 && errno == EAGAIN) || n == 0) n = past_the_mark(d); /* 0: also at a mark, FIN in */
            if (n > 0) {
                d->pending = (size_t)n;
                d->drained = n < AFR_CHUNK;
                progress = 1;
            } else if (n == 0) {
                d->eof = 1;
                progress = 1;
            } else if (errno == EAGAIN) {
                d->want_read = 1;
                return progress;
            } else if (errno == EINTR) {
                continue;
            } else {
                *err = errno;
                d->eof = 1;
                d->done = 1;
                return -1;
            }
        }
        if (d->pending > 0) {
            ssize_t n = splice(d->pipe_r, NULL, d->dst, NULL, d->pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n > 0) {
                d->pending -= (size_t)n;
                d->moved += (uint64_t)n;
                progress = 1;
                continue;
            }
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && errno == EAGAIN) {
                d->want_write = 1;
                return progress;
            }
            *err = n < 0 ? errno : EPIPE;
            d->done = 1;
            return -1;
        }
        if (d->eof && d->pending == 0) {
            shutdown(d->dst, SHUT_WR); /* pass the half-close on */
            d->done = 1;
            return 1;
        }
    }
    return progress;
}

int afr_relay(int a, int b, uint64_t *a_to_b, uint64_t *b_to_a) {
    struct dir dirs[2] = {
        {.src = a, .dst = b, .pipe_r = -1, .pipe_w = -1},
        {.src = b, .dst = a, .pipe_r = -1, .pipe_w = -1},
    };
    int err = 0, i, one = 1;
    int p[2];
    if (nonblock(a) < 0 || nonblock(b) < 0) return -errno;
    /* Urgent bytes are relayed as ordinary data, in place (a read skips them otherwise). */
    setsockopt(a, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one);
    setsockopt(b, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one);
    for (i = 0; i < 2; i++) {
        if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) {
            err = errno;
            goto out;
        }
        dirs[i].pipe_r = p[0];
        dirs[i].pipe_w = p[1];
    }
    while (!(dirs[0].done && dirs[1].done)) {
        struct pollfd pfd[2] = {{.fd = a}, {.fd = b}};
        for (i = 0; i < 2; i++) {
            if (step(&dirs[i], &err) < 0) {
                /* A reset or a failed write ends the whole relay: the other
                 * direction has nobody to talk to any more. */
                dirs[0].done = dirs[1].done = 1;
                shutdown(a, SHUT_RDWR);
                shutdown(b, SHUT_RDWR);
                goto out;
            }
        }
        if (dirs[0].done && dirs[1].done) break;
        for (i = 0; i < 2; i++) {
            struct dir *d = &dirs[i];
            if (d->done) continue;
            if (d->want_read) pfd[d->src == a ? 0 : 1].events |= POLLIN;
            if (d->want_write) pfd[d->dst == a ? 0 : 1].events |= POLLOUT;
        }
        if (!pfd[0].events) pfd[0].fd = -1;
        if (!pfd[1].events) pfd[1].fd = -1;
        if (pfd[0].fd < 0 && pfd[1].fd < 0) continue; /* progress without waiting: go round */
        if (poll(pfd, 2, -1) < 0 && errno != EINTR) {
            err = errno;
            goto out;
        }
    }
out:
    for (i = 0; i < 2; i++) {
        if (dirs[i].pipe_r >= 0) close(dirs[i].pipe_r);
        if (dirs[i].pipe_w >= 0) close(dirs[i].pipe_w);
    }
    *a_to_b = dirs[0].moved;
    *b_to_a = dirs[1].moved;
    return err ? -err : 0;
}
