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
//! and each `serve_http`'s [`Bell`] sweeps its connections' header read deadlines on another.
//!
//! [`Bell`]: crate::watch::Bell

// Without `http`, only the heartbeat's `Periodic` is used.
#![cfg_attr(not(feature = "http"), allow(dead_code))]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

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

/// How often a [`Bell`](crate::watch::Bell) sweeps for a header read timeout of `timeout`: an eighth of it,
/// between 10 ms and 1 s (the default 30 s timeout is enforced within 30–31 s).
pub(crate) fn sweep_period(timeout: Duration) -> Duration {
    (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
}
