//! The roll protocol: snapshot, probe, new generation, then commit or roll back.

use super::*;

impl Master {
    /// Starts a roll, or remembers one follow-up roll if one is under way.
    pub(super) fn start_roll(&mut self, trigger: Trigger) {
        if self.stop.is_some() {
            return;
        }
        if self.roll.is_some() {
            self.roll_pending = self.roll_pending.max(Some(trigger));
            return;
        }
        let asked = Instant::now();
        if let Some(watch) = &mut self.watch {
            // Follow a link switched since the last roll, even if this roll fails.
            if let Err(e) = watch.update(&self.cfg.lib) {
                tracing::warn!(event = "watch_error", "{e}");
            }
        }
        let generation = self.next_generation;
        let snapshot = match self.snapshots.take(&self.cfg.lib, generation) {
            Ok(s) => s,
            Err(e) => return self.skip_roll(&e.to_string()),
        };
        if trigger == Trigger::Watch {
            let serving_sha = self
                .serving
                .and_then(|g| self.generations.get(&g))
                .map(|s| s.sha256.as_str());
            if serving_sha == Some(snapshot.sha256.as_str()) {
                self.snapshots.remove(&snapshot);
                return;
            }
            if self.rejected_sha.as_deref() == Some(snapshot.sha256.as_str()) {
                tracing::info!(
                    event = "reload_unchanged",
                    "{} changed but is still the build that failed (sha {}); waiting for a new build or SIGHUP",
                    snapshot.source.display(),
                    snapshot.short_sha()
                );
                self.snapshots.remove(&snapshot);
                return;
            }
        }
        self.next_generation += 1;
        let args = WorkerArgs {
            lib: snapshot.path.clone(),
            probe: true,
            ..self.worker_args(0, generation)
        };
        self.generations.insert(generation, snapshot);
        self.roll = Some(Roll {
            generation,
            probe_passed: false,
            start_failure: None,
            settle_until: None,
            previous: None,
            outcome: None,
            deadline: Instant::now() + self.cfg.ready_timeout,
            started: asked,
        });
        if let Err(e) = self.spawn(args, WorkerState::Probing) {
            return self.fail_roll(Failure::Start, e);
        }
        self.spawn_generation(generation);
    }

    /// One worker per slot on the new snapshot.
    fn spawn_generation(&mut self, generation: u64) {
        for slot in 0..self.cfg.workers {
            let args = self.worker_args(slot, generation);
            if let Err(e) = self.spawn(args, WorkerState::Starting) {
                return self.fail_roll(Failure::Start, e);
            }
        }
    }

    /// Commits the rolling generation if its probe passed and every worker is ready.
    pub(super) fn commit_if_complete(&mut self) {
        let Some(roll) = &self.roll else { return };
        let generation = roll.generation;
        if roll.probe_passed && roll.settle_until.is_none() && self.all_ready(generation) {
            self.promote(generation);
        }
    }

    /// Every new worker is ready: the new generation serves. The old one keeps serving beside
    /// it for [`READY_SETTLE`] more, so that a build whose workers die right after reporting
    /// ready is rolled back instead of replacing a good generation; then it drains
    /// ([`Master::commit`]).
    fn promote(&mut self, generation: u64) {
        let Some(roll) = &mut self.roll else { return };
        let took_ms = roll.started.elapsed().as_secs_f64() * 1000.0;
        roll.settle_until = Some(Instant::now() + READY_SETTLE);
        let previous = self.serving.replace(generation);
        roll.previous = previous;
        for slot in &mut self.slots {
            // A new generation starts with a clean crash record; removals under way go on.
            *slot = Slot {
                retiring_since: slot.retiring_since,
                ..Slot::default()
            };
        }
        let Some(s) = self.generations.get(&generation) else {
            return;
        };
        let line = format!(
            "{} (generation {generation}, sha {}) in {took_ms:.1} ms",
            s.source.display(),
            s.short_sha()
        );
        match previous {
            None => tracing::info!(
                event = "serving",
                generation,
                took_ms,
                "serving {} (generation {generation}, sha {}, {} workers) in {took_ms:.1} ms",
                s.source.display(),
                s.short_sha(),
                self.cfg.workers
            ),
            Some(_) => tracing::info!(event = "reloaded", generation, took_ms, "reloaded {line}"),
        }
        if let Some(roll) = &mut self.roll {
            roll.outcome = Some(format!("reloaded {line}"));
        }
        if previous.is_none() {
            // The first generation has nothing to fall back to: no reason to wait.
            self.commit();
        }
    }

    /// The settle passed with every new worker alive: the roll is done, the old generations
    /// drain.
    pub(super) fn commit(&mut self) {
        let Some(roll) = self.roll.take() else { return };
        let generation = roll.generation;
        self.rejected_sha = None;
        if let Some(message) = &roll.outcome {
            self.roll_outcome(generation, true, message);
        }
        let old: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| w.generation != generation)
            // Workers of slots being removed drain when their slot settled (slots.rs).
            .filter(|w| w.slot < self.cfg.workers)
            .filter(|w| matches!(w.state, WorkerState::Starting | WorkerState::Ready))
            .map(|w| w.pid)
            .collect();
        for pid in old {
            self.drain(pid, self.cfg.graceful_timeout);
        }
        if let Some(watch) = &mut self.watch {
            // A `current -> releases/N` switch moves the directory worth watching.
            if let Err(e) = watch.update(&self.cfg.lib) {
                tracing::warn!(event = "watch_error", "{e}");
            }
        }
        self.forget_idle_generations();
        self.follow_up();
    }

    /// The new build could not even be snapshotted: nothing was started.
    pub(super) fn skip_roll(&mut self, why: &str) {
        match self.serving {
            None => {
                self.failure = Some(MasterError::Library(why.to_string()));
                self.stop = Some(Stop::Fast);
            }
            Some(serving) => {
                let message = format!("reload skipped: {why}; keeping generation {serving}");
                tracing::warn!(event = "reload_skipped", "{message}");
                self.roll_outcome(self.next_generation, false, &message);
                self.follow_up();
            }
        }
    }

    /// The roll failed: stop what it started, keep serving what served.
    pub(super) fn fail_roll(&mut self, failure: Failure, error: MasterError) {
        let roll = self.roll.take();
        let generation = roll.as_ref().map(|r| r.generation);
        if let Some(generation) = generation {
            self.abandon(generation, false);
        }
        if let Some(roll) = roll.as_ref().filter(|r| r.settle_until.is_some()) {
            // Promoted but not settled: the previous generation never stopped serving.
            self.serving = roll.previous;
        }
        let snapshot = generation.and_then(|g| self.generations.get(&g));
        self.rejected_sha = snapshot.map(|s| s.sha256.clone());
        let source = snapshot
            .map(|s| format!("{}: ", s.source.display()))
            .unwrap_or_default();
        match self.serving {
            None => {
                // The first generation never came up: nothing to keep serving.
                let error = match error {
                    MasterError::Library(why) => MasterError::Library(format!("{source}{why}")),
                    MasterError::NotReady(why) => MasterError::NotReady(format!(
                        "{source}first generation failed to start: {why}"
                    )),
                    other => other,
                };
                self.failure = Some(error);
                self.roll_pending = None;
                self.stop = Some(Stop::Fast);
            }
            Some(serving) => {
                let what = match failure {
                    Failure::Validation => "skipped",
                    Failure::Start => "failed",
                };
                let message =
                    format!("reload {what}: {source}{error}; keeping generation {serving}");
                tracing::warn!(event = format!("reload_{what}").as_str(), "{message}");
                self.roll_outcome(generation.unwrap_or(0), false, &message);
                self.follow_up();
            }
        }
        self.forget_idle_generations();
    }

    pub(super) fn follow_up(&mut self) {
        if let Some(workers) = self.pending_resize.take() {
            self.resize(workers);
        }
        if let Some(trigger) = self.roll_pending.take() {
            self.start_roll(trigger);
        }
    }

    /// Notes the changes of the library (or of a link to it) and of other paths matching
    /// `--reload-regex`, and (re)starts the debounce.
    pub(super) fn read_watch(&mut self) {
        let Some(watch) = &mut self.watch else { return };
        let changes = watch.take();
        let mut matched = false;
        for change in &changes {
            let library = watch.is_library(&change.path);
            // Without --reload-regex the library (or a link to it) triggers; with it, exactly
            // the paths it matches do.
            let triggers = match &self.cfg.matcher.0 {
                None => library,
                Some(_) => self.cfg.matcher.matches(&change.path),
            };
            if !triggers {
                continue;
            }
            matched = true;
            if library {
                self.lib_writing = change.writing;
            } else {
                self.watch_other = true;
            }
        }
        if matched {
            let now = Instant::now();
            self.watch_since.get_or_insert(now);
            self.watch_due = Some(now + self.cfg.debounce);
        }
    }

    /// A stop cancels a roll under way without calling it a failure.
    pub(super) fn fail_roll_quietly(&mut self) {
        if let Some(roll) = self.roll.take() {
            self.abandon(roll.generation, false);
        }
    }

    /// Stops the workers of an abandoned generation. Those already ready may have accepted
    /// connections (they accept from the shared slot sockets as soon as they are ready), so
    /// they drain like any old worker; the others are killed. The probe is left running if
    /// `keep_probe` (its verdict is still awaited).
    pub(super) fn abandon(&mut self, generation: u64, keep_probe: bool) {
        let (ready, other): (Vec<&mut Worker>, Vec<&mut Worker>) = self
            .workers
            .iter_mut()
            .filter(|w| w.generation == generation)
            .filter(|w| !matches!(w.state, WorkerState::Killed | WorkerState::Draining))
            .filter(|w| !(keep_probe && w.state == WorkerState::Probing))
            .partition(|w| w.state == WorkerState::Ready);
        for w in other {
            let _ = kill(w.pid, Signal::SIGKILL);
            w.state = WorkerState::Killed;
            w.kill_at = None;
        }
        let ready: Vec<Pid> = ready.into_iter().map(|w| w.pid).collect();
        for pid in ready {
            self.drain(pid, self.cfg.graceful_timeout);
        }
    }

    pub(super) fn all_ready(&self, generation: u64) -> bool {
        let ready = self
            .workers
            .iter()
            .filter(|w| w.generation == generation && w.state == WorkerState::Ready)
            .count();
        ready == self.cfg.workers
    }

    /// Drops the snapshots of generations that neither serve, roll in, nor have workers left.
    pub(super) fn forget_idle_generations(&mut self) {
        let rolling = self.roll.as_ref().map(|r| r.generation);
        let idle: Vec<u64> = self
            .generations
            .keys()
            .copied()
            .filter(|&g| Some(g) != self.serving && Some(g) != rolling)
            .filter(|&g| !self.workers.iter().any(|w| w.generation == g))
            .collect();
        for g in idle {
            if let Some(s) = self.generations.remove(&g) {
                self.snapshots.remove(&s);
            }
        }
    }
}
