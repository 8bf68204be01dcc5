//! hyper's HTTP/1 header read timeout without a timer-wheel operation per request, and
//! without a tokio timer pending: the sleeps hyper asks for only record their deadline, and
//! one sweep per `serve_http` ([`Deadlines`], on a kernel timer) finds those that passed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::ticker::{Deadlines, Due, Registration};
use std::time::Duration;

use tokio::time::Instant;

/// hyper's header read timeout for one HTTP/1 connection, without a timer-wheel operation per
/// request.
///
/// hyper asks its [`hyper::rt::Timer`] for a new sleep each time it starts waiting for a
/// request head and drops it once the head arrived; with tokio's timer that is an insert into
/// and a removal from the timer wheel for every keep-alive request (measured: 1.3 % of a
/// worker's CPU time). Here hyper's sleep only records its deadline ([`HeaderSleep`]), and one
/// tokio sleep per connection ([`HeaderTimeout`], polled by the connection's task) fires at
/// the earliest deadline it has seen, re-arming itself for a later one when it fires early;
/// once a deadline has passed it marks it so, and wakes the task, whose next poll of the
/// connection lets hyper see its sleep complete and close the connection as it always does.
#[derive(Debug)]
pub(crate) struct HeaderDeadline {
    base: std::time::Instant,
    /// The latest deadline hyper asked for, in ns after `base` (0: none yet).
    wanted: AtomicU64,
    /// Every deadline up to this (ns after `base`) has passed.
    passed: AtomicU64,
}

impl HeaderDeadline {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            // A little in the past, so that no deadline maps to 0.
            base: now()
                .checked_sub(Duration::from_millis(1))
                .unwrap_or_else(now),
            wanted: AtomicU64::new(0),
            passed: AtomicU64::new(0),
        })
    }

    fn nanos(&self, at: std::time::Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// hyper's timer for this connection.
    pub(crate) fn timer(self: &Arc<Self>) -> HeaderTimer {
        HeaderTimer(Arc::clone(self))
    }

    /// The future the connection's task polls beside the connection (never completes): its
    /// deadlines are swept by `deadlines`; none without (no header read timeout).
    pub(crate) fn watch(self: &Arc<Self>, deadlines: Option<&Arc<Deadlines>>) -> HeaderTimeout {
        HeaderTimeout {
            registration: deadlines.map(|d| {
                let due: Arc<dyn Due> = Arc::clone(self) as Arc<dyn Due>;
                Registration::new(Arc::clone(d), due)
            }),
        }
    }
}

/// tokio's clock (the same as std's, unless a test paused it).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// The [`hyper::rt::Timer`] of [`HeaderDeadline`].
#[derive(Debug, Clone)]
pub(crate) struct HeaderTimer(Arc<HeaderDeadline>);

impl hyper::rt::Timer for HeaderTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(now() + duration)
    }

    fn now(&self) -> std::time::Instant {
        now()
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeaderSleep {
            at: self.0.nanos(deadline),
            deadline: Arc::clone(&self.0),
        })
    }
}

/// hyper's sleep: ready once its deadline has passed; polling it only records the deadline.
#[derive(Debug)]
struct HeaderSleep {
    at: u64,
    deadline: Arc<HeaderDeadline>,
}

impl Future for HeaderSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        // No waker to keep: `HeaderTimeout` lives in the same task and wakes it.
        if self.deadline.passed.load(Ordering::Relaxed) >= self.at {
            return Poll::Ready(());
        }
        self.deadline.wanted.store(self.at, Ordering::Relaxed);
        Poll::Pending
    }
}

impl hyper::rt::Sleep for HeaderSleep {}

/// What a connection's task polls beside the connection for its header read timeout: keeps
/// the connection's [`HeaderDeadline`] registered, with the task's waker, in its
/// `serve_http`'s [`Deadlines`], whose sweep marks a passed deadline and wakes the task; then
/// hyper's sleep completes and hyper closes the connection as it always does. Never completes.
pub(crate) struct HeaderTimeout {
    registration: Option<Registration>,
}

impl Future for HeaderTimeout {
    type Output = std::convert::Infallible;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.registration {
            Some(registration) => registration.poll_register(cx),
            None => Poll::Pending,
        }
    }
}

impl Due for HeaderDeadline {
    fn mark_due(&self, now: std::time::Instant) -> bool {
        let wanted = self.wanted.load(Ordering::Relaxed);
        if wanted == 0 || wanted <= self.passed.load(Ordering::Relaxed) || self.nanos(now) < wanted
        {
            return false;
        }
        // Deadlines only grow: every one up to `wanted` has passed.
        self.passed.store(wanted, Ordering::Relaxed);
        true
    }
}
