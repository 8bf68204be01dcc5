//! Serving and rolling: the happy paths of issue 2.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::Duration;

use angel_tests::*;

fn set(pids: &[i32]) -> BTreeSet<i32> {
    pids.iter().copied().collect()
}

#[test]
fn three_workers_serve_with_three_distinct_pids() {
    let host = Host::start(lib("hello"), &["--workers", "3"]);
    let logged = set(&host.worker_pids());
    assert_eq!(
        logged.len(),
        3,
        "3 ready workers in the log:\n{}",
        host.log()
    );
    let answered = hello_pids(&host, 3);
    assert_eq!(
        answered, logged,
        "the pids answering are the logged workers"
    );
    assert!(!answered.contains(&host.pid), "the master never serves");
    let body = get(host.addr(), "/").unwrap().text();
    assert!(body.starts_with("Hello:"), "default message, got {body:?}");
}

#[test]
fn pidfile_holds_the_master_pid() {
    let host = Host::start(lib("hello"), &[]);
    let content = std::fs::read_to_string(host.pidfile()).unwrap();
    assert_eq!(content, format!("{}\n", host.pid));
    host.wait_log(
        &format!("created pid_file: {}", host.pidfile().display()),
        WAIT,
    );
}

#[test]
fn hup_replaces_every_worker_and_later_requests_reach_the_new_generation() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let old = set(&host.worker_pids());
    assert_eq!(old.len(), 2);
    assert_eq!(hello_pids(&host, 2), old);

    let roll = host.roll(WAIT);
    assert_eq!(roll.generation, 2, "{}", roll.line);
    let new = set(&roll.new_pids);
    assert_eq!(
        new.len(),
        2,
        "2 new workers ready before `reloaded`:\n{}",
        host.log()
    );
    assert!(
        new.is_disjoint(&old),
        "every pid changed: old {old:?} new {new:?}"
    );
    host.wait_log_since(roll.mark, "SIGHUP", WAIT);

    host.wait_exited(&old.iter().copied().collect::<Vec<_>>(), WAIT);
    for pid in &old {
        host.wait_log_since(roll.mark, &format!("worker[{pid}] closes"), WAIT);
        assert!(!pid_running(*pid), "old worker {pid} still running");
    }
    for _ in 0..20 {
        let pid = hello_pid(&get(host.addr(), "/").unwrap().text());
        assert!(
            new.contains(&pid),
            "pid {pid} is not of generation 2 {new:?}"
        );
    }
    assert_eq!(hello_pids(&host, 2), new);
    assert_eq!(set(&host.worker_pids()), new);
}

/// angel.js's restart-app: the served path is overwritten by a deploy, then HUP.
#[test]
fn deploy_over_the_served_path_then_hup_serves_the_new_build() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("libapp.so");
    deploy(&lib("hello"), &served);
    let host = Host::builder(&served).dir(dir.path()).start();
    let serving = host.wait_log("(generation 1", WAIT);
    assert!(
        serving.contains(&served.display().to_string()),
        "serving line names the served path: {serving}"
    );
    let old = set(&host.worker_pids());
    let body = get(host.addr(), "/").unwrap().text();
    assert!(body.starts_with("Hello:"), "{body:?}");

    deploy(&lib("app"), &served);
    let roll = host.roll(WAIT);
    assert_ne!(
        roll.sha,
        sha_of(&serving),
        "a different build has a different sha: {serving} / {}",
        roll.line
    );
    let new = set(&roll.new_pids);
    assert!(!new.is_empty() && new.is_disjoint(&old), "{old:?} {new:?}");
    host.wait_exited(&old.iter().copied().collect::<Vec<_>>(), WAIT);
    for _ in 0..10 {
        assert_eq!(
            get(host.addr(), "/").unwrap().text(),
            "Hello from angel-host\n"
        );
    }
    assert_eq!(get(host.addr(), "/healthz").unwrap().text().trim(), "ok");
}

#[test]
fn request_in_flight_during_hup_completes() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let old = set(&host.worker_pids());
    let slow = InFlight::start(&host, "/slow?ms=4000");
    assert!(old.contains(&slow.pid));
    let roll = host.roll(WAIT);
    assert!(
        !slow.response.is_finished(),
        "the roll completed while the request was in flight"
    );
    assert!(
        !roll.new_pids.contains(&slow.pid),
        "the serving worker is of the old generation"
    );
    let pid = slow.pid;
    let resp = slow
        .finish()
        .unwrap_or_else(|e| panic!("slow request failed across the roll: {e}\n{}", host.log()));
    assert_eq!(resp.text(), format!("slow:{pid}"));
}

#[test]
fn ticker_stream_open_across_hup_ends_with_its_drained_line() {
    let host = Host::start(lib("ticker"), &["--workers", "2"]);
    let mut stream = Streaming::open(host.addr(), "/").unwrap();
    assert_eq!(stream.status, 200);
    let first = String::from_utf8(stream.next_chunk().unwrap().expect("a first tick")).unwrap();
    let pid: i32 = first
        .strip_prefix("worker[")
        .and_then(|r| r.split_once(']'))
        .and_then(|(p, _)| p.parse().ok())
        .unwrap_or_else(|| panic!("first tick {first:?} is not `worker[<pid>] <n>`"));
    assert!(host.worker_pids().contains(&pid));

    host.roll(WAIT);
    let mut text = first;
    let mut ended = false;
    for _ in 0..100 {
        match stream.next_chunk() {
            Ok(Some(chunk)) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(None) => {
                ended = true;
                break;
            }
            Err(e) => panic!(
                "stream broke instead of ending cleanly: {e}\nso far:\n{text}\n{}",
                host.log()
            ),
        }
    }
    assert!(ended, "stream never ended:\n{text}");
    assert_eq!(
        text.lines().last(),
        Some(format!("worker[{pid}] drained").as_str()),
        "stream:\n{text}"
    );
    stream.wait_close().unwrap();
    host.wait_log(&format!("worker {pid} exited"), WAIT);
}

#[test]
fn echo_serves_tcp_and_its_connection_ends_with_fin_on_hup() {
    let host = Host::start(lib("echo"), &["--workers", "2"]);
    let mut conn = Conn::connect(host.addr()).unwrap();
    conn.write_all(b"ping\n").unwrap();
    let mut buf = [0; 5];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n");

    host.roll(WAIT);
    let mut rest = Vec::new();
    match conn.read_to_end(&mut rest) {
        // The echo protocol's goodbye, then FIN.
        Ok(_) => assert_eq!(rest, b"BYE\n", "{:?}", String::from_utf8_lossy(&rest)),
        Err(e) => panic!("echo connection ended with {e} (not a FIN)\n{}", host.log()),
    }

    let mut fresh = Conn::connect(host.addr()).unwrap();
    fresh.write_all(b"after the roll\n").unwrap();
    fresh.shutdown_write().unwrap();
    let mut echoed = Vec::new();
    fresh.read_to_end(&mut echoed).unwrap();
    assert_eq!(echoed, b"after the roll\n");
}

/// angel.js's accidental-death: a worker that dies is replaced at once.
#[test]
fn crashed_worker_is_replaced_and_a_new_pid_serves_within_a_second() {
    let host = Host::start(lib("hello"), &["--workers", "1"]);
    let old = hello_pid(&get(host.addr(), "/").unwrap().text());
    let mark = host.mark();
    get(host.addr(), "/crash").unwrap();
    let died = host.wait_log_since(mark, &format!("worker {old} died"), WAIT);
    assert!(died.contains('('), "died line names the status: {died}");

    let last_err = std::cell::RefCell::new(String::new());
    let new = poll(
        Duration::from_secs(1),
        &format!("a new worker to serve within 1s of `{died}`"),
        || format!("(last: {})\n{}", last_err.borrow(), host.log()),
        || {
            match get(host.addr(), "/") {
                Ok(r) if hello_pid(&r.text()) != old => return Some(hello_pid(&r.text())),
                Ok(r) => {
                    *last_err.borrow_mut() =
                        format!("still served by the dead worker: {}", r.text())
                }
                Err(e) => *last_err.borrow_mut() = e,
            }
            None
        },
    );
    // The master logs the fork itself; the line may trail the new worker's first response.
    host.wait_log_since(mark, &format!("forked worker[{new}]"), WAIT);
    host.wait_log_since(mark, &format!("worker[{new}] listening on"), WAIT);
    assert_eq!(host.worker_pids(), vec![new]);
}
