//! {{project-name}}: an angel-host app, on axum.
//!
//! Build it with `cargo build --release` and serve it with
//! `angel-host --lib target/release/libapp.so --port 3000` (a generated project's library is
//! named after it). After each new build, `kill -HUP $(cat angel.pid)` (or
//! `angel-host --watch`) rolls the workers onto it without dropping a request.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use tower_http::trace::TraceLayer;

/// What every request shares. Put configuration, connection pools, caches here.
struct App {
    greeting: String,
    hits: AtomicU64,
}

/// Runs once per worker before it accepts a request. Return an error to fail the start: the
/// host then keeps the previous generation serving and logs why.
async fn make_router(worker: &angel::Worker) -> Result<Router, Infallible> {
    // `tracing` events go to the host's log (`worker[pid] starting slot=0`); filter them
    // with ANGEL_LOG (RUST_LOG syntax, default `info`).
    tracing::info!(slot = worker.slot(), "starting");
    Ok(router())
}

/// The routes and their state. Nothing here depends on angel-host, so a test can call it
/// directly (`tower::ServiceExt::oneshot`).
pub fn router() -> Router {
    let app = Arc::new(App {
        greeting: "Hello from angel-host\n".to_owned(),
        hits: AtomicU64::new(0),
    });
    Router::new()
        .route("/", get(hello))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(app)
        .layer(TraceLayer::new_for_http())
}

async fn hello(State(app): State<Arc<App>>) -> String {
    app.hits.fetch_add(1, Ordering::Relaxed);
    app.greeting.clone()
}

// Long-lived responses (streams, websockets) should watch `angel::drain()` so a roll does not
// have to wait for them: see examples/axum's websocket echo.
angel::export_tower!(init = make_router);
