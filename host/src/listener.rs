//! The listening sockets, bound once by the master and kept open for its whole life, so that
//! connections queued in the kernel survive every roll.
//!
//! TCP is one `SO_REUSEPORT` socket per worker slot: the kernel spreads new connections evenly
//! over the slots (one shared socket balanced 20/44 and 61/3 on this machine), and the worker in
//! slot i — old or new generation — inherits socket i, so a roll never closes an accept queue.
//! A unix socket (`--path`) is one socket shared by every slot.
//!
//! Under socket activation [`Listeners::from_inherited`] builds the same structure from the
//! sockets systemd passed (see [`crate::activation`] for the balance measurements).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

/// Pending connections per socket; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 1024;

/// `SO_ATTACH_REUSEPORT_CBPF` from asm-generic/socket.h (x86, arm, riscv, ...); libc does not
/// export it for Linux.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

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
#[derive(Debug)]
pub struct Listeners {
    /// One per slot, all bound to `tcp_addr`.
    tcp: Vec<Socket>,
    tcp_addr: Option<SocketAddr>,
    unix: Option<(Socket, PathBuf)>,
    /// What came from socket activation, which the master must not rebind or unlink.
    inherited: Inheritance,
}

/// See [`Listeners::from_inherited`].
#[derive(Debug, Default, Clone, Copy)]
struct Inheritance {
    /// One inherited TCP socket shared by every slot (no `SO_REUSEPORT` group to join).
    shared_tcp: bool,
    /// The unix socket file belongs to whoever created it (systemd), not to us.
    unix: bool,
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
    /// Binds `slots` TCP sockets on `host:port` (if `port` is set) and the unix socket at `path`
    /// (if set).
    pub fn bind(
        host: IpAddr,
        port: Option<u16>,
        path: Option<&Path>,
        slots: usize,
    ) -> Result<Self, BindError> {
        let unix = path.map(bind_unix).transpose()?;
        let (tcp, tcp_addr) = match port {
            Some(port) => {
                let (sockets, addr) = bind_tcp_group(SocketAddr::new(host, port), slots)?;
                (sockets, Some(addr))
            }
            None => (Vec::new(), None),
        };
        Ok(Listeners {
            tcp,
            tcp_addr,
            unix,
            inherited: Inheritance::default(),
        })
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
            tcp: Vec::new(),
            tcp_addr: None,
            unix: None,
            inherited: Inheritance {
                shared_tcp: false,
                unix: !unix.is_empty(),
            },
        };
        if let Some((addr, first)) = tcp.into_iter().next() {
            let extra = match join_reuseport_group(&first, slots.max(1) - 1, BACKLOG) {
                Ok(extra) => extra,
                Err(e) => {
                    tracing::warn!(event = "listen_shared", "{e}; all workers share {addr}");
                    out.inherited.shared_tcp = true;
                    Vec::new()
                }
            };
            out.tcp_addr = Some(addr);
            out.tcp.push(Socket::from(first.fd));
            out.tcp.extend(extra);
        }
        if let Some(u) = unix.into_iter().next() {
            let path = match &u.addr {
                Addr::Unix(p) => p.clone(),
                other => PathBuf::from(other.describe().trim_start_matches("unix:")),
            };
            out.unix = Some((Socket::from(u.fd), path));
        }
        Ok(out)
    }

    /// Human-readable addresses, for logs: `127.0.0.1:3000`, `unix:/run/app.sock`.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(addr) = self.tcp_addr {
            out.push(addr.to_string());
        }
        if let Some((_, path)) = &self.unix {
            out.push(format!("unix:{}", path.display()));
        }
        out
    }

    /// The listeners a worker in `slot` inherits.
    pub fn for_slot(&self, slot: usize) -> Vec<(BorrowedFd<'_>, Kind)> {
        let mut out = Vec::new();
        if !self.tcp.is_empty() {
            out.push((self.tcp[slot % self.tcp.len()].as_fd(), Kind::Tcp));
        }
        if let Some((sock, _)) = &self.unix {
            out.push((sock.as_fd(), Kind::Unix));
        }
        out
    }

    /// TCP sockets open (one per slot, retiring slots included).
    pub fn tcp_slots(&self) -> usize {
        self.tcp.len()
    }

    /// Opens one more slot socket in the reuseport group (TTIN, a larger --workers).
    pub fn add_slot(&mut self) -> Result<(), BindError> {
        let Some(addr) = self.tcp_addr else {
            return Ok(());
        };
        if self.inherited.shared_tcp {
            // Every slot shares the one inherited socket: nothing to open.
            return Ok(());
        }
        let map = |source| BindError::Tcp { addr, source };
        let sock = new_tcp(addr, true).map_err(map)?;
        sock.bind(&addr.into()).map_err(map)?;
        sock.listen(BACKLOG).map_err(map)?;
        self.tcp.push(sock);
        Ok(())
    }

    /// Closes the highest slot's socket. Its worker must be gone and nothing steered to it
    /// (see [`Listeners::steer`]), or what is queued on it would be reset.
    pub fn remove_last_slot(&mut self) {
        self.tcp.pop();
    }

    /// Steers new TCP connections to the first `active` slot sockets only (uniformly at
    /// random), so a slot being removed stops receiving connections while its worker still
    /// accepts what is already queued: nothing is reset when it closes later.
    ///
    /// The kernel picks a socket of a reuseport group by index; indices follow the order the
    /// sockets joined, and we only ever close the highest ones, so slot i stays index i.
    /// A classic BPF program (`SO_ATTACH_REUSEPORT_CBPF`, Linux 4.5+, no privilege needed)
    /// returns `random() % active`. The alternative, `net.ipv4.tcp_migrate_req`, is a sysctl
    /// (off by default) that a process manager should not need to change.
    pub fn steer(&self, active: usize) -> io::Result<()> {
        let Some(first) = self.tcp.first() else {
            return Ok(());
        };
        let active = u32::try_from(active.max(1)).unwrap_or(u32::MAX);
        let op = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let program = [
            op(
                libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
                (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
            ),
            op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, active),
            op(libc::BPF_RET | libc::BPF_A, 0),
        ];
        let fprog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: `fprog` points to `program`, both alive for the call; the kernel copies the
        // program and validates it; the fd is our open listening socket.
        let rc = unsafe {
            libc::setsockopt(
                first.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ATTACH_REUSEPORT_CBPF,
                (&fprog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Closes every listening socket (a stop: no worker accepts any more), so that new clients
    /// are refused at once instead of queueing where nobody serves them.
    pub fn close(&mut self) {
        self.tcp.clear();
        self.cleanup();
    }

    /// Removes the unix socket file, if it is still the one we bound.
    pub fn cleanup(&mut self) {
        if self.inherited.unix {
            // systemd's socket file: it outlives us on purpose.
            self.unix = None;
            return;
        }
        if let Some((sock, path)) = self.unix.take() {
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

/// Binds the per-slot `SO_REUSEPORT` group. With an explicit port we first bind one socket
/// *without* `SO_REUSEPORT`: that fails with `EADDRINUSE` if anything listens there, including
/// another angel-host whose reuseport group we would otherwise silently join.
fn bind_tcp_group(addr: SocketAddr, slots: usize) -> Result<(Vec<Socket>, SocketAddr), BindError> {
    let map = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            BindError::TcpInUse { addr }
        } else {
            BindError::Tcp { addr, source }
        }
    };
    if addr.port() != 0 {
        let probe = new_tcp(addr, false).map_err(map)?;
        probe.bind(&addr.into()).map_err(map)?;
    }
    let mut sockets = Vec::with_capacity(slots);
    let mut bound = addr;
    for _ in 0..slots.max(1) {
        let sock = new_tcp(addr, true).map_err(map)?;
        sock.bind(&bound.into()).map_err(map)?;
        sock.listen(BACKLOG).map_err(map)?;
        if bound.port() == 0 {
            bound = sock
                .local_addr()
                .map_err(map)?
                .as_socket()
                .ok_or_else(|| map(io::Error::other("not an inet socket")))?;
        }
        sockets.push(sock);
    }
    Ok((sockets, bound))
}

fn new_tcp(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    // socket2 sets CLOEXEC on Linux; workers get the fds through the spawner's pre_exec.
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    if reuseport {
        sock.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    Ok(sock)
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
mod tests {
    use super::*;

    #[test]
    fn ephemeral_port_group_shares_one_port() {
        let l = Listeners::bind("127.0.0.1".parse().expect("ip"), Some(0), None, 3).expect("bind");
        assert_eq!(l.tcp.len(), 3);
        let port = l.tcp_addr.expect("addr").port();
        assert_ne!(port, 0);
        for s in &l.tcp {
            assert_eq!(
                s.local_addr()
                    .expect("addr")
                    .as_socket()
                    .expect("inet")
                    .port(),
                port
            );
        }
    }

    #[test]
    fn busy_port_is_refused_even_for_reuseport_groups() {
        let first =
            Listeners::bind("127.0.0.1".parse().expect("ip"), Some(0), None, 2).expect("bind");
        let port = first.tcp_addr.expect("addr").port();
        let err = Listeners::bind("127.0.0.1".parse().expect("ip"), Some(port), None, 2)
            .expect_err("second bind must fail");
        assert!(matches!(err, BindError::TcpInUse { .. }), "{err}");
    }

    #[test]
    fn steering_keeps_new_connections_off_retiring_slots() {
        let mut l =
            Listeners::bind("127.0.0.1".parse().expect("ip"), Some(0), None, 2).expect("bind");
        l.add_slot().expect("third slot");
        assert_eq!(l.tcp_slots(), 3);
        l.steer(2).expect("attach program");
        let addr = l.tcp_addr.expect("addr");
        let clients: Vec<_> = (0..60)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut per_slot = [0usize; 3];
        for (i, sock) in l.tcp.iter().enumerate() {
            sock.set_nonblocking(true).expect("nonblocking");
            while sock.accept().is_ok() {
                per_slot[i] += 1;
            }
        }
        assert_eq!(
            per_slot.iter().sum::<usize>(),
            clients.len(),
            "{per_slot:?}"
        );
        assert_eq!(
            per_slot[2], 0,
            "retiring slot got connections: {per_slot:?}"
        );
        assert!(
            per_slot[0] > 5 && per_slot[1] > 5,
            "unbalanced: {per_slot:?}"
        );
        l.remove_last_slot();
        assert_eq!(l.tcp_slots(), 2);
    }

    #[test]
    fn stale_unix_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let mut live = Listeners::bind("0.0.0.0".parse().expect("ip"), None, Some(&path), 1)
            .expect("stale socket replaced");
        let err = Listeners::bind("0.0.0.0".parse().expect("ip"), None, Some(&path), 1)
            .expect_err("live socket refused");
        assert!(matches!(err, BindError::UnixInUse { .. }), "{err}");
        live.cleanup();
        assert!(!path.exists());
    }
}

#[cfg(test)]
#[path = "listener_inherited_tests.rs"]
mod inherited_tests;
