//! The worker table: slots (one listening socket each) and the worker processes in them.

use std::time::{Duration, Instant};

use super::Pid;

/// A slot whose worker lived at least this long before dying is respawned at once.
pub const HEALTHY_UPTIME: Duration = Duration::from_secs(10);
/// Backoff between respawns of a slot whose workers keep dying young: doubles from the base
/// up to the cap, so a crash loop costs a few forks per minute, not a fork storm.
pub const RESPAWN_BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const RESPAWN_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Lifecycle of one worker process, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Spawned; its app has not reported ready yet.
    Starting,
    /// Serving; `last_beat` is the last sign of life of its runtime (ready or heartbeat).
    Ready { last_beat: Instant },
    /// Asked to be replaced (its request limit, or its app called `retire()`): its slot gets
    /// a new worker, and it is told to drain once that one is ready. Until then it serves
    /// what it still accepts (an app that called `retire()` keeps accepting; one at its
    /// request limit has stopped by itself).
    Retiring { last_beat: Instant },
    /// Told to drain (or retiring by itself, and told anyway): finishing in-flight work. It
    /// is killed if still alive at `kill_at`.
    Draining { kill_at: Instant },
    /// Sent SIGKILL; only waiting to be reaped. `respawn`: its death counts as unexpected (it
    /// was killed for hanging) and its slot is refilled.
    Killed { respawn: bool },
}

impl WorkerState {
    /// The name `status` shows.
    pub fn as_str(&self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready { .. } => "ready",
            WorkerState::Retiring { .. } => "retiring",
            WorkerState::Draining { .. } => "draining",
            WorkerState::Killed { .. } => "killed",
        }
    }

    /// Starting, ready or retiring: accepts (or may accept) connections on its slot's socket.
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            WorkerState::Starting | WorkerState::Ready { .. } | WorkerState::Retiring { .. }
        )
    }

    /// Starting or ready: holds its slot for its generation (a retiring worker does not).
    pub fn holds_slot(&self) -> bool {
        matches!(self, WorkerState::Starting | WorkerState::Ready { .. })
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, WorkerState::Ready { .. })
    }
}

/// One worker process.
#[derive(Debug, Clone)]
pub struct Worker {
    pub pid: Pid,
    pub slot: usize,
    pub generation: u64,
    pub started: Instant,
    /// Requests served, from its heartbeats.
    pub requests: u64,
    /// The reason the worker (or the master, killing it) gave for failing.
    pub failure: Option<String>,
    pub state: WorkerState,
}

/// What a slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Filled by the serving generation whenever it has no live worker there.
    Active,
    /// Its workers kept dying young: refilled at `at`.
    Backoff { at: Instant },
    /// Being removed (TTOU, a smaller `workers`): new connections are steered away from its
    /// socket since `since`; its worker drains once they had time to settle, and the socket
    /// closes once the slot is empty.
    Removing { since: Instant },
}

#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub state: SlotState,
    /// Consecutive deaths of young workers in this slot.
    pub young_deaths: u32,
}

impl Slot {
    pub fn active() -> Self {
        Slot {
            state: SlotState::Active,
            young_deaths: 0,
        }
    }
}

/// Slots and workers. Slot `i` owns listening socket `i` (the shell keeps the sockets); a
/// worker in slot `i`, of any generation, accepts from it.
#[derive(Debug, Default)]
pub struct WorkerTable {
    pub slots: Vec<Slot>,
    pub workers: Vec<Worker>,
}

impl WorkerTable {
    pub fn get(&self, pid: Pid) -> Option<&Worker> {
        self.workers.iter().find(|w| w.pid == pid)
    }

    pub fn get_mut(&mut self, pid: Pid) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.pid == pid)
    }

    pub fn remove(&mut self, pid: Pid) -> Option<Worker> {
        let idx = self.workers.iter().position(|w| w.pid == pid)?;
        Some(self.workers.remove(idx))
    }

    /// Whether `generation` has a worker holding `slot` (or, with `ready`, a ready one).
    pub fn has(&self, generation: u64, slot: usize, ready: bool) -> bool {
        self.workers.iter().any(|w| {
            w.generation == generation
                && w.slot == slot
                && if ready {
                    w.state.is_ready()
                } else {
                    w.state.holds_slot()
                }
        })
    }

    /// Pids of the workers matching `f`.
    pub fn pids(&self, f: impl Fn(&Worker) -> bool) -> Vec<Pid> {
        self.workers
            .iter()
            .filter(|w| f(w))
            .map(|w| w.pid)
            .collect()
    }

    pub fn has_generation(&self, generation: u64) -> bool {
        self.workers.iter().any(|w| w.generation == generation)
    }

    /// Records a young death in `slot` and says how long to wait before refilling it.
    pub fn backoff(&mut self, slot: usize, uptime: Duration) -> Duration {
        let Some(s) = self.slots.get_mut(slot) else {
            return Duration::ZERO;
        };
        s.young_deaths = if uptime >= HEALTHY_UPTIME {
            1
        } else {
            s.young_deaths.saturating_add(1)
        };
        match s.young_deaths {
            0 | 1 => Duration::ZERO,
            n => RESPAWN_BACKOFF_BASE
                .saturating_mul(1u32 << (n - 2).min(16))
                .min(RESPAWN_BACKOFF_CAP),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_for_young_deaths_and_resets_after_a_healthy_life() {
        let mut t = WorkerTable {
            slots: vec![Slot::active()],
            workers: Vec::new(),
        };
        let young = Duration::from_millis(10);
        assert_eq!(t.backoff(0, young), Duration::ZERO);
        assert_eq!(t.backoff(0, young), Duration::from_millis(100));
        assert_eq!(t.backoff(0, young), Duration::from_millis(200));
        for _ in 0..20 {
            t.backoff(0, young);
        }
        assert_eq!(t.backoff(0, young), RESPAWN_BACKOFF_CAP);
        assert_eq!(t.backoff(0, HEALTHY_UPTIME), Duration::ZERO);
    }

    #[test]
    fn states_have_stable_names() {
        let now = Instant::now();
        let names: Vec<&str> = [
            WorkerState::Starting,
            WorkerState::Ready { last_beat: now },
            WorkerState::Retiring { last_beat: now },
            WorkerState::Draining { kill_at: now },
            WorkerState::Killed { respawn: true },
        ]
        .iter()
        .map(WorkerState::as_str)
        .collect();
        assert_eq!(
            names,
            ["starting", "ready", "retiring", "draining", "killed"]
        );
    }
}
