//! A generation's zygote: its probe, kept. Once the probe has loaded and checked the library
//! (`dlopen`, relocations, the ABI symbols), it tells the master [`Msg::Forkable`] and stays,
//! and the master asks it for the generation's workers ([`Msg::Fork`], with the worker's
//! control end and listeners). A worker forked from it starts with the library already
//! mapped and relocated, as unicorn's `preload_app` or Android's zygote do:
//!
//! - no `exec` of the host binary and no `dlopen` per worker, so a roll costs one process
//!   start instead of one per worker (plus the probe's);
//! - the relocated pages of the host binary and of the app (about 0.9 MB for `examples/hello`)
//!   and the early heap are shared copy-on-write by all workers of the generation instead of
//!   being private to each.
//!
//! The app itself starts only in the worker, after the fork: the zygote runs the library's
//! initialisers (as every process that loads it does) and nothing else of it, so no runtime,
//! thread, socket or random seed of the app is ever shared between workers.
//!
//! A worker must be the master's child (the master reaps it, and `waitpid` is how it learns
//! of a death). The zygote forks it with `clone(CLONE_PARENT)`, which makes the master its
//! parent at once; the zygote answers [`Msg::Forked`] with the pid it got and takes the next
//! request. Where the kernel refuses the flag (a seccomp filter), it forks twice instead: a
//! middle process forks the worker and exits at once, and the worker is re-parented to the
//! master, a child subreaper (`PR_SET_CHILD_SUBREAPER`). Measured with both cores saturated,
//! the double fork's two extra processes to schedule per worker made a roll 3 ms slower
//! than exec'd workers; the single clone made it faster (BENCHMARKS.md).
//!
//! Only a single-threaded process can be a zygote (`fork` copies the calling thread only, and
//! a lock another thread holds would stay locked in the child): a probe that finds a thread
//! besides its own after loading (a library initialiser started one) exits as a plain probe,
//! and the master starts that generation's workers by `exec`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};

use angel::abi;
use nix::errno::Errno;
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{fork, ForkResult, Pid};

use super::WorkerArgs;
use crate::control::{self, Msg, Recv};

/// What the zygote loop ends with.
pub(super) enum Outcome {
    /// In the zygote: it is done (the master closed the channel); exit with this code.
    Exit(i32),
    /// In a newly forked worker: serve with these arguments and this control channel.
    Worker(WorkerArgs, OwnedFd),
}

/// A spare probe: waits until the master hands it a generation's snapshot (`Msg::Load`), and
/// returns that generation and the snapshot's fd (owned by the caller, as an inherited one
/// would be); `None` when the master closes the channel first.
pub(super) fn wait_for_snapshot(control: &OwnedFd) -> Option<(u64, std::os::fd::RawFd)> {
    set_title("angel-host: spare probe");
    loop {
        let (got, fds) = match control::recv_fds(control) {
            Ok(got) => got,
            Err(e) => {
                tracing::error!(
                    event = "spare_error",
                    "cannot read the control channel: {e}"
                );
                return None;
            }
        };
        match got {
            Recv::Msg(Msg::Load { generation }) => {
                let mut fds = fds.into_iter();
                match fds.next() {
                    Some(fd) => return Some((generation, fd.into_raw_fd())),
                    None => tracing::error!(
                        event = "spare_error",
                        "generation {generation}'s snapshot came without its fd"
                    ),
                }
            }
            Recv::Eof => return None,
            Recv::Msg(_) | Recv::Empty => {}
        }
    }
}

/// Whether this process has exactly one thread.
pub(super) fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

/// Offers the master to fork, then forks a worker per request until the master closes the
/// channel. Returns in the zygote when it is done, and in each new worker.
pub(super) fn serve_forks(control: OwnedFd, args: &WorkerArgs) -> Outcome {
    // `SIGTERM` is ignored here since before the exec (`spawn.rs`: a probe, and so the spare
    // and the zygote it becomes, never drains); each forked worker puts the default back.
    set_title(&format!(
        "angel-host: zygote (generation {})",
        args.generation
    ));
    if control::send_msg(control.as_fd(), &Msg::Forkable).is_err() {
        return Outcome::Exit(abi::EXIT_OK);
    }
    let mut double = false;
    loop {
        let (got, fds) = match control::recv_fds(&control) {
            Ok(got) => got,
            Err(e) => {
                tracing::error!(
                    event = "zygote_error",
                    "cannot read the control channel: {e}"
                );
                return Outcome::Exit(abi::EXIT_HOST_ERROR);
            }
        };
        let (slot, max_requests, graceful_ms, kinds) = match got {
            Recv::Msg(Msg::Fork {
                slot,
                max_requests,
                graceful_ms,
                kinds,
            }) => (slot, max_requests, graceful_ms, kinds),
            // The master is gone or done with this generation.
            Recv::Eof => return Outcome::Exit(abi::EXIT_OK),
            Recv::Msg(_) | Recv::Empty => continue,
        };
        if fds.len() != kinds.len() + 1 {
            let why = format!(
                "a fork request for slot {slot} came with {} fds, not {}",
                fds.len(),
                kinds.len() + 1
            );
            let _ = control::send_msg(control.as_fd(), &Msg::ForkFailed(why));
            continue;
        }
        match fork_worker(&mut double) {
            Ok(Some(Forked { pid, middle })) => {
                // The worker has its own copies; ours would keep its sockets open.
                drop(fds);
                // The answer first: the master needs only the pid now. The worker becomes its
                // child when the middle process exits (which it does right after the fork),
                // and until then nothing of the master's waits for it.
                let _ = control::send_msg(control.as_fd(), &Msg::Forked(pid.as_raw()));
                if let Some(middle) = middle {
                    reap(middle);
                }
            }
            Ok(None) => {
                drop(control);
                // SAFETY: SIG_DFL installs no handler code. An ignored SIGTERM would never
                // be pending, and the worker's drain reads it from a signalfd.
                let _ = unsafe { signal(Signal::SIGTERM, SigHandler::SigDfl) };
                crate::log::after_fork();
                let mut fds = fds.into_iter();
                let Some(worker_control) = fds.next() else {
                    unreachable!("the fd count was checked")
                };
                let listeners = fds.map(IntoRawFd::into_raw_fd).zip(kinds).collect();
                let worker = WorkerArgs {
                    probe: false,
                    zygote: false,
                    control_fd: worker_control.as_raw_fd(),
                    listeners,
                    slot,
                    max_requests,
                    graceful_ms,
                    // The zygote already became `--user`; its children are that user too.
                    credentials: None,
                    ..args.clone()
                };
                set_title(&format!(
                    "angel-host: worker (generation {}, slot {slot})",
                    worker.generation
                ));
                return Outcome::Worker(worker, worker_control);
            }
            Err(e) => {
                let why = format!("cannot fork a worker for slot {slot}: {e}");
                let _ = control::send_msg(control.as_fd(), &Msg::ForkFailed(why));
            }
        }
    }
}

/// Waits for the middle process of a double fork to exit.
fn reap(middle: Pid) {
    loop {
        match nix::sys::wait::waitpid(middle, None) {
            Err(Errno::EINTR) => {}
            _ => return,
        }
    }
}

/// A worker forked, as the zygote sees it.
struct Forked {
    pid: Pid,
    /// The middle process of a double fork, still to be reaped.
    middle: Option<Pid>,
}

/// Forks a worker that is the master's child: `Some` in the zygote, `None` in the worker.
/// `clone(CLONE_PARENT)` where the kernel allows it, else a double fork (`double`, set from
/// then on).
fn fork_worker(double: &mut bool) -> io::Result<Option<Forked>> {
    if !*double {
        match clone_parent() {
            Ok(0) => return Ok(None),
            Ok(pid) => {
                return Ok(Some(Forked {
                    pid: Pid::from_raw(pid),
                    middle: None,
                }))
            }
            // A seccomp filter or a kernel that refuses the flag.
            Err(e @ (Errno::EINVAL | Errno::EPERM | Errno::ENOSYS)) => {
                tracing::info!(
                    event = "double_fork",
                    "clone(CLONE_PARENT) is refused here ({e}); this zygote forks its workers with a double fork"
                );
                *double = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
    double_fork()
}

/// `clone(CLONE_PARENT | SIGCHLD)` with no new stack: like `fork`, but the child's parent is
/// our parent, the master. 0 in the child.
fn clone_parent() -> Result<i32, Errno> {
    // SAFETY: a fork-like clone (no CLONE_VM, no new stack, no TLS, no tid pointers) of a
    // single-threaded process: the child continues on its own copy of this stack. glibc's
    // `fork` would also run `pthread_atfork` handlers and store the child's tid in its thread
    // descriptor; nothing of the app's has run yet to register a handler, and the stale tid
    // only tags mutexes the child locks itself (glibc's `raise` and `pthread_kill` of the
    // calling thread ask the kernel for the tid).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match rc {
        -1 => Err(Errno::last()),
        pid => Ok(pid as i32),
    }
}

/// The fallback: the middle process forks the worker and exits at once, so the worker is
/// re-parented to the master (a child subreaper). It costs two more processes to schedule
/// per worker, which a roll on busy cores feels (BENCHMARKS.md).
fn double_fork() -> io::Result<Option<Forked>> {
    let (pid_read, pid_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the zygote is single-threaded (checked before it offered to fork), so the child
    // is a whole copy of it and may run any code.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(pid_read);
            // SAFETY: this middle process is single-threaded too; it forks once more, reports
            // the worker's pid and exits without running any destructor or handler.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    drop(pid_write);
                    Ok(None)
                }
                Ok(ForkResult::Parent { child }) => {
                    let _ = nix::unistd::write(&pid_write, &child.as_raw().to_le_bytes());
                    // SAFETY: `_exit` ends this process at once; nothing of it is needed.
                    unsafe { libc::_exit(0) }
                }
                // SAFETY: as above; the zygote reads no pid and reports the failure.
                Err(_) => unsafe { libc::_exit(1) },
            }
        }
        ForkResult::Parent { child: middle } => {
            drop(pid_write);
            let mut buf = [0u8; 4];
            let mut got = 0;
            while got < buf.len() {
                match nix::unistd::read(pid_read.as_raw_fd(), &mut buf[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if got < buf.len() {
                reap(middle);
                return Err(io::Error::other("the intermediate process could not fork"));
            }
            Ok(Some(Forked {
                pid: Pid::from_raw(i32::from_le_bytes(buf)),
                middle: Some(middle),
            }))
        }
    }
}

/// Replaces what `ps` shows for this process (its argv strings, which a forked worker shares
/// with the zygote's `--probe --zygote` command line) with `title`, cut to fit.
fn set_title(title: &str) {
    // Fields 48 and 49 of /proc/self/stat: where the argv strings start and end.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // The command name (field 2) is in parentheses and may hold spaces.
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3.
    let (Some(start), Some(end)) = (
        fields.get(48 - 3).and_then(|f| f.parse::<usize>().ok()),
        fields.get(49 - 3).and_then(|f| f.parse::<usize>().ok()),
    ) else {
        return;
    };
    if end <= start || end - start > 1 << 20 {
        return;
    }
    let len = end - start;
    let bytes = title.as_bytes();
    let n = bytes.len().min(len - 1);
    // SAFETY: [start, end) is this process's own argv area (the kernel's `arg_start` and
    // `arg_end`), writable memory on the initial stack that nothing else uses as anything but
    // argv strings. It is overwritten within its bounds and stays NUL-terminated.
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area[..n].copy_from_slice(&bytes[..n]);
        area[n..].fill(0);
    }
}
