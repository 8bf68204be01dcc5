//! Prometheus metrics of the master, served on `/metrics` from a thread of its own.
//!
//! The master updates a [`Metrics`] (cheap atomic operations, callable from its loop) and
//! [`Metrics::serve`] starts an HTTP/1 server on a separate thread with a current-thread
//! tokio runtime: a slow or hostile scraper can never delay the master's loop (DESIGN: "the
//! master's loop never waits for a client"). The exposition is OpenMetrics text
//! (`prometheus-client`), which Prometheus scrapes natively.
//!
//! | metric | type | fed by |
//! |---|---|---|
//! | `angel_generation` | gauge | [`Metrics::set_generation`] |
//! | `angel_workers{state="starting\|ready\|draining"}` | gauge | [`Metrics::set_workers`] |
//! | `angel_rolls_total{result="ok\|failed\|skipped"}` | counter | [`Metrics::roll_finished`] |
//! | `angel_roll_duration_seconds` | histogram | [`Metrics::roll_finished`] |
//! | `angel_worker_exits_total{reason}` | counter | [`Metrics::worker_exited`] |
//! | `angel_worker_restarts_total` | counter | [`Metrics::worker_restarted`] |
//! | `angel_requests_total` | counter | [`Metrics::requests_seen`] (heartbeats) |
//! | `angel_master_start_time_seconds` | gauge | [`Metrics::new`] |
//!
//! # Requests: a counter made of per-worker counters
//!
//! Each heartbeat carries the worker's *cumulative* request count since it started. Setting
//! the counter to the sum over live workers would be a gauge, not a counter: it would drop
//! every time a worker exits (a roll would look like a counter reset, and `rate()` would
//! invent a burst). Instead the master's counter only ever grows by *deltas*: we remember the
//! last total of each live worker and add `total - last` on every heartbeat. A worker that
//! exits is forgotten ([`Metrics::worker_exited`]); what it served up to its last heartbeat is
//! already counted, and a final heartbeat sent while it drains is counted too. A total lower
//! than the last one (a new process under a reused key) counts from zero. The counter resets
//! only when the master restarts, which `angel_master_start_time_seconds` shows.
//!
//! # Wiring (for the master)
//!
//! | when | call |
//! |---|---|
//! | start, after the env is unset (it starts a thread) | `let metrics = Metrics::new();` and, with `--metrics ADDR`, `let server = metrics.serve(addr)?;` (exit 4 on error; log `metrics on http://{server.local_addr()}/metrics`) |
//! | a generation starts serving | `set_generation(g)` |
//! | any worker changes state (spawned, ready, draining, reaped) | `set_workers(WorkerCounts { .. })` |
//! | a roll ends | `roll_finished(result, trigger_time.elapsed())` |
//! | `Msg::Heartbeat(n)` from worker `pid` | `requests_seen(pid, n)` |
//! | a worker is reaped | `worker_exited(pid, reason)`: `exited`, `crashed`, `killed`, `unresponsive`, `recycled`, `failed_start` |
//! | a slot respawns after an unexpected death | `worker_restarted()` |
//! | the master exits | drop the server (stops and joins its thread) |

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A scraper that has not sent its request headers after this long is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Metrics connections open at once. The metrics thread shares the master's fd table: an
/// unbounded number of scrapers could exhaust it and make the master unable to spawn
/// workers. Prometheus needs one; every connection closes after its response (no
/// keep-alive) or after [`HEADER_READ_TIMEOUT`].
const MAX_CONNECTIONS: usize = 8;

/// After a failed `accept` (`EMFILE`, ...), before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Roll durations, in seconds: a roll takes milliseconds (5-10 ms measured) up to the ready
/// timeout (10 s by default) when a build hangs.
const ROLL_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

type Label = [(&'static str, &'static str); 1];
type OwnedLabel = [(&'static str, String); 1];

/// Why the metrics server could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start the metrics thread: {0}")]
    Thread(io::Error),
}

/// How a roll ended, as `angel_rolls_total{result}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollResult {
    /// The new generation serves.
    Ok,
    /// The build loaded but its workers did not come up: the old generation keeps serving.
    Failed,
    /// The probe refused the build (or nothing changed): no worker was replaced.
    Skipped,
}

impl RollResult {
    fn label(self) -> &'static str {
        match self {
            RollResult::Ok => "ok",
            RollResult::Failed => "failed",
            RollResult::Skipped => "skipped",
        }
    }
}

/// How many workers are in each state, for `angel_workers{state}`. Every state is always
/// exported, zero included, so a query never sees a series vanish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounts {
    pub starting: i64,
    pub ready: i64,
    pub draining: i64,
}

/// The master's metrics. Clone it freely: clones share the same values.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    generation: Gauge,
    workers: Family<Label, Gauge>,
    rolls: Family<Label, Counter>,
    roll_duration: Histogram,
    exits: Family<OwnedLabel, Counter>,
    restarts: Counter,
    requests: Counter,
    /// Last cumulative total seen per live worker (keyed by pid).
    request_totals: Mutex<HashMap<i32, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero and the start time set to now.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let generation = Gauge::default();
        registry.register(
            "angel_generation",
            "Generation the master serves",
            generation.clone(),
        );
        let workers = Family::<Label, Gauge>::default();
        registry.register(
            "angel_workers",
            "Worker processes by state",
            workers.clone(),
        );
        // prometheus-client appends `_total` to counter names.
        let rolls = Family::<Label, Counter>::default();
        registry.register("angel_rolls", "Rolls by result", rolls.clone());
        let roll_duration = Histogram::new(ROLL_BUCKETS);
        registry.register(
            "angel_roll_duration_seconds",
            "Time from a roll's trigger to its end, whatever its result",
            roll_duration.clone(),
        );
        let exits = Family::<OwnedLabel, Counter>::default();
        registry.register(
            "angel_worker_exits",
            "Worker processes that ended, by reason",
            exits.clone(),
        );
        let restarts = Counter::default();
        registry.register(
            "angel_worker_restarts",
            "Workers respawned after an unexpected death",
            restarts.clone(),
        );
        let requests = Counter::default();
        registry.register(
            "angel_requests",
            "Requests served by all workers (connections for raw TCP apps), from heartbeats",
            requests.clone(),
        );
        let start = Gauge::<f64, AtomicU64>::default();
        start.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default(),
        );
        registry.register(
            "angel_master_start_time_seconds",
            "Start time of the master, in seconds since the Unix epoch",
            start,
        );
        for r in [RollResult::Ok, RollResult::Failed, RollResult::Skipped] {
            let _ = rolls.get_or_create(&[("result", r.label())]);
        }
        let m = Metrics {
            inner: Arc::new(Inner {
                registry,
                generation,
                workers,
                rolls,
                roll_duration,
                exits,
                restarts,
                requests,
                request_totals: Mutex::new(HashMap::new()),
            }),
        };
        m.set_workers(WorkerCounts::default());
        m
    }

    /// The serving generation changed (start, successful roll).
    pub fn set_generation(&self, generation: u64) {
        self.inner
            .generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// The worker table changed: how many workers are in each state now.
    pub fn set_workers(&self, counts: WorkerCounts) {
        for (state, n) in [
            ("starting", counts.starting),
            ("ready", counts.ready),
            ("draining", counts.draining),
        ] {
            self.inner.workers.get_or_create(&[("state", state)]).set(n);
        }
    }

    /// A roll ended after `took` (from its trigger).
    pub fn roll_finished(&self, result: RollResult, took: Duration) {
        self.inner
            .rolls
            .get_or_create(&[("result", result.label())])
            .inc();
        self.inner.roll_duration.observe(took.as_secs_f64());
    }

    /// A heartbeat from worker `pid`: it has served `total` requests since it started.
    pub fn requests_seen(&self, pid: i32, total: u64) {
        let mut totals = match self.inner.request_totals.lock() {
            Ok(t) => t,
            // A panic while holding the lock left a consistent map (one insert): go on.
            Err(poisoned) => poisoned.into_inner(),
        };
        let last = totals.insert(pid, total).unwrap_or(0);
        let delta = if total >= last { total - last } else { total };
        self.inner.requests.inc_by(delta);
    }

    /// Worker `pid` ended, for `reason` (a short stable word chosen by the master: `exited`,
    /// `crashed`, `killed`, `unresponsive`, ...). Forget its request total.
    pub fn worker_exited(&self, pid: i32, reason: &str) {
        let mut totals = match self.inner.request_totals.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        totals.remove(&pid);
        drop(totals);
        self.inner
            .exits
            .get_or_create(&[("reason", reason.to_string())])
            .inc();
    }

    /// A worker was respawned after an unexpected death.
    pub fn worker_restarted(&self) {
        self.inner.restarts.inc();
    }

    /// The exposition text, as served on `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would leave a partial text.
        if prometheus_client::encoding::text::encode(&mut out, &self.inner.registry).is_err() {
            tracing::warn!(event = "metrics_error", "cannot encode the metrics");
        }
        out
    }

    /// Binds `addr` now (so a bad address fails the caller, naming it) and serves `/metrics`
    /// on a thread of its own until the returned server is dropped or shut down.
    pub fn serve(&self, addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
        let bind_err = |source| MetricsError::Bind { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        self.serve_on(listener).map_err(|e| e.at(addr))
    }

    /// Serves `/metrics` on a socket already listening: one a previous master handed over in
    /// an upgrade (the address stays served throughout), or one [`Metrics::serve`] bound.
    pub fn serve_on(&self, listener: std::net::TcpListener) -> Result<MetricsServer, MetricsError> {
        let local = listener.local_addr().map_err(|source| MetricsError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let bind_err = |source| MetricsError::Bind {
            addr: local,
            source,
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        let fd = listener.try_clone().map_err(bind_err)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let metrics = self.clone();
        let thread = std::thread::Builder::new()
            .name("angel-metrics".into())
            .spawn(move || serve_thread(metrics, listener, stop_rx))
            .map_err(MetricsError::Thread)?;
        Ok(MetricsServer {
            addr: local,
            listener: fd,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl MetricsError {
    fn at(self, addr: SocketAddr) -> Self {
        match self {
            MetricsError::Bind { source, .. } => MetricsError::Bind { addr, source },
            other => other,
        }
    }
}

/// The running metrics server. Dropping it stops the server and joins its thread.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    /// The listening socket (a duplicate), for a self-upgrade's handover.
    listener: std::net::TcpListener,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// The bound address (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening socket, to hand to a new master.
    pub fn listener(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn serve_thread(
    metrics: Metrics,
    listener: std::net::TcpListener,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(
                event = "metrics_error",
                "cannot start the metrics runtime: {e}"
            );
            return;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(event = "metrics_error", "metrics listener: {e}");
                return;
            }
        };
        tokio::pin!(stop);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            // A connection slot first: beyond the cap, scrapers wait in the backlog.
            let permit = tokio::select! {
                _ = &mut stop => return,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                _ = &mut stop => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: note it, pause (no hot loop), keep serving.
                    tracing::warn!(event = "metrics_error", "metrics accept: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(respond(&metrics, &req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, CONTENT_TYPE, metrics.encode())
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET /metrics\n".into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are on /metrics\n".into(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
