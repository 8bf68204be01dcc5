//! Regression tests for the defects of the master's first design, each named after the
//! behaviour it pins, end-to-end against the real binary: rolls under `--max-requests` load, an
//! app that calls `retire()`, `angel-host reload` re-reading `--config`, extra slots of a
//! config change starting on the new generation, and the floors of `--timeout` and
//! `--ready-timeout`. (The core itself is simulated in `host/src/master/sim.rs`.)

use std::time::Duration;

use angel_tests::config_file::*;
use angel_tests::ops::*;
use angel_tests::*;

type OsArg = std::ffi::OsString;

/// Bound on one `angel-host reload` under load on a loaded 2-core box.
const RELOAD: Duration = Duration::from_secs(30);

#[test]
fn rolls_under_max_requests_load_succeed_20_times_out_of_20() {
    let host = Host::builder(lib("hello"))
        .args([
            "--workers",
            "2",
            "--max-requests",
            "20",
            "--ready-timeout",
            "3s",
        ])
        .start();
    let load = Load::start(host.addr(), 4, 2);
    for i in 0..20 {
        let out = run_exact(
            None,
            ["reload", "--pidfile", &host.pidfile().display().to_string()],
            RELOAD,
        );
        assert_eq!(
            out.code(),
            0,
            "reload {i} failed: {}{}\n{}",
            out.stdout,
            out.stderr,
            host.log()
        );
    }
    let report = load.finish();
    report.assert_clean(&host, 0);
    assert!(
        host.log().matches("is retiring; replacing it").count() >= 20,
        "the load recycled workers during the rolls:\n{}",
        host.log()
    );
}

#[test]
fn an_app_that_calls_retire_is_replaced_and_drained_with_zero_failed_requests() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("retire-after"), "200").unwrap();
    let host = Host::builder(lib("retire-app"))
        .dir(dir.path())
        .args(["--workers", "2", "--graceful-timeout", "20s"])
        .start();
    let load = Load::start(host.addr(), 3, 2);
    // Every worker retires after 200 requests: wait for several generations of them.
    wait_until(&host, WAIT, "six retirements, each drained", || {
        let log = host.log();
        (log.matches("is retiring; replacing it").count() >= 6
            && log.matches(" exited").count() >= 6)
            .then_some(())
    });
    let report = load.finish();
    report.assert_clean(&host, 0);
    let log = host.log();
    assert!(
        !log.contains("still draining after --graceful-timeout"),
        "a retired worker was told to drain, not killed at the deadline:\n{log}"
    );
}

#[test]
fn reload_command_rereads_the_config_like_hup() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "workers = 2\n");
    let host = RawHost::start(dir.path(), [OsArg::from("--config"), config.clone().into()]);
    wait_generation(&host, dir.path(), 1, 2);
    write_config(dir.path(), "workers = 3\nmax-requests = 1000\n");
    let pidfile = dir.path().join("angel.pid");
    let out = ctl(&pidfile, &["reload"]);
    assert_eq!(
        out.code(),
        0,
        "{}{}\n{}",
        out.stdout,
        out.stderr,
        host.log()
    );
    assert!(
        host.log().contains("re-read the config file"),
        "{}",
        host.log()
    );
    wait_generation(&host, dir.path(), 2, 3);
    assert_eq!(status(&pidfile).configured_workers, 3);
}

#[test]
fn extra_slots_from_a_config_change_start_on_the_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "workers = 2\n");
    let host = RawHost::start(dir.path(), [OsArg::from("--config"), config.clone().into()]);
    wait_generation(&host, dir.path(), 1, 2);
    write_config(dir.path(), "workers = 4\n");
    let mark = host.mark();
    host.signal(nix::sys::signal::Signal::SIGHUP);
    host.wait_log_since(mark, " reloaded ", WAIT);
    wait_generation(&host, dir.path(), 2, 4);
    let forks = host.log_since(mark).matches("forked worker[").count();
    assert_eq!(
        forks,
        4,
        "only the 4 workers of generation 2 were forked, none of generation 1:\n{}",
        host.log_since(mark)
    );
}

#[test]
fn timeout_below_two_heartbeats_is_a_usage_error() {
    let out = run_to_exit(
        &["--lib", "x.so", "--timeout", "900ms", "--port", "0"],
        Duration::from_secs(15),
    );
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("--timeout"), "{}", out.stderr);
}

#[test]
fn ready_timeout_below_100ms_in_the_config_is_a_usage_error_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "workers = 2\nready-timeout = \"0\"\n");
    let out = run_exact(
        Some(dir.path()),
        [OsArg::from("--config"), config.into()],
        Duration::from_secs(15),
    );
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("line 6") && out.stderr.contains("100ms"),
        "{}",
        out.stderr
    );
}
