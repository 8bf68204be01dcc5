//! The master's loop never waits for a client, and a graceful stop closes its doors cleanly:
//! end-to-end proofs of behaviour the core and shell already have.

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use angel_tests::ops::*;
use angel_tests::*;
use nix::sys::signal::Signal;

/// The control socket's path, as `angel_host::ctl` documents it.
fn control_socket(master: i32) -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("angel-host-{}", nix::unistd::getuid()))
        .join(format!("master-{master}.sock"))
}

/// `VmHWM` (peak resident set) of `pid`, in kB.
fn vm_hwm_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// Status on this loaded 2-core machine, debug build: what an operator would call "at once".
const STATUS_BOUND: Duration = Duration::from_millis(500);

#[test]
fn dribbling_control_client_does_not_delay_a_hup_or_status() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let socket = control_socket(host.pid);
    let stop = Arc::new(AtomicBool::new(false));
    // One byte every 150 ms, never a newline; reconnects whenever the master drops it.
    let dribbler = {
        let (socket, stop) = (socket.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut connections = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = UnixStream::connect(&socket) else {
                    std::thread::sleep(Duration::from_millis(150));
                    continue;
                };
                connections += 1;
                while !stop.load(Ordering::Relaxed) && s.write_all(b"s").is_ok() {
                    std::thread::sleep(Duration::from_millis(150));
                }
            }
            connections
        })
    };
    // Let the dribbler be mid-line.
    std::thread::sleep(Duration::from_millis(400));

    let mut status_times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = ctl(host.pidfile(), &["status"]);
        status_times.push(t.elapsed());
        assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stderr, host.log());
    }
    let t = Instant::now();
    let roll = host.roll(WAIT);
    let hup_took = t.elapsed();
    assert_eq!(roll.generation, 2);

    stop.store(true, Ordering::Relaxed);
    let connections = dribbler.join().expect("dribbler");
    status_times.sort();
    let worst = *status_times.last().expect("five");
    eprintln!(
        "status with a dribbling client: median {:?}, worst {worst:?}; HUP → reloaded {hup_took:?}; dribbler connections {connections}",
        status_times[2]
    );
    assert!(
        worst < STATUS_BOUND,
        "status took {worst:?} with a dribbling client\n{}",
        host.log()
    );
    assert!(
        hup_took < Duration::from_secs(5),
        "HUP took {hup_took:?}\n{}",
        host.log()
    );

    // A 10 MB line does not grow the master.
    let before = vm_hwm_kb(host.pid);
    let mut s = UnixStream::connect(&socket).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    while sent < 10 * 1024 * 1024 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            // The master answered the over-long line and closed: it read no more than its cap.
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                break
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => break,
            Err(e) => panic!("writing the long line: {e}"),
        }
    }
    let status = ctl(host.pidfile(), &["status"]);
    assert_eq!(status.status.code(), Some(0), "{}", status.stderr);
    let after = vm_hwm_kb(host.pid);
    eprintln!("master VmHWM {before} kB before, {after} kB after a {sent}-byte line");
    assert!(
        after.saturating_sub(before) < 3 * 1024,
        "master peak RSS grew from {before} kB to {after} kB"
    );
}

/// A graceful stop freezes each socket before any worker drains (new SYNs are dropped; the
/// client's SYN retry a second later is refused), and each draining worker accepts what is
/// queued before it lets go, so no connection is completed by the kernel and then reset with
/// the socket's queue. Without the freeze a connection completed between the workers' last
/// accept and the last close was reset.
#[test]
fn connections_during_a_graceful_stop_are_refused_not_reset() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let addr = host.addr().clone();
    let slow = InFlight::start(&host, "/slow?ms=2000");
    let term = Instant::now();
    host.signal(Signal::SIGTERM);

    // Until the doors close, every connect is answered; after, every connect is refused.
    let mut answered = 0u32;
    let refused_after = loop {
        match get(&addr, "/") {
            Ok(_) => answered += 1,
            Err(e) if e.starts_with("connect") && e.contains("refused") => break term.elapsed(),
            Err(e) => panic!(
                "a connection accepted {:?} after TERM was not answered: {e}\n{}",
                term.elapsed(),
                host.log()
            ),
        }
        assert!(
            term.elapsed() < Duration::from_secs(5),
            "still accepting 5 s after TERM\n{}",
            host.log()
        );
    };
    // Refused stays refused.
    for _ in 0..20 {
        let e = std::net::TcpStream::connect(addr.tcp()).expect_err("refused after the close");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    }
    let resp = slow
        .finish()
        .unwrap_or_else(|e| panic!("slow request: {e}\n{}", host.log()));
    assert_eq!(resp.status, 200, "{}", host.log());
    eprintln!(
        "graceful stop: connects refused {refused_after:?} after TERM ({answered} answered before); slow request answered at {:?}",
        term.elapsed()
    );
    assert!(
        refused_after < Duration::from_millis(2000),
        "doors closed only {refused_after:?} after TERM, after the slow request\n{}",
        host.log()
    );
    host.wait_exit(WAIT);
}

/// The same with many clients connecting at once, each as fast as it can: every connection
/// made during the stop is answered or refused at connect, none is reset.
#[test]
fn a_graceful_stop_under_concurrent_connects_resets_nothing() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let addr = host.addr().clone();
    let slow = InFlight::start(&host, "/slow?ms=1500");
    let stop = Arc::new(AtomicBool::new(false));
    let answered_total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (addr, stop, counter) = (addr.clone(), stop.clone(), answered_total.clone());
            std::thread::spawn(move || {
                let (mut answered, mut failures) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match get(&addr, "/") {
                        Ok(_) => {
                            answered += 1;
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.starts_with("connect") && e.contains("refused") => break,
                        Err(e) => failures.push(e),
                    }
                }
                (answered, failures)
            })
        })
        .collect();
    // Traffic flows before the stop begins.
    poll(
        WAIT,
        "requests answered before TERM",
        || host.log(),
        || (answered_total.load(Ordering::Relaxed) >= 200).then_some(()),
    );
    host.signal(Signal::SIGTERM);
    let deadline = Instant::now() + WAIT;
    let mut total = 0;
    let mut lost = Vec::new();
    for c in clients {
        while !c.is_finished() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        if !c.is_finished() {
            stop.store(true, Ordering::Relaxed);
        }
        let (answered, failures) = c.join().expect("client thread");
        total += answered;
        lost.extend(failures);
    }
    assert!(
        lost.is_empty(),
        "{} of {} connections made during the stop failed other than by a refusal: {:?}\n{}",
        lost.len(),
        total + lost.len() as u64,
        &lost[..lost.len().min(5)],
        host.log()
    );
    assert!(total > 0, "no request answered at all\n{}", host.log());
    let resp = slow
        .finish()
        .unwrap_or_else(|e| panic!("slow request: {e}\n{}", host.log()));
    assert_eq!(resp.status, 200, "{}", host.log());
    host.wait_exit(WAIT);
}

/// A graceful stop stops taking connections right away (new clients are refused while a slow
/// request still runs), instead of queueing them in sockets nobody serves until the last
/// worker exits. A client whose SYN met the frozen socket is refused on its retry, a second
/// later (Linux's initial retransmission timeout).
#[test]
fn a_graceful_stop_refuses_new_connections_while_slow_requests_finish() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let addr = host.addr().clone();
    let slow = InFlight::start(&host, "/slow?ms=2000");
    let term = Instant::now();
    host.signal(Signal::SIGTERM);
    let refused_after = poll(
        WAIT,
        "connects to be refused",
        || host.log(),
        || match std::net::TcpStream::connect(addr.tcp()) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some(term.elapsed()),
            _ => None,
        },
    );
    let resp = slow
        .finish()
        .unwrap_or_else(|e| panic!("slow request: {e}\n{}", host.log()));
    assert_eq!(resp.status, 200, "{}", host.log());
    assert!(
        refused_after < Duration::from_millis(1500),
        "connects refused only {refused_after:?} after TERM\n{}",
        host.log()
    );
    host.wait_exit(WAIT);
}
