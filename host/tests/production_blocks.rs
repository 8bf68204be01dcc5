//! The production building blocks composed the way the master will wire them, under the real
//! `systemd-socket-activate`: LISTEN_FDS → `Listeners::from_inherited`, `NOTIFY_SOCKET` →
//! `READY=1`, metrics served beside, the environment cleaned for workers.
//!
//! The parent test plays systemd's part (it owns the notification socket and the client);
//! the program it activates is this test binary again, running the ignored `child` test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use angel_host::activation;
use angel_host::listener::Listeners;
use angel_host::metrics::Metrics;
use angel_host::notify::{self, Notice, Notifier};

const TOOL: &str = "/usr/bin/systemd-socket-activate";
const CHILD_FLAG: &str = "ANGEL_TEST_BLOCKS_CHILD";

/// The activated program: what the master's start-up will do, step by step.
#[test]
#[ignore = "runs under systemd-socket-activate, started by blocks_compose_under_systemd_socket_activate"]
fn child() {
    if std::env::var_os(CHILD_FLAG).is_none() {
        return;
    }
    println!();
    // 1. Before any thread: take the inherited sockets and the notifier, clean the env.
    let inherited = activation::from_env().expect("LISTEN_FDS");
    let notifier = Notifier::from_env().expect("NOTIFY_SOCKET").expect("set");
    activation::unset_env();
    notify::unset_env();
    for k in activation::ENV_VARS.iter().chain(notify::CHILD_ENV_REMOVE) {
        assert!(std::env::var_os(k).is_none(), "{k} still set");
    }
    let names: Vec<String> = inherited
        .iter()
        .map(|i| {
            format!(
                "{} {:?} reuseport={}",
                i.addr.describe(),
                i.name,
                i.reuse_port
            )
        })
        .collect();
    println!("CHILD inherited {}", names.join("; "));
    // 2. Listeners from them, for 2 slots (systemd-socket-activate sets no SO_REUSEPORT: shared).
    let listeners = Listeners::from_inherited(inherited, 2).expect("listeners");
    println!(
        "CHILD listeners {:?} tcp_slots={}",
        listeners.describe(),
        listeners.tcp_slots()
    );
    // 3. Metrics on a thread of their own.
    let metrics = Metrics::new();
    let server = metrics
        .serve("127.0.0.1:0".parse().expect("addr"))
        .expect("metrics");
    metrics.set_generation(1);
    // 4. "Workers" serve the connection that woke us (slot 1: the shared socket).
    let listener = std::net::TcpListener::from(
        listeners.for_slot(1)[0]
            .0
            .try_clone_to_owned()
            .expect("dup"),
    );
    let (mut conn, _) = listener.accept().expect("the waiting connection");
    let mut scrape = TcpStream::connect(server.local_addr()).expect("metrics");
    write!(
        scrape,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    scrape.read_to_string(&mut text).expect("scrape");
    let generation = text
        .lines()
        .find(|l| l.starts_with("angel_generation "))
        .unwrap_or("-");
    writeln!(conn, "served by the activated program; {generation}").expect("answer");
    drop(conn);
    // 5. Ready.
    notifier
        .notify(&Notice::Ready {
            status: Some("generation 1 serving, 2 workers".into()),
        })
        .expect("READY=1");
    println!("CHILD done");
}

#[test]
fn blocks_compose_under_systemd_socket_activate() {
    if !std::path::Path::new(TOOL).exists() {
        eprintln!("skipped: {TOOL} is not installed (Debian package systemd)");
        return;
    }
    let name = format!("angel-test-blocks-{}", std::process::id());
    let manager =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).expect("addr"))
            .expect("notification socket");
    manager
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = Command::new(TOOL)
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--fdname=web")
        .arg(format!("--setenv={CHILD_FLAG}=1"))
        .arg(format!("--setenv=NOTIFY_SOCKET=@{name}"))
        .arg(std::env::current_exe().expect("test exe"))
        .args([
            "--exact",
            "child",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    let stderr = child.stderr.take().expect("stderr");
    let mut stderr = BufReader::new(stderr).lines();
    assert!(
        stderr
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.starts_with("Listening on")),
        "systemd-socket-activate did not listen"
    );
    std::thread::spawn(move || stderr.for_each(drop));

    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut answer = String::new();
    client.read_to_string(&mut answer).expect("an answer");
    assert_eq!(
        answer,
        "served by the activated program; angel_generation 1\n"
    );

    let mut buf = [0u8; 512];
    let n = manager.recv(&mut buf).expect("READY within 20 s");
    assert_eq!(
        std::str::from_utf8(&buf[..n]).expect("utf-8"),
        "READY=1\nSTATUS=generation 1 serving, 2 workers"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the activated program did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("stdout");
    assert!(status.success(), "{status:?}\n{stdout}");
    let lines: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("CHILD "))
        .collect();
    assert_eq!(
        lines,
        vec![
            format!("inherited 127.0.0.1:{port} Some(\"web\") reuseport=false").as_str(),
            format!("listeners [\"127.0.0.1:{port}\"] tcp_slots=1").as_str(),
            "done",
        ],
        "child stdout:\n{stdout}"
    );
}
