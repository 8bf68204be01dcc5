//! The shell's side of a self-upgrade (see `core::upgrade` for the decisions).
//!
//! # The handover, as the processes see it
//! 1. The old master runs `BINARY --version` (no socket, no fd of ours): a file that does not
//!    execute, or prints something else than `angel-host ...`, is refused with the reason.
//! 2. It starts `BINARY` with its own argv (so the same flags and `--config`, re-read now as a
//!    HUP would), the listening sockets as `LISTEN_FDS` (names in
//!    [`crate::listener::Listeners::handover`], plus `angel.metrics`), and:
//!    `ANGEL_UPGRADE_PROTOCOL=1`, `ANGEL_PARENT_PID` (the old master), `ANGEL_UPGRADE_GENERATION`
//!    (the last generation number used), `ANGEL_UPGRADE_WORKERS` (the current worker count,
//!    TTIN/TTOU included), `ANGEL_UPGRADE_FD` (its end of a status socket) and the service
//!    manager's `NOTIFY_SOCKET`/`WATCHDOG_USEC`.
//! 3. The new master starts its first generation from a fresh snapshot. When it serves, it
//!    writes the pidfile (atomically), sends `MAINPID=` and `READY=1`, and writes
//!    `serving N` on the status socket; if it fails first, it writes `failed REASON` and exits.
//! 4. On `serving`, the old master drains its workers and exits without touching the sockets,
//!    the pidfile or the service manager. If the old master is gone by then (killed), the new
//!    one carries on alone.
//!
//! The control socket needs no handover: it is named by the master's pid, and clients find the
//! master through the pidfile, which names the new master from step 3 on.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use super::core::Pid;

pub const PROTOCOL_VAR: &str = "ANGEL_UPGRADE_PROTOCOL";
/// The handover this build speaks; a new master that does not know it refuses to start.
pub const PROTOCOL: &str = "1";
pub const GENERATION_VAR: &str = "ANGEL_UPGRADE_GENERATION";
pub const WORKERS_VAR: &str = "ANGEL_UPGRADE_WORKERS";
pub const STATUS_FD_VAR: &str = "ANGEL_UPGRADE_FD";
pub use crate::successor::PARENT_PID_VAR;

/// The handover's socket names: [`crate::listener::Listeners::handover`]'s, and this one.
pub const METRICS_NAME: &str = "angel.metrics";

/// Why the environment of a new master is not a usable handover.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeEnvError {
    #[error("{PROTOCOL_VAR}={0:?}: this angel-host speaks handover protocol {PROTOCOL}; upgrade in two steps or restart")]
    Protocol(String),
    #[error("{var}={value:?} is not valid ({what})")]
    Bad {
        var: &'static str,
        value: String,
        what: &'static str,
    },
    #[error(transparent)]
    Listeners(#[from] crate::listener::HandoverError),
}

/// What a new master knows of the master it takes over from.
#[derive(Debug, Clone, Copy)]
pub struct Predecessor {
    pub pid: Pid,
    pub generation: u64,
    pub workers: usize,
}

/// The status socket to the old master, until `serving` or `failed` was written on it.
static STATUS: Mutex<Option<UnixStream>> = Mutex::new(None);

impl Predecessor {
    /// Reads the handover variables (none: an ordinary start) and removes them, so workers
    /// never see them. Call while single-threaded, before anything else takes fds.
    pub fn from_env() -> Result<Option<Self>, UpgradeEnvError> {
        let Some(protocol) = std::env::var_os(PROTOCOL_VAR) else {
            return Ok(None);
        };
        let read = |var: &'static str, what: &'static str| {
            let value = std::env::var(var).unwrap_or_default();
            value
                .trim()
                .parse::<u64>()
                .map_err(|_| UpgradeEnvError::Bad {
                    var,
                    value: value.clone(),
                    what,
                })
        };
        let result = (|| {
            if protocol != PROTOCOL {
                return Err(UpgradeEnvError::Protocol(
                    protocol.to_string_lossy().into_owned(),
                ));
            }
            let fd = read(STATUS_FD_VAR, "an inherited fd")?;
            let fd = RawFd::try_from(fd).map_err(|_| UpgradeEnvError::Bad {
                var: STATUS_FD_VAR,
                value: fd.to_string(),
                what: "an inherited fd",
            })?;
            // SAFETY: the old master put its status socket at this fd for us (and nothing
            // else of ours owns it: it is above the listeners, which `activation` takes).
            let status = unsafe { OwnedFd::from_raw_fd(fd) };
            let _ = nix::fcntl::fcntl(
                status.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            *STATUS.lock().unwrap_or_else(|e| e.into_inner()) = Some(UnixStream::from(status));
            Ok(Predecessor {
                pid: read(PARENT_PID_VAR, "a pid")? as Pid,
                generation: read(GENERATION_VAR, "a generation number")?,
                workers: read(WORKERS_VAR, "a worker count")? as usize,
            })
        })();
        for var in [
            PROTOCOL_VAR,
            STATUS_FD_VAR,
            PARENT_PID_VAR,
            GENERATION_VAR,
            WORKERS_VAR,
        ] {
            std::env::remove_var(var);
        }
        result.map(Some)
    }
}

/// Tells the old master that we serve `generation`. An error means it is gone.
pub fn tell_serving(generation: u64) -> io::Result<()> {
    let stream = STATUS.lock().unwrap_or_else(|e| e.into_inner()).take();
    match stream {
        Some(mut s) => s.write_all(format!("serving {generation}\n").as_bytes()),
        None => Ok(()),
    }
}

/// A new master about to exit before it took over tells the old master why (one line).
pub fn report_failure(line: &str) {
    let stream = STATUS.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(mut s) = stream {
        let line = line.replace('\n', " ");
        let _ = s.write_all(format!("failed {line}\n").as_bytes());
    }
}

/// The old master's end of the status socket: lines as they come, without ever blocking.
#[derive(Debug)]
pub struct StatusReader {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

/// What one line on the status socket says.
#[derive(Debug, PartialEq, Eq)]
pub enum StatusLine {
    Serving(u64),
    Failed(String),
}

/// At most this much unanswered text from a new master: a status line is short.
const STATUS_MAX: usize = 4096;

impl StatusReader {
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(StatusReader {
            stream,
            buf: Vec::new(),
        })
    }

    /// Complete lines read so far, and whether the other end closed.
    pub fn read(&mut self) -> (Vec<StatusLine>, bool) {
        let mut chunk = [0u8; 512];
        let closed = loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if self.buf.len() > STATUS_MAX {
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        let mut lines = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            if let Some(g) = line.strip_prefix("serving ") {
                if let Ok(g) = g.trim().parse() {
                    lines.push(StatusLine::Serving(g));
                }
            } else if let Some(why) = line.strip_prefix("failed ") {
                lines.push(StatusLine::Failed(why.to_string()));
            }
        }
        (lines, closed)
    }
}

/// Reads what `BINARY --version` printed once it exited, and judges it.
pub fn judge_check(
    binary: &std::path::Path,
    output: Option<std::process::ChildStdout>,
    status: &super::core::ExitStatus,
) -> Result<String, String> {
    let mut text = Vec::new();
    if let Some(mut out) = output {
        // The process exited: what it wrote is in the pipe (a grandchild holding the pipe
        // open must not block us).
        let _ = nix::fcntl::fcntl(
            out.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        let mut chunk = [0u8; 4096];
        while text.len() < 64 * 1024 {
            match out.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.extend_from_slice(&chunk[..n]),
            }
        }
    }
    let first = String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let path = binary.display();
    if !status.success() {
        return Err(format!(
            "{path} is not a working angel-host: `--version` {status}"
        ));
    }
    if !first.starts_with("angel-host ") {
        return Err(format!(
            "{path} is not angel-host: `--version` printed {first:?}"
        ));
    }
    Ok(first)
}

use super::core::{Event, UpgradeStep};
use super::shell::Shell;

impl Shell {
    /// `BINARY --version`, with nothing of ours but stdout to a pipe.
    pub(super) fn check_binary(&mut self) -> Event {
        tracing::info!(
            event = "upgrading",
            "upgrading to {}",
            self.binary.display()
        );
        let spawned = std::process::Command::new(&self.binary)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn();
        let result = match spawned {
            Ok(mut child) => {
                let pid = child.id() as Pid;
                // Reaped by the loop's waitpid, like every child; the Child is not waited on.
                self.checker = Some((pid, child.stdout.take()));
                Ok(pid)
            }
            Err(e) => Err(format!("{}: {e}", self.binary.display())),
        };
        Event::UpgradeSpawned {
            step: UpgradeStep::Check,
            result,
        }
    }

    /// Starts the new master with our sockets (see the module doc for what it gets).
    pub(super) fn spawn_successor(&mut self, generation: u64, workers: usize) -> Event {
        let result = (|| -> io::Result<Pid> {
            let (ours, theirs) = UnixStream::pair()?;
            let mut fds = self.listeners.handover();
            if let Some(m) = &self.metrics_listener {
                fds.push((std::os::fd::AsFd::as_fd(m), METRICS_NAME.to_string()));
            }
            let status_fd = crate::activation::LISTEN_FDS_START + fds.len() as RawFd;
            let mut env: Vec<(&str, String)> = vec![
                (PROTOCOL_VAR, PROTOCOL.to_string()),
                (GENERATION_VAR, generation.to_string()),
                (WORKERS_VAR, workers.to_string()),
                (STATUS_FD_VAR, status_fd.to_string()),
            ];
            if let Some(n) = &self.notifier {
                let dog = self.watchdog.as_ref().map(|(w, _)| w);
                env.extend(n.successor_env(dog));
            }
            let named: Vec<(std::os::fd::BorrowedFd<'_>, &str)> =
                fds.iter().map(|(fd, name)| (*fd, name.as_str())).collect();
            let pid = crate::successor::spawn_successor(
                &self.binary,
                &self.argv,
                &named,
                Some(std::os::fd::AsFd::as_fd(&theirs)),
                &env,
            )?
            .as_raw();
            drop(theirs);
            self.successor = Some((pid, StatusReader::new(ours)?));
            Ok(pid)
        })();
        Event::UpgradeSpawned {
            step: UpgradeStep::Successor,
            result: result.map_err(|e| format!("{}: {e}", self.binary.display())),
        }
    }

    /// Our first generation serves: the pidfile, the service manager and the old master learn
    /// that this master is in charge now.
    pub(super) fn take_over(&mut self, from: Pid, generation: u64) {
        match crate::pidfile::Pidfile::write(&self.pidfile_path, nix::unistd::getpid()) {
            Ok(pidfile) => {
                tracing::info!(
                    event = "pidfile_created",
                    "created pid_file: {}",
                    pidfile.path().display()
                );
                self.pidfile = Some(pidfile);
            }
            Err(e) => tracing::error!(event = "pidfile_error", "{e}"),
        }
        self.listeners.take_charge(self.owned_unix);
        if let Some(notifier) = &self.notifier {
            notifier.notify_or_log(&crate::notify::Notice::MainPid(
                nix::unistd::getpid().as_raw(),
            ));
        }
        if let Err(e) = tell_serving(generation) {
            tracing::warn!(
                event = "predecessor_gone",
                "master[{from}] is gone ({e}); serving on our own"
            );
        }
    }

    /// The new master's status lines.
    pub(super) fn read_successor(&mut self) {
        let Some((pid, reader)) = &mut self.successor else {
            return;
        };
        let pid = *pid;
        let (lines, closed) = reader.read();
        if closed {
            self.successor = None;
        }
        for line in lines {
            let msg = match line {
                StatusLine::Serving(generation) => {
                    super::core::SuccessorMsg::Serving { generation }
                }
                StatusLine::Failed(why) => super::core::SuccessorMsg::Failed(why),
            };
            self.feed(Event::Successor { pid, msg });
        }
    }

    /// A reaped child that belongs to the upgrade: the checker's end becomes its verdict.
    pub(super) fn upgrade_reaped(
        &mut self,
        pid: Pid,
        status: &super::core::ExitStatus,
    ) -> Option<Event> {
        if let Some((p, _)) = &self.successor {
            if *p == pid {
                // Its last words come before its death.
                self.read_successor();
                self.successor = None;
            }
        }
        match &self.checker {
            Some((p, _)) if *p == pid => {
                let (_, output) = self.checker.take()?;
                Some(Event::BinaryChecked {
                    pid,
                    result: judge_check(&self.binary, output, status),
                })
            }
            _ => None,
        }
    }
}
