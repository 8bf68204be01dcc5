//! The headline property: rolling under load loses no request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use angel_tests::*;

const ROLLS: u64 = 20;
const MIN_REQUESTS: u64 = 400;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    keepalive_connections: AtomicU64,
}

#[test]
fn twenty_hups_under_concurrent_load_lose_no_request() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let mut clients = Vec::new();
    for keepalive in [true, true, false, false] {
        let (addr, stop, tally) = (host.addr().clone(), stop.clone(), tally.clone());
        clients.push(std::thread::spawn(move || {
            let mut client = Client::new(&addr);
            while !stop.load(Ordering::SeqCst) {
                let result = if keepalive {
                    client.get("/")
                } else {
                    get(&addr, "/")
                };
                match result {
                    Ok(r) if r.text().starts_with("Hello:") => {
                        tally.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => tally.failures.lock().unwrap().push(format!(
                        "{:?} bad body {:?}",
                        started.elapsed(),
                        r.text()
                    )),
                    Err(e) => tally.failures.lock().unwrap().push(format!(
                        "{:?} keepalive={keepalive}: {e}",
                        started.elapsed()
                    )),
                }
            }
            if keepalive {
                tally
                    .keepalive_connections
                    .fetch_add(client.connections, Ordering::SeqCst);
            }
        }));
    }
    let wait_requests = |n: u64| {
        wait_until(&host, WAIT, "requests to flow", || {
            (tally.ok.load(Ordering::SeqCst) >= n).then_some(())
        })
    };
    wait_requests(20);
    for k in 0..ROLLS {
        let roll = host.roll(WAIT);
        assert_eq!(roll.generation, k + 2, "{}", roll.line);
        // Traffic between rolls, so every generation serves.
        let now = tally.ok.load(Ordering::SeqCst);
        wait_requests(now + 10);
    }
    let after = tally.ok.load(Ordering::SeqCst);
    wait_requests(after + 50);
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let failures = tally.failures.lock().unwrap();
    let ok = tally.ok.load(Ordering::SeqCst);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across {ROLLS} rolls: {:#?}\n--- master stderr (tail) ---\n{}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(10)],
        tail(&host.log(), 60)
    );
    assert!(ok >= MIN_REQUESTS, "only {ok} requests served");
    // Keep-alive clients had to move off draining workers: they did, by `Connection: close`.
    assert!(
        tally.keepalive_connections.load(Ordering::SeqCst) > 2,
        "keep-alive clients never reconnected across {ROLLS} rolls"
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
