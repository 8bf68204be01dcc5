//! Bad input during a roll: a bad build never replaces a good one. For every library fault,
//! deployed over the served path: a file the probe rejects (nothing is started) logs
//! `reload skipped: ... keeping generation 1`, an app that fails after it was started logs
//! `reload failed: ... keeping generation 1`; either way the same workers keep answering, the
//! failed generation's workers are gone, and a later good deploy rolls fine.

use std::collections::BTreeSet;
use std::time::Duration;

use angel_tests::*;

/// Which line a fault must produce.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// Rejected while validating the snapshot: no worker was started.
    Skipped,
    /// The new generation was started and failed before it was ready.
    Failed,
}

fn bad_deploy_keeps_the_old_generation(bad: BadLib, outcome: Outcome, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let served = dir.path().join("libapp.so");
    deploy(&lib("hello"), &served);
    let host = Host::builder(&served).dir(dir.path()).args(extra).start();
    let old: BTreeSet<i32> = host.worker_pids().into_iter().collect();
    assert_eq!(old.len(), 2);

    bad.deploy(scratch.path(), &served);
    let line = match host.hup_outcome(WAIT) {
        Err(line) => line,
        Ok(roll) => panic!(
            "{bad:?} replaced a good generation: {}\n--- master stderr ---\n{}",
            roll.line,
            host.log()
        ),
    };
    let word = match outcome {
        Outcome::Skipped => "skipped",
        Outcome::Failed => "failed",
    };
    assert!(
        line.contains(&format!("] reload {word}: ")) && line.contains("; keeping generation 1"),
        "expected `master[P] reload {word}: <why>; keeping generation 1`, got: {line}"
    );
    if bad == BadLib::AbiV2 {
        assert!(line.to_lowercase().contains("abi"), "names the ABI: {line}");
    }

    // The failed generation's workers do not linger.
    let failed: Vec<i32> = host
        .all_worker_pids_seen()
        .into_iter()
        .filter(|p| !old.contains(p))
        .collect();
    wait_until(
        &host,
        Duration::from_secs(10),
        "failed workers gone",
        || failed.iter().all(|p| !pid_running(*p)).then_some(()),
    );

    // The same workers keep answering.
    for i in 0..20 {
        let resp = get(host.addr(), "/")
            .unwrap_or_else(|e| panic!("GET #{i} after a failed roll: {e}\n{}", host.log()));
        let pid = hello_pid(&resp.text());
        assert!(
            old.contains(&pid),
            "answered by {pid}, not the old {old:?}\n{}",
            host.log()
        );
    }
    let live: BTreeSet<i32> = host.worker_pids().into_iter().collect();
    assert_eq!(live, old, "old workers unchanged\n{}", host.log());
    let ended: BTreeSet<i32> = ended_pids(&host.log()).into_iter().collect();
    assert!(
        ended.is_disjoint(&old),
        "no old worker ended during the failed roll:\n{}",
        host.log()
    );

    // A good deploy still rolls.
    deploy(&lib("hello"), &served);
    let roll = host.roll(WAIT);
    assert!(roll.generation > 1, "{}", roll.line);
    let new: BTreeSet<i32> = roll.new_pids.iter().copied().collect();
    assert!(
        !new.is_empty() && new.is_disjoint(&old),
        "{old:?} → {new:?}"
    );
    host.wait_exited(&old.iter().copied().collect::<Vec<_>>(), WAIT);
    assert_eq!(hello_pids(&host, new.len()), new);
}

macro_rules! bad_deploy_tests {
    ($($name:ident: $bad:expr, $outcome:expr, $extra:expr;)*) => {$(
        #[test]
        fn $name() {
            bad_deploy_keeps_the_old_generation($bad, $outcome, $extra);
        }
    )*};
}

bad_deploy_tests! {
    hup_with_the_library_removed_keeps_generation_1: BadLib::Missing, Outcome::Skipped, &[];
    hup_with_a_text_file_keeps_generation_1: BadLib::Text, Outcome::Skipped, &[];
    hup_with_a_zero_byte_file_keeps_generation_1: BadLib::Empty, Outcome::Skipped, &[];
    hup_with_no_angel_symbols_keeps_generation_1: BadLib::NoSymbols, Outcome::Skipped, &[];
    hup_with_abi_v2_keeps_generation_1: BadLib::AbiV2, Outcome::Skipped, &[];
    hup_with_panic_in_init_keeps_generation_1: BadLib::PanicInit, Outcome::Failed, &[];
    hup_with_never_ready_keeps_generation_1:
        BadLib::NeverReady, Outcome::Failed, &["--ready-timeout", "2s"];
    hup_with_segfault_before_ready_keeps_generation_1: BadLib::Segfault, Outcome::Failed, &[];
    hup_with_exit_right_after_ready_keeps_generation_1:
        BadLib::ExitAfterReady, Outcome::Failed, &[];
}
