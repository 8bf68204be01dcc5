//! The core's states, each with the data that exists only in it.

use std::time::{Duration, Instant};

use super::{FirstGenerationError, Pid, RollError, StopMode};

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
        /// Trigger → every new worker ready, for the `reloaded ...` line.
        ready_after: Duration,
        /// The roll fails if the snapshot's hash has not arrived by then (the hash of a
        /// `HUP`'s snapshot may still be under way when its workers are ready; the roll
        /// says it rolled once the content is named, and commits only then).
        deadline: Instant,
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

    /// When the roll was asked for.
    pub fn started(&self) -> Option<Instant> {
        match self {
            RollPhase::Idle => None,
            RollPhase::Snapshotting { started, .. }
            | RollPhase::Starting { started, .. }
            | RollPhase::Settling { started, .. } => Some(*started),
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

/// A self-upgrade of the master (`USR2`, `angel-host upgrade`), as the old master sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    Idle,
    /// The new binary runs `--version`, before it gets any socket: a corrupt or foreign file
    /// is refused here. `pid` comes with [`super::Event::UpgradeSpawned`].
    Checking {
        pid: Option<Pid>,
        started: Instant,
        deadline: Instant,
    },
    /// The new master runs with our listening sockets and starts its first generation; we
    /// keep serving until it says it serves.
    Starting {
        pid: Option<Pid>,
        started: Instant,
        deadline: Instant,
        /// What the new master said before failing.
        reason: Option<String>,
    },
    /// The new master serves: we drain and exit.
    HandedOver {
        to: Pid,
    },
}

impl Upgrade {
    /// The process the upgrade runs (checker or new master), once it has one.
    pub fn pid(&self) -> Option<Pid> {
        match self {
            Upgrade::Checking { pid, .. } | Upgrade::Starting { pid, .. } => *pid,
            Upgrade::Idle | Upgrade::HandedOver { .. } => None,
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Upgrade::Checking { deadline, .. } | Upgrade::Starting { deadline, .. } => {
                Some(*deadline)
            }
            Upgrade::Idle | Upgrade::HandedOver { .. } => None,
        }
    }

    /// Checking or starting: a HUP, a resize or another upgrade now is refused.
    pub fn in_progress(&self) -> bool {
        matches!(self, Upgrade::Checking { .. } | Upgrade::Starting { .. })
    }
}
