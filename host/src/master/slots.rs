//! Changing the number of worker slots at run time (TTIN / TTOU, `workers` in a re-read
//! config file) without losing a connection.
//!
//! Growing opens one more `SO_REUSEPORT` socket per slot and starts its worker. Shrinking
//! first steers new connections away from the removed slots (a reuseport BPF program, see
//! [`Listeners::steer`]), lets their workers keep accepting for [`SLOT_SETTLE`] so that
//! handshakes under way land and get served, then drains those workers and closes the sockets
//! from the highest slot down once they are gone.

use super::*;

impl Master {
    /// The worker count in effect once pending changes applied.
    pub(super) fn target_workers(&self) -> usize {
        self.pending_resize.unwrap_or(self.cfg.workers)
    }

    /// Moves to `target` slots (clamped to 1..=MAX_WORKERS); deferred during a roll.
    pub(super) fn resize(&mut self, target: usize) {
        let target = target.clamp(1, MAX_WORKERS);
        if self.stop.is_some() {
            return;
        }
        if self.roll.is_some() {
            self.pending_resize = Some(target);
            return;
        }
        let current = self.cfg.workers;
        if target == current {
            if target == 1 {
                tracing::info!(event = "resize", "already at 1 worker; not going below");
            }
            return;
        }
        tracing::info!(
            event = "resize",
            from = current,
            to = target,
            "workers: {current} -> {target}"
        );
        if target > current {
            // Reuse slots still retiring, then open new ones.
            for slot in self.slots.iter_mut().take(target) {
                slot.retiring_since = None;
            }
            while self.slots.len() < target {
                if let Err(e) = self.listeners.add_slot() {
                    tracing::error!(event = "resize_failed", "cannot add a worker slot: {e}");
                    break;
                }
                self.slots.push(Slot::default());
            }
            self.cfg.workers = target.min(self.slots.len());
        } else {
            self.cfg.workers = target;
            let now = Instant::now();
            for slot in self.slots.iter_mut().skip(target) {
                slot.retiring_since.get_or_insert(now);
                slot.respawn_at = None;
            }
        }
        if self.listeners.tcp_slots() > self.cfg.workers || self.steering {
            match self.listeners.steer(self.cfg.workers) {
                Ok(()) => self.steering = true,
                Err(e) => tracing::warn!(
                    event = "steer_failed",
                    "cannot steer connections between slots ({e}); connections queued on a removed slot may be reset"
                ),
            }
        }
        for slot in 0..self.cfg.workers {
            self.respawn(slot);
        }
    }

    /// Drains the workers of settled retiring slots and closes the slots nobody uses any more.
    pub(super) fn retire_slots(&mut self, now: Instant) {
        let settled: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| matches!(w.state, WorkerState::Starting | WorkerState::Ready))
            .filter(|w| {
                self.slots
                    .get(w.slot)
                    .and_then(|s| s.retiring_since)
                    .is_some_and(|t| t + SLOT_SETTLE <= now)
            })
            .map(|w| w.pid)
            .collect();
        for pid in settled {
            self.drain(pid, self.cfg.graceful_timeout);
        }
        while self.slots.len() > self.cfg.workers {
            let last = self.slots.len() - 1;
            let settled = self.slots[last]
                .retiring_since
                .is_some_and(|t| t + SLOT_SETTLE <= now);
            if !settled || self.workers.iter().any(|w| w.slot == last) {
                break;
            }
            self.slots.pop();
            if self.listeners.tcp_slots() > self.slots.len() {
                self.listeners.remove_last_slot();
            }
        }
    }
}
