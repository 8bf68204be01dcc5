use super::*;

fn recv(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a datagram within 5 s");
    String::from_utf8(buf[..n].to_vec()).expect("utf-8")
}

#[test]
fn wire_text_is_exact() {
    let at = Duration::from_micros(123_456_789);
    let cases = [
        (
            Notice::Ready {
                status: Some("generation 4 serving".into()),
            },
            "READY=1\nSTATUS=generation 4 serving",
        ),
        (Notice::Ready { status: None }, "READY=1"),
        (
            Notice::Reloading {
                status: Some("rolling to generation 5".into()),
            },
            "RELOADING=1\nMONOTONIC_USEC=123456789\nSTATUS=rolling to generation 5",
        ),
        (Notice::Stopping, "STOPPING=1"),
        (Notice::Status("a\nb".into()), "STATUS=a b"),
        (Notice::Watchdog, "WATCHDOG=1"),
        (
            Notice::ExtendTimeout(Duration::from_secs(30)),
            "EXTEND_TIMEOUT_USEC=30000000",
        ),
        (Notice::MainPid(4242), "MAINPID=4242"),
    ];
    for (notice, wire) in cases {
        assert_eq!(notice.to_wire_at(at), wire, "{notice:?}");
    }
}

#[test]
fn reloading_carries_the_monotonic_clock() {
    let before = monotonic_now().expect("clock").as_micros();
    let wire = Notice::Reloading { status: None }.to_wire().expect("wire");
    let after = monotonic_now().expect("clock").as_micros();
    let usec: u128 = wire
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected wire text {wire:?}"));
    assert!(before <= usec && usec <= after, "{before} {usec} {after}");
}

#[test]
fn sends_to_a_socket_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&path).expect("bind");
    let target = path.to_str().expect("utf-8 path");
    let n = Notifier::new(target).expect("notifier");
    n.notify(&Notice::Ready {
        status: Some("generation 4 serving".into()),
    })
    .expect("send");
    assert_eq!(recv(&manager), "READY=1\nSTATUS=generation 4 serving");
    n.notify(&Notice::Stopping).expect("send");
    assert_eq!(recv(&manager), "STOPPING=1");
}

#[test]
fn sends_to_an_abstract_address() {
    let name = format!(
        "angel-host-test-notify-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
    let manager = UnixDatagram::bind_addr(&addr).expect("bind abstract");
    let n = Notifier::new(&format!("@{name}")).expect("notifier");
    n.notify(&Notice::Watchdog).expect("send");
    assert_eq!(recv(&manager), "WATCHDOG=1");
    n.notify(&Notice::MainPid(77)).expect("send");
    assert_eq!(recv(&manager), "MAINPID=77");
}

#[test]
fn a_manager_that_does_not_read_makes_sends_fail_not_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("full.sock");
    let _manager = UnixDatagram::bind(&path).expect("bind");
    let n = Notifier::new(path.to_str().expect("utf-8")).expect("notifier");
    // The receive queue holds net.unix.max_dgram_qlen (512 by default) datagrams at most.
    let err = (0..100_000)
        .find_map(|_| n.notify(&Notice::Watchdog).err())
        .expect("the queue fills up");
    match err {
        NotifyError::Send { source, .. } => {
            assert_eq!(source.kind(), io::ErrorKind::WouldBlock, "{source}")
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn notify_or_log_reports_whether_it_got_through_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("late.sock");
    let n = Notifier::new(path.to_str().expect("utf-8")).expect("notifier");
    assert!(!n.notify_or_log(&Notice::Watchdog), "nobody listens yet");
    assert!(!n.notify_or_log(&Notice::Watchdog));
    // The manager appears (or comes back after a re-exec): the same notifier reaches it.
    let manager = UnixDatagram::bind(&path).expect("bind");
    assert!(n.notify_or_log(&Notice::Watchdog));
    assert_eq!(recv(&manager), "WATCHDOG=1");
    assert!(!n.failing.load(Ordering::Relaxed));
}

#[test]
fn a_missing_socket_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.sock");
    let n = Notifier::new(path.to_str().expect("utf-8")).expect("notifier");
    let err = n.notify(&Notice::Stopping).expect_err("nobody listens");
    assert!(err.to_string().contains("absent.sock"), "{err}");
    assert!(matches!(
        Notifier::new("vsock:2:1234"),
        Err(NotifyError::Unsupported(_))
    ));
}

#[test]
fn a_successor_gets_the_socket_and_the_watchdog_but_not_our_pid() {
    let n = Notifier::new("@angel-successor").expect("notifier");
    let w = Watchdog::parse(Some("8000000"), Some("42"), 42)
        .expect("parse")
        .expect("ours");
    let env = n.successor_env(Some(&w));
    assert_eq!(
        env,
        vec![
            ("NOTIFY_SOCKET", "@angel-successor".to_string()),
            ("WATCHDOG_USEC", "8000000".to_string())
        ]
    );
    // What the successor then reads: the same watchdog, for its own pid.
    assert_eq!(
        Watchdog::parse(Some(&env[1].1), None, 4343).expect("parse"),
        Some(w)
    );
    assert_eq!(n.successor_env(None).len(), 1);
}

#[test]
fn watchdog_pings_at_half_the_interval_and_only_for_us() {
    let w = Watchdog::parse(Some("10000000"), None, 42).expect("parse");
    assert_eq!(
        w,
        Some(Watchdog {
            timeout: Duration::from_secs(10),
            ping_every: Duration::from_secs(5)
        })
    );
    assert!(Watchdog::parse(Some("10000000"), Some("42"), 42)
        .expect("ours")
        .is_some());
    assert_eq!(
        Watchdog::parse(Some("10000000"), Some("43"), 42).expect("not ours"),
        None
    );
    assert_eq!(Watchdog::parse(None, None, 42).expect("unset"), None);
    assert!(matches!(
        Watchdog::parse(Some("soon"), None, 42),
        Err(NotifyError::BadWatchdog(_))
    ));
    assert!(Watchdog::parse(Some("0"), None, 42).is_err());
}
