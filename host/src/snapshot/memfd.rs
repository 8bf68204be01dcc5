//! The memfds snapshots are copied into: made, made ahead with their pages allocated, sealed.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use super::{SnapshotDir, Store};

/// A memfd made ahead of the snapshot of `generation` (its name carries the number).
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) generation: u64,
    pub(super) file: File,
}

/// Locks a mutex whose data stays consistent across a panic of its holder.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether this process may create memfds (a seccomp filter or an old kernel may refuse).
pub(super) fn memfd_available() -> bool {
    new_memfd(0).is_ok()
}

/// A new, empty, sealable memfd (CLOEXEC: only the workers of its generation inherit it).
pub(super) fn new_memfd(generation: u64) -> io::Result<File> {
    let name = CString::new(format!("angel-host gen{generation}"))
        .map_err(|_| io::Error::other("memfd name"))?;
    let fd = memfd_create(
        &name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    Ok(File::from(fd))
}

/// Makes a written memfd immutable for good: no write, resize or further sealing.
///
/// `F_SEAL_WRITE` fails with `EBUSY` while any page of the file still has an extra reference,
/// and on a loaded machine the pages just written can: the kernel's per-CPU LRU batches hold
/// one until that CPU drains them, which the kernel's own wait (~150 ms) does not force. A
/// roll was skipped for it under load ("in-memory snapshot (memfd): Device or resource busy").
/// Then `F_SEAL_FUTURE_WRITE` (Linux 5.1) seals the same: no `write`, no new writable mapping
/// — and there is no old one: the copy is written with `write` or `sendfile`, never mapped.
pub(super) fn seal(memfd: &File) -> io::Result<()> {
    let rest = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    let fd = memfd.as_raw_fd();
    match fcntl(fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE | rest)) {
        Err(nix::errno::Errno::EBUSY) => {
            fcntl(
                fd,
                FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_FUTURE_WRITE | rest),
            )?;
        }
        other => {
            other?;
        }
    }
    Ok(())
}

/// A new memfd for `generation` with `len` bytes of pages allocated (its size is `len` until
/// the copy sets it).
pub(super) fn allocated_memfd(generation: u64, len: u64) -> io::Result<File> {
    let file = new_memfd(generation)?;
    let len = i64::try_from(len).unwrap_or(i64::MAX);
    nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        len,
    )?;
    Ok(file)
}

impl SnapshotDir {
    /// Makes the memfd for the snapshot of `generation` ahead, on a thread of its own: its
    /// pages allocated for a library of the last copy's size and an eighth more, so that the
    /// copy, when that roll comes, only writes into them. Allocating and adding the pages
    /// is most of a copy's cost (measured: a 4 MB library takes 3.8 ms into a fresh memfd,
    /// 2.3 ms into a prepared one), and the copy is the first step of a roll onto a new build.
    /// The price is the memory of one more copy between rolls (shmem, freed at the next one).
    /// Nothing in the fallback directory; a failure leaves the next copy to make its own.
    pub fn prepare(&self, generation: u64) {
        let size = self.last_size.load(Ordering::Relaxed);
        if !matches!(self.store, Store::Memory) || size == 0 {
            return;
        }
        let slot = Arc::clone(&self.prepared);
        if lock(&slot)
            .as_ref()
            .is_some_and(|p| p.generation == generation)
        {
            return;
        }
        let made = std::thread::Builder::new()
            .name("angel-prepare".into())
            .spawn(move || {
                if let Ok(file) = allocated_memfd(generation, size + size / 8) {
                    *lock(&slot) = Some(Prepared { generation, file });
                }
            });
        drop(made);
    }

    /// The prepared memfd, if it was made for `generation` (its name says so) and is ready.
    pub(super) fn take_prepared(&self, generation: u64) -> Option<File> {
        let mut prepared = lock(&self.prepared);
        if prepared.as_ref()?.generation != generation {
            // Made for a later number than this roll's (a skipped roll gave one back).
            return None;
        }
        prepared.take().map(|p| p.file)
    }
}
