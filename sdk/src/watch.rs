//! What wakes a connection's task besides its socket: the drain's bell, and the sweep of the
//! header read deadlines, both through one registration per task.
//!
//! A connection task polls what it watches beside its connection, so that is polled on every
//! wake-up of the task, several times per request. Awaiting [`Drain::drained`] there (a
//! `watch` channel) took a mutex on each of those polls (measured: 1.5 % of a worker's CPU
//! time under keep-alive load, where a plain hyper server spends nothing); a `select!` over the
//! connection, a bell wait and a deadline wait, each with its own waker registration, cost
//! another few hundred instructions per request (`bench/scripts/instructions-per-request.sh`).
//! Here a task registers its waker once, in one [`Bell`] per `serve_http`, and afterwards pays
//! one waker comparison and an atomic load or two per poll.
//!
//! [`Drain::drained`]: crate::Drain::drained

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::slots::Slots;
use crate::ticker::Periodic;

/// Something a [`Bell`]'s sweep looks at (a connection's header read deadline).
pub(crate) trait Due: Send + Sync {
    /// Marks what is due by `now`; true if the waiting task should be woken.
    fn mark_due(&self, now: Instant) -> bool;
}

/// The tasks of one `serve_http`'s connections: rung once when the worker drains (every task
/// woken, now and later), swept every period of a kernel timer for header read deadlines
/// (the tasks whose deadline is due woken).
#[derive(Default)]
pub(crate) struct Bell {
    rung: AtomicBool,
    waiters: Mutex<Slots<Waiter>>,
}

struct Waiter {
    waker: Waker,
    due: Option<Arc<dyn Due>>,
}

impl Bell {
    /// Whether [`Bell::ring`] was called.
    pub(crate) fn is_rung(&self) -> bool {
        self.rung.load(Ordering::Acquire)
    }

    /// Wakes every registered task, now and (through [`Bell::is_rung`]) later.
    pub(crate) fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        let wakers: Vec<Waker> = self.lock().iter().map(|w| w.waker.clone()).collect();
        for waker in wakers {
            waker.wake();
        }
    }

    /// Marks every deadline that passed by `now` and wakes its task.
    pub(crate) fn sweep(&self, now: Instant) {
        let wake: Vec<Waker> = self
            .lock()
            .iter()
            .filter(|w| w.due.as_ref().is_some_and(|due| due.mark_due(now)))
            .map(|w| w.waker.clone())
            .collect();
        for waker in wake {
            waker.wake();
        }
    }

    /// Sweeps every `period` until the runtime ends (or its timer fails: then the deadlines
    /// fall back to nothing, which only leaves slow clients unclosed; the error is logged).
    pub(crate) async fn sweep_every(self: Arc<Self>, period: Duration) {
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

    /// A registration for a task to wake on the ring and, with `due`, when a sweep finds it
    /// due. Nothing is registered until its first [`Registration::poll_register`].
    pub(crate) fn register(self: &Arc<Self>, due: Option<Arc<dyn Due>>) -> Registration {
        Registration {
            bell: Arc::clone(self),
            due,
            slot: None,
            waker: None,
        }
    }

    /// Completes once the bell rang (at once if it did).
    pub(crate) fn wait(self: &Arc<Self>) -> BellWait {
        BellWait(self.register(None))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots<Waiter>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One task's place in a [`Bell`]: keeps the task's waker current, leaves when dropped.
pub(crate) struct Registration {
    bell: Arc<Bell>,
    due: Option<Arc<dyn Due>>,
    slot: Option<usize>,
    /// The waker registered in `slot`, to tell whether a poll brings a new one.
    waker: Option<Waker>,
}

impl Registration {
    /// Registers the task polling now, unless it is the one registered already (one
    /// comparison per poll then). Check what the task waits for after this, not before: a
    /// ring or a verdict between the check and the registration would wake nobody.
    pub(crate) fn poll_register(&mut self, cx: &Context<'_>) {
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return;
        }
        let waker = cx.waker().clone();
        let entry = Waiter {
            waker: waker.clone(),
            due: self.due.clone(),
        };
        self.slot = Some(self.bell.lock().put(self.slot, entry));
        self.waker = Some(waker);
    }

    /// The bell this registration is in.
    pub(crate) fn bell(&self) -> &Bell {
        &self.bell
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            self.bell.lock().remove(slot);
        }
    }
}

/// The future of [`Bell::wait`].
pub(crate) struct BellWait(Registration);

impl Future for BellWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.bell.is_rung() {
            return Poll::Ready(());
        }
        self.0.poll_register(cx);
        if self.0.bell.is_rung() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn bell_wakes_waits_made_before_and_after_it_rings() {
        let bell = Arc::new(Bell::default());
        let waiting = tokio::spawn({
            let bell = Arc::clone(&bell);
            async move { bell.wait().await }
        });
        // A wait dropped before the ring frees its slot.
        drop(tokio::time::timeout(Duration::from_millis(10), bell.wait()).await);
        tokio::task::yield_now().await;
        bell.ring();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the wait did not end")
            .unwrap();
        bell.wait().await;
    }

    struct AlwaysDue(AtomicUsize);

    impl Due for AlwaysDue {
        fn mark_due(&self, _: Instant) -> bool {
            self.0.fetch_add(1, Ordering::Relaxed);
            true
        }
    }

    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_sweep_asks_only_registered_deadlines_and_the_ring_wakes_every_task() {
        let bell = Arc::new(Bell::default());
        let due = Arc::new(AlwaysDue(AtomicUsize::new(0)));
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&wakes));
        let cx = Context::from_waker(&waker);
        let mut watched = bell.register(Some(Arc::clone(&due) as Arc<dyn Due>));
        let mut plain = bell.register(None);
        bell.sweep(Instant::now());
        assert_eq!(
            due.0.load(Ordering::Relaxed),
            0,
            "asked before it registered"
        );
        watched.poll_register(&cx);
        plain.poll_register(&cx);
        // The same waker again registers nothing new.
        watched.poll_register(&cx);
        bell.sweep(Instant::now());
        assert_eq!(due.0.load(Ordering::Relaxed), 1);
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "a sweep woke a plain wait"
        );
        bell.ring();
        assert_eq!(wakes.0.load(Ordering::Relaxed), 3);
        // The ring keeps the deadlines: a lingering connection is still swept.
        bell.sweep(Instant::now());
        assert_eq!(due.0.load(Ordering::Relaxed), 2);
        drop(watched);
        bell.sweep(Instant::now());
        assert_eq!(due.0.load(Ordering::Relaxed), 2, "asked after it left");
    }
}
