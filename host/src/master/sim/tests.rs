//! The generated sequences, and the regression cases found by hand or by the generator.

use std::time::Duration;

use proptest::prelude::*;

use super::ops::{op, Hashing, Op};
use super::*;

fn run(ops: &[Op], workers: usize, zygote: bool) -> Result<(), TestCaseError> {
    let mut sim = Sim::with_zygote(workers, zygote);
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

/// A master with zygotes and spares whose first generation serves with `workers` workers.
fn serving_with_zygotes(workers: usize) -> Sim {
    let mut sim = Sim::with_zygote(workers, true);
    sim.step(Event::Start).expect("start");
    sim.advance(Duration::from_millis(100)).expect("ready");
    sim
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
        zygote in any::<bool>(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(&ops, workers, zygote)?;
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
/// accepting; the master must tell it to drain (once its replacement is ready, so that its
/// slot is never left without an accepting worker).
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
    assert!(
        !sim.drained.contains(&pid),
        "drained before its replacement was ready"
    );
    sim.advance(Duration::from_millis(100))
        .expect("replacement");
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

/// A good upgrade hands over once the new master serves; the old master then drains and
/// exits, letting go of the sockets without freezing them and without telling the service
/// manager anything (checked in `Sim::step` for every sequence).
#[test]
fn a_good_upgrade_hands_over_and_the_old_master_exits() {
    let mut sim = Sim::new(2);
    sim.step(Event::Start).expect("start");
    sim.advance(Duration::from_millis(200)).expect("ready");
    sim.apply(&Op::Upgrade { client: true }).expect("upgrade");
    sim.advance(Duration::from_secs(2)).expect("handover");
    assert_eq!(sim.handed_over, 1);
    assert!(sim.core.exited(), "the old master exits after the handover");
    assert_eq!(sim.exits, 1);
}

/// Whatever is wrong with the new binary or the new master, the old master keeps serving,
/// and the next upgrade onto a good binary goes through.
#[test]
fn every_failed_upgrade_leaves_the_old_master_serving() {
    for bad in [
        Binary::NotAngelHost,
        Binary::FailsToStart,
        Binary::Crashes,
        Binary::NeverServes,
    ] {
        let mut sim = Sim::new(2);
        sim.step(Event::Start).expect("start");
        sim.advance(Duration::from_millis(200)).expect("ready");
        sim.apply(&Op::NextBinary(bad)).expect("binary");
        sim.apply(&Op::Upgrade { client: true }).expect("upgrade");
        let timeout = sim.core.settings().ready_timeout + START_MARGIN + CHECK_TIMEOUT;
        sim.advance(timeout + Duration::from_secs(1))
            .expect("fails");
        assert_eq!(*sim.core.upgrade(), Upgrade::Idle, "{bad:?}");
        assert!(matches!(sim.core.run, Run::Serving), "{bad:?}");
        assert_eq!(sim.core.serving, Some(1), "{bad:?}");
        assert!(
            !sim.procs.values().any(|p| p.upgrade.is_some()),
            "{bad:?}: the new master is gone"
        );
        sim.apply(&Op::NextBinary(Binary::Good)).expect("binary");
        sim.apply(&Op::Upgrade { client: false }).expect("upgrade");
        sim.advance(Duration::from_secs(2)).expect("handover");
        assert_eq!(sim.handed_over, 1, "{bad:?}: then a good one goes through");
    }
}

/// A master that is a container's PID 1 cannot exit after a handover: it refuses.
#[test]
fn a_master_that_is_pid_1_refuses_to_upgrade() {
    let now = Instant::now();
    let mut core = Core::new(Settings::for_tests(1), 1, now, 7);
    core.handle(now, Event::Start);
    core.serving = Some(1);
    let actions = core.handle(now, Event::Upgrade { client: Some(9) });
    assert!(!actions.iter().any(|a| matches!(a, Action::CheckBinary)));
    let said = format!("{actions:?}");
    assert!(said.contains("PID 1"), "{said}");
}

/// A stop while the new master starts gives the upgrade up: the new master is killed (it
/// does not own the sockets yet), and the stop ends in one exit.
#[test]
fn a_stop_during_an_upgrade_kills_the_new_master_and_exits_once() {
    let mut sim = Sim::new(2);
    sim.step(Event::Start).expect("start");
    sim.advance(Duration::from_millis(200)).expect("ready");
    sim.apply(&Op::NextBinary(Binary::NeverServes))
        .expect("binary");
    sim.apply(&Op::Upgrade { client: true }).expect("upgrade");
    sim.advance(Duration::from_millis(50)).expect("started");
    assert!(matches!(
        sim.core.upgrade(),
        Upgrade::Starting { pid: Some(_), .. }
    ));
    sim.apply(&Op::Term).expect("term");
    sim.advance(Duration::from_secs(2)).expect("stop");
    assert!(sim.core.exited());
    assert_eq!(sim.exits, 1);
    assert!(!sim.procs.values().any(|p| p.upgrade.is_some()));
}

/// With zygotes, a generation's workers wait for its probe, and once it offers to stay they
/// are all forked from it (so they share its loaded library); the zygote of a generation that
/// was replaced is killed, and so is every zygote at a stop.
#[test]
fn a_generations_workers_are_forked_from_its_zygote_which_dies_with_the_generation() {
    let mut sim = Sim::with_zygote(2, true);
    sim.step(Event::Start).expect("start");
    let workers = |sim: &Sim, g: u64| -> Vec<Option<Pid>> {
        sim.procs
            .values()
            .filter(|p| p.generation == g && !p.probe)
            .map(|p| p.forked_from)
            .collect()
    };
    assert!(
        workers(&sim, 1).is_empty(),
        "no worker starts before the probe's verdict"
    );
    sim.advance(Duration::from_millis(100)).expect("ready");
    assert_eq!(sim.core.serving, Some(1));
    let first = *sim.core.zygotes.get(&1).expect("generation 1 has a zygote");
    assert_eq!(workers(&sim, 1), vec![Some(first); 2]);
    // A crash is refilled from the same zygote.
    sim.apply(&Op::Crash(0)).expect("crash");
    sim.advance(Duration::from_millis(100)).expect("refilled");
    assert_eq!(workers(&sim, 1), vec![Some(first); 2]);
    sim.apply(&Op::Hup).expect("hup");
    sim.advance(Duration::from_millis(400)).expect("rolled");
    assert_eq!(sim.core.serving, Some(2));
    let second = *sim.core.zygotes.get(&2).expect("generation 2 has a zygote");
    assert_eq!(workers(&sim, 2), vec![Some(second); 2]);
    assert!(
        !sim.procs.contains_key(&first),
        "the replaced generation's zygote is gone"
    );
    sim.apply(&Op::Term).expect("term");
    sim.quiesce().expect("stops");
    assert!(sim.core.exited());
    assert!(sim.procs.is_empty(), "{:?}", sim.procs);
}

/// A zygote killed from outside is no verdict on its build: the generation keeps serving and
/// its next workers start by exec.
#[test]
fn a_dead_zygote_leaves_its_generations_next_workers_to_exec() {
    let mut sim = serving_with_zygotes(2);
    sim.apply(&Op::KillZygote).expect("kill the zygote");
    assert!(sim.core.zygotes.is_empty());
    sim.apply(&Op::Crash(0)).expect("crash");
    sim.advance(Duration::from_millis(100)).expect("refilled");
    assert_eq!(sim.core.serving_ready(), 2);
    let refilled: Vec<_> = sim
        .procs
        .values()
        .filter(|p| !p.probe && p.forked_from.is_none())
        .collect();
    assert_eq!(refilled.len(), 1, "the refill was exec'd: {:?}", sim.procs);
}

/// A `HUP`'s snapshot is copied without its hash, which the shell takes while the probe
/// starts: the probe is spawned before the hash is known, and the generation commits only once
/// it is.
#[test]
fn a_hup_rolls_before_its_snapshot_is_hashed_and_commits_only_once_it_is() {
    let mut sim = serving_with_zygotes(2);
    // Generation 2: hashed 6 ms after the snapshot (`generation % 4 * 3`), after its probe.
    sim.apply(&Op::Hup).expect("hup");
    assert!(
        sim.hashes.iter().any(|(_, g, _)| *g == 2),
        "no hash pending"
    );
    assert!(
        sim.procs.values().any(|p| p.probe && p.generation == 2),
        "the probe starts before the hash"
    );
    assert_eq!(
        sim.core.generations.get(&2).and_then(|b| b.sha256.clone()),
        None
    );
    sim.advance(Duration::from_millis(400)).expect("rolled");
    assert_eq!(sim.core.serving, Some(2));
    assert!(sim.core.generations[&2].sha256.is_some());
}

/// Once a generation serves, a spare probe waits for the next roll, which hands it its
/// snapshot instead of starting a probe; a new spare follows the roll.
#[test]
fn a_spare_probe_takes_the_next_rolls_snapshot_and_another_follows_the_roll() {
    let mut sim = serving_with_zygotes(2);
    let spare = sim.core.spare.expect("a spare once generation 1 serves");
    assert!(sim.procs[&spare].spare);
    sim.apply(&Op::Hup).expect("hup");
    assert_eq!(sim.core.spare, None, "the roll took it");
    sim.advance(Duration::from_millis(400)).expect("rolled");
    assert_eq!(sim.core.serving, Some(2));
    assert_eq!(
        sim.core.zygotes.get(&2),
        Some(&spare),
        "the spare became generation 2's probe and zygote"
    );
    let next = sim.core.spare.expect("a new spare after the roll");
    assert_ne!(next, spare);
}

/// A spare that keeps dying before any roll uses it is not restarted for ever: after
/// `MAX_SPARE_DEATHS` the master goes back to starting each probe with its roll.
#[test]
fn spares_that_keep_dying_unused_stop_being_started() {
    let mut sim = Sim::with_zygote(1, true);
    sim.step(Event::Start).expect("start");
    sim.advance(Duration::from_millis(100)).expect("ready");
    for _ in 0..MAX_SPARE_DEATHS {
        assert!(sim.core.spare.is_some(), "{:#?}", sim.history);
        sim.apply(&Op::KillSpare).expect("kill the spare");
        sim.advance(Duration::from_millis(10)).expect("respawn");
    }
    assert_eq!(sim.core.spare, None);
    assert!(!sim.procs.values().any(|p| p.spare));
    // Rolls still work, with a probe of their own.
    sim.apply(&Op::Hup).expect("hup");
    sim.advance(Duration::from_millis(400)).expect("rolled");
    assert_eq!(sim.core.serving, Some(2));
}

/// Found by the generator in CI: a trigger that arrives during a roll must start a follow-up
/// roll once the roll ends, also when the follow-up's snapshot fails.
#[test]
fn a_trigger_during_a_roll_starts_a_follow_up_after_it() {
    let ops = [
        Op::Advance(16),
        Op::Crash(0),
        Op::Advance(1),
        Op::Crash(0),
        Op::Hup,
        Op::Advance(5),
        Op::Hup,
        Op::Crash(0),
        Op::Advance(1),
        Op::Config(3),
        Op::Advance(400),
        Op::Hup,
        Op::Advance(40),
        Op::FileChange {
            library: true,
            writing: false,
            replaced: false,
        },
        Op::Hup,
        Op::SnapshotFails(true),
    ];
    run(&ops, 1, true).expect("the simulated master keeps its invariants");
}

/// Found by the generator: a spare handed to a probe's spawn is the core's until that spawn's
/// answer comes, also when other spawns' answers come first.
#[test]
fn a_spare_handed_to_a_probe_spawn_stays_known_until_its_answer() {
    let ops = [
        Op::Advance(16),
        Op::Ttou,
        Op::Crash(0),
        Op::FileChange {
            library: true,
            writing: false,
            replaced: false,
        },
        Op::NextBuild(Quality::Good),
        Op::Advance(49),
        Op::Ttin,
        Op::NextBuild(Quality::Good),
        Op::Crash(2),
        Op::Advance(1),
    ];
    run(&ops, 3, true).expect("the simulated master keeps its invariants");
}

/// A `HUP`'s hash that finishes after the new workers are ready (two busy cores) does not
/// hold the roll back: the generation serves and settles at once, and says it rolled
/// (`reloaded ..., sha ...`) and commits only once it is named.
#[test]
fn a_hup_whose_hash_comes_after_its_workers_serves_at_once_and_commits_once_named() {
    let mut sim = serving_with_zygotes(2);
    sim.apply(&Op::Hashing(Hashing::Slow(300)))
        .expect("slow hashes");
    sim.apply(&Op::Hup).expect("hup");
    let hashed_at = sim
        .hashes
        .iter()
        .find(|(_, g, _)| *g == 2)
        .expect("a hash")
        .0;
    sim.advance(Duration::from_millis(100))
        .expect("workers ready");
    assert!(sim.now < hashed_at);
    assert_eq!(sim.core.serving, Some(2), "serves before it is named");
    // Settling, and not named: no `reloaded` line yet (`Core::announce`).
    assert!(matches!(sim.core.roll, RollPhase::Settling { .. }));
    assert_eq!(sim.core.generations[&2].sha256, None);
    // Past the settle, still unnamed: generation 1 still serves beside it, nothing drains.
    sim.advance(READY_SETTLE).expect("settled");
    assert!(sim.now < hashed_at);
    assert!(matches!(sim.core.roll, RollPhase::Settling { .. }));
    let old = sim.core.table.pids(|w| w.generation == 1);
    assert_eq!(old.len(), 2);
    assert!(old.iter().all(|p| !sim.drained.contains(p)));
    sim.advance(hashed_at - sim.now + Duration::from_millis(1))
        .expect("named");
    assert_eq!(sim.core.roll, RollPhase::Idle, "committed once named");
    assert_eq!(sim.core.serving, Some(2));
    assert!(sim.core.generations[&2].sha256.is_some());
    sim.advance(Duration::from_millis(100)).expect("drained");
    assert!(old.iter().all(|p| sim.drained.contains(p)));
}

/// A hash that fails while the roll settles rolls it back, as a failure in its start would:
/// the previous generation never stopped serving and serves on.
#[test]
fn a_hash_that_fails_after_the_workers_are_ready_rolls_back_to_the_previous_generation() {
    let mut sim = serving_with_zygotes(2);
    sim.hashing = Hashing::Slow(300);
    sim.apply(&Op::Hup).expect("hup");
    for h in &mut sim.hashes {
        h.2 = Err("read: I/O error".into());
    }
    sim.tainted.insert(2);
    sim.advance(Duration::from_millis(100))
        .expect("workers ready");
    assert_eq!(sim.core.serving, Some(2));
    sim.advance(Duration::from_millis(400))
        .expect("hash failed");
    assert_eq!(sim.core.roll, RollPhase::Idle);
    assert_eq!(sim.core.serving, Some(1), "rolled back");
    assert_eq!(sim.core.serving_ready(), 2);
}

/// A hash that never comes (its thread died) does not hold a roll for ever: past the ready
/// deadline the roll fails, and the previous generation serves on.
#[test]
fn a_hash_that_never_comes_fails_the_roll_at_the_ready_deadline() {
    let mut sim = serving_with_zygotes(2);
    sim.apply(&Op::Hup).expect("hup");
    sim.hashes.clear();
    sim.tainted.insert(2);
    sim.advance(Duration::from_millis(200))
        .expect("workers ready");
    assert_eq!(sim.core.serving, Some(2));
    assert!(matches!(sim.core.roll, RollPhase::Settling { .. }));
    sim.advance(sim.core.settings().ready_timeout)
        .expect("deadline");
    assert_eq!(sim.core.roll, RollPhase::Idle);
    assert_eq!(sim.core.serving, Some(1), "rolled back");
    assert_eq!(sim.core.serving_ready(), 2);
}
