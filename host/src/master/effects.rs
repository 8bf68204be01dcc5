//! How the shell carries out the core's actions: snapshots, spawns, signals, sockets,
//! replies, logs, notifications, metrics.

use std::os::fd::{AsFd, AsRawFd};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid as NixPid;

use super::core::{Action, Build, Event, Level, Observation, Pid, Reply, Role, Spawn};
use super::shell::Shell;
use crate::control::{self, Msg};
use crate::settings::HEARTBEAT_INTERVAL;
use crate::spawn;
use crate::worker::WorkerArgs;

impl Shell {
    /// Carries out one action; returns the event that answers it, if it has one.
    pub(super) fn execute(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Snapshot { generation, hash } => {
                let lib = self.core.settings().lib.clone();
                let taken = if hash {
                    self.snapshots.take(&lib, generation).map(|s| (s, false))
                } else {
                    let hasher = &self.hasher;
                    self.snapshots
                        .take_hashing_beside(&lib, generation, &mut |job| {
                            hasher.start_job(generation, job).is_ok()
                        })
                };
                let result = taken.map(|(snap, hashing)| {
                    let build = Build {
                        source: snap.source.clone(),
                        sha256: snap.sha256.clone(),
                    };
                    if snap.sha256.is_none() && !hashing {
                        self.unhashed.push(generation);
                    }
                    self.snaps.insert(generation, snap);
                    build
                });
                return Some(Event::Snapshotted { generation, result });
            }
            Action::DropSnapshot { generation } => {
                if let Some(snap) = self.snaps.remove(&generation) {
                    self.snapshots.remove(&snap);
                }
            }
            Action::Spawn(spec) => {
                let result = self.spawn(&spec);
                return Some(Event::Spawned {
                    spawn: spec,
                    result,
                });
            }
            Action::SendDrain(pid) => {
                let told = self
                    .procs
                    .get(&pid)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| control::send_msg(c.as_fd(), &Msg::Drain).is_ok());
                if !told {
                    // Workers treat SIGTERM as a drain request too.
                    let _ = kill(NixPid::from_raw(pid), Signal::SIGTERM);
                }
            }
            Action::Kill(pid) => {
                let _ = kill(NixPid::from_raw(pid), Signal::SIGKILL);
            }
            Action::AddSlot => {
                if let Err(e) = self.listeners.add_slot() {
                    return Some(Event::SlotAddFailed {
                        error: e.to_string(),
                    });
                }
            }
            Action::RemoveLastSlot => {
                if self.listeners.tcp_slots() > 1 {
                    self.listeners.remove_last_slot();
                }
            }
            Action::Steer { active } => {
                if let Err(e) = self.listeners.steer(active) {
                    tracing::warn!(
                        event = "steer_failed",
                        "cannot steer connections between slots ({e}); connections queued on a removed slot may be reset"
                    );
                }
            }
            Action::CloseListeners => self.listeners.close(),
            Action::ReleaseListeners => self.listeners.release(),
            Action::CheckBinary => return Some(self.check_binary()),
            Action::SpawnSuccessor {
                generation,
                workers,
            } => return Some(self.spawn_successor(generation, workers)),
            Action::TakeOver { from, generation } => self.take_over(from, generation),
            Action::WatchUpdate => {
                let lib = self.core.settings().lib.clone();
                if let Some(watch) = &mut self.watch {
                    if let Err(e) = watch.update(&lib) {
                        tracing::warn!(event = "watch_error", "{e}");
                    }
                }
            }
            Action::Reply {
                client,
                reply,
                hold,
            } => match reply {
                Reply::Status(mut status) => {
                    status.listening = self.listeners.describe();
                    status.binary = Some(self.binary.clone());
                    status.started_unix = Some(self.started_unix);
                    self.clients.reply(client, &status, hold);
                }
                Reply::Outcome(outcome) => self.clients.reply(client, &outcome, hold),
            },
            Action::Log(log) => emit(&log),
            Action::Notify(notice) => {
                if let Some(notifier) = &self.notifier {
                    notifier.notify_or_log(&notice);
                }
            }
            Action::Observe(observation) => {
                if matches!(observation, Observation::RollEnded { .. }) {
                    // Whatever the outcome, the next roll's copy may go into ready pages.
                    self.snapshots.prepare(self.core.next_generation());
                }
                if let Some(m) = &self.metrics {
                    match observation {
                        Observation::RollEnded { result, took } => m.roll_finished(result, took),
                        Observation::WorkerExited { pid, reason } => m.worker_exited(pid, reason),
                        Observation::WorkerRestarted => m.worker_restarted(),
                    }
                }
            }
            Action::Exit(failure) => self.exit = Some(failure),
        }
        None
    }

    fn spawn(&mut self, spec: &Spawn) -> Result<Pid, std::io::Error> {
        // The snapshot's fd, not its path: a generation stays loadable however its copy's
        // location fares (a temp cleaner, a moved directory).
        let snapshot_fd = match spec.role {
            // A spare gets its snapshot when a roll needs it (`assign_spare`).
            Role::Spare => -1,
            _ => self
                .snaps
                .get(&spec.generation)
                .map(|s| s.fd().as_raw_fd())
                .ok_or_else(|| std::io::Error::other("the generation has no snapshot"))?,
        };
        if let (Some(spare), Role::Probe) = (spec.spare, spec.role) {
            match self.assign_spare(spare, spec.generation, snapshot_fd) {
                Ok(()) => return Ok(spare),
                Err(e) => tracing::warn!(
                    event = "spare_failed",
                    "cannot hand generation {}'s snapshot to spare probe {spare} ({e}); starting a probe by exec",
                    spec.generation
                ),
            }
        }
        let (probe, slot, listeners) = match spec.role {
            Role::Probe | Role::Spare => (true, 0, Vec::new()),
            Role::Worker { slot } => (
                false,
                slot,
                self.listeners
                    .for_slot(slot)
                    .into_iter()
                    .map(|(fd, kind)| (fd.as_raw_fd(), kind.abi()))
                    .collect(),
            ),
        };
        if let (Some(zygote), Role::Worker { .. }) = (spec.zygote, spec.role) {
            // Sent ahead with the rest of its batch (`send_forks`), or now.
            let sent = match self.pending_forks.iter().position(|(s, _)| s == spec) {
                Some(i) => self.pending_forks.remove(i).1,
                None => self.send_fork(zygote, spec),
            };
            match sent.and_then(|ours| Ok((self.await_fork(zygote)?, ours))) {
                Ok((pid, ours)) => {
                    self.procs.insert(pid, Some(ours));
                    return Ok(pid);
                }
                Err(e) => {
                    // The zygote is of no more use: the core hears of its death and starts
                    // this generation's next workers by exec; this one too.
                    tracing::warn!(
                        event = "zygote_failed",
                        "zygote {zygote} of generation {} could not fork a worker for slot {slot} ({e}); starting it by exec",
                        spec.generation
                    );
                    let _ = kill(NixPid::from_raw(zygote), Signal::SIGKILL);
                }
            }
        }
        let (ours, theirs) = control::pair()?;
        let args = WorkerArgs {
            snapshot_fd,
            probe,
            zygote: probe && spec.offer_zygote,
            spare: spec.role == Role::Spare,
            control_fd: theirs.as_raw_fd(),
            listeners,
            slot: slot as u32,
            generation: spec.generation,
            max_requests: spec.max_requests,
            heartbeat_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
            graceful_ms: spec.graceful_timeout.as_millis() as u64,
            log_json: self.settings.log_format == crate::cli::LogFormat::Json,
            credentials: self.credentials.clone(),
        };
        let pid = spawn::spawn(&self.exe, &args)?.as_raw();
        drop(theirs);
        self.procs.insert(pid, Some(ours));
        Ok(pid)
    }
}

impl Shell {
    /// Sends every fork request of a batch of actions before the first answer is awaited:
    /// the zygote forks them back to back, and on busy cores each round trip would wait for
    /// both processes to be scheduled again.
    ///
    /// Only up to the first action that changes the slots' sockets: a spawn after an
    /// `AddSlot` needs the socket that action binds.
    pub(super) fn send_forks(&mut self, actions: &[Action]) {
        for action in actions {
            match action {
                Action::Spawn(
                    spec @ Spawn {
                        zygote: Some(zygote),
                        role: Role::Worker { .. },
                        ..
                    },
                ) => {
                    let sent = self.send_fork(*zygote, spec);
                    self.pending_forks.push((*spec, sent));
                }
                Action::AddSlot
                | Action::RemoveLastSlot
                | Action::Steer { .. }
                | Action::CloseListeners => return,
                _ => {}
            }
        }
    }

    /// Hands a spare the snapshot of `generation`: it loads it as that generation's probe.
    fn assign_spare(
        &mut self,
        spare: Pid,
        generation: u64,
        snapshot_fd: std::os::fd::RawFd,
    ) -> std::io::Result<()> {
        let Some(Some(channel)) = self.procs.get(&spare) else {
            return Err(std::io::Error::other("its control channel is closed"));
        };
        control::send_fds(channel.as_fd(), &Msg::Load { generation }, &[snapshot_fd])
    }

    /// Asks `zygote` to fork the worker `spec` describes, handing it the worker's control end
    /// and listeners; returns our end of the worker's control channel.
    fn send_fork(&mut self, zygote: Pid, spec: &Spawn) -> std::io::Result<std::os::fd::OwnedFd> {
        let Role::Worker { slot } = spec.role else {
            return Err(std::io::Error::other("only a worker is forked"));
        };
        let Some(Some(channel)) = self.procs.get(&zygote) else {
            return Err(std::io::Error::other("its control channel is closed"));
        };
        let (ours, theirs) = control::pair()?;
        let listeners: Vec<_> = self
            .listeners
            .for_slot(slot)
            .into_iter()
            .map(|(fd, kind)| (fd.as_raw_fd(), kind.abi()))
            .collect();
        let request = Msg::Fork {
            slot: slot as u32,
            max_requests: spec.max_requests,
            graceful_ms: spec.graceful_timeout.as_millis() as u64,
            kinds: listeners.iter().map(|&(_, kind)| kind).collect(),
        };
        let fds: Vec<_> = std::iter::once(theirs.as_raw_fd())
            .chain(listeners.iter().map(|&(fd, _)| fd))
            .collect();
        control::send_fds(channel.as_fd(), &request, &fds)?;
        Ok(ours)
    }

    /// The zygote's answer to the oldest fork request not answered yet: the new worker's pid
    /// (the master's child by then).
    fn await_fork(&mut self, zygote: Pid) -> std::io::Result<Pid> {
        let Some(Some(channel)) = self.procs.get(&zygote) else {
            return Err(std::io::Error::other("its control channel is closed"));
        };
        let deadline = std::time::Instant::now() + ZYGOTE_REPLY_TIMEOUT;
        loop {
            match control::recv_msg(channel)? {
                control::Recv::Msg(Msg::Forked(pid)) if pid > 0 => return Ok(pid),
                control::Recv::Msg(Msg::ForkFailed(why)) => return Err(std::io::Error::other(why)),
                control::Recv::Msg(_) => continue,
                control::Recv::Eof => return Err(std::io::Error::other("it exited")),
                control::Recv::Empty => {}
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::other(format!(
                    "no answer within {ZYGOTE_REPLY_TIMEOUT:?}"
                )));
            }
            let mut poll = [nix::poll::PollFd::new(
                channel.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Shell {
    /// Starts hashing the snapshots copied without their hash, once the actions they led to
    /// (their probe's spawn) are done: the probe starts meanwhile. A hash that cannot start
    /// is answered at once.
    pub(super) fn hash_snapshots(&mut self) -> Vec<Event> {
        let mut failed = Vec::new();
        for generation in std::mem::take(&mut self.unhashed) {
            // Dropped already (its roll ended): nobody waits for its name.
            let Some(snap) = self.snaps.get(&generation) else {
                continue;
            };
            if let Err(e) = self.hasher.start(generation, snap) {
                failed.push(Event::Hashed {
                    generation,
                    result: Err(format!("cannot start the hash thread: {e}")),
                });
            }
        }
        failed
    }

    /// The hashes done: names each snapshot and tells the core.
    pub(super) fn read_hashes(&mut self) {
        for (generation, result) in self.hasher.take() {
            if let (Some(snap), Ok(sha)) = (self.snaps.get_mut(&generation), &result) {
                self.snapshots.set_hash(snap, sha.clone());
            }
            self.feed(Event::Hashed { generation, result });
        }
    }
}

/// How long the master waits for a zygote to fork a worker (it takes well under a
/// millisecond) before it kills it and starts the worker by exec.
const ZYGOTE_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// One core log line as a `tracing` event.
fn emit(log: &super::core::Log) {
    let (worker, generation, msg) = (log.worker, log.generation, &log.message);
    // Rounded as the message prints it.
    let took_ms = log.took_ms.map(|ms| (ms * 10.0).round() / 10.0);
    match log.level {
        Level::Info => tracing::info!(event = log.event, worker, generation, took_ms, "{msg}"),
        Level::Warn => tracing::warn!(event = log.event, worker, generation, took_ms, "{msg}"),
        Level::Error => tracing::error!(event = log.event, worker, generation, took_ms, "{msg}"),
    }
}
