//! `ticker`: the seed's streaming app.
//!
//! - `GET /` → `200` with a chunked body that never ends on its own: `worker[<pid>] <n>\n` at
//!   once and then every second. When the worker drains, the stream writes
//!   `worker[<pid>] drained\n` and ends cleanly — the pattern for any endless response (a
//!   feed, server-sent events): watch [`angel::drain()`] and end with a line that tells the
//!   client to come back.
//! - `GET /count?n=N&ms=M` → `200` with a chunked body of `N` lines `worker[<pid>] <i>\n`, one
//!   every `M` ms, then `worker[<pid>] end\n`: a long response of bounded length (a download,
//!   a report). A drain does not cut it: it is part of the in-flight work a draining worker
//!   finishes (bounded by `--graceful-timeout`), so a client that reads fewer lines or no `end`
//!   saw a cut stream.
//! - anything else → `404`.

use std::convert::Infallible;
use std::time::Duration;

use angel::bytes::Bytes;
use angel::http::{Request, Response, StatusCode};
use angel::http_body_util::channel::{Channel, Sender};
use angel::http_body_util::{Either, Full};
use angel::hyper::body::Incoming;

/// Time between two lines of the endless stream.
const TICK: Duration = Duration::from_secs(1);

type Body = Either<Channel<Bytes>, Full<Bytes>>;

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    match req.uri().path() {
        "/" => {
            let (lines, body) = Channel::new(1);
            angel::tokio::spawn(tick(lines));
            Ok(Response::new(Either::Left(body)))
        }
        "/count" => match count_query(req.uri().query().unwrap_or("")) {
            Some((n, every)) => {
                let (lines, body) = Channel::new(1);
                angel::tokio::spawn(count(lines, n, every));
                Ok(Response::new(Either::Left(body)))
            }
            None => Ok(text(
                StatusCode::BAD_REQUEST,
                "expected ?n=<lines>&ms=<milliseconds>\n",
            )),
        },
        _ => Ok(text(StatusCode::NOT_FOUND, "not found\n")),
    }
}

angel::export_http!(handle);

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *response.status_mut() = status;
    response
}

/// `n=N&ms=M`, both required.
fn count_query(query: &str) -> Option<(u64, Duration)> {
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))?
            .parse::<u64>()
            .ok()
    };
    Some((param("n")?, Duration::from_millis(param("ms")?)))
}

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

/// Writes `n` lines, one per `every`, then `end`, drain or not.
async fn count(mut lines: Sender<Bytes>, n: u64, every: Duration) {
    let pid = std::process::id();
    let mut ticks = angel::tokio::time::interval(every);
    for i in 0..n {
        ticks.tick().await;
        if lines
            .send_data(Bytes::from(format!("worker[{pid}] {i}\n")))
            .await
            .is_err()
        {
            return; // the client is gone
        }
    }
    let _ = lines
        .send_data(Bytes::from(format!("worker[{pid}] end\n")))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_query_needs_both_numbers() {
        assert_eq!(
            count_query("n=3&ms=20"),
            Some((3, Duration::from_millis(20)))
        );
        assert_eq!(count_query("ms=5&n=2"), Some((2, Duration::from_millis(5))));
        assert_eq!(count_query("n=3"), None);
        assert_eq!(count_query("nn=3&ms=1"), None);
        assert_eq!(count_query(""), None);
    }
}
