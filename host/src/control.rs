//! The control channel between the master and one worker: a `SOCK_SEQPACKET` socketpair, so
//! every message arrives whole or not at all, and EOF on either end means the peer is gone.
//!
//! Worker → master: [`Msg::Ready`], [`Msg::Retiring`], [`Msg::Heartbeat`], [`Msg::Failed`].
//! Master → worker: [`Msg::Drain`]. With a generation's zygote (`worker/zygote.rs`): zygote →
//! master [`Msg::Forkable`], [`Msg::Forked`], [`Msg::ForkFailed`]; master → zygote
//! [`Msg::Fork`], which carries the new worker's fds ([`send_fds`], [`recv_fds`]). The wire
//! format is host-internal (both ends are this binary): one tag byte, then little-endian
//! integers or UTF-8 text.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};

/// Longest message; a longer failure text is cut (on a char boundary).
pub const MAX_MSG: usize = 2048;

const TAG_READY: u8 = 1;
const TAG_RETIRING: u8 = 2;
const TAG_HEARTBEAT: u8 = 3;
const TAG_FAILED: u8 = 4;
const TAG_DRAIN: u8 = 5;
const TAG_FORKABLE: u8 = 6;
const TAG_FORK: u8 = 7;
const TAG_FORKED: u8 = 8;
const TAG_FORK_FAILED: u8 = 9;
const TAG_LOAD: u8 = 10;

/// Most fds one [`Msg::Fork`] carries: the worker's control end and its listeners.
pub const MAX_FDS: usize = 64;

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// The app runs its accept loops.
    Ready,
    /// The app asks to be replaced (max requests reached).
    Retiring,
    /// Liveness beat from the app's runtime, with requests served so far.
    Heartbeat(u64),
    /// Why the worker could not start; sent just before it exits.
    Failed(String),
    /// Master → worker: stop accepting, finish in-flight work, exit.
    Drain,
    /// Probe → master: the library loaded and checked, and this process stays to fork the
    /// generation's workers (it is single-threaded).
    Forkable,
    /// Master → zygote: fork a worker for `slot`. The fds that come with it are the worker's
    /// control end, then one listener per entry of `kinds` (`abi::LISTENER_*`).
    Fork {
        slot: u32,
        max_requests: u64,
        graceful_ms: u64,
        kinds: Vec<u32>,
    },
    /// Zygote → master: the worker it forked (now the master's child).
    Forked(i32),
    /// Zygote → master: why it could not fork one.
    ForkFailed(String),
    /// Master → spare: load the snapshot that comes with this message, as the probe of
    /// `generation`.
    Load { generation: u64 },
}

fn text_payload(tag: u8, text: &str) -> Vec<u8> {
    let mut end = text.len().min(MAX_MSG - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut buf = vec![tag];
    buf.extend_from_slice(&text.as_bytes()[..end]);
    buf
}

impl Msg {
    fn encode(&self) -> Vec<u8> {
        match self {
            Msg::Ready => vec![TAG_READY],
            Msg::Retiring => vec![TAG_RETIRING],
            Msg::Drain => vec![TAG_DRAIN],
            Msg::Heartbeat(n) => {
                let mut buf = vec![TAG_HEARTBEAT];
                buf.extend_from_slice(&n.to_le_bytes());
                buf
            }
            Msg::Failed(text) => text_payload(TAG_FAILED, text),
            Msg::Forkable => vec![TAG_FORKABLE],
            Msg::Fork {
                slot,
                max_requests,
                graceful_ms,
                kinds,
            } => {
                let mut buf = vec![TAG_FORK];
                buf.extend_from_slice(&slot.to_le_bytes());
                buf.extend_from_slice(&max_requests.to_le_bytes());
                buf.extend_from_slice(&graceful_ms.to_le_bytes());
                for kind in kinds.iter().take(MAX_FDS - 1) {
                    buf.extend_from_slice(&kind.to_le_bytes());
                }
                buf
            }
            Msg::Forked(pid) => {
                let mut buf = vec![TAG_FORKED];
                buf.extend_from_slice(&pid.to_le_bytes());
                buf
            }
            Msg::ForkFailed(text) => text_payload(TAG_FORK_FAILED, text),
            Msg::Load { generation } => {
                let mut buf = vec![TAG_LOAD];
                buf.extend_from_slice(&generation.to_le_bytes());
                buf
            }
        }
    }

    fn decode(buf: &[u8]) -> Option<Msg> {
        let (&tag, rest) = buf.split_first()?;
        Some(match tag {
            TAG_READY => Msg::Ready,
            TAG_RETIRING => Msg::Retiring,
            TAG_DRAIN => Msg::Drain,
            TAG_HEARTBEAT => Msg::Heartbeat(u64::from_le_bytes(rest.try_into().ok()?)),
            TAG_FAILED => Msg::Failed(String::from_utf8_lossy(rest).into_owned()),
            TAG_FORKABLE => Msg::Forkable,
            TAG_FORK => {
                let slot = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
                let max_requests = u64::from_le_bytes(rest.get(4..12)?.try_into().ok()?);
                let graceful_ms = u64::from_le_bytes(rest.get(12..20)?.try_into().ok()?);
                let kinds = rest.get(20..)?;
                if kinds.len() % 4 != 0 {
                    return None;
                }
                Msg::Fork {
                    slot,
                    max_requests,
                    graceful_ms,
                    kinds: kinds
                        .chunks_exact(4)
                        .map(|k| u32::from_le_bytes([k[0], k[1], k[2], k[3]]))
                        .collect(),
                }
            }
            TAG_FORKED => Msg::Forked(i32::from_le_bytes(rest.try_into().ok()?)),
            TAG_FORK_FAILED => Msg::ForkFailed(String::from_utf8_lossy(rest).into_owned()),
            TAG_LOAD => Msg::Load {
                generation: u64::from_le_bytes(rest.try_into().ok()?),
            },
            _ => return None,
        })
    }
}

/// Creates a connected pair `(master_end, worker_end)`, both CLOEXEC; the spawner clears
/// CLOEXEC on the worker end in the child only. The master end is nonblocking.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (master, worker) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    nix::fcntl::fcntl(
        master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    Ok((master, worker))
}

/// Sends one message. Never raises SIGPIPE; a gone peer is `EPIPE`/`ECONNRESET`.
pub fn send_msg(fd: BorrowedFd<'_>, msg: &Msg) -> io::Result<()> {
    let buf = msg.encode();
    loop {
        match send(fd.as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// What one receive produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    Msg(Msg),
    /// Nothing to read now (nonblocking end).
    Empty,
    /// The peer closed its end.
    Eof,
}

/// Receives one message (blocking or not, as the fd is set). Unknown tags are skipped.
pub fn recv_msg(fd: impl AsFd) -> io::Result<Recv> {
    let mut buf = [0u8; MAX_MSG];
    loop {
        match recv(fd.as_fd().as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => return Ok(Recv::Eof),
            Ok(n) => match Msg::decode(&buf[..n]) {
                Some(msg) => return Ok(Recv::Msg(msg)),
                None => continue,
            },
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(Recv::Empty),
            Err(Errno::ECONNRESET) => return Ok(Recv::Eof),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends one message with `fds` alongside (`SCM_RIGHTS`): the peer gets duplicates.
pub fn send_fds(fd: BorrowedFd<'_>, msg: &Msg, fds: &[RawFd]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage};
    let buf = msg.encode();
    let iov = [std::io::IoSlice::new(&buf)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message and the fds that came with it, each owned by the caller and
/// CLOEXEC. A message with a tag this binary does not know is dropped with its fds.
pub fn recv_fds(fd: impl AsFd) -> io::Result<(Recv, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; MAX_MSG];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let got = recvmsg::<()>(
            fd.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let (n, fds) = match got {
            Ok(r) => {
                let mut fds = Vec::new();
                for c in r.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        for f in received {
                            // SAFETY: the kernel just installed this fd in this process for
                            // this message; nothing else knows its number.
                            fds.push(unsafe { OwnedFd::from_raw_fd(f) });
                        }
                    }
                }
                (r.bytes, fds)
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok((Recv::Empty, Vec::new())),
            Err(Errno::ECONNRESET) => return Ok((Recv::Eof, Vec::new())),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok((Recv::Eof, fds));
        }
        match Msg::decode(&buf[..n]) {
            Some(msg) => return Ok((Recv::Msg(msg), fds)),
            None => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_a_real_socketpair_whole() {
        let (master, worker) = pair().expect("socketpair");
        for msg in [
            Msg::Ready,
            Msg::Retiring,
            Msg::Heartbeat(u64::MAX - 7),
            Msg::Failed("ABI version mismatch: library 2, host 1".into()),
        ] {
            send_msg(worker.as_fd(), &msg).expect("send");
            assert_eq!(recv_msg(&master).expect("recv"), Recv::Msg(msg));
        }
        assert_eq!(recv_msg(&master).expect("recv"), Recv::Empty);
        send_msg(master.as_fd(), &Msg::Drain).expect("send");
        assert_eq!(recv_msg(&worker).expect("recv"), Recv::Msg(Msg::Drain));
        drop(worker);
        assert_eq!(recv_msg(&master).expect("recv"), Recv::Eof);
    }

    #[test]
    fn a_fork_request_crosses_with_its_fds_and_the_zygote_messages_round_trip() {
        let (master, zygote) = pair().expect("socketpair");
        let (keep, give) = pair().expect("socketpair");
        let fork = Msg::Fork {
            slot: 3,
            max_requests: 1_000_000_007,
            graceful_ms: 30_000,
            kinds: vec![abi_tcp(), 2],
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        send_fds(
            master.as_fd(),
            &fork,
            &[give.as_raw_fd(), listener.as_raw_fd()],
        )
        .expect("send");
        drop(give);
        let (got, fds) = recv_fds(&zygote).expect("recv");
        assert_eq!(got, Recv::Msg(fork));
        assert_eq!(fds.len(), 2);
        // The received control end is the same socket: a message through it arrives.
        send_msg(fds[0].as_fd(), &Msg::Ready).expect("send through the passed end");
        assert_eq!(recv_msg(&keep).expect("recv"), Recv::Msg(Msg::Ready));
        let flags =
            nix::fcntl::fcntl(fds[1].as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "received fds are CLOEXEC");
        for msg in [
            Msg::Forkable,
            Msg::Forked(4242),
            Msg::ForkFailed("fork: EAGAIN".into()),
            Msg::Load { generation: 7 },
        ] {
            send_msg(zygote.as_fd(), &msg).expect("send");
            assert_eq!(recv_msg(&master).expect("recv"), Recv::Msg(msg));
        }
        drop(zygote);
        assert_eq!(recv_fds(&master).expect("recv").0, Recv::Eof);
    }

    fn abi_tcp() -> u32 {
        angel::abi::LISTENER_TCP
    }

    #[test]
    fn long_failure_text_is_cut_on_a_char_boundary() {
        let text = "é".repeat(MAX_MSG);
        let encoded = Msg::Failed(text).encode();
        assert!(encoded.len() <= MAX_MSG);
        assert!(matches!(Msg::decode(&encoded), Some(Msg::Failed(t)) if !t.contains('\u{FFFD}')));
    }
}
