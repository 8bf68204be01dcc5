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
//!   beside it for [`READY_SETTLE`] and until the new snapshot's hash is known) → `Idle`. Any failure returns to `Idle` with the previous
//!   generation serving. The probe belongs to the roll ([`Probe`]), not to the worker table.
//! - **Workers** ([`WorkerState`]): `Starting` → `Ready` → (`Retiring` →) `Draining` →
//!   (reaped), or `Killed` from any of them. A retiring worker keeps its slot served until
//!   its replacement is ready, then drains. **Slots** ([`SlotState`]): `Active`, `Backoff` (crash loop),
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
//! 5. A retiring worker of the rolling generation is replaced in that generation, and every
//!    retiring worker is told to drain once its replacement is ready.
//! 6. No pid appears twice (table, probe, strays).
//! 7. A stop always ends in `Exit`.
//! 8. Only the serving, the rolling and (while settling) the previous generation have live
//!    workers outside removed slots, once the slot has a ready serving worker.
//! 9. A generation commits only once its content hash is known (it may serve unnamed only
//!    while it settles), and says `reloaded`, with its hash, exactly once before it commits
//!    (the simulator counts the lines).

use std::collections::{BTreeMap, BTreeSet};

use std::time::{Duration, Instant};

use crate::ctl;
use crate::settings::Settings;
use crate::snapshot::SnapshotError;

mod check;
mod error;
mod events;
mod helpers;
mod lifecycle;
mod roll;
mod slots;
mod state;
mod table;
mod upgrade;
mod watch;

pub use error::{ExitStatus, FirstGenerationError, RollError};
pub use events::*;
pub use state::*;
pub use table::{Slot, SlotState, Worker, WorkerState, WorkerTable};
pub use upgrade::{CHECK_TIMEOUT, START_MARGIN};

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

/// Spares in a row that may die unused before the master stops starting them.
pub const MAX_SPARE_DEATHS: u32 = 3;

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
    /// The generation of that build, for a hash that comes after its roll failed.
    rejected_generation: Option<u64>,
    pub(super) debounce: Debounce,
    next_generation: u64,
    pub(super) run: Run,
    /// Spawns asked for and not answered yet.
    pub(super) forking: Vec<Spawn>,
    /// Killed processes outside the table (an abandoned probe, a retired zygote), still to
    /// be reaped.
    pub(super) strays: BTreeSet<Pid>,
    /// Each generation's zygote (its probe, kept), which forks its workers. Only the
    /// generations [`Core::live_generations`] names keep theirs.
    pub(super) zygotes: BTreeMap<u64, Pid>,
    /// A process started ahead of the next roll, to be its probe ([`Role::Spare`]).
    pub(super) spare: Option<Pid>,
    /// Spares in a row that died before a roll used them; at [`MAX_SPARE_DEATHS`] no more
    /// are started (the next probes are exec'd when their roll starts, as without spares).
    spare_deaths: u32,
    /// `reload` clients, each waiting for the outcome of a roll of at least this generation.
    reload_waiters: Vec<(ClientId, u64)>,
    listeners_closed: bool,
    /// This master owns the listening sockets and speaks for the service to the service
    /// manager: false while a new master has not taken over from us yet, and once we
    /// handed over to one.
    pub(super) in_charge: bool,
    /// The master we are taking over from, until our first generation serves.
    pub(super) predecessor: Option<Pid>,
    pub(super) upgrade: Upgrade,
    /// `upgrade` clients, answered when the upgrade ends.
    upgrade_waiters: Vec<ClientId>,
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
            rejected_generation: None,
            debounce: Debounce::Quiet,
            next_generation: 1,
            run: Run::Serving,
            forking: Vec::new(),
            strays: BTreeSet::new(),
            zygotes: BTreeMap::new(),
            spare: None,
            spare_deaths: 0,
            reload_waiters: Vec::new(),
            listeners_closed: false,
            in_charge: true,
            predecessor: None,
            upgrade: Upgrade::Idle,
            upgrade_waiters: Vec::new(),
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
            Event::Hashed { generation, result } => self.on_hashed(generation, result),
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
            Event::Upgrade { client } => self.on_upgrade(client),
            Event::UpgradeSpawned { step, result } => self.on_upgrade_spawned(step, result),
            Event::BinaryChecked { pid, result } => self.on_binary_checked(pid, result),
            Event::Successor { pid, msg } => self.on_successor(pid, msg),
            Event::Tick => self.on_tick(),
        }
        self.reconcile();
        std::mem::take(&mut self.out)
    }

    /// The generation serving, if any.
    pub fn serving_generation(&self) -> Option<u64> {
        self.serving
    }

    /// The number the next roll's generation will have (unless an upgrade renumbers them).
    pub fn next_generation(&self) -> u64 {
        self.next_generation
    }

    /// Every worker process.
    pub fn workers(&self) -> &[Worker] {
        &self.table.workers
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
            took_ms: None,
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
            took_ms: None,
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
        self.retire_zygotes();
        self.keep_spare();
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
            generation,
            size,
            ref probe,
            ..
        } = self.roll
        {
            // With zygotes, a generation's workers wait for its probe: forked from it, they
            // start with the library loaded; without, they start beside it.
            if self.s.zygote && *probe != Probe::Passed {
                return;
            }
            for slot in 0..size.min(self.table.slots.len()) {
                if !self.occupied(generation, slot) {
                    self.spawn(generation, Role::Worker { slot });
                }
            }
        }
    }

    fn forget_idle_generations(&mut self) {
        let keep = self.live_generations();
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
            max_requests: match role {
                Role::Probe | Role::Spare => 0,
                Role::Worker { .. } => self.request_limit(),
            },
            graceful_timeout: self.s.graceful_timeout,
            zygote: match role {
                Role::Probe | Role::Spare => None,
                Role::Worker { .. } => self.zygotes.get(&generation).copied(),
            },
            offer_zygote: matches!(role, Role::Probe | Role::Spare) && self.s.zygote,
            spare: match role {
                Role::Probe => self.spare.take(),
                Role::Spare | Role::Worker { .. } => None,
            },
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
}
