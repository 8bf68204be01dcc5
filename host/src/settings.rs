//! The master's resolved settings: what the flags, the `ANGEL_*` variables and the `--config`
//! file add up to, checked, with the bounds and intervals that go with them.
//!
//! [`Settings`] is what the master runs on; it never sees the clap [`Cli`]. Each setting is
//! either applied at the next roll (a `HUP` or `angel-host reload` re-reads the config file)
//! or needs a restart ([`Apply`]); the one table of them is `config::SETTINGS`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::{Cli, LogFormat};
use crate::listener::ListenAddr;
use crate::watch::Matcher;

/// Upper bound for `--workers`, TTIN and the config file: beyond this is a typo, not a plan.
pub const MAX_WORKERS: usize = 1024;

/// How often workers' runtimes send a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The smallest non-zero `--timeout`: two heartbeat intervals, so that one late heartbeat
/// (a busy worker, a loaded machine) never gets a healthy worker killed.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The smallest `--ready-timeout`: a worker takes a few milliseconds to start on an idle
/// machine and tens under load; below this every roll would fail.
pub const MIN_READY_TIMEOUT: Duration = Duration::from_millis(100);

/// When a changed setting takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// At the roll that a `HUP` or `angel-host reload` starts.
    AtRoll,
    /// Only when the master restarts (it binds, writes or watches it once).
    Restart,
}

/// Where the master listens: the `--host/--port` and `--path` shorthands and every `--listen`
/// (config keys `host`, `port`, `path`, `listen`), kept apart so that a re-read names what
/// changed. Boxed in [`Settings`], which travels inside the core's events: keeps them small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub host: IpAddr,
    pub port: Option<u16>,
    pub path: Option<PathBuf>,
    /// `--listen`, in order.
    pub extra: Vec<ListenAddr>,
}

impl Listen {
    /// Every address to listen on: `--host:--port` (if a port is set), then each `--listen`,
    /// then `--path`. The shorthands and `--listen` add up; duplicates are the operator's
    /// error and fail to bind (exit 4).
    pub fn addrs(&self) -> Vec<ListenAddr> {
        let tcp = self
            .port
            .map(|port| ListenAddr::Tcp(SocketAddr::new(self.host, port)));
        let unix = self.path.clone().map(ListenAddr::Unix);
        tcp.into_iter()
            .chain(self.extra.iter().cloned())
            .chain(unix)
            .collect()
    }
}

/// The master's settings, resolved and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The library, absolute (resolved again, symlinks included, at every roll).
    pub lib: PathBuf,
    pub workers: usize,
    pub ready_timeout: Duration,
    pub graceful_timeout: Duration,
    /// Heartbeat timeout; zero = off.
    pub timeout: Duration,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub matcher: Matcher,
    pub debounce: Duration,
    /// Where to listen (restart-only); see [`Listen::addrs`].
    pub listen: Box<Listen>,
    pub pidfile: PathBuf,
    pub snapshot_dir: Option<PathBuf>,
    pub watch: bool,
    /// Fork each generation's workers from its zygote (the probe, kept) rather than exec
    /// them; off with `--no-zygote`, or when the master could not become a child subreaper.
    pub zygote: bool,
    /// Keep a probe process started ahead of the next roll (see `Role::Spare`).
    pub spare: bool,
    pub log_format: LogFormat,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<std::net::SocketAddr>,
    /// Who the workers run as.
    pub user: Option<String>,
    pub group: Option<String>,
}

impl Settings {
    /// Resolves checked flags (clap and the config loader did the checking).
    pub fn from_cli(cli: &Cli) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Settings {
            lib: cli
                .lib
                .as_deref()
                .map(|l| std::path::absolute(l).unwrap_or_else(|_| l.to_path_buf()))
                .unwrap_or_default(),
            workers: cli.workers.map_or(cpus, |n| n.get()).min(MAX_WORKERS),
            ready_timeout: cli.ready_timeout,
            graceful_timeout: cli.graceful_timeout,
            timeout: cli.timeout,
            max_requests: cli.max_requests,
            max_requests_jitter: cli.max_requests_jitter,
            matcher: Matcher(cli.reload_regex.clone()),
            debounce: cli.debounce,
            listen: Box::new(Listen {
                host: cli.host,
                // 3000 is the default only when no other listener is asked for.
                port: match (cli.port, &cli.path) {
                    (None, None) if cli.listen.is_empty() => Some(3000),
                    (port, _) => port,
                },
                path: cli.path.clone(),
                extra: cli.listen.clone(),
            }),
            pidfile: cli.pidfile.clone(),
            snapshot_dir: cli.snapshot_dir.clone(),
            watch: cli.watch,
            zygote: !cli.no_zygote,
            spare: !cli.no_zygote,
            log_format: cli.log_format,
            metrics: cli.metrics,
            user: cli.user.clone(),
            group: cli.group.clone(),
        }
    }

    /// Settings for tests of the core: one library, `workers` slots, short timeouts.
    #[cfg(test)]
    pub fn for_tests(workers: usize) -> Self {
        Settings {
            lib: PathBuf::from("/srv/libapp.so"),
            workers,
            ready_timeout: Duration::from_secs(3),
            graceful_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(4),
            max_requests: 0,
            max_requests_jitter: 0,
            matcher: Matcher(None),
            debounce: Duration::from_millis(150),
            listen: Box::new(Listen {
                host: IpAddr::from([127, 0, 0, 1]),
                port: Some(0),
                path: None,
                extra: Vec::new(),
            }),
            pidfile: PathBuf::from("angel.pid"),
            snapshot_dir: None,
            watch: true,
            zygote: false,
            spare: false,
            log_format: LogFormat::Seed,
            metrics: None,
            user: None,
            group: None,
        }
    }
}

/// `--timeout`: 0 (off) or at least [`MIN_TIMEOUT`].
pub fn check_timeout(d: Duration) -> Result<Duration, String> {
    if !d.is_zero() && d < MIN_TIMEOUT {
        return Err(format!(
            "{d:?} is shorter than two heartbeat intervals ({MIN_TIMEOUT:?}): every healthy \
             worker would be killed; give 0 (off) or at least {MIN_TIMEOUT:?}"
        ));
    }
    Ok(d)
}

/// `--ready-timeout`: at least [`MIN_READY_TIMEOUT`].
pub fn check_ready_timeout(d: Duration) -> Result<Duration, String> {
    if d < MIN_READY_TIMEOUT {
        return Err(format!(
            "{d:?} is shorter than {MIN_READY_TIMEOUT:?}: no generation could start in time"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_below_their_floor_are_refused() {
        assert!(check_timeout(Duration::ZERO).is_ok());
        assert!(check_timeout(Duration::from_millis(900)).is_err());
        assert!(check_timeout(MIN_TIMEOUT).is_ok());
        assert!(check_ready_timeout(Duration::from_millis(99)).is_err());
        assert!(check_ready_timeout(Duration::ZERO).is_err());
        assert!(check_ready_timeout(MIN_READY_TIMEOUT).is_ok());
    }
}
