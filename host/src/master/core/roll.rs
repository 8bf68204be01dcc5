//! The roll: snapshot, probe and new generation, then settle and commit, or roll back.

use std::path::Path;
use std::time::Duration;

use crate::metrics::RollResult;
use crate::notify::Notice;

use super::*;

impl Core {
    /// HUP or `angel-host reload`: apply the re-read settings, then roll (or remember one
    /// follow-up roll).
    pub(super) fn on_reload(
        &mut self,
        client: Option<ClientId>,
        config: Option<Result<Reread, String>>,
    ) {
        if self.stopping() {
            if let Some(client) = client {
                self.reload_waiters.push((client, 0));
                self.outcome(0, false, "master is stopping");
            }
            return;
        }
        if let Some(why) = self.busy_upgrading() {
            // The new master re-reads the config and snapshots the library itself.
            let message = format!("reload refused: {why}");
            self.log(Level::Warn, "reload_refused", message.clone());
            if let Some(client) = client {
                self.out.push(Action::Reply {
                    client,
                    reply: Reply::Outcome(ctl::ReloadOutcome {
                        ok: false,
                        generation: self.serving.unwrap_or(0),
                        message,
                    }),
                    hold: false,
                });
            }
            return;
        }
        match config {
            None => {}
            Some(Err(e)) => self.log(
                Level::Error,
                "config_error",
                format!("{e}; keeping the running configuration"),
            ),
            Some(Ok(reread)) => self.apply_settings(reread),
        }
        if let Some(client) = client {
            // The roll this request starts, or the follow-up of the one under way.
            let generation = match self.roll.generation() {
                Some(g) => g + 1,
                None => self.next_generation,
            };
            self.reload_waiters.push((client, generation));
        }
        self.start_roll(Trigger::Explicit);
    }

    /// A re-read config file: what applies at a roll does (the worker count included: the
    /// next roll starts that many); the rest is reported as needing a restart.
    fn apply_settings(&mut self, reread: Reread) {
        let new = *reread.settings;
        for name in reread.restart_needed {
            self.log(
                Level::Warn,
                "config_restart_needed",
                format!("{name} changed in the config file; it takes effect only at a restart"),
            );
        }
        if new.lib.as_os_str().is_empty() {
            self.log(
                Level::Error,
                "config_error",
                "the config file no longer names a library; keeping the running configuration"
                    .into(),
            );
            return;
        }
        let workers = new.workers;
        // Restart-only settings in `new` are not used by the core (the shell keeps the ones
        // it started with), except `zygote`, which is kept here.
        let (zygote, spare) = (self.s.zygote, self.s.spare);
        self.s = new;
        self.s.zygote = zygote;
        self.s.spare = spare;
        self.log(
            Level::Info,
            "config_reloaded",
            "re-read the config file".into(),
        );
        self.set_desired(workers);
    }

    /// Starts a roll, or remembers one follow-up roll if one is under way.
    pub(super) fn start_roll(&mut self, trigger: Trigger) {
        if self.stopping() {
            return;
        }
        if self.roll != RollPhase::Idle {
            self.follow_up = self.follow_up.max(Some(trigger));
            return;
        }
        // Follow a link switched since the last roll, even if this roll fails.
        self.out.push(Action::WatchUpdate);
        let generation = self.next_generation;
        if let Some(serving) = self.serving {
            self.out.push(Action::Notify(Notice::Reloading {
                status: Some(format!("reloading (generation {serving} serving)")),
            }));
        }
        self.roll = RollPhase::Snapshotting {
            generation,
            trigger,
            started: self.now,
        };
        // A file change rolls only onto new content, so its snapshot is hashed before anything
        // starts; any other trigger rolls anyway, and the hash is taken while the probe starts.
        // The first generation is hashed at once too: with nothing serving, a worker that
        // dies right after `ready` must find its generation committed, not waiting for a hash
        // (a 30 MB debug library takes a while).
        self.out.push(Action::Snapshot {
            generation,
            hash: trigger == Trigger::Watch || self.serving.is_none(),
        });
    }

    pub(super) fn on_snapshot(&mut self, generation: u64, result: Result<Build, SnapshotError>) {
        let RollPhase::Snapshotting {
            generation: expected,
            trigger,
            started,
        } = self.roll
        else {
            if result.is_ok() {
                self.out.push(Action::DropSnapshot { generation });
            }
            return;
        };
        if expected != generation {
            if result.is_ok() {
                self.out.push(Action::DropSnapshot { generation });
            }
            return;
        }
        let build = match result {
            Ok(build) => build,
            Err(e) => return self.skip_roll(e),
        };
        if trigger == Trigger::Watch {
            let serving_sha = self
                .serving
                .and_then(|g| self.generations.get(&g))
                .and_then(|b| b.sha256.as_deref());
            let sha = build.sha256.as_deref();
            if sha.is_some() && serving_sha == sha {
                return self.abort_unchanged(generation);
            }
            if sha.is_some() && self.rejected_sha.as_deref() == sha {
                self.log(
                    Level::Info,
                    "reload_unchanged",
                    format!(
                        "{} changed but is still the build that failed (sha {}); waiting for a new build or SIGHUP",
                        build.source.display(),
                        build.short_sha()
                    ),
                );
                return self.abort_unchanged(generation);
            }
        }
        self.next_generation += 1;
        self.generations.insert(generation, build);
        let size = self.desired;
        self.ensure_slots(size);
        let size = size.min(self.table.slots.len());
        self.roll = RollPhase::Starting {
            generation,
            size,
            started,
            deadline: self.now + self.s.ready_timeout,
            probe: Probe::Forking,
        };
        // The probe runs beside the new workers (not before them: that would add a whole
        // process start to every roll); the generation commits only once the probe passed and
        // every worker is ready. The workers are spawned by `fill`.
        self.spawn(generation, Role::Probe);
    }

    /// A watch roll onto content that already serves (or already failed): nothing to do.
    fn abort_unchanged(&mut self, generation: u64) {
        let took = self.took();
        self.roll = RollPhase::Idle;
        self.out.push(Action::DropSnapshot { generation });
        self.roll_ended(RollResult::Skipped, took, None);
        self.run_follow_up();
    }

    /// The probe passed and every slot has a ready worker: promote the generation.
    pub(super) fn try_promote(&mut self) {
        let RollPhase::Starting {
            generation,
            size,
            started,
            probe: Probe::Passed,
            ..
        } = self.roll
        else {
            return;
        };
        if !(0..size).all(|slot| self.table.has(generation, slot, true)) {
            return;
        }
        // A generation serves only once its content is named.
        if self
            .generations
            .get(&generation)
            .is_some_and(|b| b.sha256.is_none())
        {
            return;
        }
        let took_ms = self.now.duration_since(started).as_secs_f64() * 1000.0;
        let previous = self.serving.replace(generation);
        for slot in &mut self.table.slots {
            // A new generation starts with a clean crash record; removals under way go on.
            slot.young_deaths = 0;
            if let SlotState::Backoff { .. } = slot.state {
                slot.state = SlotState::Active;
            }
        }
        let (source, sha) = self
            .generations
            .get(&generation)
            .map(|b| (b.source.display().to_string(), b.short_sha().to_string()))
            .unwrap_or_default();
        let line = format!("{source} (generation {generation}, sha {sha}) in {took_ms:.1} ms");
        let message = format!("reloaded {line}");
        match previous {
            None => {
                self.out.push(Action::Log(Log {
                    level: Level::Info,
                    event: "serving",
                    message: format!(
                        "serving {source} (generation {generation}, sha {sha}, {size} workers) in {took_ms:.1} ms"
                    ),
                    worker: None,
                    generation: Some(generation),
                    took_ms: Some(took_ms),
                }));
                // The first generation has nothing to fall back to: no reason to wait.
                self.active = size;
                self.take_over(generation);
                self.commit(generation, &message);
            }
            Some(previous) => {
                self.out.push(Action::Log(Log {
                    level: Level::Info,
                    event: "reloaded",
                    message: message.clone(),
                    worker: None,
                    generation: Some(generation),
                    took_ms: Some(took_ms),
                }));
                self.roll = RollPhase::Settling {
                    generation,
                    size,
                    started,
                    until: self.now + READY_SETTLE,
                    previous,
                    message,
                };
            }
        }
    }

    /// The settle passed with every new worker alive: the roll is done. The old generation's
    /// workers drain as their slots have a ready new worker (`sweep_stale`).
    pub(super) fn commit(&mut self, generation: u64, message: &str) {
        if let RollPhase::Settling { size, .. } = self.roll {
            self.set_active(size);
        }
        let took = self.took();
        let status = format!(
            "generation {generation} serving ({} workers)",
            self.serving_slots()
        );
        self.roll_ended(RollResult::Ok, took, Some(status));
        self.roll = RollPhase::Idle;
        self.rejected_sha = None;
        self.rejected_generation = None;
        self.outcome(generation, true, message);
        // A `current -> releases/N` switch moves the directory worth watching.
        self.out.push(Action::WatchUpdate);
        self.run_follow_up();
    }

    /// The new build could not even be snapshotted: nothing was started.
    fn skip_roll(&mut self, error: SnapshotError) {
        let took = self.took();
        self.roll = RollPhase::Idle;
        match self.serving {
            None => self.fatal(FirstGenerationError::Snapshot(error)),
            Some(serving) => {
                let message = format!("reload skipped: {error}; keeping generation {serving}");
                self.log(Level::Warn, "reload_skipped", message.clone());
                self.roll_ended(RollResult::Skipped, took, Some(message.clone()));
                self.outcome(self.next_generation, false, &message);
                self.run_follow_up();
            }
        }
    }

    /// The roll failed: stop what it started, keep serving what served.
    pub(super) fn fail_roll(&mut self, error: RollError) {
        let took = self.took();
        let roll = std::mem::replace(&mut self.roll, RollPhase::Idle);
        let Some(generation) = roll.generation() else {
            return;
        };
        if let RollPhase::Settling { previous, .. } = roll {
            // Promoted but not settled: the previous generation never stopped serving.
            self.serving = Some(previous);
        }
        self.abandon(generation, &roll);
        let build = self.generations.get(&generation).cloned();
        self.rejected_sha = build.as_ref().and_then(|b| b.sha256.clone());
        self.rejected_generation = Some(generation);
        let source = build.map(|b| b.source).unwrap_or_default();
        match self.serving {
            None => self.fatal(FirstGenerationError::new(source, error)),
            Some(serving) => {
                let (event, what, result) = if error.is_invalid_build() {
                    ("reload_skipped", "skipped", RollResult::Skipped)
                } else {
                    ("reload_failed", "failed", RollResult::Failed)
                };
                let message = format!(
                    "reload {what}: {}: {error}; keeping generation {serving}",
                    source.display()
                );
                self.log(Level::Warn, event, message.clone());
                self.roll_ended(result, took, Some(message.clone()));
                self.outcome(generation, false, &message);
                self.run_follow_up();
            }
        }
    }

    /// Stops the workers of an abandoned generation. Those already ready may have accepted
    /// connections (they accept from the shared slot sockets as soon as they are ready), so
    /// they drain (`sweep_stale`, once their slot has a ready serving worker); the others
    /// are killed, and so is the probe.
    pub(super) fn abandon(&mut self, generation: u64, roll: &RollPhase) {
        let starting = self
            .table
            .pids(|w| w.generation == generation && w.state == WorkerState::Starting);
        for pid in starting {
            self.kill(pid, false);
        }
        if let RollPhase::Starting {
            probe: Probe::Running { pid, .. },
            ..
        } = roll
        {
            self.out.push(Action::Kill(*pid));
            self.strays.insert(*pid);
        }
    }

    /// The first generation never came up: nothing to keep serving.
    fn fatal(&mut self, error: FirstGenerationError) {
        self.follow_up = None;
        self.begin_stop(StopMode::Fast);
        if let Run::Stopping { failure, .. } = &mut self.run {
            *failure = Some(error);
        }
    }

    /// How long the roll under way has taken so far.
    fn took(&self) -> Duration {
        self.roll
            .started()
            .map_or(Duration::ZERO, |t| self.now.duration_since(t))
    }

    /// A roll ended: count it, and end the manager's `RELOADING` with `READY` (a first
    /// generation's `READY` says it serves).
    fn roll_ended(&mut self, result: RollResult, took: Duration, status: Option<String>) {
        self.out
            .push(Action::Observe(Observation::RollEnded { result, took }));
        self.out.push(Action::Notify(Notice::Ready { status }));
    }

    pub(super) fn run_follow_up(&mut self) {
        if let Some(trigger) = self.follow_up.take() {
            self.start_roll(trigger);
        }
    }

    /// Notes a change of the library (or a link to it) or of another path matching
    /// `--reload-regex`, and (re)starts the debounce; or, for a library replaced at once (a
    /// rename or a hard link into place: cargo's uplift, `mv`, `ln -sfn`), rolls now.
    ///
    /// An atomic replace leaves nothing to wait for: the new file is complete the moment its
    /// name appears, and the roll snapshots it then. The debounce exists for writes in place
    /// (`cp`, `rsync --inplace`), which are visible half-done, and for other paths matching
    /// `--reload-regex` (a burst of them usually belongs to one build). Measured: the debounce
    /// made cargo's relink → new code serving take the debounce plus a roll; without it, the
    /// roll alone.
    pub(super) fn on_file_changed(
        &mut self,
        path: &Path,
        library: bool,
        writing: bool,
        replaced: bool,
    ) {
        // During an upgrade the new master snapshots the library as it is when it starts.
        if self.stopping() || self.upgrade.in_progress() {
            return;
        }
        // Without --reload-regex the library (or a link to it) triggers; with it, exactly the
        // paths it matches do.
        let triggers = match &self.s.matcher.0 {
            None => library,
            Some(_) => self.s.matcher.matches(path),
        };
        if !triggers {
            return;
        }
        if library && replaced {
            // What was pending is covered by this roll (it snapshots the library as it is
            // now), except a change of another matching path: that one still forces a roll
            // even when the library's content turns out unchanged.
            let other = matches!(self.debounce, Debounce::Waiting { other: true, .. });
            self.debounce = Debounce::Quiet;
            return self.start_roll(if other {
                Trigger::WatchOther
            } else {
                Trigger::Watch
            });
        }
        let due = self.now + self.s.debounce;
        let (since, was_writing, other) = match self.debounce {
            Debounce::Waiting {
                since,
                writing,
                other,
                ..
            } => (since, writing, other),
            Debounce::Quiet => (self.now, false, false),
        };
        self.debounce = Debounce::Waiting {
            since,
            due,
            writing: if library { writing } else { was_writing },
            other: other || !library,
        };
    }

    /// The debounce ran out: roll, unless the library is still being written (bounded).
    pub(super) fn debounce_due(&mut self) {
        let Debounce::Waiting {
            since,
            due,
            writing,
            other,
        } = self.debounce
        else {
            return;
        };
        if due > self.now {
            return;
        }
        if writing && self.now.duration_since(since) < WRITE_SETTLE_MAX {
            // The writer has not closed the library yet: wait for it.
            self.debounce = Debounce::Waiting {
                since,
                due: self.now + self.s.debounce,
                writing,
                other,
            };
            return;
        }
        self.debounce = Debounce::Quiet;
        self.start_roll(if other {
            Trigger::WatchOther
        } else {
            Trigger::Watch
        });
    }
}
