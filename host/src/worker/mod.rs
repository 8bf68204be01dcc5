//! Worker mode: the process the master fork+execs (`angel-host: worker`). It loads one
//! generation's snapshot, checks the ABI, and hands the app its listeners, a drain fd and the
//! host callbacks; the app's entry call blocks for the worker's whole life.
//!
//! The app's drain fd becomes readable when the master sends `drain` over the control
//! channel, when that channel reaches EOF (the master is gone), or on `SIGTERM` (systemd's
//! `KillMode=control-group` and `docker stop` signal the whole process group: the worker
//! drains instead of dying with requests in flight; the master's kill deadline still bounds
//! it). Since every app kind (HTTP, raw TCP, C) watches that fd, all of them drain on either.
//! The app's callbacks (`ready`, `retiring`, heartbeats, failure reasons) are sent back over
//! the control channel.
//!
//! How the fd becomes readable depends on the app:
//!
//! - An app that reports the drain back (`abi::FEATURE_DRAINING_EVENT`: every app built with
//!   the SDK) gets an **epoll set** as its drain fd, of the control channel and a `signalfd`
//!   for `SIGTERM` (blocked in the worker). The kernel makes it readable by itself; when the
//!   app sees it, it sends `EVENT_DRAINING` and the host does its part (the log line, letting
//!   go of the listeners) on the app's thread. So the worker process has **no thread of the
//!   host's**: with the SDK's default single-threaded runtime it stays a single-threaded
//!   process, and glibc keeps its single-thread fast paths (no atomics in `malloc`, no
//!   cancellation bookkeeping around every `recv`/`writev`; measured ~3 % of CPU per request
//!   with one core saturated, BENCHMARKS.md).
//! - Any other app (a C app, one built with an SDK before ABI 1.2) gets a pipe, which two
//!   threads of the host write to: one reads the control channel, one waits for `SIGTERM`.

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use angel::abi;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::{signal, SigHandler, Signal};
use socket2::SockRef;

use crate::control::{self, Msg};

mod args;
mod callbacks;
mod drain_threads;
mod zygote;

pub use args::{WorkerArgs, WORKER_MODE};
use callbacks::{host_fail, host_log, host_log_record, host_notify};
use drain_threads::drain_threads;

/// Why the library could not be used; each maps to a distinct worker exit code.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The inherited snapshot fd is unusable: the host's fault, not the library's.
    #[error("cannot reach the snapshot through inherited fd {fd} ({path}): {source}")]
    Snapshot {
        fd: RawFd,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load: {0}")]
    Open(String),
    #[error("not an angel app: symbol `{0}` not found (export the app with angel::export! or angel::export_http!)")]
    NotAnApp(&'static str),
    #[error("ABI version mismatch: the library speaks angel ABI {found}, this angel-host speaks ABI {expected}; rebuild the app against a matching angel SDK")]
    AbiMismatch { found: u32, expected: u32 },
}

impl LoadError {
    pub fn exit_code(&self) -> i32 {
        match self {
            LoadError::Snapshot { .. } => abi::EXIT_HOST_ERROR,
            LoadError::Open(_) => abi::EXIT_LOAD_FAILED,
            LoadError::NotAnApp(_) => abi::EXIT_NOT_AN_APP,
            LoadError::AbiMismatch { .. } => abi::EXIT_ABI_MISMATCH,
        }
    }
}

/// Loads the snapshot through its inherited fd (`/proc/self/fd/N`) and returns it with its
/// entry point, then closes the fd (the mapping keeps the copy alive; the app must not
/// inherit it). The library is never unloaded.
///
/// # Safety
/// dlopen runs the library's initialisers (foreign code) in this process; call it only in a
/// worker or probe process, never in the master. `fd` must be the snapshot fd the master
/// passed, owned by nothing else in this process.
unsafe fn load(fd: RawFd) -> Result<(libloading::os::unix::Library, abi::EntryFn, u32), LoadError> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    let path = format!("/proc/self/fd/{fd}");
    let unusable = |source| LoadError::Snapshot {
        fd,
        path: path.clone(),
        source,
    };
    // SAFETY: the caller passes the snapshot fd, which nothing else owns.
    let snapshot = unsafe { OwnedFd::from_raw_fd(fd) };
    // A missing /proc, or an fd that was not inherited, must not read as a broken library.
    nix::sys::stat::fstat(snapshot.as_raw_fd()).map_err(|e| unusable(e.into()))?;
    std::fs::metadata(&path).map_err(unusable)?;
    // SAFETY: the caller accepts running foreign initialisers (see # Safety).
    let opened = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_LOCAL) };
    drop(snapshot);
    let lib = opened.map_err(|e| {
        // dlerror prefixes the fd's path, which means nothing to the user; the master
        // names the user's library instead.
        let text = e.to_string();
        LoadError::Open(text.replace(&format!("{path}: "), ""))
    })?;
    // SAFETY: the symbol is declared by the ABI as `uint32_t angel_abi_version`; we only read
    // the address here.
    let version = unsafe { lib.get::<*const u32>(abi::VERSION_SYMBOL) }
        .map_err(|_| LoadError::NotAnApp("angel_abi_version"))?;
    // SAFETY: dlsym returned the address of a `u32` static that lives as long as the library,
    // which is never unloaded.
    let found = unsafe { **version };
    if found != abi::ABI_VERSION {
        return Err(LoadError::AbiMismatch {
            found,
            expected: abi::ABI_VERSION,
        });
    }
    // SAFETY: with the version matching, the ABI fixes `angel_main`'s type as `EntryFn`.
    let entry = unsafe { lib.get::<abi::EntryFn>(abi::ENTRY_SYMBOL) }
        .map(|sym| *sym)
        .map_err(|_| LoadError::NotAnApp("angel_main"))?;
    // SAFETY: the ABI (1.2) declares the optional symbol as `uint32_t angel_features`.
    let features = unsafe { lib.get::<*const u32>(abi::FEATURES_SYMBOL) }
        // SAFETY: dlsym returned the address of a `u32` static of the never-unloaded library.
        .map(|sym| unsafe { **sym })
        .unwrap_or(0);
    Ok((lib, entry, features))
}

/// State behind `HostApi::data`; lives (leaked) for the whole process.
struct HostState {
    control: OwnedFd,
    listening: String,
    ready: AtomicBool,
    retiring: AtomicBool,
    drain: Arc<Drain>,
}

/// Runs worker mode; returns the process exit code.
pub fn run(args: WorkerArgs) -> i32 {
    // Terminal signals (Ctrl-C, hang-up, job control) reach the whole process group; they are
    // the master's to act on, and it tells workers what to do over the control channel.
    for sig in [
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        // SAFETY: SIG_IGN installs no handler code; nothing else in this process has set one.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    // SAFETY: the master passed this fd number for our end of the control channel and nothing
    // else in this process owns it.
    let control = unsafe { OwnedFd::from_raw_fd(args.control_fd) };
    // The app may spawn processes of its own: they must not inherit our channel or listeners.
    let mut inherited: Vec<RawFd> = args.listeners.iter().map(|(fd, _)| *fd).collect();
    inherited.push(control.as_raw_fd());
    for fd in inherited {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }

    // App code never runs as root: become `--user` before anything of the app is loaded.
    if let Some(arg) = &args.credentials {
        let dropped = crate::privdrop::Credentials::parse_arg(arg)
            .and_then(|c| crate::privdrop::drop_privileges(&c));
        if let Err(e) = dropped {
            if control::send_msg(control.as_fd(), &Msg::Failed(e.to_string())).is_err() {
                tracing::error!(event = "privileges_failed", "{e}");
            }
            return abi::EXIT_HOST_ERROR;
        }
    }
    let mut args = args;
    if args.spare {
        match zygote::wait_for_snapshot(&control) {
            Some((generation, fd)) => {
                args.generation = generation;
                args.snapshot_fd = fd;
                crate::log::set_generation(generation);
            }
            // The master is gone, or stops without a roll.
            None => return abi::EXIT_OK,
        }
    }
    // SAFETY: this is a worker (or probe) process: running the app's initialisers is its job;
    // the snapshot fd is the master's, passed to us alone.
    let loaded = unsafe { load(args.snapshot_fd) };
    let (lib, entry, features) = match loaded {
        Ok(ok) => ok,
        Err(e) => {
            if control::send_msg(control.as_fd(), &Msg::Failed(e.to_string())).is_err() {
                tracing::error!(event = "load_failed", "{e}");
            }
            return e.exit_code();
        }
    };
    // Never dlclose: Rust cdylibs register TLS destructors that would run on unmapped code.
    std::mem::forget(lib);
    let (args, control) = if args.probe {
        if !args.zygote || !zygote::single_threaded() {
            return abi::EXIT_OK;
        }
        match zygote::serve_forks(control, &args) {
            zygote::Outcome::Exit(code) => return code,
            zygote::Outcome::Worker(args, control) => (args, control),
        }
    } else {
        (args, control)
    };
    serve(&args, control, entry, features)
}

/// Runs the app of the loaded library as this worker; returns the process exit code.
fn serve(args: &WorkerArgs, control: OwnedFd, entry: abi::EntryFn, features: u32) -> i32 {
    let null = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()
    // SAFETY: `open` just returned this fd; nothing else owns it.
    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let listener_fds = args.listeners.iter().map(|(fd, _)| *fd).collect();
    let listening = args
        .listeners
        .iter()
        .map(|&(fd, _)| describe_listener(fd))
        .collect::<Vec<_>>()
        .join(", ");
    let (drain_fd, drain) = if features & abi::FEATURE_DRAINING_EVENT != 0 {
        match DrainSet::new(&control) {
            Ok(set) => {
                let fd = set.epoll.0.as_raw_fd();
                // Lives as long as the process: the app watches it until it returns.
                std::mem::forget(set);
                let drain = Drain {
                    fired: AtomicBool::new(false),
                    listeners: listener_fds,
                    null,
                    pipe: None,
                };
                (fd, Arc::new(drain))
            }
            Err(e) => {
                tracing::error!(event = "worker_error", "cannot set up the drain fd: {e}");
                return abi::EXIT_HOST_ERROR;
            }
        }
    } else {
        match drain_threads(&control, listener_fds, null) {
            Ok(ok) => ok,
            Err(code) => return code,
        }
    };
    let state: &'static HostState = Box::leak(Box::new(HostState {
        control,
        listening,
        ready: AtomicBool::new(false),
        retiring: AtomicBool::new(false),
        drain,
    }));

    let listeners: &'static [abi::Listener] = Box::leak(
        args.listeners
            .iter()
            .map(|&(fd, kind)| abi::Listener { fd, kind })
            .collect(),
    );
    let ctx: &'static abi::Context = Box::leak(Box::new(abi::Context {
        size: std::mem::size_of::<abi::Context>() as u32,
        abi_version: abi::ABI_VERSION,
        listeners: listeners.as_ptr(),
        listener_count: listeners.len() as u32,
        drain_fd,
        slot: args.slot,
        generation: args.generation,
        max_requests: args.max_requests,
        heartbeat_interval_ms: args.heartbeat_ms,
        graceful_timeout_ms: args.graceful_ms,
        host: abi::HostApi {
            data: state as *const HostState as *mut c_void,
            notify: host_notify,
            log: host_log,
            fail: host_fail,
        },
        log_record: Some(host_log_record),
    }));
    // SAFETY: `entry` has the ABI's type (checked version); `ctx` and everything it points to
    // is leaked, so valid for the whole call from any thread, as the ABI promises.
    let code = unsafe { entry(ctx) };
    if state.drain.pipe.is_none() {
        // A `drain` sent after the one that started the drain (see `read_unread`).
        let _ = read_unread(&state.control);
    }
    code
}

/// The host's side of the drain: started once, by whichever source comes first.
struct Drain {
    fired: AtomicBool,
    /// Our inherited listener fds, and `/dev/null` to put in their place at the drain.
    listeners: Vec<RawFd>,
    null: Option<OwnedFd>,
    /// For an app without `EVENT_DRAINING`: the write end of the pipe that is its drain fd
    /// (one byte makes it readable, and as the app never reads it, it stays readable).
    pipe: Option<OwnedFd>,
}

impl Drain {
    /// Starts the drain, once: only the first caller logs (`announce`) and acts.
    fn fire(&self, announce: impl FnOnce()) {
        if self.fired.swap(true, Ordering::AcqRel) {
            return;
        }
        announce();
        if let Some(pipe) = &self.pipe {
            while let Err(Errno::EINTR) = nix::unistd::write(pipe, b"d") {}
        }
        // The app accepts from duplicates of these fds and drops them as it drains; our own
        // references would keep each listening socket open until this process exits, and a
        // socket nobody accepts from any more must close (a graceful stop then refuses new
        // clients at once instead of resetting them later). `/dev/null` takes the fd
        // numbers over, so a late `accept` on them fails instead of meeting a reused number.
        if let Some(null) = &self.null {
            for &fd in &self.listeners {
                let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
            }
        }
    }
}

/// The drain fd of an app that reports `EVENT_DRAINING`: an epoll set that is readable once
/// the control channel is (the master's `drain`, or EOF when the master is gone) or a
/// `SIGTERM` is pending. No thread watches it but the app's own runtime.
struct DrainSet {
    epoll: nix::sys::epoll::Epoll,
    _term: nix::sys::signalfd::SignalFd,
}

impl DrainSet {
    fn new(control: &OwnedFd) -> nix::Result<Self> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
        use nix::sys::signalfd::{SfdFlags, SignalFd};
        let mut term = nix::sys::signal::SigSet::empty();
        term.add(Signal::SIGTERM);
        // Blocked before the app starts a thread, so every thread of it inherits the mask and
        // a SIGTERM stays pending for the signalfd (later ones merge with it: only the master
        // decides to kill). Processes the app spawns start with an empty mask (std and
        // posix_spawn reset it).
        term.thread_block()?;
        let signals = SignalFd::with_flags(&term, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&signals, EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
        epoll.add(
            control,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, 1),
        )?;
        Ok(Self {
            epoll,
            _term: signals,
        })
    }
}

/// What the master sent over the control channel that nobody has read yet.
#[derive(Debug, Default)]
struct Unread {
    /// At least one message (the master only ever sends `drain`).
    msg: bool,
    /// The master's end is closed: it is gone.
    eof: bool,
}

/// Reads, without blocking, whatever waits in the control channel. The epoll drain fd leaves
/// the master's `drain` unread, and a unix socket closed with unread data makes its peer's
/// next read fail with `ECONNRESET`: the master would lose the worker's last heartbeat (its
/// final request count) to it. So the queue is emptied at the drain and again before exit.
fn read_unread(control: &OwnedFd) -> Unread {
    use nix::sys::socket::{recv, MsgFlags};
    let mut unread = Unread::default();
    let mut buf = [0u8; 256];
    loop {
        match recv(control.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => {
                unread.eof = true;
                return unread;
            }
            Ok(_) => unread.msg = true,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return unread,
            Err(_) => {
                unread.eof = true;
                return unread;
            }
        }
    }
}

/// Logs what started the drain, as the app's `EVENT_DRAINING` finds it: the master's message
/// or its EOF in the control channel, else a pending `SIGTERM`.
fn announce_drain(control: &OwnedFd) {
    let unread = read_unread(control);
    let term_pending = || {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `sigpending` fills the set it is given; it is read only if that succeeded.
        unsafe {
            libc::sigpending(set.as_mut_ptr()) == 0
                && libc::sigismember(set.as_ptr(), libc::SIGTERM) == 1
        }
    };
    if unread.msg {
        tracing::info!(event = "closes", "closes");
    } else if unread.eof {
        tracing::warn!(event = "orphaned", "master is gone; draining");
    } else if term_pending() {
        tracing::info!(event = "closes", "closes (SIGTERM)");
    } else {
        tracing::info!(event = "closes", "closes");
    }
}

/// Logs a failure to set up the worker as `what: error` and gives the exit code for it.
fn host_error<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> i32 {
    move |e| {
        tracing::error!(event = "worker_error", "{what}: {e}");
        abi::EXIT_HOST_ERROR
    }
}

fn describe_listener(fd: RawFd) -> String {
    // SAFETY: the fd is one of our inherited listeners, open for the whole process.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match SockRef::from(&borrowed).local_addr() {
        Ok(addr) => match (addr.as_socket(), addr.as_pathname()) {
            (Some(inet), _) => inet.to_string(),
            (None, Some(path)) => format!("unix:{}", path.display()),
            _ => format!("fd {fd}"),
        },
        Err(_) => format!("fd {fd}"),
    }
}
