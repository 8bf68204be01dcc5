//! The systemd units in `contrib/systemd/` parse (`systemd-analyze verify`) and keep the
//! timing invariant the drain depends on: systemd's stop deadline lies beyond the master's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn contrib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd")
}

fn read(name: &str) -> String {
    let path = contrib().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `45s`, `2min`, `30` (seconds), as both systemd and angel-host write them here.
fn seconds(v: &str) -> u64 {
    let v = v.trim();
    let (num, mul) = if let Some(n) = v.strip_suffix("min") {
        (n, 60)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1)
    } else {
        (v, 1)
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| panic!("duration {v:?}"))
        * mul
}

#[test]
fn stop_timeout_exceeds_the_graceful_timeout() {
    let unit = read("angel-host.service");
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec= is set");
    let graceful = unit
        .split("--graceful-timeout")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("ExecStart passes --graceful-timeout");
    assert!(
        seconds(stop) > seconds(graceful),
        "TimeoutStopSec={stop} must exceed --graceful-timeout {graceful}, or systemd's SIGKILL \
         cuts requests the master would let finish"
    );
    assert!(
        unit.contains("\nKillMode=mixed\n"),
        "the master alone drives the drain"
    );
    assert!(
        unit.contains("ExecReload=/usr/local/bin/angel-host reload"),
        "the fallback for systemd < 253 is documented"
    );
}

#[test]
fn units_pass_systemd_analyze_verify() {
    const TOOL: &str = "/usr/bin/systemd-analyze";
    if !Path::new(TOOL).exists() {
        eprintln!("skipped: {TOOL} is not installed");
        return;
    }
    let version = Command::new("systemctl")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u32>().ok())
        })
        .unwrap_or(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut service = read("angel-host.service").replace(
        "/usr/local/bin/angel-host",
        env!("CARGO_BIN_EXE_angel-host"),
    );
    if version < 253 {
        // notify-reload is systemd 253+; the unit documents Type=notify + ExecReload= for older.
        service = service.replace("Type=notify-reload", "Type=notify");
    }
    std::fs::write(dir.path().join("angel-host.service"), service).expect("write");
    std::fs::write(
        dir.path().join("angel-host.socket"),
        read("angel-host.socket"),
    )
    .expect("write");
    let child = Command::new(TOOL)
        .arg("verify")
        .arg(dir.path().join("angel-host.service"))
        .arg(dir.path().join("angel-host.socket"))
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run systemd-analyze");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("systemd-analyze ends within 30 s")
        .expect("its output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify (systemd {version}): {:?}\n{stderr}",
        out.status
    );
}
