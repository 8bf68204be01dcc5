//! SIGTTIN / SIGTTOU: one worker more / fewer at run time, without failing a request.

use std::collections::BTreeSet;

use angel_tests::ops::*;
use angel_tests::*;
use nix::sys::signal::Signal;

/// Waits until `status` reports `n` configured workers and exactly `n` ready ones; returns the
/// ready workers as `(pid, slot, generation)`.
fn wait_ready_workers(host: &Host, n: usize) -> Vec<(i32, u64, u64)> {
    poll(
        WAIT,
        &format!("{n} configured and ready workers in `status`"),
        || host.log(),
        || {
            let status = status(host.pidfile());
            let ready = status.workers_in("ready");
            (status.configured_workers == n && ready.len() == n).then_some(ready)
        },
    )
}

/// Sends `sig`, waits for `workers: from -> to` and for `to` ready workers.
fn resize(host: &Host, sig: Signal, from: usize, to: usize) -> Vec<(i32, u64, u64)> {
    let mark = host.mark();
    host.signal(sig);
    host.wait_log_since(mark, &format!("workers: {from} -> {to}"), WAIT);
    wait_ready_workers(host, to)
}

/// Waits until `load` made `more` further successful requests.
fn progress(host: &Host, load: &Load, more: u64) {
    let target = load.ok() + more;
    poll(
        WAIT,
        &format!("{more} more successful requests"),
        || host.log(),
        || (load.ok() >= target).then_some(()),
    );
}

#[test]
fn ttin_and_ttou_add_and_remove_workers_under_load_without_failing_a_request() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let load = Load::start(host.addr(), 2, 2);
    progress(&host, &load, 20);

    resize(&host, Signal::SIGTTIN, 2, 3);
    progress(&host, &load, 20);
    let four = resize(&host, Signal::SIGTTIN, 3, 4);
    let slots: BTreeSet<u64> = four.iter().map(|w| w.1).collect();
    assert_eq!(slots, (0..4).collect(), "one worker per slot: {four:?}");
    // New slots get connections of their own.
    let pids: BTreeSet<i32> = four.iter().map(|w| w.0).collect();
    assert_eq!(hello_pids(&host, 4), pids);
    progress(&host, &load, 20);

    let mut current = four;
    for to in [3, 2, 1] {
        let removed: Vec<i32> = current
            .iter()
            .filter(|w| w.1 >= to as u64)
            .map(|w| w.0)
            .collect();
        assert_eq!(removed.len(), 1, "slot {to} has one worker: {current:?}");
        let kept: BTreeSet<i32> = current
            .iter()
            .filter(|w| w.1 < to as u64)
            .map(|w| w.0)
            .collect();
        let now = resize(&host, Signal::SIGTTOU, to + 1, to);
        assert_eq!(
            now.iter().map(|w| w.0).collect::<BTreeSet<_>>(),
            kept,
            "removing a slot leaves the other workers alone"
        );
        host.wait_exited(&removed, WAIT);
        wait_pids_gone(&removed, WAIT, || host.log());
        progress(&host, &load, 20);
        current = now;
    }

    // Never below one worker.
    let mark = host.mark();
    host.signal(Signal::SIGTTOU);
    host.wait_log_since(mark, "SIGTTOU", WAIT);
    let last = wait_ready_workers(&host, 1);
    assert_eq!(last, current, "the last worker stays");
    assert!(
        !host.log_since(mark).contains("workers: 1 -> 0"),
        "{}",
        host.log()
    );
    progress(&host, &load, 20);

    let report = load.finish();
    report.assert_clean(&host, 0);
    for _ in 0..10 {
        assert_eq!(hello_pid(&get(host.addr(), "/").unwrap().text()), last[0].0);
    }
}

/// A TTIN during a roll applies when the roll ends: the new generation ends up one larger.
#[test]
fn ttin_during_a_roll_applies_when_the_roll_ends() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::builder(lib("crash-after-ready"))
        .dir(dir.path())
        .args(["--workers", "2"])
        .start();
    // Generation 2 takes 1.5 s to become ready: the roll is surely under way meanwhile.
    std::fs::write(dir.path().join("ready-after-ms"), "1500").unwrap();
    let mark = host.hup();
    poll(
        WAIT,
        "`status` to report the roll",
        || host.log(),
        || status(host.pidfile()).rolling.then_some(()),
    );
    host.signal(Signal::SIGTTIN);
    host.wait_log_since(mark, "SIGTTIN", WAIT);
    let during = status(host.pidfile());
    assert!(during.rolling, "{}", during.raw);
    assert_eq!(
        during.configured_workers, 2,
        "deferred until the roll ends: {}",
        during.raw
    );
    assert!(!host.log_since(mark).contains("workers: 2 -> 3"));

    let reloaded = host.wait_log_since(mark, " reloaded ", WAIT);
    assert_eq!(generation_of(&reloaded), Some(2));
    let resized = host.wait_log_since(mark, "workers: 2 -> 3", WAIT);
    let log = host.log_since(mark);
    assert!(
        log.find(&reloaded) < log.find(&resized),
        "the resize follows the roll:\n{log}"
    );
    let ready = wait_ready_workers(&host, 3);
    let generations: BTreeSet<u64> = ready.iter().map(|w| w.2).collect();
    assert_eq!(generations, [2].into(), "all of generation 2: {ready:?}");
}
