//! `tracing` inside an app reaches the host's log: seed lines `worker[pid] message key=value`,
//! JSON objects with `target`, `spans` and `fields`; `ANGEL_LOG` filters in the app.

use angel_tests::ops::json_lines;
use angel_tests::*;
use serde_json::json;

/// `POST /items` with a JSON body on a new connection; panics unless the app answers 201.
fn create_item(addr: &Addr, host: &Host, name: &str) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr.tcp()).expect("connect");
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let body = format!(r#"{{"name":"{name}"}}"#);
    write!(
        conn,
        "POST /items HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).expect("read response");
    assert!(raw.starts_with("HTTP/1.1 201"), "{raw}\n{}", host.log());
}

/// A one-worker axum host in a seed-format log.
fn axum_host(angel_log: Option<&str>) -> (Host, Addr) {
    let mut builder = Host::builder(lib("axum-example")).args(["--workers", "1"]);
    if let Some(filter) = angel_log {
        builder = builder.env("ANGEL_LOG", filter);
    }
    let host = builder.start();
    let addr = host.addr().clone();
    (host, addr)
}

/// A one-worker axum host with `--log-format json`, and where it listens.
fn axum_json_host() -> (Host, Addr) {
    let host = Host::builder(lib("axum-example"))
        .args(["--workers", "1", "--log-format", "json"])
        .spawn();
    host.wait_log(r#""event":"serving""#, START_TIMEOUT);
    let addr = json_lines(&host.log())
        .iter()
        .find(|l| l["event"] == "listening" && l["role"] == "master")
        .and_then(|l| l["msg"].as_str()?.strip_prefix("listening on "))
        .and_then(Addr::parse)
        .unwrap_or_else(|| panic!("no master `listening` event:\n{}", host.log()));
    (host, addr)
}

#[test]
fn tracing_events_reach_the_host_log_in_both_formats() {
    // Seed: the message, then the event's fields, then its spans' fields.
    let (host, addr) = axum_host(None);
    let pid = host.worker_pids()[0];
    create_item(&addr, &host, "pear tree");
    let created = host.wait_log("item created", WAIT);
    assert_eq!(
        created,
        format!(
            "worker[{pid}] item created item_id=1 name=\"pear tree\" method=POST uri=/items version=HTTP/1.1"
        )
    );
    let finished = host.wait_log("finished processing request", WAIT);
    assert!(
        finished.starts_with(&format!(
            "worker[{pid}] finished processing request latency="
        )) && finished.contains(" status=201 method=POST uri=/items"),
        "{finished}"
    );
    // Startup events, and a `log`-crate record bridged through tracing-log.
    host.wait_log(
        &format!("worker[{pid}] axum app starting generation=1 slot=0"),
        WAIT,
    );
    host.wait_log(&format!("worker[{pid}] routes ready"), WAIT);
    drop(host);

    // JSON: level, target and spans where they belong, the fields under "fields".
    let (host, addr) = axum_json_host();
    create_item(&addr, &host, "fig");
    host.wait_log("\"msg\":\"finished processing request\"", WAIT);
    let lines = json_lines(&host.log());
    let created = lines
        .iter()
        .find(|l| l["msg"] == "item created")
        .unwrap_or_else(|| panic!("no `item created` object\n{}", host.log()));
    assert_eq!(created["level"], "info");
    assert_eq!(created["role"], "worker");
    assert_eq!(created["event"], "app");
    assert_eq!(created["generation"], 1);
    assert_eq!(created["target"], "axum_example");
    assert_eq!(created["fields"], json!({"item_id": 1, "name": "fig"}));
    assert_eq!(
        created["spans"],
        json!([{"name": "request", "method": "POST", "uri": "/items", "version": "HTTP/1.1"}])
    );
    let finished = lines
        .iter()
        .find(|l| l["msg"] == "finished processing request")
        .expect("finished object");
    assert_eq!(finished["target"], "tower_http::trace::on_response");
    assert_eq!(finished["fields"]["status"], 201);
    assert!(finished["fields"]["latency"].is_string(), "{finished:?}");
    let bridged = lines
        .iter()
        .find(|l| l["msg"] == "routes ready")
        .expect("the log-crate record");
    assert_eq!(bridged["target"], "axum_example");
}

#[test]
fn angel_log_filters_tracing_events() {
    // Default `info`: tower-http's INFO response event, not its DEBUG request event.
    let (host, addr) = axum_host(None);
    create_item(&addr, &host, "a");
    host.wait_log("finished processing request", WAIT);
    assert!(
        !host.log().contains("started processing request"),
        "{}",
        host.log()
    );
    drop(host);

    // `debug` lets the DEBUG events through (they are printed by the host as they come).
    let (host, addr) = axum_host(Some("debug"));
    create_item(&addr, &host, "b");
    host.wait_log("started processing request", WAIT);
    drop(host);

    // Per-target directives: tower-http off, the app at info. The app's own event comes after
    // tower-http's would have in the one worker's stream, so its absence is certain.
    let (host, addr) = axum_host(Some("info,tower_http=off"));
    create_item(&addr, &host, "c");
    create_item(&addr, &host, "d");
    host.wait_log("item created item_id=2", WAIT);
    let log = host.log();
    assert!(!log.contains("processing request"), "{log}");
    assert!(log.contains("item created item_id=1"), "{log}");
    drop(host);

    // A bad filter is reported once and replaced by the default.
    let (host, addr) = axum_host(Some("[[["));
    host.wait_log("ANGEL_LOG=\"[[[\" is not a valid filter", WAIT);
    create_item(&addr, &host, "e");
    host.wait_log("finished processing request", WAIT);
}
