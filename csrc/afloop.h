/* afloop: one epoll loop that relays every forwarded connection of a process.
 *
 * Threads: one thread runs afr_loop_run() (the whole loop is that one call,
 * made without the GIL); any thread hands connections over with
 * afr_loop_add(); one thread collects finished connections with
 * afr_loop_reap(). See afloop.c for the design and why. */
#ifndef AFLOOP_H
#define AFLOOP_H
#include <stddef.h>
#include <stdint.h>

/* How a direction moves its bytes (afr_loop_new's mode). */
#define AFR_COPY 0   /* recv(2) into a buffer, send(2) from it */
#define AFR_SPLICE 1 /* splice(2) socket -> pipe -> socket */

/* Why a connection ended (afr_done.why). */
#define AFR_END_OK 0      /* both directions reached EOF, passed on */
#define AFR_END_CONNECT 1 /* the backend's connect failed or timed out (err) */
#define AFR_END_CLIENT 2  /* reading from / writing to the client failed (err) */
#define AFR_END_BACKEND 3 /* reading from / writing to the backend failed (err) */
#define AFR_END_STOPPED 4 /* afr_loop_stop() closed it */

struct afr_done {
    uint64_t id;
    uint64_t up;   /* bytes client -> backend (the PROXY header not counted) */
    uint64_t down; /* bytes backend -> client */
    int32_t why;   /* AFR_END_* */
    int32_t err;   /* errno, or 0 */
};

struct afr_loop;

/* A loop (epoll set, wake-up eventfd, no thread yet); NULL with errno set on failure. */
struct afr_loop *afr_loop_new(int mode);

/* Hand a connection over: from now on the loop owns both fds (it closes them)
 * and copies ``head`` (a PROXY header, may be empty) to send to the backend
 * before any relayed byte. ``connecting``: the backend's non-blocking
 * connect(2) is in progress; it fails with ETIMEDOUT after ``connect_timeout_ms``.
 * Returns 0, or -ESHUTDOWN / -ENOMEM: then the fds stay the caller's. */
int afr_loop_add(struct afr_loop *loop, int client, int backend, int connecting, const char *head, size_t head_len,
                 int connect_timeout_ms, uint64_t id);

/* Relay until afr_loop_stop(): every connection is then closed and reported
 * (AFR_END_STOPPED). Returns 0, or -errno if epoll failed (same clean-up). Blocks. */
int afr_loop_run(struct afr_loop *loop);

/* Ask afr_loop_run() to return; later afr_loop_add() calls fail. Any thread. */
void afr_loop_stop(struct afr_loop *loop);

/* Wait up to ``timeout_ms`` (-1: for ever) for finished connections and move
 * up to ``max`` into ``out``: returns how many, or -ESHUTDOWN once the loop has
 * stopped and every finished connection was reaped. Blocks. */
int afr_loop_reap(struct afr_loop *loop, struct afr_done *out, int max, int timeout_ms);

/* live connections, of which connecting, bytes buffered (copy buffers and
 * pipes' contents), pipes open (AFR_SPLICE). Any thread; a snapshot. */
void afr_loop_stats(struct afr_loop *loop, uint64_t out[4]);

/* Free a loop whose afr_loop_run() has returned (or never ran: then the
 * connections not yet taken in are closed here). */
void afr_loop_free(struct afr_loop *loop);

#endif
