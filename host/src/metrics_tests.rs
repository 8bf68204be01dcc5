use std::io::{Read, Write};
use std::net::TcpStream;

use super::*;

/// One `Connection: close` request over a real TCP connection; (status line, head, body).
fn get(addr: SocketAddr, method: &str, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response within 5 s");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn every_metric_is_exported_from_the_start() {
    let text = Metrics::new().encode();
    for line in [
        "# TYPE angel_generation gauge",
        "angel_generation 0",
        "angel_workers{state=\"starting\"} 0",
        "angel_workers{state=\"ready\"} 0",
        "angel_workers{state=\"draining\"} 0",
        "# TYPE angel_rolls counter",
        "angel_rolls_total{result=\"ok\"} 0",
        "angel_rolls_total{result=\"failed\"} 0",
        "angel_rolls_total{result=\"skipped\"} 0",
        "# TYPE angel_roll_duration_seconds histogram",
        "angel_roll_duration_seconds_count 0",
        "# TYPE angel_worker_exits counter",
        "angel_worker_restarts_total 0",
        "angel_requests_total 0",
        "# TYPE angel_master_start_time_seconds gauge",
        "# EOF",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    let start = value(&text, "angel_master_start_time_seconds").expect("start time");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(now - 60.0 < start && start <= now, "{start} vs {now}");
}

#[test]
fn updates_show_in_the_text() {
    let m = Metrics::new();
    m.set_generation(4);
    m.set_workers(WorkerCounts {
        starting: 1,
        ready: 4,
        draining: 2,
    });
    m.roll_finished(RollResult::Ok, Duration::from_millis(7));
    m.roll_finished(RollResult::Failed, Duration::from_secs(3));
    m.roll_finished(RollResult::Skipped, Duration::from_millis(2));
    m.worker_exited(100, "crashed");
    m.worker_exited(101, "exited");
    m.worker_exited(102, "exited");
    m.worker_restarted();
    let text = m.encode();
    for line in [
        "angel_generation 4",
        "angel_workers{state=\"starting\"} 1",
        "angel_workers{state=\"ready\"} 4",
        "angel_workers{state=\"draining\"} 2",
        "angel_rolls_total{result=\"ok\"} 1",
        "angel_rolls_total{result=\"failed\"} 1",
        "angel_rolls_total{result=\"skipped\"} 1",
        "angel_roll_duration_seconds_count 3",
        "angel_roll_duration_seconds_bucket{le=\"0.01\"} 2",
        "angel_roll_duration_seconds_bucket{le=\"5.0\"} 3",
        "angel_worker_exits_total{reason=\"crashed\"} 1",
        "angel_worker_exits_total{reason=\"exited\"} 2",
        "angel_worker_restarts_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[test]
fn requests_total_only_grows_as_workers_come_and_go() {
    let m = Metrics::new();
    let total = |m: &Metrics| value(&m.encode(), "angel_requests_total").expect("series");
    m.requests_seen(10, 10);
    m.requests_seen(10, 25);
    m.requests_seen(11, 5);
    assert_eq!(total(&m), 30.0);
    // Worker 10 drains: its final heartbeat counts, then it is forgotten.
    m.requests_seen(10, 27);
    m.worker_exited(10, "exited");
    assert_eq!(
        total(&m),
        32.0,
        "an exiting worker must not take its requests away"
    );
    m.requests_seen(12, 3);
    m.requests_seen(11, 7);
    assert_eq!(total(&m), 37.0);
    // The same heartbeat twice adds nothing.
    m.requests_seen(11, 7);
    assert_eq!(total(&m), 37.0);
    // A pid reused by a new worker starts from zero: its total is lower than the last.
    m.requests_seen(12, 1);
    assert_eq!(total(&m), 38.0);
}

#[test]
fn serves_metrics_over_tcp_and_404_elsewhere() {
    let m = Metrics::new();
    let server = m
        .serve("127.0.0.1:0".parse().expect("addr"))
        .expect("serve");
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    m.set_generation(7);
    let (status, head, body) = get(addr, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        head.contains(&format!("content-type: {CONTENT_TYPE}")),
        "{head}"
    );
    assert!(body.lines().any(|l| l == "angel_generation 7"), "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");

    let (status, _, _) = get(addr, "GET", "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = get(addr, "POST", "/metrics");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");

    drop(server);
    assert!(
        TcpStream::connect(addr).is_err(),
        "the port is closed once the server is dropped"
    );
}

#[test]
fn scrapes_while_the_master_updates_see_a_growing_counter() {
    let m = Metrics::new();
    let server = m
        .serve("127.0.0.1:0".parse().expect("addr"))
        .expect("serve");
    let addr = server.local_addr();
    const BEATS: u64 = 2000;
    let updater = {
        let m = m.clone();
        std::thread::spawn(move || {
            for i in 1..=BEATS {
                m.requests_seen(1, i);
                m.requests_seen(2, i);
                m.set_generation(i);
            }
        })
    };
    let scrapers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut last = 0.0;
                for _ in 0..25 {
                    let (status, _, body) = get(addr, "GET", "/metrics");
                    assert_eq!(status, "HTTP/1.1 200 OK");
                    assert!(body.ends_with("# EOF\n"), "a whole exposition: {body}");
                    let now = value(&body, "angel_requests_total").expect("series");
                    assert!(now >= last, "counter went down: {last} -> {now}");
                    last = now;
                }
            })
        })
        .collect();
    updater.join().expect("updater");
    for s in scrapers {
        s.join().expect("scraper");
    }
    let (_, _, body) = get(addr, "GET", "/metrics");
    assert_eq!(
        value(&body, "angel_requests_total"),
        Some((2 * BEATS) as f64)
    );
}

#[test]
fn a_busy_address_is_an_error_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let err = Metrics::new().serve(addr).expect_err("in use");
    assert!(
        err.to_string()
            .starts_with(&format!("cannot serve metrics on {addr}: ")),
        "{err}"
    );
}

#[test]
fn idle_connections_beyond_the_cap_wait_instead_of_taking_fds() {
    let m = Metrics::new();
    let server = m
        .serve("127.0.0.1:0".parse().expect("addr"))
        .expect("serve");
    let addr = server.local_addr();
    // MAX_CONNECTIONS clients that connect and say nothing hold every slot.
    let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    // One more scraper: the kernel queues it, the server does not accept it yet.
    let mut waiting = TcpStream::connect(addr).expect("connect");
    write!(
        waiting,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    waiting
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let err = waiting
        .read(&mut byte)
        .expect_err("no answer while every slot is taken");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    // One idle client leaves: the waiting scrape gets its slot and its answer.
    drop(idle.into_iter().next());
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut text = String::new();
    waiting
        .read_to_string(&mut text)
        .expect("answered once a slot is free");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
}
