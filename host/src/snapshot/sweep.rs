//! Leftovers of dead masters: snapshot directories and control sockets that a master killed
//! without cleaning up (SIGKILL, power loss) left in a shared directory.

use std::fs::File;
use std::path::Path;

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
        // A pid says nothing across PID namespaces (a master that is PID 1 of a container
        // sees none of the host's pids): remove only what nobody uses.
        if dead && ours && !in_use(&entry.path()) {
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

/// Whether a live master still uses `path`: a control socket that accepts a connection, or a
/// snapshot directory whose owner holds its `flock`.
fn in_use(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if meta.file_type().is_socket() {
        return std::os::unix::net::UnixStream::connect(path).is_ok();
    }
    if meta.is_dir() {
        return File::open(path).is_ok_and(|f| {
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_err()
        });
    }
    false
}
