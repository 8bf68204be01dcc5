//! Upgrading the master itself (nginx's `USR2`): the old master checks the new binary, starts
//! it with its listening sockets, keeps serving until the new master's first generation
//! serves, then drains and exits. The new master ([`Core::succeed`]) takes over the pidfile
//! and the service manager's main pid only then. Whatever fails before that — the binary,
//! the new master's start, its first generation, a deadline — the old master keeps serving
//! and says why.
//!
//! While an upgrade is under way a HUP, a reload, a resize or a second upgrade is refused
//! with a reason (never queued: the new master starts from a fresh snapshot and re-reads the
//! config anyway), and a file change under `--watch` is left to the new master.

use super::*;

/// How long `angel-host --version` of the new binary may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Beyond `--ready-timeout`, what the new master may take to start (exec, snapshot, probe).
pub const START_MARGIN: Duration = Duration::from_secs(10);

impl Core {
    /// This master was started by `predecessor` in an upgrade: its generations continue
    /// after `last_generation`, and it owns its sockets only once its first generation serves.
    pub fn succeed(&mut self, predecessor: Pid, last_generation: u64) {
        self.predecessor = Some(predecessor);
        self.next_generation = last_generation + 1;
        self.in_charge = false;
    }

    /// The upgrade under way, if any.
    pub fn upgrade(&self) -> &Upgrade {
        &self.upgrade
    }

    pub(super) fn on_upgrade(&mut self, client: Option<ClientId>) {
        let refusal = if self.stopping() {
            Some("master is stopping".to_string())
        } else if self.pid == 1 {
            Some(
                "the master is PID 1 (a container's init): it cannot hand over and exit; restart the container instead"
                    .to_string(),
            )
        } else if self.predecessor.is_some() {
            Some("this master is still taking over from the previous one".to_string())
        } else if let Some(pid) = self.upgrade.pid() {
            Some(format!(
                "an upgrade (to master[{pid}]) is already in progress"
            ))
        } else if self.upgrade.in_progress() {
            Some("an upgrade is already in progress".to_string())
        } else if self.roll != RollPhase::Idle
            || self.follow_up.is_some()
            || self.debounce != Debounce::Quiet
        {
            Some("a roll is in progress or about to start; upgrade once it is done".to_string())
        } else if self.serving.is_none() {
            Some("no generation serves yet".to_string())
        } else if self.desired != self.table.slots.len()
            || self
                .table
                .slots
                .iter()
                .any(|s| matches!(s.state, SlotState::Removing { .. }))
        {
            Some("a change of the worker count is in progress; upgrade once it is done".into())
        } else {
            None
        };
        if let Some(why) = refusal {
            self.log(
                Level::Warn,
                "upgrade_refused",
                format!("upgrade refused: {why}"),
            );
            if let Some(client) = client {
                self.reply_upgrade(client, false, &format!("upgrade refused: {why}"));
            }
            return;
        }
        self.upgrade_waiters.extend(client);
        self.upgrade = Upgrade::Checking {
            pid: None,
            started: self.now,
            deadline: self.now + CHECK_TIMEOUT,
        };
        self.out.push(Action::CheckBinary);
    }

    pub(super) fn on_upgrade_spawned(&mut self, step: UpgradeStep, result: Result<Pid, String>) {
        let expected = matches!(
            (&self.upgrade, step),
            (Upgrade::Checking { pid: None, .. }, UpgradeStep::Check)
                | (Upgrade::Starting { pid: None, .. }, UpgradeStep::Successor)
        );
        match result {
            Ok(pid) if !expected => {
                // The upgrade was given up meanwhile (a stop).
                self.out.push(Action::Kill(pid));
                self.strays.insert(pid);
            }
            Ok(pid) => match &mut self.upgrade {
                Upgrade::Checking { pid: p, .. } | Upgrade::Starting { pid: p, .. } => {
                    *p = Some(pid);
                    if step == UpgradeStep::Successor {
                        self.log(
                            Level::Info,
                            "upgrade_started",
                            format!("started master[{pid}]; it takes over once it serves"),
                        );
                    }
                }
                _ => {}
            },
            Err(e) if expected => {
                let what = match step {
                    UpgradeStep::Check => "cannot check the new binary",
                    UpgradeStep::Successor => "cannot start the new master",
                };
                self.fail_upgrade(&format!("{what}: {e}"));
            }
            Err(_) => {}
        }
    }

    pub(super) fn on_binary_checked(&mut self, pid: Pid, result: Result<String, String>) {
        if self.strays.remove(&pid) {
            return;
        }
        let Upgrade::Checking {
            pid: Some(p),
            started,
            ..
        } = self.upgrade
        else {
            return;
        };
        if p != pid {
            return;
        }
        match result {
            Ok(version) => {
                self.log(
                    Level::Info,
                    "upgrade_checked",
                    format!("the new binary is {version}; starting it"),
                );
                self.upgrade = Upgrade::Starting {
                    pid: None,
                    started,
                    deadline: self.now + self.s.ready_timeout + START_MARGIN,
                    reason: None,
                };
                let generation = self.next_generation - 1;
                let workers = self.desired;
                self.out.push(Action::SpawnSuccessor {
                    generation,
                    workers,
                });
            }
            Err(why) => self.fail_upgrade(&why),
        }
    }

    pub(super) fn on_successor(&mut self, pid: Pid, msg: SuccessorMsg) {
        let Upgrade::Starting {
            pid: Some(p),
            started,
            reason,
            ..
        } = &mut self.upgrade
        else {
            return;
        };
        if *p != pid {
            return;
        }
        match msg {
            SuccessorMsg::Failed(why) => *reason = Some(why),
            SuccessorMsg::Serving { generation } => {
                let took_ms = self.now.duration_since(*started).as_secs_f64() * 1000.0;
                self.upgrade = Upgrade::HandedOver { to: pid };
                let message = format!(
                    "upgraded: master[{}] -> master[{pid}] (generation {generation}) in {took_ms:.0} ms",
                    self.pid
                );
                self.log(
                    Level::Info,
                    "handed_over",
                    format!("handed over to master[{pid}] (generation {generation}); draining"),
                );
                for client in std::mem::take(&mut self.upgrade_waiters) {
                    self.reply_upgrade(client, true, &message);
                }
                // The sockets are the new master's now: ours just close, nothing is frozen
                // or unlinked, and the service manager hears nothing (its main pid is the
                // new master).
                self.in_charge = false;
                self.begin_stop(StopMode::Graceful);
            }
        }
    }

    /// The upgrade's process (checker or new master) exited; true if it was one.
    pub(super) fn on_upgrade_exit(&mut self, pid: Pid, status: ExitStatus) -> bool {
        if self.upgrade.pid() != Some(pid) {
            return false;
        }
        match &self.upgrade {
            Upgrade::Checking { .. } => {
                // The shell reports a checker's end as `BinaryChecked`; an exit seen here
                // has nothing to show.
                self.fail_upgrade(&format!("the new binary's check {status}"));
            }
            Upgrade::Starting { reason, .. } => {
                let why = match reason {
                    Some(reason) => format!("the new master {status} before it served: {reason}"),
                    None => format!("the new master {status} before it served"),
                };
                self.fail_upgrade(&why);
            }
            _ => {}
        }
        true
    }

    pub(super) fn upgrade_deadline(&mut self) {
        let Some(deadline) = self.upgrade.deadline() else {
            return;
        };
        if deadline > self.now {
            return;
        }
        let pid = self.upgrade.pid();
        let why = match self.upgrade {
            Upgrade::Checking { .. } => {
                format!("the new binary did not answer --version within {CHECK_TIMEOUT:?}")
            }
            _ => format!(
                "the new master did not serve within {:?} (--ready-timeout + {START_MARGIN:?})",
                self.s.ready_timeout + START_MARGIN
            ),
        };
        if let Some(pid) = pid {
            self.out.push(Action::Kill(pid));
            self.strays.insert(pid);
        }
        self.fail_upgrade(&why);
    }

    /// A stop during an upgrade gives it up: the new master (which does not own the sockets
    /// yet) is killed.
    pub(super) fn abandon_upgrade(&mut self) {
        if !self.upgrade.in_progress() {
            return;
        }
        if let Some(pid) = self.upgrade.pid() {
            self.out.push(Action::Kill(pid));
            self.strays.insert(pid);
        }
        self.fail_upgrade("master is stopping");
    }

    fn fail_upgrade(&mut self, why: &str) {
        self.upgrade = Upgrade::Idle;
        let message = format!("upgrade failed: {why}; this master keeps serving");
        self.log(Level::Error, "upgrade_failed", message.clone());
        for client in std::mem::take(&mut self.upgrade_waiters) {
            self.reply_upgrade(client, false, &message);
        }
    }

    fn reply_upgrade(&mut self, client: ClientId, ok: bool, message: &str) {
        self.out.push(Action::Reply {
            client,
            reply: Reply::Outcome(ctl::ReloadOutcome {
                ok,
                generation: self.serving.unwrap_or(0),
                message: message.to_string(),
            }),
            hold: false,
        });
    }

    /// A new master's first generation serves: it takes over from its predecessor.
    pub(super) fn take_over(&mut self, generation: u64) {
        let Some(from) = self.predecessor.take() else {
            return;
        };
        self.in_charge = true;
        self.log(
            Level::Info,
            "took_over",
            format!("took over from master[{from}] (generation {generation})"),
        );
        self.out.push(Action::TakeOver { from, generation });
    }

    /// What an upgrade refuses while it runs: `Some(reason)` to refuse `what`.
    pub(super) fn busy_upgrading(&self) -> Option<String> {
        if self.upgrade.in_progress() {
            Some(match self.upgrade.pid() {
                Some(pid) => format!("an upgrade (to master[{pid}]) is in progress"),
                None => "an upgrade is in progress".to_string(),
            })
        } else {
            None
        }
    }
}
