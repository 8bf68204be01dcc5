//! Control-socket clients, served without ever blocking the master's loop: every client is
//! non-blocking, its request line is gathered as it arrives into a buffer capped at
//! [`MAX_REQUEST`], and a client that has not sent a whole line within [`REQUEST_DEADLINE`]
//! gets an error and is dropped. A dribbling or hostile client costs the loop one `read` per
//! wake-up and at most [`MAX_REQUEST`] bytes of memory.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::core::ClientId;
use crate::ctl;

/// Longest request line accepted (the longest request, `stop-fast`, is 9 bytes).
pub const MAX_REQUEST: usize = 256;
/// A client must send its whole request line within this long after connecting.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(1);
/// At most this many clients at once still sending their request; more are refused.
const MAX_PENDING: usize = 64;

struct Pending {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// What a client asked.
pub enum Asked {
    Request(ClientId, ctl::Request),
    /// A whole line that is not a request.
    Unknown(ClientId),
}

#[derive(Default)]
pub struct Clients {
    server: Option<ctl::Server>,
    pending: BTreeMap<ClientId, Pending>,
    /// Requests read, waiting for the core's answer.
    waiting: BTreeMap<ClientId, UnixStream>,
    /// `stop` clients: held open until the master exits, which is their answer.
    held: Vec<UnixStream>,
    next: ClientId,
}

impl Clients {
    pub fn new(server: Option<ctl::Server>) -> Self {
        Clients {
            server,
            ..Clients::default()
        }
    }

    /// The fds to poll: the listening socket and every client still sending.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds: Vec<BorrowedFd<'_>> =
            self.server.iter().map(|s| s.listener().as_fd()).collect();
        fds.extend(self.pending.values().map(|p| p.stream.as_fd()));
        fds
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Accepts new clients, reads what arrived, and returns the complete requests. Clients
    /// past their deadline or over the size cap are answered with an error and dropped.
    pub fn service(&mut self, now: Instant) -> Vec<Asked> {
        while let Some(stream) = self.server.as_ref().and_then(ctl::Server::accept) {
            if self.pending.len() >= MAX_PENDING {
                refuse(stream, "too many control clients at once");
                continue;
            }
            self.next += 1;
            self.pending.insert(
                self.next,
                Pending {
                    stream,
                    buf: Vec::new(),
                    deadline: now + REQUEST_DEADLINE,
                },
            );
        }
        let mut asked = Vec::new();
        let ids: Vec<ClientId> = self.pending.keys().copied().collect();
        for id in ids {
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            match read_line(p) {
                Ok(Some(line)) => {
                    let Some(p) = self.pending.remove(&id) else {
                        continue;
                    };
                    self.waiting.insert(id, p.stream);
                    asked.push(match ctl::Request::parse(&line) {
                        Some(request) => Asked::Request(id, request),
                        None => Asked::Unknown(id),
                    });
                }
                Ok(None) if p.buf.len() > MAX_REQUEST => {
                    if let Some(p) = self.pending.remove(&id) {
                        refuse(p.stream, "request line too long");
                    }
                }
                Ok(None) if p.deadline <= now => {
                    if let Some(p) = self.pending.remove(&id) {
                        refuse(p.stream, "no complete request line in time");
                    }
                }
                Ok(None) => {}
                Err(_) => {
                    self.pending.remove(&id);
                }
            }
        }
        asked
    }

    /// Answers a client whose request was read; `hold` keeps it open until the master exits.
    pub fn reply<T: Serialize>(&mut self, id: ClientId, value: &T, hold: bool) {
        let Some(stream) = self.waiting.remove(&id) else {
            return;
        };
        write_line(&stream, value);
        if hold {
            self.held.push(stream);
        }
    }
}

/// Reads what is there; `Some(line)` once a newline (or EOF after some bytes) arrived.
fn read_line(p: &mut Pending) -> io::Result<Option<String>> {
    let mut chunk = [0u8; 128];
    loop {
        match p.stream.read(&mut chunk) {
            Ok(0) if p.buf.is_empty() => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(0) => return Ok(Some(String::from_utf8_lossy(&p.buf).into_owned())),
            Ok(n) => {
                p.buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = p.buf.iter().position(|&b| b == b'\n') {
                    return Ok(Some(String::from_utf8_lossy(&p.buf[..end]).into_owned()));
                }
                if p.buf.len() > MAX_REQUEST {
                    return Ok(None);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn refuse(stream: UnixStream, why: &str) {
    write_line(
        &stream,
        &ctl::ReloadOutcome {
            ok: false,
            generation: 0,
            message: why.to_string(),
        },
    );
}

/// One JSON line, written without blocking: a client that does not read its answer loses
/// it, the loop never waits for it.
fn write_line<T: Serialize>(mut stream: &UnixStream, value: &T) {
    if let Ok(mut line) = serde_json::to_string(value) {
        line.push('\n');
        let _ = stream.write_all(line.as_bytes());
    }
}
