//! `--log-format json`: every stderr line of the master and its workers is one JSON object with
//! `ts`, `level`, `role`, `pid`, `event`, `msg`, `fields` (and `generation` where known, always
//! for workers).

use std::collections::BTreeSet;

use angel_tests::ops::*;
use angel_tests::*;
use nix::sys::signal::Signal;
use serde_json::{Map, Value};

type Line = Map<String, Value>;

/// `2026-11-28T12:00:00.123Z`: RFC 3339, UTC.
fn is_rfc3339_utc(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && ts.ends_with('Z')
}

/// Checks the shape of every line; returns them.
fn check_lines(log: &str, master: i32) -> Vec<Line> {
    let lines = json_lines(log);
    for l in &lines {
        let s = |k: &str| {
            l.get(k)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("no string {k:?} in {l:?}"))
        };
        assert!(is_rfc3339_utc(s("ts")), "ts: {l:?}");
        assert!(
            ["error", "warn", "info", "debug", "trace"].contains(&s("level")),
            "level: {l:?}"
        );
        assert!(!s("event").is_empty(), "event: {l:?}");
        s("msg");
        assert!(
            l.get("fields").is_some_and(Value::is_object),
            "fields: {l:?}"
        );
        let pid = l
            .get("pid")
            .and_then(Value::as_i64)
            .unwrap_or_else(|| panic!("no pid in {l:?}"));
        match s("role") {
            "master" => assert_eq!(pid, i64::from(master), "{l:?}"),
            "worker" => {
                assert_ne!(pid, i64::from(master), "{l:?}");
                assert!(
                    l.get("generation").is_some_and(Value::is_u64),
                    "worker lines carry their generation: {l:?}"
                );
            }
            other => panic!("role {other:?}: {l:?}"),
        }
    }
    lines
}

fn event<'a>(lines: &'a [Line], name: &str) -> Vec<&'a Line> {
    lines.iter().filter(|l| l["event"] == name).collect()
}

#[test]
fn json_log_lines_are_objects_with_stable_events_through_a_roll_a_crash_and_a_stop() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("angel.toml");
    std::fs::write(&config, "timeout = \"30s\"\n").unwrap();
    let host = Host::builder(lib("hello"))
        .dir(dir.path())
        .args(["--workers", "2", "--log-format", "json", "--config"])
        .arg(&config)
        .spawn();
    host.wait_log(r#""event":"serving""#, START_TIMEOUT);
    let lines = check_lines(&host.log(), host.pid);
    let listening = event(&lines, "listening");
    let addr = listening
        .first()
        .and_then(|l| l["msg"].as_str()?.strip_prefix("listening on "))
        .and_then(Addr::parse)
        .unwrap_or_else(|| panic!("no master `listening` event:\n{}", host.log()));
    let gen1: BTreeSet<i32> = event(&lines, "ready")
        .iter()
        .map(|l| l["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(gen1.len(), 2, "{}", host.log());

    // A roll.
    let mark = host.hup();
    host.wait_log_since(mark, r#""event":"reloaded""#, WAIT);
    for pid in &gen1 {
        host.wait_line_since(mark, WAIT, &format!("worker {pid} exited"), |l| {
            l.contains(r#""event":"exited""#) && l.contains(&format!(r#""worker":{pid}"#))
        });
    }
    // A crash.
    let mut client = Client::new(&addr);
    let victim = hello_pid(&client.get("/").unwrap().text());
    let mark = host.mark();
    client.get("/crash").unwrap();
    host.wait_line_since(mark, WAIT, "the died event", |l| {
        l.contains(r#""event":"died""#) && l.contains(&format!(r#""worker":{victim}"#))
    });
    host.wait_log_since(mark, r#""event":"ready""#, WAIT);
    // A broken config file on HUP is an error-level event; the roll still happens.
    std::fs::write(&config, "timeout = \"-1s\"\n").unwrap();
    let mark = host.hup();
    let broken = host.wait_log_since(mark, "keeping the running configuration", WAIT);
    host.wait_log_since(mark, r#""event":"reloaded""#, WAIT);
    // A graceful stop.
    host.signal(Signal::SIGTERM);
    assert_eq!(host.wait_exit(WAIT).code(), Some(0), "{}", host.log());

    let lines = check_lines(&host.log(), host.pid);
    let broken: Line = serde_json::from_str(&broken).unwrap();
    assert_eq!(broken["level"], "error", "{broken:?}");
    assert_eq!(broken["role"], "master", "{broken:?}");
    let events: BTreeSet<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    for want in [
        "listening",
        "pidfile_created",
        "forked",
        "ready",
        "serving",
        "signal",
        "reloaded",
        "closes",
        "exited",
        "died",
        "app",
        "stopping",
        "stopped",
        "pidfile_removed",
    ] {
        assert!(events.contains(want), "no {want:?} event in {events:?}");
    }
    for l in event(&lines, "reloaded")
        .into_iter()
        .chain(event(&lines, "serving"))
    {
        assert!(l.get("generation").is_some_and(Value::is_u64), "{l:?}");
        // What the README shows: the roll's time as a number, not only in the message.
        assert!(
            l["fields"]["took_ms"].as_f64().is_some_and(|ms| ms > 0.0),
            "a roll's line carries took_ms: {l:?}"
        );
    }
    for l in event(&lines, "forked") {
        assert!(
            l["fields"]["worker"].is_i64(),
            "forked names the worker: {l:?}"
        );
    }
    let signals: Vec<&str> = event(&lines, "signal")
        .iter()
        .filter_map(|l| l["msg"].as_str())
        .collect();
    assert_eq!(signals, ["SIGHUP", "SIGHUP", "SIGTERM"], "{signals:?}");
}

/// An app that panics writes through the default panic hook: those lines must be JSON too.
#[test]
fn json_log_stays_json_when_an_app_panics_during_a_roll() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("libapp.so");
    deploy(&lib("hello"), &served);
    let host = Host::builder(&served)
        .dir(dir.path())
        .args(["--workers", "1", "--log-format", "json"])
        .spawn();
    host.wait_log(r#""event":"serving""#, START_TIMEOUT);
    BadLib::PanicInit.deploy(dir.path(), &served);
    let mark = host.hup();
    host.wait_log_since(mark, r#""event":"reload_failed""#, WAIT);
    host.signal(Signal::SIGTERM);
    host.wait_exit(WAIT);
    check_lines(&host.log(), host.pid);
}

/// A master that cannot start says why on its last line: as JSON too.
#[test]
fn json_log_stays_json_when_the_master_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let bad = BadLib::Text.create(dir.path());
    let out = Host::builder(&bad)
        .dir(dir.path())
        .args(["--workers", "1", "--log-format", "json"])
        .run_to_exit(START_TIMEOUT);
    assert_eq!(out.code(), 3, "{}", out.stderr);
    let lines = json_lines(&out.stderr);
    assert!(
        lines.iter().any(|l| l["level"] == "error"
            && l["msg"]
                .as_str()
                .is_some_and(|m| m.contains(&bad.display().to_string()))),
        "the failure is an error event naming the library:\n{}",
        out.stderr
    );
}
