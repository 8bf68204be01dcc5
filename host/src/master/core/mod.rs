//! The master's logic as a pure state machine: events in, actions out.
//!
//! [`Core::handle`] takes the time and one [`Event`] and returns the [`Action`]s to carry
//! out. It never touches a file descriptor, a process or the clock; the shell
//! (`super::shell`) turns the kernel into events and actions into system calls, and the
//! simulator (`super::sim`) drives it with fake pids and a fake clock.
//!
//! # States
//! - **Run**: [`Run::Serving`] → [`Run::Stopping`] (graceful or fast, with the error to exit
//!   with, if any) → [`Run::Exited`].
//! - **Roll** ([`RollPhase`]): `Idle` → `Snapshotting` (the shell copies the library) →
//!   `Starting` (a probe checks the snapshot while one worker per slot starts on it) →
//!   `Settling` (every new worker is ready and serves; the previous generation still serves
//!   beside it for [`READY_SETTLE`]) → `Idle`. Any failure returns to `Idle` with the previous
//!   generation serving. The probe belongs to the roll ([`Probe`]), not to the worker table.
//! - **Workers** ([`WorkerState`]): `Starting` → `Ready` → `Draining` → (reaped), or
//!   `Killed` from any of them. **Slots** ([`SlotState`]): `Active`, `Backoff` (crash loop),
//!   `Removing` (steered away from, then closed).
//! - **Watch debounce** ([`Debounce`]): `Quiet` or `Waiting` for the writes to settle.
//!
//! # Events and actions
//! Events: [`Event::Start`], `Reload` (SIGHUP or `angel-host reload`, both after the shell
//! re-read `--config`), `Stop`, `Resize` (TTIN/TTOU), `Status`, `Snapshotted`, `Spawned`,
//! `Worker` (a control message: ready, retiring, heartbeat, failure reason), `Exited` (a
//! worker or the probe — the probe's exit is the probe result), `FileChanged`,
//! `SlotAddFailed`, `Tick` (time passed; every deadline is checked only then).
//! Actions: [`Action::Snapshot`], `DropSnapshot`, `Spawn`, `SendDrain`, `Kill`, `AddSlot`,
//! `RemoveLastSlot`, `Steer`, `CloseListeners`, `WatchUpdate`, `Reply`, `Log`, `Exit`.
//! `Snapshot`, `Spawn` and `AddSlot` are answered by `Snapshotted`, `Spawned` and
//! `SlotAddFailed` before any other event.
//!
//! # Invariants (checked by [`Core::check_invariants`] after every simulated step, and by
//! the simulator's observers)
//! 1. A bad build never replaces the serving generation: a generation whose probe failed or
//!    whose worker died before its roll committed is never left serving.
//! 2. Outside a stop, every slot below `workers` eventually has a ready worker of the serving
//!    generation, or a scheduled respawn.
//! 3. Every trigger (HUP, reload, file change, config change) during a roll yields exactly one
//!    follow-up roll ([`Core::follow_up`] is one `Option`, not a queue).
//! 4. Every worker in `Draining` was sent a drain and has a kill deadline (the state carries
//!    it).
//! 5. A retiring worker of the rolling generation is replaced in that generation.
//! 6. No pid appears twice (table, probe, strays).
//! 7. A stop always ends in `Exit`.
//! 8. Only the serving, the rolling and (while settling) the previous generation have live
//!    workers outside removed slots, once the slot has a ready serving worker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::ctl;
use crate::settings::Settings;
use crate::snapshot::SnapshotError;

mod error;
mod lifecycle;
mod roll;
mod table;

pub use error::{ExitStatus, FirstGenerationError, RollError};
pub use table::{Slot, SlotState, Worker, WorkerState, WorkerTable};

/// A process id as the kernel (or the simulator) gave it.
pub type Pid = i32;
/// A control-socket client, numbered by the shell.
pub type ClientId = u64;

/// After every new worker reported ready, how long the old generation keeps serving beside
/// the new one before it drains: a build whose workers exit right after `ready` (an app that
/// returns at once, a crash in a task it spawned at start) is rolled back within it instead of
/// replacing a good generation. New workers accept from the first moment, so it costs no
/// latency; the old workers just drain this much later.
pub const READY_SETTLE: Duration = Duration::from_millis(150);
/// After steering new connections away from a slot being removed, how long its worker keeps
/// accepting before it drains: handshakes already under way complete and are served.
pub const SLOT_SETTLE: Duration = Duration::from_secs(1);
/// With `--watch`, a library written but not closed yet (a slow `cp`, `rsync --inplace`) is
/// waited for, beyond the debounce, up to this long after its first change.
pub const WRITE_SETTLE_MAX: Duration = Duration::from_secs(5);

/// Something that happened, as the shell (or the simulator) saw it.
#[derive(Debug)]
pub enum Event {
    /// The master is up: start the first generation.
    Start,
    /// SIGHUP (`client` None) or `angel-host reload`: re-read settings (None: no config
    /// file; an error: the file is broken and the running settings stay), then roll.
    Reload {
        client: Option<ClientId>,
        config: Option<Result<Settings, String>>,
    },
    /// TERM/QUIT (graceful), INT (fast), or `angel-host stop [--fast]` from `client`.
    Stop {
        mode: StopMode,
        client: Option<ClientId>,
    },
    /// TTIN (+1) / TTOU (-1).
    Resize(Resize),
    /// `angel-host status`.
    Status(ClientId),
    /// The answer to [`Action::Snapshot`].
    Snapshotted {
        generation: u64,
        result: Result<Build, SnapshotError>,
    },
    /// The answer to [`Action::Spawn`].
    Spawned {
        spawn: Spawn,
        result: Result<Pid, std::io::Error>,
    },
    /// A control message from a worker or the probe.
    Worker { pid: Pid, msg: WorkerMsg },
    /// A child was reaped.
    Exited { pid: Pid, status: ExitStatus },
    /// A watched path changed (`library`: it is the library or a link to it; `writing`: a
    /// write not closed yet; `replaced`: a complete file put in place at once, by a rename or
    /// a hard link, as cargo does).
    FileChanged {
        path: PathBuf,
        library: bool,
        writing: bool,
        replaced: bool,
    },
    /// The answer to a failed [`Action::AddSlot`].
    SlotAddFailed { error: String },
    /// Time passed: deadlines are checked.
    Tick,
}

/// What a worker says over its control channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerMsg {
    Ready,
    /// It stopped accepting at its request limit, or its app called `retire()`.
    Retiring,
    /// Its runtime is alive; requests served so far.
    Heartbeat(u64),
    /// Why it is about to fail.
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    Graceful,
    Fast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    More,
    Fewer,
}

/// A snapshot the shell took: what the workers of a generation load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// The library path as resolved for this roll (symlinks followed).
    pub source: PathBuf,
    /// Hex SHA-256 of the content.
    pub sha256: String,
}

impl Build {
    pub fn short_sha(&self) -> &str {
        self.sha256.get(..8).unwrap_or(&self.sha256)
    }
}

/// A process to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawn {
    pub generation: u64,
    pub role: Role,
    /// The worker's request limit (0 = none).
    pub max_requests: u64,
    pub graceful_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Loads and checks the snapshot, calls nothing, exits.
    Probe,
    /// Serves slot `slot`'s socket.
    Worker { slot: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// One log line: `event` is the stable name machines match on.
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub level: Level,
    pub event: &'static str,
    pub message: String,
    pub worker: Option<Pid>,
    pub generation: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum Reply {
    Status(ctl::Status),
    Outcome(ctl::ReloadOutcome),
}

/// Something for the shell to do.
#[derive(Debug)]
pub enum Action {
    /// Copy the library into a new snapshot for `generation`; answer with `Snapshotted`.
    Snapshot {
        generation: u64,
    },
    /// Nothing uses this generation's snapshot any more.
    DropSnapshot {
        generation: u64,
    },
    /// Start a process; answer with `Spawned`.
    Spawn(Spawn),
    /// Tell a worker to drain (SIGTERM if its control channel is gone).
    SendDrain(Pid),
    /// SIGKILL.
    Kill(Pid),
    /// Open one more per-slot listening socket; answer `SlotAddFailed` if it cannot.
    AddSlot,
    /// Close the highest slot's socket.
    RemoveLastSlot,
    /// Steer new connections to the first `active` slots' sockets.
    Steer {
        active: usize,
    },
    /// A graceful or fast stop: no worker accepts any more; close our listening sockets so
    /// new clients are refused at once.
    CloseListeners,
    /// Re-resolve the watched directories (a `current -> releases/N` switch).
    WatchUpdate,
    /// Answer a control client; `hold`: keep the connection open until the master exits.
    Reply {
        client: ClientId,
        reply: Reply,
        hold: bool,
    },
    Log(Log),
    /// The master is done: exit 0, or with this error.
    Exit(Option<FirstGenerationError>),
}

/// What asked for a roll; a later variant outranks an earlier one for the follow-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trigger {
    /// The library itself changed on disk (`--watch`): rolls only onto new content.
    Watch,
    /// Another file matching `--reload-regex` changed: rolls even onto unchanged content.
    WatchOther,
    /// Start-up, SIGHUP, `reload`: always rolls.
    Explicit,
}

/// The master's life.
#[derive(Debug)]
pub enum Run {
    Serving,
    Stopping {
        mode: StopMode,
        /// Exit with this once the workers are gone (the first generation failed).
        failure: Option<FirstGenerationError>,
    },
    Exited,
}

/// The probe of a starting generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Asked for; its pid comes with `Spawned`.
    Forking,
    /// Checking the snapshot. `worker_failed`: a new worker died meanwhile; the verdict waits
    /// for the probe, so a build the probe rejects is always a skipped reload, whichever
    /// process noticed first.
    Running {
        pid: Pid,
        worker_failed: Option<RollError>,
        /// The reason the probe sent before failing.
        reason: Option<String>,
    },
    Passed,
}

/// Where the roll is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollPhase {
    Idle,
    Snapshotting {
        generation: u64,
        trigger: Trigger,
        started: Instant,
    },
    Starting {
        generation: u64,
        /// Slots this generation fills.
        size: usize,
        started: Instant,
        deadline: Instant,
        probe: Probe,
    },
    Settling {
        generation: u64,
        size: usize,
        started: Instant,
        until: Instant,
        previous: u64,
        /// The `reloaded ...` line, for the `reload` clients once the roll is done.
        message: String,
    },
}

impl RollPhase {
    /// The generation being rolled in, once it has one.
    pub fn generation(&self) -> Option<u64> {
        match self {
            RollPhase::Idle => None,
            RollPhase::Snapshotting { generation, .. }
            | RollPhase::Starting { generation, .. }
            | RollPhase::Settling { generation, .. } => Some(*generation),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            RollPhase::Idle => "idle",
            RollPhase::Snapshotting { .. } => "snapshotting",
            RollPhase::Starting { .. } => "starting",
            RollPhase::Settling { .. } => "settling",
        }
    }
}

/// The `--watch` debounce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Debounce {
    Quiet,
    Waiting {
        since: Instant,
        due: Instant,
        /// The library's last change was a write not closed yet.
        writing: bool,
        /// A matching path other than the library changed.
        other: bool,
    },
}

/// The master's state.
pub struct Core {
    pub(super) s: Settings,
    pid: Pid,
    started_at: Instant,
    now: Instant,
    out: Vec<Action>,
    pub(super) table: WorkerTable,
    pub(super) generations: BTreeMap<u64, Build>,
    pub(super) serving: Option<u64>,
    pub(super) roll: RollPhase,
    /// One roll asked for during a roll; an explicit trigger outranks a watch one.
    pub(super) follow_up: Option<Trigger>,
    /// Slots wanted (settings, TTIN/TTOU); applied when no roll is under way.
    pub(super) desired: usize,
    /// Slots the serving generation fills outside a roll.
    active: usize,
    /// The slot count new connections are steered to, once steering was needed.
    steered: Option<usize>,
    /// Content hash of the last build that failed to roll: a file change onto the same content
    /// is not retried (a HUP is).
    rejected_sha: Option<String>,
    pub(super) debounce: Debounce,
    next_generation: u64,
    pub(super) run: Run,
    /// Spawns asked for and not answered yet.
    forking: Vec<Spawn>,
    /// Killed processes outside the table (an abandoned probe), still to be reaped.
    pub(super) strays: BTreeSet<Pid>,
    /// `reload` clients, each waiting for the outcome of a roll of at least this generation.
    reload_waiters: Vec<(ClientId, u64)>,
    listeners_closed: bool,
    rng: u64,
}

impl Core {
    /// A master with `settings.workers` slots (the shell bound one socket per slot) that has
    /// started nothing yet; `seed` spreads the `--max-requests-jitter` draws.
    pub fn new(settings: Settings, pid: Pid, now: Instant, seed: u64) -> Self {
        let workers = settings.workers.max(1);
        Core {
            desired: workers,
            active: 0,
            table: WorkerTable {
                slots: vec![Slot::active(); workers],
                workers: Vec::new(),
            },
            s: settings,
            pid,
            started_at: now,
            now,
            out: Vec::new(),
            generations: BTreeMap::new(),
            serving: None,
            roll: RollPhase::Idle,
            follow_up: None,
            steered: None,
            rejected_sha: None,
            debounce: Debounce::Quiet,
            next_generation: 1,
            run: Run::Serving,
            forking: Vec::new(),
            strays: BTreeSet::new(),
            reload_waiters: Vec::new(),
            listeners_closed: false,
            rng: seed | 1,
        }
    }

    /// Handles one event at `now`.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Action> {
        self.now = now.max(self.now);
        match event {
            Event::Start => self.start_roll(Trigger::Explicit),
            Event::Reload { client, config } => self.on_reload(client, config),
            Event::Stop { mode, client } => self.on_stop(mode, client),
            Event::Resize(r) => self.on_resize(r),
            Event::Status(client) => {
                let reply = Reply::Status(self.status());
                self.out.push(Action::Reply {
                    client,
                    reply,
                    hold: false,
                });
            }
            Event::Snapshotted { generation, result } => self.on_snapshot(generation, result),
            Event::Spawned { spawn, result } => self.on_spawned(spawn, result),
            Event::Worker { pid, msg } => self.on_message(pid, msg),
            Event::Exited { pid, status } => self.on_exit(pid, status),
            Event::FileChanged {
                path,
                library,
                writing,
                replaced,
            } => self.on_file_changed(&path, library, writing, replaced),
            Event::SlotAddFailed { error } => self.on_slot_add_failed(&error),
            Event::Tick => self.on_tick(),
        }
        self.reconcile();
        std::mem::take(&mut self.out)
    }

    /// The earliest moment something is due (a `Tick` then has work to do).
    pub fn next_deadline(&self) -> Option<Instant> {
        let roll = match &self.roll {
            RollPhase::Starting { deadline, .. } => Some(*deadline),
            RollPhase::Settling { until, .. } => Some(*until),
            _ => None,
        };
        let rolling = self.roll.generation();
        let workers = self.table.workers.iter().filter_map(|w| match w.state {
            WorkerState::Draining { kill_at } => Some(kill_at),
            WorkerState::Ready { last_beat } if !self.s.timeout.is_zero() => {
                Some(last_beat + self.s.timeout)
            }
            WorkerState::Starting if Some(w.generation) != rolling => {
                Some(w.started + self.s.ready_timeout)
            }
            _ => None,
        });
        let slots = self.table.slots.iter().filter_map(|s| match s.state {
            SlotState::Backoff { at } => Some(at),
            // Once settled, the slot waits for its workers to exit, not for a time.
            SlotState::Removing { since } => Some(since + SLOT_SETTLE).filter(|t| *t > self.now),
            SlotState::Active => None,
        });
        let debounce = match self.debounce {
            Debounce::Waiting { due, .. } => Some(due),
            Debounce::Quiet => None,
        };
        roll.into_iter()
            .chain(workers)
            .chain(slots)
            .chain(debounce)
            .min()
    }

    /// The settings in effect.
    pub fn settings(&self) -> &Settings {
        &self.s
    }

    /// Whether the master has exited.
    pub fn exited(&self) -> bool {
        matches!(self.run, Run::Exited)
    }

    fn log(&mut self, level: Level, event: &'static str, message: String) {
        self.out.push(Action::Log(Log {
            level,
            event,
            message,
            worker: None,
            generation: None,
        }));
    }

    fn log_worker(
        &mut self,
        level: Level,
        event: &'static str,
        pid: Pid,
        generation: u64,
        message: String,
    ) {
        self.out.push(Action::Log(Log {
            level,
            event,
            message,
            worker: Some(pid),
            generation: Some(generation),
        }));
    }

    fn stopping(&self) -> bool {
        !matches!(self.run, Run::Serving)
    }

    /// Slots the serving generation fills: the rolled-in size while it settles.
    fn serving_slots(&self) -> usize {
        match &self.roll {
            RollPhase::Settling { size, .. } => *size,
            _ => self.active,
        }
    }

    /// Brings the table in line with the state after every event: fills slots, applies a
    /// resize when no roll is under way, retires removed slots, drains workers of generations
    /// that no longer serve, forgets unused snapshots, and exits once a stop is complete.
    fn reconcile(&mut self) {
        if matches!(self.run, Run::Serving) {
            if self.roll == RollPhase::Idle && self.serving.is_some() {
                self.apply_resize();
            }
            self.fill();
            self.sweep_stale();
        }
        self.retire_slots();
        self.forget_idle_generations();
        if let Run::Stopping { failure, .. } = &mut self.run {
            if self.table.workers.is_empty() && self.strays.is_empty() && self.forking.is_empty() {
                let failure = failure.take();
                self.run = Run::Exited;
                self.out.push(Action::Exit(failure));
            }
        }
    }

    /// Whether `generation` has, or is getting, a live worker in `slot`.
    fn occupied(&self, generation: u64, slot: usize) -> bool {
        self.table.has(generation, slot, false)
            || self
                .forking
                .iter()
                .any(|s| s.generation == generation && s.role == Role::Worker { slot })
    }

    fn fill(&mut self) {
        if let Some(serving) = self.serving {
            for slot in 0..self.serving_slots().min(self.table.slots.len()) {
                if self.table.slots[slot].state == SlotState::Active
                    && !self.occupied(serving, slot)
                {
                    self.spawn(serving, Role::Worker { slot });
                }
            }
        }
        if let RollPhase::Starting {
            generation, size, ..
        } = self.roll
        {
            for slot in 0..size.min(self.table.slots.len()) {
                if !self.occupied(generation, slot) {
                    self.spawn(generation, Role::Worker { slot });
                }
            }
        }
    }

    /// Drains live workers of generations that neither serve, roll in, nor are the previous
    /// generation of a settling roll, once their slot has a ready serving worker (or is
    /// beyond the serving size). Workers of removed slots drain when the slot settled.
    fn sweep_stale(&mut self) {
        let Some(serving) = self.serving else { return };
        let mut legit = vec![serving];
        legit.extend(self.roll.generation());
        if let RollPhase::Settling { previous, .. } = self.roll {
            legit.push(previous);
        }
        let size = self.serving_slots();
        let stale = self.table.pids(|w| {
            w.state.is_live()
                && !legit.contains(&w.generation)
                && !matches!(
                    self.table.slots.get(w.slot).map(|s| s.state),
                    Some(SlotState::Removing { .. })
                )
                && (w.slot >= size || self.table.has(serving, w.slot, true))
        });
        for pid in stale {
            self.drain(pid);
        }
    }

    fn forget_idle_generations(&mut self) {
        let mut keep: Vec<u64> = self.serving.into_iter().collect();
        keep.extend(self.roll.generation());
        if let RollPhase::Settling { previous, .. } = self.roll {
            keep.push(previous);
        }
        let idle: Vec<u64> = self
            .generations
            .keys()
            .copied()
            .filter(|g| !keep.contains(g) && !self.table.has_generation(*g))
            .filter(|g| !self.forking.iter().any(|s| s.generation == *g))
            .collect();
        for generation in idle {
            self.generations.remove(&generation);
            self.out.push(Action::DropSnapshot { generation });
        }
    }

    /// A worker's request limit: `--max-requests` plus a uniform draw from the jitter.
    fn request_limit(&mut self) -> u64 {
        if self.s.max_requests == 0 {
            return 0;
        }
        let jitter = self.s.max_requests_jitter;
        if jitter == 0 {
            return self.s.max_requests;
        }
        // xorshift64: plenty for spreading recycle times, and deterministic under a seed.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.s.max_requests + self.rng % (jitter.saturating_add(1))
    }

    fn spawn(&mut self, generation: u64, role: Role) {
        let spawn = Spawn {
            generation,
            role,
            max_requests: if role == Role::Probe {
                0
            } else {
                self.request_limit()
            },
            graceful_timeout: self.s.graceful_timeout,
        };
        self.forking.push(spawn);
        self.out.push(Action::Spawn(spawn));
    }

    /// Asks a worker to drain; it is killed if still there after `--graceful-timeout`.
    fn drain(&mut self, pid: Pid) {
        let kill_at = self.now + self.s.graceful_timeout;
        let Some(w) = self.table.get_mut(pid) else {
            return;
        };
        if matches!(w.state, WorkerState::Killed { .. }) {
            return;
        }
        if let WorkerState::Draining { .. } = w.state {
            return;
        }
        w.state = WorkerState::Draining { kill_at };
        self.out.push(Action::SendDrain(pid));
    }

    fn kill(&mut self, pid: Pid, respawn: bool) {
        if let Some(w) = self.table.get_mut(pid) {
            w.state = WorkerState::Killed { respawn };
            self.out.push(Action::Kill(pid));
        }
    }

    /// Answers the `reload` clients waiting for a roll of at most `generation`.
    fn outcome(&mut self, generation: u64, ok: bool, message: &str) {
        let stopping = self.stopping();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reload_waiters)
            .into_iter()
            .partition(|(_, wanted)| *wanted <= generation || stopping);
        self.reload_waiters = waiting;
        for (client, _) in done {
            self.out.push(Action::Reply {
                client,
                reply: Reply::Outcome(ctl::ReloadOutcome {
                    ok,
                    generation,
                    message: message.to_string(),
                }),
                hold: false,
            });
        }
    }

    /// What `angel-host status` shows (the shell adds the listening addresses).
    pub fn status(&self) -> ctl::Status {
        let serving = self.serving.and_then(|g| self.generations.get(&g));
        let mut workers: Vec<ctl::WorkerStatus> = self
            .table
            .workers
            .iter()
            .map(|w| ctl::WorkerStatus {
                pid: w.pid,
                slot: w.slot,
                generation: w.generation,
                state: w.state.as_str().to_string(),
                age_secs: self.now.duration_since(w.started).as_secs_f64(),
                requests: w.requests,
            })
            .collect();
        workers.sort_by_key(|w| (w.generation, w.slot, w.pid));
        ctl::Status {
            pid: self.pid,
            uptime_secs: self.now.duration_since(self.started_at).as_secs_f64(),
            generation: self.serving.unwrap_or(0),
            lib: self.s.lib.clone(),
            library: serving.map(|b| b.source.clone()),
            sha256: serving.map(|b| b.sha256.clone()),
            listening: Vec::new(),
            rolling: matches!(
                self.roll,
                RollPhase::Snapshotting { .. } | RollPhase::Starting { .. }
            ) || self.follow_up.is_some(),
            settling: matches!(self.roll, RollPhase::Settling { .. }),
            stopping: self.stopping(),
            configured_workers: if self.serving.is_some() {
                self.serving_slots()
            } else {
                self.desired
            },
            workers,
        }
    }

    /// Checks the invariants that the state alone can show (the simulator checks the ones
    /// that need history). Returns the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut pids = BTreeSet::new();
        for w in &self.table.workers {
            if !pids.insert(w.pid) {
                return Err(format!("pid {} appears twice in the table", w.pid));
            }
            if w.slot >= self.table.slots.len() {
                return Err(format!(
                    "worker {} is in slot {} beyond the table",
                    w.pid, w.slot
                ));
            }
        }
        for p in &self.strays {
            if !pids.insert(*p) {
                return Err(format!("stray pid {p} is also in the table"));
            }
        }
        if let RollPhase::Starting {
            probe: Probe::Running { pid, .. },
            ..
        } = &self.roll
        {
            if !pids.insert(*pid) {
                return Err(format!("probe pid {pid} is also a worker or stray"));
            }
        }
        if let (Some(serving), Some(rolling)) = (self.serving, self.roll.generation()) {
            if matches!(self.roll, RollPhase::Starting { .. }) && serving >= rolling {
                return Err(format!(
                    "serving generation {serving} is not older than rolling {rolling}"
                ));
            }
        }
        if let RollPhase::Settling {
            generation,
            previous,
            ..
        } = self.roll
        {
            if self.serving != Some(generation) || previous >= generation {
                return Err(format!(
                    "settling {generation} (previous {previous}) but serving {:?}",
                    self.serving
                ));
            }
        }
        if let Some(serving) = self.serving {
            if !self.generations.contains_key(&serving) {
                return Err(format!("serving generation {serving} has no snapshot"));
            }
        }
        if matches!(self.run, Run::Serving) {
            if self.serving.is_some() && self.roll == RollPhase::Idle {
                let size = self.serving_slots();
                for slot in 0..size {
                    let s = self.table.slots[slot];
                    let covered = self.serving.is_some_and(|g| self.occupied(g, slot))
                        || matches!(s.state, SlotState::Backoff { .. });
                    if !covered {
                        return Err(format!(
                            "slot {slot} has no serving worker and no respawn scheduled"
                        ));
                    }
                }
            }
        } else if self.follow_up.is_some() || self.roll != RollPhase::Idle {
            return Err("a roll is under way or pending during a stop".into());
        }
        Ok(())
    }

    /// The live workers of the serving generation, for tests.
    #[cfg(test)]
    pub fn serving_ready(&self) -> usize {
        self.serving.map_or(0, |g| {
            (0..self.table.slots.len())
                .filter(|&slot| self.table.has(g, slot, true))
                .count()
        })
    }

    #[cfg(test)]
    pub fn desired(&self) -> usize {
        self.desired
    }
}
