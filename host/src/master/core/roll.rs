//! The roll: snapshot, probe and new generation, then settle and commit, or roll back.

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
    ///
    /// A `HUP`'s snapshot may still be hashing then (it is hashed beside its copy, and on
    /// two busy cores the hash can finish after the workers are ready). The new workers
    /// serve from the moment they are ready anyway, so the roll does not wait for it here:
    /// it settles meanwhile, and says it rolled (`reloaded ..., sha ...`) and commits only
    /// once the content is named (`try_commit`). A first generation was hashed before it
    /// started.
    pub(super) fn try_promote(&mut self) {
        let RollPhase::Starting {
            generation,
            size,
            started,
            deadline,
            probe: Probe::Passed,
        } = self.roll
        else {
            return;
        };
        if !(0..size).all(|slot| self.table.has(generation, slot, true)) {
            return;
        }
        let took_ms = self.now.duration_since(started).as_secs_f64() * 1000.0;
        let Some(previous) = self.serving else {
            // The first generation has nothing to fall back to: no reason to wait.
            if !self.named(generation) {
                return;
            }
            self.serving = Some(generation);
            self.reset_crash_records();
            let (source, sha) = self.describe(generation);
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
            self.active = size;
            self.take_over(generation);
            let message = self.reloaded_message(generation, took_ms);
            return self.commit(generation, &message);
        };
        self.serving = Some(generation);
        self.reset_crash_records();
        self.roll = RollPhase::Settling {
            generation,
            size,
            started,
            until: self.now + READY_SETTLE,
            previous,
            ready_after: self.now.duration_since(started),
            deadline,
        };
        if self.named(generation) {
            self.announce();
        }
        self.try_commit();
    }

    /// Logs the settling roll's `reloaded ... (generation N, sha ...) in X ms`: once, when
    /// it is both settling and named (at its promotion, or when its hash arrives after it).
    pub(super) fn announce(&mut self) {
        let RollPhase::Settling {
            generation,
            ready_after,
            ..
        } = self.roll
        else {
            return;
        };
        let took_ms = ready_after.as_secs_f64() * 1000.0;
        self.out.push(Action::Log(Log {
            level: Level::Info,
            event: "reloaded",
            message: self.reloaded_message(generation, took_ms),
            worker: None,
            generation: Some(generation),
            took_ms: Some(took_ms),
        }));
    }

    /// A settling roll that is named and settled commits. Past its deadline with no hash,
    /// it fails.
    pub(super) fn try_commit(&mut self) {
        let RollPhase::Settling {
            generation,
            until,
            ready_after,
            deadline,
            ..
        } = self.roll
        else {
            return;
        };
        if !self.named(generation) {
            if deadline <= self.now {
                let timeout = self.s.ready_timeout;
                self.fail_roll(RollError::Unhashed { timeout });
            }
            return;
        }
        if until <= self.now {
            let message = self.reloaded_message(generation, ready_after.as_secs_f64() * 1000.0);
            self.commit(generation, &message);
        }
    }

    /// Whether `generation`'s content hash is known.
    pub(super) fn named(&self, generation: u64) -> bool {
        self.generations
            .get(&generation)
            .is_some_and(|b| b.sha256.is_some())
    }

    /// A new generation starts with a clean crash record; removals under way go on.
    fn reset_crash_records(&mut self) {
        for slot in &mut self.table.slots {
            slot.young_deaths = 0;
            if let SlotState::Backoff { .. } = slot.state {
                slot.state = SlotState::Active;
            }
        }
    }

    /// The library path and short hash of `generation`'s snapshot.
    fn describe(&self, generation: u64) -> (String, String) {
        self.generations
            .get(&generation)
            .map(|b| (b.source.display().to_string(), b.short_sha().to_string()))
            .unwrap_or_default()
    }

    fn reloaded_message(&self, generation: u64, took_ms: f64) -> String {
        let (source, sha) = self.describe(generation);
        format!("reloaded {source} (generation {generation}, sha {sha}) in {took_ms:.1} ms")
    }

    /// The settle passed with every new worker alive and the content named: the roll is
    /// done. The old generation's workers drain as their slots have a ready new worker
    /// (`sweep_stale`).
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
}
