/*
 * c-hello: a minimal HTTP/1 angel app in C, written against sdk/include/angel.h only.
 *
 *   GET /   -> 200 "Hello from C:<pid>\n"     anything else -> 404
 *
 * One thread, one connection at a time, `Connection: close` on every response: the smallest
 * honest server. It follows the whole protocol of the header: ready once accepting, heartbeats
 * from its loop, max_requests, and the drain (stop accepting, return ANGEL_EXIT_OK). Queued
 * connections stay in the slot's socket, which the master keeps open, for the next worker.
 *
 * By hand:  gcc -shared -fPIC -O2 -Isdk/include examples/c-hello/hello.c -o libc_hello.so
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "angel.h"

ANGEL_EXPORT const uint32_t angel_abi_version = ANGEL_ABI_VERSION;

#define MAX_LISTENERS 16
/* How long a client may take to send its request head. */
#define READ_TIMEOUT_S 5

static void say(const angel_context *ctx, uint32_t level, const char *msg, const char *fields) {
    /* ABI 1.1 hosts take structured records; 1.0 hosts get the plain line. */
    if (ctx->size >= sizeof(angel_context) && ctx->log_record != NULL) {
        angel_log_record r = {
            .size = sizeof r, .level = level,
            .target = "c_hello", .target_len = strlen("c_hello"),
            .message = msg, .message_len = strlen(msg),
            .fields = fields, .fields_len = fields ? strlen(fields) : 0,
        };
        ctx->log_record(ctx->host.data, &r);
    } else {
        ctx->host.log(ctx->host.data, level, msg, strlen(msg));
    }
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads the request head (up to the blank line) and answers it. */
static void serve(int fd) {
    struct timeval tv = { .tv_sec = READ_TIMEOUT_S };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char req[8192];
    size_t got = 0;
    while (got < sizeof req - 1) {
        ssize_t n = read(fd, req + got, sizeof req - 1 - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        got += (size_t)n;
        req[got] = '\0';
        if (strstr(req, "\r\n\r\n") != NULL) break;
    }
    if (strstr(req, "\r\n\r\n") == NULL) return;
    char body[64], head[256];
    const char *status = "200 OK";
    if (strncmp(req, "GET / ", 6) == 0) {
        snprintf(body, sizeof body, "Hello from C:%d\n", (int)getpid());
    } else {
        status = "404 Not Found";
        snprintf(body, sizeof body, "not found\n");
    }
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                      "Connection: close\r\n\r\n",
                      status, strlen(body));
    if (write_all(fd, head, (size_t)hl) == 0) write_all(fd, body, strlen(body));
    shutdown(fd, SHUT_WR);
}

ANGEL_EXPORT int32_t angel_main(const angel_context *ctx) {
    if (ctx->size < ANGEL_CONTEXT_V1_SIZE) return ANGEL_EXIT_ABI_MISMATCH;
    if (ctx->listener_count == 0 || ctx->listener_count > MAX_LISTENERS) {
        const char *why = "c-hello wants 1 to 16 listeners";
        ctx->host.fail(ctx->host.data, why, strlen(why));
        return ANGEL_EXIT_APP_ERROR;
    }
    /* pfd[0] is the drain fd, then one entry per listener (nonblocking duplicates: the worker of
     * the same slot in another generation accepts from the same socket). */
    struct pollfd pfd[1 + MAX_LISTENERS];
    nfds_t n = 1;
    pfd[0] = (struct pollfd){ .fd = ctx->drain_fd, .events = POLLIN };
    for (uint32_t i = 0; i < ctx->listener_count; i++, n++) {
        int fd = fcntl(ctx->listeners[i].fd, F_DUPFD_CLOEXEC, 0);
        if (fd < 0 || fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
            const char *why = "c-hello cannot duplicate its listener";
            ctx->host.fail(ctx->host.data, why, strlen(why));
            return ANGEL_EXIT_APP_ERROR;
        }
        pfd[n] = (struct pollfd){ .fd = fd, .events = POLLIN };
    }
    char fields[64];
    snprintf(fields, sizeof fields, "{\"listeners\":%u}", (unsigned)ctx->listener_count);
    say(ctx, ANGEL_LOG_INFO, "c-hello serving", fields);
    ctx->host.notify(ctx->host.data, ANGEL_EVENT_READY, 0);

    uint64_t served = 0;
    int timeout = ctx->heartbeat_interval_ms > 0 ? (int)ctx->heartbeat_interval_ms : -1;
    for (;;) {
        int ready = poll(pfd, n, timeout);
        if (ready < 0 && errno != EINTR) break;
        if (ready <= 0) { /* a quiet interval: still alive */
            ctx->host.notify(ctx->host.data, ANGEL_EVENT_HEARTBEAT, served);
            continue;
        }
        if (pfd[0].revents) break; /* drain: stop accepting */
        for (nfds_t i = 1; i < n; i++) {
            if (!(pfd[i].revents & POLLIN)) continue;
            int conn = accept4(pfd[i].fd, NULL, NULL, SOCK_CLOEXEC);
            if (conn < 0) continue; /* EAGAIN: another worker took it */
            serve(conn);
            close(conn);
            served++;
            if (ctx->max_requests > 0 && served == ctx->max_requests) {
                ctx->host.notify(ctx->host.data, ANGEL_EVENT_RETIRING, served);
                goto drained;
            }
        }
        if (ctx->heartbeat_interval_ms > 0)
            ctx->host.notify(ctx->host.data, ANGEL_EVENT_HEARTBEAT, served);
    }
drained:
    for (nfds_t i = 1; i < n; i++) close(pfd[i].fd);
    say(ctx, ANGEL_LOG_INFO, "c-hello drained", NULL);
    return ANGEL_EXIT_OK;
}
