//! The master's resolved settings: what the flags, the `ANGEL_*` variables and the `--config`
//! file add up to, checked, with the bounds and intervals that go with them.
//!
//! [`Settings`] is what the master runs on; it never sees the clap [`Cli`]. Each setting is
//! either applied at the next roll (a `HUP` or `angel-host reload` re-reads the config file)
//! or needs a restart; [`SETTINGS`] is that list, written once, and drives the "needs a
//! restart" report of a re-read.

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

/// Every setting by its flag (and config key) name, and when a change of it takes effect.
pub const SETTINGS: &[(&str, Apply)] = &[
    ("lib", Apply::AtRoll),
    ("workers", Apply::AtRoll),
    ("ready-timeout", Apply::AtRoll),
    ("graceful-timeout", Apply::AtRoll),
    ("timeout", Apply::AtRoll),
    ("max-requests", Apply::AtRoll),
    ("max-requests-jitter", Apply::AtRoll),
    ("reload-regex", Apply::AtRoll),
    ("debounce", Apply::AtRoll),
    ("host", Apply::Restart),
    ("port", Apply::Restart),
    ("path", Apply::Restart),
    ("listen", Apply::Restart),
    ("pidfile", Apply::Restart),
    ("snapshot-dir", Apply::Restart),
    ("watch", Apply::Restart),
    ("log-format", Apply::Restart),
];

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
    pub log_format: LogFormat,
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
            log_format: cli.log_format,
        }
    }

    /// The names of the settings that differ between `self` and `other` and apply only at a
    /// restart.
    pub fn restart_needed(&self, other: &Settings) -> Vec<&'static str> {
        SETTINGS
            .iter()
            .filter(|(_, apply)| *apply == Apply::Restart)
            .map(|(name, _)| *name)
            .filter(|name| self.differs(other, name))
            .collect()
    }

    /// `other` with every restart-only setting taken from `self`: what a re-read applies.
    pub fn at_roll(&self, other: Settings) -> Settings {
        Settings {
            listen: self.listen.clone(),
            pidfile: self.pidfile.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            watch: self.watch,
            log_format: self.log_format,
            ..other
        }
    }

    fn differs(&self, other: &Settings, name: &str) -> bool {
        match name {
            "host" => self.listen.host != other.listen.host,
            "port" => self.listen.port != other.listen.port,
            "path" => self.listen.path != other.listen.path,
            "listen" => self.listen.extra != other.listen.extra,
            "pidfile" => self.pidfile != other.pidfile,
            "snapshot-dir" => self.snapshot_dir != other.snapshot_dir,
            "watch" => self.watch != other.watch,
            "log-format" => self.log_format != other.log_format,
            _ => false,
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
            log_format: LogFormat::Seed,
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
    fn every_setting_is_listed_once() {
        let mut names: Vec<&str> = SETTINGS.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
        // The restart-only ones are exactly those `differs` knows.
        let a = Settings::for_tests(1);
        for (name, apply) in SETTINGS {
            let known = matches!(
                *name,
                "host"
                    | "port"
                    | "path"
                    | "listen"
                    | "pidfile"
                    | "snapshot-dir"
                    | "watch"
                    | "log-format"
            );
            assert_eq!(known, *apply == Apply::Restart, "{name}");
            assert!(!a.differs(&a, name));
        }
    }

    #[test]
    fn restart_only_changes_are_reported_and_kept() {
        let old = Settings::for_tests(2);
        let mut new = Settings::for_tests(4);
        new.listen.port = Some(9999);
        new.watch = false;
        assert_eq!(old.restart_needed(&new), vec!["port", "watch"]);
        let applied = old.at_roll(new);
        assert_eq!(applied.workers, 4);
        assert_eq!(applied.listen.port, Some(0));
        assert!(applied.watch);
    }

    #[test]
    fn listen_adds_to_the_shorthands_and_needs_a_restart() {
        let mut s = Settings::for_tests(1);
        s.listen.path = Some(PathBuf::from("/run/a.sock"));
        s.listen.extra = vec!["[::1]:0".parse().expect("addr")];
        let all: Vec<String> = s.listen.addrs().iter().map(ToString::to_string).collect();
        assert_eq!(all, ["127.0.0.1:0", "[::1]:0", "unix:/run/a.sock"]);
        let mut new = s.clone();
        new.listen
            .extra
            .push("127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(s.restart_needed(&new), vec!["listen"]);
        assert_eq!(s.at_roll(new).listen, s.listen);
    }

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
