//! hyper's HTTP/1 header read timeout without a timer-wheel operation per request: one
//! tokio sleep per connection ([`HeaderTimeout`]) stands for the sleeps hyper asks for.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
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

    /// The future the connection's task polls beside the connection: never completes.
    pub(crate) fn watch(self: &Arc<Self>) -> HeaderTimeout {
        HeaderTimeout {
            deadline: Arc::clone(self),
            armed: 0,
            done: 0,
            sleep: None,
            waker: None,
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

/// The one tokio sleep of a connection's header read timeout (see [`HeaderDeadline`]).
#[derive(Debug)]
pub(crate) struct HeaderTimeout {
    deadline: Arc<HeaderDeadline>,
    /// The deadline `sleep` is set to (ns after `base`; 0: not armed).
    armed: u64,
    /// The latest deadline marked passed.
    done: u64,
    /// Made at the first deadline, then reset.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The waker `sleep` was last polled with since it was (re)set.
    waker: Option<Waker>,
}

impl Future for HeaderTimeout {
    type Output = std::convert::Infallible;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            let wanted = this.deadline.wanted.load(Ordering::Relaxed);
            // A deadline not handled yet: arm for it unless armed for an earlier one already
            // (deadlines only grow; the early firing re-arms below).
            if wanted > this.done && (this.armed == 0 || wanted < this.armed) {
                this.arm(wanted);
            }
            let Some(sleep) = this.sleep.as_mut().filter(|_| this.armed != 0) else {
                return Poll::Pending;
            };
            // Polling tokio's sleep on every wake-up of the task would cost more than the rest
            // of this: once it has the task's waker, its elapsed flag is enough.
            let registered = this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if registered && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            if sleep.as_mut().poll(cx).is_pending() {
                this.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            // Fired: everything up to the armed deadline has passed.
            this.done = this.armed;
            this.armed = 0;
            this.deadline.passed.store(this.done, Ordering::Relaxed);
            if this.deadline.wanted.load(Ordering::Relaxed) > this.done {
                // Fired for an old deadline: wait for the newest one.
                continue;
            }
            // hyper's sleep (polled by the connection, before us) is due: poll it again.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
    }
}

impl HeaderTimeout {
    fn arm(&mut self, at: u64) {
        self.armed = at;
        // Poll the (re)set sleep at least once.
        self.waker = None;
        let at = Instant::from_std(self.deadline.base + Duration::from_nanos(at));
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }
}
