//! Deterministic simulation of the master's core: fake processes, fake pids, a fake clock.
//!
//! proptest generates a sequence of [`Op`]s — operator actions (HUP, reload, config re-reads,
//! TTIN/TTOU, TERM/INT/stop), file changes, new builds of any quality (good, rejected by the
//! probe, failing to load, crashing before or right after ready, never ready), crashes,
//! retirements and hangs of any worker, a probe killed from outside, upgrades of the master
//! onto binaries of any quality (good, not angel-host, failing, crashing or never serving the
//! new master), and time passing — and
//! [`Sim`] plays it against a real [`Core`]. Fake processes answer the core's actions the way
//! real workers do (ready after a few ms, heartbeats every second, exit after a drain, die
//! when killed). After every step the core's own invariants and the history-based ones below
//! are checked; at the end the simulator lets time run and checks liveness: every slot
//! serves (or the master exited, if it was stopped or its first build was bad).
//!
//! A failure shrinks to a minimal sequence and is saved under `host/proptest-regressions/`,
//! which is replayed first on every run. The default run is 10 000 sequences; a longer one:
//! `PROPTEST_CASES=200000 cargo test --release -p angel-host sim::`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proptest::prelude::*;

use super::core::*;
use crate::notify::Notice;
use crate::settings::Settings;
use ops::Hashing;

/// How a build behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quality {
    Good,
    /// The probe rejects it (a worker fails to load it too).
    ProbeFails,
    /// Workers die before they are ready.
    CrashesBeforeReady,
    /// Workers report ready, then die within a few milliseconds.
    CrashesAfterReady,
    /// Workers never report ready.
    NeverReady,
}

/// How the binary at the master's path behaves in an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binary {
    Good,
    /// `--version` does not say angel-host (a corrupt or foreign file).
    NotAngelHost,
    /// The new master says why and exits before it serves.
    FailsToStart,
    /// The new master crashes before it serves.
    Crashes,
    /// The new master never serves.
    NeverServes,
}

/// A fake child process.
#[derive(Debug, Clone)]
struct Proc {
    generation: u64,
    probe: bool,
    /// A probe that stayed as its generation's zygote.
    zygote: bool,
    /// A worker forked by this zygote (else exec'd).
    forked_from: Option<Pid>,
    /// A probe started ahead of its roll, waiting for a snapshot (generation 0 until then).
    spare: bool,
    /// A process of an upgrade (the binary check or the new master), not a worker.
    upgrade: Option<Binary>,
    quality: Quality,
    /// Scheduled: (when, what).
    next: Option<(Instant, Next)>,
    ready: bool,
    hung: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Ready,
    /// The probe checked the build and offers to stay as the zygote.
    Forkable,
    Beat,
    Exit(ExitStatus),
    /// The binary check prints its version (or not) and exits.
    Checked,
    /// The new master reports serving this generation.
    Serving(u64),
    /// The new master reports why it fails, then exits.
    Fails,
}

const STEP: Duration = Duration::from_millis(10);

struct Sim {
    core: Core,
    now: Instant,
    next_pid: Pid,
    procs: BTreeMap<Pid, Proc>,
    /// Content the next snapshot copies: (id, quality).
    content: (u64, Quality),
    /// Snapshots taken without their hash: when the shell hashes each, its generation, the
    /// hash.
    hashes: Vec<(Instant, u64, Result<String, String>)>,
    /// How the next snapshots' later hashes go.
    hashing: Hashing,
    snapshot_fails: bool,
    qualities: BTreeMap<u64, Quality>,
    /// Generations that must never serve after their roll: a non-good build, or one whose
    /// worker or probe died or hung while it rolled in.
    tainted: BTreeSet<u64>,
    drained: BTreeSet<Pid>,
    expect_follow_up: bool,
    exits: usize,
    /// A RELOADING=1 was sent and not answered by READY=1 yet.
    reloading: bool,
    next_client: ClientId,
    /// What the next upgrade finds at the binary's path.
    binary: Binary,
    /// Upgrades handed over (at most one: the master then stops).
    handed_over: usize,
    /// `reloaded` lines logged, per generation.
    reloaded: BTreeMap<u64, usize>,
    /// The ops so far (and with `trace`, every event and action: set `ANGEL_SIM_TRACE=1` to
    /// see them in a failure).
    history: Vec<String>,
    trace: bool,
}

impl Sim {
    fn new(workers: usize) -> Self {
        Self::with_zygote(workers, false)
    }

    /// A master whose generations fork their workers from a zygote (`zygote`), or exec them.
    fn with_zygote(workers: usize, zygote: bool) -> Self {
        let now = Instant::now();
        let mut s = Settings::for_tests(workers);
        s.max_requests = 0;
        s.zygote = zygote;
        s.spare = zygote;
        Sim {
            // Not 1: a master that is PID 1 refuses to upgrade.
            core: Core::new(s, 42, now, 7),
            now,
            next_pid: 100,
            procs: BTreeMap::new(),
            content: (1, Quality::Good),
            hashes: Vec::new(),
            hashing: Hashing::Quick,
            snapshot_fails: false,
            qualities: BTreeMap::new(),
            tainted: BTreeSet::new(),
            drained: BTreeSet::new(),
            expect_follow_up: false,
            exits: 0,
            reloading: false,
            next_client: 0,
            binary: Binary::Good,
            handed_over: 0,
            reloaded: BTreeMap::new(),
            history: Vec::new(),
            trace: std::env::var_os("ANGEL_SIM_TRACE").is_some(),
        }
    }

    fn fail(&self, why: String) -> TestCaseError {
        let tail: Vec<&String> = self.history.iter().rev().take(30).rev().collect();
        TestCaseError::fail(format!("{why}\n--- last steps ---\n{tail:#?}"))
    }

    /// Hands one event to the core, answers its actions, and checks every invariant.
    fn step(&mut self, event: Event) -> Result<(), TestCaseError> {
        let mut queue = vec![event];
        while !queue.is_empty() {
            let event = queue.remove(0);
            let before_roll = self.core.roll.clone();
            self.taint_for(&event);
            let retiring = match &event {
                Event::Worker {
                    pid,
                    msg: WorkerMsg::Retiring,
                } => self
                    .core
                    .table
                    .get(*pid)
                    .filter(|w| w.state.holds_slot())
                    .map(|w| (w.generation, w.slot)),
                _ => None,
            };
            if self.trace {
                self.history.push(format!("{event:?}"));
            }
            let upgrading = self.core.upgrade().in_progress();
            let handed_over = matches!(self.core.upgrade(), Upgrade::HandedOver { .. });
            let actions = self.core.handle(self.now, event);
            // An upgrade under way starts no roll (a HUP or file change is refused or left
            // to the new master), and after a handover the sockets and the service manager
            // belong to the new master.
            if upgrading && before_roll == RollPhase::Idle && self.core.roll != RollPhase::Idle {
                return Err(self.fail("a roll started during an upgrade".into()));
            }
            for action in &actions {
                let theirs = matches!(
                    action,
                    Action::CloseListeners | Action::Notify(Notice::Stopping)
                );
                if handed_over && theirs {
                    return Err(self.fail(format!("{action:?} after the handover")));
                }
            }
            if let Upgrade::HandedOver { to } = self.core.upgrade() {
                if !handed_over {
                    self.handed_over += 1;
                    let quality = self.procs.get(to).and_then(|p| p.upgrade);
                    if quality != Some(Binary::Good) {
                        return Err(self.fail(format!(
                            "handed over to master[{to}] running a {quality:?} binary"
                        )));
                    }
                }
            }
            let mut snapshot = false;
            let mut spawned = Vec::new();
            for action in actions {
                if self.trace {
                    self.history.push(format!("  -> {action:?}"));
                }
                match action {
                    Action::Snapshot { generation, hash } => {
                        snapshot = true;
                        let result = if self.snapshot_fails {
                            Err(crate::snapshot::SnapshotError::Missing {
                                path: PathBuf::from("/srv/libapp.so"),
                            })
                        } else {
                            // A watch roll onto unchanged content gives its number back: the
                            // next snapshot may reuse it.
                            self.qualities.insert(generation, self.content.1);
                            if self.content.1 == Quality::Good {
                                self.tainted.remove(&generation);
                            } else {
                                self.tainted.insert(generation);
                            }
                            let sha = format!("{:064x}", self.content.0);
                            if !hash {
                                // Hashed once the shell is done with this batch, which may be
                                // before or after anything else happens (with `Slow`, after
                                // the workers are ready, or even after the settle).
                                let (slow, result) = match self.hashing {
                                    Hashing::Quick => (0, Ok(sha.clone())),
                                    Hashing::Slow(ms) => (u64::from(ms), Ok(sha.clone())),
                                    Hashing::Fails => (0, Err("read: I/O error".to_string())),
                                };
                                if result.is_err() {
                                    self.tainted.insert(generation);
                                }
                                let at =
                                    self.now + Duration::from_millis(generation % 4 * 3 + slow);
                                self.hashes.push((at, generation, result));
                            }
                            Ok(Build {
                                source: PathBuf::from("/srv/libapp.so"),
                                sha256: hash.then_some(sha),
                            })
                        };
                        queue.push(Event::Snapshotted { generation, result });
                    }
                    Action::Spawn(spawn) => {
                        if let Some(s) = spawn.spare {
                            if !self.procs.get(&s).is_some_and(|p| p.spare) {
                                return Err(self.fail(format!(
                                    "{spawn:?} hands its snapshot to {s}, which is no live spare"
                                )));
                            }
                        }
                        if let Some(z) = spawn.zygote {
                            let live = self
                                .procs
                                .get(&z)
                                .is_some_and(|p| p.zygote && p.generation == spawn.generation);
                            if !live {
                                return Err(self.fail(format!(
                                    "{spawn:?} asks {z}, which is no live zygote of generation {}",
                                    spawn.generation
                                )));
                            }
                        }
                        let pid = self.spawn(&spawn);
                        spawned.push(spawn);
                        queue.push(Event::Spawned {
                            spawn,
                            result: Ok(pid),
                        });
                    }
                    Action::SendDrain(pid) => {
                        self.drained.insert(pid);
                        let at = self.now + Duration::from_millis(30);
                        if let Some(p) = self.procs.get_mut(&pid) {
                            if !p.hung {
                                p.next = Some((at, Next::Exit(ExitStatus::Code(0))));
                            }
                        }
                    }
                    Action::Kill(pid) => {
                        let at = self.now + Duration::from_millis(1);
                        if let Some(p) = self.procs.get_mut(&pid) {
                            let status = ExitStatus::Signal {
                                signal: Signal::SIGKILL,
                                core: false,
                            };
                            p.next = Some((at, Next::Exit(status)));
                        }
                    }
                    Action::Exit(_) => self.exits += 1,
                    Action::CheckBinary => {
                        let pid = self.spawn_upgrade(Next::Checked, 5);
                        queue.push(Event::UpgradeSpawned {
                            step: UpgradeStep::Check,
                            result: Ok(pid),
                        });
                    }
                    Action::SpawnSuccessor { generation, .. } => {
                        let (next, ms) = match self.binary {
                            Binary::Good => (Next::Serving(generation + 1), 60),
                            Binary::FailsToStart => (Next::Fails, 30),
                            Binary::Crashes => (
                                Next::Exit(ExitStatus::Signal {
                                    signal: Signal::SIGSEGV,
                                    core: true,
                                }),
                                20,
                            ),
                            // Sits on the sockets until it is killed.
                            Binary::NeverServes | Binary::NotAngelHost => (Next::Beat, 1_000_000),
                        };
                        let pid = self.spawn_upgrade(next, ms);
                        queue.push(Event::UpgradeSpawned {
                            step: UpgradeStep::Successor,
                            result: Ok(pid),
                        });
                    }
                    // Every RELOADING=1 is answered by exactly one READY=1 (Type=notify-reload).
                    Action::Notify(Notice::Reloading { .. })
                        if std::mem::replace(&mut self.reloading, true) =>
                    {
                        return Err(self.fail("RELOADING=1 twice without READY=1".into()));
                    }
                    Action::Notify(Notice::Ready { .. }) => self.reloading = false,
                    Action::Notify(Notice::Stopping) => self.reloading = false,
                    // A roll says it rolled once, and only with its content's hash.
                    Action::Log(Log {
                        event: "reloaded",
                        generation: Some(g),
                        message,
                        ..
                    }) => {
                        let n = {
                            let n = self.reloaded.entry(g).or_default();
                            *n += 1;
                            *n
                        };
                        if n > 1 || message.contains("sha pending") {
                            return Err(self.fail(format!("`reloaded` #{n} of {g}: {message}")));
                        }
                    }
                    _ => {}
                }
            }
            let answering: Vec<Pid> = queue
                .iter()
                .filter_map(|e| match e {
                    Event::Spawned {
                        result: Ok(pid), ..
                    } => Some(*pid),
                    _ => None,
                })
                .collect();
            self.check(&before_roll, snapshot, retiring, &spawned, &answering)?;
        }
        Ok(())
    }

    /// The `index`-th live process that is a worker (not a probe), in pid order.
    fn worker(&self, index: usize) -> Option<Pid> {
        let live: Vec<Pid> = self
            .procs
            .iter()
            .filter(|(_, p)| !p.probe && !p.spare && p.upgrade.is_none())
            .map(|(pid, _)| *pid)
            .collect();
        (!live.is_empty()).then(|| live[index % live.len()])
    }

    fn client(&mut self) -> ClientId {
        self.next_client += 1;
        self.next_client
    }
}

mod observe;
mod ops;
mod procs;
mod tests;
