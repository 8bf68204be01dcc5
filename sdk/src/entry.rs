//! The body of the `angel_main` symbol that [`crate::export!`] generates.

use std::any::Any;
use std::error::Error as StdError;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use crate::abi;
use crate::host::{self, Host, Shared};
use crate::{BoxError, Worker};

/// Environment variable selecting the app runtime's threads: unset, `0` or `1` = a
/// current-thread runtime (the default: one core per worker, scale with `--workers`); `n > 1` =
/// a multi-thread runtime with `n` worker threads.
pub const THREADS_ENV: &str = "ANGEL_THREADS";

/// How long the app's runtime waits for its blocking tasks once `main` has returned. Async tasks
/// are cancelled at once; a blocking task that outlives this is abandoned (the worker process
/// exits right after `angel_main` returns).
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(500);

/// Runs an app's main function for one `angel_main` call. Called only by the code
/// [`crate::export!`] generates.
///
/// Validates the context, builds the app's tokio runtime, starts watching the drain fd, runs
/// `main`, and maps the outcome to an `abi::EXIT_*` code, reporting failures through
/// `HostApi::fail`. Never unwinds: panics are caught and reported.
///
/// # Safety
///
/// `ctx` must be null or point to a context built by an angel host that stays valid, with all
/// the pointers and fds in it, until this function returns (the ABI's contract).
pub unsafe fn run<F, Fut, E>(ctx: *const abi::Context, main: F) -> i32
where
    F: FnOnce(Worker) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded from this function's contract.
        let ctx = match unsafe { validate(ctx) } {
            Ok(ctx) => ctx,
            Err(code) => return code,
        };
        // SAFETY: the context (and so its callbacks) is valid for this call; the host handle
        // lives in `Shared`, whose host is detached before this call returns (`CurrentGuard`).
        let host = unsafe { Host::new(ctx.host, ctx.log_record) };
        match catch_unwind(AssertUnwindSafe(|| serve(ctx, host, main))) {
            Ok(Ok(())) => abi::EXIT_OK,
            Ok(Err(e)) => {
                host.fail(&error_chain(&*e));
                abi::EXIT_APP_ERROR
            }
            Err(payload) => {
                let msg = format!("app panicked: {}", panic_message(&*payload));
                drop_payload(payload);
                host.fail(&msg);
                abi::EXIT_APP_PANIC
            }
        }
    }));
    outcome.unwrap_or_else(|payload| {
        // Only reachable if reporting itself panicked; dropping the payload could panic again.
        std::mem::forget(payload);
        abi::EXIT_APP_PANIC
    })
}

/// Checks the context before anything reads more than its first field.
///
/// # Safety
///
/// As for [`run`].
unsafe fn validate<'a>(ctx: *const abi::Context) -> Result<&'a abi::Context, i32> {
    if ctx.is_null() {
        // Nobody to report to.
        return Err(abi::EXIT_HOST_ERROR);
    }
    // SAFETY: `ctx` is non-null and points to a host-built context, whose first field is `size`
    // in every version of the ABI; nothing past it is read before the size is checked.
    let size = unsafe { std::ptr::addr_of!((*ctx).size).read() } as usize;
    if size < abi::CONTEXT_V1_SIZE {
        // The host's struct lacks fields we need, possibly the callbacks: report nothing.
        return Err(abi::EXIT_ABI_MISMATCH);
    }
    let ctx: &'a abi::Context = if size >= std::mem::size_of::<abi::Context>() {
        // SAFETY: the host built a context at least as large as ours, valid for the call.
        unsafe { &*ctx }
    } else {
        // An older host of this major version (ABI 1.0): copy the fields it has into a full
        // context whose later, optional fields stay zero (null callbacks). Once per process.
        let mut full = std::mem::MaybeUninit::<abi::Context>::zeroed();
        // SAFETY: the host's context has `size` readable bytes; `size` is less than ours, so
        // the copy stays inside `full`; the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(ctx.cast::<u8>(), full.as_mut_ptr().cast::<u8>(), size)
        };
        // SAFETY: the copied prefix holds the host's valid v1.0 fields (non-null callbacks);
        // every later field is an `Option` of a function pointer, for which zero is `None`.
        Box::leak(Box::new(unsafe { full.assume_init() }))
    };
    if ctx.abi_version != abi::ABI_VERSION {
        return Err(abi::EXIT_ABI_MISMATCH);
    }
    Ok(ctx)
}

/// Everything that may fail or panic, run under `catch_unwind`.
fn serve<F, Fut, E>(ctx: &abi::Context, host: Host, main: F) -> Result<(), BoxError>
where
    F: FnOnce(Worker) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let listeners = listeners(ctx)?;
    // Panic messages go through the host's logger (one line, in its format) instead of the
    // default hook's multi-line stderr output. The panic itself is still caught and reported.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        crate::log::log(
            crate::log::Level::Error,
            &format!("panicked{location}: {}", panic_message(info.payload())),
        );
    }));
    let (shared, trigger) = Shared::new(Some(host), ctx.max_requests);
    // Detaches the host when this returns or unwinds, before `run` returns.
    let _current = host::install(&shared);
    // The app's `tracing` events go to the host's log from here on.
    #[cfg(feature = "tracing")]
    crate::trace::install();
    let runtime = build_runtime()?;
    let result = runtime.block_on(async {
        let drain_fd = crate::drain::watch_fd(ctx.drain_fd)?;
        tokio::spawn(crate::drain::wait_and_fire(drain_fd, trigger));
        let worker = Worker::new(ctx, listeners, Arc::clone(&shared));
        main(worker).await.map_err(Into::into)
    });
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    // A last heartbeat carries what was served since the previous one: a drained worker's
    // final requests still count in the host's totals (metrics, status).
    if ctx.heartbeat_interval_ms > 0 && shared.ready_sent.load(std::sync::atomic::Ordering::Acquire)
    {
        shared.notify(abi::EVENT_HEARTBEAT, shared.requests());
    }
    result
}

/// Copies the listener array out of the context.
fn listeners(ctx: &abi::Context) -> Result<Vec<abi::Listener>, BoxError> {
    if ctx.listener_count == 0 {
        return Ok(Vec::new());
    }
    if ctx.listeners.is_null() {
        return Err(format!(
            "host context lists {} listeners but no listener array",
            ctx.listener_count
        )
        .into());
    }
    // SAFETY: the host guarantees `listeners` points to `listener_count` initialised entries,
    // valid for the whole call; we copy them out at once.
    let slice = unsafe { std::slice::from_raw_parts(ctx.listeners, ctx.listener_count as usize) };
    Ok(slice.to_vec())
}

/// The app's own runtime, shaped by [`THREADS_ENV`].
fn build_runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    let threads = match std::env::var(THREADS_ENV) {
        Err(std::env::VarError::NotPresent) => 1,
        Ok(s) => s
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("{THREADS_ENV} must be a number of threads, got {s:?}"))?,
        Err(std::env::VarError::NotUnicode(s)) => {
            return Err(format!("{THREADS_ENV} must be a number of threads, got {s:?}").into())
        }
    };
    let mut builder = if threads > 1 {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads).thread_name("angel-app");
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| format!("building the app's tokio runtime: {e}").into())
}

/// `error: cause: cause`, on one line.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    msg
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    }
}

/// Drops a panic payload without letting a panicking `Drop` escape.
pub(crate) fn drop_payload(payload: Box<dyn Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

/// Converts any error the macros meet into the boxed error type.
pub fn box_error<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}
