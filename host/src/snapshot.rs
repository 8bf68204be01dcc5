//! Snapshots: each generation loads its own private copy of the library.
//!
//! The master copies the library once per roll into a private directory (mode 0700) under a
//! new inode named for the generation and content hash; every worker of that generation
//! dlopens that copy (its pages are shared between them). The user's file can then be
//! overwritten in place (`cp`, `rsync --inplace`), unlinked and relinked (cargo) or renamed
//! over (`install`) without touching mapped code: measured, an in-place `cp` over a directly
//! mapped library crashed every worker that had mapped it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// cargo replaces `libapp.so` by unlink + link: for about a millisecond the path does not
/// exist. A roll that starts in that window retries for this long before giving up.
const MISSING_RETRY: Duration = Duration::from_millis(200);
const MISSING_RETRY_STEP: Duration = Duration::from_millis(5);

/// Why a snapshot could not be taken (exit code 3 at start; a failed roll later).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}: no such file", path.display())]
    Missing { path: PathBuf },
    #[error("{}: is a directory, not a library", path.display())]
    Directory { path: PathBuf },
    #[error("{}: empty file (a build or copy still in progress?)", path.display())]
    Empty { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot directory {}: {source}", dir.display())]
    Dir { dir: PathBuf, source: io::Error },
}

/// The private directory holding every live snapshot; removed with the master.
#[derive(Debug)]
pub struct SnapshotDir {
    dir: tempfile::TempDir,
}

/// One generation's copy of the library.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The user's library path as resolved for this roll (symlinks followed).
    pub source: PathBuf,
    /// The private copy the workers load.
    pub path: PathBuf,
    /// Hex SHA-256 of the content.
    pub sha256: String,
}

impl Snapshot {
    /// The short hash shown in logs.
    pub fn short_sha(&self) -> &str {
        &self.sha256[..8]
    }
}

impl SnapshotDir {
    /// Creates `angel-host.<random>` (mode 0700) under `parent` (default: the temp dir).
    pub fn create(parent: Option<&Path>) -> Result<Self, SnapshotError> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        sweep_dead(&parent, "angel-host.", ".");
        let dir = tempfile::Builder::new()
            .prefix(&format!("angel-host.{}.", std::process::id()))
            .tempdir_in(&parent)
            .map_err(|source| SnapshotError::Dir {
                dir: parent.clone(),
                source,
            })?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).map_err(
            |source| SnapshotError::Dir {
                dir: dir.path().to_path_buf(),
                source,
            },
        )?;
        Ok(SnapshotDir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Resolves `lib` (again: a `current -> releases/N` symlink may have moved) and copies it
    /// as generation `generation`, hashing while copying.
    pub fn take(&self, lib: &Path, generation: u64) -> Result<Snapshot, SnapshotError> {
        let deadline = Instant::now() + MISSING_RETRY;
        let (source, mut file) = loop {
            match open_resolved(lib) {
                Err(SnapshotError::Missing { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(MISSING_RETRY_STEP);
                }
                other => break other?,
            }
        };
        let io_err = |e| SnapshotError::Io {
            path: source.clone(),
            source: e,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".copy")
            .tempfile_in(self.dir.path())
            .map_err(|source| SnapshotError::Dir {
                dir: self.dir.path().to_path_buf(),
                source,
            })?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(e)),
            };
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(io_err)?;
            total += n as u64;
        }
        if total == 0 {
            return Err(SnapshotError::Empty { path: source });
        }
        let sha256 = format!("{:x}", hasher.finalize());
        let path = self
            .dir
            .path()
            .join(format!("gen{generation}-{}.so", &sha256[..16]));
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o500))
            .map_err(io_err)?;
        tmp.persist(&path).map_err(|e| io_err(e.error))?;
        Ok(Snapshot {
            source,
            path,
            sha256,
        })
    }

    /// Deletes a generation's copy once its last worker is gone. Mapped pages of running
    /// workers stay valid after unlink; this only frees the directory entry and, later, disk.
    pub fn remove(&self, snapshot: &Snapshot) {
        let _ = std::fs::remove_file(&snapshot.path);
    }
}

/// Removes what masters that died without cleaning up (SIGKILL, power loss) left in `dir`:
/// entries named `<prefix><pid><sep>...`, owned by us, whose pid no longer runs. A crash-looping
/// master under a supervisor would otherwise fill the temp dir with snapshots.
pub fn sweep_dead(dir: &Path, prefix: &str, sep: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let uid = nix::unistd::getuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split(sep).next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let dead = pid > 0
            && matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                Err(nix::errno::Errno::ESRCH)
            );
        let ours = entry.metadata().is_ok_and(|m| m.uid() == uid);
        if dead && ours {
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if removed.is_ok() {
                tracing::info!(
                    event = "swept",
                    "removed {} left by dead master {pid}",
                    path.display()
                );
            }
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
mod tests {
    use super::*;

    #[test]
    fn snapshot_is_a_private_copy_that_survives_overwrite() {
        let work = tempfile::tempdir().expect("tempdir");
        let lib = work.path().join("libapp.so");
        std::fs::write(&lib, b"first build").expect("write");
        let dir = SnapshotDir::create(Some(work.path())).expect("dir");
        let mode = std::fs::metadata(dir.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let one = dir.take(&lib, 1).expect("snapshot");
        std::fs::write(&lib, b"second build").expect("overwrite");
        let two = dir.take(&lib, 2).expect("snapshot");
        assert_eq!(std::fs::read(&one.path).expect("read"), b"first build");
        assert_eq!(std::fs::read(&two.path).expect("read"), b"second build");
        assert_ne!(one.sha256, two.sha256);
        assert_eq!(one.source, std::fs::canonicalize(&lib).expect("canon"));
        dir.remove(&one);
        assert!(!one.path.exists());
    }

    #[test]
    fn symlinked_library_is_resolved_at_every_take() {
        let work = tempfile::tempdir().expect("tempdir");
        let (a, b) = (work.path().join("a.so"), work.path().join("b.so"));
        std::fs::write(&a, b"release a").expect("write");
        std::fs::write(&b, b"release b").expect("write");
        let current = work.path().join("current.so");
        std::os::unix::fs::symlink(&a, &current).expect("symlink");
        let dir = SnapshotDir::create(Some(work.path())).expect("dir");
        assert!(dir
            .take(&current, 1)
            .expect("take")
            .source
            .ends_with("a.so"));
        std::fs::remove_file(&current).expect("unlink");
        std::os::unix::fs::symlink(&b, &current).expect("symlink");
        assert!(dir
            .take(&current, 2)
            .expect("take")
            .source
            .ends_with("b.so"));
    }

    #[test]
    fn leftovers_of_dead_masters_are_swept_live_ones_kept() {
        let work = tempfile::tempdir().expect("tempdir");
        let dead = work.path().join("angel-host.99999999.abc");
        let live = work
            .path()
            .join(format!("angel-host.{}.def", std::process::id()));
        let other = work.path().join("angel-host.notapid.x");
        for d in [&dead, &live, &other] {
            std::fs::create_dir(d).expect("mkdir");
        }
        sweep_dead(work.path(), "angel-host.", ".");
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn missing_directory_and_empty_are_named() {
        let work = tempfile::tempdir().expect("tempdir");
        let dir = SnapshotDir::create(Some(work.path())).expect("dir");
        let missing = dir
            .take(&work.path().join("nope.so"), 1)
            .expect_err("missing");
        assert!(
            matches!(missing, SnapshotError::Missing { .. }),
            "{missing}"
        );
        let is_dir = dir.take(work.path(), 1).expect_err("dir");
        assert!(
            matches!(is_dir, SnapshotError::Directory { .. }),
            "{is_dir}"
        );
        let empty = work.path().join("empty.so");
        std::fs::write(&empty, b"").expect("write");
        let err = dir.take(&empty, 1).expect_err("empty");
        assert!(matches!(err, SnapshotError::Empty { .. }), "{err}");
    }
}
