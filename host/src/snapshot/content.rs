//! What a snapshot is a copy of, and the copy itself: a library file's [`Identity`] (when a
//! snapshot may stand for the file without reading it again), and copying it while hashing.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// A file whose status last changed at least this long before a copy of it started, and did
/// not change during the copy, is taken to have the copied content for as long as its status
/// stays the same (see [`Identity`]).
pub(super) const SETTLED: Duration = Duration::from_secs(1);

/// The size of one read while copying.
pub(super) const CHUNK: usize = 256 * 1024;

/// What says a library file is the one copied before, without reading it: the resolved path,
/// device and inode, size, and the modification and status-change times.
///
/// Any write to the file changes its ctime, and no program can set a ctime back (`touch -d`,
/// `rsync -t` and `cp -p` set the mtime, and that too moves the ctime). The catch is the
/// clock's granularity: a write in the same tick as the snapshot's `stat` could leave every
/// field unchanged. So, as git does for its index ("racily clean" entries), a copy stands for
/// its file only if the file's times were [`SETTLED`] old when the copy started and its
/// identity did not change while it was copied; a HUP on an unchanged build then rolls
/// without copying or hashing it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Identity {
    source: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    pub(super) fn of(source: &Path, file: &File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        Ok(Self {
            source: source.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Whether the file's times are at least [`SETTLED`] older than `started`.
    pub(super) fn settled_at(&self, started: SystemTime) -> bool {
        let Ok(now) = started.duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let at = |(secs, nanos): (i64, i64)| {
            u64::try_from(secs)
                .ok()
                .zip(u32::try_from(nanos).ok())
                .map(|(s, n)| Duration::new(s, n))
        };
        [self.mtime, self.ctime]
            .into_iter()
            .all(|t| at(t).is_some_and(|t| t + SETTLED <= now))
    }
}

/// Where a copy failed: reading the library, or writing the copy.
pub(super) enum CopyFault {
    Read(io::Error),
    Write(io::Error),
}

/// Copies `from` into `to` and returns the hex SHA-256 of what was written (if `hash`) and
/// its length.
///
/// On this thread, chunk by chunk. Tried and measured slower: hashing on a second thread one
/// chunk behind the copy (a 4 MB library took 9 ms instead of 7: on this VM every hand-over
/// of a chunk woke the other vCPU, ~0.2 ms each).
pub(super) fn copy_hashing(
    from: &mut File,
    to: &mut File,
    hash: bool,
) -> Result<(Option<String>, u64), CopyFault> {
    let mut hasher = hash.then(Sha256::new);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = read_some(from, &mut buf).map_err(CopyFault::Read)?;
        if n == 0 {
            break;
        }
        if let Some(hasher) = &mut hasher {
            hasher.update(&buf[..n]);
        }
        to.write_all(&buf[..n]).map_err(CopyFault::Write)?;
        total += n as u64;
    }
    Ok((hasher.map(|h| format!("{:x}", h.finalize())), total))
}

/// Copies `from` (from its current offset) onto the end of `to` in the kernel (`sendfile`:
/// one copy, from the page cache straight into the memfd's pages; `read` + `write` make two,
/// through a buffer). `None` if the kernel cannot do it for these files, before anything was
/// copied; the caller copies by hand then.
///
/// Measured on this VM, a 4 MB library into a fresh memfd: 3.8 ms against 6.5–7.0 ms for
/// `read` + `write`, and 2.3 ms into a memfd whose pages were allocated ahead
/// ([`super::SnapshotDir::prepare`]).
///
/// With `step`, it copies that much at a time and calls `copied` with the total after each.
pub(super) fn copy_in_kernel(
    from: &File,
    to: &File,
    step: usize,
    mut copied: impl FnMut(u64),
) -> Result<Option<u64>, CopyFault> {
    use nix::errno::Errno;
    let mut total = 0u64;
    loop {
        match nix::sys::sendfile::sendfile(to.as_fd(), from.as_fd(), None, step) {
            Ok(0) => return Ok(Some(total)),
            Ok(n) => {
                total += n as u64;
                copied(total);
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) if total == 0 => {
                return Ok(None)
            }
            // Faults of where the copy goes; anything else is the library's.
            Err(e @ (Errno::ENOSPC | Errno::ENOMEM | Errno::EFBIG | Errno::EDQUOT)) => {
                return Err(CopyFault::Write(e.into()))
            }
            Err(e) => return Err(CopyFault::Read(e.into())),
        }
    }
}

/// How much of a copy is written, for a hash that follows it on another thread
/// ([`hash_following`]).
#[derive(Debug, Default)]
pub(super) struct Progress {
    state: Mutex<Copied>,
    moved: Condvar,
}

#[derive(Debug, Default, Clone, Copy)]
struct Copied {
    bytes: u64,
    /// `Some(true)`: complete at `bytes`; `Some(false)`: abandoned.
    end: Option<bool>,
}

impl Progress {
    fn set(&self, update: impl FnOnce(&mut Copied)) {
        update(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.moved.notify_all();
    }

    pub(super) fn advance(&self, bytes: u64) {
        self.set(|c| c.bytes = bytes);
    }

    pub(super) fn finish(&self, bytes: u64) {
        self.set(|c| {
            *c = Copied {
                bytes,
                end: Some(true),
            }
        });
    }

    /// The copy failed or its snapshot was not kept: the hash ends with nothing to report.
    /// Does nothing after [`Progress::finish`].
    pub(super) fn abandon(&self) {
        self.set(|c| {
            c.end.get_or_insert(false);
        });
    }

    /// Waits until more than `hashed` bytes are written or the copy ended.
    fn beyond(&self, hashed: u64) -> Copied {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *self
            .moved
            .wait_while(state, |c| c.bytes <= hashed && c.end.is_none())
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Hashes a memfd while it is being written (`copy` reports how far it got): the hex SHA-256
/// of the whole copy once it is complete, `None` if it was abandoned.
///
/// The copy's last byte is then hashed a moment after it is written, instead of a whole
/// hash after it: on this VM a 4 MB library's hash (3 ms) otherwise ended a HUP's roll after
/// its workers were ready. The copy reports progress every [`FOLLOW_STEP`], so the hand-overs
/// between the threads are few (a hand-over per 256 kB chunk cost more than it saved).
pub(super) fn hash_following(copy: &File, progress: &Progress) -> io::Result<Option<String>> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut hashed = 0u64;
    loop {
        let copied = progress.beyond(hashed);
        if copied.end == Some(false) {
            return Ok(None);
        }
        while hashed < copied.bytes {
            let want = usize::try_from(copied.bytes - hashed).map_or(CHUNK, |n| n.min(CHUNK));
            let n = pread_some(copy, &mut buf[..want], hashed)?;
            if n == 0 {
                return Err(io::Error::other(
                    "the copy ended before its reported length",
                ));
            }
            hasher.update(&buf[..n]);
            hashed += n as u64;
        }
        if copied.end == Some(true) {
            return Ok(Some(format!("{:x}", hasher.finalize())));
        }
    }
}

/// How much a copy followed by [`hash_following`] writes between two reports.
pub(super) const FOLLOW_STEP: usize = 1 << 20;

fn pread_some(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    loop {
        match file.read_at(buf, offset) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The hex SHA-256 of everything in `fd` (a snapshot: read with `pread`, so its offset and
/// other holders are not disturbed).
pub(super) fn hash_fd(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0i64;
    loop {
        match nix::sys::uio::pread(fd, &mut buf, offset) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                offset += n as i64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// One `read`, retried on `EINTR`; 0 at the end of the file.
fn read_some(from: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match from.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
