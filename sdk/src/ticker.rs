//! The SDK's own long-running timers as kernel timers (`timerfd`) in the runtime's epoll set,
//! not tokio timers.
//!
//! While any tokio timer is pending, tokio's driver gives `epoll_wait` a timeout, and the
//! kernel serves every blocking wait that has one with a high-resolution timer it sets up and
//! cancels again (`select_estimate_accuracy`, `hrtimer_start_range_ns`, their locks). A
//! worker under load blocks in `epoll_wait` every few requests, so that cost is per request.
//! Measured with `bench/scripts/cpu-per-request.py`'s reference server, 10 interleaved rounds:
//! one idle 1 s tokio timer in each process (`plain-hyper --http1 --idle-timer`) cost 5 % more
//! CPU per request and 6 % less throughput. The SDK had two such timers pending at all times:
//! the heartbeat's interval and each connection's header read deadline.
//!
//! A [`Periodic`] is a timerfd the kernel fires by itself, however the worker waits; with
//! nothing else pending, `epoll_wait` blocks without a timeout. The heartbeat ticks on one,
//! and [`Deadlines`] sweeps the header read deadlines of one `serve_http` on another.

// Without `http`, only the heartbeat's `Periodic` is used.
#![cfg_attr(not(feature = "http"), allow(dead_code))]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::slots::Slots;

/// A periodic kernel timer, readable once per period (`CLOCK_MONOTONIC`).
#[derive(Debug)]
pub(crate) struct Periodic {
    fd: AsyncFd<OwnedFd>,
}

impl Periodic {
    /// Fires every `period` (at least 1 ms), starting one period from now. Must be called
    /// within a tokio runtime with I/O enabled.
    pub(crate) fn new(period: Duration) -> io::Result<Self> {
        let period = period.max(Duration::from_millis(1));
        // SAFETY: timerfd_create takes no pointers; the result is checked before use.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new timerfd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let spec = libc::timespec {
            tv_sec: libc::time_t::try_from(period.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(period.subsec_nanos() as i32),
        };
        let value = libc::itimerspec {
            it_interval: spec,
            it_value: spec,
        };
        // SAFETY: `fd` is a valid timerfd, `value` a valid itimerspec for the call's
        // duration, and a null old value is allowed.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &value, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an `OwnedFd` is open for as long as it is owned and always returns the same
        // fd; the `AsyncFd` owns it until it drops.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Waits for the next expiry (at once if one passed since the last call).
    pub(crate) async fn tick(&self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into `expirations`, which has 8.
            let n = unsafe {
                libc::read(
                    self.fd.get_ref().as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if n == 8 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock => ready.clear_ready(),
                io::ErrorKind::Interrupted => {}
                _ => return Err(error),
            }
        }
    }
}

/// Something [`Deadlines`] looks at on every sweep.
pub(crate) trait Due: Send + Sync {
    /// Marks what is due by now; true if the waiting task should be woken.
    fn mark_due(&self, now: std::time::Instant) -> bool;
}

/// The header read deadlines of one `serve_http`'s connections, swept every period of a
/// [`Periodic`]: a deadline is seen at most one period after it passed.
#[derive(Default)]
pub(crate) struct Deadlines {
    entries: Mutex<Slots<(Arc<dyn Due>, Waker)>>,
}

impl Deadlines {
    /// Registers `due` with the waker of the task to wake when it is; returns its slot, to
    /// pass again when the task's waker changes and to [`Deadlines::remove`].
    pub(crate) fn register(&self, slot: Option<usize>, due: &Arc<dyn Due>, waker: Waker) -> usize {
        self.lock().put(slot, (Arc::clone(due), waker))
    }

    pub(crate) fn remove(&self, slot: usize) {
        self.lock().remove(slot);
    }

    /// Marks every deadline that passed by `now` and wakes its task.
    pub(crate) fn sweep(&self, now: std::time::Instant) {
        let wake: Vec<Waker> = self
            .lock()
            .iter()
            .filter(|(due, _)| due.mark_due(now))
            .map(|(_, waker)| waker.clone())
            .collect();
        for waker in wake {
            waker.wake();
        }
    }

    /// Sweeps every `period` until the runtime ends (or its timer fails: then the deadlines
    /// fall back to nothing, which only leaves slow clients unclosed; the error is logged).
    pub(crate) async fn run(self: Arc<Self>, period: Duration) {
        let ticks = match Periodic::new(period) {
            Ok(ticks) => ticks,
            Err(e) => {
                crate::warn!("no header read timeout: cannot create its timer: {e}");
                return;
            }
        };
        loop {
            if let Err(e) = ticks.tick().await {
                crate::warn!("no header read timeout: its timer failed: {e}");
                return;
            }
            self.sweep(tokio::time::Instant::now().into_std());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots<(Arc<dyn Due>, Waker)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How often [`Deadlines`] sweeps for a header read timeout of `timeout`: an eighth of it,
/// between 10 ms and 1 s (the default 30 s timeout is enforced within 30–31 s).
pub(crate) fn sweep_period(timeout: Duration) -> Duration {
    (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// A registration that keeps its task's waker current and leaves [`Deadlines`] when dropped.
pub(crate) struct Registration {
    deadlines: Arc<Deadlines>,
    due: Arc<dyn Due>,
    slot: Option<usize>,
    waker: Option<Waker>,
}

impl Registration {
    pub(crate) fn new(deadlines: Arc<Deadlines>, due: Arc<dyn Due>) -> Self {
        Self {
            deadlines,
            due,
            slot: None,
            waker: None,
        }
    }

    /// Registers the task polling now, unless it is the one registered already (one
    /// comparison per poll then).
    pub(crate) fn poll_register(&mut self, cx: &mut Context<'_>) -> Poll<std::convert::Infallible> {
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let waker = cx.waker().clone();
        self.slot = Some(self.deadlines.register(self.slot, &self.due, waker.clone()));
        self.waker = Some(waker);
        Poll::Pending
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            self.deadlines.remove(slot);
        }
    }
}
