//! Production plumbing against the real things: `sd_notify` to a datagram socket the test
//! binds (path and abstract), socket activation by the real `systemd-socket-activate`,
//! Prometheus metrics scraped over TCP, and the master as PID 1 of a real PID namespace
//! (`unshare --pid --fork --mount-proc`) reaping what apps abandon.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use angel_tests::*;
use nix::sys::signal::Signal;

/// Receives the next datagram, or panics after `WAIT` with what was seen so far.
fn recv(sock: &UnixDatagram, host: &Host, seen: &[String]) -> String {
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification ({e}); seen {seen:?}\n{}", host.log()),
    }
}

/// The next datagram that is not a watchdog ping.
fn next_notice(sock: &UnixDatagram, host: &Host, seen: &mut Vec<String>) -> String {
    loop {
        let m = recv(sock, host, seen);
        seen.push(m.clone());
        if m != "WATCHDOG=1" {
            return m;
        }
    }
}

fn check_roll_notices(sock: &UnixDatagram, host: &Host) {
    let mut seen = Vec::new();
    assert_eq!(
        next_notice(sock, host, &mut seen),
        "READY=1\nSTATUS=generation 1 serving (2 workers)"
    );
    host.hup();
    let reloading = next_notice(sock, host, &mut seen);
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines[0], "RELOADING=1", "{reloading:?}");
    let usec: u64 = lines[1]
        .strip_prefix("MONOTONIC_USEC=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in {reloading:?}"));
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now = Duration::from(now).as_micros() as u64;
    assert!(usec <= now && now - usec < 60_000_000, "{usec} vs {now}");
    assert_eq!(lines[2], "STATUS=reloading (generation 1 serving)");
    assert_eq!(
        next_notice(sock, host, &mut seen),
        "READY=1\nSTATUS=generation 2 serving (2 workers)"
    );
    host.signal(Signal::SIGTERM);
    assert_eq!(next_notice(sock, host, &mut seen), "STOPPING=1");
    let extend = next_notice(sock, host, &mut seen);
    assert!(extend.starts_with("EXTEND_TIMEOUT_USEC="), "{extend:?}");
    host.wait_exit(WAIT);
}

#[test]
fn sd_notify_reports_ready_reloading_and_stopping_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let host = Host::builder(lib("hello"))
        .env("NOTIFY_SOCKET", &path)
        .spawn();
    check_roll_notices(&sock, &host);
}

#[test]
fn sd_notify_works_with_an_abstract_socket_and_pings_the_watchdog() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!(
        "angel-test-notify-{}-{:?}",
        std::process::id(),
        Instant::now()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let host = Host::builder(lib("hello"))
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .env("WATCHDOG_USEC", "400000")
        .spawn();
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut pings = 0;
    while pings < 3 {
        assert!(Instant::now() < deadline, "3 watchdog pings; seen {seen:?}");
        let m = recv(&sock, &host, &seen);
        if m == "WATCHDOG=1" {
            pings += 1;
        }
        seen.push(m);
    }
    assert!(
        seen.iter().any(|m| m.starts_with("READY=1")),
        "READY=1 among {seen:?}"
    );
    // No worker inherits the manager's variables.
    let ready = wait_until(&host, WAIT, "a ready worker", || {
        status(host.pidfile())
            .workers
            .into_iter()
            .find(|w| w.state == "ready")
            .map(|w| w.pid)
    });
    let environ = std::fs::read(format!("/proc/{ready}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains("NOTIFY_SOCKET") && !environ.contains("WATCHDOG_USEC"),
        "{environ}"
    );
}

/// A free TCP port on 127.0.0.1 (bound and released: the activator binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn http_get(port: u16, path: &str) -> Result<String, String> {
    get(&Addr::parse(&format!("127.0.0.1:{port}")).unwrap(), path).map(|r| r.text())
}

struct Activated {
    child: Child,
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

#[test]
fn socket_activated_host_serves_the_inherited_socket_across_hups() {
    if !Path::new("/usr/bin/systemd-socket-activate").exists() {
        panic!("systemd-socket-activate is missing: .ci/run installs the systemd package");
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("stderr.log");
    let child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}")])
        .arg(host_bin())
        .args(["--lib"])
        .arg(lib("hello"))
        .args(["--workers", "2", "--pidfile"])
        .arg(dir.path().join("angel.pid"))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let activated = Activated { child };
    let master = activated.child.id() as i32;
    // The activator launches the host at the first connection, which then waits in the
    // inherited socket's queue: it must be answered, not lost.
    let first = poll(
        WAIT,
        "the first request, queued before the host started",
        || read_log(&log),
        || http_get(port, "/").ok(),
    );
    assert!(first.starts_with("Hello:"), "{first}");
    let text = read_log(&log);
    assert!(text.contains("taking 1 listening socket(s)"), "{text}");
    assert!(text.contains(&format!("master[{master}]")), "{text}");
    let load = Load::start(&Addr::parse(&format!("127.0.0.1:{port}")).unwrap(), 2, 2);
    for generation in 2..=3 {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(master), Signal::SIGHUP).unwrap();
        poll(
            WAIT,
            &format!("generation {generation}"),
            || read_log(&log),
            || {
                read_log(&log)
                    .contains(&format!("(generation {generation}, sha"))
                    .then_some(())
            },
        );
    }
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "{:?}\n{}",
        &report.failures[..report.failures.len().min(5)],
        read_log(&log)
    );
    assert!(report.ok > 0);
}

/// The address a master started with `--metrics` logged for its endpoint.
fn metrics_addr(host: &Host) -> String {
    let line = host.wait_log("serving metrics on http://", WAIT);
    line.split("http://")
        .nth(1)
        .and_then(|r| r.strip_suffix("/metrics"))
        .expect("metrics address")
        .to_string()
}

/// One scrape of `/metrics` over a plain TCP connection.
fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_count_rolls_workers_and_requests() {
    let host = Host::builder(lib("hello"))
        .args(["--metrics", "127.0.0.1:0"])
        .start();
    let addr = metrics_addr(&host);
    host.roll(WAIT);
    host.roll(WAIT);
    for _ in 0..20 {
        get(host.addr(), "/").unwrap();
    }
    let text = poll(
        WAIT,
        "metrics after two rolls and 20 requests",
        || format!("{}\n{}", scrape(&addr), host.log()),
        || {
            let text = scrape(&addr);
            (metric(&text, "angel_generation") == Some(3.0)
                && metric(&text, "angel_workers{state=\"ready\"}") == Some(2.0)
                && metric(&text, "angel_requests_total").is_some_and(|n| n >= 20.0)
                && metric(&text, "angel_worker_exits_total{reason=\"drained\"}") == Some(4.0))
            .then_some(text)
        },
    );
    assert!(text.contains("application/openmetrics-text"), "{text}");
    assert_eq!(
        metric(&text, "angel_rolls_total{result=\"ok\"}"),
        Some(3.0),
        "{text}"
    );
    assert!(
        text.contains("angel_roll_duration_seconds_count 3"),
        "{text}"
    );
    assert!(metric(&text, "angel_master_start_time_seconds").is_some_and(|t| t > 1e9));
    assert!(
        text.contains("angel_worker_exits_total{reason=\"drained\"} 4"),
        "{text}"
    );
}

/// A master (pidfile and cwd in `dir`, stderr to `log`) as PID 1 of a new PID namespace
/// (`unshare --pid --fork --mount-proc`); `shared`, if given, is its TMPDIR and
/// XDG_RUNTIME_DIR.
fn in_pid_namespace(
    dir: &Path,
    app: &str,
    workers: usize,
    log: &Path,
    shared: Option<&Path>,
) -> Child {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(host_bin())
        .arg("--lib")
        .arg(lib(app))
        .args(["--workers", &workers.to_string()])
        .args(["--host", "127.0.0.1", "--port", "0", "--pidfile"])
        .arg(dir.join("angel.pid"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(shared) = shared {
        cmd.env("TMPDIR", shared).env("XDG_RUNTIME_DIR", shared);
    }
    cmd.spawn().unwrap()
}

/// Zombie children of `pid` (state Z in /proc).
fn zombies_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = rest.split(' ').collect();
        if fields.first() == Some(&"Z") && fields.get(1) == Some(&pid.to_string().as_str()) {
            out.push(child);
        }
    }
    out
}

#[test]
fn orphans_of_an_app_are_reaped_by_the_master() {
    let host = Host::builder(lib("retire-app")).start();
    for _ in 0..5 {
        let body = get(host.addr(), "/orphan").unwrap().text();
        assert!(
            body.contains("Ok(ExitStatus(unix_wait_status(0)))"),
            "{body}"
        );
    }
    // Each orphaned `sleep 0.2` is re-parented to the master (a child subreaper) and reaped.
    poll(
        WAIT,
        "no zombie left under the master",
        || host.log(),
        || {
            let orphans_gone = !std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
                std::fs::read_to_string(e.path().join("stat"))
                    .is_ok_and(|s| s.contains("(sleep)") && s.contains(&format!(" {} ", host.pid)))
            });
            (orphans_gone && zombies_of(host.pid).is_empty()).then_some(())
        },
    );
}

#[test]
fn as_pid_1_of_a_pid_namespace_it_reaps_orphans_and_stops_gracefully_on_term() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = in_pid_namespace(dir.path(), "retire-app", 2, &log, None);
    let text = poll(
        WAIT,
        "serving as PID 1",
        || read_log(&log),
        || {
            let t = read_log(&log);
            t.contains(" serving ").then_some(t)
        },
    );
    assert!(
        text.contains("master[1] "),
        "the master is PID 1 in its namespace:\n{text}"
    );
    let addr = text
        .lines()
        .find_map(|l| l.split("listening on ").nth(1))
        .and_then(Addr::parse)
        .expect("address");
    for _ in 0..3 {
        get(&addr, "/orphan").unwrap();
    }
    // The master's pid outside the namespace: the child of `unshare`.
    let outer: i32 = std::fs::read_to_string(format!("/proc/{}/task/{0}/children", child.id()))
        .unwrap()
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the namespace's PID 1");
    poll(
        WAIT,
        "orphans reaped by PID 1",
        || read_log(&log),
        || zombies_of(outer).is_empty().then_some(()),
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(outer), Signal::SIGTERM).unwrap();
    let status = poll(
        WAIT,
        "PID 1 to stop on TERM",
        || read_log(&log),
        || child.try_wait().unwrap(),
    );
    assert!(status.success(), "{status:?}\n{}", read_log(&log));
    let text = read_log(&log);
    assert!(text.contains("stopping gracefully"), "{text}");
}

/// The `Uid:` line of a process: real, effective, saved, filesystem.
fn uids(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn workers_run_as_the_user_given_by_user_and_still_roll() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: --user needs a root master");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let uid = nobody.uid.as_raw();
    let host = Host::builder(lib("hello"))
        .args(["--user", "nobody"])
        .start();
    let check = |host: &Host| {
        let workers = status(host.pidfile()).workers_in("ready");
        assert_eq!(workers.len(), 2, "{}", host.log());
        for (pid, _, _) in &workers {
            assert_eq!(
                uids(*pid),
                format!("{uid} {uid} {uid} {uid}"),
                "worker {pid}"
            );
        }
        assert_eq!(uids(host.pid), "0 0 0 0", "the master stays root");
        assert!(get(host.addr(), "/").unwrap().text().starts_with("Hello:"));
    };
    check(&host);
    host.roll(WAIT);
    wait_until(&host, WAIT, "the old generation gone", || {
        (status(host.pidfile()).workers.len() == 2).then_some(())
    });
    check(&host);
}

#[test]
fn an_unknown_user_is_a_usage_error_naming_it() {
    let out = run_to_exit(
        &[
            "--lib",
            "x.so",
            "--port",
            "0",
            "--user",
            "angel-no-such-user",
        ],
        Duration::from_secs(15),
    );
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("--user angel-no-such-user: no such user"),
        "{}",
        out.stderr
    );
}

#[test]
fn scraping_metrics_100_times_a_second_during_rolls_loses_no_request() {
    let host = Host::builder(lib("hello"))
        .args(["--metrics", "127.0.0.1:0"])
        .start();
    let addr = metrics_addr(&host);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let (stop, addr) = (stop.clone(), addr.clone());
        std::thread::spawn(move || {
            let mut scrapes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                assert!(scrape(&addr).contains("angel_generation"));
                scrapes += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            scrapes
        })
    };
    let load = Load::start(host.addr(), 2, 2);
    for _ in 0..5 {
        host.roll(WAIT);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let scrapes = scraper.join().expect("scraper");
    load.finish().assert_clean(&host, 50);
    assert!(scrapes >= 20, "only {scrapes} scrapes");
}

/// A master that is PID 1 of its own namespace sees none of the other masters' pids: it must
/// not take their control sockets (or snapshot directories) for leftovers of dead masters.
#[test]
fn a_master_in_another_pid_namespace_leaves_live_masters_files_alone() {
    let shared = tempfile::tempdir().unwrap();
    let a = Host::builder(lib("hello"))
        .env("TMPDIR", shared.path())
        .env("XDG_RUNTIME_DIR", shared.path())
        .start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut b = in_pid_namespace(dir.path(), "hello", 1, &log, Some(shared.path()));
    poll(
        WAIT,
        "the namespaced master serving",
        || read_log(&log),
        || read_log(&log).contains(" serving ").then_some(()),
    );
    let status = Command::new(host_bin())
        .args(["status", "--pidfile"])
        .arg(a.pidfile())
        .env("XDG_RUNTIME_DIR", shared.path())
        .output()
        .unwrap();
    // Killing the namespace's PID 1 ends every process in it.
    let inner: Option<i32> = std::fs::read_to_string(format!("/proc/{}/task/{0}/children", b.id()))
        .ok()
        .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()));
    if let Some(pid) = inner {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = b.wait();
    assert!(
        status.status.success(),
        "status of the first master: {}\n{}\n--- namespaced master ---\n{}",
        String::from_utf8_lossy(&status.stderr),
        a.log(),
        read_log(&log)
    );
    assert!(
        !read_log(&log).contains("left by dead master"),
        "{}",
        read_log(&log)
    );
}

/// `systemctl restart` of a socket-activated service, as systemd does it: the manager keeps
/// the listening socket while the master stops and a new one starts on it, so connections
/// made in between wait in its queue and are served by the new master.
#[test]
fn a_restart_under_socket_activation_loses_no_connection() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let holder = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/socket_holder.py");
    let mut child = Command::new("python3")
        .arg(holder)
        .arg(host_bin())
        .arg("--lib")
        .arg(lib("hello"))
        .args(["--workers", "2", "--pidfile"])
        .arg(dir.path().join("angel.pid"))
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("holder output").expect("holder line");
    let port: u16 = next()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .expect("port");
    assert!(next().starts_with("started "));
    let addr = Addr::parse(&format!("127.0.0.1:{port}")).unwrap();
    poll(
        WAIT,
        "the first master serving",
        || read_log(&log),
        || http_get(port, "/").ok(),
    );
    let load = Load::start(&addr, 0, 3);
    load.wait_more_for(20, || read_log(&log));
    for restart in 1..=2 {
        writeln!(stdin, "restart").unwrap();
        assert!(next().starts_with("exited "), "restart {restart}");
        assert!(next().starts_with("started "), "restart {restart}");
        load.wait_more_for(20, || read_log(&log));
    }
    let report = load.finish();
    drop(stdin);
    let _ = child.wait();
    assert!(
        report.failures.is_empty(),
        "{} of {} requests failed across 2 restarts: {:?}\n{}",
        report.failures.len(),
        report.ok + report.failures.len() as u64,
        &report.failures[..report.failures.len().min(5)],
        read_log(&log)
    );
    assert_eq!(
        read_log(&log)
            .matches("taking 1 listening socket(s)")
            .count(),
        3
    );
}
