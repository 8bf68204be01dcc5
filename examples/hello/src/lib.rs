//! `hello`: the HTTP test app (same contract as angel.js's test app).
//!
//! - `GET /` → `200`, body exactly `<message>:<pid>`, where message is `$ANGEL_HELLO_MESSAGE`
//!   as read when the worker started (default `Hello`): tells which generation and which worker
//!   answered.
//! - `GET /crash` → `200 crashing`, then the worker aborts ~100 ms later (respawn tests).
//! - `GET /slow?ms=N` → `200 slow:<pid>` after N ms (requests in flight across a roll).
//! - `GET /block?ms=N` → blocks the worker's runtime thread for N ms, then `200 blocked:<pid>`
//!   (hung-worker tests: no heartbeats meanwhile).
//! - anything else → `404`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use angel::bytes::Bytes;
use angel::http::{Method, Request, Response, StatusCode};
use angel::http_body_util::Full;
use angel::hyper::body::Incoming;

/// How long `/crash` lets its response go out before the worker aborts.
const CRASH_DELAY: Duration = Duration::from_millis(100);

async fn main(worker: angel::Worker) -> Result<(), angel::BoxError> {
    let message: Arc<str> = std::env::var("ANGEL_HELLO_MESSAGE")
        .unwrap_or_else(|_| "Hello".to_owned())
        .into();
    worker
        .serve_http(move |req| handle(req, Arc::clone(&message)))
        .await?;
    Ok(())
}

angel::export!(main);

async fn handle(
    req: Request<Incoming>,
    message: Arc<str>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let pid = std::process::id();
    if req.method() != Method::GET {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n".to_owned()));
    }
    let response = match req.uri().path() {
        "/" => text(StatusCode::OK, format!("{message}:{pid}")),
        "/crash" => {
            angel::warn!("GET /crash: aborting in {} ms", CRASH_DELAY.as_millis());
            std::thread::spawn(|| {
                std::thread::sleep(CRASH_DELAY);
                std::process::abort();
            });
            text(StatusCode::OK, "crashing".to_owned())
        }
        "/slow" => match millis(&req) {
            Some(delay) => {
                angel::tokio::time::sleep(delay).await;
                text(StatusCode::OK, format!("slow:{pid}"))
            }
            None => bad_ms(),
        },
        "/block" => match millis(&req) {
            Some(delay) => {
                // Deliberately blocks the runtime thread: this worker stops serving and beating.
                std::thread::sleep(delay);
                text(StatusCode::OK, format!("blocked:{pid}"))
            }
            None => bad_ms(),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    Ok(response)
}

/// The `ms=N` query parameter.
fn millis(req: &Request<Incoming>) -> Option<Duration> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

fn bad_ms() -> Response<Full<Bytes>> {
    text(
        StatusCode::BAD_REQUEST,
        "expected ?ms=<milliseconds>\n".to_owned(),
    )
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
