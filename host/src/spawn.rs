//! Starting worker processes: fork+exec of this very binary (`/proc/self/exe`) in its hidden
//! worker mode, never a bare fork — the master has threads, and after a bare fork only
//! async-signal-safe calls would be allowed. Inherited fds are CLOEXEC everywhere in the master;
//! the flag is cleared only in the child, between fork and exec.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::unistd::Pid;

use crate::worker::WorkerArgs;

/// The process name workers show in `ps`.
pub const WORKER_ARG0: &str = "angel-host: worker";

/// Spawns a worker (or probe) with `args`; the fds named in `args` are inherited under the
/// same numbers. The child is reaped by the master's `waitpid` loop, not through `Child`.
pub fn spawn(exe: &Path, args: &WorkerArgs) -> io::Result<Pid> {
    let mut inherit: Vec<RawFd> = args.listeners.iter().map(|(fd, _)| *fd).collect();
    inherit.push(args.control_fd);
    let mut cmd = Command::new(exe);
    cmd.arg0(WORKER_ARG0)
        .args(args.to_argv())
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec; it only calls fcntl, which
    // is async-signal-safe, and allocates nothing (`inherit` was built before the fork).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(Pid::from_raw(child.id() as i32))
}
