//! `--config angel.toml` (keys = long flag names; flags and `ANGEL_*` override it; re-read on
//! SIGHUP) and refused values, in the file and on the command line.

use std::path::Path;
use std::time::Duration;

use angel_tests::config_file::*;
use angel_tests::ops::*;
use angel_tests::*;
use nix::sys::signal::Signal;

type OsArg = std::ffi::OsString;

/// Bound on a start-up that must fail before it binds anything.
const FAIL_FAST: Duration = Duration::from_secs(15);

fn configured_workers(dir: &Path) -> usize {
    status(&dir.join("angel.pid")).configured_workers
}

fn hello_ok(host: &RawHost) {
    let body = get(host.addr(), "/")
        .unwrap_or_else(|e| panic!("GET / failed: {e}\n{}", host.log()))
        .text();
    assert!(body.starts_with("Hello:"), "{body:?}");
}

#[test]
fn the_config_file_alone_configures_and_starts_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "workers = 3\ngraceful-timeout = \"5s\"\n");
    let host = RawHost::start(dir.path(), [OsArg::from("--config"), config.into()]);
    let serving = host.wait_log_since(0, " serving ", WAIT);
    assert!(serving.contains("3 workers"), "{serving}");
    assert_eq!(host.addr().tcp().ip().to_string(), "127.0.0.1");
    let pidfile = dir.path().join("angel.pid");
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", host.pid)
    );
    assert_eq!(configured_workers(dir.path()), 3);
    wait_generation(&host, dir.path(), 1, 3);
    hello_ok(&host);
}

#[test]
fn flags_and_environment_override_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "workers = 3\n");
    {
        let host = RawHost::start(
            dir.path(),
            [
                OsArg::from("--config"),
                config.clone().into(),
                "--workers".into(),
                "1".into(),
            ],
        );
        assert_eq!(configured_workers(dir.path()), 1, "{}", host.log());
        hello_ok(&host);
    }
    let host = RawHost::start_with_env(
        dir.path(),
        [OsArg::from("--config"), config.into()],
        &[("ANGEL_WORKERS", "2")],
    );
    assert_eq!(configured_workers(dir.path()), 2, "{}", host.log());
    hello_ok(&host);
}

#[test]
fn an_unknown_key_is_refused_naming_the_key_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "workers = 2\nwokers = 3\n");
    let out = run_exact(
        Some(dir.path()),
        [OsArg::from("--config"), config.clone().into()],
        FAIL_FAST,
    );
    assert_eq!(out.code(), 2, "{}", out.stderr);
    let error = out.error_line();
    assert!(
        error.contains(&format!("config {} line 6", config.display()).to_lowercase())
            && error.contains("wokers"),
        "names the file, line 6 and the key: {error}"
    );
    assert!(!dir.path().join("angel.pid").exists(), "nothing started");
}

#[test]
fn absurd_values_in_the_config_file_are_refused_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "workers = 0",
        "workers = -1",
        "workers = 5000",
        "timeout = \"-1s\"",
        "graceful-timeout = \"99999h\"",
        "ready-timeout = \"soon\"",
        "debounce = \"fast\"",
        "reload-regex = \"(\"",
        "max-requests = -3",
        "port = 70000",
        "log-format = \"xml\"",
    ] {
        // The bad value is on line 5, after the four base lines.
        let config = write_config(dir.path(), &format!("{bad}\n"));
        let out = run_exact(
            Some(dir.path()),
            [OsArg::from("--config"), config.clone().into()],
            FAIL_FAST,
        );
        assert_eq!(out.code(), 2, "{bad}: {}", out.stderr);
        let error = out.error_line();
        assert!(
            error.contains(&format!("config {} line 5:", config.display()).to_lowercase()),
            "{bad}: the error names the file and line 5: {error}"
        );
        // `--check` validates the file too.
        let check = run_exact(
            Some(dir.path()),
            [OsArg::from("--check"), "--config".into(), config.into()],
            FAIL_FAST,
        );
        assert_eq!(check.code(), 2, "--check with {bad}: {}", check.stderr);
    }
}

#[test]
fn check_accepts_a_good_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "workers = 2\ntimeout = \"10s\"\n");
    let out = run_exact(
        Some(dir.path()),
        [OsArg::from("--check"), "--config".into(), config.into()],
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stdout.contains("configuration ok"), "{:?}", out.stdout);
    assert!(
        !dir.path().join("angel.pid").exists(),
        "--check writes no pidfile"
    );
}

#[test]
fn hup_rereads_the_config_file_and_applies_workers_at_the_roll() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "workers = 2\n");
    let host = RawHost::start(dir.path(), [OsArg::from("--config"), config.clone().into()]);
    wait_generation(&host, dir.path(), 1, 2);

    // workers can change at a roll; port only at a restart.
    let edited = config_base(dir.path()).replace("port = 0", "port = 1") + "workers = 3\n";
    std::fs::write(&config, edited).unwrap();
    let mark = host.mark();
    host.signal(Signal::SIGHUP);
    host.wait_log_since(mark, "re-read the config file", WAIT);
    host.wait_log_since(mark, "workers: 2 -> 3", WAIT);
    host.wait_log_since(
        mark,
        "port changed in the config file; it takes effect only at a restart",
        WAIT,
    );
    let reloaded = host.wait_log_since(mark, " reloaded ", WAIT);
    assert_eq!(generation_of(&reloaded), Some(2), "{reloaded}");
    wait_generation(&host, dir.path(), 2, 3);
    assert_eq!(configured_workers(dir.path()), 3);
    // Still on the port it bound at start.
    hello_ok(&host);
}

#[test]
fn hup_with_a_broken_config_file_logs_it_and_rolls_with_the_running_settings() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "workers = 2\n");
    let host = RawHost::start(dir.path(), [OsArg::from("--config"), config.clone().into()]);
    wait_generation(&host, dir.path(), 1, 2);

    std::fs::write(
        &config,
        config_base(dir.path()) + "workers = 3\nwokers = 4\n",
    )
    .unwrap();
    let mark = host.mark();
    host.signal(Signal::SIGHUP);
    let error = host.wait_log_since(mark, "keeping the running configuration", WAIT);
    assert!(
        error.contains(&format!("config {} line 6", config.display())) && error.contains("wokers"),
        "names the file, the line and the key: {error}"
    );
    let reloaded = host.wait_log_since(mark, " reloaded ", WAIT);
    assert_eq!(generation_of(&reloaded), Some(2), "the roll still happens");
    wait_generation(&host, dir.path(), 2, 2);
    assert_eq!(configured_workers(dir.path()), 2, "workers unchanged");
    assert!(!host.log_since(mark).contains("workers: 2 -> 3"));
    hello_ok(&host);
}

/// Every refused command-line value exits 2 with an error naming the flag.
fn assert_refused(args: &[&str], flag: &str) {
    let out = Host::builder(lib("hello"))
        .args(args)
        .run_to_exit(FAIL_FAST);
    assert_eq!(out.code(), 2, "{args:?}: {}", out.stderr);
    let error = out.error_line();
    assert!(
        error.contains(flag),
        "{args:?}: the error names {flag}: {error}"
    );
}

#[test]
fn absurd_flag_values_are_refused_naming_the_flag() {
    for (args, flag) in [
        (&["--workers", "0"][..], "--workers"),
        (&["--workers", "5000"], "--workers"),
        (&["--graceful-timeout", "99999h"], "--graceful-timeout"),
        (&["--timeout=-1s"], "--timeout"),
        (&["--timeout", "forever"], "--timeout"),
        (&["--max-requests=-3"], "--max-requests"),
        (&["--max-requests-jitter=-1"], "--max-requests-jitter"),
    ] {
        assert_refused(args, flag);
    }
}

/// `--timeout -1s` as two arguments, the way an operator types it.
#[test]
fn negative_values_as_separate_arguments_are_refused_naming_the_flag() {
    for (args, flag) in [
        (&["--timeout", "-1s"][..], "--timeout"),
        (&["--max-requests", "-3"], "--max-requests"),
    ] {
        assert_refused(args, flag);
    }
}
