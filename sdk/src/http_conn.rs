//! One HTTP connection as the drain sees it: which protocol it speaks, what its client did
//! lately, and so when a draining worker shuts it down.
//!
//! Every protocol closes its own way:
//!
//! - **HTTP/2** has a safe close: hyper/h2's graceful shutdown sends GOAWAY (in two steps, so
//!   streams the client opened meanwhile are still served), in-flight streams finish, and the
//!   client opens new streams on a new connection, which reaches the new generation. A draining
//!   worker starts it at once: a busy HTTP/2 client is never quiet, so waiting for quiet would
//!   hold the old worker until it is killed with streams in flight.
//! - **HTTP/1** has none: a client may send its next request on a kept-alive connection just as
//!   the server closes it, and hyper's graceful shutdown closes a connection that has not
//!   finished receiving a request head yet (hyper#2730). So responses of a draining worker carry
//!   `Connection: close` (hyper then closes after them), and a connection that receives no new
//!   request is shut down only once its client has been quiet on it for [`DRAIN_LINGER`]
//!   ([`Linger`]). A client that keeps sending bytes without ever completing a request head (a
//!   slow-loris trickle) gets the same [`DRAIN_LINGER`] from its first such byte, not forever.
//!
//! The protocol is told from the connection's first bytes ([`Sniff`], the same test hyper-util's
//! auto builder makes to pick its codec), inside the stream wrapper ([`Observed`]) the
//! connection reads through. After those first bytes the wrapper costs one branch on a local
//! enum per read, plus, for HTTP/1 only, one relaxed increment.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How long a draining worker leaves an HTTP/1 connection alone before shutting it down: it
/// waits until the client has been quiet on it this long, counted from the start of the drain
/// at the earliest.
///
/// Closing an idle HTTP/1 keep-alive connection races with a client that sends its next
/// request at that moment: it gets EOF instead of an answer. Until this much quiet has passed,
/// a request arriving on the connection is served (its response carries `Connection: close`,
/// after which hyper closes the connection itself), so only a client that stayed silent on a
/// kept-alive connection for this long can still meet the race. It also covers connections
/// accepted just before the drain that have not sent their first request yet, which hyper's
/// graceful shutdown would close at once (hyper#2730). Measured: a fixed 200 ms linger
/// followed by a graceful shutdown of every connection lost a request now and then when a
/// client thread was descheduled for longer than that.
///
/// A client that keeps sending without completing a request head is shut down this long after
/// the first such byte (seen after the drain started). HTTP/2 connections are not lingered
/// over at all: they get GOAWAY as soon as the drain starts.
pub const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// How often a lingering connection looks at its client's activity.
const DRAIN_CHECK: Duration = Duration::from_millis(50);

/// What a client sends first on an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Protocol {
    /// Not enough bytes seen yet.
    Unknown = 0,
    Http1 = 1,
    Http2 = 2,
}

impl Protocol {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Http1,
            2 => Self::Http2,
            _ => Self::Unknown,
        }
    }
}

/// Tells HTTP/2 (prior knowledge) from HTTP/1 by a connection's first bytes: HTTP/2 iff they
/// are the 24-byte client preface. Decides at the first byte that differs from the preface, or
/// once all of it arrived, however the bytes are split over reads.
#[derive(Debug, Default)]
pub(crate) struct Sniff {
    matched: usize,
}

impl Sniff {
    /// Feeds the next bytes read; returns the protocol once it is known.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Option<Protocol> {
        let rest = &H2_PREFACE[self.matched..];
        let n = rest.len().min(bytes.len());
        if bytes[..n] != rest[..n] {
            return Some(Protocol::Http1);
        }
        self.matched += n;
        (self.matched == H2_PREFACE.len()).then_some(Protocol::Http2)
    }
}

/// What one connection's client did, shared between the stream wrapper (inside hyper), the
/// connection's service and its drain.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    protocol: AtomicU8,
    /// Reads that returned data (HTTP/1 and not yet identified connections only).
    reads: AtomicU64,
    /// Requests whose head arrived.
    heads: AtomicU64,
}

/// A reading of [`Activity`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Sample {
    pub(crate) reads: u64,
    pub(crate) heads: u64,
}

impl Activity {
    pub(crate) fn protocol(&self) -> Protocol {
        Protocol::from_u8(self.protocol.load(Ordering::Relaxed))
    }

    fn set_protocol(&self, protocol: Protocol) {
        self.protocol.store(protocol as u8, Ordering::Relaxed);
    }

    fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Called by the connection's service for every request: its head has arrived.
    pub(crate) fn count_head(&self) {
        self.heads.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn sample(&self) -> Sample {
        Sample {
            reads: self.reads.load(Ordering::Relaxed),
            heads: self.heads.load(Ordering::Relaxed),
        }
    }
}

/// Decides when a draining HTTP/1 connection (or one whose protocol is not known yet) gets its
/// graceful shutdown, from samples of its [`Activity`]: once its client has been quiet for
/// [`DRAIN_LINGER`] (from the start of the drain at the earliest), or once it has been sending
/// for [`DRAIN_LINGER`] without a new request head arriving.
///
/// The second rule cuts a client that trickles a request head; it also fires for a request
/// body still being uploaded, which is harmless: hyper's graceful shutdown of an HTTP/1
/// connection with a request in progress lets that request and its response finish.
#[derive(Debug)]
pub(crate) struct Linger {
    seen: Sample,
    quiet_since: Instant,
    /// Since when bytes have been arriving with no new request head among them.
    headless_since: Option<Instant>,
}

impl Linger {
    /// Starts lingering at `now` (the start of the drain).
    pub(crate) fn new(now: Instant, sample: Sample) -> Self {
        Self {
            seen: sample,
            quiet_since: now,
            headless_since: None,
        }
    }

    /// Takes a new sample; true once the connection should be shut down.
    pub(crate) fn observe(&mut self, now: Instant, sample: Sample) -> bool {
        if sample.heads != self.seen.heads {
            self.headless_since = None;
        } else if sample.reads != self.seen.reads && self.headless_since.is_none() {
            self.headless_since = Some(now);
        }
        if sample.reads != self.seen.reads {
            self.quiet_since = now;
        }
        self.seen = sample;
        now.duration_since(self.quiet_since) >= DRAIN_LINGER
            || self
                .headless_since
                .is_some_and(|since| now.duration_since(since) >= DRAIN_LINGER)
    }
}

/// Completes when a draining connection should get its graceful shutdown: at once for HTTP/2;
/// for HTTP/1, and for a connection whose protocol is not known yet, when [`Linger`] says so
/// (a connection that turns out to be HTTP/2 meanwhile is shut down at once).
pub(crate) async fn shutdown_time(activity: &Activity) {
    let mut linger = Linger::new(Instant::now(), activity.sample());
    loop {
        if activity.protocol() == Protocol::Http2 {
            return;
        }
        tokio::time::sleep(DRAIN_CHECK).await;
        if linger.observe(Instant::now(), activity.sample()) {
            return;
        }
    }
}

/// Completes if the connection's protocol is still unknown `timeout` after this is first
/// polled (at accept), i.e. its client sent no request, or not even its first bytes, in that
/// time; otherwise, and for `None`, never (without keeping a timer).
///
/// hyper's header read timeout only starts once hyper-util's auto builder has seen enough
/// bytes to pick HTTP/1; until then it waits for them forever, so a client that connects and
/// says nothing (or trickles the HTTP/2 preface) would hold its connection for good.
pub(crate) async fn no_first_bytes_within(activity: &Activity, timeout: Option<Duration>) {
    if let Some(timeout) = timeout {
        tokio::time::sleep(timeout).await;
        if activity.protocol() == Protocol::Unknown {
            return;
        }
    }
    std::future::pending().await
}

pin_project_lite::pin_project! {
    /// The stream a connection is served on: tells the protocol from the first bytes and, for
    /// HTTP/1, counts the reads that returned data, into the connection's [`Activity`].
    pub(crate) struct Observed<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        // Known locally too, so a read after detection touches no shared state for HTTP/2.
        protocol: Protocol,
        sniff: Sniff,
    }
}

impl<T> Observed<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            protocol: Protocol::Unknown,
            sniff: Sniff::default(),
        }
    }
}

impl<T: AsyncRead> AsyncRead for Observed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.inner.poll_read(cx, buf);
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            match *this.protocol {
                Protocol::Http2 => {}
                Protocol::Http1 => this.activity.count_read(),
                Protocol::Unknown => {
                    this.activity.count_read();
                    if let Some(protocol) = this.sniff.feed(new) {
                        *this.protocol = protocol;
                        this.activity.set_protocol(protocol);
                    }
                }
            }
        }
        result
    }
}

impl<T: AsyncWrite> AsyncWrite for Observed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[test]
    fn sniff_knows_the_preface_however_it_is_split() {
        let mut whole = Sniff::default();
        assert_eq!(whole.feed(H2_PREFACE), Some(Protocol::Http2));

        let mut bytewise = Sniff::default();
        for (i, b) in H2_PREFACE.iter().enumerate() {
            let expected = (i == H2_PREFACE.len() - 1).then_some(Protocol::Http2);
            assert_eq!(bytewise.feed(&[*b]), expected, "byte {i}");
        }

        // Frames that follow the preface in the same read do not matter.
        let mut with_frames = Sniff::default();
        assert_eq!(with_frames.feed(&H2_PREFACE[..10]), None);
        let mut rest = H2_PREFACE[10..].to_vec();
        rest.extend_from_slice(b"\0\0\x12\x04\0\0\0\0\0");
        assert_eq!(with_frames.feed(&rest), Some(Protocol::Http2));
    }

    #[test]
    fn sniff_decides_http1_at_the_first_differing_byte() {
        assert_eq!(
            Sniff::default().feed(b"GET / HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        // `P` as in `POST` / `PUT` matches the preface's first byte only.
        let mut post = Sniff::default();
        assert_eq!(post.feed(b"P"), None);
        assert_eq!(post.feed(b"O"), Some(Protocol::Http1));
        let mut pri = Sniff::default();
        assert_eq!(pri.feed(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
    }

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn sample(reads: u64, heads: u64) -> Sample {
        Sample { reads, heads }
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

    #[tokio::test(start_paused = true)]
    async fn shutdown_time_is_immediate_for_http2_and_a_linger_for_a_quiet_http1() {
        let h2 = Activity::default();
        h2.set_protocol(Protocol::Http2);
        let start = Instant::now();
        shutdown_time(&h2).await;
        assert_eq!(start.elapsed(), Duration::ZERO);

        let h1 = Activity::default();
        h1.set_protocol(Protocol::Http1);
        let start = Instant::now();
        shutdown_time(&h1).await;
        let took = start.elapsed();
        assert!(
            (DRAIN_LINGER..DRAIN_LINGER + DRAIN_CHECK).contains(&took),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_time_of_an_unknown_connection_ends_once_it_turns_out_http2() {
        let activity = Arc::new(Activity::default());
        let (client, server) = tokio::io::duplex(64);
        let mut observed = Box::pin(Observed::new(server, Arc::clone(&activity)));
        let start = Instant::now();
        let feeder = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut client = client;
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.write_all(H2_PREFACE).await.unwrap();
            client
        });
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 24];
            observed.read_exact(&mut buf).await.unwrap();
        });
        shutdown_time(&activity).await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < DRAIN_LINGER,
            "{took:?}"
        );
        assert_eq!(activity.protocol(), Protocol::Http2);
        reader.await.unwrap();
        drop(feeder.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_first_bytes_times_out_one_with_them_never() {
        let timeout = Some(Duration::from_millis(500));
        let silent = Activity::default();
        let start = Instant::now();
        no_first_bytes_within(&silent, timeout).await;
        assert_eq!(start.elapsed(), Duration::from_millis(500));

        for protocol in [Protocol::Http1, Protocol::Http2] {
            let talked = Activity::default();
            talked.set_protocol(protocol);
            let waited = tokio::time::timeout(
                Duration::from_secs(3600),
                no_first_bytes_within(&talked, timeout),
            );
            assert!(waited.await.is_err(), "{protocol:?}");
        }
        let off = tokio::time::timeout(
            Duration::from_secs(3600),
            no_first_bytes_within(&silent, None),
        );
        assert!(off.await.is_err());
    }

    #[tokio::test]
    async fn observed_counts_http1_reads_and_stops_counting_for_http2() {
        use tokio::io::AsyncWriteExt as _;
        for (first, protocol) in [
            (&b"GET / HTTP/1.1\r\n"[..], Protocol::Http1),
            (&H2_PREFACE[..], Protocol::Http2),
        ] {
            let activity = Arc::new(Activity::default());
            let (mut client, server) = tokio::io::duplex(64);
            let mut observed = Box::pin(Observed::new(server, Arc::clone(&activity)));
            let mut buf = [0u8; 64];
            client.write_all(first).await.unwrap();
            let n = observed.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], first);
            assert_eq!(activity.protocol(), protocol);
            assert_eq!(activity.sample().reads, 1);
            for _ in 0..3 {
                client.write_all(b"more").await.unwrap();
                observed.read_exact(&mut buf[..4]).await.unwrap();
            }
            let expected = if protocol == Protocol::Http1 { 4 } else { 1 };
            assert_eq!(activity.sample().reads, expected, "{protocol:?}");
        }
    }
}
