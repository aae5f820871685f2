/* afqueue.c: a mutex-protected ring of ready connections with a level eventfd. See afqueue.h. */
#define _GNU_SOURCE
#include "afqueue.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct afq {
    pthread_mutex_t lock;
    afq_item *ring;
    uint32_t cap, head, count; /* cap: 0 or a power of two */
    int efd;
    int closed;
    uint64_t lost;
    volatile uint32_t *mirror; /* the caller's copy of count, or NULL */
};

static void mirror(afq *q) {
    if (q->mirror) *q->mirror = q->count;
}

afq *afq_new(int *err) {
    afq *q = calloc(1, sizeof *q);
    if (!q) { *err = ENOMEM; return NULL; }
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) { *err = errno; free(q); return NULL; }
    int rc = pthread_mutex_init(&q->lock, NULL);
    if (rc) { *err = rc; close(q->efd); free(q); return NULL; }
    return q;
}

int afq_fileno(const afq *q) { return q->efd; }

static void signal_fd(afq *q) {
    uint64_t one = 1;
    ssize_t r = write(q->efd, &one, sizeof one);
    (void)r; /* EAGAIN only at 2^64-2: it is readable then anyway */
}

static void clear_fd(afq *q) {
    uint64_t v;
    ssize_t r = read(q->efd, &v, sizeof v);
    (void)r; /* EAGAIN: already clear */
}

static int grow(afq *q) {
    uint32_t cap = q->cap ? q->cap * 2 : 64;
    if (cap < q->cap) return -ENOMEM;
    afq_item *ring = malloc((size_t)cap * sizeof *ring);
    if (!ring) return -ENOMEM;
    for (uint32_t i = 0; i < q->count; i++) ring[i] = q->ring[(q->head + i) & (q->cap - 1)];
    free(q->ring);
    q->ring = ring;
    q->cap = cap;
    q->head = 0;
    return 0;
}

void afq_item_clear(afq_item *item) {
    free(item->data);
    item->data = NULL;
    item->len = 0;
}

int afq_put(afq *q, afq_item *item) {
    pthread_mutex_lock(&q->lock);
    if (q->closed) {
        q->lost++;
        pthread_mutex_unlock(&q->lock);
        close(item->fd);
        afq_item_clear(item);
        return 1;
    }
    if (q->count == q->cap && grow(q) < 0) {
        pthread_mutex_unlock(&q->lock);
        return -ENOMEM;
    }
    q->ring[(q->head + q->count) & (q->cap - 1)] = *item;
    item->data = NULL; /* the queue's now */
    if (q->count++ == 0) signal_fd(q); /* empty -> non-empty: the one write */
    mirror(q);
    pthread_mutex_unlock(&q->lock);
    return 0;
}

int afq_take(afq *q, afq_item *out) {
    pthread_mutex_lock(&q->lock);
    int rc = 0;
    if (q->closed) {
        rc = -EBADF;
    } else if (q->count) {
        *out = q->ring[q->head];
        q->head = (q->head + 1) & (q->cap - 1);
        if (--q->count == 0) clear_fd(q); /* non-empty -> empty: the one read */
        mirror(q);
        rc = 1;
    }
    pthread_mutex_unlock(&q->lock);
    return rc;
}

uint32_t afq_len(afq *q) {
    pthread_mutex_lock(&q->lock);
    uint32_t n = q->count;
    pthread_mutex_unlock(&q->lock);
    return n;
}

uint32_t afq_close(afq *q) {
    pthread_mutex_lock(&q->lock);
    uint32_t closed = 0;
    if (!q->closed) {
        q->closed = 1;
        for (; q->count; q->count--) {
            afq_item *it = &q->ring[q->head];
            close(it->fd);
            afq_item_clear(it);
            q->head = (q->head + 1) & (q->cap - 1);
            closed++;
        }
        signal_fd(q); /* readable for good: every waiter wakes and sees it closed */
        mirror(q);
    }
    pthread_mutex_unlock(&q->lock);
    return closed;
}

void afq_mirror_count(afq *q, volatile uint32_t *cell) {
    pthread_mutex_lock(&q->lock);
    q->mirror = cell;
    mirror(q);
    pthread_mutex_unlock(&q->lock);
}

uint64_t afq_lost(afq *q) {
    pthread_mutex_lock(&q->lock);
    uint64_t n = q->lost;
    pthread_mutex_unlock(&q->lock);
    return n;
}

void afq_free(afq *q) {
    if (!q) return;
    afq_close(q);
    q->mirror = NULL;
    close(q->efd);
    free(q->ring);
    pthread_mutex_destroy(&q->lock);
    free(q);
}
