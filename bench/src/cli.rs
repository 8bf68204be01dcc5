//! Command-line flags of `angel-bench`. Doc comments are the `--help` text.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Benchmarks and load proofs for angel-host: examples/hello under angel-host vs the same
/// handler as a plain hyper server with as many processes (A/B interleaved), throughput under a
/// continuous roll, roll latency, failed requests across rolls and max-requests recycles,
/// balance and memory. Writes results.md, summary.txt and rolls.svg to --out.
///
/// The load generator runs on the same machine and shares its cores with the servers.
#[derive(Debug, Parser)]
#[command(name = "angel-bench")]
pub struct Cli {
    /// The quick run kept in the test suite (a few seconds, the built-in client only).
    #[arg(long, conflicts_with = "full")]
    pub smoke: bool,

    /// The full run whose figures go into BENCHMARKS.md (a few minutes) [the default].
    #[arg(long)]
    pub full: bool,

    /// Worker processes of angel-host, and serving processes of the plain reference.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,

    /// Concurrent connections of the load generator [default: 64, smoke: 16].
    #[arg(long)]
    pub connections: Option<usize>,

    /// A/B rounds (overrides the profile's).
    #[arg(long)]
    pub ab_rounds: Option<usize>,

    /// Length of one side of an A/B round, in seconds (overrides the profile's).
    #[arg(long)]
    pub ab_secs: Option<u64>,

    /// Threads of the load generator (wrk -t, or the built-in client's runtime).
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,

    /// Load generator of the throughput/latency A/B: wrk if installed (auto), or the built-in
    /// client. The roll, recycle and balance proofs always use the built-in client.
    #[arg(long, value_enum, default_value_t = LoadGen::Auto)]
    pub load: LoadGen,

    /// The angel-host binary [default: beside angel-bench].
    #[arg(long)]
    pub host_bin: Option<PathBuf>,

    /// The app library [default: libhello.so beside angel-bench].
    #[arg(long)]
    pub lib: Option<PathBuf>,

    /// The plain-hyper reference binary [default: beside angel-bench].
    #[arg(long)]
    pub plain_bin: Option<PathBuf>,

    /// Where to write results.md, summary.txt and rolls.svg.
    #[arg(long, default_value = "target/angel-bench")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoadGen {
    Auto,
    Wrk,
    Rust,
}

/// How long and how often each phase runs.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    pub connections: usize,
    /// A/B rounds (each: plain then angel, or angel then plain) and the length of one side.
    pub ab_rounds: usize,
    pub ab_time: Duration,
    /// A/B rounds of angel under a continuous roll vs plain steady.
    pub roll_ab_rounds: usize,
    pub balance_time: Duration,
    /// Length of each roll-under-load run (keep-alive, close) and the HUP period.
    pub roll_time: Duration,
    pub roll_interval: Duration,
    /// Also roll under a keep-alive load paced at this rate (req/s): the roll latency when the
    /// cores are not saturated.
    pub paced_rate: Option<f64>,
    /// Rolls of an idle server, one at a time, for the roll latency without load.
    pub idle_rolls: usize,
    /// Recycles to reach in each client mode, the `--max-requests` (and jitter) that cause
    /// them, and a time cap.
    pub recycles: usize,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub recycle_cap: Duration,
}

impl Profile {
    pub fn full() -> Self {
        Self {
            name: "full",
            connections: 64,
            ab_rounds: 5,
            ab_time: Duration::from_secs(5),
            roll_ab_rounds: 3,
            balance_time: Duration::from_secs(5),
            roll_time: Duration::from_secs(56),
            roll_interval: Duration::from_millis(500),
            paced_rate: Some(20_000.0),
            idle_rolls: 100,
            recycles: 1000,
            max_requests: 500,
            max_requests_jitter: 100,
            recycle_cap: Duration::from_secs(120),
        }
    }

    pub fn smoke() -> Self {
        Self {
            name: "smoke",
            connections: 16,
            ab_rounds: 1,
            ab_time: Duration::from_secs(1),
            roll_ab_rounds: 0,
            balance_time: Duration::from_secs(1),
            roll_time: Duration::from_millis(2500),
            roll_interval: Duration::from_millis(250),
            paced_rate: None,
            idle_rolls: 5,
            recycles: 10,
            max_requests: 100,
            max_requests_jitter: 20,
            recycle_cap: Duration::from_secs(20),
        }
    }
}
