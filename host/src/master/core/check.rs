//! What the core shows: `status`, and the invariants it checks on itself.

use std::collections::BTreeSet;

use super::*;

impl Core {
    /// What `angel-host status` shows (the shell adds the listening addresses).
    pub fn status(&self) -> ctl::Status {
        let serving = self.serving.and_then(|g| self.generations.get(&g));
        let mut workers: Vec<ctl::WorkerStatus> = self
            .table
            .workers
            .iter()
            .map(|w| ctl::WorkerStatus {
                pid: w.pid,
                slot: w.slot,
                generation: w.generation,
                state: w.state.as_str().to_string(),
                age_secs: self.now.duration_since(w.started).as_secs_f64(),
                requests: w.requests,
            })
            .collect();
        workers.sort_by_key(|w| (w.generation, w.slot, w.pid));
        ctl::Status {
            pid: self.pid,
            uptime_secs: self.now.duration_since(self.started_at).as_secs_f64(),
            generation: self.serving.unwrap_or(0),
            lib: self.s.lib.clone(),
            library: serving.map(|b| b.source.clone()),
            sha256: serving.and_then(|b| b.sha256.clone()),
            listening: Vec::new(),
            rolling: matches!(
                self.roll,
                RollPhase::Snapshotting { .. } | RollPhase::Starting { .. }
            ) || self.follow_up.is_some(),
            settling: matches!(self.roll, RollPhase::Settling { .. }),
            stopping: self.stopping(),
            configured_workers: if self.serving.is_some() {
                self.serving_slots()
            } else {
                self.desired
            },
            workers,
            binary: None,
            started_unix: None,
            helpers: self
                .zygotes
                .iter()
                .map(|(&generation, &pid)| ctl::HelperStatus {
                    pid,
                    role: "zygote".into(),
                    generation: Some(generation),
                })
                .chain(self.spare.map(|pid| ctl::HelperStatus {
                    pid,
                    role: "spare".into(),
                    generation: None,
                }))
                .collect(),
        }
    }

    /// Checks the invariants that the state alone can show (the simulator checks the ones
    /// that need history). Returns the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut pids = BTreeSet::new();
        for w in &self.table.workers {
            if !pids.insert(w.pid) {
                return Err(format!("pid {} appears twice in the table", w.pid));
            }
            if w.slot >= self.table.slots.len() {
                return Err(format!(
                    "worker {} is in slot {} beyond the table",
                    w.pid, w.slot
                ));
            }
        }
        for p in &self.strays {
            if !pids.insert(*p) {
                return Err(format!("stray pid {p} is also in the table"));
            }
        }
        if let RollPhase::Starting {
            probe: Probe::Running { pid, .. },
            ..
        } = &self.roll
        {
            if !pids.insert(*pid) {
                return Err(format!("probe pid {pid} is also a worker or stray"));
            }
        }
        if let Some(serving) = self.serving {
            // A generation may serve (settle) before it is named, never commit.
            let settling = matches!(self.roll, RollPhase::Settling { generation, .. } if generation == serving);
            if !settling && !self.named(serving) {
                return Err(format!(
                    "generation {serving} committed before its content hash is known"
                ));
            }
        }
        let live = if self.stopping() {
            Vec::new()
        } else {
            self.live_generations()
        };
        if let Some(spare) = self.spare {
            if !pids.insert(spare) {
                return Err(format!("spare {spare} is also a worker, stray or probe"));
            }
        }
        for (generation, pid) in &self.zygotes {
            if !pids.insert(*pid) {
                return Err(format!(
                    "zygote {pid} of generation {generation} is also a worker, stray or probe"
                ));
            }
            if !live.contains(generation) {
                return Err(format!(
                    "zygote {pid} of generation {generation} is kept, but its generation starts no more workers"
                ));
            }
        }
        if let (Some(serving), Some(rolling)) = (self.serving, self.roll.generation()) {
            if matches!(self.roll, RollPhase::Starting { .. }) && serving >= rolling {
                return Err(format!(
                    "serving generation {serving} is not older than rolling {rolling}"
                ));
            }
        }
        if let RollPhase::Settling {
            generation,
            previous,
            ..
        } = self.roll
        {
            if self.serving != Some(generation) || previous >= generation {
                return Err(format!(
                    "settling {generation} (previous {previous}) but serving {:?}",
                    self.serving
                ));
            }
        }
        if let Some(serving) = self.serving {
            if !self.generations.contains_key(&serving) {
                return Err(format!("serving generation {serving} has no snapshot"));
            }
        }
        if matches!(self.run, Run::Serving) {
            if self.serving.is_some() && self.roll == RollPhase::Idle {
                let size = self.serving_slots();
                for slot in 0..size {
                    let s = self.table.slots[slot];
                    let covered = self.serving.is_some_and(|g| self.occupied(g, slot))
                        || matches!(s.state, SlotState::Backoff { .. });
                    if !covered {
                        return Err(format!(
                            "slot {slot} has no serving worker and no respawn scheduled"
                        ));
                    }
                }
            }
        } else if self.follow_up.is_some() || self.roll != RollPhase::Idle {
            return Err("a roll is under way or pending during a stop".into());
        }
        Ok(())
    }

    /// The live workers of the serving generation, for tests.
    #[cfg(test)]
    pub fn serving_ready(&self) -> usize {
        self.serving.map_or(0, |g| {
            (0..self.table.slots.len())
                .filter(|&slot| self.table.has(g, slot, true))
                .count()
        })
    }

    #[cfg(test)]
    pub fn desired(&self) -> usize {
        self.desired
    }
}
