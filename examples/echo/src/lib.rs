//! `echo`: a raw TCP app (no HTTP): every byte a client sends comes back.
//!
//! On drain, each connection finishes echoing what it already received, sends FIN
//! (`shutdown()` of its write side) and closes without a reset: it reads — and discards — until
//! the client closes its side too, for at most [`LINGER_AFTER_FIN`].

use std::time::Duration;

use angel::tokio::io::{AsyncReadExt, AsyncWriteExt};
use angel::{Drain, Stream};

/// How long a drained connection waits for the client's FIN after sending its own. Closing a
/// socket with unread data makes the kernel send RST instead of FIN, so we keep reading a while.
const LINGER_AFTER_FIN: Duration = Duration::from_secs(2);

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

async fn serve(stream: &mut Stream, drain: &Drain) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        angel::tokio::select! {
            biased;
            () = drain.drained() => break,
            n = stream.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    // The client closed its side: close ours.
                    return stream.shutdown().await;
                }
                // Not raced against the drain: a write in progress always completes.
                stream.write_all(&buf[..n]).await?;
            }
        }
    }
    // Echo what already arrived (a read that is ready at once), then FIN.
    while let Ok(read) = angel::tokio::time::timeout(Duration::ZERO, stream.read(&mut buf)).await {
        match read? {
            0 => break,
            n => stream.write_all(&buf[..n]).await?,
        }
    }
    stream.shutdown().await?;
    // Wait for the client's FIN, discarding anything else, so the close is not a reset.
    let _ = angel::tokio::time::timeout(LINGER_AFTER_FIN, async {
        while stream.read(&mut buf).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
    Ok(())
}
