//! Upgrading angel-host itself (`USR2`, `angel-host upgrade`), end to end: masters run from a
//! copy of the binary that each test replaces on disk (a new inode, as a package manager or
//! `install` does), under load, and through every failure path of the handover.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use angel_tests::ops::*;
use angel_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A directory with its own copy of angel-host and a pidfile; masters run from the copy.
struct Install {
    dir: tempfile::TempDir,
}

impl Install {
    fn new() -> Install {
        let install = Install {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        std::fs::create_dir(install.dir.path().join("bin")).expect("bin dir");
        install.replace_binary();
        install
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn bin(&self) -> PathBuf {
        self.dir().join("bin/angel-host")
    }

    fn pidfile(&self) -> PathBuf {
        self.dir().join("angel.pid")
    }

    /// Puts a fresh copy of the build at the path: a new inode renamed into place.
    fn replace_binary(&self) {
        self.install_file(&host_bin());
    }

    /// Puts `content` (mode 755) at the binary's path.
    fn put_file(&self, content: &[u8]) {
        let src = self.dir().join("content");
        std::fs::write(&src, content).expect("write");
        self.install_file(&src);
    }

    /// Copies `src` into place with `install` (a new inode renamed over the path), as a
    /// deploy does. Another process writes the file: a write fd of ours, inherited by a child
    /// another test forks meanwhile, would make executing it fail with "Text file busy".
    fn install_file(&self, src: &Path) {
        let tmp = self.dir().join("bin/.angel-host.new");
        let out = std::process::Command::new("install")
            .args(["-m", "755"])
            .arg(src)
            .arg(&tmp)
            .output()
            .expect("run install");
        assert!(out.status.success(), "install: {out:?}");
        std::fs::rename(&tmp, self.bin()).expect("rename into place");
    }

    /// A master started from the copy, serving `lib` with 2 workers plus `extra`.
    fn start(&self, lib: &Path, extra: &[&str]) -> RawHost {
        let mut args: Vec<String> = [
            "--lib",
            &lib.display().to_string(),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--workers",
            "2",
            "--pidfile",
            &self.pidfile().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        RawHost::start_bin(&self.bin(), self.dir(), args)
    }

    /// A master started from the copy with `--config angel.toml` (in the install's
    /// directory), an ephemeral port and 2 workers, plus `extra`.
    fn start_with_config(&self, extra: &[&str]) -> RawHost {
        let mut args = vec![
            "--config",
            "angel.toml",
            "--port",
            "0",
            "--workers",
            "2",
            "--pidfile",
            "angel.pid",
        ];
        args.extend_from_slice(extra);
        RawHost::start_bin(&self.bin(), self.dir(), args)
    }

    fn master_pid(&self) -> i32 {
        std::fs::read_to_string(self.pidfile())
            .expect("pidfile")
            .trim()
            .parse()
            .expect("pid in the pidfile")
    }

    /// `angel-host upgrade` (any copy of the binary can ask).
    fn upgrade(&self) -> Exit {
        ctl(&self.pidfile(), &["upgrade"])
    }

    /// `angel-host upgrade`, which must succeed.
    fn upgrade_ok(&self, host: &RawHost) -> Exit {
        let out = self.upgrade();
        assert!(
            out.status.success(),
            "upgrade failed: {}{}\n{}",
            out.stdout,
            out.stderr,
            host.log()
        );
        out
    }

    /// Processes still running a copy of the binary from this install (workers, masters),
    /// whether the file is still there or was replaced (`... (deleted)`).
    fn running(&self) -> Vec<i32> {
        let bin = self.bin().display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(exe) = std::fs::read_link(entry.path().join("exe")) {
                if exe.to_string_lossy().starts_with(&bin) && pid_running(pid) {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

/// The pid in the last `started master[N]` line after `mark`.
fn successor_pid(host: &RawHost, mark: usize) -> i32 {
    let line = host.wait_log_since(mark, "started master[", WAIT);
    line.split("started master[")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// Waits for `pat` in the log after `mark`, whether or not the first master still runs.
fn wait_log(host: &RawHost, mark: usize, pat: &str) {
    poll(
        WAIT,
        &format!("{pat:?} in the log"),
        || host.log(),
        || host.log_since(mark).contains(pat).then_some(()),
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn twenty_upgrades_under_load_lose_nothing_and_leave_no_worker_behind() {
    let install = Install::new();
    let host = install.start(&lib("hello"), &[]);
    let load = Load::start(host.addr(), 2, 2);
    let mut masters = vec![install.master_pid()];
    let mut took = Vec::new();
    for i in 0..20u64 {
        install.replace_binary();
        let asked = Instant::now();
        let out = install.upgrade();
        took.push(asked.elapsed());
        assert!(
            out.status.success(),
            "upgrade {i} failed: {}{}\n{}",
            out.stdout,
            out.stderr,
            host.log()
        );
        assert!(out.stdout.contains("upgraded: master["), "{}", out.stdout);
        let master = install.master_pid();
        assert!(
            !masters.contains(&master),
            "upgrade {i}: the pidfile still names an old master ({master})\n{}",
            host.log()
        );
        masters.push(master);
        let st = status(&install.pidfile());
        assert_eq!(st.pid, master);
        assert_eq!(st.generation, i + 2, "generations keep counting up");
    }
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "{} of {} requests failed across 20 upgrades: {:#?}\n{}",
        report.failures.len(),
        report.ok + report.failures.len() as u64,
        &report.failures[..report.failures.len().min(10)],
        host.log()
    );
    assert!(report.ok > 100, "only {} requests answered", report.ok);
    took.sort();
    eprintln!(
        "20 upgrades: {} requests, 0 failed; upgrade -> new master serving p50 {:?}, max {:?}",
        report.ok,
        percentile(&took, 0.5),
        took[took.len() - 1]
    );
    let st = status_value(&install.pidfile());
    assert_eq!(
        st["binary"].as_str(),
        Some(install.bin().to_str().expect("utf-8 path")),
        "status names the binary"
    );
    assert!(
        st["started_unix"].as_u64().is_some(),
        "status has the start time"
    );
    let stop = ctl(&install.pidfile(), &["stop"]);
    assert!(stop.status.success(), "{}{}", stop.stdout, stop.stderr);
    poll(
        WAIT,
        "no process of the install left",
        || format!("{:?}\n{}", install.running(), host.log()),
        || install.running().is_empty().then_some(()),
    );
    assert!(
        !install.pidfile().exists(),
        "the last master removed the pidfile"
    );
}

#[test]
fn a_corrupt_foreign_or_missing_binary_is_refused_before_the_handover() {
    let install = Install::new();
    let host = install.start(&lib("hello"), &[]);
    let master = install.master_pid();
    let foreign = std::fs::read("/bin/true").expect("/bin/true");
    let cases: [(&str, Option<&[u8]>, &str); 3] = [
        (
            "corrupt",
            Some(b"\x7fELF\x02\x01\x01 not really"),
            "cannot check the new binary",
        ),
        (
            "foreign",
            Some(&foreign),
            "is not angel-host: `--version` printed",
        ),
        ("missing", None, "No such file or directory"),
    ];
    for (what, content, reason) in cases {
        match content {
            Some(bytes) => install.put_file(bytes),
            None => std::fs::remove_file(install.bin()).expect("remove"),
        }
        let mark = host.mark();
        let out = install.upgrade();
        assert_eq!(
            out.status.code(),
            Some(5),
            "{what}: {}{}",
            out.stdout,
            out.stderr
        );
        assert!(
            out.stderr.contains(reason) && out.stderr.contains("keeps serving"),
            "{what}: the reason is named: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(&install.bin().display().to_string()),
            "{what}: the path is named: {}",
            out.stderr
        );
        assert!(
            !host.log_since(mark).contains("started master["),
            "{what}: nothing was handed over\n{}",
            host.log()
        );
        assert_eq!(install.master_pid(), master);
        get(host.addr(), "/").unwrap_or_else(|e| panic!("{what}: still serving: {e}"));
    }
    assert_eq!(status(&install.pidfile()).generation, 1);
}

#[test]
fn a_new_master_whose_first_generation_fails_leaves_the_old_one_serving() {
    let install = Install::new();
    let config = install.dir().join("angel.toml");
    let write_lib = |lib: &Path| {
        std::fs::write(&config, format!("lib = {:?}\n", lib.display().to_string())).expect("config")
    };
    write_lib(&lib("hello"));
    let host = install.start_with_config(&["--host", "127.0.0.1"]);
    let master = install.master_pid();
    // The new master re-reads the config, as a HUP would: this build panics in init.
    write_lib(&lib("panic-init"));
    let load = Load::start(host.addr(), 1, 1);
    let mark = host.mark();
    let out = install.upgrade();
    assert_eq!(out.status.code(), Some(5), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("before it served") && out.stderr.contains("keeps serving"),
        "{}",
        out.stderr
    );
    let successor = successor_pid(&host, mark);
    wait_pids_gone(&[successor], WAIT, || host.log());
    assert_eq!(install.master_pid(), master);
    // Fixed: the next upgrade goes through.
    write_lib(&lib("hello"));
    install.upgrade_ok(&host);
    let report = load.finish();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
}

#[test]
fn a_new_master_that_never_serves_is_killed_and_the_old_one_keeps_serving() {
    let install = Install::new();
    let host = install.start(&lib("hello"), &["--ready-timeout", "1s"]);
    let master = install.master_pid();
    // Answers the check like angel-host, then sits on the sockets without ever serving.
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then exec {:?} --version; fi\nexec sleep 600\n",
        host_bin().display().to_string()
    );
    install.put_file(script.as_bytes());
    let mark = host.mark();
    let load = Load::start(host.addr(), 1, 1);
    let out = install.upgrade();
    assert_eq!(out.status.code(), Some(5), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("the new master did not serve within"),
        "{}",
        out.stderr
    );
    let successor = successor_pid(&host, mark);
    wait_pids_gone(&[successor], WAIT, || host.log());
    assert_eq!(install.master_pid(), master);
    let report = load.finish();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    assert!(report.ok > 0);
}

#[test]
fn a_new_master_killed_mid_handover_leaves_the_old_one_serving_and_no_orphan() {
    let install = Install::new();
    let host = install.start(&lib("retire-app"), &[]);
    let master = install.master_pid();
    // The new master's workers take long to start: it is killed while they do.
    std::fs::write(install.dir().join("start-delay-ms"), "5000").expect("delay");
    let load = Load::start(host.addr(), 1, 1);
    let mark = host.mark();
    let pidfile = install.pidfile();
    let upgrade = std::thread::spawn(move || ctl(&pidfile, &["upgrade"]));
    let successor = successor_pid(&host, mark);
    host.wait_log_since(mark, &format!("master[{successor}] forked worker["), WAIT);
    kill(Pid::from_raw(successor), Signal::SIGKILL).expect("kill the new master");
    let out = upgrade.join().expect("upgrade thread");
    assert_eq!(out.status.code(), Some(5), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("was killed by SIGKILL before it served"),
        "{}",
        out.stderr
    );
    // Its workers, orphaned, drain and exit; the old master reaps them.
    let theirs: Vec<i32> = host
        .log_since(mark)
        .lines()
        .filter(|l| l.starts_with(&format!("master[{successor}] forked worker[")))
        .filter_map(|l| l.split("worker[").nth(1)?.split(']').next()?.parse().ok())
        .collect();
    assert!(!theirs.is_empty());
    wait_pids_gone(&theirs, WAIT, || host.log());
    std::fs::remove_file(install.dir().join("start-delay-ms")).expect("undelay");
    assert_eq!(install.master_pid(), master);
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "{:#?}\n{}",
        report.failures,
        host.log()
    );
}

#[test]
fn an_old_master_killed_mid_handover_leaves_the_new_one_serving() {
    let install = Install::new();
    let host = install.start(&lib("retire-app"), &[]);
    let old = install.master_pid();
    let old_workers = forked_pids(&host.log());
    std::fs::write(install.dir().join("start-delay-ms"), "1500").expect("delay");
    let load = Load::start(host.addr(), 1, 1);
    let mark = host.mark();
    host.signal(Signal::SIGUSR2);
    let successor = successor_pid(&host, mark);
    kill(Pid::from_raw(old), Signal::SIGKILL).expect("kill the old master");
    wait_log(&host, mark, &format!("master[{successor}] took over"));
    std::fs::remove_file(install.dir().join("start-delay-ms")).expect("undelay");
    poll(
        WAIT,
        "the pidfile names the new master",
        || host.log(),
        || (install.master_pid() == successor).then_some(()),
    );
    wait_pids_gone(&old_workers, WAIT, || host.log());
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "connections queued while nobody accepted are served by the new master: {:#?}\n{}",
        report.failures,
        host.log()
    );
    get(host.addr(), "/").expect("the new master serves");
    assert_eq!(status(&install.pidfile()).pid, successor);
    let stop = ctl(&install.pidfile(), &["stop"]);
    assert!(stop.status.success(), "{}{}", stop.stdout, stop.stderr);
}

#[test]
fn a_hup_reload_or_second_upgrade_during_an_upgrade_is_refused_never_doubled() {
    let install = Install::new();
    let host = install.start(&lib("retire-app"), &[]);
    std::fs::write(install.dir().join("start-delay-ms"), "2000").expect("delay");
    let mark = host.mark();
    host.signal(Signal::SIGUSR2);
    let successor = successor_pid(&host, mark);
    host.signal(Signal::SIGHUP);
    host.wait_log_since(
        mark,
        &format!("reload refused: an upgrade (to master[{successor}]) is in progress"),
        WAIT,
    );
    let again = install.upgrade();
    assert_eq!(again.status.code(), Some(5), "{}", again.stderr);
    assert!(
        again.stderr.contains("already in progress"),
        "{}",
        again.stderr
    );
    let reload = ctl(&install.pidfile(), &["reload"]);
    assert_eq!(reload.status.code(), Some(5), "{}", reload.stderr);
    host.wait_log_since(mark, &format!("master[{successor}] took over"), WAIT);
    std::fs::remove_file(install.dir().join("start-delay-ms")).expect("undelay");
    let st = status(&install.pidfile());
    assert_eq!(
        (st.pid, st.generation),
        (successor, 2),
        "one upgrade, one roll"
    );
    assert_eq!(
        host.log_since(mark).matches("started master[").count(),
        1,
        "{}",
        host.log()
    );
}

#[test]
fn an_upgrade_keeps_the_unix_socket_and_the_metrics_address_and_tells_systemd_the_new_pid() {
    let install = Install::new();
    let notify_path = install.dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let sock = install.dir().join("app.sock");
    let host = RawHost::spawn_bin(
        &install.bin(),
        install.dir(),
        [
            "--lib",
            lib("hello").to_str().expect("utf-8"),
            "--path",
            sock.to_str().expect("utf-8"),
            "--metrics",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--pidfile",
            "angel.pid",
        ],
        &[("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8"))],
    );
    host.wait_log_since(0, "(generation 1", START_TIMEOUT);
    let metrics_line = host.wait_log_since(0, "serving metrics on http://", WAIT);
    let metrics: std::net::SocketAddr = metrics_line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("metrics address");
    let unix = Addr::Unix(sock.clone());
    let mut seen = Vec::new();
    install.upgrade_ok(&host);
    let new = install.master_pid();
    let wanted = format!("MAINPID={new}");
    poll(
        WAIT,
        "MAINPID= of the new master",
        || host.log(),
        || {
            let mut buf = [0u8; 4096];
            if let Ok(n) = notify.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            seen.iter().any(|s| s.contains(&wanted)).then_some(())
        },
    );
    assert!(
        get(&unix, "/").is_ok(),
        "the unix socket serves after the upgrade\n{}",
        host.log()
    );
    let scrape = get(&Addr::Tcp(metrics), "/metrics").expect("metrics after the upgrade");
    assert!(
        scrape.text().contains("angel_generation 2"),
        "{}",
        scrape.text()
    );
    // The old master is gone and left the socket file to the new one.
    poll(
        WAIT,
        "the old master to exit",
        || host.log(),
        || host.try_status(),
    );
    assert!(
        sock.exists(),
        "the old master removed the new master's socket file"
    );
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        !seen.iter().any(|s| s.contains("STOPPING=1")),
        "the old master told the service manager the service stops: {seen:?}\n{}",
        host.log()
    );
    let stop = ctl(&install.pidfile(), &["stop"]);
    assert!(stop.status.success(), "{}{}", stop.stdout, stop.stderr);
    poll(
        WAIT,
        "the socket file removed by the last master",
        || host.log(),
        || (!sock.exists()).then_some(()),
    );
}

/// Workers run the master's own binary (`/proc/self/exe`), not whatever is at its path now: a
/// deploy that replaced the file (here with garbage) must not break a respawn, nor mix two
/// versions under one master. With the path, the respawned worker exec'd the new file.
#[test]
fn a_worker_respawned_after_the_binary_was_replaced_runs_the_masters_own_binary() {
    let install = Install::new();
    let host = install.start(&lib("hello"), &[]);
    install.put_file(b"#!/bin/sh\nexit 99\n");
    let victim = forked_pids(&host.log())[0];
    let mark = host.mark();
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill a worker");
    host.wait_log_since(mark, "forked worker[", WAIT);
    let respawned = forked_pids(&host.log_since(mark))[0];
    host.wait_log_since(mark, &format!("worker[{respawned}] listening on"), WAIT);
    for _ in 0..10 {
        get(host.addr(), "/").unwrap_or_else(|e| panic!("{e}\n{}", host.log()));
    }
    assert!(
        !host
            .log_since(mark)
            .contains(&format!("worker {respawned} died")),
        "the respawned worker failed\n{}",
        host.log()
    );
}

/// A new master keeps the sockets it takes over (that is how no connection is lost), so a
/// changed listen address in the re-read config cannot apply: it says so, naming both, and
/// serves on the old address. An upgrade with unchanged settings says nothing of it.
#[test]
fn a_new_master_names_a_changed_listen_address_it_cannot_apply_and_keeps_serving() {
    let install = Install::new();
    let config = install.dir().join("angel.toml");
    let write_host = |ip: &str| {
        let lib = lib("hello").display().to_string();
        std::fs::write(&config, format!("lib = {lib:?}\nhost = {ip:?}\n")).expect("config")
    };
    write_host("127.0.0.1");
    let host = install.start_with_config(&[]);
    let kept = "keeping the listeners taken over";
    let mark = host.mark();
    install.upgrade_ok(&host);
    let line = |mark: usize| {
        host.log_since(mark)
            .lines()
            .find(|l| l.contains(kept))
            .map(str::to_string)
    };
    assert_eq!(line(mark), None, "same settings: {}", host.log_since(mark));

    write_host("127.0.0.2");
    let mark = host.mark();
    let load = Load::start(host.addr(), 1, 1);
    install.upgrade_ok(&host);
    let warning = poll(
        WAIT,
        "the listen_kept warning",
        || host.log(),
        || line(mark),
    );
    let old = host.addr().tcp().to_string();
    assert!(
        warning.contains(&format!("({old})"))
            && warning.contains("ask for 127.0.0.2:0")
            && warning.contains(&format!("no longer ask for {old}"))
            && warning.contains("takes a restart"),
        "{warning}"
    );
    get(host.addr(), "/").expect("still serving on the old address");
    let report = load.finish();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
}
