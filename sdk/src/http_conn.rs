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
//! The protocol is told once per connection from its first bytes ([`sniff`]: a `MSG_PEEK`, the
//! same test hyper-util's auto builder makes to pick its codec, without reading them), and the
//! connection then goes to hyper's `http1` or `http2` connection directly. An HTTP/1 connection
//! reads through [`Observed`], which costs one relaxed increment per read; an HTTP/2 connection
//! reads from the socket itself.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::header_deadline::HeaderDeadline;
use crate::watch::{Bell, Due, Registration};

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

/// How long [`sniff`] waits before it peeks again when the bytes so far are a proper prefix of
/// the HTTP/2 preface (a client that split its first write, e.g. after the `P` of `POST`): the
/// peeked bytes stay in the socket, so readiness cannot tell when more arrive. Rare, and short
/// against any network round trip.
const SNIFF_RETRY: Duration = Duration::from_millis(1);

/// What a client sends first on an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

/// Tells HTTP/2 (prior knowledge) from HTTP/1 by a connection's first bytes: HTTP/2 iff they
/// are the 24-byte client preface. `None` while the bytes so far are a proper prefix of it.
pub(crate) fn classify(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Waits for a connection's first bytes and tells its protocol from them without consuming
/// them (`MSG_PEEK`); `None` if the client closed without sending anything. Decides at the
/// first byte that differs from the HTTP/2 preface (`G` of `GET` is the first), or once all of
/// it arrived, however the client split it. Unbounded: the caller applies the timeouts.
pub(crate) async fn sniff(stream: &crate::net::Stream) -> io::Result<Option<Protocol>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(protocol) = classify(&buf[..n]) {
            return Ok(Some(protocol));
        }
        tokio::time::sleep(SNIFF_RETRY).await;
    }
}

/// What one connection's client did, shared between the stream wrapper (inside hyper), the
/// connection's service and its drain.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Reads that returned data.
    reads: AtomicU64,
    /// Requests whose head arrived.
    heads: AtomicU64,
    /// Responses hyper is done with: their body was dropped (sent whole, or given up).
    ends: AtomicU64,
    /// Writes that took bytes.
    writes: AtomicU64,
    /// The worker's drain (`None` in tests), for the responses' `Connection: close`: held
    /// here, once per connection, so a request costs no handle of its own.
    drain: Option<crate::Drain>,
}

/// A reading of [`Activity`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Sample {
    pub(crate) reads: u64,
    pub(crate) heads: u64,
    pub(crate) ends: u64,
    pub(crate) writes: u64,
}

impl Sample {
    /// No request is being handled or answered: the connection waits for its next request
    /// head (or hyper still flushes the tail of the last response, which `writes` shows).
    pub(crate) fn idle(&self) -> bool {
        self.heads == self.ends
    }
}

impl Activity {
    /// The activity of a connection of a worker with this drain.
    pub(crate) fn new(drain: crate::Drain) -> Self {
        Self {
            drain: Some(drain),
            ..Self::default()
        }
    }

    /// Whether the worker drains.
    pub(crate) fn is_draining(&self) -> bool {
        self.drain.as_ref().is_some_and(crate::Drain::is_draining)
    }

    pub(crate) fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Called by the connection's service for every request: its head has arrived.
    pub(crate) fn count_head(&self) {
        self.heads.fetch_add(1, Ordering::Relaxed);
    }

    /// Called when hyper drops a response's body ([`Tracked`]).
    pub(crate) fn count_end(&self) {
        self.ends.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn sample(&self) -> Sample {
        Sample {
            reads: self.reads.load(Ordering::Relaxed),
            heads: self.heads.load(Ordering::Relaxed),
            ends: self.ends.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
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

/// A connection whose graceful shutdown can be started: hyper's HTTP/1 connection.
pub(crate) trait Graceful: Future {
    /// Starts the graceful shutdown; the connection is polled on until it completes.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

/// How a [`Watched`] connection ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended<T> {
    /// The connection completed (closed, failed, shut down or upgraded), with its result.
    Served(T),
    /// Its header read timeout passed: drop it, which closes it (no request is in it).
    TimedOut,
}

pin_project_lite::pin_project! {
    /// An HTTP/1 connection and what its task watches beside it, polled as one future: the
    /// drain's bell (then, while draining, its [`Linger`] and then its graceful shutdown) and
    /// its header read deadline. One waker registration and two atomic loads per poll besides
    /// the connection's own (see [`crate::watch`]).
    pub(crate) struct Watched<C> {
        #[pin]
        conn: C,
        registration: Registration,
        deadline: Option<Arc<HeaderDeadline>>,
        activity: Arc<Activity>,
        phase: Phase,
    }
}

enum Phase {
    Serving,
    /// Draining: looks at the connection's activity every [`DRAIN_CHECK`] until [`Linger`]
    /// says it is its time to close.
    Lingering {
        linger: Linger,
        check: Pin<Box<tokio::time::Sleep>>,
    },
    /// The graceful shutdown started: only the connection is polled, until it completes.
    Closing,
}

impl<C> Watched<C> {
    /// Watches `conn`, whose client's activity is `activity`, for `bell` and, if it has one,
    /// its header read `deadline`.
    pub(crate) fn new(
        conn: C,
        bell: &Arc<Bell>,
        deadline: Option<Arc<HeaderDeadline>>,
        activity: Arc<Activity>,
    ) -> Self {
        let due = deadline.clone().map(|d| d as Arc<dyn Due>);
        Self {
            conn,
            registration: bell.register(due),
            deadline,
            activity,
            phase: Phase::Serving,
        }
    }
}

impl<C: Graceful> Future for Watched<C> {
    type Output = Ended<C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The connection first, so a head that arrived meanwhile is read before the deadline
        // is asked.
        if let Poll::Ready(out) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(Ended::Served(out));
        }
        if matches!(this.phase, Phase::Closing) {
            return Poll::Pending;
        }
        // Registered before looking: a ring or a verdict after the look wakes this task.
        this.registration.poll_register(cx);
        if this.deadline.as_ref().is_some_and(|d| d.poll_due()) {
            return Poll::Ready(Ended::TimedOut);
        }
        loop {
            match this.phase {
                Phase::Serving => {
                    if !this.registration.bell().is_rung() {
                        return Poll::Pending;
                    }
                    *this.phase = Phase::Lingering {
                        linger: Linger::new(Instant::now(), this.activity.sample()),
                        check: Box::pin(tokio::time::sleep(DRAIN_CHECK)),
                    };
                }
                Phase::Lingering { linger, check } => {
                    if check.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let now = Instant::now();
                    if linger.observe(now, this.activity.sample()) {
                        *this.phase = Phase::Closing;
                        this.conn.as_mut().graceful_shutdown();
                        return this.conn.poll(cx).map(Ended::Served);
                    }
                    check.as_mut().reset(now + DRAIN_CHECK);
                }
                Phase::Closing => return Poll::Pending,
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The stream an HTTP/1 connection is served on: counts the reads that returned data and
    /// the writes that took some into the connection's [`Activity`].
    pub(crate) struct Observed<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
    }
}

impl<T> Observed<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
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
        if buf.filled().len() != before {
            this.activity.count_read();
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
        let this = self.project();
        let result = this.inner.poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.count_write();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let result = this.inner.poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.count_write();
        }
        result
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

pin_project_lite::pin_project! {
    /// A response body on an HTTP/1 connection: counts its end into the connection's
    /// [`Activity`] when hyper drops it, i.e. once it has taken all of it (or gave up on it).
    /// Until then the connection is busy, however long the body takes: a stream of server-sent
    /// events is never mistaken for a connection waiting for its next request head.
    pub(crate) struct Tracked<B> {
        #[pin]
        inner: B,
        end: EndGuard,
    }
}

impl<B> Tracked<B> {
    /// `activity` is `None` on HTTP/2 connections, whose streams are not counted.
    pub(crate) fn new(inner: B, activity: Option<Arc<Activity>>) -> Self {
        Self {
            inner,
            end: EndGuard(activity),
        }
    }
}

/// Counts a response's end when its body is dropped.
struct EndGuard(Option<Arc<Activity>>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        if let Some(activity) = &self.0 {
            activity.count_end();
        }
    }
}

impl<B: hyper::body::Body> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[path = "http_conn_tests.rs"]
mod tests;
