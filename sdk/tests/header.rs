//! `include/angel.h` must describe exactly the ABI of `angel::abi`: these tests compile C
//! against it (with the system C compiler, `$CC` or `gcc`) and compare layouts and constants,
//! then load a C app built with it and run it against a Rust-built context.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::io::Write as _;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use angel::abi;

fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

/// A fresh directory for one test's C files.
fn work_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("angel-header-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Compiles `source` with the header on the include path; panics with the compiler's output.
fn cc(dir: &Path, name: &str, source: &str, args: &[&str], out: &str) -> PathBuf {
    let src = dir.join(name);
    std::fs::write(&src, source).unwrap();
    let output_path = dir.join(out);
    let compiler = std::env::var("CC").unwrap_or_else(|_| "gcc".to_owned());
    let output = Command::new(&compiler)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(include_dir())
        .args(args)
        .arg(&src)
        .arg("-o")
        .arg(&output_path)
        .output()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(
        output.status.success(),
        "{compiler} failed on {name}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output_path
}

const LAYOUT_C: &str = r#"
#include <stdio.h>
#include "angel.h"

#define SIZE(T) printf("sizeof %s %zu\n", #T, sizeof(T))
#define OFF(T, F) printf("offset %s.%s %zu\n", #T, #F, offsetof(T, F))
#define CONST(C) printf("const %s %lld\n", #C, (long long)(C))

int main(void) {
    SIZE(angel_listener); SIZE(angel_host_api); SIZE(angel_context); SIZE(angel_log_record);
    CONST(ANGEL_CONTEXT_V1_SIZE); CONST(ANGEL_LOG_TRACE); OFF(angel_context, log_record);
    OFF(angel_log_record, size); OFF(angel_log_record, level); OFF(angel_log_record, target);
    OFF(angel_log_record, target_len); OFF(angel_log_record, message);
    OFF(angel_log_record, message_len); OFF(angel_log_record, fields);
    OFF(angel_log_record, fields_len); OFF(angel_log_record, spans);
    OFF(angel_log_record, spans_len);
    OFF(angel_listener, fd); OFF(angel_listener, kind);
    OFF(angel_host_api, data); OFF(angel_host_api, notify);
    OFF(angel_host_api, log); OFF(angel_host_api, fail);
    OFF(angel_context, size); OFF(angel_context, abi_version); OFF(angel_context, listeners);
    OFF(angel_context, listener_count); OFF(angel_context, drain_fd); OFF(angel_context, slot);
    OFF(angel_context, generation); OFF(angel_context, max_requests);
    OFF(angel_context, heartbeat_interval_ms); OFF(angel_context, graceful_timeout_ms);
    OFF(angel_context, host);
    CONST(ANGEL_ABI_VERSION); CONST(ANGEL_LISTENER_TCP); CONST(ANGEL_LISTENER_UNIX);
    CONST(ANGEL_EVENT_READY); CONST(ANGEL_EVENT_RETIRING); CONST(ANGEL_EVENT_HEARTBEAT);
    CONST(ANGEL_EVENT_DRAINING); CONST(ANGEL_FEATURE_DRAINING_EVENT);
    CONST(ANGEL_LOG_ERROR); CONST(ANGEL_LOG_WARN); CONST(ANGEL_LOG_INFO); CONST(ANGEL_LOG_DEBUG);
    CONST(ANGEL_EXIT_OK); CONST(ANGEL_EXIT_APP_ERROR); CONST(ANGEL_EXIT_APP_PANIC);
    CONST(ANGEL_EXIT_LOAD_FAILED); CONST(ANGEL_EXIT_NOT_AN_APP); CONST(ANGEL_EXIT_HOST_ERROR);
    CONST(ANGEL_EXIT_ABI_MISMATCH);
    return 0;
}
"#;

#[test]
fn header_layout_and_constants_match_the_rust_abi() {
    let dir = work_dir("layout");
    let exe = cc(&dir, "layout.c", LAYOUT_C, &[], "layout");
    let output = Command::new(&exe).output().unwrap();
    assert!(output.status.success());
    let c: HashMap<String, i64> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let mut parts = line.split(' ');
            let (_, name, value) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
            (name.to_owned(), value.parse().unwrap())
        })
        .collect();

    let rust: Vec<(&str, i64)> = vec![
        ("angel_listener", size_of::<abi::Listener>() as i64),
        ("angel_host_api", size_of::<abi::HostApi>() as i64),
        ("angel_context", size_of::<abi::Context>() as i64),
        ("angel_listener.fd", offset_of!(abi::Listener, fd) as i64),
        (
            "angel_listener.kind",
            offset_of!(abi::Listener, kind) as i64,
        ),
        ("angel_host_api.data", offset_of!(abi::HostApi, data) as i64),
        (
            "angel_host_api.notify",
            offset_of!(abi::HostApi, notify) as i64,
        ),
        ("angel_host_api.log", offset_of!(abi::HostApi, log) as i64),
        ("angel_host_api.fail", offset_of!(abi::HostApi, fail) as i64),
        ("angel_context.size", offset_of!(abi::Context, size) as i64),
        (
            "angel_context.abi_version",
            offset_of!(abi::Context, abi_version) as i64,
        ),
        (
            "angel_context.listeners",
            offset_of!(abi::Context, listeners) as i64,
        ),
        (
            "angel_context.listener_count",
            offset_of!(abi::Context, listener_count) as i64,
        ),
        (
            "angel_context.drain_fd",
            offset_of!(abi::Context, drain_fd) as i64,
        ),
        ("angel_context.slot", offset_of!(abi::Context, slot) as i64),
        (
            "angel_context.generation",
            offset_of!(abi::Context, generation) as i64,
        ),
        (
            "angel_context.max_requests",
            offset_of!(abi::Context, max_requests) as i64,
        ),
        (
            "angel_context.heartbeat_interval_ms",
            offset_of!(abi::Context, heartbeat_interval_ms) as i64,
        ),
        (
            "angel_context.graceful_timeout_ms",
            offset_of!(abi::Context, graceful_timeout_ms) as i64,
        ),
        ("angel_context.host", offset_of!(abi::Context, host) as i64),
        ("angel_log_record", size_of::<abi::LogRecord>() as i64),
        ("ANGEL_CONTEXT_V1_SIZE", abi::CONTEXT_V1_SIZE as i64),
        ("ANGEL_LOG_TRACE", i64::from(abi::LOG_TRACE)),
        (
            "angel_context.log_record",
            offset_of!(abi::Context, log_record) as i64,
        ),
        (
            "angel_log_record.size",
            offset_of!(abi::LogRecord, size) as i64,
        ),
        (
            "angel_log_record.level",
            offset_of!(abi::LogRecord, level) as i64,
        ),
        (
            "angel_log_record.target",
            offset_of!(abi::LogRecord, target) as i64,
        ),
        (
            "angel_log_record.target_len",
            offset_of!(abi::LogRecord, target_len) as i64,
        ),
        (
            "angel_log_record.message",
            offset_of!(abi::LogRecord, message) as i64,
        ),
        (
            "angel_log_record.message_len",
            offset_of!(abi::LogRecord, message_len) as i64,
        ),
        (
            "angel_log_record.fields",
            offset_of!(abi::LogRecord, fields) as i64,
        ),
        (
            "angel_log_record.fields_len",
            offset_of!(abi::LogRecord, fields_len) as i64,
        ),
        (
            "angel_log_record.spans",
            offset_of!(abi::LogRecord, spans) as i64,
        ),
        (
            "angel_log_record.spans_len",
            offset_of!(abi::LogRecord, spans_len) as i64,
        ),
        ("ANGEL_ABI_VERSION", i64::from(abi::ABI_VERSION)),
        ("ANGEL_LISTENER_TCP", i64::from(abi::LISTENER_TCP)),
        ("ANGEL_LISTENER_UNIX", i64::from(abi::LISTENER_UNIX)),
        ("ANGEL_EVENT_READY", i64::from(abi::EVENT_READY)),
        ("ANGEL_EVENT_RETIRING", i64::from(abi::EVENT_RETIRING)),
        ("ANGEL_EVENT_HEARTBEAT", i64::from(abi::EVENT_HEARTBEAT)),
        ("ANGEL_EVENT_DRAINING", i64::from(abi::EVENT_DRAINING)),
        (
            "ANGEL_FEATURE_DRAINING_EVENT",
            i64::from(abi::FEATURE_DRAINING_EVENT),
        ),
        ("ANGEL_LOG_ERROR", i64::from(abi::LOG_ERROR)),
        ("ANGEL_LOG_WARN", i64::from(abi::LOG_WARN)),
        ("ANGEL_LOG_INFO", i64::from(abi::LOG_INFO)),
        ("ANGEL_LOG_DEBUG", i64::from(abi::LOG_DEBUG)),
        ("ANGEL_EXIT_OK", i64::from(abi::EXIT_OK)),
        ("ANGEL_EXIT_APP_ERROR", i64::from(abi::EXIT_APP_ERROR)),
        ("ANGEL_EXIT_APP_PANIC", i64::from(abi::EXIT_APP_PANIC)),
        ("ANGEL_EXIT_LOAD_FAILED", i64::from(abi::EXIT_LOAD_FAILED)),
        ("ANGEL_EXIT_NOT_AN_APP", i64::from(abi::EXIT_NOT_AN_APP)),
        ("ANGEL_EXIT_HOST_ERROR", i64::from(abi::EXIT_HOST_ERROR)),
        ("ANGEL_EXIT_ABI_MISMATCH", i64::from(abi::EXIT_ABI_MISMATCH)),
    ];
    for (name, value) in &rust {
        assert_eq!(c.get(*name), Some(value), "{name}: C vs Rust");
    }
    assert_eq!(
        c.len(),
        rust.len(),
        "the C program checks something Rust does not"
    );
}

/// A complete C app: ready, a log line, wait for the drain, return.
const APP_C: &str = r#"
#define _POSIX_C_SOURCE 200809L
#include <poll.h>
#include <string.h>
#include "angel.h"

ANGEL_EXPORT const uint32_t angel_abi_version = ANGEL_ABI_VERSION;

ANGEL_EXPORT int32_t angel_main(const angel_context *ctx) {
    if (ctx->size < sizeof(angel_context)) return ANGEL_EXIT_ABI_MISMATCH;
    const char *hello = "c app up";
    ctx->host.log(ctx->host.data, ANGEL_LOG_INFO, hello, strlen(hello));
    if (ctx->listener_count != 1 || ctx->listeners[0].kind != ANGEL_LISTENER_TCP) {
        const char *why = "expected one TCP listener";
        ctx->host.fail(ctx->host.data, why, strlen(why));
        return ANGEL_EXIT_APP_ERROR;
    }
    ctx->host.notify(ctx->host.data, ANGEL_EVENT_READY, 0);
    ctx->host.notify(ctx->host.data, ANGEL_EVENT_HEARTBEAT, ctx->generation + ctx->slot);
    struct pollfd p = { .fd = ctx->drain_fd, .events = POLLIN };
    while (poll(&p, 1, -1) < 0) {}
    return ANGEL_EXIT_OK;
}
"#;

static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());

unsafe extern "C" fn notify(_data: *mut c_void, event: u32, value: u64) -> c_int {
    SEEN.lock().unwrap().push(format!("event {event} {value}"));
    0
}

unsafe extern "C" fn log(_data: *mut c_void, level: u32, msg: *const c_char, len: usize) {
    // SAFETY: the C app passes `len` readable bytes.
    let msg = unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) };
    SEEN.lock()
        .unwrap()
        .push(format!("log {level} {}", String::from_utf8_lossy(msg)));
}

unsafe extern "C" fn fail(_data: *mut c_void, msg: *const c_char, len: usize) {
    // SAFETY: as in `log`.
    let msg = unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) };
    SEEN.lock()
        .unwrap()
        .push(format!("fail {}", String::from_utf8_lossy(msg)));
}

#[test]
fn a_c_app_built_with_the_header_runs_against_the_rust_abi() {
    let dir = work_dir("app");
    let lib = cc(
        &dir,
        "app.c",
        APP_C,
        &["-shared", "-fPIC", "-fvisibility=hidden"],
        "libcapp.so",
    );
    let path = CString::new(lib.into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: loading a library we just built from the C source above, whose initialisers do
    // nothing; it is never unloaded.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen failed");
    // SAFETY: a valid handle and a nul-terminated symbol name.
    let version = unsafe { libc::dlsym(handle, abi::VERSION_SYMBOL.as_ptr().cast()) };
    assert!(!version.is_null(), "no angel_abi_version");
    // SAFETY: the symbol is the C app's `const uint32_t angel_abi_version`.
    assert_eq!(unsafe { version.cast::<u32>().read() }, abi::ABI_VERSION);
    // SAFETY: as above.
    let entry = unsafe { libc::dlsym(handle, abi::ENTRY_SYMBOL.as_ptr().cast()) };
    assert!(!entry.is_null(), "no angel_main");
    // SAFETY: the symbol is the C app's `angel_main`, of the ABI's entry type.
    let entry: abi::EntryFn = unsafe { std::mem::transmute::<*mut c_void, abi::EntryFn>(entry) };

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listeners = [abi::Listener {
        fd: listener.as_raw_fd(),
        kind: abi::LISTENER_TCP,
    }];
    let (mut drain_host_end, drain_app_end) = UnixStream::pair().unwrap();
    // Drain at once: the app returns as soon as it polls.
    drain_host_end.write_all(b"d").unwrap();
    let ctx = abi::Context {
        size: size_of::<abi::Context>() as u32,
        abi_version: abi::ABI_VERSION,
        listeners: listeners.as_ptr(),
        listener_count: 1,
        drain_fd: drain_app_end.as_raw_fd(),
        slot: 2,
        generation: 40,
        max_requests: 0,
        heartbeat_interval_ms: 1000,
        graceful_timeout_ms: 1000,
        host: abi::HostApi {
            data: std::ptr::null_mut(),
            notify,
            log,
            fail,
        },
        log_record: None,
    };
    // SAFETY: the context and everything it points to outlive the call.
    let code = unsafe { entry(&ctx) };
    assert_eq!(code, abi::EXIT_OK);
    assert_eq!(
        *SEEN.lock().unwrap(),
        ["log 3 c app up", "event 1 0", "event 3 42"]
    );
}
