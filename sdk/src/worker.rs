//! [`Worker`]: what the app's main function receives.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::abi;
use crate::drain::Drain;
use crate::host::Shared;
use crate::net::{Listener, ListenerInfo};

/// This worker process, as the host started it: its identity, its listeners, and the calls that
/// report its lifecycle to the host.
///
/// Most apps hand it straight to [`Worker::serve_http`] or [`Worker::serve_tcp`], which accept on
/// every listener, report ready, serve until the host asks to drain, drain, and return.
pub struct Worker {
    pub(crate) shared: Arc<Shared>,
    slot: u32,
    generation: u64,
    listeners: Vec<abi::Listener>,
    max_requests: u64,
    heartbeat_interval: Option<Duration>,
    graceful_timeout: Duration,
    #[cfg(feature = "http")]
    header_read_timeout: Option<Duration>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("slot", &self.slot)
            .field("generation", &self.generation)
            .field("listeners", &self.listeners)
            .field("max_requests", &self.max_requests)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("graceful_timeout", &self.graceful_timeout)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Copies what the worker needs out of the context. Runs inside the app's runtime.
    pub(crate) fn new(
        ctx: &abi::Context,
        listeners: Vec<abi::Listener>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            shared,
            slot: ctx.slot,
            generation: ctx.generation,
            listeners,
            max_requests: ctx.max_requests,
            heartbeat_interval: (ctx.heartbeat_interval_ms > 0)
                .then(|| Duration::from_millis(ctx.heartbeat_interval_ms)),
            graceful_timeout: Duration::from_millis(ctx.graceful_timeout_ms),
            #[cfg(feature = "http")]
            header_read_timeout: crate::http_serve::header_read_timeout_from_env(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// The worker's slot (0-based), stable across generations.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The worker's generation (1-based; each roll adds one).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every listening socket the host gave this worker, with its address: socket `slot` of
    /// each TCP address's group and every unix socket, in the order the host logs them.
    /// [`Worker::serve_http`] and [`Worker::serve_tcp`] serve all of them.
    ///
    /// ```no_run
    /// # fn f(worker: &angel::Worker) -> std::io::Result<()> {
    /// for l in worker.listeners()? {
    ///     angel::info!("serving {}", l.local_addr()); // 127.0.0.1:3000, unix:/run/app.sock
    /// }
    /// # Ok(()) }
    /// ```
    pub fn listeners(&self) -> io::Result<Vec<ListenerInfo>> {
        self.listeners.iter().map(ListenerInfo::from_abi).collect()
    }

    /// The host's listening sockets as the ABI describes them (the host owns the fds).
    pub fn raw_listeners(&self) -> &[abi::Listener] {
        &self.listeners
    }

    /// Requests after which this worker asks to be replaced; 0 = unlimited.
    pub fn max_requests(&self) -> u64 {
        self.max_requests
    }

    /// How long the host lets this worker drain before it kills it.
    pub fn graceful_timeout(&self) -> Duration {
        self.graceful_timeout
    }

    /// How long an HTTP/1 client may take to send a request head before
    /// [`Worker::serve_http`] closes its connection (`None`: no limit). From
    /// [`ANGEL_HEADER_READ_TIMEOUT`](crate::HEADER_READ_TIMEOUT_ENV), by default
    /// [`DEFAULT_HEADER_READ_TIMEOUT`](crate::DEFAULT_HEADER_READ_TIMEOUT).
    #[cfg(feature = "http")]
    pub fn header_read_timeout(&self) -> Option<Duration> {
        self.header_read_timeout
    }

    /// Sets the [header read timeout](Worker::header_read_timeout) for `serve_http`, overriding
    /// the environment; `None` turns it off (not advisable: a client that trickles its request
    /// head then holds its connection, and a draining worker, until it is killed).
    #[cfg(feature = "http")]
    pub fn set_header_read_timeout(&mut self, timeout: Option<Duration>) {
        self.header_read_timeout = timeout;
    }

    /// Requests (HTTP) or connections (raw TCP) served so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests()
    }

    /// Builds tokio listeners from (duplicates of) the host's fds, for apps that run their own
    /// accept loops instead of `serve_http` / `serve_tcp`. Such apps must call
    /// [`Worker::ready`] once accepting, stop accepting when [`Worker::drain`] fires, and count
    /// requests with [`Worker::count_request`] if they want `max_requests` to work.
    pub fn listen(&self) -> io::Result<Vec<Listener>> {
        let _guard = self.runtime.enter();
        crate::net::bind_all(&self.listeners)
    }

    /// Tells the host this worker is ready to serve (its init succeeded and it accepts). Only
    /// the first call sends anything. Also starts the heartbeat task on the app's runtime: a
    /// blocked runtime stops the heartbeats, which is how the host detects a hung worker.
    pub fn ready(&self) {
        if self.shared.ready_sent.swap(true, Ordering::AcqRel) {
            return;
        }
        if !self.shared.notify(abi::EVENT_READY, 0) {
            crate::warn!("could not tell the host this worker is ready");
        }
        if let Some(every) = self.heartbeat_interval {
            self.runtime
                .spawn(heartbeat(Arc::clone(&self.shared), every));
        }
    }

    /// Asks the host to replace this worker (as when `max_requests` is reached). Keep serving:
    /// the host drains this worker once its replacement is ready.
    pub fn retire(&self) {
        self.shared
            .notify(abi::EVENT_RETIRING, self.shared.requests());
    }

    /// Counts one request toward `max_requests` (done by `serve_http` and `serve_tcp`).
    pub fn count_request(&self) {
        self.shared.count_request();
    }

    /// This worker's drain signal (the same as [`crate::drain()`]).
    pub fn drain(&self) -> Drain {
        self.shared.drain.clone()
    }
}

/// Beats every `every`, on a kernel timer: a tokio interval would keep a tokio timer pending
/// for the worker's whole life, which costs every blocking wait of its runtime (see
/// [`crate::ticker`]). After a stall it beats once (the timer's missed expirations are read
/// as one) and resumes the rhythm.
async fn heartbeat(shared: Arc<Shared>, every: Duration) {
    let error = match crate::ticker::Periodic::new(every) {
        Ok(ticks) => loop {
            if let Err(e) = ticks.tick().await {
                break e;
            }
            shared.notify(abi::EVENT_HEARTBEAT, shared.requests());
        },
        Err(e) => e,
    };
    crate::warn!("heartbeats on a tokio timer: the timerfd failed: {error}");
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        shared.notify(abi::EVENT_HEARTBEAT, shared.requests());
    }
}
