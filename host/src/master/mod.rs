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
mod hasher;
mod shell;
#[cfg(test)]
mod sim;
pub mod upgrade;

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
    #[error(transparent)]
    Upgrade(#[from] upgrade::UpgradeEnvError),
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
            | MasterError::Metrics(_)
            | MasterError::Upgrade(_) => 4,
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
    let mut settings = Settings::from_cli(cli);
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
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
    // Started by an old master in a self-upgrade: its sockets come as LISTEN_FDS.
    let predecessor = upgrade::Predecessor::from_env()?;
    let mut inherited = crate::activation::from_env()?;
    crate::activation::unset_env();
    let handed_metrics = predecessor.and_then(|_| {
        let at = inherited
            .iter()
            .position(|i| i.name.as_deref() == Some(upgrade::METRICS_NAME))?;
        Some(std::net::TcpListener::from(inherited.remove(at).fd))
    });
    if let Some(p) = &predecessor {
        // The worker count carries over (TTIN/TTOU included); the rest is re-read.
        settings.workers = p.workers;
        tracing::info!(
            event = "taking_over",
            "taking over from master[{}] (generation {}, {} workers)",
            p.pid,
            p.generation,
            p.workers
        );
    }
    if !become_subreaper() {
        settings.zygote = false;
    }
    match pidfile::inspect(&settings.pidfile)? {
        // The master we take over from: the pidfile is ours once we serve.
        Existing::Live(other) if predecessor.is_some_and(|p| p.pid == other) => {}
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
    let mut owned_unix = false;
    let listeners = if predecessor.is_some() {
        let (listeners, owned) =
            Listeners::from_handover(inherited).map_err(upgrade::UpgradeEnvError::from)?;
        owned_unix = owned;
        warn_listen_changed(
            &listeners,
            owned,
            &settings,
            predecessor.map_or(0, |p| p.pid),
        );
        listeners
    } else if inherited.is_empty() {
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
    let binary = original_binary();
    let metrics = match settings.metrics {
        Some(addr) => {
            let metrics = Metrics::new();
            let server = match handed_metrics {
                Some(listener) => metrics.serve_on(listener)?,
                None => metrics.serve(addr)?,
            };
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
    let pidfile = match predecessor {
        Some(_) => None,
        None => {
            let pidfile = Pidfile::write(&settings.pidfile, pid)?;
            tracing::info!(
                event = "pidfile_created",
                "created pid_file: {}",
                pidfile.path().display()
            );
            Some(pidfile)
        }
    };
    let pidfile_path = settings.pidfile.clone();
    let seed = {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is randomly keyed per process: a seed without an RNG dependency.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_i32(pid.as_raw());
        h.finish()
    };
    let mut core = core::Core::new(settings.clone(), pid.as_raw(), Instant::now(), seed);
    if let Some(p) = &predecessor {
        core.succeed(p.pid, p.generation);
    }
    let (metrics, metrics_server) = metrics.unzip();
    let metrics_listener = metrics_server
        .as_ref()
        .and_then(|s| s.listener().try_clone_to_owned().ok());
    let mut shell = shell::Shell::new(shell::Parts {
        core,
        settings,
        // Workers run the master's own binary, whatever has replaced the file since.
        exe: std::path::PathBuf::from("/proc/self/exe"),
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
        binary,
        argv: std::env::args_os().skip(1).collect(),
        started_unix,
        metrics_listener,
        pidfile,
        pidfile_path,
        owned_unix,
        hasher: hasher::Hasher::new().map_err(|source| MasterError::Io {
            what: "eventfd",
            source,
        })?,
    });
    let result = shell.run();
    // Removed only while it names us: after an upgrade it names the new master.
    if let Some(pidfile) = shell.pidfile.take() {
        if pidfile.remove() {
            tracing::info!(
                event = "pidfile_removed",
                "removed pid_file: {}",
                pidfile.path().display()
            );
        }
    }
    shell.listeners.cleanup();
    drop(metrics_server);
    result.map(|()| {
        tracing::info!(event = "stopped", "stopped");
        ExitCode::SUCCESS
    })
}

/// The angel-host binary as the master was started: `argv[0]` made absolute against the
/// start directory, or found on `PATH` — not `/proc/self/exe`, which names the inode that is
/// running (an upgrade must run what is at the path now, and a symlink switched to a new
/// release must be followed anew).
fn original_binary() -> std::path::PathBuf {
    use std::path::{Path, PathBuf};
    let arg0 = std::env::args_os().next().map(PathBuf::from);
    let found = arg0.and_then(|a| {
        if a.as_os_str().as_encoded_bytes().contains(&b'/') {
            std::path::absolute(&a).ok()
        } else {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join(&a))
                    .find(|p| p.is_file())
                    .and_then(|p| std::path::absolute(p).ok())
            })
        }
    });
    found
        .or_else(|| std::fs::read_link("/proc/self/exe").ok())
        .unwrap_or_else(|| Path::new("angel-host").to_path_buf())
}

/// An upgrade keeps the listeners it takes over, whatever the re-read settings ask for: says
/// so when they ask for other addresses (a changed listen address takes a restart).
fn warn_listen_changed(listeners: &Listeners, unix_owned: bool, settings: &Settings, pid: i32) {
    let (missing, unwanted) = listeners.differences(&settings.listen.addrs(), unix_owned);
    if missing.is_empty() && unwanted.is_empty() {
        return;
    }
    let mut asks = Vec::new();
    if !missing.is_empty() {
        asks.push(format!("ask for {}", missing.join(", ")));
    }
    if !unwanted.is_empty() {
        asks.push(format!("no longer ask for {}", unwanted.join(", ")));
    }
    tracing::warn!(
        event = "listen_kept",
        "keeping the listeners taken over from master[{pid}] ({}); the settings now {}: a changed listen address takes a restart, not an upgrade",
        listeners.describe().join(", "),
        asks.join(" and ")
    );
}

/// Makes the master the reaper of every process its workers leave behind (an app that forks
/// and abandons a child): orphans are re-parented to it instead of to init, and its
/// `waitpid(-1)` loop reaps them. As a container's PID 1 it is their reaper anyway. It is
/// also how a worker forked by a zygote becomes the master's child (`worker/zygote.rs`):
/// false means workers must be exec'd.
fn become_subreaper() -> bool {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument and changes only this
    // process's own attribute; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(
            event = "subreaper_failed",
            "cannot become a child subreaper ({}); orphans of workers go to init, and workers start by exec",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}
