//! HTTP/1 and HTTP/2 serving on hyper 1 + hyper-util, with the drain that loses nothing (see
//! [`crate::http_conn`] for how each protocol's connections are closed).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION};
use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::header_deadline::HeaderDeadline;
use crate::host::Shared;
use crate::http_conn::{self, Activity, Ended, Graceful, Observed, Protocol, Tracked, Watched};
use crate::net::Stream;
use crate::watch::Bell;
use crate::{BoxError, Worker};

/// Environment variable: how long an HTTP/1 client may take to send a request head (from the
/// moment the connection is ready for it: accepted, or done with its previous response, so
/// this also bounds how long an idle keep-alive connection stays open). A duration such as
/// `500ms`, `30s` or `2m` (a bare number is seconds); `0` turns the timeout off. Unset:
/// [`DEFAULT_HEADER_READ_TIMEOUT`]. An invalid value is logged once and the default used.
/// [`Worker::set_header_read_timeout`] overrides it.
pub const HEADER_READ_TIMEOUT_ENV: &str = "ANGEL_HEADER_READ_TIMEOUT";

/// How long an HTTP/1 client may take to send a request head unless configured otherwise
/// (hyper's own default): long enough for any real client on a slow link, short enough that
/// clients trickling bytes cannot hold connections, or a draining worker, for long.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The header read timeout [`HEADER_READ_TIMEOUT_ENV`] asks for (`None` = off); after one
/// warning line, the default if the variable is not a valid duration.
pub(crate) fn header_read_timeout_from_env() -> Option<Duration> {
    let value = std::env::var_os(HEADER_READ_TIMEOUT_ENV);
    let value = value.as_ref().map(|v| v.to_str().ok_or(v));
    match header_read_timeout_from(value) {
        Ok(timeout) => timeout,
        Err(why) => {
            crate::warn!(
                "{HEADER_READ_TIMEOUT_ENV}: {why}; using the default {}s",
                DEFAULT_HEADER_READ_TIMEOUT.as_secs()
            );
            Some(DEFAULT_HEADER_READ_TIMEOUT)
        }
    }
}

/// [`header_read_timeout_from_env`] for a given value of the variable (unset, valid UTF-8 or not).
fn header_read_timeout_from(
    value: Option<Result<&str, &std::ffi::OsString>>,
) -> Result<Option<Duration>, String> {
    match value {
        None => Ok(Some(DEFAULT_HEADER_READ_TIMEOUT)),
        Some(Err(raw)) => Err(format!("{raw:?} is not a duration (e.g. 500ms, 30s, 2m)")),
        Some(Ok(s)) => match crate::duration::parse(s)? {
            Duration::ZERO => Ok(None),
            d => Ok(Some(d)),
        },
    }
}

impl Worker {
    /// Serves HTTP/1 and HTTP/2 (with upgrades) with `handler` on every listener until drained.
    ///
    /// `handler` is called for every request; it is cloned per connection. Steps:
    ///
    /// 1. build a listener from each of the host's fds and spawn an accept loop for each, then
    ///    report [ready](Worker::ready);
    /// 2. when the host asks to drain: stop accepting (drop the listeners) and shut every
    ///    connection down gracefully, in-flight requests finishing: HTTP/2 connections at
    ///    once (GOAWAY; the client opens new streams elsewhere); HTTP/1 connections get
    ///    `Connection: close` on every response from then on and are shut down once their
    ///    client has been quiet for [`DRAIN_LINGER`](crate::DRAIN_LINGER) (or has trickled
    ///    bytes that long without a request head); return `Ok(())` once all have closed.
    ///
    /// HTTP/1 request heads must arrive within the
    /// [header read timeout](Worker::set_header_read_timeout), counted from the connection's
    /// last response (or its first bytes), or the connection is closed; so must the first bytes
    /// of a new connection (of either protocol). A request being handled or a response body
    /// being sent is never timed out.
    ///
    /// Every request counts toward `max_requests`; reaching it sends `EVENT_RETIRING` once.
    ///
    /// Tasks the app spawns itself (e.g. to serve an upgraded websocket connection) are not
    /// waited for: they are cancelled when the app's main returns. Have them watch
    /// [`crate::drain()`] and finish while a response body still keeps the connection open, or
    /// await them in your own main.
    pub async fn serve_http<H, Fut, B, E>(self, handler: H) -> io::Result<()>
    where
        H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
        E: Into<BoxError>,
    {
        self.serve_http_service(FnService(handler)).await
    }

    /// [`Worker::serve_http`] for a hyper [`Service`] (e.g. one adapted from tower), cloned per
    /// connection.
    pub async fn serve_http_service<S, B>(self, service: S) -> io::Result<()>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let listeners = self.listen()?;
        let drain = self.drain();
        let header_read_timeout = self.header_read_timeout();
        let protocols = Arc::new(Protocols::new(header_read_timeout));
        // Rung when the worker drains; sweeps the connections' header read deadlines on a
        // kernel timer.
        let bell = Arc::new(Bell::default());
        let _sweep = header_read_timeout.map(|t| {
            AbortOnDrop(tokio::spawn(
                Arc::clone(&bell).sweep_every(crate::ticker::sweep_period(t)),
            ))
        });
        let mut connections = JoinSet::new();
        let (tx, mut accepted) = mpsc::channel(crate::accept::ACCEPT_QUEUE);
        crate::accept::spawn_accept_loops(listeners, &drain, tx);
        self.ready();

        // Ends once every accept loop stopped, i.e. once draining.
        loop {
            tokio::select! {
                stream = accepted.recv() => {
                    let Some(stream) = stream else { break };
                    connections.spawn(serve_connection(
                        stream,
                        service.clone(),
                        Arc::clone(&self.shared),
                        Arc::clone(&protocols),
                        Arc::clone(&bell),
                    ));
                }
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drain.drained().await;
        bell.ring();
        crate::debug!(
            "draining: stopped accepting, {} connections open",
            connections.len()
        );
        while connections.join_next().await.is_some() {}
        Ok(())
    }
}

/// The two connection builders, configured once per `serve_http` and shared by its
/// connections.
///
/// Each connection is sniffed once ([`http_conn::sniff`]: a `MSG_PEEK` of its first bytes, the
/// test hyper-util's auto builder makes) and then handed to hyper's own `http1` or `http2`
/// connection directly. Measured (the issue "Per-request cost at the limit"): a plain hyper
/// server with hyper-util's `auto::Builder` spent 6.24 µs of CPU per keep-alive HTTP/1 request,
/// one with hyper's `http1` connection 5.71 µs; after the sniff, this path costs nothing per
/// request or read for telling the protocols apart (BENCHMARKS.md, "Per-request cost").
struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    header_read_timeout: Option<Duration>,
}

/// Aborts a task when dropped (the deadline sweep ends with its `serve_http`).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Protocols {
    fn new(header_read_timeout: Option<Duration>) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // The SDK keeps the header read timeout itself (`HeaderDeadline`): hyper's would cost
        // every keep-alive request a pass of its dispatcher. Without a timer hyper keeps none,
        // but says so explicitly.
        http1.header_read_timeout(None);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        Self {
            http1,
            http2,
            header_read_timeout,
        }
    }
}

/// Serves one accepted connection until it closes, shutting it down the way its protocol
/// closes safely once the worker drains (see [`crate::http_conn`]).
async fn serve_connection<S, B>(
    stream: Stream,
    service: S,
    shared: Arc<Shared>,
    protocols: Arc<Protocols>,
    bell: Arc<Bell>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // The first bytes, within the header read timeout (the connection's own deadline only
    // starts once hyper serves it) and, once draining, within one linger: a client that
    // connected but says nothing must not hold the connection, or a draining worker.
    let sniffed = tokio::select! {
        biased;
        sniffed = http_conn::sniff(&stream) => sniffed,
        () = sleep_for(protocols.header_read_timeout) => return,
        () = async {
            bell.wait().await;
            tokio::time::sleep(http_conn::DRAIN_LINGER).await;
        } => return,
    };
    let result = match sniffed {
        Ok(Some(Protocol::Http2)) => {
            let service = AngelService {
                inner: service,
                shared,
                activity: None,
            };
            let conn = protocols
                .http2
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                biased;
                result = conn.as_mut() => result,
                // GOAWAY at once: in-flight streams finish, new ones go elsewhere.
                () = bell.wait() => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            }
        }
        Ok(Some(_)) => {
            let activity = Arc::new(Activity::new(shared.drain.clone()));
            let deadline = protocols.header_read_timeout.map(|timeout| {
                HeaderDeadline::new(
                    Arc::clone(&activity),
                    timeout,
                    tokio::time::Instant::now().into_std(),
                )
            });
            let service = AngelService {
                inner: service,
                shared,
                activity: Some(Arc::clone(&activity)),
            };
            let io = TokioIo::new(Observed::new(stream, Arc::clone(&activity)));
            let conn = protocols
                .http1
                .serve_connection(io, service)
                .with_upgrades();
            // Until the drain, then lingering until it is this connection's time to close,
            // then shut down gracefully. A connection whose header read timeout passed is
            // dropped, which closes it, as hyper's own timeout does: it waits for a head then,
            // so no request is in it.
            match Watched::new(conn, &bell, deadline, activity).await {
                Ended::Served(result) => result,
                Ended::TimedOut => return,
            }
        }
        // Closed before sending anything.
        Ok(None) => return,
        Err(e) => {
            crate::debug!("connection failed before its first request: {e}");
            return;
        }
    };
    if let Err(e) = result {
        crate::debug!("connection closed with error: {e}");
    }
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// Sleeps for `timeout`; never completes for `None`.
async fn sleep_for(timeout: Option<Duration>) {
    match timeout {
        Some(timeout) => tokio::time::sleep(timeout).await,
        None => std::future::pending().await,
    }
}

/// A handler function as a hyper service.
#[derive(Clone)]
struct FnService<H>(H);

impl<H, ReqBody, Fut, B, E> Service<Request<ReqBody>> for FnService<H>
where
    H: Fn(Request<ReqBody>) -> Fut,
    Fut: Future<Output = Result<Response<B>, E>>,
{
    type Response = Response<B>;
    type Error = E;
    type Future = Fut;

    fn call(&self, req: Request<ReqBody>) -> Fut {
        (self.0)(req)
    }
}

/// Wraps the app's service: counts requests (for `max_requests`, and as request heads in the
/// connection's [`Activity`]), and once draining marks HTTP/1 responses `Connection: close` so
/// clients stop reusing connections of a worker that is going away. One per connection.
#[derive(Clone)]
struct AngelService<S> {
    inner: S,
    shared: Arc<Shared>,
    /// `Some` on HTTP/1 connections (the drain's linger watches their request heads).
    activity: Option<Arc<Activity>>,
}

impl<S, ReqBody, B> Service<Request<ReqBody>> for AngelService<S>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
{
    type Response = Response<Tracked<B>>;
    type Error = S::Error;
    type Future = CloseOnDrain<S::Future>;

    fn call(&self, req: Request<ReqBody>) -> Self::Future {
        self.shared.count_request();
        if let Some(activity) = &self.activity {
            activity.count_head();
        }
        // HTTP/2 has its own way to say goodbye (GOAWAY at graceful shutdown), and
        // `Connection` is a forbidden header there.
        let http1 = req.version() <= Version::HTTP_11;
        CloseOnDrain {
            inner: self.inner.call(req),
            http1,
            activity: self.activity.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`AngelService`].
    struct CloseOnDrain<F> {
        #[pin]
        inner: F,
        http1: bool,
        // The connection's, on HTTP/1 connections: the response's body counts its end there,
        // and it knows whether the worker drains.
        activity: Option<Arc<Activity>>,
    }
}

impl<F, B, E> Future for CloseOnDrain<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Tracked<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.inner.poll(cx) {
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        // Checked when the response is ready, so requests in flight when the drain starts get
        // the header too. A protocol switch (101) keeps its `Connection: upgrade`.
        if *this.http1
            && this.activity.as_ref().is_some_and(|a| a.is_draining())
            && response.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let activity = this.activity.take();
        Poll::Ready(Ok(response.map(|body| Tracked::new(body, activity))))
    }
}

/// The `main` that `export_http!(init = ..., handler)` generates, after `init` succeeded.
#[doc(hidden)]
pub async fn serve_with_state<S, H, Fut, B, E>(
    worker: Worker,
    state: S,
    handler: H,
) -> Result<(), BoxError>
where
    S: Clone + Send + Sync + 'static,
    H: Fn(Request<Incoming>, S) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    worker
        .serve_http(move |req| handler(req, state.clone()))
        .await
        .map_err(Into::into)
}

/// The `main` that `export_http!(handler)` generates.
#[doc(hidden)]
pub async fn serve<H, Fut, B, E>(worker: Worker, handler: H) -> Result<(), BoxError>
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    worker.serve_http(handler).await.map_err(Into::into)
}

#[cfg(test)]
#[path = "http_serve_tests.rs"]
mod tests;
