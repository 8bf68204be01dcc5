//! The shell around the core: one `poll` loop that turns the kernel (signals, control
//! channels, reaped children, the control socket, the file watcher, the clock) into
//! [`Event`]s and carries the core's [`Action`]s out. It decides nothing.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use super::clients::{Asked, Clients};
use super::core::{
    Core, Event, ExitStatus, FirstGenerationError, Pid, Reread, Resize, StopMode, WorkerMsg,
    WorkerState,
};
use super::upgrade::StatusReader;
use super::MasterError;
use crate::config::ConfigSource;
use crate::control::{self, Msg, Recv};
use crate::ctl;
use crate::listener::Listeners;
use crate::metrics::{Metrics, WorkerCounts};
use crate::notify::{Notice, Notifier, Watchdog};
use crate::pidfile::Pidfile;
use crate::settings::Settings;
use crate::signals::{Sig, Signals};
use crate::snapshot::{Snapshot, SnapshotDir};
use crate::watch::Watch;

/// What the shell is made of, set up by `master::run`.
pub struct Parts {
    pub hasher: super::hasher::Hasher,
    pub core: Core,
    pub settings: Settings,
    pub exe: PathBuf,
    pub listeners: Listeners,
    pub snapshots: SnapshotDir,
    pub signals: Signals,
    pub watch: Option<Watch>,
    pub clients: Clients,
    pub source: ConfigSource,
    pub notifier: Option<Notifier>,
    pub watchdog: Option<Watchdog>,
    pub metrics: Option<Metrics>,
    /// `--user`/`--group`, resolved, for every worker and probe.
    pub credentials: Option<String>,
    /// The flags and config file the master started with.
    pub started_with: crate::cli::Cli,
    /// The angel-host binary at the path the master was started from (what an upgrade
    /// runs), and the arguments it was started with.
    pub binary: PathBuf,
    pub argv: Vec<std::ffi::OsString>,
    /// Wall-clock start, seconds since the epoch (for `status`).
    pub started_unix: u64,
    /// `--metrics`' listening socket, for an upgrade's handover.
    pub metrics_listener: Option<OwnedFd>,
    /// The pidfile: written (ordinary start) or to write once we take over (an upgrade).
    pub pidfile: Option<Pidfile>,
    pub pidfile_path: PathBuf,
    /// From an upgrade: the unix socket files are ours to remove once we are in charge.
    pub owned_unix: bool,
}

/// Everything the shell owns.
pub struct Shell {
    pub core: Core,
    /// Restart-only settings (log format), as the master started.
    pub settings: Settings,
    pub exe: PathBuf,
    pub listeners: Listeners,
    pub snapshots: SnapshotDir,
    pub signals: Signals,
    pub watch: Option<Watch>,
    pub clients: Clients,
    pub source: ConfigSource,
    /// The service manager's notification socket (`NOTIFY_SOCKET`), if any.
    pub notifier: Option<Notifier>,
    /// `WATCHDOG=1` is due at this moment, every `ping_every`.
    pub watchdog: Option<(Watchdog, Instant)>,
    pub metrics: Option<Metrics>,
    pub(super) credentials: Option<String>,
    pub(super) started_with: crate::cli::Cli,
    /// Each generation's snapshot.
    pub(super) snaps: BTreeMap<u64, Snapshot>,
    /// Our end of each child's control channel (None once it closed).
    pub(super) procs: BTreeMap<Pid, Option<OwnedFd>>,
    pub(super) exit: Option<Option<FirstGenerationError>>,
    pub(super) binary: PathBuf,
    pub(super) argv: Vec<std::ffi::OsString>,
    pub(super) started_unix: u64,
    pub(super) metrics_listener: Option<OwnedFd>,
    pub pidfile: Option<Pidfile>,
    pub(super) pidfile_path: PathBuf,
    pub(super) owned_unix: bool,
    /// An upgrade's `--version` check: its pid and stdout.
    pub(super) checker: Option<(Pid, Option<std::process::ChildStdout>)>,
    /// An upgrade's new master: its pid and status socket.
    pub(super) successor: Option<(Pid, StatusReader)>,
    /// Fork requests sent to a zygote ahead of their `Spawn` (`effects::send_forks`), each
    /// with our end of the new worker's control channel.
    pub(super) pending_forks: Vec<(super::core::Spawn, std::io::Result<OwnedFd>)>,
    /// Generations whose snapshot was copied without its hash (`Action::Snapshot`).
    pub(super) unhashed: Vec<u64>,
    pub(super) hasher: super::hasher::Hasher,
}

impl Shell {
    pub fn new(parts: Parts) -> Self {
        let Parts {
            hasher,
            core,
            settings,
            exe,
            listeners,
            snapshots,
            signals,
            watch,
            clients,
            source,
            notifier,
            watchdog,
            metrics,
            credentials,
            started_with,
            binary,
            argv,
            started_unix,
            metrics_listener,
            pidfile,
            pidfile_path,
            owned_unix,
        } = parts;
        Shell {
            core,
            settings,
            exe,
            listeners,
            snapshots,
            signals,
            watch,
            clients,
            source,
            notifier,
            watchdog: watchdog.map(|w| (w, Instant::now())),
            metrics,
            credentials,
            started_with,
            snaps: BTreeMap::new(),
            procs: BTreeMap::new(),
            exit: None,
            binary,
            argv,
            started_unix,
            metrics_listener,
            pidfile,
            pidfile_path,
            owned_unix,
            checker: None,
            successor: None,
            pending_forks: Vec::new(),
            unhashed: Vec::new(),
            hasher,
        }
    }

    /// Runs until the core exits.
    pub fn run(&mut self) -> Result<(), MasterError> {
        self.feed(Event::Start);
        loop {
            if let Some(exit) = self.exit.take() {
                return exit.map_or(Ok(()), |e| Err(e.into()));
            }
            self.wait()?;
            self.read_hashes();
            self.read_controls();
            self.read_successor();
            self.reap();
            for sig in self.signals.take() {
                self.on_signal(sig);
            }
            for asked in self.clients.service(Instant::now()) {
                self.on_client(asked);
            }
            self.read_watch();
            self.feed(Event::Tick);
            self.ping_watchdog();
            self.update_gauges();
        }
    }

    /// `WATCHDOG=1` from the loop itself: a loop that stops turning stops the pings.
    fn ping_watchdog(&mut self) {
        let (Some(notifier), Some((dog, due))) = (&self.notifier, &mut self.watchdog) else {
            return;
        };
        let now = Instant::now();
        if *due <= now {
            notifier.notify_or_log(&Notice::Watchdog);
            *due = now + dog.ping_every;
        }
    }

    fn update_gauges(&self) {
        let Some(metrics) = &self.metrics else { return };
        metrics.set_generation(self.core.serving_generation().unwrap_or(0));
        let mut counts = WorkerCounts::default();
        for w in self.core.workers() {
            match w.state {
                WorkerState::Starting => counts.starting += 1,
                WorkerState::Ready { .. } => counts.ready += 1,
                WorkerState::Retiring { .. } | WorkerState::Draining { .. } => counts.draining += 1,
                WorkerState::Killed { .. } => {}
            }
        }
        metrics.set_workers(counts);
    }

    /// Hands one event to the core and carries out its actions, feeding the answers of
    /// `Snapshot`, `Spawn` and `AddSlot` back before anything else.
    pub(super) fn feed(&mut self, event: Event) {
        let mut queue = VecDeque::from([event]);
        loop {
            let Some(event) = queue.pop_front() else {
                // Everything the events led to is done; a snapshot copied without its hash
                // is hashed now (on a thread), while the probe it was for starts.
                queue.extend(self.hash_snapshots());
                if queue.is_empty() {
                    break;
                }
                continue;
            };
            let actions = self.core.handle(Instant::now(), event);
            self.send_forks(&actions);
            for action in actions {
                if let Some(answer) = self.execute(action) {
                    queue.push_back(answer);
                }
            }
            // Every request sent was answered by its spawn; none is left over.
            self.pending_forks.clear();
        }
    }

    /// Blocks until a signal, a message, a client or the next deadline.
    fn wait(&mut self) -> Result<(), MasterError> {
        let deadline = [
            self.core.next_deadline(),
            self.clients.next_deadline(),
            self.watchdog.map(|(_, due)| due),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = deadline.map_or(PollTimeout::NONE, |at| {
            let ms = at.saturating_duration_since(Instant::now()).as_millis() + 1;
            PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::MAX)
        });
        let mut fds = vec![PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
        fds.extend(
            self.clients
                .fds()
                .into_iter()
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
        );
        if let Some(watch) = &self.watch {
            fds.push(PollFd::new(watch.fd(), PollFlags::POLLIN));
        }
        fds.push(PollFd::new(self.hasher.fd(), PollFlags::POLLIN));
        if let Some((_, status)) = &self.successor {
            fds.push(PollFd::new(status.stream.as_fd(), PollFlags::POLLIN));
        }
        fds.extend(
            self.procs
                .values()
                .flatten()
                .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
        );
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(MasterError::Io {
                what: "poll",
                source: e.into(),
            }),
        }
    }

    /// Every queued control message of every child, in order per child.
    fn read_controls(&mut self) {
        let pids: Vec<Pid> = self.procs.keys().copied().collect();
        for pid in pids {
            self.read_control(pid);
        }
    }

    fn read_control(&mut self, pid: Pid) {
        loop {
            let Some(Some(fd)) = self.procs.get(&pid) else {
                return;
            };
            let msg = match control::recv_msg(fd) {
                Ok(Recv::Msg(Msg::Ready)) => WorkerMsg::Ready,
                Ok(Recv::Msg(Msg::Retiring)) => WorkerMsg::Retiring,
                Ok(Recv::Msg(Msg::Heartbeat(n))) => {
                    if let Some(m) = &self.metrics {
                        m.requests_seen(pid, n);
                    }
                    WorkerMsg::Heartbeat(n)
                }
                Ok(Recv::Msg(Msg::Failed(why))) => WorkerMsg::Failed(why),
                Ok(Recv::Msg(Msg::Forkable)) => WorkerMsg::Forkable,
                // A zygote's answer to a fork request is read where the request is sent; one
                // that comes after its deadline is dropped (`effects::await_fork`).
                Ok(Recv::Msg(
                    Msg::Drain
                    | Msg::Fork { .. }
                    | Msg::Forked(_)
                    | Msg::ForkFailed(_)
                    | Msg::Load { .. },
                )) => continue,
                Ok(Recv::Empty) => return,
                Ok(Recv::Eof) | Err(_) => {
                    self.procs.insert(pid, None);
                    return;
                }
            };
            self.feed(Event::Worker { pid, msg });
        }
    }

    fn reap(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let Some((pid, status)) = ExitStatus::from_wait(status) else {
                continue;
            };
            if let Some(verdict) = self.upgrade_reaped(pid, &status) {
                self.feed(verdict);
                continue;
            }
            // Its last words (a failure reason, `retiring`) come before its death.
            self.read_control(pid);
            self.procs.remove(&pid);
            self.feed(Event::Exited { pid, status });
        }
    }

    fn on_signal(&mut self, sig: Sig) {
        if sig != Sig::Chld {
            tracing::info!(event = "signal", "{}", sig.name());
        }
        let event = match sig {
            Sig::Chld => return, // reaped every iteration
            Sig::Hup => Event::Reload {
                client: None,
                config: self.read_config(),
            },
            Sig::Ttin => Event::Resize(Resize::More),
            Sig::Ttou => Event::Resize(Resize::Fewer),
            Sig::Term | Sig::Quit => Event::Stop {
                mode: StopMode::Graceful,
                client: None,
            },
            Sig::Int => Event::Stop {
                mode: StopMode::Fast,
                client: None,
            },
            Sig::Usr2 => Event::Upgrade { client: None },
        };
        self.feed(event);
    }

    /// `--config`, re-read for a HUP or `angel-host reload` alike.
    fn read_config(&self) -> Option<Result<Reread, String>> {
        match self.source.reload() {
            Ok(None) => None,
            Ok(Some(cli)) => Some(Ok(Reread {
                settings: Box::new(Settings::from_cli(&cli)),
                // Restart-only settings never change while the master runs: what it started
                // with is what is in effect.
                restart_needed: crate::config::restart_needed(&self.started_with, &cli),
            })),
            Err(e) => Some(Err(e.to_string())),
        }
    }

    fn on_client(&mut self, asked: Asked) {
        let event = match asked {
            Asked::Request(client, ctl::Request::Status) => Event::Status(client),
            Asked::Request(client, ctl::Request::Upgrade) => {
                tracing::info!(event = "upgrade_requested", "upgrade requested");
                Event::Upgrade {
                    client: Some(client),
                }
            }
            Asked::Request(client, ctl::Request::Reload) => {
                tracing::info!(event = "reload_requested", "reload requested");
                Event::Reload {
                    client: Some(client),
                    config: self.read_config(),
                }
            }
            Asked::Request(client, request @ (ctl::Request::Stop | ctl::Request::StopFast)) => {
                let fast = request == ctl::Request::StopFast;
                tracing::info!(
                    event = "stop_requested",
                    "stop{} requested",
                    if fast { " --fast" } else { "" }
                );
                Event::Stop {
                    mode: if fast {
                        StopMode::Fast
                    } else {
                        StopMode::Graceful
                    },
                    client: Some(client),
                }
            }
            Asked::Unknown(client) => {
                self.clients.reply(
                    client,
                    &ctl::ReloadOutcome {
                        ok: false,
                        generation: 0,
                        message:
                            "unknown request; expected status, reload, upgrade, stop or stop-fast"
                                .into(),
                    },
                    false,
                );
                return;
            }
        };
        self.feed(event);
    }

    fn read_watch(&mut self) {
        let Some(watch) = &mut self.watch else { return };
        let changes: Vec<(PathBuf, bool, bool, bool)> = watch
            .take()
            .into_iter()
            .map(|c| {
                let library = watch.is_library(&c.path);
                (c.path, library, c.writing, c.replaced)
            })
            .collect();
        for (path, library, writing, replaced) in changes {
            self.feed(Event::FileChanged {
                path,
                library,
                writing,
                replaced,
            });
        }
    }
}
