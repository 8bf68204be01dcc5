//! Raw TCP echo (`examples/echo`) with a client that follows its goodbye: a `BYE` answer means
//! the line just sent was refused unprocessed, so it is sent again on a new connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::FutureExt as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::{Counted, Tally, ANSWER_TIMEOUT, MAX_RETRIES, REFUSED_PAUSE};

/// Lines per connection: raw TCP apps count connections for `--max-requests`, so sessions must
/// end for recycles to happen.
const SESSION: usize = 20;

/// `connections` echo clients until `stop`.
pub fn load(addr: SocketAddr, connections: usize, stop: &AtomicBool) -> anyhow::Result<Counted> {
    let tally = Arc::new(Tally::default());
    let t = Arc::clone(&tally);
    super::run_until(stop, move |flag| {
        async move {
            let tasks: Vec<_> = (0..connections)
                .map(|c| tokio::spawn(client(addr, c, Arc::clone(&flag), Arc::clone(&t))))
                .collect();
            for task in tasks {
                let _ = task.await;
            }
        }
        .boxed()
    })?;
    Ok(tally.counted())
}

/// How one line ended.
enum Answer {
    Echoed,
    /// `BYE`: the server refused it unprocessed and closes.
    Refused,
    Lost(String),
}

async fn client(addr: SocketAddr, c: usize, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut seq = 0u64;
    // A line the server's goodbye refused, and how often: the next connection's first line.
    // It is sent again even once the run is stopping, so that it ends answered or lost.
    let mut refused: Option<(String, u32)> = None;
    while !stop.load(Ordering::Relaxed) || refused.is_some() {
        let mut conn = match TcpStream::connect(addr).await {
            Ok(s) => BufReader::new(s),
            Err(e) => {
                match refused.take() {
                    Some((line, _)) => tally.refused_again(|| format!("echo {line:?}: {e}")),
                    None => tally.refused(|| format!("connect: {e}")),
                }
                tokio::time::sleep(REFUSED_PAUSE).await;
                continue;
            }
        };
        let _ = conn.get_ref().set_nodelay(true);
        for _ in 0..SESSION {
            let (line, tries) = match refused.take() {
                Some(again) => again,
                None if stop.load(Ordering::Relaxed) => break,
                None => {
                    seq += 1;
                    tally.sent();
                    (format!("c{c} m{seq}\n"), 0)
                }
            };
            match exchange(&mut conn, &line).await {
                Answer::Echoed => {}
                Answer::Refused if tries < MAX_RETRIES => {
                    tally.retried();
                    refused = Some((line, tries + 1));
                    break;
                }
                Answer::Refused => {
                    tally.lost(|| format!("echo {line:?}: refused {tries} times"));
                    break;
                }
                Answer::Lost(why) => {
                    tally.lost(|| format!("echo {line:?}: {why}"));
                    break;
                }
            }
        }
        // Our FIN, then theirs (after a `BYE` the server already sent its FIN).
        let _ = conn.get_mut().shutdown().await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(ANSWER_TIMEOUT, conn.read_to_end(&mut rest)).await;
    }
}

async fn exchange(conn: &mut BufReader<TcpStream>, line: &str) -> Answer {
    let mut answer = String::new();
    let answered = async {
        conn.get_mut().write_all(line.as_bytes()).await?;
        conn.read_line(&mut answer).await
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, answered).await {
        Err(_) => Answer::Lost(format!("no answer within {ANSWER_TIMEOUT:?}")),
        Ok(Err(e)) => Answer::Lost(format!("{e} (answer so far {answer:?})")),
        Ok(Ok(_)) if answer == line => Answer::Echoed,
        Ok(Ok(_)) if answer == "BYE\n" => Answer::Refused,
        Ok(Ok(0)) => Answer::Lost("EOF instead of the echo".into()),
        Ok(Ok(_)) => Answer::Lost(format!("answer {answer:?}")),
    }
}
