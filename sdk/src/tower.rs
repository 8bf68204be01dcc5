//! Serving any `tower::Service` — an axum `Router`, a `tower::ServiceBuilder` stack with
//! `tower-http` layers — on top of [`Worker::serve_http_service`], so it gets the same drain,
//! request counting, HTTP/1 + HTTP/2 and upgrades as [`Worker::serve_http`].
//!
//! The adapter does what hyper-util's `TowerToHyperService` does (clone the service per request,
//! `poll_ready` then `call` through `oneshot`), and one thing more: a panic in the service's
//! future is caught, answered with `500 Internal Server Error`, and the connection and worker
//! keep serving. The panic is logged once, by the SDK's panic hook, with its message and
//! location.
//!
//! The app's service is boxed ([`BoxedService`]) before it reaches the serving loop, so that
//! loop — hyper's HTTP/1 and HTTP/2 connections, the sniff, the drain — is one non-generic
//! instantiation compiled with the SDK, not again in every app crate: an app's rebuild
//! compiles its handlers and the small adapter below, nothing of hyper (BENCHMARKS.md, "The
//! dev loop"). The box costs one allocation per request for the response future, which axum
//! pays for its routes already.

use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::CatchUnwind;
use futures_util::FutureExt as _;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Body, Incoming};
use tokio::sync::Notify;
use tower::util::Oneshot;
use tower::ServiceExt as _;

use crate::{BoxError, Worker};

/// The response body of a tower app as the SDK serves it: the service's own body, boxed, or the
/// empty body of a `500` after a panic.
pub type TowerBody = UnsyncBoxBody<Bytes, BoxError>;

impl Worker {
    /// Serves a [`tower::Service`] (e.g. an axum `Router`, or a `ServiceBuilder` stack) until
    /// drained, exactly like [`Worker::serve_http`]: accept loops, ready, HTTP/1 + HTTP/2 with
    /// upgrades, request counting and the drain that loses nothing.
    ///
    /// The service is cloned for every request (as hyper-util's `TowerToHyperService` does),
    /// and driven to readiness before it is called. A panic in it (in `poll_ready`, `call` or
    /// the response future) answers that request with `500 Internal Server Error` and is
    /// logged once; the worker keeps serving. A panic in the response *body* while it streams
    /// aborts that connection only.
    ///
    /// ```no_run
    /// # async fn app(worker: angel::Worker) -> std::io::Result<()> {
    /// # let router = tower::service_fn(|_req: angel::http::Request<angel::hyper::body::Incoming>| async {
    /// #     Ok::<_, std::convert::Infallible>(angel::http::Response::new(String::from("hi")))
    /// # });
    /// worker.serve_tower(router).await
    /// # }
    /// ```
    pub async fn serve_tower<S, B>(self, service: S) -> io::Result<()>
    where
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.serve_boxed(BoxedService(Box::new(TowerService(service))))
            .await
    }

    /// The serving loop of every tower app, instantiated once, here. `inline(never)`: an
    /// inlined copy would bring hyper's generic code back into the app crate.
    #[inline(never)]
    async fn serve_boxed(self, service: BoxedService) -> io::Result<()> {
        self.serve_http_service(service).await?;
        // Upgraded connections (websockets) live in tasks of their own, which hold the worker
        // until they have said goodbye (see [`hold_worker`]).
        holds_released().await;
        Ok(())
    }
}

/// The response future of a boxed tower app.
type BoxedFuture =
    Pin<Box<dyn Future<Output = Result<Response<TowerBody>, BoxError>> + Send + 'static>>;

/// An app's [`TowerService`], type-erased: cloned per connection, called per request.
///
/// Not tower's `BoxCloneService`: that one is a tower service whose `call` needs `poll_ready`
/// first; hyper calls a `&self` service, and [`TowerService`] drives the app's readiness
/// itself (`oneshot`), so this box only needs `call` and `clone`.
struct BoxedService(Box<dyn ErasedService>);

trait ErasedService: Send {
    fn call(&self, req: Request<Incoming>) -> BoxedFuture;
    fn clone_box(&self) -> Box<dyn ErasedService>;
}

impl<S, B> ErasedService for TowerService<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn call(&self, req: Request<Incoming>) -> BoxedFuture {
        Box::pin(hyper::service::Service::call(self, req))
    }

    fn clone_box(&self) -> Box<dyn ErasedService> {
        Box::new(self.clone())
    }
}

impl Clone for BoxedService {
    fn clone(&self) -> Self {
        Self(self.0.clone_box())
    }
}

impl hyper::service::Service<Request<Incoming>> for BoxedService {
    type Response = Response<TowerBody>;
    type Error = BoxError;
    type Future = BoxedFuture;

    fn call(&self, req: Request<Incoming>) -> BoxedFuture {
        self.0.call(req)
    }
}

/// Keeps the worker process alive while it lives, past the end of its HTTP connections: take
/// one in a task that serves an upgraded connection (a websocket) so that, on drain, it can
/// still send its close frame before the worker exits.
///
/// [`Worker::serve_tower`] returns only once every hold has been dropped (the master's
/// `--graceful-timeout` still bounds the whole drain). Apps with their own main await
/// [`holds_released`] after serving.
#[must_use = "the worker is held only while this value lives"]
#[derive(Debug)]
pub struct WorkerHold(());

/// Takes a [`WorkerHold`].
pub fn hold_worker() -> WorkerHold {
    HOLDS.count.fetch_add(1, Ordering::AcqRel);
    WorkerHold(())
}

impl Drop for WorkerHold {
    fn drop(&mut self) {
        if HOLDS.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            HOLDS.released.notify_waiters();
        }
    }
}

struct Holds {
    count: AtomicUsize,
    released: Notify,
}

static HOLDS: Holds = Holds {
    count: AtomicUsize::new(0),
    released: Notify::const_new(),
};

/// Completes once no [`WorkerHold`] is alive.
pub async fn holds_released() {
    loop {
        let released = HOLDS.released.notified();
        tokio::pin!(released);
        // Registered before the check, so a release between the check and the await is seen.
        released.as_mut().enable();
        if HOLDS.count.load(Ordering::Acquire) == 0 {
            return;
        }
        released.await;
    }
}

/// A tower service as a hyper service that turns panics into `500`s.
#[derive(Clone)]
struct TowerService<S>(S);

impl<S, R, B> hyper::service::Service<R> for TowerService<S>
where
    S: tower_service::Service<R, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<TowerBody>;
    type Error = BoxError;
    type Future = PanicTo500<S, R>;

    fn call(&self, req: R) -> Self::Future {
        PanicTo500 {
            inner: AssertUnwindSafe(self.0.clone().oneshot(req)).catch_unwind(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`TowerService`]: the service's, with a panic mapped to a `500`.
    struct PanicTo500<S, R>
    where
        S: tower_service::Service<R>,
    {
        // `AssertUnwindSafe`: after a panic the future is dropped, never polled again, and the
        // service clone it owned goes with it; nothing half-updated is observed afterwards
        // except what the app shares on purpose (its own `Arc` state).
        #[pin]
        inner: CatchUnwind<AssertUnwindSafe<Oneshot<S, R>>>,
    }
}

impl<S, R, B> Future for PanicTo500<S, R>
where
    S: tower_service::Service<R, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<TowerBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match std::task::ready!(self.project().inner.poll(cx)) {
            Ok(Ok(response)) => Ok(response.map(|body| body.map_err(Into::into).boxed_unsync())),
            Ok(Err(e)) => Err(e.into()),
            // The panic hook installed at entry has already logged the message and location;
            // dropping the payload here could panic again only for exotic payloads, which
            // `drop_payload` guards.
            Err(payload) => {
                crate::entry::drop_payload(payload);
                Ok(internal_server_error())
            }
        })
    }
}

fn internal_server_error() -> Response<TowerBody> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper::service::Service as _;
    use std::convert::Infallible;
    use std::future::{ready, Ready};

    type Reply = Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn respond(req: Request<()>) -> Reply {
        if req.uri().path() == "/panic" {
            panic!("handler panicked on purpose");
        }
        ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
    }

    fn get(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn holds_released_waits_for_every_hold() {
        holds_released().await; // none taken: at once
        let (first, second) = (hold_worker(), hold_worker());
        let waiter = tokio::spawn(holds_released());
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one hold is still alive");
        drop(second);
        waiter.await.unwrap();
    }

    #[tokio::test]
    async fn a_panicking_handler_gets_a_500_and_the_next_request_is_served() {
        let svc = TowerService(tower::service_fn(respond));
        let response = svc.call(get("/panic")).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let response = svc.call(get("/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
    }
}
