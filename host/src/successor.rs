//! Self-upgrade (nginx's `USR2`): start a new master — a new angel-host binary — and hand it
//! the listening sockets, so connections queued in them survive the upgrade of the host itself.
//!
//! The handover speaks the socket-activation protocol ([`crate::activation`]): the successor
//! finds its listeners at fds `3..3+LISTEN_FDS`, named by `LISTEN_FDNAMES`, with `LISTEN_PID`
//! set to its own pid — so the new master's start-up is the same whether systemd or the old
//! master started it, and `activation::from_env` validates what it gets.
//!
//! `LISTEN_PID` must be the child's pid, known only after the fork, and after a fork of a
//! threaded process only async-signal-safe calls are allowed (no `setenv`, no allocation).
//! So the environment is built before the fork with a fixed-width placeholder, and the child
//! writes its pid's digits into that buffer (`getpid` and plain stores), then `execve`s.
//!
//! # Wiring
//!
//! `master::upgrade` calls [`spawn_successor`] on `USR2` / `angel-host upgrade`, with the
//! listeners under their handover names and a status socket for the new master's
//! `serving N` / `failed REASON` line; the rest of the protocol is described there.

use std::ffi::{c_char, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::unistd::Pid;

use crate::activation::{ENV_VARS, LISTEN_FDS_START};

/// Exit status of a successor whose exec failed.
pub const EXEC_FAILED: i32 = 127;

/// Digits reserved for `LISTEN_PID` (a pid is at most 2^22 on Linux: 7 digits; 20 fits any
/// 64-bit value).
const PID_DIGITS: usize = 20;

/// Environment variables the successor gets from us, besides its own.
pub const PARENT_PID_VAR: &str = "ANGEL_PARENT_PID";

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::other("argument contains a NUL byte"))
}

/// Starts `exe` with `args` (after `argv[0]`), the listeners `fds` at 3, 4, ... with their
/// names, `status` (if any) right after them (not counted in `LISTEN_FDS`), this process's environment (less any stale `LISTEN_*`) plus `extra_env`,
/// `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID` (the child's pid) and
/// [`PARENT_PID_VAR`]. Returns at once; reap the child with `waitpid` like a worker.
pub fn spawn_successor(
    exe: &Path,
    args: &[OsString],
    fds: &[(BorrowedFd<'_>, &str)],
    status: Option<BorrowedFd<'_>>,
    extra_env: &[(&str, String)],
) -> io::Result<Pid> {
    // Everything the child needs is prepared here: after the fork it must not allocate.
    let exe_c = cstring(exe.as_os_str().as_bytes())?;
    let argv: Vec<CString> = std::iter::once(exe.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<_>>()?;
    let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());

    let ours = |k: &OsStr| {
        ENV_VARS.iter().any(|v| OsStr::new(v) == k)
            || OsStr::new(PARENT_PID_VAR) == k
            || extra_env.iter().any(|(v, _)| OsStr::new(v) == k)
    };
    let names: Vec<&str> = fds.iter().map(|(_, n)| *n).collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !ours(k))
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring(&kv)
        })
        .collect::<io::Result<_>>()?;
    for (k, v) in extra_env {
        env.push(cstring(format!("{k}={v}").as_bytes())?);
    }
    env.push(cstring(format!("LISTEN_FDS={}", fds.len()).as_bytes())?);
    env.push(cstring(
        format!("LISTEN_FDNAMES={}", names.join(":")).as_bytes(),
    )?);
    env.push(cstring(
        format!("{PARENT_PID_VAR}={}", std::process::id()).as_bytes(),
    )?);
    // The placeholder the child overwrites: "LISTEN_PID=" then PID_DIGITS bytes, NUL.
    let mut pid_var: Vec<u8> = b"LISTEN_PID=".to_vec();
    let digits_at = pid_var.len();
    pid_var.resize(digits_at + PID_DIGITS, b'0');
    pid_var.push(0);
    let mut envp: Vec<*const c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(pid_var.as_ptr().cast());
    envp.push(std::ptr::null());
    let pid_digits: *mut u8 = pid_var[digits_at..].as_mut_ptr();

    let sources: Vec<RawFd> = fds
        .iter()
        .map(|(fd, _)| fd.as_raw_fd())
        .chain(status.map(|s| s.as_raw_fd()))
        .collect();
    // Above every target number, so that moving a source never overwrites another one.
    let park_from = LISTEN_FDS_START + RawFd::try_from(sources.len()).unwrap_or(RawFd::MAX - 4);
    let mut parked: Vec<RawFd> = vec![-1; sources.len()];

    // SAFETY: after fork the child only calls async-signal-safe functions (getpid, fcntl,
    // dup2, execve, _exit) and writes to memory prepared above (`pid_var`, `parked`), then
    // execs or exits, never returning into Rust code. The parent continues normally; it
    // keeps every buffer alive until after the fork returns.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: child side, see above. `pid_digits` points to PID_DIGITS writable
            // bytes followed by the NUL of `pid_var`; `parked` has one slot per source, so
            // the indexing cannot panic.
            unsafe {
                write_digits(pid_digits, PID_DIGITS, libc::getpid());
                for (i, &fd) in sources.iter().enumerate() {
                    // CLOEXEC: the parked copies close at exec, only 3.. are inherited.
                    let p = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, park_from);
                    if p < 0 {
                        libc::_exit(EXEC_FAILED);
                    }
                    parked[i] = p;
                }
                for (i, &p) in parked.iter().enumerate() {
                    // dup2 leaves the new fd without FD_CLOEXEC: the successor inherits it.
                    if libc::dup2(p, LISTEN_FDS_START + i as RawFd) < 0 {
                        libc::_exit(EXEC_FAILED);
                    }
                }
                libc::execve(exe_c.as_ptr(), argv_ptrs.as_ptr(), envp.as_ptr());
                libc::_exit(EXEC_FAILED)
            }
        }
        pid => Ok(Pid::from_raw(pid)),
    }
}

/// Writes `n` in decimal at `buf` (room for `len` bytes) and a NUL after the digits.
///
/// # Safety
/// `buf` must point to `len + 1` writable bytes. Async-signal-safe: no allocation, no locks.
unsafe fn write_digits(buf: *mut u8, len: usize, n: libc::pid_t) {
    let mut digits = [0u8; PID_DIGITS];
    let mut n = u64::try_from(n).unwrap_or(0);
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        n /= 10;
        count += 1;
        if n == 0 || count == digits.len() || count == len {
            break;
        }
    }
    for i in 0..count {
        // SAFETY: i < count <= len, inside the buffer (caller's contract).
        unsafe { *buf.add(i) = digits[count - 1 - i] };
    }
    // SAFETY: count <= len, and the buffer has len + 1 bytes.
    unsafe { *buf.add(count) = 0 };
}

#[cfg(test)]
#[path = "successor_tests.rs"]
mod tests;
