//! The processes that help a roll along: each generation's zygote (its probe, kept, which
//! forks the generation's workers), the spare probe that waits for the next roll, and the
//! hash of a snapshot copied without one.

use super::*;

impl Core {
    /// The generations that may still start workers: the serving one, the rolling one and,
    /// while a roll settles, the previous one (it serves again if the roll is rolled back).
    pub(super) fn live_generations(&self) -> Vec<u64> {
        let mut keep: Vec<u64> = self.serving.into_iter().collect();
        keep.extend(self.roll.generation());
        if let RollPhase::Settling { previous, .. } = self.roll {
            keep.push(previous);
        }
        keep
    }

    /// Kills the zygotes of generations that will start no more workers, and all of them
    /// once the master stops.
    pub(super) fn retire_zygotes(&mut self) {
        let keep = if self.stopping() {
            Vec::new()
        } else {
            self.live_generations()
        };
        let retired: Vec<u64> = self
            .zygotes
            .keys()
            .copied()
            .filter(|g| !keep.contains(g))
            .collect();
        for generation in retired {
            if let Some(pid) = self.zygotes.remove(&generation) {
                self.out.push(Action::Kill(pid));
                self.strays.insert(pid);
            }
        }
    }

    /// Starts a spare once a generation serves and no roll is under way; kills it when the
    /// master stops or hands over.
    pub(super) fn keep_spare(&mut self) {
        if self.stopping() || !self.in_charge {
            if let Some(pid) = self.spare.take() {
                self.out.push(Action::Kill(pid));
                self.strays.insert(pid);
            }
            return;
        }
        let wanted = self.s.spare
            && self.serving.is_some()
            && self.roll == RollPhase::Idle
            && !self.upgrade.in_progress()
            && self.spare_deaths < MAX_SPARE_DEATHS;
        if wanted && self.spare.is_none() && !self.forking.iter().any(|s| s.role == Role::Spare) {
            self.spawn(0, Role::Spare);
        }
    }

    /// The probe passed and stays as its generation's zygote.
    pub(super) fn on_zygote(&mut self, pid: Pid) {
        let RollPhase::Starting {
            generation, probe, ..
        } = &mut self.roll
        else {
            return;
        };
        let generation = *generation;
        let Probe::Running { worker_failed, .. } = std::mem::replace(probe, Probe::Passed) else {
            return;
        };
        self.zygotes.insert(generation, pid);
        match worker_failed {
            Some(error) => self.fail_roll(error),
            // Its workers are forked by `fill`.
            None => self.try_promote(),
        }
    }

    /// A generation's zygote exited: killed from outside or crashed, as it was not retired.
    /// Its generation's next workers start by exec.
    pub(super) fn on_zygote_exit(&mut self, generation: u64, pid: Pid, status: ExitStatus) {
        self.zygotes.remove(&generation);
        let level = if self.stopping() {
            Level::Info
        } else {
            Level::Warn
        };
        self.log_worker(
            level,
            "zygote_exited",
            pid,
            generation,
            format!("zygote {pid} of generation {generation} is gone ({status}); its next workers start by exec"),
        );
    }

    /// The hash of a snapshot copied without one.
    pub(super) fn on_hashed(&mut self, generation: u64, result: Result<String, String>) {
        let sha = match result {
            Ok(sha) => sha,
            Err(e) => {
                self.log(
                    Level::Error,
                    "hash_failed",
                    format!("cannot hash the snapshot of generation {generation}: {e}"),
                );
                if self.roll.generation() == Some(generation)
                    && matches!(
                        self.roll,
                        RollPhase::Starting { .. } | RollPhase::Settling { .. }
                    )
                {
                    self.fail_roll(RollError::Hash { error: e });
                }
                return;
            }
        };
        if self.rejected_generation == Some(generation) && self.rejected_sha.is_none() {
            self.rejected_sha = Some(sha.clone());
        }
        let Some(build) = self.generations.get_mut(&generation) else {
            return;
        };
        let newly_named = build.sha256.replace(sha).is_none();
        if !newly_named || self.roll.generation() != Some(generation) {
            return;
        }
        match self.roll {
            // Promoted before its hash came: say it rolled, commit if settled.
            RollPhase::Settling { .. } => {
                self.announce();
                self.try_commit();
            }
            _ => self.try_promote(),
        }
    }
}
