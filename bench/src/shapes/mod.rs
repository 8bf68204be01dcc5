//! The loss matrix's traffic shapes beyond HTTP/1: each a client that follows its protocol's
//! goodbye, and counts by one rule.
//!
//! **The rule** (the same for every protocol): a request the server *refused unprocessed*
//! by its protocol's goodbye is sent again (counted in `retried`, not again in `sent`);
//! everything else that does not end in a whole, correct answer is **lost**. Goodbyes:
//! - HTTP/2: GOAWAY — a stream above its last stream id, or `REFUSED_STREAM`, or a request
//!   that never left the client (hyper's `Canceled`) ([`h2`]);
//! - raw TCP echo: the line `BYE` instead of the echo ([`echo`]; `examples/echo` documents it);
//! - WebSocket: a Close frame with code 1001 (going away) instead of the echo: the server
//!   sends no data after its Close and processes nothing after it ([`ws`]);
//! - a long HTTP/1 response has none: a stream cut before its last line is lost ([`stream`]).
//!
//! A request that never reached a connection is counted in `refused` (and in `sent`): a
//! connect refused with `ECONNREFUSED`, or, with hyper-util's pool, a request that waited for a
//! connection whose connect failed (a `Connect` error). A connection the kernel accepted and
//! then reset before the request was answered (a WebSocket handshake) is lost like any other.

pub mod echo;
pub mod h2;
pub mod stream;
pub mod ws;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How many of the first failures a tally keeps, for diagnosis.
const SAMPLES: usize = 8;

/// A request that takes longer than this is lost.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// After a failed connect a client waits this long before the next one: during a graceful
/// stop every connect fails at once, and a client must not spin on them.
pub const REFUSED_PAUSE: Duration = Duration::from_millis(5);

/// A request refused this many times in a row is lost.
pub const MAX_RETRIES: u32 = 5;

/// Counts shared by every connection task of one load.
#[derive(Debug, Default)]
pub struct Tally {
    sent: AtomicU64,
    lost: AtomicU64,
    refused: AtomicU64,
    retried: AtomicU64,
    samples: Mutex<Vec<String>>,
}

/// What one load saw.
#[derive(Debug, Clone, Default)]
pub struct Counted {
    /// Requests (messages, streams) sent once each, plus failed connects.
    pub sent: u64,
    /// Sent and not answered, by the rule above.
    pub lost: u64,
    /// Connects that failed.
    pub refused: u64,
    /// Sends again of what a goodbye refused.
    pub retried: u64,
    pub samples: Vec<String>,
}

impl Tally {
    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }

    pub fn lost(&self, why: impl FnOnce() -> String) {
        self.lost.fetch_add(1, Ordering::Relaxed);
        self.sample(why);
    }

    /// A failed connect: sent and refused.
    pub fn refused(&self, why: impl FnOnce() -> String) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.sample(why);
    }

    /// A failed connect for something already counted as sent (a resend): refused only.
    pub fn refused_again(&self, why: impl FnOnce() -> String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.sample(why);
    }

    fn sample(&self, why: impl FnOnce() -> String) {
        if let Ok(mut s) = self.samples.lock() {
            if s.len() < SAMPLES {
                s.push(why());
            }
        }
    }

    pub fn counted(&self) -> Counted {
        Counted {
            sent: self.sent.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            samples: self.samples.lock().map(|s| s.clone()).unwrap_or_default(),
        }
    }
}

/// Runs `body` on a current-thread runtime of its own until it returns, setting a `'static`
/// stop flag once the caller's `stop` is set (the connection tasks need one they can own).
pub fn run_until(
    stop: &AtomicBool,
    body: impl FnOnce(std::sync::Arc<AtomicBool>) -> futures_util::future::BoxFuture<'static, ()>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    runtime.block_on(async {
        let load = tokio::spawn(body(std::sync::Arc::clone(&flag)));
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        flag.store(true, Ordering::Relaxed);
        load.await
    })?;
    Ok(())
}

/// Whether hyper-util's pooled client never got a connection for the request (its `Connect`
/// errors: the TCP connect failed, or the request waited for a connect that failed, which the
/// pool reports as "request was canceled"): nothing was sent.
pub fn never_connected(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(hyper_util::client::legacy::Error::is_connect)
        || refused_at_connect(e)
}

/// Whether the connect was refused (`ECONNREFUSED`: nothing listens, nothing was sent). A
/// connection the kernel accepted and then reset is not refused: what was sent on it is lost.
pub fn refused_at_connect(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// An error and its causes, on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
