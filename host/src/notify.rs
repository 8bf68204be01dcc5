//! `sd_notify`: telling the service manager (systemd, or anything speaking its protocol) how
//! the master is doing — ready, reloading, stopping — and feeding its watchdog.
//!
//! # The protocol
//!
//! The manager puts the address of a unix datagram socket in `NOTIFY_SOCKET`: a path
//! (`/run/systemd/notify`) or, with a leading `@`, a Linux abstract address. A notification is
//! **one datagram** of newline-separated `KEY=value` assignments, e.g.
//! `READY=1\nSTATUS=generation 4 serving`. There is no reply and no framing beyond the
//! datagram. The manager learns the sender's pid from the kernel (`SCM_CREDENTIALS`), which is
//! why `NotifyAccess=` matters when another process (a self-upgraded master) speaks.
//!
//! # Why no crate
//!
//! The whole protocol is "format a few lines, `sendto` one datagram": a few dozen lines with
//! std's `UnixDatagram` (abstract addresses through `SocketAddrExt`), no dependency. The
//! common crates send on a blocking socket (a manager whose queue is full would stall the
//! master's loop) or link the C libsystemd (`systemd`); owning it keeps the send
//! non-blocking, the notices typed as the actions the master's core emits, and the wire text
//! — `MONOTONIC_USEC` included, which `Type=notify-reload` requires — exact and tested.
//!
//! # Sending
//!
//! Every send is non-blocking (`MSG_DONTWAIT` semantics through a non-blocking socket): a
//! manager that does not read its queue makes a notification fail with
//! [`NotifyError::Send`] (`WouldBlock`), it never stalls the master's loop. We `sendto` the
//! address each time rather than `connect` once, as libsystemd does, so that a manager that
//! re-creates its socket (`systemctl daemon-reexec`) keeps receiving.
//!
//! # Children
//!
//! Workers must not inherit `NOTIFY_SOCKET`: with `NotifyAccess=all` a worker (or the app's
//! own code calling `sd_notify`) could declare the service ready or stopping. Two ways, pick
//! one when wiring:
//!
//! - the master reads [`Notifier::from_env`] and [`Watchdog::from_env`] at start, then calls
//!   [`unset_env`] while it is still single-threaded; a self-upgrade passes
//!   [`Notifier::successor_env`] to the new master explicitly. Nothing to change in the
//!   spawner;
//! - or the spawner builds each worker's environment without [`CHILD_ENV_REMOVE`] (an
//!   `execve` with a filtered `environ`, prepared before the fork).
//!
//! # Wiring (for the master)
//!
//! | when | call |
//! |---|---|
//! | start, before any thread | `Notifier::from_env()`, `Watchdog::from_env()`, then [`unset_env`]; an error is logged and the master runs without notifying |
//! | first generation ready | `Notice::Ready { status: Some("generation 1 serving, 4 workers") }` |
//! | a roll starts (HUP, reload, watch) | `Notice::Reloading { status: Some("rolling to generation N") }` |
//! | that roll ends, whatever the result | `Notice::Ready { status }`: `generation N serving`, or `reload failed: ...; keeping generation M` |
//! | TERM, QUIT, INT | `Notice::Stopping` at once; optionally `ExtendTimeout(graceful_timeout + 5 s)` |
//! | every `watchdog.ping_every`, from the loop's own timer | `Notice::Watchdog` (only from the loop: it proves the loop runs) |
//! | self-upgrade, in the new master once it serves | `Notice::MainPid(own pid)` then `Notice::Ready { .. }`; the old master passes `successor_env` |
//!
//! Every RELOADING=1 is followed by exactly one READY=1, even for a follow-up roll. Send with
//! [`Notifier::notify_or_log`]: an error is logged once, never acted on.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The environment variables of this protocol, to remove from every worker's environment.
pub const CHILD_ENV_REMOVE: &[&str] = &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Removes [`CHILD_ENV_REMOVE`] from this process's environment, so no child inherits them.
///
/// # Call it single-threaded
/// `unsetenv` races with other threads reading the environment: call it at the master's
/// start, after [`Notifier::from_env`] and [`Watchdog::from_env`], before any thread starts.
pub fn unset_env() {
    for k in CHILD_ENV_REMOVE {
        std::env::remove_var(k);
    }
}

/// Why a notification could not be set up or sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?}: only unix socket paths and @abstract names are supported")]
    Unsupported(String),
    #[error("NOTIFY_SOCKET={target}: {source}")]
    Address { target: String, source: io::Error },
    #[error("cannot create the sd_notify socket: {0}")]
    Socket(io::Error),
    #[error("sd_notify to {target}: {source}")]
    Send { target: String, source: io::Error },
    #[error("sd_notify to {target}: sent {sent} of {len} bytes")]
    Short {
        target: String,
        sent: usize,
        len: usize,
    },
    #[error("WATCHDOG_USEC={0:?} is not a positive number of microseconds")]
    BadWatchdog(String),
    #[error("cannot read CLOCK_MONOTONIC: {0}")]
    Clock(nix::Error),
}

/// One notification, as the master means it. [`Notice::to_wire`] gives the exact datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Start-up or a reload finished (successfully or not: with `Type=notify-reload` a reload
    /// ends with `READY=1` either way; say what happened in the status).
    Ready { status: Option<String> },
    /// A reload begins. Carries `MONOTONIC_USEC`, which `Type=notify-reload` requires.
    Reloading { status: Option<String> },
    /// A graceful stop begins.
    Stopping,
    /// Free-form status line shown by `systemctl status`.
    Status(String),
    /// Keep-alive for `WatchdogSec=`.
    Watchdog,
    /// Ask for more time for the current start, reload or stop.
    ExtendTimeout(Duration),
    /// The main process is now this pid (a self-upgraded master takes over).
    MainPid(i32),
}

impl Notice {
    /// The datagram text, with `MONOTONIC_USEC` read from the clock now.
    pub fn to_wire(&self) -> Result<String, NotifyError> {
        let now = match self {
            Notice::Reloading { .. } => monotonic_now()?,
            _ => Duration::ZERO,
        };
        Ok(self.to_wire_at(now))
    }

    /// The datagram text, with `monotonic` as `CLOCK_MONOTONIC` (for `Reloading`).
    pub fn to_wire_at(&self, monotonic: Duration) -> String {
        let with_status = |head: String, status: &Option<String>| match status {
            Some(s) => format!("{head}\nSTATUS={}", one_line(s)),
            None => head,
        };
        match self {
            Notice::Ready { status } => with_status("READY=1".into(), status),
            Notice::Reloading { status } => with_status(
                format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic.as_micros()),
                status,
            ),
            Notice::Stopping => "STOPPING=1".into(),
            Notice::Status(s) => format!("STATUS={}", one_line(s)),
            Notice::Watchdog => "WATCHDOG=1".into(),
            Notice::ExtendTimeout(d) => format!("EXTEND_TIMEOUT_USEC={}", d.as_micros()),
            Notice::MainPid(pid) => format!("MAINPID={pid}"),
        }
    }
}

/// A newline in a value would start another assignment: fold it.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn monotonic_now() -> Result<Duration, NotifyError> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_err(NotifyError::Clock)?;
    Ok(Duration::from(ts))
}

/// A sender to the service manager's notification socket (unconnected, CLOEXEC, non-blocking).
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for error messages.
    target: String,
    /// The last send failed (see [`Notifier::notify_or_log`]).
    failing: AtomicBool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`; `Ok(None)` when it is unset or empty (not run by a manager that
    /// wants notifications: the master then simply does not notify).
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(v) if !v.is_empty() => Notifier::new(&v).map(Some),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(v)) => {
                Err(NotifyError::Unsupported(v.to_string_lossy().into_owned()))
            }
        }
    }

    /// A notifier for `target`: an absolute or relative path, or `@name` for an abstract
    /// address.
    pub fn new(target: &str) -> Result<Notifier, NotifyError> {
        let addr_err = |source| NotifyError::Address {
            target: target.to_string(),
            source,
        };
        let addr = if let Some(name) = target.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(addr_err)?
        } else if target.starts_with('/') || !target.contains(':') {
            SocketAddr::from_pathname(target).map_err(addr_err)?
        } else {
            // systemd also knows `vsock:CID:PORT` (for VMs); we have no use for it.
            return Err(NotifyError::Unsupported(target.to_string()));
        };
        let sock = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        sock.set_nonblocking(true).map_err(NotifyError::Socket)?;
        Ok(Notifier {
            sock,
            addr,
            target: target.to_string(),
            failing: AtomicBool::new(false),
        })
    }

    /// [`Notifier::notify`] for the master's loop: a failure is logged once, not on every
    /// watchdog tick, and the first success after failures is logged too. Returns whether
    /// the notice was sent.
    pub fn notify_or_log(&self, notice: &Notice) -> bool {
        match self.notify(notice) {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        event = "notify_ok",
                        "sd_notify to {} works again",
                        self.target
                    );
                }
                true
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        event = "notify_failed",
                        "{e} (further failures are not logged until a notification gets through)"
                    );
                }
                false
            }
        }
    }

    /// Sends one notice. Never blocks; an error is for the caller to log, not to act on.
    pub fn notify(&self, notice: &Notice) -> Result<(), NotifyError> {
        self.send_raw(&notice.to_wire()?)
    }

    /// Sends `text` as one datagram (several assignments separated by `\n`).
    pub fn send_raw(&self, text: &str) -> Result<(), NotifyError> {
        let sent = self
            .sock
            .send_to_addr(text.as_bytes(), &self.addr)
            .map_err(|source| NotifyError::Send {
                target: self.target.clone(),
                source,
            })?;
        if sent != text.len() {
            return Err(NotifyError::Short {
                target: self.target.clone(),
                sent,
                len: text.len(),
            });
        }
        Ok(())
    }

    /// The environment a self-upgraded master (exec'd by this one, which systemd still knows
    /// as the main pid) needs to notify in turn (`MAINPID=` of its own pid, then `READY=1`)
    /// and to keep feeding `watchdog`. `WATCHDOG_PID` is left out: the successor's pid is not
    /// known before the fork, and without it the watchdog applies to whoever reads it.
    pub fn successor_env(&self, watchdog: Option<&Watchdog>) -> Vec<(&'static str, String)> {
        let mut env = vec![("NOTIFY_SOCKET", self.target.clone())];
        if let Some(w) = watchdog {
            env.push(("WATCHDOG_USEC", w.timeout.as_micros().to_string()));
        }
        env
    }
}

/// The watchdog the manager asked for (`WatchdogSec=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchdog {
    /// Without a `WATCHDOG=1` for this long, the manager kills and restarts the service.
    pub timeout: Duration,
    /// How often to send `WATCHDOG=1`: half the timeout, as sd_watchdog_enabled(3) advises,
    /// so one late tick of the master's loop does not get it killed.
    pub ping_every: Duration,
}

impl Watchdog {
    /// Reads `WATCHDOG_USEC` and `WATCHDOG_PID`. `Ok(None)` when no watchdog is asked for,
    /// or it is asked of another process (`WATCHDOG_PID` is not ours).
    pub fn from_env() -> Result<Option<Watchdog>, NotifyError> {
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Watchdog::parse(usec.as_deref(), pid.as_deref(), std::process::id())
    }

    /// [`Watchdog::from_env`] on given values, for tests and for callers that captured the
    /// environment earlier.
    pub fn parse(
        usec: Option<&str>,
        pid: Option<&str>,
        our_pid: u32,
    ) -> Result<Option<Watchdog>, NotifyError> {
        let Some(usec) = usec.filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        if let Some(pid) = pid.filter(|p| !p.is_empty()) {
            if pid.trim().parse::<u32>().ok() != Some(our_pid) {
                return Ok(None);
            }
        }
        let micros = usec
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&m| m > 0)
            .ok_or_else(|| NotifyError::BadWatchdog(usec.to_string()))?;
        let timeout = Duration::from_micros(micros);
        Ok(Some(Watchdog {
            timeout,
            ping_every: timeout / 2,
        }))
    }
}

#[cfg(test)]
#[path = "notify_tests.rs"]
mod tests;
