//! The bench's own HTTP/1.1 load client: counts every failure, retries nothing.
//!
//! Why a client of our own beside wrk: the roll proofs need what wrk does not give — a count of
//! failures per class *over time* (the plot), the worker pid behind every response (balance, and
//! "first response from the new generation"), and a `Connection: close` mode that opens one
//! connection per request. It is deliberately minimal: one request in flight per connection, a
//! fresh connection after any error or any `Connection: close` from the server, and nothing
//! retried — a request that fails is counted as failed, whatever the reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::http1::{parse_response, Response};

/// A request that takes longer than this counts as a timeout.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How a connection is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/1.1 keep-alive: many requests per connection (until the server says close).
    KeepAlive,
    /// `Connection: close`: one connection per request.
    Close,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Close => "close",
        }
    }
}

/// Failure classes, as wrk names them plus the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Write,
    Read,
    Timeout,
    Status,
}

/// Counts of failed requests per class.
#[derive(Debug, Default, Clone, Copy)]
pub struct Failures {
    pub connect: u64,
    pub write: u64,
    pub read: u64,
    pub timeout: u64,
    pub status: u64,
}

impl Failures {
    pub fn total(&self) -> u64 {
        self.connect + self.write + self.read + self.timeout + self.status
    }

    fn add(&mut self, f: Failure) {
        match f {
            Failure::Connect => self.connect += 1,
            Failure::Write => self.write += 1,
            Failure::Read => self.read += 1,
            Failure::Timeout => self.timeout += 1,
            Failure::Status => self.status += 1,
        }
    }

    fn merge(&mut self, o: &Failures) {
        self.connect += o.connect;
        self.write += o.write;
        self.read += o.read;
        self.timeout += o.timeout;
        self.status += o.status;
    }
}

impl std::fmt::Display for Failures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (connect {}, read {}, write {}, timeout {}, non-2xx {})",
            self.total(),
            self.connect,
            self.read,
            self.write,
            self.timeout,
            self.status
        )
    }
}

/// Responses from one worker pid.
#[derive(Debug, Clone, Copy)]
pub struct PidStat {
    pub responses: u64,
    pub first: Instant,
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub addr: SocketAddr,
    pub connections: usize,
    pub threads: usize,
    pub duration: Duration,
    pub mode: Mode,
    /// Width of one bucket of the time series.
    pub bucket: Duration,
    /// Total requests/s to pace the load at (spread evenly over the connections); `None` =
    /// as fast as the server answers.
    pub rate: Option<f64>,
}

/// What a load run saw.
#[derive(Debug)]
pub struct LoadReport {
    pub started: Instant,
    pub elapsed: Duration,
    pub ok: u64,
    pub failures: Failures,
    /// Latencies of the successful requests, in µs, sorted.
    pub latencies_us: Vec<u32>,
    /// (ok, failed) per bucket of `bucket` from `started`.
    pub series: Vec<(u64, u64)>,
    pub bucket: Duration,
    pub pids: HashMap<u32, PidStat>,
    /// The first few failures, for diagnosis.
    pub samples: Vec<String>,
}

impl LoadReport {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile (0..=1) of the latencies, in ms.
    pub fn latency_ms(&self, q: f64) -> f64 {
        crate::stats::quantile_sorted_u32(&self.latencies_us, q) / 1000.0
    }
}

/// Time series shared by all connection tasks of one run.
struct Series {
    started: Instant,
    bucket: Duration,
    ok: Vec<AtomicU64>,
    failed: Vec<AtomicU64>,
}

impl Series {
    fn slot(&self, at: Instant) -> usize {
        let i = (at.duration_since(self.started).as_nanos() / self.bucket.as_nanos()) as usize;
        i.min(self.ok.len() - 1)
    }
}

/// State of one connection task.
#[derive(Default)]
struct TaskStats {
    ok: u64,
    failures: Failures,
    latencies_us: Vec<u32>,
    pids: HashMap<u32, PidStat>,
    samples: Vec<String>,
}

/// Runs the load until `cfg.duration` passed or `stop` is set; blocks the calling thread.
pub fn run(cfg: &LoadConfig, stop: &AtomicBool) -> anyhow::Result<LoadReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads.max(1))
        .enable_all()
        .build()?;
    let buckets = (cfg.duration.as_nanos() / cfg.bucket.as_nanos()) as usize + 2;
    let started = Instant::now();
    let series = Arc::new(Series {
        started,
        bucket: cfg.bucket,
        ok: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
        failed: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
    });
    let deadline = started + cfg.duration;
    let stats: Vec<TaskStats> = runtime.block_on(async {
        // The caller's `stop` is borrowed, the tasks need a 'static flag: the watcher below
        // (polled by this block_on, not spawned) forwards one to the other.
        let stop_flag = Arc::new(StopFlag::default());
        let mut tasks = Vec::with_capacity(cfg.connections);
        for i in 0..cfg.connections {
            let series = Arc::clone(&series);
            let stop_flag = Arc::clone(&stop_flag);
            let (addr, mode) = (cfg.addr, cfg.mode);
            let pace = cfg.rate.map(|rate| {
                let period = Duration::from_secs_f64(cfg.connections as f64 / rate.max(1.0));
                // Staggered, so the connections do not all fire at once.
                let first = period.mul_f64(i as f64 / cfg.connections as f64);
                let mut ticks =
                    tokio::time::interval_at(tokio::time::Instant::now() + first, period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks
            });
            tasks.push(tokio::spawn(async move {
                connection_task(addr, mode, deadline, pace, &stop_flag, &series).await
            }));
        }
        // Forward the caller's stop flag to the tasks.
        let watcher = {
            let stop_flag = Arc::clone(&stop_flag);
            async move {
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                stop_flag.0.store(true, Ordering::Relaxed);
            }
        };
        let (_, results) = tokio::join!(watcher, futures_join(tasks));
        results
    });
    let elapsed = started.elapsed();
    let mut report = LoadReport {
        started,
        elapsed,
        ok: 0,
        failures: Failures::default(),
        latencies_us: Vec::new(),
        series: Vec::new(),
        bucket: cfg.bucket,
        pids: HashMap::new(),
        samples: Vec::new(),
    };
    for s in stats {
        report.ok += s.ok;
        report.failures.merge(&s.failures);
        report.latencies_us.extend_from_slice(&s.latencies_us);
        for (pid, stat) in s.pids {
            report
                .pids
                .entry(pid)
                .and_modify(|e| {
                    e.responses += stat.responses;
                    e.first = e.first.min(stat.first);
                })
                .or_insert(stat);
        }
        if report.samples.len() < 10 {
            report.samples.extend(s.samples);
        }
    }
    report.latencies_us.sort_unstable();
    let used = (elapsed.as_nanos() / cfg.bucket.as_nanos()) as usize + 1;
    report.series = (0..used.min(buckets))
        .map(|i| {
            (
                series.ok[i].load(Ordering::Relaxed),
                series.failed[i].load(Ordering::Relaxed),
            )
        })
        .collect();
    Ok(report)
}

#[derive(Default)]
struct StopFlag(AtomicBool);

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<TaskStats>>) -> Vec<TaskStats> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(stats) => out.push(stats),
            Err(e) => {
                let mut stats = TaskStats::default();
                stats.samples.push(format!("client task failed: {e}"));
                out.push(stats);
            }
        }
    }
    out
}

async fn connection_task(
    addr: SocketAddr,
    mode: Mode,
    deadline: Instant,
    mut pace: Option<tokio::time::Interval>,
    stop: &StopFlag,
    series: &Series,
) -> TaskStats {
    let mut stats = TaskStats::default();
    let mut conn: Option<TcpStream> = None;
    // Responses received on the current connection, and when the last one arrived: a failure on
    // a reused connection says how long it had been idle (the keep-alive close race).
    let mut on_conn = 0u64;
    let mut last_response: Option<Instant> = None;
    let mut buf = Vec::with_capacity(1024);
    let request: &[u8] = match mode {
        Mode::KeepAlive => b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n",
        Mode::Close => b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
    };
    while !stop.0.load(Ordering::Relaxed) && Instant::now() < deadline {
        if let Some(ticks) = pace.as_mut() {
            ticks.tick().await;
        }
        let t0 = Instant::now();
        // Only formatted if the request fails.
        let reused = conn.is_some().then(|| {
            let idle = last_response.map_or(Duration::ZERO, |t| t0.duration_since(t));
            (on_conn + 1, idle)
        });
        let outcome = tokio::time::timeout(
            REQUEST_TIMEOUT,
            exchange(&mut conn, addr, request, &mut buf),
        )
        .await
        .unwrap_or(Err((Failure::Timeout, "request timed out".into())));
        let done = Instant::now();
        let slot = series.slot(done);
        match outcome {
            Ok(response) => {
                on_conn += 1;
                last_response = Some(done);
                if mode == Mode::Close || response.close {
                    conn = None;
                    on_conn = 0;
                }
                if (200..300).contains(&response.status) {
                    stats.ok += 1;
                    series.ok[slot].fetch_add(1, Ordering::Relaxed);
                    let us = done.duration_since(t0).as_micros();
                    stats
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                    if let Some(pid) = response.pid {
                        stats
                            .pids
                            .entry(pid)
                            .or_insert(PidStat {
                                responses: 0,
                                first: done,
                            })
                            .responses += 1;
                    }
                } else {
                    fail(&mut stats, series, slot, Failure::Status, || {
                        format!("status {}", response.status)
                    });
                }
            }
            Err((failure, why)) => {
                conn = None;
                on_conn = 0;
                fail(&mut stats, series, slot, failure, || {
                    let Some((n, idle)) = reused else {
                        return why;
                    };
                    let idle_ms = idle.as_secs_f64() * 1000.0;
                    format!("{why} (request {n} on a reused connection, sent {idle_ms:.1} ms after its previous response)")
                });
            }
        }
    }
    stats
}

fn fail(
    stats: &mut TaskStats,
    series: &Series,
    slot: usize,
    failure: Failure,
    why: impl FnOnce() -> String,
) {
    stats.failures.add(failure);
    series.failed[slot].fetch_add(1, Ordering::Relaxed);
    if stats.samples.len() < 3 {
        let at = series.bucket.as_secs_f64() * slot as f64;
        stats
            .samples
            .push(format!("{failure:?} at ~{at:.1}s: {}", why()));
    }
}

type Outcome = Result<Response, (Failure, String)>;

/// One request on `conn` (connecting first if there is none).
async fn exchange(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Outcome {
    if conn.is_none() {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| (Failure::Connect, e.to_string()))?;
        let _ = stream.set_nodelay(true);
        *conn = Some(stream);
    }
    let Some(stream) = conn.as_mut() else {
        return Err((Failure::Connect, "no connection".into()));
    };
    stream
        .write_all(request)
        .await
        .map_err(|e| (Failure::Write, e.to_string()))?;
    buf.clear();
    loop {
        if let Some(parsed) = parse_response(buf).map_err(|e| (Failure::Read, e))? {
            return Ok(parsed);
        }
        let mut chunk = [0u8; 2048];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| (Failure::Read, e.to_string()))?;
        if n == 0 {
            return Err((
                Failure::Read,
                format!(
                    "connection closed after {} bytes of the response",
                    buf.len()
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
