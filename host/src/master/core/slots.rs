//! Stopping, changing the number of worker slots at run time (TTIN / TTOU, `workers` in a
//! re-read config file) without losing a connection, and draining the workers of generations
//! that no longer serve once their slot is served (`sweep_stale`).
//!
//! Growing opens one more `SO_REUSEPORT` socket per slot and fills it. Shrinking first steers
//! new connections away from the removed slots ([`Action::Steer`]), lets their workers keep
//! accepting for [`SLOT_SETTLE`] so that handshakes under way land and get served, then drains
//! those workers and closes the sockets from the highest slot down once they are gone.

use super::*;
use crate::settings::MAX_WORKERS;

/// What a graceful stop asks the service manager for beyond `--graceful-timeout`: the last
/// kills, reaping and removing the pidfile.
const STOP_MARGIN: Duration = Duration::from_secs(5);

impl Core {
    pub(super) fn on_stop(&mut self, mode: StopMode, client: Option<ClientId>) {
        if let Some(client) = client {
            self.out.push(Action::Reply {
                client,
                reply: Reply::Outcome(ctl::ReloadOutcome {
                    ok: true,
                    generation: 0,
                    message: "stopping".into(),
                }),
                hold: true,
            });
        }
        match (&self.run, mode) {
            (Run::Serving, StopMode::Graceful) => self.begin_stop(StopMode::Graceful),
            (
                Run::Serving
                | Run::Stopping {
                    mode: StopMode::Graceful,
                    ..
                },
                _,
            ) => self.begin_stop(StopMode::Fast),
            _ => {}
        }
    }

    /// Graceful: every live worker drains, bounded by `--graceful-timeout`. Fast: every worker
    /// is killed at once.
    pub(super) fn begin_stop(&mut self, mode: StopMode) {
        let failure = match &mut self.run {
            Run::Stopping { failure, .. } => failure.take(),
            _ => None,
        };
        self.run = Run::Stopping { mode, failure };
        self.follow_up = None;
        self.debounce = Debounce::Quiet;
        let roll = std::mem::replace(&mut self.roll, RollPhase::Idle);
        if let Some(generation) = roll.generation() {
            if let RollPhase::Settling { previous, .. } = roll {
                self.serving = Some(previous);
            }
            self.abandon(generation, &roll);
        }
        self.outcome(0, false, "master is stopping");
        self.abandon_upgrade();
        for slot in &mut self.table.slots {
            if let SlotState::Backoff { .. } = slot.state {
                slot.state = SlotState::Active;
            }
        }
        // A master not in charge (handed over, or not taken over yet) speaks for nobody.
        if self.in_charge {
            self.out
                .push(Action::Notify(crate::notify::Notice::Stopping));
        }
        // Before any drain: the sockets stop taking handshakes first, so what a draining
        // worker finds queued is all there will be. Sockets that are another master's are
        // only let go of.
        if !self.listeners_closed {
            self.listeners_closed = true;
            self.out.push(if self.in_charge {
                Action::CloseListeners
            } else {
                Action::ReleaseListeners
            });
        }
        match mode {
            StopMode::Graceful => {
                // Ask the manager for the drain's time (bounded by --graceful-timeout).
                if self.in_charge {
                    self.out
                        .push(Action::Notify(crate::notify::Notice::ExtendTimeout(
                            self.s.graceful_timeout + STOP_MARGIN,
                        )));
                }
                self.log(
                    Level::Info,
                    "stopping",
                    format!(
                        "stopping gracefully (--graceful-timeout {:?})",
                        self.s.graceful_timeout
                    ),
                );
                for pid in self.table.pids(|w| w.state.is_live()) {
                    self.drain(pid);
                }
            }
            StopMode::Fast => {
                self.log(Level::Info, "stopping", "stopping now".into());
                for pid in self
                    .table
                    .pids(|w| !matches!(w.state, WorkerState::Killed { .. }))
                {
                    self.kill(pid, false);
                }
            }
        }
    }

    pub(super) fn on_resize(&mut self, r: Resize) {
        if self.stopping() {
            return;
        }
        if let Some(why) = self.busy_upgrading() {
            self.log(
                Level::Warn,
                "resize_refused",
                format!("resize refused: {why}"),
            );
            return;
        }
        let target = match r {
            Resize::More => self.desired.saturating_add(1),
            Resize::Fewer => self.desired.saturating_sub(1),
        };
        if target == 0 {
            self.log(
                Level::Info,
                "resize",
                "already at 1 worker; not going below".into(),
            );
            return;
        }
        self.set_desired(target);
    }

    /// The slot count wanted from now on; applied when no roll is under way (a roll starts
    /// its generation at this size).
    pub(super) fn set_desired(&mut self, target: usize) {
        self.desired = target.clamp(1, MAX_WORKERS);
    }

    /// The serving generation now fills `size` slots.
    pub(super) fn set_active(&mut self, size: usize) {
        if size != self.active && self.active != 0 {
            self.log(
                Level::Info,
                "resize",
                format!("workers: {} -> {size}", self.active),
            );
        }
        self.active = size;
    }

    /// Makes sure slots `0..n` exist and are not being removed.
    pub(super) fn ensure_slots(&mut self, n: usize) {
        while self.table.slots.len() < n {
            self.table.slots.push(Slot::active());
            self.out.push(Action::AddSlot);
        }
        for slot in self.table.slots.iter_mut().take(n) {
            if let SlotState::Removing { .. } = slot.state {
                slot.state = SlotState::Active;
            }
        }
    }

    pub(super) fn on_slot_add_failed(&mut self, error: &str) {
        self.log(
            Level::Error,
            "resize_failed",
            format!("cannot add a worker slot: {error}"),
        );
        self.table.slots.pop();
        let len = self.table.slots.len().max(1);
        self.desired = self.desired.min(len);
        if let RollPhase::Starting { size, .. } = &mut self.roll {
            *size = (*size).min(len);
        }
    }

    /// No roll under way: grow to or shrink to `desired` slots. Shrinking steers new
    /// connections away from the removed slots first; their workers drain once those
    /// settled (`retire_slots`).
    pub(super) fn apply_resize(&mut self) {
        let target = self.desired;
        self.ensure_slots(target);
        let now = self.now;
        for slot in self.table.slots.iter_mut().skip(target) {
            if !matches!(slot.state, SlotState::Removing { .. }) {
                slot.state = SlotState::Removing { since: now };
            }
        }
        self.set_active(target);
        let needs_steering = self.table.slots.len() > target || self.steered.is_some();
        if needs_steering && self.steered != Some(target) {
            self.steered = Some(target);
            self.out.push(Action::Steer { active: target });
        }
    }

    /// Drains the workers of settled removed slots and closes the slots nobody uses any more,
    /// from the top down.
    pub(super) fn retire_slots(&mut self) {
        let now = self.now;
        let settled = |s: &Slot| matches!(s.state, SlotState::Removing { since } if since + SLOT_SETTLE <= now);
        let draining = self
            .table
            .pids(|w| w.state.is_live() && self.table.slots.get(w.slot).is_some_and(settled));
        for pid in draining {
            self.drain(pid);
        }
        while let Some(last) = self.table.slots.last() {
            let index = self.table.slots.len() - 1;
            if !settled(last) || self.table.workers.iter().any(|w| w.slot == index) {
                break;
            }
            self.table.slots.pop();
            self.out.push(Action::RemoveLastSlot);
        }
    }

    /// Drains live workers of generations that neither serve, roll in, nor are the previous
    /// generation of a settling roll, once their slot has a ready serving worker (or is
    /// beyond the serving size). Workers of removed slots drain when the slot settled.
    pub(super) fn sweep_stale(&mut self) {
        let Some(serving) = self.serving else { return };
        let mut legit = vec![serving];
        legit.extend(self.roll.generation());
        if let RollPhase::Settling { previous, .. } = self.roll {
            legit.push(previous);
        }
        let size = self.serving_slots();
        let stale = self.table.pids(|w| {
            w.state.is_live()
                && !legit.contains(&w.generation)
                && !matches!(
                    self.table.slots.get(w.slot).map(|s| s.state),
                    Some(SlotState::Removing { .. })
                )
                && (w.slot >= size || self.table.has(serving, w.slot, true))
        });
        // A retiring worker drains once its slot has a ready worker of a live generation.
        let replaced = self.table.pids(|w| {
            matches!(w.state, WorkerState::Retiring { .. })
                && legit.iter().any(|g| self.table.has(*g, w.slot, true))
        });
        for pid in stale.into_iter().chain(replaced) {
            self.drain(pid);
        }
    }
}
