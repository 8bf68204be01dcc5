//! A worker of an SDK app is a single-threaded process: the drain fd is an epoll set the kernel
//! readies by itself (the master's `drain`, its EOF, a `SIGTERM`), so the host starts no thread
//! of its own and glibc keeps its single-thread fast paths (the master-gone case is in
//! `lifecycle.rs`). An app that does not report the
//! drain (C, ABI 1.0/1.1) keeps the host's control and signal threads, and drains the same.

use angel_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The threads of a process, by name.
fn threads(pid: i32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .collect()
}

#[test]
fn an_sdk_worker_runs_no_thread_of_the_host() {
    let host = Host::start(lib("hello"), &["--workers", "1"]);
    let served = get(host.addr(), "/").expect("GET /");
    let pid = hello_pid(&served.text());
    assert_eq!(
        threads(pid),
        ["exe"],
        "the worker's only thread is its main thread\n--- master stderr ---\n{}",
        host.log()
    );
}

#[test]
fn a_term_to_an_sdk_worker_drains_its_in_flight_request() {
    let host = Host::start(lib("hello"), &["--workers", "1"]);
    let slow = InFlight::start(&host, "/slow?ms=1500");
    let pid = slow.pid;
    let mark = host.mark();
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("TERM the worker");
    host.wait_log_since(mark, &format!("worker[{pid}] closes (SIGTERM)"), WAIT);
    let resp = slow.finish().unwrap_or_else(|e| {
        panic!(
            "in-flight request failed on a worker TERM: {e}\n--- master stderr ---\n{}",
            host.log()
        )
    });
    assert_eq!(resp.text(), format!("slow:{pid}"));
    assert!(resp.closes(), "a draining worker closes the connection");
    // Drained, then replaced: the TERM was a drain, not a death by signal.
    host.wait_log_since(
        mark,
        &format!("worker {pid} died (exited with status 0)"),
        WAIT,
    );
    let log = host.log();
    assert!(!log.contains("killed by SIGTERM"), "{log}");
}

#[test]
fn a_c_app_worker_keeps_the_host_threads_and_drains_on_term() {
    let host = Host::start(lib("c-hello"), &["--workers", "1"]);
    let worker = host.worker_pids()[0];
    let names = threads(worker);
    assert!(
        names.iter().any(|n| n == "angel-control") && names.iter().any(|n| n == "angel-sigterm"),
        "{names:?}"
    );
    let mark = host.mark();
    kill(Pid::from_raw(worker), Signal::SIGTERM).expect("TERM the worker");
    host.wait_log_since(mark, &format!("worker[{worker}] closes (SIGTERM)"), WAIT);
    host.wait_log_since(
        mark,
        &format!("worker {worker} died (exited with status 0)"),
        WAIT,
    );
}
