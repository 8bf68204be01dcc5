//! HTTP/1 and HTTP/2 serving on hyper 1 + hyper-util, with the drain that loses nothing.

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
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::host::Shared;
use crate::{BoxError, Worker};

/// How long a draining worker leaves a connection alone before closing it, counted from the
/// start of the drain and from the last bytes the client sent, whichever is later.
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
pub const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// How often a draining connection checks whether it has been quiet for [`DRAIN_LINGER`].
const DRAIN_CHECK: Duration = Duration::from_millis(50);

impl Worker {
    /// Serves HTTP/1 and HTTP/2 (with upgrades) with `handler` on every listener until drained.
    ///
    /// `handler` is called for every request; it is cloned per connection. Steps:
    ///
    /// 1. build a listener from each of the host's fds and spawn an accept loop for each, then
    ///    report [ready](Worker::ready);
    /// 2. when the host asks to drain: stop accepting (drop the listeners), add
    ///    `Connection: close` to every HTTP/1 response from then on, and shut each connection
    ///    down gracefully (HTTP/2 gets GOAWAY; in-flight requests finish) once the client has
    ///    been quiet on it for [`DRAIN_LINGER`]; return `Ok(())` once all have closed.
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
        let service = AngelService {
            inner: service,
            shared: Arc::clone(&self.shared),
        };
        let builder = auto::Builder::new(TokioExecutor::new());
        let mut connections = JoinSet::new();
        let (tx, mut accepted) = mpsc::channel(crate::net::ACCEPT_QUEUE);
        crate::net::spawn_accept_loops(listeners, &drain, tx);
        self.ready();

        // Ends once every accept loop stopped, i.e. once draining.
        loop {
            tokio::select! {
                stream = accepted.recv() => {
                    let Some(stream) = stream else { break };
                    let reads = Arc::new(AtomicU64::new(0));
                    let io = TokioIo::new(CountReads {
                        inner: stream,
                        reads: Arc::clone(&reads),
                    });
                    let conn = builder
                        .serve_connection_with_upgrades(io, service.clone())
                        .into_owned();
                    let drain = drain.clone();
                    connections.spawn(async move {
                        // Once the worker drains, shut the connection down gracefully as soon
                        // as its client has been quiet for DRAIN_LINGER.
                        tokio::pin!(conn);
                        let result = tokio::select! {
                            biased;
                            result = conn.as_mut() => result,
                            () = drain.drained() => {
                                let mut seen = reads.load(Ordering::Relaxed);
                                let mut quiet_since = tokio::time::Instant::now();
                                loop {
                                    tokio::select! {
                                        result = conn.as_mut() => break result,
                                        () = tokio::time::sleep(DRAIN_CHECK) => {
                                            let now = reads.load(Ordering::Relaxed);
                                            if now != seen {
                                                seen = now;
                                                quiet_since = tokio::time::Instant::now();
                                            } else if quiet_since.elapsed() >= DRAIN_LINGER {
                                                conn.as_mut().graceful_shutdown();
                                                break conn.as_mut().await;
                                            }
                                        }
                                    }
                                }
                            }
                        };
                        if let Err(e) = result {
                            crate::debug!("connection closed with error: {e}");
                        }
                    });
                }
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drain.drained().await;
        crate::debug!(
            "draining: stopped accepting, {} connections open",
            connections.len()
        );
        while connections.join_next().await.is_some() {}
        Ok(())
    }
}

pin_project_lite::pin_project! {
    /// A stream that counts the reads that returned data, so a draining connection can tell
    /// whether its client is still talking (one relaxed increment per read).
    struct CountReads<T> {
        #[pin]
        inner: T,
        reads: Arc<AtomicU64>,
    }
}

impl<T: AsyncRead> AsyncRead for CountReads<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.reads.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite> AsyncWrite for CountReads<T> {
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

/// Wraps the app's service: counts requests, and once draining marks HTTP/1 responses
/// `Connection: close` so clients stop reusing connections of a worker that is going away.
#[derive(Clone)]
struct AngelService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, ReqBody, B> Service<Request<ReqBody>> for AngelService<S>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = CloseOnDrain<S::Future>;

    fn call(&self, req: Request<ReqBody>) -> Self::Future {
        self.shared.count_request();
        // HTTP/2 has its own way to say goodbye (GOAWAY at graceful shutdown), and
        // `Connection` is a forbidden header there.
        let http1 = req.version() <= Version::HTTP_11;
        CloseOnDrain {
            inner: self.inner.call(req),
            shared: http1.then(|| Arc::clone(&self.shared)),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`AngelService`].
    struct CloseOnDrain<F> {
        #[pin]
        inner: F,
        // `Some` for HTTP/1 requests.
        shared: Option<Arc<Shared>>,
    }
}

impl<F, B, E> Future for CloseOnDrain<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.inner.poll(cx) {
            Poll::Ready(Ok(response)) => response,
            other => return other,
        };
        // Checked when the response is ready, so requests in flight when the drain starts get
        // the header too. A protocol switch (101) keeps its `Connection: upgrade`.
        if this.shared.as_ref().is_some_and(|s| s.drain.is_draining())
            && response.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response))
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
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::future::{ready, Ready};

    type Respond = fn(Request<()>) -> Ready<Result<Response<()>, Infallible>>;
    type TestService = AngelService<FnService<Respond>>;

    fn respond(req: Request<()>) -> Ready<Result<Response<()>, Infallible>> {
        let status = if req.uri().path() == "/upgrade" {
            StatusCode::SWITCHING_PROTOCOLS
        } else {
            StatusCode::OK
        };
        ready(Ok(Response::builder().status(status).body(()).unwrap()))
    }

    fn service() -> (TestService, crate::drain::DrainTrigger, Arc<Shared>) {
        let (shared, trigger) = Shared::new(None, 0);
        let svc = AngelService {
            inner: FnService(respond as Respond),
            shared: Arc::clone(&shared),
        };
        (svc, trigger, shared)
    }

    fn request(version: Version, path: &str) -> Request<()> {
        Request::builder()
            .version(version)
            .uri(path)
            .body(())
            .unwrap()
    }

    async fn connection_header(svc: &TestService, version: Version, path: &str) -> Option<String> {
        let response = svc.call(request(version, path)).await.unwrap();
        response
            .headers()
            .get(CONNECTION)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn connection_close_only_while_draining_and_only_on_http1() {
        let (svc, trigger, shared) = service();
        assert_eq!(connection_header(&svc, Version::HTTP_11, "/").await, None);
        trigger.fire();
        assert_eq!(
            connection_header(&svc, Version::HTTP_11, "/")
                .await
                .as_deref(),
            Some("close")
        );
        assert_eq!(
            connection_header(&svc, Version::HTTP_10, "/")
                .await
                .as_deref(),
            Some("close")
        );
        assert_eq!(connection_header(&svc, Version::HTTP_2, "/").await, None);
        assert_eq!(
            connection_header(&svc, Version::HTTP_11, "/upgrade").await,
            None
        );
        assert_eq!(shared.requests(), 5);
    }

    #[tokio::test]
    async fn drain_during_a_request_still_marks_its_response() {
        let (shared, trigger) = Shared::new(None, 0);
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let release = Arc::new(std::sync::Mutex::new(Some(release_rx)));
        let svc = AngelService {
            inner: FnService(move |_req: Request<()>| {
                let rx = release.lock().unwrap().take().unwrap();
                async move {
                    rx.await.unwrap();
                    Ok::<_, Infallible>(Response::new(()))
                }
            }),
            shared,
        };
        let pending = svc.call(request(Version::HTTP_11, "/"));
        trigger.fire();
        release_tx.send(()).unwrap();
        let response = pending.await.unwrap();
        assert_eq!(response.headers().get(CONNECTION).unwrap(), "close");
    }
}
