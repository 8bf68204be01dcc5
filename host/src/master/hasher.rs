//! Hashing snapshots off the loop: a snapshot copied without its hash (a `HUP`'s, see
//! `Action::Snapshot`) is hashed on a thread of its own, beside its copy as it is written
//! (or, for a copy shared with an earlier generation, while its probe starts), and the loop
//! hears of it through an eventfd in its poll set. On the loop itself the hash (~3 ms for a
//! 4 MB library) kept the master from answering the probe's `forkable` meanwhile: measured,
//! it only moved the wait from before the probe to after it.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::mpsc;

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::snapshot::{HashJob, Snapshot};

/// A finished hash: the generation, and its hex SHA-256 or why not.
pub type Hashed = (u64, Result<String, String>);

pub struct Hasher {
    done: mpsc::Receiver<Hashed>,
    send: mpsc::Sender<Hashed>,
    wake: std::sync::Arc<EventFd>,
}

impl Hasher {
    pub fn new() -> std::io::Result<Self> {
        let (send, done) = mpsc::channel();
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Hasher {
            done,
            send,
            wake: std::sync::Arc::new(wake),
        })
    }

    /// Hashes `snapshot` (of `generation`) on a new thread.
    pub fn start(&self, generation: u64, snapshot: &Snapshot) -> std::io::Result<()> {
        let job = snapshot.hash_job();
        self.start_job(generation, Box::new(move || job().map(Some)))
    }

    /// Runs the hash `job` of `generation`'s snapshot on a new thread (one that follows the
    /// copy: `SnapshotDir::take_hashing_beside`); an abandoned copy's is not reported.
    pub fn start_job(&self, generation: u64, job: HashJob) -> std::io::Result<()> {
        let (send, wake) = (self.send.clone(), std::sync::Arc::clone(&self.wake));
        std::thread::Builder::new()
            .name("angel-hash".into())
            .spawn(move || {
                let result = match job() {
                    Ok(None) => return,
                    Ok(Some(sha)) => Ok(sha),
                    Err(e) => Err(e.to_string()),
                };
                let _ = send.send((generation, result));
                let _ = wake.write(1);
            })
            .map(drop)
    }

    /// Readable when a hash is done.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// The hashes done since the last call.
    pub fn take(&self) -> Vec<Hashed> {
        let _ = self.wake.read();
        self.done.try_iter().collect()
    }
}
