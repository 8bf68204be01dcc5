//! Long responses: `examples/ticker`'s `GET /count?n=N&ms=M`, a chunked body of `N` lines
//! over about `N × M` ms, then `end`, over HTTP/1 keep-alive (hyper-util's pooled client).
//! A response that is not a 200 whose body is every line and `end` — a cut stream — is lost;
//! HTTP/1 has no goodbye that refuses a response halfway, so nothing is retried.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{error_chain, never_connected, Counted, Tally, ANSWER_TIMEOUT, REFUSED_PAUSE};

/// Lines per response.
pub const LINES: usize = 10;
/// Milliseconds between two lines: a response streams for about `LINES × LINE_MS` ms.
pub const LINE_MS: u64 = 10;

/// `connections` clients each streaming one long response after another, until `stop`.
pub fn load(addr: SocketAddr, connections: usize, stop: &AtomicBool) -> anyhow::Result<Counted> {
    let tally = Arc::new(Tally::default());
    let t = Arc::clone(&tally);
    let uri: hyper::Uri = format!("http://{addr}/count?n={LINES}&ms={LINE_MS}").parse()?;
    super::run_until(stop, move |flag| {
        async move {
            let client: Client<HttpConnector, Empty<Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            let tasks: Vec<_> = (0..connections)
                .map(|_| {
                    let (client, uri, flag, tally) = (
                        client.clone(),
                        uri.clone(),
                        Arc::clone(&flag),
                        Arc::clone(&t),
                    );
                    tokio::spawn(async move {
                        while !flag.load(Ordering::Relaxed) {
                            one_stream(&client, &uri, &tally).await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                let _ = task.await;
            }
        }
        .boxed()
    })?;
    Ok(tally.counted())
}

async fn one_stream(client: &Client<HttpConnector, Empty<Bytes>>, uri: &hyper::Uri, tally: &Tally) {
    let request = match Request::get(uri.clone()).body(Empty::new()) {
        Ok(r) => r,
        Err(e) => return tally.lost(|| format!("stream request: {e}")),
    };
    let exchange = async {
        let response = client.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
        Err(_) => {
            tally.sent();
            tally.lost(|| format!("stream: not over within {ANSWER_TIMEOUT:?}"));
        }
        Ok(Ok((status, body))) => {
            tally.sent();
            if !status.is_success() || !whole(&body) {
                tally.lost(|| format!("stream: status {status}, body {body:?}"));
            }
        }
        Ok(Err(e)) if never_connected(&*e) => {
            tally.refused(|| format!("stream: {}", error_chain(&*e)));
            tokio::time::sleep(REFUSED_PAUSE).await;
        }
        Ok(Err(e)) => {
            tally.sent();
            tally.lost(|| format!("stream: {}", error_chain(&*e)));
        }
    }
}

/// Every line `0..LINES` and then `end`, all from one worker.
fn whole(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    let lines: Vec<&str> = text.lines().collect();
    let Some(prefix) = lines.first().and_then(|l| l.strip_suffix(" 0")) else {
        return false;
    };
    lines.len() == LINES + 1
        && lines[..LINES]
            .iter()
            .enumerate()
            .all(|(i, l)| *l == format!("{prefix} {i}"))
        && lines[LINES] == format!("{prefix} end")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_whole_only_with_every_line_and_its_end() {
        let mut body = String::new();
        for i in 0..LINES {
            body.push_str(&format!("worker[7] {i}\n"));
        }
        assert!(!whole(body.as_bytes()), "no end line");
        body.push_str("worker[7] end\n");
        assert!(whole(body.as_bytes()));
        assert!(!whole(body.replace("worker[7] 3\n", "").as_bytes()));
        assert!(!whole(b""));
    }
}
