//! The fake processes and the clock: what the simulator starts for the core's spawns, how
//! each one behaves over time, and letting time pass.

use std::time::Duration;

use proptest::prelude::*;

use super::*;

impl Sim {
    pub(super) fn spawn(&mut self, spawn: &Spawn) -> Pid {
        self.next_pid += 1;
        let pid = self.next_pid;
        let quality = self
            .qualities
            .get(&spawn.generation)
            .copied()
            .unwrap_or(Quality::Good);
        let probe = matches!(spawn.role, Role::Probe | Role::Spare);
        let ms = |n| self.now + Duration::from_millis(n);
        // Workers of one generation get ready at different moments (5 to 40 ms), as real ones do.
        let ready_in = 5 + (pid as u64 * 7919) % 36;
        let next = match (spawn.role, quality) {
            // It waits for a snapshot.
            (Role::Spare, _) => None,
            (_, quality) => Some(match (probe, quality) {
                (true, Quality::ProbeFails) => (ms(5), Next::Exit(ExitStatus::Code(65))),
                // Some probes cannot be zygotes (a library initialiser started a thread).
                (true, _) if spawn.offer_zygote && pid % 13 != 0 => (ms(5), Next::Forkable),
                (true, _) => (ms(5), Next::Exit(ExitStatus::Code(0))),
                (false, Quality::ProbeFails) => (ms(8), Next::Exit(ExitStatus::Code(65))),
                (false, Quality::CrashesBeforeReady) => (ms(8), Next::Exit(ExitStatus::Code(1))),
                (false, Quality::NeverReady) => (ms(1_000_000), Next::Beat),
                (false, _) => (ms(ready_in), Next::Ready),
            }),
        };
        if let (Role::Probe, Some(spare)) = (spawn.role, spawn.spare) {
            // Now and then the hand-over fails (the spare's channel broke) and the shell execs
            // a probe instead; the core then kills the spare.
            if spare % 7 != 0 {
                if let Some(p) = self.procs.get_mut(&spare) {
                    p.spare = false;
                    p.generation = spawn.generation;
                    p.quality = quality;
                    p.next = next;
                    self.next_pid -= 1;
                    return spare;
                }
            }
        }
        self.procs.insert(
            pid,
            Proc {
                generation: spawn.generation,
                probe,
                zygote: false,
                spare: spawn.role == Role::Spare,
                forked_from: spawn.zygote,
                upgrade: None,
                quality,
                next,
                ready: false,
                hung: false,
            },
        );
        pid
    }

    /// A process of an upgrade, running the current binary, doing `next` in `ms`.
    pub(super) fn spawn_upgrade(&mut self, next: Next, ms: u64) -> Pid {
        self.next_pid += 1;
        let pid = self.next_pid;
        self.procs.insert(
            pid,
            Proc {
                generation: 0,
                probe: false,
                zygote: false,
                spare: false,
                forked_from: None,
                upgrade: Some(self.binary),
                quality: Quality::Good,
                next: Some((self.now + Duration::from_millis(ms), next)),
                ready: false,
                hung: false,
            },
        );
        pid
    }

    /// Lets `d` pass: every process event and every core deadline in order.
    pub(super) fn advance(&mut self, d: Duration) -> Result<(), TestCaseError> {
        let target = self.now + d;
        let mut stuck = 0;
        loop {
            let due_proc = self
                .procs
                .iter()
                .filter_map(|(pid, p)| p.next.map(|(at, _)| (at, *pid)))
                .min();
            let due_core = self.core.next_deadline();
            // A hash is a process event too: it comes when the shell gets to it.
            let due_hash = self.hashes.iter().map(|(at, ..)| *at).min();
            let due_proc = match (due_proc, due_hash) {
                (Some((p, _)), Some(h)) if h < p => None,
                (None, Some(_)) => None,
                (proc, _) => proc,
            };
            let hash_first = due_hash.is_some_and(|h| due_proc.is_none_or(|(p, _)| h <= p));
            let next = [
                due_proc.map(|(at, _)| at),
                due_hash.filter(|_| hash_first),
                due_core,
                Some(target),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(target)
            .max(self.now);
            let fired = due_proc.filter(|(at, _)| *at <= next);
            let hashed = hash_first && due_hash.is_some_and(|at| at <= next);
            if next == self.now && fired.is_none() && !hashed {
                // A deadline in the past that a tick does not clear would spin the shell.
                stuck += 1;
                if stuck > 100 {
                    return Err(self.fail(format!(
                        "deadline {:?} stays due without progress",
                        due_core.map(|d| d.duration_since(self.now))
                    )));
                }
            }
            self.now = next;
            if let Some((_, pid)) = fired {
                self.fire(pid)?;
            } else if hashed {
                let i = (0..self.hashes.len())
                    .min_by_key(|&i| self.hashes[i].0)
                    .expect("a hash is due");
                let (_, generation, result) = self.hashes.remove(i);
                self.step(Event::Hashed { generation, result })?;
            }
            self.step(Event::Tick)?;
            let later = |at: Instant| at > target;
            if self.now >= target
                && due_proc.is_none_or(|(at, _)| later(at))
                && due_hash.is_none_or(later)
            {
                return Ok(());
            }
            if self.core.exited() && self.procs.is_empty() {
                self.now = target;
                return Ok(());
            }
        }
    }

    pub(super) fn fire(&mut self, pid: Pid) -> Result<(), TestCaseError> {
        let Some(p) = self.procs.get_mut(&pid) else {
            return Ok(());
        };
        let Some((_, next)) = p.next.take() else {
            return Ok(());
        };
        match next {
            Next::Forkable => {
                // It stays, forking, until it is killed.
                p.zygote = true;
                self.step(Event::Worker {
                    pid,
                    msg: WorkerMsg::Forkable,
                })
            }
            Next::Ready => {
                p.ready = true;
                p.next = Some(if p.quality == Quality::CrashesAfterReady {
                    (
                        self.now + Duration::from_millis(5),
                        Next::Exit(ExitStatus::Code(1)),
                    )
                } else {
                    (self.now + Duration::from_secs(1), Next::Beat)
                });
                self.step(Event::Worker {
                    pid,
                    msg: WorkerMsg::Ready,
                })
            }
            Next::Beat => {
                if !p.hung {
                    p.next = Some((self.now + Duration::from_secs(1), Next::Beat));
                    return self.step(Event::Worker {
                        pid,
                        msg: WorkerMsg::Heartbeat(1),
                    });
                }
                Ok(())
            }
            Next::Exit(status) => {
                self.procs.remove(&pid);
                self.step(Event::Exited { pid, status })
            }
            Next::Checked => {
                let good = p.upgrade != Some(Binary::NotAngelHost);
                self.procs.remove(&pid);
                let result = if good {
                    Ok("angel-host 0.1.0".to_string())
                } else {
                    Err("/usr/local/bin/angel-host is not angel-host".to_string())
                };
                self.step(Event::BinaryChecked { pid, result })
            }
            Next::Serving(generation) => {
                // It runs on, as the master in charge; nothing more of it concerns us.
                self.step(Event::Successor {
                    pid,
                    msg: SuccessorMsg::Serving { generation },
                })
            }
            Next::Fails => {
                p.next = Some((self.now + STEP, Next::Exit(ExitStatus::Code(3))));
                self.step(Event::Successor {
                    pid,
                    msg: SuccessorMsg::Failed("error: the first generation failed".into()),
                })
            }
        }
    }
}
