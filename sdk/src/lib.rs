//! angel: the SDK for angel-host apps.
//!
//! An angel app is a `cdylib` that angel-host's worker processes load and run. You write safe
//! Rust against this crate; the [`export!`] / [`export_http!`] macros generate the C ABI
//! ([`abi`]) the host calls.
//!
//! # A minimal app
//!
//! ```no_run
//! use angel::bytes::Bytes;
//! use angel::http::{Request, Response};
//! use angel::http_body_util::Full;
//! use angel::hyper::body::Incoming;
//! use std::convert::Infallible;
//!
//! async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
//!     Ok(Response::new(Full::new(Bytes::from_static(b"Hello\n"))))
//! }
//!
//! angel::export_http!(hello);
//! ```
//!
//! with, in `Cargo.toml`, `crate-type = ["cdylib"]` and `angel` as the only dependency (it
//! re-exports [`hyper`], [`http`], [`http_body_util`], [`bytes`] and [`tokio`]). Then
//! `angel-host --lib target/release/libapp.so --port 3000`.
//!
//! Apps that need to initialise something first (configuration, a connection pool) use
//! `export_http!(init = make_state, handler)`, where `make_state` is an
//! `async fn(&Worker) -> Result<S, E>` and `handler` an `async fn(Request<Incoming>, S)`; or they
//! write their own main with [`export!`]:
//!
//! ```no_run
//! # use angel::{bytes::Bytes, http::{Request, Response}, http_body_util::Full, hyper::body::Incoming};
//! # use std::{convert::Infallible, sync::Arc};
//! async fn app(worker: angel::Worker) -> Result<(), angel::BoxError> {
//!     let greeting: Arc<str> = std::env::var("GREETING")?.into();
//!     angel::info!("slot {} serving {greeting:?}", worker.slot());
//!     worker
//!         .serve_http(move |_req: Request<Incoming>| {
//!             let body = Full::new(Bytes::from(greeting.to_string()));
//!             async move { Ok::<_, Infallible>(Response::new(body)) }
//!         })
//!         .await?;
//!     Ok(())
//! }
//!
//! angel::export!(app);
//! ```
//!
//! # axum, tower, tracing
//!
//! Any `tower::Service` — an axum `Router`, a `ServiceBuilder` stack — is served by
//! [`Worker::serve_tower`] or `export_tower!(init = make_router)`, with the same drain as
//! `serve_http`; a panicking handler gets a `500`. `tracing` events (and `log` records) inside
//! the app reach the host's log with their fields, filtered by `ANGEL_LOG` (`RUST_LOG`
//! syntax, default `info`): see the `tracing` feature.
//!
//! # Theory of operation
//!
//! The host forks one worker process per slot. The worker `dlopen`s the app, checks the
//! `angel_abi_version` symbol and calls `angel_main(ctx)` on its main thread. That call is the
//! app's whole life:
//!
//! 1. **Start.** The SDK checks the context, builds the app's *own* tokio runtime (two copies of
//!    tokio live in a worker, the host's and the app's; nothing Rust-specific crosses the
//!    boundary), starts watching the drain fd, and runs the app's main function on it, with a
//!    [`Worker`]. The runtime is current-thread unless `ANGEL_THREADS=n` (n > 1) asks for a
//!    multi-thread runtime with n threads; one thread per worker and `--workers` = cores is
//!    the usual shape.
//! 2. **Ready.** [`Worker::serve_http`] / [`Worker::serve_tcp`] build listeners from duplicates
//!    of the host's listening fds, spawn an accept loop for each, and only then report
//!    `EVENT_READY` ([`Worker::ready`]). The host rolls a new generation in only once all its
//!    workers are ready; a worker that fails first never replaces a good one. From then on a
//!    task on the app's runtime sends `EVENT_HEARTBEAT` (value: requests served) every
//!    `heartbeat_interval_ms`: a blocked runtime stops beating, which the host can see.
//! 3. **Serve.** Each request (each raw connection for `serve_tcp`) counts toward
//!    `max_requests`; reaching it sends `EVENT_RETIRING` once and starts the worker's own
//!    drain (step 4), so the limit is exact; the host starts the replacement at once. An
//!    HTTP/1 request head, and a new connection's first bytes, must arrive within the header
//!    read timeout ([`DEFAULT_HEADER_READ_TIMEOUT`], [`HEADER_READ_TIMEOUT_ENV`]), or the
//!    connection is closed. Accept errors (`EMFILE`) are logged once, then counted every 10 s.
//! 4. **Drain.** The host makes `drain_fd` readable: the master asked (`drain`), the worker
//!    got `SIGTERM` (systemd and docker signal the whole process group), or the master died,
//!    which closes it. The process-wide [`Drain`] flips ([`drain()`] gets it from anywhere).
//!    HTTP: stop accepting and shut every connection down gracefully, each protocol its own
//!    way: HTTP/2 at once (GOAWAY: in-flight streams finish, the client opens new ones
//!    elsewhere); HTTP/1 marks every later response `Connection: close` and shuts a
//!    connection down once its client has been quiet on it for [`DRAIN_LINGER`] (1 s), so a
//!    request sent on a kept-alive or just-accepted connection is answered rather than met
//!    with a close (a client trickling bytes without a request head gets the same 1 s). Raw
//!    TCP: stop accepting and wait for the handlers, which watch their [`Drain`], answer what
//!    they have read and end each connection with their protocol's goodbye
//!    ([`Stream::goodbye`]: raw TCP has no close that says what was answered). Long-lived
//!    responses (streams, websockets) must watch it too. The host kills a worker still alive
//!    after its `--graceful-timeout`.
//! 5. **Exit.** Main returns; the SDK shuts the runtime down and returns an exit code: `0`, or
//!    `1` after reporting the app's error through the host, or `70` after a caught panic
//!    (nothing unwinds into the host). The host then exits the process; it never unloads the
//!    library.
//!
//! Build the app with `panic = "unwind"` (the default): with `panic = "abort"` a panic kills
//! the worker instead of being reported.
#![warn(clippy::unwrap_used)]
// Tests may unwrap (STYLE.md).
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod abi;

#[cfg(feature = "rt")]
#[cfg(any(feature = "http", feature = "tcp"))]
mod accept;
#[cfg(feature = "rt")]
mod drain;
#[cfg(feature = "http")]
mod duration;
#[cfg(feature = "rt")]
mod entry;
#[cfg(feature = "rt")]
mod host;
#[cfg(feature = "rt")]
mod log;
#[cfg(feature = "rt")]
mod net;
#[cfg(feature = "http")]
mod slots;
#[cfg(feature = "rt")]
mod ticker;
#[cfg(feature = "http")]
mod watch;
#[cfg(feature = "rt")]
mod worker;

#[cfg(feature = "http")]
mod header_deadline;
#[cfg(feature = "http")]
mod http_conn;
#[cfg(feature = "http")]
mod http_serve;
#[cfg(feature = "tcp")]
mod tcp_serve;
#[cfg(feature = "tower")]
mod tower;
#[cfg(feature = "tracing")]
mod trace;

#[cfg(feature = "rt")]
pub use crate::drain::Drain;
#[cfg(feature = "rt")]
pub use crate::entry::THREADS_ENV;
#[cfg(feature = "http")]
pub use crate::http_conn::DRAIN_LINGER;
#[cfg(feature = "http")]
pub use crate::http_serve::{DEFAULT_HEADER_READ_TIMEOUT, HEADER_READ_TIMEOUT_ENV};
#[cfg(feature = "rt")]
pub use crate::log::{log, Level};
#[cfg(feature = "rt")]
pub use crate::net::{Listener, ListenerInfo, LocalAddr, Stream};
#[cfg(feature = "tcp")]
pub use crate::tcp_serve::GOODBYE_LINGER;
#[cfg(feature = "tower")]
pub use crate::tower::{hold_worker, holds_released, TowerBody, WorkerHold};
#[cfg(feature = "tracing")]
pub use crate::trace::{HostLayer, LOG_ENV};
#[cfg(feature = "rt")]
pub use crate::worker::Worker;
#[cfg(feature = "tracing")]
pub use tracing;

#[cfg(feature = "http")]
pub use bytes;
#[cfg(feature = "http")]
pub use http;
#[cfg(feature = "http")]
pub use http_body;
#[cfg(feature = "http")]
pub use http_body_util;
#[cfg(feature = "http")]
pub use hyper;
#[cfg(feature = "http")]
pub use hyper_util;
#[cfg(feature = "rt")]
pub use tokio;

/// The error type apps may return from their main function (any `E: Into<BoxError>` works).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The drain signal of the running worker, from anywhere in the app (e.g. inside a streaming
/// response) without passing the [`Worker`] around.
///
/// Outside a running worker (before `angel_main`, in unit tests) this returns a signal that never
/// fires.
#[cfg(feature = "rt")]
pub fn drain() -> Drain {
    match host::current() {
        Some(shared) => shared.drain.clone(),
        None => drain::channel().1,
    }
}

/// Asks the host to replace the running worker (as when `max_requests` is reached), from
/// anywhere in the app. Keep serving: the host starts a replacement and tells this worker to
/// drain once the replacement is ready. Outside a running worker this does nothing.
#[cfg(feature = "rt")]
pub fn retire() {
    if let Some(shared) = host::current() {
        shared.notify(abi::EVENT_RETIRING, shared.requests());
    }
}

/// Exports `main` as this library's angel entry point.
///
/// `main` is an `FnOnce(Worker) -> impl Future<Output = Result<(), E>>` with
/// `E: Into<angel::BoxError>` (an `async fn main(worker: angel::Worker) -> Result<(), E>`, or a
/// closure). It must return once the worker drained: see [`Worker::serve_http`] and
/// [`Worker::serve_tcp`], which do all of it.
///
/// Generates the symbols of the ABI: `uint32_t angel_abi_version`, `uint32_t angel_features`
/// and `int32_t angel_main(const angel_context *)`. Use it once per library.
#[cfg(feature = "rt")]
#[macro_export]
macro_rules! export {
    ($main:expr $(,)?) => {
        const _: () = {
            #[export_name = "angel_abi_version"]
            pub static ANGEL_ABI_VERSION: u32 = $crate::abi::ABI_VERSION;

            #[export_name = "angel_features"]
            pub static ANGEL_FEATURES: u32 = $crate::abi::FEATURES;

            /// The angel entry point (see `angel::abi`).
            ///
            /// # Safety
            ///
            /// Only for the angel host: `ctx` must be a valid context for the whole call.
            #[export_name = "angel_main"]
            pub unsafe extern "C" fn angel_main(ctx: *const $crate::abi::Context) -> i32 {
                // SAFETY: the host passes a context valid for the whole call (ABI contract),
                // which is what `run` requires; `run` never unwinds.
                unsafe { $crate::__private::run(ctx, $main) }
            }
        };
    };
}

/// Exports an HTTP app: [`export!`] with a main that calls [`Worker::serve_http`].
///
/// Two forms:
///
/// - `export_http!(handler)`: `handler` is
///   `Fn(Request<Incoming>) -> impl Future<Output = Result<Response<B>, E>>` (+ `Clone + Send +
///   Sync + 'static`), e.g. an `async fn(Request<Incoming>) -> Result<Response<Full<Bytes>>,
///   Infallible>`.
/// - `export_http!(init = make_state, handler)`: first `make_state(&worker).await` builds the
///   app's state `S` (`Clone + Send + Sync + 'static`, typically an `Arc`); an error fails the
///   worker's start (the host keeps the old generation). Then `handler(request, state.clone())`
///   serves every request.
#[cfg(feature = "http")]
#[macro_export]
macro_rules! export_http {
    (init = $init:expr, $handler:expr $(,)?) => {
        $crate::export!(|worker: $crate::Worker| async move {
            let state = match ($init)(&worker).await {
                ::core::result::Result::Ok(state) => state,
                ::core::result::Result::Err(e) => {
                    return ::core::result::Result::Err($crate::__private::box_error(e))
                }
            };
            $crate::__private::serve_http_with_state(worker, state, $handler).await
        });
    };
    ($handler:expr $(,)?) => {
        $crate::export!(|worker: $crate::Worker| $crate::__private::serve_http(worker, $handler));
    };
}

/// Exports a [`tower::Service`](https://docs.rs/tower) app (an axum `Router`, a
/// `ServiceBuilder` stack): [`export!`] with a main that calls [`Worker::serve_tower`].
///
/// Two forms:
///
/// - `export_tower!(init = make_service)`: `make_service` is an
///   `async fn(&Worker) -> Result<S, E>` (`E: Into<BoxError>`) that builds the service once per
///   worker, e.g. an axum `Router` with its state; an error fails the worker's start (the host
///   keeps the old generation).
/// - `export_tower!(make_service)`: `make_service` is a plain `fn() -> S`.
///
/// With axum:
///
/// ```ignore
/// async fn make_router(_worker: &angel::Worker) -> Result<axum::Router, std::convert::Infallible> {
///     Ok(axum::Router::new().route("/", axum::routing::get(|| async { "Hello\n" })))
/// }
/// angel::export_tower!(init = make_router);
/// ```
///
/// Any tower service, built by a plain function:
///
/// ```no_run
/// use angel::http::{Request, Response};
/// use angel::hyper::body::Incoming;
///
/// fn service() -> tower::util::ServiceFn<
///     fn(Request<Incoming>) -> std::future::Ready<Result<Response<String>, std::convert::Infallible>>,
/// > {
///     tower::service_fn(|_req| std::future::ready(Ok(Response::new("Hello\n".to_owned()))))
/// }
/// angel::export_tower!(service);
/// ```
#[cfg(feature = "tower")]
#[macro_export]
macro_rules! export_tower {
    (init = $init:expr $(,)?) => {
        $crate::export!(|worker: $crate::Worker| async move {
            let service = match ($init)(&worker).await {
                ::core::result::Result::Ok(service) => service,
                ::core::result::Result::Err(e) => {
                    return ::core::result::Result::Err($crate::__private::box_error(e))
                }
            };
            worker
                .serve_tower(service)
                .await
                .map_err($crate::__private::box_error)
        });
    };
    ($make:expr $(,)?) => {
        $crate::export!(|worker: $crate::Worker| worker.serve_tower(($make)()));
    };
}

/// Implementation details of the macros. Not a public API.
#[doc(hidden)]
#[cfg(feature = "rt")]
pub mod __private {
    pub use crate::entry::{box_error, run};
    #[cfg(feature = "http")]
    pub use crate::http_serve::{serve as serve_http, serve_with_state as serve_http_with_state};
}
