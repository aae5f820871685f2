/* afsrc.c: idle connections counted by source address. See afsrc.h. */
#define _GNU_SOURCE
#include "afsrc.h"

#include <errno.h>
#include <stddef.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

void afs_key(const void *addr, uint32_t addrlen, uint8_t key[AFS_KEY]) {
    /* The bytes may sit at any alignment (the core keeps them in a packed slot): copy, never cast. */
    const uint8_t *raw = addr;
    sa_family_t family = AF_UNSPEC;
    memset(key, 0, AFS_KEY);
    if (addrlen >= offsetof(struct sockaddr, sa_family) + sizeof family)
        memcpy(&family, raw + offsetof(struct sockaddr, sa_family), sizeof family);
    if (family == AF_INET && addrlen >= sizeof(struct sockaddr_in)) {
        key[0] = 4;
        memcpy(key + 1, raw + offsetof(struct sockaddr_in, sin_addr), 4);
    } else if (family == AF_INET6 && addrlen >= sizeof(struct sockaddr_in6)) {
        key[0] = 6;
        memcpy(key + 1, raw + offsetof(struct sockaddr_in6, sin6_addr), 16);
    } /* else (AF_UNIX, unknown): one source for all */
}

static uint32_t hash(const uint8_t key[AFS_KEY]) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (int i = 0; i < AFS_KEY; i++) h = (h ^ key[i]) * 16777619u;
    return h;
}

static int rehash(afs_table *t, uint32_t cap) {
    int32_t *index = malloc((size_t)cap * sizeof *index);
    if (!index) return -ENOMEM;
    for (uint32_t i = 0; i < cap; i++) index[i] = AFS_NIL;
    for (uint32_t s = 0; s < t->nsrc; s++) {
        if (!t->src[s].count) continue;
        uint32_t i = hash(t->src[s].key) & (cap - 1);
        while (index[i] != AFS_NIL) i = (i + 1) & (cap - 1);
        index[i] = (int32_t)s;
    }
    free(t->index);
    t->index = index;
    t->index_cap = cap;
    return 0;
}

static void bucket_unlink(afs_table *t, int32_t s) {
    afs_source *e = &t->src[s];
    uint32_t n = e->count;
    if (e->bprev != AFS_NIL) t->src[e->bprev].bnext = e->bnext; else t->bhead[n] = e->bnext;
    if (e->bnext != AFS_NIL) t->src[e->bnext].bprev = e->bprev; else t->btail[n] = e->bprev;
    e->bprev = e->bnext = AFS_NIL;
}

static void bucket_append(afs_table *t, int32_t s) {
    afs_source *e = &t->src[s];
    uint32_t n = e->count;
    e->bprev = t->btail[n];
    e->bnext = AFS_NIL;
    if (t->btail[n] != AFS_NIL) t->src[t->btail[n]].bnext = s; else t->bhead[n] = s;
    t->btail[n] = s;
}

/* Room for counts up to n, before anything changes. */
static int reserve_buckets(afs_table *t, uint32_t n) {
    if (n < t->nbuckets) return 0;
    uint32_t cap = t->nbuckets ? t->nbuckets : 64;
    while (cap <= n) cap *= 2;
    int32_t *h = realloc(t->bhead, (size_t)cap * sizeof *h);
    if (!h) return -ENOMEM;
    t->bhead = h;
    int32_t *tl = realloc(t->btail, (size_t)cap * sizeof *tl);
    if (!tl) return -ENOMEM;
    t->btail = tl;
    for (uint32_t i = t->nbuckets; i < cap; i++) t->bhead[i] = t->btail[i] = AFS_NIL;
    t->nbuckets = cap;
    return 0;
}

int32_t afs_add(afs_table *t, const uint8_t key[AFS_KEY]) {
    if ((t->live + 1) * 2 >= t->index_cap && rehash(t, t->index_cap ? t->index_cap * 2 : 64) < 0) return -ENOMEM;
    uint32_t i = hash(key) & (t->index_cap - 1);
    while (t->index[i] != AFS_NIL && memcmp(t->src[t->index[i]].key, key, AFS_KEY) != 0) i = (i + 1) & (t->index_cap - 1);
    int32_t s = t->index[i];
    if (s == AFS_NIL) {
        if (reserve_buckets(t, 1) < 0) return -ENOMEM;
        if (t->free_head == AFS_NIL && t->nsrc == t->cap) {
            uint32_t cap = t->cap ? t->cap * 2 : 64;
            afs_source *src = realloc(t->src, (size_t)cap * sizeof *src);
            if (!src) return -ENOMEM;
            t->src = src;
            t->cap = cap;
        }
        if (t->free_head != AFS_NIL) {
            s = t->free_head;
            t->free_head = t->src[s].bnext;
        } else {
            s = (int32_t)t->nsrc++;
        }
        afs_source *e = &t->src[s];
        memcpy(e->key, key, AFS_KEY);
        e->count = 0;
        e->head = e->tail = AFS_NIL;
        e->bprev = e->bnext = AFS_NIL;
        t->index[i] = s;
        t->live++;
    } else {
        if (reserve_buckets(t, t->src[s].count + 1) < 0) return -ENOMEM;
        bucket_unlink(t, s);
    }
    afs_source *e = &t->src[s];
    e->count++;
    bucket_append(t, s);
    if (e->count > t->top) t->top = e->count;
    return s;
}

/* Take entry s out of the index (linear probing: shift the rest of its run back). */
static void index_delete(afs_table *t, int32_t s) {
    uint32_t mask = t->index_cap - 1;
    uint32_t i = hash(t->src[s].key) & mask;
    while (t->index[i] != s) i = (i + 1) & mask;
    uint32_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (t->index[j] == AFS_NIL) break;
        uint32_t k = hash(t->src[t->index[j]].key) & mask;
        /* Move j back to i unless its home k lies cyclically in (i, j]. */
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            t->index[i] = t->index[j];
            i = j;
        }
    }
    t->index[i] = AFS_NIL;
}

void afs_remove(afs_table *t, int32_t s) {
    afs_source *e = &t->src[s];
    bucket_unlink(t, s);
    if (e->count == t->top && t->bhead[e->count] == AFS_NIL) t->top--;
    e->count--;
    if (e->count) {
        bucket_append(t, s);
        return;
    }
    index_delete(t, s);
    t->live--;
    e->bnext = t->free_head;
    t->free_head = s;
}

int32_t afs_top(const afs_table *t) { return t->top ? t->bhead[t->top] : AFS_NIL; }

void afs_free(afs_table *t) {
    free(t->src);
    free(t->index);
    free(t->bhead);
    free(t->btail);
    memset(t, 0, sizeof *t);
    t->free_head = AFS_NIL;
}
