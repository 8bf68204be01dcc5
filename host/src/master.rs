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

use crate::cli::Cli;
use crate::control::{self, Msg, Recv};
use crate::listener::{BindError, Listeners};
use crate::pidfile::{self, Existing, Pidfile, PidfileError};
use crate::signals::{Sig, Signals};
use crate::snapshot::{Snapshot, SnapshotDir, SnapshotError};
use crate::spawn;
use crate::watch::{Matcher, Watch};
use crate::worker::WorkerArgs;

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
}

impl Config {
    pub fn from_cli(cli: &Cli) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Config {
            lib: std::path::absolute(&cli.lib).unwrap_or_else(|_| cli.lib.clone()),
            workers: cli.workers.map_or(cpus, |n| n.get()),
            ready_timeout: cli.ready_timeout,
            graceful_timeout: cli.graceful_timeout,
            debounce: cli.debounce,
            matcher: cli
                .reload_regex
                .clone()
                .map_or(Matcher::Library, Matcher::Regex),
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
    /// Told to drain (or to stop fast); finishing in-flight work.
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
    /// The reason the worker sent before failing.
    failure: Option<String>,
}

/// What asked for a roll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trigger {
    /// A file change seen by `--watch`: rolls only onto new content.
    Watch,
    /// Start-up, SIGHUP: always rolls, even onto unchanged content.
    Explicit,
}

#[derive(Debug)]
struct Roll {
    generation: u64,
    /// Still probing the snapshot (a failure now is a skipped reload, not a failed one).
    probing: bool,
    /// Only the probe, or every worker, must finish by then.
    deadline: Instant,
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    /// Consecutive deaths of young workers in this slot.
    young_deaths: u32,
    respawn_at: Option<Instant>,
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
    /// Content hash of the last build that failed to roll: a file change onto the same content
    /// is not retried (a HUP is).
    rejected_sha: Option<String>,
    watch: Option<Watch>,
    /// When the debounce period of the last matching file change ends.
    watch_due: Option<Instant>,
    next_generation: u64,
    stop: Option<Stop>,
    /// Set when the master must exit non-zero once its workers are gone.
    failure: Option<MasterError>,
}

/// `angel-host --lib ...`: checks the pidfile, binds, writes the pidfile, serves until stopped.
pub fn run(cli: &Cli) -> Result<ExitCode, MasterError> {
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
        tracing::info!("listening on {addr}");
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
    let pidfile = Pidfile::write(&cli.pidfile, pid)?;
    tracing::info!("created pid_file: {}", pidfile.path().display());

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
        rejected_sha: None,
        watch,
        watch_due: None,
        next_generation: 1,
        stop: None,
        failure: None,
    };
    let result = master.serve();
    if pidfile.remove() {
        tracing::info!("removed pid_file: {}", pidfile.path().display());
    }
    master.listeners.cleanup();
    result.map(|()| {
        tracing::info!("stopped");
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
        let roll = self.roll.as_ref().map(|r| r.deadline);
        let kills = self.workers.iter().filter_map(|w| w.kill_at);
        let respawns = self.slots.iter().filter_map(|s| s.respawn_at);
        roll.into_iter()
            .chain(kills)
            .chain(respawns)
            .chain(self.watch_due)
            .min()
    }

    fn read_controls(&mut self) {
        let mut events = Vec::new();
        for w in &mut self.workers {
            Self::drain_control(w, &mut events);
        }
        for (pid, msg) in events {
            self.on_message(pid, msg);
        }
    }

    /// Reads every queued message of one worker; EOF closes our end.
    fn drain_control(w: &mut Worker, events: &mut Vec<(Pid, Msg)>) {
        let Some(control) = &w.control else { return };
        loop {
            match control::recv_msg(control) {
                Ok(Recv::Msg(Msg::Failed(why))) => w.failure = Some(why),
                Ok(Recv::Msg(Msg::Heartbeat(n))) => w.requests = n,
                Ok(Recv::Msg(msg)) => events.push((w.pid, msg)),
                Ok(Recv::Empty) => return,
                Ok(Recv::Eof) | Err(_) => {
                    w.control = None;
                    return;
                }
            }
        }
    }

    fn on_message(&mut self, pid: Pid, msg: Msg) {
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return;
        };
        match msg {
            Msg::Ready if w.state == WorkerState::Starting => {
                w.state = WorkerState::Ready;
                let generation = w.generation;
                let rolling = self.roll.as_ref().map(|r| r.generation);
                if rolling == Some(generation) && self.all_ready(generation) {
                    self.commit(generation);
                }
            }
            Msg::Retiring => {
                tracing::info!("worker {pid} asks to retire");
            }
            _ => {}
        }
    }

    fn all_ready(&self, generation: u64) -> bool {
        let ready = self
            .workers
            .iter()
            .filter(|w| w.generation == generation && w.state == WorkerState::Ready)
            .count();
        ready == self.cfg.workers
    }

    fn reap(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let Some(pid) = status.pid() else { continue };
            let Some(idx) = self.workers.iter().position(|w| w.pid == pid) else {
                continue;
            };
            let mut events = Vec::new();
            Self::drain_control(&mut self.workers[idx], &mut events);
            for (pid, msg) in events {
                self.on_message(pid, msg);
            }
            // on_message may have changed the table (a commit), so find the worker again.
            let Some(idx) = self.workers.iter().position(|w| w.pid == pid) else {
                continue;
            };
            let w = self.workers.swap_remove(idx);
            self.on_exit(w, describe_status(&status), status_ok(&status));
        }
    }

    fn on_exit(&mut self, w: Worker, status: String, clean: bool) {
        let rolling = self.roll.as_ref().map(|r| r.generation);
        let why = || match &w.failure {
            Some(reason) => reason.clone(),
            None => format!("worker {} {status}", w.pid),
        };
        match w.state {
            WorkerState::Probing if rolling == Some(w.generation) => {
                if clean {
                    self.spawn_generation(w.generation);
                } else {
                    self.fail_roll(MasterError::Library(why()));
                }
            }
            WorkerState::Starting | WorkerState::Ready if rolling == Some(w.generation) => {
                let what = if w.state == WorkerState::Starting {
                    "before it was ready"
                } else {
                    "before its generation was ready"
                };
                let reason = match &w.failure {
                    Some(reason) => reason.clone(),
                    None => format!("worker {} {status} {what}", w.pid),
                };
                self.fail_roll(MasterError::NotReady(reason));
            }
            WorkerState::Starting | WorkerState::Ready => {
                tracing::warn!("worker {} died ({status})", w.pid);
                if let Some(reason) = &w.failure {
                    tracing::warn!("worker {}: {reason}", w.pid);
                }
                self.schedule_respawn(w.slot, w.started.elapsed());
            }
            WorkerState::Draining => {
                if clean {
                    tracing::info!("worker {} exited", w.pid);
                } else {
                    tracing::info!("worker {} exited ({status})", w.pid);
                }
            }
            WorkerState::Probing | WorkerState::Killed => {}
        }
        self.forget_idle_generations();
    }

    fn on_signal(&mut self, sig: Sig) {
        if sig != Sig::Chld {
            tracing::info!("{}", sig.name());
        }
        match sig {
            Sig::Chld => {} // reaped above, every iteration
            Sig::Hup => self.start_roll(Trigger::Explicit),
            Sig::Ttin | Sig::Ttou => {
                tracing::info!(
                    "{} ignored: changing the worker count at run time is not supported yet",
                    sig.name()
                );
            }
            Sig::Term | Sig::Quit if self.stop.is_none() => self.begin_stop(Stop::Graceful),
            Sig::Term | Sig::Quit | Sig::Int => self.begin_stop(Stop::Fast),
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        if self.roll.as_ref().is_some_and(|r| r.deadline <= now) {
            let pending: Vec<String> = self
                .workers
                .iter()
                .filter(|w| matches!(w.state, WorkerState::Probing | WorkerState::Starting))
                .filter(|w| Some(w.generation) == self.roll.as_ref().map(|r| r.generation))
                .map(|w| w.pid.to_string())
                .collect();
            let timeout = self.cfg.ready_timeout;
            self.fail_roll(MasterError::NotReady(format!(
                "not ready within --ready-timeout {timeout:?} (workers {})",
                pending.join(", ")
            )));
        }
        for w in &mut self.workers {
            if w.kill_at.is_some_and(|at| at <= now) {
                w.kill_at = None;
                if self.stop != Some(Stop::Fast) {
                    tracing::warn!(
                        "worker {} still draining after --graceful-timeout {:?}; killing it",
                        w.pid,
                        self.cfg.graceful_timeout
                    );
                }
                let _ = kill(w.pid, Signal::SIGKILL);
            }
        }
        if self.watch_due.is_some_and(|at| at <= now) {
            self.watch_due = None;
            self.start_roll(Trigger::Watch);
        }
        for slot in 0..self.slots.len() {
            if self.slots[slot].respawn_at.is_some_and(|at| at <= now) {
                self.slots[slot].respawn_at = None;
                self.respawn(slot);
            }
        }
    }

    /// Starts a roll, or remembers one follow-up roll if one is under way.
    fn start_roll(&mut self, trigger: Trigger) {
        if self.stop.is_some() {
            return;
        }
        if self.roll.is_some() {
            self.roll_pending = self.roll_pending.max(Some(trigger));
            return;
        }
        let generation = self.next_generation;
        let snapshot = match self.snapshots.take(&self.cfg.lib, generation) {
            Ok(s) => s,
            Err(e) => return self.skip_roll(&e.to_string()),
        };
        if trigger == Trigger::Watch {
            let serving_sha = self
                .serving
                .and_then(|g| self.generations.get(&g))
                .map(|s| s.sha256.as_str());
            if serving_sha == Some(snapshot.sha256.as_str()) {
                self.snapshots.remove(&snapshot);
                return;
            }
            if self.rejected_sha.as_deref() == Some(snapshot.sha256.as_str()) {
                tracing::info!(
                    "{} changed but is still the build that failed (sha {}); waiting for a new build or SIGHUP",
                    snapshot.source.display(),
                    snapshot.short_sha()
                );
                self.snapshots.remove(&snapshot);
                return;
            }
        }
        self.next_generation += 1;
        let args = WorkerArgs {
            lib: snapshot.path.clone(),
            probe: true,
            ..self.worker_args(0, generation)
        };
        self.generations.insert(generation, snapshot);
        self.roll = Some(Roll {
            generation,
            probing: true,
            deadline: Instant::now() + self.cfg.ready_timeout,
        });
        if let Err(e) = self.spawn(args, WorkerState::Probing) {
            self.fail_roll(e);
        }
    }

    /// The probe passed: one worker per slot on the new snapshot.
    fn spawn_generation(&mut self, generation: u64) {
        if let Some(roll) = &mut self.roll {
            roll.probing = false;
            roll.deadline = Instant::now() + self.cfg.ready_timeout;
        }
        for slot in 0..self.cfg.workers {
            let args = self.worker_args(slot, generation);
            if let Err(e) = self.spawn(args, WorkerState::Starting) {
                return self.fail_roll(e);
            }
        }
    }

    fn worker_args(&self, slot: usize, generation: u64) -> WorkerArgs {
        let lib = self
            .generations
            .get(&generation)
            .map(|s| s.path.clone())
            .unwrap_or_default();
        WorkerArgs {
            lib,
            probe: false,
            control_fd: -1,
            listeners: Vec::new(),
            slot: slot as u32,
            generation,
            max_requests: 0,
            heartbeat_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
            graceful_ms: self.cfg.graceful_timeout.as_millis() as u64,
        }
    }

    fn spawn(&mut self, mut args: WorkerArgs, state: WorkerState) -> Result<(), MasterError> {
        let (ours, theirs) = control::pair().map_err(io_err("creating a control channel"))?;
        args.control_fd = theirs.as_raw_fd();
        if state != WorkerState::Probing {
            args.listeners = self
                .listeners
                .for_slot(args.slot as usize)
                .into_iter()
                .map(|(fd, kind)| (fd.as_raw_fd(), kind.abi()))
                .collect();
        }
        let pid = spawn::spawn(&self.exe, &args).map_err(io_err("spawning a worker"))?;
        drop(theirs);
        if state != WorkerState::Probing {
            tracing::info!("forked worker[{pid}]");
        }
        self.workers.push(Worker {
            pid,
            slot: args.slot as usize,
            generation: args.generation,
            control: Some(ours),
            state,
            started: Instant::now(),
            kill_at: None,
            requests: 0,
            failure: None,
        });
        Ok(())
    }

    /// Every new worker is ready: the new generation serves, the old ones drain.
    fn commit(&mut self, generation: u64) {
        self.roll = None;
        self.rejected_sha = None;
        let previous = self.serving.replace(generation);
        for slot in &mut self.slots {
            *slot = Slot::default();
        }
        if let Some(s) = self.generations.get(&generation) {
            match previous {
                None => tracing::info!(
                    "serving {} (generation {generation}, sha {}, {} workers)",
                    s.source.display(),
                    s.short_sha(),
                    self.cfg.workers
                ),
                Some(_) => tracing::info!(
                    "reloaded {} (generation {generation}, sha {})",
                    s.source.display(),
                    s.short_sha()
                ),
            }
        }
        let old: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| w.generation != generation)
            .filter(|w| matches!(w.state, WorkerState::Starting | WorkerState::Ready))
            .map(|w| w.pid)
            .collect();
        for pid in old {
            self.drain(pid, self.cfg.graceful_timeout);
        }
        if let Some(watch) = &mut self.watch {
            // A `current -> releases/N` switch moves the directory worth watching.
            if let Err(e) = watch.update(&self.cfg.lib) {
                tracing::warn!("{e}");
            }
        }
        self.forget_idle_generations();
        self.follow_up();
    }

    /// The new build could not even be snapshotted: nothing was started.
    fn skip_roll(&mut self, why: &str) {
        match self.serving {
            None => {
                self.failure = Some(MasterError::Library(why.to_string()));
                self.stop = Some(Stop::Fast);
            }
            Some(serving) => {
                tracing::warn!("reload skipped: {why}; keeping generation {serving}");
                self.follow_up();
            }
        }
    }

    /// The roll failed: kill what it started, keep serving what served. A failure while
    /// probing is a skipped reload (nothing was started); later, a failed one.
    fn fail_roll(&mut self, error: MasterError) {
        let roll = self.roll.take();
        let generation = roll.as_ref().map(|r| r.generation);
        for w in &mut self.workers {
            if Some(w.generation) == generation && w.state != WorkerState::Killed {
                let _ = kill(w.pid, Signal::SIGKILL);
                w.state = WorkerState::Killed;
                w.kill_at = None;
            }
        }
        let snapshot = generation.and_then(|g| self.generations.get(&g));
        self.rejected_sha = snapshot.map(|s| s.sha256.clone());
        let source = snapshot
            .map(|s| format!("{}: ", s.source.display()))
            .unwrap_or_default();
        match self.serving {
            None => {
                // The first generation never came up: nothing to keep serving.
                let error = match error {
                    MasterError::Library(why) => MasterError::Library(format!("{source}{why}")),
                    MasterError::NotReady(why) => MasterError::NotReady(format!(
                        "{source}first generation failed to start: {why}"
                    )),
                    other => other,
                };
                self.failure = Some(error);
                self.roll_pending = None;
                self.stop = Some(Stop::Fast);
            }
            Some(serving) => {
                let what = if roll.is_some_and(|r| r.probing) {
                    "skipped"
                } else {
                    "failed"
                };
                tracing::warn!("reload {what}: {source}{error}; keeping generation {serving}");
                self.follow_up();
            }
        }
        self.forget_idle_generations();
    }

    fn follow_up(&mut self) {
        if let Some(trigger) = self.roll_pending.take() {
            self.start_roll(trigger);
        }
    }

    /// Notes the changed paths that match the reload matcher and (re)starts the debounce.
    fn read_watch(&mut self) {
        let Some(watch) = &mut self.watch else { return };
        let changed = watch.take();
        if changed.is_empty() {
            return;
        }
        let resolved = std::fs::canonicalize(&self.cfg.lib).ok();
        if changed.iter().any(|p| {
            self.cfg
                .matcher
                .matches(p, &self.cfg.lib, resolved.as_deref())
        }) {
            self.watch_due = Some(Instant::now() + self.cfg.debounce);
        }
    }

    /// Asks a worker to drain; kills it if it is still there after `grace`.
    fn drain(&mut self, pid: Pid, grace: Duration) {
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return;
        };
        let told = w
            .control
            .as_ref()
            .is_some_and(|c| control::send_msg(c.as_fd(), &Msg::Drain).is_ok());
        if !told {
            let _ = kill(w.pid, Signal::SIGTERM);
        }
        w.state = WorkerState::Draining;
        w.kill_at = Some(Instant::now() + grace);
    }

    fn begin_stop(&mut self, mode: Stop) {
        self.stop = Some(mode);
        self.roll_pending = None;
        self.watch_due = None;
        if self.roll.is_some() {
            self.fail_roll_quietly();
        }
        for slot in &mut self.slots {
            slot.respawn_at = None;
        }
        match mode {
            Stop::Graceful => {
                tracing::info!(
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
                tracing::info!("stopping now");
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

    /// A stop cancels a roll under way without calling it a failure.
    fn fail_roll_quietly(&mut self) {
        let generation = self.roll.take().map(|r| r.generation);
        for w in &mut self.workers {
            if Some(w.generation) == generation {
                let _ = kill(w.pid, Signal::SIGKILL);
                w.state = WorkerState::Killed;
                w.kill_at = None;
            }
        }
    }

    fn schedule_respawn(&mut self, slot: usize, uptime: Duration) {
        if self.stop.is_some() || slot >= self.slots.len() {
            return;
        }
        let s = &mut self.slots[slot];
        s.young_deaths = if uptime >= HEALTHY_UPTIME {
            1
        } else {
            s.young_deaths + 1
        };
        let delay = match s.young_deaths {
            0 | 1 => Duration::ZERO,
            n => RESPAWN_BACKOFF_BASE
                .saturating_mul(1u32 << (n - 2).min(16))
                .min(RESPAWN_BACKOFF_CAP),
        };
        if !delay.is_zero() {
            tracing::warn!("slot {slot} keeps crashing; respawning in {delay:?}");
        }
        s.respawn_at = Some(Instant::now() + delay);
    }

    fn respawn(&mut self, slot: usize) {
        let Some(generation) = self.serving else {
            return;
        };
        let occupied = self.workers.iter().any(|w| {
            w.slot == slot
                && w.generation == generation
                && matches!(w.state, WorkerState::Starting | WorkerState::Ready)
        });
        if occupied || self.stop.is_some() {
            return;
        }
        let args = self.worker_args(slot, generation);
        if let Err(e) = self.spawn(args, WorkerState::Starting) {
            tracing::error!("cannot respawn slot {slot}: {e}");
            self.schedule_respawn(slot, Duration::ZERO);
        }
    }

    /// Drops the snapshots of generations that neither serve, roll in, nor have workers left.
    fn forget_idle_generations(&mut self) {
        let rolling = self.roll.as_ref().map(|r| r.generation);
        let idle: Vec<u64> = self
            .generations
            .keys()
            .copied()
            .filter(|&g| Some(g) != self.serving && Some(g) != rolling)
            .filter(|&g| !self.workers.iter().any(|w| w.generation == g))
            .collect();
        for g in idle {
            if let Some(s) = self.generations.remove(&g) {
                self.snapshots.remove(&s);
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

/// `angel-host --check`: validates the flags and runs one probe on a snapshot of the library.
pub fn check(cli: &Cli) -> Result<String, MasterError> {
    let cfg = Config::from_cli(cli);
    let snapshots = SnapshotDir::create(cli.snapshot_dir.as_deref())?;
    let snapshot = snapshots.take(&cfg.lib, 0)?;
    let exe = std::fs::read_link("/proc/self/exe").map_err(io_err("finding /proc/self/exe"))?;
    let (ours, theirs) = control::pair().map_err(io_err("creating a control channel"))?;
    let args = WorkerArgs {
        lib: snapshot.path.clone(),
        probe: true,
        control_fd: theirs.as_raw_fd(),
        listeners: Vec::new(),
        slot: 0,
        generation: 0,
        max_requests: 0,
        heartbeat_ms: 0,
        graceful_ms: 0,
    };
    let pid = spawn::spawn(&exe, &args).map_err(io_err("spawning the probe"))?;
    drop(theirs);
    let deadline = Instant::now() + cfg.ready_timeout;
    let mut failure = None;
    let status = loop {
        match control::recv_msg(&ours) {
            Ok(Recv::Msg(Msg::Failed(why))) => failure = Some(why),
            Ok(Recv::Msg(_)) => {}
            Ok(Recv::Eof) | Ok(Recv::Empty) | Err(_) => {}
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => break status,
            Err(e) => return Err(io_err("waiting for the probe")(e.into())),
        }
        if Instant::now() >= deadline {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(MasterError::Library(format!(
                "{}: loading did not finish within --ready-timeout {:?}",
                snapshot.source.display(),
                cfg.ready_timeout
            )));
        }
        let mut fds = [PollFd::new(ours.as_fd(), PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, PollTimeout::from(10u16));
    };
    while let Ok(Recv::Msg(msg)) = control::recv_msg(&ours) {
        if let Msg::Failed(why) = msg {
            failure = Some(why);
        }
    }
    if !status_ok(&status) {
        let why = failure.unwrap_or_else(|| format!("probe {}", describe_status(&status)));
        return Err(MasterError::Library(format!(
            "{}: {why}",
            snapshot.source.display()
        )));
    }
    Ok(format!(
        "configuration ok: {} (sha {}, angel ABI {}, {} workers)",
        snapshot.source.display(),
        snapshot.short_sha(),
        angel::abi::ABI_VERSION,
        cfg.workers
    ))
}
