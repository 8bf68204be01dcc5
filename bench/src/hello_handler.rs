//! The request handler of the bench's reference servers (`plain-hyper`, `minimal-app`):
//! `examples/hello`'s for `GET /`, line for line, so that CPU per request compares serving
//! loops, not handlers. One file, included by both.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

/// What `GET /` answers before `:<pid>`: `$ANGEL_HELLO_MESSAGE`, as `examples/hello` reads it.
pub fn message() -> Arc<str> {
    std::env::var("ANGEL_HELLO_MESSAGE")
        .unwrap_or_else(|_| "Hello".to_owned())
        .into()
}

/// `GET /` → `<message>:<pid>`; anything else → 404.
pub async fn hello(
    req: Request<Incoming>,
    message: Arc<str>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let pid = std::process::id();
    if req.method() != Method::GET {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n".to_owned()));
    }
    let response = match req.uri().path() {
        "/" => text(StatusCode::OK, format!("{message}:{pid}")),
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    Ok(response)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
