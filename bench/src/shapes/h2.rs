//! HTTP/2 with a client that follows GOAWAY: hyper-util's pooled client with prior knowledge,
//! as a Rust service calling another would use it. Each of `connections` clients keeps one
//! HTTP/2 connection (the pool multiplexes every stream on it, and opens a new one after a
//! GOAWAY), with `streams` request loops on it.
//!
//! Retried: a stream the server refused unprocessed (a remote GOAWAY that did not cover it,
//! `REFUSED_STREAM`; RFC 9113 §8.7 lets a client retry those), or a request that never left
//! the client (hyper's `Canceled`). Lost: every other request without a 2xx and its whole body.

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

use super::{
    error_chain, never_connected, Counted, Tally, ANSWER_TIMEOUT, MAX_RETRIES, REFUSED_PAUSE,
};

type H2Client = Client<HttpConnector, Empty<Bytes>>;

/// `connections` HTTP/2 connections with `streams` concurrent request loops each, until `stop`.
pub fn load(
    addr: SocketAddr,
    connections: usize,
    streams: usize,
    stop: &AtomicBool,
) -> anyhow::Result<Counted> {
    let tally = Arc::new(Tally::default());
    let t = Arc::clone(&tally);
    let uri: hyper::Uri = format!("http://{addr}/").parse()?;
    super::run_until(stop, move |flag| {
        async move {
            let mut tasks = Vec::new();
            for _ in 0..connections {
                let client: H2Client = Client::builder(TokioExecutor::new())
                    .http2_only(true)
                    .build_http();
                for _ in 0..streams {
                    let (client, uri, flag, tally) = (
                        client.clone(),
                        uri.clone(),
                        Arc::clone(&flag),
                        Arc::clone(&t),
                    );
                    tasks.push(tokio::spawn(async move {
                        while !flag.load(Ordering::Relaxed) {
                            one_request(&client, &uri, &tally).await;
                        }
                    }));
                }
            }
            for task in tasks {
                let _ = task.await;
            }
        }
        .boxed()
    })?;
    Ok(tally.counted())
}

/// One request, sent again only while the server refuses it unprocessed.
async fn one_request(client: &H2Client, uri: &hyper::Uri, tally: &Tally) {
    tally.sent();
    for attempt in 0..=MAX_RETRIES {
        let request = match Request::get(uri.clone()).body(Empty::new()) {
            Ok(r) => r,
            Err(e) => return tally.lost(|| format!("h2 request: {e}")),
        };
        let exchange = async {
            let response = client.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        };
        match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
            Err(_) => return tally.lost(|| format!("h2: no answer within {ANSWER_TIMEOUT:?}")),
            Ok(Ok((status, body))) if status.is_success() && !body.is_empty() => return,
            Ok(Ok((status, body))) => {
                return tally.lost(|| format!("h2: status {status}, body {body:?}"));
            }
            Ok(Err(e)) if refused_unprocessed(&*e) => {
                if attempt < MAX_RETRIES {
                    tally.retried();
                }
            }
            Ok(Err(e)) if never_connected(&*e) => {
                // Counted as sent once already: refused, not sent again.
                tally.refused_again(|| format!("h2: {}", error_chain(&*e)));
                return tokio::time::sleep(REFUSED_PAUSE).await;
            }
            Ok(Err(e)) => return tally.lost(|| format!("h2: {}", error_chain(&*e))),
        }
    }
    tally.lost(|| format!("h2: refused {} times in a row", MAX_RETRIES + 1));
}

/// Whether the server refused the stream without processing it: a remote GOAWAY that did not
/// cover it, or `REFUSED_STREAM`; or the request never left the client, queued on a
/// connection that closed first (hyper's `Canceled`).
fn refused_unprocessed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cause = c.source();
    }
    false
}
