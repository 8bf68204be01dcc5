//! Deterministic simulation of the master's core: fake processes, fake pids, a fake clock.
//!
//! proptest generates a sequence of [`Op`]s — operator actions (HUP, reload, config re-reads,
//! TTIN/TTOU, TERM/INT/stop), file changes, new builds of any quality (good, rejected by the
//! probe, failing to load, crashing before or right after ready, never ready), crashes,
//! retirements and hangs of any worker, a probe killed from outside, and time passing — and
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
use crate::settings::Settings;

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

#[derive(Debug, Clone)]
enum Op {
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
    Crash(usize),
    Retire {
        index: usize,
        by_itself: bool,
    },
    Hang(usize),
    KillProbe,
    Term,
    Int,
    Stop {
        fast: bool,
    },
    Status,
}

fn op() -> impl Strategy<Value = Op> {
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
        3 => (0usize..8).prop_map(Op::Crash),
        4 => (0usize..8, any::<bool>()).prop_map(|(index, by_itself)| Op::Retire { index, by_itself }),
        1 => (0usize..8).prop_map(Op::Hang),
        1 => Just(Op::KillProbe),
        1 => Just(Op::Term),
        1 => Just(Op::Int),
        1 => any::<bool>().prop_map(|fast| Op::Stop { fast }),
        1 => Just(Op::Status),
    ]
}

/// A fake child process.
#[derive(Debug, Clone)]
struct Proc {
    generation: u64,
    probe: bool,
    quality: Quality,
    /// Scheduled: (when, what).
    next: Option<(Instant, Next)>,
    ready: bool,
    hung: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Ready,
    Beat,
    Exit(ExitStatus),
}

const STEP: Duration = Duration::from_millis(10);

struct Sim {
    core: Core,
    now: Instant,
    next_pid: Pid,
    procs: BTreeMap<Pid, Proc>,
    /// Content the next snapshot copies: (id, quality).
    content: (u64, Quality),
    snapshot_fails: bool,
    qualities: BTreeMap<u64, Quality>,
    /// Generations that must never serve after their roll: a non-good build, or one whose
    /// worker or probe died or hung while it rolled in.
    tainted: BTreeSet<u64>,
    drained: BTreeSet<Pid>,
    expect_follow_up: bool,
    exits: usize,
    next_client: ClientId,
    /// The ops so far (and with `trace`, every event and action: set `ANGEL_SIM_TRACE=1` to
    /// see them in a failure).
    history: Vec<String>,
    trace: bool,
}

impl Sim {
    fn new(workers: usize) -> Self {
        let now = Instant::now();
        let mut s = Settings::for_tests(workers);
        s.max_requests = 0;
        Sim {
            core: Core::new(s, 1, now, 7),
            now,
            next_pid: 100,
            procs: BTreeMap::new(),
            content: (1, Quality::Good),
            snapshot_fails: false,
            qualities: BTreeMap::new(),
            tainted: BTreeSet::new(),
            drained: BTreeSet::new(),
            expect_follow_up: false,
            exits: 0,
            next_client: 0,
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
                    .filter(|w| w.state.is_live())
                    .map(|w| (w.generation, w.slot)),
                _ => None,
            };
            if self.trace {
                self.history.push(format!("{event:?}"));
            }
            let actions = self.core.handle(self.now, event);
            let mut snapshot = false;
            let mut spawned = Vec::new();
            for action in actions {
                if self.trace {
                    self.history.push(format!("  -> {action:?}"));
                }
                match action {
                    Action::Snapshot { generation } => {
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
                            Ok(Build {
                                source: PathBuf::from("/srv/libapp.so"),
                                sha256: format!("{:064x}", self.content.0),
                            })
                        };
                        queue.push(Event::Snapshotted { generation, result });
                    }
                    Action::Spawn(spawn) => {
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
                    _ => {}
                }
            }
            self.check(&before_roll, snapshot, retiring, &spawned)?;
        }
        Ok(())
    }

    /// Marks the rolling generation bad when one of its processes dies or hangs unexpectedly.
    fn taint_for(&mut self, event: &Event) {
        let Some(rolling) = self.core.roll.generation() else {
            return;
        };
        if let Event::Exited { pid, .. } = event {
            let live = self
                .core
                .table
                .get(*pid)
                .is_some_and(|w| w.generation == rolling && w.state.is_live());
            let probe = self
                .procs
                .get(pid)
                .is_some_and(|p| p.probe && p.generation == rolling);
            if live || probe {
                self.tainted.insert(rolling);
            }
        }
    }

    fn check(
        &mut self,
        before: &RollPhase,
        snapshot: bool,
        retiring: Option<(u64, usize)>,
        spawned: &[Spawn],
    ) -> Result<(), TestCaseError> {
        self.core.check_invariants().map_err(|e| self.fail(e))?;
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
            let ended = self.core.roll.generation() != Some(g);
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
        // 7: exit at most once.
        if self.exits > 1 {
            return Err(self.fail("exited twice".into()));
        }
        Ok(())
    }

    fn spawn(&mut self, spawn: &Spawn) -> Pid {
        self.next_pid += 1;
        let pid = self.next_pid;
        let quality = self
            .qualities
            .get(&spawn.generation)
            .copied()
            .unwrap_or(Quality::Good);
        let probe = spawn.role == Role::Probe;
        let ms = |n| self.now + Duration::from_millis(n);
        // Workers of one generation get ready at different moments (5 to 40 ms), as real ones do.
        let ready_in = 5 + (pid as u64 * 7919) % 36;
        let next = match (probe, quality) {
            (true, Quality::ProbeFails) => (ms(5), Next::Exit(ExitStatus::Code(65))),
            (true, _) => (ms(5), Next::Exit(ExitStatus::Code(0))),
            (false, Quality::ProbeFails) => (ms(8), Next::Exit(ExitStatus::Code(65))),
            (false, Quality::CrashesBeforeReady) => (ms(8), Next::Exit(ExitStatus::Code(1))),
            (false, Quality::NeverReady) => (ms(1_000_000), Next::Beat),
            (false, _) => (ms(ready_in), Next::Ready),
        };
        self.procs.insert(
            pid,
            Proc {
                generation: spawn.generation,
                probe,
                quality,
                next: Some(next),
                ready: false,
                hung: false,
            },
        );
        pid
    }

    /// Lets `d` pass: every process event and every core deadline in order.
    fn advance(&mut self, d: Duration) -> Result<(), TestCaseError> {
        let target = self.now + d;
        let mut stuck = 0;
        loop {
            let due_proc = self
                .procs
                .iter()
                .filter_map(|(pid, p)| p.next.map(|(at, _)| (at, *pid)))
                .min();
            let due_core = self.core.next_deadline();
            let next = [due_proc.map(|(at, _)| at), due_core, Some(target)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(target)
                .max(self.now);
            let fired = due_proc.filter(|(at, _)| *at <= next);
            if next == self.now && fired.is_none() {
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
            }
            self.step(Event::Tick)?;
            if self.now >= target && due_proc.is_none_or(|(at, _)| at > target) {
                return Ok(());
            }
            if self.core.exited() && self.procs.is_empty() {
                self.now = target;
                return Ok(());
            }
        }
    }

    fn fire(&mut self, pid: Pid) -> Result<(), TestCaseError> {
        let Some(p) = self.procs.get_mut(&pid) else {
            return Ok(());
        };
        let Some((_, next)) = p.next.take() else {
            return Ok(());
        };
        match next {
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
        }
    }

    /// The `index`-th live process that is a worker (not a probe), in pid order.
    fn worker(&self, index: usize) -> Option<Pid> {
        let live: Vec<Pid> = self
            .procs
            .iter()
            .filter(|(_, p)| !p.probe)
            .map(|(pid, _)| *pid)
            .collect();
        (!live.is_empty()).then(|| live[index % live.len()])
    }

    fn client(&mut self) -> ClientId {
        self.next_client += 1;
        self.next_client
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
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
                    config: Some(Ok(s)),
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
                    .find(|(_, p)| p.probe)
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
        }
        Ok(())
    }

    /// Lets everything settle: no more disturbances, every hang cured, a minute passes.
    fn quiesce(&mut self) -> Result<(), TestCaseError> {
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
        if self.core.exited() {
            return Ok(());
        }
        if !matches!(self.core.run, Run::Serving) {
            return Err(self.fail("a stop did not end in Exit".into()));
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

fn run(ops: &[Op], workers: usize) -> Result<(), TestCaseError> {
    let mut sim = Sim::new(workers);
    sim.step(Event::Start)?;
    for op in ops {
        if sim.core.exited() {
            break;
        }
        sim.apply(op)?;
    }
    sim.quiesce()?;
    let stopped = ops
        .iter()
        .any(|o| matches!(o, Op::Term | Op::Int | Op::Stop { .. }));
    if stopped && sim.exits != 1 {
        return Err(sim.fail(format!("stopped, but exited {} times", sim.exits)));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(10_000),
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn simulated_master_keeps_its_invariants(
        workers in 1usize..4,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(&ops, workers)?;
    }
}

/// The defect of the first round: a worker of the rolling generation that retires before the
/// roll commits (`--max-requests` under load) must be replaced in that generation, or the roll
/// can never complete.
#[test]
fn retiring_worker_of_the_rolling_generation_is_replaced_in_it() {
    let mut sim = Sim::new(3);
    sim.step(Event::Start).expect("start");
    sim.advance(Duration::from_millis(100)).expect("ready");
    sim.apply(&Op::Hup).expect("hup");
    // Step until one new worker is ready while the roll still waits for the others.
    let retiring = loop {
        sim.advance(Duration::from_millis(1)).expect("advance");
        assert!(
            matches!(sim.core.roll, RollPhase::Starting { .. }),
            "the roll ended before any new worker was ready alone"
        );
        let ready = sim
            .core
            .table
            .workers
            .iter()
            .find(|w| w.generation == 2 && w.state.is_ready())
            .map(|w| w.pid);
        if let Some(pid) = ready {
            break pid;
        }
    };
    sim.step(Event::Worker {
        pid: retiring,
        msg: WorkerMsg::Retiring,
    })
    .expect("retiring is replaced");
    sim.quiesce().expect("the roll completes");
    assert_eq!(sim.core.serving, Some(2));
}

/// The defect of the first round: `Worker::retire()` sends `retiring` but does not stop
/// accepting; the master must tell it to drain.
#[test]
fn retired_worker_is_told_to_drain() {
    let mut sim = Sim::new(1);
    sim.step(Event::Start).expect("start");
    sim.advance(Duration::from_millis(50)).expect("ready");
    let pid = sim.worker(0).expect("a worker");
    sim.apply(&Op::Retire {
        index: 0,
        by_itself: false,
    })
    .expect("retire");
    assert!(sim.drained.contains(&pid), "{:#?}", sim.history);
    sim.quiesce().expect("replaced");
}

/// A `HUP` that raises `workers` starts the extra slots on the new generation, never on the
/// old one (which would drain them at once).
#[test]
fn extra_slots_from_a_config_change_start_on_the_new_generation() {
    let mut sim = Sim::new(2);
    sim.step(Event::Start).expect("start");
    sim.advance(Duration::from_millis(50)).expect("ready");
    sim.apply(&Op::Config(4)).expect("reload");
    let old: Vec<&Proc> = sim.procs.values().filter(|p| p.generation == 1).collect();
    assert_eq!(old.len(), 2, "no generation-1 worker was added");
    sim.quiesce().expect("settles");
    assert_eq!(sim.core.serving_ready(), 4);
}
