//! The HTTP/1 header read timeout, kept by the SDK instead of hyper: nothing per request but
//! the counters the drain keeps anyway, and no tokio timer pending.
//!
//! hyper's own (`http1::Builder::header_read_timeout` with a timer) costs every keep-alive
//! request a boxed sleep and, worse, one more pass of its dispatcher: once a response is done
//! it wakes itself again only to start the next head's timer (`State::idle` sets
//! `notify_read`). Counted with callgrind (`bench/scripts/instructions-per-request.sh`), that
//! was 1 077 of a worker's 9 807 instructions per request, 11 %.
//!
//! Here hyper has no timer. A connection's [`HeaderDeadline`] reads its [`Activity`] on each
//! sweep of its `serve_http`'s [`Bell`] (a kernel timer, every [`sweep_period`]): the
//! connection waits for a request head whenever every head that arrived has been answered
//! (the response's body dropped by hyper), and that wait is over once a new head arrives.
//! A wait that lasts the timeout closes the connection, as hyper's timeout does (no response).
//! What restarts the wait: a request answered, and a write that took response bytes (hyper
//! may still be flushing the tail of the last response to a slow reader). What does not:
//! bytes that arrive without completing a head, so a client that trickles one is cut.
//!
//! [`sweep_period`]: crate::ticker::sweep_period
//! [`Bell`]: crate::watch::Bell

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::http_conn::{Activity, Sample};
use crate::watch::Due;

/// The header read timeout of one HTTP/1 connection.
pub(crate) struct HeaderDeadline {
    activity: Arc<Activity>,
    timeout: Duration,
    /// What the last sweep saw, and since when the counters that restart the wait have not
    /// changed.
    seen: Mutex<(Sample, Instant)>,
    /// A sweep found the wait over; the connection's task checks again and closes.
    due: AtomicBool,
}

impl HeaderDeadline {
    /// Starts waiting for the first head at `now`.
    pub(crate) fn new(activity: Arc<Activity>, timeout: Duration, now: Instant) -> Arc<Self> {
        let sample = activity.sample();
        Arc::new(Self {
            activity,
            timeout,
            seen: Mutex::new((sample, now)),
            due: AtomicBool::new(false),
        })
    }

    /// What the connection's task asks after polling its connection: true once a sweep found
    /// the connection waiting for a head for the whole timeout and it still is (its connection
    /// was polled first, so a head that arrived meanwhile has been read). The task is woken for
    /// it through its registration in the `Bell` this deadline is registered with as `Due`.
    pub(crate) fn poll_due(&self) -> bool {
        if !self.due.load(Ordering::Relaxed) {
            return false;
        }
        if self.still_due() {
            return true;
        }
        self.due.store(false, Ordering::Relaxed);
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Sample, Instant)> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the wait is over: the connection is idle and nothing that restarts the wait
    /// happened since the sweep that found it due.
    fn still_due(&self) -> bool {
        let now = self.activity.sample();
        let (seen, _) = *self.lock();
        now.idle() && !restarts(&seen, &now)
    }
}

/// Whether `now` differs from `seen` by something that restarts the wait for a head.
fn restarts(seen: &Sample, now: &Sample) -> bool {
    seen.heads != now.heads || seen.ends != now.ends || seen.writes != now.writes
}

impl Due for HeaderDeadline {
    fn mark_due(&self, now: Instant) -> bool {
        let sample = self.activity.sample();
        let mut seen = self.lock();
        if restarts(&seen.0, &sample) {
            *seen = (sample, now);
            return false;
        }
        seen.0 = sample;
        if !sample.idle() || now.saturating_duration_since(seen.1) < self.timeout {
            return false;
        }
        // Woken once per verdict; the task clears it if a head came meanwhile.
        !self.due.swap(true, Ordering::Relaxed)
    }
}

#[cfg(test)]
#[path = "header_deadline_tests.rs"]
mod tests;
