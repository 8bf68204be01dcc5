//! The app's side of the host callbacks, and the state one `angel_main` call shares between the
//! worker handle, the serving loops and the process-global accessors ([`crate::drain()`],
//! [`crate::log()`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::abi;
use crate::drain::{self, Drain, DrainTrigger};

/// The host's callbacks, valid from the start of `angel_main` until it returns.
#[derive(Clone, Copy)]
pub(crate) struct Host {
    api: abi::HostApi,
    /// ABI 1.1's structured log callback, if the host has it.
    log_record: Option<abi::LogRecordFn>,
}

// SAFETY: the ABI guarantees that `HostApi::data` and the callbacks stay valid for the whole entry
// call and are thread-safe. `Shared::detach_host` makes sure no call happens after the entry call
// returns.
unsafe impl Send for Host {}
// SAFETY: as above; the callbacks take `data` by value and never need exclusive access.
unsafe impl Sync for Host {}

impl Host {
    /// # Safety
    ///
    /// `api` must come from a context that is valid for as long as this value is used (see
    /// [`Shared::detach_host`]).
    pub(crate) unsafe fn new(api: abi::HostApi, log_record: Option<abi::LogRecordFn>) -> Self {
        Self { api, log_record }
    }

    pub(crate) fn notify(&self, event: u32, value: u64) -> bool {
        // SAFETY: the callback and its data are valid for the entry call (see `Host::new`) and
        // thread-safe; plain integers cross.
        unsafe { (self.api.notify)(self.api.data, event, value) == 0 }
    }

    pub(crate) fn log(&self, level: u32, msg: &str) {
        // SAFETY: as in `notify`; `msg` is valid UTF-8 of `msg.len()` bytes for the whole call.
        unsafe { (self.api.log)(self.api.data, level, msg.as_ptr().cast(), msg.len()) }
    }

    /// Sends a structured record; false if this host has no `log_record` callback.
    pub(crate) fn log_record(&self, record: &abi::LogRecord) -> bool {
        let Some(log_record) = self.log_record else {
            return false;
        };
        // SAFETY: as in `notify`; `record` and the strings it points to are valid for the call.
        unsafe { log_record(self.api.data, record) };
        true
    }

    pub(crate) fn fail(&self, msg: &str) {
        // SAFETY: as in `log`.
        unsafe { (self.api.fail)(self.api.data, msg.as_ptr().cast(), msg.len()) }
    }
}

/// State of one `angel_main` call.
pub(crate) struct Shared {
    /// `None` before and after the entry call: every callback goes through this lock, so none
    /// can run once `detach_host` returned.
    host: RwLock<Option<Host>>,
    pub(crate) drain: Drain,
    requests: AtomicU64,
    max_requests: u64,
    retiring_sent: AtomicBool,
    /// Fired when the worker retires at `max_requests`: it drains by itself.
    retire: DrainTrigger,
    pub(crate) ready_sent: AtomicBool,
}

impl Shared {
    /// Returns the shared state and the trigger that starts its drain.
    pub(crate) fn new(host: Option<Host>, max_requests: u64) -> (Arc<Self>, DrainTrigger) {
        let (trigger, drain) = drain::channel();
        let shared = Arc::new(Self {
            host: RwLock::new(host),
            drain,
            requests: AtomicU64::new(0),
            max_requests,
            retiring_sent: AtomicBool::new(false),
            retire: trigger.clone(),
            ready_sent: AtomicBool::new(false),
        });
        (shared, trigger)
    }

    /// Runs `f` with the host if it is still attached.
    fn with_host<R>(&self, f: impl FnOnce(&Host) -> R) -> Option<R> {
        let guard = self.host.read().unwrap_or_else(PoisonError::into_inner);
        guard.as_ref().map(f)
    }

    /// Stops every later callback; waits for the ones in progress.
    pub(crate) fn detach_host(&self) {
        *self.host.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Sends an `EVENT_*`; false if the host is gone or could not deliver it.
    pub(crate) fn notify(&self, event: u32, value: u64) -> bool {
        self.with_host(|h| h.notify(event, value)).unwrap_or(false)
    }

    pub(crate) fn log(&self, level: u32, msg: &str) {
        if self.with_host(|h| h.log(level, msg)).is_none() {
            log_without_host(level, msg);
        }
    }

    /// Sends a structured record if the host is attached and takes them; false otherwise.
    pub(crate) fn log_record(&self, record: &abi::LogRecord) -> bool {
        self.with_host(|h| h.log_record(record)).unwrap_or(false)
    }

    /// Requests (or raw connections) served so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Counts one request. When `max_requests` is reached: sends `EVENT_RETIRING` once and
    /// starts this worker's own drain, so the limit is exact (this response and every later
    /// one on its connections carry `Connection: close`, and nothing new is accepted); the
    /// master starts the replacement at once, and connections queued on the slot's socket wait
    /// for it in the kernel.
    pub(crate) fn count_request(&self) {
        let served = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if self.max_requests > 0
            && served >= self.max_requests
            && !self.retiring_sent.swap(true, Ordering::AcqRel)
        {
            self.log(
                abi::LOG_INFO,
                &format!(
                    "served {served} requests (max {}), retiring",
                    self.max_requests
                ),
            );
            self.notify(abi::EVENT_RETIRING, served);
            self.retire.fire();
        }
    }
}

/// The state of the entry call in progress, if any (there is at most one per worker process).
static CURRENT: RwLock<Option<Arc<Shared>>> = RwLock::new(None);

/// Makes `shared` the process-global state until the returned guard drops; the guard also
/// detaches the host, even when the app panics.
pub(crate) fn install(shared: &Arc<Shared>) -> CurrentGuard {
    *CURRENT.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(shared));
    CurrentGuard {
        shared: Arc::clone(shared),
    }
}

pub(crate) struct CurrentGuard {
    shared: Arc<Shared>,
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        self.shared.detach_host();
        let mut current = CURRENT.write().unwrap_or_else(PoisonError::into_inner);
        if current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &self.shared))
        {
            *current = None;
        }
    }
}

/// The state of the entry call in progress.
pub(crate) fn current() -> Option<Arc<Shared>> {
    CURRENT
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Where log lines go outside an entry call (unit tests, code run after `angel_main` returned):
/// stderr, which the host captures too.
fn log_without_host(level: u32, msg: &str) {
    use std::io::Write as _;
    let level = match level {
        abi::LOG_ERROR => "error",
        abi::LOG_WARN => "warn",
        abi::LOG_INFO => "info",
        _ => "debug",
    };
    // Nothing sensible to do if stderr itself fails.
    let _ = writeln!(std::io::stderr().lock(), "angel {level}: {msg}");
}

/// Logs through the current entry call's host, or to stderr outside one.
pub(crate) fn log(level: u32, msg: &str) {
    match current() {
        Some(shared) => shared.log(level, msg),
        None => log_without_host(level, msg),
    }
}
