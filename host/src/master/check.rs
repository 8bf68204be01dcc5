//! `--check`: validate the flags and the library without binding anything.

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use super::core::ExitStatus;
use crate::cli::Cli;
use crate::control::{self, Msg, Recv};
use crate::settings::Settings;
use crate::snapshot::{SnapshotDir, SnapshotError};
use crate::spawn;
use crate::worker::WorkerArgs;

/// Why `--check` refused the configuration (exit code 3).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{}: {why}", library.display())]
    Refused { library: PathBuf, why: String },
    #[error("{}: loading did not finish within --ready-timeout {timeout:?}", library.display())]
    Timeout { library: PathBuf, timeout: Duration },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> CheckError {
    move |source| CheckError::Io { what, source }
}

/// `angel-host --check`: validates the flags and runs one probe on a snapshot of the library.
pub fn check(cli: &Cli) -> Result<String, CheckError> {
    let settings = Settings::from_cli(cli);
    let snapshots = SnapshotDir::create(settings.snapshot_dir.as_deref())?;
    let snapshot = snapshots.take(&settings.lib, 0)?;
    let exe = std::fs::read_link("/proc/self/exe").map_err(io("finding /proc/self/exe"))?;
    let (ours, theirs) = control::pair().map_err(io("creating a control channel"))?;
    let credentials = settings
        .user
        .as_deref()
        .map(|user| crate::privdrop::resolve(user, settings.group.as_deref()))
        .transpose()
        .map_err(|e| CheckError::Refused {
            library: snapshot.source.clone(),
            why: e.to_string(),
        })?;
    let args = WorkerArgs {
        snapshot_fd: snapshot.fd().as_raw_fd(),
        probe: true,
        control_fd: theirs.as_raw_fd(),
        credentials: credentials.map(|c| c.to_arg()),
        ..WorkerArgs::default()
    };
    let pid = spawn::spawn(&exe, &args).map_err(io("spawning the probe"))?;
    drop(theirs);
    let deadline = Instant::now() + settings.ready_timeout;
    let mut failure = None;
    let status = loop {
        while let Ok(Recv::Msg(msg)) = control::recv_msg(&ours) {
            if let Msg::Failed(why) = msg {
                failure = Some(why);
            }
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => break status,
            Err(e) => return Err(io("waiting for the probe")(e.into())),
        }
        if Instant::now() >= deadline {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(CheckError::Timeout {
                library: snapshot.source.clone(),
                timeout: settings.ready_timeout,
            });
        }
        let mut fds = [PollFd::new(ours.as_fd(), PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, PollTimeout::from(10u16));
    };
    while let Ok(Recv::Msg(msg)) = control::recv_msg(&ours) {
        if let Msg::Failed(why) = msg {
            failure = Some(why);
        }
    }
    let status = ExitStatus::from_wait(status);
    if !status.is_some_and(|(_, s)| s.success()) {
        let why = failure.unwrap_or_else(|| match status {
            Some((pid, s)) => format!("probe {pid} {s}"),
            None => "probe ended oddly".into(),
        });
        return Err(CheckError::Refused {
            library: snapshot.source.clone(),
            why,
        });
    }
    Ok(format!(
        "configuration ok: {} (sha {}, angel ABI {}, {} workers)",
        snapshot.source.display(),
        snapshot.short_sha(),
        angel::abi::ABI_VERSION,
        settings.workers
    ))
}
