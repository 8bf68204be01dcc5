//! The host callbacks the app calls through its context (`HostApi`): notify, log, fail.

use std::ffi::{c_char, c_int, c_void};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use angel::abi;

use super::HostState;
use crate::control::{self, Msg};

/// # Safety
/// `data` must be the `HostState` this module leaked into the context.
unsafe fn host_state<'a>(data: *mut c_void) -> &'a HostState {
    // SAFETY: guaranteed by the caller; the state is leaked, so 'static in practice.
    unsafe { &*(data as *const HostState) }
}

/// # Safety
/// Called by the app through `HostApi::notify` with the context's `data`.
pub(super) unsafe extern "C" fn host_notify(data: *mut c_void, event: u32, value: u64) -> c_int {
    // SAFETY: the ABI requires the app to pass back the `data` we gave it.
    let state = unsafe { host_state(data) };
    let sent = std::panic::catch_unwind(|| {
        let msg = match event {
            abi::EVENT_READY => {
                if state.ready.swap(true, Ordering::SeqCst) {
                    return Ok(());
                }
                tracing::info!(event = "ready", "listening on {}", state.listening);
                Msg::Ready
            }
            abi::EVENT_RETIRING => {
                if state.retiring.swap(true, Ordering::SeqCst) {
                    return Ok(());
                }
                Msg::Retiring
            }
            abi::EVENT_HEARTBEAT => Msg::Heartbeat(value),
            abi::EVENT_DRAINING => {
                state.drain.fire(|| super::announce_drain(&state.control));
                return Ok(());
            }
            _ => return Err(()),
        };
        control::send_msg(state.control.as_fd(), &msg).map_err(|_| ())
    });
    match sent {
        Ok(Ok(())) => 0,
        _ => -1,
    }
}

/// # Safety
/// `msg` must point to `len` readable bytes (the ABI's contract for `HostApi::log`).
unsafe fn text<'a>(msg: *const c_char, len: usize) -> std::borrow::Cow<'a, str> {
    if msg.is_null() || len == 0 {
        return "".into();
    }
    // SAFETY: guaranteed by the caller.
    let bytes = unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) };
    String::from_utf8_lossy(bytes)
}

/// # Safety
/// Called by the app through `HostApi::log`: `msg` points to `len` bytes.
pub(super) unsafe extern "C" fn host_log(
    _data: *mut c_void,
    level: u32,
    msg: *const c_char,
    len: usize,
) {
    // SAFETY: the ABI contract of `HostApi::log`.
    let line = unsafe { text(msg, len) };
    let _ = std::panic::catch_unwind(|| match level {
        abi::LOG_ERROR => tracing::error!(event = "app", "{line}"),
        abi::LOG_WARN => tracing::warn!(event = "app", "{line}"),
        // Plain debug lines were never printed (the worker's subscriber used to stop at info);
        // apps that want debug output filter structured records with ANGEL_LOG instead.
        abi::LOG_DEBUG | abi::LOG_TRACE => {}
        _ => tracing::info!(event = "app", "{line}"),
    });
}

/// # Safety
/// Called by the app through `Context::log_record` (ABI 1.1): `record` points to a record
/// whose strings are valid for the call.
pub(super) unsafe extern "C" fn host_log_record(_data: *mut c_void, record: *const abi::LogRecord) {
    if record.is_null() {
        return;
    }
    // SAFETY: non-null, and the app passes a record valid for the call. Its first field is
    // its size; nothing else is read unless the record is at least as large as ours.
    let size = unsafe { std::ptr::addr_of!((*record).size).read() } as usize;
    if size < std::mem::size_of::<abi::LogRecord>() {
        return;
    }
    // SAFETY: checked size; valid for the call (ABI contract).
    let r = unsafe { &*record };
    // SAFETY: each pointer/length pair is the ABI's contract for the record's strings.
    let (target, message, fields, spans) = unsafe {
        (
            text(r.target, r.target_len),
            text(r.message, r.message_len),
            text(r.fields, r.fields_len),
            text(r.spans, r.spans_len),
        )
    };
    // The app filtered already (ANGEL_LOG): every level it sends is printed. The `app_*`
    // fields are laid out by `crate::log` (seed: `message key=value ...`; json: `target`,
    // `spans`, `fields`).
    macro_rules! app {
        ($level:expr) => {
            tracing::event!(
                $level,
                event = "app",
                app_target = %target,
                app_fields = %fields,
                app_spans = %spans,
                "{message}"
            )
        };
    }
    let _ = std::panic::catch_unwind(|| match r.level {
        abi::LOG_ERROR => app!(tracing::Level::ERROR),
        abi::LOG_WARN => app!(tracing::Level::WARN),
        abi::LOG_DEBUG => app!(tracing::Level::DEBUG),
        abi::LOG_TRACE => app!(tracing::Level::TRACE),
        _ => app!(tracing::Level::INFO),
    });
}

/// # Safety
/// Called by the app through `HostApi::fail` with the context's `data`; `msg` points to `len`
/// bytes.
pub(super) unsafe extern "C" fn host_fail(data: *mut c_void, msg: *const c_char, len: usize) {
    // SAFETY: the ABI contract of `HostApi::fail`.
    let (state, why) = unsafe { (host_state(data), text(msg, len)) };
    let _ = std::panic::catch_unwind(|| {
        if control::send_msg(state.control.as_fd(), &Msg::Failed(why.to_string())).is_err() {
            tracing::error!(event = "app_failed", "{why}");
        }
    });
}
