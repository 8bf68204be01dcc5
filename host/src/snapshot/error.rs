//! Where snapshots are stored, and why one could not be taken, as errors and logs say it.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Where snapshots are stored, as errors and logs name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// Sealed memfds: no file system involved.
    Memory,
    /// Files in this private directory (the fallback without `memfd_create`).
    Dir(PathBuf),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Memory => f.write_str("in-memory snapshot (memfd)"),
            Location::Dir(dir) => write!(f, "snapshot directory {}", dir.display()),
        }
    }
}

/// Why a snapshot could not be taken. The library's own faults (`Missing` .. `Io`) are exit
/// code 3 at start; `Dir`, a fault of where snapshots are stored, is exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}: no such file", path.display())]
    Missing { path: PathBuf },
    #[error("{}: is a directory, not a library", path.display())]
    Directory { path: PathBuf },
    #[error("{}: empty file (a build or copy still in progress?)", path.display())]
    Empty { path: PathBuf },
    /// Reading the user's library failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// Storing the snapshot failed (cannot create the directory, no space, `noexec`, ...).
    #[error("{location}: {source}")]
    Dir {
        location: Location,
        source: io::Error,
    },
}
