//! Unit tests of `header_deadline.rs`: the sweeps' verdicts on a fake clock, and what the
//! connection's task makes of them.

use super::*;
use crate::watch::{Bell, Registration};
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Waker};

/// A waker that counts its wakes.
struct Counter(AtomicUsize);

impl std::task::Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// One connection's deadline, watched by a task whose wakes are counted.
struct Conn {
    activity: Arc<Activity>,
    bell: Arc<Bell>,
    deadline: Arc<HeaderDeadline>,
    /// The task's place in the bell; `None` once its connection closed.
    registration: Option<Registration>,
    wakes: Arc<Counter>,
    waker: Waker,
    t0: Instant,
}

impl Conn {
    fn new() -> Self {
        let activity = Arc::new(Activity::default());
        let bell = Arc::new(Bell::default());
        let t0 = Instant::now();
        let deadline = HeaderDeadline::new(Arc::clone(&activity), TIMEOUT, t0);
        let registration = Some(bell.register(Some(Arc::clone(&deadline) as Arc<dyn Due>)));
        let wakes = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&wakes));
        let mut conn = Self {
            activity,
            bell,
            deadline,
            registration,
            wakes,
            waker,
            t0,
        };
        assert!(!conn.poll(), "closed before any sweep");
        conn
    }

    fn sweep(&self, secs: u64) {
        self.bell.sweep(self.t0 + Duration::from_secs(secs));
    }

    fn wakes(&self) -> usize {
        self.wakes.0.load(Ordering::Relaxed)
    }

    /// Asks as the connection's task does after polling its connection; true if it says
    /// close.
    fn poll(&mut self) -> bool {
        let cx = Context::from_waker(&self.waker);
        if let Some(registration) = &mut self.registration {
            registration.poll_register(&cx);
        }
        self.deadline.poll_due()
    }

    /// A request: its head arrives, then hyper drops its response's body.
    fn request(&self) {
        self.activity.count_head();
        self.activity.count_end();
    }
}

#[test]
fn a_connection_that_waits_the_whole_timeout_for_its_first_head_is_closed() {
    let mut conn = Conn::new();
    conn.sweep(29);
    assert_eq!(conn.wakes(), 0, "woken before its timeout");
    assert!(!conn.poll());
    conn.sweep(30);
    assert_eq!(conn.wakes(), 1, "not woken at its timeout");
    conn.sweep(31);
    assert_eq!(conn.wakes(), 1, "woken twice for one verdict");
    assert!(conn.poll(), "woken but not closed");
}

#[test]
fn a_request_in_progress_is_never_timed_out_however_long_its_handler_or_body_takes() {
    let mut conn = Conn::new();
    conn.sweep(10);
    // A head at 10–11 s whose handler, then body, takes ten minutes (a long poll, a stream of
    // server-sent events): busy all along.
    conn.activity.count_head();
    for secs in (11..600).step_by(7) {
        conn.sweep(secs);
    }
    assert_eq!(conn.wakes(), 0);
    assert!(!conn.poll());
    // Its body dropped at 600–601 s: the wait for the next head starts at that sweep.
    conn.activity.count_end();
    conn.sweep(601);
    conn.sweep(630);
    assert_eq!(
        conn.wakes(),
        0,
        "the wait started before the response ended"
    );
    conn.sweep(631);
    assert_eq!(conn.wakes(), 1);
    assert!(conn.poll());
}

#[test]
fn an_idle_kept_alive_connection_is_closed_one_timeout_after_its_last_response() {
    let mut conn = Conn::new();
    for secs in 1..=100 {
        conn.request();
        conn.sweep(secs);
    }
    assert_eq!(
        conn.wakes(),
        0,
        "a busy keep-alive connection was timed out"
    );
    conn.sweep(129);
    assert_eq!(conn.wakes(), 0);
    conn.sweep(130);
    assert_eq!(conn.wakes(), 1);
    assert!(conn.poll());
}

#[test]
fn bytes_that_never_complete_a_head_do_not_restart_the_wait() {
    let mut conn = Conn::new();
    conn.request();
    conn.sweep(1);
    // A trickle: a byte read before every sweep, never a whole head.
    let mut closed = None;
    for secs in 2..100 {
        conn.activity.count_read();
        conn.sweep(secs);
        if conn.wakes() > 0 {
            closed = Some(secs);
            break;
        }
    }
    assert_eq!(closed, Some(31));
    assert!(conn.poll());
}

#[test]
fn writes_of_a_last_response_to_a_slow_reader_restart_the_wait() {
    let mut conn = Conn::new();
    conn.request();
    conn.sweep(1);
    // hyper took the whole body, and flushes its tail to a client that reads slowly.
    for secs in 2..=60 {
        conn.activity.count_write();
        conn.sweep(secs);
    }
    assert_eq!(conn.wakes(), 0, "cut while still sending its response");
    conn.sweep(90);
    assert_eq!(
        conn.wakes(),
        1,
        "a client that stopped reading holds the connection"
    );
    assert!(conn.poll());
}

#[test]
fn a_head_that_arrives_after_the_verdict_keeps_the_connection_and_its_timeout() {
    let mut conn = Conn::new();
    conn.sweep(30);
    assert_eq!(conn.wakes(), 1);
    // The task polls its connection first, which reads a head that arrived meanwhile.
    conn.activity.count_head();
    assert!(!conn.poll(), "closed with a request in it");
    conn.activity.count_end();
    assert!(
        !conn.poll(),
        "closed right after answering the head that saved it"
    );
    // The next wait is timed from scratch.
    conn.sweep(31);
    conn.sweep(60);
    assert_eq!(conn.wakes(), 1);
    conn.sweep(61);
    assert_eq!(conn.wakes(), 2);
    assert!(conn.poll());
}

#[test]
fn a_closed_connection_leaves_the_sweep() {
    let mut conn = Conn::new();
    conn.registration = None;
    conn.sweep(100);
    assert_eq!(conn.wakes(), 0, "a closed connection was woken");
}
