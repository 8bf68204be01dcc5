//! One TCP address's per-slot `SO_REUSEPORT` group, and the steering program that keeps new
//! connections off the slots being removed.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Socket, Type};

use super::{BindError, BACKLOG};

/// `SO_ATTACH_REUSEPORT_CBPF` from asm-generic/socket.h (x86, arm, riscv, ...); libc does not
/// export it for Linux.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// The sockets of one TCP address: one per slot, all in one reuseport group (or, from socket
/// activation without `SO_REUSEPORT`, one socket every slot shares).
#[derive(Debug)]
pub(super) struct TcpGroup {
    /// The bound address (the real port when `0` was asked for).
    pub(super) addr: SocketAddr,
    /// Slot i's socket is `sockets[i]`.
    pub(super) sockets: Vec<Socket>,
    /// One inherited socket shared by every slot: no group to join, nothing to add or steer.
    pub(super) shared: bool,
    /// `sockets[0]` came from the service manager (socket activation) and outlives us.
    pub(super) inherited: bool,
}

impl TcpGroup {
    /// Binds the group. With an explicit port we first bind one socket *without*
    /// `SO_REUSEPORT`: that fails with `EADDRINUSE` if anything listens there, including
    /// another angel-host whose reuseport group we would otherwise silently join.
    pub(super) fn bind(addr: SocketAddr, slots: usize) -> Result<Self, BindError> {
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
        Ok(TcpGroup {
            addr: bound,
            sockets,
            shared: false,
            inherited: false,
        })
    }

    /// A new socket for one more slot, not yet part of `sockets` (so that a failure in another
    /// group can drop it and leave every group with the same number of slots).
    pub(super) fn open_slot(&self) -> Result<Option<Socket>, BindError> {
        if self.shared {
            return Ok(None);
        }
        let addr = self.addr;
        let map = |source| BindError::Tcp { addr, source };
        let sock = new_tcp(addr, true).map_err(map)?;
        sock.bind(&addr.into()).map_err(map)?;
        sock.listen(BACKLOG).map_err(map)?;
        Ok(Some(sock))
    }

    /// Stops the group's own sockets from taking new connections, for a stop: new handshakes
    /// (a SYN without ACK) are dropped, so the client retries its SYN a second later and is
    /// refused then, once the socket is closed, instead of being queued in a socket that
    /// closes — and resets it — before anybody accepts it. Connections already queued, and
    /// handshakes already under way (their final ACK passes), stay to be accepted by the
    /// draining workers (`angel`'s accept loop takes what is queued before it lets go).
    /// An inherited socket (socket activation) is left alone: it outlives us, and what
    /// arrives while we stop waits in it for the next master.
    ///
    /// A classic BPF socket filter (`SO_ATTACH_FILTER`, no privilege needed) runs on every
    /// segment the socket receives, listening sockets included, with the data at the TCP
    /// header: byte 13 holds the flags.
    pub(super) fn freeze(&self) -> io::Result<()> {
        if self.shared {
            return Ok(());
        }
        let skip = usize::from(self.inherited);
        let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        };
        const SYN: u32 = 0x02;
        const ACK: u32 = 0x10;
        let program = [
            op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 13),
            op(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0, 0, SYN | ACK),
            // SYN alone: drop (return 0 bytes); anything else: keep it whole.
            op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, SYN),
            op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
            op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
        ];
        let mut result = Ok(());
        for sock in self.sockets.iter().skip(skip) {
            if let Err(e) = attach(sock.as_raw_fd(), libc::SO_ATTACH_FILTER, &program) {
                result = Err(e);
            }
        }
        result
    }

    /// Steers new connections to the first `active` sockets of the group, uniformly at random.
    ///
    /// The kernel picks a socket of a reuseport group by index; indices follow the order the
    /// sockets joined, and we only ever close the highest ones, so slot i stays index i.
    /// A classic BPF program (`SO_ATTACH_REUSEPORT_CBPF`, Linux 4.5+, no privilege needed)
    /// returns `random() % active`. The alternative, `net.ipv4.tcp_migrate_req`, is a sysctl
    /// (off by default) that a process manager should not need to change.
    pub(super) fn steer(&self, active: usize) -> io::Result<()> {
        let Some(first) = self.sockets.first().filter(|_| !self.shared) else {
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
        attach(first.as_raw_fd(), SO_ATTACH_REUSEPORT_CBPF, &program)
    }
}

/// Attaches a classic BPF program to a socket (`SO_ATTACH_FILTER`, `SO_ATTACH_REUSEPORT_CBPF`).
fn attach(
    fd: std::os::fd::RawFd,
    option: libc::c_int,
    program: &[libc::sock_filter],
) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points to `program`, both alive for the call; the kernel copies the
    // program and validates it; the fd is an open socket of ours.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
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

/// A TCP socket for `addr`. IPv6 sockets are IPv6-only, explicitly (the system default,
/// `net.ipv6.bindv6only`, varies): so `[::]:P` and `0.0.0.0:P` are two listeners that can
/// coexist, each with its own reuseport group, instead of a dual-stack socket that takes the
/// IPv4 port too.
pub(super) fn new_tcp(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    // socket2 sets CLOEXEC on Linux; workers get the fds through the spawner's pre_exec.
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    if reuseport {
        sock.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    Ok(sock)
}
