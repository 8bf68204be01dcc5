//! Your angel app. Build it with `cargo build --release` and run it with
//! `angel-host --lib target/release/libapp.so --port 3000`; after each new build,
//! `kill -HUP $(cat angel.pid)` (or `angel-host --watch`) rolls the workers onto it without
//! dropping a request.

use std::convert::Infallible;
use std::sync::Arc;

use angel::bytes::Bytes;
use angel::http::{Request, Response, StatusCode};
use angel::http_body_util::Full;
use angel::hyper::body::Incoming;

/// What every request shares. Put configuration, connection pools, caches here.
struct App {
    greeting: String,
}

/// Runs once per worker before it accepts a request. Return an error to fail the start: the
/// host then keeps the previous generation serving and logs why.
async fn init(worker: &angel::Worker) -> Result<Arc<App>, Infallible> {
    angel::info!("slot {} starting", worker.slot());
    Ok(Arc::new(App {
        greeting: "Hello from angel-host\n".to_owned(),
    }))
}

/// Called for every request. Long-lived responses (streams, websockets) should also watch
/// `angel::drain()` so a roll does not have to wait for them.
async fn handle(
    req: Request<Incoming>,
    app: Arc<App>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/" => (StatusCode::OK, app.greeting.clone()),
        "/healthz" => (StatusCode::OK, "ok".to_owned()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    Ok(response)
}

angel::export_http!(init = init, handle);
