/*
 * afsrc: idle held connections counted by source address, for eviction.
 *
 * When the core holds as many connections as it may (max_held), it makes room
 * by closing an idle connection of the source address that holds the most idle
 * ones, its oldest first: one client that opens a thousand connections loses
 * its own, not a balancer's pool or anyone else's. Everything here is O(1) per
 * change (the LFU "frequency buckets" layout): a hash index of sources, and for
 * each count the sources that have exactly that many idle connections, in the
 * order they reached it; the top is the first source of the highest bucket.
 *
 * The connections of a source are linked by the core (it owns their table):
 * a source only keeps the head and tail fd of its list.
 */
#ifndef AFSRC_H
#define AFSRC_H

#include <stdint.h>

#define AFS_KEY 17 /* an address family tag, then the IPv4 or IPv6 address */
#define AFS_NIL (-1)

typedef struct afs_source {
    uint8_t key[AFS_KEY];
    uint32_t count;       /* idle connections from it (0: the entry is free) */
    int32_t head, tail;   /* its idle connections, oldest first (fds, linked by the core) */
    int32_t bprev, bnext; /* the other sources with the same count (entries); free list: bnext */
} afs_source;

typedef struct afs_table {
    afs_source *src;      /* entries (stable indices: the core keeps them per connection) */
    uint32_t nsrc, cap, live;
    int32_t free_head;
    int32_t *index;       /* open addressing, linear probing: entry or AFS_NIL */
    uint32_t index_cap;   /* a power of two, more than twice live */
    int32_t *bhead, *btail; /* by count: the sources with that count, in the order they reached it */
    uint32_t nbuckets, top; /* top: the highest count held (0: none) */
} afs_table;

/* The key of a peer address (struct sockaddr bytes as accept() gave them). */
void afs_key(const void *addr, uint32_t addrlen, uint8_t key[AFS_KEY]);
/* One more idle connection from `key`: its entry, or -ENOMEM (nothing changed). */
int32_t afs_add(afs_table *t, const uint8_t key[AFS_KEY]);
/* One fewer idle connection for entry `s` (freed at zero). */
void afs_remove(afs_table *t, int32_t s);
/* The entry of the source with the most idle connections, or AFS_NIL. */
int32_t afs_top(const afs_table *t);
void afs_free(afs_table *t);

#endif
