//! `echo`: a raw TCP app (no HTTP): every line a client sends comes back.
//!
//! # Protocol
//!
//! - The client sends lines ending in `\n`, of at most [`MAX_LINE`] bytes; the server answers
//!   each with the same line, in order. A longer line closes the connection.
//! - **Goodbye.** When the worker drains, the server answers every complete line it has
//!   already received, writes the line `BYE` and closes (FIN, not a reset). `BYE` means:
//!   *every line before it was answered; nothing sent after the last answer will be: resend
//!   what is unanswered on a new connection.* A partial line is never answered (it is resent
//!   whole). An idle connection gets its `BYE` as soon as the drain starts.
//! - `BYE` is reserved: a client that sends the line `BYE` ends its session the same way (the
//!   server answers `BYE` and closes), so an answer `BYE` always means the connection ends.
//!
//! A client that follows the goodbye loses nothing across rolls, recycles and resizes: see
//! the loss matrix in BENCHMARKS.md. The goodbye's transport part (FIN, then read until the
//! client's FIN, bounded) is [`angel::Stream::goodbye`].

use angel::tokio::io::{AsyncReadExt, AsyncWriteExt};
use angel::{Drain, Stream};

/// The longest line the server buffers (newline included); a client sending more without a
/// newline is cut off rather than allowed to grow the worker's memory.
pub const MAX_LINE: usize = 64 * 1024;

/// The goodbye line, and the line a client may send to end its session.
const BYE: &[u8] = b"BYE\n";

/// Bytes read per `read` call.
const READ_CHUNK: usize = 16 * 1024;

/// At most this many reads are answered once the drain started: "what already arrived" is at
/// most a socket buffer or so, and a client that pipelines flat out must not keep a draining
/// worker answering forever. The rest is refused by the goodbye and resent by the client.
const DRAIN_READS: usize = 16;

async fn main(worker: angel::Worker) -> Result<(), angel::BoxError> {
    worker.serve_tcp(echo).await?;
    Ok(())
}

angel::export!(main);

async fn echo(mut stream: Stream, drain: Drain) {
    if let Err(e) = serve(&mut stream, &drain).await {
        angel::debug!("echo connection: {e}");
    }
}

/// What the connection does after answering the complete lines received so far.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Read,
    /// The client sent `BYE`.
    Goodbye,
}

async fn serve(stream: &mut Stream, drain: &Drain) -> std::io::Result<()> {
    // Received and not answered yet: after each `answer`, at most one incomplete line.
    let mut pending = Vec::with_capacity(READ_CHUNK);
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        angel::tokio::select! {
            biased;
            () = drain.drained() => break,
            n = stream.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    // The client closed its side (a partial line is not a line): close ours.
                    return stream.shutdown().await;
                }
                pending.extend_from_slice(&buf[..n]);
                // Not raced against the drain: an answer in progress always completes.
                if answer(stream, &mut pending).await? == Next::Goodbye {
                    return stream.goodbye(BYE).await;
                }
            }
        }
    }
    // Draining: answer what already arrived (reads that are ready at once), then goodbye.
    for _ in 0..DRAIN_READS {
        let ready = angel::tokio::time::timeout(std::time::Duration::ZERO, stream.read(&mut buf));
        match ready.await {
            Err(_) => break, // nothing more has arrived
            Ok(read) => match read? {
                0 => break,
                n => {
                    pending.extend_from_slice(&buf[..n]);
                    if answer(stream, &mut pending).await? == Next::Goodbye {
                        break;
                    }
                }
            },
        }
    }
    stream.goodbye(BYE).await
}

/// Echoes every complete line of `pending` (one write), keeps the incomplete rest.
async fn answer(stream: &mut Stream, pending: &mut Vec<u8>) -> std::io::Result<Next> {
    let (complete, next) = split_lines(pending);
    if complete > 0 {
        stream.write_all(&pending[..complete]).await?;
        pending.drain(..complete);
    }
    if next == Next::Goodbye {
        return Ok(next);
    }
    if pending.len() >= MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE} bytes"),
        ));
    }
    Ok(Next::Read)
}

/// How many bytes of `pending` are complete lines to echo, stopping before a `BYE` line.
fn split_lines(pending: &[u8]) -> (usize, Next) {
    let mut at = 0;
    while let Some(nl) = pending[at..].iter().position(|&b| b == b'\n') {
        let end = at + nl + 1;
        if &pending[at..end] == BYE {
            return (at, Next::Goodbye);
        }
        at = end;
    }
    (at, Next::Read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_lines_are_answered_and_a_partial_line_waits() {
        assert_eq!(split_lines(b"a\nbc\nd"), (5, Next::Read));
        assert_eq!(split_lines(b"partial"), (0, Next::Read));
        assert_eq!(split_lines(b""), (0, Next::Read));
    }

    #[test]
    fn a_bye_line_from_the_client_ends_the_session_after_the_lines_before_it() {
        assert_eq!(split_lines(b"a\nBYE\nb\n"), (2, Next::Goodbye));
        assert_eq!(split_lines(b"BYE\n"), (0, Next::Goodbye));
        // Only the whole line is reserved.
        assert_eq!(split_lines(b"BYES\nxBYE\n"), (10, Next::Read));
    }
}
