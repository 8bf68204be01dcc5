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

/// What a process is blocked in, from `/proc/PID/syscall`: the syscall number and its
/// arguments, or `None` while it runs.
fn blocked_in(pid: i32) -> Option<Vec<u64>> {
    let path = format!("/proc/{pid}/syscall");
    let line = match std::fs::read_to_string(&path) {
        Ok(line) => line,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            panic!("{path}: {e} (this test reads it as the worker's ancestor; ptrace restricted?)")
        }
        Err(_) => return None,
    };
    // The number in decimal, then the arguments, stack and program counter in hex.
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| match f.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => f.parse().ok(),
        })
        .collect::<Option<_>>()?;
    (fields.len() >= 6).then_some(fields)
}

/// The SDK's own timers (the heartbeat, each connection's header read deadline) are kernel
/// timers in the epoll set, not tokio timers: with one of those pending, every blocking
/// `epoll_wait` carries a timeout the kernel pays a high-resolution timer for (measured in
/// the reference server: see `sdk/src/ticker.rs`). So an idle worker with a kept-alive
/// connection, whose app has no timer of its own, waits with no timeout at all.
#[cfg(target_arch = "x86_64")]
#[test]
fn an_idle_worker_with_a_kept_alive_connection_waits_without_a_timeout() {
    const EPOLL_WAIT: u64 = 232;
    const EPOLL_PWAIT: u64 = 281;
    const EPOLL_PWAIT2: u64 = 441;
    let host = Host::start(lib("hello"), &["--workers", "1"]);
    let mut client = Client::new(host.addr());
    let served = client.get("/").expect("GET /");
    let pid = hello_pid(&served.text());
    let waits = wait_until(&host, WAIT, "the worker blocked in epoll_wait", || {
        blocked_in(pid).filter(|f| [EPOLL_WAIT, EPOLL_PWAIT, EPOLL_PWAIT2].contains(&f[0]))
    });
    // epoll_wait(epfd, events, maxevents, timeout): an int timeout, -1 for none; epoll_pwait2
    // takes a timespec pointer, null for none.
    let infinite = match waits[0] {
        EPOLL_PWAIT2 => waits[4] == 0,
        _ => waits[4] as u32 == u32::MAX,
    };
    assert!(
        infinite,
        "the idle worker waits with a timeout: /proc/{pid}/syscall {waits:x?}\n--- master stderr ---\n{}",
        host.log()
    );
    // The kept-alive connection still serves.
    let again = client.get("/").expect("GET / again");
    assert_eq!(hello_pid(&again.text()), pid);
}
