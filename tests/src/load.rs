//! [`Load`]: concurrent client threads sending `GET /` until [`Load::finish`], recording every
//! failure (nothing is retried), the answers per worker pid and when each kind of body was
//! first seen.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::body::{body_kind, body_pid};
use crate::http::{get, Addr, Client};
use crate::{Host, WAIT};

/// Pause between two requests of one client thread: keeps a 2-core box responsive.
const LOAD_PACE: Duration = Duration::from_millis(2);

/// What the clients saw so far, shared by their threads.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    per_pid: Mutex<BTreeMap<i32, u64>>,
    first_seen: Mutex<Vec<(String, Instant)>>,
}

impl Tally {
    fn answered(&self, body: &str) {
        let kind = body_kind(body);
        let mut seen = self.first_seen.lock().expect("tally");
        if !seen.iter().any(|(k, _)| *k == kind) {
            seen.push((kind, Instant::now()));
        }
        drop(seen);
        if let Some(pid) = body_pid(body) {
            *self.per_pid.lock().expect("tally").entry(pid).or_default() += 1;
        }
        self.ok.fetch_add(1, Ordering::SeqCst);
    }

    fn failed(&self, failure: String) {
        self.failures.lock().expect("tally").push(failure);
    }
}

/// Empties a tally field (the clients are stopped).
fn take<T: Default>(field: &Mutex<T>) -> T {
    std::mem::take(&mut *field.lock().expect("tally"))
}

/// What a [`Load`] saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Every failed request (an error or a non-2xx answer), with its client and time.
    pub failures: Vec<String>,
    /// Answers per worker pid, for bodies that name one (`<message>:<pid>`).
    pub per_pid: BTreeMap<i32, u64>,
    /// When each [`body_kind`] was first answered, in order.
    pub first_seen: Vec<(String, Instant)>,
}

impl LoadReport {
    /// Panics (with the host's log) unless every request succeeded and at least `min` did.
    pub fn assert_clean(&self, host: &Host, min: u64) {
        assert!(
            self.failures.is_empty(),
            "{} of {} requests failed: {:#?}\n--- master stderr ---\n{}",
            self.failures.len(),
            self.ok + self.failures.len() as u64,
            &self.failures[..self.failures.len().min(10)],
            host.log()
        );
        assert!(
            self.ok >= min,
            "only {} requests answered (wanted ≥ {min})",
            self.ok
        );
    }
}

/// Client threads sending `GET /` in a loop until [`Load::finish`]: some keep one connection
/// alive (reconnecting only when a response says `Connection: close`), some open a new
/// connection per request. Any 2xx answer counts as ok; every error or non-2xx answer is
/// recorded as a failure, nothing is retried.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `keep_alive` keep-alive clients and `fresh` new-connection-per-request clients.
    pub fn start(addr: &Addr, keep_alive: usize, fresh: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let started = Instant::now();
        let threads = (0..keep_alive + fresh)
            .map(|c| {
                let (stop, tally, addr) = (stop.clone(), tally.clone(), addr.clone());
                let reuse = c < keep_alive;
                std::thread::spawn(move || {
                    let mut client = Client::new(&addr);
                    // For failure messages: the worker and age of the keep-alive connection.
                    let (mut conn_pid, mut conn_uses, mut last_done) = (None, 0u64, Instant::now());
                    while !stop.load(Ordering::SeqCst) {
                        let connections = client.connections;
                        let sent = Instant::now();
                        let idle = sent - last_done;
                        let result = if reuse {
                            client.get("/")
                        } else {
                            get(&addr, "/")
                        };
                        last_done = Instant::now();
                        if client.connections != connections {
                            (conn_pid, conn_uses) = (None, 0);
                        }
                        let at = started.elapsed();
                        match result {
                            Ok(resp) => {
                                let body = resp.text();
                                tally.answered(&body);
                                (conn_pid, conn_uses) = (body_pid(&body), conn_uses + 1);
                            }
                            Err(e) if reuse => tally.failed(format!(
                                "keep-alive client {c} at {at:?}: {e} (request {} on a \
                                 connection to worker {conn_pid:?}, idle {idle:?} before it, \
                                 failed after {:?})",
                                conn_uses + 1,
                                last_done - sent
                            )),
                            Err(e) => tally.failed(format!(
                                "new-connection client {c} at {at:?}: {e} (after {:?})",
                                last_done - sent
                            )),
                        }
                        std::thread::sleep(LOAD_PACE);
                    }
                })
            })
            .collect();
        Load {
            stop,
            tally,
            threads,
        }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.tally.ok.load(Ordering::SeqCst)
    }

    /// Failures so far.
    pub fn failures(&self) -> Vec<String> {
        self.tally.failures.lock().expect("tally").clone()
    }

    /// When a body of this [kind](body_kind) was first answered.
    pub fn first_seen(&self, kind: &str) -> Option<Instant> {
        let seen = self.tally.first_seen.lock().expect("tally");
        seen.iter().find(|(k, _)| k == kind).map(|(_, t)| *t)
    }

    /// Waits (bounded by [`WAIT`]) until `n` more requests were answered.
    pub fn wait_more(&self, host: &Host, n: u64) {
        self.wait_more_for(n, || host.log());
    }

    /// [`Load::wait_more`] for a master the harness did not start: `context` is its log.
    pub fn wait_more_for(&self, n: u64, context: impl Fn() -> String) {
        let want = self.ok() + n;
        crate::poll(
            WAIT,
            &format!("{n} more answered requests"),
            context,
            || (self.ok() >= want).then_some(()),
        );
    }

    /// Stops every client (each finishes its current request) and reports.
    pub fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("load client thread");
        }
        LoadReport {
            ok: self.tally.ok.load(Ordering::SeqCst),
            failures: take(&self.tally.failures),
            per_pid: take(&self.tally.per_pid),
            first_seen: take(&self.tally.first_seen),
        }
    }
}
