//! Stopping: TERM drains and exits cleanly, INT is fast; both leave nothing behind.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use angel_tests::*;
use nix::sys::signal::Signal;

fn assert_left_nothing(host: &Host, workers: &[i32]) {
    assert!(!host.pidfile().exists(), "pidfile removed\n{}", host.log());
    for pid in workers {
        assert!(
            !pid_running(*pid),
            "worker {pid} still running\n{}",
            host.log()
        );
    }
    if let Addr::Tcp(addr) = host.addr() {
        TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("port {addr} not free after stop: {e}\n{}", host.log()));
    }
}

#[test]
fn term_drains_exits_0_frees_the_port_removes_the_pidfile_and_reaps_workers() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let workers = host.worker_pids();
    assert_eq!(workers.len(), 2);
    get(host.addr(), "/").unwrap();
    let slow = InFlight::start(&host, "/slow?ms=1000");
    host.signal(Signal::SIGTERM);
    let status = host.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", host.log());
    let pid = slow.pid;
    let resp = slow
        .finish()
        .unwrap_or_else(|e| panic!("in-flight request failed on TERM: {e}\n{}", host.log()));
    assert_eq!(
        resp.text(),
        format!("slow:{pid}"),
        "in-flight request drained"
    );
    assert_left_nothing(&host, &workers);
}

#[test]
fn int_stops_fast_exits_0_and_removes_the_pidfile() {
    let host = Host::start(
        lib("hello"),
        &["--workers", "2", "--graceful-timeout", "60s"],
    );
    let workers = host.worker_pids();
    // An in-flight request that would hold a graceful stop for 20 s.
    let _slow = InFlight::start(&host, "/slow?ms=20000");
    let sent = Instant::now();
    host.signal(Signal::SIGINT);
    let status = host.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", host.log());
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "INT is fast: took {:?}\n{}",
        sent.elapsed(),
        host.log()
    );
    assert_left_nothing(&host, &workers);
}

#[test]
fn second_term_turns_a_graceful_stop_fast() {
    let host = Host::start(
        lib("hello"),
        &["--workers", "1", "--graceful-timeout", "60s"],
    );
    let workers = host.worker_pids();
    let _slow = InFlight::start(&host, "/slow?ms=20000");
    let mark = host.mark();
    host.signal(Signal::SIGTERM);
    // The graceful stop has begun when the worker closes its listener.
    host.wait_log_since(mark, &format!("worker[{}] closes", workers[0]), WAIT);
    assert!(
        host.try_status().is_none(),
        "still draining the 20 s request"
    );
    let second = Instant::now();
    host.signal(Signal::SIGTERM);
    let status = host.wait_exit(WAIT);
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "second TERM is fast: took {:?}\n{}",
        second.elapsed(),
        host.log()
    );
    assert_eq!(status.code(), Some(0), "{}", host.log());
    assert_left_nothing(&host, &workers);
}
