//! Listeners built from the host's fds, the stream type both serving modes hand out, and the
//! accept loop they share.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
#[cfg(any(feature = "http", feature = "tcp"))]
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
#[cfg(any(feature = "http", feature = "tcp"))]
use tokio::sync::mpsc;

use crate::abi;
#[cfg(any(feature = "http", feature = "tcp"))]
use crate::drain::Drain;

/// How long an accept loop pauses after an error such as `EMFILE` (out of fds) before it tries
/// again: long enough not to spin on a condition that needs a connection to finish first, short
/// enough that a brief fd shortage is barely visible to clients (the kernel keeps queueing).
#[cfg(any(feature = "http", feature = "tcp"))]
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// After the first accept error is logged, further ones are counted and logged as one line per
/// this interval: an fd shortage (`EMFILE`) fails every retry, and a line per retry would
/// flood the log while saying nothing new.
#[cfg(any(feature = "http", feature = "tcp"))]
const ACCEPT_ERROR_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Accepted connections waiting for the serving loop; accept loops pause when it is full.
#[cfg(any(feature = "http", feature = "tcp"))]
pub(crate) const ACCEPT_QUEUE: usize = 64;

/// One listening socket of this worker, built from a duplicate of the host's fd.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener; accepted streams get `TCP_NODELAY`.
    Tcp(TcpListener),
    /// A unix stream listener.
    Unix(UnixListener),
}

/// The local address of a listener: what [`Worker::listeners`](crate::Worker::listeners) and
/// [`Listener::local_addr`] report. Displays as the host logs it: `127.0.0.1:3000`,
/// `[::1]:3000`, `unix:/run/app.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAddr {
    /// A TCP listener's address (with the real port when the host was given port 0).
    Tcp(std::net::SocketAddr),
    /// A unix socket's path; `None` for an unnamed or abstract socket.
    Unix(Option<std::path::PathBuf>),
}

impl std::fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(Some(p)) => write!(f, "unix:{}", p.display()),
            Self::Unix(None) => f.write_str("unix:(unnamed)"),
        }
    }
}

/// One of the host's listening sockets, as this worker inherited it: its address and its fd
/// (owned by the host; [`Worker::listen`](crate::Worker::listen) builds tokio listeners from
/// duplicates).
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    raw: abi::Listener,
    addr: LocalAddr,
}

impl ListenerInfo {
    /// Reads the address of the host's listener (`getsockname` on a duplicate of its fd).
    pub(crate) fn from_abi(listener: &abi::Listener) -> io::Result<Self> {
        let owned = dup(listener)?;
        let addr = match listener.kind {
            abi::LISTENER_TCP => LocalAddr::Tcp(std::net::TcpListener::from(owned).local_addr()?),
            abi::LISTENER_UNIX => unix_addr(&std::os::unix::net::UnixListener::from(owned))?,
            kind => return Err(unknown_kind(listener.fd, kind)),
        };
        Ok(Self {
            raw: *listener,
            addr,
        })
    }

    /// Where this listener listens.
    pub fn local_addr(&self) -> &LocalAddr {
        &self.addr
    }

    /// Whether it is a TCP listener (else a unix stream socket).
    pub fn is_tcp(&self) -> bool {
        self.raw.kind == abi::LISTENER_TCP
    }

    /// The ABI description: the host's fd (do not close it) and its kind.
    pub fn raw(&self) -> &abi::Listener {
        &self.raw
    }
}

fn unknown_kind(fd: i32, kind: u32) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("listener fd {fd} has unknown kind {kind}"),
    )
}

fn unix_addr(l: &std::os::unix::net::UnixListener) -> io::Result<LocalAddr> {
    Ok(LocalAddr::Unix(
        l.local_addr()?
            .as_pathname()
            .map(std::path::Path::to_path_buf),
    ))
}

/// A duplicate of the host's listener fd (the host owns and closes the original).
fn dup(listener: &abi::Listener) -> io::Result<OwnedFd> {
    if listener.fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid listener fd {}", listener.fd),
        ));
    }
    // SAFETY: the ABI guarantees the context's fds stay open for the whole entry call, and
    // this borrow ends right after the dup below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(listener.fd) };
    borrowed.try_clone_to_owned()
}

/// An accepted connection: TCP or unix stream. Implements tokio's `AsyncRead` + `AsyncWrite`;
/// match on it for protocol-specific calls (`peer_addr`, ...).
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A unix stream connection.
    Unix(UnixStream),
}

impl Listener {
    /// Builds a listener from the host's listener description. The fd is duplicated (the host
    /// owns and closes the original) and put in nonblocking mode — which, as `O_NONBLOCK` belongs
    /// to the open file description, also applies to the host's copy.
    ///
    /// Must run inside a tokio runtime.
    pub fn from_abi(listener: &abi::Listener) -> io::Result<Self> {
        let owned = dup(listener)?;
        match listener.kind {
            abi::LISTENER_TCP => {
                let std = std::net::TcpListener::from(owned);
                std.set_nonblocking(true)?;
                Ok(Self::Tcp(TcpListener::from_std(std)?))
            }
            abi::LISTENER_UNIX => {
                let std = std::os::unix::net::UnixListener::from(owned);
                std.set_nonblocking(true)?;
                Ok(Self::Unix(UnixListener::from_std(std)?))
            }
            kind => Err(unknown_kind(listener.fd, kind)),
        }
    }

    /// Accepts one connection (`TCP_NODELAY` set on TCP streams).
    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            Self::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                // Best effort: a connection that already went away fails on first use anyway.
                let _ = stream.set_nodelay(true);
                Ok(Stream::Tcp(stream))
            }
            Self::Unix(l) => Ok(Stream::Unix(l.accept().await?.0)),
        }
    }

    /// The listener's local address.
    pub fn local_addr(&self) -> io::Result<LocalAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().map(LocalAddr::Tcp),
            Self::Unix(l) => Ok(LocalAddr::Unix(
                l.local_addr()?
                    .as_pathname()
                    .map(std::path::Path::to_path_buf),
            )),
        }
    }

    /// A printable local address, for log lines.
    pub fn local_addr_string(&self) -> String {
        self.local_addr()
            .map_or_else(|e| format!("(unknown address: {e})"), |a| a.to_string())
    }
}

/// Builds every listener of the context.
pub(crate) fn bind_all(listeners: &[abi::Listener]) -> io::Result<Vec<Listener>> {
    listeners.iter().map(Listener::from_abi).collect()
}

/// Whether an accept error concerns only the one connection being accepted.
#[cfg(any(feature = "http", feature = "tcp"))]
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
#[cfg(any(feature = "http", feature = "tcp"))]
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

#[cfg(any(feature = "http", feature = "tcp"))]
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
#[cfg(any(feature = "http", feature = "tcp"))]
const QUEUED_AT_DRAIN_MAX: usize = 1024;

/// The drain started: serves what the kernel already queued on this socket, then drops this
/// worker's duplicate. In a roll the slot's socket stays open for the next worker and this is
/// a head start; in a graceful stop the master has frozen the socket (no new handshakes, see
/// the host's `listener::Listeners::freeze`), this worker may be the last holder, and a
/// connection left in the queue would be reset when the socket closes. One non-blocking
/// `accept` per queued connection, bounded (a busy socket in a roll refills as fast as it is
/// emptied), stopping at the first `EAGAIN`.
#[cfg(any(feature = "http", feature = "tcp"))]
async fn take_queued(listener: Listener, tx: &mpsc::Sender<Stream>) {
    // Out of the reactor: plain non-blocking syscalls see the kernel's queue as it is, whatever
    // readiness tokio last observed.
    let queued = match listener {
        Listener::Tcp(l) => l.into_std().map(Queued::Tcp),
        Listener::Unix(l) => l.into_std().map(Queued::Unix),
    };
    let Ok(queued) = queued else { return };
    for _ in 0..QUEUED_AT_DRAIN_MAX {
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

#[cfg(any(feature = "http", feature = "tcp"))]
enum Queued {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Rate-limits the log lines of one accept loop's errors: the first error of a burst is
/// logged at once, later ones as a count per [`ACCEPT_ERROR_REPORT_INTERVAL`]; a burst ends
/// (with its last count) at the first successful accept after a whole interval.
#[cfg(any(feature = "http", feature = "tcp"))]
#[derive(Debug, Default)]
struct AcceptErrors {
    /// `Some` during a burst: since when errors are being counted, how many, and the last one.
    burst: Option<Burst>,
}

#[cfg(any(feature = "http", feature = "tcp"))]
#[derive(Debug)]
struct Burst {
    since: Instant,
    more: u64,
    last: String,
}

#[cfg(any(feature = "http", feature = "tcp"))]
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

#[cfg(any(feature = "http", feature = "tcp"))]
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

impl Stream {
    /// Waits until the peer sent something (or closed) and copies the start of what it sent
    /// into `buf` without consuming it (`MSG_PEEK`); `Ok(0)` at EOF.
    ///
    /// Peeked bytes keep the socket readable: a caller that wants more than arrived so far must
    /// wait by other means before peeking again.
    #[cfg(feature = "http")]
    pub(crate) async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.peek(buf).await,
            Self::Unix(s) => loop {
                s.readable().await?;
                match s.try_io(tokio::io::Interest::READABLE, || peek_fd(s, buf)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    result => return result,
                }
            },
        }
    }
}

/// `recv(MSG_PEEK)` on a nonblocking socket (tokio has no peek for unix streams).
#[cfg(feature = "http")]
fn peek_fd(socket: &impl std::os::fd::AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call and `socket`
    // keeps its fd open; `recv` writes at most that many bytes and keeps no pointer.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(all(test, any(feature = "http", feature = "tcp")))]
#[path = "net_tests.rs"]
mod tests;
