//! `angel-host status|reload|stop`: the control commands an operator (or an init system) runs
//! against the master named by a pidfile, and their exit codes.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use angel_tests::ops::*;
use angel_tests::*;

fn code(exit: &Exit) -> i32 {
    exit.status.code().unwrap_or_else(|| {
        panic!(
            "command killed by a signal\nstdout: {}\nstderr: {}",
            exit.stdout, exit.stderr
        )
    })
}

fn ready_pids_of(status: &Status) -> BTreeSet<i32> {
    status
        .workers_in("ready")
        .into_iter()
        .map(|w| w.0)
        .collect()
}

#[test]
fn status_reports_the_master_its_generation_library_and_workers() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let serving = host.wait_log("(generation 1", WAIT);
    let sha8 = sha_of(&serving).expect("sha in the serving line");
    let workers: BTreeSet<i32> = host.worker_pids().into_iter().collect();

    // The JSON itself (names and types of every field), then the typed reading of it.
    let status = status_value(host.pidfile());
    let typed = Status::from_value(status.clone());
    assert_eq!(status["pid"], host.pid, "{status}");
    assert_eq!(status["generation"], 1, "{status}");
    assert_eq!(status["configured_workers"], 2, "{status}");
    assert_eq!(status["rolling"], false, "{status}");
    assert_eq!(status["stopping"], false, "{status}");
    assert!(status["uptime_secs"].as_f64().is_some_and(|u| u >= 0.0));
    let lib_path = lib("hello").display().to_string();
    assert_eq!(status["lib"], lib_path.as_str(), "{status}");
    assert_eq!(status["library"], lib_path.as_str(), "{status}");
    let sha = status["sha256"].as_str().expect("sha256 is a string");
    assert!(
        sha.len() == 64 && sha.starts_with(&sha8),
        "sha256 {sha} is the full hash of the `serving` line's {sha8}"
    );
    let listening: Vec<&str> = status["listening"]
        .as_array()
        .expect("listening is an array")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(listening, [host.addr().tcp().to_string()], "{status}");
    assert_eq!(ready_pids_of(&typed), workers, "{status}");
    let mut slots: Vec<u64> = typed.workers_in("ready").iter().map(|w| w.1).collect();
    slots.sort_unstable();
    assert_eq!(slots, [0, 1]);
    for w in status["workers"].as_array().unwrap() {
        assert_eq!(w["generation"], 1, "{w}");
        assert!(w["age_secs"].as_f64().is_some_and(|a| a >= 0.0), "{w}");
    }

    // Request counters arrive with the heartbeats (about 1 s stale).
    for _ in 0..6 {
        get(host.addr(), "/").unwrap();
    }
    poll(
        WAIT,
        "`status` to count the 6 requests",
        || host.log(),
        || {
            let total: u64 = angel_tests::status(host.pidfile())
                .workers
                .iter()
                .map(|w| w.requests)
                .sum();
            (total == 6).then_some(())
        },
    );

    // The table names the same facts.
    let table = ctl(host.pidfile(), &["status"]);
    assert_eq!(code(&table), 0, "{}", table.stderr);
    for needle in [
        format!("master {}", host.pid),
        "generation 1".to_string(),
        sha8.clone(),
        host.addr().tcp().to_string(),
    ] {
        assert!(
            table.stdout.contains(&needle),
            "{needle:?} in:\n{}",
            table.stdout
        );
    }
    for pid in &workers {
        let row = table
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&pid.to_string()))
            .unwrap_or_else(|| panic!("no row for worker {pid}:\n{}", table.stdout));
        assert!(row.contains("ready"), "{row}");
    }
}

#[test]
fn reload_rolls_and_reports_and_a_bad_build_exits_5_while_the_old_generation_serves() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("libapp.so");
    deploy(&lib("hello"), &served);
    let host = Host::builder(&served).dir(dir.path()).start();
    let old: BTreeSet<i32> = host.worker_pids().into_iter().collect();

    let out = ctl(host.pidfile(), &["reload"]);
    assert_eq!(code(&out), 0, "{}\n{}", out.stderr, host.log());
    assert!(
        out.stdout.starts_with("reloaded ") && out.stdout.contains("(generation 2"),
        "{:?}",
        out.stdout
    );
    // The roll was over when the command returned.
    let reloaded = host.wait_log(" reloaded ", WAIT);
    assert_eq!(generation_of(&reloaded), Some(2));
    let status = status(host.pidfile());
    assert_eq!(status.generation, 2, "{}", status.raw);
    let new = ready_pids_of(&status);
    assert_eq!(new.len(), 2);
    assert!(new.is_disjoint(&old), "{old:?} {new:?}");
    host.wait_exited(&old.iter().copied().collect::<Vec<_>>(), WAIT);

    BadLib::Text.deploy(dir.path(), &served);
    let out = ctl(host.pidfile(), &["reload"]);
    assert_eq!(code(&out), 5, "{}\n{}", out.stdout, host.log());
    assert!(
        out.stderr.contains("keeping generation 2")
            && out.stderr.contains(&served.display().to_string()),
        "the failure says why and what still serves: {}",
        out.stderr
    );
    let status = angel_tests::status(host.pidfile());
    assert_eq!(status.generation, 2, "{}", status.raw);
    assert_eq!(ready_pids_of(&status), new);
    for _ in 0..10 {
        let pid = hello_pid(&get(host.addr(), "/").unwrap().text());
        assert!(new.contains(&pid), "{pid} is not of generation 2 {new:?}");
    }
}

#[test]
fn stop_waits_for_a_graceful_exit_and_removes_the_pidfile() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let workers = host.worker_pids();
    let slow = InFlight::start(&host, "/slow?ms=1500");
    let pid = slow.pid;

    let out = ctl(host.pidfile(), &["stop"]);
    assert_eq!(code(&out), 0, "{}\n{}", out.stderr, host.log());
    assert_eq!(out.stdout.trim(), format!("stopped master {}", host.pid));
    // `stop` returned only once the master was gone.
    let status = host.wait_exit(Duration::from_secs(2));
    assert_eq!(status.code(), Some(0), "{}", host.log());
    assert!(!host.pidfile().exists(), "pidfile removed");
    for w in &workers {
        assert!(!pid_running(*w), "worker {w} outlived its master");
    }
    let resp = slow
        .finish()
        .unwrap_or_else(|e| panic!("in-flight request failed by a graceful stop: {e}"));
    assert_eq!(resp.text(), format!("slow:{pid}"));
}

#[test]
fn stop_fast_does_not_wait_for_requests_in_flight() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let slow = InFlight::start(&host, "/slow?ms=8000");
    let started = Instant::now();
    let out = ctl(host.pidfile(), &["stop", "--fast"]);
    assert_eq!(code(&out), 0, "{}\n{}", out.stderr, host.log());
    assert_eq!(out.stdout.trim(), format!("stopped master {}", host.pid));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop --fast took {:?}",
        started.elapsed()
    );
    assert_eq!(host.wait_exit(Duration::from_secs(2)).code(), Some(0));
    assert!(!host.pidfile().exists(), "pidfile removed");
    assert!(slow.finish().is_err(), "the in-flight request was cut");
}

#[test]
fn commands_without_a_pidfile_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("angel.pid");
    for command in [
        &["status"][..],
        &["status", "--json"],
        &["reload"],
        &["stop"],
    ] {
        let out = ctl(&pidfile, command);
        assert_eq!(code(&out), 3, "{command:?}: {}", out.stderr);
        assert!(
            out.error_line().contains("not running"),
            "{command:?}: {}",
            out.stderr
        );
    }
}

fn assert_stale(pidfile: &Path, what: &str) {
    for command in [&["status"][..], &["reload"], &["stop"]] {
        let out = ctl(pidfile, command);
        assert_eq!(code(&out), 1, "{what}, {command:?}: {}", out.stderr);
        assert!(
            out.error_line().contains("stale pidfile"),
            "{what}, {command:?}: {}",
            out.stderr
        );
    }
}

#[test]
fn commands_with_a_stale_pidfile_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("angel.pid");
    // Above any pid_max: certainly no process.
    std::fs::write(&pidfile, "99999999\n").unwrap();
    assert_stale(&pidfile, "a dead pid");
    // A live process that is not an angel-host master: this test.
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
    assert_stale(&pidfile, "a live pid of another program");
}

/// The control socket's path, as `angel_host::ctl` documents it.
fn control_socket(master: i32) -> std::path::PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("angel-host-{}", nix::unistd::getuid()))
        .join(format!("master-{master}.sock"))
}

#[test]
fn a_master_without_its_control_socket_exits_4_and_keeps_serving() {
    let host = Host::start(lib("hello"), &["--workers", "1"]);
    let socket = control_socket(host.pid);
    assert!(
        socket.exists(),
        "the control socket is at {}",
        socket.display()
    );
    std::fs::remove_file(&socket).unwrap();
    let out = ctl(host.pidfile(), &["status"]);
    assert_eq!(code(&out), 4, "{}", out.stderr);
    assert!(
        out.error_line()
            .contains(&format!("cannot talk to master {}", host.pid)),
        "{}",
        out.stderr
    );
    get(host.addr(), "/").unwrap();
}
