//! End-to-end test harness for angel-host.
//!
//! The tests run the real `angel-host` binary against the real example libraries, exactly as an
//! operator would: `cargo build --workspace && cargo test --workspace`. Artifacts are found next
//! to the test binary (`target/debug/deps/<test>` → `target/debug/`), so the harness never
//! builds anything itself and fails with a clear message when the workspace was not built.
//!
//! Rules every test follows (they run in parallel on a 2-core machine):
//! - a unique temp dir per host ([`tempfile`]), `--port 0` and `--host 127.0.0.1`, no fixed paths;
//! - every wait is a poll with a deadline that panics with the master's captured stderr;
//! - no sleeping as synchronisation (only tiny sleeps inside poll loops);
//! - [`Host`]'s `Drop` stops the master and SIGKILLs every process it spawned, so nothing leaks
//!   from one test into the next.
//!
//! Modules: [`host`] (spawn, wait on the log, signals, clean-up), [`log`] (log line parsers),
//! [`http`] (a minimal honest HTTP/1.1 client and raw connections), [`h2client`] (an honest
//! HTTP/2 load on hyper-util's pooled client), [`load`] (the HTTP/1.1 client load), [`body`]
//! (what the example apps answer), [`status`] (`status --json`), [`ops`] (the control commands
//! and a master started with exact arguments), [`rebuild`] (building and deploying a library),
//! [`fixtures`] (artifact lookup, C fixtures compiled with gcc, bad files).
//!
//! Every wait goes through [`poll`] (or [`wait_until`] on a [`Host`]).

pub mod body;
pub mod config_file;
pub mod echo_client;
pub mod exit;
pub mod fixtures;
pub mod h2client;
pub mod host;
pub mod http;
pub mod load;
pub mod log;
pub mod ops;
pub mod rebuild;
pub mod seccomp;
pub mod status;

pub use body::*;
pub use fixtures::*;
pub use host::*;
pub use http::*;
pub use load::{Load, LoadReport};
pub use log::*;
pub use status::*;

use std::time::{Duration, Instant};

/// How long a host may take to serve its first generation (debug builds, loaded 2-core box).
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Default bound for waiting on one log line or condition.
pub const WAIT: Duration = Duration::from_secs(20);

/// Pause between two looks of [`poll`]: short next to any timeout, long enough to leave the
/// 2-core box to the processes under test.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `cond` until it returns `Some` (that value) or `timeout` passed (`None`, after one
/// last look). For waits whose end is not a failure (a grace period in `Drop`, letting a pipe
/// drain); every other wait is a [`poll`].
pub fn poll_for<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `cond` until it returns `Some` or panics after `timeout` with `what` and `context()`.
pub fn poll<T>(
    timeout: Duration,
    what: &str,
    context: impl Fn() -> String,
    cond: impl FnMut() -> Option<T>,
) -> T {
    poll_for(timeout, cond).unwrap_or_else(|| {
        panic!(
            "timed out after {timeout:?} waiting for {what}\n{}",
            context()
        )
    })
}

/// Polls `cond` until it returns `Some`, or panics after `timeout` with `what` and the host's
/// captured stderr.
pub fn wait_until<T>(
    host: &Host,
    timeout: Duration,
    what: &str,
    cond: impl FnMut() -> Option<T>,
) -> T {
    poll(
        timeout,
        what,
        || format!("--- master stderr ---\n{}", host.log()),
        cond,
    )
}

/// `GET /` on new connections to a hello host until `want` distinct worker pids answered
/// (bounded by [`WAIT`] and 1000 requests); every request must succeed.
pub fn hello_pids(host: &Host, want: usize) -> std::collections::BTreeSet<i32> {
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    for i in 0..1000 {
        let resp = get(host.addr(), "/").unwrap_or_else(|e| {
            panic!(
                "GET / #{i} failed: {e}\n--- master stderr ---\n{}",
                host.log()
            )
        });
        seen.insert(hello_pid(&resp.text()));
        if seen.len() >= want {
            return seen;
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    panic!(
        "saw only pids {seen:?}, wanted {want} distinct\n--- master stderr ---\n{}",
        host.log()
    );
}

/// A request that is certainly in a worker's hands: a keep-alive connection first completes
/// `GET /` (so a worker accepted it and its pid is known), then `path` is written on it and read
/// on a thread.
pub struct InFlight {
    /// The hello worker that owns the connection.
    pub pid: i32,
    /// Yields the response to `path` (or the error).
    pub response: std::thread::JoinHandle<Result<Response, String>>,
}

impl InFlight {
    /// Starts `path` on a hello host; returns once the request is written.
    pub fn start(host: &Host, path: &str) -> InFlight {
        let mut client = Client::new(host.addr());
        let first = client
            .get("/")
            .unwrap_or_else(|e| panic!("GET / failed: {e}\n--- master stderr ---\n{}", host.log()));
        let pid = hello_pid(&first.text());
        assert!(!first.closes(), "hello keeps connections alive");
        client.send(path).expect("write the in-flight request");
        let response = std::thread::spawn(move || client.receive());
        InFlight { pid, response }
    }

    /// Waits for the response (bounded by the client's read timeout).
    pub fn finish(self) -> Result<Response, String> {
        self.response.join().expect("client thread")
    }
}
