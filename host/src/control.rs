//! The control channel between the master and one worker: a `SOCK_SEQPACKET` socketpair, so
//! every message arrives whole or not at all, and EOF on either end means the peer is gone.
//!
//! Worker → master: [`Msg::Ready`], [`Msg::Retiring`], [`Msg::Heartbeat`], [`Msg::Failed`].
//! Master → worker: [`Msg::Drain`]. The wire format is host-internal (both ends are this
//! binary): one tag byte, then either a little-endian `u64` or UTF-8 text.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};

/// Longest message; a longer failure text is cut (on a char boundary).
pub const MAX_MSG: usize = 2048;

const TAG_READY: u8 = 1;
const TAG_RETIRING: u8 = 2;
const TAG_HEARTBEAT: u8 = 3;
const TAG_FAILED: u8 = 4;
const TAG_DRAIN: u8 = 5;

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
            Msg::Failed(text) => {
                let mut end = text.len().min(MAX_MSG - 1);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                let mut buf = vec![TAG_FAILED];
                buf.extend_from_slice(&text.as_bytes()[..end]);
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
    fn long_failure_text_is_cut_on_a_char_boundary() {
        let text = "é".repeat(MAX_MSG);
        let encoded = Msg::Failed(text).encode();
        assert!(encoded.len() <= MAX_MSG);
        assert!(matches!(Msg::decode(&encoded), Some(Msg::Failed(t)) if !t.contains('\u{FFFD}')));
    }
}
