//! The operations a sequence is made of, and how the simulator plays them.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
pub(super) enum Op {
    Advance(u16),
    Hup,
    Reload,
    Config(usize),
    ConfigBroken,
    Ttin,
    Ttou,
    FileChange {
        library: bool,
        writing: bool,
        replaced: bool,
    },
    NextBuild(Quality),
    SnapshotFails(bool),
    /// How the hashes of the next snapshots copied without one go.
    Hashing(Hashing),
    Crash(usize),
    Retire {
        index: usize,
        by_itself: bool,
    },
    Hang(usize),
    KillProbe,
    /// A generation's zygote dies (OOM killer, an operator's `kill`).
    KillZygote,
    /// The spare probe dies before a roll uses it.
    KillSpare,
    Term,
    Int,
    Stop {
        fast: bool,
    },
    Status,
    /// `USR2` (or `angel-host upgrade` with a client).
    Upgrade {
        client: bool,
    },
    NextBinary(Binary),
}

/// How the shell's hash of a snapshot copied without one goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hashing {
    /// Within a few ms of the snapshot.
    Quick,
    /// This many ms later than that: after the workers are ready, or after the settle.
    Slow(u16),
    /// The snapshot cannot be read back.
    Fails,
}

pub(super) fn op() -> impl Strategy<Value = Op> {
    let quality = prop_oneof![
        4 => Just(Quality::Good),
        1 => Just(Quality::ProbeFails),
        1 => Just(Quality::CrashesBeforeReady),
        1 => Just(Quality::CrashesAfterReady),
        1 => Just(Quality::NeverReady),
    ];
    prop_oneof![
        10 => (1u16..60).prop_map(Op::Advance),
        4 => (60u16..400).prop_map(Op::Advance),
        2 => (400u16..6000).prop_map(Op::Advance),
        3 => Just(Op::Hup),
        2 => Just(Op::Reload),
        2 => (1usize..5).prop_map(Op::Config),
        1 => Just(Op::ConfigBroken),
        2 => Just(Op::Ttin),
        2 => Just(Op::Ttou),
        3 => (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(library, writing, replaced)| Op::FileChange {
            library,
            writing: writing && !replaced,
            replaced,
        }),
        3 => quality.prop_map(Op::NextBuild),
        1 => any::<bool>().prop_map(Op::SnapshotFails),
        1 => prop_oneof![
            2 => Just(Hashing::Quick),
            2 => (1u16..400).prop_map(Hashing::Slow),
            1 => Just(Hashing::Fails),
        ]
        .prop_map(Op::Hashing),
        3 => (0usize..8).prop_map(Op::Crash),
        4 => (0usize..8, any::<bool>()).prop_map(|(index, by_itself)| Op::Retire { index, by_itself }),
        1 => (0usize..8).prop_map(Op::Hang),
        1 => Just(Op::KillProbe),
        1 => Just(Op::KillZygote),
        1 => Just(Op::KillSpare),
        1 => Just(Op::Term),
        1 => Just(Op::Int),
        1 => any::<bool>().prop_map(|fast| Op::Stop { fast }),
        1 => Just(Op::Status),
        2 => any::<bool>().prop_map(|client| Op::Upgrade { client }),
        2 => prop_oneof![
            3 => Just(Binary::Good),
            1 => Just(Binary::NotAngelHost),
            1 => Just(Binary::FailsToStart),
            1 => Just(Binary::Crashes),
            1 => Just(Binary::NeverServes),
        ]
        .prop_map(Op::NextBinary),
    ]
}

impl Sim {
    pub(super) fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.history.push(format!("## {op:?}"));
        match op {
            Op::Advance(ms) => self.advance(Duration::from_millis(u64::from(*ms)))?,
            Op::Hup => self.step(Event::Reload {
                client: None,
                config: None,
            })?,
            Op::Reload => {
                let client = self.client();
                self.step(Event::Reload {
                    client: Some(client),
                    config: None,
                })?
            }
            Op::Config(workers) => {
                let mut s = self.core.settings().clone();
                s.workers = *workers;
                self.step(Event::Reload {
                    client: None,
                    config: Some(Ok(Reread {
                        settings: Box::new(s),
                        restart_needed: Vec::new(),
                    })),
                })?
            }
            Op::ConfigBroken => self.step(Event::Reload {
                client: None,
                config: Some(Err("config angel.toml line 3: nonsense".into())),
            })?,
            Op::Ttin => self.step(Event::Resize(Resize::More))?,
            Op::Ttou => self.step(Event::Resize(Resize::Fewer))?,
            Op::FileChange {
                library,
                writing,
                replaced,
            } => self.step(Event::FileChanged {
                path: PathBuf::from(if *library {
                    "/srv/libapp.so"
                } else {
                    "/srv/other.txt"
                }),
                library: *library,
                writing: *writing,
                replaced: *replaced,
            })?,
            Op::NextBuild(q) => self.content = (self.content.0 + 1, *q),
            Op::SnapshotFails(fails) => self.snapshot_fails = *fails,
            Op::Hashing(hashing) => self.hashing = *hashing,
            Op::Crash(i) => {
                if let Some(pid) = self.worker(*i) {
                    let at = self.now + Duration::from_millis(1);
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.next = Some((at, Next::Exit(ExitStatus::Code(1))));
                    }
                }
            }
            Op::Retire { index, by_itself } => {
                if let Some(pid) = self.worker(*index).filter(|p| self.procs[p].ready) {
                    if *by_itself {
                        let at = self.now + Duration::from_millis(30);
                        if let Some(p) = self.procs.get_mut(&pid) {
                            p.next = Some((at, Next::Exit(ExitStatus::Code(0))));
                        }
                    }
                    self.step(Event::Worker {
                        pid,
                        msg: WorkerMsg::Retiring,
                    })?
                }
            }
            Op::Hang(i) => {
                // Its runtime stops beating (and ignores a drain); a ready it was about to send
                // still arrives.
                if let Some(pid) = self.worker(*i) {
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.hung = true;
                    }
                }
            }
            Op::KillProbe => {
                let probe = self
                    .procs
                    .iter()
                    .find(|(_, p)| p.probe && !p.zygote && !p.spare)
                    .map(|(pid, _)| *pid);
                if let Some(pid) = probe {
                    if let Some(g) = self.procs.get(&pid).map(|p| p.generation) {
                        self.tainted.insert(g);
                    }
                    self.procs.remove(&pid);
                    let status = ExitStatus::Signal {
                        signal: Signal::SIGKILL,
                        core: false,
                    };
                    self.step(Event::Exited { pid, status })?
                }
            }
            Op::KillZygote | Op::KillSpare => {
                let spare = matches!(op, Op::KillSpare);
                let victim = self
                    .procs
                    .iter()
                    .find(|(_, p)| if spare { p.spare } else { p.zygote })
                    .map(|(pid, _)| *pid);
                if let Some(pid) = victim {
                    self.procs.remove(&pid);
                    let status = ExitStatus::Signal {
                        signal: Signal::SIGKILL,
                        core: false,
                    };
                    self.step(Event::Exited { pid, status })?
                }
            }
            Op::Term => self.step(Event::Stop {
                mode: StopMode::Graceful,
                client: None,
            })?,
            Op::Int => self.step(Event::Stop {
                mode: StopMode::Fast,
                client: None,
            })?,
            Op::Stop { fast } => {
                let client = self.client();
                let mode = if *fast {
                    StopMode::Fast
                } else {
                    StopMode::Graceful
                };
                self.step(Event::Stop {
                    mode,
                    client: Some(client),
                })?
            }
            Op::Status => {
                let client = self.client();
                self.step(Event::Status(client))?
            }
            Op::Upgrade { client } => {
                let client = client.then(|| self.client());
                self.step(Event::Upgrade { client })?
            }
            Op::NextBinary(b) => self.binary = *b,
        }
        Ok(())
    }

    /// Lets everything settle: no more disturbances, every hang cured, a minute passes.
    pub(super) fn quiesce(&mut self) -> Result<(), TestCaseError> {
        for p in self.procs.values_mut() {
            if p.hung {
                p.hung = false;
                if p.ready && p.next.is_none() {
                    p.next = Some((self.now + STEP, Next::Beat));
                }
            }
        }
        for _ in 0..12 {
            self.advance(Duration::from_secs(5))?;
        }
        if self.core.upgrade().in_progress() {
            return Err(self.fail(format!("an upgrade never ended: {:?}", self.core.upgrade())));
        }
        if self.core.exited() {
            return Ok(());
        }
        if !matches!(self.core.run, Run::Serving) {
            return Err(self.fail("a stop did not end in Exit".into()));
        }
        if self.reloading {
            return Err(self.fail("RELOADING=1 never answered by READY=1".into()));
        }
        if self.core.roll != RollPhase::Idle || self.core.follow_up.is_some() {
            return Err(self.fail(format!("still rolling: {:?}", self.core.roll)));
        }
        let desired = self.core.desired();
        if self.core.serving_ready() != desired {
            return Err(self.fail(format!(
                "{} of {desired} slots have a ready serving worker: {:#?}",
                self.core.serving_ready(),
                self.core.table
            )));
        }
        let serving = self.core.serving;
        if let Some(w) = self
            .core
            .table
            .workers
            .iter()
            .find(|w| w.state.is_live() && (Some(w.generation) != serving || w.slot >= desired))
        {
            return Err(self.fail(format!("stale live worker {w:?}")));
        }
        Ok(())
    }
}
