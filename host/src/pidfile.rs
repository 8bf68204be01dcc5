//! The master's pidfile: checked before anything is bound, written atomically (temp file +
//! rename), removed on every clean exit — but only while it still names this master.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

/// Why the pidfile stops the start (exit code 5).
#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("pidfile {} names a running angel-host master (pid {pid}); stop it first or use another --pidfile", path.display())]
    LiveMaster { path: PathBuf, pid: i32 },
    #[error("cannot write pidfile {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read pidfile {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
}

/// What an existing pidfile says.
#[derive(Debug, PartialEq, Eq)]
pub enum Existing {
    None,
    /// Names no live angel-host (dead pid, a reused pid of another program, or garbage).
    Stale(Option<i32>),
    Live(i32),
}

/// Reads `path` and tells whether it names a live angel-host master.
pub fn inspect(path: &Path) -> Result<Existing, PidfileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::None),
        Err(source) => {
            return Err(PidfileError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    // Garbage, including bytes that are not UTF-8, names no master: stale, not a blocked start.
    let Some(pid) = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    else {
        return Ok(Existing::Stale(None));
    };
    if pid > 0 && pid != std::process::id() as i32 && is_angel_host(pid) {
        Ok(Existing::Live(pid))
    } else {
        Ok(Existing::Stale(Some(pid)))
    }
}

/// A pid counts as a live master if the process exists, is not a worker, and either runs this
/// very binary, runs a binary named `angel-host*` (a master of an older build whose file was
/// replaced by a deploy), or answers on the control socket named for its pid. argv\[0\] alone
/// proves nothing: any program can be started as `angel-host` (`exec -a`), and pids are reused.
fn is_angel_host(pid: i32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let arg0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    // Workers are also angel-host processes but never own a pidfile; their arg0 says "worker".
    if String::from_utf8_lossy(arg0).contains("worker") {
        return false;
    }
    same_exe_as_ours(pid) || exe_named_angel_host(pid) || control_socket_answers(pid)
}

/// `/proc/PID/exe` is the same file as ours (same device and inode).
fn same_exe_as_ours(pid: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: String| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    id(format!("/proc/{pid}/exe")).is_some_and(|theirs| id("/proc/self/exe".into()) == Some(theirs))
}

/// The binary it runs is called `angel-host...` (also after it was deleted by a deploy).
fn exe_named_angel_host(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        exe.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("angel-host"))
    })
}

/// Something listens on the control socket of a master with this pid.
fn control_socket_answers(pid: i32) -> bool {
    std::os::unix::net::UnixStream::connect(crate::ctl::socket_path(pid)).is_ok()
}

/// The written pidfile; removed by [`Pidfile::remove`].
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    pid: Pid,
}

impl Pidfile {
    /// Writes `pid` to `path` atomically (a reader never sees a half-written file).
    pub fn write(path: &Path, pid: Pid) -> Result<Self, PidfileError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let err = |source| PidfileError::Write {
            path: path.clone(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("/"));
        let mut tmp = tempfile::Builder::new()
            .prefix(".angel-pid")
            .tempfile_in(dir)
            .map_err(err)?;
        writeln!(tmp, "{pid}").map_err(err)?;
        tmp.persist(&path).map_err(|e| err(e.error))?;
        Ok(Pidfile { path, pid })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file if it still names us (a newer master may have taken it over).
    pub fn remove(&self) -> bool {
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            == Some(self.pid.as_raw());
        ours && std::fs::remove_file(&self.path).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_dead_pids_are_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("angel.pid");
        assert_eq!(inspect(&path).expect("inspect"), Existing::None);
        std::fs::write(&path, "not a pid\n").expect("write");
        assert_eq!(inspect(&path).expect("inspect"), Existing::Stale(None));
        // pid_max on Linux is at most 2^22, so this pid cannot exist.
        std::fs::write(&path, "99999999\n").expect("write");
        assert_eq!(
            inspect(&path).expect("inspect"),
            Existing::Stale(Some(99999999))
        );
        // pid 1 is alive but is not angel-host.
        std::fs::write(&path, "1\n").expect("write");
        assert_eq!(inspect(&path).expect("inspect"), Existing::Stale(Some(1)));
        std::fs::write(&path, b"\xff\xfe12\n").expect("write");
        assert_eq!(inspect(&path).expect("inspect"), Existing::Stale(None));
    }

    #[test]
    fn written_pidfile_is_removed_only_while_ours() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("angel.pid");
        let pf = Pidfile::write(&path, Pid::from_raw(4242)).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "4242\n");
        std::fs::write(&path, "4343\n").expect("overwrite");
        assert!(!pf.remove());
        assert!(path.exists());
        std::fs::write(&path, "4242\n").expect("restore");
        assert!(pf.remove());
        assert!(!path.exists());
    }
}
