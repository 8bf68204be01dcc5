/*
 * angel.h — the angel-host app ABI, version 1, for C (and anything that speaks the C ABI).
 *
 * ABI 1.1 (compatible): `angel_context.log_record`, an optional structured log callback.
 *
 * The single source of truth is the Rust module `angel::abi` (sdk/src/abi.rs); this header
 * mirrors it, and sdk/tests/header.rs checks that sizes, offsets and constants agree.
 *
 * An angel app is a shared library (`cc -shared -fPIC app.c -o libapp.so`) that exports:
 *
 *     const uint32_t angel_abi_version = ANGEL_ABI_VERSION;
 *     int32_t angel_main(const angel_context *ctx);
 *
 * Protocol
 * --------
 * 1. A worker process dlopen()s the library (RTLD_NOW | RTLD_LOCAL) and reads
 *    `angel_abi_version` before calling anything. If it differs from the host's version the
 *    worker exits with ANGEL_EXIT_ABI_MISMATCH.
 * 2. It calls `angel_main(ctx)` on the process's main thread. The call lasts the worker's whole
 *    life. The app:
 *      - checks `ctx->size >= ANGEL_CONTEXT_V1_SIZE` (later minor versions append fields: use
 *        one only if `ctx->size` covers it, e.g. `ctx->size >= sizeof(angel_context)` for 1.1);
 *      - initialises itself; on failure calls `ctx->host.fail(...)` and returns non-zero;
 *      - starts accepting on `ctx->listeners` (already bound and listening; the app may dup()
 *        them and make the duplicates nonblocking, but must not close the originals);
 *      - calls `ctx->host.notify(ctx->host.data, ANGEL_EVENT_READY, 0)` once;
 *      - serves; every `heartbeat_interval_ms` (if > 0) notifies ANGEL_EVENT_HEARTBEAT with the
 *        number of requests served, from its event loop (a hung loop stops the beats);
 *      - after `max_requests` requests (if > 0) notifies ANGEL_EVENT_RETIRING once and drains
 *        by itself as below (the host starts its replacement at once);
 *      - when `drain_fd` becomes readable (poll for POLLIN; never read or close it): stops
 *        accepting, finishes in-flight requests (HTTP/1: answer with `Connection: close`),
 *        and returns ANGEL_EXIT_OK. The host kills the worker after `graceful_timeout_ms`.
 *        It becomes readable when the master asks, when the master is gone, and on SIGTERM
 *        (the host handles SIGTERM: do not install a handler for it).
 *      - (1.2, optional) an app that defines `angel_features` with ANGEL_FEATURE_DRAINING_EVENT
 *        notifies ANGEL_EVENT_DRAINING once as soon as it sees `drain_fd` readable. Such an app
 *        gets an epoll fd as `drain_fd` (poll it the same way) and SIGTERM blocked in the
 *        process; the host starts no thread in the worker. Without it `drain_fd` is a pipe
 *        written by two threads of the host.
 * 3. The worker never dlclose()s the library; it exits with angel_main's return value.
 *
 * Every pointer in the context stays valid for the whole angel_main call, from any thread; the
 * host callbacks are thread-safe and never unwind. Callbacks take `ctx->host.data` as their first
 * argument. Strings passed to them are UTF-8, `len` bytes, not necessarily nul-terminated.
 */
#ifndef ANGEL_H
#define ANGEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version this header describes. */
#define ANGEL_ABI_VERSION 1u

/* Listener kinds (angel_listener.kind). */
#define ANGEL_LISTENER_TCP 1u  /* a TCP listener */
#define ANGEL_LISTENER_UNIX 2u /* a unix stream listener */

/* Events (angel_host_api.notify). */
#define ANGEL_EVENT_READY 1u     /* init done, accepting; send once; value 0 */
#define ANGEL_EVENT_RETIRING 2u  /* max_requests reached: draining by myself, replace me */
#define ANGEL_EVENT_HEARTBEAT 3u /* liveness; value = requests served so far */
#define ANGEL_EVENT_DRAINING 4u  /* 1.2: saw drain_fd readable, draining; send once */

/* Feature bits (angel_features, 1.2). */
#define ANGEL_FEATURE_DRAINING_EVENT 1u /* sends ANGEL_EVENT_DRAINING */

/* Log levels (angel_host_api.log). */
#define ANGEL_LOG_ERROR 1u
#define ANGEL_LOG_WARN 2u
#define ANGEL_LOG_INFO 3u
#define ANGEL_LOG_DEBUG 4u
#define ANGEL_LOG_TRACE 5u /* angel_log_record only; host.log treats it as debug */

/* Exit codes: returned by angel_main (the first three) or used by the worker itself. */
#define ANGEL_EXIT_OK 0           /* drained and returned normally */
#define ANGEL_EXIT_APP_ERROR 1    /* the app failed (after calling host.fail) */
#define ANGEL_EXIT_APP_PANIC 70   /* the app crashed in a way it caught */
#define ANGEL_EXIT_LOAD_FAILED 65 /* worker: the library could not be loaded */
#define ANGEL_EXIT_NOT_AN_APP 66  /* worker: the library lacks the angel symbols */
#define ANGEL_EXIT_HOST_ERROR 71  /* worker: could not talk to the master */
#define ANGEL_EXIT_ABI_MISMATCH 76 /* worker/app: the other side speaks another ABI version */

/* One listening socket handed to the worker. */
typedef struct angel_listener {
    int fd;        /* the listening socket; owned by the host */
    uint32_t kind; /* ANGEL_LISTENER_TCP or ANGEL_LISTENER_UNIX */
} angel_listener;

/* Callbacks into the host. Thread-safe; never unwind. */
typedef struct angel_host_api {
    /* Opaque host data: pass it back as the first argument of every callback. */
    void *data;
    /* Report a lifecycle event (ANGEL_EVENT_*). Returns 0 on success, non-zero if the host
     * could not deliver it (e.g. the master is gone). */
    int (*notify)(void *data, uint32_t event, uint64_t value);
    /* Log one line at an ANGEL_LOG_* level; the host formats it like its own lines. */
    void (*log)(void *data, uint32_t level, const char *msg, size_t len);
    /* Report why the app failed (one line). Call before returning non-zero. */
    void (*fail)(void *data, const char *msg, size_t len);
} angel_host_api;

/* One structured log event (ABI 1.1), for angel_context.log_record. Strings are UTF-8, `*_len`
 * bytes, not nul-terminated, valid only during the call; NULL or length 0 = empty. */
typedef struct angel_log_record {
    uint32_t size;       /* sizeof(angel_log_record) as the app built it */
    uint32_t level;      /* ANGEL_LOG_* */
    const char *target;  /* where it comes from, e.g. a module path */
    size_t target_len;
    const char *message; /* the human-readable message */
    size_t message_len;
    const char *fields;  /* a JSON object of the event's fields ({"status":200}), or empty */
    size_t fields_len;
    const char *spans;   /* a JSON array, outermost first, of {"name":..., <span fields>}, or empty */
    size_t spans_len;
} angel_log_record;

/* Everything the app receives. Read-only for the app. */
typedef struct angel_context {
    uint32_t size;                     /* sizeof(angel_context) as the host built it */
    uint32_t abi_version;              /* the host's ANGEL_ABI_VERSION */
    const angel_listener *listeners;   /* listener_count listening sockets */
    uint32_t listener_count;
    int drain_fd;                      /* readable once the worker must drain; never read/close */
    uint32_t slot;                     /* worker slot, 0-based, stable across generations */
    uint64_t generation;               /* 1-based; each roll adds one */
    uint64_t max_requests;             /* send ANGEL_EVENT_RETIRING after this many; 0 = never */
    uint64_t heartbeat_interval_ms;    /* send ANGEL_EVENT_HEARTBEAT this often; 0 = never */
    uint64_t graceful_timeout_ms;      /* how long a drain may take before the host kills */
    angel_host_api host;               /* callbacks into the host */
    /* --- ABI 1.1: present when ctx->size >= sizeof(angel_context) --- */
    /* Log one structured record (pass host.data); NULL if the host lacks it (use host.log).
     * Printed like host.log lines: seed `message key=value ...`, JSON fields under "fields". */
    void (*log_record)(void *data, const angel_log_record *record);
} angel_context;

/* The size of an ABI 1.0 context: the least a host passes. */
#define ANGEL_CONTEXT_V1_SIZE offsetof(angel_context, log_record)

/* The symbols every angel app exports. Mark the definitions visible if you build with
 * -fvisibility=hidden, e.g. with ANGEL_EXPORT. */
#if defined(__GNUC__) || defined(__clang__)
#define ANGEL_EXPORT __attribute__((visibility("default")))
#else
#define ANGEL_EXPORT
#endif

/* The app's ABI version: define it as `ANGEL_EXPORT const uint32_t angel_abi_version =
 * ANGEL_ABI_VERSION;`. The host reads it before calling anything. */
extern ANGEL_EXPORT const uint32_t angel_abi_version;

/* Optional (1.2): the app's ANGEL_FEATURE_* bits, e.g. `ANGEL_EXPORT const uint32_t
 * angel_features = ANGEL_FEATURE_DRAINING_EVENT;`. Missing means none. */
extern ANGEL_EXPORT const uint32_t angel_features;

/* The entry point: serves until drained; returns an ANGEL_EXIT_* code. */
ANGEL_EXPORT int32_t angel_main(const angel_context *ctx);

/* The function type of angel_main, for hosts. */
typedef int32_t (*angel_entry_fn)(const angel_context *ctx);

#ifdef __cplusplus
}
#endif

#endif /* ANGEL_H */
