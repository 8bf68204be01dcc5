//! The listening sockets, bound once by the master and kept open for its whole life, so that
//! connections queued in the kernel survive every roll.
//!
//! The master listens on any number of addresses ([`ListenAddr`]: `--listen`, `--host/--port`,
//! `--path`, the config file's `listen`). Each TCP address is its own group of one
//! `SO_REUSEPORT` socket per worker slot ([`tcp::TcpGroup`]): the kernel spreads new
//! connections evenly over the slots (one shared socket balanced 20/44 and 61/3 on this
//! machine), and the worker in slot i — old or new generation — inherits socket i of every
//! group, so a roll never closes an accept queue. Adding or removing a slot, steering and
//! closing apply to every group alike. A unix socket is one socket shared by every slot.
//!
//! Under socket activation [`Listeners::from_inherited`] builds the same structure from the
//! sockets systemd passed (see [`crate::activation`] for the balance measurements).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

mod addr;
mod handover;
mod tcp;

pub use addr::ListenAddr;
pub use handover::HandoverError;
use tcp::TcpGroup;

/// Pending connections per socket; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 1024;

/// Why a listener could not be set up. All of them end the master with exit code 4.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr}: address already in use")]
    TcpInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Tcp { addr: SocketAddr, source: io::Error },
    #[error("cannot listen on unix socket {}: address already in use by a live listener", path.display())]
    UnixInUse { path: PathBuf },
    #[error("cannot listen on unix socket {}: the path exists and is not a socket", path.display())]
    UnixNotSocket { path: PathBuf },
    #[error("cannot listen on unix socket {}: {source}", path.display())]
    Unix { path: PathBuf, source: io::Error },
}

/// A kind of listener, as the ABI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Unix,
}

impl Kind {
    pub fn abi(self) -> u32 {
        match self {
            Kind::Tcp => angel::abi::LISTENER_TCP,
            Kind::Unix => angel::abi::LISTENER_UNIX,
        }
    }
}

/// Every listener of the master.
#[derive(Debug, Default)]
pub struct Listeners {
    /// One group per TCP address, each with one socket per slot.
    tcp: Vec<TcpGroup>,
    /// Unix sockets, each shared by every slot, with the path they were bound to.
    unix: Vec<(Socket, PathBuf)>,
    /// The unix socket files belong to whoever created them (systemd), not to us.
    inherited_unix: bool,
}

/// Why inherited sockets (`LISTEN_FDS`) cannot be used as the master's listeners.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("LISTEN_FDS passes {count} {kind} sockets ({addrs}); angel-host serves one TCP address and one unix socket")]
    TooMany {
        count: usize,
        kind: &'static str,
        addrs: String,
    },
}

impl Listeners {
    /// Binds every address, in order: `slots` sockets per TCP address, one per unix path.
    /// On an error nothing stays bound (a unix socket file we created is removed again).
    pub fn bind(addrs: &[ListenAddr], slots: usize) -> Result<Self, BindError> {
        let mut out = Listeners::default();
        for addr in addrs {
            let bound = match addr {
                ListenAddr::Tcp(addr) => TcpGroup::bind(*addr, slots).map(|g| out.tcp.push(g)),
                ListenAddr::Unix(path) => bind_unix(path).map(|u| out.unix.push(u)),
            };
            if let Err(e) = bound {
                out.cleanup();
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Listeners from socket activation ([`crate::activation::from_env`]) instead of
    /// [`Listeners::bind`]. An inherited TCP socket with `SO_REUSEPORT` becomes slot 0 and
    /// `slots - 1` sockets are bound beside it in its group (even balance); without it, or if
    /// the kernel refuses the join (the master is not the uid that created the socket), every
    /// slot shares it (logged). An inherited unix socket is shared and never unlinked.
    pub fn from_inherited(
        inherited: Vec<crate::activation::Inherited>,
        slots: usize,
    ) -> Result<Self, InheritError> {
        use crate::activation::{join_reuseport_group, Addr};
        let mut tcp = Vec::new();
        let mut unix = Vec::new();
        for i in inherited {
            match i.addr {
                Addr::Tcp(addr) => tcp.push((addr, i)),
                _ => unix.push(i),
            }
        }
        let too_many = |kind, addrs: Vec<String>| InheritError::TooMany {
            count: addrs.len(),
            kind,
            addrs: addrs.join(", "),
        };
        if tcp.len() > 1 {
            return Err(too_many(
                "TCP",
                tcp.iter().map(|(a, _)| a.to_string()).collect(),
            ));
        }
        if unix.len() > 1 {
            return Err(too_many(
                "unix",
                unix.iter().map(|i| i.addr.describe()).collect(),
            ));
        }
        let mut out = Listeners {
            inherited_unix: !unix.is_empty(),
            ..Listeners::default()
        };
        if let Some((addr, first)) = tcp.into_iter().next() {
            let (extra, shared) = match join_reuseport_group(&first, slots.max(1) - 1, BACKLOG) {
                Ok(extra) => (extra, false),
                Err(e) => {
                    tracing::warn!(event = "listen_shared", "{e}; all workers share {addr}");
                    (Vec::new(), true)
                }
            };
            let mut sockets = vec![Socket::from(first.fd)];
            sockets.extend(extra);
            out.tcp.push(TcpGroup {
                addr,
                sockets,
                shared,
                inherited: true,
            });
        }
        if let Some(u) = unix.into_iter().next() {
            let path = match &u.addr {
                Addr::Unix(p) => p.clone(),
                other => PathBuf::from(other.describe().trim_start_matches("unix:")),
            };
            out.unix.push((Socket::from(u.fd), path));
        }
        Ok(out)
    }

    /// Human-readable addresses, for logs: `127.0.0.1:3000`, `[::1]:3000`,
    /// `unix:/run/app.sock` (TCP addresses first, each in the order given).
    pub fn describe(&self) -> Vec<String> {
        let tcp = self.tcp.iter().map(|g| g.addr.to_string());
        let unix = self
            .unix
            .iter()
            .map(|(_, path)| format!("unix:{}", path.display()));
        tcp.chain(unix).collect()
    }

    /// The listeners a worker in `slot` inherits: socket `slot` of every TCP group, and every
    /// unix socket.
    pub fn for_slot(&self, slot: usize) -> Vec<(BorrowedFd<'_>, Kind)> {
        let tcp = self
            .tcp
            .iter()
            .filter(|g| !g.sockets.is_empty())
            .map(|g| (g.sockets[slot % g.sockets.len()].as_fd(), Kind::Tcp));
        let unix = self.unix.iter().map(|(sock, _)| (sock.as_fd(), Kind::Unix));
        tcp.chain(unix).collect()
    }

    /// TCP sockets open per address (one per slot, retiring slots included); every group has
    /// the same number, except an inherited shared socket (always 1).
    pub fn tcp_slots(&self) -> usize {
        self.tcp.iter().map(|g| g.sockets.len()).max().unwrap_or(0)
    }

    /// Opens one more slot socket in every reuseport group (TTIN, a larger --workers). Either
    /// every group gets its socket or none does.
    pub fn add_slot(&mut self) -> Result<(), BindError> {
        let opened = self
            .tcp
            .iter()
            .map(TcpGroup::open_slot)
            .collect::<Result<Vec<_>, _>>()?;
        for (group, sock) in self.tcp.iter_mut().zip(opened) {
            group.sockets.extend(sock);
        }
        Ok(())
    }

    /// Closes the highest slot's socket of every group. Its worker must be gone and nothing
    /// steered to it (see [`Listeners::steer`]), or what is queued on it would be reset.
    pub fn remove_last_slot(&mut self) {
        for group in self.tcp.iter_mut().filter(|g| !g.shared) {
            group.sockets.pop();
        }
    }

    /// Steers new TCP connections of every group to its first `active` slot sockets only
    /// (uniformly at random), so a slot being removed stops receiving connections while its
    /// worker still accepts what is already queued: nothing is reset when it closes later.
    /// Every group is tried; the first error is returned.
    pub fn steer(&self, active: usize) -> io::Result<()> {
        let mut result = Ok(());
        for group in &self.tcp {
            if let Err(e) = group.steer(active) {
                tracing::debug!(addr = %group.addr, "steering failed: {e}");
                if result.is_ok() {
                    result = Err(io::Error::new(e.kind(), format!("{}: {e}", group.addr)));
                }
            }
        }
        result
    }

    /// A stop: lets go of every listening socket so that new clients are refused instead of
    /// queueing where nobody will serve them. Called before the workers are told to drain.
    ///
    /// Our copies close here, but each socket lives on until its last draining worker let go
    /// of it, and whatever is queued in it then is reset. So first each socket we own is
    /// frozen ([`TcpGroup::freeze`]): no new handshake lands in it, the draining workers
    /// accept what is already queued, and clients that tried meanwhile are refused on their
    /// SYN retry. Under socket activation new connections are steered to the inherited socket
    /// (slot 0), which the service manager keeps for the next master.
    pub fn close(&mut self) {
        for group in &self.tcp {
            let frozen = if group.inherited {
                group.steer(1).and_then(|()| group.freeze())
            } else {
                group.freeze()
            };
            if let Err(e) = frozen {
                tracing::warn!(
                    event = "freeze_failed",
                    "cannot stop {} taking new connections ({e}); connections queued while the workers drain may be reset",
                    group.addr
                );
            }
        }
        self.tcp.clear();
        self.cleanup();
    }

    /// Removes the unix socket files, where they are still the ones we bound.
    pub fn cleanup(&mut self) {
        let unix = std::mem::take(&mut self.unix);
        if self.inherited_unix {
            // systemd's socket file: it outlives us on purpose.
            return;
        }
        for (sock, path) in unix {
            let ours = sock
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf));
            if ours.as_deref() == Some(path.as_path()) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

fn bind_unix(path: &Path) -> Result<(Socket, PathBuf), BindError> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let err = |source: io::Error| BindError::Unix {
        path: path.clone(),
        source,
    };
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(BindError::UnixInUse { path });
            }
            // Nothing listens: a stale file left by a crash. Replace it.
            std::fs::remove_file(&path).map_err(err)?;
        }
        Ok(_) => return Err(BindError::UnixNotSocket { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(err)?;
    let addr = SockAddr::unix(&path).map_err(err)?;
    sock.bind(&addr).map_err(err)?;
    sock.listen(BACKLOG).map_err(err)?;
    Ok((sock, path))
}

#[cfg(test)]
#[path = "listener/tests.rs"]
mod tests;

#[cfg(test)]
#[path = "listener_inherited_tests.rs"]
mod inherited_tests;
