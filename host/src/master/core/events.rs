//! What goes into the core and what comes out of it.

use std::path::PathBuf;
use std::time::Duration;

use super::{ClientId, ExitStatus, FirstGenerationError, Pid, Settings};
use crate::ctl;
use crate::metrics::RollResult;
use crate::notify::Notice;
use crate::snapshot::SnapshotError;

/// Something that happened, as the shell (or the simulator) saw it.
#[derive(Debug)]
pub enum Event {
    /// The master is up: start the first generation.
    Start,
    /// SIGHUP (`client` None) or `angel-host reload`: re-read settings (None: no config
    /// file; an error: the file is broken and the running settings stay), then roll.
    Reload {
        client: Option<ClientId>,
        config: Option<Result<Reread, String>>,
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
    /// The content hash of a snapshot taken without one.
    Hashed {
        generation: u64,
        result: Result<String, String>,
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
    /// `USR2` (`client` None) or `angel-host upgrade`: replace this master by a new one
    /// started from the binary at the master's original path.
    Upgrade { client: Option<ClientId> },
    /// The answer to [`Action::CheckBinary`] and [`Action::SpawnSuccessor`].
    UpgradeSpawned {
        step: UpgradeStep,
        result: Result<Pid, String>,
    },
    /// The binary check ended: the version it printed, or why it is not a working
    /// angel-host.
    BinaryChecked {
        pid: Pid,
        result: Result<String, String>,
    },
    /// The new master spoke on its status pipe.
    Successor { pid: Pid, msg: SuccessorMsg },
    /// Time passed: deadlines are checked.
    Tick,
}

/// A re-read config file, merged under the flags.
#[derive(Debug)]
pub struct Reread {
    pub settings: Box<Settings>,
    /// Restart-only settings that changed in the file: reported, not applied.
    pub restart_needed: Vec<&'static str>,
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
    /// The probe checked the library and stays as the generation's zygote: the
    /// generation's workers are forked from it.
    Forkable,
}

/// Which process of an upgrade was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeStep {
    Check,
    Successor,
}

/// What a new master tells the old one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuccessorMsg {
    /// Its first generation serves (this one): the old master drains and exits.
    Serving { generation: u64 },
    /// Why it is about to exit.
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
    /// Hex SHA-256 of the content; `None` until `Hashed` (a snapshot copied without hashing,
    /// hashed while its probe starts).
    pub sha256: Option<String>,
}

impl Build {
    pub fn short_sha(&self) -> &str {
        match &self.sha256 {
            Some(sha) => sha.get(..8).unwrap_or(sha),
            None => "pending",
        }
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
    /// A worker: the generation's zygote to fork it from, if it has one (else by exec).
    /// The probe: whether it may stay as the zygote.
    pub zygote: Option<Pid>,
    pub offer_zygote: bool,
    /// The probe: the spare to hand the snapshot to, if there is one (else by exec). The
    /// answer names the process that became the probe; a spare not used is killed.
    pub spare: Option<Pid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Loads and checks the snapshot, calls nothing, and exits or, when it may, stays as the
    /// generation's zygote.
    Probe,
    /// Serves slot `slot`'s socket.
    Worker { slot: usize },
    /// Exec'd ahead of the next roll and waiting for its snapshot: that roll's probe then
    /// costs no process start (`generation` 0 until then).
    Spare,
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
    /// How long what the line reports took (a roll's `serving`/`reloaded`), for machines.
    pub took_ms: Option<f64>,
}

#[derive(Debug, Clone)]
pub enum Reply {
    Status(ctl::Status),
    Outcome(ctl::ReloadOutcome),
}

/// What the metrics count, as it happens (gauges are read from the state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    RollEnded {
        result: RollResult,
        took: Duration,
    },
    /// `reason`: `drained` (told to drain, or retired), `killed`, `crashed`.
    WorkerExited {
        pid: Pid,
        reason: &'static str,
    },
    /// A slot is refilled after an unexpected death.
    WorkerRestarted,
}

/// Something for the shell to do.
#[derive(Debug)]
pub enum Action {
    /// Copy the library into a new snapshot for `generation`; answer with `Snapshotted`.
    /// With `hash`, hash it while copying; else `Hashed` follows once the rest of the batch
    /// (the probe's spawn) is done.
    Snapshot {
        generation: u64,
        hash: bool,
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
    /// A stop of a master that does not own its sockets (it handed them to a new master, or
    /// has not taken them over yet): drop our copies, leave the sockets as they are.
    ReleaseListeners,
    /// Run the upgrade's binary with `--version`; answer with `UpgradeSpawned`, then
    /// `BinaryChecked`.
    CheckBinary,
    /// Start the new master with our sockets; it numbers its generations after
    /// `generation` and starts `workers` workers. Answer with `UpgradeSpawned`.
    SpawnSuccessor {
        generation: u64,
        workers: usize,
    },
    /// This master (a new one) serves its first generation: take over from `from` (pidfile,
    /// `MAINPID=`, tell it on the status pipe).
    TakeOver {
        from: Pid,
        generation: u64,
    },
    /// Re-resolve the watched directories (a `current -> releases/N` switch).
    WatchUpdate,
    /// Answer a control client; `hold`: keep the connection open until the master exits.
    Reply {
        client: ClientId,
        reply: Reply,
        hold: bool,
    },
    Log(Log),
    /// Tell the service manager (`sd_notify`), if there is one.
    Notify(Notice),
    /// Something the metrics count.
    Observe(Observation),
    /// The master is done: exit 0, or with this error.
    Exit(Option<FirstGenerationError>),
}
