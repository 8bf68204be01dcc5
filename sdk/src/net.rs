//! Listeners built from the host's fds, the stream type both serving modes hand out, and the
//! accept loop they share.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
#[cfg(any(feature = "http", feature = "tcp"))]
use std::time::Duration;

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
        if listener.fd < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid listener fd {}", listener.fd),
            ));
        }
        // SAFETY: the ABI guarantees the context's fds stay open for the whole entry call, and
        // this borrow ends right after the dup below.
        let borrowed = unsafe { BorrowedFd::borrow_raw(listener.fd) };
        let owned: OwnedFd = borrowed.try_clone_to_owned()?;
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
            kind => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("listener fd {} has unknown kind {kind}", listener.fd),
            )),
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

    /// A printable local address, for log lines.
    pub fn local_addr_string(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("tcp (unknown: {e})"), |a| a.to_string()),
            Self::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".to_owned(),
                },
                Err(e) => format!("unix (unknown: {e})"),
            },
        }
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
    loop {
        tokio::select! {
            biased;
            () = &mut drained => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    if tx.send(stream).await.is_err() {
                        break;
                    }
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    crate::warn!(
                        "accept on {} failed: {e}; retrying in {} ms",
                        listener.local_addr_string(),
                        ACCEPT_ERROR_BACKOFF.as_millis()
                    );
                    tokio::select! {
                        biased;
                        () = &mut drained => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    }
                }
            }
        }
    }
    // Dropping the duplicate stops this worker accepting; the host's socket (and its queue of
    // not yet accepted connections) stays open for the next worker.
    drop(listener);
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
