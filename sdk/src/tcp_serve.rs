//! Raw stream serving: one handler task per connection, drained by the handlers themselves.
//!
//! # Raw TCP has no close of its own: a protocol says goodbye
//!
//! HTTP/1 has `Connection: close` and HTTP/2 has GOAWAY: a server that stops can tell its
//! client which requests it answered and which the client must send elsewhere. A bare FIN says
//! neither: a client that wrote its next message while the draining server closed reads EOF
//! and cannot know whether that message was processed. So a raw TCP protocol that must lose
//! nothing across rolls needs a **goodbye** of its own, with this meaning: *everything before
//! the goodbye was answered; nothing sent after the last answer will be; resend what is
//! unanswered on a new connection* (the rule an HTTP/2 client follows for streams above a
//! GOAWAY's last stream id).
//!
//! The handler does the protocol's part: on [`Drain::drained`] it answers what it has
//! already read (a read that is ready at once), and no more. [`Stream::goodbye`] does the
//! transport's part, which is the same for every protocol: write the goodbye, send FIN, and
//! keep reading (discarding) until the client's FIN, so that bytes the client sent in the
//! meantime do not turn the close into a reset that could destroy the goodbye before the
//! client reads it. An idle connection gets its goodbye as soon as the drain starts, so drains
//! end in milliseconds, far inside `--graceful-timeout`. `examples/echo` is the model.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::drain::Drain;
use crate::net::Stream;
use crate::Worker;

/// How long [`Stream::goodbye`] waits for the client's FIN after sending its own. A client
/// that follows the goodbye closes at once; this only bounds one that does not, well inside
/// any sane `--graceful-timeout`. Closing a socket with unread data makes the kernel send RST
/// instead of FIN, which is why the wait reads rather than sleeps.
pub const GOODBYE_LINGER: Duration = Duration::from_secs(2);

impl Worker {
    /// Serves raw connections (TCP or unix) on every listener until drained: `handler` runs on
    /// its own task for every accepted connection, with this worker's [`Drain`].
    ///
    /// Accept loops start on every listener, then the worker reports
    /// [ready](Worker::ready). When the host asks to drain, the loops stop accepting (the
    /// listeners are dropped) and this waits for every handler task to finish: handlers of
    /// long-lived connections must watch their `Drain` and wind down — answer what they have
    /// read, then say their protocol's goodbye with [`Stream::goodbye`] (see the
    /// [module docs](self) for why a bare close loses messages). A panicking handler is logged
    /// and does not stop the others. Every connection counts as a request toward
    /// `max_requests`.
    pub async fn serve_tcp<H, Fut>(self, handler: H) -> io::Result<()>
    where
        H: Fn(Stream, Drain) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listeners = self.listen()?;
        let drain = self.drain();
        let (tx, mut accepted) = mpsc::channel(crate::accept::ACCEPT_QUEUE);
        crate::accept::spawn_accept_loops(listeners, &drain, tx);
        self.ready();

        let mut handlers = JoinSet::new();
        loop {
            tokio::select! {
                stream = accepted.recv() => match stream {
                    Some(stream) => {
                        self.count_request();
                        handlers.spawn(handler(stream, drain.clone()));
                    }
                    // Every accept loop stopped: draining.
                    None => break,
                },
                Some(done) = handlers.join_next(), if !handlers.is_empty() => report(done),
            }
        }
        drain.drained().await;
        crate::debug!(
            "draining: stopped accepting, {} connections open",
            handlers.len()
        );
        while let Some(done) = handlers.join_next().await {
            report(done);
        }
        Ok(())
    }
}

impl Stream {
    /// Ends the connection with a goodbye: writes `last_words` (the protocol's goodbye, e.g.
    /// `b"BYE\n"`; may be empty), sends FIN, then reads and discards until the client's FIN,
    /// for at most [`GOODBYE_LINGER`]. The close is then a FIN, never a reset, so the client
    /// reads the goodbye whatever it sent meanwhile.
    ///
    /// Call it after answering everything the protocol's goodbye claims was answered: nothing
    /// read from here on is processed.
    pub async fn goodbye(&mut self, last_words: &[u8]) -> io::Result<()> {
        self.goodbye_within(last_words, GOODBYE_LINGER).await
    }

    async fn goodbye_within(&mut self, last_words: &[u8], linger: Duration) -> io::Result<()> {
        self.write_all(last_words).await?;
        self.shutdown().await?;
        let mut discard = [0u8; 4096];
        let until_fin = async {
            while self.read(&mut discard).await? > 0 {}
            Ok::<(), io::Error>(())
        };
        match tokio::time::timeout(linger, until_fin).await {
            Ok(read) => read,
            // The client kept the connection open: close it anyway (bounded by design).
            Err(_) => Ok(()),
        }
    }
}

fn report(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            crate::error!("connection handler panicked; connection closed");
        }
    }
}

#[cfg(test)]
#[path = "tcp_serve_tests.rs"]
mod tests;
