/*
 * afqueue: a thread-safe FIFO of connections ready to be served.
 *
 * One per route. The I/O core puts the connections its matcher certifies
 * straight into it (no event, no Python: af_set_queue); the engine puts the
 * ones the Python filters accepted, each with a ticket that names what Python
 * keeps about it (its ConnectionInfo). The application's accept() takes them.
 *
 * The queue's fd (an eventfd) is readable exactly while the queue is non-empty
 * or closed: it is written when the queue goes from empty to non-empty and read
 * when a take empties it, both under the queue's lock. A queue that stays
 * non-empty under load costs no system call per connection, on either side.
 *
 * Every function is thread-safe. A closed queue closes what it held and what is
 * put into it afterwards (counted in afq_lost), and its fd stays readable so
 * blocked waiters wake up; afq_free() closes the fd and frees the queue.
 */
#ifndef AFQUEUE_H
#define AFQUEUE_H

#include <stdint.h>

typedef struct af_addr {
    int family;
    int port;
    uint32_t flowinfo;
    uint32_t scope_id;
    char host[64];
} af_addr;

/* One queued connection. `data` is a malloc'd copy of the bytes it had sent
 * (consumed header included: its info is parsed from them on first use), owned
 * by whoever holds the item: afq_put takes it over, afq_take hands it out and
 * afq_item_clear frees it. */
typedef struct afq_item {
    int fd;
    uint32_t consume; /* bytes read off before the application sees the stream */
    uint32_t len;     /* bytes in data */
    uint32_t age_us;  /* from accept to surfacing */
    uint64_t ticket;  /* 0: certified by the core's matcher (data, addr); else the engine's handle */
    char *data;
    af_addr addr;
} afq_item;

typedef struct afq afq;

/* NULL with *err set on failure. */
afq *afq_new(int *err);
/* Close every connection still queued and the eventfd; free. Nothing may use q after. */
void afq_free(afq *q);
/* Readable while the queue is non-empty or closed. */
int afq_fileno(const afq *q);
/* Queue *item (its data now belongs to the queue). 0: queued; 1: the queue is
 * closed, so the fd was closed and the data freed (counted in afq_lost);
 * -ENOMEM: nothing changed, the item is still the caller's. */
int afq_put(afq *q, afq_item *item);
/* Take the oldest item into *out (its fd and data are the caller's).
 * 1: taken; 0: empty; -EBADF: closed. */
int afq_take(afq *q, afq_item *out);
/* Free the data of an item taken (or never put); idempotent. */
void afq_item_clear(afq_item *item);
/* Items queued now. */
uint32_t afq_len(afq *q);
/* Keep *cell equal to the item count (written under the lock; NULL: stop). The
 * caller's memory, read without a call: accept() asks "anything queued?" before
 * every take, and a call through cffi would drop and retake the GIL for it. */
void afq_mirror_count(afq *q, volatile uint32_t *cell);
/* Close the queue and every connection in it; returns how many were closed.
 * Waiters wake (the fd stays readable) and see it closed. Idempotent: 0 after. */
uint32_t afq_close(afq *q);
/* Connections put after afq_close() (closed at once). */
uint64_t afq_lost(afq *q);

#endif
