//! The angel ABI, version 1: the only things that cross the boundary between the host's worker
//! process code and the application's cdylib.
//!
//! This module is the single source of truth; `sdk/include/angel.h` documents the same layout for
//! C and other languages. Only C types cross: a worker process holds two copies of std (and, for
//! Rust apps, of tokio) — the host's and the app's — so nothing Rust-specific may be shared.
//!
//! # Protocol
//!
//! 1. The worker `dlopen`s the app with `RTLD_NOW | RTLD_LOCAL` and reads the data symbol
//!    [`VERSION_SYMBOL`] (`uint32_t angel_abi_version`) *before calling anything*. If it differs
//!    from [`ABI_VERSION`] the worker exits with [`EXIT_ABI_MISMATCH`].
//! 2. It looks up [`ENTRY_SYMBOL`] (`int32_t angel_main(const angel_context *)`) and calls it on
//!    the process's main thread. The call blocks for the worker's whole life: the app builds its
//!    own runtime, starts accepting on the listener fds, calls [`HostApi::notify`] with
//!    [`EVENT_READY`], serves until [`Context::drain_fd`] becomes readable, drains, and returns an
//!    exit code ([`EXIT_OK`] on a clean drain).
//! 3. The worker never `dlclose`s; it ends by process exit.
//!
//! Every pointer in [`Context`] stays valid for the whole `angel_main` call, from any thread.
//! The fds in the context belong to the host: the app may `dup` them but must not close them.
//!
//! # Minor additions
//!
//! The version changes only for incompatible changes. Compatible ones append fields to
//! [`Context`] (its `size` tells the app which the host filled in) and add optional callbacks
//! (null when a host lacks them). An app built against a newer SDK accepts any context of at
//! least [`CONTEXT_V1_SIZE`] bytes and uses a later field only if `size` covers it; an app built
//! against an older SDK sees a larger `size` than it needs and ignores the rest. Added so far:
//!
//! - 1.1: [`Context::log_record`], structured log records ([`LogRecord`]: level, target,
//!   message, fields, spans) — what the SDK's `tracing` subscriber forwards.
//! - 1.2: the optional data symbol [`FEATURES_SYMBOL`] (`uint32_t angel_features`) and
//!   [`EVENT_DRAINING`]. An app whose features include [`FEATURE_DRAINING_EVENT`] promises to
//!   send `EVENT_DRAINING` as soon as it sees `drain_fd` readable; a host that knows the
//!   symbol then makes `drain_fd` an fd the kernel readies by itself (an epoll set of its
//!   control channel and a `signalfd`, with `SIGTERM` blocked in the process) and starts no
//!   thread of its own in the worker. Without the symbol (or on an older host) `drain_fd` is a
//!   pipe the host's threads write to, as in 1.0.

use std::ffi::{c_char, c_int, c_void};

/// The ABI version this crate speaks. Bumped on any incompatible change to this module.
pub const ABI_VERSION: u32 = 1;

/// Name of the `uint32_t` data symbol holding the app's ABI version (nul-terminated for dlsym).
pub const VERSION_SYMBOL: &[u8] = b"angel_abi_version\0";

/// Name of the optional `uint32_t` data symbol with the app's `FEATURE_*` bits (ABI 1.2;
/// nul-terminated for dlsym). Missing means none.
pub const FEATURES_SYMBOL: &[u8] = b"angel_features\0";

/// The app sends [`EVENT_DRAINING`] once it sees `drain_fd` readable (ABI 1.2).
pub const FEATURE_DRAINING_EVENT: u32 = 1;

/// The features of apps built with this SDK.
pub const FEATURES: u32 = FEATURE_DRAINING_EVENT;

/// Name of the entry function, of type [`EntryFn`] (nul-terminated for dlsym).
pub const ENTRY_SYMBOL: &[u8] = b"angel_main\0";

/// The entry function every angel app exports as [`ENTRY_SYMBOL`].
pub type EntryFn = unsafe extern "C" fn(ctx: *const Context) -> i32;

/// A TCP listener (already bound and listening, nonblocking state unspecified).
pub const LISTENER_TCP: u32 = 1;
/// A unix stream listener (already bound and listening).
pub const LISTENER_UNIX: u32 = 2;

/// One listening socket handed to the worker.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Listener {
    /// The listening socket's fd. Owned by the host.
    pub fd: c_int,
    /// [`LISTENER_TCP`] or [`LISTENER_UNIX`].
    pub kind: u32,
}

/// The app finished its initialisation and its accept loops run. Sent once.
pub const EVENT_READY: u32 = 1;
/// The app reached `max_requests` and retires: it stops accepting and drains by itself (as if
/// `drain_fd` fired), then returns. The host starts its replacement at once; connections queued
/// on the slot's socket meanwhile wait there for it. `value` = requests served.
pub const EVENT_RETIRING: u32 = 2;
/// A liveness beat from the app's own runtime; `value` = requests served so far. Apps send one at
/// least every [`Context::heartbeat_interval_ms`].
pub const EVENT_HEARTBEAT: u32 = 3;
/// The app saw `drain_fd` readable and drains (ABI 1.2; sent once, by apps that declare
/// [`FEATURE_DRAINING_EVENT`]). The host logs the drain and lets go of its own references to
/// the listeners then.
pub const EVENT_DRAINING: u32 = 4;

/// Log levels for [`HostApi::log`].
pub const LOG_ERROR: u32 = 1;
/// Warning.
pub const LOG_WARN: u32 = 2;
/// Informational.
pub const LOG_INFO: u32 = 3;
/// Debug detail.
pub const LOG_DEBUG: u32 = 4;
/// Trace detail ([`LogRecord`] only; the plain `log` callback treats it as debug).
pub const LOG_TRACE: u32 = 5;

/// One structured log event (ABI 1.1), e.g. a `tracing` event: passed to
/// [`Context::log_record`]. Every string is UTF-8, `*_len` bytes, not nul-terminated, and valid
/// only during the call; a null pointer or zero length means empty.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LogRecord {
    /// `size_of::<LogRecord>()` as the app built it; later additions append fields.
    pub size: u32,
    /// `LOG_*`.
    pub level: u32,
    /// Where the event comes from, e.g. a module path (`tower_http::trace::on_response`).
    pub target: *const c_char,
    /// Length of `target`.
    pub target_len: usize,
    /// The human-readable message.
    pub message: *const c_char,
    /// Length of `message`.
    pub message_len: usize,
    /// The event's fields as one JSON object (`{"status":200,"latency_ms":3}`), or empty.
    pub fields: *const c_char,
    /// Length of `fields`.
    pub fields_len: usize,
    /// The spans the event happened in, outermost first, as a JSON array of objects each with
    /// a `"name"` and the span's fields (`[{"name":"request","method":"GET"}]`), or empty.
    pub spans: *const c_char,
    /// Length of `spans`.
    pub spans_len: usize,
}

/// The type of [`Context::log_record`].
pub type LogRecordFn = unsafe extern "C" fn(data: *mut c_void, record: *const LogRecord);

/// Callbacks into the host. Every function is thread-safe and never unwinds.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HostApi {
    /// Opaque host data: pass it back as the first argument of every callback.
    pub data: *mut c_void,
    /// Report a lifecycle event (`EVENT_*`) with a value (0 unless documented). Returns 0 on
    /// success, non-zero if the host could not deliver it (e.g. the master is gone).
    pub notify: unsafe extern "C" fn(data: *mut c_void, event: u32, value: u64) -> c_int,
    /// Log one line (`msg` need not be nul-terminated; `len` bytes of UTF-8) at `LOG_*` level,
    /// formatted by the host like its own log lines.
    pub log: unsafe extern "C" fn(data: *mut c_void, level: u32, msg: *const c_char, len: usize),
    /// Report why the app failed to start (one line, `len` bytes of UTF-8). The host passes it
    /// to the master, which names it in `reload failed: ...`. Call before returning non-zero.
    pub fail: unsafe extern "C" fn(data: *mut c_void, msg: *const c_char, len: usize),
}

/// Everything the app receives. Read-only for the app.
#[repr(C)]
#[derive(Debug)]
pub struct Context {
    /// `size_of::<Context>()` as the host built it; later minor additions append fields.
    pub size: u32,
    /// The host's [`ABI_VERSION`].
    pub abi_version: u32,
    /// Listening sockets, `listener_count` of them.
    pub listeners: *const Listener,
    /// Number of entries in `listeners`.
    pub listener_count: u32,
    /// Becomes readable (never written by the app) when the worker must drain: stop accepting,
    /// finish in-flight work, return. Readable also when the master is gone, and when the
    /// worker got `SIGTERM` (the host handles that signal: apps must not install a handler
    /// for it).
    pub drain_fd: c_int,
    /// The worker's slot (0-based), stable across generations.
    pub slot: u32,
    /// The worker's generation (1-based; each roll adds one).
    pub generation: u64,
    /// Requests after which the app should send [`EVENT_RETIRING`]; 0 = unlimited.
    pub max_requests: u64,
    /// How often the app should send [`EVENT_HEARTBEAT`], in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// How long the app may linger after `drain_fd` fires before the host kills it, in
    /// milliseconds (the master's `--graceful-timeout`).
    pub graceful_timeout_ms: u64,
    /// Callbacks into the host.
    pub host: HostApi,
    // --- ABI 1.1 (present when `size >= size_of::<Context>()`) ---
    /// Log one structured record (pass `host.data` as `data`); formatted by the host like its
    /// own lines, the fields under `"fields"` in JSON. Thread-safe, never unwinds. Null if the
    /// host does not offer it: use `host.log`.
    pub log_record: Option<LogRecordFn>,
}

/// The size of a version 1.0 [`Context`] (everything up to and including `host`): the least a
/// host may pass.
pub const CONTEXT_V1_SIZE: usize = std::mem::offset_of!(Context, log_record);

// SAFETY: the host guarantees (module docs) that every pointer in the context, and the host data
// behind `HostApi::data`, stays valid for the whole entry call and is safe to use from any
// thread; the callbacks are documented thread-safe.
unsafe impl Send for Context {}
// SAFETY: as above; the context is never mutated during the entry call.
unsafe impl Sync for Context {}

/// The app drained and returned normally.
pub const EXIT_OK: i32 = 0;
/// The app returned an error from its own code.
pub const EXIT_APP_ERROR: i32 = 1;
/// The app panicked (caught by the SDK at the ABI boundary).
pub const EXIT_APP_PANIC: i32 = 70;
/// The worker could not load the library (missing, not an ELF shared object, unresolved symbols).
pub const EXIT_LOAD_FAILED: i32 = 65;
/// The library exports no [`VERSION_SYMBOL`] or [`ENTRY_SYMBOL`]: not an angel app.
pub const EXIT_NOT_AN_APP: i32 = 66;
/// The library speaks another ABI version.
pub const EXIT_ABI_MISMATCH: i32 = 76;
/// The worker could not talk to its master (bad control fd, master gone before start).
pub const EXIT_HOST_ERROR: i32 = 71;

/// Whether a context built by a host is large enough to hold every field of this version
/// (including the minor additions).
pub fn context_is_complete(ctx: &Context) -> bool {
    ctx.size as usize >= std::mem::size_of::<Context>()
}
