//! Starting worker processes: fork+exec of this very binary (`/proc/self/exe`) in its hidden
//! worker mode, never a bare fork — the master has threads (the file watcher), and after a
//! bare fork only async-signal-safe calls would be allowed. Inherited fds are CLOEXEC
//! everywhere in the master; the flag is cleared only in the child, between fork and exec.
//!
//! We fork and exec by hand rather than through `std::process::Command`, which blocks the
//! parent until the child has exec'd (to report exec errors): that serialised every worker of
//! a roll behind the previous one's exec, about a millisecond each. Here the parent returns
//! at once; an exec that fails shows up as the child exiting with [`EXEC_FAILED`], which the
//! master reports like any worker that died before it was ready.

use std::ffi::{c_char, CString};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::unistd::Pid;

use crate::worker::WorkerArgs;

/// The process name workers show in `ps`.
pub const WORKER_ARG0: &str = "angel-host: worker";

/// Exit status of a child whose exec failed (as the shell uses).
pub const EXEC_FAILED: i32 = 127;

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::other("argument contains a NUL byte"))
}

/// Spawns a worker (or probe) with `args`; the fds named in `args` are inherited under the
/// same numbers, stdin is /dev/null, stdout and stderr are the master's. The child is reaped
/// by the master's `waitpid` loop.
pub fn spawn(exe: &Path, args: &WorkerArgs) -> io::Result<Pid> {
    let inherit: Vec<RawFd> = args.inherited_fds();
    // A probe (or a spare, or the zygote it becomes) never drains anything: a `SIGTERM` to
    // the whole process group (systemd's `KillMode=control-group`) is for the workers, and
    // the master stops these itself. Ignored from before the exec (an ignored signal stays
    // ignored across it), so there is no moment in its start-up where the TERM kills it.
    let ignore_term = args.probe;
    // Everything the child needs is prepared before the fork: it must not allocate.
    let exe = cstring(exe.as_os_str().as_bytes())?;
    let argv: Vec<CString> = std::iter::once(Ok(cstring(WORKER_ARG0.as_bytes())?))
        .chain(args.to_argv().iter().map(|a| cstring(a.as_bytes())))
        .collect::<io::Result<_>>()?;
    let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let devnull = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: `OwnedFd::from_raw_fd` takes the fd `open` just returned, owned by nobody else.
    let devnull = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(devnull) };

    // SAFETY: after fork the child only calls async-signal-safe functions (dup2, signal,
    // fcntl, execv, _exit) on data prepared above, and never returns into Rust code: it execs or
    // exits. The parent continues normally.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: child side, see above; every pointer is valid (owned by the parent's
            // stack frame, copied into the child by fork).
            unsafe {
                libc::dup2(devnull.as_raw_fd(), 0);
                if ignore_term {
                    libc::signal(libc::SIGTERM, libc::SIG_IGN);
                }
                for &fd in &inherit {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                libc::execv(exe.as_ptr(), argv_ptrs.as_ptr());
                libc::_exit(EXEC_FAILED)
            }
        }
        pid => Ok(Pid::from_raw(pid)),
    }
}
