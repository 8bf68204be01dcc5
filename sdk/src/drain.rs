//! The drain signal: the host makes `Context::drain_fd` readable once when the worker must stop
//! accepting and finish its in-flight work; the SDK turns that into a [`Drain`] every handler
//! can check or await.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

/// Tells whether this worker is draining, and lets a task wait until it is.
///
/// Cheap to clone. Get the handle of the running worker anywhere with [`crate::drain()`] or
/// [`Worker::drain`](crate::Worker::drain). Long-lived handlers (streaming responses, websockets,
/// raw TCP sessions) should await [`Drain::drained`] and then finish up: the host kills a worker
/// that is still alive after its graceful timeout.
#[derive(Clone, Debug)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    draining: AtomicBool,
    /// Kept here (not in the trigger) so that receivers never see a closed channel.
    tx: watch::Sender<bool>,
}

/// Starts the drain of the [`Drain`] handles made with it. Only the SDK holds one.
#[derive(Debug, Clone)]
pub(crate) struct DrainTrigger {
    inner: Arc<Inner>,
}

/// A fresh, not yet draining signal.
pub(crate) fn channel() -> (DrainTrigger, Drain) {
    let inner = Arc::new(Inner {
        draining: AtomicBool::new(false),
        tx: watch::Sender::new(false),
    });
    (
        DrainTrigger {
            inner: Arc::clone(&inner),
        },
        Drain { inner },
    )
}

impl Drain {
    /// Whether the worker is draining (one atomic load).
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Completes once the worker starts draining (at once if it already is).
    ///
    /// Cancel-safe: dropping the future before it completes has no effect.
    pub async fn drained(&self) {
        if self.is_draining() {
            return;
        }
        let mut rx = self.inner.tx.subscribe();
        // The sender lives in `inner`, which `self` keeps alive: the channel never closes.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

impl DrainTrigger {
    /// Starts the drain (idempotent).
    pub(crate) fn fire(&self) {
        self.inner.draining.store(true, Ordering::Release);
        self.inner.tx.send_replace(true);
    }
}

/// Duplicates the host's drain fd (the host keeps and closes the original) and registers it with
/// the current tokio runtime. Must run inside the runtime.
pub(crate) fn watch_fd(fd: RawFd) -> io::Result<AsyncFd<OwnedFd>> {
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid drain fd {fd}"),
        ));
    }
    // SAFETY: the ABI guarantees the context's fds stay open for the whole entry call, and this
    // borrow ends right after the dup below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    // dup with CLOEXEC. The dup shares the host's open file description, so we never read from
    // it nor change its flags: only its readiness matters. epoll reports an fd that is already
    // readable at registration, so a drain requested before we got here is not missed.
    let owned = borrowed.try_clone_to_owned()?;
    // SAFETY: an `OwnedFd` is open for as long as it is owned and always returns the same fd;
    // the `AsyncFd` owns it until it drops.
    unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }.map_err(|e| {
        let (_, e) = e.into_parts();
        io::Error::new(e.kind(), format!("watching drain fd {fd}: {e}"))
    })
}

/// Waits until the drain fd becomes readable (data, EOF or error: the master asked us to drain,
/// or it is gone), tells the host (`EVENT_DRAINING`, see [`crate::abi::FEATURES`]) and then
/// fires the trigger.
pub(crate) async fn wait_and_fire(fd: AsyncFd<OwnedFd>, trigger: DrainTrigger) {
    if let Err(e) = fd.readable().await {
        crate::host::log(
            crate::abi::LOG_ERROR,
            &format!("drain fd failed ({e}); draining"),
        );
    }
    if let Some(shared) = crate::host::current() {
        shared.notify(crate::abi::EVENT_DRAINING, 0);
    }
    trigger.fire();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn drain_starts_false_and_flips_once_fired() {
        let (trigger, drain) = channel();
        let other = drain.clone();
        assert!(!drain.is_draining());
        trigger.fire();
        assert!(drain.is_draining());
        assert!(other.is_draining());
        trigger.fire();
        assert!(other.is_draining());
    }

    #[test]
    fn drain_fd_readable_fires_the_signal() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mut host_end, app_end) = UnixStream::pair().unwrap();
        let (trigger, drain) = channel();
        rt.block_on(async {
            let fd = watch_fd(app_end.as_raw_fd()).unwrap();
            let waiter = tokio::spawn(wait_and_fire(fd, trigger));
            let waiting = drain.clone();
            let drained = tokio::spawn(async move { waiting.drained().await });
            tokio::task::yield_now().await;
            assert!(!drain.is_draining());
            host_end.write_all(b"d").unwrap();
            tokio::time::timeout(Duration::from_secs(5), drained)
                .await
                .expect("drained() did not complete")
                .unwrap();
            waiter.await.unwrap();
        });
        assert!(drain.is_draining());
        // The app never reads from (or closes) the host's fd.
        let mut buf = [0u8; 1];
        app_end.set_nonblocking(true).unwrap();
        assert_eq!(std::io::Read::read(&mut &app_end, &mut buf).unwrap(), 1);
    }

    #[test]
    fn drain_fd_already_readable_or_closed_fires_too() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (host_end, app_end) = UnixStream::pair().unwrap();
        drop(host_end); // the master is gone: EOF
        let (trigger, drain) = channel();
        rt.block_on(async {
            let fd = watch_fd(app_end.as_raw_fd()).unwrap();
            tokio::time::timeout(Duration::from_secs(5), wait_and_fire(fd, trigger))
                .await
                .expect("EOF on the drain fd did not fire");
        });
        assert!(drain.is_draining());
    }

    #[test]
    fn invalid_drain_fd_is_an_error() {
        assert!(watch_fd(-1).is_err());
    }
}
