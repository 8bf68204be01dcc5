//! The accept loop both serving modes share: one task per listener feeding the serving loop,
//! rate-limited logging of accept errors, and what a draining worker takes from the queue.

use std::io;
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

use crate::drain::Drain;
use crate::net::{Listener, Stream};
/// How long an accept loop pauses after an error such as `EMFILE` (out of fds) before it tries
/// again: long enough not to spin on a condition that needs a connection to finish first, short
/// enough that a brief fd shortage is barely visible to clients (the kernel keeps queueing).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// After the first accept error is logged, further ones are counted and logged as one line per
/// this interval: an fd shortage (`EMFILE`) fails every retry, and a line per retry would
/// flood the log while saying nothing new.
const ACCEPT_ERROR_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Accepted connections waiting for the serving loop; accept loops pause when it is full.
pub(crate) const ACCEPT_QUEUE: usize = 64;

/// Whether an accept error concerns only the one connection being accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Spawns one accept loop per listener feeding `tx`. Each loop stops accepting and drops its
/// listener as soon as the drain starts; `tx` closes once all of them did.
pub(crate) fn spawn_accept_loops(
    listeners: Vec<Listener>,
    drain: &Drain,
    tx: mpsc::Sender<Stream>,
) {
    if listeners.is_empty() {
        crate::warn!("no listeners: serving nothing until drained");
    }
    for listener in listeners {
        tokio::spawn(accept_loop(listener, drain.clone(), tx.clone()));
    }
}

async fn accept_loop(listener: Listener, drain: Drain, tx: mpsc::Sender<Stream>) {
    let drained = drain.drained();
    tokio::pin!(drained);
    let mut errors = AcceptErrors::default();
    loop {
        tokio::select! {
            biased;
            () = &mut drained => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    if let Some(line) = errors.on_success(Instant::now()) {
                        crate::warn!("accept on {} {line}", listener.local_addr_string());
                    }
                    if tx.send(stream).await.is_err() {
                        break;
                    }
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    if let Some(line) = errors.on_error(Instant::now(), &e) {
                        crate::warn!("accept on {} {line}", listener.local_addr_string());
                    }
                    tokio::select! {
                        biased;
                        () = &mut drained => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    }
                }
            }
        }
    }
    take_queued(listener, &tx).await;
}

/// At most this many connections are taken from the queue once the drain started.
const QUEUED_AT_DRAIN_MAX: usize = 1024;

/// The drain started: in a graceful stop, serves what the kernel already queued on this
/// socket, then drops this worker's duplicate.
///
/// In a stop the master has frozen the socket first (a socket filter drops new handshakes,
/// see the host's `listener::TcpGroup::freeze`): this worker may be the last holder, and a
/// connection left in the queue would be reset when the socket closes. In a roll or a
/// retirement (`--max-requests`) the socket is not frozen and stays open for the slot's next
/// worker, which serves the queue: taking it here would serve requests past the limit. One
/// non-blocking `accept` per connection queued at this moment, stopping at the first `EAGAIN`.
async fn take_queued(listener: Listener, tx: &mpsc::Sender<Stream>) {
    // Out of the reactor: plain non-blocking syscalls see the kernel's queue as it is, whatever
    // readiness tokio last observed.
    let queued = match listener {
        Listener::Tcp(l) => l.into_std().map(Queued::Tcp),
        Listener::Unix(l) => l.into_std().map(Queued::Unix),
    };
    let Ok(queued) = queued else { return };
    let limit = match &queued {
        Queued::Tcp(l) if frozen(l) => accept_queue_len(l).unwrap_or(QUEUED_AT_DRAIN_MAX),
        // Not closing (a roll, a retirement), or a unix socket (shared by every slot, never
        // frozen): the queue is the next worker's.
        _ => 0,
    }
    .min(QUEUED_AT_DRAIN_MAX);
    for _ in 0..limit {
        let stream = match &queued {
            Queued::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                TcpStream::from_std(s).map(Stream::Tcp)
            }),
            Queued::Unix(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(true)?;
                UnixStream::from_std(s).map(Stream::Unix)
            }),
        };
        match stream {
            Ok(stream) => {
                if tx.send(stream).await.is_err() {
                    return;
                }
            }
            // Empty: nothing more is queued for us.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            // That one connection went away while it waited; the next may not have.
            Err(e) if is_connection_error(&e) => {}
            Err(_) => return,
        }
    }
    // Dropping `queued` closes this worker's duplicate.
}

/// Connections waiting in a TCP listener's accept queue: for a listening socket Linux reports
/// the queue's length in `tcp_info.tcpi_unacked` (what `ss -lt` shows as Recv-Q).
fn accept_queue_len(l: &std::net::TcpListener) -> Option<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero bytes are a valid `tcp_info` (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of `len` bytes for the call; the fd is
    // the open listener we hold.
    let rc = unsafe {
        libc::getsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0 && info.tcpi_state == 10/* TCP_LISTEN */).then_some(info.tcpi_unacked as usize)
}

/// Whether the master froze this listening socket for a stop: a classic socket filter is
/// attached (`SO_GET_FILTER` with no buffer reports its length in instructions, 0 without
/// one). Apps do not attach filters to the host's listeners; only the master's stop does.
fn frozen(l: &std::net::TcpListener) -> bool {
    use std::os::fd::AsRawFd;
    // `SO_GET_FILTER` is `SO_ATTACH_FILTER`'s number (include/uapi/asm-generic/socket.h).
    let mut len: libc::socklen_t = 0;
    // SAFETY: a null buffer with length 0 only asks for the filter's length, written to `len`,
    // which is valid for the call; the fd is the open listener we hold.
    let rc = unsafe {
        libc::getsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            std::ptr::null_mut(),
            &mut len,
        )
    };
    rc == 0 && len > 0
}

enum Queued {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Rate-limits the log lines of one accept loop's errors: the first error of a burst is
/// logged at once, later ones as a count per [`ACCEPT_ERROR_REPORT_INTERVAL`]; a burst ends
/// (with its last count) at the first successful accept after a whole interval.
#[derive(Debug, Default)]
struct AcceptErrors {
    /// `Some` during a burst: since when errors are being counted, how many, and the last one.
    burst: Option<Burst>,
}

#[derive(Debug)]
struct Burst {
    since: Instant,
    more: u64,
    last: String,
}

impl Burst {
    fn report(&self, now: Instant) -> String {
        format!(
            "failed {} more time{} in the last {}s: {}",
            self.more,
            if self.more == 1 { "" } else { "s" },
            now.duration_since(self.since).as_secs(),
            self.last
        )
    }
}

impl AcceptErrors {
    /// An accept failed; returns what to log (after `accept on <addr> `), if anything.
    fn on_error(&mut self, now: Instant, e: &io::Error) -> Option<String> {
        let Some(burst) = &mut self.burst else {
            self.burst = Some(Burst {
                since: now,
                more: 0,
                last: e.to_string(),
            });
            return Some(format!(
                "failed: {e}; retrying every {} ms, repeats are counted every {}s",
                ACCEPT_ERROR_BACKOFF.as_millis(),
                ACCEPT_ERROR_REPORT_INTERVAL.as_secs()
            ));
        };
        burst.more += 1;
        burst.last = e.to_string();
        if now.duration_since(burst.since) < ACCEPT_ERROR_REPORT_INTERVAL {
            return None;
        }
        let line = burst.report(now);
        burst.since = now;
        burst.more = 0;
        Some(line)
    }

    /// An accept succeeded; returns the burst's last count to log, if it ends here.
    fn on_success(&mut self, now: Instant) -> Option<String> {
        let burst = self.burst.as_ref()?;
        if now.duration_since(burst.since) < ACCEPT_ERROR_REPORT_INTERVAL {
            return None;
        }
        let line = (burst.more > 0).then(|| format!("{}; accepting again", burst.report(now)));
        self.burst = None;
        line
    }
}

#[cfg(test)]
#[path = "accept_tests.rs"]
mod tests;
