/* aflook.c: accept4 + one recv(MSG_PEEK) + the compiled matcher. See aflook.h. */
#define _GNU_SOURCE
#include "aflook.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

void af_sockaddr_to_addr(const void *sa, uint32_t len, af_addr *addr) {
    /* sa may be a packed byte array: copy it out before looking at it. */
    union { struct sockaddr sa; struct sockaddr_in in; struct sockaddr_in6 in6; } u;
    memset(&u, 0, sizeof u);
    if (len > sizeof u) len = sizeof u;
    memcpy(&u, sa, len);
    memset(addr, 0, sizeof *addr);
    if (len >= sizeof u.in && u.sa.sa_family == AF_INET) {
        addr->family = AF_INET;
        addr->port = ntohs(u.in.sin_port);
        inet_ntop(AF_INET, &u.in.sin_addr, addr->host, sizeof addr->host);
    } else if (len >= sizeof u.in6 && u.sa.sa_family == AF_INET6) {
        addr->family = AF_INET6;
        addr->port = ntohs(u.in6.sin6_port);
        addr->flowinfo = ntohl(u.in6.sin6_flowinfo);
        addr->scope_id = u.in6.sin6_scope_id;
        inet_ntop(AF_INET6, &u.in6.sin6_addr, addr->host, sizeof addr->host);
    } else {
        addr->family = len ? u.sa.sa_family : 0;
    }
}

int af_look(int listen_fd, const afm_prog *prog, char *buf, uint32_t cap, af_look_out *out) {
    memset(out, 0, sizeof *out);
    out->fd = -1;
    for (;;) {
        union { struct sockaddr sa; struct sockaddr_in6 in6; struct sockaddr_storage ss; } addr;
        socklen_t alen = sizeof addr;
        /* Blocking, as socket.accept() on a blocking listener would give it: every
         * read here says MSG_DONTWAIT. */
        int fd = accept4(listen_fd, &addr.sa, &alen, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -errno;
        }
        ssize_t n;
        do n = recv(fd, buf, cap, MSG_PEEK | MSG_DONTWAIT); while (n < 0 && errno == EINTR);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
            close(fd); /* closed or reset before a byte: nothing to serve, look at the next */
            continue;
        }
        out->fd = fd;
        out->len = n > 0 ? (uint32_t)n : 0;
        af_sockaddr_to_addr(&addr, alen, &out->addr);
        if (prog && out->len) {
            afm_state ms;
            afm_init(&ms);
            if (afm_run(prog, &ms, (const uint8_t *)buf, out->len) == AFM_DONE && ms.consume <= out->len) {
                char sink[512];
                uint32_t left = ms.consume;
                while (left > 0) { /* already in the socket buffer: this does not block */
                    ssize_t r = recv(fd, sink, left < sizeof sink ? left : sizeof sink, MSG_DONTWAIT);
                    if (r < 0 && errno == EINTR) continue;
                    if (r <= 0) break;
                    left -= (uint32_t)r;
                }
                if (left > 0) { /* reset while being read: nothing to serve */
                    close(fd);
                    memset(out, 0, sizeof *out);
                    out->fd = -1;
                    continue;
                }
                out->ready = 1;
                out->consume = ms.consume;
            }
        }
        return 0;
    }
}
