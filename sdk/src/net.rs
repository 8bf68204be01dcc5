//! Listeners built from the host's fds, and the stream type both serving modes hand out (the
//! accept loop they share is in `accept`).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::abi;

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
