//! `--watch`: roll when the library changes on disk.
//!
//! cargo does not write `target/release/libapp.so` in place: it unlinks it and hard-links a new
//! inode (a CREATE on the directory, the path absent for about a millisecond, never a
//! CLOSE_WRITE on the file). So we watch the **directories** — the one holding `--lib` and, when
//! `--lib` is a symlink, the one holding its target — and filter their events by path with the
//! reload matcher (`--reload-regex`, by default the library's own path). A library *replaced*
//! at once — renamed into place (`mv`, `rsync` without `--inplace`, `ln -sfn`) or hard-linked
//! into place (cargo's uplift from `deps/`, so the new inode has a second link) — is complete
//! when its name appears: the master rolls at once. Other changes (writes in place by `cp` or
//! `rsync --inplace`, other `--reload-regex` matches) are debounced. Either way the master
//! rolls only if the content hash differs from what is serving.
//!
//! notify delivers events on its own thread; this module forwards matching paths over a
//! channel and wakes the master's `poll` through a socketpair. Nothing here panics: a failing
//! watch is logged and the master keeps serving (HUP still works).

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use regex::Regex;

/// `--reload-regex`: which changed paths trigger a reload, matched against absolute canonical
/// paths (unanchored, like `Regex::is_match`). Without it, the library's own entries do
/// ([`Watch::is_library`]).
#[derive(Debug, Clone, Default)]
pub struct Matcher(pub Option<Regex>);

impl Matcher {
    pub fn matches(&self, path: &Path) -> bool {
        self.0
            .as_ref()
            .is_some_and(|re| path.to_str().is_some_and(|p| re.is_match(p)))
    }
}

/// One change seen in a watched directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: PathBuf,
    /// Data was written but the writer has not closed the file yet (a copy in progress).
    pub writing: bool,
    /// A complete file appeared under this name at once (see [`is_replace`]).
    pub replaced: bool,
}

/// The running watcher.
pub struct Watch {
    watcher: RecommendedWatcher,
    rx: Receiver<Change>,
    wake: UnixStream,
    /// Watched directories, canonical.
    dirs: Vec<PathBuf>,
    /// Directory entries whose change means "the library changed": the library's entry, its
    /// resolved file, and every symlink on the way to it (`current -> releases/N`).
    library_paths: Vec<PathBuf>,
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
                let writing = matches!(event.kind, EventKind::Modify(ModifyKind::Data(_)));
                for path in event.paths {
                    let replaced = is_replace(&event.kind, &path);
                    let change = Change {
                        path,
                        writing,
                        replaced,
                    };
                    if tx.send(change).is_err() {
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
            library_paths: Vec::new(),
        };
        watch.update(lib)?;
        Ok(watch)
    }

    /// Watches the directories `lib` needs now — a symlink may point somewhere new after a
    /// deploy — and stops watching those it no longer needs. For
    /// `/srv/current/libapp.so` with `current -> releases/7` that is `/srv/releases/7` (the
    /// file's directory) and `/srv` (where the `current` link is switched).
    pub fn update(&mut self, lib: &Path) -> Result<(), WatchError> {
        let (wanted, library_paths) = watch_plan(lib);
        self.library_paths = library_paths;
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

    /// Whether a change to `path` is a change of the library (or of a link leading to it).
    pub fn is_library(&self, path: &Path) -> bool {
        self.library_paths.iter().any(|p| p == path)
    }

    /// Becomes readable when events are queued.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// The changes queued since the last call.
    pub fn take(&mut self) -> Vec<Change> {
        let mut buf = [0u8; 256];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
        self.rx.try_iter().collect()
    }
}

/// The canonical directories to watch for `lib`, and the canonical entries in them that stand
/// for the library. Paths that do not exist (yet) are skipped: the directory holding the
/// library is what matters, and it is watched as soon as it resolves.
fn watch_plan(lib: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut entries: Vec<PathBuf> = Vec::new();
    let mut add = |dirs: &mut Vec<PathBuf>, entry: &Path| {
        let (Some(parent), Some(name)) = (entry.parent(), entry.file_name()) else {
            return;
        };
        let Ok(dir) = std::fs::canonicalize(parent) else {
            return;
        };
        entries.push(dir.join(name));
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    };
    add(&mut dirs, lib);
    if let Ok(resolved) = std::fs::canonicalize(lib) {
        add(&mut dirs, &resolved);
    }
    for ancestor in lib.ancestors().skip(1) {
        if std::fs::symlink_metadata(ancestor).is_ok_and(|m| m.file_type().is_symlink()) {
            add(&mut dirs, ancestor);
        }
    }
    (dirs, entries)
}

/// Whether an event put a complete file at `path` in one step: the target of a rename, or a
/// name created for an inode that already has another link (a hard link: cargo uplifts
/// `deps/libapp-<hash>.so` that way) or that is a symlink. A file created by `open(O_CREAT)`
/// (`cp` to a new name) has one link and is still being written: not a replace.
fn is_replace(kind: &EventKind, path: &Path) -> bool {
    use notify::event::{CreateKind, RenameMode};
    use std::os::unix::fs::MetadataExt as _;
    match kind {
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => true,
        EventKind::Create(CreateKind::File | CreateKind::Any | CreateKind::Other) => {
            std::fs::symlink_metadata(path)
                .is_ok_and(|m| m.file_type().is_symlink() || m.nlink() > 1)
        }
        _ => false,
    }
}

/// Reads and opens are not changes (our own snapshot copy reads the library). Nor is the
/// summary event of a rename (both ends in one event): inotify's two ends of it arrive as
/// events of their own, and reporting it again would roll twice.
fn is_change(kind: &EventKind) -> bool {
    use notify::event::RenameMode;
    match kind {
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => false,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinked_directories_are_watched_where_the_link_lives() {
        let work = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(work.path()).expect("canon");
        std::fs::create_dir_all(root.join("releases/1")).expect("mkdir");
        std::fs::write(root.join("releases/1/libapp.so"), b"x").expect("write");
        std::os::unix::fs::symlink("releases/1", root.join("current")).expect("link");
        let (dirs, entries) = watch_plan(&root.join("current/libapp.so"));
        assert_eq!(dirs, vec![root.join("releases/1"), root.clone()]);
        assert!(entries.contains(&root.join("current")), "{entries:?}");
        assert!(
            entries.contains(&root.join("releases/1/libapp.so")),
            "{entries:?}"
        );
        assert!(!entries.contains(&root.join("releases/1/libapp.d")));
    }

    #[test]
    fn regex_matcher_sees_absolute_paths() {
        let m = Matcher(Some(Regex::new(r"/lib[^/]*\.so$").expect("regex")));
        assert!(m.matches(Path::new("/t/release/libplugin.so")));
        assert!(!m.matches(Path::new("/t/release/libapp.d")));
        assert!(!Matcher::default().matches(Path::new("/t/release/libplugin.so")));
    }

    #[test]
    fn renames_and_hard_links_are_replaces_new_files_are_not() {
        use notify::event::{CreateKind, RenameMode};
        let work = tempfile::tempdir().expect("tempdir");
        let lib = work.path().join("libapp.so");
        std::fs::write(&lib, b"x").expect("write");
        let create = EventKind::Create(CreateKind::File);
        // `cp` to a new name: one link, still being written.
        assert!(!is_replace(&create, &lib));
        // cargo: a hard link of deps/libapp-<hash>.so.
        std::fs::hard_link(&lib, work.path().join("deps-copy.so")).expect("link");
        assert!(is_replace(&create, &lib));
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(is_replace(&rename, &lib));
        let write = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        assert!(!is_replace(&write, &lib));
        assert!(!is_replace(&create, &work.path().join("gone.so")));
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
