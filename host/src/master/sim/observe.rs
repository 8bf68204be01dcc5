//! The simulator's observers: what it checks after every step, beside the core's own
//! invariants, and which generations it expects never to serve.

use super::*;

impl Sim {
    /// Marks the rolling generation bad when one of its processes dies or hangs unexpectedly.
    pub(super) fn taint_for(&mut self, event: &Event) {
        let Some(rolling) = self.core.roll.generation() else {
            return;
        };
        if let Event::Exited { pid, .. } = event {
            let live = self
                .core
                .table
                .get(*pid)
                .is_some_and(|w| w.generation == rolling && w.state.holds_slot());
            // A zygote that dies is no verdict on its build: its workers start by exec.
            let probe = self
                .procs
                .get(pid)
                .is_some_and(|p| p.probe && !p.zygote && p.generation == rolling);
            if live || probe {
                self.tainted.insert(rolling);
            }
        }
    }

    pub(super) fn check(
        &mut self,
        before: &RollPhase,
        snapshot: bool,
        retiring: Option<(u64, usize)>,
        spawned: &[Spawn],
        answering: &[Pid],
    ) -> Result<(), TestCaseError> {
        self.core.check_invariants().map_err(|e| self.fail(e))?;
        // A roll that committed from its settle said `reloaded` before.
        if let RollPhase::Settling { generation, .. } = *before {
            let settling = matches!(self.core.roll, RollPhase::Settling { generation: g, .. } if g == generation);
            let committed = !settling && self.core.serving == Some(generation);
            if committed && self.reloaded.get(&generation) != Some(&1) {
                return Err(self.fail(format!("generation {generation} committed unannounced")));
            }
        }
        // 4: every draining worker was told to drain.
        for w in &self.core.table.workers {
            if matches!(w.state, WorkerState::Draining { .. }) && !self.drained.contains(&w.pid) {
                return Err(self.fail(format!("worker {} is draining but was never told", w.pid)));
            }
        }
        // 1: a bad build never replaces the serving generation.
        if let Some(serving) = self.core.serving {
            let settling = matches!(self.core.roll, RollPhase::Settling { generation, .. } if generation == serving);
            if !settling && self.tainted.contains(&serving) {
                return Err(self.fail(format!("bad generation {serving} is serving")));
            }
        }
        // A good build that nothing disturbed always rolls in.
        if let Some(g) = before.generation() {
            // A skipped roll gives its generation number back, so the follow-up it starts
            // in the same step may carry the same number: a snapshot asked for in this step
            // means a new roll began, so the one before ended.
            let ended = self.core.roll.generation() != Some(g) || snapshot;
            let stopping = !matches!(self.core.run, Run::Serving);
            if ended
                && !stopping
                && matches!(
                    before,
                    RollPhase::Starting { .. } | RollPhase::Settling { .. }
                )
                && !self.tainted.contains(&g)
                && self.core.serving != Some(g)
            {
                return Err(self.fail(format!("good generation {g} failed to roll in")));
            }
            // 3: a trigger during the roll yields exactly one follow-up roll.
            if ended && !stopping && self.expect_follow_up && self.core.follow_up.is_none() {
                if !snapshot {
                    return Err(self.fail(format!(
                        "roll of {g} ended; a trigger during it started no follow-up"
                    )));
                }
                self.expect_follow_up = false;
            }
        }
        if self.core.follow_up.is_some() {
            self.expect_follow_up = true;
        }
        if !matches!(self.core.run, Run::Serving) {
            self.expect_follow_up = false;
        }
        // 5: a retiring worker of the rolling generation is replaced in that generation.
        if let Some((generation, slot)) = retiring {
            let still_rolling = matches!(
                self.core.roll,
                RollPhase::Starting { generation: g, .. } | RollPhase::Settling { generation: g, .. } if g == generation
            );
            let replaced = spawned
                .iter()
                .any(|s| s.generation == generation && s.role == Role::Worker { slot });
            if still_rolling && matches!(self.core.run, Run::Serving) && !replaced {
                return Err(self.fail(format!(
                    "retiring worker of rolling generation {generation} (slot {slot}) not replaced"
                )));
            }
        }
        // No zygote is left behind: each live one is its generation's, as the core knows.
        for (pid, p) in &self.procs {
            let dying = matches!(p.next, Some((_, Next::Exit(_))));
            if p.zygote && !dying && self.core.zygotes.get(&p.generation) != Some(pid) {
                return Err(self.fail(format!(
                    "zygote {pid} of generation {} lives on unknown to the core",
                    p.generation
                )));
            }
        }
        // No spare is left behind either.
        for (pid, p) in &self.procs {
            let dying = matches!(p.next, Some((_, Next::Exit(_))));
            // Just started (its `Spawned` is queued), or handed to a probe's spawn whose
            // answer has not come yet (the core kills it if the spawn did not use it).
            let in_flight =
                answering.contains(pid) || self.core.forking.iter().any(|s| s.spare == Some(*pid));
            if p.spare && !dying && self.core.spare != Some(*pid) && !in_flight {
                return Err(self.fail(format!("spare {pid} lives on unknown to the core")));
            }
        }
        // 7: exit at most once.
        if self.exits > 1 {
            return Err(self.fail("exited twice".into()));
        }
        Ok(())
    }
}
