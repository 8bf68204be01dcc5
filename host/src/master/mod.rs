//! The master: owns listeners, pidfile, snapshots and the worker table, and runs the roll and
//! drain protocols. It never loads app code.
//!
//! It is split in two, so that its logic can be proven and not only tried:
//! - [`core`]: a pure state machine — events in, actions out, no fd, process or clock —
//!   whose module doc lists its states, events, actions and invariants;
//! - [`shell`]: the single-threaded `poll` loop that turns signals, control channels, reaped
//!   children, control clients ([`clients`]) and file changes into events, and carries the
//!   actions out;
//! - `sim` (tests only): a seeded simulator that drives the core through random
//!   interleavings of every event with fake pids and a fake clock, checking the invariants
//!   after every step.

use std::process::ExitCode;
use std::time::Instant;

use crate::cli::Cli;
use crate::config::ConfigSource;
use crate::ctl;
use crate::listener::{BindError, Listeners};
use crate::metrics::Metrics;
use crate::notify::{Notifier, Watchdog};
use crate::pidfile::{self, Existing, Pidfile, PidfileError};
use crate::settings::Settings;
use crate::signals::Signals;
use crate::snapshot::{SnapshotDir, SnapshotError};
use crate::watch::{Watch, WatchError};

mod check;
mod clients;
pub mod core;
mod effects;
mod shell;
#[cfg(test)]
mod sim;

pub use check::{check, CheckError};

/// Everything that ends the master with a non-zero exit code.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Pidfile(#[from] PidfileError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("--watch")]
    Watch(#[from] WatchError),
    #[error(transparent)]
    FirstGeneration(#[from] core::FirstGenerationError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Activation(#[from] crate::activation::ActivationError),
    #[error(transparent)]
    Inherit(#[from] crate::listener::InheritError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Privileges(#[from] crate::privdrop::PrivError),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl MasterError {
    /// The documented exit codes (README, `--help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            MasterError::Bind(_)
            | MasterError::Activation(_)
            | MasterError::Inherit(_)
            | MasterError::Metrics(_) => 4,
            MasterError::Pidfile(_) => 5,
            MasterError::Snapshot(SnapshotError::Dir { .. }) => 1,
            MasterError::Snapshot(_) | MasterError::Check(_) => 3,
            MasterError::FirstGeneration(e) => e.exit_code(),
            MasterError::Privileges(_) => 2,
            MasterError::Watch(_) | MasterError::Io { .. } => 1,
        }
    }
}

/// `angel-host --lib ...`: checks the pidfile, binds, writes the pidfile, serves until stopped.
pub fn run(cli: &Cli, source: ConfigSource) -> Result<ExitCode, MasterError> {
    let settings = Settings::from_cli(cli);
    let pid = nix::unistd::getpid();
    let credentials = settings
        .user
        .as_deref()
        .map(|user| crate::privdrop::resolve(user, settings.group.as_deref()))
        .transpose()?;
    if let Some(c) = &credentials {
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            return Err(crate::privdrop::PrivError::NotRoot {
                user: c.user.clone(),
                euid: euid.as_raw(),
            }
            .into());
        }
    }
    // What systemd (or another manager) hands over lives in the environment: take it, then
    // remove it, before any thread starts, so no worker inherits it.
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(
            event = "notify_failed",
            "{e}; not notifying the service manager"
        );
        None
    });
    let watchdog = Watchdog::from_env().unwrap_or_else(|e| {
        tracing::warn!(event = "notify_failed", "{e}; no watchdog pings");
        None
    });
    crate::notify::unset_env();
    let inherited = crate::activation::from_env()?;
    crate::activation::unset_env();
    become_subreaper();
    match pidfile::inspect(&settings.pidfile)? {
        Existing::Live(other) => {
            return Err(PidfileError::LiveMaster {
                path: std::path::absolute(&settings.pidfile)
                    .unwrap_or_else(|_| settings.pidfile.clone()),
                pid: other,
            }
            .into())
        }
        Existing::Stale(old) => tracing::info!(
            event = "pidfile_stale",
            "replacing stale pid_file: {} (pid {})",
            settings.pidfile.display(),
            old.map_or_else(|| "unreadable".to_string(), |p| p.to_string())
        ),
        Existing::None => {}
    }
    let listeners = if inherited.is_empty() {
        Listeners::bind(&settings.listen.addrs(), settings.workers)?
    } else {
        let names: Vec<String> = inherited
            .iter()
            .map(|i| match &i.name {
                Some(name) => format!("{} ({name})", i.addr.describe()),
                None => i.addr.describe(),
            })
            .collect();
        tracing::info!(
            event = "socket_activation",
            "taking {} listening socket(s) from the service manager (LISTEN_FDS): {}",
            inherited.len(),
            names.join(", ")
        );
        Listeners::from_inherited(inherited, settings.workers)?
    };
    for addr in listeners.describe() {
        tracing::info!(event = "listening", "listening on {addr}");
    }
    let signals = Signals::install().map_err(|source| MasterError::Io {
        what: "installing signal handlers",
        source,
    })?;
    let snapshots = SnapshotDir::create(settings.snapshot_dir.as_deref())?;
    let exe = std::fs::read_link("/proc/self/exe").map_err(|source| MasterError::Io {
        what: "finding /proc/self/exe",
        source,
    })?;
    let metrics = match settings.metrics {
        Some(addr) => {
            let metrics = Metrics::new();
            let server = metrics.serve(addr)?;
            tracing::info!(
                event = "metrics",
                "serving metrics on http://{}/metrics",
                server.local_addr()
            );
            Some((metrics, server))
        }
        None => None,
    };
    let watch = settings
        .watch
        .then(|| Watch::start(&settings.lib))
        .transpose()?;
    let server = match ctl::Server::bind(pid.as_raw()) {
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
    let pidfile = Pidfile::write(&settings.pidfile, pid)?;
    tracing::info!(
        event = "pidfile_created",
        "created pid_file: {}",
        pidfile.path().display()
    );
    let seed = {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is randomly keyed per process: a seed without an RNG dependency.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_i32(pid.as_raw());
        h.finish()
    };
    let core = core::Core::new(settings.clone(), pid.as_raw(), Instant::now(), seed);
    let (metrics, metrics_server) = metrics.unzip();
    let mut shell = shell::Shell::new(shell::Parts {
        core,
        settings,
        exe,
        listeners,
        snapshots,
        signals,
        watch,
        clients: clients::Clients::new(server),
        source,
        notifier,
        watchdog,
        metrics,
        credentials: credentials.map(|c| c.to_arg()),
        started_with: cli.clone(),
    });
    let result = shell.run();
    if pidfile.remove() {
        tracing::info!(
            event = "pidfile_removed",
            "removed pid_file: {}",
            pidfile.path().display()
        );
    }
    shell.listeners.cleanup();
    drop(metrics_server);
    result.map(|()| {
        tracing::info!(event = "stopped", "stopped");
        ExitCode::SUCCESS
    })
}

/// Makes the master the reaper of every process its workers leave behind (an app that forks
/// and abandons a child): orphans are re-parented to it instead of to init, and its
/// `waitpid(-1)` loop reaps them. As a container's PID 1 it is their reaper anyway.
fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument and changes only this
    // process's own attribute; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(
            event = "subreaper_failed",
            "cannot become a child subreaper ({}); orphans of workers go to init",
            std::io::Error::last_os_error()
        );
    }
}
