//! The drain of an app that does not report it (a C app, one built with an SDK before ABI
//! 1.2): its drain fd is a pipe, which two threads of the host write to: one reads the
//! control channel, one waits for `SIGTERM`.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use nix::fcntl::OFlag;

use super::{host_error, Drain};
use crate::control::{self, Msg, Recv};

/// The drain of an app that does not report it: a pipe as its drain fd, written by a thread
/// that reads the control channel and one that waits for `SIGTERM`.
pub(super) fn drain_threads(
    control: &OwnedFd,
    listeners: Vec<RawFd>,
    null: Option<OwnedFd>,
) -> Result<(RawFd, Arc<Drain>), i32> {
    let (drain_read, drain_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(host_error("cannot create the drain pipe"))?;
    let drain = Arc::new(Drain {
        fired: AtomicBool::new(false),
        listeners,
        null,
        pipe: Some(drain_write),
    });
    // The handler only writes to signal-hook's own self-pipe (async-signal-safe); a thread
    // reads it and starts the drain. Registered before the app runs, so from its first
    // request on a TERM drains it.
    let term = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM])
        .map_err(host_error("cannot handle SIGTERM"))?;
    let on_term = Arc::clone(&drain);
    std::thread::Builder::new()
        .name("angel-sigterm".into())
        .spawn(move || drain_on_term(term, &on_term))
        .map_err(host_error("cannot start the signal thread"))?;
    let reader = control
        .try_clone()
        .map_err(host_error("cannot clone the control channel"))?;
    let on_control = Arc::clone(&drain);
    std::thread::Builder::new()
        .name("angel-control".into())
        .spawn(move || watch_master(reader, &on_control))
        .map_err(host_error("cannot start the control thread"))?;
    // The read end must outlive the app: it is the context's drain fd.
    let fd = drain_read.as_raw_fd();
    std::mem::forget(drain_read);
    Ok((fd, drain))
}

/// The control thread: the master's `drain`, or its disappearance, drains the app.
fn watch_master(control: OwnedFd, drain: &Drain) {
    loop {
        match control::recv_msg(&control) {
            Ok(Recv::Msg(Msg::Drain)) => drain.fire(|| tracing::info!(event = "closes", "closes")),
            Ok(Recv::Msg(_)) | Ok(Recv::Empty) => {}
            Ok(Recv::Eof) | Err(_) => {
                drain.fire(|| tracing::warn!(event = "orphaned", "master is gone; draining"));
                return;
            }
        }
    }
}

/// The signal thread: `SIGTERM` drains the app like the master's `drain` (later ones change
/// nothing: only the master decides to kill).
fn drain_on_term(mut signals: signal_hook::iterator::Signals, drain: &Drain) {
    for _ in signals.forever() {
        drain.fire(|| tracing::info!(event = "closes", "closes (SIGTERM)"));
    }
}
