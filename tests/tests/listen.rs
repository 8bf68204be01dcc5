//! `--listen` (repeatable): one host on several addresses at once — IPv4, IPv6 and a unix
//! socket — each served by every worker, across rolls and resizes, without a failed request.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use angel_tests::ops::*;
use angel_tests::*;
use nix::sys::signal::Signal;

/// Every address the master logged (`master[P] listening on ADDR`), in order.
fn listening_addrs(log: &str) -> Vec<Addr> {
    log.lines()
        .filter(|l| l.starts_with("master["))
        .filter_map(|l| {
            l.split_once("] listening on ")
                .and_then(|(_, a)| Addr::parse(a))
        })
        .collect()
}

/// Whether `[::1]` can be bound here (containers without IPv6 cannot).
fn ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// Waits until `load` made `more` further successful requests.
fn progress(log: impl Fn() -> String, load: &Load, more: u64, what: &str) {
    let target = load.ok() + more;
    poll(
        WAIT,
        &format!("{more} more successful requests on {what}"),
        log,
        || (load.ok() >= target).then_some(()),
    );
}

fn assert_no_failures(what: &str, report: &LoadReport, log: &str) {
    assert!(
        report.failures.is_empty(),
        "{what}: {} of {} requests failed: {:#?}\n--- master stderr ---\n{log}",
        report.failures.len(),
        report.ok + report.failures.len() as u64,
        &report.failures[..report.failures.len().min(10)],
    );
    assert!(report.ok > 0, "{what}: no request served");
}

#[test]
fn one_host_serves_ipv4_ipv6_and_unix_listeners_across_a_hup() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("angel.sock");
    let v6 = ipv6_loopback();
    if !v6 {
        eprintln!("skipping the IPv6 listener: [::1] cannot be bound on this machine");
    }
    let mut args: Vec<String> = vec!["--lib".into(), lib("hello").display().to_string()];
    args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    if v6 {
        args.extend(["--listen".into(), "[::1]:0".into()]);
    }
    args.extend(["--listen".into(), format!("unix:{}", sock.display())]);
    args.extend(["--workers".into(), "2".into(), "--pidfile".into()]);
    args.push(dir.path().join("angel.pid").display().to_string());
    let host = RawHost::start(dir.path(), &args);

    let addrs = listening_addrs(&host.log());
    assert_eq!(addrs.len(), if v6 { 3 } else { 2 }, "{}", host.log());
    assert!(
        matches!(addrs[0], Addr::Tcp(a) if a.is_ipv4() && a.port() != 0),
        "{addrs:?}"
    );
    if v6 {
        assert!(
            matches!(addrs[1], Addr::Tcp(a) if a.is_ipv6() && a.port() != 0),
            "{addrs:?}"
        );
    }
    assert_eq!(addrs.last(), Some(&Addr::Unix(sock.clone())), "{addrs:?}");
    // Every worker listens on all of them (its own `listening on a, b, c` line).
    let worker_line = host.wait_log_since(0, "] listening on ", WAIT);
    assert!(
        host.log()
            .lines()
            .any(|l| l.starts_with("worker[") && addrs.iter().all(|a| l.contains(&addr_text(a)))),
        "no worker lists every listener ({worker_line}):\n{}",
        host.log()
    );

    let loads: Vec<(String, Load)> = addrs
        .iter()
        .map(|a| (addr_text(a), Load::start(a, 1, 1)))
        .collect();
    for (what, load) in &loads {
        progress(|| host.log(), load, 10, what);
    }
    for generation in [2, 3] {
        let mark = host.mark();
        host.signal(Signal::SIGHUP);
        let line = host.wait_log_since(mark, " reloaded ", WAIT);
        assert!(
            line.contains(&format!("(generation {generation}")),
            "{line}"
        );
        for (what, load) in &loads {
            progress(|| host.log(), load, 10, what);
        }
    }
    for (what, load) in loads {
        assert_no_failures(&what, &load.finish(), &host.log());
    }
}

fn addr_text(a: &Addr) -> String {
    match a {
        Addr::Tcp(a) => a.to_string(),
        Addr::Unix(p) => format!("unix:{}", p.display()),
    }
}

#[test]
fn listen_flag_errors_are_usage_errors() {
    for (value, hint) in [
        ("nope:80", "not HOST:PORT"),
        ("::1:8080", "brackets"),
        ("127.0.0.1", "port is missing"),
        ("127.0.0.1:70000", "not HOST:PORT"),
        ("unix:", "needs a path"),
    ] {
        let exit = Host::builder(lib("hello"))
            .args(["--listen", value])
            .run_to_exit(Duration::from_secs(20));
        assert_eq!(exit.code(), 2, "--listen {value}: {}", exit.stderr);
        assert!(
            exit.stderr.contains("--listen") && exit.stderr.contains(value),
            "--listen {value}: the error names flag and value:\n{}",
            exit.stderr
        );
        assert!(
            exit.stderr.contains(hint),
            "--listen {value}:\n{}",
            exit.stderr
        );
    }
    // The config file's `listen` is checked the same way, naming file and line.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("angel.toml");
    std::fs::write(
        &config,
        "workers = 1\nlisten = [\"127.0.0.1:0\", \"::1:80\"]\n",
    )
    .unwrap();
    let exit = Host::builder(lib("hello"))
        .arg("--config")
        .arg(&config)
        .run_to_exit(Duration::from_secs(20));
    assert_eq!(exit.code(), 2, "{}", exit.stderr);
    assert!(
        exit.stderr.contains("line 2") && exit.stderr.contains("::1:80"),
        "{}",
        exit.stderr
    );
}

#[test]
fn a_busy_port_among_several_listeners_exits_4_naming_it() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let exit = Host::builder(lib("hello"))
        .args(["--listen", "127.0.0.1:0", "--listen", &addr])
        .arg("--path")
        .arg(&sock)
        .dir(dir.path())
        .run_to_exit(Duration::from_secs(20));
    assert_eq!(exit.code(), 4, "{}", exit.stderr);
    assert!(
        exit.error_line().contains(&addr) && exit.error_line().contains("in use"),
        "{}",
        exit.stderr
    );
    assert!(
        !Path::new(&sock).exists(),
        "the unix socket it bound is removed again"
    );
}

/// Waits until `status` reports `n` configured and `n` ready workers; returns their pids.
fn ready_workers(host: &Host, n: usize) -> BTreeSet<i32> {
    poll(
        WAIT,
        &format!("{n} configured and ready workers in `status`"),
        || host.log(),
        || {
            let status = status(host.pidfile());
            let ready = status.workers_in("ready");
            (status.configured_workers == n && ready.len() == n)
                .then(|| ready.iter().map(|w| w.0).collect())
        },
    )
}

fn resize(host: &Host, sig: Signal, from: usize, to: usize) -> BTreeSet<i32> {
    let mark = host.mark();
    host.signal(sig);
    host.wait_log_since(mark, &format!("workers: {from} -> {to}"), WAIT);
    ready_workers(host, to)
}

/// `GET /` on new connections to `addr` until every pid of `want` answered.
fn answered_by_all(host: &Host, addr: &Addr, want: &BTreeSet<i32>) {
    let seen = std::cell::RefCell::new(BTreeSet::new());
    poll(
        WAIT,
        &format!("every worker {want:?} answering on {}", addr_text(addr)),
        || format!("seen {:?}\n{}", seen.borrow(), host.log()),
        || {
            let resp = get(addr, "/").unwrap_or_else(|e| panic!("GET: {e}\n{}", host.log()));
            seen.borrow_mut().insert(hello_pid(&resp.text()));
            want.is_subset(&seen.borrow()).then_some(())
        },
    );
}

#[test]
fn ttin_and_ttou_with_two_tcp_listeners_keep_both_serving() {
    // `--host/--port` and `--listen` add up: two TCP listeners.
    let host = Host::builder(lib("hello"))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--listen",
            "127.0.0.1:0",
        ])
        .start();
    let addrs = listening_addrs(&host.log());
    assert_eq!(addrs.len(), 2, "{}", host.log());
    assert_ne!(addrs[0], addrs[1]);
    let loads: Vec<(String, Load)> = addrs
        .iter()
        .map(|a| (addr_text(a), Load::start(a, 1, 1)))
        .collect();
    let progress_all = || {
        for (what, load) in &loads {
            progress(|| host.log(), load, 10, what);
        }
    };
    progress_all();
    let mut before = ready_workers(&host, 2);
    for (from, to) in [(2, 3), (3, 4)] {
        let now = resize(&host, Signal::SIGTTIN, from, to);
        // The new slot's worker gets connections on both listeners (its own socket in each).
        for a in &addrs {
            answered_by_all(&host, a, &now);
        }
        progress_all();
        before = now;
    }
    for (from, to) in [(4, 3), (3, 2), (2, 1)] {
        let now = resize(&host, Signal::SIGTTOU, from, to);
        let removed: Vec<i32> = before.difference(&now).copied().collect();
        host.wait_exited(&removed, WAIT);
        progress_all();
        before = now;
    }
    for a in &addrs {
        answered_by_all(&host, a, &before);
    }
    for (what, load) in loads {
        assert_no_failures(&what, &load.finish(), &host.log());
    }
}
