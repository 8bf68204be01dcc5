//! Unit tests of `http_conn.rs`.

use super::*;
use std::future::Future;
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;

#[test]
fn classify_knows_the_preface_however_much_of_it_arrived() {
    assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
    for n in 1..H2_PREFACE.len() {
        assert_eq!(classify(&H2_PREFACE[..n]), None, "{n} bytes");
    }
    // Frames that follow the preface in the same read do not matter.
    let mut with_frames = H2_PREFACE.to_vec();
    with_frames.extend_from_slice(b"\0\0\x12\x04\0\0\0\0\0");
    assert_eq!(classify(&with_frames), Some(Protocol::Http2));
}

#[test]
fn classify_decides_http1_at_the_first_differing_byte() {
    assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
    assert_eq!(classify(b"G"), Some(Protocol::Http1));
    // `P` as in `POST` / `PUT` matches the preface's first byte only.
    assert_eq!(classify(b"P"), None);
    assert_eq!(classify(b"PO"), Some(Protocol::Http1));
    assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
}

#[tokio::test]
async fn sniff_peeks_without_consuming_and_waits_for_a_split_preface() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    for (parts, expected) in [
        (vec![&b"GET / HTTP/1.1\r\n"[..]], Some(Protocol::Http1)),
        (
            vec![&b"P"[..], &b"OST / HTTP/1.1\r\n"[..]],
            Some(Protocol::Http1),
        ),
        (
            vec![&H2_PREFACE[..5], &H2_PREFACE[5..]],
            Some(Protocol::Http2),
        ),
        (vec![], None),
    ] {
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.set_nodelay(true).unwrap();
            for part in parts {
                c.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let (server, _) = listener.accept().await.unwrap();
        let stream = crate::net::Stream::Tcp(server);
        assert_eq!(sniff(&stream).await.unwrap(), expected);
        client.await.unwrap();
        if expected.is_some() {
            // The peeked bytes are still there for hyper.
            let crate::net::Stream::Tcp(mut server) = stream else {
                unreachable!()
            };
            let mut first = [0u8; 1];
            server.read_exact(&mut first).await.unwrap();
            assert!(first[0] == b'G' || first[0] == b'P');
        }
    }
}

fn at(base: Instant, ms: u64) -> Instant {
    base + Duration::from_millis(ms)
}

fn sample(reads: u64, heads: u64) -> Sample {
    Sample {
        reads,
        heads,
        ..Sample::default()
    }
}

#[test]
fn linger_closes_a_quiet_connection_after_the_linger() {
    let t0 = Instant::now();
    let mut linger = Linger::new(t0, sample(3, 1));
    assert!(!linger.observe(at(t0, 50), sample(3, 1)));
    assert!(!linger.observe(at(t0, 950), sample(3, 1)));
    assert!(linger.observe(at(t0, 1000), sample(3, 1)));
}

#[test]
fn linger_waits_for_quiet_after_a_request_arrives() {
    let t0 = Instant::now();
    let mut linger = Linger::new(t0, sample(0, 0));
    // A request arrives 900 ms into the drain: another full second of quiet from there.
    assert!(!linger.observe(at(t0, 900), sample(1, 1)));
    assert!(!linger.observe(at(t0, 1500), sample(1, 1)));
    assert!(!linger.observe(at(t0, 1850), sample(1, 1)));
    assert!(linger.observe(at(t0, 1900), sample(1, 1)));
}

#[test]
fn linger_cuts_a_client_that_trickles_a_head() {
    let t0 = Instant::now();
    let mut linger = Linger::new(t0, sample(5, 0));
    let mut closed_at = None;
    for (i, ms) in (100..5000).step_by(100).enumerate() {
        // One more byte every 100 ms, never a complete head: never quiet.
        if linger.observe(at(t0, ms), sample(6 + i as u64, 0)) {
            closed_at = Some(ms);
            break;
        }
    }
    // First headless byte at 100 ms, so shut down one linger later.
    assert_eq!(closed_at, Some(1100));
}

#[test]
fn linger_lets_a_steady_client_with_requests_go_on() {
    let t0 = Instant::now();
    let mut linger = Linger::new(t0, sample(0, 0));
    // A read with a new head every 100 ms: neither quiet nor headless.
    for i in 1..50u64 {
        assert!(!linger.observe(at(t0, i * 100), sample(i, i)), "at {i}");
    }
    // Split heads: bytes first, the head completes one check later.
    assert!(!linger.observe(at(t0, 5000), sample(50, 49)));
    assert!(!linger.observe(at(t0, 5050), sample(51, 50)));
    assert!(!linger.observe(at(t0, 6000), sample(52, 50)));
    // ... but bytes without a head since 6000 ms are cut one linger later.
    assert!(!linger.observe(at(t0, 6950), sample(60, 50)));
    assert!(linger.observe(at(t0, 7000), sample(61, 50)));
}

/// A connection that serves until told to shut down, then ends at its next poll; records
/// when its graceful shutdown started.
struct FakeConn {
    shutdown_at: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Future for FakeConn {
    type Output = &'static str;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<&'static str> {
        match *self.shutdown_at.lock().unwrap() {
            Some(_) => Poll::Ready("shut down"),
            None => Poll::Pending,
        }
    }
}

impl Graceful for FakeConn {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        *self.shutdown_at.lock().unwrap() = Some(Instant::now());
    }
}

fn fake_conn() -> (FakeConn, Arc<std::sync::Mutex<Option<Instant>>>) {
    let at = Arc::new(std::sync::Mutex::new(None));
    (
        FakeConn {
            shutdown_at: Arc::clone(&at),
        },
        at,
    )
}

#[tokio::test(start_paused = true)]
async fn a_quiet_watched_connection_is_shut_down_one_linger_after_the_ring() {
    let bell = Arc::new(Bell::default());
    let (conn, shutdown_at) = fake_conn();
    let watched = tokio::spawn(Watched::new(conn, &bell, None, Arc::default()));
    // Not before the drain, however long it serves.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(*shutdown_at.lock().unwrap(), None);
    let rung = Instant::now();
    bell.ring();
    assert_eq!(watched.await.unwrap(), Ended::Served("shut down"));
    let took = shutdown_at.lock().unwrap().unwrap() - rung;
    assert!(
        (DRAIN_LINGER..DRAIN_LINGER + DRAIN_CHECK).contains(&took),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_watched_connection_whose_client_keeps_sending_heads_is_not_cut_while_draining() {
    let bell = Arc::new(Bell::default());
    let activity = Arc::new(Activity::default());
    let (conn, shutdown_at) = fake_conn();
    let watched = tokio::spawn(Watched::new(conn, &bell, None, Arc::clone(&activity)));
    bell.ring();
    let rung = Instant::now();
    for _ in 0..40 {
        tokio::time::sleep(DRAIN_CHECK).await;
        activity.count_read();
        activity.count_head();
    }
    assert_eq!(
        *shutdown_at.lock().unwrap(),
        None,
        "cut while requests came"
    );
    assert_eq!(watched.await.unwrap(), Ended::Served("shut down"));
    let took = shutdown_at.lock().unwrap().unwrap() - rung;
    assert!(took >= 40 * DRAIN_CHECK + DRAIN_LINGER, "{took:?}");
}

#[test]
fn a_watched_connection_is_timed_out_when_a_sweep_finds_its_deadline_due_and_it_still_is() {
    struct Wakes(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let timeout = Duration::from_secs(30);
    let bell = Arc::new(Bell::default());
    let activity = Arc::new(Activity::default());
    let t0 = std::time::Instant::now();
    let deadline = HeaderDeadline::new(Arc::clone(&activity), timeout, t0);
    let (conn, _) = fake_conn();
    let mut watched = Box::pin(Watched::new(conn, &bell, Some(deadline), activity));
    let wakes = Arc::new(Wakes(std::sync::atomic::AtomicUsize::new(0)));
    let waker = std::task::Waker::from(Arc::clone(&wakes));
    let mut cx = Context::from_waker(&waker);
    assert!(watched.as_mut().poll(&mut cx).is_pending());
    bell.sweep(t0 + Duration::from_secs(29));
    assert_eq!(wakes.0.load(Ordering::Relaxed), 0);
    bell.sweep(t0 + timeout);
    assert_eq!(
        wakes.0.load(Ordering::Relaxed),
        1,
        "not woken at its deadline"
    );
    assert_eq!(watched.as_mut().poll(&mut cx), Poll::Ready(Ended::TimedOut));
}

#[tokio::test]
async fn observed_counts_reads_that_return_data() {
    use tokio::io::AsyncWriteExt as _;
    let activity = Arc::new(Activity::default());
    let (mut client, server) = tokio::io::duplex(64);
    let mut observed = Box::pin(Observed::new(server, Arc::clone(&activity)));
    let mut buf = [0u8; 64];
    client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let n = observed.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n");
    for _ in 0..3 {
        client.write_all(b"more").await.unwrap();
        observed.read_exact(&mut buf[..4]).await.unwrap();
    }
    assert_eq!(activity.sample().reads, 4);
    drop(client);
    assert_eq!(observed.read(&mut buf).await.unwrap(), 0);
    assert_eq!(activity.sample().reads, 4);
}

#[tokio::test]
async fn a_periodic_kernel_timer_ticks_every_period() {
    let ticks = crate::ticker::Periodic::new(Duration::from_millis(20)).unwrap();
    let start = std::time::Instant::now();
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(5), ticks.tick())
            .await
            .expect("no tick in 5 s")
            .unwrap();
    }
    assert!(
        start.elapsed() >= Duration::from_millis(60),
        "{:?}",
        start.elapsed()
    );
}
