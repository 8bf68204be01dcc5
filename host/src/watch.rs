//! `--watch`: roll when the library changes on disk.
//!
//! cargo does not write `target/release/libapp.so` in place: it unlinks it and hard-links a new
//! inode (a CREATE on the directory, the path absent for about a millisecond, never a
//! CLOSE_WRITE on the file). So we watch the **directories** — the one holding `--lib` and, when
//! `--lib` is a symlink, the one holding its target — and filter their events by path with the
//! reload matcher (`--reload-regex`, by default the library's own path). The master debounces
//! the matches and rolls only if the content hash differs from what is serving.
//!
//! notify delivers events on its own thread; this module forwards matching paths over a
//! channel and wakes the master's `poll` through a socketpair. Nothing here panics: a failing
//! watch is logged and the master keeps serving (HUP still works).

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use regex::Regex;

/// Which changed paths trigger a reload.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// The default: the library's path as given, or the file it currently resolves to.
    Library,
    /// `--reload-regex`, matched against absolute paths (unanchored, like `Regex::is_match`).
    Regex(Regex),
}

impl Matcher {
    pub fn matches(&self, path: &Path, lib: &Path, resolved: Option<&Path>) -> bool {
        match self {
            Matcher::Library => path == lib || Some(path) == resolved,
            Matcher::Regex(re) => path.to_str().is_some_and(|p| re.is_match(p)),
        }
    }
}

/// The running watcher.
pub struct Watch {
    watcher: RecommendedWatcher,
    rx: Receiver<PathBuf>,
    wake: UnixStream,
    dirs: Vec<PathBuf>,
}

/// Why watching could not start (the master then refuses to start: `--watch` was asked for).
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}: {source}", dir.display())]
pub struct WatchError {
    pub dir: PathBuf,
    #[source]
    pub source: notify::Error,
}

impl Watch {
    /// Starts watching the directories of `lib` (and of its symlink target).
    pub fn start(lib: &Path) -> Result<Self, WatchError> {
        let (tx, rx) = channel();
        let (wake, wake_tx) = UnixStream::pair().map_err(|e| WatchError {
            dir: lib.to_path_buf(),
            source: notify::Error::io(e),
        })?;
        let _ = wake.set_nonblocking(true);
        let _ = wake_tx.set_nonblocking(true);
        let handler = move |res: notify::Result<notify::Event>| match res {
            Ok(event) if is_change(&event.kind) => {
                for path in event.paths {
                    if tx.send(path).is_err() {
                        return;
                    }
                }
                // A full socket buffer already means "wake up": ignore WouldBlock.
                let _ = (&wake_tx).write(b"w");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(event = "watch_error", "file watcher: {e}"),
        };
        let watcher = notify::recommended_watcher(handler).map_err(|source| WatchError {
            dir: lib.to_path_buf(),
            source,
        })?;
        let mut watch = Watch {
            watcher,
            rx,
            wake,
            dirs: Vec::new(),
        };
        watch.update(lib)?;
        Ok(watch)
    }

    /// Watches the directories `lib` needs now (a symlink may point somewhere new after a
    /// deploy); stops watching those it no longer needs.
    pub fn update(&mut self, lib: &Path) -> Result<(), WatchError> {
        let mut wanted: Vec<PathBuf> = Vec::new();
        if let Some(dir) = lib.parent() {
            wanted.push(dir.to_path_buf());
        }
        if let Some(dir) = std::fs::canonicalize(lib)
            .ok()
            .as_deref()
            .and_then(Path::parent)
        {
            if !wanted.iter().any(|w| w == dir) {
                wanted.push(dir.to_path_buf());
            }
        }
        for dir in self.dirs.clone() {
            if !wanted.contains(&dir) {
                let _ = self.watcher.unwatch(&dir);
                self.dirs.retain(|d| d != &dir);
            }
        }
        for dir in wanted {
            if !self.dirs.contains(&dir) {
                self.watcher
                    .watch(&dir, RecursiveMode::NonRecursive)
                    .map_err(|source| WatchError {
                        dir: dir.clone(),
                        source,
                    })?;
                tracing::info!(event = "watching", "watching {}", dir.display());
                self.dirs.push(dir);
            }
        }
        Ok(())
    }

    /// Becomes readable when events are queued.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// The changed paths queued since the last call.
    pub fn take(&mut self) -> Vec<PathBuf> {
        let mut buf = [0u8; 256];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
        self.rx.try_iter().collect()
    }
}

/// Reads and opens are not changes (our own snapshot copy reads the library).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matcher_takes_the_library_and_its_target_only() {
        let lib = Path::new("/srv/app/current/libapp.so");
        let resolved = Path::new("/srv/app/releases/7/libapp.so");
        let m = Matcher::Library;
        assert!(m.matches(lib, lib, Some(resolved)));
        assert!(m.matches(resolved, lib, Some(resolved)));
        assert!(!m.matches(Path::new("/srv/app/current/libapp.d"), lib, Some(resolved)));
        assert!(!m.matches(
            Path::new("/srv/app/current/deps/libapp.so"),
            lib,
            Some(resolved)
        ));
    }

    #[test]
    fn regex_matcher_sees_absolute_paths() {
        let m = Matcher::Regex(Regex::new(r"/lib[^/]*\.so$").expect("regex"));
        let lib = Path::new("/t/libapp.so");
        assert!(m.matches(Path::new("/t/release/libplugin.so"), lib, None));
        assert!(!m.matches(Path::new("/t/release/libapp.d"), lib, None));
    }

    #[test]
    fn own_reads_are_not_changes() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(
            notify::event::CreateKind::File
        )));
    }
}
