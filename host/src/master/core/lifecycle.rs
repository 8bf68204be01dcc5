//! Workers and slots over time: spawns, messages, deaths, deadlines, resizing and stopping.

use super::*;

impl Core {
    pub(super) fn on_spawned(&mut self, spawn: Spawn, result: Result<Pid, std::io::Error>) {
        if let Some(i) = self.forking.iter().position(|s| *s == spawn) {
            self.forking.remove(i);
        }
        let rolling = self.roll.generation() == Some(spawn.generation);
        if let (Some(spare), Ok(pid)) = (spawn.spare, &result) {
            if spare == *pid {
                self.spare_deaths = 0;
            } else {
                // The shell could not hand it the snapshot and exec'd a probe instead.
                self.out.push(Action::Kill(spare));
                self.strays.insert(spare);
            }
        } else if let (Some(spare), Err(_)) = (spawn.spare, &result) {
            self.out.push(Action::Kill(spare));
            self.strays.insert(spare);
        }
        match (spawn.role, result) {
            (Role::Spare, Ok(pid)) => {
                if self.stopping() || !self.in_charge || self.spare.is_some() {
                    self.out.push(Action::Kill(pid));
                    self.strays.insert(pid);
                } else {
                    self.spare = Some(pid);
                }
            }
            (Role::Spare, Err(e)) => {
                self.spare_deaths += 1;
                self.log(
                    Level::Warn,
                    "spawn_failed",
                    format!("cannot start a spare probe: {e}"),
                );
            }
            (Role::Probe, Ok(pid)) => match &mut self.roll {
                RollPhase::Starting {
                    generation,
                    probe: probe @ Probe::Forking,
                    ..
                } if *generation == spawn.generation => {
                    *probe = Probe::Running {
                        pid,
                        worker_failed: None,
                        reason: None,
                    };
                }
                _ => {
                    self.out.push(Action::Kill(pid));
                    self.strays.insert(pid);
                }
            },
            (Role::Probe, Err(e)) => {
                if rolling {
                    self.fail_roll(RollError::Spawn {
                        error: e.to_string(),
                    });
                }
            }
            (Role::Worker { slot }, Ok(pid)) => {
                self.table.workers.push(Worker {
                    pid,
                    slot,
                    generation: spawn.generation,
                    started: self.now,
                    requests: 0,
                    failure: None,
                    state: WorkerState::Starting,
                });
                self.log_worker(
                    Level::Info,
                    "forked",
                    pid,
                    spawn.generation,
                    format!("forked worker[{pid}]"),
                );
                if self.stopping() {
                    self.kill(pid, false);
                }
            }
            (Role::Worker { slot }, Err(e)) => {
                self.log(
                    Level::Error,
                    "spawn_failed",
                    format!("cannot spawn a worker for slot {slot}: {e}"),
                );
                if rolling {
                    self.fail_roll(RollError::Spawn {
                        error: e.to_string(),
                    });
                } else {
                    self.back_off(slot, Duration::ZERO);
                }
            }
        }
    }

    pub(super) fn on_message(&mut self, pid: Pid, msg: WorkerMsg) {
        if let RollPhase::Starting {
            probe: Probe::Running {
                pid: probe, reason, ..
            },
            ..
        } = &mut self.roll
        {
            if *probe == pid {
                match msg {
                    WorkerMsg::Failed(why) => *reason = Some(why),
                    WorkerMsg::Forkable if self.s.zygote => return self.on_zygote(pid),
                    _ => {}
                }
                return;
            }
        }
        let now = self.now;
        let Some(w) = self.table.get_mut(pid) else {
            return;
        };
        match msg {
            WorkerMsg::Failed(why) => w.failure = Some(why),
            // Only a probe offers to fork.
            WorkerMsg::Forkable => {}
            WorkerMsg::Heartbeat(n) => {
                w.requests = n;
                if let WorkerState::Ready { last_beat } | WorkerState::Retiring { last_beat } =
                    &mut w.state
                {
                    *last_beat = now;
                }
            }
            WorkerMsg::Ready => {
                if w.state == WorkerState::Starting {
                    w.state = WorkerState::Ready { last_beat: now };
                    self.try_promote();
                }
            }
            WorkerMsg::Retiring => {
                if w.state.holds_slot() {
                    let generation = w.generation;
                    // Its replacement, in its own generation (rolling or serving), is spawned
                    // by `fill`; it is told to drain once that one is ready (`sweep_stale`).
                    // Connections queued on the slot's socket wait there meanwhile.
                    w.state = WorkerState::Retiring { last_beat: now };
                    self.log_worker(
                        Level::Info,
                        "retiring",
                        pid,
                        generation,
                        format!("worker {pid} is retiring; replacing it"),
                    );
                }
            }
        }
    }

    pub(super) fn on_exit(&mut self, pid: Pid, status: ExitStatus) {
        if self.strays.remove(&pid) || self.on_upgrade_exit(pid, status) {
            return;
        }
        if let Some((&generation, _)) = self.zygotes.iter().find(|(_, z)| **z == pid) {
            return self.on_zygote_exit(generation, pid, status);
        }
        if self.spare == Some(pid) {
            self.spare = None;
            self.spare_deaths += 1;
            let also = if self.spare_deaths >= MAX_SPARE_DEATHS {
                "; no more spares: probes start with their roll"
            } else {
                ""
            };
            self.log(
                Level::Warn,
                "spare_exited",
                format!("spare probe {pid} exited before a roll used it ({status}){also}"),
            );
            return;
        }
        if let RollPhase::Starting {
            probe: Probe::Running { pid: probe, .. },
            ..
        } = &self.roll
        {
            if *probe == pid {
                return self.on_probe_exit(pid, status);
            }
        }
        let Some(w) = self.table.remove(pid) else {
            return;
        };
        let reason = match w.state {
            WorkerState::Draining { .. } | WorkerState::Retiring { .. } => "drained",
            WorkerState::Killed { .. } => "killed",
            WorkerState::Starting | WorkerState::Ready { .. } => "crashed",
        };
        self.out
            .push(Action::Observe(Observation::WorkerExited { pid, reason }));
        let rolling = self.roll.generation() == Some(w.generation);
        match w.state {
            WorkerState::Starting
            | WorkerState::Ready { .. }
            | WorkerState::Killed { respawn: true }
                if rolling =>
            {
                self.rolling_worker_died(&w, status)
            }
            WorkerState::Starting
            | WorkerState::Ready { .. }
            | WorkerState::Killed { respawn: true } => {
                self.log_worker(
                    Level::Warn,
                    "died",
                    pid,
                    w.generation,
                    format!("worker {pid} died ({status})"),
                );
                if let Some(reason) = &w.failure {
                    self.log_worker(
                        Level::Warn,
                        "died_reason",
                        pid,
                        w.generation,
                        format!("worker {pid}: {reason}"),
                    );
                }
                if self.serving == Some(w.generation) && w.slot < self.serving_slots() {
                    self.back_off(w.slot, self.now.duration_since(w.started));
                }
            }
            WorkerState::Draining { .. } | WorkerState::Retiring { .. } => {
                let message = if status.success() {
                    format!("worker {pid} exited")
                } else {
                    format!("worker {pid} exited ({status})")
                };
                self.log_worker(Level::Info, "exited", pid, w.generation, message);
            }
            WorkerState::Killed { respawn: false } => {}
        }
    }

    fn on_probe_exit(&mut self, pid: Pid, status: ExitStatus) {
        let RollPhase::Starting { probe, .. } = &mut self.roll else {
            return;
        };
        let Probe::Running {
            worker_failed,
            reason,
            ..
        } = std::mem::replace(probe, Probe::Passed)
        else {
            return;
        };
        if status.success() {
            match worker_failed {
                Some(error) => self.fail_roll(error),
                None => self.try_promote(),
            }
        } else if status.killed_from_outside() && reason.is_none() {
            self.fail_roll(RollError::ProbeKilled { pid, status });
        } else {
            self.fail_roll(RollError::Probe {
                pid,
                status,
                reason,
            });
        }
    }

    /// A worker of the generation being rolled in died before the roll committed.
    fn rolling_worker_died(&mut self, w: &Worker, status: ExitStatus) {
        let settling = matches!(self.roll, RollPhase::Settling { .. });
        let when = match (w.state, settling) {
            (WorkerState::Starting, _) => "before it was ready",
            (_, false) => "before its generation was ready",
            (_, true) => "right after its generation was ready",
        };
        if status.is_load_failure() {
            // It failed the same validation as the probe (which may not have reported yet).
            return self.fail_roll(RollError::Load {
                pid: w.pid,
                reason: w
                    .failure
                    .clone()
                    .unwrap_or_else(|| format!("worker {} {status}", w.pid)),
            });
        }
        let error = RollError::Died {
            pid: w.pid,
            status,
            when,
            reason: w.failure.clone(),
        };
        if let RollPhase::Starting {
            generation,
            probe: Probe::Running { worker_failed, .. },
            ..
        } = &mut self.roll
        {
            // Stop the generation now; name the failure once the probe reports.
            let generation = *generation;
            worker_failed.get_or_insert(error);
            let starting = self
                .table
                .pids(|o| o.generation == generation && o.state == WorkerState::Starting);
            for pid in starting {
                self.kill(pid, false);
            }
            return;
        }
        self.fail_roll(error);
    }

    /// Refills `slot` after a death: at once the first time, later while its workers keep
    /// dying young.
    pub(super) fn back_off(&mut self, slot: usize, uptime: Duration) {
        if self.stopping() {
            return;
        }
        if !matches!(
            self.table.slots.get(slot).map(|s| s.state),
            Some(SlotState::Active)
        ) {
            return;
        }
        let delay = self.table.backoff(slot, uptime);
        self.out.push(Action::Observe(Observation::WorkerRestarted));
        if !delay.is_zero() {
            self.log(
                Level::Warn,
                "backoff",
                format!("slot {slot} keeps crashing; respawning in {delay:?}"),
            );
            self.table.slots[slot].state = SlotState::Backoff {
                at: self.now + delay,
            };
        }
    }

    /// Deadlines: roll timeout and settle, drain and heartbeat timeouts, respawn backoff,
    /// debounce.
    /// The earliest moment something is due (a `Tick` then has work to do).
    pub fn next_deadline(&self) -> Option<Instant> {
        let roll = match &self.roll {
            RollPhase::Starting { deadline, .. } => Some(*deadline),
            RollPhase::Settling {
                generation,
                until,
                deadline,
                ..
            } => Some(if self.named(*generation) {
                *until
            } else {
                *deadline
            }),
            _ => None,
        };
        let rolling = self.roll.generation();
        let workers = self.table.workers.iter().filter_map(|w| match w.state {
            WorkerState::Draining { kill_at } => Some(kill_at),
            WorkerState::Ready { last_beat } | WorkerState::Retiring { last_beat }
                if !self.s.timeout.is_zero() =>
            {
                Some(last_beat + self.s.timeout)
            }
            WorkerState::Starting if Some(w.generation) != rolling => {
                Some(w.started + self.s.ready_timeout)
            }
            _ => None,
        });
        let slots = self.table.slots.iter().filter_map(|s| match s.state {
            SlotState::Backoff { at } => Some(at),
            // Once settled, the slot waits for its workers to exit, not for a time.
            SlotState::Removing { since } => Some(since + SLOT_SETTLE).filter(|t| *t > self.now),
            SlotState::Active => None,
        });
        let debounce = match self.debounce {
            Debounce::Waiting { due, .. } => Some(due),
            Debounce::Quiet => None,
        };
        roll.into_iter()
            .chain(self.upgrade.deadline())
            .chain(workers)
            .chain(slots)
            .chain(debounce)
            .min()
    }

    pub(super) fn on_tick(&mut self) {
        let now = self.now;
        match &self.roll {
            RollPhase::Starting {
                generation,
                deadline,
                probe,
                ..
            } if *deadline <= now => {
                let generation = *generation;
                let mut pending = self
                    .table
                    .pids(|w| w.generation == generation && w.state == WorkerState::Starting);
                if let Probe::Running { pid, .. } = probe {
                    pending.insert(0, *pid);
                }
                let timeout = self.s.ready_timeout;
                self.fail_roll(RollError::NotReady { timeout, pending });
            }
            RollPhase::Settling { .. } => self.try_commit(),
            _ => {}
        }
        let fast = matches!(
            self.run,
            Run::Stopping {
                mode: StopMode::Fast,
                ..
            }
        );
        let rolling = self.roll.generation();
        let (timeout, ready_timeout, graceful) = (
            self.s.timeout,
            self.s.ready_timeout,
            self.s.graceful_timeout,
        );
        for i in 0..self.table.workers.len() {
            let w = &self.table.workers[i];
            let (pid, generation) = (w.pid, w.generation);
            let (level, event, why) = match w.state {
                WorkerState::Draining { kill_at } if kill_at <= now => {
                    if fast {
                        self.kill(pid, false);
                        continue;
                    }
                    (
                        Level::Warn,
                        "drain_timeout",
                        format!("still draining after --graceful-timeout {graceful:?}"),
                    )
                }
                WorkerState::Ready { last_beat } | WorkerState::Retiring { last_beat }
                    if !timeout.is_zero() && now.duration_since(last_beat) >= timeout =>
                {
                    (
                        Level::Warn,
                        "unresponsive",
                        format!(
                            "sent no heartbeat for {timeout:?} (--timeout): its event loop is blocked"
                        ),
                    )
                }
                WorkerState::Starting
                    if Some(generation) != rolling
                        && now.duration_since(w.started) >= ready_timeout =>
                {
                    (
                        Level::Warn,
                        "unresponsive",
                        format!("not ready within --ready-timeout {ready_timeout:?}"),
                    )
                }
                _ => continue,
            };
            // A hung retiring worker already has its replacement.
            let respawn = event == "unresponsive" && w.state.holds_slot();
            self.log_worker(
                level,
                event,
                pid,
                generation,
                format!("worker {pid} {why}; killing it"),
            );
            if respawn {
                self.table.workers[i].failure = Some(why);
            }
            self.kill(pid, respawn);
        }
        for slot in &mut self.table.slots {
            if let SlotState::Backoff { at } = slot.state {
                if at <= now {
                    slot.state = SlotState::Active;
                }
            }
        }
        self.debounce_due();
        self.upgrade_deadline();
    }
}
