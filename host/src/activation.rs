//! Socket activation: listening sockets handed to the master by systemd (`angel-host.socket`),
//! `systemd-socket-activate`, `systemfd` or a previous master, instead of bound by it.
//!
//! # The protocol (sd_listen_fds(3))
//!
//! The parent passes fds `3 .. 3 + LISTEN_FDS`, sets `LISTEN_PID` to the pid it exec'd (so a
//! grandchild that inherited the environment by mistake ignores them) and, optionally,
//! `LISTEN_FDNAMES` (colon-separated names from `FileDescriptorName=`). Like libsystemd we
//! require `LISTEN_PID` to be our pid; anything else means "not for us" and nothing is
//! taken. Every fd is validated before it is used, as listenfd does: it must be a socket
//! (`fstat`), a stream socket (`SO_TYPE`), listening (`SO_ACCEPTCONN`), of family inet, inet6
//! or unix (`getsockname`). A mistake in a unit file (a `ListenDatagram=`, a socket that was
//! never `listen()`ed, a file) then fails the start with the fd number and what is wrong,
//! instead of a worker's `accept` failing later.
//!
//! # Balancing with one inherited socket
//!
//! A `.socket` unit usually gives **one** socket per address, while the master's own TCP
//! listeners are one `SO_REUSEPORT` socket per worker slot (see [`crate::listener`]: one
//! shared socket balanced 20/44 and 61/3). The measurement below (one shared socket vs a
//! reuseport group of four, four real workers, a `Connection: close` client) shows the same;
//! so:
//!
//! - **Inherited socket with `SO_REUSEPORT`** ([`Inherited::reuse_port`], `ReusePort=yes` in
//!   the unit): the master keeps it as **slot 0's** socket and binds slots 1..n itself on the
//!   same address (the kernel allows joining the group: same uid, both with `SO_REUSEPORT`).
//!   Balance is the per-slot one. On a graceful stop the master first steers every new
//!   connection to slot 0 ([`crate::listener::Listeners::steer`] with 1 — index 0 is the
//!   inherited socket, the first to join the group), then drains: what arrives while it
//!   stops waits in the socket systemd keeps, which is the point of socket activation.
//!   The steering program stays attached to that socket after the master exits (harmless:
//!   it then is the group's only member); the next master calls `steer(n)` once it has
//!   joined its slots.
//!   [`join_reuseport_group`] binds the extra slots. The kernel lets a socket join a
//!   reuseport group only under the uid that created it: systemd creates `.socket` sockets
//!   as root, so the master must run as root and drop privileges in the workers
//!   (`--user`, [`crate::privdrop`]); otherwise the join fails with `EADDRINUSE` and the
//!   master falls back to sharing.
//! - **Without `SO_REUSEPORT`**: every worker accepts from the one shared socket. Correct,
//!   nothing lost across rolls (the socket never closes), but balance is the kernel's wakeup
//!   order; log it once at start (`LISTEN_FDS socket without ReusePort=yes: workers share one
//!   accept queue`).
//!
//! Measured on this machine (2 cores, 4 **real angel-host workers** serving examples/hello,
//! debug build, started by hand in worker mode on a shared or per-worker socket; a client of
//! C threads making sequential `Connection: close` requests; hello's `Hello:<pid>` tells who
//! answered): `python3 contrib/experiments/balance_real_workers.py --clients C --requests R`
//!
//! | C | shared: max/min accepted per worker (ratio) | reuseport group |
//! |---|---|---|
//! | 1 | 313/170 (1.84), 322/128 (2.52) | 255/242 (1.05), 278/227 (1.22) |
//! | 2 | 383/43 (8.9), 264/244 (1.08), 137/116 (1.18), 297/22 (13.5), 175/49 (3.6) | 273/238 (1.15), 266/235 (1.13), 145/107 (1.36), 129/123 (1.05), 132/115 (1.15) |
//! | 4 | 505/116 (4.35), 258/242 (1.07), 259/241 (1.07), 258/232 (1.11), 259/239 (1.08) | 292/217 (1.35), 264/242 (1.09), 257/240 (1.07), 285/234 (1.22), 271/214 (1.27) |
//! | 8 | 520/461 (1.13), 563/413 (1.36) | 507/487 (1.04), 520/486 (1.07) |
//!
//! The same with stand-in epoll workers in Python (`balance_inherited.py`): shared 1.65-3.68
//! at C <= 2, reuseport group 1.04-1.30; both near 1.1 at C = 8.
//!
//! One shared socket is sometimes fair and sometimes starves a worker (1 in 2 to 1 in 5
//! runs at C <= 4: 43 or 22 connections against 300-380); it is even only when every worker
//! is saturated. The reuseport group stays within 1.36x in every run. No connection failed
//! in either mode. Hence: ask for `ReusePort=yes` in the unit (contrib/systemd does) and join
//! the group; share the one socket only when the unit does not allow it.
//!
//! # Children
//!
//! Workers must not see these variables (an app that also speaks socket activation would try
//! to take fds 3.. again): call [`unset_env`] right after [`from_env`], while the master is
//! still single-threaded, as `sd_listen_fds(1)` does.
//!
//! # Wiring (for the master)
//!
//! 1. At start, before any thread and before binding: `let inherited = from_env()?;`
//!    then [`unset_env`]. An error is a start-up error of the listener class (exit 4).
//! 2. Not empty: `Listeners::from_inherited(inherited, workers)` instead of
//!    `Listeners::bind` (`--host`/`--port`/`--path` do not apply; log which addresses were
//!    inherited, e.g. `listening on 0.0.0.0:3000 (socket activation, fd 3 "web")`).
//! 3. Graceful stop: `listeners.steer(1)` before telling the workers to drain, so new
//!    connections queue in the socket systemd keeps (no-op with a shared socket).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::stat::SFlag;
use socket2::{Domain, SockRef, Type};

/// The first inherited fd (after stdin, stdout, stderr).
pub const LISTEN_FDS_START: RawFd = 3;

/// The variables of the protocol; [`unset_env`] removes them.
pub const ENV_VARS: &[&str] = &["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// More than this many inherited fds is a broken environment, not a configuration.
const MAX_FDS: usize = 1024;

/// What is wrong with the environment or with an inherited fd.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of file descriptors")]
    BadCount(String),
    #[error("LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    #[error("inherited fd {fd} (LISTEN_FDS): cannot {what}: {source}")]
    Os {
        fd: RawFd,
        what: &'static str,
        source: io::Error,
    },
    #[error("inherited fd {fd} (LISTEN_FDS): not a socket but a {kind}")]
    NotSocket { fd: RawFd, kind: &'static str },
    #[error("inherited fd {fd} (LISTEN_FDS): a {kind} socket, not a stream socket; angel-host serves TCP and unix stream sockets (ListenStream=)")]
    NotStream { fd: RawFd, kind: &'static str },
    #[error("inherited fd {fd} (LISTEN_FDS): a stream socket that is not listening (connected, or never listen()ed)")]
    NotListening { fd: RawFd },
    #[error("inherited fd {fd} (LISTEN_FDS): unsupported address family {family}; angel-host serves inet, inet6 and unix sockets")]
    Family { fd: RawFd, family: i32 },
}

/// The address an inherited socket listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// A Linux abstract unix address (without the leading NUL).
    UnixAbstract(Vec<u8>),
    /// An unbound unix socket (possible with `socketpair`, useless for serving but valid).
    UnixUnnamed,
}

impl Addr {
    /// `127.0.0.1:3000`, `unix:/run/app.sock`, `unix:@name`, as the logs print listeners.
    pub fn describe(&self) -> String {
        match self {
            Addr::Tcp(a) => a.to_string(),
            Addr::Unix(p) => format!("unix:{}", p.display()),
            Addr::UnixAbstract(n) => format!("unix:@{}", String::from_utf8_lossy(n)),
            Addr::UnixUnnamed => "unix:(unnamed)".into(),
        }
    }
}

/// One validated inherited listening socket. The fd is CLOEXEC (the spawner clears it in
/// the children that should inherit it, like the master's own listeners).
#[derive(Debug)]
pub struct Inherited {
    pub fd: OwnedFd,
    /// Its `LISTEN_FDNAMES` entry (`FileDescriptorName=`, by default the socket unit's name).
    pub name: Option<String>,
    pub addr: Addr,
    /// `SO_REUSEPORT` is set: the master may bind per-slot sockets beside it (module docs).
    pub reuse_port: bool,
}

/// What the environment says, before any fd is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub count: usize,
    /// One entry per fd; `None` where `LISTEN_FDNAMES` is absent or has too few names.
    pub names: Vec<Option<String>>,
}

/// Parses the three variables. `Ok(None)`: no activation for us (unset, zero, or
/// `LISTEN_PID` is not `our_pid`).
pub fn parse_env(
    fds: Option<&str>,
    pid: Option<&str>,
    names: Option<&str>,
    our_pid: u32,
) -> Result<Option<Env>, ActivationError> {
    let Some(fds) = fds.filter(|f| !f.is_empty()) else {
        return Ok(None);
    };
    let Some(pid) = pid.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.to_string()))?;
    if pid != our_pid {
        return Ok(None);
    }
    let count: usize = fds
        .trim()
        .parse()
        .ok()
        .filter(|&n| n <= MAX_FDS)
        .ok_or_else(|| ActivationError::BadCount(fds.to_string()))?;
    if count == 0 {
        return Ok(None);
    }
    let mut given = names.map(|n| n.split(':')).into_iter().flatten();
    let names = (0..count)
        .map(|_| given.next().filter(|n| !n.is_empty()).map(str::to_string))
        .collect();
    Ok(Some(Env { count, names }))
}

/// Takes and validates the inherited sockets. Empty when not socket-activated. Call once,
/// at start, before anything else opens fds; then [`unset_env`].
///
/// The fds are taken into `OwnedFd`s whether or not they validate (an invalid one is closed
/// when the error is returned, so nothing else mistakes it for its own later).
pub fn from_env() -> Result<Vec<Inherited>, ActivationError> {
    let var = |k: &str| std::env::var(k).ok();
    let env = parse_env(
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    let Some(env) = env else {
        return Ok(Vec::new());
    };
    let owned: Vec<(OwnedFd, Option<String>)> = env
        .names
        .into_iter()
        .enumerate()
        .map(|(i, name)| Ok((take_fd(LISTEN_FDS_START + i as RawFd)?, name)))
        .collect::<Result<_, ActivationError>>()?;
    owned
        .into_iter()
        .map(|(fd, name)| {
            let (addr, reuse_port) = validate(fd.as_fd())?;
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| {
                ActivationError::Os {
                    fd: fd.as_raw_fd(),
                    what: "set FD_CLOEXEC",
                    source: e.into(),
                }
            })?;
            Ok(Inherited {
                fd,
                name,
                addr,
                reuse_port,
            })
        })
        .collect()
}

/// Takes ownership of inherited fd `raw`, after checking that it is open: an `OwnedFd` of a
/// closed number would later close whatever else got that number.
fn take_fd(raw: RawFd) -> Result<OwnedFd, ActivationError> {
    fcntl(raw, FcntlArg::F_GETFD).map_err(|e| ActivationError::Os {
        fd: raw,
        what: "use it (is it open?)",
        source: e.into(),
    })?;
    // SAFETY: sd_listen_fds(3): fds 3..3+LISTEN_FDS are passed to this process (the
    // LISTEN_PID check) for it to own; it is open (F_GETFD above), and nothing in this
    // process has taken it, as `from_env` is called once, at start.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Removes [`ENV_VARS`] from the environment, so that workers (and the app) don't see them.
///
/// # Call it single-threaded
/// `setenv`/`unsetenv` race with any other thread reading the environment; call this at the
/// master's start, before it starts a thread (the file watcher, metrics).
pub fn unset_env() {
    for k in ENV_VARS {
        std::env::remove_var(k);
    }
}

/// Binds `extra` more listening sockets on `inherited`'s TCP address, in its `SO_REUSEPORT`
/// group: slot 0 keeps the inherited socket, slots 1..=extra get these (module docs).
/// Fails if the inherited socket is not TCP or has no `SO_REUSEPORT`, or if the kernel
/// refuses the join (another uid created the group).
pub fn join_reuseport_group(
    inherited: &Inherited,
    extra: usize,
    backlog: i32,
) -> Result<Vec<socket2::Socket>, JoinError> {
    let Addr::Tcp(addr) = inherited.addr else {
        return Err(JoinError::NotTcp(inherited.addr.describe()));
    };
    if !inherited.reuse_port {
        return Err(JoinError::NoReusePort(addr));
    }
    let map = |source| JoinError::Bind { addr, source };
    (0..extra)
        .map(|_| {
            let sock =
                socket2::Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(map)?;
            sock.set_reuse_address(true).map_err(map)?;
            sock.set_reuse_port(true).map_err(map)?;
            if addr.is_ipv6() {
                // Whatever the inherited socket has: a group needs the same IPV6_V6ONLY.
                let v6only = SockRef::from(&inherited.fd).only_v6().map_err(map)?;
                sock.set_only_v6(v6only).map_err(map)?;
            }
            sock.bind(&addr.into()).map_err(map)?;
            sock.listen(backlog).map_err(map)?;
            Ok(sock)
        })
        .collect()
}

/// Why per-slot sockets could not join an inherited socket's group (then: share it).
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("inherited {0} is not a TCP socket: nothing to join")]
    NotTcp(String),
    #[error("inherited {0} has no SO_REUSEPORT (set ReusePort=yes in the .socket unit): workers share its one accept queue")]
    NoReusePort(SocketAddr),
    #[error("cannot join the reuseport group of inherited {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Checks that `fd` is a listening stream socket of a supported family; returns its address
/// and whether `SO_REUSEPORT` is set.
pub fn validate(fd: BorrowedFd<'_>) -> Result<(Addr, bool), ActivationError> {
    let raw = fd.as_raw_fd();
    let os = |what: &'static str| {
        move |source: io::Error| ActivationError::Os {
            fd: raw,
            what,
            source,
        }
    };
    let stat = nix::sys::stat::fstat(raw).map_err(|e| os("fstat")(e.into()))?;
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFSOCK {
        let kind = match kind {
            SFlag::S_IFREG => "regular file",
            SFlag::S_IFDIR => "directory",
            SFlag::S_IFIFO => "pipe",
            SFlag::S_IFCHR => "character device",
            SFlag::S_IFBLK => "block device",
            SFlag::S_IFLNK => "symlink",
            _ => "file of unknown type",
        };
        return Err(ActivationError::NotSocket { fd: raw, kind });
    }
    let sock = SockRef::from(&fd);
    let ty = sock.r#type().map_err(os("read SO_TYPE"))?;
    if ty != Type::STREAM {
        let kind = if ty == Type::DGRAM {
            "datagram (SOCK_DGRAM)"
        } else if ty == Type::SEQPACKET {
            "seqpacket (SOCK_SEQPACKET)"
        } else if ty == Type::RAW {
            "raw (SOCK_RAW)"
        } else {
            "non-stream"
        };
        return Err(ActivationError::NotStream { fd: raw, kind });
    }
    if !sock.is_listener().map_err(os("read SO_ACCEPTCONN"))? {
        return Err(ActivationError::NotListening { fd: raw });
    }
    let local = sock.local_addr().map_err(os("getsockname"))?;
    let addr = match local.domain() {
        Domain::IPV4 | Domain::IPV6 => match local.as_socket() {
            Some(a) => Addr::Tcp(a),
            None => {
                return Err(ActivationError::Family {
                    fd: raw,
                    family: i32::from(local.family()),
                })
            }
        },
        Domain::UNIX => {
            if let Some(p) = local.as_pathname() {
                Addr::Unix(p.to_path_buf())
            } else if let Some(n) = local.as_abstract_namespace() {
                Addr::UnixAbstract(n.to_vec())
            } else {
                Addr::UnixUnnamed
            }
        }
        _ => {
            return Err(ActivationError::Family {
                fd: raw,
                family: i32::from(local.family()),
            })
        }
    };
    let reuse_port = sock.reuse_port().map_err(os("read SO_REUSEPORT"))?;
    Ok((addr, reuse_port))
}

#[cfg(test)]
#[path = "activation_tests.rs"]
mod tests;
