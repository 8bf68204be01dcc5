//! A generation stays loadable for its whole life: whatever happens to the snapshot's
//! location (a temp cleaner, a moved directory), a worker of that generation that crashes is
//! respawned from the copy the master holds open.

use std::path::{Path, PathBuf};

use angel_tests::*;

/// Paths of file-backed snapshots a process has mapped (`gen<N>-<sha>.so` under our dir);
/// memfd mappings (`/memfd:...`) have no path to delete.
fn mapped_snapshot_files(pid: i32, under: &Path) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut files: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(under))
        .collect();
    files.dedup();
    files
}

/// What systemd-tmpfiles or tmpreaper does: everything under `dir` goes.
fn wipe(dir: &Path) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed += usize::from(gone.is_ok());
    }
    removed
}

#[test]
fn deleted_snapshot_still_respawns_a_crashed_worker() {
    let work = tempfile::tempdir().expect("tempdir");
    let snaps = work.path().join("snaps");
    std::fs::create_dir(&snaps).expect("mkdir");
    let host = Host::builder(lib("hello"))
        .dir(work.path())
        .args(["--workers", "1", "--snapshot-dir"])
        .arg(&snaps)
        .start();
    let before = host.worker_pids();
    assert_eq!(before.len(), 1, "{}", host.log());
    let worker = before[0];

    // Delete the snapshot wherever it lives on disk, then make sure nothing of it is left.
    for file in mapped_snapshot_files(worker, &snaps) {
        let _ = std::fs::remove_file(file);
    }
    wipe(&snaps);
    assert!(
        mapped_snapshot_files(worker, &snaps)
            .iter()
            .all(|f| !f.exists()),
        "snapshot still on disk"
    );

    // Crash the worker of generation 1: its slot must be served again, from generation 1.
    let mark = host.mark();
    let _ = get(host.addr(), "/crash");
    host.wait_log_since(mark, &format!("worker {worker} died"), WAIT);
    let respawned = wait_until(&host, WAIT, "a respawned worker serving", || {
        host.worker_pids().into_iter().find(|p| *p != worker)
    });
    for i in 0..20 {
        let resp = get(host.addr(), "/").unwrap_or_else(|e| {
            panic!(
                "request {i} after the respawn failed: {e}\n--- master stderr ---\n{}",
                host.log()
            )
        });
        assert_eq!(hello_pid(&resp.text()), respawned, "{}", host.log());
    }
    let since = host.log_since(mark);
    assert!(
        !since.contains("cannot open shared object"),
        "a respawn could not load its generation:\n{since}"
    );
}
