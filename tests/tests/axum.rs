//! The axum example (`examples/axum`, served through `export_tower!` / `serve_tower`): rolls
//! without loss, panics become 500s, websockets get a Close frame when their worker drains.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use angel_tests::load::Load;
use angel_tests::*;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

const ROLLS: u64 = 5;

fn axum_host(extra: &[&str]) -> Host {
    Host::start(lib("axum-example"), extra)
}

/// One request with a body on a new connection; returns (status, body).
fn request(host: &Host, method: &str, path: &str, json: Option<&str>) -> (u16, String) {
    let mut conn = TcpStream::connect(host.addr().tcp()).expect("connect");
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let body = json.unwrap_or("");
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response {raw:?}\n{}", host.log()));
    (status, body.to_owned())
}

#[test]
fn axum_app_rolls_under_load_with_zero_failed_requests() {
    let host = axum_host(&["--workers", "2"]);
    let load = Load::start(host.addr(), 2, 2);
    let wait_ok = |n: u64| {
        wait_until(&host, WAIT, "requests to flow", || {
            (load.ok() >= n).then_some(())
        });
    };
    wait_ok(20);
    for k in 0..ROLLS {
        let roll = host.roll(WAIT);
        assert_eq!(roll.generation, k + 2, "{}", roll.line);
        let now = load.ok();
        wait_ok(now + 20);
    }
    let report = load.finish();
    report.assert_clean(&host, 120);
    assert!(
        report.per_pid.len() >= 4,
        "several generations answered: {:?}",
        report.per_pid
    );
}

#[test]
fn axum_json_path_and_query_extractors_work() {
    let host = axum_host(&["--workers", "1"]);
    assert_eq!(request(&host, "GET", "/healthz", None), (200, "ok".into()));
    let (status, body) = request(&host, "POST", "/items", Some(r#"{"name":"pear"}"#));
    assert_eq!((status, body.as_str()), (201, r#"{"id":1,"name":"pear"}"#));
    request(&host, "POST", "/items", Some(r#"{"name":"fig"}"#));
    assert_eq!(
        request(&host, "GET", "/items/2", None),
        (200, r#"{"id":2,"name":"fig"}"#.into())
    );
    assert_eq!(request(&host, "GET", "/items/9", None).0, 404);
    assert_eq!(
        request(&host, "GET", "/items?limit=1", None),
        (200, r#"[{"id":1,"name":"pear"}]"#.into())
    );
    // Bad JSON is axum's 4xx, not a crash.
    let (status, _) = request(&host, "POST", "/items", Some("{not json"));
    assert!((400..500).contains(&status), "{status}");
}

#[test]
fn panicking_tower_handler_gets_a_500_and_the_worker_keeps_serving() {
    let host = axum_host(&["--workers", "1"]);
    let before = hello_pid(&get(host.addr(), "/").expect("GET /").text());
    let mut client = Client::new(host.addr());
    for _ in 0..3 {
        let (status, body) = request(&host, "GET", "/panic", None);
        assert_eq!((status, body.as_str()), (500, ""));
        // A kept-alive connection survives its neighbour's panic too.
        let ok = client.get("/").expect("GET / after a panic");
        assert_eq!(hello_pid(&ok.text()), before);
    }
    assert_eq!(
        client.connections, 1,
        "the keep-alive connection was never dropped"
    );
    let after = hello_pid(&get(host.addr(), "/").expect("GET /").text());
    assert_eq!(after, before, "the same worker still serves");
    let log = host.log();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    assert_eq!(panics.len(), 3, "each panic logged exactly once:\n{log}");
    assert!(
        panics
            .iter()
            .all(|l| l.starts_with(&format!("worker[{before}] "))
                && l.contains("the /panic handler panics on purpose")),
        "{panics:#?}"
    );
    assert!(!log.contains(" died"), "{log}");
}

/// Opens `/ws` and checks that it echoes.
fn connect_ws(host: &Host) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(host.addr().tcp()).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let url = format!("ws://{}/ws", host.addr().tcp());
    let (mut ws, response) = tungstenite::client(url.as_str(), stream)
        .unwrap_or_else(|e| panic!("websocket handshake: {e}\n{}", host.log()));
    assert_eq!(response.status(), 101);
    ws.send(Message::text("ping 1")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("ping 1"));
    ws
}

#[test]
fn websocket_gets_a_close_frame_when_its_worker_drains() {
    // One worker: the websocket is certainly on it.
    let host = axum_host(&["--workers", "1"]);
    let ws = connect_ws(&host);
    let old = host.worker_pids();
    let roll = host.roll(WAIT);
    // The old worker drains: its websocket task sends Close (1001 going away).
    let ws = std::cell::RefCell::new(ws);
    let close = wait_until(&host, WAIT, "a Close frame", || {
        match ws.borrow_mut().read() {
            Ok(Message::Close(frame)) => Some(frame),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                None
            }
            Err(e) => panic!(
                "websocket error instead of a Close frame: {e}\n{}",
                host.log()
            ),
        }
    });
    let mut ws = ws.into_inner();
    let frame = close.expect("the Close frame carries a code");
    assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
    assert_eq!(frame.reason.as_str(), "worker draining");
    // Complete the closing handshake; then the old worker exits.
    wait_until(&host, WAIT, "the closing handshake", || match ws.read() {
        Err(tungstenite::Error::ConnectionClosed) => Some(()),
        Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("after Close: {e}"),
        Ok(m) => panic!("after Close: {m:?}"),
    });
    host.wait_exited(&old, WAIT);
    // A new websocket lands on the new generation and echoes.
    let mut ws = connect_ws(&host);
    ws.send(Message::text("after the roll")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("after the roll"));
    assert!(roll.new_pids.iter().all(|p| pid_running(*p)));
    ws.close(None).unwrap();
}
