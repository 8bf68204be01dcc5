//! The worker table: spawning, control messages, reaping, respawn with backoff, timeouts.

use super::*;

impl Master {
    /// Kills serving workers whose runtime stopped beating for `--timeout`, and respawned
    /// workers that did not become ready within `--ready-timeout`. Their deaths are then
    /// handled like any other: logged, and respawned with backoff.
    pub(super) fn kill_unresponsive(&mut self, now: Instant) {
        let rolling = self.roll.as_ref().map(|r| r.generation);
        let timeout = self.cfg.timeout;
        let ready_timeout = self.cfg.ready_timeout;
        for w in self.workers.iter_mut().filter(|w| !w.condemned) {
            let why = match w.state {
                WorkerState::Ready
                    if !timeout.is_zero() && now.duration_since(w.last_beat) >= timeout =>
                {
                    format!(
                        "sent no heartbeat for {timeout:?} (--timeout): its event loop is blocked"
                    )
                }
                WorkerState::Starting
                    if Some(w.generation) != rolling
                        && now.duration_since(w.started) >= ready_timeout =>
                {
                    format!("not ready within --ready-timeout {ready_timeout:?}")
                }
                _ => continue,
            };
            tracing::warn!(
                event = "unresponsive",
                worker = w.pid.as_raw(),
                "worker {} {why}; killing it",
                w.pid
            );
            w.failure = Some(why);
            // It stays Ready/Starting: its death counts as unexpected and is respawned.
            let _ = kill(w.pid, Signal::SIGKILL);
            w.condemned = true;
        }
    }

    /// This worker's request limit: `--max-requests` plus a uniform draw from the jitter.
    pub(super) fn request_limit(&self) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        if self.cfg.max_requests == 0 {
            return 0;
        }
        let jitter = self.cfg.max_requests_jitter;
        if jitter == 0 {
            return self.cfg.max_requests;
        }
        // RandomState is randomly keyed per process and per instance: plenty for spreading
        // recycle times, no RNG dependency needed.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(self.next_generation);
        self.cfg.max_requests + h.finish() % (jitter + 1)
    }

    pub(super) fn read_controls(&mut self) {
        let mut events = Vec::new();
        for w in &mut self.workers {
            Self::drain_control(w, &mut events);
        }
        for (pid, msg) in events {
            self.on_message(pid, msg);
        }
    }

    /// Reads every queued message of one worker; EOF closes our end.
    pub(super) fn drain_control(w: &mut Worker, events: &mut Vec<(Pid, Msg)>) {
        let Some(control) = &w.control else { return };
        loop {
            match control::recv_msg(control) {
                Ok(Recv::Msg(Msg::Failed(why))) => w.failure = Some(why),
                Ok(Recv::Msg(Msg::Heartbeat(n))) => {
                    w.requests = n;
                    w.last_beat = Instant::now();
                }
                Ok(Recv::Msg(msg)) => events.push((w.pid, msg)),
                Ok(Recv::Empty) => return,
                Ok(Recv::Eof) | Err(_) => {
                    w.control = None;
                    return;
                }
            }
        }
    }

    pub(super) fn on_message(&mut self, pid: Pid, msg: Msg) {
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return;
        };
        match msg {
            Msg::Ready if w.state == WorkerState::Starting => {
                w.state = WorkerState::Ready;
                w.last_beat = Instant::now();
                self.commit_if_complete();
            }
            Msg::Retiring if w.state == WorkerState::Ready => {
                // The worker stopped accepting at its limit and drains by itself; connections
                // queued on its slot's socket wait there for the replacement.
                tracing::info!(
                    event = "retiring",
                    worker = pid.as_raw(),
                    "worker {pid} reached --max-requests; replacing it"
                );
                w.state = WorkerState::Draining;
                w.kill_at = Some(Instant::now() + self.cfg.graceful_timeout);
                let (slot, generation) = (w.slot, w.generation);
                if self.serving == Some(generation)
                    && self.stop.is_none()
                    && slot < self.cfg.workers
                {
                    let args = self.worker_args(slot, generation);
                    if let Err(e) = self.spawn(args, WorkerState::Starting) {
                        tracing::error!(
                            event = "spawn_failed",
                            "cannot replace retiring worker {pid}: {e}"
                        );
                        self.schedule_respawn(slot, Duration::ZERO);
                    }
                }
            }
            _ => {}
        }
    }

    pub(super) fn reap(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let Some(pid) = status.pid() else { continue };
            let Some(idx) = self.workers.iter().position(|w| w.pid == pid) else {
                continue;
            };
            let mut events = Vec::new();
            Self::drain_control(&mut self.workers[idx], &mut events);
            for (pid, msg) in events {
                self.on_message(pid, msg);
            }
            // on_message may have changed the table (a commit), so find the worker again.
            let Some(idx) = self.workers.iter().position(|w| w.pid == pid) else {
                continue;
            };
            let w = self.workers.swap_remove(idx);
            self.on_exit(w, &status);
        }
    }

    pub(super) fn on_exit(&mut self, w: Worker, wait_status: &WaitStatus) {
        let status = describe_status(wait_status);
        let clean = status_ok(wait_status);
        let rolling = self.roll.as_ref().map(|r| r.generation);
        let why = || match &w.failure {
            Some(reason) => reason.clone(),
            None => format!("worker {} {status}", w.pid),
        };
        match w.state {
            WorkerState::Probing if rolling == Some(w.generation) => {
                let start_failure = self.roll.as_mut().and_then(|r| {
                    r.probe_passed = clean;
                    r.start_failure.take()
                });
                match (clean, start_failure) {
                    (false, _) => self.fail_roll(Failure::Validation, MasterError::Library(why())),
                    (true, Some(reason)) => {
                        self.fail_roll(Failure::Start, MasterError::NotReady(reason))
                    }
                    (true, None) => self.commit_if_complete(),
                }
            }
            WorkerState::Starting | WorkerState::Ready if rolling == Some(w.generation) => {
                let settling = self.roll.as_ref().is_some_and(|r| r.settle_until.is_some());
                let what = match (w.state, settling) {
                    (WorkerState::Starting, _) => "before it was ready",
                    (_, false) => "before its generation was ready",
                    (_, true) => "right after its generation was ready",
                };
                let reason = match &w.failure {
                    Some(reason) => reason.clone(),
                    None => format!("worker {} {status} {what}", w.pid),
                };
                // A worker that could not load the snapshot failed the same validation as
                // the probe (which may simply not have reported yet).
                let probe_pending = self.roll.as_ref().is_some_and(|r| !r.probe_passed);
                match wait_status {
                    WaitStatus::Exited(_, code) if is_load_failure(*code) => {
                        self.fail_roll(Failure::Validation, MasterError::Library(reason))
                    }
                    _ if probe_pending => {
                        // Stop the generation now; name the failure once the probe reports.
                        self.abandon(w.generation, true);
                        if let Some(roll) = &mut self.roll {
                            roll.start_failure.get_or_insert(reason);
                        }
                    }
                    _ => self.fail_roll(Failure::Start, MasterError::NotReady(reason)),
                }
            }
            WorkerState::Starting | WorkerState::Ready => {
                tracing::warn!(
                    event = "died",
                    worker = w.pid.as_raw(),
                    generation = w.generation,
                    "worker {} died ({status})",
                    w.pid
                );
                if let Some(reason) = &w.failure {
                    tracing::warn!(
                        event = "died_reason",
                        worker = w.pid.as_raw(),
                        "worker {}: {reason}",
                        w.pid
                    );
                }
                self.schedule_respawn(w.slot, w.started.elapsed());
            }
            WorkerState::Draining => {
                if clean {
                    tracing::info!(
                        event = "exited",
                        worker = w.pid.as_raw(),
                        generation = w.generation,
                        "worker {} exited",
                        w.pid
                    );
                } else {
                    tracing::info!(
                        event = "exited",
                        worker = w.pid.as_raw(),
                        generation = w.generation,
                        "worker {} exited ({status})",
                        w.pid
                    );
                }
            }
            WorkerState::Probing | WorkerState::Killed => {}
        }
        self.forget_idle_generations();
    }

    pub(super) fn worker_args(&self, slot: usize, generation: u64) -> WorkerArgs {
        let lib = self
            .generations
            .get(&generation)
            .map(|s| s.path.clone())
            .unwrap_or_default();
        WorkerArgs {
            lib,
            probe: false,
            control_fd: -1,
            listeners: Vec::new(),
            slot: slot as u32,
            generation,
            max_requests: self.request_limit(),
            heartbeat_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
            graceful_ms: self.cfg.graceful_timeout.as_millis() as u64,
            log_json: self.cfg.log_format == LogFormat::Json,
        }
    }

    pub(super) fn spawn(
        &mut self,
        mut args: WorkerArgs,
        state: WorkerState,
    ) -> Result<(), MasterError> {
        let (ours, theirs) = control::pair().map_err(io_err("creating a control channel"))?;
        args.control_fd = theirs.as_raw_fd();
        if state != WorkerState::Probing {
            args.listeners = self
                .listeners
                .for_slot(args.slot as usize)
                .into_iter()
                .map(|(fd, kind)| (fd.as_raw_fd(), kind.abi()))
                .collect();
        }
        let pid = spawn::spawn(&self.exe, &args).map_err(io_err("spawning a worker"))?;
        drop(theirs);
        if state != WorkerState::Probing {
            tracing::info!(
                event = "forked",
                worker = pid.as_raw(),
                generation = args.generation,
                slot = args.slot,
                "forked worker[{pid}]"
            );
        }
        self.workers.push(Worker {
            pid,
            slot: args.slot as usize,
            generation: args.generation,
            control: Some(ours),
            state,
            started: Instant::now(),
            kill_at: None,
            requests: 0,
            last_beat: Instant::now(),
            condemned: false,
            failure: None,
        });
        Ok(())
    }

    /// Asks a worker to drain; kills it if it is still there after `grace`.
    pub(super) fn drain(&mut self, pid: Pid, grace: Duration) {
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return;
        };
        let told = w
            .control
            .as_ref()
            .is_some_and(|c| control::send_msg(c.as_fd(), &Msg::Drain).is_ok());
        if !told {
            let _ = kill(w.pid, Signal::SIGTERM);
        }
        w.state = WorkerState::Draining;
        w.kill_at = Some(Instant::now() + grace);
    }

    pub(super) fn schedule_respawn(&mut self, slot: usize, uptime: Duration) {
        if self.stop.is_some() || slot >= self.cfg.workers {
            return;
        }
        let s = &mut self.slots[slot];
        s.young_deaths = if uptime >= HEALTHY_UPTIME {
            1
        } else {
            s.young_deaths + 1
        };
        let delay = match s.young_deaths {
            0 | 1 => Duration::ZERO,
            n => RESPAWN_BACKOFF_BASE
                .saturating_mul(1u32 << (n - 2).min(16))
                .min(RESPAWN_BACKOFF_CAP),
        };
        if !delay.is_zero() {
            tracing::warn!(
                event = "backoff",
                slot,
                "slot {slot} keeps crashing; respawning in {delay:?}"
            );
        }
        s.respawn_at = Some(Instant::now() + delay);
    }

    pub(super) fn respawn(&mut self, slot: usize) {
        let Some(generation) = self.serving else {
            return;
        };
        let occupied = self.workers.iter().any(|w| {
            w.slot == slot
                && w.generation == generation
                && matches!(w.state, WorkerState::Starting | WorkerState::Ready)
        });
        if occupied || self.stop.is_some() || slot >= self.cfg.workers {
            return;
        }
        let args = self.worker_args(slot, generation);
        if let Err(e) = self.spawn(args, WorkerState::Starting) {
            tracing::error!(event = "spawn_failed", "cannot respawn slot {slot}: {e}");
            self.schedule_respawn(slot, Duration::ZERO);
        }
    }
}

/// The worker exit codes that mean "this file is not a loadable angel app of our ABI".
fn is_load_failure(code: i32) -> bool {
    [
        angel::abi::EXIT_LOAD_FAILED,
        angel::abi::EXIT_NOT_AN_APP,
        angel::abi::EXIT_ABI_MISMATCH,
    ]
    .contains(&code)
}
