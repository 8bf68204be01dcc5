//! Raw stream serving: one handler task per connection, drained by the handlers themselves.

use std::future::Future;
use std::io;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::drain::Drain;
use crate::net::Stream;
use crate::Worker;

impl Worker {
    /// Serves raw connections (TCP or unix) on every listener until drained: `handler` runs on
    /// its own task for every accepted connection, with this worker's [`Drain`].
    ///
    /// Accept loops start on every listener, then the worker reports
    /// [ready](Worker::ready). When the host asks to drain, the loops stop accepting (the
    /// listeners are dropped) and this waits for every handler task to finish: handlers of
    /// long-lived connections must watch their `Drain` and wind down (for TCP, a clean
    /// `shutdown()` of the write side is polite). A panicking handler is logged and does not
    /// stop the others. Every connection counts as a request toward `max_requests`.
    pub async fn serve_tcp<H, Fut>(self, handler: H) -> io::Result<()>
    where
        H: Fn(Stream, Drain) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listeners = self.listen()?;
        let drain = self.drain();
        let (tx, mut accepted) = mpsc::channel(crate::net::ACCEPT_QUEUE);
        crate::net::spawn_accept_loops(listeners, &drain, tx);
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

fn report(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            crate::error!("connection handler panicked; connection closed");
        }
    }
}
