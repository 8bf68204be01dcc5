//! `ticker`: the seed's streaming app.
//!
//! `GET /` → `200` with a chunked body that never ends on its own: `worker[<pid>] <n>\n` at once
//! and then every second. When the worker drains, the stream writes `worker[<pid>] drained\n`
//! and ends cleanly — the pattern for any long-lived response: watch [`angel::drain()`].

use std::convert::Infallible;
use std::time::Duration;

use angel::bytes::Bytes;
use angel::http::{Request, Response, StatusCode};
use angel::http_body_util::channel::{Channel, Sender};
use angel::http_body_util::{Either, Full};
use angel::hyper::body::Incoming;

/// Time between two lines.
const TICK: Duration = Duration::from_secs(1);

type Body = Either<Channel<Bytes>, Full<Bytes>>;

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() != "/" {
        let mut response =
            Response::new(Either::Right(Full::new(Bytes::from_static(b"not found\n"))));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    }
    let (lines, body) = Channel::new(1);
    angel::tokio::spawn(tick(lines));
    Ok(Response::new(Either::Left(body)))
}

angel::export_http!(handle);

/// Writes the lines until the worker drains (or the client goes away).
async fn tick(mut lines: Sender<Bytes>) {
    let pid = std::process::id();
    let drain = angel::drain();
    let mut ticks = angel::tokio::time::interval(TICK);
    for n in 0u64.. {
        angel::tokio::select! {
            biased;
            () = drain.drained() => break,
            _ = ticks.tick() => {
                if lines.send_data(Bytes::from(format!("worker[{pid}] {n}\n"))).await.is_err() {
                    return; // the client is gone
                }
            }
        }
    }
    // Dropping the sender after this ends the chunked body cleanly.
    let _ = lines
        .send_data(Bytes::from(format!("worker[{pid}] drained\n")))
        .await;
}
