//! How a roll, or the first generation, failed; and how a child ended.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

use super::Pid;
use crate::snapshot::SnapshotError;

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal { signal: Signal, core: bool },
}

impl ExitStatus {
    /// The pid and status of a reaped child (None for stop/continue reports).
    pub fn from_wait(status: WaitStatus) -> Option<(Pid, ExitStatus)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid.as_raw(), ExitStatus::Code(code))),
            WaitStatus::Signaled(pid, signal, core) => {
                Some((pid.as_raw(), ExitStatus::Signal { signal, core }))
            }
            _ => None,
        }
    }

    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }

    /// The worker exit codes that mean "this file is not a loadable angel app of our ABI".
    pub fn is_load_failure(&self) -> bool {
        match self {
            ExitStatus::Code(code) => [
                angel::abi::EXIT_LOAD_FAILED,
                angel::abi::EXIT_NOT_AN_APP,
                angel::abi::EXIT_ABI_MISMATCH,
            ]
            .contains(code),
            ExitStatus::Signal { .. } => false,
        }
    }

    /// Killed from outside (an operator, the OOM killer): says nothing about the build.
    pub fn killed_from_outside(&self) -> bool {
        matches!(
            self,
            ExitStatus::Signal {
                signal: Signal::SIGKILL | Signal::SIGTERM,
                ..
            }
        )
    }
}

impl fmt::Display for ExitStatus {
    /// "exited with status 70", "was killed by SIGABRT (core dumped)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exited with status {code}"),
            ExitStatus::Signal { signal, core } => write!(
                f,
                "was killed by {}{}",
                signal.as_str(),
                if *core { " (core dumped)" } else { "" }
            ),
        }
    }
}

/// Why a roll did not commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollError {
    /// The probe refused the build (with the reason it sent, if any).
    Probe {
        pid: Pid,
        status: ExitStatus,
        reason: Option<String>,
    },
    /// The probe was killed from outside before its verdict: the build was not proven bad.
    ProbeKilled { pid: Pid, status: ExitStatus },
    /// A new worker could not load the snapshot.
    Load { pid: Pid, reason: String },
    /// A new worker died before the roll committed.
    Died {
        pid: Pid,
        status: ExitStatus,
        when: &'static str,
        reason: Option<String>,
    },
    NotReady {
        timeout: Duration,
        pending: Vec<Pid>,
    },
    /// fork/exec failed.
    Spawn { error: String },
    /// The snapshot's content could not be hashed.
    Hash { error: String },
    /// The snapshot's hash did not arrive within `--ready-timeout` of the trigger.
    Unhashed { timeout: Duration },
}

impl RollError {
    /// The build itself was refused (`reload skipped`, exit code 3 at start), as opposed to a
    /// generation that loaded but did not come up (`reload failed`, exit code 6).
    pub fn is_invalid_build(&self) -> bool {
        matches!(self, RollError::Probe { .. } | RollError::Load { .. })
    }
}

impl fmt::Display for RollError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RollError::Probe {
                reason: Some(reason),
                ..
            }
            | RollError::Load { reason, .. }
            | RollError::Died {
                reason: Some(reason),
                ..
            } => f.write_str(reason),
            RollError::Probe { pid, status, .. } => write!(f, "probe {pid} {status}"),
            RollError::ProbeKilled { pid, status } => write!(
                f,
                "probe {pid} {status} before it finished (the build was not proven bad)"
            ),
            RollError::Died {
                pid, status, when, ..
            } => write!(f, "worker {pid} {status} {when}"),
            RollError::NotReady { timeout, pending } => {
                let pending: Vec<String> = pending.iter().map(Pid::to_string).collect();
                write!(
                    f,
                    "not ready within --ready-timeout {timeout:?} (workers {})",
                    pending.join(", ")
                )
            }
            RollError::Spawn { error } => write!(f, "cannot spawn a worker: {error}"),
            RollError::Hash { error } => write!(f, "cannot hash the snapshot: {error}"),
            RollError::Unhashed { timeout } => write!(
                f,
                "the snapshot's content hash did not arrive within --ready-timeout {timeout:?}"
            ),
        }
    }
}

impl std::error::Error for RollError {}

/// The first generation never served: the master exits with this.
#[derive(Debug, thiserror::Error)]
pub enum FirstGenerationError {
    #[error(transparent)]
    Snapshot(SnapshotError),
    #[error("{}", source_path.display())]
    Invalid {
        source_path: PathBuf,
        #[source]
        error: RollError,
    },
    #[error("{}: first generation failed to start", source_path.display())]
    NotReady {
        source_path: PathBuf,
        #[source]
        error: RollError,
    },
}

impl FirstGenerationError {
    pub fn new(source_path: PathBuf, error: RollError) -> Self {
        if error.is_invalid_build() {
            FirstGenerationError::Invalid { source_path, error }
        } else {
            FirstGenerationError::NotReady { source_path, error }
        }
    }

    /// The documented exit codes: 3 library invalid, 6 not ready, 1 snapshot location.
    pub fn exit_code(&self) -> u8 {
        match self {
            FirstGenerationError::Snapshot(SnapshotError::Dir { .. }) => 1,
            FirstGenerationError::Snapshot(_) | FirstGenerationError::Invalid { .. } => 3,
            FirstGenerationError::NotReady { .. } => 6,
        }
    }
}
