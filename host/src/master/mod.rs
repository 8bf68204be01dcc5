//! The master: owns listeners, pidfile, snapshots and the worker table, and runs the roll and
//! drain protocols from one single-threaded `poll` loop. It never loads app code.
//!
//! # Roll
//! 1. Snapshot the library (resolving symlinks again), then run a *probe* process on the
//!    snapshot: it dlopens it and checks the ABI, calling nothing.
//! 2. Spawn one worker per slot on the snapshot; each reports `ready` or dies.
//! 3. All ready within `--ready-timeout` → the new generation serves and every older worker is
//!    told to drain. Any failure → the new workers are killed, the old generation keeps
//!    serving (`reload failed: ...; keeping generation N`).
//! 4. A trigger during a roll is remembered as exactly one follow-up roll.
//!
//! # Workers
//! A worker that dies unexpectedly is respawned into its slot on the serving generation —
//! at once the first time, then with exponential backoff while it keeps dying young.
//! A draining worker still alive after `--graceful-timeout` is killed.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::cli::{Cli, LogFormat};
use crate::config::ConfigSource;
use crate::control::{self, Msg, Recv};
use crate::ctl;
use crate::listener::{BindError, Listeners};
use crate::pidfile::{self, Existing, Pidfile, PidfileError};
use crate::signals::{Sig, Signals};
use crate::snapshot::{Snapshot, SnapshotDir, SnapshotError};
use crate::spawn;
use crate::watch::{Matcher, Watch};
use crate::worker::WorkerArgs;

mod admin;
mod check;
mod roll;
mod slots;
mod workers;

pub use check::check;

/// How often workers' runtimes send a heartbeat.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A fast stop (INT, second TERM) sends SIGTERM, then SIGKILL after this long.
const FAST_STOP_GRACE: Duration = Duration::from_secs(1);
/// A worker that lived at least this long before dying is respawned at once.
const HEALTHY_UPTIME: Duration = Duration::from_secs(10);
/// Backoff between respawns of a slot whose workers keep dying young: doubles from the base
/// up to the cap, so a crash loop costs a few forks per minute, not a fork storm.
const RESPAWN_BACKOFF_BASE: Duration = Duration::from_millis(100);
const RESPAWN_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// After steering new connections away from a slot being removed, how long its worker keeps
/// accepting before it drains: handshakes already under way complete and are served. One
/// still incomplete after this (its SYN-ACK lost for over a second: the first retransmit is
/// at 1 s) would be reset when the socket closes — the window `tcp_migrate_req` would close.
const SLOT_SETTLE: Duration = Duration::from_secs(1);
/// With `--watch`, a library written but not closed yet (a slow `cp`, `rsync --inplace`) is
/// waited for, beyond the debounce, up to this long after its first change.
const WRITE_SETTLE_MAX: Duration = Duration::from_secs(5);
/// After every new worker reported ready, how long the old generation keeps serving beside
/// the new one before it drains: a build whose workers exit right after `ready` (an app that
/// returns at once, a crash in a task it spawned at start) is rolled back within it instead of
/// replacing a good generation. New workers accept from the first moment, so it costs no
/// latency; the old workers just drain this much later.
const READY_SETTLE: Duration = Duration::from_millis(150);
/// Upper bound for --workers, TTIN and the config file: beyond this is a typo, not a plan.
pub const MAX_WORKERS: usize = 1024;

/// Everything that ends the master with a non-zero exit code.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Pidfile(#[from] PidfileError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("{0}")]
    Library(String),
    #[error("{0}")]
    NotReady(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl MasterError {
    /// The documented exit codes (README, `--help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            MasterError::Library(_) => 3,
            MasterError::Bind(_) => 4,
            MasterError::Pidfile(_) => 5,
            MasterError::NotReady(_) => 6,
            MasterError::Io { .. } => 1,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> MasterError {
    let context = context.into();
    move |source| MasterError::Io { context, source }
}

impl From<SnapshotError> for MasterError {
    fn from(e: SnapshotError) -> Self {
        match e {
            SnapshotError::Dir { .. } => MasterError::Io {
                context: e.to_string(),
                source: std::io::Error::other("snapshot directory"),
            },
            other => MasterError::Library(other.to_string()),
        }
    }
}

/// Settings the loop needs, resolved from the flags.
#[derive(Debug, Clone)]
pub struct Config {
    pub lib: PathBuf,
    pub workers: usize,
    pub ready_timeout: Duration,
    pub graceful_timeout: Duration,
    pub debounce: Duration,
    pub matcher: Matcher,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// Heartbeat timeout; zero = off.
    pub timeout: Duration,
    pub log_format: LogFormat,
}

impl Config {
    pub fn from_cli(cli: &Cli) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Config {
            lib: cli
                .lib
                .as_deref()
                .map(|l| std::path::absolute(l).unwrap_or_else(|_| l.to_path_buf()))
                .unwrap_or_default(),
            workers: cli.workers.map_or(cpus, |n| n.get()),
            ready_timeout: cli.ready_timeout,
            graceful_timeout: cli.graceful_timeout,
            debounce: cli.debounce,
            max_requests: cli.max_requests,
            max_requests_jitter: cli.max_requests_jitter,
            timeout: cli.timeout,
            log_format: cli.log_format,
            matcher: Matcher(cli.reload_regex.clone()),
        }
    }
}

/// Lifecycle of one worker process, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// A probe: loads and checks the library, then exits.
    Probing,
    /// Spawned; its app has not reported ready yet.
    Starting,
    /// Serving.
    Ready,
    /// Told to drain (or to stop fast), or retiring by itself at its request limit;
    /// finishing in-flight work.
    Draining,
    /// Killed by the master (abandoned roll); only waiting to be reaped.
    Killed,
}

#[derive(Debug)]
struct Worker {
    pid: Pid,
    slot: usize,
    generation: u64,
    control: Option<OwnedFd>,
    state: WorkerState,
    started: Instant,
    /// When to SIGKILL a draining worker.
    kill_at: Option<Instant>,
    requests: u64,
    /// Last sign of life from the app's runtime (ready or heartbeat).
    last_beat: Instant,
    /// Killed for not answering; its death is then handled as unexpected.
    condemned: bool,
    /// The reason the worker sent before failing.
    failure: Option<String>,
}

/// What asked for a roll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trigger {
    /// The library itself changed on disk (`--watch`): rolls only onto new content.
    Watch,
    /// Another file matching `--reload-regex` changed (a plugin, a template the app reads
    /// at start): rolls even if the library is unchanged, like angel.js's
    /// `refresh_modules_regexp`.
    WatchOther,
    /// Start-up, SIGHUP: always rolls, even onto unchanged content.
    Explicit,
}

/// How a roll failed, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// The build was refused while validating it (snapshot, probe, or a worker failing to
    /// load it): `reload skipped`.
    Validation,
    /// The build loaded but its generation did not come up: `reload failed`.
    Start,
}

#[derive(Debug)]
struct Roll {
    generation: u64,
    /// The probe validated the snapshot. It runs beside the new workers (not before them:
    /// that would add a whole process start to every roll); the generation commits only
    /// once the probe passed and every worker is ready.
    probe_passed: bool,
    /// A new worker died before it was ready while the probe had not reported yet: the
    /// verdict waits for the probe, so a build the probe rejects is always a skipped
    /// reload, whichever process noticed first.
    start_failure: Option<String>,
    /// Set once every worker is ready and the generation serves: until then the previous
    /// generation keeps serving too, and a new worker dying rolls back to it.
    settle_until: Option<Instant>,
    /// The generation that served before this one was promoted.
    previous: Option<u64>,
    /// The `reloaded ...` line, for the `reload` clients once the roll is done.
    outcome: Option<String>,
    /// When the roll was asked for (snapshot included), for the `in N ms` of the log.
    started: Instant,
    /// Only the probe, or every worker, must finish by then.
    deadline: Instant,
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    /// Consecutive deaths of young workers in this slot.
    young_deaths: u32,
    respawn_at: Option<Instant>,
    /// Set when the slot is being removed (TTOU, a smaller --workers): new connections are
    /// steered away from it since then; its worker drains once they had time to settle.
    retiring_since: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Graceful,
    Fast,
}

/// The running master.
pub struct Master {
    cfg: Config,
    pid: Pid,
    exe: PathBuf,
    listeners: Listeners,
    snapshots: SnapshotDir,
    signals: Signals,
    /// Live generations (serving, rolling in, or still draining) and their snapshots.
    generations: BTreeMap<u64, Snapshot>,
    workers: Vec<Worker>,
    slots: Vec<Slot>,
    serving: Option<u64>,
    roll: Option<Roll>,
    /// One follow-up roll asked for during a roll; an explicit trigger outranks a watch one.
    roll_pending: Option<Trigger>,
    /// A worker count asked for during a roll, applied when it ends.
    pending_resize: Option<usize>,
    /// Whether a reuseport steering program is attached (after the first shrink).
    steering: bool,
    /// Content hash of the last build that failed to roll: a file change onto the same content
    /// is not retried (a HUP is).
    rejected_sha: Option<String>,
    watch: Option<Watch>,
    /// When the debounce period of the last matching file change ends.
    watch_due: Option<Instant>,
    /// Whether a matching path other than the library changed in that period.
    watch_other: bool,
    /// When the first change of the current debounce period was seen, and whether the
    /// library's last change was a write not yet closed (a copy in progress).
    watch_since: Option<Instant>,
    lib_writing: bool,
    next_generation: u64,
    stop: Option<Stop>,
    /// Set when the master must exit non-zero once its workers are gone.
    failure: Option<MasterError>,
    started_at: Instant,
    /// The control socket (`angel-host status|reload|stop`); None if it could not be bound.
    ctl: Option<ctl::Server>,
    /// `reload` clients, each waiting for the outcome of a roll of at least this generation.
    reload_waiters: Vec<(std::os::unix::net::UnixStream, u64)>,
    /// `stop` clients: held open until the master exits, which is their answer.
    stop_waiters: Vec<std::os::unix::net::UnixStream>,
    /// Flags and config file, to re-read the file on SIGHUP.
    source: ConfigSource,
    /// The settings in effect (for telling which changed settings need a restart).
    running: Cli,
}

/// `angel-host --lib ...`: checks the pidfile, binds, writes the pidfile, serves until stopped.
pub fn run(cli: &Cli, source: ConfigSource) -> Result<ExitCode, MasterError> {
    let cfg = Config::from_cli(cli);
    let pid = nix::unistd::getpid();
    match pidfile::inspect(&cli.pidfile)? {
        Existing::Live(other) => {
            return Err(PidfileError::LiveMaster {
                path: std::path::absolute(&cli.pidfile).unwrap_or_else(|_| cli.pidfile.clone()),
                pid: other,
            }
            .into())
        }
        Existing::Stale(old) => tracing::info!(
            event = "pidfile_stale",
            "replacing stale pid_file: {} (pid {})",
            cli.pidfile.display(),
            old.map_or_else(|| "unreadable".to_string(), |p| p.to_string())
        ),
        Existing::None => {}
    }
    let port = match (cli.port, &cli.path) {
        (None, None) => Some(3000),
        (port, _) => port,
    };
    let listeners = Listeners::bind(cli.host, port, cli.path.as_deref(), cfg.workers)?;
    for addr in listeners.describe() {
        tracing::info!(event = "listening", "listening on {addr}");
    }
    let signals = Signals::install().map_err(io_err("installing signal handlers"))?;
    let snapshots = SnapshotDir::create(cli.snapshot_dir.as_deref())?;
    let exe = std::fs::read_link("/proc/self/exe").map_err(io_err("finding /proc/self/exe"))?;
    let watch = if cli.watch {
        Some(Watch::start(&cfg.lib).map_err(|e| MasterError::Io {
            context: e.to_string(),
            source: std::io::Error::other("--watch"),
        })?)
    } else {
        None
    };
    let ctl = match ctl::Server::bind(pid.as_raw()) {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::warn!(
                event = "ctl_unavailable",
                "no control socket in {} ({e}); `angel-host status|reload|stop` will not work, signals do",
                ctl::socket_dir().display()
            );
            None
        }
    };
    let pidfile = Pidfile::write(&cli.pidfile, pid)?;
    tracing::info!(
        event = "pidfile_created",
        "created pid_file: {}",
        pidfile.path().display()
    );

    let mut master = Master {
        slots: vec![Slot::default(); cfg.workers],
        cfg,
        pid,
        exe,
        listeners,
        snapshots,
        signals,
        generations: BTreeMap::new(),
        workers: Vec::new(),
        serving: None,
        roll: None,
        roll_pending: None,
        pending_resize: None,
        steering: false,
        rejected_sha: None,
        watch,
        watch_due: None,
        watch_other: false,
        watch_since: None,
        lib_writing: false,
        next_generation: 1,
        stop: None,
        failure: None,
        started_at: Instant::now(),
        ctl,
        reload_waiters: Vec::new(),
        stop_waiters: Vec::new(),
        source,
        running: cli.clone(),
    };
    let result = master.serve();
    if pidfile.remove() {
        tracing::info!(
            event = "pidfile_removed",
            "removed pid_file: {}",
            pidfile.path().display()
        );
    }
    master.listeners.cleanup();
    result.map(|()| {
        tracing::info!(event = "stopped", "stopped");
        ExitCode::SUCCESS
    })
}

impl Master {
    fn serve(&mut self) -> Result<(), MasterError> {
        self.start_roll(Trigger::Explicit);
        loop {
            if self.stop.is_some() && self.workers.is_empty() {
                return match self.failure.take() {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            self.wait_for_events()?;
            self.read_controls();
            self.read_watch();
            self.serve_ctl();
            self.reap();
            for sig in self.signals.take() {
                self.on_signal(sig);
            }
            self.on_timers();
        }
    }

    /// Blocks until a signal, a control message or the next deadline.
    fn wait_for_events(&mut self) -> Result<(), MasterError> {
        let timeout = self.next_deadline().map_or(PollTimeout::NONE, |at| {
            let ms = at.saturating_duration_since(Instant::now()).as_millis() + 1;
            PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::MAX)
        });
        let mut fds = vec![PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
        if let Some(ctl) = &self.ctl {
            fds.push(PollFd::new(ctl.listener().as_fd(), PollFlags::POLLIN));
        }
        if let Some(watch) = &self.watch {
            fds.push(PollFd::new(watch.fd(), PollFlags::POLLIN));
        }
        fds.extend(
            self.workers
                .iter()
                .filter_map(|w| w.control.as_ref())
                .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
        );
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(io_err("poll")(e.into())),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let roll = self
            .roll
            .as_ref()
            .map(|r| r.settle_until.unwrap_or(r.deadline));
        let kills = self.workers.iter().filter_map(|w| w.kill_at);
        let respawns = self.slots.iter().filter_map(|s| s.respawn_at);
        let settles = self
            .slots
            .iter()
            .filter_map(|s| s.retiring_since)
            .map(|t| t + SLOT_SETTLE);
        let rolling = self.roll.as_ref().map(|r| r.generation);
        let unresponsive = self
            .workers
            .iter()
            .filter(|w| !w.condemned)
            .filter_map(|w| match w.state {
                WorkerState::Ready if !self.cfg.timeout.is_zero() => {
                    Some(w.last_beat + self.cfg.timeout)
                }
                WorkerState::Starting if Some(w.generation) != rolling => {
                    Some(w.started + self.cfg.ready_timeout)
                }
                _ => None,
            });
        roll.into_iter()
            .chain(kills)
            .chain(unresponsive)
            .chain(respawns)
            .chain(settles)
            .chain(self.watch_due)
            .min()
    }

    fn on_signal(&mut self, sig: Sig) {
        if sig != Sig::Chld {
            tracing::info!(event = "signal", "{}", sig.name());
        }
        match sig {
            Sig::Chld => {} // reaped above, every iteration
            Sig::Hup => {
                self.reread_config();
                self.start_roll(Trigger::Explicit);
            }
            Sig::Ttin => self.resize(self.target_workers().saturating_add(1)),
            Sig::Ttou => self.resize(self.target_workers().saturating_sub(1)),
            Sig::Term | Sig::Quit if self.stop.is_none() => self.begin_stop(Stop::Graceful),
            Sig::Term | Sig::Quit | Sig::Int => self.begin_stop(Stop::Fast),
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        if self
            .roll
            .as_ref()
            .and_then(|r| r.settle_until)
            .is_some_and(|t| t <= now)
        {
            self.commit();
        }
        if self
            .roll
            .as_ref()
            .is_some_and(|r| r.settle_until.is_none() && r.deadline <= now)
        {
            let pending: Vec<String> = self
                .workers
                .iter()
                .filter(|w| matches!(w.state, WorkerState::Probing | WorkerState::Starting))
                .filter(|w| Some(w.generation) == self.roll.as_ref().map(|r| r.generation))
                .map(|w| w.pid.to_string())
                .collect();
            let timeout = self.cfg.ready_timeout;
            self.fail_roll(
                Failure::Start,
                MasterError::NotReady(format!(
                    "not ready within --ready-timeout {timeout:?} (workers {})",
                    pending.join(", ")
                )),
            );
        }
        for w in &mut self.workers {
            if w.kill_at.is_some_and(|at| at <= now) {
                w.kill_at = None;
                if self.stop != Some(Stop::Fast) {
                    tracing::warn!(
                        event = "drain_timeout",
                        worker = w.pid.as_raw(),
                        "worker {} still draining after --graceful-timeout {:?}; killing it",
                        w.pid,
                        self.cfg.graceful_timeout
                    );
                }
                let _ = kill(w.pid, Signal::SIGKILL);
            }
        }
        if self.watch_due.is_some_and(|at| at <= now)
            && self.lib_writing
            && self
                .watch_since
                .is_some_and(|t| now.duration_since(t) < WRITE_SETTLE_MAX)
        {
            // The writer has not closed the library yet: wait for it (bounded).
            self.watch_due = Some(now + self.cfg.debounce);
        }
        if self.watch_due.is_some_and(|at| at <= now) {
            self.watch_due = None;
            self.watch_since = None;
            self.lib_writing = false;
            let trigger = if std::mem::take(&mut self.watch_other) {
                Trigger::WatchOther
            } else {
                Trigger::Watch
            };
            self.start_roll(trigger);
        }
        self.kill_unresponsive(now);
        self.retire_slots(now);
        for slot in 0..self.slots.len() {
            if self.slots[slot].respawn_at.is_some_and(|at| at <= now) {
                self.slots[slot].respawn_at = None;
                self.respawn(slot);
            }
        }
    }

    /// SIGHUP re-reads `--config`: what can change at a roll does; the rest is logged.
    fn reread_config(&mut self) {
        let cli = match self.source.reload() {
            Ok(Some(cli)) => cli,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(
                    event = "config_error",
                    "{e}; keeping the running configuration"
                );
                return;
            }
        };
        let old = &self.running;
        let restart_only = [
            ("host", old.host != cli.host),
            ("port", old.port != cli.port),
            ("path", old.path != cli.path),
            ("pidfile", old.pidfile != cli.pidfile),
            ("snapshot-dir", old.snapshot_dir != cli.snapshot_dir),
            ("watch", old.watch != cli.watch),
            ("log-format", old.log_format != cli.log_format),
        ];
        for (name, changed) in restart_only {
            if changed {
                tracing::warn!(
                    event = "config_restart_needed",
                    "{name} changed in the config file; it takes effect only at a restart"
                );
            }
        }
        let new = Config::from_cli(&cli);
        if new.lib.as_os_str().is_empty() {
            tracing::error!(
                event = "config_error",
                "the config file no longer names a library; keeping the running configuration"
            );
            return;
        }
        let workers = new.workers;
        self.cfg = Config {
            workers: self.cfg.workers,
            log_format: self.cfg.log_format,
            ..new
        };
        tracing::info!(event = "config_reloaded", "re-read the config file");
        self.resize(workers);
        self.running = Cli {
            host: self.running.host,
            port: self.running.port,
            path: self.running.path.clone(),
            pidfile: self.running.pidfile.clone(),
            snapshot_dir: self.running.snapshot_dir.clone(),
            watch: self.running.watch,
            log_format: self.running.log_format,
            ..cli
        };
    }

    fn begin_stop(&mut self, mode: Stop) {
        self.stop = Some(mode);
        self.roll_pending = None;
        self.watch_due = None;
        self.watch_other = false;
        self.watch_since = None;
        if self.roll.is_some() {
            self.fail_roll_quietly();
        }
        self.roll_outcome(0, false, "master is stopping");
        for slot in &mut self.slots {
            slot.respawn_at = None;
        }
        match mode {
            Stop::Graceful => {
                tracing::info!(
                    event = "stopping",
                    "stopping gracefully (--graceful-timeout {:?})",
                    self.cfg.graceful_timeout
                );
                let live: Vec<Pid> = self
                    .workers
                    .iter()
                    .filter(|w| matches!(w.state, WorkerState::Starting | WorkerState::Ready))
                    .map(|w| w.pid)
                    .collect();
                for pid in live {
                    self.drain(pid, self.cfg.graceful_timeout);
                }
            }
            Stop::Fast => {
                tracing::info!(event = "stopping", "stopping now");
                for w in &mut self.workers {
                    if w.state != WorkerState::Killed {
                        let _ = kill(w.pid, Signal::SIGTERM);
                        w.state = WorkerState::Draining;
                        w.kill_at = Some(Instant::now() + FAST_STOP_GRACE);
                    }
                }
            }
        }
    }

    /// The master's pid (for tests and status).
    pub fn pid(&self) -> Pid {
        self.pid
    }
}

fn status_ok(status: &WaitStatus) -> bool {
    matches!(status, WaitStatus::Exited(_, 0))
}

/// "exited with status 70", "was killed by SIGABRT".
pub fn describe_status(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => format!(
            "was killed by {}{}",
            sig.as_str(),
            if *core { " (core dumped)" } else { "" }
        ),
        other => format!("{other:?}"),
    }
}
