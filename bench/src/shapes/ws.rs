//! An upgraded connection: `examples/axum`'s WebSocket echo (`GET /ws`) with a client
//! (tokio-tungstenite) that keeps echoing text messages and follows the close handshake.
//!
//! The goodbye is a Close frame from the server with code 1001 (going away), which the axum
//! example sends on drain. RFC 6455 §5.5.1: after its Close an endpoint sends no more data
//! frames; the example echoes in order and processes nothing after its Close. So when the
//! Close arrives instead of the echo, the message in flight was refused unprocessed: it is
//! sent again on a new connection. Anything else without its echo — EOF or a reset without a
//! Close, another close code, a wrong echo — is lost.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use super::{refused_at_connect, Counted, Tally, ANSWER_TIMEOUT, MAX_RETRIES, REFUSED_PAUSE};

/// Messages per connection: each connection is one HTTP request for `--max-requests`, so
/// sessions must end for recycles to happen.
const SESSION: usize = 20;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `connections` WebSocket echo clients until `stop`.
pub fn load(addr: SocketAddr, connections: usize, stop: &AtomicBool) -> anyhow::Result<Counted> {
    let tally = Arc::new(Tally::default());
    let t = Arc::clone(&tally);
    let url = format!("ws://{addr}/ws");
    super::run_until(stop, move |flag| {
        async move {
            let tasks: Vec<_> = (0..connections)
                .map(|c| {
                    let (url, flag, tally) = (url.clone(), Arc::clone(&flag), Arc::clone(&t));
                    tokio::spawn(async move { client(&url, c, &flag, &tally).await })
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

/// How one message ended.
enum Answer {
    Echoed,
    /// The server's Close (1001): refused unprocessed.
    Refused,
    Lost(String),
}

async fn client(url: &str, c: usize, stop: &AtomicBool, tally: &Tally) {
    let mut seq = 0u64;
    // A message the server's Close refused, and how often: the next connection's first one.
    // It is sent again even once the run is stopping, so that it ends answered or lost.
    let mut refused: Option<(String, u32)> = None;
    while !stop.load(Ordering::Relaxed) || refused.is_some() {
        let connect = tokio::time::timeout(ANSWER_TIMEOUT, tokio_tungstenite::connect_async(url));
        let mut ws = match connect.await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) if refused_at_connect(&e) => {
                match refused.take() {
                    Some((text, _)) => tally.refused_again(|| format!("ws {text:?}: {e}")),
                    None => tally.refused(|| format!("ws connect: {e}")),
                }
                tokio::time::sleep(REFUSED_PAUSE).await;
                continue;
            }
            // The upgrade request was sent (a reset, a bad answer, no answer): lost.
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no handshake within {ANSWER_TIMEOUT:?}"),
                };
                if refused.take().is_none() {
                    tally.sent();
                }
                tally.lost(|| format!("ws handshake: {why}"));
                continue;
            }
        };
        let mut closed_by_server = false;
        for _ in 0..SESSION {
            let (text, tries) = match refused.take() {
                Some(again) => again,
                None if stop.load(Ordering::Relaxed) => break,
                None => {
                    seq += 1;
                    tally.sent();
                    (format!("c{c} m{seq}"), 0)
                }
            };
            match exchange(&mut ws, &text).await {
                Answer::Echoed => {}
                Answer::Refused if tries < MAX_RETRIES => {
                    tally.retried();
                    refused = Some((text, tries + 1));
                    closed_by_server = true;
                    break;
                }
                Answer::Refused => {
                    tally.lost(|| format!("ws {text:?}: refused {tries} times"));
                    closed_by_server = true;
                    break;
                }
                Answer::Lost(why) => {
                    tally.lost(|| format!("ws {text:?}: {why}"));
                    closed_by_server = true;
                    break;
                }
            }
        }
        if !closed_by_server {
            // Our Close; the server answers with its own.
            let _ = ws.send(Message::Close(None)).await;
        }
        // Finish the closing handshake: tungstenite answers the server's Close as it reads,
        // and the stream ends when the server closes the connection.
        let _ = tokio::time::timeout(ANSWER_TIMEOUT, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}

async fn exchange(ws: &mut Ws, text: &str) -> Answer {
    if let Err(e) = ws.send(Message::text(text)).await {
        return Answer::Lost(format!("send: {e}"));
    }
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
        loop {
            match ws.next().await {
                // Pings are answered by tungstenite.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => return other,
            }
        }
    });
    match answer.await {
        Err(_) => Answer::Lost(format!("no echo within {ANSWER_TIMEOUT:?}")),
        Ok(Some(Ok(Message::Text(echo)))) if echo.as_str() == text => Answer::Echoed,
        Ok(Some(Ok(Message::Close(Some(frame))))) if frame.code == CloseCode::Away => {
            Answer::Refused
        }
        Ok(other) => Answer::Lost(format!("{other:?} instead of the echo")),
    }
}
