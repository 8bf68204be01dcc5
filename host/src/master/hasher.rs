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

/// How much nicer than the master the hash thread is: it runs beside the roll it names (the spare's load, the
/// zygote's forks, the new workers' start), and on busy cores every share of CPU it takes is
/// one the roll does not get. The roll no longer waits for the hash to serve, only to log and
/// commit, so the hash can wait. Not `SCHED_IDLE`: on cores saturated by the old workers
/// that would never run it, and the roll would fail unhashed at `--ready-timeout`; at nice 10
/// it gets about a tenth of a contended core (its ~3 ms take ~30 ms), all of an idle one.
const HASH_NICENESS: libc::c_int = 10;

/// Lowers the calling thread's priority by [`HASH_NICENESS`] (on Linux a thread has a nice
/// value of its own). Best effort: a hash at normal priority is only slower to the roll.
fn yield_to_the_roll() {
    // SAFETY: gettid and setpriority take no pointers; on Linux `PRIO_PROCESS` with a thread
    // id sets only that thread's nice value.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        // Relative to the master's (a thread starts with its creator's): a master started
        // with `nice` keeps its hash below itself, and raising a nice value needs no rights.
        let own = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (own + HASH_NICENESS).min(19));
    }
}

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
                yield_to_the_roll();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's nice value.
    fn own_niceness() -> libc::c_int {
        // SAFETY: no pointers; getpriority may return -1 legitimately, which is fine here.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn the_hash_runs_below_the_rolls_priority_and_leaves_the_masters_alone() {
        let hasher = Hasher::new().expect("an eventfd");
        let before = own_niceness();
        hasher
            .start_job(7, Box::new(|| Ok(Some(own_niceness().to_string()))))
            .expect("a hash thread");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let done = loop {
            let mut done = hasher.take();
            if let Some(hashed) = done.pop() {
                break hashed;
            }
            assert!(std::time::Instant::now() < deadline, "no hash within 10 s");
            let mut poll = [nix::poll::PollFd::new(
                hasher.fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(100u16));
        };
        let expected = (before + HASH_NICENESS).min(19);
        assert_eq!(done, (7, Ok(expected.to_string())));
        assert_eq!(
            own_niceness(),
            before,
            "the master's own thread was reniced"
        );
    }
}
