//! A worker's life after it started (issue 4): recycling at `--max-requests`, respawn with
//! backoff when it keeps crashing, the heartbeat `--timeout` for a blocked event loop, and
//! draining by itself when its master is gone.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use angel_tests::ops::*;
use angel_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The pids of consecutive responses, as runs: `[a, a, b, b, b]` → `[(a, 2), (b, 3)]`.
fn runs(pids: &[i32]) -> Vec<(i32, u64)> {
    let mut runs: Vec<(i32, u64)> = Vec::new();
    for &pid in pids {
        match runs.last_mut() {
            Some((last, n)) if *last == pid => *n += 1,
            _ => runs.push((pid, 1)),
        }
    }
    runs
}

/// `n` sequential `GET /`, each on a new connection; every one must succeed.
fn sequential_pids(host: &Host, n: usize) -> Vec<i32> {
    (0..n)
        .map(|i| {
            let resp = get(host.addr(), "/").unwrap_or_else(|e| {
                panic!(
                    "request #{i} failed: {e}\n--- master stderr ---\n{}",
                    host.log()
                )
            });
            assert_eq!(resp.status, 200);
            hello_pid(&resp.text())
        })
        .collect()
}

/// angel.js's max-requests test: 1 worker, a limit of 2, ten requests → five workers.
#[test]
fn one_worker_with_max_requests_2_answers_ten_requests_with_five_pids() {
    let host = Host::start(lib("hello"), &["--workers", "1", "--max-requests", "2"]);
    let pids = sequential_pids(&host, 10);
    let distinct: BTreeSet<i32> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), 5, "pids {pids:?}\n{}", host.log());
    assert!(
        runs(&pids).iter().all(|&(_, n)| n == 2),
        "each worker answers exactly 2 requests in a row: {pids:?}"
    );
    for pid in &distinct {
        host.wait_log(&format!("worker {pid} is retiring; replacing it"), WAIT);
    }
    // Recycled workers drain and exit cleanly: a retirement is not a death.
    host.wait_exited(&distinct.iter().copied().collect::<Vec<_>>(), WAIT);
    assert!(
        !host.log().contains(" died"),
        "no worker died:\n{}",
        host.log()
    );
}

/// Sequential requests to one worker make each worker's limit visible exactly: the length of
/// its run of responses.
#[test]
fn max_requests_jitter_draws_each_limit_from_n_to_n_plus_j() {
    const N: u64 = 5;
    const J: u64 = 5;
    let host = Host::start(
        lib("hello"),
        &[
            "--workers",
            "1",
            "--max-requests",
            &N.to_string(),
            "--max-requests-jitter",
            &J.to_string(),
        ],
    );
    let pids = sequential_pids(&host, 80);
    let runs = runs(&pids);
    // The last worker may not have reached its limit yet.
    let complete = &runs[..runs.len() - 1];
    assert!(
        complete.len() >= 6,
        "80 requests with limits of at most {} retire at least 7 workers: {runs:?}",
        N + J
    );
    for &(pid, n) in complete {
        assert!(
            (N..=N + J).contains(&n),
            "worker {pid} answered {n} requests, outside [{N}, {}]: {runs:?}",
            N + J
        );
        host.wait_log(&format!("worker {pid} is retiring; replacing it"), WAIT);
    }
    // With 6 equally likely limits, 6 equal draws in a row happen with probability 6^-5.
    let limits: BTreeSet<u64> = complete.iter().map(|&(_, n)| n).collect();
    assert!(
        limits.len() > 1,
        "every worker got the same limit {limits:?}: no jitter: {runs:?}"
    );
}

#[test]
fn max_requests_with_jitter_under_concurrent_load_recycles_without_failing_a_request() {
    const N: u64 = 5;
    const J: u64 = 5;
    /// Of the 4 clients below, the others than the one that hit the limit.
    const OTHER_CLIENTS: u64 = 3;
    let host = Host::start(
        lib("hello"),
        &[
            "--workers",
            "2",
            "--max-requests",
            &N.to_string(),
            "--max-requests-jitter",
            &J.to_string(),
        ],
    );
    let load = Load::start(host.addr(), 2, 2);
    poll(
        Duration::from_secs(25),
        "300 successful requests",
        || host.log(),
        || (load.ok() >= 300).then_some(()),
    );
    let report = load.finish();
    report.assert_clean(&host, 0);
    let recycled = host.log().matches("is retiring; replacing it").count();
    assert!(
        recycled >= 10,
        "300 requests to workers with limits <= {} recycle at least 10 of them, saw {recycled}\n{}",
        N + J,
        host.log()
    );
    assert!(report.per_pid.len() >= 10, "pids {:?}", report.per_pid);
    // A worker at its limit still answers requests already on its other keep-alive
    // connections (with `Connection: close`), at most one per other client.
    for (pid, n) in &report.per_pid {
        assert!(
            *n <= N + J + OTHER_CLIENTS,
            "worker {pid} answered {n} requests, more than its limit allows: {:?}",
            report.per_pid
        );
    }
}

/// Writes the crash-after-ready fixture's control file: its next workers abort `ms` after start.
fn crash_after(dir: &std::path::Path, ms: Option<u64>) {
    let path = dir.join("crash-after-ms");
    match ms {
        Some(ms) => std::fs::write(path, ms.to_string()).expect("write crash-after-ms"),
        None => std::fs::remove_file(path).expect("rm crash-after-ms"),
    }
}

/// The delays of `slot S keeps crashing; respawning in D` lines.
fn backoff_delays(log: &str) -> Vec<Duration> {
    log.lines()
        .filter_map(|l| l.split_once("keeps crashing; respawning in "))
        .map(|(_, d)| {
            parse_debug_duration(d).unwrap_or_else(|| panic!("unparsable delay {d:?} in the log"))
        })
        .collect()
}

#[test]
fn a_worker_that_keeps_crashing_is_respawned_with_doubling_backoff_not_a_fork_storm() {
    let dir = tempfile::tempdir().unwrap();
    crash_after(dir.path(), Some(50));
    let host = Host::builder(lib("crash-after-ready"))
        .dir(dir.path())
        .args(["--workers", "1"])
        .start();
    let window = Duration::from_secs(5);
    let started = Instant::now();
    // Observe the slot for the window; the master must stay up throughout.
    poll(
        window + WAIT,
        "the observation window to pass",
        || host.log(),
        || {
            assert!(
                host.try_status().is_none(),
                "the master exited:\n{}",
                host.log()
            );
            (started.elapsed() >= window).then_some(())
        },
    );
    let log = host.log();
    let forks = forked_pids(&log).len();
    // Respawned at once every time, a worker living ~50 ms would be forked ~50 times.
    assert!(
        (3..=15).contains(&forks),
        "{forks} forks in {window:?} (want 3..=15: respawning, but with backoff)\n{log}"
    );
    // However slow this box, the slot goes on to the 800 ms step (5 deaths: 0, 100, 200, 400,
    // 800 ms), and not one fork more than deaths + 1.
    host.wait_log("keeps crashing; respawning in 800ms", WAIT);
    let log = host.log();
    let died: Vec<&str> = log.lines().filter(|l| l.contains(" died (")).collect();
    assert!(died.len() >= 5, "deaths are logged:\n{log}");
    for line in &died {
        assert!(
            line.contains("was killed by SIGABRT"),
            "each death names its signal: {line}"
        );
    }
    assert!(
        forked_pids(&log).len() <= died.len() + 1,
        "one respawn per death:\n{log}"
    );
    let delays = backoff_delays(&log);
    // The first death is respawned at once; every later one with a delay (the log may end
    // between a `died` line and its `keeps crashing` line).
    assert!(
        delays.len() + 2 >= died.len() && delays.len() < died.len(),
        "{} deaths but {} `keeps crashing` lines:\n{log}",
        died.len(),
        delays.len()
    );
    assert_eq!(delays[0], Duration::from_millis(100), "{log}");
    for pair in delays.windows(2) {
        assert_eq!(pair[1], pair[0] * 2, "the delay doubles: {delays:?}");
    }
    // The master still answers.
    let status = status(host.pidfile());
    assert_eq!(status.pid, host.pid);
    assert_eq!(status.generation, 1);
}

/// `log` from the line `line` on.
fn from_line<'a>(log: &'a str, line: &str) -> &'a str {
    &log[log
        .find(line)
        .unwrap_or_else(|| panic!("{line:?} is not in the log"))..]
}

/// A worker that lived at least 10 s resets its slot's backoff: its death is respawned at once.
#[test]
fn a_worker_that_lived_ten_seconds_resets_the_crash_backoff() {
    let dir = tempfile::tempdir().unwrap();
    crash_after(dir.path(), Some(50));
    let host = Host::builder(lib("crash-after-ready"))
        .dir(dir.path())
        .args(["--workers", "1"])
        .start();
    host.wait_log("keeps crashing; respawning in 200ms", WAIT);
    // Workers forked from now on read the new file (they read it after exec).
    crash_after(dir.path(), Some(10_500));
    let mark = host.mark();
    let fork = host.wait_log_since(mark, "forked worker[", WAIT);
    let long_lived = forked_pids(&fork)[0];
    host.wait_log_since(mark, &format!("worker[{long_lived}] listening on"), WAIT);
    crash_after(dir.path(), None);
    assert_eq!(
        hello_pid(&get(host.addr(), "/").unwrap().text()),
        long_lived
    );

    let died = host.wait_log_since(
        mark,
        &format!("worker {long_lived} died"),
        Duration::from_secs(25),
    );
    let next = poll(
        WAIT,
        "the slot's next fork",
        || host.log(),
        || {
            forked_pids(from_line(&host.log_since(mark), &died))
                .first()
                .copied()
        },
    );
    let log = host.log_since(mark);
    let fork = format!("forked worker[{next}]");
    let between = &from_line(&log, &died)[..from_line(&log, &died).find(&fork).unwrap()];
    assert!(
        !between.contains("keeps crashing"),
        "a worker that lived >= 10 s is respawned at once, without backoff:\n{log}"
    );
    host.wait_log_since(mark, &format!("worker[{next}] listening on"), WAIT);
    assert_eq!(hello_pid(&get(host.addr(), "/").unwrap().text()), next);
}

#[test]
fn a_worker_whose_event_loop_blocks_is_killed_after_timeout_and_replaced() {
    let host = Host::start(lib("hello"), &["--workers", "2", "--timeout", "2s"]);
    let workers: BTreeSet<i32> = host.worker_pids().into_iter().collect();
    assert_eq!(workers.len(), 2);
    // One keep-alive connection on each worker.
    let mut clients = std::collections::BTreeMap::new();
    poll(
        WAIT,
        "a keep-alive connection on each worker",
        || host.log(),
        || {
            let mut c = Client::new(host.addr());
            let pid = hello_pid(&c.get("/").expect("GET /").text());
            clients.entry(pid).or_insert(c);
            (clients.len() == 2).then_some(())
        },
    );
    let mut clients = clients.into_iter();
    let (blocked, mut blocking) = clients.next().unwrap();
    let (other, mut healthy) = clients.next().unwrap();

    let mark = host.mark();
    let sent = Instant::now();
    blocking.send("/block?ms=10000").unwrap();
    let blocked_response = std::thread::spawn(move || blocking.receive());

    // Meanwhile the other worker keeps serving.
    let kill_line = format!("worker {blocked} sent no heartbeat for 2s (--timeout)");
    let mut served = 0;
    poll(
        Duration::from_secs(15),
        &format!("{kill_line:?}"),
        || host.log(),
        || {
            let resp = healthy.get("/").unwrap_or_else(|e| {
                panic!("the healthy worker failed a request: {e}\n{}", host.log())
            });
            assert_eq!(hello_pid(&resp.text()), other);
            served += 1;
            host.log_since(mark).contains(&kill_line).then_some(())
        },
    );
    assert!(served > 0);
    let line = host.wait_log_since(mark, &kill_line, WAIT);
    assert!(
        line.contains("its event loop is blocked; killing it"),
        "{line}"
    );
    host.wait_log_since(
        mark,
        &format!("worker {blocked} died (was killed by SIGKILL)"),
        WAIT,
    );
    let resp = blocked_response.join().unwrap();
    assert!(
        resp.is_err(),
        "the blocked worker was killed before it answered: {resp:?}"
    );

    // The replacement serves within the timeout plus a margin (heartbeat period, spawn).
    let replacement = poll(
        Duration::from_secs(10),
        "a new worker to answer",
        || host.log(),
        || {
            let resp = get(host.addr(), "/")
                .unwrap_or_else(|e| panic!("GET / failed: {e}\n{}", host.log()));
            let pid = hello_pid(&resp.text());
            (!workers.contains(&pid)).then_some(pid)
        },
    );
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(2 + 1 + 5),
        "replacement {replacement} served {took:?} after the block\n{}",
        host.log()
    );
    assert!(
        !host
            .log()
            .contains(&format!("worker {other} sent no heartbeat")),
        "the healthy worker was not killed:\n{}",
        host.log()
    );
    assert!(pid_running(other));
}

#[test]
fn workers_of_a_killed_master_drain_their_streams_exit_and_free_the_port() {
    let host = Host::start(lib("ticker"), &["--workers", "2"]);
    let workers = host.worker_pids();
    assert_eq!(workers.len(), 2);
    let addr = host.addr().tcp();
    let mut stream = Streaming::open(host.addr(), "/").unwrap();
    let first = String::from_utf8(stream.next_chunk().unwrap().expect("a first tick")).unwrap();
    let pid = ticker_pid(&first).unwrap_or_else(|| panic!("first tick {first:?}"));

    kill(Pid::from_raw(host.pid), Signal::SIGKILL).unwrap();
    host.wait_exit(WAIT);

    let mut text = first;
    loop {
        match stream.next_chunk() {
            Ok(Some(chunk)) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(None) => break,
            Err(e) => panic!(
                "stream broke instead of ending cleanly: {e}\nso far:\n{text}\n{}",
                host.log()
            ),
        }
        assert!(text.lines().count() < 30, "stream never ended:\n{text}");
    }
    assert_eq!(
        text.lines().last(),
        Some(format!("worker[{pid}] drained").as_str()),
        "stream:\n{text}"
    );
    stream.wait_close().unwrap();

    wait_pids_gone(&workers, WAIT, || host.log());
    for w in &workers {
        poll(
            WAIT,
            &format!("worker[{w}] master is gone; draining"),
            || host.log(),
            || {
                host.log()
                    .contains(&format!("worker[{w}] master is gone; draining"))
                    .then_some(())
            },
        );
    }
    // Nothing holds the port any more.
    poll(
        WAIT,
        &format!("binding {addr}"),
        || host.log(),
        || std::net::TcpListener::bind(addr).ok(),
    );
}
