//! A storm of SIGHUPs (50 within about 100 ms) coalesces: a trigger during a roll becomes
//! exactly one follow-up roll, so the host makes a handful of rolls, not 50, ends with exactly
//! one serving generation of the configured size, stays up, and loses no request.

use std::time::{Duration, Instant};

use angel_tests::rebuild::*;
use angel_tests::*;
use nix::sys::signal::Signal;

const HUPS: usize = 50;
/// Spacing of the HUPs: 50 of them take about 100 ms.
const HUP_SPACING: Duration = Duration::from_millis(2);
const WORKERS: usize = 2;

#[test]
fn fifty_hups_in_100ms_coalesce_into_few_rolls_and_lose_nothing() {
    let host = Host::start(lib("hello"), &["--workers", &WORKERS.to_string()]);
    let load = Load::start(host.addr(), 0, 2);
    load.wait_more(&host, 20);

    let mark = host.mark();
    let start = Instant::now();
    for _ in 0..HUPS {
        host.signal(Signal::SIGHUP);
        std::thread::sleep(HUP_SPACING);
    }
    let storm = start.elapsed();

    // Settled: no roll under way, WORKERS ready workers of the serving generation, nothing
    // starting or draining.
    let status = wait_settled(&host, WORKERS);
    assert!(host.try_status().is_none(), "master alive\n{}", host.log());
    let log = host.log_since(mark);
    let outcomes: Vec<&str> = log.lines().filter(|l| is_roll_outcome(l)).collect();
    let rolls: Vec<&str> = outcomes
        .iter()
        .copied()
        .filter(|l| l.contains(" reloaded "))
        .collect();
    assert_eq!(outcomes, rolls, "every roll succeeded\n{log}");
    assert!(
        !rolls.is_empty() && rolls.len() <= 10,
        "{HUPS} HUPs must coalesce into a few rolls, got {}\n{log}",
        rolls.len()
    );
    let last = generation_of(rolls.last().expect("a roll")).expect("generation");
    assert_eq!(status.generation, last, "{}", status.raw);
    assert_eq!(
        last,
        1 + rolls.len() as u64,
        "no roll without a `reloaded` line\n{log}"
    );
    assert_eq!(status.pid, host.pid);
    // No trigger lost: the last SIGHUP the master handled was followed by a roll.
    let lines: Vec<&str> = log.lines().collect();
    let last_hup = lines.iter().rposition(|l| l.ends_with("] SIGHUP"));
    let last_roll = lines.iter().rposition(|l| l.contains(" reloaded "));
    assert!(
        last_hup.is_some() && last_hup < last_roll,
        "the last SIGHUP got its roll\n{log}"
    );

    // Every worker of an earlier generation is gone; the load never failed.
    let serving: Vec<i32> = status.workers.iter().map(|w| w.pid).collect();
    let earlier: Vec<i32> = ready_pids(&host.log())
        .into_iter()
        .filter(|p| !serving.contains(p))
        .collect();
    host.wait_exited(&earlier, WAIT);
    let mut seen = hello_pids(&host, WORKERS);
    seen.retain(|p| !serving.contains(p));
    assert!(seen.is_empty(), "answered by old workers {seen:?}");
    load.wait_more(&host, 20);
    let report = load.finish();
    report.assert_clean(&host, 40);
    let sighups = log.lines().filter(|l| l.ends_with("] SIGHUP")).count();
    eprintln!(
        "{HUPS} HUPs in {} ms: master logged {sighups} SIGHUP lines (signals merge), {} rolls, \
         final generation {last}; {} requests, 0 failed",
        storm.as_millis(),
        rolls.len(),
        report.ok
    );
}
