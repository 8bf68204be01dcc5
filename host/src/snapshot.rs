//! Snapshots: each generation loads its own private, immutable copy of the library, and that
//! copy stays loadable for the generation's whole life.
//!
//! The master copies the library once per roll (hashing while copying for a file change,
//! else in the kernel with `sendfile` and hashed afterwards on a thread) into a **sealed
//! memfd** named for the generation and content hash (`gen3-<sha16>.so` in logs; a worker's
//! `/proc/PID/maps` shows `/memfd:angel-host gen3`). It keeps that fd open until the last
//! worker of the generation is gone, and every worker of the generation — first ones,
//! respawns after a crash, recycled ones — inherits it and dlopens `/proc/self/fd/N`: the
//! kernel shares its pages between them. Workers never see a path, so the user's file can be
//! overwritten in place (`cp`, `rsync --inplace`), unlinked and relinked (cargo) or renamed
//! over (`install`) without touching mapped code (measured: an in-place `cp` over a directly
//! mapped library crashed every worker that had mapped it).
//!
//! Between rolls the next roll's memfd is made ahead with its pages allocated
//! ([`SnapshotDir::prepare`]), so the copy that starts a roll onto a new build only writes.
//!
//! A roll onto a file that provably has not changed since the last snapshot (a HUP to restart
//! the workers on the same build) shares that snapshot's memfd instead of copying and hashing
//! the library again ([`Identity`] says when that is safe).
//!
//! Why a memfd and not a file in a temp directory held open by the master: the first round
//! used a file, and a generation was only as loadable as its path — a temp cleaner
//! (systemd-tmpfiles, tmpreaper) deleting it, or a relative `--snapshot-dir` moved away, made
//! the next respawn of that generation fail with `cannot open shared object file`, and its
//! slot crash-looped while its socket kept accepting connections nobody served. Holding a
//! file's fd would mend that too, but a memfd also needs no writable temp directory, is not
//! subject to `noexec` mounts or a full disk, leaves nothing behind when the master is
//! SIGKILLed, and is sealed (`F_SEAL_WRITE|SHRINK|GROW|SEAL`, or `F_SEAL_FUTURE_WRITE` in
//! its place while the kernel still references a page, see `seal`), so not even the master
//! can change a generation's code after the fact. Its cost is that the copy lives in shared
//! memory (as it does on a tmpfs `/tmp`) for as long as the generation lives. A worker that
//! drops privileges (`--user`) can load it too: the fd is opened by the master and inherited.
//!
//! Where `memfd_create` is unavailable (a seccomp filter, an old kernel), snapshots fall back
//! to files in a private directory (mode 0700) under `--snapshot-dir`, each still held open by
//! the master and loaded by workers through the inherited fd, so a cleaner deleting them does
//! not matter either. That directory must allow writes and execution: a `noexec` mount is
//! refused when the directory is created, and every failure to store a snapshot names its
//! location and cause ([`SnapshotError::Dir`], exit code 1), never the user's library.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

mod content;
mod error;
mod memfd;
mod sweep;

use content::{
    copy_hashing, copy_in_kernel, hash_fd, hash_following, CopyFault, Identity, Progress,
    FOLLOW_STEP,
};
#[cfg(test)]
use content::{CHUNK, SETTLED};
pub use error::{Location, SnapshotError};
use memfd::{lock, memfd_available, new_memfd, seal, Prepared};
pub use sweep::sweep_dead;

/// cargo replaces `libapp.so` by unlink + link: for about a millisecond the path does not
/// exist. A roll that starts in that window retries for this long before giving up.
const MISSING_RETRY: Duration = Duration::from_millis(200);
const MISSING_RETRY_STEP: Duration = Duration::from_millis(5);

/// Where this master keeps its snapshots: sealed memfds, or (fallback) a private directory
/// removed with the master.
#[derive(Debug)]
pub struct SnapshotDir {
    store: Store,
    /// The last memfd snapshot and the identity of the file it is a copy of, if that file
    /// had settled (see [`Identity::settled_at`]).
    last: Mutex<Option<(Identity, Snapshot)>>,
    /// The next snapshot's memfd, made ahead with its pages allocated ([`SnapshotDir::prepare`]).
    prepared: Arc<Mutex<Option<Prepared>>>,
    /// The size of the last copy made, which the prepared memfd is allocated for.
    last_size: AtomicU64,
}

#[derive(Debug)]
enum Store {
    Memory,
    /// The directory, and an exclusive `flock` on it held for the master's life: the proof
    /// that it is in use, which [`sweep_dead`] respects even from another PID namespace.
    Dir(
        tempfile::TempDir,
        #[allow(dead_code)] nix::fcntl::Flock<File>,
    ),
}

/// A snapshot's hash, to run on a thread of its own while the copy is written
/// ([`SnapshotDir::take_hashing_beside`]): the hex SHA-256 of the copy, or `None` if the copy
/// was abandoned (its snapshot failed, and nobody waits for the hash).
pub type HashJob = Box<dyn FnOnce() -> io::Result<Option<String>> + Send>;

/// Ends the hash beside a copy that was not finished, whichever way `copy_at` returns.
struct Abandon<'a>(&'a Progress);

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// One generation's copy of the library, open for as long as any clone of it lives.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The user's library path as resolved for this roll (symlinks followed).
    pub source: PathBuf,
    /// Where the copy is, for people: `memfd:gen3-<sha16>.so` or the fallback file's path.
    /// Workers do not load it by this name but through [`Snapshot::fd`].
    pub path: PathBuf,
    /// Hex SHA-256 of the content; `None` for a copy taken by
    /// [`SnapshotDir::take_hashing_beside`] until its hash is done ([`SnapshotDir::set_hash`]).
    pub sha256: Option<String>,
    /// The open, read-only (sealed) copy the workers inherit and load.
    fd: Arc<OwnedFd>,
}

impl Snapshot {
    /// The short hash shown in logs.
    pub fn short_sha(&self) -> &str {
        self.sha256.as_deref().map_or("pending", |s| &s[..8])
    }

    /// What computes the content's hex SHA-256, on any thread (it holds the copy open).
    pub fn hash_job(&self) -> impl FnOnce() -> io::Result<String> + Send + 'static {
        let fd = Arc::clone(&self.fd);
        move || hash_fd(fd.as_fd())
    }

    /// The fd a worker inherits and loads as `/proc/self/fd/N` (CLOEXEC in the master).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl SnapshotDir {
    /// Uses sealed memfds where the kernel allows them (nothing is created on disk, `parent`
    /// is not touched). Otherwise creates `angel-host.<pid>.<random>` (mode 0700) under
    /// `parent` (default: the temp dir), refusing a `noexec` mount.
    pub fn create(parent: Option<&Path>) -> Result<Self, SnapshotError> {
        if memfd_available() {
            return Ok(SnapshotDir {
                store: Store::Memory,
                last: Mutex::new(None),
                prepared: Arc::default(),
                last_size: AtomicU64::new(0),
            });
        }
        Self::create_dir(parent)
    }

    /// The file fallback, also used by tests.
    fn create_dir(parent: Option<&Path>) -> Result<Self, SnapshotError> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let parent = std::path::absolute(&parent).unwrap_or(parent);
        let dir_err = |dir: &Path| {
            let location = Location::Dir(dir.to_path_buf());
            move |source| SnapshotError::Dir { location, source }
        };
        sweep_dead(&parent, "angel-host.", ".");
        let dir = tempfile::Builder::new()
            .prefix(&format!("angel-host.{}.", std::process::id()))
            .tempdir_in(&parent)
            .map_err(dir_err(&parent))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(dir_err(dir.path()))?;
        let noexec = nix::sys::statvfs::statvfs(dir.path())
            .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC));
        if noexec {
            return Err(dir_err(dir.path())(io::Error::other(
                "the file system is mounted noexec, so no worker could load a library from it; \
                 choose another --snapshot-dir",
            )));
        }
        let lock = File::open(dir.path())
            .map_err(dir_err(dir.path()))
            .and_then(|f| {
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
                    .map_err(|(_, e)| dir_err(dir.path())(e.into()))
            })?;
        Ok(SnapshotDir {
            store: Store::Dir(dir, lock),
            last: Mutex::new(None),
            prepared: Arc::default(),
            last_size: AtomicU64::new(0),
        })
    }

    /// Where snapshots go.
    pub fn location(&self) -> Location {
        match &self.store {
            Store::Memory => Location::Memory,
            Store::Dir(dir, _) => Location::Dir(dir.path().to_path_buf()),
        }
    }

    /// Resolves `lib` (again: a `current -> releases/N` symlink may have moved) and copies it
    /// as generation `generation`, hashing while copying — or, in memory, shares the copy of
    /// the last snapshot if the file has provably not changed since (see [`Identity`]).
    pub fn take(&self, lib: &Path, generation: u64) -> Result<Snapshot, SnapshotError> {
        self.take_at(lib, generation, SystemTime::now(), true)
    }

    /// [`SnapshotDir::take`] without hashing a memfd copy (a file copy, named for its hash, is
    /// hashed all the same): the copy is usable at once, and [`SnapshotDir::hash`] names it
    /// later.
    #[cfg(test)]
    pub fn take_unhashed(&self, lib: &Path, generation: u64) -> Result<Snapshot, SnapshotError> {
        self.take_at(lib, generation, SystemTime::now(), false)
    }

    /// [`SnapshotDir::take`] without hashing on the way (the kernel copies a memfd's content:
    /// `sendfile`), the copy's hash taken on another thread while it is written, off a roll's
    /// critical path (~3 ms for 4 MB): `start` gets the job to run there (see [`HashJob`]) as soon as the copy is
    /// under way, and says whether it could start it. A snapshot whose hash was not handed to
    /// `start` (a shared copy, a copy by hand) comes back without it, as from `take_unhashed`.
    pub fn take_hashing_beside(
        &self,
        lib: &Path,
        generation: u64,
        start: &mut dyn FnMut(HashJob) -> bool,
    ) -> Result<(Snapshot, bool), SnapshotError> {
        let mut started = false;
        let mut start = |job: HashJob| {
            started = start(job);
            started
        };
        let snap = self.copy_at(lib, generation, SystemTime::now(), false, Some(&mut start))?;
        Ok((snap, started))
    }

    /// Hashes a snapshot taken without its hash, and remembers it for a later roll that
    /// shares the copy.
    pub fn hash(&self, snapshot: &mut Snapshot) -> io::Result<()> {
        if snapshot.sha256.is_some() {
            return Ok(());
        }
        let sha = snapshot.hash_job()()?;
        self.set_hash(snapshot, sha);
        Ok(())
    }

    /// Names `snapshot` by its hash `sha` (computed by [`Snapshot::hash_job`]), and the last
    /// snapshot too if it shares the copy.
    pub fn set_hash(&self, snapshot: &mut Snapshot, sha: String) {
        if snapshot.sha256.is_some() {
            return;
        }
        snapshot.path = PathBuf::from(format!(
            "{}-{}.so",
            snapshot.path.to_string_lossy().trim_end_matches(".so"),
            &sha[..16]
        ));
        let mut last = self.lock_last();
        if let Some((_, shared)) = last
            .as_mut()
            .filter(|(_, s)| Arc::ptr_eq(&s.fd, &snapshot.fd))
        {
            shared.sha256 = Some(sha.clone());
            shared.path = snapshot.path.clone();
        }
        snapshot.sha256 = Some(sha);
    }

    /// [`SnapshotDir::take`] with the wall-clock time it starts at (tests move it on).
    fn take_at(
        &self,
        lib: &Path,
        generation: u64,
        started: SystemTime,
        hash: bool,
    ) -> Result<Snapshot, SnapshotError> {
        self.copy_at(lib, generation, started, hash, None)
    }

    fn copy_at(
        &self,
        lib: &Path,
        generation: u64,
        started: SystemTime,
        hash: bool,
        beside: Option<&mut dyn FnMut(HashJob) -> bool>,
    ) -> Result<Snapshot, SnapshotError> {
        let deadline = Instant::now() + MISSING_RETRY;
        let (source, mut file) = loop {
            match open_resolved(lib) {
                Err(SnapshotError::Missing { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(MISSING_RETRY_STEP);
                }
                other => break other?,
            }
        };
        let read_err = |source: io::Error, path: &Path| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let store_err = |source| SnapshotError::Dir {
            location: self.location(),
            source,
        };
        let memory = matches!(self.store, Store::Memory);
        let before = Identity::of(&source, &file).map_err(|e| read_err(e, &source))?;
        if memory {
            if let Some(mut snap) = self.reuse(&before, generation) {
                if hash {
                    self.hash(&mut snap).map_err(store_err)?;
                }
                return Ok(snap);
            }
        }
        let mut copy = match &self.store {
            Store::Memory => Copy::Memory(match self.take_prepared(generation) {
                Some(file) => file,
                None => new_memfd(generation).map_err(store_err)?,
            }),
            Store::Dir(dir, _) => Copy::File(
                tempfile::Builder::new()
                    .prefix(".copy")
                    .tempfile_in(dir.path())
                    .map_err(store_err)?,
            ),
        };
        let hash = hash || !memory;
        let fault = |e| match e {
            CopyFault::Read(e) => read_err(e, &source),
            CopyFault::Write(e) => store_err(e),
        };
        // Without a hash to take on the way, the kernel copies it; a hash beside it follows.
        // A copy by hand (no `sendfile` here) hashes on the way when a hash beside was asked.
        let hash_by_hand = hash || beside.is_some();
        let progress = Arc::new(Progress::default());
        let _abandon = Abandon(&progress);
        let in_kernel = match (&copy, beside) {
            (Copy::Memory(memfd), Some(start)) if !hash => {
                let mut follower = memfd.try_clone().ok().map(|f| (f, start));
                copy_in_kernel(&file, memfd, FOLLOW_STEP, |n| {
                    progress.advance(n);
                    // Started once the kernel copies (the first step is done).
                    if let Some((copy, start)) = follower.take() {
                        let progress = Arc::clone(&progress);
                        start(Box::new(move || hash_following(&copy, &progress)));
                    }
                })
                .map_err(fault)?
            }
            (Copy::Memory(memfd), None) if !hash => {
                copy_in_kernel(&file, memfd, 1 << 30, drop).map_err(fault)?
            }
            _ => None,
        };
        let (sha256, total) = match in_kernel {
            Some(total) => (None, total),
            None => copy_hashing(&mut file, copy.writer(), hash_by_hand).map_err(fault)?,
        };
        if total == 0 {
            return Err(SnapshotError::Empty { path: source });
        }
        self.last_size.store(total, Ordering::Relaxed);
        let name = match &sha256 {
            Some(sha) => format!("gen{generation}-{}.so", &sha[..16]),
            None => format!("gen{generation}.so"),
        };
        let (path, fd) = match copy {
            Copy::Memory(memfd) => {
                // A prepared memfd was allocated a little larger.
                memfd.set_len(total).map_err(store_err)?;
                seal(&memfd).map_err(store_err)?;
                progress.finish(total);
                // The memfd's own name is fixed at creation; the content hash goes in `path`.
                (PathBuf::from(format!("memfd:{name}")), OwnedFd::from(memfd))
            }
            Copy::File(tmp) => {
                let Store::Dir(dir, _) = &self.store else {
                    unreachable!("a file copy is only made in a directory store")
                };
                let path = dir.path().join(&name);
                // Readable by all behind the 0700 directory: a worker that dropped its
                // privileges reopens it through /proc/self/fd, which checks the file's mode.
                tmp.as_file()
                    .set_permissions(std::fs::Permissions::from_mode(0o555))
                    .map_err(store_err)?;
                tmp.persist(&path).map_err(|e| store_err(e.error))?;
                let held = File::open(&path).map_err(store_err)?;
                (path, OwnedFd::from(held))
            }
        };
        let snap = Snapshot {
            source,
            path,
            sha256,
            fd: Arc::new(fd),
        };
        if memory {
            // Only a copy of a file that did not change while it was copied, and had not
            // changed for a while before, may stand for that file later.
            let after = Identity::of(&snap.source, &file).ok();
            let settled = after.as_ref() == Some(&before) && before.settled_at(started);
            *self.lock_last() = settled.then(|| (before, snap.clone()));
        }
        Ok(snap)
    }

    /// The last snapshot, as generation `generation`, if the file it was copied from is still
    /// the same (`identity`).
    fn reuse(&self, identity: &Identity, generation: u64) -> Option<Snapshot> {
        let last = self.lock_last();
        let (_, snap) = last.as_ref().filter(|(seen, _)| seen == identity)?;
        Some(Snapshot {
            source: snap.source.clone(),
            path: PathBuf::from(match &snap.sha256 {
                Some(sha) => format!("memfd:gen{generation}-{}.so", &sha[..16]),
                None => format!("memfd:gen{generation}.so"),
            }),
            sha256: snap.sha256.clone(),
            fd: Arc::clone(&snap.fd),
        })
    }

    fn lock_last(&self) -> std::sync::MutexGuard<'_, Option<(Identity, Snapshot)>> {
        lock(&self.last)
    }

    /// Forgets a generation's copy once its last worker is gone: the fallback's file is
    /// unlinked; the memory is freed when the last clone of the snapshot (and the last
    /// mapping of a worker) is gone.
    pub fn remove(&self, snapshot: &Snapshot) {
        if let Store::Dir(..) = self.store {
            let _ = std::fs::remove_file(&snapshot.path);
        }
    }
}

/// A copy being written.
enum Copy {
    Memory(File),
    File(tempfile::NamedTempFile),
}

impl Copy {
    fn writer(&mut self) -> &mut File {
        match self {
            Copy::Memory(f) => f,
            Copy::File(t) => t.as_file_mut(),
        }
    }
}

/// Opens the library through its resolved path and checks it is a regular, non-empty file.
fn open_resolved(lib: &Path) -> Result<(PathBuf, File), SnapshotError> {
    let shown = std::path::absolute(lib).unwrap_or_else(|_| lib.to_path_buf());
    let source = match std::fs::canonicalize(lib) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SnapshotError::Missing { path: shown })
        }
        Err(source) => {
            return Err(SnapshotError::Io {
                path: shown,
                source,
            })
        }
    };
    let file = match File::open(&source) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SnapshotError::Missing { path: source })
        }
        Err(e) => {
            return Err(SnapshotError::Io {
                path: source,
                source: e,
            })
        }
    };
    let meta = file.metadata().map_err(|e| SnapshotError::Io {
        path: source.clone(),
        source: e,
    })?;
    if meta.is_dir() {
        return Err(SnapshotError::Directory { path: source });
    }
    Ok((source, file))
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
