//! Command-line flags of the master (`angel-host --lib ...`).
//!
//! Doc comments here are the `--help` text; keep them and the README's flags table in step.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// The signals table, shown at the end of `--help` (and in the README).
const SIGNALS_HELP: &str = "\
Signals (send to the master, e.g. kill -HUP $(cat angel.pid)):
  HUP          roll to a fresh snapshot of the library (always, even if unchanged)
  TERM, QUIT   graceful stop: drain all workers, bounded by --graceful-timeout;
               a second TERM/QUIT/INT = fast stop
  INT          fast stop (Ctrl-C): workers closed at once, pidfile removed
  TTIN / TTOU  one worker more / fewer (never below 1)
  CHLD         reap; an unexpected worker death is respawned with backoff

Exit codes: 0 ok, 1 other error, 2 usage, 3 library invalid, 4 cannot bind,
  5 pidfile problem, 6 first generation failed to become ready";

/// Pre-forking host for Rust cdylib network apps, with graceful rolls on SIGHUP.
///
/// The master binds the listeners once, forks+execs workers that load the app library, and on
/// SIGHUP starts a new generation from a fresh snapshot of the library; only when every new
/// worker is ready do the old ones stop accepting and finish their in-flight connections.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "angel-host",
    version,
    after_help = SIGNALS_HELP,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Talk to a running master instead of starting one.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The app library (a cdylib built with the `angel` SDK), e.g. target/release/libapp.so.
    /// Resolved again (symlinks included) at every roll.
    #[arg(
        long,
        env = "ANGEL_LIB",
        value_name = "PATH",
        required_unless_present = "config"
    )]
    pub lib: Option<PathBuf>,

    /// Address to bind the --port listener on (only with --port, or as the default listener).
    #[arg(
        long,
        env = "ANGEL_HOST",
        default_value = "0.0.0.0",
        value_name = "ADDR"
    )]
    pub host: IpAddr,

    /// TCP port; 0 picks a free port (the real address is logged). Default 3000 unless --path
    /// or --listen is given. `--host H --port P` is `--listen H:P`.
    #[arg(
        long,
        env = "ANGEL_PORT",
        value_name = "PORT",
        allow_hyphen_values = true
    )]
    pub port: Option<u16>,

    /// Listen on this address; repeatable: `HOST:PORT` (an IP address), `[IPV6]:PORT` or
    /// `unix:PATH`. Added to --host/--port and --path, if given; without any of the three the
    /// default is 0.0.0.0:3000. Each TCP address gets one SO_REUSEPORT socket per worker; port 0
    /// picks a free port (each logged). IPv6 sockets are IPv6-only, so `[::]:P` and
    /// `0.0.0.0:P` can both be given.
    #[arg(long, env = "ANGEL_LISTEN", value_name = "ADDR")]
    pub listen: Vec<crate::listener::ListenAddr>,

    /// Also (or, without --port, only) listen on this unix socket path. A stale socket file is
    /// replaced only if nothing listens on it.
    #[arg(long, env = "ANGEL_PATH", value_name = "SOCKET")]
    pub path: Option<PathBuf>,

    /// Number of worker processes [default: number of CPUs].
    #[arg(long, env = "ANGEL_WORKERS", value_name = "N", value_parser = parse_workers, allow_hyphen_values = true)]
    pub workers: Option<NonZeroUsize>,

    /// Where the master writes its pid. Refuses to start if it names a live angel-host master.
    #[arg(
        long,
        env = "ANGEL_PIDFILE",
        default_value = "angel.pid",
        value_name = "PATH"
    )]
    pub pidfile: PathBuf,

    /// How long a new generation may take until every worker reports ready ("500ms", "10s",
    /// "2m" or seconds); at least 100ms.
    #[arg(long, env = "ANGEL_READY_TIMEOUT", default_value = "10s", value_parser = parse_ready_timeout, value_name = "DURATION", allow_hyphen_values = true)]
    pub ready_timeout: Duration,

    /// How long a draining worker may finish its in-flight connections before it is killed.
    #[arg(long, env = "ANGEL_GRACEFUL_TIMEOUT", default_value = "30s", value_parser = parse_duration, value_name = "DURATION", allow_hyphen_values = true)]
    pub graceful_timeout: Duration,

    /// Recycle a worker after it served this many requests (HTTP requests; connections for raw
    /// TCP apps); 0 = never. The worker stops accepting at its limit and drains while the
    /// master starts its replacement at once.
    #[arg(
        long,
        env = "ANGEL_MAX_REQUESTS",
        default_value_t = 0,
        allow_hyphen_values = true,
        value_name = "N"
    )]
    pub max_requests: u64,

    /// Each worker's limit is drawn uniformly from [N, N+J], so workers don't all recycle at
    /// once.
    #[arg(
        long,
        env = "ANGEL_MAX_REQUESTS_JITTER",
        default_value_t = 0,
        allow_hyphen_values = true,
        value_name = "J"
    )]
    pub max_requests_jitter: u64,

    /// Kill and replace a serving worker whose app runtime sent no heartbeat for this long
    /// (a blocked event loop); 0 = off, else at least 2s (two heartbeat intervals).
    #[arg(long, env = "ANGEL_TIMEOUT", default_value = "30s", value_parser = parse_timeout, value_name = "DURATION", allow_hyphen_values = true)]
    pub timeout: Duration,

    /// Directory for the private snapshot directory of the library copies [default: the
    /// system temp dir]. It must allow executable mappings (not mounted noexec).
    #[arg(long, env = "ANGEL_SNAPSHOT_DIR", value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,

    /// Roll by itself when the library changes on disk (watches its directory, and the
    /// directory of its symlink target), after --debounce of quiet, and only if the content
    /// hash differs from the serving generation's.
    #[arg(long, env = "ANGEL_WATCH")]
    pub watch: bool,

    /// Start every worker by exec of the host and dlopen of the library, instead of forking
    /// it from its generation's zygote (the probe, kept: it loaded the library once).
    #[arg(long, env = "ANGEL_NO_ZYGOTE")]
    pub no_zygote: bool,

    /// With --watch: the changed paths (absolute, unanchored regex) that trigger a roll
    /// [default: the library's own path]. E.g. '/libapp\.so$'.
    #[arg(long, env = "ANGEL_RELOAD_REGEX", value_name = "REGEX", value_parser = parse_regex)]
    pub reload_regex: Option<regex::Regex>,

    /// With --watch: quiet period after the last matching change before rolling.
    #[arg(long, env = "ANGEL_DEBOUNCE", default_value = "150ms", value_parser = parse_duration, value_name = "DURATION", allow_hyphen_values = true)]
    pub debounce: Duration,

    /// Read settings from this TOML file; its keys are the long flag names
    /// (`workers = 4`, `graceful-timeout = "30s"`). Flags and ANGEL_* variables override it.
    /// Re-read on every SIGHUP: workers, timeouts, max-requests, debounce, reload-regex and lib
    /// take effect at that roll; a broken file is logged and the running settings stay.
    #[arg(long, env = "ANGEL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log format: `seed` (one line per event, `master[pid] message`) or `json` (one object
    /// per line: ts, level, role, pid, generation, event, fields).
    #[arg(
        long,
        env = "ANGEL_LOG_FORMAT",
        default_value = "seed",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9090), from a thread
    /// of the master's own.
    #[arg(long, env = "ANGEL_METRICS", value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Run the workers as this user (a name or a uid): the master (root) binds, then each
    /// worker drops to it — supplementary groups, gid, uid, verified — before it loads the
    /// app, so app code never runs as root.
    #[arg(long, env = "ANGEL_USER", value_name = "USER")]
    pub user: Option<String>,

    /// With --user: the workers' group (a name or a gid) [default: the user's groups].
    #[arg(long, env = "ANGEL_GROUP", value_name = "GROUP", requires = "user")]
    pub group: Option<String>,

    /// Validate the flags and load the library in a short-lived probe process, then exit
    /// (0 = configuration ok). Binds nothing, writes no pidfile.
    #[arg(long)]
    pub check: bool,
}

/// 1 ..= 1024 workers: 0 cannot serve, and thousands are a typo that would fork-bomb the host.
fn parse_workers(s: &str) -> Result<NonZeroUsize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of workers"))?;
    match NonZeroUsize::new(n) {
        Some(n) if n.get() <= crate::settings::MAX_WORKERS => Ok(n),
        _ => Err(format!(
            "workers must be between 1 and {}, got {n}",
            crate::settings::MAX_WORKERS
        )),
    }
}

/// Compiles `--reload-regex`; the error names the pattern and the parse error.
fn parse_regex(s: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(s).map_err(|e| format!("invalid regex {s:?}: {e}"))
}

/// The two log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `master[3367] forked worker[3368]`
    #[default]
    Seed,
    /// `{"ts":"…","level":"info","role":"master","pid":3367,"event":"forked",…}`
    Json,
}

/// Commands addressed to a running master through its pidfile (and its private control
/// socket). Exit codes: 0 ok, 1 stale pidfile (dead master), 3 not running, 4 cannot talk to
/// the master, 5 the master reports a failure (e.g. the reload failed).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Roll to a fresh snapshot of the library, like SIGHUP, and wait for the outcome.
    Reload {
        #[arg(long, default_value = "angel.pid", value_name = "PATH")]
        pidfile: PathBuf,
        /// How long to wait for the roll to end.
        #[arg(long, default_value = "120s", value_parser = parse_duration, value_name = "DURATION", allow_hyphen_values = true)]
        timeout: Duration,
    },
    /// Stop the master gracefully (like SIGTERM), or at once with --fast, and wait until it
    /// exited.
    Stop {
        #[arg(long, default_value = "angel.pid", value_name = "PATH")]
        pidfile: PathBuf,
        /// Like SIGINT: close workers at once.
        #[arg(long)]
        fast: bool,
        /// How long to wait for the master to exit.
        #[arg(long, default_value = "120s", value_parser = parse_duration, value_name = "DURATION", allow_hyphen_values = true)]
        timeout: Duration,
    },
    /// Upgrade angel-host itself, like SIGUSR2: start the binary found at the path this
    /// master was started from, hand it the listening sockets, and wait until it serves (the
    /// old master then drains and exits) or failed (the old master keeps serving).
    Upgrade {
        #[arg(long, default_value = "angel.pid", value_name = "PATH")]
        pidfile: PathBuf,
        /// How long to wait for the new master to serve.
        #[arg(long, default_value = "120s", value_parser = parse_duration, value_name = "DURATION", allow_hyphen_values = true)]
        timeout: Duration,
    },
    /// Show the master, its generation and library, and every worker.
    Status {
        #[arg(long, default_value = "angel.pid", value_name = "PATH")]
        pidfile: PathBuf,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// `--ready-timeout`: below 100 ms no generation could start in time.
fn parse_ready_timeout(s: &str) -> Result<Duration, String> {
    crate::settings::check_ready_timeout(parse_duration(s)?)
}

/// `--timeout`: 0 (off) or at least two heartbeat intervals.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    crate::settings::check_timeout(parse_duration(s)?)
}

/// Parses "250ms", "10s", "2m", "1h" or a bare number of seconds (fractions allowed).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 10s, 2m"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?}: use ms, s, m or h"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 7.0 * 24.0 * 3600.0 {
        return Err(format!("duration {s:?} is too long (at most 7 days)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999h").is_err());
    }

    #[test]
    fn workers_zero_is_a_usage_error() {
        let err = Cli::try_parse_from(["angel-host", "--lib", "x.so", "--workers", "0"])
            .expect_err("0 workers must be refused");
        assert!(err.to_string().contains("--workers"), "{err}");
    }

    #[test]
    fn negative_values_are_refused_naming_the_flag() {
        for args in [
            ["--timeout", "-1s"],
            ["--max-requests", "-3"],
            ["--workers", "-2"],
            ["--ready-timeout", "0"],
            ["--ready-timeout", "50ms"],
            ["--timeout", "900ms"],
        ] {
            let err = Cli::try_parse_from(["angel-host", "--lib", "x.so", args[0], args[1]])
                .expect_err("refused");
            assert!(err.to_string().contains(args[0]), "{args:?}: {err}");
        }
    }

    #[test]
    fn listen_is_repeatable_and_bad_values_name_themselves() {
        let cli = Cli::try_parse_from([
            "angel-host",
            "--lib",
            "x.so",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:8080",
            "--listen",
            "unix:/run/a.sock",
        ])
        .expect("parse");
        assert_eq!(cli.listen.len(), 3);
        let err = Cli::try_parse_from(["angel-host", "--lib", "x.so", "--listen", "nope:1"])
            .expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("--listen") && msg.contains("nope:1"), "{msg}");
    }

    #[test]
    fn lib_is_required_except_for_commands() {
        assert!(Cli::try_parse_from(["angel-host", "--port", "0"]).is_err());
        let cli = Cli::try_parse_from(["angel-host", "status", "--json"]).expect("status");
        assert!(matches!(
            cli.command,
            Some(Command::Status { json: true, .. })
        ));
        assert!(Cli::try_parse_from(["angel-host", "--lib", "x.so", "status"]).is_err());
    }
}
